"""Per-token decode time at an early and a late position of the same KV cache allocation: the
decode attention reads keys up to each row's position (`attention.decode_attention`), so a step
at position 64 of a 1024-slot cache should cost less than one at position 960. For comparison the
same step with attention over the whole allocated cache, masked (what decoding did before).

    python benchmarks/decode_positions.py                       # tiny, 1024 slots, batch 1
    python benchmarks/decode_positions.py --positions 64,512,960 --batch 4 model.n_layers=12

Median of --runs timings of --steps steps each; prints the load average first (a ratio taken
on a busy machine is not a result).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ladder_jax import attention, decode
from ladder_jax import model as M
from ladder_jax.config import load_config
from ladder_jax.mesh import force_cpu_devices, make_mesh


def whole_cache_attention(q, cache_k, cache_v, positions, dtype, block=None):
    """Attention of each row's new token over all cache slots, masked past its position."""
    hd = q.shape[-1]
    s = jnp.einsum("bkgd,btkd->bkgt", q[:, 0].astype(jnp.float32), cache_k.astype(jnp.float32)) / math.sqrt(hd)
    s = jnp.where((jnp.arange(cache_k.shape[1])[None] <= positions[:, None])[:, None, None], s, -jnp.inf)
    return jnp.einsum("bkgt,btkd->bkgd", jax.nn.softmax(s, axis=-1), cache_v.astype(jnp.float32)).astype(dtype)[:, None]


def time_steps(cfg, mesh, params, batch, cache_len, position, steps, runs) -> float:
    """Median seconds per decode step with every row at `position` (the step is re-run there)."""
    step = decode.step_fn(cfg, mesh)
    _, per_row, _, cache_abs = decode.abstract_step_args(cfg, mesh, batch, cache_len)
    cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), cache_abs)
    tokens = jax.device_put(np.ones(batch, np.int32), per_row.sharding)
    pos = jax.device_put(np.full(batch, position, np.int32), per_row.sharding)
    tokens, _, cache = step(params, tokens, pos, cache)  # compile and warm up
    jax.block_until_ready(tokens)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(steps):
            tokens, _, cache = step(params, tokens, pos, cache)
            tokens.block_until_ready()
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--cache-len", type=int, default=1024)
    ap.add_argument("--positions", default="64,960")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    force_cpu_devices(1)
    load = os.getloadavg()
    print(
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
        + ("  (busy machine: ratios unreliable)" * (load[0] > 0.5))
    )
    cfg = load_config(
        args.config, [f"model.max_seq_len={args.cache_len}", "mesh.data=1", "mesh.tensor=1", *args.overrides]
    )
    mesh = make_mesh(cfg)
    params = M.init_params(cfg.model, mesh, 0)
    positions = [int(p) for p in args.positions.split(",")]
    print(
        f"{cfg.model.name}: {cfg.model.n_layers} layers, d_model {cfg.model.d_model}, batch {args.batch}, "
        f"{args.cache_len}-slot cache, jax {jax.__version__}, {jax.devices()[0].device_kind}"
    )
    print(f"{'attention':22s}" + "".join(f"{f'pos {p} (ms)':>14s}" for p in positions))
    bounded = attention.decode_attention
    for label, fn in (("up to the position", bounded), ("whole cache, masked", whole_cache_attention)):
        attention.decode_attention = fn  # layers call it through the module
        decode.step_fn.cache_clear()
        ms = [
            1e3 * time_steps(cfg.model, mesh, params, args.batch, args.cache_len, p, args.steps, args.runs)
            for p in positions
        ]
        print(f"{label:22s}" + "".join(f"{m:14.3f}" for m in ms))
    attention.decode_attention = bounded


if __name__ == "__main__":
    main()
