"""Attention kernels: which one runs, and each one's call on this device's heads.

`model.attention` names the implementation of self-attention over a sequence (training, SPD/LP
evaluation, prefill):

    auto     the fused kernel of the platform: splash on TPU; on GPU cudnn without document
             segments (prefill) and triton with them (packed training); xla on CPU
    xla      plain XLA: the (query x key) scores of each local head, in query blocks (128, at most 16 blocks)
    splash   JAX's Pallas TPU splash attention (causal + segment ids, grouped heads, fused backward)
    cudnn    cuDNN flash attention through jax.nn.dot_product_attention (causal, grouped heads;
             bfloat16/float16 only; no document segments: it would take them as a dense bias)
    triton   JAX's Pallas GPU flash attention (causal + segment ids; key heads repeated per group)

Why these: all three kernels ship with JAX itself (jax.experimental.pallas.ops, jax.nn), are
maintained with the compiler they run on, and are what MaxText and jax-llm-examples call; the
`tokamax` package collects the same kernels but is still at 0.0.x. On CPU, `splash` and `triton`
named explicitly run in Pallas interpret mode: slow, there to check their numerics.

Every kernel masks by index (query i sees keys 0..i of its own segment). That is the position
mask of the xla path whenever positions count from the start of each document, which is what
training windows and prefill pass. A kernel the shapes or dtype do not suit falls back to xla
with one warning line under `auto`, and stops with one line (AttentionError) when asked by name.

Decoding (one new token per row over a KV cache) always uses `decode_attention`: an online
softmax over key blocks up to the furthest row's position, so a step reads the keys written so
far, not the whole allocation. Over the serving engine's paged cache, `paged_attention` runs the
same online softmax over blocks gathered through each row's page table (XLA, every platform),
for a chunk of a prompt or one new token per row. Compiled for GPU, both read the whole cache
instead, masked, in a loop of fixed trip count (`reads_whole_cache`): XLA:GPU's runtime copies a
loop's condition to the host and waits for the device at every iteration of a loop whose trip
count it does not know, and a decode step's few hundred such waits cost more than the keys
past the position (the dense cache reads it in one block, no loop at all).

A decode step compiled for TPU runs JAX's Pallas paged-attention kernel instead
(`paged_decode_attention`) where `model.attention` allows kernels (auto, splash) and the shapes
suit it (head_dim a multiple of 128, pages of a multiple of 8 positions); it has no interpret
mode, so it runs on a TPU or in a deviceless TPU compile only.
Compiled for GPU (auto, triton) the decode step runs JAX's Pallas Triton paged-attention kernel
where its blocks are powers of two that fit (`paged_kernel`): it reads each row's pages up to its
position and skips the rest on the device, with no loop whose trip count the host must fetch.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as triton_attention
from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as gpu_paged_attention
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as tpu_paged_attention
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from .config import ConfigError

KERNEL_PLATFORM = {"splash": "tpu", "cudnn": "gpu", "triton": "gpu"}
XLA_QUERY_BLOCK = 128  # query block of the xla path's blocked causal attention (at least)
XLA_MAX_BLOCKS = 16  # longer sequences get longer blocks
DECODE_KEY_BLOCK = 256  # keys read per iteration of the decode attention
# Keys (and as many values) the Triton paged-attention kernel reads per iteration, in bytes: both
# blocks and the kernel's other 16-24 KiB fit an A100's 163 KiB of shared memory; twice this fits
# neither an A100 nor an H100 (227 KiB), and XLA refuses the compile (deviceless compiles).
TRITON_PAGED_TILE_BYTES = 64 * 1024


class AttentionError(ConfigError):
    """model.attention names a kernel that cannot run these shapes on this platform."""


# The platform the program is compiled for. model.sharded sets it from the mesh while it traces,
# so a deviceless TPU compile on a CPU host picks the TPU kernel.
_platform = contextvars.ContextVar("attention_platform", default=None)


# "written" or "cache": what the decode attention reads (None: by platform, `reads_whole_cache`);
# benchmarks set it to time one against the other on the same device. It acts when a function is
# traced: set it around a jit of a function of its own (jit reuses a trace of the same function).
_decode_reads = contextvars.ContextVar("decode_reads", default=None)


@contextlib.contextmanager
def decode_reads(what: str | None):
    token = _decode_reads.set(what)
    try:
        yield
    finally:
        _decode_reads.reset(token)


def reads_whole_cache() -> bool:
    """Whether the decode attention reads the whole cache (masked) in a loop of fixed trip count,
    rather than the keys written so far in a loop whose trip count depends on the positions: on
    GPU, where XLA's runtime waits on the host for every iteration of the latter."""
    what = _decode_reads.get()
    return what == "cache" if what else current_platform() == "gpu"


