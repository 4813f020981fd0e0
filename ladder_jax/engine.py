"""Continuous batching: a fixed number of decode slots over one KV cache, requests coming and going.

The cache has `slots` rows of `cache_len` positions and lives as long as the engine. A new request
is prefilled alone (the compiled prefill of its prompt's bucket) and its cache row is copied into
a free slot by a jitted insert that donates the big cache; then it decodes with everyone else. All
slots advance together through one compiled decode step (`decode.step_fn` with per-row sampling
inputs), so requests of any length and sampling settings share it and nothing recompiles as they
come and go. A finished request frees its slot before the next step. Idle slots decode a padding
token at position 0 of their own row, which the next insert overwrites.

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
from .mesh import batch_shards

log = logging.getLogger("ladder_jax.engine")


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
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False  # set from any thread; the engine frees the slot before its next step
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled = True


@functools.lru_cache(maxsize=8)
def insert_fn(sharding: NamedSharding):
    """jit(cache, new cache rows, slot) -> cache with row 0 of the new rows at `slot` (donated).
    The result keeps the decode step's own output sharding, or the step would compile again."""

    def insert(cache, rows, slot):
        return [
            (
                jax.lax.dynamic_update_slice_in_dim(k, nk[:1], slot, 0),
                jax.lax.dynamic_update_slice_in_dim(v, nv[:1], slot, 0),
            )
            for (k, v), (nk, nv) in zip(cache, rows)
        ]

    return jax.jit(insert, donate_argnums=0, out_shardings=sharding)


