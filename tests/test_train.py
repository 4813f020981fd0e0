"""Training on 8 fake CPU devices: the loss falls, resume is exact, a killed save is skipped,
gradients do not depend on the mesh, and bad input stops before anything compiles."""

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from ladder_jax import checkpoint as ckpt
from ladder_jax import model as M
from ladder_jax import storage
from ladder_jax.cli.train import train_config
from ladder_jax.config import ConfigError, replace
from ladder_jax.data import DataError, PackedWindows, val_batches
from ladder_jax.mesh import make_mesh
from ladder_jax.plan import lookup
from ladder_jax.training import Trainer, TrainingError, global_batch, loss_sums_fn, train

from .conftest import saved_state, small_config

TRAIN = [
    "train.seq_len=32",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.lr=1e-2",
    "train.log_every=1",
    "train.eval_batches=2",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few small text files: enough windows of 32 tokens for training and validation."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.RandomState(0)
    words = ["def", "return", "self", "value", "import", "class", "for", "in", "range", "print", "(", ")", ":"]
    for k in range(12):
        (d / f"doc{k}.py").write_text(" ".join(rng.choice(words, 400)) + "\n")
    return str(d / "*.py")


def config(corpus, *extra, plan="standard", data=2, tensor=4):
    over = {k.split("=")[0]: k for k in [*TRAIN, f"train.data={corpus}", *extra]}
    return small_config(plan, data, tensor, **{k.replace(".", "__"): v.split("=", 1)[1] for k, v in over.items()})


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_loss_decreases_and_resume_continues_exactly(corpus, tmp_path, devices, compiles):
    # scanned: the state is held stacked (model.stack_layers) and saved and restored per layer
    cfg = config(corpus, "train.steps=8", "train.save_every=4", "train.eval_every=8", "train.scan_layers=true")
    straight = train(cfg, tmp_path / "straight", progress=False, log=lambda *_: None)
    full = losses(tmp_path / "straight")
    assert full[8] < full[1] - 0.3, full
    assert np.isfinite(straight["val_loss"])

    train(cfg, tmp_path / "resumed", progress=False, log=lambda *_: None, stop_at=4)
    notes = []
    train(cfg, tmp_path / "resumed", progress=False, log=notes.append)
    assert notes == [f"resumed {tmp_path / 'resumed'} at step 4"]
    resumed = losses(tmp_path / "resumed")
    assert [resumed[s] for s in range(5, 9)] == [full[s] for s in range(5, 9)]
    # Bit for bit: the parameters and the optimizer state of both runs' last checkpoints.
    want, got = saved_state(cfg, tmp_path / "straight", 8), saved_state(cfg, tmp_path / "resumed", 8)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for path, w, g in zip(*zip(*jax.tree_util.tree_leaves_with_path(want)), jax.tree.leaves(got)):
        assert w.dtype == g.dtype and np.array_equal(w, g), jax.tree_util.keystr(path)
    # the step compiled once, for the memory check before the first run's state, and every step
    # of the three calls ran that program (the data's batches match its abstract batch)
    assert compiles.count("jit(step)") == 1, compiles


def test_a_save_killed_midway_is_never_restored(corpus, tmp_path, devices):
    run = tmp_path / "run"
    cfg = config(corpus, "train.steps=3", "train.save_every=2", "train.eval_every=8")
    train(cfg, run, progress=False, log=lambda *_: None, stop_at=2)
    killer = textwrap.dedent(
        f"""
        import os, numpy as np, orbax.checkpoint as ocp
        from ladder_jax.checkpoint import manager
        m = manager({str(run)!r})
        m.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave({{"big": np.ones((64, 1024, 1024), np.float32)}})))
        os._exit(0)  # killed while the asynchronous write is under way
        """
    )
    subprocess.run([sys.executable, "-c", killer], check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("3")]
    assert leftovers and all("tmp" in name for name in leftovers), leftovers  # the kill really hit mid-save
    assert ckpt.latest_step(run) == 2
    notes = []
    train(cfg, run, progress=False, log=notes.append)
    assert notes == [f"resumed {run} at step 2"] and ckpt.latest_step(run) == 3


# (plan, (data, fsdp, tensor), remat, scan): every mesh shape, plan, remat policy and scan setting
# appears at least once without compiling the whole product.
GRADIENT_CASES = [
    ("ladder", (1, 4, 2), "save_dots", True),
    ("ladder", (2, 1, 4), "none", True),  # without a remat the split is a plain psum, its late add tied
    ("standard,ladder@-2:", (2, 2, 2), "full", True),  # a scan per run: standard, then ladder
    ("standard,ladder@-2:", (1, 2, 4), "none", False),  # unrolled: the ladder's late adds (Stream.late)
    ("spd", (1, 2, 4), "none", False),
    ("lp@0:2", (1, 8, 1), "full", False),
    ("parallel", (2, 1, 4), "none", True),
    ("track:2", (2, 1, 4), "full", True),
]


def _batch():
    windows = PackedWindows.of_arrays([np.random.RandomState(1).randint(0, 259, 8 * 33 + 1).astype(np.int32)], 32)
    return val_batches(windows, 8, 1)[0]


@functools.cache
def _host_params(plan):
    """`plan`'s random parameters, made once on one device and placed on each mesh: init_params
    gives the same values on every mesh (the optimizer-step test below makes them on each)."""
    cfg = small_config(plan, model__init_std=0.1)
    return jax.device_get(M.init_params(cfg.model, make_mesh(cfg), 0))


def _grads(plan, shape, remat="none", scan=False):
    data, fsdp, tensor = shape
    cfg = small_config(plan, data, tensor, mesh__fsdp=fsdp, model__init_std=0.1)
    mesh = make_mesh(cfg)
    params = jax.device_put(_host_params(plan), M.param_shardings(cfg.model, mesh))
    loss = lambda p, b: (lambda s, c: s / c)(*loss_sums_fn(cfg.model, mesh, remat, scan)(p, b))  # noqa: E731
    return jax.device_get(jax.jit(jax.grad(loss))(params, global_batch(mesh, _batch())))


@functools.cache
def _reference_grads(plan, tensor):
    """`plan`'s gradients on one data x fsdp device at `tensor` (1 but for tensor-dependent plans)."""
    return _grads(plan, (1, 1, tensor))


@pytest.mark.parametrize("plan, shape, remat, scan", GRADIENT_CASES, ids=lambda c: str(c).replace(" ", ""))
def test_gradients_equal_a_tensor_1_run(plan, shape, remat, scan, devices):
    # SPD and track at tensor > 1 are other functions by design: their reference keeps the tensor size.
    dependent = any(lookup(s).tensor_dependent for s in small_config(plan).model.layer_schedules)
    want, got = _reference_grads(plan, shape[2] if dependent else 1), _grads(plan, shape, remat, scan)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, atol=2e-6, rtol=2e-4)


