"""Tests for ospo.loss: clipped surrogate, aggregations, KL k3, metrics, entropy, sequence-level
ratio (GSPO-token) and top-entropy masking."""

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ospo.loss import AGGREGATIONS, PolicyLoss, policy_loss

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])  # unequal lengths, 6 tokens


def test_rho_one_token_mean_loss_and_gradient():
    torch.manual_seed(0)
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.randn(3, 4)
    loss, metrics = policy_loss(logp, logp.detach(), adv, MASK)
    m = MASK.float()
    torch.testing.assert_close(loss, -(adv * m).sum() / 6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * m / 6)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["clip_ratio"] == 0.0


def test_clipping_zeroes_gradient_on_the_clipped_side():
    # token: 0 A>0 rho=1.5 (clipped), 1 A<0 rho=0.5 (clipped),
    #        2 A>0 rho=0.5 (not clipped), 3 A<0 rho=1.5 (not clipped), 4 A>0 rho=1.1 (inside)
    rho = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1]])
    adv = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    old = torch.zeros(1, 5)
    logp = rho.log().requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, torch.ones(1, 5))
    # surrogate min(rho A, clip(rho) A): 1.2*2, 0.8*-2, 0.5*2, 1.5*-2, 1.1*1
    torch.testing.assert_close(loss, -torch.tensor(2.4 - 1.6 + 1.0 - 3.0 + 1.1) / 5)
    loss.backward()
    expected = torch.tensor([[0.0, 0.0, -2.0 * 0.5, 2.0 * 1.5, -1.1]]) / 5  # d(-rho A)/dlogp
    torch.testing.assert_close(logp.grad, expected)


def test_asymmetric_clip_range():
    rho = torch.tensor([[1.25, 1.25]])
    adv = torch.tensor([[1.0, 1.0]])
    logp = rho.log().requires_grad_(True)
    loss, metrics = policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), eps_high=0.28)
    loss.backward()
    torch.testing.assert_close(logp.grad, -rho / 2)  # 1.25 < 1.28: not clipped
    assert metrics["clip_ratio_high"] == 0.0
    _, metrics = policy_loss(rho.log(), torch.zeros(1, 2), adv, torch.ones(1, 2), eps_high=0.2)
    assert metrics["clip_ratio_high"] == 1.0


def test_aggregations_hand_case():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = torch.tensor([[1.0, 1.0, 1.0], [4.0, 9.0, 9.0]])  # padding values must not count
    logp = torch.zeros(2, 3)
    # per-token loss at rho = 1 is -A: [-1, -1, -1] and [-4]
    results = {
        agg: float(policy_loss(logp, logp, adv, mask, aggregation=agg)[0]) for agg in AGGREGATIONS
    }
    assert results["token_mean"] == pytest.approx(-7 / 4)
    assert results["seq_mean_token_mean"] == pytest.approx((-1 - 4) / 2)
    assert results["token_sum_norm"] == pytest.approx(-7 / (2 * 3))
    loss, _ = policy_loss(
        logp, logp, adv, mask, aggregation="token_sum_norm", max_completion_length=7
    )
    assert float(loss) == pytest.approx(-7 / 14)


def test_kl_k3():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    adv = torch.tensor([[1.0, -1.0, 5.0]])
    base, _ = policy_loss(logp, logp.detach(), adv, mask)
    same, metrics = policy_loss(logp, logp.detach(), adv, mask, beta=0.1, ref_logp=logp.detach())
    assert metrics["kl"] == 0.0
    torch.testing.assert_close(same, base)
    ref = logp.detach() + math.log(2.0)  # ref - logp = ln 2 -> k3 = 2 - ln 2 - 1
    k3 = 1 - math.log(2.0)
    loss, metrics = policy_loss(logp, logp.detach(), adv, mask, beta=0.1, ref_logp=ref)
    assert metrics["kl"] == pytest.approx(k3)
    assert metrics["kl"] > 0
    torch.testing.assert_close(loss, base + 0.1 * k3)
    # beta = 0 with a reference: reported, not in the loss
    loss0, metrics0 = policy_loss(logp, logp.detach(), adv, mask, ref_logp=ref)
    torch.testing.assert_close(loss0, base)
    assert metrics0["kl"] == pytest.approx(k3)
    assert "kl" not in policy_loss(logp, logp.detach(), adv, mask)[1]
    # k3 is positive for ref < logp too
    _, m2 = policy_loss(logp, logp.detach(), adv, mask, ref_logp=logp.detach() - 1.0)
    assert m2["kl"] == pytest.approx(math.exp(-1) + 1 - 1)


