"""Decoding with a trained run (greedy, or sampled), or a decode-speed benchmark of the variants.
`python infer.py ...` is `python -m ladder_jax infer ...`.

  python infer.py --prompt "def fib(" --max-new-tokens 64       # latest run of the tiny preset
  python infer.py --prompt "def fib(" --temperature 0.8 --top-p 0.95 --seed 1
  python infer.py --checkpoint runs/tiny-... --prompts-file prompts.jsonl
  python infer.py --benchmark --config tiny mesh.tensor=8 --variants standard,ladder,parallel,desync

Prompts are tokenized as transformers does: the byte tokenizer puts its BOS in front (training
packs documents as BOS text EOS), a tokenizer.json adds what its post-processor adds. A
completion stops at any end id (EOS, and every eos_token_id of the run's generation_config.json)
or after --max-new-tokens. A prompts file has one prompt per line, or,
when its name ends in .jsonl, one JSON object per line with a "prompt" or "text" field.

Without an accelerator JAX gets --cpu-devices fake CPU devices (default 8, as train.py), so
every tensor size up to 8 runs. Decoding uses mesh.data=1 unless an override sets it: one batch
of requests on one host gains nothing from being split over data, and padding the batch up to
the data size would multiply the work.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys

import jax
from jax.sharding import Mesh

from .. import checkpoint, decode
from .. import model as M
from ..config import Config, load_config
from ..decode import check_request
from ..errors import LadderError
from ..instruments import decode_speed
from ..mesh import init_runtime, make_mesh
from ..storage import Path, path
from ..tokenizer import get_tokenizer
from ._common import cpu_devices, decoding_overrides, multihost, script_main, script_verb
from ._format import markdown_table


class InputError(LadderError):
    """A command line or prompts file infer cannot use; the message says what to change."""


def add(sub) -> None:
    script_verb(sub, "infer", "decode with a run, or benchmark the variants' decode speed", __doc__, arguments)


def main(argv=None) -> int:
    """`python infer.py ...`: this verb as a script of its own."""
    return script_main(__doc__, arguments, argv)


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.tensor=8 model.plan=ladder")
    ap.add_argument(
        "--config",
        help="preset name or YAML path: whose latest run to decode with (default tiny), or what to benchmark",
    )
    ap.add_argument(
        "--checkpoint",
        metavar="RUN_DIR",
        help="run directory made by train.py (default: the latest run of --config under --runs-dir)",
    )
    ap.add_argument("--runs-dir", default="runs", help="where train.py puts runs (default: runs)")
    ap.add_argument("--prompt", help="text to continue")
    ap.add_argument(
        "--prompts-file",
        metavar="FILE",
        help="a batch of prompts: one per line, or JSONL (.jsonl) with a 'prompt' or 'text' field",
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    ap.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="sample among the k most likely tokens (0: off, at most the vocabulary size)",
    )
    ap.add_argument("--top-p", type=float, default=1.0, help="sample within the nucleus of this probability (1: off)")
    cpu_devices(ap)
    bench = ap.add_argument_group("benchmark (random weights, as the Ladder Residual paper)")
    bench.add_argument("--benchmark", action="store_true", help="time prefill and decode per variant and batch size")
    bench.add_argument(
        "--variants",
        default="standard,ladder,parallel,desync",
        help="layer plans, comma-separated (use ';' between plans that contain commas)",
    )
    bench.add_argument("--batch-sizes", default="1,4", help="comma-separated (default 1,4)")
    bench.add_argument("--prompt-len", type=int, default=1024)
    bench.add_argument("--gen-len", type=int, default=512)
    bench.add_argument("--runs", type=int, default=3, help="timed runs; the table shows their median (default 3)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of sampling, and of the benchmark's random weights")
    multihost(ap)
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.set_defaults(handler=infer_or_benchmark)


def infer_or_benchmark(args) -> int:
    return benchmark(args) if args.benchmark else infer(args)


# ---------------------------------------------------------------------------------------------
# Prompts


def read_prompts_file(name: str | Path) -> list[str]:
    file = path(name)
    if file.is_dir():
        raise InputError(f"prompts file {file} is a directory; give a text file with one prompt per line")
    if not file.is_file():
        raise InputError(f"prompts file {file} does not exist; give a text file with one prompt per line")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(
            f"{file} line {line}: byte 0x{raw[e.start]:02x} is not UTF-8; save the file as UTF-8"
        ) from None
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if file.suffix == ".jsonl":
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{file} line {n} is not JSON ({e.msg}); write one JSON object per line") from None
            prompt = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(prompt, str):
                raise InputError(f'{file} line {n} has no string "prompt" or "text" field; give each line one')
            line = prompt
        if not line:
            raise InputError(f"{file} line {n} is an empty prompt; remove the line or write a prompt on it")
        prompts.append(line)
    if not prompts:
        raise InputError(f"{file} holds no prompts; write one prompt per line")
    return prompts


def read_prompts(args) -> list[str]:
    if args.prompt is not None and args.prompts_file:
        raise InputError("give either --prompt or --prompts-file, not both")
    if args.prompts_file:
        return read_prompts_file(args.prompts_file)
    if args.prompt is None:
        raise InputError('nothing to decode; give --prompt "TEXT", --prompts-file FILE or --benchmark')
    if not args.prompt:
        raise InputError("--prompt is empty; give some text to continue")
    return [args.prompt]


class TextStream:
    """Token ids in, text out as soon as it is complete: a character split over several byte
    tokens is written once its last byte arrives."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bytes_to_text = (
            codecs.getincrementaldecoder("utf-8")("replace") if hasattr(tokenizer, "decode_bytes") else None
        )
        self.ids: list[int] = []
        self.written = 0

    def push(self, token: int) -> str:
        if self.bytes_to_text is not None:
            return self.bytes_to_text.decode(self.tokenizer.decode_bytes([token]))
        # Other tokenizers: decode everything so far and hand out the new tail, holding back an
        # incomplete character (decoded as U+FFFD) until the tokens that finish it arrive.
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.written = text[self.written :], len(text)
        return new

    def close(self) -> str:
        if self.bytes_to_text is not None:
            return self.bytes_to_text.decode(b"", final=True)
        text = self.tokenizer.decode(self.ids)
        return text[self.written :]


