"""The Layer Parallelism sweep on a small saved model."""

import json

import jax
import numpy as np
import pytest

from ladder_jax import checkpoint as ckpt
from ladder_jax.cli import main
from ladder_jax.config import ConfigError
from ladder_jax.methods import lp

from .conftest import save_small_run
from .reference import forward as reference_forward


@pytest.fixture(scope="module")
def run(tmp_path_factory, devices):
    return save_small_run(tmp_path_factory.mktemp("lp"), train__eval_batches=2)


def reference_perplexity(params, cfg, batches, schedules) -> float:
    """exp(mean NLL) of the NumPy reference model over the validation windows (each one document
    from position 0, so the plain causal reference applies)."""
    nll = count = 0.0
    for b in batches:
        assert (b["segment_ids"] == b["segment_ids"][:, :1]).all() and (b["positions"] == np.arange(32)).all()
        logits = reference_forward(params, b["inputs"], cfg, schedules)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= (np.take_along_axis(logp, b["targets"][..., None], -1)[..., 0] * b["mask"]).sum()
        count += b["mask"].sum()
    return float(np.exp(nll / count))


def test_sweep_picks_the_placement_the_reference_finds_better_and_suggests_within_the_budget(run, capsys):
    loaded = ckpt.load_run(run, ["mesh.tensor=2"])
    cfg, params, val = loaded.cfg.model, jax.device_get(loaded.params), loaded.validation_batches()
    base = reference_perplexity(params, cfg, val, ["standard"] * 3)
    costs = {
        f"standard,lp@{a}:{a + 2}": reference_perplexity(params, cfg, val, schedules) / base - 1
        for a, schedules in ((0, ["lp", "lp", "standard"]), (1, ["standard", "lp", "lp"]))
    }
    better = min(costs, key=costs.get)
    assert abs(costs["standard,lp@0:2"] - costs["standard,lp@1:3"]) > 0.02  # a clear choice (float rounding: 1e-6)
    argv = ["lp", "sweep", "--checkpoint", str(run), "--max-delta", "2", "--prompts", "2", "--gen-tokens", "8"]
    assert main(argv) == 0  # the default budget: perplexity may grow by 5%
    report = json.loads((run / "lp_sweep.json").read_text())
    rows = report["rows"]
    assert [r["delta"] for r in rows] == [0, 2] and report["budget"] == 0.05
    assert rows[0]["val_ppl"] == pytest.approx(base, rel=1e-4)
    assert rows[1]["plan"] == better and rows[1]["val_ppl"] == pytest.approx(base * (1 + costs[better]), rel=1e-4)
    assert rows[1]["cost"] == pytest.approx(costs[better], abs=1e-4)
    expected = 2 if costs[better] <= 0.05 else 0  # the largest Δ whose perplexity stays within the budget
    assert report["suggested"]["delta"] == expected
    out = capsys.readouterr().out
    assert ("train.trainable=lp_pairs" in out) == (expected == 2)


def test_agreement_counts_matching_positions():
    assert lp.agreement([[1, 2, 3], [4, 5]], [[1, 9, 3], [4, 5]]) == 4 / 5


def test_sweep_refuses_a_mixed_plan_and_an_odd_delta():
    with pytest.raises(ConfigError, match="mixes schedules"):
        lp.lp_plan("standard,ladder@2:", 4, 0, 2)
    with pytest.raises(ConfigError, match="a run of 3 'lp' layers"):
        lp.lp_plan("standard", 4, 0, 3)


def test_a_negative_budget_is_refused_before_the_run_loads(tmp_path):
    with pytest.raises(ConfigError, match="--budget -0.1 is negative"):
        lp.check_sweep(tmp_path / "no-run", [], None, budget=-0.1)


def test_max_delta_zero_is_refused_not_taken_as_every_layer():
    assert lp.check_max_delta(None, 5) == 4 and lp.check_max_delta(2, 4) == 2
    for bad in (0, 3, 6, -2):
        with pytest.raises(ConfigError, match=f"--max-delta={bad} must be even and between 2 and the model's 4 layers"):
            lp.check_max_delta(bad, 4)
