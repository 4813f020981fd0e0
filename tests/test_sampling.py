"""Vocab-parallel sampling against an exact NumPy reference, at tensor 1 and 4: the kept sets of
top-k/top-p equal a stable sort's (ties included), many draws with a fixed seed pass a chi-square
goodness-of-fit test against the exact distribution (a nucleus and a top-k wider than 64 tokens),
the same test rejects the old 64-candidate sampler and a 5% temperature error, and temperature 0
is the greedy argmax."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from scipy import stats

from ladder_jax import decode
from ladder_jax.mesh import make_mesh

from .conftest import small_config

VOCAB = 256  # 64 columns per device on tensor=4
DRAWS = 4_000
SIGNIFICANCE = 1e-3  # the fit test rejects below this p-value
LEAST = 25  # expected draws per chi-square bin at least
# One strong token and a standard-normal tail, as a language model's next token often looks: the
# tail's share of the mass moves fast with the temperature, which gives the test its power.
LOGITS = np.random.RandomState(0).randn(VOCAB).astype(np.float32)
LOGITS[7] = 6.0
# (temperature, top_k, top_p): temperature alone, a 158-token nucleus, top-k 100 alone, top-k 100
# then a 77-token nucleus of it, and greedy.
CASES = [(0.7, 0, 1.0), (1.0, 0, 0.95), (1.0, 100, 1.0), (1.0, 100, 0.95), (0.0, 0, 1.0)]
WIDE = [1, 3]  # more than 64 tokens kept: what the 64-candidate sampler cut
REPLICATED = P()


def reference(logits, temperature, top_k, top_p):
    """transformers' order: temperature, then top-k, then top-p on the renormalised top k."""
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    order = np.argsort(-logits, kind="stable")
    keep = np.zeros_like(probs, bool)
    keep[order[: top_k or len(probs)]] = True
    probs = np.where(keep, probs, 0) / probs[keep].sum()
    before = np.cumsum(probs[order]) - probs[order]
    keep[order[before >= top_p]] = False
    probs = np.where(keep, probs, 0)
    return probs / probs.sum(), keep


def cut_at_64(logits, temperature, top_k, top_p):
    """The distribution of the sampler this one replaced: top-k and top-p among the best 64
    tokens only (at any tensor degree, for distinct logits), the nucleus measured against the
    whole vocabulary's softmax unless top-k is set."""
    weights = np.exp((logits - logits.max()) / temperature)
    best = np.argsort(-logits, kind="stable")[:64]
    rank = np.arange(64)
    in_top_k = rank < (min(top_k, 64) or 64)
    total = weights[best][in_top_k].sum() if top_k else weights.sum()
    before = (np.cumsum(weights[best] * in_top_k) - weights[best] * in_top_k) / total
    probs = np.zeros_like(weights)
    kept = best[in_top_k & (before < top_p)]
    probs[kept] = weights[kept]
    return probs / probs.sum()


def fit_p_value(tokens, want):
    """Pearson's chi-square goodness of fit of `tokens` to the probabilities `want`: tokens in
    order of probability, grouped until each bin expects LEAST draws (a draw of a token `want`
    excludes gives 0)."""
    if (want[tokens] == 0).any():
        return 0.0
    counts = np.bincount(tokens, minlength=len(want))
    observed, expected, o, e = [], [], 0, 0.0
    for t in np.argsort(-want, kind="stable")[: (want > 0).sum()]:
        o, e = o + counts[t], e + want[t] * len(tokens)
        if e >= LEAST:
            observed, expected, o, e = observed + [o], expected + [e], 0, 0.0
    observed[-1], expected[-1] = observed[-1] + o, expected[-1] + e
    return stats.chisquare(observed, expected).pvalue


def sharded(fn, tensor: int, n_in: int, out_specs=REPLICATED):
    """fn(logits' vocab shard, n_in replicated per-row arrays) on a mesh of `tensor` devices."""
    mesh = make_mesh(small_config(tensor=tensor))
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(None, "tensor"),) + (P(),) * n_in, out_specs=out_specs))


@pytest.fixture(scope="module", params=[1, 4], ids=["tensor1", "tensor4"])
def draws(devices, request):
    """DRAWS tokens per case from one compiled call: each row draws at its own position."""
    rows = len(CASES) * DRAWS
    temperature, top_k, top_p = (
        np.repeat(np.array(c, dtype), DRAWS) for c, dtype in zip(zip(*CASES), ("f4", "i4", "f4"))
    )
    tokens = sharded(decode.vocab_parallel_sample, request.param, 5)(
        jnp.broadcast_to(LOGITS, (rows, VOCAB)),
        jnp.arange(rows, dtype=jnp.int32),
        temperature,
        top_k,
        top_p,
        jnp.full((rows,), 1234, jnp.int32),
    )
    return np.asarray(tokens).reshape(len(CASES), DRAWS)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"T{t}-k{k}-p{p}" for t, k, p in CASES])