def test_metrics_hand_case():
    # valid tokens: rho 0.5 A<0 (low clip), 1.5 A>0 (high clip), 1.0, 0.7 A>0 (unclipped side);
    # the padded token (rho 0.1, A<0) must not count
    rho = torch.tensor([[0.5, 1.5, 1.0], [0.7, 0.1, 0.1]])
    adv = torch.tensor([[-1.0, 1.0, 1.0], [1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    entropy = torch.tensor([[1.0, 2.0, 3.0], [6.0, 100.0, 100.0]])
    _, m = policy_loss(rho.log(), torch.zeros(2, 3), adv, mask, entropy=entropy)
    assert m["clip_ratio_low"] == pytest.approx(0.25)
    assert m["clip_ratio_high"] == pytest.approx(0.25)
    assert m["clip_ratio"] == pytest.approx(0.5)
    assert m["ratio_mean"] == pytest.approx((0.5 + 1.5 + 1.0 + 0.7) / 4)
    assert m["entropy"] == pytest.approx(3.0)
    assert all(isinstance(v, float) for v in m.values())


def test_policy_loss_validates():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="token_mean, seq_mean_token_mean, token_sum_norm"):
        policy_loss(x, x, x, x, aggregation="sum")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(x, x, x, x, beta=0.04)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(x, x, torch.zeros(2, 4), x)


# sequence-level ratio (GSPO, GSPO-token) -----------------------------------------------------


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_sequence_level_equals_token_level_at_ratio_one(aggregation):
    """mu = 1 (old_logp = logp): s_i = 1, same loss, gradient and metrics to the digit."""
    torch.manual_seed(0)
    logp = torch.randn(3, 4, requires_grad=True)
    adv, ref = torch.randn(3, 4), torch.randn(3, 4)
    out, grads = {}, {}
    for level in ("token", "sequence"):
        logp.grad = None
        kw = {"beta": 0.1, "ref_logp": ref, "aggregation": aggregation, "importance_level": level}
        loss, metrics = policy_loss(logp, logp.detach(), adv, MASK, **kw)
        loss.backward()
        out[level], grads[level] = (loss, metrics), logp.grad.clone()
    torch.testing.assert_close(out["sequence"][0], out["token"][0], rtol=0, atol=0)
    torch.testing.assert_close(grads["sequence"], grads["token"], rtol=0, atol=0)
    assert out["sequence"][1] == out["token"][1]


def test_sequence_level_clips_whole_completions_hand_case():
    # log ratios: completion 0 [0.5, 0.1 | pad 5.0] -> mean 0.3, s_0 = e^0.3 = 1.35 > 1.28, A > 0:
    # clipped on both tokens (token level would clip only the first, e^0.1 = 1.105 is inside);
    # completion 1 [0.4, -0.2 | pad] -> s_1 = e^0.1, inside (token level would clip e^0.4).
    log_ratio = torch.tensor([[0.5, 0.1, 5.0], [0.4, -0.2, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = torch.tensor([[1.0, 2.0, 9.0], [1.0, -1.0, 9.0]])
    old = torch.randn(2, 3)
    logp = (old + log_ratio).requires_grad_(True)
    loss, m = policy_loss(logp, old, adv, mask, eps_high=0.28, importance_level="sequence")
    s0, s1 = math.exp(0.3), math.exp(0.1)
    # surrogates: 1.28 * 1, 1.28 * 2 (clipped) and s_1 * 1, s_1 * -1; token_mean over 4 tokens
    assert float(loss.detach()) == pytest.approx(-(1.28 * 3 + s1 - s1) / 4)
    loss.backward()
    expected = torch.tensor([[0.0, 0.0, 0.0], [-s1 * 1.0, s1 * 1.0, 0.0]]) / 4
    torch.testing.assert_close(logp.grad, expected)
    assert m["clip_ratio_high"] == pytest.approx(0.5) and m["clip_ratio_low"] == 0.0
    assert m["ratio_mean"] == pytest.approx((2 * s0 + 2 * s1) / 4)
    # the token-level loss on the same data: completion 0's second token keeps its gradient
    logp.grad = None
    policy_loss(logp, old, adv, mask, eps_high=0.28)[0].backward()
    assert logp.grad[0, 1] == pytest.approx(-math.exp(0.1) * 2.0 / 4)
    assert logp.grad[1, 0] == 0.0  # e^0.4 > 1.28 with A > 0: clipped per token


def test_sequence_level_gradient_follows_token_advantages():
    """GSPO-token: d loss / d logp_{i,t} = -s_i * A_{i,t} / n_valid (unclipped), so the sign of
    each token's step is its own advantage's, not the completion's mean advantage (here 0)."""
    torch.manual_seed(1)
    old = torch.randn(3, 4)
    logp = (old + 0.05 * torch.randn(3, 4)).requires_grad_(True)  # s_i within [0.8, 1.28]
    adv = torch.tensor([[1.0, -2.0, 1.0, 7.0], [3.0, -3.0, 5.0, 5.0], [-0.5, 1.0, 1.0, 1.0]])
    loss, m = policy_loss(logp, old, adv, MASK, eps_high=0.28, importance_level="sequence")
    loss.backward()
    mk = MASK.float()
    log_s = ((logp.detach() - old) * mk).sum(1, keepdim=True) / mk.sum(1, keepdim=True)
    assert m["clip_ratio"] == 0.0
    torch.testing.assert_close(logp.grad, -log_s.exp() * adv * mk / 6)
    valid = MASK > 0
    assert torch.equal(torch.sign(-logp.grad[valid]), torch.sign(adv[valid]))


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_sequence_level_equals_gspo_with_sequence_advantages(aggregation):
    """A_{i,t} = A_i: the same loss and gradient as GSPO, whose s_i is differentiated whole:
    per-token term -min(s_i A_i, clip(s_i) A_i) on every valid token of completion i."""
    torch.manual_seed(2)
    old = torch.randn(4, 4)
    # mean log ratios about 0.4 (A > 0) and -0.4 (A < 0): clipped; 0.1 and -0.1: inside
    shift = torch.tensor([[0.4], [-0.4], [0.1], [-0.1]])  # (N, 1)
    logp = (old + shift + 0.1 * torch.randn(4, 4)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([[1.0], [-1.5], [0.5], [2.0]]).expand(4, 4)
    kw = {"eps_high": 0.28, "aggregation": aggregation, "importance_level": "sequence"}
    loss, m = policy_loss(logp, old, adv, mask, **kw)
    assert m["clip_ratio_low"] == 2 / 10 and m["clip_ratio_high"] == 3 / 10
    loss.backward()
    grad = logp.grad.clone()

    mk = mask.float()
    theta = logp.detach().clone().requires_grad_(True)
    s = (((theta - old) * mk).sum(1) / mk.sum(1)).exp()  # (N,) differentiable
    a = adv[:, 0]
    term = -torch.minimum(s * a, s.clamp(0.8, 1.28) * a)  # (N,)
    per_token = term[:, None] * mk  # (N, T)
    expected = {
        "token_mean": per_token.sum() / mk.sum(),
        "seq_mean_token_mean": term.mean(),
        "token_sum_norm": per_token.sum() / (4 * 4),
    }[aggregation]
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, theta.grad)


# top-entropy masking ---------------------------------------------------------------------------


def test_top_entropy_quantile_one_is_the_plain_loss():
    """q = 1.0 with entropies: the loss without entropies and the clipped surrogate by hand."""
    torch.manual_seed(3)
    logp = torch.randn(3, 4, requires_grad=True)
    adv, entropy = torch.randn(3, 4), torch.rand(3, 4)
    old = logp.detach() + 0.3 * torch.randn(3, 4)
    plain, m_plain = policy_loss(logp, old, adv, MASK)
    (g_plain,) = torch.autograd.grad(plain, logp)
    loss, m = policy_loss(logp, old, adv, MASK, entropy=entropy, top_entropy_quantile=1.0)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(loss, plain, rtol=0, atol=0)
    torch.testing.assert_close(g, g_plain, rtol=0, atol=0)
    rho = (logp - old).exp()
    hand = -(torch.minimum(rho * adv, rho.clamp(0.8, 1.2) * adv) * MASK).sum() / 6
    torch.testing.assert_close(loss, hand)
    assert m.pop("entropy") == pytest.approx(float((entropy * MASK).sum()) / 6)
    assert m == m_plain


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_top_entropy_quantile_half_masks_the_lower_half(level):
    # valid entropies 0.1, 2.0, 0.5 | 3.0: median (0.5 + 2.0) / 2 = 1.25 keeps tokens (0, 1) and
    # (1, 0); the padded entropies (9) must not move the quantile
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    entropy = torch.tensor([[0.1, 2.0, 0.5, 9.0], [3.0, 9.0, 9.0, 9.0]])
    adv = torch.tensor([[1.0, 2.0, 3.0, 5.0], [4.0, 5.0, 5.0, 5.0]])
    logp = torch.zeros(2, 4, requires_grad=True)
    ref = logp.detach() + math.log(2.0)  # k3 = 1 - ln 2 on every token
    k3 = 1 - math.log(2.0)
    args = (logp, logp.detach(), adv, mask)
    kw = {"entropy": entropy, "top_entropy_quantile": 0.5, "importance_level": level}
    loss, m = policy_loss(*args, **kw)
    assert float(loss.detach()) == pytest.approx(-(2.0 + 4.0) / 4)  # over all 4 valid tokens
    assert m["entropy_mask_ratio"] == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0, -2.0, 0, 0], [-4.0, 0, 0, 0]]) / 4)
    seq, _ = policy_loss(*args, aggregation="seq_mean_token_mean", **kw)
    assert float(seq.detach()) == pytest.approx((-2.0 / 3 - 4.0) / 2)
    # the KL term stays on every valid token: d k3 / d logp = 1 - exp(ref - logp) = -1
    logp.grad = None
    loss, m = policy_loss(*args, beta=0.1, ref_logp=ref, **kw)
    assert float(loss.detach()) == pytest.approx(-(2.0 + 4.0) / 4 + 0.1 * k3)
    loss.backward()
    kl_grad = 0.1 * -1.0 * mask.float() / 4
    policy_grad = torch.tensor([[0, -2.0, 0, 0], [-4.0, 0, 0, 0]]) / 4
    torch.testing.assert_close(logp.grad, policy_grad + kl_grad)


def test_top_entropy_quantile_keeps_ties_and_the_top_q():
    # entropies 1..5: the 0.5 quantile is 3 exactly, kept with 4 and 5 (at or above); q = 0.2
    # keeps the top fifth (0.8 quantile 4.2: only 5)
    entropy = torch.tensor([[3.0, 1.0, 5.0, 2.0, 4.0]])
    adv = torch.tensor([[1.0, 10.0, 100.0, 1000.0, 10000.0]])
    logp = torch.zeros(1, 5)
    for q, kept in ((0.5, [1.0, 100.0, 10000.0]), (0.2, [100.0])):
        kw = {"entropy": entropy, "top_entropy_quantile": q}
        loss, m = policy_loss(logp, logp, adv, torch.ones(1, 5), **kw)
        assert float(loss) == pytest.approx(-sum(kept) / 5)
        assert m["entropy_mask_ratio"] == pytest.approx(len(kept) / 5)


def test_loss_options_validate():
    x = torch.zeros(2, 3)
    for q in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"top_entropy_quantile must be in \(0, 1\]"):
            policy_loss(x, x, x, x, entropy=x, top_entropy_quantile=q)
        with pytest.raises(ValueError, match=r"top_entropy_quantile must be in \(0, 1\]"):
            PolicyLoss(top_entropy_quantile=q)
    with pytest.raises(ValueError, match="needs entropy"):
        policy_loss(x, x, x, x, top_entropy_quantile=0.5)
    with pytest.raises(ValueError, match="expected one of token, sequence"):
        policy_loss(x, x, x, x, importance_level="seq")
    with pytest.raises(ValueError, match="expected one of token, sequence"):
        PolicyLoss(importance_level="Sequence")
    loss = PolicyLoss(importance_level="sequence", top_entropy_quantile=0.2)
    assert (loss.importance_level, loss.top_entropy_quantile) == ("sequence", 0.2)


def test_every_baseline_composes_the_shared_loss_block(make_cfg):
    """conf/baseline/loss/clipped.yaml lands at `baseline.loss` for every method, with the new
    keys at their no-op defaults, and its keys override from the command line."""
    blocks = {
        b: OmegaConf.to_container(make_cfg([f"baseline={b}"]).baseline.loss, resolve=True)
        for b in ("grpo", "ospo", "random_credit", "entropy")
    }
    assert all(block == blocks["ospo"] for block in blocks.values())
    assert blocks["ospo"]["importance_level"] == "token"
    assert blocks["ospo"]["top_entropy_quantile"] == 1.0
    overrides = ["baseline.loss.beta=0.1", "baseline.loss.importance_level=sequence"]
    cfg = make_cfg(["baseline=grpo", *overrides, "baseline.loss.top_entropy_quantile=0.2"])
    loss = instantiate(cfg.baseline).loss
    assert (loss.beta, loss.importance_level, loss.top_entropy_quantile) == (0.1, "sequence", 0.2)
