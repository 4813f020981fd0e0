"""Sync-Point Drop tools: which blocks can lose their attention all-reduce, and repairing those that mind.

    python -m ladder_jax spd sensitivity --checkpoint RUN --tensor T [--calibration 128] [--out DIR]
    python -m ladder_jax spd apply --checkpoint RUN --sensitivity FILE (--blocks N | --max-increase F | --drop 3,5) --out NEW_RUN

`sensitivity` drops the attention sync of block L-1, then L-2 on top of it, and so on down to block
0, measuring the validation perplexity on calibration sequences each time; block i's sensitivity
is the relative perplexity increase its drop adds to the blocks after it. Two thresholds split
the blocks into insensitive (drop zero-shot), sensitive (drop, then block-to-block distillation)
and extremely sensitive (regroup heads across devices, then distil). `apply` builds the plan from
a budget, repairs the blocks and writes a new run directory that infer.py and train.py load.

Distillation uses the original model's activations: block i's input is the residual the standard
model feeds it, the teacher is the original block's output, the student the same block run as an
SPD block; only that block's parameters train (optax, the trainer's optimizer settings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from .. import checkpoint as C
from .. import model as M
from ..checkpoint import Run
from ..config import Config, ConfigError, ModelConfig
from ..errors import LadderError
from ..instruments.plots import pyplot, save_figure
from ..layers import Attention, RMSNorm, rope_frequencies, rope_tables
from ..plan import parse_plan
from ..storage import Path, path
from ..training import evaluate, make_optimizer

CLASSES = ("insensitive", "sensitive", "extremely sensitive")


class SPDError(LadderError):
    """Unusable SPD input (sensitivity file, budget, blocks); the message says what to do."""


def spd_plan(base: str, n_layers: int, blocks) -> str:
    """`base` (all standard) with the attention sync of `blocks` dropped."""
    layers = parse_plan(base, n_layers)
    if set(layers) != {"standard"}:
        raise ConfigError(f"model.plan='{base}': Sync-Point Drop starts from a standard model (every layer 'standard')")
    bad = sorted(b for b in blocks if not 0 <= b < n_layers)
    if bad:
        raise SPDError(f"block {bad[0]} does not exist in a {n_layers}-layer model; blocks are 0..{n_layers - 1}")
    return ",".join(["standard"] + [f"spd@{b}" for b in sorted(blocks)])


def check_thresholds(sensitive: float, extreme: float) -> None:
    if not 0 <= sensitive <= extreme:
        raise SPDError(f"--sensitive={sensitive} must be at least 0 and at most --extreme={extreme}")


def classify(delta: float, sensitive: float, extreme: float) -> str:
    return CLASSES[(delta >= sensitive) + (delta >= extreme)]


def fingerprint(params) -> float:
    """A number that tells one set of weights from another (sum of squares of the embedding)."""
    return float(np.sum(np.square(np.asarray(params["embed"]["table"], np.float64))))


# ---------------------------------------------------------------------------------------------
# Sensitivity


def perplexity(run: Run, plan: str, calib: list[dict], params=None) -> float:
    """Calibration perplexity of the run's (or these) parameters under `plan`."""
    model = dataclasses.replace(run.cfg.model, plan=plan)
    return evaluate(model, run.mesh, run.params if params is None else params, calib)["val_ppl"]


