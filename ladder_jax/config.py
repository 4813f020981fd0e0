"""Typed configuration: dataclasses, YAML presets, dotted `key=value` overrides, validation.

Every check here runs before anything is traced or compiled, and every error names the key
and the fix in one line.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import yaml

from . import storage
from .errors import ConfigError
from .plan import lookup, parse_plan, plan_steps
from .schedules import Schedule

PRESET_DIR = Path(__file__).parent / "configs"
# What the backward pass may keep of a layer step (jax.checkpoint policies); "none": no remat.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# Self-attention implementations (ladder_jax.attention says what each is).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn", "triton")
LP_LAYOUTS = ("shared", "split")
WANDB_MODES = ("online", "offline")
VOCAB_PAD = 128  # vocab rows are padded to a multiple of this so any power-of-two tensor axis splits them


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (HF `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 259  # 256 bytes + BOS, EOS, PAD
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    ffn_dim: int = 768
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # Residual schedule per layer (ladder_jax.plan): "ladder", "standard,ladder@-16:", "lp@4:8", "track:2", ...
    plan: str = "standard"
    # Where the two layers of an lp pair run (LP_LAYOUTS): "shared" splits both over the whole tensor
    # axis; "split" (the LP paper's) puts layer i on the first half of it and layer i+1 on the second.
    lp_layout: str = "shared"
    attention: str = "auto"  # one of ATTENTION_IMPLEMENTATIONS
    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // VOCAB_PAD) * VOCAB_PAD

    @property
    def layer_schedules(self) -> tuple[str, ...]:
        return parse_plan(self.plan, self.n_layers)

    @property
    def layer_steps(self) -> list[tuple[Schedule, tuple[int, ...]]]:
        """The plan's steps as they run: each schedule in its split form under lp_layout=split."""
        steps = [(lookup(name), layers) for name, layers in plan_steps(self.layer_schedules)]
        split = self.lp_layout == "split"
        return [((s.split if split and s.split else s), layers) for s, layers in steps]

    @property
    def layer_widths(self) -> tuple[int, ...]:
        """Attention heads and FFN columns each layer slot holds, in layers: 1, except for a step
        in a split form (lp pairs under lp_layout=split), whose first slot holds every layer's of
        the step and the others none (0); those keep their own norms. model.to_split_layout says
        how they are laid out."""
        widths = [1] * self.n_layers
        for s, layers in self.layer_steps:
            if s.merged_weights:
                widths[layers[0]] = len(layers)
                for i in layers[1:]:
                    widths[i] = 0
        return tuple(widths)


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: every device fsdp x tensor leave over
    fsdp: int = 1  # parameters and optimizer state are split over it (ZeRO-3); the batch splits over data x fsdp
    tensor: int = 1


LR_SCHEDULES = ("cosine", "linear", "constant", "wsd")  # train.lr_schedule, after the warmup


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 600
    batch_size: int = 16  # sequences per optimizer step, over all data-parallel devices
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    lr: float = 3e-3
    # After a linear warmup (LR_SCHEDULES): "cosine" or "linear" decay to lr * min_lr_ratio at the
    # last step, "constant", or "wsd" (warmup-stable-decay): lr until the last decay_fraction of
    # the steps, then a straight line down to lr * min_lr_ratio.
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: the share of train.steps spent decaying, at the end
    warmup_steps: int = 50
    weight_decay: float = 0.1  # on matrices only; never on norms or biases
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    # Which parameters train: "all", "lp_pairs" (the layers paired by lp in the plan),
    # "layers:3,5-7", or a regex over parameter paths such as "layers/1[0-5]/.*".
    trainable: str = "all"
    data: str = "stdlib"  # "stdlib" (the stdlib sources), files/globs (comma-separated: text, *.jsonl[.gz], *.parquet), or a prepared DIR
    text_field: str = "text"  # the JSONL field that holds the text
    val_fraction: float = 0.05  # files (documents) held out for validation, chosen by a hash of their path
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 200
    keep: int = 3
    log_every: int = 10
    out_dir: str = "runs"
    run_name: str = ""  # default: <preset>-<date>-<time>
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: look the device up (unknown on CPU)
    # Activation rematerialisation per layer step (REMAT_POLICIES): "none" keeps every activation
    # for the backward pass, "full" recomputes the layer, "save_dots" keeps only matmul outputs.
    remat: str = "none"
    scan_layers: bool = False  # runs of identical layer steps as one jax.lax.scan (compiles the layer once)
    # Weights & Biases: a project name logs every metric there too ("": TensorBoard and metrics.jsonl only)
    wandb: str = ""
    wandb_mode: str = "online"  # or "offline": written under RUN/wandb, `wandb sync` uploads it later
    profile: str = ""  # "START:END": a jax.profiler trace of steps START..END-1 under RUN/profile
    # On gs:// run directories: seconds after its holder's last heartbeat that a run lock is taken over
    lock_timeout: float = 300.0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------------------------------------
