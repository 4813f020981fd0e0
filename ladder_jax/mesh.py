"""The one mesh: axes ("data", "fsdp", "tensor"), and the logical-axis -> mesh-axis rules in one place.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `mlp`, ...); this
module alone decides which mesh axis each name is split over.
"""

from __future__ import annotations

import glob
import json
import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from .config import Config, ConfigError, ModelConfig, mesh_shape

AXES = ("data", "fsdp", "tensor")
FSDP = "fsdp"
BATCH = ("data", FSDP)  # the batch splits over both; parameters are replicated over data, split over fsdp


def batch_shards(mesh: Mesh) -> int:
    """Into how many parts a batch splits: data x fsdp."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def force_cpu_devices(n: int = 8) -> None:
    """Ask XLA:CPU for `n` fake devices. Must run before JAX starts its backends (the first array
    or device query); after that it only checks that at least `n` devices exist (callers then
    use the first `n`)."""
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backends have started: too late to change the count
        if jax.device_count() < n:
            raise RuntimeError(
                f"JAX already started with {jax.device_count()} devices; call force_cpu_devices({n}) before any JAX work"
            ) from None


def make_mesh(cfg: Config, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh for this config on these devices (default: all of them).

    Axis types are Auto: the model runs as one shard_map with its own collectives, so jit may
    move inputs onto the specs the shard_map asks for instead of refusing them.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg.mesh, len(devices))
    n = shape[0] * shape[1] * shape[2]
    try:
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:n])
    except NotImplementedError as e:  # a TPU torus whose physical axes these sizes do not match
        physical = re.search(r"assignable mesh (\[[0-9, ]*\])", str(e))
        raise ConfigError(
            f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} does not map onto the devices' physical "
            f"axes {physical.group(1) if physical else ''}: each mesh axis must be a product of some of them; "
            f"choose other sizes (e.g. a tensor size equal to one physical axis)"
        ) from None


def sharding_rules(model: ModelConfig, tensor: int, fsdp: int = 1) -> dict[str, str | tuple | None]:
    """Logical axis -> mesh axis. KV heads split when they can, else every device keeps them all.
    With fsdp > 1 every parameter's `embed` dimension splits over fsdp; the model gathers a
    layer's weights just before it uses them (model.fsdp_gather)."""
    kv_split = model.n_kv_heads % tensor == 0
    if not kv_split and tensor % model.n_kv_heads:
        raise ConfigError(
            f"model.n_kv_heads={model.n_kv_heads} can be neither split nor replicated over tensor={tensor}"
        )
    return {
        "batch": BATCH,
        "vocab": "tensor",
        "heads": "tensor",
        "kv_heads": "tensor" if kv_split else None,
        "mlp": "tensor",
        "embed": FSDP if fsdp > 1 else None,
        "head_dim": None,
        "seq": None,
    }


def logical_to_spec(axes, rules) -> P:
    return P(*(rules[a] if a is not None else None for a in axes))


# libtpu flags without which a ladder model's all-reduces do not overlap its GEMMs on a TPU, found
# by reading the compiled schedule (`python -m ladder_jax analysis schedule`, docs/analysis.md). No combiner
# flag is needed: a ladder's all-reduces form a chain (schedules.Stream.settle_after) that no
# combiner can merge.
TPU_FLAGS = {
    # Without these two every XLA:TPU all-reduce is synchronous. With them an all-reduce becomes an
    # async collective fusion whose steps run inside the compute kernels scheduled beside it.
    "xla_enable_async_all_reduce": "true",
    "xla_tpu_enable_async_collective_fusion_fuse_all_reduce": "true",
    # ... also inside loop fusions: at small decode batches the matmuls are matrix-vector loops.
    "xla_tpu_enable_async_collective_fusion_fuse_kloop_fusions": "true",
}


# XLA:GPU's, for the same reason: jax 0.12's XLA:GPU leaves its latency-hiding scheduler off for an
# A100, and every all-reduce then runs synchronously (on an H100, and on an A100 up to jax 0.11, it
# is on by default).
GPU_FLAGS = {"xla_gpu_enable_latency_hiding_scheduler": "true"}
if (0, 11) <= jax.__version_info__ < (0, 13):
    # From jax 0.11 the scheduler's "speed of light" cost model (on by default for an H100) leaves
    # a gradient all-reduce of a scanned ladder layer with no GEMM beside it, synchronous; its
    # older model overlaps it as jax 0.10 did, and the decode step is the same with either
    # (docs/training.md, "Scanned layers and the ladder's overlap"). Up to 0.10 the speed-of-light
    # model overlaps more, so it stays on there. Only the versions it was checked on: XLA aborts
    # at start on a flag it does not know, and a newer one may drop this one.
    GPU_FLAGS["xla_gpu_enable_analytical_sol_latency_estimator"] = "false"