def sensitivity(run: Run, calib: list[dict], sensitive: float, extreme: float, log=print, measure=None) -> dict:
    """Per block, from the last backwards: the metric with and without its sync on top of the later drops.

    `measure`: (label, plan -> score, higher is better), e.g. a harness task's accuracy
    (evaluation.task_measure); a block's delta is then the absolute score drop. Default: the
    calibration perplexity, delta its relative increase."""
    label, value = measure or ("calibration ppl", lambda plan: perplexity(run, plan, calib))
    key = "ppl" if measure is None else "score"
    change = (lambda before, after: after / before - 1) if measure is None else (lambda before, after: before - after)
    n, base = run.cfg.model.n_layers, run.cfg.model.plan
    base_value = value(spd_plan(base, n, []))
    log(f"standard (every block synced): {label} {base_value:.4f}")
    blocks, without = [], base_value
    for i in reversed(range(n)):
        with_drop = value(spd_plan(base, n, range(i, n)))
        delta = change(without, with_drop)
        blocks.append({"block": i, f"{key}_without": without, f"{key}_with": with_drop, "delta": delta})
        log(f"block {i}: {label} {without:.4f} -> {with_drop:.4f} ({delta:+.2%})")
        without = with_drop
    for rank, b in enumerate(sorted(blocks, key=lambda b: b["delta"])):
        b["rank"] = rank  # 0: least sensitive
        b["class"] = classify(b["delta"], sensitive, extreme)
    blocks.sort(key=lambda b: b["block"])
    return {
        f"base_{key}": base_value,
        "metric": "perplexity" if measure is None else label,
        "thresholds": {"sensitive": sensitive, "extreme": extreme},
        "blocks": blocks,
    }


def check_sensitivity(report: dict, cfg, tensor: int, path, fp: float | None = None) -> None:
    """The sensitivity file must describe this model, these weights and this tensor degree."""
    m = cfg.model
    want = {"model": m.name, "n_layers": m.n_layers, "d_model": m.d_model}
    have = {k: report.get(k) for k in want}
    if have != want:
        raise SPDError(
            f"{path} was measured on {have} but this checkpoint is {want}; run `spd sensitivity` on this checkpoint"
        )
    if report.get("tensor") != tensor:
        raise SPDError(
            f"{path} was measured at tensor={report.get('tensor')}, this run uses tensor={tensor}; measure at the tensor degree you deploy"
        )
    if fp is not None and not math.isclose(report.get("fingerprint", -1.0), fp, rel_tol=1e-6):
        raise SPDError(
            f"{path} was measured on other weights than this checkpoint's; run `spd sensitivity` on this checkpoint"
        )


def choose_blocks(report: dict, blocks: int | None = None, max_increase: float | None = None, drop=None) -> list[int]:
    """The blocks to drop: an explicit list, the N least sensitive, or as many as fit a perplexity budget."""
    n = len(report["blocks"])
    by_rank = sorted(report["blocks"], key=lambda b: b["rank"])
    if drop is not None:
        bad = sorted(b for b in drop if not 0 <= b < n)
        if bad:
            raise SPDError(f"--drop names block {bad[0]} but the model has {n} blocks (0..{n - 1})")
        return sorted(set(drop))
    if blocks is not None:
        if not 1 <= blocks <= n:
            raise SPDError(f"--blocks={blocks}: the model has {n} blocks; give 1..{n}")
        return sorted(b["block"] for b in by_rank[:blocks])
    # Zero-shot deltas compound roughly multiplicatively; distillation only lowers them, so this errs safe.
    chosen, growth = [], 1.0
    for b in by_rank:
        if growth * (1 + b["delta"]) - 1 > max_increase:
            break
        growth *= 1 + b["delta"]
        chosen.append(b["block"])
    if not chosen:
        least = by_rank[0]
        raise SPDError(
            f"no SPD plan keeps the perplexity increase within {max_increase:.2%}: the least sensitive block ({least['block']}) "
            f"alone costs {least['delta']:+.2%}; raise --max-increase or give --blocks N"
        )
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------
# Head regrouping


