"""The transformer: one set of modules, a per-layer schedule plan, one shard_map.

Parameters live outside the modules as a plain nested dict of global arrays (`params`), sharded
over the mesh by the logical-axis rules in `mesh.py`. Inside the shard_map each device rebuilds
the NNX modules around its local shards (`nnx.merge`) and runs `Transformer.__call__`, where the
schedules place every all-reduce of a layer. With an fsdp axis a module's weights arrive split
over it too and are gathered just before the module runs (`fsdp_gather`).

Training can rematerialise each layer step (`jax.checkpoint`, a policy from config.REMAT_POLICIES)
and scan runs of identical steps (`jax.lax.scan` over the run's weights stacked on a new leading
axis, carrying the schedules' Stream, a ladder's last output unreduced: its all-reduce runs in the
next iteration, beside that iteration's first module). Decoding runs unrolled. A scanned trainer
keeps its state in the training layout (`stack_layers`: each run's weights stored stacked), so
its step and optimizer have one operation per weight kind at any depth; checkpoints and every
other caller see the per-layer layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import attention, plan
from .config import REMAT_POLICIES, Config, ModelConfig
from .layers import MLP, Attention, Embed, LMHead, RMSNorm, rope_frequencies, rope_tables
from .mesh import BATCH, FSDP, batch_shards, logical_to_spec, sharding_rules, ties_late_residual
from .plan import lookup
from .schedules import LayerContext, Schedule, Stream

TENSOR = "tensor"


class Block(nnx.Module):
    """One layer's modules. A schedule without an MLP norm (parallel) has a single norm."""

    def __init__(self, cfg: ModelConfig, schedule: str, *, rngs: nnx.Rngs | None, width: int = 1):
        self.attn_norm = RMSNorm(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs, width=width)
        self.mlp_norm = RMSNorm(cfg, rngs=rngs) if lookup(schedule).mlp_norm else None
        self.mlp = MLP(cfg, rngs=rngs, width=width)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs=rngs)
        self.layers = nnx.List(
            [Block(cfg, s, rngs=rngs, width=w) for s, w in zip(cfg.layer_schedules, cfg.layer_widths)]
        )
        self.final_norm = RMSNorm(cfg, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg, rngs=rngs)

    def __call__(self, tokens, positions, **options):
        """Local-view forward; must run under a shard_map with `fsdp` and `tensor` axes.

        tokens, positions: (B, S) int32; `options`: those of `residual` (cache, segment_ids,
        remat, scan, page_table, stacked). A cache is a list of per-layer (k, v) local shards
        (with `page_table` (B, W), per-layer page pools: see layers.Attention).
        Returns (logits for this device's vocab shard (B, S, V/T) float32 with padding columns at
        -inf, updated cache or None). `remat` (a config.REMAT_POLICIES name), `scan` and `stacked`
        change how the layers are compiled, never what they compute (see `residual`).
        """
        x, new_cache, _ = self.residual(tokens, positions, **options)
        return self.head(x), new_cache

    def residual(
        self,
        tokens,
        positions,
        *,
        cache=None,
        segment_ids=None,
        remat="none",
        scan=False,
        hidden=False,
        page_table=None,
        stacked=None,
    ):
        """The layers over the embedding: (the settled residual before the final norm (B, S, D),
        updated cache or None, and with `hidden` the embedding and then the residual after each
        step of the plan, else []). A scan over layers carries no KV cache: refused with one.
        `stacked`: the layers' weights in the training layout (`stack_layers`), run by run in
        place of the modules' own (each run of more than one step scanned)."""
        if (scan or stacked is not None) and cache is not None:
            raise ValueError("scan over layers carries no KV cache; run a forward with a cache unrolled (scan=False)")
        cfg = self.cfg
        ctx = layer_context(cfg, rope_tables(positions, rope_frequencies(cfg)), positions, segment_ids, page_table)
        x = self.embed_tokens(tokens)
        stream, new_cache, states = Stream(x), [None] * cfg.n_layers, [x] if hidden else []
        steps = cfg.layer_steps
        if stacked is not None:
            runs = scan_runs(steps, [1 + (jax.tree.leaves(w["rest"])[0].shape[0] if w["rest"] else 0) for w in stacked])
        else:
            runs, stacked = scan_runs(steps) if scan else [[step] for step in steps], [None] * len(steps)
        for run, weights in zip(runs, stacked):
            kv = [tuple(None if cache is None else cache[i] for i in layers) for _, layers in run]
            stream, kv, run_states = self.run_steps(run, stream, ctx, kv, remat, hidden, weights)
            for (_, layers), step_kv in zip(run, kv):
                for i, c in zip(layers, step_kv):
                    new_cache[i] = c
            states += run_states
        return stream.settled(), (new_cache if cache is not None else None), states

    def run_steps(self, run: list, stream: Stream, ctx: LayerContext, kv: list, remat: str, hidden: bool, stacked=None):
        """Steps of the plan that share a schedule: one after another, or (more than one) as a scan
        over their weights stacked on a leading axis (`stacked`, as the training layout stores
        them, else stacked here). Each step's weights are gathered over fsdp inside it, and with a
        remat policy the step is recomputed in the backward pass. Returns (stream, each step's
        caches, with `hidden` the residual after each step)."""
        schedule, layers = run[0]
        gdefs = [nnx.graphdef(self.layers[i]) for i in layers]

        def step_in(ctx):
            def step(weights, stream, kv):
                blocks = [fsdp_gather(nnx.merge(g, w)) for g, w in zip(gdefs, weights)]
                stream, kv = schedule.run(blocks, kv, stream, ctx)
                return stream, kv, (stream.settled() if hidden else None)

            policy = REMAT_POLICIES[remat]
            return step if policy is None else jax.checkpoint(step, policy=policy)

        step = step_in(ctx)
        name = f"layer{layers[0]}" if len(layers) == 1 else f"layers{layers[0]}-{layers[-1]}"
        if stacked is None:
            weights = [[nnx.to_pure_dict(nnx.state(self.layers[i], nnx.Param)) for i in ls] for _, ls in run]
            take = lambda k: weights[k]  # noqa: E731
            stack_from = lambda k: jax.tree.map(lambda *w: jnp.stack(w), *weights[k:])  # noqa: E731
        else:  # stored with its first step apart, which runs alone: the scan reads the rest whole
            take = lambda k: stacked["first"] if k == 0 else jax.tree.map(lambda w: w[k - 1], stacked["rest"])  # noqa: E731
            stack_from = lambda k: stacked["rest"]  # noqa: E731
        if len(run) == 1:
            with jax.named_scope(name):
                stream, kv0, h = step(take(0), stream, kv[0])
            return stream, [kv0], [h] if hidden else []
        # A scan carries no cache (`residual` refuses one). Its carry must keep one structure: a
        # stream fresh from the embedding has nothing pending yet, every step leaves one output
        # pending (a ladder step instead leaves it unreduced, LayerContext.defer_last, and the
        # residual its late add reads, Stream.late), so a first step that changes the structure
        # runs on its own. The last step's unreduced output is reduced after the loop.
        # Without a remat the split is a plain psum and the next iteration ties its late add's copy
        # to the carried output (Stream.issue): every backward all-reduce then has GEMMs inside.
        # Under a remat that copy would be kept for every iteration (a residual per layer), so the
        # split is the custom_vjp pair below, which keeps the gradient's reduction where it was.
        plain = remat == "none"
        defer, finish = (lambda y: y, ctx.all_reduce) if plain else (defer_all_reduce, finish_all_reduce)
        step = step_in(dataclasses.replace(ctx, defer_last=None if hidden else defer))
        first, skip = [], 0
        after = jax.eval_shape(lambda st: step(take(0), st, kv[0])[0], stream)
        if stacked is not None or jax.tree.structure(after) != jax.tree.structure(stream):
            with jax.named_scope(name):
                stream, _, h = step(take(0), stream, kv[0])
            skip, first = 1, [h] if hidden else []
        # A ladder step ties the residual to device-local values (the barriers of
        # Stream.settle_after), so JAX types its output as varying over `tensor`; the carry is
        # typed so from the start and after every step, whatever the schedule.
        vary = lambda st: jax.tree.map(_tensor_varying, st)

        def body(st, w):  # the carried output's all-reduce outside a remat: its only reader
            st, _, h = step(w, st.issue(finish, tie=plain), kv[0])
            return vary(st), h

        with jax.named_scope(f"scan_layers{run[skip][1][0]}-{run[-1][1][-1]}"):
            stream, hs = jax.lax.scan(body, vary(stream), stack_from(skip))
            stream = stream.issue(finish, tie=plain)
        return stream, [kv[0]] * len(run), first + (list(hs) if hidden else [])

    def embed_tokens(self, tokens):
        """The embedding, complete on every device: each holds a vocab shard, one all-reduce sums them."""
        embed = fsdp_gather(self.embed)
        offset = jax.lax.axis_index(TENSOR) * embed.table.shape[0]
        with jax.named_scope("embed"):
            return jax.lax.psum(embed(tokens, offset), TENSOR)

    def head(self, h):
        """Final norm and this device's vocab shard of the logits (float32, padding columns at -inf).

        Separate from `__call__` so a decoder can apply it to the one position per row it samples from.
        """
        with jax.named_scope("head"):
            h = fsdp_gather(self.final_norm)(h)
            logits = fsdp_gather(self.embed).attend(h) if self.lm_head is None else fsdp_gather(self.lm_head)(h)
            vocab_ids = jax.lax.axis_index(TENSOR) * logits.shape[-1] + jnp.arange(logits.shape[-1])
            return jnp.where(vocab_ids < self.cfg.vocab_size, logits, -jnp.inf)