class Engine:
    def __init__(self, cfg: ModelConfig, mesh: Mesh, params, slots: int = 8, cache_len: int | None = None):
        self.cfg, self.mesh, self.params = cfg, mesh, params
        self.cache_len = cache_len or cfg.max_seq_len
        if not 0 < self.cache_len <= cfg.max_seq_len:
            raise DecodeError(f"cache_len={self.cache_len}; give 1..model.max_seq_len={cfg.max_seq_len}")
        data = batch_shards(mesh)
        self.slots = -(-slots // data) * data  # every data shard holds the same number of rows
        shape = decode.DecodeShape(self.slots, decode.MIN_BUCKET, self.cache_len)
        decode.check_cache_fits(cfg, mesh, shape)
        # Made by a shard_map as the step's output is, so both carry the same sharding.
        kv = M.cache_shape(cfg, mesh.shape[decode.TENSOR], self.slots // data, self.cache_len)
        kv = (*kv[:2], kv[2] // mesh.shape[decode.TENSOR], kv[3])
        zeros = jax.shard_map(
            lambda: [(jnp.zeros(kv, dtype_of(cfg.dtype)),) * 2 for _ in range(cfg.n_layers)],
            mesh=mesh,
            in_specs=(),
            out_specs=M.cache_specs(cfg),
        )
        self.cache = jax.jit(zeros)()
        self.insert = insert_fn(self.cache[0][0].sharding)
        self.active: list[Request | None] = [None] * self.slots
        self.tokens = np.full(self.slots, cfg.pad_id, np.int32)
        self.positions = np.zeros(self.slots, np.int32)
        self.sampling = [GREEDY] * self.slots
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.steps = 0
        self.finished: collections.Counter[str] = collections.Counter()  # requests ended, by reason
        self._stop = threading.Event()

    # -- any thread

    def check(self, request: Request) -> Request:
        """Raise DecodeError (one line) for a request this engine cannot serve; return it."""
        decode.check_request(self.cfg, [request.prompt], request.max_new_tokens)
        request.sampling.check(self.cfg.vocab_size)
        total = len(request.prompt) + request.max_new_tokens
        if total > self.cache_len:
            raise DecodeError(
                f"prompt ({len(request.prompt)} tokens) plus max_new_tokens={request.max_new_tokens} is {total}, "
                f"above the engine's {self.cache_len} positions; ask for fewer tokens or shorten the prompt"
            )
        return request

    def submit(self, request: Request) -> Request:
        self.waiting.put(self.check(request))
        return request

    def stop(self) -> None:
        self._stop.set()
        self.waiting.put(None)  # wakes an idle engine

    @property
    def busy_slots(self) -> int:
        return sum(r is not None for r in self.active)

    # -- the engine's thread

    def serve_forever(self) -> None:
        """Step until `stop()`. A step that raises (a bug, a device error) ends the requests in
        flight with "error" rather than leaving their clients waiting, and the engine goes on."""
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("decode step failed")
                for slot, r in enumerate(self.active):
                    if r is not None:
                        self._finish(slot, "error")

    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Submit `requests` and step until all are done (a helper for tests and benchmarks)."""
        for r in requests:
            self.submit(r)
        while not all(r.done.is_set() for r in requests):
            self.step()
        return list(requests)

    def step(self) -> None:
        """Admit waiting requests into free slots, then advance every busy slot by one token."""
        self._admit(block=self.busy_slots == 0)
        for slot, r in enumerate(self.active):
            if r is not None and r.cancelled:
                self._finish(slot, "cancelled")
        if self.busy_slots == 0:
            return
        per_row = decode.sampling_arrays(self.sampling)
        rows = NamedSharding(self.mesh, ROWS)
        new, _, self.cache = decode.step_fn(self.cfg, self.mesh, True)(
            self.params,
            jax.device_put(self.tokens, rows),
            jax.device_put(self.positions, rows),
            self.cache,
            *(jax.device_put(a, rows) for a in per_row),
        )
        self.steps += 1
        new = np.asarray(new)
        for slot, r in enumerate(self.active):
            if r is not None:
                self.positions[slot] += 1
                self._deliver(slot, int(new[slot]))

    def _admit(self, block: bool) -> None:
        while None in self.active:
            try:
                r = self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            if r is None:  # stop() woke us
                return
            block = False
            if r.cancelled:
                r.finish_reason = "cancelled"
                self._done(r)
                continue
            self._prefill_into(self.active.index(None), r)

    def _prefill_into(self, slot: int, r: Request) -> None:
        rows = batch_shards(self.mesh)  # one prompt, and padding rows up to the data axis
        bucket = decode.bucket_length(len(r.prompt), self.cache_len)
        tokens = np.full((rows, bucket), self.cfg.pad_id, np.int32)
        tokens[0, : len(r.prompt)] = r.prompt
        lengths = np.ones(rows, np.int32)
        lengths[0] = len(r.prompt)
        sharding = NamedSharding(self.mesh, ROWS)
        per_row = decode.sampling_arrays([r.sampling] + [GREEDY] * (rows - 1))
        first, new_cache = decode.prefill_fn(self.cfg, self.mesh, self.cache_len, True)(
            self.params,
            jax.device_put(tokens, NamedSharding(self.mesh, ROWS_BY_SEQ)),
            jax.device_put(lengths, sharding),
            *(jax.device_put(a, sharding) for a in per_row),
        )
        self.cache = self.insert(self.cache, new_cache, np.int32(slot))
        self.active[slot] = r
        self.sampling[slot] = r.sampling
        self.positions[slot] = len(r.prompt)
        self._deliver(slot, int(np.asarray(first)[0]))

    def _deliver(self, slot: int, token: int) -> None:
        r = self.active[slot]
        if token in r.stop_ids:
            return self._finish(slot, "stop")
        r.tokens.append(token)
        self.tokens[slot] = token
        if r.on_token is not None and r.on_token(token) is False:
            return self._finish(slot, "stop")
        if len(r.tokens) >= r.max_new_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: int, reason: str) -> None:
        r = self.active[slot]
        self.active[slot] = None
        self.sampling[slot] = GREEDY
        self.tokens[slot], self.positions[slot] = self.cfg.pad_id, 0
        r.finish_reason = reason
        self._done(r)

    def _done(self, r: Request) -> None:
        self.finished[r.finish_reason] += 1
        r.done.set()
        if r.on_done is not None:
            r.on_done(r.finish_reason)
