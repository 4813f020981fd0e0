"""Hugging Face Llama checkpoints in and out.

    python -m ladder_jax convert from-hf HF_DIR OUT_RUN [--plan standard,ladder@-16:] [--dtype bfloat16] [--tensor 8]
    python -m ladder_jax convert to-hf RUN OUT_DIR [--dtype bfloat16] [--max-shard-mb 5000]

`from-hf` reads a local directory (config.json, model.safetensors or model-*.safetensors with
model.safetensors.index.json, optionally tokenizer.json) and writes a run directory (config.yaml,
an orbax checkpoint of the parameters at step 0, tokenizer.json) that `train.py --init-from` and
`infer.py --checkpoint` use. `to-hf` writes a standard-plan run back as a directory that
transformers' `LlamaForCausalLM.from_pretrained` loads.

Safety: only JSON and safetensors are read. A PyTorch pickle (`pytorch_model.bin`) can run code
when loaded, so it is refused, never opened; nothing from the checkpoint directory is executed.

Memory: safetensors files are memory-mapped and read one tensor at a time; each tensor is
re-laid-out on the host and put straight onto its shards (`jax.device_put` with the parameter's
NamedSharding), so loading holds the placed parameters plus one tensor, never two copies of the
model. (Orbax then stages copies of what it writes: on CPU, where device memory is host memory, a
1.5 GB checkpoint peaked at 1.6x its size during the save.) We read
and write the safetensors format ourselves (an 8-byte header length, a JSON header, raw bytes):
the `safetensors` package cannot give numpy bfloat16 arrays, and its writers want every tensor in
memory at once, where ours streams them to disk one by one.

Layouts (ours <- HF `Linear.weight`, which is (out, in)): q/k/v_proj (d, heads, hd) <- W.T reshaped;
o_proj (heads, hd, d) <- W.T reshaped; MLP matrices <- W.T; the embedding and the LM head get
zero rows/columns up to the padded vocabulary. HF stores q and k already in the half-split
("rotate_half") rotary layout our `apply_rope` uses, so no permutation is needed.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass

import jax
import ml_dtypes
import numpy as np

from .. import checkpoint
from .. import model as M
from ..checkpoint import building, check_new_directory
from ..config import Config, ModelConfig, TrainConfig, from_dict, replace
from ..errors import LadderError
from ..memory import check_params_fit
from ..mesh import make_mesh
from ..plan import lookup
from ..schedules import SCHEDULES
from ..storage import Path, is_remote, path
from ..tokenizer import copy_tokenizer_files

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
NUMPY_DTYPES = {"float32": DTYPES["F32"], "float16": DTYPES["F16"], "bfloat16": DTYPES["BF16"]}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ConvertError(LadderError):
    """A checkpoint or directory that cannot be converted; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# safetensors, read and written without the package (see the module docstring)


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    file: Path
    offset: int  # from the start of the file
    dtype: np.dtype
    shape: tuple[int, ...]

    def load(self) -> np.ndarray:
        """A read-only memory map: nothing is read until it is used (on gs://, the tensor's bytes)."""
        if is_remote(self.file):
            with self.file.open("rb") as f:
                f.seek(self.offset)
                data = f.read(math.prod(self.shape) * self.dtype.itemsize)
            return np.frombuffer(data, self.dtype).reshape(self.shape)
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file, checked against the file's size (truncated downloads)."""
    size = path.stat().length
    with path.open("rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_len <= size - 8:
            raise ConvertError(f"{path} is truncated or not a safetensors file ({size} bytes); download it again")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConvertError(f"{path} has a corrupt header (not JSON); download it again") from None
    header.pop("__metadata__", None)
    data_start, data_len = 8 + header_len, size - 8 - header_len
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ConvertError(
                f"{path}: tensor {name} is {info['dtype']}; only float32, float16 and bfloat16 checkpoints convert (not quantized ones)"
            )
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ConvertError(
                f"{path}: tensor {name} claims shape {shape} but holds {end - begin} bytes; the file is corrupt"
            )
        if end > data_len:
            raise ConvertError(
                f"{path} is truncated: tensor {name} ends at byte {data_start + end} but the file has {size} bytes; download it again"
            )
        tensors[name] = StoredTensor(path, data_start + begin, dtype, shape)
    return tensors


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...], np.dtype]], produce) -> None:
    """Write tensors `specs` (name, shape, dtype) in order, calling `produce(name)` for each one
    only when its turn comes, so one tensor at a time is in memory."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header so the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dtype in specs:
            array = np.ascontiguousarray(produce(name), dtype)
            assert array.shape == shape, (name, array.shape, shape)
            f.write(memoryview(array.reshape(-1).view(np.uint8)))


# ---------------------------------------------------------------------------------------------
# The tensor map: every HF Llama tensor, its shape, and the parameter it becomes


@dataclass(frozen=True)
class Tensor:
    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple  # our parameter path, e.g. ("layers", 3, "attn", "q_proj")
    kind: str  # "linear" (HF stores W.T), "norm" (same layout), "embed", "lm_head" (vocab padded)


def tensor_map(m: ModelConfig) -> list[Tensor]:
    d, hd, f, v = m.d_model, m.hd, m.ffn_dim, m.vocab_size
    out = [Tensor("model.embed_tokens.weight", (v, d), ("embed", "table"), "embed")]
    for i in range(m.n_layers):
        pre = f"model.layers.{i}."
        out += [
            Tensor(pre + "input_layernorm.weight", (d,), ("layers", i, "attn_norm", "scale"), "norm"),
            Tensor(pre + "self_attn.q_proj.weight", (m.n_heads * hd, d), ("layers", i, "attn", "q_proj"), "linear"),
            Tensor(pre + "self_attn.k_proj.weight", (m.n_kv_heads * hd, d), ("layers", i, "attn", "k_proj"), "linear"),
            Tensor(pre + "self_attn.v_proj.weight", (m.n_kv_heads * hd, d), ("layers", i, "attn", "v_proj"), "linear"),
            Tensor(pre + "self_attn.o_proj.weight", (d, m.n_heads * hd), ("layers", i, "attn", "o_proj"), "linear"),
            Tensor(pre + "post_attention_layernorm.weight", (d,), ("layers", i, "mlp_norm", "scale"), "norm"),
            Tensor(pre + "mlp.gate_proj.weight", (f, d), ("layers", i, "mlp", "gate_proj"), "linear"),
            Tensor(pre + "mlp.up_proj.weight", (f, d), ("layers", i, "mlp", "up_proj"), "linear"),
            Tensor(pre + "mlp.down_proj.weight", (d, f), ("layers", i, "mlp", "down_proj"), "linear"),
        ]
    out.append(Tensor("model.norm.weight", (d,), ("final_norm", "scale"), "norm"))
    if not m.tie_embeddings:
        out.append(Tensor("lm_head.weight", (v, d), ("lm_head", "kernel"), "lm_head"))
    return out


def to_ours(t: Tensor, w: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """HF layout -> our parameter of `shape`, as one fresh host array."""
    if t.kind == "norm":
        return w.astype(dtype)
    if t.kind == "linear":
        return w.T.astype(dtype, order="C").reshape(shape)
    out = np.zeros(shape, dtype)  # the vocabulary's padding rows stay zero
    if t.kind == "embed":
        out[: w.shape[0]] = w
    else:  # lm_head: (vocab, d) -> (d, padded vocab)
        out[:, : w.shape[0]] = w.T
    return out


def to_hf(t: Tensor, x: np.ndarray) -> np.ndarray:
    """Our parameter -> HF layout (the inverse of `to_ours`, padding dropped)."""
    if t.kind == "norm":
        return x
    if t.kind == "linear":
        return x.reshape(t.hf_shape[::-1]).T
    if t.kind == "embed":
        return x[: t.hf_shape[0]]
    return x[:, : t.hf_shape[0]].T


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


# ---------------------------------------------------------------------------------------------
# Reading a Hugging Face directory


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def check_writable(out: Path) -> None:
    """Refuse an output directory that cannot be created, before minutes of reading weights: make
    and remove a probe directory in its nearest existing ancestor (creating nothing else)."""
    if is_remote(out):
        return
    at = out.parent
    while not at.exists() and at.parent != at:
        at = at.parent
    if not at.is_dir():
        raise ConvertError(f"cannot write to {out}: {at} is a file, not a directory; choose another output directory")
    probe = at / f".{out.name}.probe-{secrets.token_hex(4)}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise ConvertError(
            f"cannot write to {out} (creating a directory in {at}: {e.strerror or e}); choose another output directory"
        ) from None


def hf_model_config(hf_dir: Path, plan: str, dtype: str | None) -> Config:
    """Our config for the Llama that `hf_dir/config.json` describes; refuses anything else."""
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir} is not a directory; give a local Hugging Face model directory")
    path = hf_dir / "config.json"
    if not path.exists():
        raise ConvertError(
            f"{hf_dir} has no config.json; give a Hugging Face model directory (config.json and *.safetensors)"
        )
    hf = read_json(path)
    check_llama(hf, path)

    def need(key):
        if hf.get(key) is None:
            raise ConvertError(f"{path} has no '{key}'; it is not a complete Llama config")
        return hf[key]

    # transformers 4 writes rope_theta + rope_scaling, transformers 5 one rope_parameters dict.
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    scaling = rope_scaling(rope, path)
    d, heads = need("hidden_size"), need("num_attention_heads")
    head_dim = hf.get("head_dim") or d // heads
    bos, eos, pad = end_ids(hf_dir, hf, need)
    dtype = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
    max_len = need("max_position_embeddings")
    model = {
        "name": hf_dir.resolve().name,
        "vocab_size": need("vocab_size"),
        "d_model": d,
        "n_layers": need("num_hidden_layers"),
        "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": head_dim if head_dim * heads != d else 0,
        "ffn_dim": need("intermediate_size"),
        "max_seq_len": max_len,
        "rope_theta": float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        "rope_scaling": scaling,
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "dtype": dtype,
        "param_dtype": dtype,
        "plan": plan,
        "bos_id": bos,
        "eos_id": eos,
        "pad_id": pad,
    }
    cfg = from_dict({"model": model, "train": {"seq_len": min(TrainConfig.seq_len, max_len)}})
    one_norm = sorted({s for s in cfg.model.layer_schedules if not lookup(s).mlp_norm})
    if one_norm:
        takes = ", ".join(s.example for s in SCHEDULES.values() if s.mlp_norm)
        raise ConvertError(
            f"--plan '{plan}': a {one_norm[0]} layer has one norm where Llama has two, so it cannot take Llama weights; use {takes}"
        )
    return cfg


def check_llama(hf: dict, path: Path) -> None:
    """Refuse a config.json that is not a float Llama with SwiGLU and no biases."""
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or any(a != "LlamaForCausalLM" for a in arch):
        raise ConvertError(
            f"{path}: model_type {hf.get('model_type')!r}, architectures {arch}; only Llama checkpoints (LlamaForCausalLM) convert"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConvertError(
                f"{path}: {key} is true; our Llama has no biases, so this checkpoint cannot be converted"
            )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{path}: hidden_act is {hf['hidden_act']!r}; only SwiGLU (silu) Llamas convert")
    if hf.get("quantization_config"):
        raise ConvertError(f"{path}: the checkpoint is quantized; convert a float32, float16 or bfloat16 checkpoint")


def rope_scaling(rope: dict, path: Path) -> dict | None:
    """model.rope_scaling for Llama-3 ('llama3') scaling, None for none; refuses other kinds."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ConvertError(
            f"{path}: rope scaling '{rope_type}' is not supported; only Llama-3 ('llama3') scaling or none"
        )
    return {
        "factor": float(rope["factor"]),
        "low_freq_factor": float(rope["low_freq_factor"]),
        "high_freq_factor": float(rope["high_freq_factor"]),
        "original_max_len": int(rope["original_max_position_embeddings"]),
    }


