"""`python -m ladder_jax data prepare`: tokenize a corpus once into ArrayRecord shards.

The inputs (text files, JSONL, JSONL.gz, Parquet) are cut into units of work: a group of text
files, one JSONL file, one Parquet row group. Worker processes tokenize one unit each into
`train-NNNNN.arrayrecord` and `val-NNNNN.arrayrecord` (one record per document: its token ids
BOS text EOS) with the documents' lengths beside them, write under temporary names, rename them
when complete and only then record the unit done in `unit-NNNNN.json`. A rerun with the same
arguments skips the done units. `manifest.json`, the only file a reader opens first, is written
last: a directory whose prepare was killed is refused, never half read (data.open_prepared).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from .data import (
    MANIFEST,
    DataError,
    encode,
    input_files,
    is_validation,
    parquet_row_groups,
    read_documents,
    tokenizer_identity,
)
from .storage import Path, is_remote, local_dir_for, path, size_and_version, write_atomic
from .tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer

SPLITS = ("train", "val")
TEXT_UNIT_BYTES = 32 << 20  # text files are grouped into units of about this many bytes
WRITER_OPTIONS = "group_size:1"  # one record per chunk: a window reads its documents at random


def load_tokenizer(spec: str, config: str | None = None):
    """`bytes`, a run directory (its tokenizer and ids), or a tokenizer.json with a preset's ids."""
    from .checkpoint import load_run_config
    from .config import load_config

    if spec == "bytes":
        return ByteTokenizer()
    source = path(spec)
    if source.is_dir():
        return get_tokenizer(load_run_config(source), source)
    if source.is_file():
        if config is None:
            raise DataError(f"--tokenizer {spec} needs --config PRESET for its BOS/EOS ids (e.g. --config ladder-1b)")
        m = load_config(config).model
        return HFTokenizer(source, m.bos_id, m.eos_id, m.pad_id)
    raise DataError(f"--tokenizer {spec} is neither 'bytes', a run directory nor a tokenizer.json file")


def plan_units(paths: list[str], text_field: str) -> list[dict]:
    """The units of work in the files' order; Parquet columns are checked here, before any work."""
    units, text = [], []

    def flush_text() -> None:
        if text:
            units.append({"files": list(text), "row_group": None})
            text.clear()

    for name in paths:
        if name.endswith(".parquet"):
            flush_text()
            units += [{"files": [name], "row_group": g} for g in range(parquet_row_groups(name, text_field))]
        elif name.endswith((".jsonl", ".jsonl.gz")):
            flush_text()
            units.append({"files": [name], "row_group": None})
        else:
            text.append(name)
            if sum(size_and_version(p)[0] for p in text) >= TEXT_UNIT_BYTES:
                flush_text()
    flush_text()
    return units


def _stamp(files: list[str]) -> list:
    """What a finished unit remembers of its inputs, to redo it when one changes."""
    return [[f, *size_and_version(f)] for f in files]


def _done(out: Path, k: int, unit: dict, options: dict) -> dict | None:
    """A unit's record if it is done with these inputs and `options` (a unit tokenized by a
    prepare whose split was refused, with other options, is redone)."""
    unit_file = out / f"unit-{k:05d}.json"
    if not unit_file.exists():
        return None
    record = json.loads(unit_file.read_text())
    complete = all((out / record[s]["path"]).exists() for s in SPLITS if record[s]["documents"])
    same = record["inputs"] == _stamp(unit["files"]) and record.get("options") == options
    return record if complete and same else None


def _write_json(file: Path, obj) -> None:
    write_atomic(file, json.dumps(obj, indent=1))


def _publish(work, out: Path, k: int, record: dict) -> None:
    """A unit written in the local `work` directory, copied into `out` on object storage (array_record
    writes local files only): its shards first, its unit record last, as locally."""
    if not is_remote(out):
        return
    names = [record[s]["path"] for s in SPLITS]
    names += [n.replace(".arrayrecord", ".lengths.npy") for n in names] + [f"unit-{k:05d}.json"]
    for name in names:
        (out / name).write_bytes((work / name).read_bytes())
        (work / name).unlink()


# Worker processes: a tokenizer and the shared progress counters, set once per process.
_worker: dict = {}


def _init_worker(tokenizer, docs, tokens) -> None:
    _worker.update(tokenizer=tokenizer, identity=tokenizer_identity(tokenizer), docs=docs, tokens=tokens)


