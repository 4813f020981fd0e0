"""Throughput of the OpenAI-compatible server (continuous batching) against the same requests
run as static batches, as `infer.py --prompts-file` runs them, per layer plan.

The requests: --requests prompts of random lengths (8..48 bytes) asking for a random number of
new tokens (16..--max-tokens), greedy, on random weights of --config (default tiny). The server
runs in this process (uvicorn on a loopback port, the engine with --slots slots); --concurrency
client threads of the official `openai` client each send their share one after another. The
static runs take the same requests in arrival order, --concurrency at a time, each batch decoded
with decode.generate up to its longest request (what infer.py does with one --max-new-tokens).
Both count the tokens each request asked for (static rows that stop early at EOS count what they
made). Compiles happen in an untimed warm-up of each mode.

    python benchmarks/serve_throughput.py --plans standard,ladder mesh.tensor=2 --requests 32 --concurrency 8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time

import numpy as np


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key=value, e.g. mesh.tensor=2")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--plans", default="standard,ladder", help="comma-separated layer plans (';' if they hold commas)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8, help="client threads, and the static batch size")
    ap.add_argument("--slots", type=int, default=8, help="the engine's --max-running (rows of its decode step)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--cpu-devices", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results here")
    return ap.parse_intermixed_args(argv)


def workload(n: int, max_tokens: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz _():\n"))
    return [
        ("".join(rng.choice(letters, rng.integers(8, 49))), int(rng.integers(min(16, max_tokens), max_tokens + 1)))
        for _ in range(n)
    ]


def run_static(cfg, mesh, params, prompts, wants, batch: int, stop_ids) -> tuple[float, int]:
    """`prompts` (token ids) in arrival order, `batch` at a time, each batch decoded with
    decode.generate up to its longest request: (seconds, tokens the requests asked for and got)."""
    from ladder_jax import decode

    start, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        group, asked = prompts[i : i + batch], wants[i : i + batch]
        out = decode.generate(cfg.model, mesh, params, group, max(asked), eos_id=stop_ids)
        tokens += sum(min(len(row), n) for row, n in zip(out.tokens, asked))
    return time.perf_counter() - start, tokens


def run_engine(engine, prompts, wants, stop_ids) -> tuple[float, int]:
    """The same requests submitted at once to the continuous-batching engine, without HTTP:
    (seconds, tokens made)."""
    from ladder_jax.engine import Request

    requests = [Request(p, n, stop_ids=frozenset(stop_ids)) for p, n in zip(prompts, wants)]
    start = time.perf_counter()
    engine.run(requests)
    return time.perf_counter() - start, sum(len(r.tokens) for r in requests)


def run_server(url: str, name: str, requests, concurrency: int) -> tuple[float, int]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    shares = [requests[k::concurrency] for k in range(concurrency)]

    def client_loop(share):
        made = 0
        for text, n in share:
            reply = client.completions.create(model=name, prompt=text, max_tokens=n, temperature=0)
            made += reply.usage.completion_tokens
        return made

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(client_loop, shares))
    return time.perf_counter() - start, tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    from ladder_jax.mesh import init_runtime

    init_runtime(args.cpu_devices)

    from ladder_jax import decode, serve
    from ladder_jax import model as M
    from ladder_jax.config import load_config
    from ladder_jax.engine import Engine
    from ladder_jax.mesh import make_mesh
    from ladder_jax.tokenizer import get_tokenizer

    plans = [p for p in args.plans.split(";" if ";" in args.plans else ",") if p]
    requests = workload(args.requests, args.max_tokens, args.seed)
    results = []
    for plan in plans:
        overrides = ["mesh.data=1", *args.overrides, f"model.plan={plan}"]
        cfg = load_config(args.config, overrides)
        mesh = make_mesh(cfg)
        params = M.init_params(cfg.model, mesh, args.seed)
        tokenizer = get_tokenizer(cfg)

        prompts, wants = [tokenizer.encode_prompt(text) for text, _ in requests], [n for _, n in requests]
        static = (cfg, mesh, params, prompts, wants, args.concurrency, tokenizer.stop_ids)
        run_static(*static)  # compiles every batch's shapes
        static_s, static_tokens = run_static(*static)

        cache_len = min(cfg.model.max_seq_len, decode.bucket_length(60, cfg.model.max_seq_len) + args.max_tokens)
        app = serve.Server(Engine(cfg.model, mesh, params, args.slots, cache_len), tokenizer, "bench")
        with serve.serving_in_thread(app) as base:
            url = base + "/v1"
            run_server(
                url, "bench", [(text, 2) for text, _ in requests[:8]], 4
            )  # compiles the prefill buckets and the step
            server_s, server_tokens = run_server(url, "bench", requests, args.concurrency)

        row = {
            "plan": plan,
            "static_requests_per_s": len(requests) / static_s,
            "static_tokens_per_s": static_tokens / static_s,
            "server_requests_per_s": len(requests) / server_s,
            "server_tokens_per_s": server_tokens / server_s,
            "static_tokens": static_tokens,
            "server_tokens": server_tokens,
        }
        results.append(row)
        print(json.dumps(row), file=sys.stderr)

    device = mesh.devices.flat[0]
    print(
        f"\n{args.requests} requests (prompts 8..48 bytes, 16..{args.max_tokens} new tokens, greedy), "
        f"{args.concurrency} concurrent clients / static batches of {args.concurrency}, {args.slots} slots; "
        f"mesh data=1 x tensor={mesh.shape['tensor']} on {device.device_kind}; load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| plan | static req/s | static tok/s | server req/s | server tok/s | server / static |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        ratio = r["server_tokens_per_s"] / r["static_tokens_per_s"]
        print(
            f"| {r['plan']} | {r['static_requests_per_s']:.2f} | {r['static_tokens_per_s']:.0f} | "
            f"{r['server_requests_per_s']:.2f} | {r['server_tokens_per_s']:.0f} | {ratio:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
