"""Effective depth (the Layer Parallelism paper's study): shuffle, merge, prune or parallelise a
contiguous range of layers and watch validation perplexity; each transformation also writes a new run.

    python -m ladder_jax lp depth --checkpoint RUN [--transform shuffle,merge,prune,parallel] [--delta 2,4] [--seeds 5] [--start S]
    python -m ladder_jax lp transform --checkpoint RUN (--prune A:B | --merge A:B | --shuffle A:B | --parallel A:B) --out NEW

The four transformations of layers [A, B) (Δ = B - A layers):

    prune     drop them: n - Δ layers
    merge     replace each consecutive group of `group` layers (default 2: pairs (A, A+1), (A+2, A+3), ...)
              by one layer whose every weight, norms included, is the group's mean: n - Δ + Δ/group layers
    shuffle   run them in another order (`order`: the range's original indices in their new order): n layers
    parallel  the `lp` plan on the range: pairs side by side, weights unchanged: n layers

They are functions of a config and its parameters (`apply`), so they serve outside the study: the
new model is a new run directory (`checkpoint.save_run`) that `infer.py --checkpoint` and `train.py
--init-from` load. A layer keeps its schedule when it moves (the plan is rebuilt from the
per-layer schedules that remain); ranges that cut into an `lp` pair are refused, merging needs one
schedule per group, and `parallel` cannot pair a `parallel`-schedule layer (it has one norm).

The study evaluates every transformation for each Δ on the run's validation windows with the one
evaluator (`training.evaluate`), the range in the middle of the network (start (n - Δ) // 2) unless
a start is given; shuffle is the mean over several distinct random orders of the range.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from .. import checkpoint as C
from .. import model as M
from ..checkpoint import Run
from ..config import Config, ConfigError, ModelConfig, replace
from ..instruments.plots import pyplot, save_figure
from ..plan import lookup, parse_plan
from ..storage import Path, path
from ..training import evaluate

TRANSFORMS = ("shuffle", "merge", "prune", "parallel")


class DepthError(ConfigError):
    """A transformation that cannot apply to this model (bad range, order, group); the message says what to give."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """One transformation of layers [start, end). `order` (shuffle): the range's original layer
    indices in their new order. `group` (merge): layers averaged into one."""

    kind: str
    start: int
    end: int
    order: tuple[int, ...] = ()
    group: int = 2

    @property
    def delta(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        extra = {"shuffle": f" order {','.join(map(str, self.order))}", "merge": f" in groups of {self.group}"}
        return f"{self.kind} layers {self.start}..{self.end - 1}{extra.get(self.kind, '')}"


def parse_range(text: str, n_layers: int, flag: str) -> tuple[int, int]:
    """'4:8' -> (4, 8): Python-style, negative indices from the end, an empty end is the last layer."""
    a, sep, b = text.partition(":")
    try:
        start = int(a) if a.strip() else 0
        end = int(b) if b.strip() else n_layers
    except ValueError:
        start = end = None
    if not sep or start is None:
        raise DepthError(f"{flag} {text!r}: give a layer range START:END such as 2:4 (END excluded)")
    start, end = (i + n_layers if i < 0 else i for i in (start, end))
    if not 0 <= start < end <= n_layers:
        raise DepthError(f"{flag} {text}: layers outside 0..{n_layers - 1} of this {n_layers}-layer model, or empty")
    return start, end


def parse_order(text: str, start: int, end: int) -> tuple[int, ...]:
    """'5,4,3,2' -> (5, 4, 3, 2), which must be a permutation of range(start, end)."""
    try:
        order = tuple(int(x) for x in text.split(","))
    except ValueError:
        order = ()
    if sorted(order) != list(range(start, end)):
        raise DepthError(
            f"--order {text}: give each layer of {start}..{end - 1} once, comma-separated, in the new order"
        )
    return order


def default_schedule(plan: str) -> str:
    """The schedule a plan gives every layer no range names (its bare segment, else standard)."""
    return next((seg.strip() for seg in plan.split(",") if seg.strip() and "@" not in seg), "standard")


def encode_plan(schedules: tuple[str, ...] | list[str], prefer: str | None = None) -> str:
    """A plan string (`plan.parse_plan` grammar) for per-layer schedules: `prefer` as the default
    schedule when some layer still has it, else the most common one; ranges for the rest."""
    schedules = list(schedules)
    counts = {s: schedules.count(s) for s in schedules}
    base = prefer if prefer in counts else max(counts, key=counts.get)
    n, segments, i = len(schedules), [base], 0
    while i < n:
        j = i
        while j < n and schedules[j] == schedules[i]:
            j += 1
        if schedules[i] != base:
            segments.append(f"{schedules[i]}@{i}" if j == i + 1 else f"{schedules[i]}@{i}:{j if j < n else ''}")
        i = j
    plan = ",".join(segments)
    assert parse_plan(plan, n) == tuple(schedules), (plan, schedules)
    return plan


def recipe(t: Transform, n_layers: int) -> list[tuple[int, ...]]:
    """For each layer of the transformed model, the original layers whose mean it is."""
    before, after = [(i,) for i in range(t.start)], [(i,) for i in range(t.end, n_layers)]
    if t.kind == "prune":
        middle = []
    elif t.kind == "shuffle":
        middle = [(i,) for i in t.order]
    elif t.kind == "merge":
        middle = [tuple(range(i, i + t.group)) for i in range(t.start, t.end, t.group)]
    else:  # parallel keeps every layer where it is
        middle = [(i,) for i in range(t.start, t.end)]
    return before + middle + after


def transformed_config(t: Transform, m: ModelConfig) -> ModelConfig:
    """The model config after `t`, or a DepthError saying why `t` cannot apply. Needs no parameters:
    commands call it before anything loads."""
    n, schedules = m.n_layers, m.layer_schedules
    if t.kind not in TRANSFORMS:
        raise DepthError(f"unknown transformation '{t.kind}'; choose from {', '.join(TRANSFORMS)}")
    if not 0 <= t.start < t.end <= n:
        raise DepthError(f"{t.kind}: layers {t.start}..{t.end - 1} are outside 0..{n - 1} of this {n}-layer model")
    grouped = [i for i in range(t.start, t.end) if lookup(schedules[i]).layers_per_step > 1]
    if grouped:
        name = schedules[grouped[0]]
        raise DepthError(
            f"{t.kind} {t.start}:{t.end}: layer {grouped[0]} is already in a step of several {name} layers "
            f"(model.plan={m.plan}); transform the standard model, or a range without {name} layers"
        )
    if t.kind == "prune" and t.delta >= n:
        raise DepthError(f"prune {t.start}:{t.end} would remove all {n} layers; keep at least one")
    if t.kind == "shuffle" and sorted(t.order) != list(range(t.start, t.end)):
        raise DepthError(f"shuffle: order {t.order} is not a permutation of layers {t.start}..{t.end - 1}")
    if t.kind == "merge" and (t.group < 2 or t.delta % t.group):
        raise DepthError(
            f"merge {t.start}:{t.end}: {t.delta} layers do not split into groups of {t.group}; "
            f"give a range whose length is a multiple of the group (at least 2)"
        )
    if t.kind == "parallel":
        if t.delta % 2:
            raise DepthError(
                f"parallel {t.start}:{t.end}: {t.delta} layers; lp pairs consecutive layers, give an even range"
            )
        one_norm = [i for i in range(t.start, t.end) if not lookup(schedules[i]).mlp_norm]
        if one_norm:
            raise DepthError(
                f"parallel {t.start}:{t.end}: layer {one_norm[0]} is a '{schedules[one_norm[0]]}' (one-norm) layer; "
                f"lp pairs need two norms"
            )
        new = list(schedules)
        new[t.start : t.end] = ["lp"] * t.delta
        return dataclasses.replace(m, plan=encode_plan(new, default_schedule(m.plan)))
    new = []
    for group in recipe(t, n):
        kinds = {schedules[i] for i in group}
        if len(kinds) > 1:
            raise DepthError(
                f"merge: layers {group} have different schedules ({', '.join(sorted(kinds))}); merge layers of one schedule"
            )
        new.append(kinds.pop())
    return dataclasses.replace(m, n_layers=len(new), plan=encode_plan(new, default_schedule(m.plan)))


def _mean(layers: list[dict]) -> dict:
    if len(layers) == 1:
        return layers[0]
    return jax.tree.map(lambda *xs: (sum(x.astype(jnp.float32) for x in xs) / len(xs)).astype(xs[0].dtype), *layers)


def apply(t: Transform, m: ModelConfig, params: dict, mesh=None) -> tuple[ModelConfig, dict]:
    """(config, parameters) of the transformed model. Pruned and shuffled layers are the original
    arrays (no copy); merged layers are new arrays, averaged in float32 and stored in the original
    dtype. With `mesh`, the result is placed with the new model's shardings."""
    new_cfg = transformed_config(t, m)
    if t.kind == "parallel":
        return new_cfg, params
    layers = params["layers"]
    new_layers = {k: _mean([layers[i] for i in group]) for k, group in enumerate(recipe(t, m.n_layers))}
    new = {**params, "layers": new_layers}
    if mesh is not None:
        new = jax.device_put(new, M.param_shardings(new_cfg, mesh))
    return new_cfg, new


