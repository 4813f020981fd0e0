"""Reading a jax.profiler trace: a GPU trace laid out as XLA's CUPTI collector writes one (two
devices, streams, overlapping kernels, copies, no run ids) with hand-counted figures, and a real
XLA:CPU trace through `analysis trace`."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from ladder_jax.checkpoint import save_config
from ladder_jax.cli import main
from ladder_jax.config import load_config
from ladder_jax.instruments import timeline as T

# Three steps of one program on two streams of GPU 0, each step waiting on the host before the
# next (the 50 us and 40 us gaps): per step two kernels and one copy; step 2's kernels overlap on
# two streams. Another program ran once between the steps. (kernel, hlo_op, program, start us,
# end us, stream); a copy carries no hlo_op.
STEPS = [
    [("loop_fusion", "fusion.1", 0, 10, 13), ("sm90_gemm", "gemm.2", 12, 30, 13), ("MemcpyD2H", None, 30, 31, 14)],
    [("loop_fusion", "fusion.1", 81, 91, 13), ("sm90_gemm", "gemm.2", 85, 100, 15), ("MemcpyD2H", None, 100, 101, 14)],
    [
        ("loop_fusion", "fusion.1", 141, 151, 13),
        ("sm90_gemm", "gemm.2", 153, 171, 13),
        ("MemcpyD2H", None, 171, 172, 14),
    ],
]
OTHER = ("broadcast_kernel", "broadcast.0", 60, 61, 13)


def xspace(device0: list, module0: list) -> bytes:
    """A serialized XSpace: GPU 0 with `device0`'s events (each of the program in `module0`), a
    CUPTI overhead line, GPU 1 with one kernel, and a host thread with an XLA:CPU-like event."""
    names, stats = {}, {"hlo_op": 1, "hlo_module": 2}

    def meta(name):
        return names.setdefault(name, len(names) + 1)

    def plane(pid, name, lines):
        body = "".join(
            f'lines {{ id: {i} name: "{line}" timestamp_ns: 0 {events} }}' for i, (line, events) in enumerate(lines)
        )
        metas = "".join(f'event_metadata {{ key: {v} value {{ id: {v} name: "{k}" }} }}' for k, v in names.items())
        smetas = "".join(f'stat_metadata {{ key: {v} value {{ id: {v} name: "{k}" }} }}' for k, v in stats.items())
        return f'planes {{ id: {pid} name: "{name}" {body} {metas} {smetas} }}'

    def event(name, op, start, end, module):
        tags = (f'stats {{ metadata_id: 1 str_value: "{op}" }}' if op else "") + (
            f'stats {{ metadata_id: 2 str_value: "{module}" }}' if module else ""
        )
        return f"events {{ metadata_id: {meta(name)} offset_ps: {int(start * 1e6)} duration_ps: {int((end - start) * 1e6)} {tags} }}"

    streams = {}
    for (name, op, start, end, stream), module in zip(device0, module0):
        streams.setdefault(f"Stream #{stream}(Kernel,MemcpyD2H)", []).append(event(name, op, start, end, module))
    lines = [(k, "".join(v)) for k, v in streams.items()] + [("CUPTI overhead", event("overhead", None, 0, 500, "x"))]
    gpu0 = plane(1, "/device:GPU:0", lines)
    names.clear()
    gpu1 = plane(2, "/device:GPU:1", [("Stream #20(Kernel)", event("loop_fusion", "fusion.1", 0, 900, "jit_step"))])
    names.clear()
    host = plane(3, "/host:CPU", [("python", event("wrapped_add", "add.1", 0, 999, "jit_step"))])
    return jax.profiler.ProfileData.text_proto_to_serialized_xspace(gpu0 + gpu1 + host)


def test_a_gpu_traces_totals_are_shared_by_its_steps_and_busy_time_is_the_union_of_the_kernels(tmp_path, capsys):
    events = sorted([e for s in STEPS for e in s] + [OTHER], key=lambda e: e[2])
    # the copies carry no program, as a kernel XLA's annotations miss: they count with the main one
    programs = ["jit_zeros" if e is OTHER else None if e[0] == "MemcpyD2H" else "jit_step" for e in events]
    (tmp_path / "host.xplane.pb").write_bytes(xspace(events, programs))
    s = T.read(tmp_path, steps=3, top=3)
    assert (s["device"], s["devices"], s["program"], s["steps"]) == ("gpu", 2, "jit_step", 3)
    assert s["kernels_per_step"] == 2 and s["copies_per_step"] == {"MemcpyD2H": 1}
    # no run ids: 172 us from the first kernel to the last, of which 29 + 20 (overlapped on two
    # streams) + 29 busy, over 3 steps; the steps' bounds are unknown
    assert s["span_us"] == pytest.approx(172 / 3) and s["busy_us"] == pytest.approx(78 / 3)
    assert s["busy_share"] == pytest.approx(78 / 172) and s["between_steps_us"] is None
    assert [(g["us"], g["after"], g["before"]) for g in s["longest_gaps"]] == [
        (pytest.approx(50), "MemcpyD2H", "fusion.1"),  # the host's turn between steps
        (pytest.approx(40), "MemcpyD2H", "fusion.1"),
        (pytest.approx(2), "fusion.1", "gemm.2"),
    ]
    # named by the HLO instruction where the kernel carries one
    assert [(o["op"], o["kernels"], round(o["us_per_step"], 3), o["per_step"]) for o in s["top_ops"]] == [
        ("gemm.2", ["sm90_gemm"], 17.0, 1),
        ("fusion.1", ["loop_fusion"], 10.0, 1),
        ("MemcpyD2H", [], 1.0, 1),
    ]
    assert s["other_programs"] == [{"program": "jit_zeros", "us": pytest.approx(1), "executions": None}]
    # a run directory's trace: as many steps as its train.profile names
    run = tmp_path / "run"
    (run / "profile" / "plugins" / "profile" / "2026_12_05_10_00_00").mkdir(parents=True)
    (tmp_path / "host.xplane.pb").rename(
        run / "profile" / "plugins" / "profile" / "2026_12_05_10_00_00" / "host.xplane.pb"
    )
    save_config(run, load_config("tiny", ["train.steps=5", "train.profile=2:5"]))
    assert main(["analysis", "trace", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["busy_us"] == pytest.approx(78 / 3)
    kind, devices, ops = T.device_ops(run)
    # without a step count, one step from the first op to the last
    assert T.summarize(kind, ops)["span_us"] == pytest.approx(172)
    # with run ids (XLA:CPU's): each step on its own, and one the trace caught only the end of is left out
    runs = [dataclasses.replace(o, run=1 + int(o.start_ns > 70e3) + int(o.start_ns > 130e3)) for o in ops]
    s = T.summarize(kind, [dataclasses.replace(ops[-1], start_ns=-5e3, end_ns=-4e3, run=0), *runs])
    assert s["steps"] == 3 and s["between_steps_us"] == pytest.approx(45)  # 50 and 40 us
    # spans 31, 20, 31 us; busy 29 (a 2 us gap), 20 (overlapped), 29
    assert (s["span_us"], s["busy_us"], s["busy_share"]) == pytest.approx((31, 29, 78 / 82))


def test_analysis_trace_reads_each_run_of_the_profiled_program(tmp_path, capsys):
    @jax.jit
    def step(x):
        return jnp.tanh(x @ x).sum(0)

    x = jnp.ones((64, 64))
    step(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            step(x).block_until_ready()
    assert main(["analysis", "trace", str(tmp_path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    hlo = step.lower(x).compile().as_text()
    assert (s["device"], s["devices"], s["program"], s["steps"]) == ("cpu", 1, "jit_step", 3)  # a step per run id
    assert s["kernels_per_step"] >= 1 and 0 < s["busy_us"] <= s["span_us"]
    assert all(f"{o['op']} = " in hlo for o in s["top_ops"])  # named by the compiled HLO's instructions

    assert main(["analysis", "trace", str(tmp_path / "plugins")]) == 2
    assert "no jax.profiler trace (*.xplane.pb) under" in capsys.readouterr().err


def test_of_several_traces_the_newest_and_its_first_host_are_read(tmp_path):
    for start in ("2026_12_05_10_00_00", "2026_12_05_11_00_00"):
        folder = tmp_path / "profile" / "plugins" / "profile" / start
        folder.mkdir(parents=True)
        for host in ("worker-1", "worker-0"):
            (folder / f"{host}.xplane.pb").write_bytes(b"")
    assert T.find_trace(tmp_path).relative_to(tmp_path).as_posix() == (
        "profile/plugins/profile/2026_12_05_11_00_00/worker-0.xplane.pb"
    )


def test_a_file_that_is_not_a_trace_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("hello\n")
    assert main(["analysis", "trace", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'afile'} is not a jax.profiler trace (") and err.count("\n") == 1, err
    with pytest.raises(T.TraceError, match=r"afile is not a jax.profiler trace .*give a \*\.xplane\.pb"):
        T.read(tmp_path / "afile")
