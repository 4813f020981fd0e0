"""Data: documents -> tokens -> packed fixed-length windows -> a checkpointable grain iterator.

Documents are packed back to back (BOS text EOS BOS text EOS ...) and cut into windows of
`seq_len + 1` tokens at stride `seq_len`. Each window carries segment ids (attention never crosses
a document boundary), per-document positions (restart at 0 where a document starts or where the
window cuts into one), and a loss mask that drops the one prediction per boundary whose target is
the next document's BOS.

The documents come from files tokenized here into memory (stdlib, text, JSONL, Parquet) or from a
directory `python -m ladder_jax data prepare` wrote (ladder_jax/prepare.py): ArrayRecord shards
read through grain, one record per document. Both are packed by the same PackedWindows.
"""

from __future__ import annotations

import gzip
import io
import json
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path as LocalPath

import numpy as np

from .errors import LadderError
from .storage import Path, expand, path, stage


class DataError(LadderError):
    """A dataset that cannot be used; the message says what to change."""


@dataclass
class Document:
    name: str
    text: str


def stdlib_documents() -> list[Document]:
    """The running Python's own standard-library sources (no site-packages): real code and English."""
    root = LocalPath(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    return [Document(str(p.relative_to(root)), p.read_text("utf-8", errors="replace")) for p in files]


def input_files(spec, what: str = "train.data") -> list[str]:
    """Existing files named by paths or globs (a comma-separated string or a list), in a fixed order."""
    patterns = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for pattern in (p for p in patterns if p):
        matched = expand(pattern)
        if not matched:
            raise DataError(f"{what}: '{pattern}' matches no file; give an existing path or glob (or 'stdlib')")
        paths += matched
    return paths


def parquet_row_groups(name: str, text_field: str) -> int:
    """The row groups of a Parquet file that has the text column (refused in one line otherwise)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path(name).open("rb"))
    if text_field not in meta.schema_arrow.names:
        raise DataError(
            f"{name} has no column '{text_field}' (it has {', '.join(meta.schema_arrow.names)}); "
            f"name the text column with --text-field / train.text_field"
        )
    return meta.num_row_groups


def read_documents(name: str, text_field: str = "text", row_group: int | None = None) -> Iterator[Document]:
    """The documents of one file: a text file is one; JSONL (optionally .gz) one per line's
    `text_field`; Parquet one per row of its `text_field` column (one row group, or all)."""
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        f = pq.ParquetFile(path(name).open("rb"))
        groups = range(parquet_row_groups(name, text_field)) if row_group is None else [row_group]
        row = 0
        for g in groups:
            if row_group is not None:
                row = sum(f.metadata.row_group(i).num_rows for i in range(g))
            for text in f.read_row_group(g, columns=[text_field]).column(0).to_pylist():
                yield Document(f"{name}:{row}", "" if text is None else str(text))
                row += 1
    elif name.endswith((".jsonl", ".jsonl.gz")):
        raw = path(name).open("rb")
        with io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if name.endswith(".gz") else raw, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{name}:{n} is not valid JSON ({e.msg}); fix the line or remove it") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(
                        f"{name}:{n} has no '{text_field}' field; name the field holding the text with "
                        f"--text-field / train.text_field"
                    )
                yield Document(f"{name}:{n}", str(record[text_field]))
    else:
        yield Document(name, path(name).read_bytes().decode("utf-8", errors="replace"))


def file_documents(spec: str, text_field: str = "text") -> list[Document]:
    """Text files, globs (comma-separated), JSONL (optionally .gz) or Parquet files."""
    return [d for f in input_files(spec) for d in read_documents(f, text_field)]


def load_documents(spec: str, text_field: str = "text") -> list[Document]:
    docs = stdlib_documents() if spec == "stdlib" else file_documents(spec, text_field)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise DataError(f"train.data='{spec}' holds no text (empty or whitespace only); point it at files with text")
    return docs


def is_validation(name: str, val_fraction: float) -> bool:
    """Whether a document goes to the validation split: a hash of its name, so any process agrees."""
    return zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic split by a hash of each document's name; a single document is split by length."""
    if val_fraction == 0:
        return docs, []
    if len(docs) == 1:
        text = docs[0].text
        cut = int(len(text) * (1 - val_fraction))
        return [Document(docs[0].name, text[:cut])], [Document(docs[0].name + "#val", text[cut:])]
    val = [d for d in docs if is_validation(d.name, val_fraction)]
    if not val:  # tiny corpora: hold out the last document
        val = docs[-1:]
    names = {d.name for d in val}
    return [d for d in docs if d.name not in names], val


def encode(tokenizer, text: str) -> np.ndarray:
    """One document's token ids: BOS text EOS."""
    ids = tokenizer.encode_array(text) if hasattr(tokenizer, "encode_array") else tokenizer.encode(text)
    return np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32)


