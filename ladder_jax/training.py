"""Training: vocab-parallel loss, optax, one jitted step on the mesh, evaluation, the loop.

The step takes the whole state (params, optimizer state) with explicit shardings — parameters
and their optimizer state split over `tensor` and `fsdp` by the logical rules, replicated over
`data`; batches split over data x fsdp — and donates it. Gradients flow through the model's
shard_map: the transpose of each layer's fsdp all-gather reduce-scatters its gradient, and the
shard_map's own transpose sums the gradients of what is replicated over `data`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from . import accelerators, monitoring
from . import checkpoint as ckpt
from . import model as M
from .config import Config, ConfigError, ModelConfig, profile_steps
from .data import build_datasets, train_iterator, val_batches
from .errors import LadderError
from .memory import check_step_fits, check_training_fits
from .mesh import BATCH, batch_shards, make_mesh
from .storage import LocalMirror, Path, path
from .tokenizer import copy_tokenizer_files, get_tokenizer

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "mask")


class TrainingError(LadderError):
    """Training had to stop; the message says at which step and what was kept."""


# ---------------------------------------------------------------------------------------------
# Loss


@functools.lru_cache(maxsize=16)
def loss_sums_fn(cfg: ModelConfig, mesh: Mesh, remat: str = "none", scan: bool = False, lengths=None):
    """(params, batch) -> (sum of masked token NLL, number of masked tokens), over the whole mesh.
    `remat` and `scan`: how the layers compile (Transformer.__call__), not what they compute.
    With `lengths` the params come in the training layout of those scan runs (model.stack_layers)."""

    def body(model, batch, stacked=None):
        inputs, positions, segments = batch["inputs"], batch["positions"], batch["segment_ids"]
        logits, _ = model(inputs, positions, segment_ids=segments, remat=remat, scan=scan, stacked=stacked)
        nll = M.vocab_parallel_nll(logits, batch["targets"]) * batch["mask"]
        return jax.lax.psum(nll.sum(), BATCH), jax.lax.psum(batch["mask"].sum(), BATCH)

    spec = {k: P(BATCH, None) for k in BATCH_KEYS}
    return M.sharded(cfg, mesh, body, (spec,), (P(), P()), lengths)


def global_batch(mesh: Mesh, host_batch: dict, accum: int | None = None) -> dict:
    """Host-local numpy rows -> global arrays on the mesh, rows over data x fsdp: (B, S), or
    (accum, B/accum, S) micro-batches for the train step."""
    out = {}
    for k in BATCH_KEYS:
        x = np.asarray(host_batch[k])
        if accum is None:
            out[k] = jax.make_array_from_process_local_data(
                NamedSharding(mesh, P(BATCH, None)), x, (x.shape[0] * jax.process_count(), *x.shape[1:])
            )
        else:
            x = x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
            out[k] = jax.make_array_from_process_local_data(
                NamedSharding(mesh, P(None, BATCH, None)), x, (accum, x.shape[1] * jax.process_count(), *x.shape[2:])
            )
    return out


@functools.lru_cache(maxsize=16)
def eval_fn(cfg: ModelConfig, mesh: Mesh, lengths=None):
    shardings = M.param_shardings(cfg, mesh, lengths)
    return jax.jit(
        loss_sums_fn(cfg, mesh, lengths=lengths),
        in_shardings=(shardings, {k: NamedSharding(mesh, P(BATCH, None)) for k in BATCH_KEYS}),
    )


def evaluate(cfg: ModelConfig, mesh: Mesh, params, host_batches, lengths=None) -> dict:
    """Validation loss and perplexity of `params` run under `cfg`'s plan, over host batches (each
    process its own rows). The one evaluator: training, SPD and LP all measure with it. `lengths`:
    the params are in the training layout of those scan runs (a scanned Trainer's)."""
    nll = count = 0.0
    for b in host_batches:
        s, c = eval_fn(cfg, mesh, lengths)(params, global_batch(mesh, b))
        nll, count = nll + float(s), count + float(c)
    if count == 0:
        return {}
    return {"val_loss": nll / count, "val_ppl": math.exp(min(nll / count, 50.0))}


# ---------------------------------------------------------------------------------------------
# Optimizer


def param_names(params) -> dict:
    """The same tree with each leaf replaced by its path, e.g. 'layers/3/attn/q_proj'."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "/".join(str(getattr(k, "key", k)) for k in path), params)


def trainable_mask(cfg: Config, params) -> dict:
    """True for parameters that train under `train.trainable` (see TrainConfig)."""
    spec = cfg.train.trainable.strip()
    names = param_names(params)
    if spec == "all":
        return jax.tree.map(lambda _: True, names)
    if spec == "lp_pairs":
        layers = {i for s, step in cfg.model.layer_steps if s.side_by_side for i in step}
        if not layers:
            raise ConfigError(
                "train.trainable=lp_pairs but model.plan pairs no layers; add an lp range such as model.plan=lp@4:8"
            )
    elif spec.startswith("layers:"):
        layers = set()
        for part in spec[len("layers:") :].split(","):
            a, _, b = part.strip().partition("-")
            if not a.isdigit() or (b and not b.isdigit()):
                raise ConfigError(f"train.trainable='{spec}': write layers:3,5-7")
            layers.update(range(int(a), int(b or a) + 1))
    else:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ConfigError(
                f"train.trainable='{spec}' is not a valid regex ({e}); use all, lp_pairs, layers:3,5-7 or a regex"
            ) from None
        mask = jax.tree.map(lambda n: bool(pattern.fullmatch(n)), names)
        if not any(jax.tree.leaves(mask)):
            raise ConfigError(f"train.trainable='{spec}' matches no parameter; names look like layers/3/attn/q_proj")
        return mask
    bad = sorted(i for i in layers if i >= cfg.model.n_layers)
    if bad:
        raise ConfigError(f"train.trainable='{spec}' names layer {bad[0]} of a {cfg.model.n_layers}-layer model")
    return jax.tree.map(lambda n: n.startswith("layers/") and int(n.split("/")[1]) in layers, names)


def lr_schedule(cfg: Config) -> optax.Schedule:
    """A linear warmup over train.warmup_steps, then train.lr_schedule: cosine or linear decay to
    lr * min_lr_ratio at train.steps, constant, or wsd (warmup-stable-decay, as MiniCPM and
    MaxText: lr until the last train.decay_fraction of the steps, then linear to lr * min_lr_ratio).
    A wsd run resumed with more train.steps stays in its stable phase longer."""
    tr = cfg.train
    warmup = min(tr.warmup_steps, tr.steps)
    end, low = max(tr.steps, warmup + 1), tr.lr * tr.min_lr_ratio
    if tr.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, tr.lr, warmup, end, low)
    ramp = optax.linear_schedule(0.0, tr.lr, warmup)
    if tr.lr_schedule == "constant":
        return optax.join_schedules([ramp, optax.constant_schedule(tr.lr)], [warmup])
    if tr.lr_schedule == "linear":
        return optax.join_schedules([ramp, optax.linear_schedule(tr.lr, low, end - warmup)], [warmup])
    decay = max(warmup, end - round(tr.decay_fraction * tr.steps))  # wsd: where the decay starts
    stable, down = optax.constant_schedule(tr.lr), optax.linear_schedule(tr.lr, low, end - decay)
    return optax.join_schedules([ramp, stable, down], [warmup, decay])


def make_optimizer(cfg: Config, params, lengths=None) -> optax.GradientTransformation:
    """AdamW with clipping and the schedule, on the parameters `train.trainable` selects. `params`:
    the per-layer layout; with `lengths` the optimizer runs on the training layout of those scan
    runs (their layers decay and train alike: `training_lengths` splits runs where they do not)."""
    tr = cfg.train
    schedule = lr_schedule(cfg)
    decay = jax.tree.map(lambda p: p.ndim >= 2, params)  # matrices only: no decay on norms and biases
    mask = trainable_mask(cfg, params)
    if lengths is not None:
        decay, mask = (M.stack_layers(t, cfg.model.layer_steps, lengths, combine=_same) for t in (decay, mask))
    train = optax.chain(
        optax.clip_by_global_norm(tr.grad_clip),
        optax.adamw(schedule, b1=tr.b1, b2=tr.b2, weight_decay=tr.weight_decay, mask=decay),
    )
    if all(jax.tree.leaves(mask)):
        return train
    labels = jax.tree.map(lambda m: "train" if m else "frozen", mask)
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def _same(flags):
    assert len(set(flags)) == 1, flags  # a run's layers decay and train alike (training_lengths)
    return flags[0]


def training_lengths(cfg: Config) -> tuple[int, ...] | None:
    """The scan runs a scanned trainer stores stacked (model.stack_layers): runs of one schedule,
    split where `train.trainable` changes; None when the layers train unrolled."""
    if not cfg.train.scan_layers:
        return None
    mask = trainable_mask(cfg, M.abstract_params(cfg.model))
    keys = [tuple(tuple(jax.tree.leaves(mask["layers"][i])) for i in layers) for _, layers in cfg.model.layer_steps]
    return M.run_lengths(cfg.model.layer_steps, keys)


# ---------------------------------------------------------------------------------------------
# The trainer


def check_trainable_layout(cfg: Config) -> None:
    if any(not s.trainable for s, _ in cfg.model.layer_steps):
        raise ConfigError(
            "model.lp_layout=split is a layout for running a model, and checkpoints store the shared one; "
            "train with model.lp_layout=shared (the same function) and run the result with split"
        )


def check_micro_batch(cfg: Config, mesh: Mesh) -> None:
    rows = batch_shards(mesh)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % rows:
        raise ConfigError(
            f"a micro-batch of {micro} sequences (train.batch_size / train.grad_accum) does not split over "
            f"mesh data x fsdp={rows}; make it a multiple of {rows}"
        )


def optimizer_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, replicated):
    """The optimizer state's shardings: each parameter's state as the parameter, the rest
    (step counts) replicated; frozen parameters have no state."""
    frozen = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return optax.tree_map_params(
        tx,
        lambda x, s: x if frozen(x) else s,
        jax.eval_shape(tx.init, abstract_params),
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=frozen,
    )


def train_step(cfg: Config, tx: optax.GradientTransformation, loss_sums):
    """(state, batch of micro-batches) -> (new state, metrics): one optimizer step."""

    def step(state, batch):
        # The loss is normalised by the step's token count, known from the mask before any
        # micro-batch runs, so the gradients come out as the mean: no pass to divide them.
        count = batch["mask"].sum()

        def mean_loss(params, mb):
            s, _ = loss_sums(params, mb)
            return s / count

        if cfg.train.grad_accum == 1:  # no loop and no zero-filled gradient buffer to add into
            loss, grads = jax.value_and_grad(mean_loss)(state["params"], jax.tree.map(lambda x: x[0], batch))
        else:

            def micro_step(carry, mb):
                grads, loss = carry
                part, g = jax.value_and_grad(mean_loss)(state["params"], mb)
                return (jax.tree.map(jnp.add, grads, g), loss + part), None

            zero = jax.tree.map(jnp.zeros_like, state["params"])
            (grads, loss), _ = jax.lax.scan(micro_step, (zero, 0.0), batch)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # The same expression as optax.clip_by_global_norm's, so XLA computes the norm once.
        # Finite gradients keep AdamW's update finite: checking them spares a pass over params.
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "grads_finite": jnp.isfinite(grad_norm)}
        return {"params": params, "opt_state": opt_state}, metrics

    return step


@dataclass
class Trainer:
    """The compiled train step and the state it takes. Scanned (train.scan_layers), the state is
    held in the training layout (model.stack_layers: each scan run's weights and their optimizer
    state stacked); `init_state`, `from_checkpoint`, `to_checkpoint` and `params` convert at the
    boundary, so checkpoints and every other caller keep the per-layer layout."""

    cfg: Config
    mesh: Mesh

    def __post_init__(self):
        cfg, mesh = self.cfg, self.mesh
        check_trainable_layout(cfg)
        check_micro_batch(cfg, mesh)
        self.lengths = lengths = training_lengths(cfg)
        abstract = jax.eval_shape(self._stacked, M.abstract_params(cfg.model))
        self.tx = make_optimizer(cfg, M.abstract_params(cfg.model), lengths)
        self.param_shardings = M.param_shardings(cfg.model, mesh, lengths)
        replicated = NamedSharding(mesh, P())
        opt_shardings = optimizer_shardings(self.tx, abstract, self.param_shardings, replicated)
        self.state_shardings = {"params": self.param_shardings, "opt_state": opt_shardings}
        self.batch_sharding = {k: NamedSharding(mesh, P(None, BATCH, None)) for k in BATCH_KEYS}
        self.abstract = ckpt.abstract_with_sharding(
            {"params": abstract, "opt_state": jax.eval_shape(self.tx.init, abstract)}, self.state_shardings
        )
        loss_sums = loss_sums_fn(cfg.model, mesh, cfg.train.remat, cfg.train.scan_layers, lengths)
        self._step = jax.jit(
            train_step(cfg, self.tx, loss_sums),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        self._init_opt = jax.jit(self.tx.init, in_shardings=(self.param_shardings,), out_shardings=opt_shardings)
        # The per-layer layout's shardings: each stacked weight's, its step axis dropped.
        drop_step_axis = lambda s, j: NamedSharding(mesh, P(*s.spec[1:]))  # noqa: E731
        self.checkpoint_shardings = self._per_layer(self.state_shardings, take=drop_step_axis)
        self._to_checkpoint = jax.jit(self._per_layer, out_shardings=self.checkpoint_shardings)
        self._params = jax.jit(self._per_layer, out_shardings=self.checkpoint_shardings["params"])
        self._from_checkpoint = jax.jit(self._stacked, out_shardings=self.state_shardings)
        self._stack_params = jax.jit(self._stacked, out_shardings=self.param_shardings)

    def _stacked(self, tree):
        return tree if self.lengths is None else M.stack_layers(tree, self.cfg.model.layer_steps, self.lengths)

    def _per_layer(self, tree, **take):
        return (
            tree if self.lengths is None else M.unstack_layers(tree, self.cfg.model.layer_steps, self.lengths, **take)
        )

    def init_state(self, params) -> dict:
        """The state of a new run from per-layer parameters (init_params, a checkpoint's)."""
        params = params if self.lengths is None else self._stack_params(params)
        return {"params": params, "opt_state": self._init_opt(params)}

    def abstract_state(self) -> dict:
        """Shapes, dtypes and shardings of the state the step takes (the training layout)."""
        return self.abstract

    def abstract_batch(self) -> dict:
        """Shapes, dtypes and shardings of the batch the step takes: (grad_accum, rows per
        micro-batch, seq_len), as `global_batch` makes it from the data's rows."""
        tr = self.cfg.train
        shape = (tr.grad_accum, tr.batch_size // tr.grad_accum, tr.seq_len)
        return {
            k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "mask" else jnp.int32, sharding=self.batch_sharding[k])
            for k in BATCH_KEYS
        }

    def compile(self):
        """The step compiled from abstract state and batch: what the first step would compile, and
        then reuses (JAX's cache); its memory_analysis() is what a step needs per device."""
        return self._step.lower(self.abstract, self.abstract_batch()).compile()

    def abstract_checkpoint(self) -> dict:
        """The same state as checkpoints store it (per layer): the target to restore into."""
        return ckpt.abstract_with_sharding(jax.eval_shape(self._per_layer, self.abstract), self.checkpoint_shardings)

    def to_checkpoint(self, state) -> dict:
        """The state in the per-layer layout (a copy when scanned: what a save writes)."""
        return state if self.lengths is None else self._to_checkpoint(state)

    def from_checkpoint(self, state) -> dict:
        return state if self.lengths is None else self._from_checkpoint(state)

    def params(self, state) -> dict:
        """The state's parameters in the per-layer layout, as every other caller takes them."""
        return state["params"] if self.lengths is None else self._params(state["params"])

    def step(self, state, host_batch):
        return self._step(state, global_batch(self.mesh, host_batch, self.cfg.train.grad_accum))

    def evaluate(self, params, host_batches) -> dict:
        """`evaluate` of the state's parameters, in the layout the state holds them."""
        return evaluate(self.cfg.model, self.mesh, params, host_batches, self.lengths)


@functools.lru_cache(maxsize=4)
def get_trainer(cfg: Config, mesh: Mesh) -> Trainer:
    """One Trainer (and so one compiled step) per config and mesh in a process."""
    return Trainer(cfg, mesh)


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: 6 x (non-embedding parameters) + causal attention (PaLM, appendix B)."""
    m = cfg.model
    n = M.count_params(m) - m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
    n += m.vocab_size * m.d_model  # the LM head is a matmul
    return 6 * n + 6 * m.n_layers * m.n_heads * m.hd * cfg.train.seq_len


def peak_flops(cfg: Config) -> float | None:
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops * 1e12
    device = accelerators.for_device_kind(jax.devices()[0].device_kind)
    return device.matmul_flops if device else None


# ---------------------------------------------------------------------------------------------
# A run: the setup, then the loop


def train(
    cfg: Config,
    run_dir: str | Path | None = None,
    init_from: str | Path | None = None,
    progress: bool = True,
    log=print,
    stop_at: int | None = None,
) -> dict:
    """Train (or resume) a run; returns {'run_dir', 'step', 'loss', 'val_loss', 'params', 'mesh'}.

    The setup goes down once, each phase refusing what it can before the next: the config, plan
    and mesh; the run directory (its lock, shapes, the step to resume); the data; memory; the
    state, built or restored. Everything that can be refused is refused before the first compile
    and before anything is written. The run directory's lock (checkpoint.run_lock) is held
    throughout: one trainer per directory.

    `stop_at` ends this call after that step (as an interruption would), leaving the schedule
    of `train.steps` intact for a later resume.
    """
    mesh, trainer = resolve(cfg)
    run_dir = run_directory(cfg, run_dir)
    with ckpt.run_lock(run_dir, cfg.train.lock_timeout):
        mngr = None
        try:
            with stop_at_once(run_dir):  # the setup has nothing to save: a signal stops it where it is
                resume = open_run_directory(cfg, run_dir, init_from)
                data = open_data(cfg, init_from if init_from is not None else run_dir)
                # Random parameters count XLA's temporaries too.
                fresh = init_from is None and resume is None
                check_training_fits(
                    cfg.model, mesh, trainer.abstract_state(), fresh, copied_to_save=trainer.lengths is not None
                )
                check_step_fits(trainer)  # compiles the step: the activations counted, before any state is made
                record_run(cfg, run_dir, init_from)
                mngr = ckpt.manager(run_dir, keep=cfg.train.keep)
                if resume is None:
                    state = trainer.init_state(initial_params(cfg, mesh, init_from))
                else:
                    state = restore_state(trainer, mngr, run_dir, resume, data.train)
                    log(f"resumed {run_dir} at step {resume}")
            summary = Loop(cfg, trainer, mngr, data, run_dir, resume or 0, progress).run(state, stop_at)
        finally:
            if mngr is not None:
                mngr.wait_until_finished()
                mngr.close()
    return {**summary, "mesh": mesh}


# ---------------------------------------------------------------------------------------------
# The setup, phase by phase


def run_directory(cfg: Config, run_dir: str | Path | None = None) -> Path:
    if run_dir is not None:
        return path(run_dir)
    name = cfg.train.run_name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return path(cfg.train.out_dir) / name


def resolve(cfg: Config) -> tuple[Mesh, Trainer]:
    """The mesh and the trainer (the step, not yet compiled) of a config whose plan and batch can
    train; refused here otherwise, before any file is read."""
    check_trainable_layout(cfg)
    monitoring.check_wandb(cfg)
    mesh = make_mesh(cfg)
    return mesh, get_trainer(cfg, mesh)


def open_run_directory(cfg: Config, run_dir: Path, init_from) -> int | None:
    """Check the run directory (under its lock) and the run to start from: a run to resume with
    its model and batches, or a new or empty directory; same parameter shapes; room for a
    checkpoint. Returns the step to resume from, None for a new run."""
    if init_from is not None:
        ckpt.check_same_shapes(cfg, ckpt.load_run_config(init_from), str(init_from))
        if ckpt.latest_step(init_from) is None:
            raise ckpt.CheckpointError(f"--init-from {init_from} has no complete checkpoint; train or convert it first")
    # One listing: on a multi-host start process 0 may write config.yaml as another process looks,
    # and before it only files of its own setup (`ckpt.SETUP_FILES`).
    names = {p.name for p in run_dir.iterdir()} if run_dir.exists() else set()
    if "config.yaml" in names:
        saved = ckpt.load_run_config(run_dir)
        ckpt.check_same_shapes(cfg, saved, f"run directory {run_dir}")
        check_resumes(cfg, saved, run_dir)
        step = ckpt.latest_step(run_dir)
        if init_from is not None and step is not None:
            raise ckpt.CheckpointError(
                f"--init-from starts a new run, but {run_dir} has checkpoints to resume (step {step}); "
                "drop --init-from to resume it, or give a new --run-dir"
            )
    else:
        others = sorted(n for n in names if not n.startswith(ckpt.SETUP_FILES))
        if others:
            raise ckpt.CheckpointError(
                f"{run_dir} holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''} but no config.yaml, "
                "so it is not a run to resume; give a new or empty --run-dir (nothing in it was touched)"
            )
    ckpt.check_writable(run_dir, need_bytes=3 * M.bytes_per_device(cfg.model, 1) // max(1, jax.process_count()))
    return ckpt.latest_step(run_dir)


# What a resumed run keeps from its config.yaml: the model (how it runs may change: the attention
# kernel, the compute dtype, the lp layout, the mesh) and the batches it is fed, in their order.
RUN_KEEPS_MODEL_BUT = ("name", "attention", "dtype", "lp_layout", "init_std", "max_seq_len")
RUN_KEEPS_TRAIN = ("seed", "batch_size", "seq_len", "data", "text_field", "val_fraction", "trainable")


def check_resumes(cfg: Config, saved: Config, run_dir: Path) -> None:
    """Refuse to resume a run with a config that changes its model or its batches."""
    keys = [f"model.{f.name}" for f in dataclasses.fields(cfg.model) if f.name not in RUN_KEEPS_MODEL_BUT]
    keys += [f"train.{k}" for k in RUN_KEEPS_TRAIN]
    for key in keys:
        section, name = key.split(".")
        was, now = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if was != now:
            what = "model" if section == "model" else "batches"
            raise ckpt.CheckpointError(
                f"{run_dir} was trained with {key}={was}; resuming it with {key}={now} would change the {what} it "
                f"continues; drop that setting (a resumed run keeps its config.yaml), or start a new run from it "
                f"with --init-from {run_dir}"
            )


@dataclass
class TrainData:
    train: Iterator[dict]  # this process's share of each batch, endless; its position is checkpointed
    val: list[dict]  # this process's rows of the validation batches


def open_data(cfg: Config, tokenizer_dir: Path) -> TrainData:
    """The corpus, tokenized by the tokenizer of `tokenizer_dir` (the run, or the run it starts from)."""
    tr = cfg.train
    pid, pcount = jax.process_index(), jax.process_count()
    datasets = build_datasets(tr, get_tokenizer(cfg, tokenizer_dir), (pid, pcount))
    return TrainData(
        train_iterator(datasets.train, tr.batch_size, tr.seed, pid, pcount),
        val_batches(datasets.val, tr.batch_size, tr.eval_batches, pid, pcount),
    )


def record_run(cfg: Config, run_dir: Path, init_from) -> None:
    """The run directory's config.yaml, and the tokenizer of the run it starts from."""
    if jax.process_index() == 0:
        ckpt.save_config(run_dir, cfg)
        if init_from is not None and not (run_dir / "tokenizer.json").exists():
            copy_tokenizer_files(init_from, run_dir)


def restore_state(trainer: Trainer, mngr: ocp.CheckpointManager, run_dir: Path, step: int, it) -> dict:
    """Parameters and optimizer state of checkpoint `step`; `it` resumes where that step left it."""
    import grain  # here, not at the top: the train step (benchmarks, a bare GPU machine) needs no grain

    target = trainer.abstract_checkpoint()
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(target["params"]),
        opt_state=ocp.args.StandardRestore(target["opt_state"]),
        data=grain.checkpoint.CheckpointRestore(it),
    )
    restored = ckpt.restore(mngr, run_dir, step, args)
    return trainer.from_checkpoint({"params": restored["params"], "opt_state": restored["opt_state"]})


def initial_params(cfg: Config, mesh: Mesh, init_from) -> dict:
    """A new run's parameters: another run's, or random."""
    if init_from is not None:
        return ckpt.restore_params(init_from, cfg, mesh)
    return M.init_params(cfg.model, mesh, cfg.train.seed)


# ---------------------------------------------------------------------------------------------
# The loop


class Preempted(Exception):
    """SIGTERM or SIGINT stopped training: the step in flight finished and was saved (`step`), or
    the setup stopped before the first step, with nothing to save (`step` None)."""

    def __init__(self, signal_name: str, step: int | None, run_dir: Path):
        self.signal_name, self.step, self.run_dir = signal_name, step, run_dir
        # The same command without --run-dir would start a new run: name the directory.
        again = f"resume with --run-dir {run_dir}"
        if step is None:
            super().__init__(f"{signal_name} before the first step: nothing to save; {again}")
        else:
            super().__init__(f"{signal_name} at step {step}: saved checkpoint {step} in {run_dir}; {again}")


@contextlib.contextmanager
def stop_at_once(run_dir: Path):
    """While the setup runs (reading, compiling, restoring: minutes on a large model), SIGTERM and
    SIGINT raise Preempted where the setup is, so a scheduler still sees the preempted status.
    Nothing is half-written by it: the setup writes only config.yaml, atomically."""

    def stop(signum, frame):
        raise Preempted(signal.Signals(signum).name, None, run_dir)

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in monitoring.SIGNALS} if main else {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Loop:
    """Steps from `start` to train.steps: metrics, evaluations and checkpoints on their schedules.

    Metrics stay on the device until a log, eval or save step (or, on XLA:CPU, every step: its
    rendezvous deadlocks with many steps in flight, docs/architecture.md), so the host never
    holds the next step back. Every step's loss is still checked, so a NaN stops before a save.
    A SIGTERM or SIGINT is acted on at the next metrics read, on every process at the same step:
    that step is saved and `Preempted` raised.
    """

    def __init__(self, cfg: Config, trainer: Trainer, mngr, data: TrainData, run_dir: Path, start: int, progress):
        self.cfg, self.trainer, self.mngr, self.data, self.run_dir = cfg, trainer, mngr, data, run_dir
        self.start, self.last_good = start, start if start > 0 else None
        mirror = LocalMirror(run_dir, f"runs-p{jax.process_index()}")  # the run dir itself unless on gs://
        self.metrics = monitoring.MetricsLog(cfg, run_dir, mirror)
        self.profile = monitoring.Profile(profile_steps(cfg.train), mirror)
        self.timer, self.lr = monitoring.Timer(), lr_schedule(cfg)
        self.fpt, self.peak = flops_per_token(cfg), peak_flops(cfg)
        self.read_every = 1 if trainer.mesh.devices.flat[0].platform == "cpu" else cfg.train.log_every
        show = progress and jax.process_index() == 0
        self.bar = tqdm(total=cfg.train.steps, initial=start, disable=not show, dynamic_ncols=True)
        self.tokens_since = 0.0
        self.unread: list[tuple[int, dict]] = []
        self.summary = {"run_dir": str(run_dir), "step": start}

    def run(self, state: dict, stop_at: int | None) -> dict:
        tr = self.cfg.train
        try:
            with monitoring.StopSignals() as signals:
                for step in range(self.start + 1, tr.steps + 1):
                    with self.timer.phase("data"):
                        batch = next(self.data.train)
                    self.profile.before(step)
                    state, metrics = self.trainer.step(state, batch)
                    self.unread.append((step, metrics))
                    logging = step % tr.log_every == 0 or step == tr.steps
                    evaluating = step % tr.eval_every == 0 or step == tr.steps
                    saving = step % tr.save_every == 0 or step == tr.steps or step == stop_at
                    stopping = False
                    if len(self.unread) >= self.read_every or logging or evaluating or saving:
                        metrics = self.read_metrics()
                        stopping = monitoring.stop_agreed(signals.received is not None)
                    if logging:
                        self.log(step, metrics)
                    if evaluating:
                        with self.timer.phase("eval"):
                            self.evaluate(step, state["params"])
                    if saving or stopping:
                        with self.timer.phase("checkpoint"):
                            self.save(step, state)
                    self.profile.after(step, state)
                    self.bar.update(1)
                    if stopping:
                        self.mngr.wait_until_finished()
                        raise Preempted(signals.received or "a signal on another process", step, self.run_dir)
                    if step == stop_at:
                        break
        finally:
            self.profile.stop()
            self.bar.close()
            self.metrics.close()
        return {**self.summary, "params": self.trainer.params(state)}

    def read_metrics(self) -> dict:
        """Bring the unread steps' metrics to the host; a non-finite loss or gradient stops the run."""
        for k, m in self.unread:
            loss = float(m["loss"])
            if not (math.isfinite(loss) and bool(m["grads_finite"])):
                kept = (
                    f"the last good checkpoint is step {self.last_good} in {self.run_dir}"
                    if self.last_good
                    else "no checkpoint was written"
                )
                what = f"loss became {loss}" if not math.isfinite(loss) else "gradients became non-finite"
                raise TrainingError(
                    f"{what} at step {k}; stopped without saving ({kept}); lower train.lr or raise train.warmup_steps"
                )
            self.tokens_since += float(m["tokens"])
            self.summary.update(step=k, loss=loss)
        self.unread.clear()
        return m

    def log(self, step: int, metrics: dict) -> None:
        wall, fractions = self.timer.interval()
        tps = self.tokens_since / wall
        loss = self.summary["loss"]
        record = {
            "step": step,
            "loss": loss,
            "lr": float(self.lr(step - 1)),  # the rate the step's update used (optax counts from 0)
            "grad_norm": float(metrics["grad_norm"]),
            "tokens_per_s": tps,
            "time_fraction": fractions,  # of the interval's wall time: data, eval, checkpoint, step
        }
        if self.peak:
            record["mfu"] = tps * self.fpt / (self.peak * jax.device_count())
        self.metrics.write(record)
        mfu = f"{record['mfu']:.1%}" if self.peak else "n/a"
        waits = f"data {fractions['data']:.0%} ckpt {fractions['checkpoint']:.0%}"
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", mfu=mfu, wait=waits)
        self.tokens_since = 0.0
        self.metrics.flush()  # event files reach the run directory every log interval

    def evaluate(self, step: int, params) -> None:
        ev = self.trainer.evaluate(params, self.data.val)
        if ev:
            self.metrics.write({"step": step, **ev})
            self.metrics.flush()
            self.summary.update(ev)
            self.bar.write(f"step {step}: val_loss {ev['val_loss']:.4f}  val_ppl {ev['val_ppl']:.2f}")

    def save(self, step: int, state: dict) -> None:
        # params and opt_state apart: inference reads params only
        import grain

        items = {k: ocp.args.StandardSave(v) for k, v in self.trainer.to_checkpoint(state).items()}
        data = grain.checkpoint.CheckpointSave(self.data.train)
        self.mngr.save(step, args=ocp.args.Composite(**items, data=data), force=True)
        self.last_good = step
