"""The figures the commands write: legends that match what they label and keep off the data,
whole-number ticks where only whole numbers exist."""

import importlib.util
import re
from pathlib import Path

import pytest

from ladder_jax.instruments.perf import cost
from ladder_jax.instruments.plots import PlotError, plot_runs, pyplot
from ladder_jax.methods import lp, spd

ROOT = Path(__file__).resolve().parents[1]
plt = pytest.importorskip("matplotlib.pyplot")


@pytest.fixture
def figures(monkeypatch):
    """The figures the plotting functions save, kept open for inspection."""
    from matplotlib.figure import Figure

    saved, save = [], Figure.savefig

    def keep(fig, *a, **k):
        saved.append(fig)
        fig.canvas.draw()
        return save(fig, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    yield saved


def legends(fig):
    return [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]


def assert_legends_off_the_axes(fig):
    for legend in legends(fig):
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), "the legend covers a plot"


def assert_whole_ticks(ax):
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_legends_match_their_marks_and_stay_off_the_data_and_counts_get_whole_ticks(tmp_path, figures):
    assert pyplot() is plt
    rows = [{"delta": d, "val_ppl": 5 + d, "agreement": 1 - d / 8} for d in (0, 2, 4, 6)]
    lp.plot(rows, tmp_path / "lp.png", "LP")
    blocks = [{"block": i, "delta": d, "class": spd.classify(d, 0.005, 0.05)} for i, d in enumerate((0.2, 0.01, 0.001))]
    report = {"model": "m", "tensor": 4, "thresholds": {"sensitive": 0.005, "extreme": 0.05}, "blocks": blocks}
    spd.plot_sensitivity(report, tmp_path / "spd.png")
    pred = [
        {"variant": v, "batch": b, "speedup": s * (1 + b / 100), "tensor": 8, "hardware": "h"}
        for v, s in (("standard", 1.0), ("ladder", 1.3))
        for b in (1, 4, 64)
    ]
    sweep = [dict(r, tensor=t, batch=1) for r in pred[:1] + pred[3:4] for t in (2, 4, 8)]
    cost.plot(pred, sweep, tmp_path / "perf.png", "perf", {"ladder": [(1, 1.31)]})
    spec = importlib.util.spec_from_file_location("spd_report", ROOT / "benchmarks" / "spd_report.py")
    spd_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spd_report)
    three = [{"dropped": k, "zero_shot": 6 + k, "spd_method": 6 + k / 2, "all_distilled": 6.0} for k in range(3)]
    spd_report.plot({"tensor": {"4": {"rows": three}}}, tmp_path / "report.png")
    lp_fig, spd_fig, perf_fig, report_fig = figures

    for fig in (lp_fig, spd_fig, perf_fig):
        assert_legends_off_the_axes(fig)
    # SPD: one legend entry per class in the class's bar colour, and the dashed thresholds named.
    (legend,) = legends(spd_fig)
    bars = {b.get_x() + b.get_width() / 2: b.get_facecolor() for b in spd_fig.axes[0].patches}
    entries = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))
    for b in blocks:
        assert entries[b["class"]].get_facecolor() == bars[b["block"]]
    assert "thresholds (0.5% / 5%)" in entries
    # Δ, blocks and dropped blocks are whole numbers.
    for ax in (lp_fig.axes[0], spd_fig.axes[0], report_fig.axes[0]):
        assert_whole_ticks(ax)


def test_plot_refuses_a_label_count_that_does_not_match_the_runs(tmp_path):
    with pytest.raises(PlotError, match="--labels gives 1 labels for 2 runs; give one label per run"):
        plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "loss.png", ["only"])


def test_plot_refuses_an_out_it_cannot_write_in_one_line(tmp_path, capsys):
    from ladder_jax.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    cases = {
        tmp_path / "nodir" / "x.png": r"the directory .*nodir does not exist; create it or choose another --out",
        tmp_path: r"is a directory; give a file name such as .*loss\.png",
        "/proc/x.png": r"cannot write --out /proc/x\.png \(.*\); choose another --out",
    }
    for out, message in cases.items():
        assert main(["plot", str(tmp_path / "run"), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "nodir").exists()


def test_plot_help_describes_the_command_and_every_argument(capsys):
    from ladder_jax.cli import main

    with pytest.raises(SystemExit):
        main(["plot", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Draw the training loss" in text and "run directories made by train.py" in text
    assert "the PNG to write" in text and "(default loss.png)" in text


def test_a_metrics_line_cut_short_by_a_killed_trainer_is_passed_over(tmp_path):
    from ladder_jax.instruments.plots import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo\n{"step": 2, "loss": 2.0}\n')
    assert read_metrics(tmp_path) == ([(1, 2.5), (2, 2.0)], [])
