"""Tests for ospo.loss: clipped surrogate, aggregations, KL k3, metrics and entropy."""

import math

import pytest
import torch

from ospo.loss import AGGREGATIONS, entropy_from_logits, policy_loss

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


def test_entropy_from_logits_matches_softmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 11) * 4
    p = torch.softmax(logits.double(), dim=-1)
    direct = -(p * p.log()).sum(-1).float()
    torch.testing.assert_close(entropy_from_logits(logits), direct)
    torch.testing.assert_close(entropy_from_logits(logits, chunk_size=2), direct)
    # uniform -> log V; huge logits stay finite; masked vocabulary (-inf) contributes 0
    torch.testing.assert_close(
        entropy_from_logits(torch.zeros(1, 2, 8)), torch.full((1, 2), math.log(8))
    )
    big = torch.tensor([[[1e4, 1e4, -1e4]]])
    torch.testing.assert_close(entropy_from_logits(big), torch.tensor([[math.log(2)]]))
    masked = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    h = entropy_from_logits(masked)
    torch.testing.assert_close(h, torch.tensor([[math.log(2)]]))
    h.sum().backward()
    assert torch.isfinite(masked.grad).all()
    assert entropy_from_logits(torch.randn(2, 3, 4, dtype=torch.bfloat16)).dtype == torch.float32
