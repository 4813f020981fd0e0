"""Local-view Flax NNX modules: each computes on the shard of parameters it is given.

Nothing here knows about collectives or meshes. Under the model's shard_map a module sees its
device's slice of heads, FFN columns or vocab rows, and returns partial results (row-parallel
outputs, vocab-shard logits) that the schedules reduce. With tensor = 1 these are the ordinary
Llama modules. Every parameter carries logical axis names (`axes=`); `mesh.sharding_rules`
turns them into partition specs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from . import attention
from .config import ModelConfig, dtype_of


def _param(rngs: nnx.Rngs | None, shape, axes, std: float, dtype) -> nnx.Param:
    # `init`: how model.init_params creates the parameter (leaf by leaf; the library builds a
    # module only abstractly, for shapes and metadata, and with rngs=None: on jax 0.10 each draw
    # from an nnx.Rngs under tracing costs time in proportion to what was traced before it, and
    # llama-3.1-405b's shapes took 20 s instead of 1)
    value = jnp.zeros(shape, dtype) if rngs is None else jax.random.normal(rngs.params(), shape, dtype) * std
    return nnx.Param(value, axes=axes, init=("normal", std))


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None):
        self.eps = cfg.norm_eps
        self.scale = nnx.Param(jnp.ones((cfg.d_model,), dtype_of(cfg.param_dtype)), axes=("embed",), init=("ones",))

    @jax.named_scope("norm")  # profiles and HLO dumps name the module
    def __call__(self, x, scale=None):
        """`scale`: another norm's weights to use instead of this one's (the split lp layout)."""
        scale = self.scale[...] if scale is None else scale
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * y.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies (head_dim/2,), with Llama-3 scaling when configured (float32, as HF)."""
    hd = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_len / s.low_freq_factor
    high_wavelen = s.original_max_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (batch, seq, head_dim/2) for integer positions (batch, seq)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x, cos, sin):
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


