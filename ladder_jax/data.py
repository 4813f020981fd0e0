"""Data: documents -> tokens -> packed fixed-length windows -> a checkpointable grain iterator.

Documents are packed back to back (BOS text EOS BOS text EOS ...) and cut into windows of
`seq_len + 1` tokens at stride `seq_len`. Each window carries segment ids (attention never crosses
a document boundary), per-document positions (restart at 0 where a document starts or where the
window cuts into one), and a loss mask that drops the one prediction per boundary whose target is
the next document's BOS.
"""

from __future__ import annotations

import glob
import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np


class DataError(ValueError):
    """A dataset that cannot be used; the message says what to change."""


@dataclass
class Document:
    name: str
    text: str


def stdlib_documents() -> list[Document]:
    """The running Python's own standard-library sources (no site-packages): real code and English."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    return [Document(str(p.relative_to(root)), p.read_text("utf-8", errors="replace")) for p in files]


def file_documents(spec: str, text_field: str = "text") -> list[Document]:
    """Text files, globs (comma-separated) or JSONL files (one document per line's `text_field`)."""
    paths: list[str] = []
    for pattern in (s.strip() for s in spec.split(",") if s.strip()):
        matched = sorted(glob.glob(pattern, recursive=True))
        if not matched:
            raise DataError(f"train.data: '{pattern}' matches no file; give an existing path or glob (or 'stdlib')")
        paths += [m for m in matched if Path(m).is_file()]
    docs = []
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n} is not valid JSON ({e.msg}); fix the line or remove it") from None
                    if not isinstance(record, dict) or text_field not in record:
                        raise DataError(
                            f"{path}:{n} has no '{text_field}' field; set train.text_field to the field holding the text"
                        )
                    docs.append(Document(f"{path}:{n}", str(record[text_field])))
        else:
            docs.append(Document(path, Path(path).read_text("utf-8", errors="replace")))
    return docs


def load_documents(spec: str, text_field: str = "text") -> list[Document]:
    docs = stdlib_documents() if spec == "stdlib" else file_documents(spec, text_field)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"train.data='{spec}' holds no text (empty or whitespace only); point it at files with text")
    return docs


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic split by a hash of each document's name; a single document is split by length."""
    if val_fraction == 0:
        return docs, []
    if len(docs) == 1:
        text = docs[0].text
        cut = int(len(text) * (1 - val_fraction))
        return [Document(docs[0].name, text[:cut])], [Document(docs[0].name + "#val", text[cut:])]
    val = [d for d in docs if zlib.crc32(d.name.encode()) % 10_000 < val_fraction * 10_000]
    if not val:  # tiny corpora: hold out the last document
        val = docs[-1:]
    names = {d.name for d in val}
    return [d for d in docs if d.name not in names], val


def pack(docs: list[Document], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """One token stream (BOS text EOS per document) and its document index per token."""
    pieces, segs = [], []
    encode = getattr(tokenizer, "encode_array", lambda t: np.asarray(tokenizer.encode(t), np.int32))
    for k, d in enumerate(docs):
        ids = np.concatenate([[tokenizer.bos_id], encode(d.text), [tokenizer.eos_id]]).astype(np.int32)
        pieces.append(ids)
        segs.append(np.full(len(ids), k, np.int32))
    return np.concatenate(pieces), np.concatenate(segs)


class PackedWindows:
    """Random-access windows of a packed stream: the grain source."""

    def __init__(self, tokens: np.ndarray, segments: np.ndarray, seq_len: int):
        self.tokens, self.segments, self.seq_len = tokens, segments, seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict:
        s = self.seq_len
        w = self.tokens[i * s : i * s + s + 1]
        seg = self.segments[i * s : i * s + s + 1]
        seg_in = seg[:-1] - seg[0]  # small ids; only equality matters
        starts = np.r_[True, seg_in[1:] != seg_in[:-1]]
        first = np.maximum.accumulate(np.where(starts, np.arange(s), 0))
        return {
            "inputs": w[:-1],
            "targets": w[1:],
            "segment_ids": seg_in,
            "positions": (np.arange(s) - first).astype(np.int32),
            "mask": (seg[1:] == seg[:-1]).astype(np.float32),
        }


@dataclass
class Datasets:
    train: PackedWindows
    val: PackedWindows
    n_train_tokens: int
    n_val_tokens: int


def build_datasets(train_cfg, tokenizer) -> Datasets:
    docs = load_documents(train_cfg.data, train_cfg.text_field)
    train_docs, val_docs = split_documents(docs, train_cfg.val_fraction)
    tr_tok, tr_seg = pack(train_docs, tokenizer)
    train = PackedWindows(tr_tok, tr_seg, train_cfg.seq_len)
    if len(train) < train_cfg.batch_size:
        raise DataError(
            f"train.data gives {len(train)} training windows of {train_cfg.seq_len} tokens, fewer than one batch "
            f"({train_cfg.batch_size}); add text or lower train.seq_len / train.batch_size"
        )
    va_tok, va_seg = pack(val_docs, tokenizer) if val_docs else (np.zeros(0, np.int32), np.zeros(0, np.int32))
    return Datasets(train, PackedWindows(va_tok, va_seg, train_cfg.seq_len), len(tr_tok), len(va_tok))


def train_iterator(windows: PackedWindows, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
    """Shuffled, repeating, host-sharded batches; `get_state`/`set_state` make it resumable."""
    if batch_size % process_count:
        raise DataError(f"train.batch_size={batch_size} does not split over {process_count} processes")
    ds = grain.MapDataset.source(windows).shuffle(seed=seed)[process_index::process_count].repeat()
    return iter(ds.batch(batch_size // process_count, drop_remainder=True).to_iter_dataset())


def val_batches(
    windows: PackedWindows, batch_size: int, n_batches: int, process_index: int = 0, process_count: int = 1
) -> list[dict]:
    """A fixed list of validation batches (the same at every evaluation)."""
    per_host = batch_size // process_count
    n = min(n_batches, len(windows) // batch_size)
    out = []
    for b in range(n):
        rows = [windows[b * batch_size + process_index * per_host + r] for r in range(per_host)]
        out.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return out
