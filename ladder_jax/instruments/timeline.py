"""What a `jax.profiler` trace says about each step's device time: how many kernels a step
launches, how much of the step's span some kernel was running, where the device sat idle, and
which operations took the time.

A trace (`jax.profiler.trace(DIR)`, `train.profile=START:END`, `benchmarks/gpu_run.py`'s decode
profile) is read with JAX's own `ProfileData`, no TensorBoard or xprof needed. Device work is:

- on a GPU, the events of the `/device:GPU:N` plane's stream lines: kernels (XLA's fusions,
  cuBLAS/cuDNN/Triton calls, collectives) and copies (`MemcpyD2H`, `MemcpyH2D`, ..., `Memset`);
- on a TPU, the `/device:TPU:N` plane's `XLA Ops` line;
- on the CPU, XLA:CPU's thunks: host-thread events that carry an `hlo_op` stat.

On the CPU a loop's thunk spans the thunks of its body, and both are listed among the ops.
Events are named by their `hlo_op` stat (the HLO instruction) where they carry one. The program
that took the most device time (its `hlo_module` stat) is the one summarized, the others are
listed. A step is the events of one of its executions (`run_id`); where events carry none (a
GPU's), the trace's totals are shared by the `steps` it holds.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import statistics

from .. import storage
from ..errors import LadderError

COPY_PREFIXES = ("Memcpy", "Memset")
TRACE_GLOBS = ("*.xplane.pb", "plugins/profile/*/*.xplane.pb", "profile/plugins/profile/*/*.xplane.pb")


class TraceError(LadderError):
    """A trace folder that holds no trace, or a trace with no device work in it."""


@dataclasses.dataclass(frozen=True)
class Op:
    """One span of device work: a kernel or a copy, of one execution (`run`) of one program."""

    name: str  # the HLO instruction, else the kernel's name
    start_ns: float
    end_ns: float
    run: int | None = None
    module: str | None = None
    kernel: str = ""  # the kernel's (or thunk's) own name

    @property
    def is_copy(self) -> bool:
        return self.name.startswith(COPY_PREFIXES)


def find_trace(folder) -> storage.Path:
    """The newest `*.xplane.pb` in `folder`, a trace folder or a run directory (or `folder` itself,
    if it is one; local or gs://). Of a multi-host trace, the first host's."""
    folder = storage.path(folder)
    if folder.is_file():
        return folder
    # jax.profiler writes DIR/plugins/profile/<start time, YYYY_MM_DD_HH_MM_SS>/<host>.xplane.pb; a
    # run directory holds DIR = RUN/profile. No recursive glob: on gs:// each level is a listing.
    if not folder.exists():
        raise TraceError(f"{folder} does not exist; give the DIR of jax.profiler.trace(DIR) or a run directory")
    found = [p for pattern in TRACE_GLOBS for p in folder.glob(pattern)]
    if not found:
        raise TraceError(
            f"no jax.profiler trace (*.xplane.pb) under {folder}; write one with train.profile=START:END "
            "or `with jax.profiler.trace(DIR): ...`"
        )
    newest = max(p.parent.name for p in found)
    return min((p for p in found if p.parent.name == newest), key=lambda p: p.name)


def device_ops(path) -> tuple[str, int, list[Op]]:
    """(where the work was found: "gpu", "tpu" or "cpu"; how many devices did some; the first
    device's ops, in start order) from a trace."""
    import jax

    trace = find_trace(path)
    try:
        data = jax.profiler.ProfileData.from_serialized_xspace(trace.read_bytes())
    except RuntimeError as e:  # "Failed to parse XSpace from array": any other file
        raise TraceError(
            f"{trace} is not a jax.profiler trace ({str(e).splitlines()[0] if str(e) else 'unreadable'}); give a "
            "*.xplane.pb, the DIR of jax.profiler.trace(DIR) or a run directory"
        ) from None
    found = collections.defaultdict(list)  # (kind, device ordinal) -> ops
    for plane in data.planes:
        lines, chip = list(plane.lines), re.fullmatch(r"/device:(GPU|TPU):(\d+)", plane.name)
        if chip and chip.group(1) == "GPU":  # not "CUPTI overhead" nor the graph metadata line
            kind, lines = "gpu", [ln for ln in lines if ln.name.startswith("Stream")]
        elif chip:  # a TPU chip's plane; its SparseCores have planes of their own
            kind, lines = "tpu", [ln for ln in lines if ln.name == "XLA Ops"]
        elif plane.name == "/host:CPU":
            kind = "cpu"
        else:
            continue
        for line in lines:
            for ev in line.events:
                stats = dict(ev.stats)
                if kind == "cpu" and "hlo_op" not in stats:
                    continue  # Python frames, the runtime's own events
                name, module = str(stats.get("hlo_op") or ev.name), stats.get("hlo_module")
                device = int(stats.get("device_ordinal", 0)) if kind == "cpu" else int(chip.group(2))
                end = ev.start_ns + ev.duration_ns
                op = Op(name, ev.start_ns, end, stats.get("run_id"), module and str(module), ev.name)
                found[(kind, device)].append(op)
    for kind in ("gpu", "tpu", "cpu"):  # a GPU or TPU trace also holds host events: the device wins
        devices = sorted(d for k, d in found if k == kind)
        if devices:
            return kind, len(devices), sorted(found[(kind, devices[0])], key=lambda op: op.start_ns)
    raise TraceError(f"the trace {trace} holds no device work (no kernels, no XLA:CPU thunks)")


def runs_of(ops: list[Op]) -> list[list[Op]] | None:
    """The ops of each execution, by `run_id`, in start order; None unless every op has one."""
    if not ops or any(op.run is None for op in ops):
        return None
    runs = collections.defaultdict(list)
    for op in ops:
        runs[op.run].append(op)
    return sorted(runs.values(), key=lambda rs: rs[0].start_ns)


def busy_ns(ops: list[Op]) -> float:
    """Time at least one op was running (the union of their spans)."""
    total, end = 0.0, float("-inf")
    for op in sorted(ops, key=lambda op: op.start_ns):
        if op.end_ns > end:
            total += op.end_ns - max(op.start_ns, end)
            end = op.end_ns
    return total


def idle_gaps(ops: list[Op]) -> list[tuple[float, str, str]]:
    """(nanoseconds, the op before, the op after) for each stretch inside the ops' span where none ran."""
    out, end, last = [], None, None
    for op in sorted(ops, key=lambda op: op.start_ns):
        if end is not None and op.start_ns > end:
            out.append((op.start_ns - end, last.name, op.name))
        if end is None or op.end_ns > end:
            end, last = op.end_ns, op
    return out


def by_module(ops: list[Op]) -> dict[str | None, list[Op]]:
    """The ops of each program, the one with the most device time first. Ops of no known program
    (a kernel XLA's annotations did not reach) count with that one."""
    out = collections.defaultdict(list)
    for op in ops:
        out[op.module].append(op)
    out = dict(sorted(out.items(), key=lambda kv: -sum(op.end_ns - op.start_ns for op in kv[1])))
    if None in out and len(out) > 1:
        unknown = out.pop(None)
        main = next(iter(out))
        out[main] = sorted(out[main] + unknown, key=lambda op: op.start_ns)
    return out


def summarize(kind: str, ops: list[Op], steps: int | None = None, top: int = 8, devices: int = 1) -> dict:
    """For the program with the most device time, per step (medians over its executions): kernels
    and copies launched, the span from the first op's start to the last op's end, the time some op
    ran (busy) and its share of the span (over all steps); the idle time between steps; the longest
    idle gaps; the ops that took the most time. The other programs: their device
    time and executions. Where the ops carry no run id, the whole trace is shared evenly by
    `steps`: its span then holds whatever idle time lay between the steps too."""
    (module, ops), *others = by_module(ops).items()
    groups, shared = runs_of(ops), 1  # shared: how many steps one group holds
    if groups:
        # a step the trace caught only the end or the start of (a trace starts while the previous
        # step still runs): fewer ops than a whole one
        whole = statistics.median(len(g) for g in groups)
        while len(groups) > 1 and len(groups[0]) < whole:
            groups = groups[1:]
        while len(groups) > 1 and len(groups[-1]) < whole:
            groups = groups[:-1]
        ops = [op for g in groups for op in g]
    else:  # no run ids: the whole trace, shared evenly by the steps it holds
        groups, shared = [ops], steps or 1
    n = len(groups) * shared
    spans = [(max(op.end_ns for op in g) - g[0].start_ns) / shared for g in groups]
    busy = [busy_ns(g) / shared for g in groups]
    between = [b[0].start_ns - max(op.end_ns for op in a) for a, b in zip(groups, groups[1:])]
    copies = collections.Counter(op.name for op in ops if op.is_copy)
    by_name, count, kernels = collections.Counter(), collections.Counter(), collections.defaultdict(set)
    for op in ops:
        by_name[op.name] += op.end_ns - op.start_ns
        count[op.name] += 1
        kernels[op.name].add(op.kernel)
    total = sum(by_name.values())
    gaps = sorted((gap for g in groups for gap in idle_gaps(g)), reverse=True)[:top]
    return {
        "device": kind,
        "devices": devices,
        "program": module,
        "steps": n,
        "kernels_per_step": statistics.median(sum(not op.is_copy for op in g) for g in groups) / shared,
        "copies_per_step": {k: v / n for k, v in sorted(copies.items())},
        "span_us": statistics.median(spans) / 1e3,
        "busy_us": statistics.median(busy) / 1e3,
        "busy_share": sum(busy) / sum(spans) if sum(spans) > 0 else None,
        "between_steps_us": statistics.median(between) / 1e3 if between else None,
        "longest_gaps": [{"us": g / 1e3, "after": a, "before": b} for g, a, b in gaps],
        "top_ops": [
            {
                "op": k,
                "kernels": sorted(kernels[k] - {k}),  # where the kernel's name is not the op's (cuBLAS's, say)
                "us_per_step": v / n / 1e3,
                "share": v / total if total else 0.0,
                "per_step": count[k] / n,
            }
            for k, v in by_name.most_common(top)
        ],
        "other_programs": [
            {
                "program": m,
                "us": busy_ns(o) / 1e3,
                "executions": len({op.run for op in o}) if o[0].run is not None else None,
            }
            for m, o in others
        ],
    }


def read(path, steps: int | None = None, top: int = 8) -> dict:
    """`summarize` of the device work in the trace at `path` (a folder or an .xplane.pb)."""
    trace = find_trace(path)
    kind, devices, ops = device_ops(trace)
    return {"trace": str(trace), **summarize(kind, ops, steps, top, devices)}


def table(summary: dict) -> str:
    """The summary as Markdown: a line of per-step figures, the longest gaps and the top ops."""
    s = summary
    copies = ", ".join(f"{k} {v:g}" for k, v in s["copies_per_step"].items()) or "none"
    share = "—" if s["busy_share"] is None else f"{s['busy_share']:.0%}"
    between = "—" if s["between_steps_us"] is None else f"{s['between_steps_us']:.1f} us"
    out = [
        f"{s['device']} trace of `{s['program']}`, {s['steps']} step(s), the first of {s['devices']} device(s); "
        f"per step: {s['kernels_per_step']:g} kernels, "
        f"copies: {copies}; span {s['span_us']:.1f} us, busy {s['busy_us']:.1f} us ({share}); idle between steps "
        f"{between}; other programs: {len(s['other_programs'])}, {sum(o['us'] for o in s['other_programs']):.1f} us",
        "",
        "| op | us per step | share of device time | per step | kernels |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| `{o['op']}` | {o['us_per_step']:.1f} | {o['share']:.1%} | {o['per_step']:g} | "
            + ", ".join(f"`{k[:60]}`" for k in o["kernels"][:3])
            + " |"
            for o in s["top_ops"]
        ),
    ]
    if s["longest_gaps"]:
        out += ["", "| idle gap us | after | before |", "| --- | --- | --- |"]
        out += [f"| {g['us']:.1f} | `{g['after']}` | `{g['before']}` |" for g in s["longest_gaps"]]
    return "\n".join(out)
