"""The model on 8 fake CPU devices: every valid schedule is mesh-independent, ladder is the
recurrence of docs/architecture.md, and the KV-cache path computes the same function as the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ladder_jax import model as M
from ladder_jax.layers import rope_frequencies
from ladder_jax.mesh import BATCH, make_mesh
from ladder_jax.schedules import SCHEDULES

from .conftest import small_config
from .reference import forward as reference_forward
from .reference import llama3_scaled_frequencies

# Every schedule whose function does not depend on the tensor degree, and two mixed plans.
VALID_PLANS = [s.example for s in SCHEDULES.values() if not s.tensor_dependent] + ["standard,ladder@-2:", "lp@1:3"]
TENSOR_DEPENDENT = [s.example for s in SCHEDULES.values() if s.tensor_dependent]
MESHES = [(1, 8), (2, 4), (4, 2)]
TOKENS = np.random.RandomState(0).randint(0, 259, (4, 12))


def build(plan, data=1, tensor=1, seed=0, **extra):
    cfg = small_config(plan, data, tensor, model__init_std=0.1, **extra)
    mesh = make_mesh(cfg)
    return cfg.model, mesh, M.init_params(cfg.model, mesh, seed)


def run(plan, data, tensor, params, **extra):
    """Logits of `params` (made on any mesh) on a (data, tensor) mesh."""
    cfg = small_config(plan, data, tensor, model__init_std=0.1, **extra)
    mesh = make_mesh(cfg)
    params = jax.device_put(params, M.param_shardings(cfg.model, mesh))
    return np.asarray(M.logits(cfg.model, mesh, params, TOKENS))


@pytest.fixture(scope="module", params=VALID_PLANS)
def single_device(request, devices):
    cfg, mesh, params = build(request.param)
    return request.param, cfg, params, np.asarray(M.logits(cfg, mesh, params, TOKENS))


def test_single_device_logits_match_the_numpy_reference(single_device):
    plan, cfg, params, logits = single_device
    ref = reference_forward(jax.device_get(params), TOKENS, cfg, cfg.layer_schedules)
    np.testing.assert_allclose(logits, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: f"data{s[0]}xtensor{s[1]}")
def test_sharded_logits_equal_tensor_1(single_device, mesh_shape):
    plan, cfg, params, logits = single_device
    np.testing.assert_allclose(run(plan, *mesh_shape, params), logits, atol=2e-5, rtol=1e-4)


def test_bfloat16_compute_matches_the_float64_reference_within_bfloat16_rounding(devices):
    # float32 parameters, bfloat16 activations (train.py's mixed precision): the logits and the
    # loss stay within a few bfloat16 roundings (eps = 2^-7) of the float64 reference.
    from ladder_jax.training import global_batch, loss_sums_fn

    cfg, mesh, params = build("ladder")  # the parameters single_device made: init compiled once
    bf16 = small_config("ladder", model__init_std=0.1, model__dtype="bfloat16").model
    ref = reference_forward(jax.device_get(params), TOKENS, cfg, cfg.layer_schedules)
    got = np.asarray(M.logits(bf16, mesh, params, TOKENS), np.float64)
    eps, rms = 2.0**-7, np.sqrt(np.mean(ref**2))
    np.testing.assert_allclose(got, ref, rtol=8 * eps, atol=8 * eps * rms)
    assert np.sqrt(np.mean((got - ref) ** 2)) < 2 * eps * rms  # a few roundings, not an accumulation in bfloat16
    assert np.abs(got - ref).max() > 1e-3  # it did compute in bfloat16 (float32 is within 2e-5)
    inputs, targets = TOKENS[:, :-1], TOKENS[:, 1:]
    batch = {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": np.zeros_like(inputs),
        "positions": np.broadcast_to(np.arange(inputs.shape[1]), inputs.shape),
        "mask": np.ones(inputs.shape, np.float32),
    }
    nll, count = jax.jit(loss_sums_fn(bf16, mesh))(params, global_batch(mesh, batch))
    logp = ref[:, :-1] - np.log(np.exp(ref[:, :-1]).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, targets[..., None], -1).mean()
    assert float(nll) / float(count) == pytest.approx(want, rel=2.0**-8)


def test_ladder_differs_from_standard_with_the_same_parameters(devices):
    cfg, mesh, params = build("ladder")
    ladder = np.asarray(M.logits(cfg, mesh, params, TOKENS))
    assert np.abs(run("standard", 1, 1, params) - ladder).max() > 1e-2


def test_hybrid_ladder_keeps_the_standard_layers_hidden_states(devices):
    cfg, mesh, params = build("standard")
    hybrid_cfg = small_config("standard,ladder@-2:", model__init_std=0.1).model

    def hidden(c):  # the residual after each layer
        tokens = jnp.asarray(TOKENS)
        return np.asarray(
            M.hidden_states_fn(c, mesh)(params, tokens, M.default_positions(tokens), jnp.zeros_like(tokens))
        )[1:]

    h_std, h_hyb = hidden(cfg), hidden(hybrid_cfg)
    np.testing.assert_allclose(h_hyb[:2], h_std[:2], atol=1e-6)  # the standard layers: unchanged
    assert np.abs(h_hyb[3] - h_std[3]).max() > 1e-3  # the ladder layers: a different function


@pytest.mark.parametrize("schedule", TENSOR_DEPENDENT)
def test_tensor_dependent_schedules_equal_standard_on_one_device_and_differ_when_sharded(schedule, devices):
    cfg, mesh, params = build("standard")
    standard = np.asarray(M.logits(cfg, mesh, params, TOKENS))
    # Same math; only the order of two float32 additions differs.
    np.testing.assert_allclose(run(schedule, 1, 1, params), standard, atol=1e-5)
    assert np.abs(run(schedule, 1, 4, params) - standard).max() > 1e-3


@pytest.mark.parametrize("plan, mesh_shape", [("spd", (1, 2)), ("standard,spd@1:3", (2, 4)), ("spd", (1, 8))])
def test_spd_blocks_match_the_numpy_reference_of_their_tensor_degree(plan, mesh_shape, devices):
    # tensor 2 splits the KV heads; 4 and 8 give each device query heads of one replicated KV head.
    cfg, _, params = build(plan)
    ref = reference_forward(jax.device_get(params), TOKENS, cfg, cfg.layer_schedules, tensor=mesh_shape[1])
    np.testing.assert_allclose(run(plan, *mesh_shape, params), ref, atol=2e-5, rtol=1e-4)
    assert (
        np.abs(ref - reference_forward(jax.device_get(params), TOKENS, cfg, cfg.layer_schedules, tensor=1)).max() > 1e-3
    )


@pytest.mark.parametrize(
    "plan, mesh_shape", [("track:2", (1, 1)), ("track:4", (1, 2)), ("standard,track:2@1:3,ladder@3", (2, 4))]
)
def test_track_matches_the_numpy_reference_of_its_tensor_degree(plan, mesh_shape, devices):
    # tensor 2 splits the KV heads, 4 replicates them; the mixed plan fuses before a ladder layer
    cfg, _, params = build(plan)
    ref = reference_forward(jax.device_get(params), TOKENS, cfg, cfg.layer_schedules, tensor=mesh_shape[1])
    np.testing.assert_allclose(run(plan, *mesh_shape, params), ref, atol=2e-5, rtol=1e-4)


def test_tied_embeddings_match_the_reference_when_sharded(devices):
    cfg, mesh, params = build("ladder", model__tie_embeddings="true")
    assert "lm_head" not in params
    ref = reference_forward(jax.device_get(params), TOKENS, cfg, cfg.layer_schedules)
    np.testing.assert_allclose(run("ladder", 2, 4, params, model__tie_embeddings="true"), ref, atol=2e-5, rtol=1e-4)


def test_llama3_rope_scaling_matches_metas_formula():
    cfg = small_config(model__rope_scaling="{factor: 8.0, original_max_len: 64}", model__rope_theta=500000.0).model
    base = 1.0 / 500000.0 ** (np.arange(0, cfg.hd, 2) / cfg.hd)
    want = llama3_scaled_frequencies(base, 8.0, 1.0, 4.0, 64)
    np.testing.assert_allclose(np.asarray(rope_frequencies(cfg)), want, rtol=1e-6)
    assert not np.allclose(want, base)  # the case exercises all three bands
    assert np.isclose(want, base).any() and np.isclose(want, base / 8).any()


@pytest.mark.parametrize("plan, mesh_shape", [("ladder", (2, 4)), ("standard,ladder@-2:", (1, 2)), ("lp@0:2", (1, 8))])
def test_kv_cache_prefill_then_steps_equal_the_full_forward(plan, mesh_shape, devices):
    cfg, _, params = build(plan)
    full = run(plan, 1, 1, params)
    c = small_config(plan, *mesh_shape, model__init_std=0.1)
    mesh = make_mesh(c)
    params = jax.device_put(params, M.param_shardings(c.model, mesh))
    batch = P(BATCH, None)
    step = jax.jit(
        M.sharded(
            c.model,
            mesh,
            lambda model, t, pos, cache: model(t, pos, cache=cache),
            (batch, batch, M.cache_specs(c.model)),
            (P(BATCH, None, "tensor"), M.cache_specs(c.model)),
        )
    )
    cache = M.init_cache(c.model, mesh, TOKENS.shape[0], 16)
    tokens = jnp.asarray(TOKENS)
    pos = M.default_positions(tokens)
    out, cache = step(params, tokens[:, :8], pos[:, :8], cache)  # prefill 8 tokens
    got = [np.asarray(out)[..., : c.model.vocab_size]]
    for t in range(8, 12):  # then one token at a time
        out, cache = step(params, tokens[:, t : t + 1], pos[:, t : t + 1], cache)
        got.append(np.asarray(out)[..., : c.model.vocab_size])
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=2e-5, rtol=1e-4)


def test_batch_that_does_not_split_over_data_is_refused(devices):
    cfg = small_config("standard", 4, 2, model__init_std=0.1)
    _, _, params = build("standard")  # the batch is refused before they are read: no init on this mesh
    with pytest.raises(ValueError, match="do not split over mesh data x fsdp=4"):
        M.logits(cfg.model, make_mesh(cfg), params, TOKENS[:2])


def test_blocked_self_attention_of_long_sequences_matches_the_reference(devices):
    cfg, mesh, params = build("ladder", model__max_seq_len=256)
    tokens = np.random.RandomState(2).randint(0, 259, (2, 256))  # 256 = 2 query blocks
    ref = reference_forward(jax.device_get(params), tokens, cfg, cfg.layer_schedules)
    np.testing.assert_allclose(np.asarray(M.logits(cfg, mesh, params, tokens)), ref, atol=5e-5, rtol=1e-4)


def test_packed_documents_attend_only_within_themselves(devices):
    cfg, mesh, params = build("standard", model__max_seq_len=256)
    rng = np.random.RandomState(3)
    a, b = rng.randint(0, 259, 100), rng.randint(0, 259, 156)
    tokens = jnp.asarray(np.concatenate([a, b])[None])
    segments = jnp.asarray(np.r_[np.zeros(100), np.ones(156)].astype(np.int32)[None])
    positions = jnp.asarray(np.r_[np.arange(100), np.arange(156)].astype(np.int32)[None])
    body = lambda model, t, p, s: model(t, p, segment_ids=s)[0]  # noqa: E731
    spec = P(BATCH, None)
    packed = np.asarray(
        jax.jit(M.sharded(cfg, mesh, body, (spec,) * 3, P(BATCH, None, "tensor")))(params, tokens, positions, segments)
    )
    np.testing.assert_allclose(packed[0, :100, :259], np.asarray(M.logits(cfg, mesh, params, a[None]))[0], atol=2e-5)
    np.testing.assert_allclose(packed[0, 100:, :259], np.asarray(M.logits(cfg, mesh, params, b[None]))[0], atol=2e-5)


@pytest.mark.parametrize("mesh_shape", [(1, 2), (2, 4)], ids=lambda s: f"data{s[0]}xtensor{s[1]}")
def test_split_lp_layout_equals_the_shared_one_in_the_forward_and_greedy_decoding(mesh_shape, devices):
    # The 2 KV heads split over tensor 2; tensor 4 holds both on every device (replicated), and
    # the split pair picks its layer's.
    import dataclasses

    from ladder_jax import decode

    plan = "standard,lp@2:4"
    _, _, params = build(plan)
    full = run(plan, 1, 1, params)
    c = small_config(plan, *mesh_shape, model__init_std=0.1)
    mesh = make_mesh(c)
    split = dataclasses.replace(c.model, lp_layout="split")
    shared_params = jax.device_put(params, M.param_shardings(c.model, mesh))
    split_params = M.to_split_layout(split, shared_params, mesh)
    q_proj = split_params["layers"][2]["attn"]["q_proj"]
    assert q_proj.shape[1] == 2 * c.model.n_heads and split_params["layers"][3]["attn"]["q_proj"].shape[1] == 0
    np.testing.assert_allclose(np.asarray(M.logits(split, mesh, split_params, TOKENS)), full, atol=2e-5, rtol=1e-4)
    prompts = [list(TOKENS[0, :5]), list(TOKENS[1, :9])] * mesh_shape[0]
    want = decode.generate(c.model, mesh, shared_params, prompts, 6).tokens
    assert decode.generate(split, mesh, split_params, prompts, 6).tokens == want


def test_split_lp_layout_refuses_odd_tensor_axes_and_training(devices):
    from ladder_jax.config import ConfigError
    from ladder_jax.training import Trainer

    with pytest.raises(ConfigError, match="does not split into 2"):
        small_config("standard,lp@2:4", 1, 1, model__lp_layout="split")
    cfg = small_config("standard,lp@2:4", 1, 2, model__lp_layout="split")
    with pytest.raises(ConfigError, match="train with model.lp_layout=shared"):
        Trainer(cfg, make_mesh(cfg))
    from ladder_jax.checkpoint import require_shared_layout

    with pytest.raises(ConfigError, match="lp sweep works on each layer's own parameters"):
        require_shared_layout(cfg, "lp sweep")


def test_one_token_projections_compiled_for_gpu_keep_their_values():
    # layers._gemm_rows: compiled for GPU a one-token product gets a second row of zeros (XLA:GPU
    # then keeps it a GEMM); the first row of each product is what the single row gives.
    from flax import nnx

    from ladder_jax import attention, layers

    cfg = small_config().model
    x = jax.random.normal(jax.random.key(1), (1, 1, cfg.d_model))
    mlp = layers.MLP(cfg, rngs=nnx.Rngs(0))
    attn = layers.Attention(cfg, rngs=nnx.Rngs(0))
    rope = layers.rope_tables(jnp.zeros((1, 1), jnp.int32), rope_frequencies(cfg))
    run = lambda: (mlp(x), attn(x, rope, jnp.zeros((1, 1), jnp.int32))[0])  # noqa: E731
    here = run()
    with attention.compiling_for("gpu"):
        assert layers._gemm_rows(x)[0].shape == (2, 1, cfg.d_model)
        gpu = run()
    for a, b in zip(here, gpu):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)
