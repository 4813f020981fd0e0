"""One trainer per run directory: a second is refused in one line while the first lives, a dead
one's (or a corrupt) lock is taken over, the lock goes when the run ends, and a lock another live
process holds is never removed."""

import json
import os
import socket
import subprocess

import pytest

import train as train_script
from ladder_jax import checkpoint as ckpt
from ladder_jax.data import DataError
from ladder_jax.training import train

from .conftest import save_small_run, small_config

TINY_RUN = ["model.d_model=64", "model.n_layers=2", "model.ffn_dim=128", "train.steps=1", "train.seq_len=32"]


def lock_of(pid: int, host: str | None = None, start="own") -> dict:
    return {
        "host": host or socket.gethostname(),
        "pid": pid,
        "start": ckpt._process_start(pid) if start == "own" else start,
        "since": "2026-01-01 00:00:00",
    }


def test_a_second_trainer_is_refused_while_the_first_lives_and_a_dead_ones_lock_is_taken_over(
    tmp_path, capsys, devices
):
    run = save_small_run(tmp_path)
    first = subprocess.Popen(["sleep", "120"])  # stands in for a train.py that holds the lock
    try:
        (run / ckpt.LOCK_NAME).write_text(json.dumps(lock_of(first.pid)))
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
        rc = train_script.main(["--run-dir", str(run), "--no-progress", "--sample-tokens", "0", *TINY_RUN])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err, err
        assert f"{run} is being trained by pid {first.pid} on {socket.gethostname()}" in err
        assert "give another --run-dir" in err
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # the second wrote nothing
        # Readers (infer.py, convert, spd, lp) load the run while it is locked.
        assert ckpt.load_run(run, ["mesh.tensor=2", "mesh.data=1"]).params
    finally:
        first.kill()
        first.wait()
    # The first was killed without releasing: its lock is stale and the next trainer takes it.
    with ckpt.run_lock(run):
        assert json.loads((run / ckpt.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (run / ckpt.LOCK_NAME).exists()  # released on exit


def test_a_reused_pid_counts_as_dead_and_another_hosts_lock_as_held(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # Our own (live) pid, but a process that started at another time: the pid was reused.
    (run / ckpt.LOCK_NAME).write_text(json.dumps(lock_of(os.getpid(), start=-1)))
    with ckpt.run_lock(run):
        pass
    (run / ckpt.LOCK_NAME).write_text(json.dumps(lock_of(1, host="elsewhere")))
    with pytest.raises(
        ckpt.CheckpointError, match="pid 1 on elsewhere .*delete .*train.lock only if that process is gone"
    ):
        with ckpt.run_lock(run):
            pass


def test_a_run_refused_after_taking_the_lock_releases_it_and_leaves_no_directory(tmp_path):
    cfg = small_config(train__data=str(tmp_path / "missing-*.txt"), train__steps=1)
    with pytest.raises(DataError):
        train(cfg, tmp_path / "new", progress=False, log=lambda *_: None)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("content", ["", '{"host": "h", "pi', "[1, 2]"], ids=["empty", "truncated", "not-a-record"])
def test_a_corrupt_lock_is_taken_over_and_released(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / ckpt.LOCK_NAME).write_text(content)
    old = os.stat(run / ckpt.LOCK_NAME).st_mtime - 60  # a fresh unreadable lock may be one being written: waited for
    os.utime(run / ckpt.LOCK_NAME, (old, old))
    cfg = small_config(train__data=str(tmp_path / "missing-*.txt"), train__steps=1)
    with pytest.raises(DataError):  # past the lock: refused by the next phase, the data
        train(cfg, run, progress=False, log=lambda *_: None)
    assert not (run / ckpt.LOCK_NAME).exists() and run.is_dir()


def test_a_run_never_removes_a_lock_that_another_live_process_holds(tmp_path):
    run = tmp_path / "run"
    other = subprocess.Popen(["sleep", "120"])
    try:
        with ckpt.run_lock(run):
            # Someone deleted this run's lock and another trainer took the directory meanwhile.
            (run / ckpt.LOCK_NAME).write_text(json.dumps(lock_of(other.pid)))
        assert json.loads((run / ckpt.LOCK_NAME).read_text())["pid"] == other.pid  # still theirs
        with pytest.raises(ckpt.CheckpointError, match=f"is being trained by pid {other.pid}"):
            with ckpt.run_lock(run):
                pass
        assert json.loads((run / ckpt.LOCK_NAME).read_text())["pid"] == other.pid
    finally:
        other.kill()
        other.wait()
