"""The spec-sheet facts of each accelerator (accelerators.yaml), read by every part that needs one:
training's MFU, the deviceless targets' memory, the latency model's hardware profiles."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

TABLE = Path(__file__).parent / "accelerators.yaml"


@dataclass(frozen=True)
class Accelerator:
    name: str
    kinds: tuple[str, ...]  # substrings of jax.Device.device_kind that name it
    matmul_flops: float  # dense bf16/fp16 FLOP/s
    hbm_bandwidth: float  # B/s
    hbm_bytes: int
    gpu_target: str = ""  # GpuTargetConfig text proto in instruments/targets (deviceless XLA:GPU compiles)


@functools.cache
def accelerators() -> dict[str, Accelerator]:
    raw = yaml.safe_load(TABLE.read_text())
    return {
        name: Accelerator(
            name,
            tuple(e["kinds"]),
            float(e["matmul_flops"]),
            float(e["hbm_bandwidth"]),
            int(e["hbm_bytes"]),
            e.get("gpu_target", ""),
        )
        for name, e in raw.items()
    }


def get(name: str) -> Accelerator:
    table = accelerators()
    if name not in table:
        raise ValueError(f"unknown accelerator '{name}'; {TABLE.name} has {', '.join(table)}")
    return table[name]


def for_device_kind(kind: str) -> Accelerator | None:
    """The accelerator a jax.Device.device_kind names (e.g. 'NVIDIA H100 80GB HBM3'), or None (CPU)."""
    return next((a for a in accelerators().values() if any(k.lower() in kind.lower() for k in a.kinds)), None)