@contextlib.contextmanager
def compiling_for(platform: str):
    token = _platform.set(normalize_platform(platform))
    try:
        yield
    finally:
        _platform.reset(token)


def normalize_platform(platform: str) -> str:
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def current_platform() -> str:
    return _platform.get() or normalize_platform(jax.default_backend())


def _wrong_platform(name: str, platform: str) -> str | None:
    """Why kernel `name` cannot run on `platform` at all; CPU runs splash and triton interpreted."""
    want = KERNEL_PLATFORM[name]
    if platform != want and not (platform == "cpu" and name != "cudnn"):
        return f"it runs on {want.upper()}, this program is compiled for {platform.upper()}"
    return None


def unsupported(name: str, platform: str, seq: int, head_dim: int, dtype, segments: bool) -> str | None:
    """Why kernel `name` cannot run this call on `platform` (None: it can)."""
    wrong = _wrong_platform(name, platform)
    if wrong:
        return wrong
    if name in ("splash", "triton") and seq % 128:
        return f"{name} needs a sequence length that is a multiple of 128, got {seq}"
    if name == "cudnn":
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            return f"cudnn needs bfloat16 or float16 compute (model.dtype), got {jnp.dtype(dtype).name}"
        if head_dim > 128 or head_dim % 8:
            return f"cudnn needs a head dimension that is a multiple of 8 up to 128, got {head_dim}"
        if segments:
            return "cudnn cannot keep packed documents apart without a (sequence x sequence) bias; use triton"
    if name == "triton" and head_dim & (head_dim - 1):
        return f"triton needs a power-of-two head dimension, got {head_dim}"
    return None


_warned: set[str] = set()


def choose(requested: str, seq: int, head_dim: int, dtype, segments: bool) -> str:
    """The implementation that runs a self-attention call of these shapes."""
    platform = current_platform()
    if requested == "xla":
        return "xla"
    if requested == "auto":
        name = {"tpu": "splash", "gpu": "triton" if segments else "cudnn"}.get(platform)
        if name is None:
            return "xla"
        reason = unsupported(name, platform, seq, head_dim, dtype, segments)
        if reason is not None:
            if reason not in _warned:
                _warned.add(reason)
                warnings.warn(f"model.attention=auto uses xla here: {reason}", stacklevel=2)
            return "xla"
        return name
    reason = unsupported(requested, platform, seq, head_dim, dtype, segments)
    if reason is not None:
        raise AttentionError(f"model.attention={requested}: {reason}; set model.attention=auto or xla")
    return requested


def may_use_kernel(requested: str, platform: str) -> bool:
    """Whether a program for `platform` may call a kernel. JAX's Pallas kernels (jax 0.10) declare
    their outputs without shard_map's varying-axes types, so the model's shard_map then runs with
    check_vma=False, as MaxText runs them; the values and gradients are the same (tested)."""
    platform = normalize_platform(platform)
    if requested == "auto":
        return platform in ("tpu", "gpu")
    return requested != "xla"


def check_platform(requested: str, platform: str) -> None:
    """Refuse a kernel named in the config on a platform it does not run on, before anything is
    traced (shape checks follow when the program is traced, still before it compiles)."""
    wrong = _wrong_platform(requested, normalize_platform(platform)) if requested in KERNEL_PLATFORM else None
    if wrong:
        raise AttentionError(f"model.attention={requested}: {wrong}; set model.attention=auto or xla")


