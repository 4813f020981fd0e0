"""Sync-Point Drop tools: sensitivity, head regrouping, block-to-block distillation, apply."""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest

from ladder_jax import checkpoint as ckpt
from ladder_jax import model as M
from ladder_jax.cli import main
from ladder_jax.config import ConfigError
from ladder_jax.mesh import make_mesh
from ladder_jax.methods import spd

from .conftest import save_small_run, small_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, devices):
    """A saved 3-layer standard model (8 query / 2 KV heads) with text data to calibrate on."""
    return save_small_run(tmp_path_factory.mktemp("spd"))


@pytest.fixture(scope="module")
def sensitivity(run):
    assert main(["spd", "sensitivity", "--checkpoint", str(run), "--tensor", "4", "--calibration", "8"]) == 0
    return json.loads((run / "spd_sensitivity_t4.json").read_text())


def test_sensitivity_walks_back_from_the_last_block_and_ranks_every_block(sensitivity, run):
    blocks = sensitivity["blocks"]
    assert [b["block"] for b in blocks] == [0, 1, 2] and sorted(b["rank"] for b in blocks) == [0, 1, 2]
    # Each drop is measured on top of the later blocks' drops: a chain from the standard model down.
    assert blocks[2]["ppl_without"] == sensitivity["base_ppl"]
    assert blocks[1]["ppl_without"] == blocks[2]["ppl_with"] and blocks[0]["ppl_without"] == blocks[1]["ppl_with"]
    for b in blocks:
        assert b["delta"] == pytest.approx(b["ppl_with"] / b["ppl_without"] - 1)
        assert b["class"] == spd.classify(b["delta"], 0.005, 0.05)
    assert blocks[0]["ppl_with"] != sensitivity["base_ppl"]  # at tensor 4 dropping syncs changes the model
    assert (run / "spd_sensitivity_t4.png").exists()


def test_apply_writes_a_run_that_loads_with_the_spd_plan(sensitivity, run, tmp_path):
    report = dict(sensitivity, blocks=[dict(b) for b in sensitivity["blocks"]])
    for b, c in zip(report["blocks"], spd.CLASSES):  # one block of each class
        b["class"] = c
    (tmp_path / "sens.json").write_text(json.dumps(report))
    out = tmp_path / "spd-run"
    args = [
        "apply",
        "--checkpoint",
        str(run),
        "--sensitivity",
        str(tmp_path / "sens.json"),
        "--drop",
        "0,1,2",
        "--steps",
        "3",
        "--held-out",
        "4",
        "--calibration",
        "12",
        "--out",
        str(out),
    ]
    assert main(["spd", *args]) == 0
    done = json.loads((out / "spd_apply.json").read_text())
    assert done["plan"] == "standard,spd@0,spd@1,spd@2"
    rows = {r["block"]: r for r in done["blocks"]}
    assert not rows[0]["regrouped"] and "mse_after" not in rows[0]  # insensitive: zero-shot
    assert not rows[1]["regrouped"] and rows[1]["mse_after"] > 0  # sensitive: distilled
    assert rows[2]["regrouped"] and sorted(rows[2]["head_order"]) == list(range(8))
    loaded = ckpt.load_run(out, ["mesh.tensor=4", "mesh.data=2"], jax.devices())
    cfg, mesh, params = loaded.cfg, loaded.mesh, loaded.params
    assert cfg.model.layer_schedules == ("spd",) * 3
    original = ckpt.restore_params(run, cfg, mesh)
    np.testing.assert_array_equal(params["layers"][0]["attn"]["q_proj"], original["layers"][0]["attn"]["q_proj"])
    assert np.isfinite(np.asarray(M.logits(cfg.model, mesh, params, np.zeros((2, 8), np.int32)))).all()


def _calibration(cfg, n=8, seq=32, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, cfg.model.vocab_size, (n, seq)).astype(np.int32)
    pos = np.broadcast_to(np.arange(seq, dtype=np.int32), (n, seq)).copy()
    return [
        {"inputs": tokens[i : i + 4], "positions": pos[i : i + 4], "segment_ids": np.zeros((4, seq), np.int32)}
        for i in range(0, n, 4)
    ]


