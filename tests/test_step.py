"""The RL step's parts (ospo.step), the method object (ospo.baseline) and the interfaces."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ospo.advantage import GRPO, OSPO
from ospo.attribution import Owen, Shapley, ShapleyMC, owen_num_coalitions
from ospo.baseline import Baseline
from ospo.data.shop import ShopData
from ospo.interfaces import AdvantageEstimator, Attribution, Retriever, Reward, Segmenter
from ospo.loss import PolicyLoss, policy_loss
from ospo.optim import clip_grad_norm
from ospo.policy import build_tiny
from ospo.retriever import BM25, BM25L, BM25Plus
from ospo.reward import NDCG, Recall
from ospo.segmenter import PhraseSegmenter, SentenceSegmenter
from ospo.step import RLStep, Sampling, coalition_base, compute_credit, score


@pytest.fixture(scope="module")
def shop():
    return ShopData(num_products=300, seed=0)


@pytest.fixture(scope="module")
def shop_rewrite():
    return ShopData(num_products=300, seed=0, completion="rewrite")


@pytest.fixture(scope="module")
def reward(shop):
    retriever = BM25()
    retriever.index(shop.catalog)
    return NDCG(retriever, k=10)


def _baseline(estimator, mu=1, beta=0.0):
    return Baseline("m", estimator, PolicyLoss(0.2, 0.28, beta, "token_mean", 8), mu=mu)


def test_implementations_satisfy_the_interfaces(reward):
    for retriever in (BM25(), BM25Plus(), BM25L()):
        assert isinstance(retriever, Retriever)
    assert isinstance(reward, Reward) and isinstance(Recall(reward.retriever), Reward)
    for seg in (PhraseSegmenter(max_segments=8), SentenceSegmenter(max_segments=8)):
        assert isinstance(seg, Segmenter)
    for att in (Owen(), Shapley(), ShapleyMC()):
        assert isinstance(att, Attribution)
    assert isinstance(GRPO(), AdvantageEstimator) and isinstance(OSPO(), AdvantageEstimator)
    assert not isinstance(object(), Attribution)


def test_baseline_reads_credit_from_the_estimator_and_checks_mu():
    assert _baseline(OSPO()).needs_credit and not _baseline(GRPO()).needs_credit
    assert _baseline(GRPO(), beta=0.1).loss.needs_reference
    with pytest.raises(ValueError, match="baseline.mu=0"):
        _baseline(GRPO(), mu=0)


def test_policy_loss_object_matches_the_function():
    g = torch.Generator().manual_seed(0)
    logp, old, adv = (torch.randn(3, 5, generator=g) for _ in range(3))
    mask = torch.ones(3, 5)
    loss_fn = PolicyLoss(eps_low=0.1, eps_high=0.3, aggregation="seq_mean_token_mean")
    a, ma = loss_fn(logp, old, adv, mask)
    b, mb = policy_loss(
        logp, old, adv, mask, eps_low=0.1, eps_high=0.3, aggregation="seq_mean_token_mean"
    )
    assert torch.equal(a, b) and ma == mb
    with pytest.raises(ValueError, match="aggregation 'mean'"):
        PolicyLoss(aggregation="mean")


def test_compute_credit_counts_coalitions_and_honours_keep_query(shop_rewrite, reward):
    samples = shop_rewrite.splits["test"][:3]
    texts = [f"{s.request} waterproof, for kids and warm" for s in samples]
    seg = PhraseSegmenter(max_segments=6)
    for keep_query in (False, True):
        credit = compute_credit(texts, samples, seg, Owen(), reward, keep_query)
        assert credit.segments == [s.n for s in credit.segmentations]
        assert credit.coalitions == sum(owen_num_coalitions(s.unions) for s in credit.segmentations)
        for text, sample, segm, phi in zip(
            texts, samples, credit.segmentations, credit.phis, strict=True
        ):
            base = sample.request if keep_query else ""
            ends = reward.coalition_value_fn(text, segm, sample, base_text=base)(
                np.array([[False] * segm.n, [True] * segm.n])
            )
            assert phi.sum() == pytest.approx(ends[1] - ends[0])  # efficiency with this v(empty)


def test_append_format_plays_the_game_after_the_request(shop, shop_rewrite, reward):
    """Append: the reward ranks request + completion, and every coalition starts from the
    request whatever keep_query says, so v(empty) = the request's own reward."""
    a, r = shop.splits["test"][0], shop_rewrite.splits["test"][0]
    words = "waterproof kids warm"
    assert (
        reward.score_texts([words], [a])[0] == reward.score_texts([f"{a.request} {words}"], [r])[0]
    )
    assert reward.score_queries([a.request], [a])[0] == reward.score_texts([a.request], [r])[0]
    assert coalition_base(a, False) == coalition_base(a, True) == a.request
    assert (coalition_base(r, False), coalition_base(r, True)) == ("", r.request)
    seg = PhraseSegmenter()
    credit = compute_credit([words], [a], seg, Owen(), reward, keep_query=False)
    full = reward.score_texts([words], [a])[0] - reward.score_queries([a.request], [a])[0]
    assert credit.phis[0].sum() == pytest.approx(full)  # efficiency from v(request)
    assert credit.segments == [3]


