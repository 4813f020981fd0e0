"""Prompts, stops and chat templates as transformers makes them: a converted tiny Llama continues
a text greedily exactly as transformers' generate() does, with a tokenizer that adds a BOS and
with one that does not, and stops at every end id of generation_config.json."""

import json

import numpy as np
import pytest
import torch
from tokenizers import processors
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ladder_jax import checkpoint as ckpt
from ladder_jax import decode
from ladder_jax.config import load_config
from ladder_jax.interop import hf as convert
from ladder_jax.mesh import make_mesh
from ladder_jax.tokenizer import ChatTemplateError, HFTokenizer, get_tokenizer

from .test_convert import TEXTS, byte_level_tokenizer

CONFIG = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception('roles are user or assistant') }}{% endif %}\n"
    "<|{{ m['role'] }}|>{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}{{ {'n': messages | length} | tojson }}"
)
# name -> (tokenizer.json adds BOS itself, tokenizer_config.json extras)
TOKENIZERS = {
    "llama3-style": (True, {}),  # BOS from tokenizer.json's post-processor
    "gpt2-style": (False, {"add_bos_token": False}),  # SmolLM and others: no BOS
    # transformers 5 ignores add_bos_token next to a tokenizer.json: no BOS either.
    "add-bos-token-ignored": (False, {"add_bos_token": True}),
}
PROMPT = "def fib(n):"
NEW = 12


def hf_directory(path, adds_bos: bool, config: dict):
    """A tokenizer.json (with or without a BOS post-processor) and its tokenizer_config.json."""
    path.mkdir()
    byte_level_tokenizer(path / "tokenizer.json")
    if adds_bos:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        tok.save(str(path / "tokenizer.json"))
    tokenizer_config = {**SPECIAL, "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT, **config}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny LlamaForCausalLM whose generation_config.json lists a second end id (one its greedy
    continuation of PROMPT reaches), converted to a run; with the tokenizers of TOKENIZERS."""
    root = tmp_path_factory.mktemp("prompts")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, initializer_range=0.3)).eval()
    hf_dir = root / "llama"
    model.save_pretrained(hf_dir, safe_serialization=True)
    tokenizers = {}
    for name, (adds_bos, config) in TOKENIZERS.items():
        hf_directory(root / name, adds_bos, config)
        tokenizers[name] = AutoTokenizer.from_pretrained(root / name)
    ids = tokenizers["llama3-style"](PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        free = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None)[0, ids.shape[1] :].tolist()
    stop = next(t for i, t in enumerate(free) if i >= 4 and t not in free[:i] and t != 2)
    (hf_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, stop]}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_dir / name).write_bytes((root / "llama3-style" / name).read_bytes())
    run = root / "run"
    convert.from_hf(hf_dir, run)
    cfg = load_config(run / "config.yaml", ["mesh.tensor=2"])
    mesh = make_mesh(cfg)
    params = ckpt.restore_params(run, cfg, mesh)
    return root, LlamaForCausalLM.from_pretrained(hf_dir).eval(), tokenizers, run, cfg, mesh, params


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_prompts_and_chats_tokenize_as_transformers(converted, name):
    root, _, tokenizers, run, cfg, *_ = converted
    ours = HFTokenizer(root / name / "tokenizer.json", cfg.model.bos_id, cfg.model.eos_id, cfg.model.pad_id)
    theirs = tokenizers[name]
    for text in [PROMPT, *TEXTS]:
        assert ours.encode_prompt(text) == theirs(text).input_ids
    assert (ours.encode_prompt(PROMPT)[0] == 1) == (name == "llama3-style")
    messages = [
        {"role": "user", "content": "fib? "},
        {"role": "assistant", "content": "def"},
        {"role": "user", "content": "go"},
    ]
    want = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.render_chat(messages) == want
    assert ours.encode(want) == theirs.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    with pytest.raises(ChatTemplateError, match="roles are user or assistant"):
        ours.render_chat([{"role": "system", "content": "x"}])


@pytest.mark.parametrize("name", ["llama3-style", "gpt2-style"])
def test_greedy_continuation_equals_transformers_generate(converted, name, devices):
    root, model, tokenizers, run, cfg, mesh, params = converted
    run_tokenizer = get_tokenizer(cfg, run)  # the converted run carries the three files
    assert run_tokenizer.stop_ids == {2, *json.loads((run / "generation_config.json").read_text())["eos_token_id"]}
    ours = HFTokenizer(root / name / "tokenizer.json", cfg.model.bos_id, cfg.model.eos_id, cfg.model.pad_id)
    prompt = ours.encode_prompt(PROMPT)
    got = decode.generate(cfg, mesh, params, [prompt], NEW, eos_id=run_tokenizer.stop_ids).tokens[0]
    ids = tokenizers[name](PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == prompt
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=NEW, do_sample=False)[0, ids.shape[1] :].tolist()
    if want[-1] in run_tokenizer.stop_ids:  # transformers keeps the end id; we leave it out
        want = want[:-1]
        assert len(got) < NEW
    assert got == want
    assert np.isin(want, list(run_tokenizer.stop_ids)).sum() == 0