# An all-reduce over `tensor` split across a scan's iteration boundary (LayerContext.defer_last):
# `defer_all_reduce` ends an iteration with the partial output in the carry, `finish_all_reduce`
# reduces it in the next, beside that iteration's first module. Their gradients swap places: the
# gradient's reduction is `defer_all_reduce`'s transpose, at the start of its backward iteration
# (where the unsplit all-reduce's transpose was), not at the end of the one before, where XLA:TPU
# ran it synchronously. `checked`: the shard_map types varying axes (check_vma), where a psum's
# transpose is a cast and the reductions happen at the implicit casts (`pvary`) instead.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _start(checked, y):
    return y


def _start_fwd(checked, y):
    return y, None


def _start_bwd(checked, _, g):
    return (g if checked else jax.lax.psum(g, TENSOR),)


_start.defvjp(_start_fwd, _start_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _finish(checked, y):
    return jax.lax.psum(y, TENSOR)


def _finish_fwd(checked, y):
    return jax.lax.psum(y, TENSOR), None


def _finish_bwd(checked, _, g):
    return (jax.lax.pcast(g, (TENSOR,), to="varying") if checked else g,)


_finish.defvjp(_finish_fwd, _finish_bwd)


def _checked(y) -> bool:
    return TENSOR in jax.typeof(y).manual_axis_type.varying


def defer_all_reduce(y):
    return _start(_checked(y), y)


def finish_all_reduce(y):
    return _finish(_checked(y), y)


def _tensor_varying(x):
    return x if TENSOR in jax.typeof(x).manual_axis_type.varying else jax.lax.pcast(x, (TENSOR,), to="varying")


def run_lengths(steps: list[tuple[Schedule, tuple[int, ...]]], keys=None) -> tuple[int, ...]:
    """How many steps each scan run takes: consecutive steps of one schedule and (with `keys`, one
    per step) one key."""
    lengths, last = [], None
    for (schedule, _), key in zip(steps, keys or [None] * len(steps)):
        if lengths and (schedule, key) == last:
            lengths[-1] += 1
        else:
            lengths.append(1)
        last = (schedule, key)
    return tuple(lengths)


def scan_runs(steps: list[tuple[Schedule, tuple[int, ...]]], lengths=None) -> list[list]:
    """The plan's steps grouped into runs (one scan each): of equal schedule, or `lengths` steps each."""
    runs, start = [], 0
    for n in lengths or run_lengths(steps):
        runs.append(steps[start : start + n])
        start += n
    return runs


# The training layout of a scanned model: the weights of each scan run stored stacked, one array
# per weight (and per layer slot of a step) with the run's steps on a leading axis, in place of
# `layers`. A train step then reads them as the scan does and its optimizer updates each stacked
# weight whole: one operation per weight kind whatever the depth, where the per-layer layout
# costs a stacking copy, an unstacking and an update per layer (docs/training.md, "Compile time
# of the scanned step"). A run's first step is stored apart ("first", then the stacked "rest"):
# it may change what the scan carries (a ladder's leaves its output unreduced), so it runs
# before the scan, which then reads its stack whole (no slice of it copied in the step). The key
# `layer_stacks` sorts where `layers` did, between the norms and the head: XLA:TPU schedules the
# step by its parameters' order, and with the stacks last a ladder step's temporaries were 3-4
# GiB larger (ladder-1b on v5p-64). Any tree that holds the per-layer layout converts:
# parameters, an optimizer's moments, masks, shardings.


def _holds(key):
    return lambda x: isinstance(x, dict) and key in x


def stack_layers(tree, steps, lengths, combine=jnp.stack):
    """Every {"layers": {i: ...}, ...} in `tree` -> {"layer_stacks": [run] -> {"first": [slot] -> the
    first step's leaves, "rest": [slot] -> each leaf the `combine` of that slot's leaves over the
    other steps}, ...}."""

    def convert(d):
        if not _holds("layers")(d):
            return d
        stacked = []
        for run in scan_runs(steps, lengths):
            first, *rest = [[d["layers"][i] for i in layers] for _, layers in run]
            rest = [jax.tree.map(lambda *w: combine(w), *slot) for slot in zip(*rest)]
            stacked.append({"first": first, "rest": rest})
        return {**{k: v for k, v in d.items() if k != "layers"}, "layer_stacks": stacked}

    return jax.tree.map(convert, tree, is_leaf=_holds("layers"))


def unstack_layers(tree, steps, lengths, take=lambda w, j: w[j]):
    """The inverse of `stack_layers`: each layer's leaves are `take(stacked leaf, its step in the run)`."""

    def convert(d):
        if not _holds("layer_stacks")(d):
            return d
        layers = {}
        for run, weights in zip(scan_runs(steps, lengths), d["layer_stacks"]):
            layers.update(zip(run[0][1], weights["first"]))
            for j, (_, ls) in enumerate(run[1:]):
                for i, slot in zip(ls, weights["rest"]):
                    layers[i] = jax.tree.map(lambda w, j=j: take(w, j), slot)
        return {**{k: v for k, v in d.items() if k != "layer_stacks"}, "layers": dict(sorted(layers.items()))}

    return jax.tree.map(convert, tree, is_leaf=_holds("layer_stacks"))


def stacked_specs(cfg: ModelConfig, specs: dict, lengths) -> dict:
    """The PartitionSpecs of the training layout: each stacked weight as its layers', its step axis whole."""
    return stack_layers(specs, cfg.layer_steps, lengths, combine=lambda ps: P(None, *ps[0]))


def fsdp_gather(module: nnx.Module) -> nnx.Module:
    """`module` with whole weights. With an fsdp axis each parameter's `embed` dimension arrives
    split over it (mesh.sharding_rules); gathering here, where the module runs, keeps a layer's
    weights whole only while it computes, and autodiff turns the gather into a reduce-scatter of
    their gradients."""
    if jax.lax.axis_size(FSDP) == 1:
        return module
    gdef, state = nnx.split(module, nnx.Param)
    gather = lambda v: jax.lax.all_gather(v[...], FSDP, axis=v.axes.index("embed"), tiled=True)
    return nnx.merge(gdef, jax.tree.map(gather, state, is_leaf=lambda v: isinstance(v, nnx.Variable)))


def layer_context(cfg: ModelConfig, rope, positions, segment_ids=None, page_table=None) -> LayerContext:
    """What every schedule calls: the psum over `tensor`, and attention with this call's rope,
    positions, document segments and page table (a paged cache), which returns the layer's updated (k, v) cache with its
    output (a split lp pair's attention takes and returns the list of both its layers' caches)."""

    def attend(attn, h, kv):
        kv_head = local_kv_head(cfg, attn)
        return attn(h, rope, positions, kv_head=kv_head, cache=kv, segment_ids=segment_ids, page_table=page_table)

    first_half = jax.lax.axis_index(TENSOR) < jax.lax.axis_size(TENSOR) // 2
    return LayerContext(
        all_reduce=functools.partial(jax.lax.psum, axis_name=TENSOR),
        attend=attend,
        pick=lambda a, b: jnp.where(first_half, a, b),
        tie_late=ties_late_residual(attention.current_platform()),
    )


def local_kv_head(cfg: ModelConfig, attn: Attention):
    """With fewer KV heads than devices each device holds all of them (mesh.sharding_rules) and
    uses the one its query heads share (this index); otherwise None (each holds its own)."""
    tensor = jax.lax.axis_size(TENSOR)
    if cfg.n_kv_heads % tensor == 0:
        return None
    h_local = attn.q_proj.shape[1]  # a split lp pair's slot holds both layers' heads, layer i's first
    return (jax.lax.axis_index(TENSOR) * h_local) // (cfg.n_heads // cfg.n_kv_heads)


def to_split_layout(cfg: ModelConfig, params: dict, mesh: Mesh) -> dict:
    """Parameters of `cfg` under lp_layout=shared (how every checkpoint stores them) -> the split
    layout: for each lp pair (i, i+1), slot i's attention and MLP hold both layers' heads and FFN
    columns, layer i's first, so the tensor axis gives its first half layer i's and its second
    half layer i+1's; slot i+1 keeps its norms and no heads. One program moves them, once."""
    shared = dataclasses.replace(cfg, lp_layout="shared")
    if cfg.lp_layout != "split" or cfg.layer_widths == shared.layer_widths:
        return params
    axis = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 0, "gate_proj": 1, "up_proj": 1, "down_proj": 0}

    def move(params):
        layers = dict(params["layers"])
        for schedule, step in cfg.layer_steps:
            if not schedule.merged_weights:
                continue
            slots = [dict(layers[i]) for i in step]
            for module in ("attn", "mlp"):
                parts = [slot[module] for slot in slots]
                slots[0][module] = {k: jnp.concatenate([p[k] for p in parts], axis=axis[k]) for k in parts[0]}
                for slot in slots[1:]:
                    slot[module] = {k: jax.lax.slice_in_dim(w, 0, 0, axis=axis[k]) for k, w in slot[module].items()}
            for i, slot in zip(step, slots):
                layers[i] = slot
        return {**params, "layers": layers}

    return jax.jit(move, out_shardings=param_shardings(cfg, mesh))(params)


