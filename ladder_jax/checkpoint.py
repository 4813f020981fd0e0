"""Run directories and orbax checkpoints.

A run directory holds `config.yaml` (the resolved config), `metrics.jsonl`, optionally
`tokenizer.json`, and `checkpoints/<step>/` written by an orbax CheckpointManager with items
`params`, `opt_state`, `data` (the grain iterator state) and `meta`. Orbax writes each step into a
temporary directory and renames it when complete, so a save killed midway is never listed as a
step; restoring always takes the latest complete one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path as LocalPath

import jax
import numpy as np
import orbax.checkpoint as ocp
import yaml
from jax.sharding import Mesh

from . import model as M
from .config import Config, ConfigError, from_dict, load_config, to_dict
from .data import DataError, build_datasets, val_batches
from .errors import LadderError
from .memory import check_params_fit
from .mesh import make_mesh
from .plan import lookup
from .storage import ObjectLock, Path, exists_now, free_bytes, is_remote, path, write_atomic
from .tokenizer import copy_tokenizer_files, get_tokenizer


class CheckpointError(LadderError):
    """A run directory or checkpoint that cannot be used; the message says what to do."""


def save_config(run_dir: Path, cfg: Config) -> None:
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_run_config(run_dir: str | Path, overrides=()) -> Config:
    """The config a run was saved with, with optional `key=value` overrides (plan, mesh, ...)."""
    run_dir = path(run_dir)
    config_path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; give a run directory made by train.py or convert")
    if not config_path.exists():
        raise CheckpointError(
            f"{run_dir} has no config.yaml, so it is not a ladder_jax run; give a directory made by train.py or convert"
        )
    try:
        saved = from_dict(yaml.safe_load(config_path.read_text()))
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    return load_config(config_path, overrides) if overrides else saved


def manager(run_dir: str | Path, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    run_dir = path(run_dir)
    return ocp.CheckpointManager(
        (run_dir if is_remote(run_dir) else run_dir.absolute()) / "checkpoints", options=options
    )


def check_same_shapes(expected: Config, found: Config, where: str) -> None:
    """Name the first parameter whose shape differs between two model configs, as stored (every
    checkpoint holds the shared lp layout; restore_params moves to the split one after loading)."""
    stored = lambda m: dataclasses.replace(m, lp_layout="shared")  # noqa: E731
    want = M.abstract_params(stored(expected.model))
    have = M.abstract_params(stored(found.model))
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    flat_have = dict(jax.tree_util.tree_flatten_with_path(have)[0])
    for key, w in flat_want.items():
        name = jax.tree_util.keystr(key)
        h = flat_have.get(key)
        if h is None:
            raise CheckpointError(
                f"{where} has no parameter {name} (it is a {found.model.name} model with plan '{found.model.plan}'); use a checkpoint of the same shape"
            )
        if h.shape != w.shape:
            raise CheckpointError(
                f"{where} holds {name} with shape {h.shape} but this model needs {w.shape} "
                f"({found.model.name} vs {expected.model.name}); use a checkpoint of the same model shape"
            )
    extra = set(flat_have) - set(flat_want)
    if extra:
        name = jax.tree_util.keystr(sorted(extra, key=str)[0])
        raise CheckpointError(
            f"{where} has parameter {name} that this model does not; use a checkpoint of the same model shape and plan family"
        )


def check_same_function(cfg: Config, saved: Config, tensor: int, where: str) -> None:
    """A plan with schedules whose function depends on the tensor degree (spd, track, desync)
    computes another model at another degree: its weights are kept to the degree they were saved
    for, unless the plan itself changes (SPD applied to a standard run picks its degree anew)."""
    layers = saved.model.layer_schedules
    dependent = sorted({s for s in layers if lookup(s).tensor_dependent})
    if dependent and cfg.model.layer_schedules == layers and tensor != saved.mesh.tensor:
        raise CheckpointError(
            f"{where} has {', '.join(dependent)} layers, whose function depends on the tensor degree, saved for "
            f"mesh.tensor={saved.mesh.tensor}; at tensor={tensor} it would be another model: use mesh.tensor={saved.mesh.tensor}"
        )


def save_params(run_dir: str | Path, params: dict, step: int = 0) -> None:
    """Write `params` as checkpoint `step` of a run directory (conversions, SPD); blocks until done."""
    mngr = manager(run_dir)
    try:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        mngr.wait_until_finished()
    finally:
        mngr.close()


def latest_step(run_dir: str | Path) -> int | None:
    if not (path(run_dir) / "checkpoints").is_dir():
        return None
    return manager(run_dir, create=False).latest_step()


def restore(mngr: ocp.CheckpointManager, run_dir: Path, step: int, args) -> dict:
    """`mngr.restore(step, args)`, or CheckpointError in one line when the step cannot be read (cut
    short by a full disk, damaged, or not an orbax checkpoint): nothing is deleted, and the message
    names the step before it to fall back to."""
    try:
        return mngr.restore(step, args=args)
    except (ValueError, KeyError, OSError) as e:  # tensorstore's and orbax's words for a damaged step
        earlier = [s for s in mngr.all_steps() if s < step]
        then = f"to resume from step {max(earlier)}" if earlier else "to start again"
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"checkpoint {step} of {run_dir} cannot be read ({type(e).__name__}: {why}); it is incomplete or "
            f"damaged: move {run_dir / 'checkpoints' / str(step)} out of the way {then}"
        ) from None


def abstract_with_sharding(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore_params(run_dir: str | Path, cfg: Config, mesh: Mesh, step: int | None = None) -> dict:
    """The parameters of a run's latest (or given) complete step, placed onto `mesh` for `cfg`.

    `cfg` may differ from the run's own config in the plan (standard -> ladder, ...) and the mesh,
    as long as every parameter keeps its shape.
    """
    run_dir = path(run_dir)
    saved = load_run_config(run_dir)
    check_same_shapes(cfg, saved, str(run_dir))
    check_same_function(cfg, saved, mesh.shape["tensor"], str(run_dir))
    step = latest_step(run_dir) if step is None else step
    if step is None:
        raise CheckpointError(
            f"{run_dir} has no complete checkpoint; train it (python train.py) or convert a model into it"
        )
    check_params_fit(cfg.model, mesh, f"the parameters of {run_dir} ({cfg.model.param_dtype})")
    stored = dataclasses.replace(cfg.model, lp_layout="shared")
    target = abstract_with_sharding(M.abstract_params(stored), M.param_shardings(stored, mesh))
    args = ocp.args.Composite(params=ocp.args.StandardRestore(target))
    restored = restore(manager(run_dir, create=False), run_dir, step, args)
    return M.to_split_layout(cfg.model, restored["params"], mesh)


@dataclass
class Run:
    """A run directory opened on a mesh: its config (with any overrides), the mesh, the parameters."""

    dir: Path
    cfg: Config
    mesh: Mesh
    params: dict

    def validation_batches(self, n_batches: int | None = None) -> list[dict]:
        """The run's validation windows in batches of train.batch_size: the first `n_batches`
        (default train.eval_batches), the same at every call."""
        tr = self.cfg.train
        windows = build_datasets(tr, get_tokenizer(self.cfg, self.dir)).val
        batches = val_batches(
            windows, tr.batch_size, n_batches or tr.eval_batches, jax.process_index(), jax.process_count()
        )
        if not batches:
            raise DataError(
                f"the validation split of {self.dir} has {len(windows)} windows, fewer than one batch of {tr.batch_size}; lower train.batch_size or raise train.val_fraction"
            )
        return batches


def require_shared_layout(cfg: Config, tool: str) -> None:
    """`tool` re-plans or rewrites parameters by layer, which the split lp layout has merged."""
    if cfg.model.lp_layout != "shared":
        raise ConfigError(
            f"{tool} works on each layer's own parameters; run it with model.lp_layout=shared "
            f"(the split layout is for running a model: infer.py, serve, eval)"
        )


def load_run(run_dir: str | Path, overrides=(), devices=None) -> Run:
    """A run with optional `key=value` overrides (mesh, plan), its parameters placed on a fresh mesh."""
    cfg = load_run_config(run_dir, overrides)
    mesh = make_mesh(cfg, devices)
    return Run(path(run_dir), cfg, mesh, restore_params(run_dir, cfg, mesh))


def latest_run(root: str | Path = "runs", preset: str = "tiny") -> Path:
    """The most recently written run of this preset under `root` that has a complete checkpoint."""
    root = path(root)
    runs = [p for p in root.glob("*/config.yaml")] if root.is_dir() else []
    candidates = []
    for cfg_path in runs:
        run = cfg_path.parent
        try:
            name = yaml.safe_load(cfg_path.read_text())["model"]["name"]
        except Exception:
            continue
        if name == preset and latest_step(run) is not None:
            candidates.append((cfg_path.stat().mtime, str(run), run))
    if not candidates:
        raise CheckpointError(
            f"no trained '{preset}' run under {root}/; run `python train.py` first or pass --checkpoint RUN_DIR"
        )
    return max(candidates)[2]


PROBE = ".write-test-"  # a file `check_writable` writes and removes


def check_writable(run_dir: Path, need_bytes: int = 0) -> None:
    """Fail early, in one line, when the run directory cannot take checkpoints."""
    run_dir = path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f"{PROBE}{socket.gethostname()}-{os.getpid()}"  # one per process: hosts share it
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"cannot write to {run_dir} ({e.strerror or e}); choose another train.out_dir or fix its permissions"
        ) from None
    free = free_bytes(run_dir)
    if need_bytes and free is not None and free < need_bytes:
        raise CheckpointError(
            f"{run_dir} has {free / 2**20:.0f} MiB free but a checkpoint needs about {need_bytes / 2**20:.0f} MiB; free space or choose another train.out_dir"
        )


def check_new_directory(out: Path) -> None:
    """Refuse to write into a directory that holds anything: a user's files are never touched."""
    out = path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty; give a new directory")


