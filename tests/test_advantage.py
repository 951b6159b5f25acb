"""Tests for ospo.advantage: hand cases for every step, the OSPO invariants and the controls
RandomCredit and EntropyCredit (docs/design.md section 2)."""

import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ospo.advantage import (
    GRPO,
    MIN_MAX_WEIGHTINGS,
    NEGATIVES,
    OSPO,
    WEIGHTINGS,
    EntropyCredit,
    RandomCredit,
    cos_to_grpo,
    credit_weights,
    entropy_weights,
    frac_zero_std,
    group_advantages,
    redistribute,
    shift_advantages,
    token_credit,
    token_mass,
    token_segments,
)
from ospo.baseline import Baseline

from .conftest import CONF

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


@pytest.mark.parametrize("mode", MIN_MAX_WEIGHTINGS)
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
    phis[0] = np.zeros_like(phis[0])  # all-zero phi
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


# 6. cos_to_grpo -------------------------------------------------------------------------------


def test_cos_to_grpo_hand_case():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    seq = torch.tensor([1.0, -1.0])  # A_i
    adv = torch.tensor([[2.0, 0.0, 9.0], [-1.0, -2.0, 0.0]])  # 9.0 sits on padding
    # valid: x = (2, 0, -1, -2, 0), y = (1, 1, -1, -1, -1): x.y = 5, |x| = 3, |y| = sqrt(5)
    expected = 5 / (3 * math.sqrt(5))
    assert cos_to_grpo(adv, seq, mask) == pytest.approx(expected, rel=1e-12)
    grpo_tok = seq[:, None] * mask  # the (N, T) form gives the same value
    assert cos_to_grpo(adv, grpo_tok, mask) == pytest.approx(expected, rel=1e-12)


def test_cos_to_grpo_is_one_for_grpo_and_uniform_ospo():
    rewards, g, mask, spans, segs, phis = random_batch(0)
    out, stats = GRPO()(rewards, g, mask)
    assert stats["cos_to_grpo"] == 1.0
    assert cos_to_grpo(out, group_advantages(rewards, g), mask) == 1.0
    equal_phis = [np.full(len(p), 0.37) for p in phis]
    assert OSPO()(rewards, g, mask, spans, segs, equal_phis)[1]["cos_to_grpo"] == 1.0
    cos = OSPO(weighting="prop")(rewards, g, mask, spans, segs, phis)[1]["cos_to_grpo"]
    assert 0.0 < cos < 1.0


def test_cos_to_grpo_scale_invariant_and_sign():
    rewards, g, mask, spans, segs, phis = random_batch(1)
    seq = group_advantages(rewards, g)
    out = OSPO(weighting="prop")(rewards, g, mask, spans, segs, phis)[0].double()  # exact c * x
    cos = cos_to_grpo(out, seq, mask)
    for c in (1e-3, 0.5, 7.0):
        assert cos_to_grpo(c * out, seq, mask) == pytest.approx(cos, rel=1e-9)
        assert cos_to_grpo(out, c * seq, mask) == pytest.approx(cos, rel=1e-9)
    assert cos_to_grpo(-out, seq, mask) == pytest.approx(-cos, rel=1e-9)


def test_cos_to_grpo_ignores_padding_and_degenerate_cases():
    rewards, g, mask, spans, segs, phis = random_batch(2)
    seq = group_advantages(rewards, g)
    out = OSPO(weighting="rank")(rewards, g, mask, spans, segs, phis)[0]
    noisy = torch.where(mask == 0, torch.randn(out.shape) * 100, out)  # garbage on padding
    assert cos_to_grpo(noisy, seq, mask) == cos_to_grpo(out, seq, mask)
    zeros = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    assert cos_to_grpo(zeros, torch.zeros(2), m) == 1.0  # both zero: identical
    assert cos_to_grpo(zeros, torch.ones(2), m) == 0.0  # one zero: no direction in common
    assert cos_to_grpo(torch.ones(2, 3), torch.zeros(2), m) == 0.0
    # only padding differs from GRPO: still exactly 1
    assert cos_to_grpo(torch.tensor([[1.0, 5.0]]), torch.ones(1), torch.tensor([[1, 0]])) == 1.0
    with pytest.raises(ValueError, match=r"grpo_advantages \(3,\)"):
        cos_to_grpo(zeros, torch.zeros(3), m)


# 7. RandomCredit ------------------------------------------------------------------------------


