"""The effective-depth transformations (prune, merge, shuffle, parallel) against the float64 NumPy
reference computed from the ORIGINAL weights, the runs they write, and the `lp depth` study."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from ladder_jax import checkpoint as ckpt
from ladder_jax import model as M
from ladder_jax.cli import main
from ladder_jax.config import load_config
from ladder_jax.mesh import make_mesh
from ladder_jax.methods import depth
from ladder_jax.methods.depth import DepthError, Transform
from ladder_jax.plan import parse_plan

from .conftest import save_small_run, small_config
from .reference import forward as reference_forward

TOKENS = np.random.RandomState(1).randint(0, 259, (4, 12))


def f64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


def mean_layer(*layers):
    return jax.tree.map(lambda *xs: sum(xs) / len(xs), *layers)


# What each transformation of the 4-layer small model must compute, written out by hand from the
# original layers L: (reference layers, their schedules).
CASES = {
    "prune 1:3": (Transform("prune", 1, 3), lambda L: ([L[0], L[3]], ["standard"] * 2)),
    "prune 0:1": (Transform("prune", 0, 1), lambda L: ([L[1], L[2], L[3]], ["standard"] * 3)),
    "merge 0:4": (
        Transform("merge", 0, 4),
        lambda L: ([mean_layer(L[0], L[1]), mean_layer(L[2], L[3])], ["standard"] * 2),
    ),
    "merge 1:3": (Transform("merge", 1, 3), lambda L: ([L[0], mean_layer(L[1], L[2]), L[3]], ["standard"] * 3)),
    "merge 0:3 by 3": (
        Transform("merge", 0, 3, group=3),
        lambda L: ([mean_layer(L[0], L[1], L[2]), L[3]], ["standard"] * 2),
    ),
    "shuffle 0:4": (Transform("shuffle", 0, 4, (2, 0, 3, 1)), lambda L: ([L[2], L[0], L[3], L[1]], ["standard"] * 4)),
    "shuffle 1:3": (Transform("shuffle", 1, 3, (2, 1)), lambda L: ([L[0], L[2], L[1], L[3]], ["standard"] * 4)),
    "parallel 1:3": (
        Transform("parallel", 1, 3),
        lambda L: ([L[i] for i in range(4)], ["standard", "lp", "lp", "standard"]),
    ),
}


@pytest.fixture(scope="module")
def original(devices):
    cfg = small_config("standard", 1, 1, model__init_std=0.1)
    mesh = make_mesh(cfg)
    params = M.init_params(cfg.model, mesh, 0)
    return cfg.model, params, np.asarray(M.logits(cfg.model, mesh, params, TOKENS))


def reference(m, params, layers, schedules):
    p = f64(params)
    p["layers"] = dict(enumerate(layers))
    return reference_forward(p, TOKENS, dataclasses.replace(m, n_layers=len(layers)), tuple(schedules))


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 4)], ids=lambda s: f"data{s[0]}xtensor{s[1]}")
@pytest.mark.parametrize("case", list(CASES))
def test_transformed_model_matches_the_reference_from_the_original_weights(original, case, mesh_shape):
    m, params, before = original
    t, expected = CASES[case]
    cfg = small_config("standard", *mesh_shape, model__init_std=0.1)
    mesh = make_mesh(cfg)
    params = jax.device_put(params, M.param_shardings(cfg.model, mesh))
    new_cfg, new_params = depth.apply(t, cfg.model, params, mesh)
    logits = np.asarray(M.logits(new_cfg, mesh, new_params, TOKENS))
    layers, schedules = expected(f64(params)["layers"])
    assert new_cfg.n_layers == len(layers) and new_cfg.layer_schedules == tuple(schedules)
    np.testing.assert_allclose(logits, reference(m, params, layers, schedules), atol=2e-5, rtol=1e-4)
    assert np.abs(logits - before).max() > 1e-3  # the transformation changed the function


def test_a_layer_keeps_its_schedule_when_layers_move(original):
    """Ladder layers 2, 3 of standard,ladder@2: stay ladder: pruning layer 1 gives standard,ladder@1:."""
    m, params, _ = original
    hybrid = dataclasses.replace(m, plan="standard,ladder@2:")
    new_cfg, new_params = depth.apply(Transform("prune", 1, 2), hybrid, params)
    assert new_cfg.plan == "standard,ladder@1:"
    L = f64(params)["layers"]
    schedules = ["standard", "ladder", "ladder"]
    mesh = make_mesh(small_config("standard", 1, 1))
    logits = np.asarray(M.logits(new_cfg, mesh, new_params, TOKENS))
    np.testing.assert_allclose(logits, reference(m, params, [L[0], L[2], L[3]], schedules), atol=2e-5, rtol=1e-4)
    shuffled, _ = depth.apply(Transform("shuffle", 1, 3, (2, 1)), hybrid, params)
    assert shuffled.layer_schedules == ("standard", "ladder", "standard", "ladder")


def test_merged_weights_are_averaged_in_float32_and_keep_the_dtype(devices):
    cfg = small_config("standard", 1, 1, model__init_std=0.1, model__param_dtype="bfloat16")
    params = M.init_params(cfg.model, make_mesh(cfg), 0)
    _, new = depth.apply(Transform("merge", 0, 2), cfg.model, params)
    q = lambda p: np.asarray(p["attn"]["q_proj"], np.float32)  # noqa: E731
    assert new["layers"][0]["attn"]["q_proj"].dtype == params["layers"][0]["attn"]["q_proj"].dtype
    want = ((q(params["layers"][0]) + q(params["layers"][1])) / 2).astype(jax.numpy.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(q(new["layers"][0]), want)
    assert new["layers"][1] is params["layers"][2]  # layers outside the range are not copied


@pytest.mark.parametrize(
    "schedules",
    [
        ("standard",) * 4,
        ("ladder", "standard", "standard", "ladder"),
        ("lp", "lp", "standard", "lp", "lp", "spd"),
        ("parallel", "ladder", "ladder", "ladder", "lp", "lp", "lp", "lp"),
    ],
)
def test_encode_plan_round_trips(schedules):
    assert parse_plan(depth.encode_plan(schedules), len(schedules)) == schedules


@pytest.mark.parametrize(
    "t, plan, match",
    [
        (Transform("prune", 0, 4), "standard", "would remove all 4 layers"),
        (Transform("merge", 0, 3), "standard", "do not split into groups of 2"),
        (Transform("parallel", 1, 4), "standard", "give an even range"),
        (Transform("parallel", 0, 2), "standard,parallel@1", "one-norm"),
        (Transform("shuffle", 0, 2, (0, 2)), "standard", "not a permutation"),
        (Transform("prune", 1, 3), "standard,lp@2:4", "already in a step of several lp layers"),
        (Transform("merge", 0, 2), "standard,ladder@1:", "different schedules"),
        (Transform("prune", 2, 6), "standard", "outside 0..3"),
    ],
)
def test_transformations_that_cannot_apply_are_refused(t, plan, match):
    with pytest.raises(DepthError, match=match):
        depth.transformed_config(t, small_config(plan).model)


def test_command_line_ranges_and_orders():
    assert depth.parse_range("-2:", 6, "--prune") == (4, 6)
    assert depth.make_transform("shuffle", "1:4", 6, "3,1,2").order == (3, 1, 2)
    t = depth.make_transform("shuffle", "0:4", 6, seed=3)
    assert sorted(t.order) == [0, 1, 2, 3] and t.order != (0, 1, 2, 3)
    for bad, match in (("4", "START:END"), ("a:b", "START:END"), ("3:9", "outside"), ("3:3", "empty")):
        with pytest.raises(DepthError, match=match):
            depth.parse_range(bad, 6, "--prune")
    with pytest.raises(DepthError, match="each layer of 1..3 once"):
        depth.make_transform("shuffle", "1:4", 6, "1,2,2")
    with pytest.raises(DepthError, match="--order goes with --shuffle"):
        depth.make_transform("prune", "1:4", 6, "1,2,3")
    assert len(depth.shuffle_orders(2, 4, 5, 0)) == 1  # a pair has one other order
    assert len(set(depth.shuffle_orders(0, 4, 5, 0))) == 5


# ---------------------------------------------------------------------------------------------
# Runs: transform writes a run that loads and trains; the study


@pytest.fixture(scope="module")
def run(tmp_path_factory, devices):
    return save_small_run(tmp_path_factory.mktemp("depth"), n_layers=4, train__eval_batches=2)


def test_transform_writes_a_run_that_loads_and_fine_tunes(run, tmp_path, capsys):
    from ladder_jax.training import train

    out = tmp_path / "merged"
    assert main(["lp", "transform", "--checkpoint", str(run), "--merge", "1:3", "--out", str(out)]) == 0
    assert "4 -> 3 layers" in capsys.readouterr().out
    loaded = ckpt.load_run(out)
    original = ckpt.load_run(run)
    assert loaded.cfg.model.n_layers == 3 and loaded.cfg.model.plan == "standard"
    _, want = depth.apply(Transform("merge", 1, 3), original.cfg.model, original.params, original.mesh)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert json.loads((out / "lp_transform.json").read_text())["layers"] == [[0], [1, 2], [3]]
    cfg = load_config(out / "config.yaml", ["train.steps=1", "train.eval_every=1"])
    result = train(cfg, tmp_path / "tuned", init_from=out, progress=False, log=lambda *_: None)
    assert result["step"] == 1 and np.isfinite(result["loss"])


@pytest.mark.parametrize(
    "args, match",
    [
        (["--prune", "2:9"], "outside 0..3"),
        (["--prune", "0:4"], "would remove all 4 layers"),
        (["--merge", "0:3"], "groups of 2"),
        (["--shuffle", "0:3", "--order", "0,1"], "each layer of 0..2 once"),
        (["--parallel", "1:2"], "even range"),
    ],
)
def test_transform_refuses_bad_ranges_in_one_line_before_loading(run, tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.setattr(ckpt, "load_run", lambda *a, **k: pytest.fail("loaded the run"))
    assert main(["lp", "transform", "--checkpoint", str(run), *args, "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and match in err
    assert not (tmp_path / "new").exists()


def test_depth_refuses_bad_input_before_loading(run, monkeypatch, capsys):
    monkeypatch.setattr(ckpt, "load_run", lambda *a, **k: pytest.fail("loaded the run"))
    for args, match in (
        (["--delta", "3"], "odd"),
        (["--delta", "9"], "between 1 and"),
        (["--transform", "shuffle,fold"], "choose from"),
        (["--start", "3"], "does not fit"),
    ):
        assert main(["lp", "depth", "--checkpoint", str(run), *args]) == 2
        assert match in capsys.readouterr().err


def test_depth_study_reports_every_transformation(run, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["lp", "depth", "--checkpoint", str(run), "--delta", "2,4", "--seeds", "3", "--out", str(out)]) == 0
    report = json.loads((out / "lp_depth.json").read_text())
    rows = {(r["transform"], r["delta"]): r for r in report["rows"]}
    assert set(rows) == {(k, d) for k in depth.TRANSFORMS for d in (2, 4)}
    assert rows[("prune", 4)]["skipped"] and rows[("prune", 4)]["val_ppl"] is None  # no layer would be left
    assert (rows[("prune", 2)]["start"], rows[("prune", 2)]["end"]) == (1, 3)  # the middle of 4 layers
    assert rows[("shuffle", 2)]["orders"] == [[2, 1]]  # a pair has one other order
    assert len(rows[("shuffle", 4)]["orders"]) == 3
    assert rows[("merge", 2)]["n_layers"] == 3 and rows[("parallel", 4)]["plan"] == "lp"
    # Each value is the one evaluator on the transformed model.
    r = ckpt.load_run(run)
    val = r.validation_batches()
    from ladder_jax.training import evaluate

    cfg, params = depth.apply(Transform("prune", 1, 3), r.cfg.model, r.params, r.mesh)
    assert rows[("prune", 2)]["val_ppl"] == pytest.approx(evaluate(cfg, r.mesh, params, val)["val_ppl"], rel=1e-6)
    assert report["base_ppl"] == pytest.approx(evaluate(r.cfg.model, r.mesh, r.params, val)["val_ppl"], rel=1e-6)
    assert "parallel" in capsys.readouterr().out
