"""A latency model of tensor-parallel decoding: what each variant would gain on real hardware.

    python -m ladder_jax perfmodel predict --config C [key=value ...] --tensor T --hardware H \\
        --batch 1 4 64 [--variant PLAN ...] [--prompt 1024 --gen 512] [--json] [--out DIR]
    python -m ladder_jax perfmodel calibrate --hardware h100-nvlink [--write]

CPU runs cannot show overlap (XLA:CPU all-reduces are synchronous), so the speed-ups the methods
exist for are estimated here from three ingredients:

1. *Per-module cost on one device*: the bytes it streams from HBM (its weight shard, and for
   attention the KV cache) against the memory bandwidth, its FLOPs against the matmul rate, and a
   fixed cost per kernel. Bytes and FLOPs come from the model's own parameter shards
   (`model.abstract_params` + `model.param_specs`) and KV-cache layout (`model.cache_shape`).
2. *All-reduce cost per interconnect*: latency + bytes / bandwidth, ring or tree, whichever is
   cheaper for the message (as NCCL picks by size); hierarchical across nodes.
3. *Which all-reduces block and which can overlap*: read from the compiled decode step by the sync
   analysis (`sync.analyze` of the step `sync.decode_report` compiles), on a copy of the model with each run of equal schedules
   cut to three layer steps (first, one interior, last); the interior step stands for the rest.
   No per-variant table: a new plan gets its structure from its own HLO.

Composition per token: modules run in order; a blocking all-reduce adds its whole time; an
overlappable one runs under the next module and adds only what that module does not hide,
max(0, t_ar - t_next), plus a contention share of the overlapped time (the collective kernel
takes SMs and HBM bandwidth from the GEMMs it runs beside). An all-reduce followed by the LM head
is not hidden: the head reads the settled residual.

Hardware profiles are YAML data in `perf/profiles/` (`hardware.py`): spec-sheet numbers plus a few
calibrated constants, fitted (`calibrate.py`) to the published Ladder Residual 70B TP8 H100 table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from ... import model
from ...config import Config, ConfigError, MeshConfig, ModelConfig, TrainConfig, validate
from ...mesh import make_mesh
from ...plan import lookup, parse_plan, plan_steps
from ..plots import pyplot, save_figure
from ..sync import cpu_analysis_config, decode_report
from .hardware import Hardware, PerfModelError, load_hardware

DEFAULT_VARIANTS = ("standard", "ladder", "parallel", "desync")
TP_SWEEP = (2, 4, 8, 16)


# ---------------------------------------------------------------------------------------------
# All-reduce cost


def _ring(nbytes: float, n: int, bw: float, hop: float) -> float:
    # reduce-scatter + all-gather: 2(n-1) steps, each moving 1/n of the message per device
    return 2 * (n - 1) * hop + 2 * (n - 1) / n * nbytes / bw


def _tree(nbytes: float, n: int, bw: float, hop: float) -> float:
    # reduce up a binary tree and broadcast down: 2 log2(n) steps, the whole message each step;
    # few steps (low latency) but no bandwidth saving, so it wins for small messages
    return 2 * math.ceil(math.log2(n)) * hop + 2 * nbytes / bw


def allreduce_time(nbytes: float, n: int, hw: Hardware) -> tuple[float, str]:
    """Seconds for an all-reduce of `nbytes` over `n` devices, and the algorithm chosen."""
    if n <= 1 or nbytes <= 0:
        return 0.0, "none"
    bw = hw.link_bandwidth * hw.link_efficiency
    g = min(n, hw.devices_per_node)
    if n <= g:
        options = {
            "ring": _ring(nbytes, n, bw, hw.link_hop_latency_s),
            "tree": _tree(nbytes, n, bw, hw.link_hop_latency_s),
        }
    else:
        # hierarchical: reduce-scatter inside each node, all-reduce the 1/g shards across nodes
        # (each device over its own NIC), all-gather inside the node
        nodes = n // g
        intra = (g - 1) * hw.link_hop_latency_s + (g - 1) / g * nbytes / bw
        ibw = hw.inter_bandwidth * hw.link_efficiency
        options = {
            f"{a}-across-nodes": 2 * intra + f(nbytes / g, nodes, ibw, hw.inter_hop_latency_s)
            for a, f in (("ring", _ring), ("tree", _tree))
        }
    algo = min(options, key=options.get)
    return hw.allreduce_latency_s + options[algo], algo


# ---------------------------------------------------------------------------------------------
# Per-module cost on one device


@dataclass(frozen=True)
class Module:
    weight_bytes: int  # this device's shard
    flops_per_token: float  # 2 x local parameters
    kv_bytes_per_position: int = 0  # KV cache this device reads per row per cached position
    kv_bytes_per_query_head: int = 0  # the same when K/V are expanded to every local query head
    attn_flops_per_position: float = 0.0  # QK^T and PV per token per cached position


@functools.lru_cache(maxsize=32)
def module_costs(m: ModelConfig, tensor: int) -> dict[str, Module]:
    """Bytes and FLOPs of attention, MLP, LM head and embedding on one device of a tensor axis."""
    one = dataclasses.replace(m, n_layers=1, plan="standard")
    params, specs = model.abstract_params(one), model.param_specs(one, tensor)
    local: dict[str, list[int]] = {}
    flat_specs = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)
    )[0]
    for (path, x), (_, spec) in zip(jax.tree_util.tree_flatten_with_path(params)[0], flat_specs):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        group = {
            "attn": "attention",
            "attn_norm": "attention",
            "mlp": "mlp",
            "mlp_norm": "mlp",
            "final_norm": "head",
            "lm_head": "head",
            "embed": "embed",
        }[keys[2] if keys[0] == "layers" else keys[0]]
        n = math.prod(d // tensor if a == model.TENSOR else d for d, a in zip(x.shape, tuple(spec) + (None,) * x.ndim))
        if keys[-1] in ("k_proj", "v_proj") and model.TENSOR not in tuple(spec):
            n //= (
                m.n_kv_heads
            )  # KV heads replicated (fewer than devices): each device reads only the one its queries use
        local.setdefault(group, [0, 0])
        local[group][0] += n * np.dtype(x.dtype).itemsize
        local[group][1] += n
    if m.tie_embeddings:  # the head multiplies by the embedding table's shard
        local["head"] = [local["head"][0] + local["embed"][0], local["head"][1] + local["embed"][1]]
    act = np.dtype(jax.numpy.dtype(m.dtype)).itemsize
    _, slots, _, hd = model.cache_shape(m, tensor, 1, 1)
    heads_local = m.n_heads // tensor
    out = {g: Module(b, 2.0 * n) for g, (b, n) in local.items()}
    out["attention"] = dataclasses.replace(
        out["attention"],
        kv_bytes_per_position=2 * (slots // tensor) * hd * act,
        kv_bytes_per_query_head=2 * heads_local * hd * act,
        attn_flops_per_position=4.0 * heads_local * hd,
    )
    out["embed"] = Module(m.d_model * act, 0.0)  # a row gather: one row's bytes per token, not the table
    return out


def module_time(
    mod: Module, kind: str, hw: Hardware, tokens: int, rows: int, kv_len: float, kernels_saved: int = 0
) -> float:
    """Seconds of one module on one device for `tokens` tokens in `rows` sequences that attend
    over `kv_len` cached positions each (decode: tokens == rows).

    A roofline: max(bytes / bandwidth, FLOPs / matmul rate). Decode GEMMs stream their weights
    once and overlap loads with tensor-core math inside the kernel, so the slower of the two
    bounds the time rather than their sum; at batch 64 a 70B shard's GEMMs are still 4x under the
    H100's ridge point (about 300 FLOP/byte), at a 1024-token prefill far over it.
    """
    kv = mod.kv_bytes_per_query_head if hw.attention_expands_kv else mod.kv_bytes_per_position
    nbytes = mod.weight_bytes + rows * kv_len * kv
    if kind == "embed":
        nbytes = tokens * mod.weight_bytes
    flops = tokens * (mod.flops_per_token + kv_len * mod.attn_flops_per_position)
    t = max(nbytes / (hw.hbm_bandwidth * hw.hbm_efficiency), flops / (hw.matmul_flops * hw.matmul_efficiency))
    return t + (hw.kernels_of(kind) - kernels_saved) * hw.kernel_overhead_s


# ---------------------------------------------------------------------------------------------
# Structure of one decode step, from the sync analysis


@dataclass(frozen=True)
class Event:
    kind: str  # "compute" or "ar"
    module: str = ""  # compute: embed, attention, mlp, head
    blocking: bool = True  # ar
    bytes_per_row: int = 0  # ar: bytes per sequence in one decode step
    kernels_saved: int = 0  # compute: kernels this module does not launch (a parallel layer's MLP has no norm)


def _runs(plan: str, n_layers: int) -> list[tuple[str, list[tuple[int, ...]]]]:
    """The plan's steps grouped into runs of equal schedule: [(schedule, [layers of each step])]."""
    runs: list = []
    for name, layers in plan_steps(parse_plan(plan, n_layers)):
        if runs and runs[-1][0] == name:
            runs[-1][1].append(layers)
        else:
            runs.append((name, [layers]))
    return runs