def transformed_run_config(cfg: Config, t: Transform) -> Config:
    """The run config of the transformed model. `train.trainable` goes back to 'all': a selection
    of layers (or lp_pairs) named the original model's layers."""
    model = transformed_config(t, cfg.model)
    return replace(cfg, model={"n_layers": model.n_layers, "plan": model.plan}, train={"trainable": "all"})


# ---------------------------------------------------------------------------------------------
# The study


def default_deltas(n_layers: int) -> list[int]:
    return list(range(2, n_layers + 1, 2))


def parse_deltas(text: str | None, n_layers: int, transforms) -> list[int]:
    if text is None:
        return default_deltas(n_layers)
    try:
        deltas = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise DepthError(f"--delta {text}: give range lengths such as 2,4,6") from None
    bad = [d for d in deltas if not 1 <= d <= n_layers]
    if bad:
        raise DepthError(f"--delta {bad[0]}: a range length must be between 1 and the model's {n_layers} layers")
    odd = [d for d in deltas if d % 2]
    pairwise = [k for k in transforms if k in ("merge", "parallel")]
    if odd and pairwise:
        raise DepthError(
            f"--delta {odd[0]} is odd, but {' and '.join(pairwise)} work on pairs of layers; give even Δ or drop them from --transform"
        )
    return deltas


