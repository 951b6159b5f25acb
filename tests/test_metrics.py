"""ospo.metrics: hand-computed cases and vectorised == scalar."""

import math

import numpy as np
import pytest

from ospo.metrics import (
    ideal_dcg,
    mrr,
    mrr_from_scores,
    ndcg_at_k,
    ndcg_from_scores,
    recall_at_k,
    recall_from_scores,
    top_k_indices,
)

ESCI = {"e": 1.0, "s": 0.1, "c": 0.01, "i": 0.0}


def test_ndcg_no_relevant_item_is_zero():
    assert ndcg_at_k(["a", "b"], {}, 10) == 0.0
    assert ndcg_at_k(["a", "b"], {"a": 0.0, "b": 0.0}, 10) == 0.0


def test_ndcg_perfect_ranking_is_one():
    assert ndcg_at_k(["e", "s", "c", "i"], ESCI, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["e", "s", "x"], ESCI, 2) == pytest.approx(1.0)


def test_ndcg_hand_computed_graded():
    # ranking c, e, x(unjudged), s with E=1, S=0.1, C=0.01
    dcg = 0.01 / math.log2(2) + 1.0 / math.log2(3) + 0.0 / math.log2(4) + 0.1 / math.log2(5)
    idcg = 1.0 / math.log2(2) + 0.1 / math.log2(3) + 0.01 / math.log2(4)
    assert ndcg_at_k(["c", "e", "x", "s"], ESCI, 10) == pytest.approx(dcg / idcg)
    # written out: (0.01 + 0.630930 + 0 + 0.043068) / (1 + 0.063093 + 0.005) = 0.683997 / 1.068093
    assert ndcg_at_k(["c", "e", "x", "s"], ESCI, 10) == pytest.approx(0.640391, abs=1e-6)


def test_ndcg_cut_and_k_larger_than_ranking():
    # cut at 1: only "c" counts; the ideal at 1 is E alone
    assert ndcg_at_k(["c", "e"], ESCI, 1) == pytest.approx(0.01)
    # k = 100 > len(ranking): fine, IDCG uses all judged gains
    short = ndcg_at_k(["e"], ESCI, 100)
    idcg = 1.0 + 0.1 / math.log2(3) + 0.01 / 2
    assert short == pytest.approx(1.0 / idcg)


def test_ndcg_graded_ties_and_unretrieved_relevant():
    # two exact matches, swapping them changes nothing
    gains = {"a": 1.0, "b": 1.0, "s": 0.1}
    assert ndcg_at_k(["a", "b", "s"], gains, 3) == ndcg_at_k(["b", "a", "s"], gains, 3)
    # a judged relevant product never retrieved still counts in the ideal DCG
    assert ndcg_at_k(["a"], gains, 3) < 1.0


def test_ideal_dcg():
    assert ideal_dcg([0.1, 1.0, 0.01], 2) == pytest.approx(1.0 + 0.1 / math.log2(3))
    assert ideal_dcg([], 5) == 0.0


def test_recall():
    assert recall_at_k(["a", "b", "c"], {"a", "c", "z"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(["a", "b"], set(), 5) == 0.0
    # a gains mapping: relevant = gain > 0
    assert recall_at_k(["i", "e", "s"], ESCI, 2) == pytest.approx(1 / 3)
    assert recall_at_k(["a"], {"a"}, 10) == 1.0


def test_mrr():
    assert mrr(["x", "y", "a"], {"a"}) == pytest.approx(1 / 3)
    assert mrr(["x", "y", "a"], {"a"}, k=2) == 0.0
    assert mrr(["x"], {"a"}) == 0.0
    assert mrr(["i", "c"], ESCI) == pytest.approx(0.5)


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_bad_k(bad):
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(["a"], {"a": 1.0}, bad)


def _stable(scores, k):
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("num_docs", [7, 300, 3000])
@pytest.mark.parametrize("kind", ["continuous", "few_values", "sparse"])
def test_top_k_matches_stable_argsort(num_docs, kind):
    rng = np.random.default_rng(num_docs)
    for k in (1, 5, 10, 40):
        num_rows = 12
        if kind == "continuous":
            scores = rng.random((num_rows, num_docs)).astype(np.float32)
        elif kind == "few_values":
            scores = rng.integers(0, 3, (num_rows, num_docs)).astype(np.float32)
        else:  # mostly zero, as BM25 rows: ties at zero fill the top k
            scores = np.zeros((num_rows, num_docs), dtype=np.float32)
            hit = rng.random((num_rows, num_docs)) < 0.002
            scores[hit] = rng.integers(1, 4, hit.sum())
        np.testing.assert_array_equal(top_k_indices(scores, k), _stable(scores, k))


def test_vectorised_equals_scalar():
    rng = np.random.default_rng(0)
    num_docs = 60
    ids = [f"d{j}" for j in range(num_docs)]
    for trial in range(20):
        grades = rng.choice([0.0, 0.0, 0.0, 0.01, 0.1, 1.0], size=num_docs)
        gains = {d: float(g) for d, g in zip(ids, grades, strict=True) if g > 0 or trial % 2}
        scores = rng.integers(0, 6, size=(8, num_docs)).astype(np.float32)  # many ties
        gain_vec = np.array([gains.get(d, 0.0) for d in ids])
        relevant = gain_vec > 0
        for k in (1, 5, 10, 100):
            ndcg = ndcg_from_scores(scores, gain_vec, k)
            rec = recall_from_scores(scores, relevant, k)
            rr = mrr_from_scores(scores, relevant)
            rr_k = mrr_from_scores(scores, relevant, k)
            for row in range(scores.shape[0]):
                ranking = [ids[j] for j in _stable(scores[row : row + 1], num_docs)[0]]
                assert ndcg[row] == pytest.approx(ndcg_at_k(ranking, gains, k))
                assert rec[row] == pytest.approx(recall_at_k(ranking, gains, k))
                assert rr[row] == pytest.approx(mrr(ranking, gains))
                assert rr_k[row] == pytest.approx(mrr(ranking, gains, k))


def test_vectorised_ideal_and_denominator_from_all_judgements():
    scores = np.array([[3.0, 2.0, 1.0]])
    gains = np.array([1.0, 0.0, 0.1])
    # a judged E product outside the 3 columns lowers NDCG and Recall
    full = ndcg_from_scores(scores, gains, 10, ideal_gains=np.array([1.0, 1.0, 0.1]))
    assert full[0] == pytest.approx(
        ndcg_at_k(["a", "b", "c"], {"a": 1.0, "c": 0.1, "out": 1.0}, 10)
    )
    assert recall_from_scores(scores, gains > 0, 10, num_relevant=3)[0] == pytest.approx(2 / 3)


def test_vectorised_shape_errors():
    with pytest.raises(ValueError, match=r"\(D,\)"):
        ndcg_from_scores(np.zeros((2, 3)), np.zeros(4), 1)
    with pytest.raises(ValueError, match="matrix"):
        top_k_indices(np.zeros(3), 1)
