"""Greedy decoding on the mesh: one compiled prefill, one compiled decode step, a host loop.

The KV cache is the model's (`model.cache_shape`): per layer (k, v) of (batch, kv slots,
cache_len, head_dim), batch over `data`, kv slots over `tensor`. The prefill runs every prompt of a
batch, right-padded to one power-of-two bucket, in a single call and creates the cache there, so
a generation allocates it once. Row b's next token then goes at position len_b and overwrites
the padding's garbage in the cache; attention masks keys by position, so the padding is never
read. The decode step feeds one token per row, is compiled once per (batch, cache_len) and
donates the cache back to itself.

Greedy choice is vocab-parallel inside the shard_map: each device takes the max and argmax of
its own vocab shard, and two scalar reductions over `tensor` pick the winner. Full logits are
never gathered. Sampling (`vocab_parallel_sample`) is too: a Gumbel-max over the kept tokens,
each device drawing noise for its own shard; top-k and top-p are exact over the whole vocabulary,
their boundaries found as float32 thresholds by rounds of counting over the shards (`kept_tokens`).
The sampling settings are per-row inputs of the compiled functions, so one executable serves any
mix of greedy and sampled rows; the cheapest of three such executables that serves a batch's rows
runs (`sampler_for`), as the top-k/top-p cut is what costs.

Every schedule of the layer plan decodes, because the model's forward carries each schedule's
pending outputs (ladder's late all-reduces) through the layers within one call.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import model as M
from .config import Config, ModelConfig, dtype_of
from .errors import LadderError
from .memory import free_device_bytes
from .mesh import BATCH, batch_shards, local_device

TENSOR = M.TENSOR
MIN_BUCKET = 16
# Bits of a top-k/top-p threshold fixed per round (`vocab_parallel_threshold`): 32 / RADIX_BITS
# rounds, each one psum of 2**RADIX_BITS - 1 sums per row (one fused pass over the shard).
RADIX_BITS = 4
ROWS = P(BATCH)
ROWS_BY_SEQ = P(BATCH, None)


class DecodeError(LadderError):
    """A request the decoder refuses before it compiles or allocates; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """The shapes a request compiles for. Requests with equal shapes reuse the same executables."""

    batch: int  # rows, padded up to a multiple of the mesh's data x fsdp size
    prompt_len: int  # the power-of-two bucket every prompt is right-padded to
    cache_len: int  # positions the KV cache holds: prompt bucket + max_new_tokens, at most max_seq_len


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens: greedy at temperature 0; top_k 0 and top_p 1 turn those off.
    The draws depend only on the seed and the token's position, not on the other rows."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self, vocab_size: int | None = None) -> Sampling:
        """Raise DecodeError (one line) for settings that cannot work (top_k above `vocab_size`,
        when given); return self."""
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise DecodeError(f"temperature={self.temperature}; give 0 (greedy) or a positive number")
        if self.top_k < 0 or (vocab_size is not None and self.top_k > vocab_size):
            most = "the vocabulary size" if vocab_size is None else vocab_size
            raise DecodeError(f"top_k={self.top_k}; give 0 (off) or 1..{most}")
        if not 0 < self.top_p <= 1:
            raise DecodeError(f"top_p={self.top_p}; give a number in (0, 1] (1 is off)")
        if not 0 <= self.seed < 2**31:
            raise DecodeError(f"seed={self.seed}; give an integer in 0..{2**31 - 1}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()
SAMPLERS = ("greedy", "temperature", "cuts")  # the draws a compiled function makes, cheapest first


def sampler_for(rows: Sequence[Sampling]) -> str:
    """The cheapest of SAMPLERS that gives every row the token "cuts" (the full sampler) gives it:
    "greedy" when every row is greedy, "temperature" when no sampled row cuts (top_k 0 and top_p
    1: a Gumbel-max over the whole vocabulary), else "cuts", whose `kept_tokens` passes over each
    row's vocab shard 16 times: for llama-3.2-1b (a 128k vocabulary) at 16 rows, XLA:GPU's paged
    decode step moves 11% more bytes with it (one H100, deviceless)."""
    sampled = [s for s in rows if not s.greedy]
    if not sampled:
        return "greedy"
    return "temperature" if all(s.top_k == 0 and s.top_p >= 1 for s in sampled) else "cuts"


def sampling_arrays(rows: Sequence[Sampling]) -> tuple[np.ndarray, ...]:
    """(temperature, top_k, top_p, seed) per row: the sampling inputs of the compiled functions."""
    return (
        np.array([s.temperature for s in rows], np.float32),
        np.array([s.top_k for s in rows], np.int32),
        np.array([s.top_p for s in rows], np.float32),
        np.array([s.seed for s in rows], np.int32),
    )


@dataclasses.dataclass
class Generation:
    """New tokens per prompt (without the prompt and without the EOS), with timings. Indexes and
    iterates like its list of token lists."""

    tokens: list[list[int]]
    prefill_seconds: float  # prefill and reading its first tokens to the host
    decode_seconds: float  # every decode step after that
    decode_steps: int

    def __getitem__(self, i):
        return self.tokens[i]

    def __len__(self):
        return len(self.tokens)

    def __iter__(self):
        return iter(self.tokens)


def bucket_length(n: int, max_seq_len: int) -> int:
    """Prompt lengths share a compiled prefill within powers of two (at least MIN_BUCKET)."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_seq_len)


def check_request(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Raise DecodeError (one line, saying what to change) for a request the model cannot serve."""
    if not prompts:
        raise DecodeError("no prompts given; pass at least one prompt")
    if max_new_tokens < 1:
        raise DecodeError(f"max_new_tokens={max_new_tokens}; ask for at least 1 new token")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise DecodeError(f"prompt {i} is empty; give it at least one token (a BOS token will do)")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise DecodeError(
                f"prompt {i} has token id {bad[0]} outside the vocabulary 0..{cfg.vocab_size - 1}; check the tokenizer matches the model"
            )
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        room = cfg.max_seq_len - longest
        fix = f"ask for at most {room} new tokens or shorten the prompt" if room > 0 else "shorten the prompt"
        raise DecodeError(
            f"{'the prompt' if len(prompts) == 1 else 'the longest prompt'} ({longest} tokens) plus max_new_tokens={max_new_tokens} is {longest + max_new_tokens}, "
            f"above model.max_seq_len={cfg.max_seq_len}; {fix}"
        )


def decode_shape(cfg: ModelConfig, mesh: Mesh, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> DecodeShape:
    """Check a request (see `check_request`) and return the shapes it runs with."""
    check_request(cfg, prompts, max_new_tokens)
    longest = max(len(p) for p in prompts)
    data = batch_shards(mesh)
    bucket = bucket_length(longest, cfg.max_seq_len)
    return DecodeShape(
        batch=-(-len(prompts) // data) * data,
        prompt_len=bucket,
        cache_len=min(cfg.max_seq_len, bucket + max_new_tokens),
    )


def cache_bytes(cfg: ModelConfig, mesh: Mesh, shape: DecodeShape) -> int:
    """KV cache bytes one device holds for this request."""
    return M.cache_bytes_per_device(cfg, (batch_shards(mesh), mesh.shape[TENSOR]), shape.batch, shape.cache_len)


def check_cache_fits(cfg: ModelConfig, mesh: Mesh, shape: DecodeShape, device=None) -> int:
    """Refuse a request whose KV cache would not fit next to what the device already holds.
    Returns the cache bytes per device."""
    need = cache_bytes(cfg, mesh, shape)
    device = local_device(mesh) if device is None else device
    free = free_device_bytes(device)
    if free is not None and need > free:
        raise DecodeError(
            f"the KV cache needs {need / 2**30:.2f} GiB per device (batch {shape.batch} x {shape.cache_len} positions) "
            f"but {device} has {free / 2**30:.2f} GiB free; lower the batch, the prompt length or max_new_tokens"
        )
    return need


# ---------------------------------------------------------------------------------------------
# The compiled pieces (local view, inside the model's shard_map)


def vocab_parallel_argmax(local_logits):
    """Greedy token ids from this device's vocab shard of the logits (..., V/T), without gathering
    them: each device proposes its best column, the largest value wins, and ties go to the lowest
    id, as jnp.argmax over the full row would do."""
    v_local = local_logits.shape[-1]
    best = local_logits.max(axis=-1)
    best_id = jnp.argmax(local_logits, axis=-1).astype(jnp.int32) + jax.lax.axis_index(TENSOR) * v_local
    top = jax.lax.pmax(best, TENSOR)
    return jax.lax.pmin(jnp.where(best == top, best_id, jnp.iinfo(jnp.int32).max), TENSOR)


def vocab_parallel_sample(local_logits, produced, temperature, top_k, top_p, seed, cuts: bool = True):
    """Token ids (B,) drawn from this device's vocab shard of the logits (B, V/T), per row:
    greedy where temperature is 0, else softmax(logits / temperature) cut to the top_k tokens
    (0: all) and then to the nucleus of mass top_p (renormalised after top-k, as transformers
    does), both over the whole vocabulary (`kept_tokens`). `produced` (B,): the position of the
    token drawn; with the seed it fixes the noise.

    Every token gets its own Gumbel noise, drawn by the device that holds it (a key folded with
    the position and the device index: one draw per step), and the best noisy logit among the
    kept tokens wins, picked as the argmax does: a Gumbel-max over the kept set. Draws depend on
    the seed, the position and the mesh's tensor size, not on other rows. Without `cuts` every
    token is kept (top_k and top_p are not read): the same tokens where rows cut nothing."""
    v_local = local_logits.shape[-1]
    scaled = local_logits / jnp.maximum(temperature, 1e-6)[:, None]
    stream = produced * jax.lax.axis_size(TENSOR) + jax.lax.axis_index(TENSOR)
    noise = jax.vmap(lambda s, i: jax.random.gumbel(jax.random.fold_in(jax.random.key(s), i), (v_local,)))(seed, stream)
    noisy = scaled + noise
    if cuts:
        noisy = jnp.where(kept_tokens(scaled, top_k, top_p), noisy, -jnp.inf)
    sampled = vocab_parallel_argmax(noisy)
    return jnp.where(temperature > 0, sampled, vocab_parallel_argmax(local_logits))


def ordered_keys(x):
    """uint32 keys that order as the float32 values `x` do (the sign bit flipped for positives,
    every bit for negatives): thresholds on values become thresholds on 32-bit integers."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def vocab_parallel_threshold(keys, weights, target):
    """Per row, the largest key t with sum(weights where key >= t) >= target over the whole
    vocabulary (0 if none), found from the top bit down, RADIX_BITS a round: each round sums the
    weights at or above 2**RADIX_BITS - 1 candidate thresholds, one psum over `tensor` for all.
    keys (B, V/T) uint32: this device's keys; weights (B, V/T), >= 0; target (B,). A round is one
    pass over the shard (compare, select and sum fuse into one reduction): no sort, which on a
    GPU costs a 128k vocabulary many passes."""
    digits = jnp.arange(1, 2**RADIX_BITS, dtype=jnp.uint32)
    t = jnp.zeros(keys.shape[:1], jnp.uint32)
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        candidates = t[:, None] | (digits << shift)[None]  # (B, D)
        at_or_above = keys[:, :, None] >= candidates[:, None, :]  # (B, V/T, D), fused into the sum
        sums = jax.lax.psum(jnp.where(at_or_above, weights[:, :, None], 0).sum(1), TENSOR)
        best = jnp.where(sums >= target[:, None], digits[None], 0).max(-1)
        t = t | (best << shift)
    return t


def rank_by_id(mask):
    """Per row, each True entry's 0-based rank by token id among the row's True entries over the
    whole vocabulary: the order a stable sort keeps among tied values. mask (B, V/T) bool."""
    counts = mask.sum(-1, dtype=jnp.int32)
    earlier = (
        jax.lax.all_gather(counts, TENSOR)
        * (jnp.arange(jax.lax.axis_size(TENSOR)) < jax.lax.axis_index(TENSOR))[:, None]
    )
    return jnp.cumsum(mask, -1, dtype=jnp.int32) - mask + earlier.sum(0)[:, None]


def kept_tokens(scaled, top_k, top_p):
    """Which tokens of this device's shard (B, V/T) transformers' top-k and then top-p keep, per
    row, as a stable descending sort of the whole row would rank them (ties by lower id first),
    without gathering the row. scaled: logits over the temperature; top_k 0 and top_p 1 are off.

    Top-k: the k-th largest value is the largest t with at least k values >= t; the tokens above
    it are kept, and of those equal to it the lowest ids until there are k. Top-p, over the top-k
    set renormalised: a token is kept while the mass ranked before it is below top_p, so the
    boundary is the largest t whose mass at or above it reaches top_p; of the tokens equal to it,
    those whose mass before (the mass above plus the lower ids equal to it) is below top_p."""
    keys = ordered_keys(scaled)
    t_k = vocab_parallel_threshold(keys, jnp.ones(keys.shape, jnp.int32), top_k)
    above = keys > t_k[:, None]
    tied = keys == t_k[:, None]
    n_above = jax.lax.psum(above.sum(-1, dtype=jnp.int32), TENSOR)
    in_top_k = above | (tied & (n_above[:, None] + rank_by_id(tied) < top_k[:, None]))
    in_top_k = in_top_k | (top_k[:, None] == 0)

    top = jax.lax.pmax(scaled.max(-1), TENSOR)
    weights = jnp.where(in_top_k, jnp.exp(scaled - top[:, None]), 0.0)
    target = top_p * jax.lax.psum(weights.sum(-1), TENSOR)
    t_p = vocab_parallel_threshold(keys, weights, target)
    above = in_top_k & (keys > t_p[:, None])
    tied = in_top_k & (keys == t_p[:, None])
    mass_above = jax.lax.psum(jnp.where(above, weights, 0).sum(-1), TENSOR)
    mass_before = mass_above[:, None] + rank_by_id(tied) * weights
    in_top_p = above | (tied & (mass_before < target[:, None])) | (top_p[:, None] >= 1)
    return in_top_k & in_top_p


def next_tokens(local_logits, produced, sampling: tuple, sampler: str):
    """The tokens `sampler` (one of SAMPLERS) draws; the greedy one reads no sampling inputs."""
    if sampler == "greedy":
        return vocab_parallel_argmax(local_logits)
    return vocab_parallel_sample(local_logits, produced, *sampling, cuts=sampler == "cuts")


def vocab_parallel_logprobs(local_logits, tokens, n: int):
    """(log p(token) (B,), the n most likely ids (B, n), their log p (B, n)) from this device's
    vocab shard of the logits (B, V/T): the evaluation harness's float32 log-softmax
    (`model.vocab_parallel_nll`) of the model's own distribution, before any temperature or
    cut. The n best need no gather of the logits: each device offers its n best, one all-gather
    of n x tensor candidates per row, the best n of those (ties to the lower id)."""
    v_local = local_logits.shape[-1]
    values, ids = jax.lax.top_k(local_logits, min(n, v_local))
    ids = ids.astype(jnp.int32) + jax.lax.axis_index(TENSOR) * v_local
    values, ids = (jax.lax.all_gather(x, TENSOR, axis=1, tiled=True) for x in (values, ids))
    top_ids = jnp.take_along_axis(ids, jax.lax.top_k(values, n)[1], axis=1)
    top_ids = jax.lax.pmin(top_ids, TENSOR)  # equal on every device; says so to shard_map's types
    logprobs = -M.vocab_parallel_nll(local_logits[:, None, :], jnp.concatenate([tokens[:, None], top_ids], axis=1))
    return logprobs[:, 0], top_ids, logprobs[:, 1:]


def logprob_specs(logprobs: int) -> tuple:
    """The extra output of the prefill and the step with `logprobs` > 0."""
    return ((ROWS, ROWS_BY_SEQ, ROWS_BY_SEQ),) if logprobs else ()


@functools.lru_cache(maxsize=32)
def prefill_fn(cfg: ModelConfig, mesh: Mesh, cache_len: int, sampler: str = "greedy", logprobs: int = 0):
    """jit(params, tokens (B, S) right-padded, lengths (B,)[, sampling]) -> (first new token (B,), KV cache).

    With a `sampler` other than greedy (`sampler_for`), the call takes the four per-row arrays of
    `sampling_arrays` after the lengths.
    With `logprobs` > 0 it also returns (log p of the first tokens, the `logprobs` most likely
    ids, their log p): see `vocab_parallel_logprobs`.

    The cache is created here, so a generation allocates it once. The prompt attends over a
    cache of its own length S, and only then is the cache padded to `cache_len`: attention over
    the empty positions would cost S x cache_len scores for nothing. Only the last prompt
    position of each row goes through the LM head; XLA drops the full logits the forward returns.
    """
    tensor = mesh.shape[TENSOR]
    _, kv_slots, _, hd = M.cache_shape(cfg, tensor, 1, cache_len)

    def body(model, tokens, lengths, *sampling):
        rows, prompt_len = tokens.shape
        empty = jnp.zeros((rows, kv_slots // tensor, prompt_len, hd), dtype_of(cfg.dtype))
        x, cache, _ = model.residual(tokens, M.default_positions(tokens), cache=[(empty, empty)] * cfg.n_layers)
        room = ((0, 0), (0, 0), (0, cache_len - prompt_len), (0, 0))
        cache = [(jnp.pad(k, room), jnp.pad(v, room)) for k, v in cache]
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # (B, 1, D)
        logits = model.head(last)[:, 0]
        new = next_tokens(logits, lengths, sampling, sampler)
        extra = (vocab_parallel_logprobs(logits, new, logprobs),) if logprobs else ()
        return new, cache, *extra

    specs = M.cache_specs(cfg)
    in_specs = (ROWS_BY_SEQ, ROWS, *sampling_specs(sampler != "greedy"))
    return jax.jit(M.sharded(cfg, mesh, body, in_specs, (ROWS, specs, *logprob_specs(logprobs))))


def sampling_specs(sample: bool) -> tuple:
    return (ROWS,) * 4 if sample else ()


@functools.lru_cache(maxsize=32)
def step_fn(cfg: ModelConfig, mesh: Mesh, sampler: str = "greedy", logprobs: int = 0):
    """jit(params, tokens (B,), positions (B,), cache[, sampling]) -> (next tokens, positions + 1, cache).

    With a `sampler` other than greedy, the call takes the four per-row arrays of `sampling_arrays`
    after the cache.
    With `logprobs` > 0 it also returns (log p of the next tokens, the `logprobs` most likely
    ids, their log p): see `vocab_parallel_logprobs`.

    Outputs feed the next call as they are, so a generation makes no host-to-device copies after
    the prefill. The cache is donated: each step updates it in place.
    """

    def body(model, tokens, positions, cache, *sampling):
        logits, cache = model(tokens[:, None], positions[:, None], cache=cache)
        new = next_tokens(logits[:, 0], positions + 1, sampling, sampler)
        extra = (vocab_parallel_logprobs(logits[:, 0], new, logprobs),) if logprobs else ()
        return new, positions + 1, cache, *extra

    specs = M.cache_specs(cfg)
    in_specs = (ROWS, ROWS, specs, *sampling_specs(sampler != "greedy"))
    out_specs = (ROWS, ROWS, specs, *logprob_specs(logprobs))
    return jax.jit(M.sharded(cfg, mesh, body, in_specs, out_specs), donate_argnums=3)


@functools.lru_cache(maxsize=32)
def paged_step_fn(cfg: ModelConfig, mesh: Mesh, logprobs: int = 0, sampler: str = "cuts"):
    """`step_fn` over a paged KV cache: jit(params, tokens (B,), positions (B,), pages,
    page_table (B, W), temperature, top_k, top_p, seed) -> (next tokens, next positions, pages[,
    logprobs]). pages: per layer (k, v) pools of (pages, page_size, kv slots, head_dim), the pages
    over `data` (each data shard a pool of its own, which its rows' page ids index) and the kv
    slots over `tensor`, as the dense cache's rows and slots (`model.PAGES_SPEC`). The pools are
    donated. A row at position 0 is idle (a decoding row is past its prompt's first token) and
    stays there; the others move on by one, so the outputs feed the next step as they are. Every
    `sampler` takes the sampling arrays (the greedy one ignores them): one call for all three."""

    def body(model, tokens, positions, pages, page_table, *sampling):
        logits, pages = model(tokens[:, None], positions[:, None], cache=pages, page_table=page_table)
        new = next_tokens(logits[:, 0], positions + 1, sampling, sampler)
        extra = (vocab_parallel_logprobs(logits[:, 0], new, logprobs),) if logprobs else ()
        return new, jnp.where(positions > 0, positions + 1, 0), pages, *extra

    specs = M.page_specs(cfg)
    in_specs = (ROWS, ROWS, specs, ROWS_BY_SEQ, *sampling_specs(True))
    out_specs = (ROWS, ROWS, specs, *logprob_specs(logprobs))
    return jax.jit(M.sharded(cfg, mesh, body, in_specs, out_specs), donate_argnums=3)


def paged_prefill_fn(cfg: ModelConfig, mesh: Mesh, logprobs: int = 0, prompt_scores: bool = False):
    """A chunk of each row's prompt into a paged KV cache: jit(params, tokens (P, C), positions (P, C),
    pages, page_table (P, W), last (P,)[, targets (P, C)], temperature, top_k, top_p, seed) ->
    (next token (P,), pages[, logprobs][, prompt scores]).

    Row b's tokens sit at positions[b] (absolute: the chunk's start + t; -1 pads the row and is
    written nowhere). Each layer writes the chunk's keys and values into the row's pages, then
    the chunk's queries attend over the row's pages (`attention.paged_attention`), so earlier
    chunks and a cached prefix are read from there. Only the row's last real token (index
    last[b]) goes through the LM head: the next token, drawn as the decode step draws, is the
    prompt's first new token when the chunk ends the prompt (else it is not used). Rows are over
    `data` as the pools are: a row's page ids index its data shard's pool. The pools are donated;
    the compiled shapes are (P, C), which the engine keeps to a few buckets.

    With `prompt_scores` (and `logprobs` > 0) every position goes through the LM head and the
    call also returns, for each position, log p of `targets` there (the prompt's next token) and
    the `logprobs` most likely ids and their log p: (P, C), (P, C, n), (P, C, n). That is the
    prompt's log-probabilities (OpenAI's echo with logprobs), in the same pass as the prefill.

    One jitted function per argument values, however they are spelled (an lru_cache alone keys
    `f(a, b, c)` and `f(a, b, c, False)` apart, and the engine's precompiled programs would be
    another function's)."""
    return _paged_prefill_fn(cfg, mesh, logprobs, prompt_scores)


@functools.lru_cache(maxsize=32)
def _paged_prefill_fn(cfg: ModelConfig, mesh: Mesh, logprobs: int, prompt_scores: bool):

    def body(model, tokens, positions, pages, page_table, last, *rest):
        targets, sampling = (rest[0], rest[1:]) if prompt_scores else (None, rest)
        x, pages, _ = model.residual(tokens, positions, cache=pages, page_table=page_table)
        logits = model.head(jnp.take_along_axis(x, last[:, None, None], axis=1))[:, 0]
        produced = jnp.take_along_axis(positions, last[:, None], axis=1)[:, 0] + 1
        new = next_tokens(logits, produced, sampling, "cuts")
        extra = (vocab_parallel_logprobs(logits, new, logprobs),) if logprobs else ()
        if prompt_scores:
            rows, chunk = tokens.shape
            every = model.head(x).reshape(rows * chunk, -1)  # (P x C, V/T): this device's vocab shard
            chosen, ids, values = vocab_parallel_logprobs(every, targets.reshape(-1), logprobs)
            extra += ((chosen.reshape(rows, chunk), ids.reshape(rows, chunk, -1), values.reshape(rows, chunk, -1)),)
        return new, pages, *extra

    specs = M.page_specs(cfg)
    scores_in = (ROWS_BY_SEQ,) if prompt_scores else ()
    scores_out = ((ROWS_BY_SEQ, P(BATCH, None, None), P(BATCH, None, None)),) if prompt_scores else ()
    in_specs = (ROWS_BY_SEQ, ROWS_BY_SEQ, specs, ROWS_BY_SEQ, ROWS, *scores_in, *sampling_specs(True))
    out_specs = (ROWS, specs, *logprob_specs(logprobs), *scores_out)
    return jax.jit(M.sharded(cfg, mesh, body, in_specs, out_specs), donate_argnums=3)


def abstract_paged_step_args(cfg: ModelConfig, mesh: Mesh, batch: int, pages: int, page_size: int, width: int):
    """The arguments of `paged_step_fn` as sharded abstract values: `batch` rows with page tables
    of `width` pages over pools of `pages` pages (in all) of `page_size` positions."""
    params, per_row, _, _ = abstract_step_args(cfg, mesh, batch, 1)
    _, slots, _, hd = M.cache_shape(cfg, mesh.shape[TENSOR], 1, 1)
    pool = jax.ShapeDtypeStruct(
        (slots, pages, page_size, hd), dtype_of(cfg.dtype), sharding=NamedSharding(mesh, M.PAGES_SPEC)
    )
    table = jax.ShapeDtypeStruct((batch, width), jnp.int32, sharding=NamedSharding(mesh, ROWS_BY_SEQ))
    rows = (per_row, jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=per_row.sharding))
    sampling = (rows[1], rows[0], rows[1], rows[0])  # temperature, top_k, top_p, seed
    return params, per_row, per_row, [(pool, pool)] * cfg.n_layers, table, *sampling


def abstract_step_args(cfg: ModelConfig, mesh: Mesh, batch: int, cache_len: int) -> tuple:
    """(params, tokens, positions, cache) of a decode step as sharded abstract values: what the
    step compiles for, with nothing allocated."""
    per_row = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(mesh, ROWS))
    kv = jax.ShapeDtypeStruct(
        M.cache_shape(cfg, mesh.shape[TENSOR], batch, cache_len),
        dtype_of(cfg.dtype),
        sharding=NamedSharding(mesh, M.CACHE_SPEC),
    )
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        M.abstract_params(cfg),
        M.param_shardings(cfg, mesh),
    )
    return params, per_row, per_row, [(kv, kv)] * cfg.n_layers


