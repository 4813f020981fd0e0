"""Parameters that would not fit stop with one line before they are created or loaded (the
available memory is monkeypatched; nothing large is ever allocated)."""

from types import SimpleNamespace

import numpy as np
import pytest

import infer
import train as train_script
from ladder_jax import checkpoint as ckpt
from ladder_jax import memory, training
from ladder_jax import model as M
from ladder_jax.config import load_config
from ladder_jax.mesh import make_mesh

from .conftest import SMALL, FakeGPU, save_small_run, small_config


def host_ram(monkeypatch, nbytes):
    monkeypatch.setattr(memory, "host_available_bytes", lambda: nbytes)


def test_params_that_do_not_fit_stop_in_one_line_before_they_are_created_or_loaded(
    tmp_path, monkeypatch, capsys, devices
):
    # The measured numbers: parameter bytes of the 8 CPU devices, sharing one host's RAM. Every
    # command below uses this model on this mesh: the one init program they measure compiles once.
    cfg = small_config(tensor=8, model__init_std=0.1)
    mesh = make_mesh(cfg)
    per_device = memory.param_bytes_per_device(cfg.model, mesh)
    # By hand, float32: q, o and the MLP's columns over 8 devices, the 2 KV heads and the norms
    # on every device, the embedding and the head split by the padded vocabulary (384).
    d, hd, ffn, vocab = 64, 8, 128, 384
    layer = 2 * d * 8 * hd // 8 + 2 * d * 2 * hd + 3 * d * ffn // 8 + 2 * d
    assert per_device == M.bytes_per_device(cfg.model, 8) == 4 * (4 * layer + 2 * vocab * d // 8 + d)
    memory.check_fits("x", per_device, mesh, available=lambda d: 8 * per_device)  # exactly enough
    with pytest.raises(memory.MemoryCheckError, match=r"x need .* GiB of RAM on this host \(8 CPU devices x"):
        memory.check_fits("x", per_device, mesh, available=lambda d: 8 * per_device - 1)
    # Random initialisation counts XLA's temporaries too: the parameters, made leaf by leaf, plus
    # the largest temporaries of one leaf's compiled program (one program per kind of leaf: the
    # embedding, head, q/o, k/v, MLP in and out, norms).
    programs = M.init_compiled(cfg.model, mesh)
    assert len(programs) <= 8 and sum(p.memory_analysis().output_size_in_bytes for p in programs) < per_device
    largest = max(p.memory_analysis().temp_size_in_bytes for p in programs)
    assert memory.init_bytes_per_device(cfg.model, mesh) == per_device + largest

    run = save_small_run(tmp_path, n_layers=4, tensor=8)
    host_ram(monkeypatch, 1000)
    monkeypatch.setattr(M, "init_params", lambda *a, **k: pytest.fail("random parameters were created"))
    monkeypatch.setattr(ckpt.ocp.CheckpointManager, "restore", lambda *a, **k: pytest.fail("a checkpoint was loaded"))
    model = [*SMALL, "model.init_std=0.1", "mesh.data=1", "mesh.tensor=8"]
    small = [*model, f"train.data={tmp_path / 'text.txt'}", "train.batch_size=8"]
    bench = ["--benchmark", *model, "--variants", "standard", "--batch-sizes", "1", "--prompt-len", "8"]
    bench += ["--gen-len", "8"]  # max_seq_len stays 64: the same model as cfg
    commands = [
        (infer.main, bench, 2),
        (infer.main, ["--checkpoint", str(run), "--prompt", "ab", "--max-new-tokens", "4"], 2),
        (train_script.main, ["--run-dir", str(tmp_path / "new"), "--no-progress", *small, "train.steps=1"], 2),
    ]
    for main, argv, status in commands:
        assert main(argv) == status, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and "GiB of RAM on this host" in err, err
        assert "but 0.00 GiB is available; use a smaller preset" in err and "or an accelerator" in err, err
    assert not (tmp_path / "new").exists()


def test_an_accelerator_compares_one_devices_share_with_its_free_memory():
    mesh = SimpleNamespace(devices=np.array([FakeGPU(2**30), FakeGPU(3 * 2**30)]), shape={"data": 1, M.TENSOR: 2})
    memory.check_fits("the parameters", 2**30, mesh)
    with pytest.raises(
        memory.MemoryCheckError,
        match=r"the parameters need 1.50 GiB per device \(mesh data=1 x tensor=2\) but cuda:0 has 1.00 GiB free; "
        r"use a smaller preset or more tensor devices \(mesh.tensor=4\)",
    ):
        memory.check_fits("the parameters", 3 * 2**29, mesh)


def test_a_train_step_whose_activations_do_not_fit_stops_in_one_line_before_any_state_is_made(
    tmp_path, monkeypatch, capsys, devices
):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    over = [*SMALL, "model.plan=standard", "mesh.data=1", "mesh.tensor=8", f"train.data={text}", "train.batch_size=8"]
    cfg = load_config("tiny", over)
    mesh = make_mesh(cfg)
    trainer = training.get_trainer(cfg, mesh)  # the one train.py gets: its step compiles once here
    step = memory.step_bytes(trainer.compile())
    state = memory.check_training_fits(cfg.model, mesh, trainer.abstract_state(), True)
    # The step's own count: the state (arguments) plus XLA's temporaries, the state written in place
    assert step["aliased"] > 0 and step["total"] == step["arguments"] + step["outputs"] - step["aliased"] + (
        step["temporaries"] + step["code"]
    )
    assert state < step["total"]  # enough RAM for the state alone, not for a step
    host_ram(monkeypatch, 8 * step["total"] - 1)
    monkeypatch.setattr(M, "init_params", lambda *a, **k: pytest.fail("random parameters were created"))
    run = tmp_path / "run"
    assert train_script.main(["--run-dir", str(run), "--no-progress", *over, "train.steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        "error: a train step's state, batch and activations (tiny, 8 x 32 tokens) need "
        f"{8 * step['total'] / memory.GiB:.2f} GiB of RAM on this host (8 CPU devices x"
    ), err
    assert "use train.remat=full, train.grad_accum=2 (half the rows per micro-batch), a shorter train.seq_len" in err
    assert not (run / "config.yaml").exists()  # nothing of the run written
    host_ram(monkeypatch, 8 * step["total"])  # exactly enough
    assert memory.check_step_fits(trainer) == step


class FakeTrainer:
    """What check_step_fits asks of a Trainer, on one fake GPU or TPU whose compile says `compiled`."""

    def __init__(self, compiled, remat="none", grad_accum=1):
        train = SimpleNamespace(remat=remat, grad_accum=grad_accum, batch_size=8, seq_len=2048)
        self.cfg = SimpleNamespace(train=train, model=SimpleNamespace(name="ladder-1b"))
        self.mesh = SimpleNamespace(devices=np.array([FakeGPU(79 * 2**30)]), shape={"data": 1, "fsdp": 1, M.TENSOR: 1})
        self.compiled = compiled

    def compile(self):
        if isinstance(self.compiled, Exception):
            raise self.compiled
        return self.compiled


def test_a_train_step_too_large_for_an_accelerator_is_refused_with_its_fixes():
    # ladder-1b at 8 x 2048 with xla attention and no remat on one H100 (analysis memory's figures)
    gib = 2**30
    analysis = SimpleNamespace(
        argument_size_in_bytes=14.35 * gib,
        output_size_in_bytes=14.35 * gib,
        alias_size_in_bytes=14.35 * gib,
        temp_size_in_bytes=93.10 * gib,
        generated_code_size_in_bytes=0,
    )
    compiled = SimpleNamespace(memory_analysis=lambda: analysis)
    with pytest.raises(
        memory.MemoryCheckError,
        match=r"^a train step's state, batch and activations \(ladder-1b, 8 x 2048 tokens\) need 107.45 GiB per "
        r"device \(mesh data=1 x tensor=1\) but cuda:0 has 79.00 GiB free; use train.remat=full, "
        r"train.grad_accum=2 \(half the rows per micro-batch\), a shorter train.seq_len or more",
    ):
        memory.check_step_fits(FakeTrainer(compiled))
    # XLA:TPU refuses the compile itself: its sentence, and the same fixes (remat full is on already)
    refused = RuntimeError(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
        "Used 107.45G of 15.75G hbm. Exceeded hbm capacity by 91.70G.\nmore"
    )
    with pytest.raises(memory.MemoryCheckError) as err:
        memory.check_step_fits(FakeTrainer(refused, remat="full", grad_accum=8))
    assert str(err.value) == (
        "a train step's state, batch and activations (ladder-1b, 8 x 2048 tokens) do not fit: XLA:TPU compile "
        "permanent error. Ran out of memory in memory space hbm. Used 107.45G of 15.75G hbm. Exceeded hbm "
        "capacity by 91.70G; use a smaller preset or a shorter train.seq_len"
    )
    with pytest.raises(ValueError, match="other"):  # any other compile error is not a memory matter
        memory.check_step_fits(FakeTrainer(ValueError("other")))
