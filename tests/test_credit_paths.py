"""The credit path as the default config builds it: who the players are, the entropy the
entropy control reads, and which tokens a segment's credit reaches (docs/design.md 2.4-2.9).

Each test fails on a break that left the rest of the suite green: a default segmenter that
joins words into one player, `token_entropy` ignoring the sampling temperature, and credit
landing on another segment's tokens.
"""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from ospo.policy import build_tiny
from ospo.step import Sampling, token_entropy

TEXTS = [
    "warm waterproof kids ski jacket",
    "lightweight running shoes for men",
    "insulated hiking boots for women",
    "a jacket for skiing with my kids",
    "running shoes please",
]


# ------------------------------------------------------------------ players
@pytest.mark.parametrize(
    "text",
    ["warm waterproof kids ski jacket", "lightweight trail running shoes, wide fit"],
)
def test_default_segmenter_makes_every_content_word_a_player(make_cfg, text):
    """The composed default config's segmenter (`segmenter: phrase`, one word per player):
    each content word is its own player, in text order, punctuation left out."""
    seg = instantiate(make_cfg([]).segmenter)
    words = text.replace(",", "").split()
    assert seg(text).texts(text) == words
    assert seg(text).n == len(words)


# ------------------------------------------------------------------ entropy
def _hand_entropy(policy, ro, temperature: float) -> torch.Tensor:
    """H_t of softmax(logits / T) at each completion position, from one plain forward pass of
    the causal LM over [prompt; completion] (N, T); compare on valid tokens only."""
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)  # (N, P + T)
    mask = torch.cat([ro.prompt_mask, ro.completion_mask], 1)  # (N, P + T)
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = policy.causal_lm(
            input_ids=ids, attention_mask=mask, position_ids=position_ids
        ).logits.float()  # (N, P + T, V)
    P, T = ro.prompt_ids.shape[1], ro.completion_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : P + T - 1] / temperature, -1)  # (N, T, V)
    return -(logp.exp() * logp).sum(-1)  # (N, T)


def test_token_entropy_is_that_of_the_sampling_temperature():
    """`token_entropy` (what EntropyCredit weighs tokens by) is the entropy of the sampling
    distribution softmax(logits / T): equal to a hand computation at T = 0.5 and T = 2, and
    lower at 0.5 than at 2 on every token."""
    policy = build_tiny(TEXTS, seed=0)
    torch.manual_seed(0)
    messages = [[{"role": "user", "content": r}] for r in TEXTS[3:]]  # 2 prompts, 2 lengths
    ro = policy.generate(messages, num_generations=2, max_new_tokens=6, do_sample=True)
    valid = ro.completion_mask.bool()  # (N, T)
    assert valid.sum() >= 4
    H = {}
    for temperature in (0.5, 2.0):
        sampling = Sampling(max_new_tokens=6, temperature=temperature)
        H[temperature] = token_entropy(policy, ro, sampling, group_size=2)  # (N, T)
        assert H[temperature].shape == valid.shape
        assert torch.equal(H[temperature][~valid], torch.zeros(int((~valid).sum())))
        torch.testing.assert_close(
            H[temperature][valid],
            _hand_entropy(policy, ro, temperature)[valid],
            atol=1e-4,
            rtol=1e-4,
        )
    assert (H[0.5][valid] < H[2.0][valid] - 1e-3).all()


# ------------------------------------------------------------------ credit -> tokens
# "waterproof ski jacket" + EOS: the default segmenter's three players, tokenised into 3, 1 and
# 2 tokens (character spans as a tokenizer's offsets give them), and a zero-width EOS.
TEXT = "waterproof ski jacket"
TOKEN_SPANS = [(0, 5), (5, 8), (8, 10), (10, 14), (14, 18), (18, 21), (21, 21)]
TOKEN_SEGMENT = [0, 0, 0, 1, 2, 2, None]  # the player each token belongs to (None: EOS)


@pytest.mark.parametrize(
    "phi",
    [[0.6, 0.1, -0.2], [-0.2, 0.1, 0.6], [0.1, 0.6, -0.2], [-0.2, 0.6, 0.1]],
    ids=lambda p: ",".join(map(str, p)),
)
def test_default_ospo_puts_the_top_credit_on_its_own_segments_tokens(make_cfg, phi):
    """OSPO as the default config builds it (`baseline: ospo`), on a positive completion whose
    segments have 3, 1 and 2 tokens: every token of the highest-phi segment gets the highest
    token advantage, every token of the lowest-phi one the lowest, the middle one lies between,
    and the EOS keeps A_i; reversing phi reverses the order. The other completion of the group
    (reward 0, no credit) keeps its uniform A_i < 0."""
    cfg = make_cfg([])
    estimator = instantiate(cfg.baseline).advantage
    seg = instantiate(cfg.segmenter)(TEXT)
    assert seg.texts(TEXT) == ["waterproof", "ski", "jacket"]
    T = len(TOKEN_SPANS)
    mask = torch.ones(2, T, dtype=torch.long)
    out, stats = estimator(
        np.array([1.0, 0.0]),
        2,
        mask,
        token_spans=[TOKEN_SPANS, TOKEN_SPANS],
        segmentations=[seg, seg],
        phis=[np.array(phi), None],
    )
    a_i = float(out[1, 0]) * -1.0  # the group's |A_i|: the rewards 1 and 0 are symmetric
    assert a_i > 0 and torch.equal(out[1], torch.full((T,), -a_i))
    adv = out[0]  # (T,)
    by_segment = {
        j: adv[[t for t, s in enumerate(TOKEN_SEGMENT) if s == j]] for j in range(len(phi))
    }
    for j, values in by_segment.items():  # a segment's tokens share its advantage
        assert torch.equal(values, values[:1].expand_as(values)), j
    hi, mid, lo = np.argsort(phi)[::-1]
    assert float(adv.max()) == float(by_segment[hi][0])
    assert float(adv.min()) == float(by_segment[lo][0])
    assert by_segment[hi][0] > by_segment[mid][0] > by_segment[lo][0]
    assert float(adv[-1]) == pytest.approx(a_i)  # the EOS, on no segment, keeps A_i
    assert stats["cos_to_grpo"] < 1.0
    # reversed credit, reversed order
    rev, _ = estimator(
        np.array([1.0, 0.0]),
        2,
        mask,
        token_spans=[TOKEN_SPANS, TOKEN_SPANS],
        segmentations=[seg, seg],
        phis=[np.array(phi[::-1]), None],
    )
    first = {j: float(rev[0, TOKEN_SEGMENT.index(j)]) for j in range(len(phi))}
    n = len(phi) - 1
    assert float(rev[0].max()) == first[n - hi] and float(rev[0].min()) == first[n - lo]