def test_ladder_gradients_without_the_late_residual_tie_equal_a_tensor_1_run(monkeypatch, devices):
    # XLA:GPU from jax 0.12 compiles the ladder without Stream.settle_after's third barrier
    # (mesh.ties_late_residual): the same function, here scanned, with a remat, on data x fsdp x
    # tensor, against the tensor-1 run with the barrier (made before the patch).
    want = _reference_grads("ladder", 1)
    asked = []
    monkeypatch.setattr(M, "ties_late_residual", lambda platform: asked.append(platform) or False)
    got = _grads("ladder", (1, 2, 4), "full", True)
    assert asked
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, w, atol=2e-6, rtol=2e-4)


def test_an_optimizer_step_on_data_fsdp_tensor_or_in_micro_batches_equals_one_device(corpus, devices):
    def stepped(data, fsdp, tensor, *extra):
        cfg = config(corpus, "train.steps=4", *extra, plan="ladder", data=data, tensor=tensor)
        cfg = replace(cfg, mesh={"fsdp": fsdp, "data": data})
        trainer = Trainer(cfg, make_mesh(cfg))
        state = trainer.init_state(M.init_params(cfg.model, trainer.mesh, 0))
        state, metrics = trainer.step(state, _batch())
        return jax.device_get(trainer.params(state)), float(metrics["loss"])

    want, want_loss = stepped(1, 1, 1)
    for got, got_loss in (
        stepped(2, 2, 2, "train.remat=full", "train.scan_layers=true"),
        stepped(2, 1, 2, "train.grad_accum=2"),  # two micro-batches of 4 rows: the scan over them
    ):
        assert got_loss == pytest.approx(want_loss, rel=1e-5)
        for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_allclose(g, w, atol=2e-6, rtol=2e-4)