# ---------------------------------------------------------------------------------------------
# Self-attention over a sequence. q: (B, S, K, G, hd) grouped queries; k, v: (B, S, K, hd);
# segment_ids: (B, S) or None. Returns (B, S, K, G, hd).


def self_attention(requested: str, q, k, v, positions, segment_ids, dtype):
    name = choose(requested, q.shape[1], q.shape[-1], dtype, segment_ids is not None)
    if name == "xla":
        return xla_attention(q, k, v, positions, segment_ids, dtype)
    interpret = current_platform() == "cpu"
    if name == "splash":
        return splash_attention(q, k, v, segment_ids, interpret=interpret)
    if name == "triton":
        return triton_flash_attention(q, k, v, segment_ids, interpret=interpret)
    return cudnn_attention(q, k, v)


def _varying(x) -> frozenset:
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def _cast_varying(x, axes: frozenset):
    missing = tuple(sorted(axes - _varying(x)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _mask(q_pos, k_pos, segments):
    """(B, S, T): key position <= query position, within the same document segment."""
    mask = k_pos[:, None, :] <= q_pos[:, :, None]
    if segments is not None:
        mask &= segments[0][:, :, None] == segments[1][:, None, :]
    return mask[:, None, None]  # broadcast over (K, G)


def _softmax_attend(q, k, v, q_pos, k_pos, segments):
    """q (B, K, G, S, hd), already scaled; k, v (B, K, T, hd). Returns the output (B, K, G, S, hd)
    in float32, normalised after the value product (S x hd divides instead of S x T), and the
    log-sum-exp (B, K, G, S, 1) the backward recomputes the probabilities from."""
    s = jnp.einsum("bkgsd,bktd->bkgst", q, k, preferred_element_type=jnp.float32)
    s = jnp.where(_mask(q_pos, k_pos, segments), s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row that sees no key gives zeros, not NaN
    p = jnp.exp(s - m)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    denom = jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgst,bktd->bkgsd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / denom
    return out, m + jnp.log(denom)


@jax.custom_vjp
def _attend(q, k, v, q_pos, k_pos, segments):
    return _softmax_attend(q, k, v, q_pos, k_pos, segments)[0].astype(q.dtype)


def _attend_fwd(q, k, v, q_pos, k_pos, segments):
    out, lse = _softmax_attend(q, k, v, q_pos, k_pos, segments)
    out = out.astype(q.dtype)
    # Residuals are O(S): the (S x T) probabilities are recomputed from q, k and the log-sum-exp,
    # as the fused kernels do, instead of kept in float32 for the backward.
    return out, (q, k, v, q_pos, k_pos, segments, out, lse)


def _attend_bwd(res, d_out):
    q, k, v, q_pos, k_pos, segments, out, lse = res
    s = jnp.einsum("bkgsd,bktd->bkgst", q, k, preferred_element_type=jnp.float32)
    p = jnp.where(_mask(q_pos, k_pos, segments), jnp.exp(s - lse), 0.0)
    dt = q.dtype
    dv = jnp.einsum("bkgst,bkgsd->bktd", p.astype(dt), d_out, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bkgsd,bktd->bkgst", d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (p * (dp - delta)).astype(dt)
    dq = jnp.einsum("bkgst,bktd->bkgsd", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgst,bkgsd->bktd", ds, q, preferred_element_type=jnp.float32)
    none = jax.tree.map(lambda _: None, (q_pos, k_pos, segments))
    return (dq.astype(dt), dk.astype(k.dtype), dv.astype(v.dtype), *none)


_attend.defvjp(_attend_fwd, _attend_bwd)


def xla_attention(q, keys, values, positions, segment_ids, dtype, key_positions=None):
    """Plain XLA, masked by position (key position <= query position) and document segment.

    q (B, S, K, G, hd) grouped queries, keys/values (B, T, K, hd); returns (B, S, K, G, hd). The
    softmax has its own backward (`_attend`): it keeps O(S) residuals, not the probabilities."""
    key_positions = positions if key_positions is None else key_positions
    segments = None if segment_ids is None else (segment_ids, segment_ids)
    s, t = q.shape[1], keys.shape[1]
    qt = jnp.transpose(q, (0, 2, 3, 1, 4)) * jnp.asarray(1 / math.sqrt(q.shape[-1]), q.dtype)  # (B, K, G, S, hd)
    kt, vt = jnp.transpose(keys, (0, 2, 1, 3)), jnp.transpose(values, (0, 2, 1, 3))  # (B, K, T, hd)
    block = XLA_QUERY_BLOCK
    while s // block > XLA_MAX_BLOCKS and s % (2 * block) == 0:
        block *= 2  # a bounded number of blocks keeps the HLO, and so the compile, small
    if t == s and s > block and s % block == 0:
        # A query block never sees a later key, so it reads keys only up to its own end: half
        # the work of the full square, in blocks that stay in cache (3-5x faster prefill on CPU).
        blocks = []
        for a in range(0, s, block):
            e = a + block
            seg = None if segments is None else (segment_ids[:, a:e], segment_ids[:, :e])
            blocks.append(
                _attend(qt[:, :, :, a:e], kt[:, :, :e], vt[:, :, :e], positions[:, a:e], key_positions[:, :e], seg)
            )
        out = jnp.concatenate(blocks, axis=3)
    else:
        out = _attend(qt, kt, vt, positions, key_positions, segments)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).astype(dtype)


def _block(seq: int) -> int:
    return next(b for b in (512, 256, 128) if seq % b == 0)


def _splash_kernel(heads: int, seq: int, interpret: bool):
    b = _block(seq)
    sizes = splash.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    # Built per trace: the kernel holds its block-sparsity tables as arrays of the trace.
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq, seq))] * heads)
    return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q, k, v, segment_ids, interpret: bool = False):
    """Pallas TPU splash attention; the kernel takes (heads, S, hd) per row and does not scale."""
    b, s, kv, g, hd = q.shape
    kernel = _splash_kernel(kv * g, s, interpret)
    qh = (q * (1.0 / math.sqrt(hd))).astype(q.dtype).reshape(b, s, kv * g, hd).transpose(0, 2, 1, 3)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if segment_ids is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        seg = splash.SegmentIds(q=segment_ids, kv=segment_ids)
        out = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(qh, kh, vh, seg)
    return out.transpose(0, 2, 1, 3).reshape(b, s, kv, g, hd)