def precompile(cfg: ModelConfig, mesh: Mesh, params, shape: DecodeShape, sampler: str = "greedy") -> float:
    """Compile the prefill and the decode step for `shape` ahead of time; returns the seconds.

    jit keeps executables compiled this way, so a generation of the same shape compiles nothing.
    """
    start = time.perf_counter()
    tokens = jax.ShapeDtypeStruct((shape.batch, shape.prompt_len), jnp.int32, sharding=NamedSharding(mesh, ROWS_BY_SEQ))
    _, per_row, _, cache = abstract_step_args(cfg, mesh, shape.batch, shape.cache_len)
    rows = (per_row, jax.ShapeDtypeStruct((shape.batch,), jnp.float32, sharding=per_row.sharding))
    sampling = (rows[1], rows[0], rows[1], rows[0]) if sampler != "greedy" else ()
    prefill_fn(cfg, mesh, shape.cache_len, sampler).lower(params, tokens, per_row, *sampling).compile()
    step_fn(cfg, mesh, sampler).lower(params, per_row, per_row, cache, *sampling).compile()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# The host loop


def generate(
    cfg: Config | ModelConfig,
    mesh: Mesh,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    sampling: Sampling | Sequence[Sampling] = GREEDY,
) -> Generation:
    """Continuation of each prompt (token ids, BOS included if the model wants one): greedy, or
    drawn with `sampling` (one for all prompts or one per prompt).

    A row stops at `eos_id` (not included in its tokens; a set of ids stops at any of them) or
    after `max_new_tokens`; the loop stops
    when every row has. `on_token(row, token)` is called for each new token as soon as it reaches
    the host, in order per row. Prompts may differ in length; each gets the tokens it would get alone.
    """
    cfg = cfg.model if isinstance(cfg, Config) else cfg
    shape = decode_shape(cfg, mesh, prompts, max_new_tokens)
    n = len(prompts)
    rows_sampling = [sampling] * n if isinstance(sampling, Sampling) else list(sampling)
    if len(rows_sampling) != n:
        raise DecodeError(f"{len(rows_sampling)} sampling settings for {n} prompts; give one, or one per prompt")
    for s in rows_sampling:
        s.check(cfg.vocab_size)
    check_cache_fits(cfg, mesh, shape)
    sampler = sampler_for(rows_sampling)
    tokens, lengths = padded_prompts(cfg, shape, prompts)
    sink = TokenSink(n, eos_id, max_new_tokens, on_token)

    start = time.perf_counter()
    lengths = jax.device_put(lengths, NamedSharding(mesh, ROWS))
    per_row = sampling_arrays(rows_sampling + [GREEDY] * (shape.batch - n)) if sampler != "greedy" else ()
    per_row = tuple(jax.device_put(a, NamedSharding(mesh, ROWS)) for a in per_row)
    new, cache = prefill_fn(cfg, mesh, shape.cache_len, sampler)(
        params, jax.device_put(tokens, NamedSharding(mesh, ROWS_BY_SEQ)), lengths, *per_row
    )
    sink.take(to_host(new))
    prefill_seconds = time.perf_counter() - start

    # XLA:CPU with fake devices deadlocks when many steps with collectives are in flight
    # (docs/architecture.md, "Facts"), so there each step is read back before the next is sent. An accelerator gets
    # the next step queued while the host reads this one.
    in_flight = 1 if mesh.devices.flat[0].platform == "cpu" else 2
    start = time.perf_counter()
    step = step_fn(cfg, mesh, sampler)
    steps = decode_steps(step, params, new, lengths, cache, per_row, sink, max_new_tokens - 1, in_flight)
    return Generation(sink.tokens, prefill_seconds, time.perf_counter() - start, steps)


