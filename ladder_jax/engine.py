"""Continuous batching over a paged KV cache: requests coming and going, each holding the pages it uses.

The cache is, per layer, a pool of fixed-size pages (`page_size` positions each) that lives as long
as the engine; each data shard has a pool of its own for its rows. A running request has a row of
the compiled decode batch (`max_running` rows) and a page table row: position p of the request is
at offset p % page_size of page table[row, p // page_size]. A request is admitted when a row is
free and its shard's pool can still promise every page the request may need (prompt plus
max_new_tokens, so no request is ever preempted); it takes the pages as its cache grows, one at a
time, and gives them all back when it ends (finished, stopped or cancelled).

A new request is prefilled alone (the compiled prefill of its prompt's bucket, over a cache of the
bucket's length) and its keys and values are scattered into its pages by a jitted insert that
donates the pools; then it decodes with everyone else. All rows advance together through one
compiled decode step (`decode.paged_step_fn`, per-row positions, page tables and sampling inputs),
whose attention reads each row's pages through its page table (an XLA gather), so requests of any
length and sampling settings share it and nothing recompiles as they come and go. Idle rows have
no pages: they write nothing and read zeros.

Samples of one prompt (`submit_group`, OpenAI's `n`) share its prefill: the prompt is prefilled
once and scattered into the pages of each sample. The first sample takes the prefill's token;
the others start one step back, at the prompt's last token, so the decode step draws their first
token with their own seeds. Every step also returns each row's log-probabilities (the chosen
token's and the MAX_LOGPROBS most likely), read to the host only when a request asks for them.

One thread drives the engine (`run` or `serve_forever`); `submit` may be called from any thread.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import queue
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from . import decode
from . import model as M
from .config import ModelConfig, dtype_of
from .decode import GREEDY, ROWS, ROWS_BY_SEQ, DecodeError, Sampling
from .memory import free_device_bytes
from .mesh import batch_shards

log = logging.getLogger("ladder_jax.engine")
PAGE_SIZE = 16  # positions per KV cache page (vLLM's default block size)
MAX_LOGPROBS = 20  # the most likely tokens a request may ask log-probabilities for (OpenAI's limit)


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
    tokens: list[int] = dataclasses.field(default_factory=list)
    token_logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)  # one per token, if asked
    finish_reason: str | None = None
    cancelled: bool = False  # set from any thread; the engine frees its row and pages before its next step
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled = True


@functools.lru_cache(maxsize=8)
def insert_fn(sharding: NamedSharding):
    """jit(pages, prefilled cache rows, page (S,), offset (S,)) -> pages with position t of row 0
    written at (page[t], offset[t]), global page ids (ids past the pools: not written). The
    pools are donated; the result keeps the decode step's own output sharding, or the step would
    compile again."""

    def insert(pages, rows, page, offset):
        return [
            (
                k.at[page, offset].set(nk[0].astype(k.dtype), mode="drop"),
                v.at[page, offset].set(nv[0].astype(v.dtype), mode="drop"),
            )
            for (k, v), (nk, nv) in zip(pages, rows)
        ]

    return jax.jit(insert, donate_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=8)
def merge_fn(sharding: NamedSharding):
    """jit(device tokens, host_set, host tokens) -> the host's tokens where it set them. Its output
    has one sharding whatever the inputs' spelling of it, so the step compiles once."""
    return jax.jit(lambda device, host_set, host: jnp.where(host_set, host, device), out_shardings=sharding)