@pytest.mark.parametrize(
    "plan, trainable, trained, scan",
    [("standard", "layers:1", {1}, "true"), ("standard,lp@1:3", "lp_pairs", {1, 2}, "false")],
    ids=["layers:1,scanned", "lp_pairs"],
)
def test_trainable_filter_freezes_everything_else(plan, trainable, trained, scan, corpus, tmp_path, devices):
    cfg = config(
        corpus,
        "train.steps=2",
        "train.save_every=2",
        "train.eval_every=8",
        f"train.trainable={trainable}",
        f"train.scan_layers={scan}",  # scanned: a run of layers stored stacked splits where training changes
        plan=plan,
        data=1,
        tensor=8,
    )
    before = jax.device_get(M.init_params(cfg.model, make_mesh(cfg), cfg.train.seed))
    after = jax.device_get(train(cfg, tmp_path / "r", progress=False, log=lambda *_: None)["params"])
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    for i in range(cfg.model.n_layers):
        assert set(jax.tree.leaves(changed["layers"][i])) == {i in trained}, i  # every parameter of a layer, or none
    assert not any(jax.tree.leaves({k: v for k, v in changed.items() if k != "layers"}))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, devices):
    run = tmp_path / "run"
    blowup = config(
        corpus, "train.steps=8", "train.save_every=1", "train.eval_every=8", "train.lr=1e30", "train.warmup_steps=0"
    )
    with pytest.raises(
        TrainingError, match=r"at step (\d+); stopped without saving \(the last good checkpoint is step (\d+)"
    ) as err:
        train(blowup, run, progress=False, log=lambda *_: None)
    bad_step, good_step = map(int, re.search(r"at step (\d+).*step (\d+) in", str(err.value)).groups())
    assert good_step == bad_step - 1 and ckpt.latest_step(run) == good_step
    params = ckpt.restore_params(run, blowup, make_mesh(blowup))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_bad_input_fails_before_compiling(corpus, tmp_path, devices, compiles):
    with pytest.raises(DataError, match="matches no file"):
        train(config(str(tmp_path / "nothing*.txt")), tmp_path / "a", progress=False)
    (tmp_path / "blank.txt").write_text("   \n\t\n")
    with pytest.raises(DataError, match="holds no text"):
        train(config(str(tmp_path / "blank.txt")), tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="train.seq_len=128 exceeds model.max_seq_len=64"):
        config(corpus, "train.seq_len=128")
    other = tmp_path / "other"
    ckpt.check_writable(other)
    ckpt.save_config(other, small_config("standard", model__d_model=32))
    with pytest.raises(ckpt.CheckpointError, match=r"embed.*table.*shape \(384, 32\).*needs \(384, 64\)"):
        train(config(corpus), other, progress=False)
    with pytest.raises(ckpt.CheckpointError, match=r"init-from .* has no complete checkpoint|shape"):
        train(config(corpus), tmp_path / "c", init_from=other, progress=False)
    # A run resumes with its own model and batches; the command line reads its config.yaml.
    laddered = tmp_path / "laddered"
    ckpt.check_writable(laddered)
    ckpt.save_config(laddered, config(corpus, plan="ladder"))
    with pytest.raises(ckpt.CheckpointError, match=r"trained with model.plan=ladder; resuming it with model.plan="):
        train(config(corpus), laddered, progress=False)
    with pytest.raises(
        ckpt.CheckpointError, match=r"train.batch_size=8; resuming it with .*=16 would change the batches"
    ):
        train(config(corpus, "train.batch_size=16", plan="ladder"), laddered, progress=False)
    args = argparse.Namespace(config=None, run_dir=str(laddered), overrides=["train.steps=9"])
    resumed = train_config(args)
    assert (resumed.model.plan, resumed.train.steps, resumed.train.data) == ("ladder", 9, corpus)
    assert train_config(argparse.Namespace(config="tiny", run_dir=str(laddered), overrides=[])).model.plan == "standard"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ckpt.CheckpointError, match=r"mine holds notes.txt but no config.yaml, so it is not a run"):
        train(config(corpus), mine, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me" and not (mine / "config.yaml").exists()
    if os.geteuid() != 0:  # root writes anywhere; the check is then a no-op
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ckpt.CheckpointError, match="cannot write"):
            train(config(corpus), ro / "run", progress=False)
    # Nothing of the model compiled: at most the scalar zero optax's init makes eagerly while
    # the optimizer state's shapes are traced (jax.eval_shape), once per process.
    assert set(compiles) <= {"jit(convert_element_type)"}, compiles


