"""The bytes a decode step moves to and from device memory, against the floor.

The floor of one device's decode step: every weight of its shard read once (the embedding table
aside: a step reads one row of it per token, unless it is tied to the LM head, which reads it
whole) plus the KV cache as far as the decode attention reads it (`attention.decode_attention`:
key blocks up to the furthest row's position, k and v, every layer). Anything a step moves beyond
that is traffic the program causes: activations, copies, weights read twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def keys_read(context: int, cache_len: int | None = None) -> int:
    """Cache positions the decode attention reads for a row whose new token is at `context - 1`."""
    from ladder_jax.attention import DECODE_KEY_BLOCK

    block = DECODE_KEY_BLOCK if cache_len is None else min(DECODE_KEY_BLOCK, cache_len)
    return -(-context // block) * block


def floor_bytes(m, tensor: int, batch: int, context: int, cache_len: int | None = None) -> dict:
    """{weights, kv_cache, total}: the bytes one device of a `tensor` axis must read in a decode
    step of `batch` rows whose new tokens sit at position `context - 1`."""
    import math

    import numpy as np

    from ladder_jax import model as M

    weights = M.bytes_per_device(m, tensor)
    if not m.tie_embeddings:  # the table's rows are gathered, not streamed; the head reads its own matrix
        table = M.abstract_params(m)["embed"]["table"]
        weights -= math.prod(table.shape) // tensor * np.dtype(table.dtype).itemsize
    kv = M.cache_bytes_per_device(m, (1, tensor), batch, keys_read(context, cache_len))
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}
