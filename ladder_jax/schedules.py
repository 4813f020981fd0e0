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

`ctx.all_reduce` is the psum over the tensor axis; it is the only collective a layer issues (in a
scan, a ladder's last one is split across the iteration boundary: `LayerContext.defer_last`).

A schedule is one entry of `SCHEDULES`: its function and its traits (layers per step, all-reduces,
norms, split form, trainability, dependence on the tensor degree). The plan grammar
(`ladder_jax.plan`), the model, training, conversion and the instruments read the traits, never
a schedule's name; docs/architecture.md ("Adding a schedule") says what a new entry needs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Callable

import jax


@jax.tree_util.register_dataclass  # a pytree: the carry of a scan over layers, an input of a remat
@dataclass(frozen=True)
class Stream:
    x: jax.Array
    pending: tuple = ()
    # (x,): the same residual, as the next late add reads it (settle_after), or () before any settle
    late: tuple = ()
    # this device's partial outputs whose all-reduce is not issued yet: what a scanned ladder
    # iteration leaves to the next one (`defer`), which reduces them first (`issue`)
    unreduced: tuple = ()

    def read(self) -> "Stream":
        """Add every pending output: the residual a standard module reads."""
        x = self.x
        for y in self.pending:
            x = x + y
        return Stream(x)

    def settle_after(self, y: jax.Array, tie_first: bool = False, tie_late: bool = True) -> tuple["Stream", jax.Array]:
        """Add the pending outputs once this module's output `y` exists (ladder).

        The module read `x` without them, so their all-reduces can run while it computes. The
        barriers turn that intent into data dependencies that every XLA scheduler must respect
        (`python -m ladder_jax analysis schedule`, docs/analysis.md): the first makes the late add wait for
        `y`, and `y`'s all-reduce wait for the older one, so the older all-reduce's window is
        exactly this module's work (XLA:TPU and the A100 target otherwise settled it first and
        ran this module afterwards); the second keeps the add out of the next module's fusions
        (XLA:GPU fused it with the next norm at batch 1). The third hands the next late add its
        own copy of the residual (`late`), tied to `y`: in the backward pass that add's gradient
        is then read only once `y`'s gradient is reduced, so XLA:TPU cannot run that all-reduce
        in place after the next module's whole backward, synchronously (docs/training.md, "The
        backward pass's all-reduces"); `tie_late=False` leaves it out, for a compiler that
        overlaps more without it (`LayerContext.tie_late`). Returns the stream and `y` to
        reduce. The first module of a stream has nothing to add; with `tie_first` (a step over a
        KV cache) the next module still waits for its output: else it may run first, and this
        output's all-reduce has nothing to hide behind (XLA:GPU's A100 schedule did that with
        layer 0 at batch 1). Not in training: in the backward that tie cost XLA:TPU the overlap
        of two gradient all-reduces.
        """
        if not self.pending:
            if tie_first:
                x, y = jax.lax.optimization_barrier((self.x, y))
                return replace(self, x=x), y
            return self, y
        base = self.late[0] if self.late else self.x
        x, settle, y = jax.lax.optimization_barrier((base, self.pending, y))
        for p in settle:
            x = x + p
        x = jax.lax.optimization_barrier(x)
        if not tie_late:
            return Stream(x), y
        late, y = jax.lax.optimization_barrier((x, y))
        return Stream(x, late=(late,)), y

    def push(self, y: jax.Array) -> "Stream":
        return replace(self, pending=self.pending + (y,))

    def defer(self, y: jax.Array) -> "Stream":
        """Leave this module's partial output `y` unreduced, to be reduced later (`issue`). The
        stream is a scan's carry from here, and `late` leaves it: with a remat the scan keeps its
        carry for every iteration, and `late` (the value of `x`) cost one residual per layer
        (20 GiB for llama-3.1-70b on v5p-128); the next late add reads `x` itself."""
        return replace(self, unreduced=self.unreduced + (y,), late=())

    def issue(self, reduce, tie: bool = False) -> "Stream":
        """Reduce the deferred outputs; they are pending from here on. With `tie` the next late
        add reads its own copy of the residual tied to them (`late`, as `settle_after` hands one
        on): in the backward pass that add's gradient is then read only once their gradient is
        reduced, so XLA:TPU runs that all-reduce beside the next module's backward rather than in
        place after it (docs/training.md, "Scanned layers and the ladder's overlap")."""
        if not self.unreduced:
            return self
        unreduced, late = self.unreduced, self.late
        if tie:
            x, unreduced = jax.lax.optimization_barrier((self.x, unreduced))
            late = (x,)
        return replace(self, pending=self.pending + tuple(map(reduce, unreduced)), unreduced=(), late=late)

    def settled(self) -> jax.Array:
        return self.read().x


@dataclass(frozen=True)
class LayerContext:
    """What a schedule needs besides the modules: the reduction and the attention call."""

    all_reduce: Callable[[jax.Array], jax.Array]
    # attend(attention_module, normed_x, kv) -> (partial attention output, new kv); kv: the layer's
    # (k, v) cache or None; a split lp pair's attention takes and returns the list of both layers'
    attend: Callable
    pick: Callable  # pick(a, b): a on the first half of the tensor axis, b on the second
    # None, or (the step is a scan iteration) what a ladder's last output passes through to stay
    # unreduced in the carry (Stream.defer): the next iteration reduces it while its first module,
    # which does not read it, computes; reduced here, it would close the iteration synchronously
    defer_last: Callable | None = None
    # whether a ladder's next late add reads its own copy of the residual tied to this module's
    # output (Stream.settle_after's third barrier): mesh.ties_late_residual, by compiler
    tie_late: bool = True


# Every schedule function: (blocks, kv, stream, ctx) -> (stream, kv) for one step of the plan;
# blocks and kv (each layer's cache, None without one) hold one entry per layer of the step.


def _module(s: Stream, f, reduce, ladder: bool, defer: Callable | None = None, tie_late: bool = True):
    """One module over the stream. f(x) -> (partial output, cache). A standard module reads the
    settled residual; a ladder module reads it without the previous module's output, which is
    added only once this module's output exists. With `defer` the output stays unreduced."""
    if not ladder:
        s = s.read()
    y, kv = f(s.x)
    if ladder:
        s, y = s.settle_after(y, tie_first=kv is not None, tie_late=tie_late)
    return (s.push(reduce(y)) if defer is None else s.defer(defer(y))), kv


def _sequential(blocks, kv, s: Stream, ctx: LayerContext, reduce, ladder: bool = False):
    (b,), (c,) = blocks, kv
    s, c = _module(s, lambda x: ctx.attend(b.attn, b.attn_norm(x), c), reduce, ladder, tie_late=ctx.tie_late)
    defer = ctx.defer_last if ladder else None
    s, _ = _module(s, lambda x: (b.mlp(b.mlp_norm(x)), None), reduce, ladder, defer, ctx.tie_late)
    return s, (c,)


def standard(blocks, kv, s, ctx):
    """x_j = x_{j-1} + AR(f_j(LN_j(x_{j-1}))): two blocking all-reduces per layer."""
    return _sequential(blocks, kv, s, ctx, reduce=ctx.all_reduce)


def ladder(blocks, kv, s, ctx):
    """x_j = x_{j-1} + AR(f_j(LN_j(x_{j-2}))): each all-reduce overlaps the next module."""
    return _sequential(blocks, kv, s, ctx, reduce=ctx.all_reduce, ladder=True)


def desync(blocks, kv, s, ctx):
    """No all-reduce: each device keeps its partial residual. A speed bound, not a valid model."""
    return _sequential(blocks, kv, s, ctx, reduce=lambda y: y)


def parallel(blocks, kv, s, ctx):
    """x_i = x_{i-1} + AR(attn(LN(x)) + mlp(LN(x))), one norm: one all-reduce per layer."""
    (b,), (c,) = blocks, kv
    s = s.read()
    h = b.attn_norm(s.x)
    y, c = ctx.attend(b.attn, h, c)
    return s.push(ctx.all_reduce(y + b.mlp(h))), (c,)


def spd(blocks, kv, s, ctx):
    """Sync-Point Drop: the MLP reads LN(x + Y_d) with this device's partial attention Y_d; one
    all-reduce of Y_d + Z_d per block."""
    (b,), (c,) = blocks, kv
    s = s.read()
    y, c = ctx.attend(b.attn, b.attn_norm(s.x), c)
    z = b.mlp(b.mlp_norm(s.x + y))
    return s.push(ctx.all_reduce(y + z)), (c,)


def lp(blocks, kv, s, ctx):
    """Layer Parallelism: layers i and i+1 read the same input, one all-reduce per sublayer pair."""
    (a, b), (ca, cb) = blocks, kv
    s = s.read()
    ya, ca = ctx.attend(a.attn, a.attn_norm(s.x), ca)
    yb, cb = ctx.attend(b.attn, b.attn_norm(s.x), cb)
    s = s.push(ctx.all_reduce(ya + yb)).read()
    return s.push(ctx.all_reduce(a.mlp(a.mlp_norm(s.x)) + b.mlp(b.mlp_norm(s.x)))), (ca, cb)


def lp_split(blocks, kv, s, ctx):
    """Layer Parallelism in the paper's layout (model.lp_layout=split): block a holds both layers'
    heads and FFN columns, so each device runs one layer of the pair (i on the first half of the
    tensor axis, i+1 on the second) with that layer's norms, and one all-reduce per sublayer pair
    sums them: the function of `lp`, one layer's chain of kernels per device instead of two."""
    (a, b), (ca, cb) = blocks, kv
    s = s.read()
    h = a.attn_norm(s.x, ctx.pick(a.attn_norm.scale[...], b.attn_norm.scale[...]))
    y, pair = ctx.attend(a.attn, h, None if ca is None else [ca, cb])
    s = s.push(ctx.all_reduce(y)).read()
    s = s.push(ctx.all_reduce(a.mlp(a.mlp_norm(s.x, ctx.pick(a.mlp_norm.scale[...], b.mlp_norm.scale[...])))))
    return s, (None, None) if pair is None else tuple(pair)


def track(blocks, kv, s, ctx):
    """Parallel Track: each tensor device is a track. Over the step's D layers a device keeps its
    own residual x_d = x + sum of its partial outputs so far (every module reads LN(x_d), no
    all-reduce); at the step's end the tracks fuse with one, x <- x + AR(sum of partial outputs)."""
    s = s.read()
    mine, new_kv = None, []
    for b, c in zip(blocks, kv):
        y, c = ctx.attend(b.attn, b.attn_norm(s.x if mine is None else s.x + mine), c)
        mine = y if mine is None else mine + y
        mine = mine + b.mlp(b.mlp_norm(s.x + mine))
        new_kv.append(c)
    return s.push(ctx.all_reduce(mine)), tuple(new_kv)


# ---------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Schedule:
    """A residual schedule: its function and every trait the rest of the library reads."""

    name: str  # as a plan writes it, parameter included ("track:2")
    run: Callable  # (blocks, kv, stream, ctx) -> (stream, kv), one step
    all_reduces: int  # over `tensor` per step
    summary: str  # one line for docs and `choose from` messages
    layers_per_step: int = 1  # a plan run of this schedule must be a multiple of it
    # the step's layers read the same input, attentions first and then MLPs (lp), rather than one
    # after another; what `train.trainable=lp_pairs` selects, and the order the latency model uses
    side_by_side: bool = False
    mlp_norm: bool = True  # False: the MLP reads the attention's norm (parallel): a parameter less
    split: "Schedule | None" = None  # its form under model.lp_layout=split (each layer on half the tensor axis)
    # (a split form) the step's heads and FFN columns all live in its first layer's slot
    # (model.to_split_layout moves them there), each layer's on its part of the tensor axis
    merged_weights: bool = False
    trainable: bool = True  # False: only for running a model (checkpoints store another layout)
    # the function changes with the tensor degree (spd, track, desync): a run restored at another
    # degree computes another model
    tensor_dependent: bool = False
    exports_to_llama: bool = False  # transformers' LlamaForCausalLM computes exactly this layer
    # the plan sets layers_per_step after a colon (track:2); the text names it in messages
    parameter: str = ""

    @property
    def example(self) -> str:
        """A plan segment that uses it, for tests and messages."""
        return f"{self.name}:2" if self.parameter else self.name

    def with_parameter(self, text: str) -> "Schedule":
        """This entry with the plan's parameter applied (`track` + "2" -> track:2, two layers a step)."""
        if not self.parameter:
            raise ValueError(f"schedule '{self.name}' takes no parameter; write '{self.name}' without ':{text}'")
        if not text.isdigit() or int(text) < 1:
            raise ValueError(
                f"schedule '{self.name}' needs {self.parameter} as a positive integer, e.g. '{self.example}'"
            )
        return replace(self, name=f"{self.name}:{int(text)}", layers_per_step=int(text))


LP_SPLIT = Schedule(
    "lp",
    lp_split,
    2,
    "lp pairs, one layer on each half of the tensor axis",
    2,
    side_by_side=True,
    merged_weights=True,
    trainable=False,
)

SCHEDULES = {
    s.name: s
    for s in (
        Schedule("standard", standard, 2, "Megatron TP: two blocking all-reduces per layer", exports_to_llama=True),
        Schedule("ladder", ladder, 2, "Ladder Residual: each all-reduce overlaps the next module"),
        Schedule("parallel", parallel, 1, "GPT-J/PaLM parallel block: one norm, one all-reduce", mlp_norm=False),
        Schedule("spd", spd, 1, "Sync-Point Drop: the attention's all-reduce dropped", tensor_dependent=True),
        Schedule("lp", lp, 2, "Layer Parallelism: two layers side by side", 2, side_by_side=True, split=LP_SPLIT),
        Schedule(
            "track",
            track,
            1,
            "Parallel Track: each device a track, one all-reduce every D layers",
            tensor_dependent=True,
            parameter="D (layers between fusions)",
        ),
        Schedule("desync", desync, 0, "no all-reduce: a speed bound, not a valid model", tensor_dependent=True),
    )
}


@functools.cache
def schedule(name: str) -> Schedule:
    """The registry entry for a plan's schedule name, its parameter applied (`track:2`)."""
    base, colon, parameter = name.partition(":")
    if base not in SCHEDULES:
        raise ValueError(f"unknown schedule '{base}'; choose from {', '.join(s.example for s in SCHEDULES.values())}")
    entry = SCHEDULES[base]
    if colon:
        return entry.with_parameter(parameter)
    if entry.parameter:
        raise ValueError(f"schedule '{base}' needs {entry.parameter}: write e.g. '{entry.example}'")
    return entry
