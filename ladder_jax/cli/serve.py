"""`serve`: an OpenAI-compatible HTTP server over a run (continuous batching)."""

from __future__ import annotations

import os

import jax

from .. import checkpoint
from ..engine import KV_MEMORY
from ..errors import LadderError
from ..mesh import init_runtime
from ..storage import is_remote, path
from ..tokenizer import get_tokenizer
from ._common import cpu_devices, decoding_overrides, multihost, overrides


class ServeError(LadderError):
    """A serve command line that cannot work."""


def add(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible /v1/completions and /v1/chat/completions over a run",
        description="An OpenAI-compatible HTTP server (FastAPI, uvicorn) over a continuous-batching engine; "
        "see docs/serving.md. Needs the 'serve' extra: pip install -e '.[serve]'. vLLM's names of the engine's "
        "flags are taken too (--max-num-seqs, --max-model-len, --block-size, --gpu-memory-utilization, "
        "--no-enable-prefix-caching, --served-model-name).",
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="run directory (train.py or convert from-hf)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--max-running",
        "--max-num-seqs",
        "--slots",
        dest="max_running",
        type=int,
        default=8,
        help="requests decoded together: the compiled decode batch (default 8)",
    )
    p.add_argument(
        "--max-len",
        "--max-model-len",
        type=int,
        help="positions a request may hold: prompt + new tokens (default model.max_seq_len)",
    )
    p.add_argument("--page-size", "--block-size", type=int, default=16, help="positions per KV cache page (default 16)")
    p.add_argument(
        "--kv-pages",
        type=int,
        help="KV cache pages in all (default: what --kv-memory leaves on an accelerator; on CPU "
        "--max-running x --max-len positions' worth)",
    )
    p.add_argument(
        "--kv-memory",
        "--gpu-memory-utilization",
        type=float,
        default=KV_MEMORY,
        help="share of each device's memory (JAX's allocator limit) to fill: weights, the largest program's "
        f"temporaries, and KV pages with the rest, as vLLM's --gpu-memory-utilization (default {KV_MEMORY})",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prompt tokens prefilled per engine step and data shard; longer prompts go in chunks "
        "between decode steps (default 512)",
    )
    p.add_argument(
        "--no-prefix-cache",
        "--no-enable-prefix-caching",
        dest="prefix_cache",
        action="store_false",
        help="do not keep full prompt pages for later prompts that share them (default: keep them)",
    )
    p.add_argument(
        "--no-precompile",
        dest="precompile",
        action="store_false",
        help="compile prefill shapes as requests first need them, not all at startup (default: all at startup)",
    )
    p.add_argument(
        "--model-name", "--served-model-name", help="the model id clients send (default: the run directory's name)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LADDER_JAX_API_KEY"),
        help="/v1 and tokenizer requests must send 'Authorization: Bearer KEY' (default: $LADDER_JAX_API_KEY; "
        "unset: open)",
    )
    cpu_devices(p)
    multihost(p)
    overrides(p, "mesh.tensor=8 model.plan=ladder")
    p.set_defaults(handler=start_server)


def start_server(args) -> int:
    try:
        from .. import serve
    except ImportError as e:
        raise ServeError(
            f"the server needs fastapi, uvicorn, jinja2 and prometheus-client ({e.name} is missing): pip install -e '.[serve]'"
        ) from None
    from ..engine import Engine

    if args.max_running < 1 or not 0 < args.port < 65536:
        raise ServeError(
            f"--max-running {args.max_running} / --port {args.port}: give at least 1 running request and a port in 1..65535"
        )
    if not 0 < args.kv_memory <= 1:
        raise ServeError(f"--kv-memory {args.kv_memory}: give the share of each device's memory to fill, in (0, 1]")
    if min(args.page_size, args.prefill_chunk) < 1 or (args.kv_pages is not None and args.kv_pages < 1):
        raise ServeError(
            f"--page-size {args.page_size} / --kv-pages {args.kv_pages} / --prefill-chunk {args.prefill_chunk}: "
            "give at least 1"
        )
    init_runtime(args.cpu_devices, args.coordinator, args.num_processes, args.process_id)
    sock = serve.bind(args.host, args.port) if jax.process_index() == 0 else None  # before loading and compiling
    run_dir = path(args.checkpoint)
    run_overrides = decoding_overrides(args.overrides)
    cfg = checkpoint.load_run_config(run_dir, run_overrides)
    tokenizer = get_tokenizer(cfg, run_dir)
    if args.max_len is not None and not 0 < args.max_len <= cfg.model.max_seq_len:
        raise ServeError(f"--max-len {args.max_len}; give 1..model.max_seq_len={cfg.model.max_seq_len}")
    run = checkpoint.load_run(run_dir, run_overrides)
    engine = Engine(
        run.cfg.model,
        run.mesh,
        run.params,
        args.max_running,
        args.max_len,
        args.page_size,
        args.kv_pages,
        args.prefill_chunk,
        args.prefix_cache,
        args.kv_memory,
    )
    if engine.shard_pages < engine.table_width:  # as vLLM: the pool holds at least one request
        raise ServeError(
            f"--kv-pages {args.kv_pages}: {engine.shard_pages} pages per data shard, fewer than the "
            f"{engine.table_width} pages of {engine.page_size} positions one request of {engine.cache_len} positions "
            f"may hold; give at least {engine.table_width * engine.data} pages or lower --max-len"
        )
    compiled = ""
    if args.precompile:
        seconds = engine.precompile()
        compiled = f"compiled the decode step and {len(engine.prefill_shapes())} prefill shapes in {seconds:.1f} s; "
    if jax.process_index() != 0:  # process 0 takes the requests; the others step with it until it stops
        engine.serve_forever()
        return 0
    name = args.model_name or (run_dir if is_remote(run_dir) else run_dir.resolve()).name
    print(
        f"{compiled}serving '{name}' ({run.cfg.model.plan}) on http://{args.host}:{args.port}/v1: up to {engine.slots} "
        f"requests at once over {engine.total_pages} KV pages of {engine.page_size} positions "
        f"({engine.kv_bytes / 2**30:.2f} GiB per device), prefilling "
        f"{engine.prefill_chunk} tokens a step, prefix cache {'on' if engine.prefix_cache else 'off'}",
        flush=True,
    )
    serve.serve(serve.Server(engine, tokenizer, name, args.api_key or None), args.host, args.port, sock)
    return 0
