"""Every test runs on 8 fake CPU devices (asked for before JAX starts its backends), compiled
for a short compile rather than a fast program."""

import os

import jax
import pytest

from ladder_jax.config import load_config
from ladder_jax.instruments import deviceless
from ladder_jax.mesh import force_cpu_devices

# The suite's time is XLA:CPU compiling tiny programs that then run a few times. LLVM's -O0 and
# the classic loop emitters (instead of the fusion emitters) halve those compiles; the programs
# compute the same values to float32 rounding, and every tolerance in the suite stays as it is.
# Read when JAX starts its CPU backend, so set here, before any test runs; the user's own
# XLA_FLAGS come after these and win. Not where a GPU or TPU compiler is installed: the deviceless
# tests read the schedules those compilers give users, with the flags users have. jax 0.11's
# XLA:CPU has only the fusion emitters and aborts on a flag it does not know.
TEST_XLA_FLAGS = ["--xla_backend_optimization_level=0"]
if jax.__version_info__ < (0, 11):
    TEST_XLA_FLAGS.append("--xla_cpu_use_fusion_emitters=false")
DEVICELESS_COMPILERS = any(map(deviceless.has_compiler, deviceless.PLUGINS))
if not DEVICELESS_COMPILERS and not os.environ.get("XLA_FLAGS", "").startswith(TEST_XLA_FLAGS[0]):
    os.environ["XLA_FLAGS"] = " ".join(
        [*TEST_XLA_FLAGS, os.environ.get("XLA_FLAGS", "")]
    ).strip()  # xdist workers inherit it
force_cpu_devices(8)

# A small GQA model: 8 query heads over 2 KV heads, so tensor=2 splits the KV heads and
# tensor=4, 8 replicate them; vocab 259 exercises the padded vocab-parallel head.
SMALL = [
    "model.d_model=64",
    "model.n_layers=4",
    "model.n_heads=8",
    "model.n_kv_heads=2",
    "model.ffn_dim=128",
    "model.max_seq_len=64",
    "train.seq_len=32",
]


def small_config(plan="standard", data=1, tensor=1, **extra):
    overrides = SMALL + [f"model.plan={plan}", f"mesh.data={data}", f"mesh.tensor={tensor}"]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return load_config("tiny", overrides)


@pytest.fixture
def compiles():
    """Names of the XLA programs compiled while the test runs (JAX's own compile events)."""
    seen = []

    def listener(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield seen
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() == 8, "tests need 8 fake CPU devices; conftest sets them before JAX starts"
    return jax.devices()


def save_small_run(directory, n_layers=3, tensor=2, **extra):
    """A saved standard small model with a random-text corpus: a run directory the tools accept."""
    import numpy as np

    from ladder_jax import checkpoint as ckpt
    from ladder_jax import model as M
    from ladder_jax.mesh import make_mesh

    rng = np.random.RandomState(0)
    (directory / "text.txt").write_text("".join(rng.choice(list("abcdefgh ij\n"), 20_000)))
    cfg = small_config(
        "standard",
        1,
        tensor,
        model__n_layers=n_layers,
        model__init_std=0.1,
        train__data=str(directory / "text.txt"),
        train__batch_size=4,
        train__val_fraction=0.2,
        **extra,
    )
    run = directory / "run"
    ckpt.check_writable(run)
    ckpt.save_config(run, cfg)
    ckpt.save_params(run, M.init_params(cfg.model, make_mesh(cfg), 0))
    return run


def saved_state(cfg, run_dir, step):
    """A run's checkpointed parameters and optimizer state, on the host."""
    import orbax.checkpoint as ocp

    from ladder_jax import checkpoint as ckpt
    from ladder_jax.mesh import make_mesh
    from ladder_jax.training import get_trainer

    target = get_trainer(cfg, make_mesh(cfg)).abstract_checkpoint()
    items = {k: ocp.args.StandardRestore(target[k]) for k in ("params", "opt_state")}
    with ckpt.manager(run_dir, create=False) as saved:
        restored = saved.restore(step, args=ocp.args.Composite(**items))
    return jax.device_get({k: restored[k] for k in items})


def free_ports(n: int = 1) -> list[int]:
    """`n` distinct loopback ports nothing listens on now (the OS picks them): coordinators' and
    servers'. Not derived from the pid: such a port may be an ephemeral one another connection holds."""
    import contextlib
    import socket

    with contextlib.ExitStack() as held:  # all bound at once, so they differ
        socks = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def start_two_processes(cmd, **popen):
    """`cmd --process-id 0` and `... 1` on CPU with the suite's compile flags: a two-process run
    over gloo (`cmd` names the coordinator, --num-processes 2 and the devices of each)."""
    import os
    import subprocess

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(TEST_XLA_FLAGS)}
    return [subprocess.Popen([*cmd, "--process-id", str(i)], env=env, **popen) for i in range(2)]


def save_run(run, cfg, params):
    """A run directory holding `params` (step 1) and `cfg`: what infer and serve load."""
    from ladder_jax import checkpoint as ckpt

    (run / "checkpoints").mkdir(parents=True)
    ckpt.save_config(run, cfg)
    ckpt.save_params(run, params, step=1)
    return run


class FakeGPU:
    """A fake accelerator device with `free` bytes left, for the memory checks."""

    platform, process_index = "gpu", 0

    def __init__(self, free):
        self.free = free

    def memory_stats(self):
        return {"bytes_limit": self.free + 10, "bytes_in_use": 10}

    def __str__(self):
        return "cuda:0"