# Loading, overrides, type checks


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(value, tp, key: str):
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} may not be null; give a {getattr(tp, '__name__', tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key} must be {tp.__name__}, got {value!r} ({type(value).__name__})")


def _build(cls, data: dict, prefix: str):
    hints = _field_types(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        known = ", ".join(hints)
        raise ConfigError(f"unknown config key '{_join(prefix, unknown[0])}'; {cls.__name__} has: {known}")
    kwargs = {k: _coerce(v, hints[k], _join(prefix, k)) for k, v in data.items()}
    return cls(**kwargs)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


def _field_type(dotted: str):
    """The annotated type at a dotted path, or None when the path is not a config field."""
    cls, tp = Config, None
    for k in dotted.split("."):
        if cls is None or k not in _field_types(cls):
            return None
        tp, _ = _unwrap_optional(_field_types(cls)[k])
        cls = tp if dataclasses.is_dataclass(tp) else None
    return tp


def _parse_value(dotted: str, text: str):
    """YAML for numbers, booleans, null and mappings; raw text for string fields (a plan like
    `ladder@-2:` is not YAML)."""
    if _field_type(dotted) is str and text.lower() not in ("null", "~"):
        return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{dotted}={text}: not a YAML value ({yaml_problem(e)}); quote it or fix it") from None
    if _field_type(dotted) is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-6 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    return value


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in a few words: what and where ("expected ',' or ']' at line 2, column 1")."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or type(e).__name__}{where}"


def resolve_preset(name_or_path: str | Path) -> Path:
    p = storage.path(name_or_path)  # a YAML file may be on gs:// too (a run's config.yaml)
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if p.suffix in (".yaml", ".yml") or (not preset.exists() and p.is_file()):  # a file, whatever its name
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist; presets: {', '.join(list_presets())}")
        return p
    if not preset.exists() and p.is_dir():
        raise ConfigError(f"--config {p} is a directory; give a preset ({', '.join(list_presets())}) or a YAML file")
    if not preset.exists():
        raise ConfigError(
            f"no preset named '{name_or_path}'; choose from {', '.join(list_presets())} or give a .yaml path"
        )
    return preset


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(preset: str | Path | None = "tiny", overrides: typing.Sequence[str] = ()) -> Config:
    """Load a preset (name or YAML path) and apply `section.key=value` overrides (YAML values)."""
    raw = {}
    if preset is not None:
        source = resolve_preset(preset)
        try:
            raw = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source} is not valid YAML ({yaml_problem(e)}); fix the file") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{preset}: the top level must be a mapping with model/mesh/train sections")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value; write e.g. model.n_layers=4")
        key, text = item.split("=", 1)
        _set_dotted(raw, key.strip(), _parse_value(key.strip(), text.strip()))
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation


def validate(cfg: Config, n_devices: int | None = None) -> None:
    """Raise ConfigError for shapes that cannot be built or split over the mesh."""
    _check_sizes(cfg)
    _check_splits(cfg)
    _check_train(cfg)
    if n_devices is not None:
        mesh_shape(cfg.mesh, n_devices)


