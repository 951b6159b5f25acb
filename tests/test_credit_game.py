"""The credit game is the reward the step trains on (docs/design.md sections 2.4-2.6).

On a catalog whose product texts hold glue words ("with", "under", "for") and stop words,
unlike the embedded task's: every used credit adds up to r - v(empty) with r the step's
reward, glue words stay in every coalition, words the retriever does not read are no players,
a gated completion is scored by no coalition and keeps A_i, and credit lands on its own
segment (an unknown word gets zero at its index; the unions change Owen's values).
"""

import numpy as np
import pytest
import torch

from ospo.advantage import OSPO, group_advantages
from ospo.attribution import Owen, Shapley, owen_num_coalitions
from ospo.baseline import Baseline
from ospo.data import Sample
from ospo.format import FormatCheck
from ospo.loss import PolicyLoss
from ospo.policy import build_tiny
from ospo.policy.sampling import build_rollouts
from ospo.retriever import BM25, Dense
from ospo.reward import NDCG, Recall, join_texts
from ospo.rollout import HFRollout
from ospo.segmenter import PhraseSegmenter, Segmentation
from ospo.step import RLStep, Sampling, compute_credit

CATALOG = {
    "p0": "rolling backpack with wheels under 100",
    "p1": "laptop backpack for travel with usb port",
    "p2": "kids backpack with wheels",
    "p3": "hiking backpack under 50 for women",
    "p4": "wheels for office chair",
    "p5": "travel duffel bag with wheels",
    "p6": "school backpack for kids under 30",
    "p7": "leather backpack without wheels",
    "p8": "backpack rain cover for hiking",
    "p9": "suitcase with spinner wheels over 100",
    "p10": "the original backpack for the city",
    "p11": "gift card under 100",
    "p12": "kids rolling suitcase",
    "p13": "usb charger for travel",
}
GAINS = [{"p0": 2.0, "p2": 1.0, "p12": 1.0}, {"p3": 2.0, "p8": 1.0, "p6": 1.0}]
REQUESTS = ["a bag for my trip", "something for the trail"]

# completion -> the context every coalition keeps, under BM25 (stop words are context) and
# under the dense encoder (it reads every word, so only glue words are context)
CASES = {
    "wheels backpack under 100": ("under", "under"),
    "backpack with wheels for kids": ("with for", "with for"),
    "the rolling backpack with wheels": ("the with", "with"),
    "hiking backpack for women under 50": ("for under", "for under"),
}


def samples(append: bool) -> list[Sample]:
    return [
        Sample(
            qid=f"q{i}",
            request=r,
            messages=[{"role": "user", "content": r}],
            gains=g,
            prefix=r if append else "",
        )
        for i, (r, g) in enumerate(zip(REQUESTS, GAINS, strict=True))
    ]


@pytest.fixture(scope="module")
def bm25():
    retriever = BM25()
    retriever.index(CATALOG)
    return retriever


@pytest.fixture(scope="module")
def dense():
    retriever = Dense()
    retriever.index(CATALOG)
    return retriever


def check_game(retriever, reward_cls, append: bool, column: int) -> None:
    """Credits add up to the completion's reward minus v(empty), and v(empty) is the reward
    of the prefix plus the context (glue words kept)."""
    reward = reward_cls(retriever, k=3)
    seg = PhraseSegmenter()
    for i, (text, contexts) in enumerate(CASES.items()):
        sample = samples(append)[i % 2]
        credit = compute_credit([text], [sample], seg, Owen(), reward, keep_query=False)
        phi = credit.phis[0]
        fresh = reward_cls(retriever, k=3)  # no memo: values from retrieval alone
        r = fresh.score_texts([text], [sample])[0]
        v_empty = fresh.score_queries([join_texts(sample.prefix, contexts[column])], [sample])[0]
        assert phi.sum() == pytest.approx(r - v_empty, abs=1e-9), text
        assert credit.coalitions == owen_num_coalitions(credit.segmentations[0].unions)
        # players: the words the retriever reads, all but the context words
        assert credit.segments == [len(text.split()) - len(contexts[column].split())], text


