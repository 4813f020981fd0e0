"""Data throughput: `data prepare` tokens/s per worker, the loader's tokens/s to one host, and
the host memory of `python train.py` at step 1 on a prepared corpus, against the tokens/s one
TPU v5p chip consumes training ladder-1b at 50% MFU.

    python benchmarks/data_throughput.py --mb 20 --workers 2 --rss
    python benchmarks/data_throughput.py --mb 400 --workers 2 --rss --keep /tmp/corpus400

The corpus is synthetic: JSONL files of documents of random lower-case words (1-8 KB each),
tokenized with the byte tokenizer (one token per byte). Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ladder_jax.data import open_prepared, train_iterator  # noqa: E402
from ladder_jax.prepare import prepare  # noqa: E402
from ladder_jax.tokenizer import ByteTokenizer  # noqa: E402

V5P_PEAK = 459e12  # bf16 FLOP/s per v5p chip


def write_corpus(directory: Path, megabytes: int, file_mb: int = 10) -> list[str]:
    """JSONL files of random-word documents, `megabytes` of text in all."""
    rng = np.random.RandomState(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", np.uint8)
    files, written, k = [], 0, 0
    while written < megabytes << 20:
        path = directory / f"part-{k:04d}.jsonl"
        with open(path, "w") as f:
            size = 0
            while size < file_mb << 20:
                text = letters[rng.randint(0, len(letters), rng.randint(1024, 8192))].tobytes().decode()
                f.write(json.dumps({"text": text}) + "\n")
                size += len(text)
        files.append(str(path))
        written, k = written + size, k + 1
    return files


def loader_tokens_per_s(out: Path, batch: int, seq: int, n_batches: int) -> float:
    """Batches from a fresh iterator (opening the shards included), as train() takes them."""
    t0 = time.perf_counter()
    it = train_iterator(open_prepared(out, "train", ByteTokenizer(), seq), batch, seed=0)
    for _ in range(n_batches):
        next(it)
    return n_batches * batch * seq / (time.perf_counter() - t0)


def train_rss_mib(data: str, run_dir: Path) -> tuple[float, float]:
    """Peak resident memory (MiB, from /usr/bin/time) and seconds of `python train.py` trained for one step."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, str(ROOT / "train.py"), "--no-progress"]
    cmd += [
        "--sample-tokens",
        "0",
        "--run-dir",
        str(run_dir),
        f"train.data={data}",
        "train.steps=1",
        "train.eval_batches=1",
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    return int(done.stderr.strip().splitlines()[-1]) / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=20, help="corpus size in MB of text")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rss", action="store_true", help="also measure python train.py's peak memory through step 1")
    ap.add_argument("--rss-in-memory", action="store_true", help="and the same on the raw files (tokenized in memory)")
    ap.add_argument("--keep", type=Path, help="keep the corpus and prepared directory here (the corpus is reused)")
    args = ap.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="data-throughput-"))
    (root / "raw").mkdir(parents=True, exist_ok=True)
    files = sorted(str(p) for p in (root / "raw").glob("*.jsonl")) or write_corpus(root / "raw", args.mb)
    quiet = dict(progress=False, log=lambda *_: None)
    for name in ("one", "prepared"):  # timed from scratch: a kept directory would resume
        shutil.rmtree(root / name, ignore_errors=True)

    t0 = time.perf_counter()  # one worker in this process on the first file: tokens/s per worker
    one = prepare(files[:1], root / "one", ByteTokenizer(), workers=1, val_fraction=0.01, **quiet)
    per_worker = sum(s["tokens"] for s in one["splits"].values()) / (time.perf_counter() - t0)
    t0 = time.perf_counter()  # every file over --workers processes, start-up included
    full = prepare(files, root / "prepared", ByteTokenizer(), workers=args.workers, val_fraction=0.01, **quiet)
    prepare_s = time.perf_counter() - t0
    tokens = sum(s["tokens"] for s in full["splits"].values())

    from ladder_jax import model as M  # here: the spawned workers re-import this file and need no JAX
    from ladder_jax.config import load_config

    cfg = load_config("ladder-1b")
    n_params = M.count_params(cfg.model)
    v5p = 0.5 * V5P_PEAK / (6 * n_params)
    report = {
        "corpus_mb": args.mb,
        "tokens": tokens,
        "prepare_tokens_per_s_one_worker": round(per_worker),
        f"prepare_tokens_per_s_{args.workers}_workers": round(tokens / prepare_s),
        "prepare_s": round(prepare_s, 1),
        "loader_tokens_per_s_8x2048": round(loader_tokens_per_s(root / "prepared", 8, 2048, 300)),
        "loader_tokens_per_s_8x256": round(loader_tokens_per_s(root / "prepared", 8, 256, 1000)),
        "ladder_1b_params": n_params,
        "v5p_50pct_mfu_tokens_per_s": round(v5p),
        "arithmetic": f"0.5 * 459e12 FLOP/s / (6 * {n_params:,} FLOP/token) = {v5p:,.0f} tokens/s",
        "load_average": os.getloadavg(),
    }
    if args.rss:
        rss, seconds = train_rss_mib(str(root / "prepared"), root / "run")
        report.update(train_py_peak_rss_mib_prepared=round(rss), train_py_s_prepared=round(seconds))
    if args.rss_in_memory:
        rss, seconds = train_rss_mib(str(root / "raw" / "*.jsonl"), root / "run")
        report.update(train_py_peak_rss_mib_in_memory=round(rss), train_py_s_in_memory=round(seconds))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
