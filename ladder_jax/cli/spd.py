"""`spd sensitivity`, `spd apply`: Sync-Point Drop, which blocks can skip their attention all-reduce."""

from __future__ import annotations

from ..mesh import init_runtime
from ..methods import spd
from ..storage import Path
from ._common import checkpoint, cpu_devices, metric_option, metric_tasks, overrides, task_measure, verb_group


def add(sub) -> None:
    _, verbs = verb_group(sub, "spd", "Sync-Point Drop: which blocks can skip their attention all-reduce", spd.__doc__)
    s = verbs.add_parser("sensitivity")
    _run_arguments(s)
    s.add_argument(
        "--sensitive",
        type=float,
        default=0.005,
        help="relative ppl increase from which a block is sensitive (default 0.005)",
    )
    s.add_argument("--extreme", type=float, default=0.05, help="... and extremely sensitive (default 0.05)")
    s.add_argument(
        "--out", type=Path, help="where spd_sensitivity_t<T>.json/png go (default: the checkpoint directory)"
    )
    metric_option(s, "--sensitive and --extreme")
    s.set_defaults(handler=sensitivity)
    a = verbs.add_parser("apply")
    _run_arguments(a)
    a.add_argument("--sensitivity", required=True, help="the JSON written by `spd sensitivity`")
    budget = a.add_mutually_exclusive_group(required=True)
    budget.add_argument("--blocks", type=int, help="drop the sync of this many least sensitive blocks")
    budget.add_argument(
        "--max-increase", type=float, help="drop as many blocks as fit this relative perplexity increase, e.g. 0.01"
    )
    budget.add_argument("--drop", help="drop exactly these blocks, e.g. 3,5")
    a.add_argument("--steps", type=int, default=200, help="distillation steps per repaired block (default 200)")
    a.add_argument("--lr", type=float, help="distillation peak learning rate (default: the run's train.lr / 10)")
    a.add_argument(
        "--held-out",
        type=int,
        default=16,
        help="calibration sequences kept out of distillation to check it (default 16)",
    )
    a.add_argument("--out", required=True, type=Path, help="the new run directory (must not exist)")
    a.set_defaults(handler=apply)


def _run_arguments(q) -> None:
    checkpoint(q, "a run directory with a standard plan (trained or converted)")
    q.add_argument(
        "--tensor",
        type=int,
        help="tensor-parallel degree to measure at, at least 2 (sensitivity depends on it; default: the run's)",
    )
    q.add_argument(
        "--calibration",
        type=int,
        help="calibration sequences: the first N of the run's validation windows (sensitivity: default 128; "
        "apply: default the sequences the sensitivity file was measured on)",
    )
    cpu_devices(q)
    overrides(q, "train.batch_size=4")


def sensitivity(args) -> int:
    spd.check_thresholds(args.sensitive, args.extreme)  # before anything loads
    spd.check_options(args.tensor, args.calibration)
    tasks = metric_tasks(args)  # an unknown task is refused before the run loads
    init_runtime(args.cpu_devices)
    run = spd.open_run(args.checkpoint, args.tensor, args.overrides)
    measure = task_measure(run, args, tasks)
    calib = (
        spd.calibration_batches(run, 128 if args.calibration is None else args.calibration) if measure is None else []
    )
    report = spd.sensitivity_report(run, calib, args.sensitive, args.extreme, measure=measure)
    path, png = spd.write_sensitivity(report, args.out or args.checkpoint)
    counts = {c: sum(b["class"] == c for b in report["blocks"]) for c in spd.CLASSES}
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def apply(args) -> int:
    drop = None if args.drop is None else _blocks(args.drop)
    spd.check_options(args.tensor, args.calibration)
    req = spd.check_apply(
        args.checkpoint, args.sensitivity, args.out, args.tensor, args.blocks, args.max_increase, drop
    )  # everything that can be refused from the files alone is refused before the run loads
    init_runtime(args.cpu_devices)
    spd.apply_to_new_run(req, args.out, args.calibration, args.steps, args.lr, args.held_out, args.overrides)
    print(f"wrote {args.out} (model.plan={req.plan}); decode it with: python infer.py --checkpoint {args.out}")
    return 0


def _blocks(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise spd.SPDError(f"--drop={text!r}: give block indices such as 3,5") from None
