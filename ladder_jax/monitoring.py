"""What a training run reports while it runs, and how it stops when the machine is taken away.

- `MetricsLog`: every record goes to `RUN/metrics.jsonl`, TensorBoard event files under
  `RUN/tensorboard`, and Weights & Biases when `train.wandb` names a project; process 0 only.
  On object storage (gs://), which cannot append, these files are written to a local mirror
  and copied into the run directory at each flush (every log interval).
- `StopSignals`: SIGTERM (spot TPU VMs, queued resources, SLURM before a preemption) and SIGINT
  set a flag instead of killing the process, so the loop can save the step in flight; every
  process agrees on the step to stop at (`stop_agreed`).
- `Profile`: a `jax.profiler` trace of the steps `train.profile=START:END` names (config.profile_steps), under
  `RUN/profile` (TensorBoard's profile plugin, xprof or Perfetto read it).
- `Timer`: where an interval's wall time went (waiting for data, device steps, evaluation,
  checkpointing).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import threading
import time

import jax
import numpy as np

from .config import Config, ConfigError, to_dict
from .storage import LocalMirror, Path

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The scalars TensorBoard and W&B get (metrics.jsonl keeps every key of a record).
SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_ppl")


def check_wandb(cfg: Config) -> None:
    """W&B is asked for and can run: its package is installed."""
    if cfg.train.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"train.wandb={cfg.train.wandb} needs the wandb package; install it with: pip install 'ladder_jax[wandb]'"
            ) from None


class MetricsLog:
    """metrics.jsonl, TensorBoard and (optionally) W&B for one run; only process 0 writes."""

    def __init__(self, cfg: Config, run_dir: Path, mirror: LocalMirror):
        self.mirror, self.path = mirror, mirror.local / "metrics.jsonl"
        self.active = jax.process_index() == 0
        self.tensorboard = self.wandb = None
        if not self.active:
            return
        from tensorboardX import SummaryWriter

        mirror.local.mkdir(parents=True, exist_ok=True)
        mirror.pull("metrics.jsonl")  # a resumed run appends to what it wrote before
        self.tensorboard = SummaryWriter(str(mirror.local / "tensorboard"), flush_secs=30)
        if cfg.train.wandb:
            self.wandb = _wandb_run(cfg, run_dir, mirror.local)

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: float(record[k]) for k in SCALARS if k in record}
        scalars.update({f"time/{k}": v for k, v in record.get("time_fraction", {}).items()})
        for k, v in scalars.items():
            self.tensorboard.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def flush(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.flush()
            self.mirror.sync()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.active:
            self.mirror.sync()


def _wandb_run(cfg: Config, run_dir: Path, local):
    """A W&B run that a resumed training run continues: its id is kept in RUN/wandb_id; its own
    files (offline runs) under the local mirror's `wandb/`."""
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
    id_file.write_text(run_id)
    return wandb.init(
        project=cfg.train.wandb,
        mode=cfg.train.wandb_mode,
        dir=str(local),
        name=run_dir.name,
        id=run_id,
        resume="allow",
        config=to_dict(cfg),
    )


class StopSignals:
    """While active, SIGTERM and SIGINT set `received` instead of stopping the process. The first
    signal restores the previous handlers, so a second one stops at once. Only the main thread
    can install handlers; elsewhere this does nothing."""

    def __init__(self):
        self.received: str | None = None
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        self._restore()

    def _restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def __exit__(self, *exc):
        self._restore()


def stop_agreed(local: bool) -> bool:
    """True on every process when any process was signalled. Called at the same steps everywhere
    (the loop's metric reads), so all save and stop at one step."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


class Profile:
    """A jax.profiler trace from the start of step `steps.start` to the end of step `steps.stop - 1`."""

    def __init__(self, steps: range | None, mirror: LocalMirror):
        self.steps, self.mirror, self.tracing = steps, mirror, False
        self.out = mirror.local / "profile"

    def before(self, step: int) -> None:
        if self.steps is not None and step == self.steps.start:
            jax.profiler.start_trace(str(self.out))
            self.tracing = True

    def after(self, step: int, state) -> None:
        if self.tracing and step == self.steps.stop - 1:
            jax.block_until_ready(state)  # the trace ends with the last step's device work in it
            self.stop()

    def stop(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
            self.mirror.sync()


class Timer:
    """Seconds spent per phase since the last `interval()`; the rest of the wall time is `step`
    (dispatching steps and waiting for the device)."""

    PHASES = ("data", "eval", "checkpoint")

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0, self.spent = time.perf_counter(), dict.fromkeys(self.PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.spent[name] += time.perf_counter() - t

    def interval(self) -> tuple[float, dict]:
        """(wall seconds, fraction of them per phase, `step` included) since the last call."""
        wall = max(time.perf_counter() - self.t0, 1e-9)
        fractions = {k: v / wall for k, v in self.spent.items()}
        fractions["step"] = max(0.0, 1.0 - sum(fractions.values()))
        self.reset()
        return wall, fractions
