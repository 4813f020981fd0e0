"""Do a model's tensor all-reduces overlap GEMMs in training, with the layers unrolled or scanned?

    .venv-tpu/bin/python benchmarks/scan_overlap.py --target v5e-8 [--layers 4] [--batch 8] [--seq 512]
    .venv-cuda/bin/python benchmarks/scan_overlap.py --target h100-8
    .venv-tpu/bin/python benchmarks/scan_overlap.py --target v5e-8 --step train --plans standard,ladder \\
        --remat none,full --layers 3 [--fsdp 2] [--flag xla_some_flag=true] [--dump DIR] [model.attention=xla ...]

Compiles the training forward (`--step forward`: the loss of one batch, `training.loss_sums_fn`)
or the whole gradient (`--step train`: `jax.grad` of the mean loss, forward and backward) for a
deviceless GPU/TPU target, for each plan, remat policy and layer mode (unrolled, and one
`jax.lax.scan`, `train.scan_layers`), and reads the scheduled HLO the way `analysis schedule`
does: for each all-reduce over `tensor`, whether it is async and which GEMMs the scheduler put
between its start and its done. A scan body is read once (one iteration stands for all). Each
row names where JAX traced the reduction (`fwd`/`bwd`, the model's scope: `layer1`, `embed`,
`scan_layers1-3`, none for the loss) and the modules whose outputs (or gradients) it sums.
With `--fsdp` the fsdp collectives (the gathers, and their transposes, the gradients'
reduce-scatters) are counted too. Also prints the compile seconds, the other half of the choice
of a training default.
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from pathlib import Path

from ladder_jax.config import load_config
from ladder_jax.instruments import deviceless
from ladder_jax.instruments.hlo import parse_hlo
from ladder_jax.mesh import apply_xla_flags, tpu_flags


def fsdp_collectives(text: str) -> Counter:
    """The gathers and reduce-scatters (fsdp's) by form: sync (one op), or async (a start/done
    pair; a TPU async collective fusion counts once, at its start)."""
    comps, entry = parse_hlo(text)
    out: Counter = Counter()
    for ins in deviceless._linear(comps, entry):
        if ins.opcode in ("all-gather", "reduce-scatter"):
            out[f"{ins.opcode} sync"] += 1
        elif ins.opcode in ("all-gather-start", "reduce-scatter-start"):
            out[f"{ins.opcode.removesuffix('-start')} async"] += 1
        elif ins.opcode == "async-start" or ins.name.startswith("async-collective-start"):
            inner = {i.opcode for c in ins.calls for i in comps.get(c, [])}
            for op in ("all-gather", "reduce-scatter"):
                out[f"{op} async"] += op in inner
    return +out


def report(text: str, mesh, label: str, seconds: float) -> None:
    ars = [a for a in deviceless.scheduled_all_reduces(text, mesh) if a.axis == "tensor"]
    fwd = [a for a in ars if not a.backward and not a.recomputed]
    bwd = [a for a in ars if a.backward or a.recomputed]
    count = lambda xs: (
        f"{len(xs)} ({sum(a.async_ for a in xs)} async, {sum(a.overlapped for a in xs)} with GEMMs inside)"
    )  # noqa: E731
    print(
        f"\n{label}: compiled in {seconds:.1f} s; all-reduces over tensor: forward {count(fwd)}, "
        f"backward {count(bwd)}, of which {sum(a.recomputed for a in ars)} a remat's recompute"
    )
    for a in ars:
        where = a.scope or "loss"
        inside = Counter(re.sub(r"^layers\.(\d+)\.(\w+)\..*", r"L\1.\2", g) for g in a.gemms_inside)
        print(
            f"  {'bwd' if a.backward else 'rem' if a.recomputed else 'fwd'} {where:14s} {'async' if a.async_ else 'SYNC ':5s} "
            f"{a.bytes / 2**20:7.2f} MiB  sums {'+'.join(a.reduces)[:28] or '-':28s} "
            f"GEMMs inside: {len(a.gemms_inside):2d} {dict(inside) if inside else ''}"
        )
    fsdp = fsdp_collectives(text)
    if fsdp:
        print("  fsdp collectives:", dict(sorted(fsdp.items())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="v5e-8")
    ap.add_argument("--config", default="ladder-1b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="sequences (over data x fsdp)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--step", choices=("forward", "train"), default="forward")
    ap.add_argument("--plans", default="ladder", help="comma-separated model.plan values")
    ap.add_argument("--remat", default="none", help="comma-separated train.remat policies")
    ap.add_argument("--scan", default="false,true", help="comma-separated: false (unrolled), true (scanned)")
    ap.add_argument("--flag", action="append", default=[], help="an extra XLA option name=value (repeatable)")
    ap.add_argument("--dump", help="a folder to write each scheduled HLO module to")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.attention=xla")
    args = ap.parse_args()

    target = deviceless.get_target(args.target)
    deviceless.check_extra(target)
    apply_xla_flags()
    tensor = target.devices // args.fsdp
    options = tpu_flags() if target.platform == "tpu" else {}
    options.update(f.split("=", 1) for f in args.flag)
    print(
        f"{args.config} shapes, {args.layers} layers, {args.target} (fsdp={args.fsdp} x tensor={tensor}), "
        f"{args.step} of {args.batch} x {args.seq} tokens; overrides {args.overrides}, extra options {args.flag}"
    )
    for plan in args.plans.split(","):
        cfg = load_config(
            args.config,
            [
                f"model.n_layers={args.layers}",
                f"model.plan={plan}",
                f"mesh.tensor={tensor}",
                f"mesh.fsdp={args.fsdp}",
                *args.overrides,
            ],
        )
        mesh = deviceless.target_mesh(cfg, target)
        for remat in args.remat.split(","):
            for scan in (s.strip().lower() == "true" for s in args.scan.split(",")):
                start = time.perf_counter()
                text = deviceless.train_hlo(
                    cfg.model, mesh, args.batch, args.seq, remat, scan, options or None, args.step == "train"
                )
                label = f"{plan}, remat={remat}, {'scanned' if scan else 'unrolled'}"
                report(text, mesh, label, time.perf_counter() - start)
                if args.dump:
                    Path(args.dump).mkdir(parents=True, exist_ok=True)
                    name = f"{args.target}-{args.step}-{plan}-{remat}-{'scan' if scan else 'unrolled'}-f{args.fsdp}"
                    safe = re.sub(r"[^\w@:,.-]", "_", name)
                    (Path(args.dump) / f"{safe}.hlo.txt").write_text(text)


if __name__ == "__main__":
    main()