def parse_transforms(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in TRANSFORMS]
    if bad or not kinds:
        raise DepthError(f"--transform {text!r}: choose from {','.join(TRANSFORMS)}")
    return list(dict.fromkeys(kinds))


def placement(n_layers: int, delta: int, start: int | None) -> tuple[int, int]:
    """The range of length Δ: from `start`, or in the middle of the network."""
    s = (n_layers - delta) // 2 if start is None else start
    if not 0 <= s <= n_layers - delta:
        raise DepthError(
            f"--start {start}: a range of {delta} layers from layer {s} does not fit the model's {n_layers} layers"
        )
    return s, s + delta


def shuffle_orders(start: int, end: int, count: int, seed: int) -> list[tuple[int, ...]]:
    """`count` distinct random orders of the range, none the original (fewer when the range has fewer)."""
    delta = end - start
    possible = math.factorial(delta) - 1
    rng = np.random.default_rng([seed, start, delta])
    orders: list[tuple[int, ...]] = []
    identity = tuple(range(start, end))
    while len(orders) < min(count, possible):
        order = tuple(int(i) for i in start + rng.permutation(delta))
        if order != identity and order not in orders:
            orders.append(order)
    return orders


def plan_study(
    m: ModelConfig, transforms, deltas, seeds: int, start: int | None, seed: int = 0
) -> list[tuple[str, int, list[Transform], str | None]]:
    """(transformation, Δ, the Transforms to evaluate, why it is skipped or None) for each cell of
    the study; every Transform is checked against the config (nothing loaded)."""
    cells = []
    for delta in deltas:
        s, e = placement(m.n_layers, delta, start)
        for kind in transforms:
            if kind == "prune" and delta >= m.n_layers:
                cells.append((kind, delta, [], f"pruning {delta} of {m.n_layers} layers leaves none"))
                continue
            if kind == "shuffle":
                ts = [Transform("shuffle", s, e, order) for order in shuffle_orders(s, e, seeds, seed)]
            else:
                ts = [Transform(kind, s, e)]
            if not ts:
                cells.append((kind, delta, [], "a single layer has no other order"))
                continue
            for t in ts:
                transformed_config(t, m)
            cells.append((kind, delta, ts, None))
    return cells