def test_read_only_run_directory_is_refused(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(storage.path(tmp_path)), "mkdir", refuse)
    with pytest.raises(ckpt.CheckpointError, match="cannot write to .*Permission denied.*train.out_dir"):
        ckpt.check_writable(tmp_path / "run")


def test_a_checkpoint_restores_and_resumes_on_another_mesh(corpus, tmp_path, devices):
    # trained scanned (its state stacked) and saved per layer: restored by the tools and resumed unrolled
    extra = ("train.steps=2", "train.save_every=2", "train.eval_every=8", "train.scan_layers=true")
    cfg = replace(config(corpus, *extra, plan="ladder", data=1, tensor=2), mesh={"fsdp": 4})
    trained = train(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    for data, fsdp, tensor in [(1, 8, 1), (2, 1, 4)]:
        other = replace(cfg, mesh={"data": data, "fsdp": fsdp, "tensor": tensor})
        params = ckpt.restore_params(tmp_path / "run", other, make_mesh(other))
        for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(jax.device_get(trained["params"]))):
            np.testing.assert_array_equal(a, b)
    notes = []
    moved = replace(cfg, train={"steps": 3, "scan_layers": False}, mesh={"fsdp": 8, "tensor": 1})
    resumed = train(moved, tmp_path / "run", progress=False, log=notes.append)
    assert notes == [f"resumed {tmp_path / 'run'} at step 2"] and resumed["step"] == 3 and np.isfinite(resumed["loss"])


def test_a_tensor_dependent_plan_is_restored_only_at_its_tensor_degree(tmp_path, devices):
    run = tmp_path / "spd"
    ckpt.check_writable(run)
    ckpt.save_config(run, small_config("spd", 1, 2))
    other = small_config("spd", 1, 4)
    with pytest.raises(ckpt.CheckpointError, match="saved for mesh.tensor=2.*use mesh.tensor=2"):
        ckpt.restore_params(run, other, make_mesh(other))
    # another plan is another choice: SPD applied to these weights anew at tensor 4 is allowed
    standard = small_config("standard", 1, 4)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.restore_params(run, standard, make_mesh(standard))


def test_plot_draws_each_runs_train_and_validation_losses_into_one_png(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from ladder_jax.instruments.plots import plot_runs

    saved, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig) or save(fig, *a, **k))
    curves = {"a": [3.0, 2.5, 2.0], "b": [3.1, 2.7, 2.4]}
    for name, train_losses in curves.items():
        (tmp_path / name).mkdir()
        rows = [{"step": i + 1, "loss": v} for i, v in enumerate(train_losses)]
        rows += [{"step": 3, "val_loss": train_losses[-1] + 0.1, "val_ppl": 9.0}]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = saved
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"a train", "a val", "b train", "b val"}
    for name, train_losses in curves.items():
        train_line, val_line = lines[f"{name} train"], lines[f"{name} val"]
        assert np.array_equal(
            train_line.get_xydata(), [[1, train_losses[0]], [2, train_losses[1]], [3, train_losses[2]]]
        )
        assert np.array_equal(val_line.get_xydata(), [[3, train_losses[-1] + 0.1]])
        assert val_line.get_color() == train_line.get_color()  # a run's two curves in one colour
    assert lines["a train"].get_color() != lines["b train"].get_color()


def test_a_full_disk_is_refused_with_the_numbers(tmp_path):
    with pytest.raises(
        ckpt.CheckpointError,
        match=r"MiB free but a checkpoint needs about .* MiB; free space or choose another train.out_dir",
    ):
        ckpt.check_writable(tmp_path / "run", need_bytes=1 << 60)
