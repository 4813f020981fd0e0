"""Continuous batching over a paged KV cache: requests coming and going, each holding the pages it uses.

The cache is, per layer, a pool of fixed-size pages (`page_size` positions each) that lives as long
as the engine; each data shard has a pool of its own for its rows. A running request has a row of
the compiled decode batch (`max_running` rows) and a page table row: position p of the request is
at offset p % page_size of page table[row, p // page_size]. A request is admitted, oldest first,
when a row is free and its shard's pool has the pages of its prompt and first new token; it takes
its prompt's pages at once and the others as its cache grows, one at a time, and gives them all
back when it ends (finished, stopped or cancelled). When a growing request finds its shard's pool
empty, the newest request on the shard is preempted, as vLLM's scheduler does: its pages go back
and it waits, before any new request, to be prefilled again, its prompt and the tokens it made so
far (often from the prefix cache), and it goes on where it was with the tokens it would have made
(a token's draw depends on its seed and position only). A request alone on its shard always
fits (`check`), so the oldest always makes progress.

Prompts are prefilled straight into their pages (`decode.paged_prefill_fn`), several requests in
one call and a long prompt in chunks: each step prefills up to `prefill_chunk` prompt tokens per
data shard (the chunk of the first waiting prompt, padded to a power of two, decides the call's
chunk length; as many rows of that length as the budget holds go with it), then runs one decode
step of the requests already decoding, so a long prompt no longer stalls the running streams.
A request decodes from the step after its last chunk. All decoding rows advance together through
one compiled decode step (`decode.paged_step_fn`, per-row positions, page tables and sampling
inputs), whose attention reads each row's pages through its page table (an XLA gather), so
requests of any length and sampling settings share it and nothing recompiles as they come and go.
Of its three compiled draws (`decode.SAMPLERS`) a step runs the cheapest its rows need: greedy,
temperature only, or with top-k/top-p cuts, whose threshold search passes over the logits 16
times. Rows that are idle or still prefilling have no pages in the decode step: they write
nothing.

Prefix caching (on unless `prefix_cache=False`), as vLLM's: each full page of a prompt has a key,
a hash of its tokens and the previous page's key, and once its keys and values are written the
page is kept under that key. A new prompt takes the cached pages of its longest cached prefix
(shared read-only, reference-counted; at most up to its last token, which is always prefilled
so that its first token has logits) and prefills from there. A finished request's cached pages
stay in the pool with nobody holding them, count as free for admission, and are evicted least
recently used when a fresh page is needed and no uncached page is free.

Samples of one prompt (`submit_group`, OpenAI's `n`) share its prefill: the first sample on a data
shard prefills the prompt, and the others on that shard share its full pages before the prompt's
last token and prefill only the rest (less than a page or one page), in the same call as the
first sample's last chunk or later; each draws its first token with its own seed. Every step
also returns each row's log-probabilities (the chosen token's and the MAX_LOGPROBS most likely),
read to the host only when a request asks for them.

A request may also ask for its prompt's log-probabilities (`prompt_logprobs`, OpenAI's echo with
logprobs, which lm-eval's loglikelihood over HTTP sends): its prefill calls then run every
position through the LM head (`decode.paged_prefill_fn(prompt_scores=True)`, compiled when first
needed), in the same pass that writes its pages. Such a request takes nothing from the prefix
cache and shares no pages with its group's other samples, since the positions it did not prefill
would have no scores.

One thread drives the engine (`run` or `serve_forever`); `submit` may be called from any thread.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import hashlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from . import decode
from . import model as M
from .config import ModelConfig, dtype_of
from .decode import GREEDY, ROWS, ROWS_BY_SEQ, DecodeError, Sampling
from .memory import GiB, device_memory, free_device_bytes, step_bytes
from .mesh import batch_shards, broadcast_from_first, local_device

log = logging.getLogger("ladder_jax.engine")
PAGE_SIZE = 16  # positions per KV cache page (vLLM's default block size)
PREFILL_CHUNK = 512  # prompt tokens prefilled per step and data shard (vLLM's max_num_batched_tokens, in spirit)
MAX_LOGPROBS = 20  # the most likely tokens a request may ask log-probabilities for (OpenAI's limit)
KV_MEMORY = 0.9  # the share of each device's memory `serve` fills, KV pages last (vLLM's gpu_memory_utilization)


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """log p of a generated token and of the `top` most likely tokens at its position (ids, log p),
    under the model's own distribution (before temperature and cuts)."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt to continue. `on_token(token)` runs on the engine's thread for every new token
    and returns False to end the request there (a stop string, say); `on_done(reason)` runs once
    at the end with "stop" (a stop id, or on_token said so), "length", "cancelled" or "error"."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: Sampling = GREEDY
    stop_ids: frozenset[int] = frozenset()
    on_token: Callable[[int], bool | None] | None = None
    on_done: Callable[[str], None] | None = None
    logprobs: int | None = None  # None: none; k: each token's log p and the k most likely (0..MAX_LOGPROBS)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens
    tokens: list[int] = dataclasses.field(default_factory=list)
    token_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # one per token, if asked
    # One per prompt token if asked, filled by the prefill: None for the first (nothing before it).
    prompt_token_logprobs: list[TokenLogprobs | None] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    cancelled: bool = False  # set from any thread; the engine frees its row and pages before its next step
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    rid: int = -1  # over several processes: its number, the same on every process
    stopped_at: int | None = None  # over several processes: tokens it had when on_token said stop
    preemptions: int = 0  # times the engine took its pages back to prefill it again later

    @property
    def context(self) -> Sequence[int]:
        """What its prefill reads: the prompt, and after a preemption the tokens made so far."""
        return [*self.prompt, *self.tokens] if self.tokens else self.prompt

    @property
    def scores_prompt(self) -> bool:
        """Its prefill still has the prompt's log-probabilities to compute."""
        return self.prompt_logprobs is not None and len(self.prompt_token_logprobs) < len(self.prompt)

    def spec(self) -> dict:
        """What another process needs to run this request in step (no callbacks)."""
        s = self.sampling
        return {
            "rid": self.rid,
            "prompt": list(self.prompt),
            "max_new_tokens": self.max_new_tokens,
            "sampling": [s.temperature, s.top_k, s.top_p, s.seed],
            "stop_ids": sorted(self.stop_ids),
            "logprobs": self.logprobs,
            "prompt_logprobs": self.prompt_logprobs,
        }

    @classmethod
    def of_spec(cls, spec: dict) -> Request:
        return cls(
            spec["prompt"],
            spec["max_new_tokens"],
            Sampling(*spec["sampling"]),
            frozenset(spec["stop_ids"]),
            logprobs=spec["logprobs"],
            prompt_logprobs=spec["prompt_logprobs"],
            rid=spec["rid"],
        )

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass(eq=False)
class Prefill:
    """A request whose prompt is being prefilled into its row's pages: positions before `done`
    are there (or go there with its leader's chunks). `leader`: the sample of the same prompt on
    the same data shard whose first pages it shares; it goes once the leader's chunks reach `done`."""

    request: Request
    slot: int
    done: int
    leader: Prefill | None = None

    @property
    def left(self) -> int:
        return len(self.request.context) - self.done


