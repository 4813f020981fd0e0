"""Layer Parallelism tools: how much perplexity does pairing layers cost, and where?

    python -m ladder_jax lp sweep --checkpoint RUN [--max-delta D] [--budget 0.05] [--out DIR] [key=value ...]

For Δ = 2, 4, 6, ... paired layers it finds the contiguous range where validation perplexity
grows least (every start when the model has at most 16 layers, else by growing the best range
two layers at a time), measures greedy-decode agreement with the original model on a fixed set
of prompts, writes `lp_sweep.json` and `lp_sweep.png`, and suggests the largest Δ within the
perplexity budget together with the fine-tuning command (`train.trainable=lp_pairs`).
"""

from __future__ import annotations

import dataclasses
import json

from .. import checkpoint as C
from ..checkpoint import Run
from ..config import ConfigError
from ..decode import generate
from ..instruments.plots import pyplot, save_figure
from ..plan import parse_plan
from ..storage import Path
from ..training import evaluate


def lp_plan(base: str, n_layers: int, start: int, end: int) -> str:
    """`base` everywhere but layers [start, end), which run as LP pairs."""
    layers = parse_plan(base, n_layers)
    if len(set(layers)) != 1:
        raise ConfigError(
            f"model.plan='{base}' mixes schedules; LP sweeps start from a single-schedule model such as 'standard'"
        )
    plan = f"{layers[0]},lp@{start}:{end}"
    parse_plan(plan, n_layers)
    return plan


class Evaluator:
    """Validation perplexity and greedy continuations of one run's parameters under any plan."""

    def __init__(self, run: Run, val_batches, prompts=(), gen_tokens: int = 0, measure=None):
        """`measure`: (label, plan -> score, higher is better), e.g. a harness task's accuracy
        (evaluation.task_measure), to rank ranges by instead of validation perplexity."""
        self.run, self.cfg = run, run.cfg
        self.val, self.prompts, self.gen_tokens = val_batches, list(prompts), gen_tokens
        self.measure = measure

    def with_plan(self, plan: str):
        return dataclasses.replace(self.cfg.model, plan=plan)

    def perplexity(self, plan: str) -> float:
        return evaluate(self.with_plan(plan), self.run.mesh, self.run.params, self.val)["val_ppl"]

    def cost(self, plan: str, base: float | None = None) -> tuple[float, float]:
        """(the plan's value, its cost against `base`): perplexity and its relative increase, or a
        task score and its absolute drop. Lower cost is better."""
        if self.measure is None:
            value = self.perplexity(plan)
            return value, (value / base - 1 if base else 0.0)
        value = self.measure[1](plan)
        return value, (base - value if base is not None else 0.0)

    def continuations(self, plan: str) -> list[list[int]]:
        return list(
            generate(
                self.with_plan(plan), self.run.mesh, self.run.params, self.prompts, self.gen_tokens, eos_id=None
            ).tokens
        )


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of generated positions where two greedy continuations give the same token."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(max(len(ra), len(rb)) for ra, rb in zip(a, b))
    return same / max(total, 1)


def sweep(ev: Evaluator, max_delta: int, search: str = "auto", log=print) -> list[dict]:
    """Rows per Δ: the best range, its value (`val_ppl`, or `score` with a task measure), its
    `cost` against the original (relative perplexity increase, or absolute score drop) and the
    greedy agreement."""
    n = ev.cfg.model.n_layers
    base = ev.cfg.model.plan
    key, label = ("val_ppl", "val ppl") if ev.measure is None else ("score", ev.measure[0])
    base_value, _ = ev.cost(base)
    base_tokens = ev.continuations(base)
    log(f"original ({base}): {label} {base_value:.3f}")
    exhaustive = search == "exhaustive" or (search == "auto" and n <= 16)
    cache: dict[tuple[int, int], tuple[float, float]] = {}

    def cost(start, end):
        if (start, end) not in cache:
            cache[(start, end)] = ev.cost(lp_plan(base, n, start, end), base_value)
        return cache[(start, end)]

    rows = [{"delta": 0, "start": None, "end": None, "plan": base, key: base_value, "cost": 0.0, "agreement": 1.0}]
    best = None
    for delta in range(2, max_delta + 1, 2):
        if exhaustive or best is None:
            candidates = [(s, s + delta) for s in range(0, n - delta + 1)]
        else:  # grow the previous best range by one pair, left or right
            s, e = best
            candidates = [(a, b) for a, b in ((s - 2, e), (s, e + 2)) if a >= 0 and b <= n]
        best = min(candidates, key=lambda c: cost(*c)[1])
        plan = lp_plan(base, n, *best)
        value, c = cost(*best)
        agree = agreement(base_tokens, ev.continuations(plan))
        rows.append(
            {"delta": delta, "start": best[0], "end": best[1], "plan": plan, key: value, "cost": c, "agreement": agree}
        )
        log(
            f"Δ={delta}: layers {best[0]}..{best[1] - 1} paired, {label} {value:.3f} ({c:+.1%}), greedy agreement {agree:.1%}"
        )
    if ev.measure is None:
        for r in rows:
            r["ppl_increase"] = r["cost"]
    return rows