def per_head_outputs(cfg, layer: dict, x: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """(H, N, D): each query head's attention output after o_proj, on the residual x (B, S, D), global view."""
    one = dataclasses.replace(cfg, plan="standard")
    attn_def, _ = nnx.split(nnx.eval_shape(lambda: Attention(one, rngs=None)), nnx.Param)
    norm_def, _ = nnx.split(nnx.eval_shape(lambda: RMSNorm(one, rngs=None)), nnx.Param)
    host = jax.device_get({"attn": layer["attn"], "attn_norm": layer["attn_norm"]})

    @jax.jit
    def run(p, x, positions, segment_ids):
        h = nnx.merge(norm_def, p["attn_norm"])(x)
        rope = rope_tables(positions, rope_frequencies(one))

        def head(hi):  # o_proj of one head only: that head's contribution to the output
            only = dict(p["attn"], o_proj=p["attn"]["o_proj"] * (jnp.arange(cfg.n_heads) == hi)[:, None, None])
            return nnx.merge(attn_def, only)(h, rope, positions, segment_ids=segment_ids)[0]

        return jax.lax.map(head, jnp.arange(cfg.n_heads))

    out = np.asarray(run(host, x, positions, segment_ids), np.float32)
    return out.reshape(cfg.n_heads, -1, cfg.d_model)


def diverse_groups(sim: np.ndarray, n_groups: int) -> list[list[int]]:
    """Split items into equal groups whose members are least alike (greedy on pairwise similarity)."""
    size = len(sim) // n_groups
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    for item in np.argsort(-sim.sum(1), kind="stable"):  # the most redundant items are placed first
        open_groups = [g for g in groups if len(g) < size]
        best = min(open_groups, key=lambda g: (sum(sim[item, j] for j in g), len(g)))
        best.append(int(item))
    return [sorted(g) for g in groups]


def _mlp_shard_error(
    cfg, layer: dict, x: np.ndarray, y_full: np.ndarray, y_parts: list[np.ndarray], tensor: int
) -> np.ndarray:
    """cost[g, d]: mean squared change of MLP shard d's output when it reads x + y_parts[g] instead of x + y_full."""

    def norm(v):
        v = v.astype(np.float64)
        return (
            v
            / np.sqrt(np.mean(v * v, -1, keepdims=True) + cfg.norm_eps)
            * np.asarray(layer["mlp_norm"]["scale"], np.float64)
        )

    gate, up, down = (np.asarray(layer["mlp"][k], np.float64) for k in ("gate_proj", "up_proj", "down_proj"))
    f = cfg.ffn_dim // tensor

    def shard(v, d):
        h = v @ gate[:, d * f : (d + 1) * f]
        return (h / (1 + np.exp(-h))) * (v @ up[:, d * f : (d + 1) * f]) @ down[d * f : (d + 1) * f]

    full = norm(x + y_full)
    parts = [norm(x + y) for y in y_parts]
    return np.array([[np.mean((shard(p, d) - shard(full, d)) ** 2) for d in range(tensor)] for p in parts])


def _best_assignment(cost: np.ndarray) -> list[int]:
    """assign[d] = group for device d minimising the summed cost (exhaustive up to 8 devices, else greedy)."""
    t = len(cost)
    if t <= 8:
        return list(min(itertools.permutations(range(t)), key=lambda p: sum(cost[p[d], d] for d in range(t))))
    assign, free = [None] * t, set(range(t))
    for g, d in sorted(itertools.product(range(t), range(t)), key=lambda gd: cost[gd]):
        if assign[d] is None and g in free:
            assign[d], _ = g, free.discard(g)
    return assign


def regroup_heads(
    cfg, layer: dict, x: np.ndarray, positions: np.ndarray, segment_ids: np.ndarray, tensor: int
) -> tuple[list[int], list[int]]:
    """(query-head permutation, kv-head permutation) that places heads which differ most on the same
    device, and each device's heads next to the MLP shard that tolerates their partial sum best.

    Only permutations that keep every query head with its own KV head are allowed, so the standard
    model's function does not change: whole KV groups move when each device holds whole groups;
    with fewer KV heads than devices, query heads move only among the devices sharing their KV head.
    """
    n_h, n_kv = cfg.n_heads, cfg.n_kv_heads
    group = n_h // n_kv
    outs = per_head_outputs(cfg, layer, x, positions, segment_ids)
    x_flat = x.reshape(-1, cfg.d_model)

    def cosine(vectors):
        v = vectors.reshape(len(vectors), -1).astype(np.float64)
        v = v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)
        return v @ v.T

    if n_kv >= tensor:  # units are KV groups; each device takes n_kv / tensor of them
        units = [list(range(k * group, (k + 1) * group)) for k in range(n_kv)]
        unit_out = np.stack([outs[u].sum(0) for u in units])
        groups = diverse_groups(cosine(unit_out), tensor)
        cost = _mlp_shard_error(cfg, layer, x_flat, outs.sum(0), [unit_out[g].sum(0) for g in groups], tensor)
        assign = _best_assignment(cost)
        perm_kv = [k for d in range(tensor) for k in groups[assign[d]]]
        perm_q = [h for k in perm_kv for h in units[k]]
        return perm_q, perm_kv
    # Fewer KV heads than devices: KV group k spans devices [k*span, (k+1)*span); regroup inside it.
    span = tensor // n_kv
    perm_q = []
    for k in range(n_kv):
        heads = list(range(k * group, (k + 1) * group))
        groups = [[heads[i] for i in g] for g in diverse_groups(cosine(outs[heads]), span)]
        cost = _mlp_shard_error(cfg, layer, x_flat, outs.sum(0), [outs[g].sum(0) for g in groups], tensor)[
            :, k * span : (k + 1) * span
        ]
        assign = _best_assignment(cost)
        perm_q += [h for d in range(span) for h in groups[assign[d]]]
    return perm_q, list(range(n_kv))