def study(run: Run, val: list[dict], cells, log=print) -> dict:
    """Validation perplexity of the original model and of every cell of `plan_study`."""
    m = run.cfg.model
    base = evaluate(m, run.mesh, run.params, val)["val_ppl"]
    log(f"original ({m.n_layers} layers, {m.plan}): val ppl {base:.4f}")
    rows = []
    for kind, delta, ts, skipped in cells:
        if skipped:
            log(f"{kind} Δ={delta}: skipped ({skipped})")
            rows.append({"transform": kind, "delta": delta, "skipped": skipped, "val_ppl": None})
            continue
        ppls = []
        for t in ts:
            cfg, params = apply(t, m, run.params, run.mesh)
            ppls.append(evaluate(cfg, run.mesh, params, val)["val_ppl"])
        value = float(np.mean(ppls))
        row = {
            "transform": kind,
            "delta": delta,
            "start": ts[0].start,
            "end": ts[0].end,
            "n_layers": cfg.n_layers,
            "plan": cfg.plan,
            "val_ppl": value,
            "ppl_increase": value / base - 1,
        }
        if kind == "shuffle":
            row.update(orders=[list(t.order) for t in ts], ppls=ppls, ppl_min=min(ppls), ppl_max=max(ppls))
        if kind == "merge":
            row["group"] = ts[0].group
        rows.append(row)
        k = len(ppls)
        spread = f" (mean of {k} order{'s' * (k > 1)}, {min(ppls):.3f}..{max(ppls):.3f})" if kind == "shuffle" else ""
        log(
            f"{kind} Δ={delta} (layers {ts[0].start}..{ts[0].end - 1}): val ppl {value:.4f} ({value / base - 1:+.1%}){spread}"
        )
    return {"base_ppl": base, "rows": rows}


STYLE = {"shuffle": "o-", "merge": "s-", "prune": "v-", "parallel": "D-"}


def plot(result: dict, out: Path, title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["transform"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["transform"] == kind and r["val_ppl"] is not None]
        if not rows:
            continue
        x, y = [r["delta"] for r in rows], [r["val_ppl"] for r in rows]
        line = ax.plot(x, y, STYLE.get(kind, "o-"), label=kind)[0]
        if kind == "shuffle":
            ax.fill_between(
                x, [r["ppl_min"] for r in rows], [r["ppl_max"] for r in rows], color=line.get_color(), alpha=0.2
            )
    ax.axhline(result["base_ppl"], color="gray", ls="--", lw=1, label="original")
    ax.set_xticks(sorted({r["delta"] for r in result["rows"]}))
    ax.set_yscale("log")
    ax.set_xlabel("Δ (layers transformed)")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)
    return out


