"""Training and validation loss of several runs in one figure (`python -m ladder_jax plot RUN...`;
needs matplotlib: pip install -e '.[plot]')."""

from __future__ import annotations

import json

from ..errors import LadderError
from ..storage import Path, path


class PlotError(LadderError):
    """Runs that cannot be plotted; the message says what to give instead."""


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None without matplotlib (an optional
    extra: every command that draws also writes its numbers as JSON)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, out) -> None:
    """Write a figure as PNG to a local or gs:// path, and close it."""
    with path(out).open("wb") as f:
        fig.savefig(f, format="png", dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def read_metrics(run_dir: Path) -> tuple[list, list]:
    metrics = path(run_dir) / "metrics.jsonl"
    if not metrics.exists():
        raise PlotError(f"{run_dir} has no metrics.jsonl; give run directories made by train.py")
    train, val = [], []
    for line in metrics.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed trainer (the resumed run goes on after it)
            continue
        if "loss" in r:
            train.append((r["step"], r["loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    return train, val


def plot_runs(run_dirs, out: Path, labels=None) -> Path:
    if labels and len(labels) != len(run_dirs):
        raise PlotError(f"--labels gives {len(labels)} labels for {len(run_dirs)} runs; give one label per run")
    runs = [(path(run), read_metrics(run)) for run in run_dirs]  # every run is checked before drawing
    plt = pyplot()
    if plt is None:
        raise PlotError("plotting needs matplotlib: pip install -e '.[plot]'")
    names = [run.name for run, _ in runs]
    if not labels and len(set(names)) < len(names):  # runs/a/run, runs/b/run: name them by their parents too
        names = [f"{run.parent.name}/{run.name}" for run, _ in runs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (_, (train, val)) in enumerate(runs):
        label = labels[k] if labels else names[k]
        line = None
        if train:
            (line,) = ax.plot(*zip(*train), lw=1, alpha=0.8, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), "o--", color=line.get_color() if line else None, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)
    return out