def permute_heads(layer: dict, perm_q, perm_kv) -> dict:
    """The layer with its query/KV heads reordered (q, k, v projections and the matching o_proj rows)."""
    attn = dict(layer["attn"])
    q, kv = jnp.asarray(perm_q), jnp.asarray(perm_kv)
    attn["q_proj"] = jnp.take(attn["q_proj"], q, axis=1)
    attn["k_proj"] = jnp.take(attn["k_proj"], kv, axis=1)
    attn["v_proj"] = jnp.take(attn["v_proj"], kv, axis=1)
    attn["o_proj"] = jnp.take(attn["o_proj"], q, axis=0)
    return {**layer, "attn": attn}


# ---------------------------------------------------------------------------------------------
# Block-to-block distillation


@dataclasses.dataclass
class BlockData:
    """Calibration activations of one block: inputs, the original block's outputs, positions, segments."""

    x: np.ndarray
    y: np.ndarray
    positions: np.ndarray
    segment_ids: np.ndarray

    def split(self, held_out: int) -> tuple["BlockData", "BlockData"]:
        cut = len(self.x) - held_out
        return (
            BlockData(*(a[:cut] for a in dataclasses.astuple(self))),
            BlockData(*(a[cut:] for a in dataclasses.astuple(self))),
        )


def block_data(cfg: ModelConfig, mesh: Mesh, params, batches: list[dict], layers: list[int]) -> dict[int, BlockData]:
    """Inputs and original outputs of these layers on the calibration batches (standard plan)."""
    std = dataclasses.replace(cfg, plan="standard")
    inputs_fn = M.block_inputs_fn(std, mesh, tuple(layers))
    teacher = M.block_fn(std, mesh, "standard")
    out = {i: ([], []) for i in layers}
    for b in batches:
        xs = inputs_fn(params, b["inputs"], b["positions"], b["segment_ids"])
        for j, i in enumerate(layers):
            out[i][0].append(np.asarray(xs[j]))
            out[i][1].append(np.asarray(teacher(params["layers"][i], xs[j], b["positions"], b["segment_ids"])))
    pos = np.concatenate([b["positions"] for b in batches])
    seg = np.concatenate([b["segment_ids"] for b in batches])
    return {i: BlockData(np.concatenate(xs), np.concatenate(ys), pos, seg) for i, (xs, ys) in out.items()}


def block_mse(cfg: ModelConfig, mesh: Mesh, layer: dict, data: BlockData, batch: int) -> float:
    """Mean squared difference between the SPD block's output and the original block's output."""
    student = M.block_fn(dataclasses.replace(cfg, plan="standard"), mesh, "spd")
    total = 0.0
    for a in range(0, len(data.x), batch):
        s = slice(a, a + batch)
        total += float(
            np.sum((np.asarray(student(layer, data.x[s], data.positions[s], data.segment_ids[s])) - data.y[s]) ** 2)
        )
    return total / data.y.size


