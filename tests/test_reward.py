"""ospo.reward: batched coalition values == scoring each coalition's text, pools, errors."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest

from ospo.metrics import mrr, ndcg_at_k, recall_at_k, top_k_indices
from ospo.retriever import BM25, BM25L
from ospo.reward import NDCG, Recall, Reward, join_texts, query_text
from ospo.segmenter import Segmentation

WORDS = (
    "red blue green black ski jacket kids warm insulated shoes running boots wool scarf hat "
    "gloves waterproof leather cotton socks"
).split()


def top_ids(reward, text, sample, k=None):
    """The top-k product ids of a completion's query among the sample's candidates, from the
    retriever's scores (ties to the lower column): the reference the reward is checked against."""
    judged = reward.judgements(sample)
    row = reward.retriever.score([query_text(sample, text)])  # (1, D)
    row = row if judged.cols is None else row[:, judged.cols]  # (1, P)
    top = top_k_indices(row, reward.k if k is None else k)[0]
    cols = top if judged.cols is None else judged.cols[top]
    return [reward.retriever.doc_ids[c] for c in cols]


def make_catalog(num_docs=80, seed=0):
    rng = np.random.default_rng(seed)
    catalog = {
        f"p{i:03d}": " ".join(rng.choice(WORDS, rng.integers(2, 6))) for i in range(num_docs)
    }
    catalog["dup_a"] = catalog["dup_b"] = "red wool scarf"  # identical documents tie
    return catalog


@pytest.fixture(scope="module")
def bm25():
    retriever = BM25()
    retriever.index(make_catalog())
    return retriever


def segmented(segments, unions=None):
    """A completion text with glue between segments, and its Segmentation."""
    text, spans = "", []
    for seg in segments:
        text += "- "
        spans.append((len(text), len(text) + len(seg)))
        text += seg + ";\n"
    unions = unions if unions is not None else [list(range(len(segments)))]
    return text, Segmentation(spans=spans, unions=unions)


def sample(qid, gains, pool=None):
    return SimpleNamespace(qid=qid, gains=gains, pool=pool)


GAINS = {"p001": 1.0, "p002": 1.0, "p003": 0.1, "p004": 0.01, "dup_b": 1.0}
SEGMENTS = ["red wool", "warm scarf", "kids ski jacket", "red red boots", "unknownword"]


def all_masks(n):
    return np.array(list(itertools.product([False, True], repeat=n)), dtype=bool)  # (2^n, n)


@pytest.mark.parametrize("reward_cls", [NDCG, Recall])
@pytest.mark.parametrize("pool", [None, "pool"])
@pytest.mark.parametrize("base_text", ["", "warm winter things for my kids"])
def test_value_fn_batch_equals_one_by_one(bm25, reward_cls, pool, base_text):
    catalog_ids = bm25.doc_ids
    pool_ids = None if pool is None else [*catalog_ids[:30:2], "dup_a", "dup_b", "p003"]
    s = sample("q1", GAINS, pool_ids)
    text, segmentation = segmented(SEGMENTS, unions=[[0, 1], [2, 3, 4]])
    reward = reward_cls(bm25, k=5)
    masks = all_masks(len(SEGMENTS))
    values = reward.coalition_value_fn(text, segmentation, s, base_text=base_text)(masks)
    assert values.shape == (len(masks),)
    fresh = reward_cls(bm25, k=5)  # no shared memo
    queries = [join_texts(base_text, segmentation.coalition_text(text, m)) for m in masks]
    one_by_one = np.array([fresh.score_texts([q], [s])[0] for q in queries])
    np.testing.assert_allclose(values, one_by_one, atol=1e-12)
    assert values.max() > 0  # the game is not trivial
    # the grand coalition is the reward of base + all segments; scalar metric agrees
    ranking = top_ids(fresh, queries[-1], s, k=5)
    scalar = ndcg_at_k if reward_cls is NDCG else recall_at_k
    assert values[-1] == pytest.approx(scalar(ranking, GAINS, 5))


def test_value_fn_with_other_additive_retriever_and_memo():
    retriever = BM25L()
    retriever.index(make_catalog(seed=2))
    s = sample("q2", GAINS)
    text, segmentation = segmented(SEGMENTS[:4])
    reward = NDCG(retriever, k=10)
    value_fn = reward.coalition_value_fn(text, segmentation, s)
    masks = all_masks(4)
    values = value_fn(masks)
    assert len(reward._memo) == len(masks)
    np.testing.assert_array_equal(value_fn(masks[::-1]), values[::-1])  # from the memo
    reward.clear_cache()
    assert not reward._memo
    expected = [
        NDCG(retriever).score_texts([segmentation.coalition_text(text, m)], [s])[0] for m in masks
    ]
    np.testing.assert_allclose(values, expected, atol=1e-12)


@pytest.mark.parametrize("method", ["lucene", "bm25+"])
@pytest.mark.parametrize(("num_docs", "vocab_size"), [(300, 400), (3000, 60)])
def test_value_fn_large_catalog(method, num_docs, vocab_size):
    """Sparse rows (background columns dropped) and wide dense matrices (sampled top-k bound)."""
    rng = np.random.default_rng(num_docs)
    vocab = [f"w{j}" for j in range(vocab_size)]
    catalog = {f"d{i}": " ".join(rng.choice(vocab, 6)) for i in range(num_docs)}
    retriever = BM25(method=method)
    retriever.index(catalog)
    grades = [1.0, 0.1, 0.01]
    gains = {f"d{i}": grades[j % 3] for j, i in enumerate(range(0, num_docs, 37))}
    s = sample("big", gains)
    words = catalog["d0"].split() + catalog["d37"].split()
    text, segmentation = segmented([" ".join(rng.choice(words, 2)) for _ in range(6)])
    masks = all_masks(6)
    values = NDCG(retriever).coalition_value_fn(text, segmentation, s, base_text="w1")(masks)
    fresh = NDCG(retriever)
    expected = [
        fresh.score_texts([join_texts("w1", segmentation.coalition_text(text, m))], [s])[0]
        for m in masks
    ]
    np.testing.assert_allclose(values, expected, atol=1e-12)
    assert values.max() > 0