# ---------------------------------------------------------------------------------------------
# Parameters: abstract shapes, specs, initialisation


@functools.lru_cache(maxsize=32)
def _abstract(cfg: ModelConfig):
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=None))
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, state


def graphdef(cfg: ModelConfig):
    return _abstract(cfg)[0]


def abstract_params(cfg: ModelConfig) -> dict:
    """Shapes and dtypes of every parameter (nothing allocated), as a nested dict."""
    return nnx.to_pure_dict(_abstract(cfg)[1])


def logical_axes(cfg: ModelConfig) -> dict:
    is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
    return nnx.to_pure_dict(jax.tree.map(lambda v: v.axes, _abstract(cfg)[1], is_leaf=is_var))


def param_specs(cfg: ModelConfig, tensor: int, fsdp: int = 1) -> dict:
    """PartitionSpec of every parameter for tensor and fsdp axes of these sizes."""
    rules = sharding_rules(cfg, tensor, fsdp)
    return jax.tree.map(
        lambda axes: logical_to_spec(axes, rules), logical_axes(cfg), is_leaf=lambda a: isinstance(a, tuple)
    )


def param_shardings(cfg: ModelConfig, mesh: Mesh, lengths=None) -> dict:
    """Every parameter's NamedSharding; with `lengths`, of the training layout of those scan runs."""
    specs = mesh_param_specs(cfg, mesh)
    if lengths is not None:
        specs = stacked_specs(cfg, specs, lengths)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def mesh_param_specs(cfg: ModelConfig, mesh: Mesh) -> dict:
    return param_specs(cfg, mesh.shape[TENSOR], mesh.shape[FSDP])