def end_ids(hf_dir: Path, hf: dict, need) -> tuple[int, int, int]:
    """(BOS, EOS, PAD) ids; EOS stands in for a missing BOS or PAD."""
    # EOS may be a list (Llama-3 Instruct: end of text, end of turn, ...); decoding stops at one id,
    # the first, taken from generation_config.json (what generation uses) when it names any.
    generation = hf_dir / "generation_config.json"
    eos = read_json(generation).get("eos_token_id") if generation.exists() else None
    eos = need("eos_token_id") if eos is None else eos
    eos = eos[0] if isinstance(eos, list) else eos
    bos, pad = hf.get("bos_token_id"), hf.get("pad_token_id")
    return (eos if bos is None else bos), eos, (eos if pad is None else pad)


def hf_tensors(hf_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint (headers only), from one file or an index of shards."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
    elif (hf_dir / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConvertError(
                f"{hf_dir} holds {pickles[0]}, a PyTorch pickle, and no safetensors; pickles can run code when loaded, so they are never read here. "
                f"Convert it to safetensors first, in an environment you trust: LlamaForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
            )
        raise ConvertError(
            f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json; give a directory saved with safetensors"
        )
    tensors = {}
    for name in files:
        if not (hf_dir / name).exists():
            raise ConvertError(f"{index} names {name}, which is missing from {hf_dir}; download it")
        tensors.update(read_safetensors_header(hf_dir / name))
    return tensors


def check_tensors(m: ModelConfig, stored: dict[str, StoredTensor]) -> list[Tensor]:
    """The tensor map, after checking every tensor is there with the shape config.json implies."""
    wanted = tensor_map(m)
    for t in wanted:
        if t.hf_name not in stored:
            raise ConvertError(
                f"the checkpoint has no tensor {t.hf_name}; the download is incomplete or it is not a {m.n_layers}-layer Llama"
            )
        found = stored[t.hf_name]
        if found.shape != t.hf_shape:
            raise ConvertError(
                f"{found.file.name}: tensor {t.hf_name} has shape {found.shape} but config.json implies {t.hf_shape}; the weights and config.json disagree"
            )
    names = {t.hf_name for t in wanted}
    # A tied model may also store lm_head.weight; old checkpoints keep rotary inv_freq buffers.
    ignorable = ("lm_head.weight", "rotary_emb.inv_freq") if m.tie_embeddings else ("rotary_emb.inv_freq",)
    extra = sorted(n for n in stored if n not in names and not n.endswith(ignorable))
    if extra:
        raise ConvertError(
            f"the checkpoint has tensor {extra[0]}, which a plain Llama does not; it is another architecture or has extra parts"
        )
    return wanted


# ---------------------------------------------------------------------------------------------
# from-hf


def from_hf(
    hf_dir: str | Path, out_run: str | Path, plan: str = "standard", dtype: str | None = None, tensor: int = 1
) -> Config:
    """Convert an HF Llama directory (local or gs://) into a run directory; returns the run's config.

    `tensor`: the run's mesh.tensor, and the devices the parameters are spread over while
    converting (a model too large for one device needs more).
    """
    hf_dir, out_run = path(hf_dir), path(out_run)
    cfg = replace(hf_model_config(hf_dir, plan, dtype), mesh={"tensor": tensor})
    stored = hf_tensors(hf_dir)
    tensors = check_tensors(cfg.model, stored)
    check_new_directory(out_run)
    check_writable(out_run)
    # Everything above only read JSON and headers; now the weights, one tensor at a time.
    mesh = make_mesh(replace(cfg, mesh={"data": 1}))  # one copy of the parameters, split over `tensor`
    check_params_fit(cfg.model, mesh, f"the parameters of {hf_dir} ({cfg.model.param_dtype})")
    shapes, shardings = M.abstract_params(cfg.model), M.param_shardings(cfg.model, mesh)
    with building(out_run) as tmp:
        params = {}
        for t in tensors:
            target = _get(shapes, t.path)
            host = to_ours(t, stored[t.hf_name].load(), target.shape, np.dtype(target.dtype))
            _set(params, t.path, jax.device_put(host, _get(shardings, t.path)))
            del host
        assert jax.tree.structure(params) == jax.tree.structure(shapes)
        checkpoint.save_config(tmp, cfg)
        checkpoint.save_params(tmp, params)
        copy_tokenizer_files(hf_dir, tmp)
    return cfg


# ---------------------------------------------------------------------------------------------
# to-hf


def hf_config_json(m: ModelConfig, dtype: str) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.hd,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": m.bos_id,
        "eos_token_id": m.eos_id,
        "pad_token_id": m.pad_id,
        "torch_dtype": dtype,
    }
    if m.rope_scaling is not None:
        s = m.rope_scaling
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_len,
        }
    return config


