"""A training run as an operator sees it: stopped by a signal and resumed, watched in TensorBoard
and W&B, profiled (ladder_jax.monitoring and the loop in ladder_jax.training)."""

import json
import re
import shutil
import signal
import sys

import jax
import numpy as np
import pytest

from ladder_jax import checkpoint as ckpt
from ladder_jax import training
from ladder_jax.config import ConfigError
from ladder_jax.mesh import make_mesh

from .conftest import TEST_XLA_FLAGS, free_ports, saved_state, small_config

STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("ops")
    rng = np.random.RandomState(0)
    (d / "text.txt").write_text("".join(rng.choice(list("abcdefgh ij\n"), 20_000)))
    return str(d / "text.txt")


def config(corpus, **extra):
    return small_config(
        "ladder",
        1,
        2,
        model__n_layers=2,
        train__data=corpus,
        train__steps=STEPS,
        train__batch_size=4,
        train__log_every=1,
        train__eval_every=STEPS,
        train__save_every=100,
        **extra,
    )


@pytest.fixture(scope="module")
def watched(corpus, tmp_path_factory, monkeypatch_module):
    """One uninterrupted run with TensorBoard, W&B (offline) and a profile of steps 2-3."""
    monkeypatch_module.setenv("WANDB_SILENT", "true")
    cfg = config(corpus, train__profile="2:4", train__wandb="ladder-jax-test", train__wandb_mode="offline")
    run = tmp_path_factory.mktemp("watched") / "run"
    result = training.train(cfg, run, progress=False, log=lambda *_: None)
    return cfg, run, result


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_sigterm_saves_the_step_in_flight_and_the_rerun_resumes_bit_exactly(watched, corpus, tmp_path, monkeypatch):
    _, _, uninterrupted = watched
    cfg, run = config(corpus), tmp_path / "run"
    step = training.Trainer.step
    calls = []

    def signalled_step(self, state, batch):  # the signal arrives while step 3 is in flight
        calls.append(1)
        out = step(self, state, batch)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return out

    monkeypatch.setattr(training.Trainer, "step", signalled_step)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(training.Preempted, match="SIGTERM at step 3: saved checkpoint 3") as stopped:
        training.train(cfg, run, progress=False, log=lambda *_: None)
    assert stopped.value.step == 3 and ckpt.latest_step(run) == 3
    assert signal.getsignal(signal.SIGTERM) is handler  # the loop's handlers are gone
    monkeypatch.setattr(training.Trainer, "step", step)
    with pytest.raises(
        ckpt.CheckpointError, match=r"--init-from starts a new run, but .* checkpoints to resume \(step 3\)"
    ):
        training.train(cfg, run, init_from=watched[1], progress=False)
    notes = []
    resumed = training.train(cfg, run, progress=False, log=notes.append)
    assert notes == [f"resumed {run} at step 3"] and resumed["step"] == STEPS
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed["params"])), jax.tree.leaves(uninterrupted["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    # and the optimizer state both saved at the last step, bit for bit
    want, got = saved_state(cfg, watched[1], STEPS), saved_state(cfg, run, STEPS)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_a_signal_during_the_setup_stops_it_there_as_preempted(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "check_step_fits", lambda trainer: signal.raise_signal(signal.SIGTERM))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(
        training.Preempted, match="SIGTERM before the first step: nothing to save; resume with --run-dir"
    ):
        training.train(config(corpus), tmp_path / "run", progress=False)
    assert signal.getsignal(signal.SIGTERM) is handler


def test_a_checkpoint_that_cannot_be_read_is_named_with_the_step_to_fall_back_to(watched, tmp_path, devices):
    cfg, run, _ = watched
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "99").mkdir()  # a step cut short (by hand, or a disk that filled up)
    mesh = make_mesh(cfg)
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.restore_params(copy, cfg, mesh)
    message = str(refused.value)
    assert message.startswith(f"checkpoint 99 of {copy} cannot be read (") and "\n" not in message
    assert message.endswith(f"move {copy / 'checkpoints' / '99'} out of the way to resume from step {STEPS}")
    assert (copy / "checkpoints" / "99").is_dir() and ckpt.latest_step(copy) == 99  # nothing deleted


def test_metrics_reach_tensorboard_wandb_and_metrics_jsonl(watched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, _ = watched
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl", "time/data", "time/step"):
        assert key in events.Tags()["scalars"], key
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in logged]
    assert [e.step for e in events.Scalars("val_loss")] == [STEPS]
    # the learning rate each step's update used: linear warmup from 0 (tiny's 30 warmup steps)
    lr = [e.value for e in events.Scalars("lr")]
    assert lr[0] == 0.0 and all(b > a for a, b in zip(lr, lr[1:]))
    for r in logged:  # where each interval went: fractions of its wall time
        assert set(r["time_fraction"]) == {"data", "eval", "checkpoint", "step"}
        assert sum(r["time_fraction"].values()) == pytest.approx(1.0)
    (offline,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"val_loss" in offline.read_bytes() and (run / "wandb_id").read_text()


def test_profile_traces_the_steps_asked_for_with_layer_names(watched):
    _, run, _ = watched
    (trace,) = (run / "profile").glob("plugins/profile/*/*.xplane.pb")
    data = trace.read_bytes()
    assert b"layer0" in data and b"attention" in data and b"mlp" in data  # jax.named_scope per layer and module


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.profile=0:3", "outside the run's steps 1..6"),
        ("train.profile=5:9", "outside the run's steps 1..6"),
        ("train.profile=3", "is not START:END"),
        ("train.wandb_mode=cloud", "train.wandb_mode='cloud' is not a mode; choose from online, offline"),
    ],
)
def test_bad_monitoring_settings_are_one_line_before_anything_runs(override, message, corpus):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=message):
        config(corpus, **{key.replace(".", "__"): value})