def write_report(out: Path, run: Run, result: dict, settings: dict) -> tuple[Path, Path | None]:
    """lp_depth.json (settings, original perplexity, rows) and lp_depth.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    m = run.cfg.model
    report = {
        "checkpoint": str(run.dir),
        "model": m.name,
        "n_layers": m.n_layers,
        "plan": m.plan,
        "mesh": dict(run.mesh.shape),
        "date": datetime.date.today().isoformat(),
        **settings,
        **result,
    }
    path = out / "lp_depth.json"
    path.write_text(json.dumps(report, indent=1))
    where = "centred" if settings.get("start") is None else f"from layer {settings['start']}"
    return path, plot(report, out / "lp_depth.png", f"{m.name} ({m.n_layers} layers): effective depth, ranges {where}")


def make_transform(
    kind: str, range_text: str, n_layers: int, order: str | None = None, seed: int = 0, group: int = 2
) -> Transform:
    """The Transform a command line names: `--prune 4:8`, `--shuffle 2:6 [--order 5,4,3,2 | --seed 1]`, ..."""
    start, end = parse_range(range_text, n_layers, f"--{kind}")
    if order is not None and kind != "shuffle":
        raise DepthError(f"--order goes with --shuffle, not --{kind}")
    if group != 2 and kind != "merge":
        raise DepthError(f"--group goes with --merge, not --{kind}")
    if kind != "shuffle":
        return Transform(kind, start, end, group=group)
    if order is not None:
        return Transform(kind, start, end, parse_order(order, start, end))
    orders = shuffle_orders(start, end, 1, seed)
    if not orders:
        raise DepthError(f"--shuffle {range_text}: a single layer has no other order; give a longer range")
    return Transform(kind, start, end, orders[0])


def format_table(result: dict) -> str:
    """Δ down, transformations across: validation perplexity and its increase over the original."""
    kinds = list(dict.fromkeys(r["transform"] for r in result["rows"]))
    cells = {(r["transform"], r["delta"]): r for r in result["rows"]}
    lines = [f"{'Δ':>3s} {'layers':>8s} " + " ".join(f"{k:>18s}" for k in kinds)]
    lines.append(f"{0:3d} {'-':>8s} " + " ".join(f"{result['base_ppl']:18.3f}" for _ in kinds))
    for delta in sorted({r["delta"] for r in result["rows"]}):
        shown = [cells.get((k, delta)) for k in kinds]
        where = next((f"{r['start']}..{r['end'] - 1}" for r in shown if r and r["val_ppl"] is not None), "-")
        text = [
            "n/a" if r is None or r["val_ppl"] is None else f"{r['val_ppl']:.3f} ({r['ppl_increase']:+.1%})"
            for r in shown
        ]
        lines.append(f"{delta:3d} {where:>8s} " + " ".join(f"{x:>18s}" for x in text))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `lp depth` and `lp transform` on a run directory: checked from its config, then loaded


@dataclasses.dataclass(frozen=True)
class StudyRequest:
    """The study `lp depth` will run, checked against the run's config (nothing loaded)."""

    checkpoint: Path
    overrides: tuple[str, ...]
    settings: dict  # transforms, deltas, seeds, seed, start
    cells: list


def check_study(
    checkpoint: Path, overrides, transforms: str, deltas: str | None, seeds: int, start, seed
) -> StudyRequest:
    """Every range, order and Δ of the study, checked against the saved config."""
    cfg = C.load_run_config(checkpoint, overrides)
    C.require_shared_layout(cfg, "lp depth")
    kinds = parse_transforms(transforms)
    lengths = parse_deltas(deltas, cfg.model.n_layers, kinds)
    if seeds < 1:
        raise DepthError(f"--seeds {seeds}: give at least one shuffle order")
    cells = plan_study(cfg.model, kinds, lengths, seeds, start, seed)
    settings = {"transforms": kinds, "deltas": lengths, "seeds": seeds, "seed": seed, "start": start}
    return StudyRequest(path(checkpoint), tuple(overrides), settings, cells)


def study_run(req: StudyRequest, out: Path) -> tuple[dict, Path, Path | None]:
    """Load the run, evaluate every cell on its validation windows, write lp_depth.json/png to
    `out`; returns (the study, the JSON path, the PNG path or None)."""
    run = C.load_run(req.checkpoint, req.overrides)
    val = run.validation_batches()
    result = study(run, val, req.cells)
    windows = sum(len(b["inputs"]) for b in val)
    settings = {**req.settings, "eval_windows": windows, "seq_len": run.cfg.train.seq_len}
    return (result, *write_report(out, run, result, settings))


def check_transform(checkpoint: Path, out: Path, kind: str, range_text: str, order, seed, group, overrides=()):
    """(the run's config, the Transform a command line names), checked against that config and
    `out` (a new directory) before anything loads."""
    C.check_new_directory(out)
    cfg = C.load_run_config(checkpoint, overrides)
    C.require_shared_layout(cfg, "lp transform")
    t = make_transform(kind, range_text, cfg.model.n_layers, order, seed, group)
    transformed_run_config(cfg, t)
    return cfg, t


def transform_to_new_run(checkpoint: Path, t: Transform, out: Path, overrides=()) -> ModelConfig:
    """Load the run, transform it and write the new run `out` with lp_transform.json; returns
    the new model config."""
    run = C.load_run(checkpoint, overrides)
    model_cfg, params = apply(t, run.cfg.model, run.params, run.mesh)
    record = {
        "source": str(checkpoint),
        "transform": dataclasses.asdict(t),
        "layers": [list(g) for g in recipe(t, run.cfg.model.n_layers)],
        "n_layers": model_cfg.n_layers,
        "plan": model_cfg.plan,
    }
    C.save_run(out, transformed_run_config(run.cfg, t), params, checkpoint, ("lp_transform.json", record))
    return model_cfg
