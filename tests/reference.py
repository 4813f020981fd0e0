"""An independent NumPy (float64) Llama with the residual recurrences of docs/architecture.md, written from
the formulas, module by module. It shares nothing with ladder_jax but the parameter names."""

from __future__ import annotations

import math

import numpy as np


def _f64(tree):
    if isinstance(tree, dict):
        return {k: _f64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def llama3_scaled_frequencies(freqs, factor, low, high, old_len):
    """Meta's reference `apply_scaling`, as a loop."""
    low_wavelen, high_wavelen = old_len / low, old_len / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def rope(x, pos, theta):
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[:, :, None, None] * freqs  # (B, S, 1, hd/2)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1)


def attention(p, x, cfg):
    b, s, _ = x.shape
    pos = np.broadcast_to(np.arange(s), (b, s)).astype(np.float64)
    q = rope(np.einsum("bsd,dhk->bshk", x, p["q_proj"]), pos, cfg.rope_theta)
    k = rope(np.einsum("bsd,dhk->bshk", x, p["k_proj"]), pos, cfg.rope_theta)
    v = np.einsum("bsd,dhk->bshk", x, p["v_proj"])
    group = cfg.n_heads // cfg.n_kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    scores = np.einsum("bqhd,bthd->bhqt", q, k) / math.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqt,bthd->bqhd", probs, v)
    return np.einsum("bshk,hkd->bsd", out, p["o_proj"])


def mlp(p, x):
    g = x @ p["gate_proj"]
    return (g / (1 + np.exp(-g)) * (x @ p["up_proj"])) @ p["down_proj"]


def _device_shard(L, d, tensor, cfg):
    """Layer L's attention and MLP as device d of `tensor` computes them: its block of query heads
    (o_proj of those heads only) and its block of FFN columns; the outputs are partial sums."""
    heads, cols = cfg.n_heads // tensor, cfg.ffn_dim // tensor
    own = np.zeros((cfg.n_heads, 1, 1))
    own[d * heads : (d + 1) * heads] = 1
    c = slice(d * cols, (d + 1) * cols)
    m = {
        "gate_proj": L["mlp"]["gate_proj"][:, c],
        "up_proj": L["mlp"]["up_proj"][:, c],
        "down_proj": L["mlp"]["down_proj"][c],
    }
    return dict(L["attn"], o_proj=L["attn"]["o_proj"] * own), m


def spd_block(L, x, cfg, tensor):
    """Sync-Point Drop on `tensor` devices: device d holds query heads and FFN columns block d; its
    MLP reads LN(x + Y_d) with only its own heads' attention output Y_d; one sum of Y_d + Z_d."""
    eps = cfg.norm_eps
    h = rms_norm(x, L["attn_norm"]["scale"], eps)
    total = 0.0
    for d in range(tensor):
        attn, m = _device_shard(L, d, tensor, cfg)
        y = attention(attn, h, cfg)
        total = total + y + mlp(m, rms_norm(x + y, L["mlp_norm"]["scale"], eps))
    return x + total


def track_step(Ls, x, cfg, tensor):
    """Parallel Track on `tensor` devices over the layers Ls of one step: device d keeps its own
    residual x_d = x + the partial outputs of its heads and FFN columns so far, every module reading
    LN(x_d); at the step's end one sum of every device's partial outputs is added to x."""
    eps = cfg.norm_eps
    total = 0.0
    for d in range(tensor):
        own = 0.0
        for L in Ls:
            attn, m = _device_shard(L, d, tensor, cfg)
            own = own + attention(attn, rms_norm(x + own, L["attn_norm"]["scale"], eps), cfg)
            own = own + mlp(m, rms_norm(x + own, L["mlp_norm"]["scale"], eps))
        total = total + own
    return x + total


def forward(params, tokens, cfg, layer_schedules, tensor=1):
    """Logits (B, S, vocab). Schedules: standard, ladder (module j reads x_{j-2}, x_{-1} = x_0),
    parallel (one norm, both branches on x_{i-1}), lp (pairs side by side on the same input),
    spd and track:D (both depend on the `tensor` devices they are split over)."""
    p = _f64(params)
    eps = cfg.norm_eps
    layers = p["layers"]
    x0 = p["embed"]["table"][np.asarray(tokens)]
    xs = {-1: x0, 0: x0}  # xs[j]: residual after j modules
    j = 0  # modules done
    i = 0
    while i < cfg.n_layers:
        kind = layer_schedules[i]
        L = layers[i]
        if kind in ("standard", "ladder"):
            for f, norm in (
                (lambda h, L=L: attention(L["attn"], h, cfg), "attn_norm"),
                (lambda h, L=L: mlp(L["mlp"], h), "mlp_norm"),
            ):
                read = xs[j - 1] if kind == "ladder" else xs[j]
                xs[j + 1] = xs[j] + f(rms_norm(read, L[norm]["scale"], eps))
                j += 1
            i += 1
        elif kind == "parallel":
            h = rms_norm(xs[j], L["attn_norm"]["scale"], eps)
            xs[j + 1] = xs[j] + attention(L["attn"], h, cfg) + mlp(L["mlp"], h)  # one module
            j += 1
            i += 1
        elif kind == "lp":
            A, B = layers[i], layers[i + 1]
            h = xs[j]
            h1 = (
                h
                + attention(A["attn"], rms_norm(h, A["attn_norm"]["scale"], eps), cfg)
                + attention(B["attn"], rms_norm(h, B["attn_norm"]["scale"], eps), cfg)
            )
            out = (
                h1
                + mlp(A["mlp"], rms_norm(h1, A["mlp_norm"]["scale"], eps))
                + mlp(B["mlp"], rms_norm(h1, B["mlp_norm"]["scale"], eps))
            )
            xs[j + 1], xs[j + 2] = h1, out  # two modules: the attention pair, the MLP pair
            j += 2
            i += 2
        elif kind == "spd":
            # the block's two modules, one sync: nothing reaches the residual before it
            xs[j + 1], xs[j + 2] = xs[j], spd_block(L, xs[j], cfg, tensor)
            j += 2
            i += 1
        elif kind.startswith("track:"):
            depth = int(kind.split(":")[1])
            x = xs[j]
            for k in range(1, 2 * depth):  # the step's modules, one sync at its end
                xs[j + k] = x
            xs[j + 2 * depth] = track_step([layers[k] for k in range(i, i + depth)], x, cfg, tensor)
            j += 2 * depth
            i += depth
        else:
            raise ValueError(kind)
    x = rms_norm(xs[j], p["final_norm"]["scale"], eps)
    w = p["embed"]["table"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    return (x @ w)[..., : cfg.vocab_size]
