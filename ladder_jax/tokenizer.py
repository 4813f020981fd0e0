"""Tokenizers: byte-level (the default, no files needed) or a Hugging Face `tokenizer.json`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

BYTE_VOCAB = 259  # 256 bytes + BOS, EOS, PAD


class ByteTokenizer:
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


class HFTokenizer:
    """A `tokenizer.json` read with the `tokenizers` package (optional extra `hf`)."""

    def __init__(self, path: str | Path, bos_id: int, eos_id: int, pad_id: int):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("reading tokenizer.json needs the 'tokenizers' package: pip install -e '.[hf]'") from e
        self.tok = Tokenizer.from_file(str(path))
        self.fingerprint = "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
        self.vocab_size = self.tok.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def get_tokenizer(cfg, run_dir: str | Path | None = None):
    """The run's tokenizer.json if it has one, else bytes (which needs a 259-token vocabulary)."""
    m = cfg.model
    if run_dir is not None and (Path(run_dir) / "tokenizer.json").exists():
        return HFTokenizer(Path(run_dir) / "tokenizer.json", m.bos_id, m.eos_id, m.pad_id)
    if m.vocab_size != BYTE_VOCAB:
        raise ValueError(
            f"model.vocab_size={m.vocab_size} needs a tokenizer.json (the byte tokenizer has {BYTE_VOCAB} tokens); "
            f"put one in the run directory or use a byte-level preset such as tiny"
        )
    return ByteTokenizer()