class PackedWindows:
    """Random-access windows over documents laid back to back: the grain source.

    `documents[k]` is document k's tokens (BOS text EOS; a list in memory or ArrayRecord records
    on disk) and `offsets[k]` where it starts in the stream (`offsets[-1]`: the stream's length;
    a memory-mapped array for a prepared directory). A window reads only the documents it covers.
    """

    def __init__(self, documents: Sequence, offsets: np.ndarray, seq_len: int, host_local: bool = False):
        self.documents, self.offsets, self.seq_len = documents, offsets, seq_len
        self.host_local = host_local  # this process's own documents (open_prepared with a host)

    @classmethod
    def of_arrays(cls, arrays: Sequence[np.ndarray], seq_len: int) -> PackedWindows:
        return cls(arrays, np.r_[0, np.cumsum([len(a) for a in arrays], dtype=np.int64)], seq_len)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict:
        s = self.seq_len
        start, stop = i * s, i * s + s + 1
        k = int(np.searchsorted(self.offsets, start, "right")) - 1
        pieces, segments = [], []
        while start < stop:  # the documents the window covers, each cut to the window
            begin = int(self.offsets[k])
            piece = self.documents[k][start - begin : stop - begin]
            pieces.append(piece)
            segments.append(np.full(len(piece), len(pieces) - 1, np.int32))
            start += len(piece)
            k += 1
        w, seg = np.concatenate(pieces).astype(np.int32), np.concatenate(segments)
        seg_in = seg[:-1]
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


def build_datasets(train_cfg, tokenizer, host: tuple[int, int] = (0, 1)) -> Datasets:
    """Train and validation windows: from a prepared directory (streamed from disk; in a
    multi-process run, `host` = (index, count), each process's own train shards), or the stdlib /
    files tokenized here into memory. Both go through the same PackedWindows."""
    if train_cfg.data != "stdlib" and "," not in train_cfg.data and path(train_cfg.data).is_dir():
        train = open_prepared(train_cfg.data, "train", tokenizer, train_cfg.seq_len, host)
        val = open_prepared(train_cfg.data, "val", tokenizer, train_cfg.seq_len)  # small: every host reads it whole
    else:
        docs = load_documents(train_cfg.data, train_cfg.text_field)
        train_docs, val_docs = split_documents(docs, train_cfg.val_fraction)
        train = PackedWindows.of_arrays([encode(tokenizer, d.text) for d in train_docs], train_cfg.seq_len)
        val = PackedWindows.of_arrays([encode(tokenizer, d.text) for d in val_docs], train_cfg.seq_len)
    batch = train_cfg.batch_size // host[1] if train.host_local else train_cfg.batch_size
    if len(train) < batch:
        where = f"process {host[0]}'s shards of train.data give" if train.host_local else "train.data gives"
        raise DataError(
            f"{where} {len(train)} training windows of {train_cfg.seq_len} tokens, fewer than one batch "
            f"({batch}); add text or lower train.seq_len / train.batch_size"
        )
    return Datasets(train, val)


# ---------------------------------------------------------------------------------------------
# Prepared directories (written by `python -m ladder_jax data prepare`, ladder_jax/prepare.py):
# per split, ArrayRecord shards of one record per document (its token ids), an offsets array
# (where each document starts in the split's stream) and manifest.json, written last.

MANIFEST = "manifest.json"


def tokenizer_identity(tokenizer) -> dict:
    """What a prepared directory must share with the model's tokenizer."""
    return {
        "fingerprint": tokenizer.fingerprint,
        "vocab_size": int(tokenizer.vocab_size),
        "bos_id": int(tokenizer.bos_id),
        "eos_id": int(tokenizer.eos_id),
    }


class TokenRecords:
    """A split's ArrayRecord shards as a sequence of token arrays (grain's ArrayRecordDataSource)."""

    def __init__(self, paths: list[str], dtype: str):
        import grain  # here, not at the top: prepare's worker processes import this module without JAX

        self.source, self.dtype = grain.sources.ArrayRecordDataSource(paths), np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, k: int) -> np.ndarray:
        return np.frombuffer(self.source[k], self.dtype)


def read_manifest(directory: str | Path) -> dict:
    manifest = path(directory) / MANIFEST
    if not manifest.exists():
        raise DataError(
            f"train.data={directory} has no {MANIFEST}: its prepare did not finish; rerun the same "
            f"`python -m ladder_jax data prepare` command (it keeps the finished shards)"
        )
    return json.loads(manifest.read_text())


