"""The Layer Parallelism sweep on a small saved model."""

import json

import pytest

from ladder_jax.cli import main
from ladder_jax.config import ConfigError
from ladder_jax.methods import lp

from .conftest import save_small_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, devices):
    return save_small_run(tmp_path_factory.mktemp("lp"), train__eval_batches=2)


def test_sweep_writes_perplexity_agreement_and_a_suggestion(run, capsys):
    assert (
        main(
            [
                "lp",
                "sweep",
                "--checkpoint",
                str(run),
                "--max-delta",
                "2",
                "--prompts",
                "2",
                "--gen-tokens",
                "8",
                "--budget",
                "1e9",
            ]
        )
        == 0
    )
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
    with pytest.raises(ConfigError, match="a run of 3 'lp' layers"):
        lp.lp_plan("standard", 4, 0, 3)
