"""The Layer Parallelism sweep on a small saved model."""
import json

import numpy as np
import orbax.checkpoint as ocp
import pytest

from ladder_jax import checkpoint as ckpt
from ladder_jax import lp
from ladder_jax import model as M
from ladder_jax.config import ConfigError
from ladder_jax.mesh import make_mesh

from .conftest import small_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, devices):
    d = tmp_path_factory.mktemp("lp")
    rng = np.random.RandomState(0)
    (d / "text.txt").write_text("".join(rng.choice(list("abcdefgh ij\n"), 20_000)))
    cfg = small_config("standard", 1, 2, model__n_layers=3, model__init_std=0.1, train__data=str(d / "text.txt"), train__batch_size=4, train__eval_batches=2, train__val_fraction=0.2)
    run = d / "run"
    ckpt.check_writable(run)
    ckpt.save_config(run, cfg)
    m = ckpt.manager(run)
    m.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(M.init_params(cfg.model, make_mesh(cfg), 0))))
    m.wait_until_finished()
    return run


def test_sweep_writes_perplexity_agreement_and_a_suggestion(run, capsys):
    assert lp.main(["sweep", "--checkpoint", str(run), "--max-delta", "2", "--prompts", "2", "--gen-tokens", "8", "--budget", "1e9"]) == 0
    report = json.loads((run / "lp_sweep.json").read_text())
    rows = report["rows"]
    assert [r["delta"] for r in rows] == [0, 2]
    assert rows[0]["agreement"] == 1.0 and rows[0]["ppl_increase"] == 0.0
    assert rows[1]["plan"] in ("standard,lp@0:2", "standard,lp@1:3")  # the better of the two placements
    assert rows[1]["val_ppl"] != rows[0]["val_ppl"]  # pairing changes the function
    assert report["suggested"]["delta"] == 2  # an unlimited budget takes the largest Δ
    assert "train.trainable=lp_pairs" in capsys.readouterr().out


def test_agreement_counts_matching_positions():
    assert lp.agreement([[1, 2, 3], [4, 5]], [[1, 9, 3], [4, 5]]) == 4 / 5


def test_sweep_refuses_a_mixed_plan_and_an_odd_delta():
    with pytest.raises(ConfigError, match="mixes schedules"):
        lp.lp_plan("standard,ladder@2:", 4, 0, 2)
    with pytest.raises(ConfigError, match="odd-length lp run"):
        lp.lp_plan("standard", 4, 0, 3)