def triton_flash_attention(q, k, v, segment_ids, interpret: bool = False):
    """Pallas GPU flash attention (one key head per query head, so keys repeat per group)."""
    b, s, kv, g, hd = q.shape
    block = min(128, s)
    sizes = triton_attention.BlockSizes(
        block_q=block, block_k=block, block_q_dkv=block, block_kv_dkv=block, block_q_dq=block, block_kv_dq=block
    )
    out = triton_attention.mha(
        q.reshape(b, s, kv * g, hd),
        jnp.repeat(k, g, axis=2),
        jnp.repeat(v, g, axis=2),
        segment_ids,
        sm_scale=1.0 / math.sqrt(hd),
        causal=True,
        block_sizes=sizes,
        interpret=interpret,
    )
    return out.reshape(b, s, kv, g, hd)


def cudnn_attention(q, k, v, implementation: str = "cudnn"):
    """cuDNN flash attention (jax.nn.dot_product_attention takes grouped heads as they are).
    `implementation="xla"` runs the same call without cuDNN: how CPU tests check the wiring."""
    b, s, kv, g, hd = q.shape
    out = jax.nn.dot_product_attention(q.reshape(b, s, kv * g, hd), k, v, is_causal=True, implementation=implementation)
    return out.reshape(b, s, kv, g, hd)


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_attention(q, cache_k, cache_v, positions, dtype, block: int = DECODE_KEY_BLOCK):
    """One query per row over its KV cache, reading keys only up to the furthest row's position.

    q: (B, 1, K, G, hd); cache_k/v: (B, K, T, hd); positions: (B,) of the new token (its key is
    already written). Keys are read in blocks in a loop whose trip count is ceil((max position
    + 1) / block), with an online softmax, so the cost of a step grows with the tokens so far.
    Where `reads_whole_cache` (GPU) the whole cache is one block, masked, and there is no loop.
    """
    t = cache_k.shape[2]
    whole = reads_whole_cache()
    block = t if whole else min(block, t)

    def read(i):
        # The last block may start earlier than i * block (the slice stays inside the cache);
        # keys before i * block were counted by the previous block and are masked here.
        first = i * block
        start = jnp.minimum(first, t - block)
        kb = jax.lax.dynamic_slice_in_dim(cache_k, start, block, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(cache_v, start, block, axis=2)
        idx = start + jnp.arange(block)
        return kb, vb, (idx[None] >= first) & (idx[None] <= positions[:, None])

    n_blocks = 1 if whole else (jnp.max(positions) + block) // block
    return _online_softmax(q, read, n_blocks, dtype, (q, cache_k, positions))


def paged_decode_attention(
    requested: str, q, k_pages, v_pages, page_table, positions, dtype, block: int = DECODE_KEY_BLOCK
):
    """`decode_attention` over a paged cache: JAX's Pallas paged-attention kernel of the platform
    (TPU or Triton) where `paged_kernel` says so, else `paged_attention` of one query per row.

    q: (B, 1, K, G, hd); positions: (B,) of the new token (its key is already written)."""
    platform = current_platform()
    if paged_kernel(requested, platform, k_pages.shape[2], q.shape[-1], k_pages.dtype):
        kernel = tpu_paged_decode if platform == "tpu" else gpu_paged_decode
        return kernel(q, k_pages, v_pages, page_table, positions, dtype, block)
    return paged_attention(q, k_pages, v_pages, page_table, positions[:, None], dtype, block)


def paged_kernel(requested: str, platform: str, page_size: int, head_dim: int, dtype) -> bool:
    """Whether a paged decode step runs a Pallas kernel. Compiled for TPU with `model.attention`
    auto or splash: the TPU kernel, for a bfloat16 cache (it reads keys and values as bfloat16
    whatever they are) and shapes its VMEM blocks take. Compiled for GPU with auto or triton: the
    Triton kernel, for a cache of the model's dtypes (float32 dots at TF32), blocks that are
    powers of two (Pallas' Triton lowering), dots that contract at least 16 (Triton's own `tl.dot`
    minimum on NVIDIA: head_dim for the scores, a block's positions, one page or more, for the
    values; smaller ones compile here, their values unchecked) and a page of keys within
    TRITON_PAGED_TILE_BYTES."""
    dtype, reason = jnp.dtype(dtype), None
    if platform == "tpu" and requested in ("auto", "splash"):
        if dtype != jnp.bfloat16:
            reason = f"the TPU paged-attention kernel reads the cache as bfloat16, and it is {dtype.name}"
        elif head_dim % 128:
            reason = f"the TPU paged-attention kernel needs a head dimension that is a multiple of 128, got {head_dim}"
        elif page_size % 8:
            reason = f"the TPU paged-attention kernel needs pages of a multiple of 8 positions, got {page_size}"
    elif platform == "gpu" and requested in ("auto", "triton"):
        if dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
            reason = (
                f"the Triton paged-attention kernel runs for a bfloat16, float16 or float32 cache, not {dtype.name}"
            )
        elif head_dim < 16 or head_dim & (head_dim - 1):
            reason = (
                f"the Triton paged-attention kernel needs a power-of-two head dimension of at least 16, got {head_dim}"
            )
        elif page_size < 16 or page_size & (page_size - 1):
            reason = f"the Triton paged-attention kernel needs pages of a power of two of at least 16 positions, got {page_size}"
        elif page_size * head_dim * dtype.itemsize > TRITON_PAGED_TILE_BYTES:
            reason = (
                f"a page of {page_size} keys of {head_dim} {dtype.name} is more than the Triton paged-attention"
                f" kernel's block of {TRITON_PAGED_TILE_BYTES // 1024} KiB in shared memory"
            )
    else:
        return False
    if reason is not None and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"paged decode attention uses xla here: {reason}", stacklevel=2)
    return reason is None