# ---------------------------------------------------------------------------------------------
# Decoding with a run


def resolve_run(args) -> Path:
    if args.checkpoint is None:
        preset = load_config(args.config or "tiny").model.name
        return checkpoint.latest_run(args.runs_dir, preset)
    run_dir = path(args.checkpoint)
    saved = checkpoint.load_run_config(run_dir)  # one-line CheckpointError for a missing or foreign directory
    if args.config is not None:
        wanted = load_config(args.config).model.name
        if saved.model.name != wanted:
            raise InputError(
                f"{run_dir} is a '{saved.model.name}' run, not '{wanted}'; drop --config or give a run of {wanted}"
            )
    return run_dir


def infer(args) -> int:
    texts = read_prompts(args)
    # before orbax looks for checkpoints, which starts JAX
    init_runtime(args.cpu_devices, args.coordinator, args.num_processes, args.process_id)
    # Everything else that can be wrong with the request is found before parameters load.
    run_dir = resolve_run(args)
    overrides = decoding_overrides(args.overrides)
    cfg = load_config(run_dir / "config.yaml", overrides)
    tokenizer = get_tokenizer(cfg, run_dir)
    prompts = [tokenizer.encode_prompt(t) for t in texts]
    check_request(cfg.model, prompts, args.max_new_tokens)
    sampling = decode.Sampling(args.temperature, args.top_k, args.top_p, args.seed).check(cfg.model.vocab_size)
    run = checkpoint.load_run(run_dir, overrides)
    # Over several processes every one decodes the same prompts (each holds its devices' part of
    # the model); process 0 writes.
    quiet = open(os.devnull, "w") if jax.process_index() else None
    complete(
        run.cfg,
        run.mesh,
        run.params,
        tokenizer,
        texts,
        prompts,
        args.max_new_tokens,
        quiet or sys.stdout,
        log=quiet or sys.stderr,
        source=str(run_dir),
        sampling=sampling,
    )
    return 0


def complete(
    cfg: Config,
    mesh: Mesh,
    params,
    tokenizer,
    texts,
    prompts,
    max_new_tokens,
    out,
    log,
    source="",
    sampling=decode.GREEDY,
) -> list[str]:
    """Decode the prompts and return their completions. A single prompt streams to `out` as it
    is produced; a batch is written when done, one `[i] prompt completion` per prompt. Compile
    time, timings and the KV cache size go to `log`."""
    shape = decode.decode_shape(cfg.model, mesh, prompts, max_new_tokens)
    cache = decode.check_cache_fits(cfg.model, mesh, shape)
    compile_seconds = decode.precompile(cfg.model, mesh, params, shape, decode.sampler_for([sampling]))
    streams = [TextStream(tokenizer) for _ in prompts]
    pieces: list[list[str]] = [[] for _ in prompts]
    single = len(prompts) == 1

    def write(text):
        out.write(text)
        out.flush()

    def on_token(row, token):
        pieces[row].append(streams[row].push(token))
        if single:
            write(pieces[row][-1])

    if single:
        write(texts[0])
    result = decode.generate(
        cfg.model,
        mesh,
        params,
        prompts,
        max_new_tokens,
        eos_id=tokenizer.stop_ids,
        on_token=on_token,
        sampling=sampling,
    )
    for row, stream in enumerate(streams):
        pieces[row].append(stream.close())
    completions = ["".join(p) for p in pieces]
    if single:
        write(pieces[0][-1] + "\n")
    else:
        for i, (text, completion) in enumerate(zip(texts, completions)):
            write(f"[{i}] {text}{completion}\n")
    per_token = result.decode_seconds / max(result.decode_steps, 1)
    log.write(
        f"{source}: {cfg.model.name} plan '{cfg.model.plan}'{' (lp pairs split)' if cfg.model.lp_layout == 'split' else ''} on mesh data={mesh.shape['data']} x tensor={mesh.shape['tensor']}, "
        f"KV cache {cache / 2**20:.1f} MiB per device; compile {compile_seconds:.1f} s, prefill {result.prefill_seconds * 1e3:.1f} ms, "
        f"decode {per_token * 1e3:.2f} ms/token\n"
    )
    return completions