def _prepare_unit(out: Path, k: int, unit: dict, text_field: str, val_fraction: float, dtype: str) -> dict:
    tokenizer = _worker["tokenizer"]
    names = {s: f"{s}-{k:05d}" for s in SPLITS}
    writers = {s: ArrayRecordWriter(str(out / f"{names[s]}.arrayrecord.tmp"), WRITER_OPTIONS) for s in SPLITS}
    lengths = {s: [] for s in SPLITS}
    pending_docs = pending_tokens = 0
    for name in unit["files"]:
        for doc in read_documents(name, text_field, unit["row_group"]):
            if not doc.text.strip():
                continue
            ids = encode(tokenizer, doc.text)
            split = "val" if is_validation(doc.name, val_fraction) else "train"
            writers[split].write(ids.astype(dtype).tobytes())
            lengths[split].append(len(ids))
            pending_docs, pending_tokens = pending_docs + 1, pending_tokens + len(ids)
            if pending_docs >= 256:
                _report(pending_docs, pending_tokens)
                pending_docs = pending_tokens = 0
    _report(pending_docs, pending_tokens)
    options = unit_options(text_field, val_fraction, dtype, _worker["identity"])
    record = {"inputs": _stamp(unit["files"]), "options": options}
    for s in SPLITS:
        writers[s].close()
        tmp = out / f"{names[s]}.arrayrecord.tmp"
        np.save(out / f"{names[s]}.lengths.npy", np.asarray(lengths[s], np.int64))
        os.replace(tmp, out / f"{names[s]}.arrayrecord")  # complete: the final name
        size = (out / f"{names[s]}.arrayrecord").stat().st_size
        record[s] = {
            "path": f"{names[s]}.arrayrecord",
            "documents": len(lengths[s]),
            "tokens": int(sum(lengths[s])),
            "bytes": size,
        }
    _write_json(out / f"unit-{k:05d}.json", record)  # the unit is done only now
    return record


def unit_options(text_field: str, val_fraction: float, dtype: str, tokenizer: str) -> dict:
    """What a unit's shards depend on besides its inputs: a unit recorded with other options is
    redone on resume (prepare.json records them with the inputs)."""
    return {"text_field": text_field, "val_fraction": val_fraction, "dtype": dtype, "tokenizer": tokenizer}


def _report(docs: int, tokens: int) -> None:
    with _worker["docs"].get_lock():
        _worker["docs"].value += docs
    with _worker["tokens"].get_lock():
        _worker["tokens"].value += tokens


def prepare(
    inputs: list[str],
    out: str | Path,
    tokenizer,
    text_field: str = "text",
    workers: int = 1,
    val_fraction: float = 0.05,
    progress: bool = True,
    log=print,
) -> dict:
    """Tokenize `inputs` into `out` (see the module docstring); returns the manifest."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if workers < 1:
        raise DataError(f"--workers {workers} must be at least 1")
    out = path(out)
    work = local_dir_for(out, "prepare")  # `out` itself unless on gs://
    paths = input_files(inputs, "prepare")
    if not paths:
        raise DataError(f"prepare: {' '.join(inputs)} names no file; give text, JSONL or Parquet files")
    units = plan_units(paths, text_field)
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "int32"
    options = unit_options(text_field, val_fraction, dtype, tokenizer_identity(tokenizer))
    args = {"inputs": paths, **options}
    started = _start(out, args)
    work.mkdir(parents=True, exist_ok=True)
    records = {k: r for k, u in enumerate(units) if (r := _done(out, k, u, options)) is not None}
    if records:
        log(
            f"{out}: {len(records)} of {len(units)} units already done, preparing the other {len(units) - len(records)}"
        )
    t0 = time.perf_counter()
    tokens = _tokenize((work, out), units, records, tokenizer, workers, (text_field, val_fraction, dtype), progress)
    manifest = {"format": 1, **args, "splits": {s: _finish_split(work, out, s, units, records) for s in SPLITS}}
    try:
        _check_splits(manifest["splits"], inputs, val_fraction)
    except DataError:
        # These inputs and options never make a valid prepare: forget them, so that a rerun into
        # the same --out with other options is not refused (its units record their options, so
        # those tokenized here are redone, never reused).
        if started:
            (out / "prepare.json").unlink(missing_ok=True)
        raise
    _write_json(out / MANIFEST, manifest)
    dt = time.perf_counter() - t0
    log(
        f"prepared {out}: "
        + ", ".join(
            f"{s} {manifest['splits'][s]['documents']:,} documents {manifest['splits'][s]['tokens']:,} tokens"
            for s in SPLITS
        )
        + f" ({tokens / dt:,.0f} tokens/s over {workers} workers)"
    )
    return manifest


def _start(out: Path, args: dict) -> bool:
    """Record the arguments in `out`/prepare.json; a directory prepared with others is refused.
    Returns whether `out` held no finished prepare (one with a manifest, which the end re-makes)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory; give a new directory (or a prepared one to resume)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --out {out} ({e.strerror or e}); choose another directory") from None
    if (out / "prepare.json").exists() and json.loads((out / "prepare.json").read_text()) != args:
        raise DataError(
            f"{out} holds a prepare with other inputs, tokenizer or options; choose another --out or delete it"
        )
    finished = (out / MANIFEST).exists()
    _write_json(out / "prepare.json", args)
    (out / MANIFEST).unlink(missing_ok=True)  # re-made from the units at the end
    return not finished