def init_params(cfg: ModelConfig, mesh: Mesh, seed: int = 0) -> dict:
    """Random parameters, created directly in their shards on the mesh, leaf by leaf: leaf i of
    the parameter tree (in its sorted order) is normal(fold_in(key(seed), i)) times its std, or
    ones (norm scales), as `layers._param` and `RMSNorm` say (their `init`).

    The values depend on the seed and the parameter shapes only, not on the mesh or on which
    of the shape-compatible schedules the plan names (standard, ladder, spd, lp, desync).
    Leaves of one kind (shape, dtype, sharding, init) share one compiled program: a handful at
    any depth. One program for the whole model compiled each layer's random kernels anew, and
    XLA:GPU took 56 s for llama-3.2-1b and 116 s for ladder-1b (deviceless h100, 2 CPU cores).
    """
    key = jax.random.key(seed)
    treedef, makers = init_programs(cfg, mesh)
    return jax.tree.unflatten(treedef, [make(jax.random.fold_in(key, i)) for i, make in enumerate(makers)])


def init_programs(cfg: ModelConfig, mesh: Mesh) -> tuple:
    """(treedef, per leaf a function key -> the leaf) of `init_params`, cached; the compiled
    programs behind them are `init_compiled` (their memory_analysis(): memory.init_bytes_per_device)."""
    return _init_programs(_param_structure(cfg), mesh)