def _permuted(phis, seed):
    """The phis RandomCredit(seed=seed) uses on its first call: one permutation per row."""
    rng = np.random.default_rng(seed)
    return [None if p is None else np.asarray(p)[rng.permutation(len(p))] for p in phis]


@pytest.mark.parametrize("mode", WEIGHTINGS)
def test_random_credit_is_ospo_on_permuted_phis(mode):
    rewards, g, mask, spans, segs, phis = random_batch(3)
    phis[5], segs[5] = None, None  # a missing credit stays missing (fallback)
    rc = RandomCredit(weighting=mode, clip_kappa=2.0, seed=11)
    ospo = OSPO(weighting=mode, clip_kappa=2.0)
    out, stats = rc(rewards, g, mask, spans, segs, phis)
    expected, expected_stats = ospo(rewards, g, mask, spans, segs, _permuted(phis, 11))
    assert torch.equal(out, expected)
    assert stats == expected_stats
    assert not torch.equal(out, ospo(rewards, g, mask, spans, segs, phis)[0])
    # the Generator advances: the second call uses the next permutations
    rng = np.random.default_rng(11)
    _ = [rng.permutation(len(p)) for p in phis if p is not None]
    second = [None if p is None else p[rng.permutation(len(p))] for p in phis]
    out2 = rc(rewards, g, mask, spans, segs, phis)[0]
    assert torch.equal(out2, ospo(rewards, g, mask, spans, segs, second)[0])
    assert not torch.equal(out2, out)


def test_random_credit_preserves_mean_token_advantage():
    rc = RandomCredit(weighting="hybrid", seed=0)
    for seed in range(3):
        rewards, g, mask, spans, segs, phis = random_batch(seed)
        out, stats = rc(rewards, g, mask, spans, segs, phis)
        m = mask.float()
        torch.testing.assert_close(
            (out * m).sum(1) / m.sum(1), group_advantages(rewards, g), atol=1e-5, rtol=1e-5
        )
        assert torch.equal(out[mask == 0], torch.zeros(int((mask == 0).sum())))
        assert set(stats) >= {"frac_fallback", "frac_clipped", "cos_to_grpo"}


def test_random_credit_permutes_weights_between_segments():
    # three segments of two tokens each, every token covered: mean(u) does not depend on which
    # segment gets which credit, so the token advantages are OSPO's, moved segment by segment
    segs_ = [(0, 4), (5, 9), (10, 14)]  # "aaaa bbbb cccc"
    tokens = [(0, 2), (2, 4), (5, 7), (7, 9), (10, 12), (12, 14)]
    phi = np.array([0.1, 0.5, 0.9])
    n = 6
    mask = torch.ones(n, len(tokens), dtype=torch.long)
    rewards = [1.0, 0.2, 0.6, 0.9, 0.3, 0.5]
    args = (rewards, n, mask, [tokens] * n, [seg(segs_)] * n)
    base = OSPO(scale="none", weighting="prop")(*args, [phi] * n)[0].reshape(n, 3, 2)
    out = RandomCredit(scale="none", weighting="prop", seed=4)(*args, [phi] * n)[0]
    out = out.reshape(n, 3, 2)  # (completion, segment, token)
    assert torch.equal(out[:, :, 0], out[:, :, 1])  # a segment's tokens share one value
    rng = np.random.default_rng(4)
    perms = [rng.permutation(3) for _ in range(n)]
    for i in range(n):
        assert sorted(out[i, :, 0].tolist()) == sorted(base[i, :, 0].tolist())
        # segment j got the credit of segment perm[j], hence that segment's OSPO advantage
        assert torch.equal(out[i, :, 0], base[i, perms[i], 0])
    assert len({tuple(p) for p in perms}) > 1


def test_random_credit_state_is_picklable_and_resumable():
    rewards, g, mask, spans, segs, phis = random_batch(4)
    rc = RandomCredit(seed=7)
    rc(rewards, g, mask, spans, segs, phis)
    clone = pickle.loads(pickle.dumps(rc))
    state = rc.rng.bit_generator.state  # what a checkpoint saves, as for attribution.rng
    a = rc(rewards, g, mask, spans, segs, phis)[0]
    assert torch.equal(clone(rewards, g, mask, spans, segs, phis)[0], a)
    fresh = RandomCredit(seed=7)
    fresh.rng.bit_generator.state = state
    assert torch.equal(fresh(rewards, g, mask, spans, segs, phis)[0], a)
    assert rc.needs_credit and not rc.needs_entropy and rc.seed == 7


# 8. EntropyCredit -----------------------------------------------------------------------------


