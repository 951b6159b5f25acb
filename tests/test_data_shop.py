"""The embedded shopping task and the shared data helpers (ospo.data, ospo.data.shop)."""

import json
import re
from collections import Counter

import numpy as np
import pytest

from ospo.data import (
    APPEND_SYSTEM_PROMPT,
    DEFAULT_SYSTEM_PROMPT,
    SPLITS,
    Dataset,
    Sample,
    attach_demos,
    build_pool,
    load_demos,
    make_messages,
    shop,
)
from ospo.data.shop import AUDIENCES, CATEGORIES, FEATURES, USES, ShopData, ndcg_report
from ospo.retriever import tokenize
from ospo.reward import query_text

CANONICAL = set(AUDIENCES) | set(FEATURES) | set(USES)


@pytest.fixture(scope="module")
def data():
    """The default data set (built once: it is what every run starts with)."""
    return ShopData(seed=0)


@pytest.fixture(scope="module")
def small():
    return ShopData(seed=3, num_products=1500, num_train=100, num_val=10, num_test=20)


def all_samples(d):
    return [s for name in SPLITS for s in d.split(name)]


# ---- shared helpers --------------------------------------------------------------------------


def test_make_messages_system_and_user():
    msgs = make_messages("warm coat", "SYS", "Request: {request}")
    assert msgs == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Request: warm coat"},
    ]
    assert make_messages("x", None) == [{"role": "user", "content": "x"}]
    hist = make_messages(
        "shoes", "S", "Recent purchases: {history}\nRequest: {request}", history="a; b"
    )
    assert hist[1]["content"] == "Recent purchases: a; b\nRequest: shoes"
    assert "search query" in DEFAULT_SYSTEM_PROMPT and "one-line" in DEFAULT_SYSTEM_PROMPT


def test_make_messages_unknown_placeholder_is_named():
    with pytest.raises(KeyError, match="history"):
        make_messages("x", "S", "{history} {request}")


def test_dataset_split_and_summary():
    s = Sample(qid="q", request="r", messages=[], gains={"a": 1.0})
    d = Dataset("toy", {"a": "text"}, {"train": [s], "val": [], "test": [s, s]})
    assert d.split("test") == [s, s]
    assert d.summary() == {"name": "toy", "catalog": 1, "train": 1, "val": 0, "test": 2}
    with pytest.raises(KeyError, match="unknown split 'dev'.*'train', 'val', 'test'"):
        d.split("dev")
    with pytest.raises(ValueError, match="missing \\['val'\\]"):
        Dataset("bad", {}, {"train": [], "test": []})


def test_build_pool_keeps_judged_fills_and_shuffles():
    ids = [f"D{i}" for i in range(200)]
    gains = {"D3": 1.0, "D7": 0.1, "D9": 0.0}
    pool = build_pool(gains, ids, 20, np.random.default_rng(0))
    assert len(pool) == 20 and len(set(pool)) == 20
    assert set(gains) <= set(pool) and set(pool) <= set(ids)
    assert pool == build_pool(gains, ids, 20, np.random.default_rng(0))
    assert pool != build_pool(gains, ids, 20, np.random.default_rng(1))
    # the order carries no relevance information: the target is not always first
    first = [build_pool(gains, ids, 20, np.random.default_rng(s)).index("D3") for s in range(30)]
    assert len(set(first)) > 5


def test_build_pool_truncates_to_highest_gains_and_small_catalogs():
    gains = {f"D{i}": 0.1 for i in range(10)} | {"E1": 1.0, "E2": 1.0}
    pool = build_pool(gains, list(gains), 4, np.random.default_rng(0))
    assert len(pool) == 4 and {"E1", "E2"} <= set(pool)
    # catalog smaller than the pool: every id once
    pool = build_pool({"a": 1.0}, ["a", "b", "c"], 10, np.random.default_rng(0))
    assert sorted(pool) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="pool size"):
        build_pool({}, ["a"], 0, np.random.default_rng(0))


