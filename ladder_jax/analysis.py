"""Sync analysis: read the compiled HLO and say which all-reduces block and which can overlap.

An all-reduce is *blocking* when every matmul of the program either feeds it or depends on it:
nothing is left to run while it is in flight. It is *overlappable* when some matmul does neither
(ladder: the next module's GEMMs). This is a property of the data dependencies, so it can be read
from a CPU compile (`sync`). Whether the GPU/TPU scheduler then really overlaps is read from the
schedule XLA:GPU / XLA:TPU produce for a target, compiled here without one (`schedule`); the same
deviceless compile of the train step says whether it fits a pod slice (`memory`).

XLA:CPU merges independent all-reduces into one tuple all-reduce (it has no async collectives, so
merging costs it nothing). That would hide exactly the structure we want to see, so the CPU
compile here disables its combiner; a merged all-reduce that remains is reported as one
collective with several operands.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_MATMUL_OPS = {"dot", "convolution"}
_MATMUL_TARGETS = ("matmul", "gemm", "cublas", "onednn$matmul")
NO_COMBINER = {"xla_disable_hlo_passes": "cpu-all-reduce-combiner"}


@dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    calls: list[str]
    attrs: str


@dataclass
class AllReduce:
    name: str
    axis: str  # "tensor", "data", "all" or "other"
    operands: int  # > 1 when XLA merged several all-reduces into one
    bytes: int
    blocking: bool
    op_name: str = ""


@dataclass
class SyncReport:
    all_reduces: list[AllReduce] = field(default_factory=list)

    def on(self, axis: str) -> list[AllReduce]:
        return [a for a in self.all_reduces if a.axis == axis]

    def summary(self, axis: str = "tensor") -> dict:
        ars = self.on(axis)
        return {
            "all_reduces": sum(a.operands for a in ars),
            "blocking_all_reduces": sum(a.operands for a in ars if a.blocking),
            "overlappable_all_reduces": sum(a.operands for a in ars if not a.blocking),
            "bytes": sum(a.bytes for a in ars),
        }

    def to_json(self) -> dict:
        return {"all_reduces": [asdict(a) for a in self.all_reduces]}


def _matching(text: str, start: int, open_c: str, close_c: str) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_c:
            depth += 1
        elif text[i] == close_c:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {open_c}{close_c} in HLO line: {text[:120]}")


_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)|(?:branch_computations|called_computations)=\{([^}]*)\}")


def _parse_instr(line: str) -> Instr | None:
    m = _LINE.match(line)
    if not m:
        return None
    name, rest = m.group(1), m.group(2)
    if rest.startswith("("):
        end = _matching(rest, 0, "(", ")")
        shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren].strip()
    end = _matching(rest, paren, "(", ")")
    operands = re.findall(r"%([\w.\-]+)", rest[paren : end + 1])
    attrs = rest[end + 1 :]
    calls = []
    for a, b in _CALLS.findall(attrs):
        calls += [a] if a else re.findall(r"%([\w.\-]+)", b)
    return Instr(name, shape, opcode, operands, calls, attrs)


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Computations of an HLO module text: name -> instructions (in order), and the entry's name."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        s = line.strip()
        if s.endswith("{") and ("->" in s or s.startswith("ENTRY")) and " = " not in s.split("(")[0]:
            header = s[len("ENTRY ") :] if s.startswith("ENTRY") else s
            current = header.split()[0].lstrip("%")
            comps[current] = []
            if s.startswith("ENTRY"):
                entry = current
        elif s == "}":
            current = None
        elif current is not None:
            ins = _parse_instr(s)
            if ins is not None:
                comps[current].append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return comps, entry


def shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shape):
        if dtype in _DTYPE_BYTES:
            total += int(np.prod([int(d) for d in dims.split(",") if d] or [1])) * _DTYPE_BYTES[dtype]
    return total


def parse_replica_groups(attrs: str) -> list[tuple[int, ...]] | None:
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if m:
        return [tuple(int(x) for x in g.split(",") if x) for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        out = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return [tuple(int(i) for i in row) for row in ids.reshape(out[0], -1)]
    return None


def mesh_axis_groups(mesh) -> dict[str, set[tuple[int, ...]]]:
    """Device-id groups of each mesh axis, to tell which axis a collective runs over."""
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    return {
        "tensor": {tuple(sorted(row)) for row in ids.tolist()},
        "data": {tuple(sorted(col)) for col in ids.T.tolist()},
        "all": {tuple(sorted(ids.ravel().tolist()))},
    }


def _is_matmul(ins: Instr, comps: dict, cache: dict) -> bool:
    if ins.opcode in _MATMUL_OPS:
        return True
    # GPU and TPU strength-reduce a matrix-vector dot (decode at batch 1) into multiply + reduce;
    # those ops keep the dot's op_name.
    if ins.opcode in ("multiply", "reduce") and re.search(r'op_name="[^"]*dot_general"', ins.attrs):
        return True
    if ins.opcode == "custom-call" and any(t in ins.attrs.lower() for t in _MATMUL_TARGETS):
        return True
    if ins.opcode in ("fusion", "call"):
        for c in ins.calls:
            if c not in cache:
                cache[c] = False
                cache[c] = any(_is_matmul(i, comps, cache) for i in comps.get(c, []))
            if cache[c]:
                return True
    return False


def _axis(attrs: str, groups: dict) -> str:
    """The mesh axis ("tensor", "data", "other") a collective with these attributes runs over."""
    rg = parse_replica_groups(attrs)
    found = {tuple(sorted(g)) for g in rg} if rg else None
    axis = next((name for name in ("tensor", "data", "all") if found == groups[name]), "other")
    if axis == "all":  # a mesh with one of the two axes of size 1
        axis = "tensor" if len(groups["data"]) == 1 else "data"
    return axis


def analyze(text: str, mesh) -> SyncReport:
    """All-reduces of the entry computation, their mesh axis, bytes, and whether they block."""
    comps, entry = parse_hlo(text)
    body = comps[entry]
    index = {ins.name: k for k, ins in enumerate(body)}
    cache: dict = {}
    matmuls = [k for k, ins in enumerate(body) if _is_matmul(ins, comps, cache)]
    bit = {k: 1 << n for n, k in enumerate(matmuls)}
    every = (1 << len(matmuls)) - 1

    above = [0] * len(body)  # matmuls each instruction depends on
    users: list[list[int]] = [[] for _ in body]
    for k, ins in enumerate(body):
        acc = 0
        for op in ins.operands:
            j = index.get(op)
            if j is not None:
                acc |= above[j] | bit.get(j, 0)
                users[j].append(k)
        above[k] = acc
    below = [0] * len(body)  # matmuls depending on each instruction
    for k in range(len(body) - 1, -1, -1):
        acc = 0
        for u in users[k]:
            acc |= below[u] | bit.get(u, 0)
        below[k] = acc

    groups = mesh_axis_groups(mesh)
    report = SyncReport()
    for k, ins in enumerate(body):
        if ins.opcode not in ("all-reduce", "all-reduce-start"):
            continue
        done = k
        if ins.opcode == "all-reduce-start":  # async (GPU): the wait is the matching done
            done = next((u for u in users[k] if body[u].opcode == "all-reduce-done"), k)
        axis = _axis(ins.attrs, groups)
        blocking = (above[k] | below[done] | bit.get(k, 0)) == every
        op_name = re.search(r'op_name="([^"]*)"', ins.attrs)
        report.all_reduces.append(AllReduce(ins.name, axis, len(ins.operands), shape_bytes(ins.shape), blocking, op_name.group(1) if op_name else ""))
    return report


def compiled_text(jitted, *args, combine: bool = False, options: dict | None = None) -> str:
    """Optimised HLO of `jitted(*args)` (abstract args are fine); see the module note on `combine`."""
    lowered = jitted.lower(*args)
    return lowered.compile(compiler_options={**({} if combine else NO_COMBINER), **(options or {})} or None).as_text()


def cpu_analysis_config(cfg):
    """The model config to compile for a CPU sync analysis: XLA:CPU promotes bfloat16 all-reduces to
    float32 (twice the bytes a GPU or TPU sends); float16 has bfloat16's size and it leaves alone."""
    import dataclasses

    return dataclasses.replace(cfg, dtype="float16") if cfg.dtype == "bfloat16" else cfg


