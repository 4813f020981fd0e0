"""The real GPU/TPU programs, compiled ahead of time for a target that is not here.

XLA:GPU and XLA:TPU compile for "compile-only" devices described by a topology, with no
accelerator present (`jax_platforms=cpu`); `.compile().as_text()` is then the scheduled HLO
(`is_scheduled=true`): the order the device will run it in. An async all-reduce is a start/done
pair there, and what the scheduler put between them runs while the reduction is in flight. That,
not the data dependencies (`sync.analyze`), decides whether ladder overlaps (`schedule_rows`).
The same deviceless compile of the train step says whether it fits a pod slice (`train_memory`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding

from .. import accelerators, decode
from ..attention import DECODE_KEY_BLOCK
from ..config import Config, ModelConfig
from ..errors import LadderError
from ..memory import refusal, step_bytes
from ..mesh import batch_shards, make_mesh
from ..model import abstract_params, param_shardings, run_lengths, stack_layers
from ..plan import parse_plan
from ..storage import path
from ..training import BATCH_KEYS, get_trainer, loss_sums_fn
from . import traffic
from .hlo import Instr, collective_axis, is_matmul, mesh_axis_groups, parse_hlo, result_shape, shape_bytes

TARGETS_DIR = Path(__file__).parent / "targets"
# A platform's compiler plugins, any one of which compiles for it (JAX's XLA:GPU comes for CUDA 13
# or CUDA 12), and the extra that installs one.
PLUGINS = {"cuda": ("jax_cuda13_plugin", "jax_cuda12_plugin"), "tpu": ("libtpu",)}
EXTRA = {"cuda": ("cuda", "XLA:GPU's CUDA plugin"), "tpu": ("tpu", "XLA:TPU (libtpu)")}
# Deviceless GPU targets: 8 GPUs of one NVLink node of an accelerator (ladder_jax/accelerators.yaml)
GPU_TARGETS = {"h100-8": "h100-sxm", "a100-8": "a100-sxm", "h200-8": "h200-sxm"}
# Slice shapes (chips) as Cloud TPU names them. A v5p chip's two TensorCores are one JAX device (megacore).
V5E_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
V5P_SHAPES = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}


class TargetError(LadderError):
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
        gpu = accelerators.get(GPU_TARGETS[name])
        return Target(name, "cuda", "1x1x8", 8, gpu.hbm_bytes, (TARGETS_DIR / gpu.gpu_target).read_text())
    m = re.fullmatch(r"v5(e|p)-(\d+)", name)
    if m and m.group(1) == "e" and int(m.group(2)) in V5E_SHAPES:
        n = int(m.group(2))
        return Target(name, "tpu", f"v5e:{V5E_SHAPES[n]}", n, accelerators.get("tpu-v5e").hbm_bytes)
    if m and m.group(1) == "p" and int(m.group(2)) // 2 in V5P_SHAPES and int(m.group(2)) % 2 == 0:
        chips = int(m.group(2)) // 2
        return Target(name, "tpu", f"v5p:{V5P_SHAPES[chips]}", chips, accelerators.get("tpu-v5p").hbm_bytes)
    v5e, v5p = "/".join(map(str, V5E_SHAPES)), "/".join(str(2 * c) for c in V5P_SHAPES)
    known = ", ".join([*GPU_TARGETS, f"v5e-N (N in {v5e})", f"v5p-N (N TensorCores in {v5p})"])
    raise TargetError(f"unknown target '{name}'; pick one of {known}")


def has_compiler(platform: str) -> bool:
    """Whether a compiler plugin for `platform` ("cuda" or "tpu") is installed."""
    return any(importlib.util.find_spec(m) for m in PLUGINS[platform])


def check_extra(target: Target) -> None:
    """The compiler plugin this target needs, or TargetError saying how to install it."""
    extra, what = EXTRA[target.platform]
    if not has_compiler(target.platform):
        raise TargetError(
            f"--target {target.name} compiles with {what}, which is not installed; install it with: pip install 'ladder_jax[{extra}]'"
        )


def target_devices(target: Target) -> list:
    """Compile-only devices of the target. JAX itself stays on the CPU: nothing runs, nothing is
    allocated. On TPU the library's libtpu flags (`mesh.tpu_flags`) must be set before this."""
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
        return topologies.get_topology_desc(
            platform="cuda", target_config=target.gpu_config, topology=target.topology
        ).devices
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
    labels = [
        _param_label(i) if _is_weight(i) else _gemm_label(i.name, index, is_gemm)
        for i in _nearest(name, index, hit, hit)
    ]
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
    op_name: str = ""  # JAX's name for it, e.g. 'jit(f)/transpose(jvp())/shard_map/layer1/psum'

    @property
    def overlapped(self) -> bool:
        return bool(self.gemms_inside)

    @property
    def backward(self) -> bool:
        """A transpose: the backward pass's reduction of a gradient (else forward, or a remat's recompute)."""
        return "transpose(" in self.op_name and not self.recomputed

    @property
    def recomputed(self) -> bool:
        """A forward all-reduce run again in the backward pass (`train.remat`)."""
        return "rematted_computation" in self.op_name

    @property
    def scope(self) -> str:
        """The model's named scope it was traced in ('layer1', 'scan_layers1-3', 'embed'); '' for the loss."""
        parts = self.op_name.split("/")
        named = [p for p in parts[:-1] if re.fullmatch(r"layers?[\d-]+|scan_layers[\d-]+|embed|head", p)]
        return named[-1] if named else ""


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


