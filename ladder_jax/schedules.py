"""Residual schedules: which residual each module reads, and where the all-reduce goes.

Every schedule is a short function over the same modules (a `Block`: attn_norm, attn, mlp_norm,
mlp). They share one piece of state, the `Stream`: the residual `x` plus the reduced outputs of
the latest modules that have not been added to it yet (`pending`). A standard module first adds
everything pending (`read`, Megatron order); a ladder module reads `x` while the previous
module's output is still pending, so it reads x_{j-2} and that module's all-reduce runs while
this module computes; the pending output is added once this module's output exists
(`settle_after`). Mixing schedules in one plan needs no special cases: a ladder layer after a
standard one reads the residual without that layer's MLP output, exactly the module-level rule
of the hybrid Llama conversion.

`ctx.all_reduce` is the psum over the tensor axis; it is the only collective a layer issues.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import jax


@jax.tree_util.register_dataclass  # a pytree: the carry of a scan over layers, an input of a remat
@dataclass(frozen=True)
class Stream:
    x: jax.Array
    pending: tuple = ()

    def read(self) -> "Stream":
        """Add every pending output: the residual a standard module reads."""
        x = self.x
        for y in self.pending:
            x = x + y
        return Stream(x)

    def settle_after(self, y: jax.Array) -> tuple["Stream", jax.Array]:
        """Add the pending outputs once this module's output `y` exists (ladder).

        The module read `x` without them, so their all-reduces can run while it computes. The
        barriers turn that intent into data dependencies that every XLA scheduler must respect
        (`python -m ladder_jax analysis schedule`, docs/analysis.md): the first makes the late add wait for
        `y`, and `y`'s all-reduce wait for the older one, so the older all-reduce's window is
        exactly this module's work (XLA:TPU and the A100 target otherwise settled it first and
        ran this module afterwards); the second keeps the add out of the next module's fusions
        (XLA:GPU fused it with the next norm at batch 1). Returns the stream and `y` to reduce.
        """
        if not self.pending:
            return self, y
        x, settle, y = jax.lax.optimization_barrier((self.x, self.pending, y))
        for p in settle:
            x = x + p
        return Stream(jax.lax.optimization_barrier(x)), y

    def push(self, y: jax.Array) -> "Stream":
        return replace(self, pending=self.pending + (y,))

    def settled(self) -> jax.Array:
        return self.read().x


@dataclass(frozen=True)
class LayerContext:
    """What a schedule needs besides the modules: the reduction and the attention call."""

    all_reduce: Callable[[jax.Array], jax.Array]
    # attend(layer_index, attention_module, normed_x[, layers]) -> partial attention output; `layers`:
    # the layers whose KV caches a split lp pair's attention keeps its heads in
    attend: Callable
    pick: Callable  # pick(a, b): a on the first half of the tensor axis, b on the second


def _sequential(block, i: int, s: Stream, ctx: LayerContext, reduce, ladder: bool = False) -> Stream:
    """Attention then MLP. A standard module reads the settled residual; a ladder module reads it
    without the previous module's output, which is added only once this module's output exists."""
    for module, norm in ((lambda h: ctx.attend(i, block.attn, h), block.attn_norm), (block.mlp, block.mlp_norm)):
        if not ladder:
            s = s.read()
        y = module(norm(s.x))
        if ladder:
            s, y = s.settle_after(y)
        s = s.push(reduce(y))
    return s


def standard(blocks, layers, s, ctx):
    """x_j = x_{j-1} + AR(f_j(LN_j(x_{j-1}))): two blocking all-reduces per layer."""
    return _sequential(blocks[0], layers[0], s, ctx, reduce=ctx.all_reduce)


def ladder(blocks, layers, s, ctx):
    """x_j = x_{j-1} + AR(f_j(LN_j(x_{j-2}))): each all-reduce overlaps the next module."""
    return _sequential(blocks[0], layers[0], s, ctx, reduce=ctx.all_reduce, ladder=True)


def desync(blocks, layers, s, ctx):
    """No all-reduce: each device keeps its partial residual. A speed bound, not a valid model."""
    return _sequential(blocks[0], layers[0], s, ctx, reduce=lambda y: y)


def parallel(blocks, layers, s, ctx):
    """x_i = x_{i-1} + AR(attn(LN(x)) + mlp(LN(x))), one norm: one all-reduce per layer."""
    (b,), (i,) = blocks, layers
    s = s.read()
    h = b.attn_norm(s.x)
    return s.push(ctx.all_reduce(ctx.attend(i, b.attn, h) + b.mlp(h)))


def spd(blocks, layers, s, ctx):
    """Sync-Point Drop: the MLP reads LN(x + Y_d) with this device's partial attention Y_d; one
    all-reduce of Y_d + Z_d per block."""
    (b,), (i,) = blocks, layers
    s = s.read()
    y = ctx.attend(i, b.attn, b.attn_norm(s.x))
    z = b.mlp(b.mlp_norm(s.x + y))
    return s.push(ctx.all_reduce(y + z))


def lp(blocks, layers, s, ctx):
    """Layer Parallelism: layers i and i+1 read the same input, one all-reduce per sublayer pair."""
    (a, b), (i, j) = blocks, layers
    s = s.read()
    s = s.push(ctx.all_reduce(ctx.attend(i, a.attn, a.attn_norm(s.x)) + ctx.attend(j, b.attn, b.attn_norm(s.x))))
    s = s.read()
    return s.push(ctx.all_reduce(a.mlp(a.mlp_norm(s.x)) + b.mlp(b.mlp_norm(s.x))))


def lp_split(blocks, layers, s, ctx):
    """Layer Parallelism in the paper's layout (model.lp_layout=split): block a holds both layers'
    heads and FFN columns, so each device runs one layer of the pair (i on the first half of the
    tensor axis, i+1 on the second) with that layer's norms, and one all-reduce per sublayer pair
    sums them: the function of `lp`, one layer's chain of kernels per device instead of two."""
    (a, b), (i, j) = blocks, layers
    s = s.read()
    h = a.attn_norm(s.x, ctx.pick(a.attn_norm.scale[...], b.attn_norm.scale[...]))
    s = s.push(ctx.all_reduce(ctx.attend(i, a.attn, h, (i, j))))
    s = s.read()
    return s.push(ctx.all_reduce(a.mlp(a.mlp_norm(s.x, ctx.pick(a.mlp_norm.scale[...], b.mlp_norm.scale[...])))))


# The one list of schedule names: the plan grammar (config.parse_plan) accepts exactly these.
SCHEDULES = {"standard": standard, "ladder": ladder, "desync": desync, "parallel": parallel, "spd": spd, "lp": lp}

# All-reduces over `tensor` each schedule issues per layer (lp: per layer, i.e. 2 per pair).
ALL_REDUCES_PER_LAYER = {"standard": 2, "ladder": 2, "desync": 0, "parallel": 1, "spd": 1, "lp": 1}
