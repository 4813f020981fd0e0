"""Seconds to build a preset's parameter shapes (`model.abstract_params`), which every command
pays once at start (train, infer, serve, convert, analysis): the median of --repeats builds.

    JAX_PLATFORMS=cpu python benchmarks/model_shapes.py --repeats 3
    PYTHONPATH=/tmp/old JAX_PLATFORMS=cpu python benchmarks/model_shapes.py   # another checkout's code

Prints the load average first: on a loaded machine the figures are upper bounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ladder_jax import model
from ladder_jax.config import load_config


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    print("load average", open("/proc/loadavg").read().split()[0])
    for preset in args.presets:
        cfg = load_config(preset).model
        times = []
        for _ in range(args.repeats):
            model._abstract.cache_clear()  # the build is cached per config within a process
            start = time.perf_counter()
            model.abstract_params(cfg)
            times.append(time.perf_counter() - start)
        print(f"{preset}: {statistics.median(times):.2f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