def test_draws_fit_the_exact_distribution(draws, case):
    temperature, top_k, top_p = CASES[case]
    got = draws[case]
    if temperature == 0:
        assert (got == LOGITS.argmax()).all()
        return
    want, keep = reference(LOGITS.astype(np.float64), temperature, top_k, top_p)
    assert keep[got].all(), f"tokens outside the kept set: {sorted(set(got[~keep[got]]))}"
    assert fit_p_value(got, want) > SIGNIFICANCE
    assert case not in WIDE or keep.sum() > 64


def test_rows_that_cut_nothing_draw_the_same_tokens_without_the_sort(draws, request):
    # the temperature-only and the greedy cases, drawn by the "temperature" sampler (no kept_tokens)
    tensor = request.node.callspec.params["draws"]
    rows = [c for c, (_, k, p) in enumerate(CASES) if k == 0 and p == 1.0]
    temperature = np.repeat(np.array([CASES[c][0] for c in rows], "f4"), DRAWS)
    n = len(temperature)
    tokens = sharded(functools.partial(decode.vocab_parallel_sample, cuts=False), tensor, 5)(
        jnp.broadcast_to(LOGITS, (n, VOCAB)),
        (np.arange(len(CASES) * DRAWS).reshape(len(CASES), DRAWS)[rows].ravel()).astype(np.int32),
        temperature,
        np.full(n, 7, np.int32),  # not read: the same tokens whatever the cuts say
        np.full(n, 0.5, np.float32),
        np.full(n, 1234, np.int32),
    )
    assert (np.asarray(tokens).reshape(len(rows), DRAWS) == draws[rows]).all()


def test_each_batch_gets_the_cheapest_sampler_that_serves_all_its_rows():
    greedy, warm, cut = decode.GREEDY, decode.Sampling(temperature=0.7), decode.Sampling(temperature=1.0, top_p=0.9)
    assert decode.sampler_for([greedy, decode.Sampling(top_k=5)]) == "greedy"  # a greedy row reads no cut
    assert decode.sampler_for([greedy, warm]) == "temperature"
    assert decode.sampler_for([greedy, warm, cut]) == "cuts"
    assert decode.sampler_for([decode.Sampling(temperature=1.0, top_k=40)]) == "cuts"


@pytest.mark.parametrize("case", WIDE, ids=[f"T{CASES[c][0]}-k{CASES[c][1]}-p{CASES[c][2]}" for c in WIDE])
def test_the_fit_rejects_the_64_candidate_cut_and_a_5_percent_temperature_error(case):
    temperature, top_k, top_p = CASES[case]
    logits = LOGITS.astype(np.float64)
    want, _ = reference(logits, temperature, top_k, top_p)
    rng = np.random.RandomState(0)
    for wrong in [
        cut_at_64(logits, temperature, top_k, top_p),
        reference(logits, temperature * 1.05, top_k, top_p)[0],
        reference(logits, temperature / 1.05, top_k, top_p)[0],
    ]:
        assert fit_p_value(rng.choice(VOCAB, DRAWS, p=wrong), want) < SIGNIFICANCE
    assert fit_p_value(rng.choice(VOCAB, DRAWS, p=want), want) > SIGNIFICANCE


def test_kept_sets_equal_a_stable_sorts_with_ties_and_masked_columns(devices):
    """Rows of logits rounded to one decimal (many ties, also at the boundaries) or not, some with
    -inf columns (the padded vocabulary's), and top-k/top-p around 64 and up to the vocabulary."""
    rng = np.random.RandomState(1)
    logits = rng.randn(160, VOCAB).astype(np.float32) * 2
    logits[::2] = logits[::2].round(1)
    logits[::5, rng.randint(VOCAB, size=20)] = -np.inf
    top_k = rng.choice([0, 1, 2, 63, 64, 65, 100, 255, VOCAB], len(logits)).astype(np.int32)
    top_p = rng.choice([1.0, 0.3, 0.5, 0.9, 0.99, 1e-6], len(logits)).astype(np.float32)
    got = np.asarray(sharded(decode.kept_tokens, 4, 2, P(None, "tensor"))(logits, top_k, top_p))
    for row, k, p, keep in zip(logits, top_k, top_p, got):
        want = reference(row.astype(np.float64), 1.0, k, p)[1]
        finite = np.isfinite(row)  # -inf columns have probability 0 either way
        assert (keep[finite] == want[finite]).all(), (k, p, np.nonzero(keep[finite] != want[finite]))


def test_bad_sampling_settings_are_refused_in_one_line():
    for settings, message in [
        (dict(temperature=-0.5), "temperature=-0.5; give 0"),
        (dict(top_k=VOCAB + 1), f"top_k={VOCAB + 1}; give 0 \\(off\\) or 1..{VOCAB}"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(top_p=0.0), "top_p=0.0; give a number in \\(0, 1\\]"),
        (dict(seed=-1), "seed=-1"),
    ]:
        with pytest.raises(decode.DecodeError, match=message) as e:
            decode.Sampling(**settings).check(VOCAB)
        assert "\n" not in str(e.value)
    assert decode.Sampling(temperature=1.0, top_k=VOCAB).check(VOCAB).top_k == VOCAB