def compress_plan(plan: str, n_layers: int, keep: int = 3) -> tuple[str, int, list[tuple[str, int, int]]]:
    """A plan with each run cut to `keep` steps (first, interior..., last).

    Returns (plan, its layer count, [(schedule, step size, multiplicity)] per kept step): the
    multiplicity says how many steps of the full plan each kept step stands for.
    """
    segments, steps, layer = [], [], 0
    for name, run in _runs(plan, n_layers):
        kept = run if len(run) <= keep else run[: keep - 1] + run[-1:]
        size = len(run[0])
        for i, _ in enumerate(kept):
            mult = len(run) - keep + 1 if (len(run) > keep and i == keep - 2) else 1
            steps.append((name, size, mult))
        n = size * len(kept)
        segments.append(f"{name}@{layer}:{layer + n}")
        layer += n
    return ",".join(segments), layer, steps


def _reduced(m: ModelConfig, plan: str, n_layers: int) -> ModelConfig:
    return dataclasses.replace(m, plan=plan, n_layers=n_layers, max_seq_len=min(m.max_seq_len, 64))


_STRUCTURE_CACHE: dict = {}


def _all_reduces(m: ModelConfig, tensor: int, plan: str, n_layers: int) -> list[tuple[int, bool]]:
    """(bytes, blocking) of every all-reduce over `tensor` in one compiled decode step (batch 1),
    in program order; a merged all-reduce counts once per operand."""
    key = (dataclasses.replace(m, plan="standard", n_layers=1), tensor, plan, n_layers)
    if key not in _STRUCTURE_CACHE:
        c = cpu_analysis_config(_reduced(m, plan, n_layers))
        mesh = make_mesh(Config(model=c, mesh=MeshConfig(data=1, tensor=tensor)), jax.devices()[:tensor])
        # LLVM code generation at -O0: the report reads the HLO after XLA's passes, which the
        # backend level does not touch (same all-reduces; about 40% less compile time on CPU).
        report = decode_report(c, mesh, batch=1, max_len=c.max_seq_len, options={"xla_backend_optimization_level": 0})
        _STRUCTURE_CACHE[key] = [
            (a.bytes // a.operands, a.blocking) for a in report.on("tensor") for _ in range(a.operands)
        ]
    return _STRUCTURE_CACHE[key]


def analysis_tensor(tensor: int) -> int:
    """The tensor size the sync analysis compiles at: the real one when this process has the fake
    devices for it, else its largest divisor that fits (the dependency structure does not depend
    on the tensor size once it is above 1; bytes per all-reduce do not depend on it at all)."""
    n = jax.device_count()
    return max(d for d in range(1, min(n, tensor) + 1) if tensor % d == 0)


def decode_structure(m: ModelConfig, tensor: int, plan: str | None = None) -> list[Event]:
    """The decode step of `plan` as an ordered list of module computations and all-reduces.

    Where the all-reduces are, their bytes and which block come from the compiled HLO of a
    reduced copy (see `compress_plan`). Each step's share of the layer all-reduces is learned from
    the uniform plan of its schedule; inside a step they are spread over its modules in order
    (k all-reduces over 2k modules: one after every other module), which places ladder's after
    each module and a parallel or SPD layer's after its MLP.
    """
    plan = plan or m.plan
    parse_plan(plan, m.n_layers)
    t = max(2, analysis_tensor(tensor)) if tensor > 1 else 1
    if t == 1:  # one device: no all-reduces; the modules alone
        steps = [(n, len(layers), 1) for n, layers in plan_steps(parse_plan(plan, m.n_layers))]
        ars: list[tuple[int, bool]] = []
    else:
        small, n_small, steps = compress_plan(plan, m.n_layers)
        ars = _all_reduces(m, t, small, n_small)
    residual = ars[0][0] if ars else 0  # the embedding's all-reduce comes first and has the residual's size
    layer_ars = [a for a in ars[1:] if a[0] == residual]
    head_ars = [a for a in ars[1:] if a[0] != residual]

    per_step = {}  # layer all-reduces per step of each schedule, from its own uniform plan
    for name, size, _ in steps:
        if name in per_step:
            continue
        if t == 1:
            per_step[name] = 0
        elif all(s[0] == name for s in steps):
            per_step[name] = len(layer_ars) // len(steps)
        else:
            uplan, un, usteps = compress_plan(name, 3 * size)
            per_step[name] = sum(1 for a in _all_reduces(m, t, uplan, un)[1:] if a[0] == residual) // len(usteps)
    if sum(per_step[s[0]] for s in steps) != len(layer_ars):
        raise PerfModelError(
            f"plan '{plan}': could not attribute the {len(layer_ars)} layer all-reduces of the sync analysis to its steps"
        )

    events = [Event("compute", "embed")] + [Event("ar", blocking=b, bytes_per_row=n) for n, b in ars[:1]]
    it = iter(layer_ars)
    for name, size, mult in steps:
        schedule = lookup(name)
        # side by side (lp): both attentions, then both MLPs; otherwise one layer after another
        modules = ["attention"] * size + ["mlp"] * size if schedule.side_by_side else ["attention", "mlp"] * size
        k = per_step[name]
        saved = int(not schedule.mlp_norm)  # an MLP without a norm of its own (parallel) launches one kernel less
        if k > len(modules):
            raise PerfModelError(
                f"plan '{plan}': a {name} step has {k} all-reduces for its {len(modules)} modules; the model places at most one after each"
            )
        after = {
            round((r + 1) * len(modules) / k) - 1 for r in range(k)
        }  # k spread evenly, the last after the last module
        step: list[Event] = []
        for j, mod in enumerate(modules):
            step.append(Event("compute", mod, kernels_saved=saved if mod == "mlp" else 0))
            if j in after:
                n, b = next(it)
                step.append(Event("ar", blocking=b, bytes_per_row=n))
        events += step * mult
    events.append(Event("compute", "head"))
    events += [Event("ar", blocking=b, bytes_per_row=n) for n, b in head_ars]
    return events


def summarize(events: list[Event]) -> dict:
    ars = [e for e in events if e.kind == "ar"]
    return {
        "all_reduces": len(ars),
        "blocking_all_reduces": sum(e.blocking for e in ars),
        "overlappable_all_reduces": sum(not e.blocking for e in ars),
        "bytes_per_token": sum(e.bytes_per_row for e in ars),
    }


# ---------------------------------------------------------------------------------------------
# Composition


def step_time(
    events: list[Event],
    costs: dict[str, Module],
    hw: Hardware,
    tensor: int,
    rows: int,
    tokens_per_row: int,
    kv_len: float,
    prefill: bool = False,
) -> dict:
    """Seconds of one pass over `events` (a decode step, or a prefill with tokens_per_row > 1)."""
    tokens = rows * tokens_per_row

    @functools.cache
    def compute_time(module: str, saved: int) -> float:
        n = (
            rows if (prefill and module == "head") else tokens
        )  # the prefill runs the head on each row's last position only
        return module_time(costs[module], module, hw, n, rows, kv_len if module == "attention" else 0.0, saved)

    @functools.cache
    def ar_time(nbytes: int) -> float:
        return allreduce_time(nbytes * tokens, tensor, hw)[0]

    compute = comm = 0.0
    hide = 0.0  # compute of the next layer module after the current event (none: the head comes next)
    for e in reversed(events):
        if e.kind == "compute":
            t = compute_time(e.module, e.kernels_saved)
            compute += t
            hide = t if e.module in ("attention", "mlp") else 0.0  # the head needs the settled residual
        elif e.blocking:
            comm += ar_time(e.bytes_per_row)
        else:  # runs under the next module: only what that module does not hide, plus contention
            t = ar_time(e.bytes_per_row)
            comm += max(0.0, t - hide) + hw.overlap_contention * min(t, hide)
    return {"seconds": compute + comm, "compute": compute, "exposed_comm": comm}


def predict_one(
    m: ModelConfig, hw: Hardware, tensor: int, plan: str, batch: int, prompt: int, gen: int, events=None
) -> dict:
    """Latency and throughput of one generate call: prefill of `prompt` tokens, then `gen` tokens."""
    events = events if events is not None else decode_structure(m, tensor, plan)
    costs = module_costs(dataclasses.replace(m, plan="standard"), tensor)
    pre = step_time(events, costs, hw, tensor, batch, prompt, prompt / 2, prefill=True)
    # decode: the cache grows from prompt to prompt + gen positions; see attention_reads_allocated_cache
    dec = step_time(
        events, costs, hw, tensor, batch, 1, prompt + gen if hw.attention_reads_allocated_cache else prompt + gen / 2
    )
    total = pre["seconds"] + (gen - 1) * dec["seconds"]  # the prefill emits the first token
    weights = model.bytes_per_device(_reduced(m, "standard", 1), tensor)
    weights += (m.n_layers - 1) * (costs["attention"].weight_bytes + costs["mlp"].weight_bytes)
    cache = model.cache_bytes_per_device(m, (1, tensor), batch, prompt + gen)
    return {
        "variant": plan,
        "hardware": hw.name,
        "batch": batch,
        "tensor": tensor,
        "prefill_ms": pre["seconds"] * 1e3,
        "ms_per_token": dec["seconds"] * 1e3,
        "decode_compute_ms": dec["compute"] * 1e3,
        "decode_exposed_comm_ms": dec["exposed_comm"] * 1e3,
        "tokens_per_s": batch * gen / total,
        "memory_gib": (weights + cache) / 2**30,
        "fits": weights + cache <= hw.hbm_capacity,
        **summarize(events),
    }


def check_tensor(m: ModelConfig, hw: Hardware, tensor: int) -> None:
    if tensor < 1:
        raise PerfModelError(f"--tensor must be positive, got {tensor}")
    if tensor > hw.max_devices:
        raise PerfModelError(
            f"--tensor={tensor} exceeds the {hw.max_devices} devices hardware '{hw.name}' describes; use at most {hw.max_devices}"
        )
    if m.n_heads % tensor:
        raise PerfModelError(
            f"--tensor={tensor} does not divide model.n_heads={m.n_heads}; choose a tensor size that divides it"
        )
    validate(
        Config(model=m, mesh=MeshConfig(data=1, tensor=tensor), train=TrainConfig(seq_len=min(256, m.max_seq_len)))
    )


def predict(m: ModelConfig, hw: Hardware, tensor: int, variants, batches, prompt: int, gen: int) -> list[dict]:
    """One row per (variant, batch), with the speed-up over `standard` at the same batch."""
    check_tensor(m, hw, tensor)
    variants = list(dict.fromkeys(["standard", *variants]))
    rows = []
    for plan in variants:
        events = decode_structure(m, tensor, plan)
        rows += [predict_one(m, hw, tensor, plan, b, prompt, gen, events) for b in batches]
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == "standard"}
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base[r["batch"]]
    return rows


