"""The example estimator outside the package (examples/position_credit.py): its contract, and
a tiny training run that uses it through `baseline.advantage._target_`."""

import json

import pytest
import torch

from examples.position_credit import PositionCredit
from ospo.advantage import GRPO
from ospo.interfaces import AdvantageEstimator
from ospo.rl import run_train

from .conftest import TINY


def test_position_credit_keeps_the_contract():
    est = PositionCredit(gamma=0.5)
    assert isinstance(est, AdvantageEstimator)
    rewards = [1.0, 0.0, 0.3, 0.3]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    out, stats = est(rewards, 2, mask)
    grpo, grpo_stats = GRPO()(rewards, 2, mask)
    assert torch.equal(out[mask == 0], torch.zeros(int((mask == 0).sum())))
    # mean token advantage = A_i; the first token of the better completion gets the most
    m = mask.float()
    torch.testing.assert_close((out * m).sum(1) / m.sum(1), grpo[:, 0])
    assert out[0, 0] > out[0, 1] > out[0, 2] > 0 > out[1, 1] > out[1, 0]
    assert set(grpo_stats) <= set(stats) and stats["cos_to_grpo"] < 1
    assert torch.equal(PositionCredit(gamma=1.0)(rewards, 2, mask)[0], grpo)  # gamma 1: GRPO
    with pytest.raises(ValueError, match="gamma"):
        PositionCredit(gamma=0.0)


@pytest.mark.slow
def test_a_run_trains_with_the_example_estimator(make_cfg, tmp_path):
    target = "examples.position_credit.PositionCredit"
    cfg = make_cfg(
        TINY
        + [
            "baseline=grpo",
            f"baseline.advantage._target_={target}",
            "+baseline.advantage.gamma=0.5",
            "label=position",
        ]
    )
    run_train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["label"] == "position" and saved["steps"] == 4
    assert saved["config"]["baseline"]["advantage"]["_target_"] == target
    # the tiny policy's groups are often all-zero; where one was not, the tokens' advantages
    # moved away from GRPO's
    assert saved["credit_cos_to_grpo"] is None or saved["credit_cos_to_grpo"] < 1.0