def scheduled_all_reduces(text: str, mesh: Mesh) -> list[ScheduledAllReduce]:
    """Every all-reduce of a scheduled HLO module in execution order, with the GEMMs that run
    while it is in flight. Sync all-reduces have none by construction."""
    comps, entry = parse_hlo(text)
    index = {ins.name: ins for body in comps.values() for ins in body}
    cache: dict = {}
    is_gemm = lambda ins: is_matmul(ins, comps, cache)  # noqa: E731
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
        op_name = re.search(r'op_name="([^"]*)"', ar.attrs)
        out.append(
            ScheduledAllReduce(
                ins.name,
                collective_axis(ar.attrs, groups),
                is_done is not None,
                shape_bytes(result_shape(ar)),
                reduces,
                gemms,
                overlaps,
                op_name.group(1) if op_name else "",
            )
        )
    return out


KERNEL_OPS = ("fusion", "custom-call", "dot", "convolution", "all-reduce", "all-reduce-start", "scatter", "gather")


def kernel_counts(text: str) -> dict:
    """Kernels a device launches in one run of a scheduled HLO module (fusions, library calls,
    collectives; a fusion is one kernel), and its GEMMs per layer, by the weight each reads
    ({'layers.3': 7, ...}; a GEMM over a KV cache counts for the cache's layer)."""
    comps, entry = parse_hlo(text)
    index = {ins.name: ins for body in comps.values() for ins in body}
    cache: dict = {}
    is_gemm = lambda ins: is_matmul(ins, comps, cache)  # noqa: E731
    order = _linear(comps, entry)
    gemms: dict[str, int] = {}
    for ins in order:
        if is_gemm(ins):
            label = _gemm_label(ins.name, index, is_gemm)
            key = ".".join(label.split(".")[:2]) if label.startswith("layers.") else module_of(label)
            gemms[key] = gemms.get(key, 0) + 1
    return {"kernels": sum(ins.opcode in KERNEL_OPS for ins in order), "gemms": gemms}


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


