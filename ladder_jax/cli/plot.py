"""`plot`: loss curves of runs."""

from __future__ import annotations

from ..instruments import plots
from ..storage import Path


def add(sub) -> None:
    p = sub.add_parser("plot", help="training and validation loss of runs in one figure (needs matplotlib)")
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("loss.png"))
    p.add_argument("--labels", help="comma-separated labels, one per run")
    p.set_defaults(handler=plot)


def plot(args) -> int:
    print(f"wrote {plots.plot_runs(args.runs, args.out, args.labels.split(',') if args.labels else None)}")
    return 0
