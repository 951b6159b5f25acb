"""Credit diagnostics of the RL module: `credit/cos_to_grpo` over informative steps only,
averaged over DDP ranks, and per-rank random streams (Monte-Carlo attribution, random credit)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ospo.advantage import RandomCredit
from ospo.attribution import ShapleyMC
from ospo.module import RLModule, informative_pair, pooled_mean, rank_rng

SECONDS = ("step", "generate", "sync", "reward", "credit", "update")


def _module(attribution=None, advantage=None) -> RLModule:
    """An RLModule around a stand-in step: enough for logging, seeding and checkpoint state."""
    step = SimpleNamespace(
        policy=torch.nn.Linear(1, 1),
        ref_policy=None,
        attribution=attribution,
        baseline=SimpleNamespace(advantage=advantage),
    )
    return RLModule(
        step, [], None, optimizer=None, scheduler=None, prompts_per_step=1, grad_clip=1.0
    )


def _result(cos: float, frac_zero_std: float) -> SimpleNamespace:
    """A stand-in `StepResult` with the estimator stats that matter here."""
    return SimpleNamespace(
        samples=[None, None],
        rollouts=SimpleNamespace(completion_mask=torch.ones(2, 3)),
        rewards=np.array([0.0, 1.0]),
        well_formed=[True, False],
        metrics={"ndcg@10": np.array([0.0, 1.0])},
        credit=SimpleNamespace(coalitions=4, segments=[2, 3]),
        advantage_stats={
            "frac_reward_zero_std": frac_zero_std,
            "reward_mean": 0.5,
            "reward_std": 0.5,
            "adv_abs_mean": 0.0,
            "adv_std": 0.0,
            "cos_to_grpo": cos,
        },
        loss=torch.tensor(0.25),
        loss_metrics={"clip_ratio": 0.0},
        seconds=dict.fromkeys(SECONDS, 1.0),
    )


class _FakeStrategy:
    """`strategy.reduce(t, reduce_op="sum")` of a DDP run whose other ranks sent `others`."""

    def __init__(self, others):
        self.others = others

    def reduce(self, tensor, group=None, reduce_op="mean"):
        assert reduce_op == "sum"
        return tensor + torch.tensor(self.others, dtype=tensor.dtype).sum(0)


# 1. informative steps only ------------------------------------------------------------------


def test_informative_pair_and_pooled_mean():
    assert informative_pair(0.4, 0.5) == (0.4, 1.0)
    assert informative_pair(0.4, 0.0) == (0.4, 1.0)
    assert informative_pair(1.0, 1.0) == (0.0, 0.0)  # all groups flat: counts for nothing
    assert pooled_mean([(0.4, 1.0), (0.0, 0.0), (1.6, 2.0)]) == pytest.approx(2.0 / 3.0)
    assert pooled_mean([(0.0, 0.0), (0.0, 0.0)]) is None
    assert pooled_mean([]) is None


def test_run_mean_and_log_skip_flat_steps():
    module = _module()
    logs = [module._step_log(_result(c, f)) for c, f in [(0.5, 0.5), (1.0, 1.0), (0.7, 0.0)]]
    cos = [log["credit/cos_to_grpo"] for log in logs]  # NaN: a gap, no stale repeat
    assert cos[0] == 0.5 and math.isnan(cos[1]) and cos[2] == 0.7
    assert all("advantage/cos_to_grpo" not in log for log in logs)
    assert all(log["train/frac_reward_zero_std"] in (0.0, 0.5, 1.0) for log in logs)
    assert module.cos_to_grpo == [0.5, 0.7]
    summary = module.credit_summary()
    assert summary["credit_cos_to_grpo"] == pytest.approx(0.6)
    assert summary["credit_cos_to_grpo_steps"] == 2

    # The checkpoint keeps the same list, and a resumed module its mean.
    ckpt = {"state_dict": {}}
    module.on_save_checkpoint(ckpt)
    assert ckpt["ospo"]["cos_to_grpo"] == [0.5, 0.7]
    resumed = _module()
    resumed.on_load_checkpoint(ckpt)
    assert resumed.credit_summary() == summary


def test_run_without_informative_step_has_no_cosine():
    module = _module()
    for _ in range(3):
        assert math.isnan(module._step_log(_result(1.0, 1.0))["credit/cos_to_grpo"])
    assert module.credit_summary() == {"credit_cos_to_grpo": None, "credit_cos_to_grpo_steps": 0}


# 2. averaged over ranks ---------------------------------------------------------------------


def test_step_cosine_is_averaged_over_informative_ranks():
    """Rank 0's pair plus those of two fake ranks: one informative (cos 0.2), one flat."""
    module = _module()
    module._trainer = SimpleNamespace(strategy=_FakeStrategy([(0.2, 1.0), (0.0, 0.0)]))
    assert module._step_log(_result(0.8, 0.5))["credit/cos_to_grpo"] == pytest.approx(0.5)
    # rank 0 flat (its cosine 1.0 by convention): the step is rank 1's alone
    assert module._step_log(_result(1.0, 1.0))["credit/cos_to_grpo"] == pytest.approx(0.2)
    assert module.cos_to_grpo == pytest.approx([0.5, 0.2])

    module._trainer = SimpleNamespace(strategy=_FakeStrategy([(0.0, 0.0), (0.0, 0.0)]))
    assert math.isnan(module._step_log(_result(1.0, 1.0))["credit/cos_to_grpo"])  # all flat
    assert len(module.cos_to_grpo) == 2


