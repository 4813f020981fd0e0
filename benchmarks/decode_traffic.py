"""The bytes a compiled decode step moves to and from device memory, against the floor (no device).

    python benchmarks/decode_traffic.py --target v5e-8 [--tensor 8] [--batch 1 16] [--layers 2 4] \
        [--variants standard ladder] [--cache-len 1024] [--config llama-3.1-8b] [--json out.json]

Compiles the real decode step (`decode.step_fn`) deviceless for --target (XLA:TPU needs
`ladder_jax[tpu]`, XLA:GPU `ladder_jax[cuda]`; one compiler per process), with two layer counts,
and reports per variant and batch (rows per device):

- XLA's own `cost_analysis()["bytes accessed"]` (None on XLA:GPU deviceless);
- what the scheduled HLO moves to and from HBM (`traffic.hbm_traffic`: on-chip buffers and the
  slices a kernel reads accounted for; the decode attention's loop run for every key block), and
  the on-chip operand bytes XLA's figure includes;
- the floor (`traffic.floor_bytes`: the device's weights once, the KV cache up to the position);
- the same per layer (the difference of the two layer counts: the embedding and head cancel);
- kernels per step (fusions, library calls, collectives: what a runtime without CUDA graphs
  launches per token; a loop's body counted once);
- loops whose trip count XLA does not know (XLA:GPU's runtime fetches their condition to the host
  at every iteration).

The 8B's layers are what matters per layer, and a deviceless compile of all 32 is CPU-heavy: the
default compiles 2 and 4 layers; `--layers 2 32` gives the whole model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def compile_step(m, mesh, batch: int, cache_len: int):
    from ladder_jax import decode

    args = decode.abstract_step_args(m, mesh, batch, cache_len)
    return decode.step_fn(m, mesh).lower(*args).compile()


def xla_bytes(compiled) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) and cost else cost
    return (cost or {}).get("bytes accessed")


def measure(m, mesh, batch: int, cache_len: int) -> dict:
    """One compile: XLA's bytes, the HLO's HBM traffic, the floor and the kernels of a step of
    `batch` rows per device over a full `cache_len` cache."""
    from ladder_jax.instruments.deviceless import step_traffic

    data = mesh.devices.size // mesh.shape["tensor"]
    start = time.perf_counter()
    compiled = compile_step(m, mesh, batch * data, cache_len)
    seconds = time.perf_counter() - start
    return {
        "xla_bytes_accessed": xla_bytes(compiled),
        **step_traffic(m, mesh, compiled.as_text(), batch, cache_len),
        "compile_s": round(seconds, 1),
    }


def per_layer(whole: dict, small: dict, layers: int) -> dict:
    """The figures of one layer: the difference of two layer counts over the layers between."""
    diff = lambda k: None if whole[k] is None else (whole[k] - small[k]) / layers  # noqa: E731
    keys = ("xla_bytes_accessed", "hbm_bytes", "on_chip_operand_bytes", "floor_bytes", "kernels")
    out = {k: diff(k) for k in keys}
    return {**out, "hbm_over_floor": out["hbm_bytes"] / out["floor_bytes"]}


def rows(cfg, mesh, variants, batches, layers, cache_len: int) -> list[dict]:
    out = []
    l1, l2 = layers
    for plan in variants:
        for b in batches:
            at = {n: measure(dataclasses.replace(cfg.model, n_layers=n, plan=plan), mesh, b, cache_len) for n in layers}
            whole = at[l2]
            xla = whole["xla_bytes_accessed"]
            out.append(
                {
                    "variant": plan,
                    "batch": b,
                    "layers": l2,
                    **whole,
                    "xla_over_floor": None if xla is None else xla / whole["floor_bytes"],
                    "per_layer": per_layer(whole, at[l1], l2 - l1),
                }
            )
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def table(result: dict) -> str:
    mib = lambda x: "—" if x is None else f"{x / 2**20:.1f}"  # noqa: E731
    lines = [
        f"{result['config']} on {result['target']} (tensor {result['tensor']}), cache {result['cache_len']}, "
        f"{result['layers'][1]} layers (per layer: {result['layers'][1]} minus {result['layers'][0]}); MiB per device per step",
        "",
        "| variant | batch | XLA bytes | HBM (HLO) | floor | HBM/floor | XLA/floor | kernels | host-synced loops | per layer: XLA | HBM | on-chip | floor | HBM/floor |",
        "|" + " --- |" * 14,
    ]
    for r in result["rows"]:
        p = r["per_layer"]
        xla_ratio = "—" if r["xla_over_floor"] is None else f"{r['xla_over_floor']:.2f}"
        lines.append(
            f"| {r['variant']} | {r['batch']} | {mib(r['xla_bytes_accessed'])} | {mib(r['hbm_bytes'])} | "
            f"{mib(r['floor_bytes'])} | {r['hbm_over_floor']:.3f} | {xla_ratio} | {r['kernels']} | {r['host_synced_loops']} | "
            f"{mib(p['xla_bytes_accessed'])} | {mib(p['hbm_bytes'])} | {mib(p['on_chip_operand_bytes'])} | "
            f"{mib(p['floor_bytes'])} | {p['hbm_over_floor']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="a deviceless target: v5e-8, h100-8, ...")
    ap.add_argument("--tensor", type=int, default=8, help="tensor degree (1: one device of the target)")
    ap.add_argument("--config", default="llama-3.1-8b")
    ap.add_argument("--variants", nargs="+", default=["standard", "ladder"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="rows per device")
    ap.add_argument("--layers", type=int, nargs=2, default=[2, 4], metavar=("L1", "L2"))
    ap.add_argument("--cache-len", type=int, default=1024)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from ladder_jax.config import load_config
    from ladder_jax.errors import LadderError
    from ladder_jax.instruments import deviceless
    from ladder_jax.mesh import apply_xla_flags, make_mesh

    try:
        target = deviceless.get_target(args.target)
        deviceless.check_extra(target)
        apply_xla_flags()  # before the compiler plugin loads, as `analysis schedule` does
        cfg = load_config(args.config, [f"mesh.tensor={args.tensor}", "mesh.data=1"])
        devices = deviceless.target_devices(target)[: args.tensor]  # one data shard: the per-device figure
        mesh = make_mesh(cfg, devices)
    except LadderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {
        "config": args.config,
        "target": args.target,
        "tensor": args.tensor,
        "cache_len": args.cache_len,
        "layers": args.layers,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows(cfg, mesh, args.variants, args.batch, args.layers, args.cache_len),
    }
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