def test_wandb_without_its_package_is_refused_before_compiling(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'ladder_jax\[wandb\]'"):
        training.train(config(corpus, train__wandb="p"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_library_and_its_commands_import_without_the_data_serving_and_metrics_extras():
    # A bare GPU machine (jax, flax, optax, orbax) measures the train step and decoding: nothing
    # at import time may need grain, array_record, the server's packages or the metric writers.
    import subprocess

    blocked = ("grain", "array_record", "fastapi", "uvicorn", "openai", "tensorboardX", "wandb", "gcsfs")
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        f"def guard(name, *a, **k):\n    assert name.split('.')[0] not in {blocked!r}, name\n    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import ladder_jax.training, ladder_jax.decode, ladder_jax.engine, ladder_jax.cli\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_two_processes_train_together_stop_together_on_one_sigterm_and_resume(corpus, tmp_path):
    # 2 processes x 4 CPU devices over gloo, fsdp groups spanning both (devices 0-3 are process 0's,
    # 4-7 process 1's); SIGTERM to process 1 alone, then the same command again to the end
    import os
    import subprocess
    import time
    from pathlib import Path

    steps, run = 16, tmp_path / "run"
    (port,) = free_ports()
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), "--no-progress"]
    cmd += ["--sample-tokens", "0", "--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    over = [f"train.data={corpus}", f"train.steps={steps}", "train.batch_size=8", "train.seq_len=32"]
    over += ["train.log_every=1", "train.eval_every=1000", "train.save_every=1000", "train.eval_batches=2"]
    over += ["mesh.fsdp=4", "mesh.tensor=2", "model.d_model=64", "model.n_layers=2", "model.ffn_dim=128"]
    over += ["model.n_heads=8", "model.n_kv_heads=2", "model.max_seq_len=64"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(TEST_XLA_FLAGS)}  # the suite's compile flags

    def start():
        return [
            subprocess.Popen(
                [*cmd, "--process-id", str(i), "--run-dir", str(run), *over],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(2)
        ]

    procs, deadline = start(), time.time() + 240
    while not (run / "metrics.jsonl").exists() and time.time() < deadline and procs[1].poll() is None:
        time.sleep(0.2)  # the first step's metrics: both processes are in the loop
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], outs
    stopped = re.search(r"stopped: (SIGTERM|a signal on another process) at step (\d+): saved checkpoint", outs[0])
    assert stopped, outs[0]
    step = int(stopped.group(2))
    assert 1 <= step < steps and ckpt.latest_step(run) == step
    procs = start()
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert f"resumed {run} at step {step}" in outs[0] and f"step {steps}: loss" in outs[0]
    assert ckpt.latest_step(run) == steps


def test_a_multi_process_run_whose_directory_each_process_sees_alone_stops_in_one_line(corpus, tmp_path):
    # the same run name in each process's own local directory: orbax would write half a checkpoint in each
    import os
    import subprocess
    from pathlib import Path

    (port,) = free_ports()
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), "--no-progress"]
    cmd += ["--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    over = [f"train.data={corpus}", "train.steps=2", "train.batch_size=8", "train.seq_len=32", "mesh.tensor=2"]
    over += ["model.d_model=64", "model.n_layers=1", "model.ffn_dim=128", "model.max_seq_len=64"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(TEST_XLA_FLAGS)}
    procs = [
        subprocess.Popen(
            [*cmd, "--process-id", str(i), "--run-dir", str(tmp_path / f"host{i}" / "run"), *over],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    for out in outs:
        (line,) = [x for x in out.splitlines() if x.startswith("error: ")]
        assert "is not one storage for all 2 processes" in line and "every host mounts" in line, out
        assert "Traceback" not in out, out
    assert not list((tmp_path / "host0" / "run").glob("checkpoints")) and not list(tmp_path.rglob(".process-*"))
