"""What the serving engine's decode step pays for each of its draws (`decode.SAMPLERS`: greedy,
temperature only, top-k/top-p cuts), compiled deviceless for one device of --target: HBM bytes
per step read from the scheduled HLO (`instruments.traffic.hbm_traffic`), kernels (fusions and
custom calls) and the compile's seconds. The step is `decode.paged_step_fn` with the engine's
log-probabilities, --batch rows over page tables of --width pages of 16 positions.

    python benchmarks/sampler_cost.py --target h100-8 [--config llama-3.2-1b] [--batch 16] [--width 12]

Needs the target's compiler: `pip install 'jax[cuda12]'` (h100-8, a100-8) or `'jax[tpu]'`
(v5e-8, ...) in its own virtualenv (README, "Deviceless compiles").
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="a deviceless target: h100-8, v5e-8, ...")
    ap.add_argument("--config", default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=16, help="rows of the decode step")
    ap.add_argument("--width", type=int, default=12, help="pages of 16 positions per row")
    args = ap.parse_args(argv)

    from ladder_jax.config import load_config
    from ladder_jax.errors import LadderError
    from ladder_jax.instruments import deviceless
    from ladder_jax.mesh import apply_xla_flags, make_mesh

    try:
        target = deviceless.get_target(args.target)
        deviceless.check_extra(target)
        apply_xla_flags()  # before the compiler plugin loads, as `analysis schedule` does
        cfg = load_config(args.config, ["mesh.tensor=1", "mesh.data=1"])
        mesh = make_mesh(cfg, deviceless.target_devices(target)[:1])
    except LadderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from ladder_jax import decode
    from ladder_jax.engine import MAX_LOGPROBS
    from ladder_jax.instruments.traffic import hbm_traffic

    m = cfg.model
    step_args = decode.abstract_paged_step_args(m, mesh, args.batch, args.batch * args.width, 16, args.width)
    print(f"{args.config}, {args.batch} rows x {args.width} pages of 16, one device of {args.target}\n")
    print("| target (one device) | draw | HBM MiB per step | kernels | compile s |\n| --- | --- | --- | --- | --- |")
    for sampler in decode.SAMPLERS:
        start = time.perf_counter()
        text = decode.paged_step_fn(m, mesh, MAX_LOGPROBS, sampler).lower(*step_args).compile().as_text()
        seconds = time.perf_counter() - start
        mib = hbm_traffic(text)["total"] / 2**20
        kernels = deviceless.kernel_counts(text)["kernels"]
        print(f"| {args.target} | {sampler} | {mib:.1f} | {kernels} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