def test_entropy_weights_hand_case():
    h = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(entropy_weights(h, 0.5), h)
    assert torch.equal(entropy_weights(h, -0.5, "entropy"), h)
    torch.testing.assert_close(
        entropy_weights(h, -0.5, "inverse", 0.5), torch.tensor([1 / 1.5, 1 / 2.5, 1 / 3.5])
    )
    torch.testing.assert_close(entropy_weights(h, 0.5, "inverse"), h)  # A >= 0: H_t
    for degenerate in ([0.0, 0.0], [0.4, 0.4], [1.0, float("nan")], []):
        for negative in NEGATIVES:
            u = entropy_weights(torch.tensor(degenerate), -1.0, negative)
            assert torch.equal(u, torch.ones(len(degenerate)))
    assert torch.equal(entropy_weights(torch.tensor([-1e-9, 2.0]), 1.0), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="entropy, inverse"):
        entropy_weights(h, 1.0, "softmax")
    with pytest.raises(ValueError, match="inverse_eps"):
        entropy_weights(h, 1.0, "inverse", 0.0)


def test_entropy_credit_hand_case():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    entropy = torch.tensor([[1.0, 2.0, 3.0, 7.0], [2.0, 2.0, 0.0, 4.0]])  # 7.0 on padding
    rewards = [1.0, 0.0]  # scale none: A = (0.5, -0.5)
    out, stats = EntropyCredit(scale="none")(rewards, 2, mask, entropy=entropy)
    # row 0: 0.5 * H / mean(1, 2, 3) = 0.5 * (0.5, 1, 1.5); row 1: -0.5 * H / 2
    expected = torch.tensor([[0.25, 0.5, 0.75, 0.0], [-0.5, -0.5, 0.0, -1.0]])
    torch.testing.assert_close(out, expected)
    assert stats["frac_fallback"] == 0.0 and stats["frac_clipped"] == 0.0
    assert 0.0 < stats["cos_to_grpo"] < 1.0
    # inverse: row 1 weights 1 / (H + 0.1) = (1/2.1, 1/2.1, 10, 1/4.1), the confident token
    # (H = 0) takes most of the blame; row 0 (A > 0) is unchanged
    out = EntropyCredit(scale="none", negative="inverse")(rewards, 2, mask, entropy=entropy)[0]
    w = torch.tensor([1 / 2.1, 1 / 2.1, 10.0, 1 / 4.1], dtype=torch.float64)
    torch.testing.assert_close(out[1], (-0.5 * w / w.mean()).float())
    torch.testing.assert_close(out[0], expected[0])
    assert out[1, 2] == out[1].min()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("negative", NEGATIVES)
def test_entropy_credit_preserves_mean_token_advantage(negative, scale):
    for seed in range(3):
        rewards, g, mask, *_ = random_batch(seed)
        entropy = torch.from_numpy(np.random.default_rng(seed).gamma(0.5, 1.0, mask.shape))
        est = EntropyCredit(scale=scale, negative=negative)
        out, stats = est(rewards, g, mask, entropy=entropy.float())
        m = mask.float()
        seq = group_advantages(rewards, g, scale=scale)
        torch.testing.assert_close((out * m).sum(1) / m.sum(1), seq, atol=1e-5, rtol=1e-5)
        assert torch.equal(out[mask == 0], torch.zeros(int((mask == 0).sum())))
        assert not torch.allclose(out, seq[:, None] * m)
        assert set(stats) >= {"frac_fallback", "frac_clipped", "cos_to_grpo", "adv_std"}


@pytest.mark.parametrize("negative", NEGATIVES)
def test_entropy_credit_uniform_or_zero_entropy_is_grpo(negative):
    rewards, g, mask, *_ = random_batch(5)
    grpo = GRPO()(rewards, g, mask)[0]
    est = EntropyCredit(negative=negative)
    for value in (0.0, 0.3, 2.0):
        entropy = torch.full(mask.shape, value)
        entropy[mask == 0] = 5.0  # padding does not count
        out, stats = est(rewards, g, mask, entropy=entropy)
        assert torch.equal(out, grpo)
        assert stats["cos_to_grpo"] == 1.0 and stats["frac_fallback"] == 1.0
    entropy = torch.rand(mask.shape)
    entropy[0] = float("nan")
    out = est(rewards, g, mask, entropy=entropy)[0]
    assert torch.equal(out[0], grpo[0]) and torch.isfinite(out).all()