def distill(cfg: Config, mesh: Mesh, layer: dict, train: BlockData, steps: int, lr: float, log=None) -> dict:
    """Train one SPD block to reproduce the original block's output (MSE); returns the new layer params."""
    student = M.block_fn(dataclasses.replace(cfg.model, plan="standard"), mesh, "spd")
    schedule = dataclasses.replace(
        cfg.train, trainable="all", lr=lr, steps=steps, warmup_steps=max(1, steps // 10), lr_schedule="cosine"
    )
    opt = make_optimizer(dataclasses.replace(cfg, train=schedule), layer)  # the trainer's AdamW, clipping, cosine

    def loss(p, x, y, pos, seg):
        return jnp.mean(jnp.square(student(p, x, pos, seg).astype(jnp.float32) - y.astype(jnp.float32)))

    @jax.jit
    def step(p, opt_state, x, y, pos, seg):
        value, grads = jax.value_and_grad(loss)(p, x, y, pos, seg)
        updates, opt_state = opt.update(grads, opt_state, p)
        return jax.tree.map(lambda a, u: a + u.astype(a.dtype), p, updates), opt_state, value

    opt_state = opt.init(layer)
    batch, n = cfg.train.batch_size, len(train.x)
    rng = np.random.default_rng(cfg.train.seed)
    for k in range(steps):
        rows = rng.choice(n, size=min(batch, n), replace=False)
        layer, opt_state, value = step(
            layer, opt_state, train.x[rows], train.y[rows], train.positions[rows], train.segment_ids[rows]
        )
        if log and (k + 1) % max(1, steps // 4) == 0:
            log(f"    step {k + 1}/{steps}: train MSE {float(value):.3e}")
    return layer


# ---------------------------------------------------------------------------------------------
# A run in; a sensitivity report, or a new run with the syncs dropped, out


def check_options(tensor: int | None = None, calibration: int | None = None) -> None:
    """Refuse a given --tensor below 2 or --calibration below 1 (None: not given), before anything loads."""
    if tensor is not None and tensor < 2:
        raise SPDError(
            f"--tensor {tensor}: SPD drops a tensor-parallel all-reduce, which exists only at 2 or more devices; "
            f"pass --tensor N>=2 (the degree you deploy at)"
        )
    if calibration is not None and calibration < 1:
        raise SPDError(f"--calibration {calibration}: give at least 1 calibration sequence (or leave it out)")


def run_tensor(checkpoint: Path, tensor: int | None, saved_tensor: int) -> int:
    """The tensor degree to measure or apply SPD at: `tensor`, else the run's own, at least 2 (at
    tensor 1 no all-reduce exists, so every SPD plan equals standard)."""
    check_options(tensor)
    if tensor is None and saved_tensor < 2:
        raise SPDError(
            f"{checkpoint} runs at mesh.tensor={saved_tensor}, where SPD equals standard (there is no all-reduce "
            f"to drop); pass --tensor N>=2 (the degree you deploy at)"
        )
    return saved_tensor if tensor is None else tensor


def open_run(checkpoint: Path, tensor: int | None, overrides=()) -> Run:
    """The standard-plan run at `tensor` (default: the run's own; at least 2) with every other device on `data`."""
    saved = C.load_run_config(checkpoint)
    C.require_shared_layout(C.load_run_config(checkpoint, overrides), "spd")
    spd_plan(saved.model.plan, saved.model.n_layers, [])
    tensor = run_tensor(checkpoint, tensor, saved.mesh.tensor)
    return C.load_run(
        checkpoint, [*overrides, f"mesh.tensor={tensor}", f"mesh.data={max(1, jax.device_count() // tensor)}"]
    )


def calibration_batches(run: Run, sequences: int) -> list[dict]:
    """At least `sequences` of the run's validation windows, in whole batches (fewer when the
    validation split is shorter): always the first ones, so equal requests give equal sequences."""
    check_options(calibration=sequences)
    return run.validation_batches(-(-sequences // run.cfg.train.batch_size))


def calibration_record(run: Run, calib: list[dict]) -> dict:
    """Which sequences `calib` is: the first `windows` validation windows of the run, in batches,
    and a digest of their tokens (equal digests: the same sequences)."""
    digest = hashlib.sha1()
    for b in calib:
        digest.update(np.ascontiguousarray(b["inputs"], np.int32).tobytes())
    return {
        "windows": sum(len(b["inputs"]) for b in calib) * jax.process_count(),
        "batches": len(calib),
        "batch_size": run.cfg.train.batch_size,
        "seq_len": run.cfg.train.seq_len,
        "tokens_sha1": digest.hexdigest(),
    }


def describe_calibration(record: dict) -> str:
    return f"the first {record['windows']} validation windows of {record['seq_len']} tokens"


def report_calibration(report: dict) -> dict | None:
    """The calibration a sensitivity file was measured on (None for files that do not say)."""
    rec = report.get("calibration")
    return rec if isinstance(rec, dict) and {"batches", "batch_size", "windows", "seq_len"} <= set(rec) else None


def compare_calibration(report: dict, used: dict, path) -> str:
    """One line saying which sequences `spd apply` measures on, and whether the sensitivity file's
    numbers were measured on the same ones."""
    recorded = report_calibration(report)
    here = f"calibration: {describe_calibration(used)}"
    if report.get("metric", "perplexity") != "perplexity":
        return f"{here}; {path} ranked the blocks by {report['metric']} (base {report['base_score']:.4f})"
    if recorded is None:
        return f"{here}; {path} does not record its calibration sequences, so its standard ppl {report.get('base_ppl', float('nan')):.4f} may be on others"
    same = recorded.get("tokens_sha1", used["tokens_sha1"]) == used["tokens_sha1"] and all(
        recorded[k] == used[k] for k in ("windows", "seq_len")
    )
    if same:
        return f"{here}, the sequences {path} was measured on (its standard ppl {report['base_ppl']:.4f})"
    return (
        f"{here}, NOT {describe_calibration(recorded)} that {path} was measured on: its standard ppl "
        f"{report['base_ppl']:.4f} and block sensitivities are on those, the perplexities below on these "
        f"(drop --calibration and train.* overrides to measure on the same)"
    )


def sensitivity_report(run: Run, calib: list[dict], sensitive: float, extreme: float, log=print, measure=None) -> dict:
    """What `spd sensitivity` writes: the model, tensor degree and weights it was measured on, and
    each block's sensitivity and class."""
    check_thresholds(sensitive, extreme)
    m = run.cfg.model
    report = {
        "checkpoint": str(run.dir),
        "model": m.name,
        "n_layers": m.n_layers,
        "d_model": m.d_model,
        "tensor": run.cfg.mesh.tensor,
        "fingerprint": fingerprint(run.params),
    }
    if calib:  # a task metric scores the task's documents, not calibration windows
        report["calibration_sequences"] = sum(len(b["inputs"]) for b in calib) * jax.process_count()
        report["calibration"] = calibration_record(run, calib)
        log(f"calibration: {describe_calibration(report['calibration'])} of {run.dir}")
    return {**report, **sensitivity(run, calib, sensitive, extreme, log, measure)}


def write_sensitivity(report: dict, out: Path) -> tuple[Path, Path | None]:
    """spd_sensitivity_t<T>.json and its bar chart in `out`; returns both paths (png None without matplotlib)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"spd_sensitivity_t{report['tensor']}.json"
    path.write_text(json.dumps(report, indent=1))
    return path, plot_sensitivity(report, path.with_suffix(".png"))


def plot_sensitivity(report: dict, out: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    blocks = report["blocks"]
    colors = {"insensitive": "tab:green", "sensitive": "tab:orange", "extremely sensitive": "tab:red"}
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(blocks) + 2), 3.5))
    ax.bar([b["block"] for b in blocks], [100 * b["delta"] for b in blocks], color=[colors[b["class"]] for b in blocks])
    # Legend entries of their own: empty bars would all draw in the default blue.
    legend = [plt.Rectangle((0, 0), 1, 1, color=c, label=name) for name, c in colors.items()]
    for value in report["thresholds"].values():
        ax.axhline(100 * value, color="gray", lw=0.8, ls="--")
    limits = " / ".join(f"{100 * v:g}%" for v in report["thresholds"].values())
    legend.append(plt.Line2D([], [], color="gray", lw=0.8, ls="--", label=f"thresholds ({limits})"))
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # blocks are whole numbers
    ax.set_xlabel("block")
    ax.set_ylabel(
        "perplexity increase (%)" if report.get("metric", "perplexity") == "perplexity" else "score drop (points)"
    )
    ax.set_title(f"{report['model']}: SPD sensitivity at tensor={report['tensor']}")
    fig.legend(handles=legend, loc="lower center", ncol=2, fontsize=8, frameon=False)  # below: bars reach any corner
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    save_figure(fig, out)
    return out


def read_sensitivity(name) -> dict:
    file = path(name)
    if not file.is_file():
        raise SPDError(f"--sensitivity {name} is not a file; run `python -m ladder_jax spd sensitivity` first")
    fix = "give the spd_sensitivity_t<T>.json that `python -m ladder_jax spd sensitivity` writes"
    try:
        report = json.loads(file.read_text())
    except UnicodeDecodeError:
        raise SPDError(f"--sensitivity {name} is not JSON (not text); {fix}") from None
    except json.JSONDecodeError as e:
        raise SPDError(f"--sensitivity {name} is not JSON ({e.msg} at line {e.lineno}); {fix}") from None
    blocks = report.get("blocks") if isinstance(report, dict) else None
    if not (
        isinstance(blocks, list)
        and blocks
        and all(isinstance(b, dict) and {"block", "rank", "delta"} <= b.keys() for b in blocks)
    ):
        raise SPDError(f"--sensitivity {name} is JSON but not a sensitivity file (no list of measured blocks); {fix}")
    return report


def apply(
    run: Run, calib: list[dict], report: dict, chosen: list[int], steps: int, lr: float, held_out: int, log=print
) -> tuple[dict, list[dict]]:
    """Drop the sync of `chosen` blocks, regrouping and distilling them by their class; returns (params, per-block log)."""
    cfg, mesh = run.cfg, run.mesh
    classes = {b["block"]: b["class"] for b in report["blocks"]}
    repair = [i for i in chosen if classes[i] != "insensitive"]
    data = block_data(cfg.model, mesh, run.params, calib, repair) if repair else {}
    params = {**run.params, "layers": dict(run.params["layers"])}
    batch, rows = cfg.train.batch_size, []
    for i in chosen:
        row = {"block": i, "class": classes[i], "regrouped": False}
        if classes[i] != "insensitive":
            d = data[i]
            layer = params["layers"][i]
            if classes[i] == "extremely sensitive":
                perm_q, perm_kv = regroup_heads(
                    cfg.model, layer, d.x[:batch], d.positions[:batch], d.segment_ids[:batch], cfg.mesh.tensor
                )
                layer = permute_heads(layer, perm_q, perm_kv)
                row.update(regrouped=True, head_order=perm_q)
            train, held = d.split(min(held_out, len(d.x) // 2))
            before = block_mse(cfg.model, mesh, params["layers"][i], held, batch)
            regrouped = block_mse(cfg.model, mesh, layer, held, batch)
            log(
                f"block {i} ({classes[i]}): held-out MSE {before:.3e}"
                + (f", after head regrouping {regrouped:.3e}" if row["regrouped"] else "")
            )
            trained = distill(cfg, mesh, layer, train, steps, lr, log)
            after = block_mse(cfg.model, mesh, trained, held, batch)
            log(f"block {i}: held-out MSE after distillation {after:.3e}")
            best = min((before, params["layers"][i]), (regrouped, layer), (after, trained), key=lambda t: t[0])
            params["layers"][i] = best[1]
            row.update(
                mse_before=before,
                mse_regrouped=regrouped,
                mse_after=after,
                kept=["original", "regrouped", "distilled"][[before, regrouped, after].index(best[0])],
            )
        rows.append(row)
    return params, rows


# ---------------------------------------------------------------------------------------------
# `spd apply`: a budget in, a new run directory out


@dataclasses.dataclass(frozen=True)
class ApplyRequest:
    """What `spd apply` will do, checked against the files alone (nothing loaded)."""

    checkpoint: Path
    sensitivity: Path
    report: dict
    tensor: int | None
    blocks: list[int]
    plan: str


def check_apply(
    checkpoint: Path, sensitivity: Path, out: Path, tensor=None, blocks=None, max_increase=None, drop=None
) -> ApplyRequest:
    """The blocks a budget (`blocks`, `max_increase` or `drop`) picks from a sensitivity file, and
    the plan they make; refuses a used `out`, a file of another model or tensor size, a bad budget."""
    C.check_new_directory(out)
    check_options(tensor)
    report = read_sensitivity(sensitivity)
    saved = C.load_run_config(checkpoint)
    tensor = report.get("tensor") if tensor is None else tensor
    if isinstance(tensor, int) and tensor < 2:
        raise SPDError(
            f"{sensitivity} was measured at tensor={tensor}, where SPD equals standard; measure again with "
            f"`spd sensitivity --tensor N>=2` (the degree you deploy at) and apply that file"
        )
    check_sensitivity(report, saved, tensor, sensitivity)
    chosen = choose_blocks(report, blocks, max_increase, drop)
    return ApplyRequest(
        checkpoint, sensitivity, report, tensor, chosen, spd_plan(saved.model.plan, saved.model.n_layers, chosen)
    )


def apply_to_new_run(
    req: ApplyRequest, out: Path, calibration=None, steps=200, lr=None, held_out=16, overrides=(), log=print
) -> None:
    """Load the run, drop the chosen blocks' sync, repair them (`apply`) and write the new run
    `out` with spd_apply.json; logs the calibration perplexities before and after."""
    recorded = report_calibration(req.report)
    # The sensitivity run's batch size (and so its sequences) unless an override says otherwise.
    batch = [f"train.batch_size={recorded['batch_size']}"] if recorded else []
    run = open_run(req.checkpoint, req.tensor, [*batch, *overrides])
    check_sensitivity(req.report, run.cfg, run.cfg.mesh.tensor, req.sensitivity, fingerprint(run.params))
    if calibration is None:
        calibration = recorded["windows"] if recorded else 128
    calib = calibration_batches(run, calibration)
    log(compare_calibration(req.report, calibration_record(run, calib), req.sensitivity))
    base_ppl, zero_shot = perplexity(run, run.cfg.model.plan, calib), perplexity(run, req.plan, calib)
    log(f"standard (every block synced): calibration ppl {base_ppl:.4f}")
    log(
        f"dropping the attention sync of blocks {req.blocks}: calibration ppl {base_ppl:.4f} -> {zero_shot:.4f} "
        f"zero-shot ({zero_shot / base_ppl - 1:+.2%})"
    )
    new, rows = apply(run, calib, req.report, req.blocks, steps, lr or run.cfg.train.lr / 10, held_out, log)
    final = perplexity(run, req.plan, calib, params=new)
    log(
        f"after repair: calibration ppl {final:.4f} ({final / base_ppl - 1:+.2%} over standard's {base_ppl:.4f}, "
        f"same sequences)"
    )
    record = {
        "source": str(req.checkpoint),
        "sensitivity": str(req.sensitivity),
        "plan": req.plan,
        "tensor": run.cfg.mesh.tensor,
        "ppl_standard": base_ppl,
        "ppl_zero_shot": zero_shot,
        "ppl_final": final,
        "calibration": calibration_record(run, calib),
        "blocks": rows,
    }
    out_cfg = dataclasses.replace(run.cfg, model=dataclasses.replace(run.cfg.model, plan=req.plan))
    C.save_run(out, out_cfg, new, req.checkpoint, ("spd_apply.json", record))
