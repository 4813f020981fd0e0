"""Tokenizers: byte-level (the default, no files needed) or a Hugging Face `tokenizer.json`.

Prompts are made as transformers makes them (`encode_prompt`, `render_chat`), from the files a
Hugging Face model directory carries next to tokenizer.json: tokenizer_config.json (add_bos_token,
special tokens, chat_template) and generation_config.json (every id that ends a generation).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

import numpy as np

from .errors import LadderError
from .storage import Path, path

BYTE_VOCAB = 259  # 256 bytes + BOS, EOS, PAD
# What a run directory keeps of a Hugging Face tokenizer (copied by convert, SPD, LP and training).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def copy_tokenizer_files(source: str | Path, target: str | Path, files=TOKENIZER_FILES) -> None:
    for name in files:
        if (path(source) / name).exists():
            (path(target) / name).write_bytes((path(source) / name).read_bytes())


class TokenizerError(LadderError):
    """A run whose tokenizer cannot be found or used; the message says what to put where."""


class ChatTemplateError(LadderError):
    """A chat request the tokenizer cannot render (no template, or the template refused it)."""


class ChatTemplated:
    """`render_chat` for a tokenizer with a `chat_template` (jinja2 text, or None) and `special`
    tokens (the variables the template sees besides the messages)."""

    chat_template: str | None = None
    special: dict = {}

    def render_chat(self, messages: list[dict]) -> str:
        """The chat template applied to `messages`, ending with the prompt for the assistant's
        turn; transformers then tokenizes the text without adding special tokens, and so do we."""
        if not self.chat_template:
            raise ChatTemplateError(
                "the model has no chat template (tokenizer_config.json's chat_template); use /v1/completions with a plain prompt"
            )
        return render_chat_template(self.chat_template, messages, self.special)


class ByteTokenizer(ChatTemplated):
    """Token ids 0..255 are the UTF-8 bytes; 256 BOS, 257 EOS, 258 PAD."""

    vocab_size = BYTE_VOCAB
    bos_id, eos_id, pad_id = 256, 257, 258
    fingerprint = "bytes"  # what a prepared corpus records to be read only with the same tokenizer

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str):
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return bytes(i for i in ids if i < 256)

    def encode_prompt(self, text: str) -> list[int]:
        """BOS and the text, as training packs documents."""
        return [self.bos_id, *self.encode(text)]

    stop_ids = frozenset({eos_id})


class HFTokenizer(ChatTemplated):
    """A `tokenizer.json` read with the `tokenizers` package (optional extra `hf`)."""

    def __init__(self, file: str | Path, bos_id: int, eos_id: int, pad_id: int):
        """`file`: tokenizer.json (local or gs://); tokenizer_config.json and generation_config.json next to it are
        read when present."""
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("reading tokenizer.json needs the 'tokenizers' package: pip install -e '.[hf]'") from e
        data = path(file).read_bytes()  # local or gs://: tokenizers reads only local files
        self.tok = Tokenizer.from_str(data.decode())
        self.fingerprint = "sha256:" + hashlib.sha256(data).hexdigest()
        self.vocab_size = self.tok.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.config = read_json_if_present(path(file).parent / "tokenizer_config.json")
        generation = read_json_if_present(path(file).parent / "generation_config.json")
        self.special = {}  # bos_token, eos_token, ...: the names templates see
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token = self.config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                self.special[key] = token
        ends = generation.get("eos_token_id", eos_id)
        self.stop_ids = frozenset([*(ends if isinstance(ends, list) else [ends]), eos_id])
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # several named templates: transformers uses "default"
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}.get("default")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt as transformers' tokenizer(text) gives them: tokenizer.json's
        post-processor adds the special tokens (a BOS for Llama 2 and 3, none for GPT-2-style
        tokenizers such as SmolLM's). transformers 5 ignores tokenizer_config.json's
        add_bos_token when a tokenizer.json exists, and so do we."""
        return self.tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def read_json_if_present(file: Path) -> dict:
    return json.loads(file.read_text()) if file.exists() else {}


def render_chat_template(template: str, messages: list[dict], special_tokens: dict) -> str:
    """Render a chat template as transformers' apply_chat_template does: a sandboxed jinja2
    environment with trim_blocks and lstrip_blocks, its tojson, raise_exception and strftime_now,
    the special tokens as variables and add_generation_prompt=True."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text for training) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template refused the messages: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True, tools=None, documents=None, **special_tokens
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on the messages: {e}") from None


def get_tokenizer(cfg, run_dir: str | Path | None = None):
    """The run's tokenizer.json if it has one, else bytes (which needs a 259-token vocabulary)."""
    m = cfg.model
    if run_dir is not None and (path(run_dir) / "tokenizer.json").exists():
        return HFTokenizer(path(run_dir) / "tokenizer.json", m.bos_id, m.eos_id, m.pad_id)
    if m.vocab_size != BYTE_VOCAB:
        raise TokenizerError(
            f"model.vocab_size={m.vocab_size} needs a tokenizer.json (the byte tokenizer has {BYTE_VOCAB} tokens); "
            f"put one in the run directory or use a byte-level preset such as tiny"
        )
    return ByteTokenizer()