def _check_sizes(cfg: Config) -> None:
    """Sizes that must be positive, and the few keys with a fixed set of values."""
    m, t = cfg.model, cfg.mesh.tensor
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key} must be positive, got {getattr(m, key)}")
    for key in ("rope_theta", "norm_eps", "init_std"):
        if not 0 < getattr(m, key) < math.inf:
            raise ConfigError(f"model.{key} must be positive and finite, got {getattr(m, key)}")
    if t <= 0:
        raise ConfigError(f"mesh.tensor must be positive, got {t}")
    if cfg.mesh.fsdp <= 0:
        raise ConfigError(f"mesh.fsdp must be positive, got {cfg.mesh.fsdp}")
    if m.d_model % cfg.mesh.fsdp:
        raise ConfigError(
            f"model.d_model={m.d_model} does not split over mesh.fsdp={cfg.mesh.fsdp}; choose an fsdp size that divides it"
        )
    if m.attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            f"model.attention={m.attention!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}; auto picks the platform's kernel"
        )
    if cfg.mesh.data == 0 or cfg.mesh.data < -1:
        raise ConfigError(f"mesh.data must be positive or -1 (all remaining devices), got {cfg.mesh.data}")


def _check_splits(cfg: Config) -> None:
    """Heads, FFN columns and vocabulary that must split over the tensor axis; dtypes, ids, layouts."""
    m, t = cfg.model, cfg.mesh.tensor
    if m.head_dim == 0 and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; set model.head_dim explicitly"
        )
    if m.hd % 2:
        raise ConfigError(f"head dimension {m.hd} is odd; rotary embedding needs an even model.head_dim")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.n_kv_heads}; grouped-query attention needs whole groups"
        )
    if m.n_heads % t:
        raise ConfigError(
            f"model.n_heads={m.n_heads} does not split over mesh.tensor={t}; choose a tensor size that divides it"
        )
    if m.n_kv_heads % t and t % m.n_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads={m.n_kv_heads} can be neither split nor replicated over mesh.tensor={t}; "
            f"use a tensor size that divides it or that it divides"
        )
    if m.ffn_dim % t:
        raise ConfigError(
            f"model.ffn_dim={m.ffn_dim} does not split over mesh.tensor={t}; choose a tensor size that divides it"
        )
    if m.padded_vocab % t:
        raise ConfigError(
            f"the padded vocabulary ({m.padded_vocab}) does not split over mesh.tensor={t}; use a power-of-two tensor size"
        )
    for key in ("dtype", "param_dtype"):
        if getattr(m, key) not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.{key}={getattr(m, key)!r} is not supported; use float32, bfloat16 or float16")
    if m.rope_scaling is not None and m.rope_scaling.high_freq_factor <= m.rope_scaling.low_freq_factor:
        raise ConfigError("model.rope_scaling.high_freq_factor must exceed low_freq_factor")
    for key in ("bos_id", "eos_id", "pad_id"):
        if not 0 <= getattr(m, key) < m.vocab_size:
            raise ConfigError(f"model.{key}={getattr(m, key)} is outside the vocabulary (size {m.vocab_size})")
    if m.lp_layout not in LP_LAYOUTS:
        raise ConfigError(f"model.lp_layout={m.lp_layout!r} is not a layout; choose from {', '.join(LP_LAYOUTS)}")
    for s, layers in m.layer_steps:
        if s.merged_weights and t % len(layers):
            raise ConfigError(
                f"model.lp_layout=split runs each layer of an {s.name} step on its own part of the tensor axis; "
                f"mesh.tensor={t} does not split into {len(layers)}: use a mesh.tensor that does or model.lp_layout=shared"
            )


