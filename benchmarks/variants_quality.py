"""Does the architecture train as well as standard? Train `tiny` models of several plans on the
default corpus with the same data order, seed and step budget; report each final validation loss,
the ratios to standard, and one loss-curve PNG.

    python benchmarks/variants_quality.py [--steps 300] [--plans standard ladder parallel] \
        [--devices 1] [--out benchmarks/variants] [key=value ...]

Schedules whose function depends on the tensor degree (spd, track:D) need a tensor axis to be
what they are: e.g. `--devices 4 mesh.tensor=4` (4 fake CPU devices).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--plans", nargs="+", default=["standard", "ladder", "parallel"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/variants"))
    ap.add_argument("--devices", type=int, default=1, help="fake CPU devices (1: fastest on a small CPU)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from ladder_jax.mesh import force_cpu_devices

    force_cpu_devices(args.devices)
    from ladder_jax.config import load_config
    from ladder_jax.instruments.plots import plot_runs
    from ladder_jax.training import train

    rows, runs = {}, []
    for plan in args.plans:
        over = [
            f"model.plan={plan}",
            f"train.steps={args.steps}",
            f"train.eval_every={max(args.steps // 6, 1)}",
            "train.eval_batches=16",
            *args.overrides,
        ]
        cfg = load_config("tiny", over)
        run = args.out / plan.replace(":", "-").replace(",", "_").replace("@", "at")
        t0 = time.perf_counter()
        result = train(cfg, run, progress=True)
        rows[plan] = {
            "val_loss": result["val_loss"],
            "val_ppl": result["val_ppl"],
            "train_loss": result["loss"],
            "minutes": (time.perf_counter() - t0) / 60,
        }
        runs.append(run)
    base = rows.get("standard", {}).get("val_loss")
    print(f"\n{'plan':10s} {'val loss':>9s} {'val ppl':>8s} {'vs standard':>12s} {'minutes':>8s}")
    for plan, r in rows.items():
        r["ratio_to_standard"] = r["val_loss"] / base if base else None
        ratio = f"{r['ratio_to_standard']:.4f}" if base else "-"
        print(f"{plan:10s} {r['val_loss']:9.4f} {r['val_ppl']:8.3f} {ratio:>12s} {r['minutes']:8.1f}")
    png = plot_runs(runs, args.out / "loss.png", labels=list(rows))
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "steps": args.steps,
                "devices": args.devices,
                "overrides": args.overrides,
                "load_average": os.getloadavg(),
                "results": rows,
            },
            indent=1,
        )
    )
    print(f"curves: {png}")


if __name__ == "__main__":
    main()
