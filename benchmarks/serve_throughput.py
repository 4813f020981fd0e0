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

Arrival mode (`--rates`): requests arrive one by one at Poisson times, at each rate in turn
(requests per second), with prompt and output lengths drawn from log-normal distributions
(long-tailed, generated here: no data set). Three servers take the same arrivals, in-process
and without HTTP: the paged engine (ladder_jax/engine.py), the fixed-slot engine it replaced
(its source read from git at `--fixed-rev`, imported beside the package: every slot owns
`cache_len` positions, each prompt prefilled alone), and static batches (when the device is
free, up to --concurrency waiting requests are padded to one batch and decoded with
decode.generate to the next power of two of their longest request). Each reports
time to first token and the gaps between a request's tokens (p50/p99) and output tokens/s.
Every compile happens before the clock starts. `--capacity` instead fills a KV cache of 8 x 1024
positions with requests of 64-256 tokens and counts how many run at once, paged against fixed slots.
`--host-time` times the host's share of each decode step (`Engine._dispatch`) with --slots rows
decoding, this checkout's engine against the one at --before-rev. `--preemption` gives 64
chat-like requests (max_tokens to the end of 1024 positions, each ending after 32-256 tokens, as
an end id would end it) to 64 rows over 512 pages of 16: this checkout's engine (admits on the
prompt's pages, preempts the newest when a pool runs short) against the one at --promise-rev
(admits only when every page a request may take can be promised).

    python benchmarks/serve_throughput.py --rates 2,4,8 --requests 48 --concurrency 8 mesh.tensor=2
    python benchmarks/serve_throughput.py --capacity
    python benchmarks/serve_throughput.py --host-time --slots 16 --max-tokens 200 mesh.tensor=1
    python benchmarks/serve_throughput.py --preemption mesh.tensor=1
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

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
    ap.add_argument("--rates", help="arrival mode: comma-separated Poisson arrival rates, requests per second")
    ap.add_argument("--fixed-rev", default="2c98a95", help="the git revision of the fixed-slot engine measured beside")
    ap.add_argument("--capacity", action="store_true", help="requests running at once at a fixed KV budget")
    ap.add_argument("--host-time", action="store_true", help="host milliseconds per decode step, against --before-rev")
    ap.add_argument("--preemption", action="store_true", help="early-ending chat requests: preempting vs promising")
    ap.add_argument(
        "--promise-rev",
        default="c22a998",
        help="the git revision of the engine that promised every page (--preemption)",
    )
    ap.add_argument(
        "--before-rev", default="8807b50", help="the git revision of the engine --host-time measures beside"
    )
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


# ---------------------------------------------------------------------------------------------
# Arrival mode