def init_compiled(cfg: ModelConfig, mesh: Mesh) -> list:
    """The distinct compiled programs `init_params` runs."""
    return list({id(f.args[0]): f.args[0] for f in init_programs(cfg, mesh)[1]}.values())


def _param_structure(cfg: ModelConfig) -> ModelConfig:
    """The config reduced to what decides parameter shapes (layers without an MLP norm, steps
    whose weights are merged in the split layout)."""
    keep = [
        plan.segment(s.name, layers[0], layers[-1] + 1)
        for s, layers in cfg.layer_steps
        if not s.mlp_norm or s.merged_weights
    ]
    return dataclasses.replace(cfg, plan=",".join([plan.DEFAULT, *keep]))


@functools.lru_cache(maxsize=16)
def _init_programs(cfg: ModelConfig, mesh: Mesh) -> tuple:
    shapes, treedef = jax.tree.flatten(abstract_params(cfg))
    is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
    inits = jax.tree.leaves(
        nnx.to_pure_dict(jax.tree.map(lambda v: v.init, _abstract(cfg)[1], is_leaf=is_var)),
        is_leaf=lambda a: isinstance(a, tuple),
    )
    programs, makers = {}, []
    for x, init, sharding in zip(shapes, inits, jax.tree.leaves(param_shardings(cfg, mesh))):
        kind = (x.shape, x.dtype, sharding, init[0])
        if kind not in programs:
            if init[0] == "ones":
                fn = lambda key, std, x=x: jnp.ones(x.shape, x.dtype)  # noqa: E731
            else:  # std as the dtype: a weakly typed float times the array, as `layers._param`
                fn = lambda key, std, x=x: jax.random.normal(key, x.shape, x.dtype) * std.astype(x.dtype)  # noqa: E731
            args = (jax.ShapeDtypeStruct((), jax.random.key(0).dtype), jax.ShapeDtypeStruct((), jnp.float32))
            lowered = jax.jit(fn, out_shardings=sharding).lower(*args)
            programs[kind] = lowered.compile()
        std = np.float32(init[1] if len(init) > 1 else 1.0)
        makers.append(functools.partial(_run_init, programs[kind], std))
    return treedef, makers


