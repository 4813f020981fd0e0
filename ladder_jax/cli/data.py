"""`data prepare`: tokenize a corpus once into ArrayRecord shards for train.data=DIR."""

from __future__ import annotations

import os
import sys

from ..storage import Path
from ._common import verb_group


def add(sub) -> None:
    _, verbs = verb_group(
        sub,
        "data",
        "tokenize a corpus once into ArrayRecord shards (train.data=DIR then streams them)",
        "See docs/data.md.",
    )
    q = verbs.add_parser("prepare", help="text files/globs, JSONL(.gz) or Parquet -> DIR of token shards")
    q.add_argument("inputs", nargs="+", help="files or globs: *.txt (one document each), *.jsonl[.gz], *.parquet")
    q.add_argument("--out", required=True, type=Path, help="the prepared directory (a rerun resumes it)")
    q.add_argument("--tokenizer", default="bytes", help="bytes (default), a run directory, or a tokenizer.json")
    q.add_argument("--config", help="with a tokenizer.json: the preset (or YAML) whose BOS/EOS ids to use")
    q.add_argument("--text-field", default="text", help="the JSONL field or Parquet column holding the text")
    q.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes (default: all cores)")
    q.add_argument(
        "--val-fraction", type=float, default=0.05, help="documents held out for validation, by a hash of their name"
    )
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(handler=prepare_data)


def prepare_data(args) -> int:
    from .. import prepare

    tokenizer = prepare.load_tokenizer(args.tokenizer, args.config)
    prepare.prepare(
        args.inputs,
        args.out,
        tokenizer,
        args.text_field,
        args.workers,
        args.val_fraction,
        progress=not args.no_progress,
        log=lambda m: print(m, file=sys.stderr),
    )
    return 0