def _tokenize(dirs: tuple, units, records: dict, tokenizer, workers: int, options, progress: bool) -> int:
    """Tokenize the units not in `records` (added to it as each is done) into `dirs` = (work, out),
    with a progress bar; returns the tokens written."""
    work, out = dirs
    todo = [k for k in range(len(units)) if k not in records]
    docs, tokens = (mp.get_context("spawn").Value("q", 0) for _ in range(2))  # counters the workers add to
    bar = tqdm(total=len(units), initial=len(records), unit="unit", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()

    def show() -> None:
        dt = time.perf_counter() - t0
        bar.set_postfix(docs_s=f"{docs.value / dt:,.0f}", tok_s=f"{tokens.value / dt:,.0f}")

    def done(k: int, record: dict) -> None:
        _publish(work, out, k, record)
        records[k] = record
        show()
        bar.update(1)

    try:
        _run_units(work, units, todo, tokenizer, docs, tokens, workers, options, done, show)
    finally:
        bar.close()
    return tokens.value


def _check_splits(splits: dict, inputs: list[str], val_fraction: float) -> None:
    n_val, n_all = splits["val"]["documents"], sum(splits[s]["documents"] for s in SPLITS)
    if splits["train"]["documents"] == 0:
        raise DataError(f"prepare: {' '.join(inputs)} holds no text (empty or whitespace only)")
    if val_fraction > 0 and n_val == 0:
        raise DataError(
            f"--val-fraction {val_fraction} held out none of the {n_all} documents; "
            f"rerun with a larger --val-fraction (or 0 for no validation); the same --out is fine"
        )


def _run_units(out, units, todo, tokenizer, docs, tokens, workers, options, done, show) -> None:
    """Tokenize the units `todo`: here with one worker (no start-up), else in worker processes."""
    if workers == 1:
        _init_worker(tokenizer, docs, tokens)
        for k in todo:
            done(k, _prepare_unit(out, k, units[k], *options))
        return
    ctx = mp.get_context("spawn")  # the parent may hold JAX and threads: fork is not safe
    with ProcessPoolExecutor(
        min(workers, len(todo)) or 1, ctx, initializer=_init_worker, initargs=(tokenizer, docs, tokens)
    ) as pool:
        futures = {pool.submit(_prepare_unit, out, k, units[k], *options): k for k in todo}
        try:
            while futures:
                finished, _ = wait(futures, timeout=0.5, return_when=FIRST_COMPLETED)
                for f in finished:
                    done(futures.pop(f), f.result())  # a worker's DataError stops here, in one line
                show()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # finish only the units under way
            raise


def _finish_split(work, out: Path, split: str, units: list[dict], records: dict) -> dict:
    """A split's shards in unit order and its offsets array (where each document starts), built
    in the local `work` directory and copied into `out` when that is on object storage."""
    shards = [records[k][split] for k in range(len(units)) if records[k][split]["documents"]]
    n_docs = sum(s["documents"] for s in shards)
    offsets = np.lib.format.open_memmap(work / f"{split}.offsets.npy.tmp", "w+", np.int64, (n_docs + 1,))
    offsets[0], at = 0, 0
    for shard in shards:  # one shard's lengths in memory at a time
        with (out / shard["path"].replace(".arrayrecord", ".lengths.npy")).open("rb") as f:
            lengths = np.load(f)
        offsets[at + 1 : at + 1 + len(lengths)] = offsets[at] + np.cumsum(lengths)
        at += len(lengths)
    offsets.flush()
    del offsets
    name = f"{split}.offsets.npy"
    os.replace(work / f"{name}.tmp", work / name)
    if is_remote(out):
        (out / name).write_bytes((work / name).read_bytes())
    return {
        "documents": n_docs,
        "tokens": sum(s["tokens"] for s in shards),
        "offsets": f"{split}.offsets.npy",
        "shards": shards,
    }
