"""The two layouts of a Layer Parallelism pair side by side (model.lp_layout): shared (both layers
of a pair split over the whole tensor axis, the default) and split (the LP paper's: layer i on the
first half of the axis, layer i+1 on the second). For one decode step of the same model and plan:

  - all-reduces over `tensor` and how many block (CPU compile, `analysis sync`);
  - kernels per device in the whole step, and how many are GEMMs (a deviceless XLA:GPU or XLA:TPU
    compile for --target, as `analysis schedule` makes; skipped without --target); only the pairs
    differ between the layouts, so the difference over the number of pairs is per pair;
  - bytes per device: parameters, the pairs' parameters, the KV cache.

    python benchmarks/lp_layouts.py --config llama-3.1-8b --plan 'standard,lp@2:6' model.n_layers=8 \\
        --tensor 8 [--target h100-8] [--batch 1] [--cache-len 1024] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--plan", default="standard,lp@2:4")
    ap.add_argument("--tensor", type=int, default=8)
    ap.add_argument("--target", help="h100-8, a100-8, v5e-8, ...: also compile for it, deviceless")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache-len", type=int, default=1024)
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from ladder_jax.mesh import force_cpu_devices

    force_cpu_devices(args.tensor)
    import jax

    from ladder_jax import model as M
    from ladder_jax.config import load_config
    from ladder_jax.instruments import deviceless, sync
    from ladder_jax.mesh import apply_xla_flags, make_mesh
    from ladder_jax.plan import plan_steps

    over = [*args.overrides, f"model.plan={args.plan}", f"mesh.tensor={args.tensor}", "mesh.data=1"]
    base = load_config(args.config, over)
    pairs = [layers for name, layers in plan_steps(base.model.layer_schedules) if name == "lp"]
    if not pairs:
        raise SystemExit(f"--plan {args.plan} pairs no layers; give an lp range such as standard,lp@2:6")
    target = None
    if args.target:
        target = deviceless.get_target(args.target)
        deviceless.check_extra(target)
        apply_xla_flags()
    cache_len = min(args.cache_len, base.model.max_seq_len)
    layouts = {name: dataclasses.replace(base.model, lp_layout=name) for name in ("shared", "split")}
    kernels = {}
    if target is not None:  # first: the target's compile-only devices must come before JAX's CPU backend starts
        tcfg = load_config(args.config, [*over[:-1], "mesh.data=-1"])
        tmesh = deviceless.target_mesh(tcfg, target)
        for layout, cfg in layouts.items():
            text = deviceless.decode_step_hlo(cfg, tmesh, args.batch * tmesh.shape["data"], cache_len)
            counts = deviceless.kernel_counts(text)
            kernels[layout] = {
                "kernels_per_step": counts["kernels"],
                "gemm_kernels_per_step": sum(counts["gemms"].values()),
            }
    rows = []
    for layout, cfg in layouts.items():
        mesh = make_mesh(base, jax.devices()[: args.tensor])
        (r,) = sync.sync_rows(cfg, mesh, [args.plan], batch=args.batch)
        pair_keys = [("layers", i) for pair in pairs for i in pair]
        params = M.abstract_params(cfg)
        specs = M.param_specs(cfg, args.tensor)
        pair_bytes = 0
        for key in pair_keys:
            for x, spec in zip(jax.tree.leaves(params[key[0]][key[1]]), jax.tree.leaves(specs[key[0]][key[1]])):
                split = args.tensor if "tensor" in tuple(spec) else 1
                pair_bytes += x.size // split * x.dtype.itemsize
        row = {
            "layout": layout,
            "all_reduces": r["all_reduces"],
            "blocking": r["blocking_all_reduces"],
            "bytes_per_token": r["bytes_per_token"],
            "param_bytes_per_device": M.bytes_per_device(cfg, args.tensor),
            "pair_param_bytes_per_device": pair_bytes // len(pairs),
            "kv_cache_bytes_per_device": M.cache_bytes_per_device(cfg, (1, args.tensor), args.batch, cache_len),
        }
        rows.append({**row, **kernels.get(layout, {})})
    m = base.model
    where = f"; kernels from a deviceless {target.name} compile" if target else ""
    print(
        f"{m.name}, {m.n_layers} layers, plan {args.plan} ({len(pairs)} pairs), tensor {args.tensor}, "
        f"one decode step, batch {args.batch}, KV cache {cache_len}{where}"
    )
    cols = ["all_reduces", "blocking", "bytes_per_token", "param_bytes_per_device", "pair_param_bytes_per_device"]
    cols += ["kv_cache_bytes_per_device"] + (["kernels_per_step", "gemm_kernels_per_step"] if target else [])
    print(f"{'':28s}" + "".join(f"{r['layout']:>16s}" for r in rows))
    for c in cols:
        print(f"{c:28s}" + "".join(f"{r[c]:16,d}" for r in rows))
    if target:
        fewer = [(rows[0][c] - rows[1][c]) / len(pairs) for c in ("kernels_per_step", "gemm_kernels_per_step")]
        print(f"split runs {fewer[0]:g} fewer kernels ({fewer[1]:g} of them GEMMs) per pair and device")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"config": m.name, "plan": args.plan, "tensor": args.tensor, "target": args.target, "rows": rows},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
