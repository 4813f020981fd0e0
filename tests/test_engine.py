"""Continuous batching on 8 fake CPU devices: requests of different lengths and sampling settings
arriving while others decode get the tokens they get alone, and nothing recompiles."""

import dataclasses
import random
import threading

import jax
import numpy as np
import pytest

from ladder_jax import decode
from ladder_jax import engine as engine_module
from ladder_jax import model as M
from ladder_jax.decode import Sampling
from ladder_jax.engine import MAX_LOGPROBS, Engine, Request, page_keys

from . import test_decode
from .test_decode import model_on

# The first two are test_decode's prompts: their greedy tokens alone come from functions it compiled.
PROMPTS = [*test_decode.PROMPTS, [256, 7], [256, *b"def fib(n):"], [256, *range(60, 70)]]
NEW = [16, 16, 5, 9, 14]
SAMPLED = Sampling(temperature=0.8, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def engine(devices):
    cfg, mesh, params = model_on("ladder", 2, 4)
    # Two slots of 32 positions: the shapes of a single 16-token prompt and 16 new tokens in
    # decode.generate on data=2, so the static decoder's results alone compile nothing new.
    return Engine(cfg.model, mesh, params, max_running=2, cache_len=32)


def test_requests_coming_and_going_get_what_they_get_alone_without_recompiling(engine):
    cfg, mesh, params = engine.cfg, engine.mesh, engine.params
    prefill = decode.paged_prefill_fn(cfg, mesh, MAX_LOGPROBS)
    compiled = prefill._cache_size()  # (0, or more where the server's tests ran first on this process)
    settings = [decode.GREEDY, SAMPLED, decode.GREEDY, Sampling(temperature=1.0, top_k=5, seed=3), decode.GREEDY]
    requests = [Request(p, n, s) for p, n, s in zip(PROMPTS, NEW, settings)]
    # Two start together; the rest arrive while they decode and wait for a free slot.
    engine.submit(requests[0]), engine.submit(requests[1])
    for _ in range(3):
        engine.step()
    assert engine.busy_slots == 2
    engine.run(requests[2:])
    assert all(r.finish_reason == "length" and len(r.tokens) == n for r, n in zip(requests, NEW))
    assert engine.busy_slots == 0
    for r, p, n, s in zip(requests, PROMPTS, NEW, settings):  # what each gets alone here
        assert engine.run([Request(p, n, s)])[0].tokens == r.tokens, p
    steps = [decode.paged_step_fn(cfg, mesh, MAX_LOGPROBS, s)._cache_size() for s in decode.SAMPLERS]
    # Greedy rows alone ran the greedy step, rows with cuts the full one, each compiled once; every
    # prompt is in the 16-token chunk bucket, one row per data shard: one prefill program.
    assert steps[0] == steps[2] == 1 and steps[1] <= 1 and prefill._cache_size() - compiled <= 1
    # What the static decoder gives a prompt alone, greedy and sampled.
    for r, s in zip(requests[:2], settings):
        assert r.tokens == decode.generate(cfg, mesh, params, [r.prompt], 16, sampling=s).tokens[0]


def test_stops_cancels_and_bad_requests(engine):
    full = engine.run([Request(PROMPTS[0], 12)])[0].tokens
    stopped = engine.run([Request(PROMPTS[0], 12, stop_ids=frozenset({full[3]}))])[0]
    assert stopped.tokens == full[: full.index(full[3])] and stopped.finish_reason == "stop"
    seen = []
    told = engine.run([Request(PROMPTS[0], 12, on_token=lambda t: seen.append(t) or len(seen) < 3)])[0]
    assert told.tokens == seen == full[:3] and told.finish_reason == "stop"
    cancelled = Request(PROMPTS[1], 12, on_token=lambda t: None)
    engine.submit(cancelled)
    engine.step()
    cancelled.cancel()
    engine.step()
    assert cancelled.finish_reason == "cancelled" and engine.busy_slots == 0 and len(cancelled.tokens) < 12
    assert engine.pages_in_use == 0 and engine.unpromised == [engine.shard_pages] * engine.data
    with pytest.raises(decode.DecodeError, match="above the engine's 32 positions") as e:
        engine.submit(Request(PROMPTS[1], 30))
    assert "\n" not in str(e.value)
    with pytest.raises(decode.DecodeError, match="temperature=-1"):
        engine.submit(Request(PROMPTS[1], 3, Sampling(temperature=-1)))
    with pytest.raises(decode.DecodeError, match="submitted already; submit a new Request"):
        engine.submit(stopped)  # its tokens would be mixed with a second run's
    twice = Request(PROMPTS[1], 3)
    with pytest.raises(decode.DecodeError, match="one Request twice"):
        engine.submit_group([twice, twice])
    assert jax.device_count() == 8


def test_samples_of_one_prompt_wait_for_their_slots_and_share_one_prefill(engine):
    busy = engine.submit(Request(PROMPTS[1], 6))
    engine.step()
    group = [Request(PROMPTS[2], 5, dataclasses.replace(SAMPLED, seed=s), logprobs=2) for s in (7, 8)]
    engine.submit_group(group)
    prefills = engine.prefills
    engine.step()  # one slot is free, the group needs two: it waits
    assert engine.waiting_requests == 2 and engine.prefills == prefills and not busy.done.is_set()
    while not all(r.done.is_set() for r in group):
        engine.step()
    assert busy.done.is_set() and engine.prefills == prefills + 1 and engine.waiting_requests == 0
    assert group[0].tokens != group[1].tokens
    assert (
        group[0].tokens == engine.run([Request(PROMPTS[2], 5, SAMPLED)])[0].tokens
    )  # the first takes the prefill's token
    for r in group:
        assert len(r.token_logprobs) == 5 and all(len(e.top) == 2 for e in r.token_logprobs)
        assert all(e.top[0][1] >= e.top[1][1] and e.logprob <= e.top[0][1] + 1e-6 for e in r.token_logprobs)
    with pytest.raises(decode.DecodeError, match="3 samples of one prompt but the engine has 2 slots"):
        engine.submit_group([Request(PROMPTS[2], 5)] * 3)


def test_infer_sampling_flags_end_to_end(engine, capsys, tmp_path):
    # A saved run of the engine's model, decoded by infer.py on its mesh: one prompt of 6 tokens
    # and 16 new on data=2 are the engine's shapes, so the greedy and sampled programs are its own.
    import infer
    from ladder_jax import checkpoint
    from ladder_jax.tokenizer import ByteTokenizer

    cfg, mesh, params = model_on("ladder", 2, 4)
    run = tmp_path / "run"
    checkpoint.check_writable(run)
    checkpoint.save_config(run, cfg)
    checkpoint.save_params(run, params, step=1)

    def completion(*flags):
        argv = ["--checkpoint", str(run), "--prompt", "Hello", "--max-new-tokens", "16", "mesh.data=2", "mesh.tensor=4"]
        assert infer.main([*argv, *flags]) == 0
        out = capsys.readouterr().out
        assert out.startswith("Hello") and out.endswith("\n")
        return out[len("Hello") : -1]

    greedy = decode.generate(cfg.model, mesh, params, [PROMPTS[0]], 16, eos_id=257).tokens[0]
    assert completion("--temperature", "0", "--seed", "5") == ByteTokenizer().decode(greedy)
    assert completion("--temperature", "1", "--top-k", "1", "--seed", "5") == ByteTokenizer().decode(greedy)  # argmax
    sampled = completion("--temperature", "1", "--seed", "1")
    assert completion("--temperature", "1", "--seed", "1") == sampled != completion("--temperature", "1", "--seed", "2")
    assert sampled != ByteTokenizer().decode(greedy)
    assert infer.main(["--checkpoint", str(run), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "error: " in capsys.readouterr().err


def test_the_next_step_is_dispatched_before_the_previous_steps_tokens_are_read(engine, monkeypatch):
    # As on an accelerator: two steps in flight. Each dispatch waits for its own step here, so
    # XLA:CPU never runs two at once (fake devices deadlock so); what is tested is the order.
    alone = [engine.run([Request(p, n)])[0].tokens for p, n in zip(PROMPTS[2:4], NEW[2:4])]
    events, dispatch, read = [], engine._dispatch, engine._read

    def dispatch_and_wait():
        dispatch()
        jax.block_until_ready(engine.last_new)
        events.append(("dispatch", engine.steps))

    def read_oldest(dispatched):
        events.append(("read", next(i for i, d in enumerate(order) if d is dispatched[0]) + 1))
        read(dispatched)

    order = []
    monkeypatch.setattr(engine, "max_in_flight", 2)
    monkeypatch.setattr(engine, "_dispatch", lambda: (dispatch_and_wait(), order.append(engine.last_new)))
    monkeypatch.setattr(engine, "_read", read_oldest)
    steps = engine.steps
    together = engine.run([Request(p, n) for p, n in zip(PROMPTS[2:4], NEW[2:4])])
    assert [r.tokens for r in together] == alone and engine.busy_slots == 0 and not engine.in_flight
    n = engine.steps - steps
    # Step k + 1 goes out before step k's tokens come back; the last step is read after its dispatch.
    want = [("dispatch", steps + 1)] + [e for k in range(1, n) for e in (("dispatch", steps + k + 1), ("read", k))]
    assert events == want + [("read", n)]
    assert n == max(NEW[2:4])  # one step past the longer request's last token (the prefill gives the first)


PAGED_CASES = [
    (plan, shape)
    for plan in ("standard", "ladder", "standard,ladder@-2:", "spd", "lp@0:2")
    for shape in ((2, 4), (1, 2))
]


@pytest.mark.parametrize(
    "plan, mesh_shape", [pytest.param(p, m, id=f"{p}-data{m[0]}xtensor{m[1]}") for p, m in PAGED_CASES]
)
def test_paged_cache_gives_the_dense_decoders_tokens_and_log_probabilities(plan, mesh_shape, devices):
    cfg, mesh, params = model_on(plan, *mesh_shape)
    # Pages of 8 positions: the 13-token prompt and its 16 new tokens span four of them.
    engine = Engine(cfg.model, mesh, params, max_running=2, cache_len=32, page_size=8)
    a = engine.submit(Request(PROMPTS[1], NEW[0], logprobs=3))
    for _ in range(3):
        engine.step()
    # b joins mid-stream; c waits for a row and joins when a or b leaves.
    b, c = Request(PROMPTS[0], NEW[0], logprobs=3), Request(PROMPTS[0], 5)
    engine.run([b, c])
    engine.run([a])
    assert engine.pages_in_use == 0 and engine.unpromised == [engine.shard_pages] * engine.data
    # Every page is free again; the 13-token prompt's full page stays cached, held by nobody.
    assert sorted(engine.free_pages[0] + list(engine.evictable[0])) == list(range(engine.shard_pages))
    assert engine.cached_pages == 1
    dense = decode.generate(cfg.model, mesh, params, test_decode.PROMPTS, NEW[0]).tokens  # the dense cache
    assert a.tokens == dense[1] and b.tokens == dense[0] and c.tokens == dense[0][:5]
    assert_forward_logprobs(cfg, mesh, params, [a, b], 3)


def assert_forward_logprobs(cfg, mesh, params, requests, top_n):
    """Each token's log-probability and the top_n most likely: a NumPy log-softmax (float64) of a
    full forward's logits over prompt and tokens (two requests, 32 positions: one compile per mesh)."""
    seqs = np.full((2, 32), cfg.model.pad_id, np.int32)
    for row, r in enumerate(requests):
        seqs[row, : len(r.prompt) + len(r.tokens)] = list(r.prompt) + r.tokens
    logits = np.asarray(M.logits(cfg.model, mesh, params, seqs), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    for row, r in enumerate(requests):
        want = logp[row, len(r.prompt) - 1 : len(r.prompt) - 1 + len(r.tokens)]
        got = [e.logprob for e in r.token_logprobs]
        np.testing.assert_allclose(got, want[np.arange(len(r.tokens)), r.tokens], atol=2e-5)
        top = np.array([[lp for _, lp in e.top] for e in r.token_logprobs])
        np.testing.assert_allclose(top, -np.sort(-want, axis=-1)[:, :top_n], atol=2e-5)
        if r.prompt_logprobs is not None:  # the prompt's tokens after the first, and their most likely
            first, *scored = r.prompt_token_logprobs
            assert first is None and len(scored) == len(r.prompt) - 1
            want = logp[row, : len(r.prompt) - 1]
            prompt = np.asarray(r.prompt[1:])
            np.testing.assert_allclose([e.logprob for e in scored], want[np.arange(len(prompt)), prompt], atol=2e-5)
            top = np.array([[lp for _, lp in e.top] for e in scored]).reshape(len(scored), r.prompt_logprobs)
            np.testing.assert_allclose(top, -np.sort(-want, axis=-1)[:, : r.prompt_logprobs], atol=2e-5)


def step_until_done(engine, requests):
    """Step an engine until requests submitted to it are done (`Engine.run` submits them too)."""
    while not all(r.done.is_set() for r in requests):
        engine.step()


def small_engine(plan, **kw):
    """The shapes of the paged test's data 1 x tensor 2 engine (its decode step compiles once)."""
    cfg, mesh, params = model_on(plan, 1, 2)
    return Engine(cfg.model, mesh, params, max_running=2, cache_len=32, page_size=8, **kw)


@pytest.mark.parametrize("plan", ["standard", "ladder"])
def test_batched_and_chunked_prefill_give_the_dense_decoders_tokens_and_log_probabilities(plan, devices):
    cfg, mesh, params = model_on(plan, 1, 2)
    dense = decode.generate(cfg.model, mesh, params, test_decode.PROMPTS, NEW[0]).tokens
    prefill = decode.paged_prefill_fn(cfg.model, mesh, MAX_LOGPROBS)
    compiled = prefill._cache_size()
    # Batched: both prompts (6 and 13 tokens) in one call of two rows.
    batched = small_engine(plan)
    pair = [batched.submit(Request(p, NEW[0], logprobs=2)) for p in test_decode.PROMPTS]
    batched.step()
    assert batched.prefills == 1 and batched.prefill_tokens == 6 + 13 and batched.busy_slots == 2
    batched.run(pair)
    assert [r.tokens for r in pair] == dense
    assert_forward_logprobs(cfg, mesh, params, pair, 2)
    # Chunked: 8 tokens a step, so the 13-token prompt goes in two chunks while the other decodes.
    chunked = small_engine(plan, prefill_chunk=8)
    events = []
    dispatch_prefill = chunked._dispatch_prefill
    chunked._dispatch_prefill = lambda: events.append("prefill") or dispatch_prefill()
    x = chunked.submit(Request(test_decode.PROMPTS[0], NEW[0], on_token=lambda t: events.append("x"), logprobs=2))
    chunked.step()
    assert events == ["prefill", "x", "x"]  # its prefill's token, then a decode step's (in one step on CPU)
    y = Request(test_decode.PROMPTS[1], NEW[0], on_token=lambda t: events.append("y"), logprobs=2, prompt_logprobs=3)
    step_until_done(chunked, [x, chunked.submit(y)])
    # y's first chunk, a decode step of x, y's last chunk (its first token), then both decode.
    assert events[3:8] == ["prefill", "x", "prefill", "y", "x"] and events.count("prefill") == 3
    assert [x.tokens, y.tokens] == dense and chunked.prefill_tokens == 6 + 13
    # y's prompt was scored over its two chunks; again, its cached first page is prefilled anyway.
    again = chunked.run([Request(y.prompt, 2, prompt_logprobs=3)])[0]
    assert again.cached_tokens == 0 and again.prompt_token_logprobs == y.prompt_token_logprobs
    assert_forward_logprobs(cfg, mesh, params, [x, y], 2)
    assert prefill._cache_size() - compiled <= 2  # (2 rows x 16) and (1 row x 8), unless compiled before
    assert chunked.pages_in_use == 0 and chunked.unpromised == [chunked.shard_pages]


def test_samples_share_the_first_samples_pages_and_go_on_if_it_is_cancelled_while_prefilling(devices):
    cfg, mesh, params = model_on("ladder", 1, 2)
    dense = decode.generate(cfg.model, mesh, params, test_decode.PROMPTS, NEW[0]).tokens
    engine = small_engine("ladder", prefix_cache=False)
    group = engine.submit_group([Request(PROMPTS[1], NEW[0]) for _ in range(2)])
    engine.step()
    # One call: the first prefills 13 tokens into pages 0 and 1, the second shares page 0 (full)
    # and prefills the 5 tokens of its own page 1.
    assert engine.prefills == 1 and engine.prefill_tokens == 13 + 5 and engine.pages_in_use == 3
    step_until_done(engine, group)
    assert [r.tokens for r in group] == [dense[1]] * 2
    # 8 tokens a step: the first sample's first chunk (the shared page) goes, then it is
    # cancelled; the second prefills its own 5 tokens and gets the same tokens.
    chunked = small_engine("ladder", prefill_chunk=8, prefix_cache=False)
    first, second = chunked.submit_group([Request(PROMPTS[1], NEW[0]) for _ in range(2)])
    chunked.step()
    assert chunked.prefill_tokens == 8 and not second.tokens
    first.cancel()
    step_until_done(chunked, [second])
    assert first.finish_reason == "cancelled" and not first.tokens and second.tokens == dense[1]
    assert chunked.prefill_tokens == 8 + 5
    # Cancelled before its first chunk: the second writes the shared page itself.
    first, second = chunked.submit_group([Request(PROMPTS[1], NEW[0]) for _ in range(2)])
    chunked._admit(block=False)
    first.cancel()
    step_until_done(chunked, [second])
    assert first.finish_reason == "cancelled" and second.tokens == dense[1]
    assert chunked.prefill_tokens == 8 + 5 + 13
    assert chunked.pages_in_use == 0 and chunked.unpromised == [8]


def test_prefix_cache_shares_full_prompt_pages_evicts_the_least_recently_used_and_changes_no_token(devices):
    cfg, mesh, params = model_on("ladder", 1, 2)
    system = [256, *b"System:"]  # one page of 8 positions
    a, b, other = system + list(b"hi"), system + list(b"bye"), [256, *b"Other prompt"]
    z1, z2 = [256, *range(60, 72)], [256, 7]  # 4 and 3 pages with 16 new tokens
    dense = {}
    for pair in ([a, b], [other, z1], [z2, z2]):
        dense.update(zip(map(tuple, pair), decode.generate(cfg.model, mesh, params, pair, NEW[0]).tokens))
    engine = small_engine("ladder")
    assert engine.run([Request(a, NEW[0])])[0].tokens == dense[tuple(a)] and engine.cached_pages == 1
    # Two prompts that begin with the cached page: they hold it together and prefill the rest.
    shared = [engine.submit(Request(p, NEW[0])) for p in (a, b)]
    prefilled = engine.prefill_tokens
    engine.step()
    assert engine.prefill_tokens - prefilled == 2 + 3 and engine.pages_in_use == 1 + 1 + 1
    step_until_done(engine, shared)
    assert [r.tokens for r in shared] == [dense[tuple(a)], dense[tuple(b)]]
    assert [r.cached_tokens for r in shared] == [8, 8]
    assert engine.run([Request(other, NEW[0])])[0].cached_tokens == 0
    # 7 pages for z1 and z2 with 6 uncached ones free: the cached pages nobody holds count as
    # free, and the least recently used (the system prompt's) is evicted, not the other's.
    zs = [engine.submit(Request(p, NEW[0])) for p in (z1, z2)]
    engine.step()
    assert engine.busy_slots == 2
    step_until_done(engine, zs)
    assert [r.tokens for r in zs] == [dense[tuple(z1)], dense[tuple(z2)]]
    again = engine.run([Request(a, NEW[0]), Request(other, NEW[0])])
    assert [r.cached_tokens for r in again] == [0, 8]
    assert [r.tokens for r in again] == [dense[tuple(a)], dense[tuple(other)]]
    queries = len(a) * 3 + len(b) + len(other) * 2 + len(z1) + len(z2)
    assert (engine.prefix_queries, engine.prefix_hits) == (queries, 3 * 8)
    assert engine.prefix_hit_rate == 24 / queries and engine.pages_in_use == 0
    # Off: no page is kept, and the tokens are the same.
    off = small_engine("ladder", prefix_cache=False)
    assert [r.tokens for r in off.run([Request(a, NEW[0])]) + off.run([Request(b, NEW[0])])] == [
        dense[tuple(a)],
        dense[tuple(b)],
    ]
    assert off.cached_pages == 0 and off.prefix_queries == 0 and len(off.free_pages[0]) == off.shard_pages


def test_past_the_pool_the_newest_is_preempted_and_resumes_with_the_tokens_it_would_have_made(engine):
    cfg, mesh, params = engine.cfg, engine.mesh, engine.params
    # Four rows (two per data shard) but three pages of 8 positions per shard.
    small = Engine(cfg, mesh, params, max_running=4, cache_len=32, page_size=8, kv_pages=6)
    assert (small.slots, small.shard_pages, small.total_pages) == (4, 3, 6)
    with pytest.raises(decode.DecodeError, match="needs 4 pages of 8 positions, above the 3 of the KV cache's pool"):
        small.submit(Request(PROMPTS[1], 16))  # 13 + 16 positions
    with pytest.raises(decode.DecodeError, match="3 samples of 3 pages each do not fit the KV cache's 6 pages"):
        small.submit_group([Request(PROMPTS[0], 16) for _ in range(3)])
    # Each starts on the pages of its prompt and first token; two on a shard then grow to more
    # than its three pages, and the newer goes back to wait, before any new request.
    jobs = [(PROMPTS[0], 16, decode.GREEDY), (PROMPTS[0], 16, SAMPLED), (PROMPTS[3], 12, decode.GREEDY)]
    jobs += [(PROMPTS[2], 14, decode.GREEDY)]
    requests = [small.submit(Request(p, n, s, logprobs=2)) for p, n, s in jobs]
    small.step()
    assert small.busy_slots == 4 and small.pages_in_use == 5  # 1 + 1 + 2 + 1
    late = small.submit(Request(PROMPTS[2], 4))
    waited = False
    while not all(r.done.is_set() for r in [*requests, late]):
        small.step()
        waited |= bool(small.preempted) and not late.done.is_set() and late.tokens == []
    assert small.preemptions >= 2 and sum(r.preemptions for r in [*requests, late]) == small.preemptions and waited
    assert all(r.finish_reason == "length" and len(r.tokens) == n for r, (_, n, _) in zip(requests, jobs))
    assert small.pages_in_use == 0 and small.unpromised == [3, 3] and not small.preempted
    for r, (p, n, s) in zip(requests, jobs):  # what each makes alone, and its log-probabilities
        alone = engine.run([Request(p, n, s, logprobs=2)])[0]
        assert r.tokens == alone.tokens, p
        np.testing.assert_allclose(
            [e.logprob for e in r.token_logprobs], [e.logprob for e in alone.token_logprobs], atol=2e-5
        )
    # Preempted by hand with pages to spare: its pages before its last token stay cached (its
    # prompt's and those of the tokens it made), and it comes back through the prefix cache.
    r = small.submit(Request(PROMPTS[2], 14))
    while len(r.tokens) < 10:
        small.step()
    slot, hits = small.active.index(r), small.prefix_hits
    small._preempt(slot)
    assert page_keys(r.context[:8], 8)[0] in small.cached[slot // 2] and small.preempted == [r]
    small.run([r])
    assert small.prefix_hits == hits + 8 and r.preemptions == 1
    assert r.tokens == engine.run([Request(PROMPTS[2], 14)])[0].tokens


def test_after_precompile_requests_of_any_length_and_batch_compile_nothing(compiles, devices):
    engine = small_engine("standard", prefill_chunk=32)
    # a budget of 32 tokens a step: one or two rows (the engine has two) of 16, one row of 32
    assert engine.prefill_shapes() == [(1, 16), (2, 16), (1, 32)]
    engine.precompile()
    compiled = len(compiles)
    rng = np.random.default_rng(0)
    requests = [Request(rng.integers(0, 256, n).tolist(), 4) for n in (3, 20, 9, 16, 1)]
    engine.run(requests)
    assert compiles[compiled:] == [] and all(len(r.tokens) == 4 for r in requests)


def test_a_step_of_the_same_rows_within_their_pages_sends_nothing_to_the_device(devices):
    engine = small_engine("standard")  # pages of 8 positions
    short, long = engine.submit(Request([256, 7], 3)), engine.submit(Request([256, 8, 9], 9))
    engine.step()  # both prefilled in one call, then a decode step that sends their rows
    with jax.transfer_guard_host_to_device("disallow_explicit"):
        engine.step()  # positions 3 and 4, in their first pages
    while not short.done.is_set():
        engine.step()
    engine.step()  # the freed row is sent once (its position back to 0)...
    with jax.transfer_guard_host_to_device("disallow_explicit"):
        engine.step()  # ...and stays there on the device as the other row moves on
    assert engine.decoding.tolist() == [False, True]
    assert np.asarray(engine.last_positions).tolist() == engine.positions.tolist() == [0, 7]
    while not long.done.is_set():
        engine.step()
    assert short.tokens == engine.run([Request([256, 7], 3)])[0].tokens
    assert long.tokens == engine.run([Request([256, 8, 9], 9)])[0].tokens


def test_a_step_that_raises_ends_its_requests_with_error_and_the_engine_goes_on(devices, monkeypatch):
    engine = small_engine("standard")
    alone = engine.run([Request(PROMPTS[0], 6)])[0].tokens
    dispatch, calls = engine._dispatch, []

    def fails_once():
        calls.append(None)
        if len(calls) == 2:
            raise RuntimeError("a device error")
        dispatch()

    monkeypatch.setattr(engine, "_dispatch", fails_once)
    thread = threading.Thread(target=engine.serve_forever)
    thread.start()
    try:
        first = engine.submit(Request(PROMPTS[0], 6))
        assert first.done.wait(60) and first.finish_reason == "error" and len(first.tokens) == 2
        second = engine.submit(Request(PROMPTS[0], 6))
        assert second.done.wait(60) and second.finish_reason == "length"
    finally:
        engine.stop()
        thread.join(60)
    assert second.tokens == alone and engine.pages_in_use == 0


def test_on_an_accelerator_the_kv_pool_gets_the_memory_share_the_weights_and_temporaries_leave(devices, monkeypatch):
    cfg, mesh, params = model_on("standard", 1, 2)
    alone = small_engine("standard")  # XLA:CPU reports no memory: the pool is the rows' worth
    assert alone.total_pages == alone.slots * alone.table_width == 2 * 4
    temporaries = alone.program_temporaries()
    # by hand, one page of 8 positions per device: k and v of every layer, its KV heads over
    # tensor 2, float32
    m = cfg.model
    per_page = 2 * m.n_layers * 8 * (m.n_kv_heads // 2) * (m.d_model // m.n_heads) * 4
    assert M.cache_bytes_per_device(m, (1, 2), 1, 8) == per_page and temporaries > 0
    # the step's temporaries do not grow with its pool (the pool is updated in place)
    step = decode.paged_step_fn(m, mesh, MAX_LOGPROBS, "cuts")
    for pages in (1, 1000):
        args = decode.abstract_paged_step_args(m, mesh, 2, pages, 8, 4)
        memory = step.lower(params, *args[1:]).compile().memory_analysis()
        assert memory.temp_size_in_bytes <= temporaries, pages
    in_use = 3 * 2**20  # the weights, say
    fake = {"limit": int(2 * (in_use + temporaries + 100.5 * per_page))}  # half of it leaves 100.5 pages
    monkeypatch.setattr(engine_module, "device_memory", lambda device: (fake["limit"], in_use))
    sized = small_engine("standard", kv_memory=0.5)
    assert (sized.total_pages, sized.shard_pages) == (100, 100)
    assert small_engine("standard", kv_memory=0.5, kv_pages=6).total_pages == 6  # pages given win
    request = Request(PROMPTS[1], 16)  # 13 + 16 positions: 4 pages
    assert sized.run([request])[0].tokens == alone.run([Request(PROMPTS[1], 16)])[0].tokens
    fake["limit"] = int(2 * (in_use + temporaries + 3.5 * per_page))  # 3 pages: one request needs 4
    with pytest.raises(decode.DecodeError) as err:
        small_engine("standard", kv_memory=0.5)
    assert str(err.value).startswith("--kv-memory 0.5 of ") and str(err.value).endswith(
        "fewer than the 4 pages of 8 positions one request of 32 positions may hold; raise --kv-memory, "
        "lower --max-len or --prefill-chunk, or give --kv-pages"
    )
    with pytest.raises(decode.DecodeError, match=r"--kv-memory 1.5: give the share .* in \(0, 1\]"):
        small_engine("standard", kv_memory=1.5)


def test_random_traffic_ends_every_request_as_alone_and_gives_every_page_back(engine):
    """Groups of samples, shared prompt prefixes (the prefix cache), cancellations and, over a
    pool of three pages per shard, preemptions, arriving at random for 40 steps: every request
    not cancelled ends with the tokens and log-probabilities it gets alone."""
    cfg, mesh, params = engine.cfg, engine.mesh, engine.params
    rng = random.Random(1)
    small = Engine(cfg, mesh, params, max_running=4, cache_len=32, page_size=8, kv_pages=6)
    shared = [256, *b"shared prefix!!"]  # two full pages of 8 positions
    prompts = [*PROMPTS, [*shared, 1, 2], [*shared, 3]]
    submitted, cancel_at = [], {}
    for step in range(400):
        p = rng.choice(prompts)
        if step < 40 and rng.random() < 0.4 and len(p) < 24:
            n = rng.randint(1, min(24 - len(p), 14))
            sampling = dataclasses.replace(SAMPLED if rng.random() < 0.4 else decode.GREEDY, seed=rng.randrange(100))
            group = [Request(p, n, sampling, logprobs=1) for _ in range(rng.choice([1, 1, 2]))]
            try:
                small.submit_group(group)
            except decode.DecodeError:  # two samples whose pages cannot fit at once
                continue
            submitted += group
            cancel_at.update((id(r), step + rng.randint(0, 10)) for r in group if rng.random() < 0.15)
        for r in submitted:
            if cancel_at.get(id(r)) == step:
                r.cancel()
        small.step()
        if step > 40 and all(r.done.is_set() for r in submitted):
            break
    assert small.preemptions >= 2 and small.prefix_hits > 0 and "cancelled" in small.finished
    assert small.pages_in_use == 0 and small.unpromised == [3, 3] and not small.preempted
    for r in submitted:
        assert r.done.is_set()
        if r.finish_reason != "cancelled":
            alone = engine.run([Request(r.prompt, r.max_new_tokens, r.sampling, logprobs=1)])[0]
            assert r.tokens == alone.tokens, (r.prompt, r.preemptions)
            np.testing.assert_allclose(
                [e.logprob for e in r.token_logprobs], [e.logprob for e in alone.token_logprobs], atol=3e-5
            )


def test_running_requests_get_their_next_page_before_a_new_one_is_admitted(devices):
    """A request that fits on the last free pages, which a running row needs in the same step,
    waits instead of being admitted, prefilled and preempted at once."""
    engine = small_engine("ladder", kv_pages=4, prefix_cache=False)
    a = engine.submit(Request([256, *b"Hello"], 14))  # positions 6..19: pages 0, 1 and 2
    engine.step()
    while engine.positions[engine.active.index(a)] != 16:  # its next step writes into a third page
        engine.step()
    late = engine.submit(Request([256, *range(40, 48)], 4))  # 9 tokens: would start on the 2 free pages
    engine.step()
    assert engine.prefill_tokens == 6 and engine.waiting_requests == 1  # it waited for a's page
    engine.run([a, late])
    assert engine.preemptions == 0 and engine.prefill_tokens == 6 + 9