def _run_init(program, std, key):
    return program(key, std)


def count_params(cfg: ModelConfig) -> int:
    """Parameters of the model as configured (padding rows of the vocabulary excluded)."""
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))
    pad = cfg.padded_vocab - cfg.vocab_size
    return total - pad * cfg.d_model * (1 if cfg.tie_embeddings else 2)


def bytes_per_device(cfg: ModelConfig, tensor: int, fsdp: int = 1) -> int:
    """Parameter bytes one device holds on a mesh with these tensor and fsdp sizes (replicated over data)."""
    total = 0
    for x, spec in zip(jax.tree.leaves(abstract_params(cfg)), jax.tree.leaves(param_specs(cfg, tensor, fsdp))):
        split = (tensor if TENSOR in tuple(spec) else 1) * (fsdp if FSDP in tuple(spec) else 1)
        total += math.prod(x.shape) // split * np.dtype(x.dtype).itemsize
    return total


# ---------------------------------------------------------------------------------------------
# KV cache: per layer (k, v) of shape (batch, kv_slots, max_len, head_dim), batch over `data`,
# kv slots over `tensor`. kv_slots is n_kv_heads when they split over the tensor axis; with fewer
# KV heads than devices each device caches only the one head its queries use (kv_slots = tensor).
# KV heads before positions: a head's keys are one matrix, which the decode attention's batched
# GEMMs read in place (positions first, XLA:GPU copies the whole cache to that order and back
# at every step).

CACHE_SPEC = P(BATCH, TENSOR, None, None)


def cache_shape(cfg: ModelConfig, tensor: int, batch: int, max_len: int) -> tuple[int, ...]:
    slots = cfg.n_kv_heads if cfg.n_kv_heads % tensor == 0 else tensor
    return (batch, slots, max_len, cfg.hd)


