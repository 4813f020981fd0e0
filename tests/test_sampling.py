"""Vocab-parallel sampling on 8 fake CPU devices against a NumPy reference of the same
distribution: many draws with a fixed seed match its probabilities, top-k/top-p never leave the
kept set, and temperature 0 is the greedy argmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ladder_jax import decode
from ladder_jax.mesh import make_mesh

from .conftest import small_config

VOCAB = 256  # 32 columns per device on tensor=8
DRAWS = 4_000
# (temperature, top_k, top_p): temperature alone, top-k, top-p, both, and greedy.
CASES = [(0.7, 0, 1.0), (1.0, 10, 1.0), (1.3, 0, 0.8), (1.0, 20, 0.5), (0.0, 0, 1.0)]


def reference(logits, temperature, top_k, top_p):
    """transformers' order: temperature, then top-k, then top-p on the renormalised top k."""
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros_like(probs, bool)
    keep[order[: top_k or len(probs)]] = True
    probs = np.where(keep, probs, 0) / probs[keep].sum()
    before = np.cumsum(probs[order]) - probs[order]
    keep[order[before >= top_p]] = False
    probs = np.where(keep, probs, 0)
    return probs / probs.sum(), keep


@pytest.fixture(scope="module")
def draws(devices):
    """DRAWS tokens per case from one compiled call: each row draws at its own position."""
    mesh = make_mesh(small_config(tensor=8))
    logits = np.random.RandomState(0).randn(VOCAB).astype(np.float32) * 2.0
    rows = len(CASES) * DRAWS
    temperature, top_k, top_p = (
        np.repeat(np.array(c, dtype), DRAWS) for c, dtype in zip(zip(*CASES), ("f4", "i4", "f4"))
    )
    fn = jax.jit(
        jax.shard_map(
            decode.vocab_parallel_sample, mesh=mesh, in_specs=(P(None, "tensor"),) + (P(),) * 5, out_specs=P()
        )
    )
    tokens = fn(
        jnp.broadcast_to(logits, (rows, VOCAB)),
        jnp.arange(rows, dtype=jnp.int32),
        temperature,
        top_k,
        top_p,
        jnp.full((rows,), 1234, jnp.int32),
    )
    return logits, np.asarray(tokens).reshape(len(CASES), DRAWS)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"T{t}-k{k}-p{p}" for t, k, p in CASES])
def test_draws_follow_the_reference_distribution_and_stay_in_the_kept_set(draws, case):
    logits, tokens = draws
    temperature, top_k, top_p = CASES[case]
    got = tokens[case]
    if temperature == 0:
        assert (got == logits.argmax()).all()
        return
    want, keep = reference(logits.astype(np.float64), temperature, top_k, top_p)
    assert keep[got].all(), f"tokens outside the kept set: {sorted(set(got[~keep[got]]))}"
    freq = np.bincount(got, minlength=VOCAB) / DRAWS
    # The total variation of DRAWS draws from `want` has expectation about
    # 0.4 * sum(sqrt(p / DRAWS)) and a spread far below it; this bound is twice that expectation.
    tv, bound = 0.5 * np.abs(freq - want).sum(), 0.8 * np.sqrt(want / DRAWS).sum()
    assert tv < bound
    if top_k:
        assert keep.sum() <= top_k
    assert len(set(got)) == keep.sum() or keep.sum() > 30  # every kept token of a small set is drawn


def test_bad_sampling_settings_are_refused_in_one_line():
    for settings, message in [
        (dict(temperature=-0.5), "temperature=-0.5; give 0"),
        (dict(top_k=decode.CANDIDATES + 1), f"give 0 \\(off\\) or 1..{decode.CANDIDATES}"),
        (dict(top_p=0.0), "top_p=0.0; give a number in \\(0, 1\\]"),
        (dict(seed=-1), "seed=-1"),
    ]:
        with pytest.raises(decode.DecodeError, match=message) as e:
            decode.Sampling(**settings).check()
        assert "\n" not in str(e.value)