def test_generic_text_path_equals_additive_path(bm25):
    """The non-additive code path (score each coalition text) on BM25 gives the same values."""
    s = sample("q3", GAINS, pool=bm25.doc_ids[:40])
    text, segmentation = segmented(SEGMENTS)
    masks = all_masks(5)
    additive = NDCG(bm25, k=10).coalition_value_fn(text, segmentation, s, base_text="kids")
    generic_reward = NDCG(SimpleNamespace(doc_ids=bm25.doc_ids, score=bm25.score), k=10)
    generic = generic_reward.coalition_value_fn(text, segmentation, s, base_text="kids")
    np.testing.assert_allclose(additive(masks), generic(masks), atol=1e-12)


def test_pool_restricts_the_ranking(bm25):
    # the best match for "red wool scarf" is dup_a/dup_b, both outside this pool
    pool = [d for d in bm25.doc_ids if d not in ("dup_a", "dup_b")][:20]
    s = sample("q4", {pool[0]: 1.0}, pool)
    reward = NDCG(bm25, k=10)
    ranking = top_ids(reward, "red wool scarf", s, k=30)
    assert len(ranking) == 20 and set(ranking) <= set(pool)
    full = top_ids(reward, "red wool scarf", sample("q5", {pool[0]: 1.0}), k=2)
    assert full == ["dup_a", "dup_b"]  # identical documents: ties go to catalog order


def test_ideal_counts_judged_products_outside_the_pool(bm25):
    pool = bm25.doc_ids[:10]
    gains = {pool[0]: 1.0, "p050": 1.0}  # p050 is judged but not in the pool
    reward = NDCG(bm25, k=10)
    s = sample("q6", gains, pool)
    ranking = top_ids(reward, "red", s)
    assert reward.score_texts(["red"], [s])[0] == pytest.approx(ndcg_at_k(ranking, gains, 10))
    assert reward.score_texts(["red"], [s])[0] < 1.0


def test_metrics_keys_and_values(bm25):
    reward = Recall(bm25, k=3)
    samples = [sample("a", GAINS), sample("b", GAINS, bm25.doc_ids[:25])]
    texts = ["red wool scarf", "kids ski jacket warm"]
    out = reward.metrics(texts, samples, k=5)
    assert set(out) == {"ndcg@5", "recall@5", "mrr"}
    for i, (t, s) in enumerate(zip(texts, samples, strict=True)):
        full = top_ids(reward, t, s, k=len(bm25.doc_ids))
        assert out["ndcg@5"][i] == pytest.approx(ndcg_at_k(full, GAINS, 5))
        assert out["recall@5"][i] == pytest.approx(recall_at_k(full, GAINS, 5))
        assert out["mrr"][i] == pytest.approx(mrr(full, GAINS))
    np.testing.assert_allclose(
        reward.score_texts(texts, samples),
        [recall_at_k(top_ids(reward, t, s), GAINS, 3) for t, s in zip(texts, samples, strict=True)],
    )


def test_unknown_product_id_is_named(bm25):
    reward = NDCG(bm25)
    with pytest.raises(ValueError, match="'ghost'.*gains"):
        reward.score_texts(["red"], [sample("x", {"ghost": 1.0})])
    with pytest.raises(ValueError, match="'phantom'.*pool"):
        reward.score_texts(["red"], [sample("y", {"p001": 1.0}, ["p001", "phantom"])])


def test_edge_cases(bm25):
    reward = NDCG(bm25, k=10)
    s = sample("z", GAINS)
    text, segmentation = segmented(["red wool", "scarf"])
    value_fn = reward.coalition_value_fn(text, segmentation, s)
    with pytest.raises(ValueError, match=r"shape \(K, 2\)"):
        value_fn(np.ones((3, 3), dtype=bool))
    empty = reward.coalition_value_fn("", Segmentation(spans=[], unions=[]), s, base_text="red")
    assert empty(np.zeros((1, 0), bool))[0] == pytest.approx(reward.score_texts(["red"], [s])[0])
    with pytest.raises(ValueError, match="pool is empty"):
        reward.score_texts(["red"], [sample("e", {"p001": 1.0}, [])])
    with pytest.raises(ValueError, match="one each"):
        reward.score_texts(["a", "b"], [s])
    with pytest.raises(ValueError, match="k must be"):
        Reward(bm25, k=0)
    with pytest.raises(RuntimeError, match="index"):
        NDCG(BM25()).score_texts(["red"], [s])


@pytest.mark.slow
def test_dense_value_fn_equals_one_by_one(dense_toy):
    dense = dense_toy
    s = sample("d1", {"ski": 1.0, "shoe": 0.1})
    reward = NDCG(dense, k=3)
    assert top_ids(reward, "warm ski coat for a child", s, k=1) == ["ski"]
    text, segmentation = segmented(["warm coat", "for skiing", "child size", "jogging"])
    masks = all_masks(4)
    values = reward.coalition_value_fn(text, segmentation, s, base_text="winter")(masks)
    fresh = NDCG(dense, k=3)
    expected = [
        fresh.score_texts([join_texts("winter", segmentation.coalition_text(text, m))], [s])[0]
        for m in masks
    ]
    np.testing.assert_allclose(values, expected, atol=1e-12)