def cache_bytes_per_device(cfg: ModelConfig, mesh_shape: tuple[int, int], batch: int, max_len: int) -> int:
    """KV cache bytes per device; mesh_shape: (batch shards (data x fsdp), tensor)."""
    data, tensor = mesh_shape
    b, slots, t, hd = cache_shape(cfg, tensor, batch, max_len)
    itemsize = np.dtype(jnp.dtype(cfg.dtype)).itemsize
    return 2 * cfg.n_layers * -(-b // data) * t * (slots // tensor) * hd * itemsize


def init_cache(cfg: ModelConfig, mesh: Mesh, batch: int, max_len: int) -> list:
    shape = cache_shape(cfg, mesh.shape[TENSOR], batch, max_len)
    sharding = NamedSharding(mesh, CACHE_SPEC)
    zeros = jax.jit(lambda: jnp.zeros(shape, jnp.dtype(cfg.dtype)), out_shardings=sharding)
    return [(zeros(), zeros()) for _ in range(cfg.n_layers)]


def cache_specs(cfg: ModelConfig) -> list:
    return [(CACHE_SPEC, CACHE_SPEC)] * cfg.n_layers


# The serving engine's paged KV cache: per layer (k, v) pools of (kv_slots, pages, page_size,
# head_dim), KV heads first as JAX's Pallas TPU paged-attention kernel reads them; the slots over
# `tensor` as the dense cache's, the pages over the batch axes (each data shard a pool of its own).
PAGES_SPEC = P(TENSOR, BATCH, None, None)


def page_specs(cfg: ModelConfig) -> list:
    return [(PAGES_SPEC, PAGES_SPEC)] * cfg.n_layers


# ---------------------------------------------------------------------------------------------
# Running the model on a mesh


def sharded(cfg: ModelConfig, mesh: Mesh, body: Callable, in_specs: tuple, out_specs, lengths=None):
    """shard_map `body(model, *args)` over the mesh, with the model rebuilt from local param shards.
    With `lengths` the parameters come in the training layout (`stack_layers`) and the body is
    called `body(model, *args, stacked=...)`."""
    gdef = graphdef(cfg)
    specs = mesh_param_specs(cfg, mesh)
    if lengths is not None:
        specs = stacked_specs(cfg, specs, lengths)
    platform = mesh.devices.flat[0].platform
    attention.check_platform(cfg.attention, platform)

    def local(params, *args):
        kwargs = {}
        if lengths is not None:  # the modules get per-layer slices for their structure; the layers
            kwargs = {"stacked": params["layer_stacks"]}  # run from `stacked`, and XLA drops the unused slices
            params = unstack_layers(params, cfg.layer_steps, lengths)
        with attention.compiling_for(platform):  # kernels for the mesh's platform, not the host's
            return body(nnx.merge(gdef, params), *args, **kwargs)

    check_vma = not attention.may_use_kernel(cfg.attention, platform)
    return jax.shard_map(local, mesh=mesh, in_specs=(specs, *in_specs), out_specs=out_specs, check_vma=check_vma)


def vocab_parallel_nll(logits, targets):
    """-log p(target) from this device's vocab shard of the logits (..., V/T), without gathering the
    vocab: the one log-softmax that the training loss, evaluation scores and decoding's
    log-probabilities share (float32 where the logits are)."""
    v_local = logits.shape[-1]
    m = jax.lax.pmax(jax.lax.stop_gradient(logits.max(-1)), TENSOR)
    lse = jnp.log(jax.lax.psum(jnp.exp(logits - m[..., None]).sum(-1), TENSOR)) + m
    local = targets - jax.lax.axis_index(TENSOR) * v_local
    inside = (local >= 0) & (local < v_local)
    picked = jnp.take_along_axis(logits, jnp.where(inside, local, 0)[..., None], axis=-1)[..., 0]
    return lse - jax.lax.psum(jnp.where(inside, picked, 0.0), TENSOR)


def default_positions(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32)[None], tokens.shape)


def _check_batch(tokens, mesh: Mesh):
    rows = batch_shards(mesh)
    if tokens.ndim != 2 or tokens.shape[0] % rows:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not split over mesh data x fsdp={rows}; "
            f"give (batch, seq) with batch a multiple of {rows}"
        )


