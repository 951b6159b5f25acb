"""ospo.retriever: tokenisation, BM25 additivity over segments, agreement with bm25s/rank_bm25."""

import bm25s
import numpy as np
import pytest
import rank_bm25

from ospo.retriever import BM25, BM25L, STOP_WORDS, BM25Plus, Dense, tokenize

WORDS = "red blue green ski jacket kids warm insulated shoes running boots wool scarf hat".split()


def make_catalog(num_docs=40, seed=0):
    rng = np.random.default_rng(seed)
    catalog = {f"p{i}": " ".join(rng.choice(WORDS, rng.integers(3, 9))) for i in range(num_docs)}
    catalog["p_stop"] = "the and of"  # only stop words: an empty document
    return catalog


ADDITIVE = [
    lambda: BM25(),
    lambda: BM25(method="bm25+"),
    lambda: BM25(method="robertson", k1=1.2, b=0.5),
    lambda: BM25Plus(),
    lambda: BM25L(),
]


# ----------------------------------------------------------------------------- tokenize


def test_tokenize_documented_behaviour():
    assert tokenize("The Kids' SKI-jacket, for the kids!") == ["kids", "ski", "jacket", "kids"]
    assert tokenize("") == [] and tokenize("  the of a ") == []
    # NFKC: full-width letters and ligatures fold to ASCII, then lower-case
    assert tokenize("ＲＥＤ ﬁsh") == ["red", "fish"]
    # unicode-aware words, digits kept, no stemming
    assert tokenize("Café naïve 2-pack jackets") == ["café", "naïve", "2", "pack", "jackets"]
    assert "for" in STOP_WORDS and "not" not in STOP_WORDS
    assert tokenize("not for kids") == ["not", "kids"]


# ----------------------------------------------------------------------------- BM25 family


@pytest.mark.parametrize("make", ADDITIVE)
def test_additive_over_segments(make):
    retriever = make()
    catalog = make_catalog()
    retriever.index(catalog)
    assert retriever.additive and retriever.doc_ids == list(catalog)
    rng = np.random.default_rng(1)
    for _ in range(5):
        # words repeat within and across segments; some unknown words and stop words
        pool = [*WORDS[:6], "unknownword", "the", "for"]
        segs = [" ".join(rng.choice(pool, rng.integers(1, 4))) for _ in range(6)]
        rows = retriever.segment_scores(segs)  # (n, D)
        assert rows.shape == (6, len(catalog)) and rows.dtype == np.float32
        for mask in [np.ones(6, bool), np.zeros(6, bool), *(rng.random((6, 6)) < 0.5)]:
            kept = " ".join(s for s, m in zip(segs, mask, strict=True) if m)
            joined = retriever.score([kept])[0]
            np.testing.assert_allclose(rows[mask].sum(0), joined, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", ADDITIVE)
def test_query_multiplicity_and_unknown_words(make):
    retriever = make()
    retriever.index(make_catalog())
    once, twice, unknown = retriever.score(["red", "red red", "zzz qqq"])
    np.testing.assert_allclose(twice, 2 * once, rtol=1e-6)
    assert not unknown.any()
    assert retriever.score([]).shape == (0, retriever.num_docs)


def test_bm25_agrees_with_bm25s_retrieve():
    catalog = make_catalog(num_docs=60, seed=3)
    ours = BM25()
    ours.index(catalog)
    reference = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    reference.index([tokenize(t) for t in catalog.values()], show_progress=False)
    for query in ["warm wool scarf", "kids ski jacket", "running shoes"]:
        docs, ref_scores = reference.retrieve(
            [tokenize(query)], k=len(catalog), show_progress=False
        )
        scores = ours.score([query])[0]
        np.testing.assert_allclose(scores[docs[0]], ref_scores[0], rtol=1e-5, atol=1e-6)
        top = docs[0][ref_scores[0] > 0]
        assert np.all(np.diff(scores[top]) <= 1e-6)  # same order as bm25s's ranking


@pytest.mark.parametrize("cls", [BM25Plus, BM25L])
def test_rank_bm25_variants_match_library(cls):
    catalog = make_catalog(seed=4)
    ours = cls()
    ours.index(catalog)
    ref = getattr(rank_bm25, cls.__name__)([tokenize(t) for t in catalog.values()])
    query = "red red ski the jacket unknownword"
    np.testing.assert_allclose(
        ours.score([query])[0], ref.get_scores(tokenize(query)), rtol=1e-5, atol=1e-5
    )


def test_term_cache_is_bounded():
    retriever = BM25(cache_mb=1e-6)
    retriever.index(make_catalog())
    retriever.score([" ".join(WORDS)])
    assert len(retriever._cache) <= retriever._cache_size == 16
    before = retriever.score(["red"])
    retriever.clear_cache()
    np.testing.assert_array_equal(before, retriever.score(["red"]))


@pytest.mark.parametrize("make", [*ADDITIVE, lambda: Dense()])
def test_score_before_index_is_a_clear_error(make):
    with pytest.raises(RuntimeError, match=r"call \.index\(catalog\)"):
        make().score(["red"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="non-empty mapping"):
        BM25().index({})
    with pytest.raises(ValueError, match="method"):
        BM25(method="okapi")
    retriever = BM25()
    retriever.index(make_catalog())
    with pytest.raises(TypeError, match="single str"):
        retriever.score("red")


def test_dense_is_not_additive():
    dense = Dense()  # the model loads lazily: nothing is loaded here
    assert dense.additive is False
    with pytest.raises(NotImplementedError, match="not additive"):
        dense.segment_scores(["a", "b"])


@pytest.mark.slow
def test_dense_ranks_the_matching_product_first(dense_toy):
    dense = dense_toy
    scores = dense.score(["warm winter coat for a child going skiing", "jogging sneakers"])
    assert scores.shape == (2, 20) and scores.dtype == np.float32
    assert dense.doc_ids[int(scores[0].argmax())] == "ski"
    assert dense.doc_ids[int(scores[1].argmax())] == "shoe"
    assert np.all(scores <= 1.0 + 1e-5)  # cosine
    cached = len(dense._cache)
    dense.score(["jogging sneakers"])
    assert len(dense._cache) == cached  # served from the embedding cache
