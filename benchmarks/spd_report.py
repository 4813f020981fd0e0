"""Sync-Point Drop on a trained model: validation perplexity against the number of dropped blocks.

    python benchmarks/spd_report.py --checkpoint RUN [--tensor 4 8] [--steps 200] [--out docs]

For each tensor degree: measures block sensitivity on the calibration set (the first 128
validation sequences, as `spd sensitivity` does, or reuses its JSON), repairs every block once
(head regrouping for extremely sensitive ones, then block-to-block distillation), and for
N = 0..L drops the N least sensitive blocks' syncs, reporting perplexity on validation sequences
*after* the calibration ones: zero-shot, the SPD method (only sensitive and extremely sensitive
blocks repaired) and every dropped block distilled. Writes spd_report.json and spd_report.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ladder_jax.instruments.plots import pyplot
from ladder_jax.mesh import force_cpu_devices
from ladder_jax.methods import spd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--tensor", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument(
        "--eval", type=int, default=128, help="validation sequences after the calibration ones to report on"
    )
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--sensitivity-dir", type=Path, help="reuse spd_sensitivity_t<T>.json from here")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args()

    force_cpu_devices(max(args.tensor))
    results = {
        "checkpoint": str(args.checkpoint),
        "date": time.strftime("%Y-%m-%d"),
        "machine": "CPU, fake devices",
        "tensor": {},
    }
    for t in args.tensor:
        run = spd.open_run(args.checkpoint, t)
        cfg, params = run.cfg, run.params
        b = cfg.train.batch_size
        n_cal = -(-args.calibration // b)
        every = run.validation_batches(n_cal + -(-args.eval // b))
        calib, held = every[:n_cal], every[n_cal:]
        sens_file = args.sensitivity_dir and args.sensitivity_dir / f"spd_sensitivity_t{t}.json"
        if sens_file and sens_file.exists():
            report = json.loads(sens_file.read_text())
        else:
            report = spd.sensitivity(run, calib, 0.005, 0.05)
        lr = args.lr or cfg.train.lr / 10
        # Repair every block once; each repair only depends on the original model's activations.
        every_block = dict(
            report,
            blocks=[
                dict(b, **{"class": "sensitive" if b["class"] == "insensitive" else b["class"]})
                for b in report["blocks"]
            ],
        )
        n = cfg.model.n_layers
        repaired, log = spd.apply(run, calib, every_block, list(range(n)), args.steps, lr, held_out=16)
        order = [b["block"] for b in sorted(report["blocks"], key=lambda b: b["rank"])]
        classes = {b["block"]: b["class"] for b in report["blocks"]}
        rows = []
        for k in range(n + 1):
            chosen = sorted(order[:k])
            plan = spd.spd_plan(cfg.model.plan, n, chosen)
            method = {
                **params,
                "layers": {
                    i: repaired["layers"][i] if i in chosen and classes[i] != "insensitive" else params["layers"][i]
                    for i in range(n)
                },
            }
            distilled = {
                **params,
                "layers": {i: repaired["layers"][i] if i in chosen else params["layers"][i] for i in range(n)},
            }
            row = {
                "dropped": k,
                "blocks": chosen,
                "zero_shot": spd.perplexity(run, plan, held),
                "spd_method": spd.perplexity(run, plan, held, params=method),
                "all_distilled": spd.perplexity(run, plan, held, params=distilled),
            }
            rows.append(row)
            print(
                f"tensor={t} dropped={k} {chosen}: zero-shot {row['zero_shot']:.4f}, SPD {row['spd_method']:.4f}, all distilled {row['all_distilled']:.4f}",
                flush=True,
            )
        results["tensor"][t] = {"sensitivity": report["blocks"], "repairs": log, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spd_report.json").write_text(json.dumps(results, indent=1))
    drawn = plot(results, args.out / "spd_report.png")
    print(f"wrote {args.out / 'spd_report.json'}" + (f" and {args.out / 'spd_report.png'}" if drawn else ""))


def plot(results: dict, out: Path) -> bool:
    plt = pyplot()
    if plt is None:
        print("matplotlib missing: no plot (pip install -e '.[plot]')")
        return False
    fig, axes = plt.subplots(1, len(results["tensor"]), figsize=(5 * len(results["tensor"]), 3.8), squeeze=False)
    for ax, (t, r) in zip(axes[0], results["tensor"].items()):
        k = [row["dropped"] for row in r["rows"]]
        for key, label, style, extra in (
            # Hollow and larger: where no block needed repair, zero-shot and SPD are the same points.
            ("zero_shot", "zero-shot", "o-", {"markersize": 9, "markerfacecolor": "none"}),
            ("spd_method", "SPD (sensitive blocks repaired)", "s-", {}),
            ("all_distilled", "every dropped block distilled", "^--", {}),
        ):
            ax.plot(k, [row[key] for row in r["rows"]], style, label=label, **extra)
        ax.set_title(f"tensor = {t}")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))  # whole blocks only
        ax.set_xlabel("blocks without attention sync")
        ax.set_ylabel("validation perplexity")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
