"""Will it fit? The bytes a host (CPU) or a device (GPU, TPU) needs for the parameters against the
bytes it has, checked before they are created or loaded, so that a model too large for the
machine stops with one line instead of an out-of-memory kill.

On CPU every fake device is a slice of the same host RAM, so the need is the sum over this host's
devices of the mesh and the supply is the host's available RAM (`MemAvailable`). On an accelerator
each device has its own memory: the need is one device's share, the supply its free bytes
(`bytes_limit - bytes_in_use` of `device.memory_stats()`).

What each way of getting parameters needs per device (measured on CPU, 8 fake devices):
random initialisation runs one compiled program whose peak XLA reports (`memory_analysis`: its
output and temporaries; XLA:CPU compiles it unoptimised, and Llama-3.2-1B's 2.3 GiB of bfloat16
took 12.9 GiB by XLA's count, 13.2 GiB of RSS); restoring a checkpoint stages arrays in host memory
(1.31x the parameter bytes of RSS on CPU); training adds gradients and the optimizer state.
"""

from __future__ import annotations

import math
import os
import re

import jax
import numpy as np
from jax.sharding import Mesh

from . import model as M
from .errors import LadderError
from .mesh import batch_shards

GiB = 2**30
FEWER_LAYERS = "a smaller preset, fewer layers (model.n_layers=N)"
RESTORE_HOST_FACTOR = 1.35  # peak host RAM of an orbax restore on CPU over the parameter bytes (1.31 measured)


class MemoryCheckError(LadderError):
    """Arrays that would not fit in this machine's memory; the message says what to change."""


def device_memory(device) -> tuple[int, int] | None:
    """(bytes_limit, bytes_in_use) of an accelerator: what JAX's allocator may hold in all (on a
    GPU its preallocated share, XLA_PYTHON_CLIENT_MEM_FRACTION) and what it holds now; None where
    the runtime does not say (XLA:CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"], stats.get("bytes_in_use", 0)


def free_device_bytes(device) -> int | None:
    """Bytes the device can still allocate, or None where the runtime does not say (XLA:CPU)."""
    limit_in_use = device_memory(device)
    return None if limit_in_use is None else limit_in_use[0] - limit_in_use[1]


def host_available_bytes() -> int | None:
    """RAM this host can still give without swapping (Linux `MemAvailable`), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def bytes_per_device(abstract, shardings=None) -> int:
    """Bytes one device holds of a tree of shapes (ShapeDtypeStructs or arrays) placed with these
    shardings (default: each leaf's own `.sharding`)."""
    leaves = jax.tree.leaves(abstract)
    placed = [x.sharding for x in leaves] if shardings is None else jax.tree.leaves(shardings)
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x, s in zip(leaves, placed))


def param_bytes_per_device(cfg, mesh: Mesh) -> int:
    """Parameter bytes one device of `mesh` holds for the model config `cfg`."""
    return bytes_per_device(M.abstract_params(cfg), M.param_shardings(cfg, mesh))


def init_bytes_per_device(cfg, mesh: Mesh) -> int:
    """Peak bytes per device while `model.init_params` creates random parameters, leaf by leaf:
    the parameters plus the largest temporaries XLA counts for one leaf's program (compiled here,
    and cached for init_params)."""
    analyses = [p.memory_analysis() for p in M.init_compiled(cfg, mesh)]
    temps = [a.temp_size_in_bytes for a in analyses if a is not None]
    return param_bytes_per_device(cfg, mesh) + max(temps, default=0)


def _local_devices(mesh: Mesh) -> list:
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return local or list(mesh.devices.flat)


def check_fits(
    what: str, per_device: int, mesh: Mesh, available=None, host_factor: float = 1.0, smaller: str = "a smaller preset"
) -> None:
    """Refuse, in one line, `per_device` bytes on every device of `mesh` that this host (CPU) or
    its devices (accelerators) cannot hold. `host_factor` scales the need on CPU (host staging).

    `available(device) -> bytes | None` replaces the measurement (tests); None means unknown, and
    nothing is refused then."""
    local = _local_devices(mesh)
    data, tensor = mesh.shape["data"], mesh.shape[M.TENSOR]
    if local[0].platform == "cpu":
        need = int(per_device * len(local) * host_factor)
        have = available(local[0]) if available else host_available_bytes()
        if have is None or need <= have:
            return
        fixes = [smaller]
        if data > 1:
            shard = "; mesh.fsdp shards them instead" if "fsdp" in mesh.shape else ""
            fixes.append(f"mesh.data=1 (each of the {data} data replicas is another copy{shard})")
        fixes.append("an accelerator (fake CPU devices share this host's RAM, so more tensor devices do not help)")
        raise MemoryCheckError(
            f"{what} need {need / GiB:.2f} GiB of RAM on this host ({len(local)} CPU devices x {per_device / GiB:.2f} GiB"
            f"{f' x {host_factor:g} staging' if host_factor != 1 else ''}) but {have / GiB:.2f} GiB is available; "
            f"use {', '.join(fixes[:-1])} or {fixes[-1]}"
        )
    frees = [(available(d) if available else free_device_bytes(d), d) for d in local]
    frees = [(f, d) for f, d in frees if f is not None]
    if not frees:
        return
    have, device = min(frees, key=lambda t: t[0])
    if per_device <= have:
        return
    more = (
        f"more tensor devices (mesh.tensor={2 * tensor}{' or mesh.fsdp' if 'fsdp' in mesh.shape else ''})"
        if 2 * tensor <= jax.device_count()
        else "more or larger accelerators"
    )
    raise MemoryCheckError(
        f"{what} need {per_device / GiB:.2f} GiB per device (mesh data={data} x tensor={tensor}) "
        f"but {device} has {have / GiB:.2f} GiB free; use {smaller} or {more}"
    )