class Engine:
    """`max_running` requests decode at once (rounded up to the data shards), each with up to
    `cache_len` positions (default model.max_seq_len), over `kv_pages` pages of `page_size`
    positions in all (default: enough for every row at cache_len, the bytes fixed slots took)."""

    def __init__(
        self,
        cfg: ModelConfig,
        mesh: Mesh,
        params,
        max_running: int = 8,
        cache_len: int | None = None,
        page_size: int = PAGE_SIZE,
        kv_pages: int | None = None,
    ):
        self.cfg, self.mesh, self.params = cfg, mesh, params
        self.cache_len = cache_len or cfg.max_seq_len
        if not 0 < self.cache_len <= cfg.max_seq_len:
            raise DecodeError(f"cache_len={self.cache_len}; give 1..model.max_seq_len={cfg.max_seq_len}")
        if max_running < 1 or page_size < 1 or (kv_pages is not None and kv_pages < 1):
            raise DecodeError(
                f"max_running={max_running}, page_size={page_size}, kv_pages={kv_pages}; give at least 1 of each"
            )
        self.data = data = batch_shards(mesh)
        self.slots = -(-max_running // data) * data  # every data shard holds the same number of rows
        self.page_size = page_size
        self.table_width = -(-self.cache_len // page_size)  # pages a request may hold
        kv_pages = self.slots * self.table_width if kv_pages is None else kv_pages
        self.shard_pages = -(-kv_pages // data)  # each data shard's pool
        self.total_pages = self.shard_pages * data
        tensor = mesh.shape[decode.TENSOR]
        self.kv_bytes = M.cache_bytes_per_device(cfg, (data, tensor), self.total_pages, page_size)
        free = free_device_bytes(mesh.devices.flat[0])
        if free is not None and self.kv_bytes > free:
            raise DecodeError(
                f"the KV cache's {self.total_pages} pages of {page_size} positions need {self.kv_bytes / 2**30:.2f} GiB "
                f"per device but {free / 2**30:.2f} GiB are free; give fewer pages (--kv-pages) or fewer positions"
            )
        # Made by a shard_map as the step's output is, so both carry the same sharding.
        _, _, kv_slots, hd = M.cache_shape(cfg, tensor, 1, 1)
        local = (self.shard_pages, page_size, kv_slots // tensor, hd)
        zeros = jax.shard_map(
            lambda: [(jnp.zeros(local, dtype_of(cfg.dtype)),) * 2 for _ in range(cfg.n_layers)],
            mesh=mesh,
            in_specs=(),
            out_specs=M.cache_specs(cfg),
        )
        self.pages = jax.jit(zeros)()
        self.insert = insert_fn(self.pages[0][0].sharding)
        # Page tables hold each shard's own page ids; the pool size (no page) writes and reads nothing.
        self.table = np.full((self.slots, self.table_width), self.shard_pages, np.int32)
        self.free_pages = [list(range(self.shard_pages - 1, -1, -1)) for _ in range(data)]
        self.unpromised = [self.shard_pages] * data  # pages of each shard no running request may still take
        self.promised = np.zeros(self.slots, np.int64)  # pages each row's request may still take
        self.active: list[Request | None] = [None] * self.slots
        self.tokens = np.full(self.slots, cfg.pad_id, np.int32)
        self.positions = np.zeros(self.slots, np.int32)
        self.sampling = [GREEDY] * self.slots
        self.waiting: queue.Queue[list[Request] | None] = queue.Queue()  # groups of samples of one prompt
        self.held: list[Request] = []  # the next group, until it has a row and its pages per sample
        self.host_set = np.zeros(self.slots, bool)  # rows whose next input token the host set
        self.last_new = None  # the last step's tokens, on the device
        # Steps dispatched and not yet read. XLA:CPU with fake devices deadlocks with more than
        # one in flight (decode.generate); an accelerator gets the next step queued while the
        # host reads this one.
        self.in_flight: collections.deque = collections.deque()
        self.max_in_flight = 1 if mesh.devices.flat[0].platform == "cpu" else 2
        self.steps = 0
        self.prefills = 0
        self.finished: collections.Counter[str] = collections.Counter()  # requests ended, by reason
        self._stop = threading.Event()

    def pages_for(self, request: Request) -> int:
        """The pages a request may hold: its prompt and every new token."""
        return -(-(len(request.prompt) + request.max_new_tokens) // self.page_size)

    @property
    def pages_in_use(self) -> int:
        return self.total_pages - sum(len(f) for f in self.free_pages)

    def _place(self, group: Sequence[Request], unpromised: list[int], free_rows: list[int]) -> list[int] | None:
        """A free row for each request of the group, on data shards that can promise its pages
        (the shard with the most unpromised pages first), or None where they do not all fit."""
        unpromised, free_rows, rows = list(unpromised), list(free_rows), []
        per_shard = self.slots // self.data
        for r in group:
            need = self.pages_for(r)
            fits = [row for row in free_rows if unpromised[row // per_shard] >= need]
            if not fits:
                return None
            row = max(fits, key=lambda row: (unpromised[row // per_shard], -row))
            unpromised[row // per_shard] -= need
            free_rows.remove(row)
            rows.append(row)
        return rows

    # -- any thread

    def check(self, request: Request) -> Request:
        """Raise DecodeError (one line) for a request this engine cannot serve; return it."""
        decode.check_request(self.cfg, [request.prompt], request.max_new_tokens)
        request.sampling.check(self.cfg.vocab_size)
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise DecodeError(f"logprobs={request.logprobs}; give 0..{MAX_LOGPROBS} most likely tokens")
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
        prefill, then a row and its pages each; they start together once all fit."""
        group = [self.check(r) for r in requests]
        if len(group) > self.slots:
            raise DecodeError(
                f"{len(group)} samples of one prompt but the engine has {self.slots} slots; ask for fewer"
            )
        if any(list(r.prompt) != list(group[0].prompt) for r in group):
            raise DecodeError("the samples of a group must share one prompt")
        if self._place(group, [self.shard_pages] * self.data, list(range(self.slots))) is None:
            raise DecodeError(
                f"{len(group)} samples of {self.pages_for(group[0])} pages each do not fit the KV cache's "
                f"{self.total_pages} pages; ask for fewer samples or tokens"
            )
        self.waiting.put(group)
        return group

    def stop(self) -> None:
        self._stop.set()
        self.waiting.put(None)  # wakes an idle engine

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self.active)

    @property
    def waiting_requests(self) -> int:
        """Requests submitted and not yet running (waiting for a row and pages)."""
        with self.waiting.mutex:
            return sum(len(g) for g in self.waiting.queue if g) + len(self.held)

    # -- the engine's thread

    def serve_forever(self) -> None:
        """Step until `stop()`. A step that raises (a bug, a device error) ends the requests in
        flight with "error" rather than leaving their clients waiting, and the engine goes on."""
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("decode step failed")
                self.in_flight.clear()
                self.last_new = None
                for slot, r in enumerate(self.active):
                    if r is not None:
                        self._finish(slot, "error")

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Submit `requests` and step until all are done (a helper for tests and benchmarks)."""
        for r in requests:
            self.submit(r)
        while not all(r.done.is_set() for r in requests):
            self.step()
        while self.in_flight:  # steps past the last token: nothing of theirs is delivered
            self._read(self.in_flight.popleft())
        return list(requests)

    def step(self) -> None:
        """Admit waiting requests into free slots, dispatch a decode step of every busy slot, and
        read the oldest step in flight once `max_in_flight` are (at once on XLA:CPU)."""
        self._admit(block=self.busy_slots == 0 and not self.in_flight)
        for slot, r in enumerate(self.active):
            if r is not None and r.cancelled:
                self._finish(slot, "cancelled")
        if self.busy_slots:
            self._dispatch()
        if self.in_flight and (len(self.in_flight) >= self.max_in_flight or not self.busy_slots):
            self._read(self.in_flight.popleft())

    def _dispatch(self) -> None:
        """Queue a decode step. Its input tokens are the previous step's output on the device,
        except in rows the host set since (a new request, a freed slot): the host does not wait
        for a step's tokens to send the next."""
        per_shard = self.slots // self.data
        for slot, r in enumerate(self.active):  # a page for the position this step writes
            page = self.positions[slot] // self.page_size
            if r is not None and page < self.table_width and self.table[slot, page] == self.shard_pages:
                self._take_page(slot, slot // per_shard)
        per_row = decode.sampling_arrays(self.sampling)
        rows = NamedSharding(self.mesh, ROWS)
        # Copies: XLA:CPU may alias a NumPy array it is given, and these change before the step runs.
        tokens = jax.device_put(self.tokens.copy(), rows)
        last = tokens if self.last_new is None else self.last_new  # (one program, so one step compile)
        tokens = merge_fn(rows)(last, jax.device_put(self.host_set.copy(), rows), tokens)
        new, _, self.pages, logprobs = decode.paged_step_fn(self.cfg, self.mesh, MAX_LOGPROBS)(
            self.params,
            tokens,
            jax.device_put(self.positions.copy(), rows),
            self.pages,
            jax.device_put(self.table.copy(), NamedSharding(self.mesh, ROWS_BY_SEQ)),
            *(jax.device_put(a, rows) for a in per_row),
        )
        self.steps += 1
        self.last_new = new
        self.host_set[:] = False
        self.in_flight.append((new, logprobs, list(self.active)))
        for slot, r in enumerate(self.active):
            if r is not None:
                self.positions[slot] += 1

    def _read(self, dispatched) -> None:
        """Deliver a step's tokens to the requests that were in its rows and still are."""
        new, logprobs, requests = dispatched
        new, logprobs = np.asarray(new), self._host_logprobs(logprobs, requests)
        for slot, r in enumerate(requests):
            if r is not None and self.active[slot] is r:
                self._deliver(slot, int(new[slot]), logprobs and logprobs(slot))

    def _admit(self, block: bool) -> None:
        while True:
            group = self.held or self._next_group(block)
            if not group:
                return
            block = False
            for r in group:
                if r.cancelled:
                    r.finish_reason = "cancelled"
                    self._done(r)
            group = [r for r in group if not r.cancelled]
            free = [slot for slot, r in enumerate(self.active) if r is None]
            rows = self._place(group, self.unpromised, free) if group else []
            self.held = group if rows is None else []
            if self.held:
                return
            if group:
                self._prefill_into(rows, group)

    def _take_page(self, slot: int, shard: int) -> int:
        """A page of the shard's pool for the row's next positions: one it was promised, else an
        unpromised one, else none (a step past the request's last token writes nothing)."""
        if self.promised[slot]:
            self.promised[slot] -= 1
        elif self.unpromised[shard]:
            self.unpromised[shard] -= 1
        else:
            return self.shard_pages
        page = self.free_pages[shard].pop()
        self.table[slot, np.argmax(self.table[slot] == self.shard_pages)] = page
        return page

    def _next_group(self, block: bool) -> list[Request] | None:
        try:
            return self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
        except queue.Empty:
            return None  # (a None in the queue: stop() woke us)

    def _prefill_into(self, slots: list[int], group: list[Request]) -> None:
        self.prefills += 1
        first = group[0]
        rows = batch_shards(self.mesh)  # one prompt, and padding rows up to the data axis
        bucket = decode.bucket_length(len(first.prompt), self.cache_len)
        tokens = np.full((rows, bucket), self.cfg.pad_id, np.int32)
        tokens[0, : len(first.prompt)] = first.prompt
        lengths = np.ones(rows, np.int32)
        lengths[0] = len(first.prompt)
        sharding = NamedSharding(self.mesh, ROWS)
        per_row = decode.sampling_arrays([first.sampling] + [GREEDY] * (rows - 1))
        new, new_cache, logprobs = decode.prefill_fn(self.cfg, self.mesh, bucket, True, MAX_LOGPROBS)(
            self.params,
            jax.device_put(tokens, NamedSharding(self.mesh, ROWS_BY_SEQ)),
            jax.device_put(lengths, sharding),
            *(jax.device_put(a, sharding) for a in per_row),
        )
        per_shard = self.slots // self.data
        for slot, r in zip(slots, group):
            shard = slot // per_shard
            self.unpromised[shard] -= self.pages_for(r)
            self.promised[slot] = self.pages_for(r)
            held = [self._take_page(slot, shard) for _ in range(-(-len(r.prompt) // self.page_size))]
            # Where each prefilled position goes, in global page ids (positions past the prompt: nowhere).
            t = np.arange(bucket)
            page = np.full(bucket, self.total_pages, np.int32)
            page[: len(r.prompt)] = shard * self.shard_pages + np.asarray(held)[t[: len(r.prompt)] // self.page_size]
            self.pages = self.insert(self.pages, new_cache, page, (t % self.page_size).astype(np.int32))
            self.active[slot], self.sampling[slot] = r, r.sampling
            # The other samples decode the prompt's last token again to draw a first token of their own.
            self.tokens[slot], self.positions[slot] = r.prompt[-1], len(r.prompt) - 1
            self.host_set[slot] = True
        self.positions[slots[0]] = len(first.prompt)
        logprobs = self._host_logprobs(logprobs, [first])
        self._deliver(slots[0], int(np.asarray(new)[0]), logprobs and logprobs(0))

    @staticmethod
    def _host_logprobs(device_logprobs, requests) -> Callable[[int], TokenLogprobs] | None:
        """row -> TokenLogprobs, reading the step's log-probabilities only if a request asks."""
        if all(r is None or r.logprobs is None for r in requests):
            return None
        chosen, ids, values = (np.asarray(a) for a in device_logprobs)
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
        if r.on_token is not None and r.on_token(token) is False:
            return self._finish(slot, "stop")
        if len(r.tokens) >= r.max_new_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: int, reason: str) -> None:
        r = self.active[slot]
        self.active[slot] = None
        self.sampling[slot] = GREEDY
        self.tokens[slot], self.positions[slot] = self.cfg.pad_id, 0
        self.host_set[slot] = True
        # Its pages go back to the pool; a step still in flight may write into them, before
        # anything dispatched later (the pools pass from call to call) reads or writes them.
        shard = slot // (self.slots // self.data)
        held = self.table[slot][self.table[slot] != self.shard_pages]
        self.free_pages[shard] += held.tolist()
        self.unpromised[shard] += len(held) + int(self.promised[slot])
        self.promised[slot] = 0
        self.table[slot] = self.shard_pages
        r.finish_reason = reason
        self._done(r)

    def _done(self, r: Request) -> None:
        self.finished[r.finish_reason] += 1
        r.done.set()
        if r.on_done is not None:
            r.on_done(r.finish_reason)
