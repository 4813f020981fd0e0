"""The latency model: all-reduce costs, structure from the sync analysis, composition, the fit to
the published 70B TP8 table, and one-line errors. The sync analysis compiles each plan once (a
few seconds each on fake CPU devices), shared by every test through the module fixture."""

import dataclasses
import itertools
import json
import math

import pytest

from ladder_jax.cli import main
from ladder_jax.instruments.perf import calibrate, cost, hardware

TENSOR = 8


def perfmodel_main(argv):
    return main(["perfmodel", *argv])


VARIANTS = ("standard", "ladder", "parallel", "desync")


@pytest.fixture(scope="module")
def anchor(devices):
    """The anchor's 70B model, its four decode structures (compiled once), the H100 profile."""
    m = calibrate.anchor_model()
    return m, {v: cost.decode_structure(m, TENSOR, v) for v in VARIANTS}, hardware.load_hardware("h100-nvlink")


def test_allreduce_cost_grows_with_bytes_and_picks_the_cheaper_algorithm():
    hw = hardware.load_hardware("h100-nvlink")
    sizes = [2**k for k in range(4, 32, 2)]
    times = [cost.allreduce_time(n, 8, hw)[0] for n in sizes]
    assert all(a < b for a, b in itertools.pairwise(times))
    bw = hw.link_bandwidth * hw.link_efficiency
    for n in sizes:
        t, algo = cost.allreduce_time(n, 8, hw)
        ring, tree = (f(n, 8, bw, hw.link_hop_latency_s) for f in (cost._ring, cost._tree))
        assert t == pytest.approx(hw.allreduce_latency_s + min(ring, tree))
        assert algo == ("ring" if ring < tree else "tree")
    assert cost.allreduce_time(16_384, 8, hw)[1] == "tree"  # a decode step's residual: latency-bound
    assert cost.allreduce_time(2**30, 8, hw)[1] == "ring"  # a prefill's: bandwidth-bound
    assert cost.allreduce_time(2**20, 1, hw) == (0.0, "none")
    two = hardware.load_hardware("h100-2node")  # past one node the slower inter-node links cost more
    assert cost.allreduce_time(2**20, 16, two)[1].endswith("across-nodes")
    assert cost.allreduce_time(2**20, 16, two)[0] > cost.allreduce_time(2**20, 8, two)[0]
    pcie = hardware.load_hardware("h100-pcie")
    assert cost.allreduce_time(2**20, 8, pcie)[0] > 3 * cost.allreduce_time(2**20, 8, hw)[0]


def test_structure_comes_from_the_sync_analysis(anchor):
    m, structures, _ = anchor
    counts = {v: cost.summarize(e) for v, e in structures.items()}
    # embedding + 2 per layer + the vocab-parallel argmax's two reductions, as the compiled HLO has them
    assert counts["standard"]["all_reduces"] == counts["ladder"]["all_reduces"] == 1 + 2 * m.n_layers + 2
    assert counts["standard"]["overlappable_all_reduces"] == 0
    assert counts["ladder"]["overlappable_all_reduces"] == 2 * m.n_layers
    assert counts["parallel"]["all_reduces"] == counts["parallel"]["blocking_all_reduces"] == 1 + m.n_layers + 2
    assert counts["desync"]["all_reduces"] == 3
    residual = m.d_model * 2  # float16, batch 1
    assert counts["standard"]["bytes_per_token"] == (1 + 2 * m.n_layers) * residual + 2 * 4
    # k ladder layers after standard ones: 2k overlappable all-reduces, plus the last standard
    # MLP's, which the first ladder attention does not read (it reads x_{j-2})
    k = 2
    hybrid = cost.summarize(cost.decode_structure(m, TENSOR, f"standard,ladder@-{k}:"))
    assert hybrid["overlappable_all_reduces"] == 2 * k + 1
    assert hybrid["all_reduces"] == counts["standard"]["all_reduces"]
    # a track step of D=2 layers: four modules one after another, then the one fusion
    events = cost.decode_structure(m, TENSOR, "track:2")
    assert cost.summarize(events)["all_reduces"] == 1 + m.n_layers // 2 + 2
    first = [e.module or "ar" for e in events[2:7]]
    assert first == ["attention", "mlp", "attention", "mlp", "ar"]


def test_the_model_uses_what_the_analysis_reports(anchor, monkeypatch):
    """Feed a ladder plan an analysis where every all-reduce blocks: it must cost what standard does."""
    m, structures, hw = anchor
    ladder = cost.predict_one(m, hw, TENSOR, "ladder", 1, 1024, 512, structures["ladder"])
    all_blocking = [dataclasses.replace(e, blocking=True) for e in structures["ladder"]]
    blocked = cost.predict_one(m, hw, TENSOR, "ladder", 1, 1024, 512, all_blocking)
    standard = cost.predict_one(m, hw, TENSOR, "standard", 1, 1024, 512, structures["standard"])
    assert blocked["ms_per_token"] == pytest.approx(standard["ms_per_token"])
    assert ladder["ms_per_token"] < blocked["ms_per_token"]

    # and the counts per step are learned from the HLO: a fake analysis with one all-reduce per
    # ladder layer makes a one-all-reduce-per-layer structure
    real = cost._all_reduces

    def fake(model, tensor, plan, n_layers):
        ars = real(model, tensor, plan, n_layers)
        return ars[:1] + ars[1:-2:2] + ars[-2:]

    monkeypatch.setattr(cost, "_all_reduces", fake)
    assert cost.summarize(cost.decode_structure(m, TENSOR, "ladder"))["overlappable_all_reduces"] == m.n_layers