def test_entropy_credit_clipping_and_validation():
    rewards, g, mask, *_ = random_batch(6)
    entropy = torch.from_numpy(np.random.default_rng(6).gamma(0.3, 1.0, mask.shape)).float()
    out, stats = EntropyCredit(clip_kappa=0.8)(rewards, g, mask, entropy=entropy)
    unclipped = EntropyCredit()(rewards, g, mask, entropy=entropy)[0]
    bound = 0.8 * float(group_advantages(rewards, g).std())
    torch.testing.assert_close(out, unclipped.clamp(-bound, bound))
    assert stats["frac_clipped"] > 0
    est = EntropyCredit()
    with pytest.raises(ValueError, match="EntropyCredit needs entropy="):
        est(rewards, g, mask)
    with pytest.raises(ValueError, match=r"entropy has shape \(12, 3\), expected .*\(12, 14\)"):
        est(rewards, g, mask, entropy=torch.ones(12, 3))
    with pytest.raises(ValueError, match="entropy, inverse"):
        EntropyCredit(negative="blame")
    with pytest.raises(ValueError, match="clip_kappa"):
        EntropyCredit(clip_kappa=-1.0)
    assert EntropyCredit.needs_entropy and not EntropyCredit.needs_credit
    assert not GRPO.needs_entropy and not OSPO.needs_entropy


# 9. configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "credit", "entropy"),
    [
        ("grpo", GRPO, False, False),
        ("ospo", OSPO, True, False),
        ("random_credit", RandomCredit, True, False),
        ("entropy", EntropyCredit, False, True),
    ],
)
def test_baseline_configs_build(make_cfg, name, cls, credit, entropy):
    baseline = instantiate(make_cfg([f"baseline={name}", "seed=3"]).baseline)
    assert isinstance(baseline, Baseline) and baseline.name == name
    assert type(baseline.advantage) is cls
    assert baseline.needs_credit == credit and baseline.needs_entropy == entropy
    if cls is RandomCredit:
        assert baseline.advantage.seed == 3  # ${seed}


def test_control_yaml_builds_alone_and_shares_ospo_settings():
    """The yaml files build from a tiny dict for their interpolations (with the loss block they
    share, conf/baseline/loss/clipped.yaml), and the controls' copies of OSPO's weighting keys
    equal ospo.yaml's."""
    names = ("ospo", "random_credit", "entropy")
    load = {n: OmegaConf.load(CONF / "baseline" / f"{n}.yaml") for n in names}
    loss = OmegaConf.load(CONF / "baseline" / "loss" / "clipped.yaml")
    for n in ("random_credit", "entropy"):
        own = {k: v for k, v in load[n].items() if k != "defaults"}
        node = OmegaConf.merge(own, {"loss": loss})
        cfg = OmegaConf.merge({"rl": {"max_new_tokens": 8}, "seed": 1}, {"baseline": node})
        baseline = instantiate(cfg.baseline)
        assert baseline.loss.max_completion_length == 8
    ospo, rc, ent = (load[n].advantage for n in ("ospo", "random_credit", "entropy"))
    for key in ("scale", "weighting", "alpha", "clip_kappa"):
        assert rc[key] == ospo[key], key
    assert ent.scale == ospo.scale and ent.clip_kappa == ospo.clip_kappa
    for n in names:  # one loss block for every method, none of its own
        assert "loss" not in load[n]
        assert OmegaConf.to_container(load[n].defaults) == ["_self_", {"loss": "clipped"}]


# continuous weightings and mass per segment ---------------------------------------------------


def test_shift_advantages_hand_case():
    """relative: A_t = A + 4 |A| (c_t - cbar) / 1 over covered tokens, cbar their mean."""
    credit, covered = token_credit(TOKENS, SEGS, PHI)
    cbar = (0.5 + 0.5 - 0.25 - 0.25 + 1.0 + 1.0) / 6  # 0.41667, uncovered tokens excluded
    for a in (0.5, -0.5):
        out = shift_advantages(a, credit, covered, "relative", strength=4.0, credit_scale=1.0)
        expected = [
            a + 4 * abs(a) * (c - cbar) if k else a for c, k in zip(CREDIT, covered, strict=True)
        ]
        torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32))
        assert out[5] > out[0] > out[2]  # kids > warm red > socks, whatever the sign of A
        torch.testing.assert_close(out.mean(), torch.tensor(a))
    add = shift_advantages(0.0, credit, covered, "additive", strength=2.0, credit_scale=0.5)
    expected = [4 * (c - cbar) if k else 0.0 for c, k in zip(CREDIT, covered, strict=True)]
    torch.testing.assert_close(add, torch.tensor(expected, dtype=torch.float32))
    # relative with A = 0 moves nothing; uniform credit gives A exactly
    zero = shift_advantages(0.0, credit, covered, "relative")
    assert torch.equal(zero, torch.zeros(8))
    uniform = shift_advantages(0.7, torch.full((8,), 0.3), covered, "relative")
    assert torch.equal(uniform, torch.full((8,), 0.7))
    with pytest.raises(ValueError, match="credit_scale"):
        shift_advantages(1.0, credit, covered, "relative", credit_scale=0.0)
    with pytest.raises(ValueError, match="relative, additive"):
        shift_advantages(1.0, credit, covered, "signed")


