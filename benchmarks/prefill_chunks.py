"""What chunked prefill does for the requests already decoding: one request decodes while a long
prompt arrives. Per --prefill-chunk budget: the longest gap between the running request's tokens
from the long prompt's arrival to its first token, the long prompt's time to first token, and the
prefill calls it took. Random weights of --config (default tiny) on one device, the prefix cache
off (each round's long prompt is the same); compiles happen in an untimed first round per budget.

    python benchmarks/prefill_chunks.py --prompt-len 2000 --budgets 4096,512,128 model.max_seq_len=4096
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ladder_jax import model as M  # noqa: E402
from ladder_jax.config import load_config  # noqa: E402
from ladder_jax.engine import Engine, Request  # noqa: E402
from ladder_jax.mesh import make_mesh  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. model.max_seq_len=4096")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--prompt-len", type=int, default=2000, help="the long prompt's tokens")
    ap.add_argument("--budgets", default="4096,512,128", help="comma-separated --prefill-chunk values")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per budget (the median is shown)")
    return ap.parse_intermixed_args(argv)


def one_round(engine: Engine, prompt: list[int], decode_tokens: int) -> tuple[float, float, int]:
    """(the longest time between consecutive tokens of the running request, from its last token
    before the prompt arrived to its first after the prompt's first token; the prompt's time to
    first token; its prefill calls), in seconds."""
    running_at, first_at = [], []
    running = Request([256, *b"Hello"], decode_tokens, on_token=lambda t: running_at.append(time.perf_counter()))
    engine.submit(running)
    while len(running.tokens) < 3:
        engine.step()
    calls, arrive = engine.prefills, time.perf_counter()
    long = engine.submit(Request(prompt, 1, on_token=lambda t: first_at.append(time.perf_counter())))
    while not long.done.is_set() or running_at[-1] < first_at[0]:
        engine.step()
    calls = engine.prefills - calls
    window = [t for t in running_at if t > arrive]
    window = [max(t for t in running_at if t <= arrive)] + window[
        : next(i for i, t in enumerate(window) if t > first_at[0]) + 1
    ]
    running.cancel()
    while not running.done.is_set():
        engine.step()
    return float(np.diff(window).max()), first_at[0] - arrive, calls


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, ["mesh.data=1", "mesh.tensor=1", *args.overrides])
    mesh = make_mesh(cfg, jax.devices()[:1])
    params = M.init_params(cfg.model, mesh, 0)
    prompt = np.random.default_rng(0).integers(0, 256, args.prompt_len).tolist()
    decode_tokens = cfg.model.max_seq_len - args.prompt_len - 8
    print(
        f"{jax.devices()[0].device_kind}: {cfg.model.name}, a {args.prompt_len}-token prompt arriving while one decodes"
    )
    print("| --prefill-chunk | prefill calls | running request's longest gap | prompt's time to first token |")
    print("| --- | --- | --- | --- |")
    for budget in (int(b) for b in args.budgets.split(",")):
        engine = Engine(cfg.model, mesh, params, 2, cfg.model.max_seq_len, prefill_chunk=budget, prefix_cache=False)
        one_round(engine, prompt, decode_tokens)  # compiles
        results = [one_round(engine, prompt, decode_tokens) for _ in range(args.rounds)]
        gap, ttft, calls = (float(np.median(x)) for x in zip(*results))
        print(f"| {budget} | {calls:.0f} | {gap * 1e3:.0f} ms | {ttft * 1e3:.0f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