def test_ladder_sits_between_desync_and_standard(anchor):
    m, structures, hw = anchor
    for batch in (1, 4, 64):
        ms = {v: cost.predict_one(m, hw, TENSOR, v, batch, 1024, 512, e)["ms_per_token"] for v, e in structures.items()}
        assert ms["desync"] < ms["ladder"] < ms["parallel"] < ms["standard"]
    # one device: no all-reduce, so every schedule costs the same modules
    one = {v: cost.predict_one(m, hw, 1, v, 1, 1024, 512)["ms_per_token"] for v in ("standard", "ladder")}
    assert one["standard"] == pytest.approx(one["ladder"])


def test_calibration_reproduces_the_published_table(anchor):
    """The stored h100-nvlink constants fit the 8 published points within 6% rms, 10% at worst,
    and a fit from elsewhere lands there too."""
    m, structures, hw = anchor
    errors = calibrate.fit_errors(hw, m, structures)
    assert len(errors) == 8
    assert math.sqrt(sum(e["error_pct"] ** 2 for e in errors) / 8) < 6
    assert max(abs(e["error_pct"]) for e in errors) < 10
    start = dataclasses.replace(
        hw, hbm_efficiency=0.85, kernel_overhead_s=3e-6, allreduce_latency_s=8e-6, overlap_contention=0.1
    )
    fitted, refit = calibrate.calibrate(start, iterations=12)
    assert math.sqrt(sum(e["error_pct"] ** 2 for e in refit) / 8) < 6
    for key, (lo, hi) in calibrate.FIT_BOUNDS.items():
        assert lo <= getattr(fitted, key) <= hi


def test_profiles_are_data_with_inherited_software_constants(tmp_path):
    names = hardware.known_hardware()
    assert {"h100-nvlink", "h100-pcie", "a100-nvlink", "h100-2node", "tpu-v5e", "tpu-v5p"} <= set(names)
    base = hardware.load_hardware("h100-nvlink")
    for name in names:
        hw = hardware.load_hardware(name)
        assert hw.hbm_bandwidth > 0 and hw.matmul_flops > 0 and hw.link_bandwidth > 0 and hw.max_devices >= 8
    a100 = hardware.load_hardware("a100-nvlink")
    assert a100.kernel_overhead_s == base.kernel_overhead_s and a100.hbm_bandwidth < base.hbm_bandwidth
    assert hardware.load_hardware("h100-2node").max_devices == 16
    # --write rewrites values in place and keeps every comment
    path = tmp_path / "h.yaml"
    path.write_text(hardware.hardware_path("h100-nvlink").read_text())
    hardware.write_constants(path, {"hbm_efficiency": 0.5, "overlap_contention": 0.125})
    assert hardware.load_hardware(str(path)).hbm_efficiency == 0.5
    assert hardware.load_hardware(str(path)).overlap_contention == 0.125
    assert [ln.split("#", 1)[1] for ln in path.read_text().splitlines() if "#" in ln] == [
        ln.split("#", 1)[1] for ln in hardware.hardware_path("h100-nvlink").read_text().splitlines() if "#" in ln
    ]


def test_predict_command_prints_json_and_table(anchor, capsys):
    half = ["model.dtype=float16", "model.param_dtype=float16"]  # the fixture's compiled model: no new compile
    assert (
        perfmodel_main(
            ["predict", "--config", "llama-2-70b", *half, "--tensor", "8", "--batch", "1", "64", "--variant", "ladder"]
            + ["--json"]
        )
        == 0
    )
    rows = {(r["variant"], r["batch"]): r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert set(rows) == {("standard", 1), ("standard", 64), ("ladder", 1), ("ladder", 64)}
    assert rows[("standard", 1)]["speedup"] == 1.0 and rows[("ladder", 1)]["speedup"] > 1.1
    assert rows[("ladder", 1)]["fits"]
    assert perfmodel_main(["predict", "--config", "llama-2-70b", *half, "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "desync" in out and "vs standard" in out
    # Options before the sub-verb hold (argparse would put the sub-verb's defaults over them).
    assert (
        perfmodel_main(
            [
                "--batch",
                "4",
                "--tensor",
                "8",
                "predict",
                "--config",
                "llama-2-70b",
                *half,
                "--variant",
                "ladder",
                "--json",
            ]
        )
        == 0
    )
    assert {r["batch"] for r in json.loads(capsys.readouterr().out)["rows"]} == {4}


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [
        {"variant": v, "batch": b, "tensor": 8, "speedup": s, "hardware": "h"}
        for v, s in (("standard", 1.0), ("ladder", 1.3))
        for b in (1, 4)
    ]
    sweep = [dict(r, tensor=t, batch=1) for r in rows[::2] for t in (2, 4, 8)]
    assert cost.plot(rows, sweep, tmp_path / "p.png", "t", {"ladder": [(1, 1.31)]}).stat().st_size > 1000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hardware", "h100-infiniband"], "unknown hardware 'h100-infiniband'; choose from a100-nvlink"),
        (["--tensor", "3"], "--tensor=3 does not divide model.n_heads=64"),
        (["--tensor", "16"], "exceeds the 8 devices hardware 'h100-nvlink' describes"),
        (["--tensor", "16", "--hardware", "h100-2node", "--batch", "0"], "--batch must be positive"),
        (["--variant", "ladder@90:"], "model.plan: 'ladder@90:' names layers outside"),
        (["calibrate", "--hardware", "tpu-v6"], "unknown hardware 'tpu-v6'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert perfmodel_main(["--config", "llama-2-70b", *args] if args[0] != "calibrate" else args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