def check_params_fit(cfg, mesh: Mesh, what: str | None = None, available=None) -> int:
    """Refuse to restore parameters (model config `cfg`) that this host or its devices cannot
    hold; returns the parameter bytes per device."""
    per_device = param_bytes_per_device(cfg, mesh)
    what = what or f"the {cfg.name} parameters ({cfg.param_dtype})"
    check_fits(what, per_device, mesh, available, host_factor=RESTORE_HOST_FACTOR)
    return per_device


def check_init_fits(cfg, mesh: Mesh, available=None) -> int:
    """Refuse to create random parameters (model config `cfg`) that would not fit while XLA
    creates them; returns the peak bytes per device."""
    peak = init_bytes_per_device(cfg, mesh)
    params = param_bytes_per_device(cfg, mesh)
    what = f"creating random {cfg.name} parameters ({cfg.param_dtype}, {params / GiB:.2f} GiB per device plus XLA's temporaries)"
    check_fits(what, peak, mesh, available, smaller=FEWER_LAYERS)
    return peak


def refusal(error: Exception) -> str | None:
    """XLA:TPU refuses to compile a program that cannot fit in HBM, and says by how much: that
    sentence, or None for any other error."""
    found = re.search(r"RESOURCE_EXHAUSTED: ([^\n]*)", str(error))
    return found.group(1).rstrip(".") if found else None


def step_bytes(compiled) -> dict:
    """Per-device bytes of a compiled program, from XLA's memory_analysis(): its arguments, outputs
    (less those written over donated arguments), temporaries and code, and their total."""
    m = compiled.memory_analysis()
    out = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,  # outputs written over donated arguments (the state)
        "temporaries": m.temp_size_in_bytes,
        "code": m.generated_code_size_in_bytes,
    }
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    return out


def check_step_fits(trainer, available=None) -> dict:
    """Refuse, in one line, a train step (`training.Trainer`) whose state, batch and activations
    do not fit: compiled here, before any state exists (the first step then reuses the program).
    On a GPU an out-of-memory step would fail only when it runs; XLA:TPU refuses the compile.
    Returns `step_bytes` of the step."""
    cfg, tr = trainer.cfg, trainer.cfg.train
    fixes = [] if tr.remat == "full" else ["train.remat=full"]
    if (tr.batch_size // tr.grad_accum) % (2 * batch_shards(trainer.mesh)) == 0:  # half the rows still split
        fixes.append(f"train.grad_accum={2 * tr.grad_accum} (half the rows per micro-batch)")
    fixes.append("a shorter train.seq_len" if fixes else "a smaller preset or a shorter train.seq_len")
    what = f"a train step's state, batch and activations ({cfg.model.name}, {tr.batch_size} x {tr.seq_len} tokens)"
    try:
        compiled = trainer.compile()
    except Exception as e:
        if refusal(e) is None:
            raise
        raise MemoryCheckError(f"{what} do not fit: {refusal(e)}; use {', '.join(fixes)}") from None
    need = step_bytes(compiled)
    check_fits(what, need["total"], trainer.mesh, available, smaller=", ".join(fixes))
    return need


def check_training_fits(
    cfg, mesh: Mesh, abstract_state, random_init: bool, available=None, copied_to_save: bool = False
) -> int:
    """Refuse a training run whose parameters, gradients and optimizer state (`abstract_state`:
    params and opt_state with their shardings), or whose random initialisation, cannot fit;
    activations are not counted. `copied_to_save`: a save copies the state into the per-layer
    layout (a scanned Trainer), so the state is held twice then. Returns the bytes per device."""
    held = bytes_per_device(abstract_state)
    state = held + param_bytes_per_device(cfg, mesh)  # + gradients
    init = init_bytes_per_device(cfg, mesh) if random_init else 0
    if init > state:
        what = f"creating random {cfg.name} parameters to train ({cfg.param_dtype}, with XLA's temporaries)"
        check_fits(what, init, mesh, available, smaller=FEWER_LAYERS)
    if copied_to_save and 2 * held > state:
        what = f"saving {cfg.name}'s training state (held twice while it is copied to the checkpoint layout)"
        check_fits(what, 2 * held, mesh, available, smaller=FEWER_LAYERS)
    what = f"training {cfg.name} (parameters, gradients and optimizer state; activations not counted)"
    check_fits(what, state, mesh, available, smaller=FEWER_LAYERS)
    return max(state, init, 2 * held if copied_to_save else 0)
