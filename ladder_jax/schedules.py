"""Residual schedules: which residual each module reads, and where the all-reduce goes.

Every schedule is a short function over the same modules (a `Block`: attn_norm, attn, mlp_norm,
mlp). They share one piece of state, the `Stream`: the residual `x` plus the reduced outputs of
the latest modules that have not been added to it yet (`pending`). A module that reads with
`lag=0` first adds everything pending (standard Megatron order); a ladder module reads with
`lag=1`, leaving the previous module's output pending, so it reads x_{j-2} and that module's
all-reduce can run while this module computes. Mixing schedules in one plan needs no special
cases: a ladder layer after a standard one reads the residual without that layer's MLP output,
exactly the module-level rule of the hybrid Llama conversion.

`ctx.all_reduce` is the psum over the tensor axis; it is the only collective a layer issues.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import jax


@dataclass(frozen=True)
class Stream:
    x: jax.Array
    pending: tuple = ()

    def read(self, lag: int = 0) -> "Stream":
        """Add every pending output except the newest `lag` ones; the result is what a module reads."""
        settle, keep = self.pending[: len(self.pending) - lag], self.pending[len(self.pending) - lag :]
        if not settle:
            return self
        x = self.x
        if lag:
            # The late add must share no fusion with this module's work, or XLA waits for the older
            # all-reduce before this module's GEMMs and the overlap is gone. A barrier after the add
            # stops it fusing with the next add (DESIGN.md); one before it stops XLA:GPU, at batch 1,
            # fusing the add with the norm that also reads x (seen in `analysis schedule`).
            x, settle = jax.lax.optimization_barrier((x, settle))
        for y in settle:
            x = x + y
        if lag:
            x = jax.lax.optimization_barrier(x)
        return Stream(x, keep)

    def push(self, y: jax.Array) -> "Stream":
        return replace(self, pending=self.pending + (y,))

    def settled(self) -> jax.Array:
        return self.read(0).x


@dataclass(frozen=True)
class LayerContext:
    """What a schedule needs besides the modules: the reduction and the attention call."""

    all_reduce: Callable[[jax.Array], jax.Array]
    attend: Callable  # attend(layer_index, attention_module, normed_x) -> partial attention output


def _sequential(block, i: int, s: Stream, ctx: LayerContext, lag: int, reduce) -> Stream:
    s = s.read(lag)
    s = s.push(reduce(ctx.attend(i, block.attn, block.attn_norm(s.x))))
    s = s.read(lag)
    return s.push(reduce(block.mlp(block.mlp_norm(s.x))))


def standard(blocks, layers, s, ctx):
    """x_j = x_{j-1} + AR(f_j(LN_j(x_{j-1}))): two blocking all-reduces per layer."""
    return _sequential(blocks[0], layers[0], s, ctx, lag=0, reduce=ctx.all_reduce)


def ladder(blocks, layers, s, ctx):
    """x_j = x_{j-1} + AR(f_j(LN_j(x_{j-2}))): each all-reduce overlaps the next module."""
    return _sequential(blocks[0], layers[0], s, ctx, lag=1, reduce=ctx.all_reduce)


def desync(blocks, layers, s, ctx):
    """No all-reduce: each device keeps its partial residual. A speed bound, not a valid model."""
    return _sequential(blocks[0], layers[0], s, ctx, lag=0, reduce=lambda y: y)


def parallel(blocks, layers, s, ctx):
    """x_i = x_{i-1} + AR(attn(LN(x)) + mlp(LN(x))), one norm: one all-reduce per layer."""
    (b,), (i,) = blocks, layers
    s = s.read(0)
    h = b.attn_norm(s.x)
    return s.push(ctx.all_reduce(ctx.attend(i, b.attn, h) + b.mlp(h)))


def spd(blocks, layers, s, ctx):
    """Sync-Point Drop: the MLP reads LN(x + Y_d) with this device's partial attention Y_d; one
    all-reduce of Y_d + Z_d per block."""
    (b,), (i,) = blocks, layers
    s = s.read(0)
    y = ctx.attend(i, b.attn, b.attn_norm(s.x))
    z = b.mlp(b.mlp_norm(s.x + y))
    return s.push(ctx.all_reduce(y + z))


def lp(blocks, layers, s, ctx):
    """Layer Parallelism: layers i and i+1 read the same input, one all-reduce per sublayer pair."""
    (a, b), (i, j) = blocks, layers
    s = s.read(0)
    s = s.push(ctx.all_reduce(ctx.attend(i, a.attn, a.attn_norm(s.x)) + ctx.attend(j, b.attn, b.attn_norm(s.x))))
    s = s.read(0)
    return s.push(ctx.all_reduce(a.mlp(a.mlp_norm(s.x)) + b.mlp(b.mlp_norm(s.x))))


SCHEDULES = {"standard": standard, "ladder": ladder, "desync": desync, "parallel": parallel, "spd": spd, "lp": lp}

# All-reduces over `tensor` each schedule issues per layer (lp: per layer, i.e. 2 per pair).
ALL_REDUCES_PER_LAYER = {"standard": 2, "ladder": 2, "desync": 0, "parallel": 1, "spd": 1, "lp": 1}