@functools.lru_cache(maxsize=32)
def forward_fn(cfg: ModelConfig, mesh: Mesh):
    """jit(params, tokens, positions) -> logits (B, S, padded vocab), vocab sharded over tensor."""

    def body(model, tokens, positions):
        return model(tokens, positions)[0]

    batch = P(BATCH, None)
    return jax.jit(sharded(cfg, mesh, body, (batch, batch), P(BATCH, None, TENSOR)))


@functools.lru_cache(maxsize=16)
def hidden_states_fn(cfg: ModelConfig, mesh: Mesh):
    """jit(params, tokens, positions, segment_ids) -> (1 + steps, B, S, D): the embedding, then the
    residual after each step of the plan (a layer, or an LP pair)."""

    def body(model, tokens, positions, segment_ids):
        _, _, hidden = model.residual(tokens, positions, segment_ids=segment_ids, hidden=True)
        return jnp.stack(hidden)[None]

    batch = P(BATCH, None)
    # A residual is equal on every tensor device, but after a ladder layer JAX cannot prove it (the
    # barriers that order its late adds tie it to device-local values, schedules.Stream.settle_after):
    # each device returns its copy along a leading tensor axis and the first is kept.
    fn = sharded(cfg, mesh, body, (batch, batch, batch), P(TENSOR, None, BATCH))
    return jax.jit(lambda *args: fn(*args)[0])


def block_inputs_fn(cfg: ModelConfig, mesh: Mesh, layers: tuple[int, ...]):
    """(params, tokens, positions, segment_ids) -> (len(layers), B, S, D): the residual entering
    each of these layers (the plan must have one step per layer, i.e. no LP pairs)."""
    states, idx = hidden_states_fn(cfg, mesh), np.asarray(layers)
    return lambda *args: states(*args)[idx]


@functools.lru_cache(maxsize=16)
def block_fn(cfg: ModelConfig, mesh: Mesh, schedule: str):
    """jit(layer_params, x, positions, segment_ids) -> the residual after one layer run under
    `schedule` (x: (B, S, D) residual entering it, batch over data x fsdp). For block-level distillation."""
    gdef, _ = nnx.split(nnx.eval_shape(lambda: Block(cfg, schedule, rngs=None)), nnx.Param)
    specs = mesh_param_specs(cfg, mesh)["layers"][0]
    rope_freq = rope_frequencies(cfg)

    def local(p, x, positions, segment_ids):
        block = fsdp_gather(nnx.merge(gdef, p))
        ctx = layer_context(cfg, rope_tables(positions, rope_freq), positions, segment_ids)
        return lookup(schedule).run([block], (None,), Stream(x), ctx)[0].settled()[None]

    batch = P(BATCH, None)
    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(specs, P(BATCH), batch, batch), out_specs=P(TENSOR, BATCH)
    )  # copies, see hidden_states_fn
    return jax.jit(lambda *args: fn(*args)[0])


def logits(cfg: ModelConfig, mesh: Mesh, params, tokens, positions=None):
    """Full logits (B, S, vocab) of a causal forward, gathered (for tests and analysis)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    _check_batch(tokens, mesh)
    positions = default_positions(tokens) if positions is None else jnp.asarray(positions, jnp.int32)
    return forward_fn(cfg, mesh)(params, tokens, positions)[..., : cfg.vocab_size]


def describe(cfg: Config) -> str:
    """One line: parameter count, plan, shape, parameter bytes per device, and how it trains
    (scanned or unrolled layers, train.scan_layers)."""
    m, t, f = cfg.model, cfg.mesh.tensor, cfg.mesh.fsdp
    n = count_params(m)
    size = bytes_per_device(m, t, f)
    size = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    plan = ", ".join(f"{m.layer_schedules.count(name)} {name}" for name in dict.fromkeys(m.layer_schedules))
    where = f"tensor={t}" + (f" x fsdp={f}" if f > 1 else "")
    return (
        f"{m.name}: {n / 1e9:.3f}B parameters ({n:,}), {m.n_layers} layers [{plan}], "
        f"d_model {m.d_model}, heads {m.n_heads}/{m.n_kv_heads} kv, ffn {m.ffn_dim}, vocab {m.vocab_size}; "
        f"parameters per device at {where}: {size} ({m.param_dtype}); "
        f"trains {'scanned' if cfg.train.scan_layers else 'unrolled'} (train.scan_layers={str(cfg.train.scan_layers).lower()})"
    )