def page_keys(prompt: Sequence[int], page_size: int) -> list[bytes]:
    """A key per full page of the prompt: a hash of the page's tokens and the previous page's key
    (vLLM's block hash), so equal keys mean equal prefixes up to that page's end."""
    ids, keys, key = np.asarray(prompt, np.int64), [], b""
    for start in range(0, len(ids) - page_size + 1, page_size):
        key = hashlib.blake2b(key + ids[start : start + page_size].tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys


@functools.lru_cache(maxsize=8)
def merge_fn(mesh: Mesh):
    """jit(tokens (B,), positions (B,) on the device, host (B, 3): set, token, position) -> the
    device's tokens and positions, the host's in the rows it set. A shard_map, as the decode step
    is: its outputs are spelled with the step's outputs' sharding, so either feeds the step and
    the step compiles once."""

    def merge(tokens, positions, host):
        keep = host[:, 0] == 0
        return jnp.where(keep, tokens, host[:, 1]), jnp.where(keep, positions, host[:, 2])

    return jax.jit(jax.shard_map(merge, mesh=mesh, in_specs=(ROWS, ROWS, ROWS_BY_SEQ), out_specs=(ROWS, ROWS)))


@functools.lru_cache(maxsize=8)
def rows_fn(mesh: Mesh, rows: int):
    """jit() -> (tokens, positions) of `rows` rows on the device, zeros (the host sets them all),
    made by a shard_map for the same reason as `merge_fn`'s outputs."""
    local = rows // batch_shards(mesh)
    return jax.jit(
        jax.shard_map(lambda: (jnp.zeros(local, jnp.int32),) * 2, mesh=mesh, in_specs=(), out_specs=(ROWS, ROWS))
    )


def _floor_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


class Engine:
    """`max_running` requests run at once (rounded up to the data shards), each with up to
    `cache_len` positions (default model.max_seq_len), over `kv_pages` pages of `page_size`
    positions in all (default: enough for every row at cache_len, the bytes fixed slots took; or,
    with `kv_memory`, as many as fill that share of each device's memory: `pages_that_fit`).
    Each step prefills up to `prefill_chunk` prompt tokens per data shard; `prefix_cache` keeps
    full prompt pages for later prompts that share them."""

    def __init__(
        self,
        cfg: ModelConfig,
        mesh: Mesh,
        params,
        max_running: int = 8,
        cache_len: int | None = None,
        page_size: int = PAGE_SIZE,
        kv_pages: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        prefix_cache: bool = True,
        kv_memory: float | None = None,
    ):
        self.cfg, self.mesh, self.params = cfg, mesh, params
        self.cache_len = cache_len or cfg.max_seq_len
        if not 0 < self.cache_len <= cfg.max_seq_len:
            raise DecodeError(f"cache_len={self.cache_len}; give 1..model.max_seq_len={cfg.max_seq_len}")
        if min(max_running, page_size, prefill_chunk) < 1 or (kv_pages is not None and kv_pages < 1):
            raise DecodeError(
                f"max_running={max_running}, page_size={page_size}, kv_pages={kv_pages}, "
                f"prefill_chunk={prefill_chunk}; give at least 1 of each"
            )
        if kv_memory is not None and not 0 < kv_memory <= 1:
            raise DecodeError(f"--kv-memory {kv_memory}: give the share of each device's memory to fill, in (0, 1]")
        self.data = data = batch_shards(mesh)
        self.slots = -(-max_running // data) * data  # every data shard holds the same number of rows
        self.page_size, self.prefill_chunk, self.prefix_cache = page_size, prefill_chunk, prefix_cache
        self.table_width = -(-self.cache_len // page_size)  # pages a request may hold
        if kv_pages is None and kv_memory is not None:
            kv_pages = self.pages_that_fit(kv_memory)
        kv_pages = self.slots * self.table_width if kv_pages is None else kv_pages
        self.shard_pages = -(-kv_pages // data)  # each data shard's pool
        self.total_pages = self.shard_pages * data
        tensor = mesh.shape[decode.TENSOR]
        self.kv_bytes = M.cache_bytes_per_device(cfg, (data, tensor), self.total_pages, page_size)
        free = free_device_bytes(local_device(mesh))
        if free is not None and self.kv_bytes > free:
            raise DecodeError(
                f"the KV cache's {self.total_pages} pages of {page_size} positions need {self.kv_bytes / 2**30:.2f} GiB "
                f"per device but {free / 2**30:.2f} GiB are free; give fewer pages (--kv-pages) or fewer positions"
            )
        # Made by a shard_map as the step's output is, so both carry the same sharding.
        _, kv_slots, _, hd = M.cache_shape(cfg, tensor, 1, 1)
        local = (kv_slots // tensor, self.shard_pages, page_size, hd)
        zeros = jax.shard_map(
            lambda: [(jnp.zeros(local, dtype_of(cfg.dtype)),) * 2 for _ in range(cfg.n_layers)],
            mesh=mesh,
            in_specs=(),
            out_specs=M.page_specs(cfg),
        )
        self.pages = jax.jit(zeros)()
        # Page tables hold each shard's own page ids; the pool size (no page) writes and reads nothing.
        self.table = np.full((self.slots, self.table_width), self.shard_pages, np.int32)
        self.refs = np.zeros((data, self.shard_pages), np.int32)  # rows holding each page
        self.free_pages = [list(range(self.shard_pages - 1, -1, -1)) for _ in range(data)]  # held by none, uncached
        self.cached: list[dict[bytes, int]] = [{} for _ in range(data)]  # prefix key -> page
        self.page_key: list[dict[int, bytes]] = [{} for _ in range(data)]  # page -> prefix key
        # Cached pages no row holds, least recently used first: free for admission, evicted in this order.
        self.evictable: list[collections.OrderedDict[int, None]] = [collections.OrderedDict() for _ in range(data)]
        self.unpromised = [self.shard_pages] * data  # pages of each shard held by none and promised to none
        self.promised = np.zeros(self.slots, np.int64)  # pages each row's request may still take
        self.active: list[Request | None] = [None] * self.slots
        self.decoding = np.zeros(self.slots, bool)  # rows past their prefill
        self.prefilling: list[Prefill] = []  # in the order they came
        self.tokens = np.full(self.slots, cfg.pad_id, np.int32)
        self.positions = np.zeros(self.slots, np.int32)
        self.sampling = [GREEDY] * self.slots
        self.waiting: queue.Queue[list[Request] | None] = queue.Queue()  # groups of samples of one prompt
        self.held: list[Request] = []  # the next group, until it has a row and its pages per sample
        self.preempted: list[Request] = []  # waiting to be prefilled again, oldest first; before any new group
        self.admitted = np.zeros(self.slots, np.int64)  # when each row's request started (`_make_room`)
        self.starts = itertools.count()
        self.preemptions = 0  # requests preempted so far
        self.host_set = np.zeros(self.slots, bool)  # rows whose next token and position the host set
        self._reset_rows()  # last_new, last_positions: the next step's tokens and positions, on the device
        self.sent: dict[str, tuple[np.ndarray, jax.Array]] = {}  # `_sent`: the last copy of each input
        # Steps dispatched and not yet read. XLA:CPU with fake devices deadlocks with more than
        # one in flight (decode.generate); an accelerator gets the next step queued while the
        # host reads this one.
        self.in_flight: collections.deque = collections.deque()
        self.max_in_flight = 1 if mesh.devices.flat[0].platform == "cpu" else 2
        self.steps = 0
        self.prefills = 0  # prefill calls (each a chunk of one or more prompts)
        self.prefill_tokens = 0  # prompt tokens prefilled
        self.prefix_queries = self.prefix_hits = 0  # prompt tokens looked up in the prefix cache, found there
        self.finished: collections.Counter[str] = collections.Counter()  # requests ended, by reason
        self._stop = threading.Event()
        # Over several processes (jax.distributed) every process runs this engine in step: process
        # 0 takes the requests, and at the start of each step tells the others what arrived, was
        # cancelled or stopped (`_exchange`), so that all make the same calls with the same inputs.
        self.hosts = jax.process_count() > 1
        self.rids = itertools.count()
        self.known: dict[int, Request] = {}  # rid -> request not yet done
        self.agreed: collections.deque[list[Request]] = collections.deque()  # groups every process has
        self.to_cancel: set[int] = set()  # rids every process cancels this step
        self.to_stop: list[int] = []  # rids whose on_token said stop, to tell the others
        self.ended = False  # process 0 stopped: every process leaves serve_forever

    def pages_that_fit(self, share: float) -> int | None:
        """KV pages in all that fill `share` of each device's memory (JAX's allocator limit) next to
        what it holds now (the weights) and the largest temporaries of the programs the engine runs
        (`program_temporaries`); None where the device does not report its memory (XLA:CPU)."""
        limit_in_use = device_memory(local_device(self.mesh))
        if limit_in_use is None:
            return None
        limit, in_use = limit_in_use
        temporaries = self.program_temporaries()
        per_page = M.cache_bytes_per_device(  # one page in each data shard's pool
            self.cfg, (self.data, self.mesh.shape[decode.TENSOR]), self.data, self.page_size
        )
        left = share * limit - in_use - temporaries
        pages = max(int(left // per_page), 0)
        if jax.process_count() > 1:  # every process must make the same pools: the smallest
            pages = int(np.min(multihost_utils.process_allgather(np.int64(pages))))
        if pages < self.table_width:
            raise DecodeError(
                f"--kv-memory {share:g} of {limit / GiB:.2f} GiB per device leaves {max(left, 0) / GiB:.2f} GiB for the "
                f"KV cache after {in_use / GiB:.2f} GiB in use (the weights) and {temporaries / GiB:.2f} GiB of the "
                f"largest program's temporaries: fewer than the {self.table_width} pages of {self.page_size} positions "
                f"one request of {self.cache_len} positions may hold; raise --kv-memory, lower --max-len or "
                "--prefill-chunk, or give --kv-pages"
            )
        return pages * self.data

    def program_temporaries(self) -> int:
        """The largest temporaries per device (XLA's memory_analysis) of the decode step (its
        costliest draw) and the longest prefill call, with and without prompt scores (whose
        logits of every position are the largest temporaries), compiled over pools of one page
        per shard: they do not grow with the pools, which the programs update in place."""
        n, w = self.slots, self.table_width
        args = decode.abstract_paged_step_args(self.cfg, self.mesh, n, self.data, self.page_size, w)
        params, per_row, _, pools, table, *sampling = args
        step = decode.paged_step_fn(self.cfg, self.mesh, MAX_LOGPROBS, "cuts")
        compiled = [step.lower(self.params, per_row, per_row, pools, table, *sampling).compile()]
        per_shard, chunk = max(self.prefill_shapes(), key=lambda shape: shape[0] * shape[1])
        n = per_shard * self.data
        tokens = jax.ShapeDtypeStruct((n, chunk), jnp.int32, sharding=NamedSharding(self.mesh, ROWS_BY_SEQ))
        table = jax.ShapeDtypeStruct((n, w), jnp.int32, sharding=table.sharding)
        rows = lambda x: jax.ShapeDtypeStruct((n,), x.dtype, sharding=x.sharding)  # noqa: E731
        for scoring in (False, True):
            prefill = decode.paged_prefill_fn(self.cfg, self.mesh, MAX_LOGPROBS, scoring)
            targets = (tokens,) if scoring else ()
            args = (tokens, tokens, pools, table, rows(per_row), *targets, *map(rows, sampling))
            compiled.append(prefill.lower(self.params, *args).compile())
        return max(step_bytes(c)["temporaries"] for c in compiled)

    def prefill_shapes(self) -> list[tuple[int, int]]:
        """(rows per data shard, chunk length) of every prefill call `_prefill_batch` can make:
        chunks of a bucket length up to `prefill_chunk`, rows a power of two within the budget
        and the rows of a shard."""
        lengths = sorted(
            {decode.bucket_length(1 << k, self.prefill_chunk) for k in range(self.prefill_chunk.bit_length() + 1)}
        )
        per_shard = self.slots // self.data
        return [
            (1 << k, chunk)
            for chunk in lengths
            for k in range((min(_floor_pow2(self.prefill_chunk // chunk), per_shard) - 1).bit_length() + 1)
        ]

    def precompile(self) -> float:
        """Compile the decode step and every prefill shape now, so that no request waits for a
        compile (vLLM and JetStream compile their buckets at startup too); returns the seconds."""
        start = time.perf_counter()
        by_row, rows = NamedSharding(self.mesh, ROWS_BY_SEQ), NamedSharding(self.mesh, ROWS)

        def ints(shape, sharding, dtype=jnp.int32):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        def sampling(n):
            return (ints((n,), rows, jnp.float32), ints((n,), rows), ints((n,), rows, jnp.float32), ints((n,), rows))

        n, w = self.slots, self.table_width
        device_rows = (self.last_new, self.last_positions)  # spelled as the step's outputs are
        merge_fn(self.mesh).lower(*device_rows, ints((n, 3), by_row)).compile()
        for sampler in decode.SAMPLERS:  # each step runs the cheapest that serves its rows
            step = decode.paged_step_fn(self.cfg, self.mesh, MAX_LOGPROBS, sampler)
            step.lower(self.params, *device_rows, self.pages, ints((n, w), by_row), *sampling(n)).compile()
        prefill = decode.paged_prefill_fn(self.cfg, self.mesh, MAX_LOGPROBS)
        for per_shard, chunk in self.prefill_shapes():
            n = per_shard * self.data
            args = (
                ints((n, chunk), by_row),
                ints((n, chunk), by_row),
                self.pages,
                ints((n, w), by_row),
                ints((n,), rows),
            )
            prefill.lower(self.params, *args, *sampling(n)).compile()
        return time.perf_counter() - start

    def pages_for(self, request: Request) -> int:
        """The pages a request may hold: its prompt and every new token."""
        return -(-(len(request.prompt) + request.max_new_tokens) // self.page_size)

    def start_pages(self, request: Request) -> int:
        """The pages a request needs to start: its context and the first new token's position."""
        return min(-(-(len(request.context) + 1) // self.page_size), self.pages_for(request))

    @property
    def pages_in_use(self) -> int:
        """Pages some request holds (cached pages nobody holds are free)."""
        return self.total_pages - sum(len(f) + len(e) for f, e in zip(self.free_pages, self.evictable))

    @property
    def cached_pages(self) -> int:
        return sum(len(k) for k in self.page_key)

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens found in the prefix cache over those looked up (vLLM's measure)."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def _shared_pages(self, prompt: Sequence[int]) -> int:
        """Full pages before the prompt's last token: what a prompt may take from the prefix cache
        or from another sample's prefill (its last token is always prefilled, for its logits)."""
        return (len(prompt) - 1) // self.page_size

    def _hits(self, shard: int, keys: list[bytes]) -> list[int]:
        """The shard's cached pages of the longest cached prefix among `keys`."""
        pages = []
        for key in keys:
            page = self.cached[shard].get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def _place(
        self,
        group: Sequence[Request],
        unpromised: list[int],
        free_rows: list[int],
        lookup: bool = True,
        whole: bool = False,
    ):
        """A free row for each request of the group on a data shard that can promise the pages it
        takes to start (`whole`: every page it may take), as [(row, pages promised, prefix-cache
        hits or None: shares the group's first sample on that shard)], or None where they do not
        all fit. Samples go where a sample of the group already is, else where the prefix cache
        holds most of the prompt, else where most pages are unpromised. `lookup`: consult the
        prefix cache."""
        unpromised, free_rows, placed = list(unpromised), list(free_rows), []
        per_shard = self.slots // self.data
        context = group[0].context
        shared = self._shared_pages(context)
        share = not group[0].scores_prompt  # a prompt's scores need every position prefilled
        keys = page_keys(context, self.page_size)[:shared] if self.prefix_cache and lookup and share else []
        with_sample: set[int] = set()
        for r in group:
            need = self.pages_for(r) if whole else self.start_pages(r)
            options = {}
            for shard in {row // per_shard for row in free_rows}:
                if shard in with_sample and share:
                    options[shard] = (need - shared, None)
                else:  # cached pages someone holds cost nothing more; the others are charged as taken
                    hits = self._hits(shard, keys)
                    options[shard] = (need - int((self.refs[shard, hits] > 0).sum()), hits)
            fits = [row for row in free_rows if unpromised[row // per_shard] >= options[row // per_shard][0]]
            if not fits:
                return None
            rank = {s: (s in with_sample, len(h or ()), unpromised[s] - need) for s, (need, h) in options.items()}
            row = max(fits, key=lambda row, rank=rank: (*rank[row // per_shard], -row))
            shard = row // per_shard
            unpromised[shard] -= options[shard][0]
            free_rows.remove(row)
            with_sample.add(shard)
            placed.append((row, *options[shard]))
        return placed

    # -- any thread

    def check(self, request: Request) -> Request:
        """Raise DecodeError (one line) for a request this engine cannot serve; return it."""
        if request.rid != -1:
            raise DecodeError("this Request was submitted already; submit a new Request (each holds its own tokens)")
        decode.check_request(self.cfg, [request.prompt], request.max_new_tokens)
        request.sampling.check(self.cfg.vocab_size)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(request, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise DecodeError(f"{name}={value}; give 0..{MAX_LOGPROBS} most likely tokens")
        total = len(request.prompt) + request.max_new_tokens
        if total > self.cache_len:
            raise DecodeError(
                f"prompt ({len(request.prompt)} tokens) plus max_new_tokens={request.max_new_tokens} is {total}, "
                f"above the engine's {self.cache_len} positions; ask for fewer tokens or shorten the prompt"
            )
        if self.pages_for(request) > self.shard_pages:
            raise DecodeError(
                f"prompt plus max_new_tokens needs {self.pages_for(request)} pages of {self.page_size} positions, "
                f"above the {self.shard_pages} of the KV cache's pool; ask for fewer tokens or give more pages (--kv-pages)"
            )
        return request

    def submit(self, request: Request) -> Request:
        return self.submit_group([request])[0]

    def submit_group(self, requests: Sequence[Request]) -> list[Request]:
        """Samples of one prompt (equal prompts, each its own sampling, seed and callbacks): one
        prefill per data shard they land on, then they start together once all fit."""
        group = [self.check(r) for r in requests]
        if len(group) > self.slots:
            raise DecodeError(
                f"{len(group)} samples of one prompt but the engine has {self.slots} slots; ask for fewer"
            )
        if len({id(r) for r in group}) < len(group):
            raise DecodeError("a group holds one Request twice; give each sample a Request of its own")
        if any(list(r.prompt) != list(group[0].prompt) for r in group):
            raise DecodeError("the samples of a group must share one prompt")
        if len({r.prompt_logprobs for r in group}) > 1:
            raise DecodeError("the samples of a group must ask for the same prompt_logprobs")
        if (
            self._place(group, [self.shard_pages] * self.data, list(range(self.slots)), lookup=False, whole=True)
            is None
        ):
            raise DecodeError(
                f"{len(group)} samples of {self.pages_for(group[0])} pages each do not fit the KV cache's "
                f"{self.total_pages} pages; ask for fewer samples or tokens"
            )
        for r in group:
            r.rid = next(self.rids)
        self.waiting.put(group)
        return group

    def stop(self) -> None:
        self._stop.set()
        self.waiting.put(None)  # wakes an idle engine

    @property
    def busy_slots(self) -> int:
        """Rows with a request (prefilling or decoding)."""
        return sum(r is not None for r in self.active)

    @property
    def waiting_requests(self) -> int:
        """Requests submitted and not yet running (waiting for a row and pages)."""
        with self.waiting.mutex:
            queued = sum(len(g) for g in self.waiting.queue if g)
        return queued + sum(len(g) for g in self.agreed) + len(self.held) + len(self.preempted)

    # -- the engine's thread

    def serve_forever(self) -> None:
        """Step until `stop()`. A step that raises (a bug, a device error) ends the requests in
        flight with "error" rather than leaving their clients waiting, and the engine goes on."""
        while not (self.ended if self.hosts else self._stop.is_set()):
            try:
                self.step()
            except Exception:
                log.exception("engine step failed")
                self.in_flight.clear()
                self._reset_rows()  # (the last step's outputs may hold its error)
                for slot, r in enumerate(self.active):
                    if r is not None:
                        self._finish(slot, "error")

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Submit those of `requests` not submitted yet and step until all are done (a helper for
        tests and benchmarks)."""
        for r in requests:
            if r.rid == -1:
                self.submit(r)
        while not all(r.done.is_set() for r in requests):
            self.step()
        while self.in_flight:  # steps past the last token: nothing of theirs is delivered
            self._read(self.in_flight.popleft())
        return list(requests)

    def step(self) -> None:
        """Admit waiting requests into free rows, dispatch a prefill call of waiting prompts (up
        to the token budget) and a decode step of every decoding row, and read the oldest decode
        step in flight once `max_in_flight` are (at once on XLA:CPU)."""
        idle = self.busy_slots == 0 and not self.in_flight
        if self.hosts:
            self._exchange(idle)
        for slot, r in enumerate(self.active):  # (first: their pages go to those admitted now)
            if r is not None and self._cancelled(r):
                self._finish(slot, "cancelled")
        for r in [r for r in self.preempted if self._cancelled(r)]:
            self.preempted.remove(r)
            self._end(r, "cancelled")
        self._admit(block=idle and not self.hosts)
        prefill = self._dispatch_prefill() if self.prefilling else None
        if prefill is not None and self.max_in_flight == 1:  # one program at a time on XLA:CPU
            self._read_prefill(prefill)
            prefill = None
        if self.decoding.any():
            self._dispatch()
        if prefill is not None:  # read once the decode step is queued behind it
            self._read_prefill(prefill)
        if self.in_flight and (len(self.in_flight) >= self.max_in_flight or not self.decoding.any()):
            self._read(self.in_flight.popleft())

    def _cancelled(self, r: Request) -> bool:
        """Over several processes a request is cancelled when every process hears of it."""
        return r.rid in self.to_cancel if self.hosts else r.cancelled

    def _exchange(self, idle: bool) -> None:
        """Process 0 tells every process what changed since the last step: the groups submitted
        (an idle engine waits up to 50 ms for one), the requests cancelled and those whose
        on_token said stop, and whether it stopped. Every process applies them alike."""
        message, own = None, {}
        if jax.process_index() == 0:
            groups = self._drain(block=idle and not self.agreed and not self.held and not self.preempted)
            own = {r.rid: r for g in groups for r in g}  # with their callbacks
            message = {
                "groups": [[r.spec() for r in g] for g in groups],
                "cancel": [rid for rid, r in self.known.items() if r.cancelled],
                "stop": self.to_stop,
                "end": self._stop.is_set(),
            }
            self.to_stop = []
        message = broadcast_from_first(message)
        for specs in message["groups"]:
            group = [own.get(s["rid"]) or Request.of_spec(s) for s in specs]
            self.known.update((r.rid, r) for r in group)
            self.agreed.append(group)
        self.to_cancel = set(message["cancel"])
        stop = set(message["stop"])
        for slot, r in enumerate(self.active):
            if r is not None and r.rid in stop:
                self._finish(slot, "stop")
        for r in [r for r in self.preempted if r.rid in stop]:  # said stop, then preempted
            self.preempted.remove(r)
            self._end(r, "stop")
        self.ended = message["end"]

    def _dispatch(self) -> None:
        """Queue a decode step. Its tokens and positions are the previous step's outputs, on the
        device, except in rows the host set since (a new request, a freed slot); the page table
        and the sampling inputs go to the device when they change. So the host does not wait for
        a step's tokens to send the next, and a step of the same rows within their pages sends
        nothing (each copy is a transfer and a launch on an accelerator, host time per token)."""
        per_shard = self.slots // self.data
        # A page for the position this step writes, oldest request first (most steps need none).
        needing = sorted(
            (s for s in np.flatnonzero(self.decoding) if self._needs_page(s)), key=self.admitted.__getitem__
        )
        for slot in needing:
            if self._needs_page(slot) and self._make_room(slot):  # (again: an older row may have preempted it)
                self._take_page(slot, slot // per_shard)
        if not self.decoding.any():  # each went back to wait
            return
        rows, by_row = NamedSharding(self.mesh, ROWS), NamedSharding(self.mesh, ROWS_BY_SEQ)
        tokens, positions = self.last_new, self.last_positions
        if self.host_set.any():
            host = np.stack([self.host_set, self.tokens, self.positions], axis=1).astype(np.int32)
            tokens, positions = merge_fn(self.mesh)(tokens, positions, jax.device_put(host, by_row))
        table = np.where(self.decoding[:, None], self.table, self.shard_pages)  # prefilling rows write nothing
        sampling = decode.sampling_arrays(self.sampling)
        step = decode.paged_step_fn(self.cfg, self.mesh, MAX_LOGPROBS, decode.sampler_for(self.sampling))
        new, self.last_positions, self.pages, logprobs = step(
            self.params,
            tokens,
            positions,
            self.pages,
            self._sent("table", table, by_row),
            *(self._sent(f"sampling{i}", a, rows) for i, a in enumerate(sampling)),
        )
        self.steps += 1
        self.last_new = new
        self.host_set[:] = False
        self.in_flight.append((new, logprobs, [r if d else None for r, d in zip(self.active, self.decoding)]))
        self.positions[self.decoding] += 1  # as the step moves them: rows past position 0

    def _sent(self, name: str, host: np.ndarray, sharding: NamedSharding) -> jax.Array:
        """`host` on the devices: the copy sent last under `name` if it holds the same values,
        else a new one (of a copy: XLA:CPU may alias the NumPy array it is given)."""
        last = self.sent.get(name)
        if last is None or not np.array_equal(last[0], host):
            host = host.copy()
            last = self.sent[name] = (host, jax.device_put(host, sharding))
        return last[1]

    def _reset_rows(self) -> None:
        """Every row's next token and position on the device made afresh, set from the host's."""
        self.last_new, self.last_positions = rows_fn(self.mesh, self.slots)()
        self.host_set[:] = True

    def _read(self, dispatched) -> None:
        """Deliver a step's tokens to the requests that were in its rows and still are."""
        new, logprobs, requests = dispatched
        new, logprobs = decode.to_host(new), self._host_logprobs(logprobs, requests)
        for slot, r in enumerate(requests):
            if r is not None and self.active[slot] is r:
                self._deliver(slot, int(new[slot]), logprobs and logprobs(slot))

    def _prefill_batch(self) -> tuple[list[list[tuple[Prefill, int]]], int, int]:
        """This step's prefill: per data shard the (request, tokens) that go, the chunk length
        (a power of two fitting the first waiting prompt's rest, at most `prefill_chunk`) and the
        rows per shard (a power of two; rows x chunk length within the budget). Requests go in
        the order they came; a sample that shares another's pages waits for its chunks."""
        per_shard = self.slots // self.data
        queues = [[p for p in self.prefilling if p.slot // per_shard == shard] for shard in range(self.data)]
        chunk = decode.bucket_length(max(q[0].left for q in queues if q), self.prefill_chunk)
        limit = _floor_pow2(self.prefill_chunk // chunk)
        reach: dict[Prefill, int] = {}  # positions prefilled once this call has run
        batch = []
        for q in queues:
            chosen = []
            for p in q:
                if len(chosen) == limit:
                    break
                if p.leader is not None and reach.get(p.leader, p.leader.done) < p.done:
                    continue
                chosen.append((p, min(p.left, chunk)))
                reach[p] = p.done + chosen[-1][1]
            batch.append(chosen)
        return batch, chunk, 1 << (max(len(c) for c in batch) - 1).bit_length()

    def _dispatch_prefill(self):
        """Queue a prefill call (`_prefill_batch`); returns what `_read_prefill` needs."""
        batch, chunk, rows = self._prefill_batch()
        n = rows * self.data
        tokens = np.full((n, chunk), self.cfg.pad_id, np.int32)
        positions = np.full((n, chunk), -1, np.int32)  # padding: written nowhere
        table = np.full((n, self.table_width), self.shard_pages, np.int32)
        last = np.zeros(n, np.int32)
        sampling = [GREEDY] * n
        ends = []  # (row, request) of the prompts this call ends
        scoring = any(p.request.scores_prompt for chosen in batch for p, _ in chosen)
        targets = np.full((n, chunk), self.cfg.pad_id, np.int32) if scoring else None
        scored = []  # (row, its Prefill, first position, positions scored) of the rows whose prompt is scored
        for shard, chosen in enumerate(batch):
            for i, (p, count) in enumerate(chosen):
                row = shard * rows + i
                context = p.request.context
                tokens[row, :count] = np.asarray(context[p.done : p.done + count])
                positions[row, :count] = np.arange(p.done, p.done + count)
                table[row], last[row], sampling[row] = self.table[p.slot], count - 1, p.request.sampling
                if p.request.scores_prompt:  # each position's next prompt token
                    following = p.request.prompt[p.done + 1 : p.done + count + 1]
                    targets[row, : len(following)] = np.asarray(following)
                    scored.append((row, p, p.done, len(following)))
                p.done += count
                self.prefill_tokens += count
                if not p.left:
                    self.prefilling.remove(p)
                    ends.append((row, p))
        by_row = NamedSharding(self.mesh, ROWS_BY_SEQ)
        new, self.pages, logprobs, *scores = decode.paged_prefill_fn(self.cfg, self.mesh, MAX_LOGPROBS, scoring)(
            self.params,
            jax.device_put(tokens, by_row),
            jax.device_put(positions, by_row),
            self.pages,
            jax.device_put(table, by_row),
            jax.device_put(last, NamedSharding(self.mesh, ROWS)),
            *([jax.device_put(targets, by_row)] if scoring else []),
            *(jax.device_put(a, NamedSharding(self.mesh, ROWS)) for a in decode.sampling_arrays(sampling)),
        )
        self.prefills += 1
        for chosen in batch:
            for p, _ in chosen:
                self._cache_pages(p.slot, p.request.context[: p.done])
        return new, logprobs, ends, (scores[0], scored) if scoring else None

    def _read_prefill(self, dispatched) -> None:
        """The first token of each prompt the prefill call ended; its row decodes from the next
        decode step on. (Read even when none ended: XLA:CPU runs one program at a time.) Scored
        prompts get their positions' log-probabilities first."""
        new, logprobs, ends, scores = dispatched
        new = decode.to_host(new)
        if scores is not None:
            (chosen, ids, values), scored = (tuple(decode.to_host(a) for a in scores[0]), scores[1])
            for row, p, start, count in scored:
                r = p.request
                if self.active[p.slot] is not r:  # preempted since: scored again when it comes back
                    continue
                if start == 0:
                    r.prompt_token_logprobs.append(None)  # the first token: nothing before it to score
                k = r.prompt_logprobs
                r.prompt_token_logprobs += [
                    TokenLogprobs(
                        float(chosen[row, t]), tuple(zip(ids[row, t, :k].tolist(), values[row, t, :k].tolist()))
                    )
                    for t in range(count)
                ]
        logprobs = self._host_logprobs(logprobs, [p.request for _, p in ends])
        for row, p in ends:
            if self.active[p.slot] is not p.request:
                continue
            self.decoding[p.slot], self.host_set[p.slot] = True, True
            self.positions[p.slot] = len(p.request.context)
            self._deliver(p.slot, int(new[row]), logprobs and logprobs(row))

    def _cache_pages(self, slot: int, written: Sequence[int]) -> None:
        """Keep the row's full pages of `written` (the tokens whose keys and values are in its
        pages, from position 0) under their prefix keys (a key already cached keeps its page)."""
        if not self.prefix_cache:
            return
        shard = slot // (self.slots // self.data)
        for i, key in enumerate(page_keys(written, self.page_size)):
            page = int(self.table[slot, i])
            if key not in self.cached[shard] and page not in self.page_key[shard]:
                self.cached[shard][key], self.page_key[shard][page] = page, key

    def _admit(self, block: bool) -> None:
        """Start waiting requests in free rows, oldest first: the preempted ones, then the groups
        in the order they came. One that does not fit yet holds back those behind it."""
        while True:
            resumed = bool(self.preempted)
            group = self.preempted[:1] if resumed else (self.held or self._next_group(block))
            if not group:
                return
            block = False
            for r in group:
                if self._cancelled(r):
                    self._end(r, "cancelled")
            group = [r for r in group if not self._cancelled(r)]
            free = [slot for slot, r in enumerate(self.active) if r is None]
            placed = self._place(group, self._admissible(), free) if group else []
            if placed is None:
                self.held = self.held if resumed else group
                return
            if resumed:
                del self.preempted[0]
            else:
                self.held = []
            if group:
                self._start(group, placed)

    def _start(self, group: list[Request], placed: list) -> None:
        """Rows and prompt pages for a group placed by `_place`; its prompts wait for their prefill."""
        per_shard = self.slots // self.data
        context = group[0].context
        shared = self._shared_pages(context)
        firsts: dict[int, Prefill] = {}  # the group's first sample on each shard
        for r, (slot, promise, hits) in zip(group, placed):
            shard = slot // per_shard
            self.unpromised[shard] -= promise
            self.promised[slot] = promise
            first = firsts.get(shard)
            if hits is None:  # the first sample's pages before the last token
                pages = self.table[first.slot, :shared].tolist()
            else:
                pages = hits
                if self.prefix_cache:
                    self.prefix_queries += len(context)
                    self.prefix_hits += len(hits) * self.page_size
                if not r.preemptions:  # (the usage a client sees: of its prompt)
                    r.cached_tokens = len(hits) * self.page_size
            for page in pages:  # before any fresh page, which could evict a cached one
                self._hold_page(slot, shard, page)
            for _ in range(-(-len(context) // self.page_size) - len(pages)):
                self._take_page(slot, shard)
            prefill = Prefill(r, slot, len(pages) * self.page_size, first if hits is None and shared else None)
            firsts.setdefault(shard, prefill)
            self.prefilling.append(prefill)
            self.active[slot], self.sampling[slot] = r, r.sampling
            self.admitted[slot] = next(self.starts)

    def _charge(self, slot: int, shard: int) -> bool:
        """Count a page the row now holds that nobody held: against its promise, else against the
        shard's unpromised pages; False where neither has one left."""
        if self.promised[slot]:
            self.promised[slot] -= 1
        elif self.unpromised[shard]:
            self.unpromised[shard] -= 1
        else:
            return False
        return True

    def _append_page(self, slot: int, page: int) -> None:
        self.table[slot, np.argmax(self.table[slot] == self.shard_pages)] = page

    def _hold_page(self, slot: int, shard: int, page: int) -> None:
        """The row shares a page (a cached one, or another sample's)."""
        if self.refs[shard, page] == 0:  # cached and held by nobody: no longer evictable
            del self.evictable[shard][page]
            self._charge(slot, shard)
        self.refs[shard, page] += 1
        self._append_page(slot, page)

    def _take_page(self, slot: int, shard: int) -> int:
        """A fresh page of the shard's pool for the row's next positions, if it was promised one
        or one is unpromised (else none: a step past the request's last token writes nothing):
        an uncached free page, else the least recently used cached one nobody holds."""
        if not self._charge(slot, shard):
            return self.shard_pages
        if self.free_pages[shard]:
            page = self.free_pages[shard].pop()
        else:
            page, _ = self.evictable[shard].popitem(last=False)
            del self.cached[shard][self.page_key[shard].pop(page)]
        self.refs[shard, page] = 1
        self._append_page(slot, page)
        return page

    def _next_group(self, block: bool) -> list[Request] | None:
        if self.hosts:  # what every process has heard of (`_exchange`)
            return self.agreed.popleft() if self.agreed else None
        try:
            return self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
        except queue.Empty:
            return None  # (a None in the queue: stop() woke us)

    def _drain(self, block: bool) -> list[list[Request]]:
        """Every group submitted so far (waiting up to 50 ms for a first one if `block`)."""
        groups = []
        try:
            group = self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
            while True:
                if group:  # (None: stop() woke us)
                    groups.append(group)
                group = self.waiting.get_nowait()
        except queue.Empty:
            return groups

    @staticmethod
    def _host_logprobs(device_logprobs, requests) -> Callable[[int], TokenLogprobs] | None:
        """row -> TokenLogprobs, reading the step's log-probabilities only if a request asks."""
        if all(r is None or r.logprobs is None for r in requests):
            return None
        chosen, ids, values = (decode.to_host(a) for a in device_logprobs)
        return lambda row: TokenLogprobs(
            float(chosen[row]), tuple(zip(ids[row].tolist(), values[row].tolist(), strict=True))
        )

    def _deliver(self, slot: int, token: int, logprobs: TokenLogprobs | None = None) -> None:
        r = self.active[slot]
        if token in r.stop_ids:
            return self._finish(slot, "stop")
        r.tokens.append(token)
        if r.logprobs is not None:
            r.token_logprobs.append(dataclasses.replace(logprobs, top=logprobs.top[: r.logprobs]))
        self.tokens[slot] = token  # read by the next step only if the host sets this row (host_set)
        if r.on_token is not None and r.stopped_at is None and r.on_token(token) is False:
            if not self.hosts:
                return self._finish(slot, "stop")
            # the others hear of it at the next step; until then the request runs on everywhere
            r.stopped_at = len(r.tokens)
            self.to_stop.append(r.rid)
        if len(r.tokens) >= r.max_new_tokens:
            self._finish(slot, "length")

    def _needs_page(self, slot: int) -> bool:
        """Whether the row's next decode step writes into a page it does not hold yet. The step
        after a request's last token needs none: nothing reads what it writes, and its token is
        not delivered."""
        if not self.decoding[slot]:
            return False
        r, position = self.active[slot], int(self.positions[slot])
        page = position // self.page_size
        last = len(r.prompt) + r.max_new_tokens - 1  # the position of its last token
        return position < last and page < self.table_width and self.table[slot, page] == self.shard_pages

    def _admissible(self) -> list[int]:
        """Each shard's unpromised pages less those its decoding rows take in the coming step
        beyond their promises: what admission may give away (running requests go first, as in
        vLLM's scheduler; else a request admitted now would be preempted at once)."""
        per_shard, left = self.slots // self.data, list(self.unpromised)
        for slot in np.flatnonzero(self.decoding):
            if not self.promised[slot] and self._needs_page(slot):
                left[slot // per_shard] -= 1
        return left

    def _make_room(self, slot: int) -> bool:
        """A page for the row's next position: preempt the newest requests of its shard until its
        pool has one (vLLM's preemption by recompute). False where the row was the newest itself
        and went back to wait."""
        per_shard = self.slots // self.data
        shard = slot // per_shard
        while not self.promised[slot] and not self.unpromised[shard]:
            rows = [s for s in range(shard * per_shard, (shard + 1) * per_shard) if self.active[s] is not None]
            newest = max(rows, key=lambda s: self.admitted[s])
            self._preempt(newest)
            if newest == slot:
                return False
        return True

    def _preempt(self, slot: int) -> None:
        """Give the row's pages back and queue its request to be prefilled again (its prompt and
        the tokens made so far) before any new request. A step in flight still writes into its
        pages; its token for this row is not delivered (`_read`), and is made again."""
        r = self.active[slot]
        if self.decoding[slot]:  # (a prefilling row's pages were cached as its chunks went)
            # Its pages before the last token it was given (whose keys and values a step in
            # flight may still be writing) stay cached: it comes back through the prefix cache.
            self._cache_pages(slot, r.context[: len(r.prompt) + len(r.tokens) - 1])
        self._release(slot)
        if r.scores_prompt:  # cut short: its prompt is scored again from the start
            r.prompt_token_logprobs.clear()
        r.preemptions += 1
        self.preemptions += 1
        bisect.insort(self.preempted, r, key=lambda q: q.rid)
        log.info("preempted request %d (%d tokens made) for want of KV pages", r.rid, len(r.tokens))

    def _finish(self, slot: int, reason: str) -> None:
        r = self.active[slot]
        self._release(slot)
        self._end(r, reason)

    def _release(self, slot: int) -> None:
        """Free the row: its pages back to the pool (or to the prefix cache), what it was promised,
        and its place in the prefill queue."""
        self.active[slot] = None
        self.sampling[slot] = GREEDY
        self.tokens[slot], self.positions[slot] = self.cfg.pad_id, 0
        self.host_set[slot], self.decoding[slot] = True, False
        self._drop_prefill(slot)
        # Its pages go back to the pool; a step still in flight may write into them, before
        # anything dispatched later (the pools pass from call to call) reads or writes them. It
        # writes no cached page: those hold prompt positions, and steps write past the prompt.
        shard = slot // (self.slots // self.data)
        held = self.table[slot][self.table[slot] != self.shard_pages]
        for page in reversed(held.tolist()):  # a prefix's later pages are evicted before its first
            self.refs[shard, page] -= 1
            if self.refs[shard, page] == 0:
                self.unpromised[shard] += 1
                if page in self.page_key[shard]:
                    self.evictable[shard][page] = None
                else:
                    self.free_pages[shard].append(page)
        self.unpromised[shard] += int(self.promised[slot])
        self.promised[slot] = 0
        self.table[slot] = self.shard_pages

    def _end(self, r: Request, reason: str) -> None:
        if r.stopped_at is not None:  # tokens made after on_token said stop (several processes)
            reason = "stop"
            del r.tokens[r.stopped_at :], r.token_logprobs[r.stopped_at :]
        r.finish_reason = reason
        self._done(r)

    def _drop_prefill(self, slot: int) -> None:
        """A request ends before its prefill did: samples waiting for its chunks go on without it,
        the first of them writing the shared pages it had not written yet."""
        p = next((p for p in self.prefilling if p.slot == slot), None)
        if p is None:
            return
        self.prefilling.remove(p)
        followers = [f for f in self.prefilling if f.leader is p]
        if followers:
            followers[0].done, followers[0].leader = min(followers[0].done, p.done), None
            for f in followers[1:]:
                f.leader = followers[0]

    def _done(self, r: Request) -> None:
        self.known.pop(r.rid, None)
        self.finished[r.finish_reason] += 1
        r.done.set()
        if r.on_done is not None:
            r.on_done(r.finish_reason)
