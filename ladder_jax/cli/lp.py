"""`lp sweep`, `lp depth`, `lp transform`: Layer Parallelism and the effective-depth study."""

from __future__ import annotations

import argparse

from .. import checkpoint as ckpt
from ..mesh import init_runtime
from ..methods import depth, lp
from ..storage import Path
from ._common import checkpoint, cpu_devices, metric_option, metric_tasks, overrides, task_measure, verb_group


def add(sub) -> None:
    _, verbs = verb_group(sub, "lp", "Layer Parallelism: perplexity against the number of paired layers", lp.__doc__)
    _add_sweep(verbs)
    _add_depth(verbs)
    _add_transform(verbs)


def _add_sweep(verbs) -> None:
    sw = verbs.add_parser("sweep", help="perplexity and greedy agreement against the number of paired layers")
    checkpoint(sw)
    overrides(sw, "mesh.tensor=2 train.eval_batches=16")
    sw.add_argument("--max-delta", type=int, help="largest number of paired layers (even; default: all)")
    sw.add_argument(
        "--budget",
        type=float,
        default=0.05,
        help="allowed relative perplexity increase for the suggestion (default 0.05)",
    )
    sw.add_argument("--search", choices=("auto", "exhaustive", "greedy"), default="auto")
    sw.add_argument(
        "--prompts", type=int, default=4, help="validation windows whose first 32 tokens prompt the agreement check"
    )
    sw.add_argument("--gen-tokens", type=int, default=32)
    sw.add_argument("--out", type=Path, help="where lp_sweep.json/png go (default: the checkpoint directory)")
    metric_option(sw, "--budget")
    cpu_devices(sw)
    sw.set_defaults(handler=sweep)


def _add_depth(verbs) -> None:
    d = verbs.add_parser(
        "depth",
        help="effective depth: perplexity after shuffling, merging, pruning or pairing Δ middle layers",
        description=depth.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    checkpoint(d)
    overrides(d, "mesh.tensor=2 train.eval_batches=16")
    d.add_argument(
        "--transform", default=",".join(depth.TRANSFORMS), help="comma-separated, default shuffle,merge,prune,parallel"
    )
    d.add_argument("--delta", help="range lengths Δ, comma-separated (default 2,4,... up to the number of layers)")
    d.add_argument("--seeds", type=int, default=5, help="random orders averaged for shuffle (default 5)")
    d.add_argument("--seed", type=int, default=0, help="seed of the shuffle orders (default 0)")
    d.add_argument("--start", type=int, help="first layer of every range (default: each range centred, (n - Δ) // 2)")
    d.add_argument("--out", type=Path, help="where lp_depth.json/png go (default: the checkpoint directory)")
    cpu_devices(d)
    d.set_defaults(handler=study)


def _add_transform(verbs) -> None:
    t = verbs.add_parser(
        "transform",
        help="write a new run with a layer range pruned, merged, shuffled or paired",
        description=depth.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    checkpoint(t)
    kind = t.add_mutually_exclusive_group(required=True)
    kind.add_argument("--prune", metavar="A:B", help="drop layers A..B-1 (from the end: --prune=-2:)")
    kind.add_argument(
        "--merge", metavar="A:B", help="average layers A..B-1 in consecutive groups (--group, default pairs)"
    )
    kind.add_argument(
        "--shuffle", metavar="A:B", help="run layers A..B-1 in another order (--order, or random by --seed)"
    )
    kind.add_argument("--parallel", metavar="A:B", help="pair layers A..B-1 side by side (plan lp@A:B)")
    t.add_argument("--order", help="--shuffle: the range's layers in their new order, e.g. 5,4,3,2")
    t.add_argument("--seed", type=int, default=0, help="--shuffle without --order: seed of the random order")
    t.add_argument("--group", type=int, default=2, help="--merge: layers averaged into one (default 2)")
    t.add_argument("--out", required=True, type=Path, help="the new run directory (must not exist)")
    overrides(t, "mesh.tensor=2")
    cpu_devices(t)
    t.set_defaults(handler=transform)


def sweep(args) -> int:
    cfg, max_delta = lp.check_sweep(args.checkpoint, args.overrides, args.max_delta, args.budget)
    tasks = metric_tasks(args)  # an unknown task is refused before the run loads
    init_runtime(args.cpu_devices)
    run = ckpt.load_run(args.checkpoint, args.overrides)
    measure = task_measure(run, args, tasks)
    rows = lp.sweep_run(run, max_delta, args.search, args.prompts, args.gen_tokens, measure)
    pick, path, png = lp.write_report(args.out or args.checkpoint, args.checkpoint, args.budget, rows, cfg.model.name)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    what = "perplexity" if measure is None else measure[0]
    if pick["delta"] == 0:
        kind = "relative" if measure is None else "absolute"
        print(f"no pairing stays within the budget ({args.budget} {kind} {what} cost)")
        return 0
    value = pick.get("val_ppl", pick.get("score"))
    print(f"suggested: Δ={pick['delta']} (model.plan={pick['plan']}), {what} {value:.3f} (cost {pick['cost']:+.1%})")
    print(
        f"fine-tune the pairs: python train.py --init-from {args.checkpoint} --config {args.checkpoint / 'config.yaml'} "
        f"'model.plan={pick['plan']}' train.trainable=lp_pairs train.steps=100"
    )
    return 0


def study(args) -> int:
    req = depth.check_study(
        args.checkpoint, args.overrides, args.transform, args.delta, args.seeds, args.start, args.seed
    )
    init_runtime(args.cpu_devices)
    result, path, png = depth.study_run(req, args.out or args.checkpoint)
    print(depth.format_table(result))
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0


def transform(args) -> int:
    kind = next(k for k in depth.TRANSFORMS if getattr(args, k) is not None)
    cfg, t = depth.check_transform(
        args.checkpoint, args.out, kind, getattr(args, kind), args.order, args.seed, args.group, args.overrides
    )  # everything that can be refused is refused before the run loads
    init_runtime(args.cpu_devices)
    new = depth.transform_to_new_run(args.checkpoint, t, args.out, args.overrides)
    print(f"{t}: {cfg.model.n_layers} -> {new.n_layers} layers, model.plan={new.plan}")
    print(f"wrote {args.out}; decode: python infer.py --checkpoint {args.out}")
    print(f"fine-tune: python train.py --init-from {args.out} --config {args.out / 'config.yaml'} train.steps=100")
    return 0