def test_single_process_trainer_reduces_to_the_identity():
    import pytorch_lightning as pl

    module = _module()
    module.trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False
    )
    assert module.trainer.world_size == 1
    assert module._reduce_sum((0.3, 1.0)) == (0.3, 1.0)
    assert module._step_log(_result(0.3, 0.5))["credit/cos_to_grpo"] == 0.3
    assert module._gather_objects({"a": 1}) is None


def _two_ranks(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from pytorch_lightning.strategies import DDPStrategy

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        module = _module(attribution=ShapleyMC(num_permutations=4, seed=5))
        module._trainer = SimpleNamespace(
            strategy=DDPStrategy(), world_size=world, global_rank=rank
        )
        module._seed_rank_streams(rank)
        stats = [_result(0.9, 0.5), _result(1.0, 1.0)][rank]  # rank 1 flat
        cos = module._step_log(stats).get("credit/cos_to_grpo")
        ckpt = {"state_dict": {}}
        module.on_save_checkpoint(ckpt)  # gathers every rank's generator
        torch.save({"cos": cos, "ospo": ckpt["ospo"]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_average_and_save_their_own_streams(tmp_path):
    """Real DDP collectives (two CPU processes, gloo): the step cosine is the informative
    rank's, and the checkpoint holds both ranks' generator states."""
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["cos"] == r1["cos"] == pytest.approx(0.9)
    assert r0["ospo"]["cos_to_grpo"] == r1["ospo"]["cos_to_grpo"] == pytest.approx([0.9])
    states = r0["ospo"]["attribution_rng_ranks"]
    assert states == r1["ospo"]["attribution_rng_ranks"]
    assert states[0] == np.random.default_rng(5).bit_generator.state
    assert states[1] == np.random.default_rng([5, 1]).bit_generator.state
    assert r0["ospo"]["attribution_rng"] == states[0]


# 3. per-rank random streams -----------------------------------------------------------------


def test_rank_rng_keeps_rank_zero_and_separates_the_others():
    draw = lambda rng: rng.random(8)  # noqa: E731
    np.testing.assert_array_equal(draw(rank_rng(7, 0)), draw(np.random.default_rng(7)))
    np.testing.assert_array_equal(draw(rank_rng(7, 1)), draw(np.random.default_rng([7, 1])))
    assert not np.array_equal(draw(rank_rng(7, 1)), draw(rank_rng(7, 0)))
    assert not np.array_equal(draw(rank_rng(7, 1)), draw(rank_rng(7, 2)))


def _seeded(rank: int) -> RLModule:
    module = _module(ShapleyMC(num_permutations=4, seed=3), RandomCredit(seed=3))
    module._seed_rank_streams(rank)
    return module


def test_module_seeds_attribution_and_random_credit_per_rank():
    r0, r1 = _seeded(0), _seeded(1)
    for name in ("attribution", "advantage"):
        a0, a1 = r0._rngs()[name].random(8), r1._rngs()[name].random(8)
        np.testing.assert_array_equal(a0, np.random.default_rng(3).random(8))  # as before
        np.testing.assert_array_equal(a1, np.random.default_rng([3, 1]).random(8))
        assert not np.array_equal(a0, a1)

    # Once per module: a second setup (fit after validate) does not rewind the streams.
    state = r1._rngs()["attribution"].bit_generator.state
    r1._seed_rank_streams(1)
    assert r1._rngs()["attribution"].bit_generator.state == state


def test_checkpoint_restores_each_ranks_own_stream():
    saved = [rank_rng(3, r) for r in (0, 1)]
    for rng in saved:
        rng.random(5)  # both streams advanced
    states = [rng.bit_generator.state for rng in saved]
    ckpt = {"ospo": {"attribution_rng": states[0], "attribution_rng_ranks": states}}
    for rank in (0, 1):
        module = _seeded(rank)
        module._trainer = SimpleNamespace(global_rank=rank, world_size=2)
        module.on_load_checkpoint(ckpt)
        assert module._rngs()["attribution"].bit_generator.state == states[rank]

    # A checkpoint of one process: rank 0 resumes its stream, rank 1 keeps its own.
    single = {"ospo": {"attribution_rng": states[0]}}
    module = _seeded(1)
    module._trainer = SimpleNamespace(global_rank=1, world_size=2)
    module.on_load_checkpoint(single)
    assert module._rngs()["attribution"].bit_generator.state == (
        np.random.default_rng([3, 1]).bit_generator.state
    )