def check_exportable(cfg: Config, run_dir: Path) -> None:
    others = sorted({s for s in cfg.model.layer_schedules if not lookup(s).exports_to_llama})
    if others:
        raise ConvertError(
            f"{run_dir} has plan '{cfg.model.plan}' with {', '.join(others)} layers; transformers' LlamaForCausalLM "
            f"computes only standard layers and cannot represent this model, so only standard-plan runs export"
        )


def shard_groups(specs: list, max_bytes: int) -> list[list]:
    """Consecutive tensors in files of at most `max_bytes` (a larger tensor gets a file alone)."""
    groups, size = [[]], 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    return groups


def to_hf_dir(
    run_dir: str | Path, out_dir: str | Path, dtype: str | None = None, max_shard_bytes: int = 5 * 10**9
) -> Path:
    """Write a standard-plan run as a transformers-loadable directory; returns `out_dir`."""
    run_dir, out_dir = path(run_dir), path(out_dir)
    saved = checkpoint.load_run_config(run_dir)
    check_exportable(saved, run_dir)
    if checkpoint.latest_step(run_dir) is None:
        raise ConvertError(f"{run_dir} has no complete checkpoint; train or convert it first")
    dtype = dtype or saved.model.param_dtype
    if dtype not in NUMPY_DTYPES:
        raise ConvertError(f"--dtype {dtype}: choose one of {', '.join(NUMPY_DTYPES)}")
    tensors = {t.hf_name: t for t in tensor_map(saved.model)}
    specs = [(t.hf_name, t.hf_shape, NUMPY_DTYPES[dtype]) for t in tensors.values()]
    groups = shard_groups(specs, max_shard_bytes)
    check_new_directory(out_dir)  # before the restore, which can take minutes
    check_writable(out_dir)
    cfg = replace(saved, mesh={"data": 1})  # one copy of the parameters, split over the run's tensor size
    mesh = make_mesh(cfg)
    params = checkpoint.restore_params(run_dir, cfg, mesh)

    def produce(name):  # gathers one parameter to the host, only when the writer needs it
        t = tensors[name]
        return to_hf(t, np.asarray(jax.device_get(_get(params, t.path))))

    with building(out_dir) as tmp:
        if len(groups) == 1:
            write_safetensors(tmp / "model.safetensors", specs, produce)
        else:
            weight_map = {}
            for k, group in enumerate(groups, 1):
                file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
                write_safetensors(tmp / file, group, produce)
                weight_map.update({name: file for name, _, _ in group})
            total = sum(math.prod(s) * d.itemsize for _, s, d in specs)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        (tmp / "config.json").write_text(json.dumps(hf_config_json(saved.model, dtype), indent=2))
        copy_tokenizer_files(run_dir, tmp)  # a converted run keeps its generation_config.json
        if not (tmp / "generation_config.json").exists():
            ids = {
                "bos_token_id": saved.model.bos_id,
                "eos_token_id": saved.model.eos_id,
                "pad_token_id": saved.model.pad_id,
            }
            (tmp / "generation_config.json").write_text(json.dumps(ids, indent=2))
    return out_dir