def _ospo_rows(weighting, phis, **kw):
    """OSPO's token advantages of one group of two completions (A = +-1 with scale=none)."""
    mask = torch.ones(2, len(TOKENS), dtype=torch.long)
    est = OSPO(scale="none", weighting=weighting, **kw)
    return est([1.0, -1.0], 2, mask, [TOKENS] * 2, [seg(SEGS)] * 2, phis)[0]


@pytest.mark.parametrize("weighting", ["relative", "additive"])
def test_continuous_weightings_move_little_for_a_tiny_credit_change(weighting):
    """A credit change of 1e-5 moves every token advantage by less than 1% of |A_i| (here
    |A_i| = 0.5 and 1), measured against the fixed credit scale; the min-max weightings move
    up to all of A_i for the same change."""
    base = [np.array([0.1, 0.1, 0.1])] * 2
    nudged = [np.array([0.1, 0.100005, 0.100002]), np.array([0.1, 0.10001, 0.1])]
    for phis in (base, nudged):
        out = _ospo_rows(weighting, phis)
        torch.testing.assert_close(out.mean(1), torch.tensor([1.0, -1.0]))
    delta = (_ospo_rows(weighting, nudged) - _ospo_rows(weighting, base)).abs().max()
    assert delta < 0.01 * 1.0
    signed = _ospo_rows("signed", nudged, alpha=1.0) - _ospo_rows("signed", base, alpha=1.0)
    assert signed.abs().max() > 0.5


def test_token_segments_and_mass_per_segment():
    segment, covered = token_segments(TOKENS, SEGS)
    assert segment.tolist() == [0, 0, 1, 1, 0, 2, 2, 0]
    assert covered.tolist() == [True, True, True, True, False, True, True, False]
    m = token_mass(segment, covered, "token")
    assert m.tolist() == [1, 1, 1, 1, 0, 1, 1, 0]
    m = token_mass(segment, covered, "segment")  # 6 covered tokens, 3 segments of 2 tokens
    assert m.tolist() == [1, 1, 1, 1, 0, 1, 1, 0]
    # segment 0 of 3 tokens, segment 1 of 1: each carries 4 / 2 = 2 in all
    segment = np.array([0, 0, 0, 1, 0])
    covered = np.array([True, True, True, True, False])
    m = token_mass(segment, covered, "segment")
    torch.testing.assert_close(
        m, torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0, 0.0], dtype=torch.float64)
    )
    assert m[covered].mean() == pytest.approx(1.0)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_mass_per_segment_gives_each_segment_the_same_total(weighting):
    """With mass=segment a 3-token word and a 1-token word of the same credit carry the same
    total: of the credit-driven shift A_t - A_i (relative, additive), or of the advantage
    itself (min-max weightings, which scale A_i); with mass=token the 3-token word carries
    three times as much."""
    tokens = [(0, 2), (2, 4), (4, 6), (7, 10), (11, 14)]  # "abcdef" in 3 tokens, "ghi", "jkl"
    segs = [(0, 6), (7, 10), (11, 14)]
    phis = [np.array([0.3, 0.3, 0.0])] * 2
    mask = torch.ones(2, 5, dtype=torch.long)
    for mass, ratio in (("segment", 1.0), ("token", 3.0)):
        est = OSPO(scale="none", weighting=weighting, mass=mass, alpha=1.0)
        out = est([1.0, 0.0], 2, mask, [tokens] * 2, [seg(segs)] * 2, phis)[0]  # A = 0.5, -0.5
        torch.testing.assert_close(out.mean(1), torch.tensor([0.5, -0.5]))
        carried = out[0] - 0.5 if weighting in ("relative", "additive") else out[0]  # (5,)
        assert float(carried[:3].sum()) == pytest.approx(ratio * float(carried[3]), rel=1e-5)