def test_load_and_attach_demos(tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text(
        json.dumps({"qid": "q1", "demo": "coat kids"})
        + "\n\n"
        + json.dumps({"qid": 2, "demo": "x"})
        + "\n"
    )
    demos = load_demos(path)
    assert demos == {"q1": "coat kids", "2": "x"}
    samples = [Sample("q1", "r", [], {}), Sample("q3", "r", [], {})]
    assert attach_demos(samples, demos) == 1
    assert samples[0].demo == "coat kids" and samples[1].demo is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qid": "q"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1.*'qid' and 'demo'"):
        load_demos(bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        load_demos(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_demos(tmp_path / "missing.jsonl")


# ---- the embedded task -----------------------------------------------------------------------


def test_default_sizes_and_categories(data):
    assert len(data.catalog) == 6000
    assert data.summary() == {
        "name": "shop",
        "catalog": 6000,
        "train": 2000,
        "val": 200,
        "test": 500,
    }
    assert data.completion == "append"
    cats = Counter(data.intents[i][0] for i in data.product_intent)
    assert len(cats) >= 10 and min(cats.values()) > 50
    pid, text = next(iter(data.catalog.items()))
    assert re.fullmatch(r"P\d{5}", pid) and len(text.split()) > 10


def test_any_seed_builds_the_default_sizes(data):
    """Another seed: the same sizes, another catalog (the build is timed in
    benchmarks/data_and_segmenter.py, not here: a busy machine must not fail a test)."""
    other = ShopData(seed=11)
    assert other.summary() == data.summary()
    assert other.catalog != data.catalog


def test_deterministic_from_seed(small):
    again = ShopData(seed=3, num_products=1500, num_train=100, num_val=10, num_test=20)
    assert again.catalog == small.catalog
    for name in SPLITS:
        assert [vars(s) for s in again.split(name)] == [vars(s) for s in small.split(name)]
    other = ShopData(seed=4, num_products=1500, num_train=100, num_val=10, num_test=20)
    assert other.catalog != small.catalog


def test_split_sizes_do_not_change_catalog_or_test(small):
    bigger = ShopData(seed=3, num_products=1500, num_train=300, num_val=10, num_test=20)
    assert bigger.catalog == small.catalog
    assert [s.request for s in bigger.split("test")] == [s.request for s in small.split("test")]


def test_labels_are_esci_style(data):
    intent_of = dict(zip(data.catalog, (data.intents[i] for i in data.product_intent), strict=True))
    for sample in data.split("test")[:50] + data.split("train")[:50]:
        aud, feat, use, cat = sample.intent_words
        exact = [p for p, g in sample.gains.items() if g == 1.0]
        assert 3 <= len(exact) <= 10
        assert set(sample.gains.values()) <= {1.0, 0.1, 0.01}
        for pid, gain in sample.gains.items():
            p_cat, p_aud, p_feat, p_use = intent_of[pid]
            if gain == 1.0:
                assert (p_cat, p_aud, p_feat, p_use) == (cat, aud, feat, use)
            elif gain == 0.1:
                assert p_cat == cat and (p_aud == aud or p_feat == feat or p_use == use)
            else:
                assert p_cat in shop.COMPLEMENTS[cat] and p_use == use
        # every product with the full intent is labelled E
        n_full = sum(v == (cat, aud, feat, use) for v in intent_of.values())
        assert n_full == len(exact)


def test_held_out_combinations(data):
    intents = {name: {tuple(s.intent_words) for s in data.split(name)} for name in SPLITS}
    assert not intents["test"] & intents["train"]
    assert not intents["val"] & intents["train"]
    assert not intents["val"] & intents["test"]
    for j in range(4):  # every single value of a held-out intent is seen in training
        seen = {i[j] for i in intents["train"]}
        assert {i[j] for i in intents["test"] | intents["val"]} <= seen


def test_small_catalog_still_holds_out_seen_values():
    d = ShopData(seed=0, num_products=600)
    train = {tuple(s.intent_words) for s in d.split("train")}
    for j in range(4):
        held = {tuple(s.intent_words)[j] for s in d.split("test") + d.split("val")}
        assert held <= {i[j] for i in train}
    assert len(d.split("test")) == 500 and len(d.split("val")) == 200


def test_requests_are_indirect(data):
    """Requests name no canonical audience/feature/use word, and share no word with the
    catalog except the canonical category word."""
    vocab = {t for text in data.catalog.values() for t in tokenize(text)}
    for sample in all_samples(data):
        toks = set(tokenize(sample.request))
        assert not toks & CANONICAL, sample.request
        assert toks & vocab <= set(CATEGORIES), (sample.request, toks & vocab)


@pytest.fixture(scope="module")
def rewrite():
    """The default task in the rewrite format (the completion is the whole query)."""
    return ShopData(seed=0, completion="rewrite")


def test_completion_formats(data, rewrite):
    """Same task in both formats: append keeps only the words after the request, and the
    request becomes the query prefix; rewrite keeps the whole demonstration and no prefix."""
    for a, r in zip(all_samples(data), all_samples(rewrite), strict=True):
        assert (a.qid, a.request, a.gains) == (r.qid, r.request, r.gains)
        assert a.prefix == a.request and r.prefix == ""
        assert r.demo == f"{r.request} {a.demo}".strip()
        assert query_text(a, a.demo) == query_text(r, r.demo)
    assert data.split("train")[0].messages[0]["content"] == APPEND_SYSTEM_PROMPT
    assert rewrite.split("train")[0].messages[0]["content"] == DEFAULT_SYSTEM_PROMPT
    with pytest.raises(ValueError, match="data.completion='full'.*append, rewrite|rewrite, append"):
        ShopData(num_products=1500, completion="full")


def test_intent_words_and_demos(rewrite):
    data = rewrite
    kept = total = wrong = 0
    for sample in data.split("train"):
        assert sample.intent_words[3] in CATEGORIES and sample.intent_words[0] in AUDIENCES
        assert sample.demo.startswith(sample.request)
        extra = sample.demo[len(sample.request) :].split()
        assert "\n" not in sample.demo
        kept += len(set(extra) & set(sample.intent_words))
        total += len(sample.intent_words)
        wrong += len(set(extra) - set(sample.intent_words))
        assert set(extra) <= CANONICAL | set(CATEGORIES)
    # partial (about demo_keep = 0.85 of the right words) and noisy (about 0.65 wrong per demo)
    assert 0.8 < kept / total < 0.9
    assert 0.5 < wrong / len(data.split("train")) < 0.8
    perfect = sum(
        set(s.demo[len(s.request) :].split()) == set(s.intent_words) for s in data.split("train")
    )
    assert perfect < 0.4 * len(data.split("train"))


def test_demo_knobs():
    exact = ShopData(seed=0, num_products=1500, num_train=50, demo_keep=1.0, demo_noise=(1.0,))
    for s in exact.split("train"):
        assert sorted(s.demo.split()) == sorted(s.intent_words)
    with pytest.raises(ValueError, match="demo_keep"):
        ShopData(num_products=1500, demo_keep=1.5)
    with pytest.raises(ValueError, match="demo_noise"):
        ShopData(num_products=1500, demo_noise=(-1.0, 1.0))


def test_messages_and_templates(small):
    s = small.split("train")[0]
    assert s.messages == [
        {"role": "system", "content": APPEND_SYSTEM_PROMPT},
        {"role": "user", "content": s.request},
    ]
    custom = ShopData(
        seed=3, num_products=1500, num_train=5, system_prompt="SYS", user_template="Q: {request}"
    )
    assert custom.split("train")[0].messages[1]["content"].startswith("Q: ")
    assert custom.split("train")[0].messages[0]["content"] == "SYS"
    bare = ShopData(seed=3, num_products=1500, num_train=5, system_prompt="")
    assert [m["role"] for m in bare.split("train")[0].messages] == ["user"]
    assert len({s.qid for s in all_samples(small)}) == len(all_samples(small))


def test_pools(small):
    assert all(s.pool is None for s in all_samples(small))
    pooled = ShopData(seed=3, num_products=1500, num_train=20, num_val=5, num_test=10, pool_size=60)
    for s in all_samples(pooled):
        assert len(s.pool) == 60 == len(set(s.pool))
        assert set(s.pool) <= set(pooled.catalog)
        assert {p for p, g in s.gains.items() if g == 1.0} <= set(s.pool)
    again = ShopData(seed=3, num_products=1500, num_train=20, num_val=5, num_test=10, pool_size=60)
    assert [s.pool for s in again.split("test")] == [s.pool for s in pooled.split("test")]
    report = ndcg_report(pooled, "test")
    assert report["raw_ndcg@10"] < report["oracle_ndcg@10"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_products"):
        ShopData(num_products=10)
    with pytest.raises(ValueError, match="num_test"):
        ShopData(num_products=1500, num_test=-1)


def test_bm25_targets(data):
    """Raw requests score low, request + intent words high, demonstrations in between."""
    report = ndcg_report(data, "test")
    assert report["raw_ndcg@10"] <= 0.35
    assert report["oracle_ndcg@10"] >= 0.80
    assert report["raw_ndcg@10"] < report["demo_ndcg@10"] < report["oracle_ndcg@10"]
    assert 0.4 <= report["demo_ndcg@10"] <= 0.65


def test_stats_cli(capsys):
    shop.main(["--stats", "--num-products", "1500"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"raw_ndcg@10=[\d.]+ oracle_ndcg@10=[\d.]+ demo_ndcg@10=[\d.]+", lines[-1])
    assert any(line.startswith("catalog: 1500 products") for line in lines)
    assert sum(line.startswith("request: ") for line in lines) == 2