def decode_step_hlo(
    cfg: ModelConfig, mesh: Mesh, batch: int | None = None, max_len: int = 64, compiler_options: dict | None = None
) -> str:
    """Scheduled HLO of one decode step, compiled for the mesh's devices (abstract arguments)."""
    args = decode.abstract_step_args(cfg, mesh, batch or batch_shards(mesh), max_len)
    return decode.step_fn(cfg, mesh).lower(*args).compile(compiler_options=compiler_options).as_text()


def paged_step_hlo(
    cfg: ModelConfig,
    mesh: Mesh,
    batch: int,
    pages: int,
    page_size: int,
    width: int,
    compiler_options: dict | None = None,
) -> str:
    """Scheduled HLO of one decode step of the serving engine (`decode.paged_step_fn`) over pools
    of `pages` pages, compiled for the mesh's devices (abstract arguments)."""
    args = decode.abstract_paged_step_args(cfg, mesh, batch, pages, page_size, width)
    return decode.paged_step_fn(cfg, mesh).lower(*args).compile(compiler_options=compiler_options).as_text()


def prefill_hlo(cfg: ModelConfig, mesh: Mesh, batch: int, prompt_len: int, cache_len: int) -> str:
    """Scheduled HLO of `decode.prefill_fn`: `batch` prompts of `prompt_len` tokens into a cache
    of `cache_len` positions (abstract arguments)."""
    params, per_row, _, _ = decode.abstract_step_args(cfg, mesh, batch, cache_len)
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=NamedSharding(mesh, decode.ROWS_BY_SEQ))
    return decode.prefill_fn(cfg, mesh, cache_len).lower(params, tokens, per_row).compile().as_text()


def paged_prefill_hlo(
    cfg: ModelConfig, mesh: Mesh, batch: int, chunk: int, pages: int, page_size: int, width: int
) -> str:
    """Scheduled HLO of the serving engine's prefill of a `chunk`-token chunk per row
    (`decode.paged_prefill_fn`) over pools of `pages` pages (abstract arguments)."""
    params, per_row, _, pools, table, *sampling = decode.abstract_paged_step_args(
        cfg, mesh, batch, pages, page_size, width
    )
    tokens = jax.ShapeDtypeStruct((batch, chunk), jnp.int32, sharding=NamedSharding(mesh, decode.ROWS_BY_SEQ))
    fn = decode.paged_prefill_fn(cfg, mesh)
    return fn.lower(params, tokens, tokens, pools, table, per_row, *sampling).compile().as_text()


def train_hlo(
    cfg: ModelConfig,
    mesh: Mesh,
    batch: int,
    seq: int,
    remat: str = "none",
    scan: bool = False,
    compiler_options: dict | None = None,
    backward: bool = True,
) -> str:
    """Scheduled HLO of a train step's work on `batch` x `seq` tokens: the gradient of the mean
    loss (forward, loss, backward), or with `backward=False` the forward's loss sums alone
    (`training.loss_sums_fn`), compiled for the mesh's devices from abstract arguments. Scanned,
    the parameters come in the training layout, as a scanned Trainer holds them."""
    lengths = run_lengths(cfg.layer_steps) if scan else None
    sums = loss_sums_fn(cfg, mesh, remat, scan, lengths)

    def loss(params, tokens):  # named `params`: the HLO's parameters then carry the weights' names
        total, count = sums(params, tokens)
        return total / count

    shapes = abstract_params(cfg)
    if scan:
        shapes = jax.eval_shape(lambda p: stack_layers(p, cfg.layer_steps, lengths), shapes)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, param_shardings(cfg, mesh, lengths)
    )
    tokens = {k: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if k == "mask" else jnp.int32) for k in BATCH_KEYS}
    fn = jax.grad(loss) if backward else sums
    return jax.jit(fn).lower(params, tokens).compile(compiler_options).as_text()


