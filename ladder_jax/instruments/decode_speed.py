"""Decode speed of the variants on random weights (`infer --benchmark`), as the Ladder Residual
paper measures it: per batch size compile once, warm up, then time whole generations and report
their medians. Tokens/s counts the generated tokens over the whole generation, prefill included."""

from __future__ import annotations

import statistics

import numpy as np
from jax.sharding import Mesh

from .. import decode
from .. import model as M
from ..config import Config
from ..memory import check_init_fits


def random_prompts(vocab_size: int, batch_sizes, prompt_len: int, seed: int) -> dict[int, list[list[int]]]:
    rng = np.random.default_rng(seed)
    return {b: rng.integers(0, vocab_size, (b, prompt_len)).tolist() for b in batch_sizes}


def time_variants(configs: dict[str, Config], mesh: Mesh, prompts, gen_len: int, runs: int, warmup: int, seed, log):
    """One row per (variant, batch size), `log(row)` as each is done; random weights per variant."""
    rows = []
    for variant, cfg in configs.items():
        check_init_fits(cfg.model, mesh)
        params = M.init_params(cfg.model, mesh, seed)
        for b, batch in prompts.items():
            rows.append(
                {"variant": variant, "batch": b, **time_generation(cfg, mesh, params, batch, gen_len, runs, warmup)}
            )
            log(rows[-1])
        del params
    add_speedups(rows)
    return rows


def time_generation(cfg: Config, mesh: Mesh, params, prompts, gen_len: int, runs: int, warmup: int) -> dict:
    shape = decode.decode_shape(cfg.model, mesh, prompts, gen_len)
    cache = decode.check_cache_fits(cfg.model, mesh, shape)
    compile_seconds = decode.precompile(cfg.model, mesh, params, shape)
    for _ in range(warmup):
        decode.generate(cfg.model, mesh, params, prompts, gen_len)
    timed = [decode.generate(cfg.model, mesh, params, prompts, gen_len) for _ in range(runs)]
    return summarize(len(prompts), gen_len, timed, compile_seconds, cache)


def summarize(batch, gen_len, runs, compile_seconds, cache_bytes) -> dict:
    median = statistics.median
    per_seq = median([gen_len / (g.prefill_seconds + g.decode_seconds) for g in runs])
    return {
        "prefill_ms": median([g.prefill_seconds for g in runs]) * 1e3,
        "decode_ms_per_token": median([g.decode_seconds / g.decode_steps for g in runs]) * 1e3,
        "tokens_per_s_per_seq": per_seq,
        "tokens_per_s": per_seq * batch,
        "compile_s": compile_seconds,
        "kv_cache_mib_per_device": cache_bytes / 2**20,
    }


def add_speedups(rows) -> None:
    standard = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == "standard"}
    for r in rows:
        r["speedup_vs_standard"] = r["tokens_per_s"] / standard[r["batch"]] if r["batch"] in standard else None
