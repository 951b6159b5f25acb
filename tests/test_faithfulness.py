"""ospo.faithfulness: the per-request metrics on hand cases and a small end-to-end run."""

import math

import numpy as np
import pytest

from ospo.data import Sample
from ospo.faithfulness import (
    FAITH_PERMUTATIONS,
    MC_PERMUTATIONS,
    attribute,
    chance_share,
    efficiency_gap,
    evaluate,
    intent_share,
    main,
    make_completion,
    precision_at_1,
    relative_error,
    render,
    segment_hits,
)

SEGMENTS = ["Warm Kids' coat", "for the slopes", "red"]
INTENT = ["kids", "insulated", "ski", "jacket"]


def test_segment_hits_uses_the_retriever_tokens():
    np.testing.assert_array_equal(segment_hits(SEGMENTS, INTENT), [True, False, False])
    # case and punctuation are normalised like the index; stop words never match
    assert segment_hits(["SKI-jacket"], INTENT).tolist() == [True]
    assert segment_hits(["the", ""], ["the kids"]).tolist() == [False, False]


def test_intent_share_hand_cases():
    assert intent_share(SEGMENTS, [2.0, -1.0, 1.0], INTENT) == pytest.approx(2 / 3)
    assert intent_share(SEGMENTS, [0.0, 3.0, 1.0], INTENT) == 0.0
    assert intent_share(SEGMENTS, [5.0, -1.0, -4.0], INTENT) == 1.0
    assert math.isnan(intent_share(SEGMENTS, [-1.0, 0.0, -2.0], INTENT))
    with pytest.raises(ValueError, match="phi has 2 values for 3 segments"):
        intent_share(SEGMENTS, [1.0, 2.0], INTENT)


def test_chance_share_and_precision_at_1():
    assert chance_share(SEGMENTS, INTENT) == pytest.approx(1 / 3)
    assert chance_share(["kids ski", "jacket"], INTENT) == 1.0
    assert math.isnan(chance_share([], INTENT))
    assert precision_at_1(SEGMENTS, [2.0, -1.0, 1.0], INTENT) == 1.0
    assert precision_at_1(SEGMENTS, [0.0, 3.0, 1.0], INTENT) == 0.0
    assert precision_at_1(SEGMENTS, [1.0, 1.0, 0.0], INTENT) == 0.5  # tie at the top
    assert precision_at_1(SEGMENTS, [0.0, 0.0, 0.0], INTENT) == pytest.approx(1 / 3)
    assert math.isnan(precision_at_1([], [], INTENT))


def test_relative_error_and_efficiency():
    assert relative_error([1.0, 1.0], [2.0, 0.0]) == pytest.approx(1.0)  # mean|d|=1, mean|x|=1
    assert relative_error([1.0, -1.0], [1.0, -1.0]) == 0.0
    assert math.isnan(relative_error([1.0, 0.0], [0.0, 0.0]))
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error([1.0], [1.0, 2.0])
    assert efficiency_gap([0.25, 0.5], v_full=1.0, v_empty=0.25) == 0.0
    assert efficiency_gap([0.5, 0.5], v_full=0.5, v_empty=0.0) == pytest.approx(0.5)


def test_attribute_on_an_additive_game():
    """Additive game v(S) = sum_{j in S} w_j: every exact and MC value equals w."""
    w = np.array([0.5, -0.2, 0.0, 0.3])

    def value_fn(masks):
        return masks.astype(float) @ w

    out = attribute(value_fn, [[0, 1], [2, 3]], (0, 0))
    assert set(out["phi"]) == {"owen", "shapley", *(f"mc{p}" for p in MC_PERMUTATIONS), "random"}
    for m in ("owen", "shapley", *(f"mc{p}" for p in MC_PERMUTATIONS)):
        np.testing.assert_allclose(out["phi"][m], w, atol=1e-12)
    assert out["v_full"] == pytest.approx(0.6) and out["v_empty"] == 0.0
    assert out["coalitions"]["shapley"] == 16
    again = attribute(value_fn, [[0, 1], [2, 3]], (0, 0))
    np.testing.assert_array_equal(out["phi"]["random"], again["phi"]["random"])  # seeded


def test_make_completion_builds_a_demo_when_absent():
    sample = Sample(
        qid="q",
        request="a coat for my daughter",
        messages=[],
        gains={},
        intent_words=["kids", "jacket"],
        demo=None,
    )
    text = make_completion(sample, np.random.default_rng(0), ["kids", "jacket", "men", "boots"])
    assert text.startswith("a coat for my daughter")
    added = text[len(sample.request) :].split()
    assert set(added) <= {"kids", "jacket", "men", "boots"} and len(added) == len(set(added))
    sample.demo = "a coat kids"
    assert make_completion(sample, np.random.default_rng(0), []) == "a coat kids"


@pytest.fixture(scope="module")
def small_run():
    from ospo.data.shop import ShopData

    data = ShopData(seed=0, num_products=500, num_train=50, num_val=5, num_test=10)
    return evaluate(n=5, seed=0, split="test", data=data)


def test_end_to_end_small(small_run):
    res = small_run
    assert 1 <= len(res["rows"]) <= 5
    for row in res["rows"]:
        assert 0.0 <= row["chance"] <= 1.0
        for m, share in row["share"].items():
            assert math.isnan(share) or 0.0 <= share <= 1.0, m
            assert 0.0 <= row["p_at_1"][m] <= 1.0, m
        for m, gap in row["efficiency"].items():  # exact and every MC estimate are efficient
            assert gap < 1e-9, m
        assert row["error"]["shapley"] == 0.0 or math.isnan(row["error"]["shapley"])
    text = render(res)
    for label in ("exact Owen", "exact Shapley", "random (iid normal)", "chance"):
        assert f"| {label}" in text
    for p in FAITH_PERMUTATIONS:
        assert f"| Monte-Carlo Shapley, {p} permutations |" in text
    last = text.strip().splitlines()[-1]
    keys = [kv.split("=")[0] for kv in last.split()]
    assert keys == [
        "faithfulness_owen",
        "faithfulness_shapley",
        "faithfulness_random",
        "mc_rel_error_32",
    ]


def test_main_rejects_bad_n():
    with pytest.raises(SystemExit):
        main(["--n", "0"])
