"""`eval harness`, `eval perplexity`: lm-evaluation-harness tasks and rolling-window perplexity of
text, on any run and plan."""

from __future__ import annotations

import json

from ..mesh import init_runtime
from ..storage import Path
from ._common import cpu_devices, evaluation, overrides, task_limit, verb_group


def add(sub) -> None:
    _, verbs = verb_group(sub, "eval", "lm-evaluation-harness tasks and perplexity of text on any run", None)
    h = verbs.add_parser("harness", help="lm-eval tasks (ARC, HellaSwag, PIQA, ...) through our sharded model")
    h.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names, e.g. arc_easy,piqa")
    h.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    h.add_argument(
        "--limit", type=task_limit, help="at most N documents per task (a fraction below 1); for quick checks"
    )
    h.add_argument("--batch-size", type=int, default=8, help="rows per compiled call (default 8)")
    h.add_argument("--max-gen-toks", type=int, default=256, help="generation tasks: new tokens unless the task says")
    h.add_argument("--gen-kwargs", help="generation settings over the tasks', e.g. max_gen_toks=64 (lm-eval syntax)")
    h.add_argument("--include-path", type=Path, help="a directory of extra task YAMLs (local datasets)")
    h.add_argument(
        "--no-builtin-tasks",
        action="store_true",
        help="look tasks up in --include-path only (skips indexing lm-eval's ~14,700 built-in task files)",
    )
    h.add_argument("--bootstrap-iters", type=int, default=100000, help="stderr bootstrap iterations (0: none)")
    h.add_argument("--out", type=Path, help="write the results JSON (as lm-eval writes it) here")
    h.set_defaults(handler=harness)
    p = verbs.add_parser("perplexity", help="token, word and byte perplexity of text with rolling windows")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", nargs="+", type=Path, help="UTF-8 text files, each one document")
    src.add_argument("--data", type=Path, help="a directory made by `data prepare` with this run's tokenizer")
    p.add_argument("--split", default="val", choices=("train", "val"), help="with --data: which split (default val)")
    p.add_argument("--max-documents", type=int, help="with --data: score only the first N documents")
    p.add_argument("--context", type=int, help="tokens per window (default: model.max_seq_len)")
    p.add_argument(
        "--stride", type=int, help="new tokens scored per window after the first (default: the context, no overlap)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per compiled call (default 8)")
    p.add_argument("--out", type=Path, help="write the numbers as JSON here")
    p.set_defaults(handler=perplexity)
    for q in (h, p):
        q.add_argument("--checkpoint", required=True, type=Path, help="a run directory (trained, converted, SPD, LP)")
        overrides(q, "model.plan=standard,ladder@-1: mesh.tensor=2")
        cpu_devices(q)


def _check_batch_size(ev, args) -> None:
    if args.batch_size < 1:
        raise ev.EvalError(f"--batch-size {args.batch_size}: give at least 1")


def harness(args) -> int:
    ev = evaluation()
    _check_batch_size(ev, args)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.no_builtin_tasks and args.include_path is None:
        raise ev.EvalError("--no-builtin-tasks needs --include-path DIR (where else to find the tasks?)")
    tm = ev.task_manager(names, args.include_path, not args.no_builtin_tasks)  # before the run loads
    lm = ev.LadderLM(args.checkpoint, args.overrides, args.batch_size, args.max_gen_toks)
    init_runtime(args.cpu_devices)
    results = ev.harness(
        lm,
        names,
        args.num_fewshot,
        args.limit,
        tm=tm,
        bootstrap_iters=args.bootstrap_iters,
        gen_kwargs=args.gen_kwargs,
    )
    print(ev.results_table(results))
    if args.out:
        _write(args.out, ev.results_json(results))
    return 0


def perplexity(args) -> int:
    ev = evaluation()
    _check_batch_size(ev, args)
    lm = ev.LadderLM(args.checkpoint, args.overrides, args.batch_size, context=args.context)
    if args.data is not None:
        if args.max_documents is not None and args.max_documents < 1:
            raise ev.EvalError(f"--max-documents {args.max_documents}: give at least 1")
        documents = ev.prepared_documents(lm, args.data, args.split, args.max_documents)
    else:
        documents = ev.read_documents(args.file)
    init_runtime(args.cpu_devices)
    r = ev.perplexity(lm, documents, args.stride)
    print(
        f"{r['documents']} document(s), {r['tokens']:,} tokens, {r['words']:,} words, {r['bytes']:,} bytes; "
        f"context {r['context']}, stride {r['stride']} ({r['windows']} windows)"
    )
    for k in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        print(f"  {k:16s} {r[k]:.4f}")
    if args.out:
        _write(args.out, json.dumps({"checkpoint": str(args.checkpoint), **r}, indent=1))
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