def arrival_workload(n: int, max_tokens: int, vocab: int, rate: float, seed: int) -> list[dict]:
    """n requests: arrival time (s, Poisson at `rate`), prompt ids, output length. Lengths are
    log-normal (median 24 prompt / 32 output tokens, sigma 0.8: a long tail, as chat traffic)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / rate, n)
    prompt = np.clip(rng.lognormal(np.log(24), 0.8, n), 4, 192).astype(int)
    output = np.clip(rng.lognormal(np.log(32), 0.8, n), 4, max_tokens).astype(int)
    return [
        {"at": float(t), "prompt": rng.integers(3, vocab, p).tolist(), "want": int(o)}
        for t, p, o in zip(np.cumsum(gaps) - gaps[0], prompt, output)
    ]


def fixed_slot_engine_module(rev: str):
    """The fixed-slot engine as it was at `rev` (git)."""
    return engine_module_at(rev, "engine_fixed_slots")


def engine_module_at(rev: str, name: str):
    """ladder_jax/engine.py as it was at `rev` (git), imported as ladder_jax.`name` so that its
    relative imports find today's package."""
    import ladder_jax

    root = Path(ladder_jax.__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{rev}:ladder_jax/engine.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"ladder_jax.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Clock:
    """Token times of one request: arrival, then each token as it reaches the host."""

    def __init__(self):
        self.arrival, self.tokens = time.perf_counter(), []

    def tick(self, *_):
        self.tokens.append(time.perf_counter())


def _wait_until(start: float, at: float) -> None:
    delay = start + at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def arrive_engine(engine, module, work: list[dict]) -> list[Clock]:
    """Submit each request at its time to an engine stepping in its own thread."""
    thread = threading.Thread(target=engine.serve_forever, daemon=True)
    thread.start()
    clocks, requests, start = [], [], time.perf_counter()
    for w in work:
        _wait_until(start, w["at"])
        clock = Clock()
        requests.append(engine.submit(module.Request(w["prompt"], w["want"], on_token=clock.tick)))
        clocks.append(clock)
    for r in requests:
        r.done.wait()
    engine.stop()
    thread.join()
    return clocks


def static_shape(cfg, prompts, wants):
    from ladder_jax import decode

    longest = min(
        1 << (max(wants) - 1).bit_length(),
        cfg.max_seq_len - decode.bucket_length(max(map(len, prompts)), cfg.max_seq_len),
    )
    return longest


def arrive_static(cfg, mesh, params, work: list[dict], batch: int) -> list[Clock]:
    """Static batches under arrivals: whenever the device is free, the waiting requests (up to
    `batch`, padded to `batch` rows) are decoded together to the next power of two of their
    longest output; a request's clock keeps its own `want` tokens."""
    from ladder_jax import decode

    clocks = [None] * len(work)
    start, done, lock = time.perf_counter(), 0, threading.Lock()

    def arrivals():
        for i, w in enumerate(work):
            _wait_until(start, w["at"])
            with lock:
                clocks[i] = Clock()

    feeder = threading.Thread(target=arrivals, daemon=True)
    feeder.start()
    while done < len(work):
        with lock:
            arrived = [i for i in range(done, len(work)) if clocks[i] is not None][:batch]
        if not arrived:
            time.sleep(0.001)
            continue
        group = [work[i] for i in arrived]
        prompts = [g["prompt"] for g in group] + [[cfg.pad_id]] * (batch - len(group))
        wants = [g["want"] for g in group]

        def on_token(row, _token, arrived=arrived, wants=wants):
            if row < len(arrived) and len(clocks[arrived[row]].tokens) < wants[row]:
                clocks[arrived[row]].tick()

        decode.generate(cfg, mesh, params, prompts, static_shape(cfg, prompts, wants), on_token=on_token)
        done += len(group)
    feeder.join()
    return clocks


def latency_row(clocks: list[Clock]) -> dict:
    ttft = [c.tokens[0] - c.arrival for c in clocks]
    gaps = [b - a for c in clocks for a, b in zip(c.tokens, c.tokens[1:])]
    span = max(c.tokens[-1] for c in clocks) - min(c.arrival for c in clocks)
    return {
        "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
        "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
        "itl_p50_ms": 1e3 * float(np.percentile(gaps, 50)),
        "itl_p99_ms": 1e3 * float(np.percentile(gaps, 99)),
        "tokens_per_s": sum(len(c.tokens) for c in clocks) / span,
        "tokens": sum(len(c.tokens) for c in clocks),
    }


def arrival_mode(args, cfg, mesh, params) -> list[dict]:
    from ladder_jax import decode
    from ladder_jax import engine as paged

    fixed = fixed_slot_engine_module(args.fixed_rev)
    m = cfg.model
    rates = [float(r) for r in args.rates.split(",")]
    works = {rate: arrival_workload(args.requests, args.max_tokens, m.vocab_size, rate, args.seed) for rate in rates}
    cache_len = min(m.max_seq_len, decode.bucket_length(192, m.max_seq_len) + args.max_tokens)
    servers = {
        "paged": (lambda: paged.Engine(m, mesh, params, args.slots, cache_len), paged),
        "fixed slots": (lambda: fixed.Engine(m, mesh, params, args.slots, cache_len), fixed),
    }
    # Compiles first: every prompt bucket through each engine, and every static shape the runs use.
    warm = [{"at": 0.0, "prompt": [5] * n, "want": 2} for n in (4, 8, 16, 32, 64, 128, 192)]
    servers["paged"][0]().precompile()  # every prefill shape, as `serve` does at startup
    for make, module in servers.values():
        arrive_engine(make(), module, warm)
    shapes = set()
    for work in works.values():  # the static groups depend on timing: every (bucket, length) the workload could form
        buckets = {decode.bucket_length(len(w["prompt"]), m.max_seq_len) for w in work}
        outs = {max(16, 1 << (w["want"] - 1).bit_length()) for w in work}
        shapes |= {(b, o) for b in buckets for o in outs}
    for b, o in sorted(shapes):
        prompts = [[5] * b] + [[cfg.model.pad_id]] * (args.concurrency - 1)
        decode.precompile(m, mesh, params, decode.decode_shape(m, mesh, prompts, static_shape(m, prompts, [o])))
    rows = []
    for rate, work in works.items():
        for name, (make, module) in servers.items():
            rows.append({"rate": rate, "server": name, **latency_row(arrive_engine(make(), module, work))})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        rows.append(
            {"rate": rate, "server": "static", **latency_row(arrive_static(m, mesh, params, work, args.concurrency))}
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def capacity_mode(args, mesh, cfg, params) -> list[dict]:
    """A KV budget of 8 x 1024 positions; 64 requests of 64-256 tokens (prompt + output) submitted
    at once: the most running at once, paged (16-position pages) against fixed slots of 1024."""
    from ladder_jax import engine as paged

    fixed = fixed_slot_engine_module(args.fixed_rev)
    m = cfg.model
    rng = np.random.default_rng(args.seed)
    totals = rng.integers(64, 257, 64)
    work = [(rng.integers(3, m.vocab_size, t // 2).tolist(), int(t - t // 2)) for t in totals]
    engines = {
        "fixed slots (8 x 1024)": (fixed.Engine(m, mesh, params, 8, 1024), fixed),
        "paged (512 pages of 16)": (paged.Engine(m, mesh, params, 64, 1024, page_size=16, kv_pages=512), paged),
    }
    rows = []
    for name, (engine, module) in engines.items():
        requests = [engine.submit(module.Request(p, n)) for p, n in work]
        most, steps = 0, 0
        while not all(r.done.is_set() for r in requests):
            engine.step()
            most, steps = max(most, engine.busy_slots), steps + 1
        rows.append({"engine": name, "most_running": most, "steps": steps})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def preemption_mode(args, mesh, cfg, params) -> list[dict]:
    """64 requests at once, prompts of 32-128 tokens, max_tokens to the end of 1024 positions (a
    chat request that leaves it out), each ending after 32-256 tokens; 64 rows over 512 pages of
    16 (8 x 1024 positions). Per engine: the most running at once, engine steps and seconds to
    finish all, preemptions, and prompt tokens prefilled (recomputes included)."""
    from ladder_jax import engine as now

    modules = {"preempting (this checkout)": now, f"promising (at {args.promise_rev})": None}
    modules[f"promising (at {args.promise_rev})"] = engine_module_at(args.promise_rev, "engine_promising")
    m = cfg.model
    rng = np.random.default_rng(args.seed)
    work = [
        (rng.integers(3, m.vocab_size, rng.integers(32, 129)).tolist(), int(rng.integers(32, 257))) for _ in range(64)
    ]
    rows = []
    for name, module in modules.items():
        engine = module.Engine(m, mesh, params, 64, 1024, page_size=16, kv_pages=512)
        engine.precompile()

        def ends_after(n):  # on_token: False once n tokens are out, as an end id would end the text
            made = [0]

            def on_token(_token):
                made[0] += 1
                return made[0] < n

            return on_token

        requests = [engine.submit(module.Request(p, 1024 - len(p), on_token=ends_after(n))) for p, n in work]
        most, steps, start = 0, 0, time.perf_counter()
        while not all(r.done.is_set() for r in requests):
            engine.step()
            most, steps = max(most, engine.busy_slots), steps + 1
        seconds = time.perf_counter() - start
        assert [len(r.tokens) for r in requests] == [n for _, n in work]
        row = {
            "engine": name,
            "most_running": most,
            "steps": steps,
            "seconds": seconds,
            "preemptions": getattr(engine, "preemptions", 0),
            "prefill_tokens": engine.prefill_tokens,
            "tokens": sum(n for _, n in work),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def host_time_mode(args, mesh, cfg, params, rounds: int = 3) -> list[dict]:
    """--slots requests of 20-token prompts decoding together, --max-tokens each: the host's
    milliseconds per decode step in `Engine._dispatch` (what a device step must outlast for the
    device never to wait on the host) and per whole engine step, this checkout's engine against
    the one at --before-rev, in alternating rounds (the medians over all rounds' steps)."""
    from ladder_jax import decode
    from ladder_jax import engine as now

    m = cfg.model
    modules = {"this checkout": now, f"at {args.before_rev}": engine_module_at(args.before_rev, "engine_before")}
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, m.vocab_size, 20).tolist() for _ in range(args.slots)]
    cache_len = decode.bucket_length(20, m.max_seq_len) + args.max_tokens
    engines = {name: module.Engine(m, mesh, params, args.slots, cache_len) for name, module in modules.items()}
    times = {name: ([], []) for name in modules}
    for engine in engines.values():
        engine.precompile()
    for _ in range(rounds):
        for name, engine in engines.items():
            requests = [engine.submit(modules[name].Request(p, args.max_tokens)) for p in prompts]
            while not engine.decoding.all():
                engine.step()
            dispatch, step = engine._dispatch, times[name]

            def timed(dispatch=dispatch, into=step[0]):
                start = time.perf_counter()
                dispatch()
                into.append(time.perf_counter() - start)

            engine._dispatch = timed
            while not any(r.done.is_set() for r in requests):
                start = time.perf_counter()
                engine.step()
                step[1].append(time.perf_counter() - start)
            engine._dispatch = dispatch
            while not all(r.done.is_set() for r in requests):  # (not `run`: the engine before resubmits)
                engine.step()
    rows = []
    for name, (dispatch, step) in times.items():
        rows.append(
            {
                "engine": name,
                "steps": len(step),
                "dispatch_ms": 1e3 * float(np.median(dispatch)),
                "step_ms": 1e3 * float(np.median(step)),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rates or args.capacity or args.host_time or args.preemption:
        return main_arrivals(args)
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
        engine = Engine(cfg.model, mesh, params, args.slots, cache_len)
        engine.precompile()  # every prefill shape and the step, as `serve` does at startup
        app = serve.Server(engine, tokenizer, "bench")
        with serve.serving_in_thread(app) as base:
            url = base + "/v1"
            # the HTTP path warmed with other prompts: the prefix cache holds none of the measured ones
            run_server(url, "bench", [(text, 2) for text, _ in workload(8, args.max_tokens, args.seed + 1)], 4)
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


def main_arrivals(args) -> int:
    from ladder_jax.mesh import init_runtime

    init_runtime(args.cpu_devices)
    from ladder_jax import model as M
    from ladder_jax.config import load_config
    from ladder_jax.mesh import make_mesh

    plan = args.plans.split(";" if ";" in args.plans else ",")[0]
    extra = ["model.max_seq_len=1024"] if args.capacity or args.preemption else []
    cfg = load_config(args.config, ["mesh.data=1", *extra, *args.overrides, f"model.plan={plan}"])
    mesh = make_mesh(cfg)
    params = M.init_params(cfg.model, mesh, args.seed)
    load = os.getloadavg()[0]
    device = mesh.devices.flat[0]
    where = f"{args.config} ({plan}), mesh data=1 x tensor={mesh.shape['tensor']} on {device.device_kind}"
    if args.host_time:
        rows = host_time_mode(args, mesh, cfg, params)
        print(
            f"\n{args.slots} requests decoding together (20-token prompts, {args.max_tokens} new tokens each), 3 rounds; {where}; "
            f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after\n"
        )
        print(
            "| engine | steps timed | host ms in dispatch (median) | ms per engine step (median) |\n| --- | --- | --- | --- |"
        )
        for r in rows:
            print(f"| {r['engine']} | {r['steps']} | {r['dispatch_ms']:.3f} | {r['step_ms']:.3f} |")
    elif args.preemption:
        rows = preemption_mode(args, mesh, cfg, params)
        print(
            f"\n64 chat-like requests at once (prompts 32-128 tokens, max_tokens to 1024 positions, ending after 32-256), "
            f"64 rows over 512 pages of 16; {where}; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after\n"
        )
        print("| engine | most running | engine steps | seconds | preemptions | prompt tokens prefilled |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['engine']} | {r['most_running']} | {r['steps']} | {r['seconds']:.1f} | {r['preemptions']} | "
                f"{r['prefill_tokens']} |"
            )
    elif args.capacity:
        rows = capacity_mode(args, mesh, cfg, params)
        print(
            f"\n64 requests of 64-256 tokens at once, a KV budget of 8 x 1024 positions; {where}; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after\n"
        )
        print("| engine | most running at once | engine steps to finish all |\n| --- | --- | --- |")
        for r in rows:
            print(f"| {r['engine']} | {r['most_running']} | {r['steps']} |")
    else:
        rows = arrival_mode(args, cfg, mesh, params)
        print(
            f"\n{args.requests} requests a rate (Poisson; prompts log-normal median 24 tokens, outputs median 32, at most {args.max_tokens}), "
            f"{args.slots} rows / static batches of {args.concurrency}; {where}; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after\n"
        )
        print("| rate (req/s) | server | TTFT p50 / p99 ms | inter-token p50 / p99 ms | output tok/s |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            print(
                f"| {r['rate']:g} | {r['server']} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
                f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | {r['tokens_per_s']:.0f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "load_before": load, "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