def _check_train(cfg: Config) -> None:
    m = cfg.model
    tr = cfg.train
    for key in (
        "steps",
        "batch_size",
        "seq_len",
        "grad_accum",
        "eval_every",
        "eval_batches",
        "save_every",
        "keep",
        "log_every",
        "lock_timeout",
    ):
        if getattr(tr, key) <= 0:
            raise ConfigError(f"train.{key} must be positive, got {getattr(tr, key)}")
    if tr.seq_len > m.max_seq_len:
        raise ConfigError(
            f"train.seq_len={tr.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower train.seq_len or raise model.max_seq_len"
        )
    if tr.batch_size % tr.grad_accum:
        raise ConfigError(
            f"train.batch_size={tr.batch_size} does not divide into train.grad_accum={tr.grad_accum} micro-batches"
        )
    if not 0 <= tr.val_fraction < 1:
        raise ConfigError(f"train.val_fraction={tr.val_fraction} must be in [0, 1)")
    # The optimizer's numbers, where a value out of range trains without an error, only wrongly
    # (a negative lr climbs the loss; a clip of 0 zeroes every gradient).
    for key, low, high, closed in [
        ("lr", 0, math.inf, False),
        ("min_lr_ratio", 0, 1, True),
        ("weight_decay", 0, math.inf, False),
        ("b1", 0, 1, False),
        ("b2", 0, 1, False),
        ("peak_tflops", 0, math.inf, False),
    ]:
        value = getattr(tr, key)
        if not (low <= value <= high if closed else low <= value < high):
            interval = f"[{low}, {high}]" if closed else f"[{low}, {high})"
            raise ConfigError(f"train.{key}={value} must be in {interval}")
    if not 0 < tr.grad_clip < math.inf:
        raise ConfigError(
            f"train.grad_clip={tr.grad_clip} must be positive and finite (the global norm gradients clip to)"
        )
    if tr.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps={tr.warmup_steps} must be 0 or more")
    if tr.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(
            f"train.lr_schedule={tr.lr_schedule!r} is not a schedule; choose from {', '.join(LR_SCHEDULES)}"
        )
    if not 0 < tr.decay_fraction <= 1:
        raise ConfigError(
            f"train.decay_fraction={tr.decay_fraction} must be in (0, 1] (the share of the steps that decay)"
        )
    profile_steps(tr)
    if tr.wandb_mode not in WANDB_MODES:
        raise ConfigError(f"train.wandb_mode={tr.wandb_mode!r} is not a mode; choose from {', '.join(WANDB_MODES)}")
    if tr.remat not in REMAT_POLICIES:
        raise ConfigError(f"train.remat={tr.remat!r} is not a policy; choose from {', '.join(REMAT_POLICIES)}")


def profile_steps(tr: TrainConfig) -> range | None:
    """`train.profile=START:END`: the steps START..END-1 (Python-style), inside 1..train.steps."""
    if not tr.profile:
        return None
    start, sep, end = tr.profile.partition(":")
    if not (sep and start.isdigit() and end.isdigit()):
        raise ConfigError(
            f"train.profile={tr.profile!r} is not START:END; write e.g. train.profile=10:15 (steps 10 to 14)"
        )
    steps = range(int(start), int(end))
    if not (1 <= steps.start < steps.stop <= tr.steps + 1):
        raise ConfigError(
            f"train.profile={tr.profile} is outside the run's steps 1..{tr.steps}; give 1 <= START < END <= {tr.steps + 1}"
        )
    return steps


def mesh_shape(mesh: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for this many devices, or a ConfigError saying what to change."""
    f, t = mesh.fsdp, mesh.tensor
    if n_devices % (f * t):
        raise ConfigError(
            f"mesh fsdp={f} x tensor={t} does not divide the {n_devices} available devices; "
            f"pick sizes whose product divides {n_devices}"
        )
    d = n_devices // (f * t) if mesh.data == -1 else mesh.data
    if d * f * t > n_devices:
        raise ConfigError(
            f"mesh data={d} x fsdp={f} x tensor={t} needs {d * f * t} devices but {n_devices} are available; "
            f"lower mesh.data, mesh.fsdp or mesh.tensor"
        )
    return d, f, t


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def replace(cfg: Config, **sections) -> Config:
    """`replace(cfg, model={'plan': 'ladder'}, mesh={'tensor': 4})` -> validated copy."""
    new = cfg
    for section, changes in sections.items():
        new = dataclasses.replace(new, **{section: dataclasses.replace(getattr(new, section), **changes)})
    validate(new)
    return new