def suggest(rows: list[dict], budget: float) -> dict:
    ok = [r for r in rows if r["cost"] <= budget]
    return max(ok, key=lambda r: r["delta"])


def plot(rows: list[dict], out: Path, title: str) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    key, label = ("val_ppl", "validation perplexity") if "val_ppl" in rows[0] else ("score", "task score")
    ax.plot([r["delta"] for r in rows], [r[key] for r in rows], "o-", label=label)
    ax.set_xticks([r["delta"] for r in rows])  # only even Δ exist
    ax.set_xlabel("Δ (layers paired)")
    ax.set_ylabel(label)
    ax2 = ax.twinx()
    ax2.plot(
        [r["delta"] for r in rows], [r["agreement"] for r in rows], "s--", color="tab:orange", label="greedy agreement"
    )
    ax2.set_ylabel("greedy agreement with the original")
    ax2.set_ylim(-0.03, 1.03)
    ax.set_title(title)
    # Below the axes: inside them it covers one curve or the other, wherever it goes.
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, out)
    return out


def check_max_delta(max_delta: int | None, n_layers: int) -> int:
    if max_delta is None:  # only None is unset: --max-delta 0 is refused like any other bad value
        max_delta = n_layers - n_layers % 2
    if max_delta % 2 or not 2 <= max_delta <= n_layers:
        raise ConfigError(f"--max-delta={max_delta} must be even and between 2 and the model's {n_layers} layers")
    return max_delta


def write_report(
    out: Path, checkpoint, budget: float, rows: list[dict], model_name: str
) -> tuple[dict, Path, Path | None]:
    """lp_sweep.json (rows and the suggested Δ) and lp_sweep.png in `out`; returns (suggestion, json, png)."""
    pick = suggest(rows, budget)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "lp_sweep.json"
    path.write_text(
        json.dumps({"checkpoint": str(checkpoint), "budget": budget, "rows": rows, "suggested": pick}, indent=1)
    )
    return pick, path, plot(rows, out / "lp_sweep.png", f"{model_name}: Layer Parallelism")


# ---------------------------------------------------------------------------------------------
# `lp sweep` on a run directory


def check_sweep(checkpoint: Path, overrides, max_delta: int | None, budget: float = 0.0):
    """(the run's config, the largest Δ), checked against the saved config before anything loads."""
    if budget < 0:  # Δ=0 costs 0: a negative budget would leave no row to suggest
        raise ConfigError(f"--budget {budget} is negative; give the cost you accept as a fraction >= 0 (e.g. 0.05)")
    cfg = C.load_run_config(checkpoint, overrides)
    C.require_shared_layout(cfg, "lp sweep")
    max_delta = check_max_delta(max_delta, cfg.model.n_layers)
    lp_plan(cfg.model.plan, cfg.model.n_layers, 0, 2)
    return cfg, max_delta


def sweep_run(run: Run, max_delta: int, search: str, prompts: int, gen_tokens: int, measure=None) -> list[dict]:
    """The sweep on the run's validation windows; the first 32 tokens of the first `prompts`
    windows prompt the agreement check."""
    val = run.validation_batches()
    firsts = [[int(t) for t in b["inputs"][r][:32]] for b in val for r in range(len(b["inputs"]))][:prompts]
    return sweep(Evaluator(run, val, firsts, gen_tokens, measure), max_delta, search)