# ---------------------------------------------------------------------------------------------
# Benchmark

COLUMNS = [
    ("variant", "variant", "{}"),
    ("batch", "batch", "{}"),
    ("prefill_ms", "prefill ms", "{:.1f}"),
    ("decode_ms_per_token", "decode ms/token", "{:.2f}"),
    ("tokens_per_s_per_seq", "tok/s per seq", "{:.1f}"),
    ("tokens_per_s", "tok/s total", "{:.1f}"),
    ("speedup_vs_standard", "vs standard", "{:.2f}x"),
    ("compile_s", "compile s", "{:.1f}"),
]


def split_variants(text: str) -> list[str]:
    variants = [v.strip() for v in text.split(";" if ";" in text else ",") if v.strip()]
    if not variants:
        raise InputError("--variants is empty; give layer plans such as standard,ladder")
    return variants


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise InputError(f"--batch-sizes '{text}' is not a comma-separated list of integers, e.g. 1,4") from None
    if not sizes or min(sizes) < 1:
        raise InputError(f"--batch-sizes '{text}' needs positive batch sizes, e.g. 1,4")
    return sizes


def benchmark(args) -> int:
    """Random weights per variant, timed by instruments.decode_speed; a table, and JSON with --json."""
    if args.checkpoint or args.prompt is not None or args.prompts_file:
        raise InputError(
            "--benchmark times random weights on random prompts; drop --checkpoint, --prompt and --prompts-file"
        )
    variants = split_variants(args.variants)
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    if args.prompt_len < 1 or args.gen_len < 2 or args.runs < 1 or args.warmup < 0:
        raise InputError("--prompt-len must be >= 1, --gen-len >= 2, --runs >= 1 and --warmup >= 0")
    base, overrides = _benchmark_config(args)
    configs = {v: load_config(args.config or "tiny", [*overrides, f"model.plan={v}"]) for v in variants}
    init_runtime(args.cpu_devices)
    mesh = make_mesh(base)
    device = mesh.devices.flat[0]
    _log(
        f"{M.describe(base)}\nmesh data={mesh.shape['data']} x tensor={mesh.shape['tensor']} on {device.device_kind} ({device.platform}); "
        f"prompt {args.prompt_len}, generate {args.gen_len}, median of {args.runs} runs after {args.warmup} warm-up"
    )
    if device.platform == "cpu":
        _log(
            "note: XLA:CPU all-reduces are synchronous, so CPU timings cannot show what ladder or SPD gain "
            "(python -m ladder_jax perfmodel predict estimates it for GPUs and TPUs)"
        )
    prompts = decode_speed.random_prompts(base.model.vocab_size, batch_sizes, args.prompt_len, args.seed)
    rows = decode_speed.time_variants(
        configs, mesh, prompts, args.gen_len, args.runs, args.warmup, args.seed, _progress
    )
    print(markdown_table(rows, COLUMNS))
    if args.json:
        meta = {
            "config": args.config or "tiny",
            "overrides": overrides,
            "model": base.model.name,
            "mesh": {"data": mesh.shape["data"], "tensor": mesh.shape["tensor"]},
            "device": f"{device.device_kind} ({device.platform})",
            "jax": jax.__version__,
            **{k: getattr(args, k) for k in ("prompt_len", "gen_len", "runs", "warmup")},
        }
        path(args.json).write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    return 0


def _benchmark_config(args) -> tuple[Config, list[str]]:
    """The config to benchmark and its overrides, model.max_seq_len raised to fit the request."""
    overrides = decoding_overrides(args.overrides)
    base = load_config(args.config or "tiny", overrides)
    total_len = args.prompt_len + args.gen_len
    if base.model.max_seq_len >= total_len:
        return base, overrides
    # Random weights: the context limit is only a shape here, so stretch it to the request.
    _log(
        f"note: model.max_seq_len raised from {base.model.max_seq_len} to {total_len} for prompt {args.prompt_len} + {args.gen_len} generated"
    )
    return base, [*overrides, f"model.max_seq_len={total_len}"]


def _log(text: str) -> None:
    print(text, file=sys.stderr)


def _progress(row) -> None:
    done = ", ".join(f"{title} {fmt.format(row[key])}" for key, title, fmt in COLUMNS[2:] if row.get(key) is not None)
    _log(f"{row['variant']} batch {row['batch']}: {done}")
