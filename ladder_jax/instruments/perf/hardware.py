"""Hardware profiles of the latency model: YAML data in `profiles/` (the accelerator it runs on,
interconnect figures, and a few constants fitted by `calibrate`), loaded into `Hardware`. The
accelerator's spec-sheet numbers come from `ladder_jax/accelerators.yaml` (its `device:` key; a
profile of a device not there may give hbm_bandwidth, hbm_capacity and matmul_flops itself). A
profile may name a `base` whose keys it inherits (a new GPU keeps the calibrated software
constants of the machine they were fitted on).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ... import accelerators
from ...errors import LadderError

PROFILES_DIR = Path(__file__).parent / "profiles"


class PerfModelError(LadderError):
    """Input the model cannot answer (unknown hardware, tensor size the profile lacks, ...)."""


# ---------------------------------------------------------------------------------------------
# Hardware profiles


@dataclass(frozen=True)
class Hardware:
    name: str
    # spec sheet
    hbm_bandwidth: float  # B/s per device
    hbm_capacity: float  # bytes per device
    matmul_flops: float  # dense bf16/fp16 FLOP/s per device
    devices_per_node: int
    max_devices: int  # the largest tensor axis the profile describes
    link_bandwidth: float  # B/s per device per direction, inside a node
    link_hop_latency_s: float
    inter_bandwidth: float = 0.0  # B/s per device per direction between nodes (0: single node)
    inter_hop_latency_s: float = 0.0
    # calibrated / derived
    hbm_efficiency: float = 0.8  # achieved fraction of hbm_bandwidth
    matmul_efficiency: float = 0.7  # achieved fraction of matmul_flops
    link_efficiency: float = 0.8  # achieved fraction of link_bandwidth
    kernel_overhead_s: float = 3e-6  # fixed cost per kernel (launch gap, ramp, tail)
    allreduce_latency_s: float = 10e-6  # fixed cost per all-reduce call
    overlap_contention: float = 0.2  # share of an overlapped all-reduce's time still paid
    # the attention kernel reads K/V once per query head (GQA heads expanded to full multi-head,
    # as gpt-fast's repeat_interleave + SDPA), not once per KV head as a GQA-aware kernel does
    attention_expands_kv: bool = False
    # static-shape decoders (gpt-fast under CUDA graphs) attend over the whole allocated cache
    # (prompt + gen positions, masked); False: only the filled part, on average prompt + gen / 2
    # (a paged or length-aware kernel, as ladder_jax.attention.decode_attention)
    attention_reads_allocated_cache: bool = True
    kernels: tuple = (("embed", 2), ("attention", 8), ("mlp", 5), ("head", 3))
    scale_out: str = ""  # profile for tensor sizes past max_devices (a sweep's multi-node points)
    base: str = ""  # the profile this one inherits unset keys from (the calibrated software constants)
    source: str = ""

    def kernels_of(self, module: str) -> int:
        return dict(self.kernels)[module]


def known_hardware() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def hardware_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    p = PROFILES_DIR / f"{name}.yaml"
    if not p.exists():
        raise PerfModelError(
            f"unknown hardware '{name}'; choose from {', '.join(known_hardware())} or give a .yaml path"
        )
    return p


def _raw_profile(name: str, seen: tuple = ()) -> tuple[dict, Path]:
    path = hardware_path(name)
    raw = yaml.safe_load(path.read_text()) or {}
    if raw.get("base"):
        if raw["base"] in seen:
            raise PerfModelError(f"{path}: 'base' profiles form a cycle ({' -> '.join((*seen, raw['base']))})")
        parent, _ = _raw_profile(raw["base"], (*seen, name))
        raw = {**parent, **raw, "kernels": {**parent.get("kernels", {}), **raw.get("kernels", {})}}
    return raw, path


def load_hardware(name: str) -> Hardware:
    """A profile from profiles/NAME.yaml (or a YAML path), its `base` filled in."""
    raw, path = _raw_profile(name)
    if raw.get("device"):  # the spec sheet's numbers, from the one table of accelerators
        try:
            device = accelerators.get(raw.pop("device"))
        except ValueError as e:
            raise PerfModelError(f"{path}: {e}") from None
        spec = {
            "hbm_bandwidth": device.hbm_bandwidth,
            "hbm_capacity": device.hbm_bytes,
            "matmul_flops": device.matmul_flops,
        }
        raw = {**spec, **raw}
    fields = {f.name for f in dataclasses.fields(Hardware)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise PerfModelError(f"{path}: unknown key '{unknown[0]}'; a profile has: {', '.join(sorted(fields))}")
    raw["kernels"] = tuple({**dict(Hardware.kernels), **raw.get("kernels", {})}.items())
    raw.setdefault("name", path.stem)
    try:
        return Hardware(
            **{
                k: (float(v) if isinstance(v, str) and k not in ("name", "scale_out", "base") else v)
                for k, v in raw.items()
            },
            source=str(path),
        )
    except (TypeError, ValueError) as e:
        raise PerfModelError(f"{path}: {e}") from None


def write_constants(path: Path, values: dict) -> None:
    """Replace the values of `key: value  # comment` lines in a profile, keeping the comments."""
    text = path.read_text()
    for key, value in values.items():
        pattern = re.compile(rf"^({key}:\s*)(\S+)([ \t]*)(#.*)?$", re.MULTILINE)
        match = pattern.search(text)
        if match is None:
            raise PerfModelError(f"{path}: no '{key}:' line to update")
        new = f"{value:.4g}"
        pad = " " * max(1, len(match.group(2)) + len(match.group(3)) - len(new)) if match.group(4) else ""
        text = text[: match.start()] + f"{match.group(1)}{new}{pad}{match.group(4) or ''}" + text[match.end() :]
    path.write_text(text)


# ---------------------------------------------------------------------------------------------
# All-reduce cost