def target_mesh(cfg: Config, target: Target) -> Mesh:
    """The config's (data, tensor) mesh over the target's compile-only devices (Config.mesh: data -1
    means every device the tensor axis leaves over)."""
    t, d = cfg.mesh.tensor, cfg.mesh.data
    if target.devices % t:
        raise TargetError(
            f"--tensor {t} does not divide the {target.devices} devices of {target.name}; pick a divisor of {target.devices}"
        )
    if d != -1 and d * t > target.devices:
        raise TargetError(
            f"--data {d} x --tensor {t} needs {d * t} devices but {target.name} has {target.devices}; lower --data or --tensor"
        )
    return make_mesh(cfg, target_devices(target))


def schedule_rows(
    cfg: ModelConfig,
    mesh: Mesh,
    variants: list[str],
    batch: int = 1,
    cache_len: int = 1024,
    compiler_options: dict | None = None,
    dump: str | None = None,
) -> list[dict]:
    """One row per variant (a plan): the decode step's all-reduces as the target schedules them.
    `batch` rows per data shard, each reading a KV cache of `cache_len` positions. With `dump`
    (a folder), each variant's scheduled HLO is written there too."""
    rows = []
    for plan in variants:
        parse_plan(plan, cfg.n_layers)
        c = dataclasses.replace(cfg, plan=plan)
        text = decode_step_hlo(c, mesh, batch * batch_shards(mesh), min(cache_len, c.max_seq_len), compiler_options)
        if dump:
            path(dump).mkdir(parents=True, exist_ok=True)
            safe = re.sub(r"[^\w@:,.-]", "_", plan)
            (path(dump) / f"{c.name}-{safe}.hlo.txt").write_text(text)
        ars = scheduled_all_reduces(text, mesh)
        rows.append(
            {
                "variant": plan,
                "layers": c.n_layers,
                **step_traffic(c, mesh, text, batch, min(cache_len, c.max_seq_len)),
                **schedule_summary(ars),
                "ladder_overlaps": ladder_overlaps(ars),
                "all_reduce_list": [{**asdict(a), "overlapped": a.overlapped} for a in ars],
            }
        )
    return rows


def step_traffic(cfg: ModelConfig, mesh: Mesh, text: str, batch: int, cache_len: int) -> dict:
    """A decode step's device-memory traffic per device (its scheduled HLO `text`, every row at the
    last cache position) against the floor, and its kernels per step (what a runtime without CUDA
    graphs launches per token)."""
    trips = traffic.keys_read(cache_len, cache_len) // min(DECODE_KEY_BLOCK, cache_len)
    moved = traffic.hbm_traffic(text, trips)
    floor = traffic.floor_bytes(cfg, mesh.shape["tensor"], batch, cache_len, cache_len)
    return {
        "hbm_bytes": moved["total"],
        "floor_bytes": floor["total"],
        "hbm_over_floor": moved["total"] / floor["total"],
        "on_chip_operand_bytes": moved["on_chip"],  # what XLA's cost analysis adds on TPU (not HBM traffic)
        "kernels": kernel_counts(text)["kernels"],
        "host_synced_loops": host_synced_loops(text),
    }


def host_synced_loops(text: str) -> int:
    """Loops of a scheduled HLO module whose trip count XLA does not know. XLA:GPU's runtime
    copies such a loop's condition to the host and waits for the device at every iteration (a
    known trip count runs without asking), so each costs a GPU a round trip per iteration."""
    comps, _ = parse_hlo(text)
    return sum(i.opcode == "while" and "known_trip_count" not in i.attrs for body in comps.values() for i in body)


def train_memory(cfg: Config, mesh: Mesh, hbm_bytes: int) -> dict:
    """Per-device memory of the real train step (`training.Trainer`), compiled from abstract state
    and batch for this mesh: nothing is allocated."""
    try:
        out = step_bytes(get_trainer(cfg, mesh).compile())
    except Exception as e:
        if refusal(e) is None:
            raise
        return {"hbm": hbm_bytes, "fits": False, "refused": refusal(e)}
    return {**out, "hbm": hbm_bytes, "fits": out["total"] <= hbm_bytes}