def test_score_gives_ill_formed_completions_the_invalid_reward(shop, reward):
    samples = shop.splits["test"][:3]
    texts = ["waterproof kids", "kids", "warm"]
    plain, metrics = score(reward, texts, samples)
    gated, gated_metrics = score(reward, texts, samples, [True, False, True], invalid_reward=-0.5)
    assert gated[0] == plain[0] and gated[2] == plain[2] and gated[1] == -0.5
    assert np.array_equal(score(reward, texts, samples, [False] * 3, None)[0], plain)
    # the logged ranking metrics are the ungated retrieval scores, from the same retrieval
    assert np.array_equal(gated_metrics["ndcg@10"], plain)
    assert np.array_equal(metrics["ndcg@10"], reward.metrics(texts, samples)["ndcg@10"])


def test_score_clears_the_coalition_memo(shop, reward):
    s = shop.splits["test"][0]
    reward._memo[("stale", "x")] = 1.0
    out, _ = score(reward, [s.request], [s])
    assert out.shape == (1,) and ("stale", "x") not in reward._memo


@pytest.fixture(scope="module")
def tiny(shop):
    texts = list(shop.catalog.values()) + [s.request for s in shop.splits["train"]]
    return build_tiny(texts, seed=0)


def _step(tiny, reward, estimator, temperature=1.0, mu=1, **kw):
    return RLStep(
        tiny,
        reward,
        _baseline(estimator, mu=mu),
        Sampling(max_new_tokens=6, temperature=temperature, top_p=1.0),
        num_generations=2,
        **kw,
    )


def test_rl_step_runs_every_part_and_uses_the_sampling_temperature(shop, reward, tiny):
    calls = []
    real = tiny.token_logprobs

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    step = _step(
        tiny,
        reward,
        OSPO(),
        temperature=0.7,
        mu=2,
        segmenter=PhraseSegmenter(max_segments=4),
        attribution=Owen(),
    )
    opt = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    before = [p.detach().clone() for p in tiny.parameters()]
    tiny.token_logprobs = spy
    try:
        out = step(shop.splits["train"][:2], 123, opt, sched, clip=clip_grad_norm(1.0))
    finally:
        del tiny.token_logprobs
    assert len(out.samples) == 4 and out.rewards.shape == (4,)
    assert out.advantages.shape == out.rollouts.completion_mask.shape
    assert len(out.credit.phis) == 4 and "frac_fallback" in out.advantage_stats
    parts = {"step", "sync", "generate", "reward", "credit", "advantage", "update"}
    assert set(out.seconds) == parts and out.seconds["sync"] == 0.0  # HF path: nothing to sync
    assert step.updates == 2  # mu = 2 optimizer steps: what a vLLM engine would catch up with
    # one pi_old pass (mu > 1) and mu = 2 updates, all on the sampling distribution
    assert len(calls) == 3 and all(c["temperature"] == 0.7 for c in calls)
    assert all(c["group_size"] == 2 for c in calls)
    assert sched.last_epoch == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny.parameters(), strict=True))


def test_rl_step_repeats_with_the_same_seed(shop, reward):
    texts = list(shop.catalog.values())
    outs = []
    for _ in range(2):
        policy = build_tiny(texts, seed=1)
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        out = _step(policy, reward, GRPO())(shop.splits["train"][:2], 7, opt, sched)
        outs.append(
            (
                out.rollouts.texts,
                float(out.loss.detach()),
                [p.detach().clone() for p in policy.parameters()],
            )
        )
    assert outs[0][0] == outs[1][0] and outs[0][1] == outs[1][1]
    assert all(torch.equal(a, b) for a, b in zip(outs[0][2], outs[1][2], strict=True))


def test_rl_step_refuses_a_method_it_cannot_run(reward, tiny):
    with pytest.raises(ValueError, match="needs a segmenter and an attribution"):
        _step(tiny, reward, OSPO())
    beta = Baseline("m", GRPO(), PolicyLoss(beta=0.1))
    with pytest.raises(ValueError, match="needs a ref_policy"):
        RLStep(tiny, reward, beta, Sampling(), 2)


def test_config_builds_the_optimizer_and_schedule(make_cfg, tiny):
    cfg = make_cfg(["rl.lr=0.002", "rl.steps=10", "rl.warmup_steps=3", "baseline.mu=2"])
    params = [p for p in tiny.parameters() if p.requires_grad]
    opt = instantiate(cfg.rl.optimizer)(params)
    sched = instantiate(cfg.rl.scheduler)(opt)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 0.002
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[6] == pytest.approx(0.002)  # warm-up is 3 steps x mu = 2
    floor = 0.002 * cfg.rl.min_lr_ratio  # cosine decay towards min_lr_ratio * lr
    assert floor <= lrs[-1] < 1.2 * floor and all(
        a >= b for a, b in zip(lrs[6:-1], lrs[7:], strict=True)
    )