def open_prepared(directory: str | Path, split: str, tokenizer, seq_len: int, host: tuple[int, int] = (0, 1)):
    """One split of a prepared directory (PackedWindows), checked against the tokenizer and its own
    manifest (every shard present, with the size and record count listed) before anything is read.

    `host` = (process index, process count): in a multi-process run each process reads only its
    own shards (every count-th from its index), the only ones it stages from gs://; its windows
    are then its own (`host_local`), and the train iterator does not split them again."""
    directory = path(directory)
    manifest = read_manifest(directory)
    ours, theirs = tokenizer_identity(tokenizer), manifest["tokenizer"]
    if ours != theirs:
        diff = ", ".join(f"{k} {theirs.get(k)} vs {ours[k]}" for k in ours if theirs.get(k) != ours[k])
        raise DataError(
            f"train.data={directory} was tokenized with another tokenizer than the model's ({diff}); "
            f"prepare it again with --tokenizer RUN_DIR (or the model's tokenizer.json)"
        )
    info = manifest["splits"][split]
    if info["documents"] == 0:
        if split == "val" and manifest["val_fraction"] == 0:
            return PackedWindows([], np.zeros(1, np.int64), seq_len)  # no validation asked for
        raise DataError(
            f"the {split} split of {directory} is empty; prepare it from more documents"
            + (" or with a larger --val-fraction" if split == "val" else "")
        )
    shards = info["shards"]
    for shard in shards:
        shard_path = directory / shard["path"]
        size = shard_path.stat().length if shard_path.exists() else None
        if size != shard["bytes"]:
            what = "is missing" if size is None else f"has {size} bytes, the manifest says {shard['bytes']} (truncated)"
            raise DataError(f"shard {shard_path} {what}; rerun the prepare command into a new --out directory")
    index, count = host
    mine = list(range(index, len(shards), count))
    if not mine:
        raise DataError(
            f"the {split} split of {directory} has {len(shards)} shards for {count} processes, and each process "
            f"reads its own: prepare it from at least {count} files or Parquet row groups"
        )
    offsets = _offsets(directory, info)
    if count > 1:  # this host's documents only, back to back
        starts = np.r_[0, np.cumsum([s["documents"] for s in shards])]
        lengths = [np.diff(offsets[starts[k] : starts[k + 1] + 1]) for k in mine]
        offsets = np.r_[0, np.cumsum(np.concatenate(lengths))]
    # array_record reads local files only: shards on gs:// are staged into a local cache (storage.stage)
    local = stage([(directory / shards[k]["path"], shards[k]["bytes"]) for k in mine])
    try:
        records = TokenRecords(local, manifest["dtype"])
    except Exception as e:  # a shard of the right size that array_record cannot read
        raise DataError(
            f"a shard of {directory} is unreadable ({str(e).splitlines()[0]}); rerun the prepare command into a new --out directory"
        ) from None
    if len(records) != len(offsets) - 1:
        raise DataError(
            f"the {split} split of {directory} has {len(records)} records in {len(mine)} shards but its manifest "
            f"lists {len(offsets) - 1} documents there; rerun the prepare command into a new --out directory"
        )
    return PackedWindows(records, offsets, seq_len, host_local=count > 1)


def _offsets(directory: Path, info: dict) -> np.ndarray:
    """Where each document of a split starts, checked against the manifest."""
    offsets_path = directory / info["offsets"]
    if not offsets_path.exists():
        raise DataError(f"{offsets_path} is missing; rerun the prepare command into a new --out directory")
    (offsets_file,) = stage([(offsets_path, offsets_path.stat().length)])
    offsets = np.load(offsets_file, mmap_mode="r")  # mapped: memory does not grow with the corpus
    if len(offsets) != info["documents"] + 1 or offsets[-1] != info["tokens"]:
        raise DataError(
            f"{offsets_path} lists {len(offsets) - 1} documents but the manifest {info['documents']}; "
            f"rerun the prepare command into a new --out directory"
        )
    return offsets


def train_iterator(windows: PackedWindows, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
    """Shuffled, repeating, host-sharded batches; `get_state`/`set_state` make it resumable."""
    if batch_size % process_count:
        raise DataError(f"train.batch_size={batch_size} does not split over {process_count} processes")
    import grain

    ds = grain.MapDataset.source(windows).shuffle(seed=seed)
    if not windows.host_local:  # windows every host shares: each takes every process_count-th
        ds = ds[process_index::process_count]
    ds = ds.repeat()
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
