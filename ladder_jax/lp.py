"""Layer Parallelism tools: how much perplexity does pairing layers cost, and where?

    python -m ladder_jax.lp sweep --checkpoint RUN [--max-delta D] [--budget 0.05] [--out DIR] [key=value ...]

For Δ = 2, 4, 6, ... paired layers it finds the contiguous range where validation perplexity
grows least (every start when the model has at most 16 layers, else by growing the best range
two layers at a time), measures greedy-decode agreement with the original model on a fixed set
of prompts, writes `lp_sweep.json` and `lp_sweep.png`, and suggests the largest Δ within the
perplexity budget together with the fine-tuning command (`train.trainable=lp_pairs`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from .config import ConfigError, parse_plan


def lp_plan(base: str, n_layers: int, start: int, end: int) -> str:
    """`base` everywhere but layers [start, end), which run as LP pairs."""
    layers = parse_plan(base, n_layers)
    if len(set(layers)) != 1:
        raise ConfigError(f"model.plan='{base}' mixes schedules; LP sweeps start from a single-schedule model such as 'standard'")
    plan = f"{layers[0]},lp@{start}:{end}"
    parse_plan(plan, n_layers)
    return plan


class Evaluator:
    """Validation perplexity and greedy continuations of one set of parameters under any plan."""

    def __init__(self, cfg, mesh, params, val_batches, prompts, gen_tokens: int):
        self.cfg, self.mesh, self.params = cfg, mesh, params
        self.val, self.prompts, self.gen_tokens = val_batches, prompts, gen_tokens

    def with_plan(self, plan: str):
        return dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, plan=plan))

    def perplexity(self, plan: str) -> float:
        import jax
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from .training import loss_sums_fn

        cfg = self.with_plan(plan)
        fn = jax.jit(loss_sums_fn(cfg.model, self.mesh))
        rows = NamedSharding(self.mesh, P("data", None))
        nll = count = 0.0
        for b in self.val:
            s, c = fn(self.params, {k: jax.device_put(v, rows) for k, v in b.items()})
            nll, count = nll + float(s), count + float(c)
        return math.exp(nll / count)

    def continuations(self, plan: str) -> list[list[int]]:
        from .decode import generate

        cfg = self.with_plan(plan)
        return list(generate(cfg, self.mesh, self.params, self.prompts, self.gen_tokens, eos_id=None).tokens)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of generated positions where two greedy continuations give the same token."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    total = sum(max(len(ra), len(rb)) for ra, rb in zip(a, b))
    return same / max(total, 1)


def sweep(ev: Evaluator, max_delta: int, search: str = "auto", log=print) -> list[dict]:
    n = ev.cfg.model.n_layers
    base = ev.cfg.model.plan
    base_ppl = ev.perplexity(base)
    base_tokens = ev.continuations(base)
    log(f"original ({base}): val ppl {base_ppl:.3f}")
    exhaustive = search == "exhaustive" or (search == "auto" and n <= 16)
    cache: dict[tuple[int, int], float] = {}

    def ppl(start, end):
        if (start, end) not in cache:
            cache[(start, end)] = ev.perplexity(lp_plan(base, n, start, end))
        return cache[(start, end)]

    rows = [{"delta": 0, "start": None, "end": None, "plan": base, "val_ppl": base_ppl, "ppl_increase": 0.0, "agreement": 1.0}]
    best = None
    for delta in range(2, max_delta + 1, 2):
        if exhaustive or best is None:
            candidates = [(s, s + delta) for s in range(0, n - delta + 1)]
        else:  # grow the previous best range by one pair, left or right
            s, e = best
            candidates = [(a, b) for a, b in ((s - 2, e), (s, e + 2)) if a >= 0 and b <= n]
        best = min(candidates, key=lambda c: ppl(*c))
        plan = lp_plan(base, n, *best)
        value = ppl(*best)
        agree = agreement(base_tokens, ev.continuations(plan))
        rows.append({"delta": delta, "start": best[0], "end": best[1], "plan": plan, "val_ppl": value, "ppl_increase": value / base_ppl - 1, "agreement": agree})
        log(f"Δ={delta}: layers {best[0]}..{best[1] - 1} paired, val ppl {value:.3f} ({value / base_ppl - 1:+.1%}), greedy agreement {agree:.1%}")
    return rows


def suggest(rows: list[dict], budget: float) -> dict:
    ok = [r for r in rows if r["ppl_increase"] <= budget]
    return max(ok, key=lambda r: r["delta"])


def plot(rows: list[dict], out: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["delta"] for r in rows], [r["val_ppl"] for r in rows], "o-", label="validation perplexity")
    ax.set_xlabel("Δ (layers paired)")
    ax.set_ylabel("perplexity")
    ax2 = ax.twinx()
    ax2.plot([r["delta"] for r in rows], [r["agreement"] for r in rows], "s--", color="tab:orange", label="greedy agreement")
    ax2.set_ylabel("greedy agreement with the original")
    ax.set_title(title)
    fig.legend(loc="center left", bbox_to_anchor=(0.13, 0.55), fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ladder_jax.lp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sw = sub.add_parser("sweep", help="perplexity and greedy agreement against the number of paired layers")
    sw.add_argument("--checkpoint", required=True, help="a run directory (trained or converted)")
    sw.add_argument("overrides", nargs="*", help="key=value, e.g. mesh.tensor=2 train.eval_batches=16")
    sw.add_argument("--max-delta", type=int, help="largest number of paired layers (even; default: all)")
    sw.add_argument("--budget", type=float, default=0.05, help="allowed relative perplexity increase for the suggestion (default 0.05)")
    sw.add_argument("--search", choices=("auto", "exhaustive", "greedy"), default="auto")
    sw.add_argument("--prompts", type=int, default=4, help="validation windows whose first 32 tokens prompt the agreement check")
    sw.add_argument("--gen-tokens", type=int, default=32)
    sw.add_argument("--out", type=Path, help="where lp_sweep.json/png go (default: the checkpoint directory)")
    sw.add_argument("--cpu-devices", type=int, default=8)
    args = ap.parse_args(argv)

    from .checkpoint import CheckpointError, load_config
    from .config import load_config as load_yaml
    from .data import DataError, build_datasets, val_batches
    from .mesh import init_runtime

    try:
        cfg = load_yaml(Path(args.checkpoint) / "config.yaml", args.overrides) if args.overrides else load_config(args.checkpoint)
        n = cfg.model.n_layers
        max_delta = args.max_delta or n - n % 2
        if max_delta % 2 or not 2 <= max_delta <= n:
            raise ConfigError(f"--max-delta={max_delta} must be even and between 2 and the model's {n} layers")
        lp_plan(cfg.model.plan, n, 0, 2)
        init_runtime(args.cpu_devices)
        from .checkpoint import restore_params
        from .mesh import make_mesh
        from .tokenizer import get_tokenizer

        mesh = make_mesh(cfg)
        params = restore_params(args.checkpoint, cfg, mesh)
        data = build_datasets(cfg.train, get_tokenizer(cfg, args.checkpoint))
        val = val_batches(data.val, cfg.train.batch_size, cfg.train.eval_batches)
        if not val:
            raise DataError("the run's validation split is smaller than one batch; lower train.batch_size or raise train.val_fraction")
        prompts = [[int(t) for t in data.val[i]["inputs"][:32]] for i in range(min(args.prompts, len(data.val)))]
    except (ConfigError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ev = Evaluator(cfg, mesh, params, val, prompts, args.gen_tokens)
    rows = sweep(ev, max_delta, args.search)
    pick = suggest(rows, args.budget)
    out = args.out or Path(args.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lp_sweep.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "budget": args.budget, "rows": rows, "suggested": pick}, indent=1))
    png = plot(rows, out / "lp_sweep.png", f"{cfg.model.name}: Layer Parallelism")
    print(f"wrote {out / 'lp_sweep.json'}" + (f" and {png}" if png else ""))
    if pick["delta"] == 0:
        print(f"no pairing stays within +{args.budget:.0%} perplexity")
    else:
        print(f"suggested: Δ={pick['delta']} (model.plan={pick['plan']}), val ppl {pick['val_ppl']:.3f} ({pick['ppl_increase']:+.1%})")
        print(f"fine-tune the pairs: python train.py --init-from {args.checkpoint} --config {Path(args.checkpoint) / 'config.yaml'} "
              f"'model.plan={pick['plan']}' train.trainable=lp_pairs train.steps=100")
    return 0


if __name__ == "__main__":
    sys.exit(main())