def to_host(x) -> np.ndarray:
    """A step's output on this host. Rows sharded over devices of other processes (mesh.data
    spanning hosts) are gathered from them: every process calls this at the same point."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def padded_prompts(cfg: ModelConfig, shape: DecodeShape, prompts) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (batch, prompt_len) padded with pad_id, each row's length). Rows that only pad the
    batch up to the data axis get a one-token prompt; their tokens are dropped."""
    rows = list(prompts) + [[cfg.pad_id]] * (shape.batch - len(prompts))
    tokens = np.full((shape.batch, shape.prompt_len), cfg.pad_id, np.int32)
    for r, p in enumerate(rows):
        tokens[r, : len(p)] = p
    return tokens, np.array([len(p) for p in rows], np.int32)


class TokenSink:
    """The new tokens of each of `n` rows as they reach the host: a row is done at an end id or
    after `max_new_tokens`; rows past `n` (batch padding) are ignored."""

    def __init__(self, n: int, eos_id, max_new_tokens: int, on_token=None):
        self.stops = {eos_id} if eos_id is None or isinstance(eos_id, int) else set(eos_id)
        self.max_new_tokens, self.on_token = max_new_tokens, on_token
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.done = [False] * n

    def take(self, new_tokens) -> None:
        for r, row in enumerate(self.tokens):
            if self.done[r]:
                continue
            t = int(new_tokens[r])
            if t in self.stops:
                self.done[r] = True
                continue
            row.append(t)
            if self.on_token is not None:
                self.on_token(r, t)
            self.done[r] = len(row) == self.max_new_tokens

    def all_done(self) -> bool:
        return all(self.done)


def decode_steps(step, params, new, positions, cache, per_row, sink: TokenSink, max_steps: int, max_in_flight: int):
    """Run decode steps until every row is done or `max_steps`, with up to `max_in_flight` steps
    queued before the host reads the oldest; returns how many ran."""
    in_flight = collections.deque()
    steps = 0
    while steps < max_steps and not sink.all_done():
        new, positions, cache = step(params, new, positions, cache, *per_row)
        in_flight.append(new)
        steps += 1
        if len(in_flight) >= max_in_flight:
            sink.take(to_host(in_flight.popleft()))
    while in_flight:
        sink.take(to_host(in_flight.popleft()))
    return steps
