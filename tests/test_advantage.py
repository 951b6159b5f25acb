"""Tests for ospo.advantage: hand cases for every step and the OSPO invariants
(docs/design.md section 2)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ospo.advantage import (
    GRPO,
    OSPO,
    WEIGHTINGS,
    credit_weights,
    frac_zero_std,
    group_advantages,
    redistribute,
    token_credit,
)

# Two groups of G=4: a mixed one and an all-equal one.
REWARDS = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]


def seg(spans):
    """A stand-in for ospo.segmenter.Segmentation: only `.spans` is read."""
    return SimpleNamespace(spans=list(spans), unions=[[j] for j in range(len(spans))])


# 1. group advantages -------------------------------------------------------------------------


def test_group_advantages_group_scale_uses_unbiased_std():
    a = group_advantages(REWARDS, 4, scale="group")
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1] = 0.57735
    x = 0.5 / (std + 1e-4)  # 0.86588
    expected = torch.tensor([x, -x, -x, x, 0.0, 0.0, 0.0, 0.0])
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, expected)
    assert abs(float(a[0]) - 0.865875) < 1e-5  # population std would give 0.99980
    assert torch.equal(a[4:], torch.zeros(4))


def test_group_advantages_batch_and_none():
    batch_std = math.sqrt(5.5 / 7)  # unbiased std of all 8 rewards = 0.886405
    x = 0.5 / (batch_std + 1e-4)
    torch.testing.assert_close(
        group_advantages(REWARDS, 4, scale="batch"),
        torch.tensor([x, -x, -x, x, 0.0, 0.0, 0.0, 0.0]),
    )
    torch.testing.assert_close(
        group_advantages(np.array(REWARDS), 4, scale="none"),
        torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]),
    )


def test_group_advantages_all_equal_is_exactly_zero_and_degenerate_sizes():
    r = [0.1] * 8 + [0.7] * 8  # float32 mean of eight 0.1s is not 0.1: r - mean != 0
    for scale in ("group", "batch", "none"):
        a = group_advantages(r, 8, scale=scale)
        assert torch.equal(a, torch.zeros(16)), scale
    for scale in ("group", "batch", "none"):
        a = group_advantages([0.7, 0.2], 1, scale=scale)  # G=1: std undefined
        assert torch.equal(a, torch.zeros(2))
        assert torch.isfinite(group_advantages([0.3], 1, scale=scale)).all()


def test_group_advantages_validates():
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(REWARDS, 4, scale="std")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="finite"):
        group_advantages([1.0, float("nan")], 2)


def test_frac_zero_std():
    assert frac_zero_std(REWARDS, 4) == 0.5
    assert frac_zero_std([1, 1, 0, 1, 3, 3], 2) == pytest.approx(2 / 3)
    assert frac_zero_std(torch.tensor([0.0, 1.0]), 2) == 0.0


# 2. token credit ------------------------------------------------------------------------------

#        0123456789012345678901 2
TEXT = "warm red socks for kids"
SEGS = [(0, 8), (9, 14), (19, 23)]  # "warm red", "socks", "kids"; " for " is glue
PHI = [0.5, -0.25, 1.0]
TOKENS = [
    (0, 4),  # "warm"                      -> seg 0
    (4, 7),  # " re"                       -> seg 0
    (7, 12),  # "d soc": 1 char of seg 0, 3 of seg 1 -> seg 1
    (12, 14),  # "ks"                       -> seg 1
    (14, 18),  # " for"                     -> glue, uncovered
    (18, 20),  # " k": 1 char of seg 2      -> seg 2
    (20, 23),  # "ids"                      -> seg 2
    (23, 23),  # EOS, zero width            -> uncovered
]
CREDIT = [0.5, 0.5, -0.25, -0.25, 0.0, 1.0, 1.0, 0.0]
COVERED = [True, True, True, True, False, True, True, False]


def test_token_credit_hand_case():
    credit, covered = token_credit(TOKENS, SEGS, np.array(PHI))
    assert credit.dtype == torch.float32 and covered.dtype == torch.bool
    torch.testing.assert_close(credit, torch.tensor(CREDIT))
    assert covered.tolist() == COVERED


def test_token_credit_ties_empty_and_mismatch():
    # (6, 11) shares 2 chars with seg 0 and 2 with seg 1: the earlier segment wins.
    credit, covered = token_credit([(6, 11)], SEGS, PHI)
    assert credit.tolist() == [0.5] and covered.tolist() == [True]
    credit, covered = token_credit(TOKENS, [], [])
    assert torch.equal(credit, torch.zeros(8)) and not covered.any()
    credit, covered = token_credit([], SEGS, PHI)
    assert credit.shape == (0,) and covered.shape == (0,)
    with pytest.raises(ValueError, match="phi has 2 values but there are 3 segments"):
        token_credit(TOKENS, SEGS, [1.0, 2.0])


# 3. weights -----------------------------------------------------------------------------------


def _weights(mode, advantage=1.0):
    return credit_weights(torch.tensor(CREDIT), torch.tensor(COVERED), mode, 0.7, advantage)


def test_credit_weights_prop():
    # covered credits 0.5, -0.25, 1.0 -> (c + 0.25) / 1.25 = 0.6, 0, 1; neutral = 3.2 / 6
    n = 3.2 / 6
    expected = torch.tensor([0.6, 0.6, 0.0, 0.0, n, 1.0, 1.0, n])
    torch.testing.assert_close(_weights("prop"), expected)


def test_credit_weights_rank():
    # distinct credits -0.25 < 0.5 < 1.0 -> ranks 1, 2, 3 -> / 3; neutral = 4 / 6
    n = 4 / 6
    expected = torch.tensor([2 / 3, 2 / 3, 1 / 3, 1 / 3, n, 1.0, 1.0, n])
    torch.testing.assert_close(_weights("rank"), expected)
    # ties share a rank; ranks run over the distinct values only
    u = credit_weights(torch.tensor([3.0, 1.0, 3.0, 2.0]), torch.ones(4, dtype=torch.bool), "rank")
    torch.testing.assert_close(u, torch.tensor([1.0, 1 / 3, 1.0, 2 / 3]))


def test_credit_weights_hybrid():
    # 0.7 * prop + 0.3 -> 0.72, 0.3, 1.0; neutral = 4.04 / 6
    n = 4.04 / 6
    expected = torch.tensor([0.72, 0.72, 0.3, 0.3, n, 1.0, 1.0, n])
    torch.testing.assert_close(_weights("hybrid"), expected)


def test_credit_weights_signed():
    torch.testing.assert_close(_weights("signed", advantage=0.5), _weights("hybrid"))
    torch.testing.assert_close(_weights("signed", advantage=0.0), _weights("hybrid"))
    # A < 0: prop on -c = (1 - c) / 1.25 -> 0.4, 1.0, 0.0; hybrid -> 0.58, 1.0, 0.3
    n = 3.76 / 6
    expected = torch.tensor([0.58, 0.58, 1.0, 1.0, n, 0.3, 0.3, n])
    torch.testing.assert_close(_weights("signed", advantage=-0.5), expected)


@pytest.mark.parametrize("mode", WEIGHTINGS)
def test_credit_weights_degenerate(mode):
    cov = torch.tensor([True, False, True])
    assert torch.equal(credit_weights(torch.tensor([0.4, 9.0, 0.4]), cov, mode), torch.ones(3))
    assert torch.equal(
        credit_weights(torch.zeros(3), torch.zeros(3, dtype=bool), mode), torch.ones(3)
    )
    # a NaN credit counts as uncovered and takes the neutral weight
    u = credit_weights(torch.tensor([0.0, float("nan"), 1.0]), torch.ones(3, dtype=bool), mode)
    assert torch.isfinite(u).all() and (u >= 0).all()
    torch.testing.assert_close(u[1], u[[0, 2]].mean())


def test_credit_weights_validates():
    with pytest.raises(ValueError, match="prop, rank, hybrid, signed"):
        credit_weights(torch.zeros(2), torch.ones(2, dtype=bool), "softmax")
    with pytest.raises(ValueError, match="alpha"):
        credit_weights(torch.zeros(2), torch.ones(2, dtype=bool), "hybrid", alpha=1.5)


# 4. redistribution ----------------------------------------------------------------------------


def test_redistribute():
    torch.testing.assert_close(
        redistribute(2.0, torch.tensor([0.5, 1.0, 1.5])), torch.tensor([1.0, 2.0, 3.0])
    )
    assert torch.equal(redistribute(-1.5, torch.ones(5)), torch.full((5,), -1.5))
    assert torch.equal(redistribute(0.7, torch.zeros(3)), torch.full((3,), 0.7))
    assert torch.equal(redistribute(0.7, torch.tensor([1.0, float("nan")])), torch.full((2,), 0.7))
    assert redistribute(1.0, torch.zeros(0)).shape == (0,)


# 5. estimators --------------------------------------------------------------------------------


def random_batch(seed, n_groups=3, group_size=4, max_len=14, zero_rewards=False):
    """Random rollouts: right-padded masks, token spans tiling the text, random segments."""
    rng = np.random.default_rng(seed)
    n = n_groups * group_size
    rewards = rng.uniform(0.05, 1.0, size=n).round(2)
    if zero_rewards:
        rewards[rng.random(n) < 0.3] = 0.0
    mask = torch.zeros(n, max_len, dtype=torch.long)
    token_spans, segs, phis = [], [], []
    for i in range(n):
        length = int(rng.integers(1, max_len + 1))
        mask[i, :length] = 1
        widths = rng.integers(0, 5, size=length)  # 0 = zero-width token
        ends = np.cumsum(widths)
        starts = ends - widths
        token_spans.append([(int(s), int(e)) for s, e in zip(starts, ends, strict=True)])
        text_len = int(ends[-1])
        cuts = np.sort(
            rng.choice(np.arange(text_len + 1), size=min(6, text_len + 1), replace=False)
        )
        spans = [
            (int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if rng.random() < 0.8
        ]
        segs.append(seg(spans))
        phis.append(rng.normal(size=len(spans)))
    return rewards, group_size, mask, token_spans, segs, phis


def test_grpo_broadcasts_over_valid_tokens():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
    grpo = GRPO(scale="none")
    out, stats = grpo([1.0, 0.0, 0.5, 0.5], 2, mask)
    expected = torch.tensor([[0.5, 0.5, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(out, expected)
    assert stats["frac_reward_zero_std"] == 0.5
    assert set(stats) >= {"frac_reward_zero_std", "adv_std", "reward_mean"}


@pytest.mark.parametrize("mode", WEIGHTINGS)
def test_ospo_uniform_credit_equals_grpo_exactly(mode):
    rewards, g, mask, spans, segs, phis = random_batch(0)
    grpo = GRPO()(rewards, g, mask)[0]
    equal_phis = [np.full(len(p), 0.37) for p in phis]
    out = OSPO(weighting=mode)(rewards, g, mask, spans, segs, equal_phis)[0]
    assert torch.equal(out, grpo)
    # one segment covering the whole text: every token covered with the same credit
    whole = [
        seg([(0, max(e for _, e in s))]) if max(e for _, e in s) > 0 else seg([]) for s in spans
    ]
    out = OSPO(weighting=mode)(rewards, g, mask, spans, whole, [np.array([0.8])] * len(whole))[0]
    assert torch.equal(out, grpo)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("mode", WEIGHTINGS)
def test_ospo_preserves_mean_token_advantage(mode, scale):
    for seed in range(4):
        rewards, g, mask, spans, segs, phis = random_batch(seed)
        seq_adv = group_advantages(rewards, g, scale=scale)
        out = OSPO(scale=scale, weighting=mode)(rewards, g, mask, spans, segs, phis)[0]
        m = mask.float()
        mean_tok = (out * m).sum(1) / m.sum(1)
        torch.testing.assert_close(mean_tok, seq_adv, atol=1e-5, rtol=1e-5)
        assert torch.equal(out[mask == 0], torch.zeros(int((mask == 0).sum())))
        # redistribution actually moved advantage for some tokens
        assert not torch.allclose(out, seq_adv[:, None] * m)


def test_ospo_moves_advantage_to_high_credit_tokens():
    # one group of two identical texts; rewards 1 (A > 0) and 0.5 (A < 0)
    mask = torch.ones(2, len(TOKENS), dtype=torch.long)
    spans, segs, phis = [TOKENS] * 2, [seg(SEGS)] * 2, [np.array(PHI)] * 2
    out = OSPO(scale="none", weighting="hybrid")([1.0, 0.5], 2, mask, spans, segs, phis)[0]
    u = _weights("hybrid").double()
    torch.testing.assert_close(out[0], (0.25 * u / u.mean()).float())
    assert out[0, 5] > out[0, 0] > out[0, 2] > 0  # kids > warm red > socks
    # signed: the negative completion's blame goes to the lowest-phi segment ("socks")
    out = OSPO(scale="none", weighting="signed")([1.0, 0.5], 2, mask, spans, segs, phis)[0]
    assert out[1, 2] < out[1, 0] < out[1, 5] < 0
    torch.testing.assert_close(out[1, 4], torch.tensor(-0.25))  # glue keeps ~A_i
    torch.testing.assert_close(out[1].mean(), torch.tensor(-0.25))


def test_ospo_clipping_bounds():
    rewards, g, mask, spans, segs, phis = random_batch(1)
    kappa = 0.8
    ospo = OSPO(weighting="prop", clip_kappa=kappa)
    out, stats = ospo(rewards, g, mask, spans, segs, phis)
    bound = kappa * float(group_advantages(rewards, g).std())
    assert out.abs().max() <= bound + 1e-6
    assert (out.abs() >= bound - 1e-6).any()  # something hit the bound
    assert stats["frac_clipped"] > 0
    unclipped = OSPO(weighting="prop")(rewards, g, mask, spans, segs, phis)[0]
    torch.testing.assert_close(out, unclipped.clamp(-bound, bound))
    with pytest.raises(ValueError, match="clip_kappa"):
        OSPO(clip_kappa=0.0)


def test_ospo_fallback_rows_equal_grpo():
    rewards, g, mask, spans, segs, phis = random_batch(2)
    rewards[0] = 0.0  # zero reward
    segs[1], phis[1] = seg([]), np.zeros(0)  # no segments
    phis[2] = np.zeros_like(phis[2])  # all-zero phi
    phis[3] = np.full_like(phis[3], np.nan)  # NaN phi
    phis[4], segs[4] = None, None  # missing
    grpo = GRPO()(rewards, g, mask)[0]
    ospo = OSPO(weighting="prop")
    out, stats = ospo(rewards, g, mask, spans, segs, phis)
    for i in range(5):
        assert torch.equal(out[i], grpo[i]), i
    assert stats["frac_fallback"] >= 5 / 12


@pytest.mark.parametrize("mode", WEIGHTINGS)
@pytest.mark.parametrize("kappa", [None, 2.0])
def test_ospo_never_nan_on_adversarial_inputs(mode, kappa):
    ospo = OSPO(weighting=mode, clip_kappa=kappa)
    batches = [random_batch(s, zero_rewards=True) for s in range(3)]
    # all rewards zero / all equal
    r, g, mask, spans, segs, phis = random_batch(5)
    batches.append((np.zeros_like(r), g, mask, spans, segs, phis))
    batches.append((np.full_like(r, 0.4), g, mask, spans, segs, phis))
    # NaN / inf / huge phi, empty segmentations
    bad = [np.full(len(p), v) for p, v in zip(phis, [np.nan, np.inf, 1e30, -1e30] * 3, strict=True)]
    batches.append((r, g, mask, spans, segs, bad))
    batches.append((r, g, mask, spans, [seg([])] * len(r), [np.zeros(0)] * len(r)))
    # single-token completions (one zero-width EOS, one real token) and a single completion
    one = torch.ones(4, 1, dtype=torch.long)
    batches.append(
        (
            [1.0, 0.0, 0.5, 0.2],
            4,
            one,
            [[(0, 0)], [(0, 3)], [(0, 3)], [(0, 3)]],
            [seg([(0, 3)])] * 4,
            [np.array([0.5])] * 4,
        )
    )
    batches.append(([1.0], 1, one[:1], [[(0, 3)]], [seg([(0, 3)])], [np.array([1.0])]))
    for rewards, g_, m, sp, sg, ph in batches:
        out, _ = ospo(rewards, g_, m, sp, sg, ph)
        assert torch.isfinite(out).all()
        assert torch.equal(out[m == 0], torch.zeros(int((m == 0).sum())))


def test_ospo_validates():
    with pytest.raises(ValueError, match="prop, rank, hybrid, signed"):
        OSPO(weighting="owen")
    with pytest.raises(ValueError, match="group, batch, none"):
        GRPO(scale="max")
    rewards, g, mask, spans, segs, phis = random_batch(3)
    bad_spans = [list(s) for s in spans]
    bad_spans[0] = bad_spans[0] + [(0, 1)]
    with pytest.raises(ValueError, match="completion 0"):
        OSPO()(rewards, g, mask, bad_spans, segs, phis)
    with pytest.raises(ValueError, match="phis has"):
        OSPO()(rewards, g, mask, spans, segs, phis[:-1])
