"""Attention kernels against the plain-XLA path: forward and gradients, causal, packed documents
and grouped-query heads. The TPU (splash) and GPU (triton) Pallas kernels run in interpret mode
on CPU; cuDNN has no CPU mode, so its call is checked with jax.nn's XLA implementation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ladder_jax import attention as A
from ladder_jax import model as M
from ladder_jax.config import ConfigError
from ladder_jax.mesh import BATCH, make_mesh
from ladder_jax.training import loss_sums_fn

from .conftest import small_config

INTERPRETED = {
    "splash": lambda q, k, v, seg: A.splash_attention(q, k, v, seg, interpret=True),
    "triton": lambda q, k, v, seg: A.triton_flash_attention(q, k, v, seg, interpret=True),
}


def grouped_inputs(seed=0, b=1, s=128, kv=2, g=2, hd=32):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, s, kv, g, hd)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(b, s, kv, hd)), jnp.float32) for _ in range(2))
    return q, k, v


# Three documents of a packed window; positions restart with each one, as training windows do.
LENGTHS = [50, 40, 38]
SEGMENTS = jnp.asarray(np.repeat(np.arange(3), LENGTHS)[None], jnp.int32)
POSITIONS = jnp.asarray(np.concatenate([np.arange(n) for n in LENGTHS])[None], jnp.int32)


def squared_sum(f):
    return lambda q, k, v: (f(q, k, v) ** 2).sum()


def assert_same_values_and_gradients(f, ref, q, k, v, atol_out, tol_grad):
    np.testing.assert_allclose(jax.jit(f)(q, k, v), jax.jit(ref)(q, k, v), atol=atol_out)
    grads = jax.jit(jax.grad(squared_sum(f), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(squared_sum(ref), argnums=(0, 1, 2)))(q, k, v)
    for got, exp in zip(grads, want):
        np.testing.assert_allclose(got, exp, atol=tol_grad, rtol=tol_grad)


@pytest.mark.parametrize("kernel", sorted(INTERPRETED))
def test_kernel_matches_xla_and_its_gradients_on_packed_documents_with_grouped_heads(kernel):
    q, k, v = grouped_inputs()
    ref = lambda q, k, v: A.xla_attention(q, k, v, POSITIONS, SEGMENTS, jnp.float32)
    fused = lambda q, k, v: INTERPRETED[kernel](q, k, v, SEGMENTS)
    assert_same_values_and_gradients(fused, ref, q, k, v, atol_out=1e-5, tol_grad=1e-4)


def test_splash_and_the_cudnn_call_match_xla_on_causal_sequences_without_segments():
    q, k, v = grouped_inputs(seed=1, b=2, s=128, kv=1, g=4)
    positions = jnp.broadcast_to(jnp.arange(128)[None], (2, 128))
    ref = A.xla_attention(q, k, v, positions, None, jnp.float32)
    np.testing.assert_allclose(jax.jit(INTERPRETED["splash"])(q, k, v, None), ref, atol=1e-5)
    np.testing.assert_allclose(A.cudnn_attention(q, k, v, implementation="xla"), ref, atol=1e-5)


def dense_attention(q, k, v, positions, segments):
    """The plain formula, one (S x S) softmax per head, differentiated by JAX itself."""
    hd = q.shape[-1]
    scores = jnp.einsum("bskgd,btkd->bkgst", q, k) / np.sqrt(hd)
    mask = (positions[:, None, :] <= positions[:, :, None]) & (segments[:, :, None] == segments[:, None, :])
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v)


def test_xla_attention_and_its_own_backward_match_the_dense_formula_over_query_blocks():
    # 256 tokens = two query blocks; documents of 100, 120 and 36 tokens cross the block edge.
    lengths = [100, 120, 36]
    seg = jnp.asarray(np.repeat(np.arange(3), lengths)[None].repeat(2, 0), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(n) for n in lengths])[None].repeat(2, 0), jnp.int32)
    q, k, v = grouped_inputs(seed=3, b=2, s=256)
    ours = lambda q, k, v: A.xla_attention(q, k, v, pos, seg, jnp.float32)
    ref = lambda q, k, v: dense_attention(q, k, v, pos, seg)
    assert_same_values_and_gradients(ours, ref, q, k, v, atol_out=2e-6, tol_grad=2e-5)


def test_xla_attention_backward_keeps_no_sequence_by_sequence_residual():
    q, k, v = grouped_inputs(seed=4, b=1, s=256)
    pos = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32)[None], (1, 256))
    _, backward = jax.vjp(lambda q, k, v: A.xla_attention(q, k, v, pos, None, jnp.float32), q, k, v)
    kept = [x.shape for x in jax.tree.leaves(backward) if hasattr(x, "shape")]
    assert kept and not [s for s in kept if sum(d >= 128 for d in s) >= 2], kept


@pytest.mark.parametrize("reads", ["written", "cache"])
def test_decode_attention_reads_each_row_up_to_its_position(reads):
    # "written": a loop over key blocks up to the furthest position; "cache" (GPU): the whole
    # cache in one block, masked.
    r = np.random.default_rng(2)
    b, t, kv, g, hd = 3, 300, 2, 2, 16  # 300 is not a multiple of the block: the last block overlaps
    q = jnp.asarray(r.normal(size=(b, 1, kv, g, hd)), jnp.float32)
    ck, cv = (jnp.asarray(r.normal(size=(b, t, kv, hd)), jnp.float32) for _ in range(2))
    positions = jnp.array([0, 140, 299])
    # Keys after a row's position hold another request's leftovers: they must not count.
    stale = jnp.arange(t)[None, :, None, None] > positions[:, None, None, None]
    ck_stale, cv_stale = jnp.where(stale, 1e4, ck), jnp.where(stale, -1e4, cv)
    heads_first = [jnp.swapaxes(c, 1, 2) for c in (ck_stale, cv_stale)]  # the cache's layout: (B, K, T, hd)
    with A.decode_reads(reads):  # a function of its own: jit reuses a trace of the same function
        got = jax.jit(lambda *a: A.decode_attention(*a), static_argnums=(4, 5))(
            q, *heads_first, positions, jnp.float32, 128
        )
    # NumPy reference: softmax over keys 0..position of each row.
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q[:, 0], ck, cv))
    for row, p in enumerate(np.asarray(positions)):
        s = np.einsum("kgd,tkd->kgt", qn[row], kn[row, : p + 1]) / np.sqrt(hd)
        w = np.exp(s - s.max(-1, keepdims=True))
        want = np.einsum("kgt,tkd->kgd", w / w.sum(-1, keepdims=True), vn[row, : p + 1])
        np.testing.assert_allclose(np.asarray(got)[row, 0], want, atol=1e-5)


@pytest.mark.parametrize("reads", ["written", "cache"])
def test_paged_decode_attention_reads_each_rows_pages_in_table_order(reads):
    r = np.random.default_rng(3)
    b, t, kv, g, hd, page = 3, 40, 2, 2, 16, 8  # 5 pages per row; blocks of 2 pages: the last is half past the table
    q = jnp.asarray(r.normal(size=(b, 1, kv, g, hd)), jnp.float32)
    ck, cv = (np.asarray(r.normal(size=(b, t, kv, hd)), np.float32) for _ in range(2))
    positions = np.array([3, 17, 39])
    # Each row's pages scattered over a pool of 20 in a random order; pages past a row's position
    # are not in its table (the pool size: no page) or hold another request's leftovers.
    order = r.permutation(20)[: b * 5].reshape(b, 5)
    table = np.where(np.arange(5)[None] <= positions[:, None] // page, order, 20).astype(np.int32)
    pool_k, pool_v = (np.full((20, page, kv, hd), 1e4, np.float32) for _ in range(2))
    for row in range(b):
        for i in range(5):
            pool_k[order[row, i]], pool_v[order[row, i]] = (
                ck[row, i * page : (i + 1) * page],
                cv[row, i * page : (i + 1) * page],
            )
    stale = np.arange(t)[None, :, None, None] > positions[:, None, None, None]
    ck, cv = np.where(stale, 1e4, ck), np.where(stale, -1e4, cv)
    heads_first = [np.moveaxis(p, 2, 0) for p in (pool_k, pool_v)]  # the pools' layout: (K, pages, page, hd)
    with A.decode_reads(reads):  # "cache": every block of the table, a loop of fixed trip count
        paged = jax.jit(lambda *a: A.paged_decode_attention(*a), static_argnums=(0, 6, 7))
        got = paged("xla", q, *heads_first, table, positions, jnp.float32, 16)
    cache = [np.swapaxes(c, 1, 2) for c in (ck, cv)]
    want = jax.jit(A.decode_attention, static_argnums=(4, 5))(q, *cache, positions, jnp.float32, 16)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def _paged_kernel_case(seed, hd, page, pages, width, positions):
    """(q, bfloat16 pools (K, pages, page, hd), table (B, W)) of rows at `positions` whose pages
    lie in a random order, "no page" (the pool's size) past each row's position; the last row
    idle, with no pages at all."""
    r = np.random.default_rng(seed)
    b, kv, g = len(positions), 2, 2
    q = jnp.asarray(r.normal(size=(b, 1, kv, g, hd)), jnp.float32)
    pool_k, pool_v = (jnp.asarray(r.normal(size=(kv, pages, page, hd)), jnp.bfloat16) for _ in range(2))
    table = np.stack([r.permutation(pages)[:width] for _ in range(b)]).astype(np.int32)
    table = np.where(np.arange(width)[None] <= np.asarray(positions)[:, None] // page, table, pages)
    table[-1] = pages
    return q, pool_k, pool_v, table


def _check_paged_kernel(got, q, pool_k, pool_v, table, positions, **tolerance):
    """Each row but the idle last one against a NumPy softmax over its pages' keys up to its
    position; the idle row finite."""
    pages, hd = pool_k.shape[1], q.shape[-1]
    kn, vn = (np.asarray(p.astype(jnp.float32), np.float64) for p in (pool_k, pool_v))
    for row in range(len(positions) - 1):
        keys = np.concatenate([kn[:, i] for i in table[row] if i < pages], axis=1)[:, : positions[row] + 1]
        values = np.concatenate([vn[:, i] for i in table[row] if i < pages], axis=1)[:, : positions[row] + 1]
        sc = np.einsum("kgd,ktd->kgt", np.asarray(q[row, 0], np.float64), keys) / np.sqrt(hd)
        w = np.exp(sc - sc.max(-1, keepdims=True))
        want = np.einsum("kgt,ktd->kgd", w / w.sum(-1, keepdims=True), values)
        np.testing.assert_allclose(got[row, 0], want, **tolerance)
    assert np.isfinite(got[-1]).all()


def test_the_tpu_paged_kernel_reads_each_rows_pages_up_to_its_position_in_interpret_mode():
    # JAX's Pallas TPU paged-attention kernel as the decode step calls it (q scaled and grouped,
    # lengths = position + 1, "no page" ids clamped into the pool), run by Pallas' TPU interpreter
    # on a bfloat16 pool (the kernel reads keys and values as bfloat16), against NumPy.
    from jax.experimental.pallas import tpu as pltpu

    positions = np.array([3, 17, 39, 0], np.int32)
    q, pool_k, pool_v, table = _paged_kernel_case(5, hd=128, page=8, pages=20, width=5, positions=positions)
    with pltpu.force_tpu_interpret_mode():
        got = np.asarray(A.tpu_paged_decode(q, pool_k, pool_v, jnp.asarray(table), jnp.asarray(positions), jnp.float32))
    _check_paged_kernel(got, q, pool_k, pool_v, table, positions, atol=2e-6)


def test_the_gpu_paged_kernel_reads_each_rows_pages_up_to_its_position_in_interpret_mode():
    # JAX's Pallas Triton paged-attention kernel as the decode step calls it (q scaled and cast to
    # the pool's dtype, lengths = position + 1, "no page" ids clamped into the pool), run by
    # Pallas' interpreter on CPU, against NumPy. A table of 32 pages: 16 partitions of 2 pages,
    # one compute block each, so rows 1 and 2 end in a block whose second page is "no page".
    positions = np.array([3, 40, 200, 0], np.int32)
    q, pool_k, pool_v, table = _paged_kernel_case(6, hd=16, page=16, pages=40, width=32, positions=positions)
    got = np.asarray(
        A.gpu_paged_decode(q, pool_k, pool_v, jnp.asarray(table), jnp.asarray(positions), jnp.float32, interpret=True)
    )
    # The partitions' outputs, their combination and the result are bfloat16: about one bfloat16
    # ulp of each value (2**-7 relative), less than 2**-8 where values cancel.
    _check_paged_kernel(got, q, pool_k, pool_v, table, positions, rtol=2**-7, atol=2**-8)


def test_paged_kernel_picks_the_triton_kernel_on_gpu_where_its_blocks_fit(monkeypatch):
    monkeypatch.setattr(A, "_warned", set())
    bf16 = jnp.bfloat16
    assert A.paged_kernel("auto", "gpu", 16, 128, bf16) and A.paged_kernel("triton", "gpu", 16, 64, jnp.float32)
    assert A.paged_kernel("auto", "gpu", 256, 128, jnp.float16)
    assert not A.paged_kernel("xla", "gpu", 16, 128, bf16) and not A.paged_kernel("cudnn", "gpu", 16, 128, bf16)
    for page, hd, dtype, reason in [
        (16, 96, bf16, "needs a power-of-two head dimension of at least 16, got 96"),
        (8, 128, bf16, "needs pages of a power of two of at least 16 positions, got 8"),
        (128, 256, jnp.float32, "a page of 128 keys of 256 float32 is more than"),
        (16, 128, np.float64, "runs for a bfloat16, float16 or float32 cache, not float64"),
    ]:
        with pytest.warns(UserWarning, match=f"paged decode attention uses xla here: .*{reason}"):
            assert not A.paged_kernel("auto", "gpu", page, hd, dtype)
    # The TPU kernel's rules stay its own.
    assert A.paged_kernel("splash", "tpu", 16, 128, bf16) and not A.paged_kernel("triton", "tpu", 16, 128, bf16)
    with pytest.warns(UserWarning, match="TPU paged-attention kernel reads the cache as bfloat16, and it is float32"):
        assert not A.paged_kernel("auto", "tpu", 16, 128, jnp.float32)


def test_paged_attention_of_a_chunk_sees_each_rows_pages_up_to_each_query():
    # A prompt's chunk: 260 queries per row (three query blocks, each reading keys up to its own
    # furthest position) at positions past earlier chunks, whose keys are in the pages, one row
    # padded with position -1 (no keys: zeros, not NaN).
    r = np.random.default_rng(4)
    b, s, kv, g, hd, page, pages = 2, 260, 2, 2, 16, 8, 80
    q = jnp.asarray(r.normal(size=(b, s, kv, g, hd)), jnp.float32)
    pool_k, pool_v = (r.normal(size=(pages, page, kv, hd)).astype(np.float32) for _ in range(2))
    table = r.permutation(pages)[: b * 40].reshape(b, 40).astype(np.int32)
    table[1, 25:] = pages  # no page past row 1's positions
    positions = np.stack([np.arange(17, 17 + s), np.where(np.arange(s) < 200, np.arange(s), -1)]).astype(np.int32)
    got = np.asarray(
        jax.jit(A.paged_attention, static_argnums=(5, 6))(
            q, np.moveaxis(pool_k, 2, 0), np.moveaxis(pool_v, 2, 0), table, positions, jnp.float32
        )
    )
    for row in range(b):
        keys = np.concatenate([pool_k[p] for p in table[row] if p < pages]).astype(np.float64)
        values = np.concatenate([pool_v[p] for p in table[row] if p < pages]).astype(np.float64)
        for i, p in enumerate(positions[row]):
            if p < 0:
                np.testing.assert_array_equal(got[row, i], 0)
                continue
            sc = np.einsum("kgd,tkd->kgt", np.asarray(q[row, i], np.float64), keys[: p + 1]) / np.sqrt(hd)
            w = np.exp(sc - sc.max(-1, keepdims=True))
            want = np.einsum("kgt,tkd->kgd", w / w.sum(-1, keepdims=True), values[: p + 1])
            np.testing.assert_allclose(got[row, i], want, atol=1e-5)


def test_train_loss_with_the_splash_kernel_matches_xla_and_its_gradients_under_fsdp_remat_and_scan(devices):
    # A kernel makes the model's shard_map run with check_vma=False (attention.may_use_kernel);
    # the loss and every gradient must still equal the checked xla program's.
    cfg = small_config("ladder", tensor=2, mesh__fsdp=2, model__n_layers=3, model__max_seq_len=128, model__init_std=0.1)
    mesh = make_mesh(cfg)
    params = M.init_params(cfg.model, mesh, 0)
    rng = np.random.RandomState(3)
    tokens = rng.randint(0, 259, (2, 129))
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.repeat(SEGMENTS, 2, axis=0),
        "positions": np.repeat(POSITIONS, 2, axis=0),
        "mask": np.ones((2, 128), np.float32),
    }
    batch = jax.device_put({k: jnp.asarray(v) for k, v in batch.items()}, NamedSharding(mesh, P(BATCH, None)))

    def loss_and_grads(attention, remat, scan):
        loss_sums = loss_sums_fn(dataclasses.replace(cfg.model, attention=attention), mesh, remat, scan)
        return jax.jit(jax.value_and_grad(lambda w: loss_sums(w, batch)[0]))(params)

    value, grads = loss_and_grads("splash", "full", True)
    want_value, want_grads = loss_and_grads("xla", "none", False)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads, want_grads)


def test_attention_settings_that_cannot_run_fail_in_one_line(devices):
    with pytest.raises(ConfigError, match="model.attention='flash' is not one of auto, xla"):
        small_config(model__attention="flash")
    cfg = small_config(model__attention="cudnn")
    with pytest.raises(
        A.AttentionError, match="runs on GPU, this program is compiled for CPU; set model.attention=auto or xla"
    ):
        M.sharded(cfg.model, make_mesh(cfg), lambda model, t: t, (P(),), P())
    q, k, v = grouped_inputs(s=100)
    positions = jnp.arange(100)[None]
    with pytest.raises(A.AttentionError, match="splash needs a sequence length that is a multiple of 128, got 100"):
        A.self_attention("splash", q, k, v, positions, None, jnp.float32)
    # auto on a TPU program falls back to xla with one warning naming the reason.
    with A.compiling_for("tpu"), pytest.warns(UserWarning, match="auto uses xla here: splash needs a sequence"):
        out = A.self_attention("auto", q, k, v, positions, None, jnp.float32)
    np.testing.assert_allclose(out, A.xla_attention(q, k, v, positions, None, jnp.float32))
