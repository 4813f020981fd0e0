"""Which attention the deviceless TPU/GPU compiles contain: the train step and the prefill of a
small model at one sequence length, per `model.attention`, with the kernel custom-calls found
in the compiled HLO and any (sequence x sequence) buffer.

    pip install -e '.[tpu]'    # or '.[cuda]'
    python benchmarks/attention_hlo.py --target v5e-8 --attention auto,xla
    python benchmarks/attention_hlo.py --target h100-8 --attention auto,cudnn,triton,xla

A kernel shows as a custom-call: `tpu_custom_call` carrying the Pallas kernel's name (splash) on
TPU, `__gpu$xla.gpu.triton` (Pallas/Triton) or `__cudnn$fmha...` (cuDNN) on GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from ladder_jax import decode
from ladder_jax.config import load_config
from ladder_jax.instruments import deviceless
from ladder_jax.mesh import apply_xla_flags
from ladder_jax.training import BATCH_KEYS, get_trainer

KERNEL_CALL = re.compile(r'custom_call_target="([^"]+)"')
KERNEL_NAME = re.compile(r'"(?:kernel_name|name)\\?"\s*:\s*\\?"([\w.-]+)')


def kernels(text: str) -> list[str]:
    found = set()
    for line in text.splitlines():
        for target in KERNEL_CALL.findall(line):
            if target.startswith(("tpu_custom_call", "__gpu$xla.gpu.triton", "__cudnn")):
                name = KERNEL_NAME.search(line) or re.search(r"(splash\w*|mha\w*|flash\w*)", line)
                found.add(f"{target}:{name.group(1) if name else '?'}")
    return sorted(found)


def square_buffers(text: str, seq: int) -> list[str]:
    """HLO shapes with two dimensions equal to the sequence length, as (S, S) scores would have."""
    shapes = set(re.findall(r"[a-z0-9]+\[[0-9,]*\]", text))
    return sorted(s for s in shapes if s.split("[")[1].rstrip("]").split(",").count(str(seq)) >= 2)


def decode_reads(text: str) -> str:
    """The decode step's attention: its while loops and the key blocks they slice from the cache."""
    loops = len(re.findall(r"\swhile\(", text))
    slices = sorted(set(re.findall(r"= (\w+\[[0-9,]+\])\{?[^ ]* dynamic-slice\(", text)))
    return f"{loops} while loops; dynamic-slice shapes: {', '.join(slices) or 'none'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="v5e-8")
    ap.add_argument("--attention", default="auto,xla")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--tensor", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    target = deviceless.get_target(args.target)
    if target.platform == "tpu":
        apply_xla_flags()
    base = [
        "model.d_model=512",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.head_dim=128",
        "model.ffn_dim=1536",
        "model.dtype=bfloat16",
        f"model.max_seq_len={args.seq}",
        f"train.seq_len={args.seq}",
        f"mesh.tensor={args.tensor}",
        "mesh.data=-1",
    ]
    cfg0 = load_config("tiny", base + args.overrides)
    mesh = deviceless.target_mesh(cfg0, target)
    print(f"{target.name}, mesh {dict(mesh.shape)}, sequence {args.seq}, jax {jax.__version__}")
    for name in args.attention.split(","):
        cfg = dataclasses.replace(cfg0, model=dataclasses.replace(cfg0.model, attention=name))
        trainer = get_trainer(cfg, mesh)
        tr = cfg.train
        rows = tr.batch_size - tr.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]) or mesh.shape["data"]
        shape = (1, rows, tr.seq_len)
        batch = {
            k: jax.ShapeDtypeStruct(
                shape, jnp.float32 if k == "mask" else jnp.int32, sharding=trainer.batch_sharding[k]
            )
            for k in BATCH_KEYS
        }
        start = time.perf_counter()
        train_text = trainer._step.lower(trainer.abstract_state(), batch).compile().as_text()
        train_s = time.perf_counter() - start
        params, per_row, _, _ = decode.abstract_step_args(cfg.model, mesh, mesh.shape["data"], args.seq)
        tokens = jax.ShapeDtypeStruct(
            (mesh.shape["data"], args.seq), jnp.int32, sharding=NamedSharding(mesh, decode.ROWS_BY_SEQ)
        )
        start = time.perf_counter()
        prefill_text = decode.prefill_fn(cfg.model, mesh, args.seq).lower(params, tokens, per_row).compile().as_text()
        prefill_s = time.perf_counter() - start
        if name == args.attention.split(",")[0]:  # decode is the same for every model.attention
            args_ = decode.abstract_step_args(cfg.model, mesh, mesh.shape["data"], args.seq)
            step_text = decode.step_fn(cfg.model, mesh).lower(*args_).compile().as_text()
            print(f"  decode step ({args.seq}-slot cache): {decode_reads(step_text)}")
        for what, text, secs in (("train step", train_text, train_s), ("prefill", prefill_text, prefill_s)):
            print(f"  {name:7s} {what:10s} compile {secs:5.1f} s  kernels: {', '.join(kernels(text)) or 'none'}")
            print(f"  {'':7s} {'':10s} (S x S) buffers: {', '.join(square_buffers(text, args.seq)[:6]) or 'none'}")


if __name__ == "__main__":
    main()
