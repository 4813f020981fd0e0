"""`plot`: loss curves of runs."""

from __future__ import annotations

from ..instruments import plots
from ..storage import Path, is_remote


def add(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="training and validation loss of runs in one figure (needs matplotlib)",
        description="Draw the training loss (lines) and validation loss (dashed, with marks) that each run's "
        "metrics.jsonl holds into one PNG. Needs matplotlib: pip install -e '.[plot]'.",
    )
    p.add_argument("runs", nargs="+", type=Path, help="run directories made by train.py (each has a metrics.jsonl)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("loss.png"),
        help="the PNG to write, local or gs://; its directory must exist (default loss.png)",
    )
    p.add_argument("--labels", help="comma-separated labels, one per run (default: the runs' directory names)")
    p.set_defaults(handler=plot)


def check_out(out: Path) -> None:
    """Refuse an --out the figure cannot be written to, before reading any run."""
    if is_remote(out):
        return
    if out.is_dir():
        raise plots.PlotError(f"--out {out} is a directory; give a file name such as {out / 'loss.png'}")
    if not out.parent.is_dir():
        raise plots.PlotError(
            f"--out {out}: the directory {out.parent} does not exist; create it or choose another --out"
        )


def plot(args) -> int:
    check_out(args.out)
    try:
        written = plots.plot_runs(args.runs, args.out, args.labels.split(",") if args.labels else None)
    except OSError as e:
        if e.filename != str(args.out):
            raise
        raise plots.PlotError(f"cannot write --out {args.out} ({e.strerror}); choose another --out") from None
    print(f"wrote {written}")
    return 0