@pytest.mark.parametrize("tensor", [2, 4])  # 2: whole KV groups move; 4: heads move within a KV group
def test_head_regrouping_leaves_the_standard_models_logits_unchanged(tensor, devices):
    cfg = small_config("standard", 8 // tensor, tensor, model__n_layers=2, model__init_std=0.1)
    mesh = make_mesh(cfg, devices)
    params = M.init_params(cfg.model, mesh, 1)
    data = spd.block_data(cfg.model, mesh, params, _calibration(cfg), [1])[1]
    perm_q, perm_kv = spd.regroup_heads(
        cfg.model, params["layers"][1], data.x, data.positions, data.segment_ids, tensor
    )
    group = cfg.model.n_heads // cfg.model.n_kv_heads
    assert sorted(perm_q) == list(range(8)) and sorted(perm_kv) == [0, 1]
    assert all(perm_kv[p // group] == h // group for p, h in enumerate(perm_q))  # every query head keeps its KV head
    tokens = _calibration(cfg)[0]["inputs"]
    want = np.asarray(M.logits(cfg.model, mesh, params, tokens))
    # The chosen permutation, and one that moves every head (so the check can fail).
    swapped = (list(range(8))[::-1], [1, 0])
    for pq, pkv in ((perm_q, perm_kv), swapped):
        moved = dict(params, layers={**params["layers"], 1: spd.permute_heads(params["layers"][1], pq, pkv)})
        np.testing.assert_allclose(np.asarray(M.logits(cfg.model, mesh, moved, tokens)), want, rtol=1e-5, atol=1e-5)
    spd_cfg = dataclasses.replace(cfg.model, plan="standard,spd@1")
    bad = dict(
        params, layers={**params["layers"], 1: spd.permute_heads(params["layers"][1], list(range(8))[::-1], [0, 1])}
    )
    assert not np.allclose(
        np.asarray(M.logits(cfg.model, mesh, bad, tokens)), want, atol=1e-4
    )  # an invalid one does change it
    assert not np.allclose(np.asarray(M.logits(spd_cfg, mesh, params, tokens)), want, atol=1e-4)


def test_distillation_lowers_the_blocks_output_mse_on_held_out_data(devices):
    cfg = small_config("standard", 2, 4, model__n_layers=2, model__init_std=0.1, train__batch_size=4)
    mesh = make_mesh(cfg, devices)
    params = M.init_params(cfg.model, mesh, 2)
    data = spd.block_data(cfg.model, mesh, params, _calibration(cfg, n=72), [1])[1]
    train, held = data.split(8)
    before = spd.block_mse(cfg.model, mesh, params["layers"][1], held, 4)
    assert before > 0  # at tensor 4 the SPD block differs from the original
    trained = spd.distill(cfg, mesh, params["layers"][1], train, steps=40, lr=1e-3)
    after = spd.block_mse(cfg.model, mesh, trained, held, 4)
    assert after < 0.8 * before


def _report(**change):
    blocks = [
        {"block": i, "delta": d, "rank": r, "class": "insensitive"}
        for i, (d, r) in enumerate([(0.03, 2), (0.001, 0), (0.01, 1)])
    ]
    return {"model": "tiny", "n_layers": 3, "d_model": 64, "tensor": 4, "fingerprint": 1.0, "blocks": blocks, **change}


def test_budgets_pick_the_least_sensitive_blocks_and_refuse_what_no_plan_meets():
    assert spd.choose_blocks(_report(), blocks=2) == [1, 2]
    assert spd.choose_blocks(_report(), max_increase=0.012) == [1, 2]
    assert spd.choose_blocks(_report(), max_increase=0.002) == [1]
    with pytest.raises(spd.SPDError, match="no SPD plan keeps the perplexity increase within 0.05%"):
        spd.choose_blocks(_report(), max_increase=0.0005)
    with pytest.raises(spd.SPDError, match="--drop names block 7 but the model has 3 blocks"):
        spd.choose_blocks(_report(), drop=[1, 7])
    with pytest.raises(spd.SPDError, match="block 5 does not exist in a 3-layer model"):
        spd.spd_plan("standard", 3, [5])
    with pytest.raises(ConfigError, match="starts from a standard model"):
        spd.spd_plan("ladder", 3, [1])
    with pytest.raises(ConfigError, match="spd@9"):
        small_config("standard,spd@9")


def test_a_sensitivity_file_for_another_model_is_refused_before_loading(run, tmp_path, capsys):
    (tmp_path / "other.json").write_text(json.dumps(_report(model="ladder-1b", n_layers=40, d_model=1536)))
    out = tmp_path / "never"
    assert (
        main(
            [
                "spd",
                "apply",
                "--checkpoint",
                str(run),
                "--sensitivity",
                str(tmp_path / "other.json"),
                "--blocks",
                "1",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "was measured on {'model': 'ladder-1b'" in capsys.readouterr().err
    cfg = ckpt.load_run_config(run)
    with pytest.raises(spd.SPDError, match="other weights"):
        spd.check_sensitivity(_report(), cfg, 4, "f.json", fp=2.0)
    with pytest.raises(spd.SPDError, match="measured at tensor=4, this run uses tensor=8"):
        spd.check_sensitivity(_report(), cfg, 8, "f.json")
    assert not out.exists()


def test_apply_measures_the_standard_model_on_the_sequences_sensitivity_used(sensitivity, run, tmp_path, capsys):
    # Sensitivity ran on 8 calibration sequences; apply, without --calibration, reuses exactly those.
    assert sensitivity["calibration"]["windows"] == 8 and sensitivity["calibration"]["batch_size"] == 4
    capsys.readouterr()
    argv = ["spd", "apply", "--checkpoint", str(run), "--sensitivity", str(run / "spd_sensitivity_t4.json")]
    assert main([*argv, "--drop", "2", "--steps", "1", "--held-out", "4", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "calibration: the first 8 validation windows of 32 tokens, the sequences" in out
    assert f"standard (every block synced): calibration ppl {sensitivity['base_ppl']:.4f}" in out
    done = json.loads((tmp_path / "o" / "spd_apply.json").read_text())
    assert done["calibration"] == sensitivity["calibration"]
    assert done["ppl_standard"] == pytest.approx(sensitivity["base_ppl"], rel=1e-6)
    # Other sequences (--calibration 12) are named as such, next to the file's own baseline.
    other = dict(sensitivity["calibration"], windows=12, tokens_sha1="0")
    line = spd.compare_calibration(sensitivity, other, "s.json")
    assert (
        "the first 12 validation windows" in line
        and "NOT the first 8 validation windows of 32 tokens that s.json" in line
    )


def test_a_tensor_or_calibration_spd_cannot_use_is_refused_in_one_line(run, tmp_path, capsys):
    # A copy of the run's config at mesh.tensor=1: refused before its parameters would load.
    one = tmp_path / "t1"
    one.mkdir()
    (one / "config.yaml").write_text((run / "config.yaml").read_text().replace("tensor: 2", "tensor: 1"))
    assert "tensor: 1" in (one / "config.yaml").read_text()
    (tmp_path / "notjson.txt").write_text("just some text\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "t1.json").write_text(json.dumps(_report(tensor=1)))
    sens = ["spd", "sensitivity", "--checkpoint", str(run)]
    apply = [*sens[:1], "apply", "--checkpoint", str(run), "--blocks", "1", "--out", str(tmp_path / "o")]
    cases = [
        ([*sens, "--tensor", "0"], r"--tensor 0: SPD drops a tensor-parallel all-reduce.*pass --tensor N>=2"),
        ([*sens, "--tensor", "1"], r"--tensor 1: .*pass --tensor N>=2"),
        (["spd", "sensitivity", "--checkpoint", str(one)], r"runs at mesh.tensor=1, where SPD equals standard.*N>=2"),
        ([*sens, "--calibration", "0"], r"--calibration 0: give at least 1 calibration sequence"),
        ([*sens, "--calibration", "-5"], r"--calibration -5: give at least 1"),
        ([*apply, "--sensitivity", str(tmp_path / "notjson.txt")], r"notjson\.txt is not JSON \(Expecting value"),
        ([*apply, "--sensitivity", str(tmp_path / "list.json")], r"list\.json is JSON but not a sensitivity file"),
        ([*apply, "--sensitivity", str(tmp_path / "t1.json")], r"measured at tensor=1, where SPD equals standard"),
        ([*apply, "--sensitivity", str(tmp_path / "t1.json"), "--tensor", "1"], r"--tensor 1: "),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "o").exists() and not list(run.glob("spd_sensitivity_t1*"))
    with pytest.raises(spd.SPDError, match="--calibration 0"):
        spd.check_options(calibration=0)