@jax.custom_vjp
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (batch, seq, heads, head_dim) in the half-split layout used by HF Llama weights."""
    return _rotate(x, cos, sin)


def _rope_fwd(x, cos, sin):
    return _rotate(x, cos, sin), (cos, sin)


def _rope_bwd(res, g):
    # A rotation's transpose is the rotation by the opposite angle: one elementwise pass, where
    # differentiating the split and concatenate costs several (tables come from integer positions).
    cos, sin = res
    return _rotate(g, cos, -sin), None, None


apply_rope.defvjp(_rope_fwd, _rope_bwd)


class Attention(nnx.Module):
    """Grouped-query attention over this device's heads; the output is a partial sum (row-parallel).
    `width` (config.ModelConfig.layer_widths): how many layers' heads it holds side by side."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, width: int = 1):
        d, hd, pd = cfg.d_model, cfg.hd, dtype_of(cfg.param_dtype)
        h, kv = cfg.n_heads * width, cfg.n_kv_heads * width
        std = cfg.init_std
        self.dtype = dtype_of(cfg.dtype)
        self.implementation = cfg.attention  # see ladder_jax.attention
        self.q_proj = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), std, pd)
        self.k_proj = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std, pd)
        self.v_proj = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), std, pd)
        # Scaled like GPT-2's residual projections so the stream does not grow with depth.
        self.o_proj = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), std / math.sqrt(2 * cfg.n_layers), pd)

    @jax.named_scope("attention")  # profiles and HLO dumps name the module
    def __call__(self, x, rope, positions, *, kv_head=None, cache=None, segment_ids=None, page_table=None):
        """x: (B, S, D) normed input; positions: (B, S) absolute positions of these tokens.

        kv_head: when every device holds all KV heads (fewer KV heads than devices), the index of
        the one this device's query heads use. cache: optional (k, v) of shape (B, kv_local, T, hd);
        the new keys and values are written at `positions`; a decode step (one token) reads the
        cache up to each row's position. Attention runs `model.attention` (ladder_jax.attention).
        A list of caches splits this device's KV heads (and the query heads over them) into that
        many groups, each with its own cache (a split lp pair keeps its heads in both layers' caches).
        page_table (B, W): the cache is paged, (k, v) pools of (kv_local, pages, page_size, hd),
        row b's position p in page page_table[b, p // page_size]: a decode step (S = 1) or a
        chunk of a prompt (positions -1: padding, written nowhere) attends over the row's pages.
        Returns (partial output (B, S, D), updated cache(s) or None).
        """
        dt = self.dtype
        x = x.astype(dt)
        wk, wv = self.k_proj[...], self.v_proj[...]
        if kv_head is not None:
            wk = jax.lax.dynamic_slice_in_dim(wk, kv_head, 1, axis=1)
            wv = jax.lax.dynamic_slice_in_dim(wv, kv_head, 1, axis=1)
        x, first = _gemm_rows(x)
        q = first(jnp.einsum("bsd,dhk->bshk", x, self.q_proj[...].astype(dt)))
        k = first(jnp.einsum("bsd,dhk->bshk", x, wk.astype(dt)))
        v = first(jnp.einsum("bsd,dhk->bshk", x, wv.astype(dt)))
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        b, s, hl, hd = q.shape
        q = q.reshape(b, s, k.shape[2], hl // k.shape[2], hd)  # grouped: (B, S, K, G, hd)
        if cache is None:
            out = attention.self_attention(self.implementation, q, k, v, positions, segment_ids, dt)
        elif isinstance(cache, list):
            # Groups of KV heads, one cache each; caches past the heads there are stay as they are.
            n = min(len(cache), k.shape[2])
            per = k.shape[2] // n
            parts = [
                self._cached(
                    q[:, :, g * per : (g + 1) * per],
                    k[:, :, g * per : (g + 1) * per],
                    v[:, :, g * per : (g + 1) * per],
                    positions,
                    cache[g],
                    page_table,
                )
                for g in range(n)
            ]
            out = jnp.concatenate([o for o, _ in parts], axis=2)
            cache = [c for _, c in parts] + cache[n:]
        else:
            out, cache = self._cached(q, k, v, positions, cache, page_table)
        out, first = _gemm_rows(out.reshape(b, s, hl, hd))
        return first(jnp.einsum("bshk,hkd->bsd", out, self.o_proj[...].astype(dt))), cache

    def _cached(self, q, k, v, positions, cache, page_table=None):
        """Attention of grouped queries q (B, S, K, G, hd) with the new k, v written into `cache`."""
        dt, s = self.dtype, q.shape[1]
        ck, cv = cache
        if page_table is not None:
            # Position p of row b goes to offset p % page_size of page page_table[b, p // page_size];
            # padding (position -1), positions past the table and rows without a page there (ids
            # past the pool) write nothing.
            n_pages, page_size = ck.shape[1:3]
            index = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
            page = jnp.take_along_axis(page_table, index, axis=1)
            page = jnp.where((positions >= 0) & (positions // page_size == index), page, n_pages)
            pos = jnp.maximum(positions, 0)
            # (B, S, K, hd) -> (K, B, S, hd): the pools hold KV heads first
            ck = ck.at[:, page, pos % page_size].set(jnp.moveaxis(k, 2, 0).astype(ck.dtype), mode="drop")
            cv = cv.at[:, page, pos % page_size].set(jnp.moveaxis(v, 2, 0).astype(cv.dtype), mode="drop")
            if s == 1:
                out = attention.paged_decode_attention(self.implementation, q, ck, cv, page_table, positions[:, 0], dt)
            else:
                out = attention.paged_attention(q, ck, cv, page_table, positions, dt)
            return out, (ck, cv)
        # An indexed scatter writes only the new rows; a vmapped dynamic_update_slice
        # compiles to a select that rewrites the whole cache every decode step. The cache holds
        # (B, K, T, hd); indices around a slice put the (B, S) of the update first: (B, S, K, hd).
        rows = jnp.arange(positions.shape[0])[:, None]
        ck = ck.at[rows, :, positions].set(k.astype(ck.dtype))
        cv = cv.at[rows, :, positions].set(v.astype(cv.dtype))
        if s == 1:  # a decode step reads the keys written so far
            out = attention.decode_attention(q, ck, cv, positions[:, 0], dt)
        elif ck.shape[2] == s:  # prefill: the cache is as long as the prompt, so it holds k and v
            keys, values = (x.astype(ck.dtype).astype(dt) for x in (k, v))
            out = attention.self_attention(self.implementation, q, keys, values, positions, None, dt)
        else:  # several new tokens over a longer cache: mask by position
            key_pos = jnp.broadcast_to(jnp.arange(ck.shape[2])[None], (ck.shape[0], ck.shape[2]))
            keys, values = (jnp.swapaxes(c, 1, 2).astype(dt) for c in (ck, cv))
            out = attention.xla_attention(q, keys, values, positions, None, dt, key_pos)
        return out, (ck, cv)


def _gemm_rows(x_BxSxD):
    """(x, first): x with a second row of zeros where it is one token compiled for GPU, and
    `first` to take the first row of a product back. XLA:GPU rewrites a product of one row by a
    matrix as a multiply and a reduce, and for some shapes (gate and up, q/k/v) leaves the
    weight-sized product unfused: written to HBM and read back, three times the weight's bytes
    (`benchmarks/decode_traffic.py`). Two rows keep it a GEMM, which reads the weight once."""
    if x_BxSxD.shape[0] * x_BxSxD.shape[1] != 1 or attention.current_platform() != "gpu":
        return x_BxSxD, lambda y: y
    return jnp.concatenate([x_BxSxD, jnp.zeros_like(x_BxSxD)]), lambda y: y[:1]


class MLP(nnx.Module):
    """SwiGLU over this device's FFN columns; the output is a partial sum (row-parallel).
    `width`: how many layers' FFN columns it holds side by side (as Attention's)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, width: int = 1):
        d, f, pd, std = cfg.d_model, cfg.ffn_dim * width, dtype_of(cfg.param_dtype), cfg.init_std
        self.dtype = dtype_of(cfg.dtype)
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), std, pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), std / math.sqrt(2 * cfg.n_layers), pd)

    @jax.named_scope("mlp")  # profiles and HLO dumps name the module
    def __call__(self, x):
        dt = self.dtype
        x, first = _gemm_rows(x.astype(dt))
        h = jax.nn.silu(x @ self.gate_proj[...].astype(dt)) * (x @ self.up_proj[...].astype(dt))
        return first(h @ self.down_proj[...].astype(dt))


class Embed(nnx.Module):
    """Vocab-parallel embedding: this device holds rows [offset, offset + V_local) of the table."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None):
        self.dtype = dtype_of(cfg.dtype)
        self.table = _param(
            rngs, (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"), cfg.init_std, dtype_of(cfg.param_dtype)
        )

    def __call__(self, tokens, offset):
        """Partial embedding: rows this device does not hold are zero, so a sum over devices completes it."""
        table = self.table[...]
        local = tokens - offset
        inside = (local >= 0) & (local < table.shape[0])
        rows = jnp.take(table, jnp.where(inside, local, 0), axis=0).astype(self.dtype)
        return jnp.where(inside[..., None], rows, 0)

    def attend(self, h):
        """Tied output projection: logits for this device's vocab rows."""
        return jnp.einsum("bsd,vd->bsv", h, self.table[...].astype(self.dtype), preferred_element_type=jnp.float32)


class LMHead(nnx.Module):
    """Untied vocab-parallel output projection: logits for this device's vocab columns."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None):
        self.dtype = dtype_of(cfg.dtype)
        self.kernel = _param(
            rngs, (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"), cfg.init_std, dtype_of(cfg.param_dtype)
        )

    def __call__(self, h):
        return jnp.einsum("bsd,dv->bsv", h, self.kernel[...].astype(self.dtype), preferred_element_type=jnp.float32)