def tp_sweep(m: ModelConfig, hw: Hardware, variants, batch: int, prompt: int, gen: int) -> list[dict]:
    """Speed-up against tensor size at one batch, for the sizes the model allows; past the
    profile's devices the sweep continues on its `scale_out` profile (e.g. a second node)."""
    rows = []
    for t in TP_SWEEP:
        h = load_hardware(hw.scale_out) if t > hw.max_devices and hw.scale_out else hw
        try:
            check_tensor(m, h, t)
        except (PerfModelError, ConfigError):
            continue
        rows += predict(m, h, t, variants, [batch], prompt, gen)
    return rows


# ---------------------------------------------------------------------------------------------
# Output


def format_table(rows: list[dict]) -> str:
    head = f"{'variant':24s} {'batch':>5s} {'tensor':>6s} {'prefill ms':>10s} {'ms/token':>9s} {'exposed comm':>12s} {'tok/s':>9s} {'vs standard':>11s} {'ARs (block/ovl)':>15s}"
    lines = [head]
    for r in rows:
        fit = "" if r["fits"] else f"  (needs {r['memory_gib']:.0f} GiB/device: does not fit)"
        lines.append(
            f"{r['variant']:24s} {r['batch']:5d} {r['tensor']:6d} {r['prefill_ms']:10.1f} {r['ms_per_token']:9.2f} {r['decode_exposed_comm_ms']:12.2f} "
            f"{r['tokens_per_s']:9.1f} {r['speedup']:10.2f}x {r['blocking_all_reduces']:7d}/{r['overlappable_all_reduces']:<7d}{fit}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], sweep: list[dict], out: Path, title: str, published: dict | None = None) -> Path | None:
    """Speed-up over standard against batch size, and against tensor size at one batch."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for v in dict.fromkeys(r["variant"] for r in rows):
        pts = [(r["batch"], r["speedup"]) for r in rows if r["variant"] == v]
        (line,) = a.plot(*zip(*pts), "o-", label=v)
        if (published or {}).get(v) and v != "standard":
            a.plot(*zip(*published[v]), "x", color=line.get_color(), markersize=9)
        pts = [(r["tensor"], r["speedup"]) for r in sweep if r["variant"] == v]
        if pts:
            b.plot(*zip(*pts), "o-", label=v)
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:g}"))
    a.set_xlabel("batch size")
    a.set_ylabel("speed-up over standard (tokens/s)")
    a.set_title(f"tensor={rows[0]['tensor']}")
    b.set_xlabel("tensor-parallel degree")
    nodes = sorted({(r["tensor"], r["hardware"]) for r in sweep if r["hardware"] != rows[0]["hardware"]})
    b.set_title(f"batch {sweep[0]['batch']}" + "".join(f"; TP{t} on {h}" for t, h in nodes) if sweep else "")
    if published:
        a.plot([], [], "x", color="black", markersize=9, label="published (Ladder Residual)")
    # One legend for both panels, below them: inside a panel it covers the curves.
    handles, labels = a.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out)
    return out


# ---------------------------------------------------------------------------------------------
# `perfmodel predict`


def check_request(m: ModelConfig, hw: Hardware, tensor: int, variants, batches, prompt: int, gen: int) -> list[str]:
    """The variants to predict (default DEFAULT_VARIANTS), every input checked before anything compiles."""
    for name, v in (("--prompt", prompt), ("--gen", gen), *(("--batch", b) for b in batches)):
        if v < 1:
            raise PerfModelError(f"{name} must be positive, got {v}")
    check_tensor(m, hw, tensor)
    variants = list(variants or DEFAULT_VARIANTS)
    for v in variants:
        parse_plan(v, m.n_layers)
    return variants


def prediction(m: ModelConfig, hw: Hardware, tensor: int, variants, batches, prompt: int, gen: int, sweep_batch=None):
    """What `perfmodel predict` reports: the profile's constants, one row per (variant, batch), and
    with `sweep_batch` the tensor-size sweep at that batch."""
    rows = predict(m, hw, tensor, variants, batches, prompt, gen)
    return {
        "config": m.name,
        "hardware": hw.name,
        "tensor": tensor,
        "prompt": prompt,
        "gen": gen,
        "constants": {k: v for k, v in dataclasses.asdict(hw).items() if k != "source"},
        "rows": rows,
        "tp_sweep": tp_sweep(m, hw, variants, sweep_batch, prompt, gen) if sweep_batch else [],
    }


def write_prediction(result: dict, out: Path, published: dict | None = None) -> tuple[Path, Path | None]:
    """perfmodel.json and perfmodel.png (None without matplotlib) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "perfmodel.json").write_text(json.dumps(result, indent=1))
    title = f"{result['config']} on {result['hardware']} (latency model)"
    return out / "perfmodel.json", plot(result["rows"], result["tp_sweep"], out / "perfmodel.png", title, published)