@pytest.mark.parametrize("reward_cls", [NDCG, Recall])
@pytest.mark.parametrize("append", [True, False])
def test_credit_adds_up_to_the_reward_with_glue_words_bm25(bm25, reward_cls, append):
    check_game(bm25, reward_cls, append, column=0)


@pytest.mark.slow
@pytest.mark.parametrize("reward_cls", [NDCG, Recall])
@pytest.mark.parametrize("append", [True, False])
def test_credit_adds_up_to_the_reward_with_glue_words_dense(dense, reward_cls, append):
    check_game(dense, reward_cls, append, column=1)


def test_glue_words_matter_on_this_catalog(bm25):
    """The check above can fail: dropping "under" from the query changes the reward."""
    reward = NDCG(bm25, k=3)
    s = samples(append=False)[0]
    with_glue, without = reward.score_queries(
        ["wheels backpack under 100", "wheels backpack 100"], [s, s]
    )
    assert with_glue != without


def test_players_are_the_words_the_retriever_reads(bm25):
    text = "the rolling backpack for my kids, with wheels"
    seg = PhraseSegmenter()
    assert seg(text, reads=bm25.reads).texts(text) == ["rolling", "backpack", "kids", "wheels"]
    assert seg(text).texts(text) == ["the", "rolling", "backpack", "my", "kids", "wheels"]
    assert Dense().reads("the") and not bm25.reads("the") and bm25.reads("zzz")
    # the cap counts real players only: 10 read words and 4 stop words stay 10 players
    words = "the a my red warm kids ski jacket the waterproof hood my zip pocket lined"
    capped = PhraseSegmenter(max_segments=10)(words, reads=bm25.reads)
    assert capped.texts(words) == words.replace("the ", "").replace("a ", "").replace(
        "my ", ""
    ).split(" ")


def test_an_unknown_word_gets_zero_credit_at_its_own_index(bm25):
    """BM25 scores nothing for a word no product holds: its exact credit is 0 at its index,
    whatever its position, and the other words' credits keep their order."""
    reward = NDCG(bm25, k=3)
    s = samples(append=False)[0]
    seg = PhraseSegmenter()
    for text, oov in (("zzyzx wheels backpack", 0), ("wheels zzyzx backpack", 1)):
        phi = compute_credit([text], [s], seg, Owen(), reward, keep_query=False).phis[0]
        assert phi[oov] == 0.0
        assert np.count_nonzero(phi) == 2


def test_unions_change_owen_values_and_credit_follows_its_segment(bm25):
    """Owen over unions differs from Shapley (singletons) on this game, so a broken union
    structure shows; reversing the words reverses the credit (no index mix-up)."""
    reward = NDCG(bm25, k=3)
    s = samples(append=False)[0]
    text = "rolling backpack wheels kids"
    seg = PhraseSegmenter()(text)
    fn = reward.coalition_value_fn(text, seg, s)
    two_unions = Owen()(fn, [[0, 1], [2, 3]])
    singletons = Owen()(fn, [[0], [1], [2], [3]])
    np.testing.assert_allclose(singletons, Shapley()(fn, [[0, 1, 2, 3]]))
    assert not np.allclose(two_unions, singletons)
    rev = "kids wheels backpack rolling"
    rseg = PhraseSegmenter()(rev)
    phi_rev = Shapley()(reward.coalition_value_fn(rev, rseg, s), rseg.unions)
    np.testing.assert_allclose(phi_rev[::-1], Shapley()(fn, [[0, 1, 2, 3]]), atol=1e-12)


# ---------------------------------------------------------------------------- in the step
SCRIPT = [  # (completion, ended at EOS): 2 prompts x G = 4
    ("wheels backpack under 100", True),
    ("backpack with wheels for kids", True),
    ("rolling backpack with wheels under 100 for kids and travel", True),  # > 8 words
    ("kids backpack", False),  # cut off: no EOS
    ("hiking backpack for women under 50", True),
    ("rain cover for hiking", True),
    ("backpack", False),
    ("school backpack for kids under 30 with wheels and usb port", True),
]