def tpu_paged_decode(q, k_pages, v_pages, page_table, positions, dtype, block: int = DECODE_KEY_BLOCK):
    """One query per row through `jax.experimental.pallas.ops.tpu.paged_attention`: it reads each
    row's pages up to its length (position + 1) in blocks of pages, double-buffered into VMEM.
    Queries go in as float32, grouped per KV head as the kernel groups them."""
    b, _, kv, g, hd = q.shape
    n_pages, page_size = k_pages.shape[1:3]
    width = page_table.shape[1]
    per_block = _largest_divisor(width, block // page_size)
    scaled = (q[:, 0].astype(jnp.float32) / math.sqrt(hd)).reshape(b, kv * g, hd)  # the kernel does not scale
    out = tpu_paged_attention(
        scaled,
        k_pages,
        v_pages,
        positions.astype(jnp.int32) + 1,
        jnp.minimum(page_table, n_pages - 1),  # no page yet: any page, past the length it is not read
        pages_per_compute_block=per_block,
    )
    return out.reshape(b, 1, kv, g, hd).astype(dtype)


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n not above at_most (at least 1)."""
    return max(d for d in range(1, max(1, min(at_most, n)) + 1) if n % d == 0)


def gpu_paged_decode(
    q, k_pages, v_pages, page_table, positions, dtype, block: int = DECODE_KEY_BLOCK, interpret: bool = False
):
    """One query per row through `jax.experimental.pallas.ops.gpu.paged_attention` (Triton): the
    table's width splits into `k_splits` partitions, one program each per row and KV head (the
    query heads of a KV head padded to 16), that read pages up to the row's length (position + 1)
    in blocks of pages, skipping those past it on the device (no loop the host waits on); the
    partitions' softmax partials are then combined. Queries go in as the cache's dtype (the
    kernel's dots take both sides in one dtype; float32 runs at TF32), scores, softmax and sums
    are float32 in the kernel, and the partitions' outputs are combined in the cache's dtype."""
    b, _, kv, g, hd = q.shape
    n_pages, page_size = k_pages.shape[1:3]
    width = page_table.shape[1]
    # As many partitions as the width allows, up to the kernel's default of 16: a long cache is
    # read by 16 programs per row and head; a partition past a row's length costs next to nothing.
    splits = _largest_divisor(width, 16)
    per_split = width // splits
    # Pages per compute block: a power of two (Triton's block shapes) that divides the partition,
    # up to `block` positions and TRITON_PAGED_TILE_BYTES of keys.
    page_bytes = page_size * hd * k_pages.dtype.itemsize
    per_block = 1
    while (
        per_split % (2 * per_block) == 0
        and 2 * per_block * page_size <= block
        and 2 * per_block * page_bytes <= TRITON_PAGED_TILE_BYTES
    ):
        per_block *= 2
    scaled = (q[:, 0].astype(jnp.float32) / math.sqrt(hd)).astype(k_pages.dtype)  # the kernel does not scale
    out = gpu_paged_attention(
        scaled.reshape(b, kv * g, hd),
        k_pages,
        v_pages,
        jnp.minimum(page_table, n_pages - 1),  # no page yet: any page, masked (or not read) past the length
        positions.astype(jnp.int32) + 1,
        pages_per_compute_block=per_block,
        k_splits=splits,
        interpret=interpret,
    )
    return out.reshape(b, 1, kv, g, hd).astype(dtype)


def paged_attention(q, k_pages, v_pages, page_table, positions, dtype, block: int = DECODE_KEY_BLOCK):
    """Queries at `positions` over their rows' paged caches: row b's key at position p is in
    page page_table[b, p // page_size] at offset p % page_size, and a query sees the keys at
    positions up to its own. The pages of a block of positions are gathered (an XLA gather, on
    every platform) with an online softmax over the blocks, up to the furthest query's position;
    ids past the pool (no page yet) read zeros, which the position mask leaves out. A chunk of a
    prompt (S > 1) so reads the keys of earlier chunks and of a cached prefix from the pages.

    q: (B, S, K, G, hd); k_pages/v_pages: (K, pages, page_size, hd); page_table: (B, W) int32;
    positions: (B, S) (the queries' keys are already written; -1: padding, which sees nothing
    and gets zeros). Returns (B, S, K, G, hd)."""
    s = q.shape[1]
    query_block = XLA_QUERY_BLOCK
    while s // query_block > XLA_MAX_BLOCKS:
        query_block *= 2  # a bounded number of blocks keeps the HLO, and so the compile, small
    if s > query_block:
        # Each block of queries reads keys only up to its own furthest position: about half the
        # work of every query reading up to the chunk's end, in pieces that stay in cache.
        return jnp.concatenate(
            [
                paged_attention(
                    q[:, a : a + query_block],
                    k_pages,
                    v_pages,
                    page_table,
                    positions[:, a : a + query_block],
                    dtype,
                    block,
                )
                for a in range(0, s, query_block)
            ],
            axis=1,
        )
    n_pages, page_size = k_pages.shape[1:3]
    per_block = max(1, min(block // page_size, page_table.shape[1]))
    width = -(-page_table.shape[1] // per_block) * per_block
    table = jnp.pad(page_table, ((0, 0), (0, width - page_table.shape[1])), constant_values=n_pages)
    bsz, span = q.shape[0], per_block * page_size

    def read(i):
        ids = jax.lax.dynamic_slice_in_dim(table, i * per_block, per_block, axis=1)  # (B, per_block)
        # (K, B, per_block, page_size, hd) -> (B, K, span, hd)
        kb, vb = (
            jnp.swapaxes(p.at[:, ids].get(mode="fill", fill_value=0), 0, 1).reshape(bsz, p.shape[0], span, p.shape[-1])
            for p in (k_pages, v_pages)
        )
        idx = i * span + jnp.arange(span)
        return kb, vb, idx[None, None] <= positions[:, :, None]

    n_blocks = width // per_block if reads_whole_cache() else (jnp.max(positions) + span) // span
    return _online_softmax(q, read, n_blocks, dtype, (q, k_pages, page_table, positions))


def _online_softmax(q, read, n_blocks, dtype, inputs):
    """softmax(q k / sqrt(hd)) v of S queries per row over n_blocks blocks of keys, read(i) ->
    (keys (B, K, block, hd), values, valid (B, block) for every query or (B, S, block));
    `inputs`: the arrays the result varies with. A query that sees no key gets zeros. An int
    n_blocks is a trip count the compiler knows (one block: no loop)."""
    bsz, s, kv, g, hd = q.shape
    qf = q.astype(jnp.float32) / math.sqrt(hd)  # (B, S, K, G, hd)

    def body(i, carry):
        m, total, acc = carry
        kb, vb, valid = read(i)
        valid = valid.reshape(bsz, -1, valid.shape[-1])  # (B, S or 1, block)
        sc = jnp.einsum("bskgd,bktd->bskgt", qf, kb.astype(jnp.float32))
        sc = jnp.where(valid[:, :, None, None], sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(sc - m_safe[..., None])
        scale = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        total = total * scale + p.sum(axis=-1)
        acc = acc * scale[..., None] + jnp.einsum("bskgt,bktd->bskgd", p, vb.astype(jnp.float32))
        return m_new, total, acc

    init = (
        jnp.full((bsz, s, kv, g), -jnp.inf, jnp.float32),
        jnp.zeros((bsz, s, kv, g), jnp.float32),
        jnp.zeros((bsz, s, kv, g, hd), jnp.float32),
    )
    # Under shard_map the loop carry must vary over the mesh axes its updates vary over.
    axes = frozenset().union(*(_varying(x) for x in inputs))
    init = jax.tree.map(lambda x: _cast_varying(x, axes), init)
    if isinstance(n_blocks, int) and n_blocks == 1:
        _, total, acc = body(0, init)
    else:
        _, total, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    return (acc / jnp.where(total > 0, total, 1.0)[..., None]).astype(dtype)
