"""benchmarks/gpu_run.py, the one command a GPU session runs: its dry run (every part on CPU with
tiny shapes) must keep working between GPU runs, on the packages the GPU machine has."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from .conftest import TEST_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]
# The GPU machine has none of these (benchmarks/RESULTS.md, "One GPU, one command"): every part must run without them.
MISSING_ON_THE_GPU_MACHINE = ("grain", "array_record", "fastapi", "uvicorn", "openai")


def dry_run(out: Path, *args: str, status: int = 0, prelude: str = "") -> dict:
    code = (
        prelude + "import builtins, runpy, sys\n"
        "real = builtins.__import__\n"
        f"def guard(name, *a, **k):\n    assert name.split('.')[0] not in {MISSING_ON_THE_GPU_MACHINE!r}, name\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        f"sys.argv = ['gpu_run.py', '--dry-run', '--out', {str(out)!r}, *{list(args)!r}]\n"
        f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_run.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(TEST_XLA_FLAGS), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == status, (done.stdout + done.stderr)[-3000:]
    return json.loads((out / "gpu_run.json").read_text())


def tiny_step_floor_bytes(batch: int, keys: int) -> int:
    """The dry run's decode model (tiny: 2 layers, d 128, 4 heads of 32 over 2 KV heads, FFN 256,
    vocab 259 padded to 384, untied float32): every weight but the embedding table, and k and v
    of `keys` positions per row and layer."""
    d, layers, hd, heads, kv, ffn, vocab = 128, 2, 32, 4, 2, 256, 384
    per_layer = d * heads * hd * 2 + 2 * d * kv * hd + 3 * d * ffn + 2 * d
    weights = layers * per_layer + d + d * vocab
    return 4 * (weights + 2 * layers * batch * keys * kv * hd)


def test_the_gpu_run_dry_run_reports_every_part_with_numbers_without_the_data_and_serving_packages(tmp_path):
    report = dry_run(tmp_path)
    parts = report["parts"]
    assert list(parts) == ["bandwidth", "decode", "prefill", "layer", "serve", "train"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in report["xla_flags"]  # as train.py runs
    # one layer of tiny may hide in a loaded CPU's timing noise: that part then says so in a line
    noise = ["tiny tensor 2 (one device's shapes) batch 1: RuntimeError: the layers' time is below the timing noise"]
    if parts["layer"]["skipped"] == noise:
        parts.pop("layer")
    for name, part in parts.items():
        assert part["rows"], (name, part["skipped"])
        for row in part["rows"]:
            numbers = [
                v
                for k, v in row.items()
                if isinstance(v, float)
                and k
                not in ("of_peak", "mfu", "copy_of_peak", "compile_s", "trace_s", "seconds")  # seconds: 0.1 s steps
            ]
            assert numbers and all(np.isfinite(numbers)) and min(numbers) > 0, (name, row)
    # cuDNN cannot run on a CPU: the one row the dry run skips, with its reason
    assert [s.split(":")[0] for p in parts.values() for s in p["skipped"]] == [
        "tiny prefill 128 tokens, attention=cudnn"
    ]
    *steps, profiled = parts["decode"]["rows"]
    # each batch as the platform reads keys, the smallest and largest queued back to back, then
    # read up to the position
    assert [(r["batch"], r["reads"], r["dispatch"]) for r in steps] == [
        (1, "platform", "each read"),
        (4, "platform", "each read"),
        (1, "platform", "queued"),
        (4, "platform", "queued"),
        (1, "written", "each read"),
        (4, "written", "each read"),
    ]
    for row in steps:  # the tokens sit at position 63 of a 64-position cache: all 64 keys are read
        assert row["floor_mb"] * 1e6 == tiny_step_floor_bytes(row["batch"], 64)
        assert np.isclose(row["gb_s"] * row["ms_per_token"] * 1e6, row["floor_mb"] * 1e6)
    # the profile's files, moved up beside the report (the device tool brings back two folders down)
    traces = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert any(name.endswith(".xplane.pb") for name in traces) and not (tmp_path / "profile" / "trace").exists()
    assert [f.split(" ")[0] for f in profiled["trace_files"]] == traces
    # read where it was taken: the three profiled steps of the decode program
    assert profiled["timeline"]["steps"] == 3 and profiled["timeline"]["kernels_per_step"] > 0
    # where the seconds went: each row's compiles (JAX's events) within its own seconds, and the run's
    rows = [r for part in parts.values() for r in part["rows"]]
    assert all(0 <= r["compile_s"] <= r["seconds"] + 0.1 and r["compiles"] >= 0 for r in rows)
    assert steps[0]["compiles"] > 0 and report["compiles"] >= sum(r["compiles"] for r in rows)
    assert report["compile_s"] <= report["seconds"] and "s compiling" in (tmp_path / "gpu_run.md").read_text()
    # warmed up on other prompts of the same lengths, EOS ignored: nothing compiles in the timed runs
    assert parts["serve"]["rows"][0]["compiles_while_timed"] == 0
    train = {(r["config"], r["attention"], r["remat"]) for r in parts["train"]["rows"]}
    # the first kernel and remat of each model: two steps traced and read
    assert sorted(r["config"] for r in parts["train"]["rows"] if r.get("timeline", {}).get("steps") == 2) == [
        "ladder-1b",
        "llama-3.2-1b",
    ]
    assert train == {(c, a, r) for c in ("llama-3.2-1b", "ladder-1b") for a, r in (("triton", "none"), ("xla", "full"))}
    table = (tmp_path / "gpu_run.md").read_text()
    for title in ("Decode", "Prefill", "layer_decode", "Serving", "Train step", "attention=cudnn: AttentionError"):
        assert title in table
    assert "batch 1, profiled: where a step's time goes" in table and "remat=none: where a step's time goes" in table


def test_a_gpu_run_past_its_budget_skips_every_row_with_a_line_and_still_writes_its_report(tmp_path):
    parts = dry_run(tmp_path, "--budget", "0")["parts"]
    assert len(parts) == 6
    for name, part in parts.items():
        assert not part["rows"] and part["skipped"], name
        assert all("budget" in line and "spent" in line for line in part["skipped"]), part["skipped"]


def test_a_gpu_run_keeps_the_rows_it_resumes_and_skips_rows_that_took_longer_than_is_left(tmp_path):
    earlier = {"device": "cpu", "date": "2026-12-01 10:00", "parts": {}}
    kept = {"label": "tiny batch 1", "batch": 1, "ms_per_token": 1.5, "seconds": 2.0}
    resumed = tmp_path / "resumed.json"
    resumed.write_text(json.dumps({**earlier, "parts": {"decode": {"seconds": 2.0, "rows": [kept], "skipped": []}}}))
    slow = {
        "bandwidth": {"seconds": 999.0, "rows": [{"label": "plain copy and read", "seconds": 999.0}], "skipped": []}
    }
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({**earlier, "parts": slow}))
    other = tmp_path / "other_device.json"  # another device's costs say nothing about this one
    other.write_text(json.dumps({**earlier, "device": "NVIDIA H200", "parts": {"decode": {**slow["bandwidth"]}}}))
    args = ("--parts", "bandwidth,decode", "--resume", str(resumed), "--costs", str(costs), str(other))
    parts = dry_run(tmp_path / "out", *args)["parts"]
    assert parts["bandwidth"]["rows"] == []
    assert parts["bandwidth"]["skipped"] == [
        "plain copy and read: skipped, it took 999 s last time and 30 s of the bandwidth budget or the run's are left"
    ]
    decode = parts["decode"]["rows"]
    assert decode[0] == {**kept, "from": "2026-12-01 10:00 (resumed.json)"}
    assert [r["label"] for r in decode[:2]] == ["tiny batch 1", "tiny batch 4"]
    assert decode[1]["seconds"] > 0 and "from" not in decode[1]
    assert "tiny batch 1: kept from 2026-12-01 10:00 (resumed.json)" in (tmp_path / "out" / "gpu_run.md").read_text()


def test_a_gpu_run_past_its_hard_stop_writes_its_report_with_the_row_it_cut_and_exits_3(tmp_path):
    # a train step that never returns, as a hung compile would: the stop must land in the first train row
    hang = "import threading, ladder_jax.training as T\nT.Trainer.step = lambda *a: threading.Event().wait()\n"
    report = dry_run(tmp_path, "--parts", "bandwidth,train", "--hard-stop", "15", status=3, prelude=hang)
    assert report["parts"]["bandwidth"]["rows"]  # measured before the stop, and kept
    assert report["cut"] == "llama-3.2-1b train 2x128 attention=triton remat=none"
    assert report["parts"]["train"]["skipped"] == [f"{report['cut']}: cut at the hard stop (15 s)"]
