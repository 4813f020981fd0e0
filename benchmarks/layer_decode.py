"""One device's share of a decode step, measured, against what the latency model assumes of it.

    python benchmarks/layer_decode.py --config llama-2-70b --tensor 8 --hardware h100-nvlink \
        --batch 1 2 4 8 16 32 64 --cache-len 1536 [--layers 2 6] [--runs 20] [--json out.json]

The latency model (`ladder_jax.instruments.perf.cost`) composes a TP decode step from per-module costs on one device (weight and
KV-cache bytes over achieved HBM bandwidth, FLOPs over the matmul rate, a fixed cost per kernel).
This measures those costs on the device at hand: it builds the model one device of a `--tensor`
mesh computes (heads, KV heads and FFN columns divided by the tensor degree; the same local shapes
our shard_map runs), times our real decode step (`decode.step_fn`, KV cache of `--cache-len`
positions) with two layer counts, and takes the difference per layer, so embedding, LM head and
dispatch cancel. It reports per batch:

- measured ms per layer, and the bytes one layer must read (its weight shard + the KV cache
  positions it attends over, once per KV head as our attention reads them);
- achieved bandwidth = those bytes / time, and its share of the profile's spec bandwidth;
- the latency model's time for the same layer on the profile (`cost.module_time` of attention
  + MLP, with the profile's fitted efficiency and kernel cost, and GQA-aware attention as ours);
- a plain read of a large array (`jnp.sum`), the bandwidth this device reaches without any model.

On a CPU it runs too (use `--config tiny`), but the comparison is only meaningful on the hardware
the profile describes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def shard_config(m, tensor: int, n_layers: int):
    """The model one device of a tensor axis computes: its heads, KV heads and FFN columns."""
    kv = max(1, m.n_kv_heads // tensor)  # fewer KV heads than devices: each device uses one (replicated)
    return dataclasses.replace(
        m,
        n_layers=n_layers,
        n_heads=m.n_heads // tensor,
        n_kv_heads=kv,
        head_dim=m.hd,
        ffn_dim=m.ffn_dim // tensor,
        plan="standard",
    )


def time_steps(
    cfg,
    mesh,
    batch: int,
    cache_len: int,
    runs: int,
    warmup: int,
    position: int | None = None,
    params=None,
    reads: str | None = None,
    queued: bool = False,
) -> float:
    """Median seconds of one decode step of `cfg` (tensor=1) at `batch` rows over a `cache_len` cache,
    every row at `position` (default mid-cache), each step's token read before the next is sent.
    `params`: the model's, else random ones; `reads`: what the decode attention reads
    (`attention.decode_reads`; None: the platform's). `queued`: the `runs` steps sent back to back
    and read once at the end, their mean: the host's dispatch hidden behind the device's work."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    from ladder_jax import attention, decode
    from ladder_jax import model as M

    params = M.init_params(cfg, mesh, 0) if params is None else params
    cache = M.init_cache(cfg, mesh, batch, cache_len)
    rows = NamedSharding(mesh, decode.ROWS)
    tokens = jax.device_put(np.ones(batch, np.int32), rows)
    # The decode attention reads the cache up to the furthest row's position (in key blocks; on
    # GPU the whole cache).
    position = cache_len // 2 if position is None else position
    positions = jax.device_put(np.full(batch, position, np.int32), rows)
    # A step of its own when `reads` is set: it takes effect where the step is traced, and the
    # cached step_fn keeps the trace it has.
    step = decode.step_fn(cfg, mesh) if reads is None else decode.step_fn.__wrapped__(cfg, mesh)
    times = []
    with attention.decode_reads(reads):
        for k in range(warmup + (1 if queued else runs)):
            start = time.perf_counter()
            for _ in range(runs if queued and k >= warmup else 1):
                tokens, _, cache = step(params, tokens, positions, cache)  # positions stay put: the cache never fills
            tokens.block_until_ready()
            if k >= warmup:
                times.append((time.perf_counter() - start) / (runs if queued else 1))
    del cache
    return statistics.median(times)


def read_bandwidth(mib: int, runs: int) -> float:
    """Bytes/s of a plain reduction over a `mib` MiB bfloat16 array on the default device."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**20 // 2,), jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    total(x).block_until_ready()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return x.nbytes / statistics.median(times)


def copy_bandwidth(mib: int, runs: int) -> float:
    """Bytes/s (read + written) of a jitted elementwise copy of a `mib` MiB bfloat16 array: the
    bandwidth a kernel that streams memory reaches on the default device."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2**20 // 2,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))  # a real read and write (XLA keeps no copy of `a * 1`)
    copy(x).block_until_ready()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / statistics.median(times)


def layer_row(m, hw, costs, mesh, tensor: int, batch: int, cache_len: int, layers, runs: int, warmup: int):
    """One batch size's row: the per-layer time (difference of two layer counts) against the
    latency model, or None when the difference is below the timing noise."""
    l1, l2 = layers
    t1, t2 = (time_steps(shard_config(m, tensor, n), mesh, batch, cache_len, runs, warmup) for n in (l1, l2))
    if t2 <= t1:  # the layers' time is below the timing noise: say so rather than print a rate
        print(
            f"{batch:>5} not measurable: {l2} layers took no longer than {l1} ({t2 * 1e3:.3f} vs {t1 * 1e3:.3f} ms); raise --layers L2 or --runs"
        )
        return None
    per_layer = (t2 - t1) / (l2 - l1)
    nbytes = (
        costs["attention"].weight_bytes
        + costs["mlp"].weight_bytes
        + batch * cache_len * costs["attention"].kv_bytes_per_position
    )
    from ladder_jax.instruments.perf.cost import module_time

    ours = dataclasses.replace(hw, attention_expands_kv=False)  # our attention reads the cache once per KV head
    model_s = module_time(costs["attention"], "attention", ours, batch, batch, cache_len) + module_time(
        costs["mlp"], "mlp", ours, batch, batch, 0.0
    )
    return {
        "batch": batch,
        "ms_per_layer": per_layer * 1e3,
        "model_ms_per_layer": model_s * 1e3,
        "bytes_per_layer": nbytes,
        "achieved_gb_s": nbytes / per_layer / 1e9,
        "share_of_spec": nbytes / per_layer / hw.hbm_bandwidth,
        "step_ms": {str(l1): t1 * 1e3, str(l2): t2 * 1e3},
    }


HEADER = f"{'batch':>5} {'ms/layer':>9} {'model ms':>9} {'model/meas':>10} {'MB read':>8} {'GB/s':>7} {'of spec':>7}"


def format_row(row: dict) -> str:
    return (
        f"{row['batch']:>5} {row['ms_per_layer']:>9.4f} {row['model_ms_per_layer']:>9.4f} "
        f"{row['model_ms_per_layer'] / row['ms_per_layer']:>10.2f} {row['bytes_per_layer'] / 1e6:>8.1f} "
        f"{row['achieved_gb_s']:>7.1f} {row['share_of_spec']:>7.0%}"
    )


def check_layer_bytes(m, costs, tensor: int, layers) -> None:
    """The layer the benchmark times holds the bytes the latency model prices."""
    from ladder_jax import model as M

    l1, l2 = layers
    layer_bytes = (
        M.bytes_per_device(shard_config(m, tensor, l2), 1) - M.bytes_per_device(shard_config(m, tensor, l1), 1)
    ) // (l2 - l1)
    priced = costs["attention"].weight_bytes + costs["mlp"].weight_bytes
    assert layer_bytes == priced, f"the measured layer holds {layer_bytes} bytes, the latency model prices {priced}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama-2-70b", help="preset name or YAML path")
    ap.add_argument("overrides", nargs="*", help="key=value model overrides, e.g. model.dtype=float32")
    ap.add_argument("--tensor", type=int, default=8, help="the tensor degree whose one-device share is measured")
    ap.add_argument("--hardware", default="h100-nvlink", help="latency-model profile to compare with")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument(
        "--cache-len", type=int, default=1536, help="KV cache positions (the paper's 1024 prompt + 512 generated)"
    )
    ap.add_argument(
        "--layers",
        type=int,
        nargs=2,
        default=[2, 6],
        metavar=("L1", "L2"),
        help="the two layer counts whose difference is timed",
    )
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--probe-mib", type=int, default=1024, help="array size of the plain-read bandwidth probe")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from ladder_jax.config import ConfigError, load_config
    from ladder_jax.instruments.perf.cost import check_tensor, module_costs
    from ladder_jax.instruments.perf.hardware import PerfModelError, load_hardware

    try:
        m = load_config(args.config, args.overrides).model
        hw = load_hardware(args.hardware)
        check_tensor(m, hw, args.tensor)
        l1, l2 = args.layers
        if not 1 <= l1 < l2:
            raise ConfigError(f"--layers {l1} {l2}: give two layer counts with 1 <= L1 < L2")
        if min(args.batch) < 1 or args.cache_len < 2:
            raise ConfigError("--batch sizes must be positive and --cache-len at least 2")
    except (ConfigError, PerfModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import jax

    from ladder_jax.config import Config, MeshConfig
    from ladder_jax.mesh import make_mesh

    device = jax.devices()[0]
    mesh = make_mesh(Config(mesh=MeshConfig(data=1, tensor=1)), [device])
    costs = module_costs(dataclasses.replace(m, plan="standard"), args.tensor)
    check_layer_bytes(m, costs, args.tensor, (l1, l2))
    probe = read_bandwidth(args.probe_mib, args.runs)
    what = f"{m.name} at tensor={args.tensor} (one device: {m.n_heads // args.tensor} heads, {max(1, m.n_kv_heads // args.tensor)} KV heads, FFN {m.ffn_dim // args.tensor})"
    print(
        f"{what}, {m.dtype}, KV cache {args.cache_len}, on {device.device_kind} ({device.platform}); model: {hw.name}"
    )
    print(
        f"plain read of {args.probe_mib} MiB: {probe / 1e9:.1f} GB/s ({probe / hw.hbm_bandwidth:.0%} of {hw.name}'s {hw.hbm_bandwidth / 1e9:.0f} GB/s)"
    )
    print(HEADER)
    rows = []
    for b in args.batch:
        row = layer_row(m, hw, costs, mesh, args.tensor, b, args.cache_len, (l1, l2), args.runs, args.warmup)
        if row is not None:
            rows.append(row)
            print(format_row(row))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": m.name,
                    "tensor": args.tensor,
                    "dtype": m.dtype,
                    "cache_len": args.cache_len,
                    "layers": [l1, l2],
                    "device": device.device_kind,
                    "platform": device.platform,
                    "hardware_profile": hw.name,
                    "profile_hbm_bandwidth": hw.hbm_bandwidth,
                    "profile_hbm_efficiency": hw.hbm_efficiency,
                    "read_probe_gb_s": probe / 1e9,
                    "rows": rows,
                    "date": time.strftime("%Y-%m-%d"),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
