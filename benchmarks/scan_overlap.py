"""Does a ladder all-reduce still overlap the next module when the layers are scanned?

    .venv-tpu/bin/python benchmarks/scan_overlap.py --target v5e-8 [--layers 4] [--batch 8] [--seq 512]
    .venv-cuda/bin/python benchmarks/scan_overlap.py --target h100-8

Compiles the training forward (the loss of one batch, `training.loss_sums_fn`) of a ladder model
for a deviceless GPU/TPU target twice, with the layers unrolled and as one `jax.lax.scan`
(`train.scan_layers`), and reads the scheduled HLO the way `analysis schedule` does: for each
all-reduce over `tensor`, whether it is async and which GEMMs the scheduler put between its start
and its done. A scan body is read once (one iteration stands for all). Also prints the compile
seconds of both, the other half of the choice of a training default.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from ladder_jax.config import load_config
from ladder_jax.instruments import deviceless
from ladder_jax.mesh import apply_xla_flags, tpu_flags
from ladder_jax.model import abstract_params, param_shardings
from ladder_jax.training import BATCH_KEYS, loss_sums_fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="v5e-8")
    ap.add_argument("--config", default="ladder-1b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="sequences (over data x fsdp)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--fsdp", type=int, default=1)
    args = ap.parse_args()

    target = deviceless.get_target(args.target)
    deviceless.check_extra(target)
    apply_xla_flags()
    tensor = target.devices // args.fsdp
    cfg = load_config(
        args.config,
        [f"model.n_layers={args.layers}", "model.plan=ladder", f"mesh.tensor={tensor}", f"mesh.fsdp={args.fsdp}"],
    )
    mesh = deviceless.target_mesh(cfg, target)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_params(cfg.model),
        param_shardings(cfg.model, mesh),
    )
    batch = {k: jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32) for k in BATCH_KEYS}
    batch["mask"] = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.float32)
    options = tpu_flags() if target.platform == "tpu" else None
    print(
        f"{cfg.model.name}, {args.layers} ladder layers, {args.target} (fsdp={args.fsdp} x tensor={tensor}), "
        f"forward of {args.batch} x {args.seq} tokens"
    )
    for scan in (False, True):
        start = time.perf_counter()
        text = jax.jit(loss_sums_fn(cfg.model, mesh, "none", scan)).lower(params, batch).compile(options).as_text()
        seconds = time.perf_counter() - start
        ars = [a for a in deviceless.scheduled_all_reduces(text, mesh) if a.axis == "tensor"]
        overlapped = sum(a.overlapped for a in ars)
        print(
            f"\nscan={scan}: compiled in {seconds:.1f} s; {len(ars)} all-reduces over tensor in the program text "
            f"(a scan body counted once), {sum(a.async_ for a in ars)} async, {overlapped} with GEMMs inside"
        )
        for a in ars:
            print(
                f"  {a.name[:40]:40s} {'async' if a.async_ else 'sync ':5s} {'+'.join(a.reduces)[:30]:30s} "
                f"GEMMs inside: {len(a.gemms_inside)}"
            )


if __name__ == "__main__":
    main()