def ties_late_residual(platform: str) -> bool:
    """Whether a ladder's late add reads its own copy of the residual, tied to the module's output
    (schedules.Stream.settle_after's third barrier), in a program compiled for `platform`. The tie
    keeps XLA:TPU's backward gradient all-reduces beside the next module's backward, and XLA:GPU's
    on jax 0.10 (on 0.11 it makes little difference). From jax 0.12 XLA:GPU overlaps more without
    it: with it, a scanned ladder's body left one gradient all-reduce with nothing inside
    (docs/training.md, "Scanned layers and the ladder's overlap")."""
    return platform != "gpu" or jax.__version_info__ < (0, 12)


def _merged_flags(current: str, flags: dict[str, str]) -> str:
    """`current` plus `--name=value` for each flag it does not set already: the user's value wins."""
    have = {f.lstrip("-").split("=")[0] for f in current.split()}
    return " ".join([*current.split(), *(f"--{k}={v}" for k, v in flags.items() if k not in have)])


def tpu_flags() -> dict[str, str]:
    """The libtpu flags the library runs with (see TPU_FLAGS), as compiler options."""
    return dict(TPU_FLAGS)


def gpu_flags() -> dict[str, bool | str]:
    """The XLA:GPU flags the library runs with (see GPU_FLAGS), as compiler options (XLA:GPU takes
    a boolean option only as a bool)."""
    return {k: {"true": True, "false": False}.get(v, v) for k, v in GPU_FLAGS.items()}


def apply_xla_flags() -> None:
    """Add TPU_FLAGS to LIBTPU_INIT_ARGS and GPU_FLAGS to XLA_FLAGS, keeping any value the user set.

    Must run before JAX starts its backends: XLA and libtpu read their flags once, when they load.
    LADDER_JAX_XLA_FLAGS=0 turns this off (e.g. for an XLA that no longer knows one of them).
    """
    if os.environ.get("LADDER_JAX_XLA_FLAGS", "1") == "0":
        return
    os.environ["LIBTPU_INIT_ARGS"] = _merged_flags(os.environ.get("LIBTPU_INIT_ARGS", ""), TPU_FLAGS)
    os.environ["XLA_FLAGS"] = _merged_flags(os.environ.get("XLA_FLAGS", ""), GPU_FLAGS)


def init_runtime(
    cpu_devices: int = 8,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Start JAX for a command-line run: multi-host when launched so, fake CPU devices otherwise.

    Multi-host: with --coordinator (any platform, gloo collectives on CPU), or on a TPU pod / SLURM
    job where `jax.distributed.initialize()` finds its peers itself. Sets the accelerator flags
    (`apply_xla_flags`) first.
    """
    apply_xla_flags()
    multi = (
        coordinator is not None or int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ
    )
    if os.environ.get("JAX_PLATFORMS", "") in ("", "cpu") and not _accelerator_present():
        force_cpu_devices(cpu_devices)
    if multi:
        if not _accelerator_present():  # CPU processes talk through gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)


def _accelerator_present() -> bool:
    """Whether a GPU or TPU is visible, without initialising JAX's backends."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def local_device(mesh: Mesh):
    """A device of the mesh that this process drives (the first one); what it reports about its
    memory holds for the others (one kind of device per mesh)."""
    return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


BROADCAST_BYTES = 4096  # one collective carries a message this long; longer ones take a second


def broadcast_from_first(message):
    """Process 0's `message` (JSON-able) on every process; the others pass anything (None).
    Every process must call it at the same point, as any collective."""
    if jax.process_count() == 1:
        return message
    data = json.dumps(message).encode() if jax.process_index() == 0 else b""
    head = np.zeros(BROADCAST_BYTES, np.uint8)
    head[:8] = np.frombuffer(np.int64(len(data)).tobytes(), np.uint8)
    if len(data) <= BROADCAST_BYTES - 8:
        head[8 : 8 + len(data)] = np.frombuffer(data, np.uint8)
    head = np.asarray(multihost_utils.broadcast_one_to_all(head))
    size = int(np.frombuffer(head[:8].tobytes(), np.int64)[0])
    if size <= BROADCAST_BYTES - 8:
        return json.loads(head[8 : 8 + size].tobytes())
    body = np.zeros(1 << (size - 1).bit_length(), np.uint8)  # powers of two: a few compiles
    if jax.process_index() == 0:
        body[:size] = np.frombuffer(data, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(body))[:size].tobytes())