def save_run(out: Path, cfg: Config, params: dict, source: Path, report: tuple[str, dict]) -> None:
    """A new run directory made from `source` (config.yaml, orbax step 0, the source's tokenizer
    and a JSON report of how it was made, `report` = (file name, record)), written atomically."""
    with building(out) as tmp:
        save_params(tmp, params)
        copy_tokenizer_files(source, tmp)
        (tmp / report[0]).write_text(json.dumps(report[1], indent=1))
        save_config(tmp, cfg)  # last: what makes the directory a run


# ---------------------------------------------------------------------------------------------
# One trainer per run directory

LOCK_NAME = "train.lock"


def _process_start(pid: int) -> int | None:
    """When a process started (clock ticks since boot, Linux), to tell a live pid from a reused one."""
    try:
        stat = LocalPath(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process a lock names still runs. Only answerable on its own host; a lock from
    another host counts as held."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    start = _process_start(pid)
    return start is None or holder.get("start") is None or start == holder["start"]


def _younger_than(path: LocalPath, seconds: float) -> bool:
    try:
        return time.time() - os.stat(path).st_mtime < seconds
    except OSError:
        return False


def _read_lock(path: LocalPath) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _create_lock(path: LocalPath, record: dict) -> bool:
    """Create `path` holding `record` atomically: a complete file or none. False if it exists."""
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(record))
    try:
        os.link(tmp, path)  # fails if `path` exists, on NFS too
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _acquire(run_dir: LocalPath) -> dict:
    path = run_dir / LOCK_NAME
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": _process_start(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for _ in range(50):
        if _create_lock(path, record):
            return record
        holder = _read_lock(path)
        if holder is None:  # released meanwhile
            continue
        if holder == {} and _younger_than(path, 2.0):  # without hard links a lock is created, then filled
            time.sleep(0.1)
            continue
        if holder and _alive(holder):
            raise CheckpointError(
                f"{run_dir} is being trained by pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
                f"({path}); wait for it to end or give another --run-dir (delete {path} only if that process is gone)"
            )
        # Stale (its process died): move it aside, and take over only if it is still the one judged dead.
        aside = path.with_name(f"{path.name}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        if _read_lock(aside) != holder:  # another trainer took over in between: put its lock back
            with contextlib.suppress(OSError):
                os.link(aside, path)
        aside.unlink(missing_ok=True)
    raise CheckpointError(f"could not take {path} (other trainers keep taking it); try again")


def _release(run_dir: LocalPath, record: dict) -> None:
    path = run_dir / LOCK_NAME
    if _read_lock(path) == record:  # never remove a lock that is not ours
        path.unlink(missing_ok=True)


MARKER = ".process-"  # a file each process of a multi-process start writes, and removes (`check_shared`)
# What a trainer itself writes into a run directory before it is a run (before config.yaml is
# in place): the lock and the short-lived files of the checks above. Prefixes of file names.
SETUP_FILES = (LOCK_NAME, PROBE, MARKER, "config.yaml")


def check_shared(run_dir: Path) -> None:
    """Every process of a multi-process run must see one run directory: orbax writes each host's
    shards and process 0 the metadata into it. Each process leaves a marker named for this job
    and checks that it sees every process's; all refuse together if any does not."""
    n = jax.process_count()
    if n == 1:
        return
    from jax.experimental import multihost_utils

    job = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
    marker = lambda i: run_dir / f"{MARKER}{i}-of-{n}-{job:08x}"  # noqa: E731
    run_dir.mkdir(parents=True, exist_ok=True)
    marker(jax.process_index()).write_text(socket.gethostname())
    multihost_utils.sync_global_devices("ladder_jax: storage markers written")
    seen = np.asarray(multihost_utils.process_allgather(np.int32(sum(exists_now(marker(i)) for i in range(n)))))
    multihost_utils.sync_global_devices("ladder_jax: storage markers read")
    marker(jax.process_index()).unlink(missing_ok=True)
    if (seen < n).any():
        p = int(np.argmin(seen))
        raise CheckpointError(
            f"run directory {run_dir} is not one storage for all {n} processes (process {p} sees {seen[p]} of "
            f"the {n} processes' files): give a run directory every host sees, gs://BUCKET/... or a filesystem every host mounts (NFS, Filestore)"
        )


def _acquire_object(run_dir: Path, timeout: float) -> ObjectLock:
    """The run lock on object storage. A holder on this host whose process is gone is taken over
    at once (as locally); any other once its heartbeat is older than `timeout` seconds."""
    lock = ObjectLock(run_dir / LOCK_NAME, timeout)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}
    record["since"] = time.strftime("%Y-%m-%d %H:%M:%S")
    for _ in range(5):
        if lock.create(record):
            return lock
        holder, generation, age = lock.read()
        if holder is None:  # released meanwhile
            continue
        dead_here = holder.get("host") == socket.gethostname() and not _alive(holder)
        if not dead_here and age < timeout:
            raise CheckpointError(
                f"{run_dir} is being trained by pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
                f"(heartbeat {age:.0f} s ago, {lock.path}); wait for it to end, give another --run-dir, or wait "
                f"train.lock_timeout={timeout:g} s after its last heartbeat for a takeover"
            )
        if lock.take_over(generation):
            return lock
    raise CheckpointError(f"could not take {run_dir / LOCK_NAME} (other trainers keep taking it); try again")