def forward_report(cfg, mesh, batch: int | None = None, seq: int = 16) -> SyncReport:
    """Sync report of one causal forward of this model config on this mesh (abstract parameters)."""
    import jax
    import jax.numpy as jnp

    from . import model

    tokens = jax.ShapeDtypeStruct((batch or mesh.shape["data"], seq), jnp.int32)
    fn = model.forward_fn(cfg, mesh)
    return analyze(compiled_text(fn, model.abstract_params(cfg), tokens, tokens), mesh)


def decode_report(cfg, mesh, batch: int | None = None, max_len: int = 64, options: dict | None = None) -> SyncReport:
    """Sync report of one decode step (one new token per row, reading a KV cache of `max_len`);
    `options`: extra compiler options."""
    import jax
    import jax.numpy as jnp

    from . import decode, model

    batch = batch or mesh.shape["data"]
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    kv = jax.ShapeDtypeStruct(model.cache_shape(cfg, mesh.shape[model.TENSOR], batch, max_len), jnp.dtype(cfg.dtype))
    cache = [(kv, kv)] * cfg.n_layers
    return analyze(compiled_text(decode.step_fn(cfg, mesh), model.abstract_params(cfg), rows, rows, cache, options=options), mesh)


def sync_rows(cfg, mesh, variants: list[str], batch: int = 1, seq: int = 16) -> list[dict]:
    """One row per variant (a plan): all-reduces over `tensor` in a forward and a decode step."""
    import dataclasses

    from .config import parse_plan

    rows = []
    for plan in variants:
        parse_plan(plan, cfg.n_layers)
        c = cpu_analysis_config(dataclasses.replace(cfg, plan=plan))
        fwd = forward_report(c, mesh, batch=batch * mesh.shape["data"], seq=seq)
        step = decode_report(c, mesh, batch=batch * mesh.shape["data"])
        s, f = step.summary(), fwd.summary()
        rows.append(
            {
                "variant": plan,
                "layers": c.n_layers,
                "tensor": mesh.shape["tensor"],
                "all_reduces": s["all_reduces"],
                "blocking_all_reduces": s["blocking_all_reduces"],
                "overlappable_all_reduces": s["overlappable_all_reduces"],
                "bytes_per_token": s["bytes"] // (batch * mesh.shape["data"]),
                "forward": {**f, "bytes_per_token": f["bytes"] // (batch * mesh.shape["data"] * seq)},
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# The real GPU/TPU schedule, compiled ahead of time for a target that is not here
#
# XLA:GPU and XLA:TPU compile for "compile-only" devices described by a topology, with no
# accelerator present (`jax_platforms=cpu`); `.compile().as_text()` is then the scheduled HLO
# (`is_scheduled=true`): the order the device will run it in. An async all-reduce is a
# start/done pair there, and what the scheduler put between them runs while the reduction is in
# flight. That, not the data dependencies (`analyze`), is what decides whether ladder overlaps.

TARGETS_DIR = Path(__file__).parent / "targets"
EXTRA = {"cuda": ("jax_cuda12_plugin", "cuda", "XLA:GPU's CUDA plugin"), "tpu": ("libtpu", "tpu", "XLA:TPU (libtpu)")}
GPU_TARGETS = {"h100-8": "h100_sxm.txtpb", "a100-8": "a100_sxm.txtpb", "h200-8": "h200_sxm.txtpb"}
# Slice shapes (chips) as Cloud TPU names them; HBM per chip (Cloud TPU system architecture pages:
# v5e 16 GiB, v5p 95 GiB). A v5p chip's two TensorCores are one JAX device (megacore).
V5E_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
V5P_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
TPU_HBM = {"v5e": 16 * 2**30, "v5p": 95 * 2**30}


class TargetError(ValueError):
    """A target this machine cannot compile for; the message says what to change."""


@dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "cuda" or "tpu"
    topology: str  # what get_topology_desc takes
    devices: int  # JAX devices: GPUs, or TPU chips (v5p's two TensorCores are one device)
    hbm_bytes: int
    gpu_config: str = ""  # GpuTargetConfig text proto (GPU only)


def get_target(name: str) -> Target:
    """h100-8, a100-8, h200-8 (8 GPUs over NVLink); v5e-N (N chips, N <= 256); v5p-N (N TensorCores,
    Cloud naming: N/2 chips)."""
    if name in GPU_TARGETS:
        text = (TARGETS_DIR / GPU_TARGETS[name]).read_text()
        hbm = int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))
        return Target(name, "cuda", "1x1x8", 8, hbm, text)
    m = re.fullmatch(r"v5(e|p)-(\d+)", name)
    if m and m.group(1) == "e" and int(m.group(2)) in V5E_SHAPES:
        n = int(m.group(2))
        return Target(name, "tpu", f"v5e:{V5E_SHAPES[n]}", n, TPU_HBM["v5e"])
    if m and m.group(1) == "p" and int(m.group(2)) // 2 in V5P_SHAPES and int(m.group(2)) % 2 == 0:
        chips = int(m.group(2)) // 2
        return Target(name, "tpu", f"v5p:{V5P_SHAPES[chips]}", chips, TPU_HBM["v5p"])
    v5e, v5p = "/".join(map(str, V5E_SHAPES)), "/".join(str(2 * c) for c in V5P_SHAPES)
    known = ", ".join([*GPU_TARGETS, f"v5e-N (N in {v5e})", f"v5p-N (N TensorCores in {v5p})"])
    raise TargetError(f"unknown target '{name}'; pick one of {known}")


def check_extra(target: Target) -> None:
    """The compiler plugin this target needs, or TargetError saying how to install it."""
    import importlib.util

    module, extra, what = EXTRA[target.platform]
    if importlib.util.find_spec(module) is None:
        raise TargetError(f"--target {target.name} compiles with {what}, which is not installed; install it with: pip install 'ladder_jax[{extra}]'")


def target_devices(target: Target) -> list:
    """Compile-only devices of the target. JAX itself stays on the CPU: nothing runs, nothing is
    allocated. On TPU the library's libtpu flags (`mesh.tpu_flags`) must be set before this."""
    import jax
    from jax.experimental import topologies

    check_extra(target)
    jax.config.update("jax_platforms", "cpu")
    if target.platform == "tpu":
        # No TPU is used: skip libtpu's metadata-server lookups (slow, and they fail off a TPU VM)
        # and its one-process-per-host lock, so compiles can run side by side.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.name.replace("v5e-", "v5litepod-"))
    if target.platform == "cuda":
        return topologies.get_topology_desc(platform="cuda", target_config=target.gpu_config, topology=target.topology).devices
    return topologies.get_topology_desc(target.topology, "tpu").devices


def _linear(comps: dict, entry: str) -> list[Instr]:
    """The entry computation's instructions in execution order, with the computations that run in
    line inlined (call: GPU command buffers; while/conditional bodies once). Fusions stay one kernel."""
    out = []

    def walk(name):
        for ins in comps.get(name, []):
            out.append(ins)
            if ins.opcode in ("call", "while", "conditional"):
                for c in ins.calls:
                    walk(c)

    walk(entry)
    return out


def _param_label(ins: Instr) -> str | None:
    """'layers.3.attn.q_proj' for the parameter params['layers'][3]['attn']['q_proj'];
    'layers.3.attn.kv' for a decode step's KV cache (its 4th argument, args[2][layer][k or v])."""
    m = re.search(r"op_name=\"(params|args)((?:\[[^\]]*\])+)", ins.attrs) if ins.opcode == "parameter" else None
    if not m:
        return None
    keys = [k.strip("\\'") for k in re.findall(r"\[([^\]]*)\]", m.group(2))]
    if m.group(1) == "args":
        return f"layers.{keys[1]}.attn.kv" if len(keys) >= 2 and keys[0] == "2" else None
    return ".".join(keys)


def module_of(label: str) -> str:
    """'layers.3.attn.q_proj' -> 'layers.3.attn'; 'lm_head.weight' -> 'lm_head'."""
    parts = label.split(".")
    return ".".join(parts[:3]) if parts[0] == "layers" and len(parts) >= 3 else parts[0]


def _finished_collective(ins: Instr) -> bool:
    return ins.opcode in ("all-reduce", "all-reduce-done", "async-done") or ins.name.startswith("async-collective-done")


def _nearest(name: str, index: dict, match, stop, depth: int = 16) -> list[Instr]:
    """What `name` is computed from: the instructions satisfying `match` that are fewest steps
    back along its operands. Does not walk past `stop` instructions, nor past a finished
    collective (that is the previous module's output)."""
    frontier, seen = [name], {name}
    for _ in range(depth):
        level = list(dict.fromkeys(o for n in frontier for o in index[n].operands if o in index and o not in seen))
        seen.update(level)
        found = [index[o] for o in level if match(index[o])]
        if found:
            return found
        frontier = [o for o in level if not (stop(index[o]) or _finished_collective(index[o]))]
    return []


def _is_weight(ins: Instr) -> bool:
    """A parameter that a GEMM multiplies by: a matrix (or KV cache), not a norm scale or bias."""
    dims = re.match(r"\w+\[([\d,]*)\]", ins.shape)
    return _param_label(ins) is not None and dims is not None and dims.group(1).count(",") >= 1


def _gemm_label(name: str, index: dict, is_gemm) -> str:
    """A GEMM by the weight it reads, e.g. 'layers.3.mlp.down_proj', else by the KV cache it reads
    ('layers.3.attn.kv': attention scores and values; a projection fused with the cache update
    reads both and is named by its weight). The walk stops at other GEMMs (their weights are not
    this one's) unless that finds nothing: GPU's multiply + reduce form of a matrix-vector product
    reaches its weight through the multiply."""
    for stop in (is_gemm, lambda ins: False):
        weights = _nearest(name, index, _is_weight, stop)
        if weights:
            labels = [_param_label(i) for i in sorted(weights, key=lambda i: -shape_bytes(i.shape))]
            return next((x for x in labels if not x.endswith(".kv")), labels[0])
    return name


def _reduced_modules(name: str, index: dict, is_gemm) -> list[str]:
    """The modules whose outputs an all-reduce sums: the nearest GEMMs (or weights) behind it."""
    hit = lambda ins: is_gemm(ins) or _is_weight(ins)  # noqa: E731
    labels = [_param_label(i) if _is_weight(i) else _gemm_label(i.name, index, is_gemm) for i in _nearest(name, index, hit, hit)]
    return list(dict.fromkeys(module_of(x) for x in labels))


@dataclass
class ScheduledAllReduce:
    name: str
    axis: str
    async_: bool  # a start/done pair (else one synchronous op)
    bytes: int
    reduces: list[str]  # the modules whose outputs it sums (more than one: XLA merged them)
    gemms_inside: list[str]  # GEMMs scheduled between start and done, by weight
    overlaps_next: bool  # one of them belongs to the module after the one it reduces

    @property
    def overlapped(self) -> bool:
        return bool(self.gemms_inside)


def _next_module(module: str) -> str:
    """The module a ladder all-reduce of `module` should overlap: attn i -> mlp i -> attn i+1."""
    m = re.fullmatch(r"layers\.(\d+)\.(attn|mlp)", module)
    if not m:
        return ""
    i = int(m.group(1))
    return f"layers.{i}.mlp" if m.group(2) == "attn" else f"layers.{i + 1}.attn"


def _inner_all_reduce(ins: Instr, comps: dict) -> Instr | None:
    """The first all-reduce inside the computations `ins` calls (recursively), if any."""
    todo = list(ins.calls)
    while todo:
        for i in comps.get(todo.pop(0), []):
            if i.opcode == "all-reduce":
                return i
            todo += i.calls
    return None


def _chain(ins: Instr, comps: dict) -> str | None:
    ar = _inner_all_reduce(ins, comps)
    m = re.search(r'chain_id="(\d+)"', ar.attrs) if ar else None
    return m.group(1) if m else None


def _async_start(ins: Instr, comps: dict):
    """(the all-reduce `ins` starts, a test for its done) or None. The forms: a synchronous
    all-reduce (no done: nothing runs beside it); all-reduce-start/done (GPU); async-start/done
    around an all-reduce; TPU's async collective fusion, fusions named async-collective-start ...
    async-collective-done with one step of the all-reduce in each (same chain_id), the steps in
    between fused into compute kernels."""
    if ins.opcode == "all-reduce":
        return ins, None
    if ins.opcode == "all-reduce-start":
        return ins, lambda d: d.opcode == "all-reduce-done" and ins.name in d.operands
    ar = _inner_all_reduce(ins, comps) if ins.opcode in ("async-start", "fusion") else None
    if ar is None:
        return None
    if ins.opcode == "async-start":
        return ar, lambda d: d.opcode == "async-done" and ins.name in d.operands
    if ins.name.startswith("async-collective-start"):
        chain = _chain(ins, comps)
        return ar, lambda d: d.name.startswith("async-collective-done") and _chain(d, comps) == chain
    return None


def scheduled_all_reduces(text: str, mesh) -> list[ScheduledAllReduce]:
    """Every all-reduce of a scheduled HLO module in execution order, with the GEMMs that run
    while it is in flight. Sync all-reduces have none by construction."""
    comps, entry = parse_hlo(text)
    index = {ins.name: ins for body in comps.values() for ins in body}
    cache: dict = {}
    is_gemm = lambda ins: _is_matmul(ins, comps, cache)  # noqa: E731
    order = _linear(comps, entry)
    groups = mesh_axis_groups(mesh)
    out = []
    for k, ins in enumerate(order):
        started = _async_start(ins, comps)
        if started is None:
            continue
        ar, is_done = started
        done = k if is_done is None else next((j for j in range(k + 1, len(order)) if is_done(order[j])), k)
        gemms = [_gemm_label(i.name, index, is_gemm) for i in order[k + 1 : done] if is_gemm(i)]
        reduces = _reduced_modules(ins.name, index, is_gemm)
        nexts = {_next_module(r) for r in reduces} - {""}
        overlaps = any(module_of(g) in nexts for g in gemms)
        out.append(ScheduledAllReduce(ins.name, _axis(ar.attrs, groups), is_done is not None, shape_bytes(ar.shape), reduces, gemms, overlaps))
    return out


def schedule_summary(ars: list[ScheduledAllReduce]) -> dict:
    """Counts over the `tensor` axis: async, overlapped (>= 1 GEMM inside), and the exposed ones."""
    t = [a for a in ars if a.axis == "tensor"]
    return {
        "all_reduces": len(t),
        "async": sum(a.async_ for a in t),
        "overlapped": sum(a.overlapped for a in t),
        "overlap_next_module": sum(a.overlaps_next for a in t),
        "merged": sum(len(a.reduces) > 1 for a in t),
        "exposed": ["+".join(a.reduces) or a.name for a in t if not a.overlapped],
    }


def ladder_overlaps(ars: list[ScheduledAllReduce]) -> bool:
    """The acceptance for a ladder plan: every layer all-reduce but the last has one of the next
    module's GEMMs inside (the embedding's and the greedy pick's reduce nothing a layer computes)."""
    layer = [a for a in ars if a.axis == "tensor" and any(r.startswith("layers.") for r in a.reduces)]
    return bool(layer) and all(a.overlaps_next for a in layer[:-1])


def decode_step_hlo(cfg, mesh, batch: int | None = None, max_len: int = 64, compiler_options: dict | None = None) -> str:
    """Scheduled HLO of one decode step, compiled for the mesh's devices (abstract arguments)."""
    import jax
    import jax.numpy as jnp

    from . import decode, model

    batch = batch or mesh.shape["data"]
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    kv = jax.ShapeDtypeStruct(model.cache_shape(cfg, mesh.shape[model.TENSOR], batch, max_len), jnp.dtype(cfg.dtype))
    lowered = decode.step_fn(cfg, mesh).lower(model.abstract_params(cfg), rows, rows, [(kv, kv)] * cfg.n_layers)
    return lowered.compile(compiler_options=compiler_options).as_text()


def target_mesh(cfg, target: Target):
    """The config's (data, tensor) mesh over the target's compile-only devices (Config.mesh: data -1
    means every device the tensor axis leaves over)."""
    from .mesh import make_mesh

    t, d = cfg.mesh.tensor, cfg.mesh.data
    if target.devices % t:
        raise TargetError(f"--tensor {t} does not divide the {target.devices} devices of {target.name}; pick a divisor of {target.devices}")
    if d != -1 and d * t > target.devices:
        raise TargetError(f"--data {d} x --tensor {t} needs {d * t} devices but {target.name} has {target.devices}; lower --data or --tensor")
    return make_mesh(cfg, target_devices(target))


def schedule_rows(cfg, mesh, variants: list[str], batch: int = 1, cache_len: int = 1024, compiler_options: dict | None = None, dump: str | None = None) -> list[dict]:
    """One row per variant (a plan): the decode step's all-reduces as the target schedules them.
    `batch` rows per data shard, each reading a KV cache of `cache_len` positions. With `dump`
    (a folder), each variant's scheduled HLO is written there too."""
    from .config import parse_plan

    rows = []
    for plan in variants:
        parse_plan(plan, cfg.n_layers)
        c = dataclasses.replace(cfg, plan=plan)
        text = decode_step_hlo(c, mesh, batch * mesh.shape["data"], min(cache_len, c.max_seq_len), compiler_options)
        if dump:
            Path(dump).mkdir(parents=True, exist_ok=True)
            safe = re.sub(r"[^\w@:,.-]", "_", plan)
            (Path(dump) / f"{c.name}-{safe}.hlo.txt").write_text(text)
        ars = scheduled_all_reduces(text, mesh)
        rows.append({"variant": plan, "layers": c.n_layers, **schedule_summary(ars), "ladder_overlaps": ladder_overlaps(ars), "all_reduce_list": [{**asdict(a), "overlapped": a.overlapped} for a in ars]})
    return rows


def train_memory(cfg, mesh, hbm_bytes: int) -> dict:
    """Per-device memory of the real train step (`training.Trainer`), compiled from abstract state
    and batch for this mesh: nothing is allocated."""
    import jax
    import jax.numpy as jnp

    from .training import BATCH_KEYS, get_trainer

    trainer = get_trainer(cfg, mesh)
    tr = cfg.train
    shape = (tr.grad_accum, tr.batch_size // tr.grad_accum, tr.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "mask" else jnp.int32, sharding=trainer.batch_sharding[k]) for k in BATCH_KEYS}
    lowered = trainer._step.lower(trainer.abstract_state(), batch)
    try:
        m = lowered.compile().memory_analysis()
    except Exception as e:  # XLA:TPU refuses to compile what cannot fit, and says by how much
        refused = re.search(r"RESOURCE_EXHAUSTED: ([^\n]*)", str(e))
        if refused is None:
            raise
        return {"hbm": hbm_bytes, "fits": False, "refused": refused.group(1).rstrip(".")}
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,  # outputs written over donated arguments (the state)
        "temporaries": m.temp_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    return {**out, "hbm": hbm_bytes, "fits": out["total"] <= hbm_bytes}


def _gemm_names(labels: list[str]) -> str:
    """'layers.1.attn.q_proj x2, layers.1.attn.kv' (each GEMM kernel once; GPU and TPU split a
    matrix-vector product into two kernels)."""
    counts = dict.fromkeys(labels, 0)
    for x in labels:
        counts[x] += 1
    return ", ".join(f"{x} x{n}" if n > 1 else x for x, n in counts.items())


def _print_schedule(rows: list[dict], head: str) -> None:
    print(head)
    for r in rows:
        print(f"\n{r['variant']}: {r['all_reduces']} all-reduces over 'tensor', {r['async']} async, {r['overlapped']} with GEMMs inside "
              f"({r['overlap_next_module']} with the next module's), {r['merged']} merged; ladder acceptance: {'yes' if r['ladder_overlaps'] else 'no'}")
        shown = r["exposed"][:12] + ([f"... {len(r['exposed']) - 12} more"] if len(r["exposed"]) > 12 else [])
        print(f"  exposed ({len(r['exposed'])}): {', '.join(shown) or 'none'}")
        print(f"  {'#':>3s} {'all-reduce':26s} {'kind':5s} {'bytes':>9s} {'reduces':28s} GEMMs inside")
        for k, a in enumerate(r["all_reduce_list"]):
            kind = "async" if a["async_"] else "sync"
            print(f"  {k:3d} {a['name'][:26]:26s} {kind:5s} {a['bytes']:9,d} {'+'.join(a['reduces'])[:28]:28s} {len(a['gemms_inside'])}: {_gemm_names(a['gemms_inside'])}")


def _target_or_exit(name: str) -> Target:
    """The target, or one line on stderr (what is wrong, how to fix it) and exit status 2."""
    import sys

    try:
        target = get_target(name)
        check_extra(target)
        return target
    except TargetError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv=None) -> None:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m ladder_jax.analysis", description="Where the all-reduces are, and which of them block.")
    sub = ap.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="all-reduces per decode step and forward, blocking or overlappable, from the compiled HLO")
    sync.add_argument("--config", default="tiny", help="preset name or YAML path")
    sync.add_argument("overrides", nargs="*", help="key=value, e.g. model.n_layers=4")
    sync.add_argument("--tensor", type=int, default=8, help="tensor-parallel degree (fake CPU devices; nothing is allocated)")
    sync.add_argument("--variant", action="append", help="a plan to compare; repeat it (default: the config's plan), e.g. --variant standard --variant ladder")
    sync.add_argument("--json", action="store_true", help="print JSON instead of a table")
    targets = "h100-8, a100-8, h200-8 (needs ladder_jax[cuda]); v5e-8, v5p-8, v5p-N (needs ladder_jax[tpu])"
    sched = sub.add_parser("schedule", help="the decode step as XLA:GPU/TPU schedules it for a target (compiled here, deviceless): which GEMMs run while each all-reduce is in flight")
    sched.add_argument("--config", default="tiny", help="preset name or YAML path")
    sched.add_argument("overrides", nargs="*", help="key=value, e.g. model.n_layers=4")
    sched.add_argument("--target", required=True, help=targets)
    sched.add_argument("--tensor", type=int, help="tensor-parallel degree (default: every device of the target)")
    sched.add_argument("--variant", action="append", help="a plan to compare; repeat it (default: the config's plan)")
    sched.add_argument("--batch", type=int, default=1, help="decode rows per data shard (default 1)")
    sched.add_argument("--cache-len", type=int, default=1024, help="KV cache positions each row reads (default 1024, at most model.max_seq_len)")
    sched.add_argument("--no-xla-flags", action="store_true", help="compile without the library's libtpu flags (mesh.TPU_FLAGS), to see XLA's defaults")
    sched.add_argument("--dump", metavar="DIR", help="also write each variant's scheduled HLO text to DIR/<model>-<variant>.hlo.txt")
    sched.add_argument("--json", action="store_true", help="print JSON instead of a table")
    mem = sub.add_parser("memory", help="per-device memory of the train step compiled for a target (deviceless): does it fit?")
    mem.add_argument("--config", default="ladder-1b", help="preset name or YAML path")
    mem.add_argument("overrides", nargs="*", help="key=value, e.g. train.batch_size=256 train.seq_len=2048")
    mem.add_argument("--target", required=True, help=targets + "; any v5p-N slice")
    mem.add_argument("--data", type=int, help="data-parallel degree (default: every device the tensor axis leaves over)")
    mem.add_argument("--tensor", type=int, help="tensor-parallel degree (default: the config's mesh.tensor)")
    mem.add_argument("--no-xla-flags", action="store_true", help="compile without the library's libtpu flags (mesh.TPU_FLAGS)")
    mem.add_argument("--json", action="store_true", help="print JSON instead of a line")
    args = ap.parse_args(argv)

    from .config import load_config

    if args.command == "sync":
        return _sync_main(args, load_config)
    target = _target_or_exit(args.target)
    if not args.no_xla_flags:  # before the compiler plugin loads: libtpu reads its flags once
        from .mesh import apply_xla_flags

        apply_xla_flags()
    if args.command == "schedule":
        cfg = load_config(args.config, [*args.overrides, f"mesh.tensor={args.tensor or target.devices}", "mesh.data=-1"])
    else:
        tensor = args.tensor or load_config(args.config, args.overrides).mesh.tensor
        cfg = load_config(args.config, [*args.overrides, f"mesh.tensor={tensor}", f"mesh.data={args.data or -1}"])
    try:
        mesh = target_mesh(cfg, target)
    except TargetError as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    shape = f"data={mesh.shape['data']} x tensor={mesh.shape['tensor']}"
    if args.command == "memory":
        r = train_memory(cfg, mesh, target.hbm_bytes)
        if args.json:
            print(json.dumps({"target": target.name, "mesh": dict(mesh.shape), **r}, indent=1))
            return
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        tr = cfg.train
        if "refused" in r:
            print(f"{cfg.model.name} train step on {target.name} ({target.devices} devices, {shape}), batch {tr.batch_size} x {tr.seq_len} tokens: "
                  f"does NOT fit; the compiler refused it: {r['refused']}")
            return
        print(f"{cfg.model.name} train step on {target.name} ({target.devices} devices, {shape}), batch {tr.batch_size} x {tr.seq_len} tokens"
              f"{f', grad_accum {tr.grad_accum}' if tr.grad_accum > 1 else ''}: per device arguments {gib(r['arguments'])}, outputs {gib(r['outputs'])} "
              f"({gib(r['aliased'])} of them over donated arguments), temporaries {gib(r['temporaries'])}, code {gib(r['code'])}; "
              f"total {gib(r['total'])} of {gib(r['hbm'])} HBM: {'fits' if r['fits'] else 'does NOT fit'} ({r['total'] / r['hbm']:.0%})")
        return
    try:
        rows = schedule_rows(cfg.model, mesh, args.variant or [cfg.model.plan], args.batch, args.cache_len, dump=args.dump)
    except Exception as e:  # XLA:TPU refuses to compile a step that cannot fit in HBM
        refused = re.search(r"RESOURCE_EXHAUSTED: ([^\n]*)", str(e))
        if refused is None:
            raise
        import sys

        print(f"error: the decode step does not fit {target.name} with {shape}: {refused.group(1).rstrip('.')}; use more devices (--target, --tensor) or a smaller --batch/--cache-len", file=sys.stderr)
        raise SystemExit(2) from None
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    m = cfg.model
    _print_schedule(rows, f"{m.name}, {m.n_layers} layers, {m.dtype}, one decode step on {target.name} ({shape}), batch {args.batch * mesh.shape['data']}, "
                    f"KV cache {min(args.cache_len, m.max_seq_len)}; XLA flags: {'ladder_jax.mesh TPU_FLAGS' if target.platform == 'tpu' and not args.no_xla_flags else 'XLA defaults'}")


def _sync_main(args, load_config) -> None:
    import json

    from .mesh import force_cpu_devices, make_mesh

    cfg = load_config(args.config, [*args.overrides, f"mesh.tensor={args.tensor}", "mesh.data=1"])
    force_cpu_devices(args.tensor)
    import jax

    mesh = make_mesh(cfg, jax.devices()[: args.tensor])
    variants = args.variant or [cfg.model.plan]
    rows = sync_rows(cfg.model, mesh, variants)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{cfg.model.name}, {cfg.model.n_layers} layers, tensor={args.tensor}: all-reduces over 'tensor' in one decode step")
    print(f"{'variant':28s} {'all-reduces':>11s} {'blocking':>9s} {'overlap':>8s} {'bytes/token':>12s}")
    for r in rows:
        print(f"{r['variant']:28s} {r['all_reduces']:11d} {r['blocking_all_reduces']:9d} {r['overlappable_all_reduces']:8d} {r['bytes_per_token']:12,d}")


if __name__ == "__main__":
    main()