class ScriptedRollout(HFRollout):
    """An engine that 'samples' fixed completions, for a step whose completions are known."""

    def generate(self, policy, messages_list, num_generations=1, seed=None, **_):
        G = num_generations
        prompt_ids, prompt_mask = policy.encode_prompts(messages_list)  # (B, P)
        rows = []
        for text, ended in SCRIPT:
            ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(ids + ([policy.eos_token_ids[0]] if ended else []))
        T = max(len(r) for r in rows)
        completion_ids = torch.full((len(rows), T), policy.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            completion_ids[i, : len(r)] = torch.tensor(r)
        return build_rollouts(
            policy,
            prompt_ids.repeat_interleave(G, dim=0),
            prompt_mask.repeat_interleave(G, dim=0),
            completion_ids,
            G,
        )


@pytest.mark.parametrize("reward_cls", [NDCG, Recall])
def test_the_step_credits_the_reward_it_trains_on(bm25, reward_cls):
    """In `RLStep`: gated completions get `invalid_reward`, no coalition and A_i on every
    token; every other completion's credits add up to its reward minus v(empty)."""
    policy = build_tiny(list(CATALOG.values()) + REQUESTS + [t for t, _ in SCRIPT], seed=0)
    reward = reward_cls(bm25, k=3)
    check = FormatCheck(max_words=8, completion="append")
    loss = PolicyLoss(0.2, 0.28, 0.0, "token_mean", 16)
    step = RLStep(
        policy,
        reward,
        Baseline("ospo", OSPO(), loss),
        Sampling(max_new_tokens=16),
        num_generations=4,
        segmenter=PhraseSegmenter(),
        attribution=Owen(),
        format_check=check,
        invalid_reward=0.0,
        engine=ScriptedRollout(),
    )
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    out = step(samples(append=True), seed=0, optimizer=opt, scheduler=sched)
    assert out.rollouts.texts == [t for t, _ in SCRIPT]
    assert out.well_formed == [True, True, False, False, True, True, False, False]
    fresh = reward_cls(bm25, k=3)
    retrieved = fresh.score_texts(out.rollouts.texts, out.samples)
    adv = group_advantages(out.rewards, 4)
    valid = out.rollouts.completion_mask.bool()
    coalitions = 0
    for i, (ok, phi, seg) in enumerate(
        zip(out.well_formed, out.credit.phis, out.credit.segmentations, strict=True)
    ):
        if not ok:
            assert out.rewards[i] == 0.0  # the gate
            assert phi is None
            assert torch.equal(out.advantages[i][valid[i]], adv[i].expand(int(valid[i].sum())))
            continue
        assert out.rewards[i] == retrieved[i]
        context = seg.coalition_text(out.rollouts.texts[i], np.zeros(seg.n, dtype=bool))
        v_empty = fresh.score_queries(
            [join_texts(out.samples[i].prefix, context)], [out.samples[i]]
        )
        assert phi.sum() == pytest.approx(out.rewards[i] - v_empty[0], abs=1e-9)
        coalitions += owen_num_coalitions(seg.unions)
    assert out.credit.coalitions == coalitions
    assert out.advantage_stats["frac_fallback"] >= 0.5
    assert out.advantages[valid].abs().sum() > 0  # something was learned from


def test_segmentation_of_a_gated_completion_is_still_reported():
    """compute_credit with `scored` False keeps the segmentation (for logs) but no phi."""
    retriever = BM25()
    retriever.index(CATALOG)
    s = samples(append=False)[0]
    credit = compute_credit(
        ["wheels backpack"], [s], PhraseSegmenter(), Owen(), NDCG(retriever), False, [False]
    )
    assert credit.phis == [None] and credit.coalitions == 0
    assert isinstance(credit.segmentations[0], Segmentation) and credit.segments == [2]