@contextlib.contextmanager
def run_lock(run_dir: str | Path, timeout: float = 300.0):
    """Hold `run_dir/train.lock` while the block runs: a second trainer into the same directory
    is refused in one line (CheckpointError); readers (infer.py, convert, spd, lp) never look at
    it. A lock whose process died on this host (pid gone, or reused by a process that started
    later) is taken over. On gs:// the lock is an object with a heartbeat (ObjectLock), taken
    over also when its heartbeat is `timeout` seconds old. Multi-host: process 0 alone holds it
    and tells the others its verdict, so every process of a job refuses or proceeds together."""
    run_dir = path(run_dir)
    remote = is_remote(run_dir)
    created = not remote and not run_dir.exists()
    held, error = None, ""
    if jax.process_index() == 0:
        try:
            if remote:
                held = _acquire_object(run_dir, timeout)
                held.start_heartbeat()
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
                held = _acquire(LocalPath(run_dir))
        except CheckpointError as e:
            error = str(e)
        except OSError as e:
            error = f"cannot write to {run_dir} ({e.strerror}); choose another train.out_dir or fix its permissions"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error == "")))
        if not taken and not error:
            error = f"{run_dir} is locked by another run (see process 0's message); give another --run-dir"
    if error:
        raise CheckpointError(error)
    try:
        check_shared(run_dir)
        yield
    finally:
        if isinstance(held, ObjectLock):
            held.release()
        elif held is not None:
            _release(LocalPath(run_dir), held)
            if created:  # a run refused before it wrote anything leaves no directory behind
                with contextlib.suppress(OSError):
                    os.rmdir(run_dir)


@contextlib.contextmanager
def building(out: Path):
    """A temporary sibling of `out` to fill; renamed to `out` only when the block succeeds, so a
    failed or killed conversion leaves no half-written run behind. Object storage has no
    directory rename: there the block fills `out` itself, is removed on failure, and writes
    config.yaml last, so a killed one is no run (load_run_config refuses it)."""
    out = path(out)
    check_new_directory(out)
    if is_remote(out):
        try:
            yield out
        except BaseException:
            with contextlib.suppress(OSError):
                out.rmtree()
            raise
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)  # replaces an empty `out` too
    finally:
        if tmp.exists():
            tmp.rmtree()
