"""ESCI loader on a small schema-exact fixture written to tmp_path (ospo.data.esci)."""

import json
import logging

import numpy as np
import pandas as pd
import pytest

from ospo.data import SPLITS
from ospo.data.esci import EXAMPLES, PRODUCTS, EsciData

# query_id -> (query, locale, small_version, split, [(product_id, label), ...])
QUERIES = {
    1: (
        "kids ski jacket",
        "us",
        1,
        "train",
        [("A1", "E"), ("A2", "E"), ("A3", "E"), ("A4", "S"), ("A5", "C"), ("A6", "I")],
    ),
    2: (
        "yoga mat",
        "us",
        1,
        "train",
        [("B1", "E"), ("B2", "E"), ("B3", "E"), ("B4", "E"), ("B5", "I")],
    ),
    3: (
        "trail shoes",
        "us",
        1,
        "test",
        [("C1", "E"), ("C2", "E"), ("C3", "E"), ("C4", "S"), ("C5", "C")],
    ),
    4: ("rare thing", "us", 1, "train", [("D1", "E"), ("D2", "E"), ("D3", "S")]),  # 2 E: dropped
    5: ("big query", "us", 0, "train", [("A1", "E"), ("A2", "E"), ("A3", "E")]),  # not small
    6: ("chaqueta", "es", 1, "train", [("A1", "E"), ("A2", "E"), ("A3", "E")]),  # other locale
    7: (
        "water bottle",
        "us",
        1,
        "test",
        [("F1", "E"), ("F2", "E"), ("F3", "E"), ("MISSING", "E"), ("F4", "I")],
    ),
    8: ("socks", "us", 1, "train", [(f"G{i}", "E") for i in range(11)]),  # 11 E: dropped
    9: ("headphones", "us", 1, "train", [("H1", "E"), ("H2", "E"), ("H3", "E"), ("NOTEXT", "S")]),
    10: (
        "kids ski jacket",
        "jp",
        1,
        "test",
        [("A1", "E"), ("A2", "E"), ("A3", "E")],
    ),  # other locale
}
KEPT = {"1", "2", "3", "7", "9"}


def product_ids():
    ids = sorted({p for *_, rows in QUERIES.values() for p, _ in rows} - {"MISSING"})
    return ids + [f"N{i}" for i in range(40)]  # unjudged products for negatives


def write_fixture(root, fmt="parquet", examples=None, products=None):
    """Write both ESCI files with the published columns; returns (examples, products) frames."""
    root.mkdir(parents=True, exist_ok=True)
    if examples is None:
        rows = []
        for qid, (query, locale, small, split, judged) in QUERIES.items():
            for pid, label in judged:
                rows.append(
                    {
                        "example_id": len(rows),
                        "query": query,
                        "query_id": qid,
                        "product_id": pid,
                        "product_locale": locale,
                        "esci_label": label,
                        "small_version": small,
                        "large_version": 1,
                        "split": split,
                    }
                )
        examples = pd.DataFrame(rows)
    if products is None:
        rows = []
        for locale in ("us", "es", "jp"):
            for pid in product_ids():
                empty = pid == "NOTEXT"
                rows.append(
                    {
                        "product_id": pid,
                        "product_locale": locale,
                        "product_title": None if empty else f"{pid} title {locale}",
                        "product_description": None if empty else f"{pid} description",
                        "product_bullet_point": None
                        if empty or pid.startswith("B")
                        else f"{pid} bullet one\n{pid} bullet two",
                        "product_brand": None if empty else f"brand{pid}",
                        "product_color": None if empty or pid.startswith("C") else "red",
                    }
                )
        products = pd.DataFrame(rows)
    for name, frame in ((EXAMPLES, examples), (PRODUCTS, products)):
        if fmt == "parquet":
            frame.to_parquet(root / f"{name}.parquet", index=False)
        else:
            frame.to_csv(root / f"{name}.csv", index=False)
    return examples, products


@pytest.fixture
def root(tmp_path):
    write_fixture(tmp_path / "esci")
    return tmp_path / "esci"


def qids(data):
    return {name: {s.qid for s in data.split(name)} for name in SPLITS}


def test_filters_and_splits(root, caplog):
    with caplog.at_level(logging.INFO, logger="ospo.data"):
        data = EsciData(root, val_fraction=0.34, seed=0)
    split_ids = qids(data)
    assert set().union(*split_ids.values()) == KEPT
    assert split_ids["test"] == {"3", "7"}
    assert split_ids["train"] | split_ids["val"] == {"1", "2", "9"}
    assert len(split_ids["val"]) == 1 and not split_ids["train"] & split_ids["val"]
    assert data.name == "esci-us"
    log = caplog.text
    assert "dropped 6 ESCI examples of other locales than 'us'" in log  # queries 6 and 10
    assert "dropped 3 ESCI examples outside the small version" in log
    assert "dropped 1 products without text" in log
    assert "dropped 2 ESCI examples whose product is missing or has no text" in log
    assert "dropped 2 ESCI queries with fewer than 3 or more than 10 E labels" in log


def test_val_split_is_seeded(root):
    a = qids(EsciData(root, val_fraction=0.34, seed=0))
    assert a == qids(EsciData(root, val_fraction=0.34, seed=0))
    vals = {frozenset(qids(EsciData(root, val_fraction=0.34, seed=s))["val"]) for s in range(8)}
    assert len(vals) > 1
    assert qids(EsciData(root, val_fraction=0.0))["val"] == set()


def test_gains_and_requests(root):
    data = EsciData(root, val_fraction=0.0)
    by_qid = {s.qid: s for name in SPLITS for s in data.split(name)}
    q1 = by_qid["1"]
    assert q1.gains == {"A1": 1.0, "A2": 1.0, "A3": 1.0, "A4": 0.1, "A5": 0.01, "A6": 0.0}
    assert q1.request == "kids ski jacket"
    assert q1.messages[-1] == {"role": "user", "content": "kids ski jacket"}
    assert q1.messages[0]["role"] == "system"
    assert by_qid["7"].gains == {"F1": 1.0, "F2": 1.0, "F3": 1.0, "F4": 0.0}  # MISSING dropped
    assert "NOTEXT" not in by_qid["9"].gains
    assert all(s.intent_words is None and s.demo is None for s in by_qid.values())


def test_pools(root):
    data = EsciData(root, pool_size=12, seed=1)
    for name in SPLITS:
        for s in data.split(name):
            assert len(s.pool) == 12 == len(set(s.pool))
            assert set(s.gains) <= set(s.pool)
            assert set(s.pool) <= set(data.catalog)
    # the catalog is the union of the pools
    assert set(data.catalog) == {p for n in SPLITS for s in data.split(n) for p in s.pool}
    again = EsciData(root, pool_size=12, seed=1)
    assert [s.pool for s in again.split("test")] == [s.pool for s in data.split("test")]
    # judged products that do not fit stay: the pool grows to hold them all
    assert all(len(s.pool) == len(s.gains) for s in EsciData(root, pool_size=2).split("test"))


def test_num_negatives_and_full_catalog(root):
    data = EsciData(root, num_negatives=3)
    for s in data.split("test"):
        assert len(s.pool) == len(s.gains) + 3
    full = EsciData(root, pool_size=None)
    assert all(s.pool is None for n in SPLITS for s in full.split(n))
    assert len(full.catalog) == len(product_ids()) - 1  # every us product with text


def test_product_text_fields(root):
    data = EsciData(root, pool_size=None)
    assert data.catalog["A1"] == "A1 title us brandA1 red A1 bullet one A1 bullet two"
    assert data.catalog["B1"] == "B1 title us brandB1 red"  # missing bullet points skipped
    assert data.catalog["C1"] == "C1 title us brandC1 C1 bullet one C1 bullet two"
    titles = EsciData(root, pool_size=None, product_fields=("product_title", "product_description"))
    assert titles.catalog["A1"] == "A1 title us A1 description"


def test_locale_and_large_version(root):
    es = EsciData(root, locale="es", min_exact=3, pool_size=None)
    assert set().union(*qids(es).values()) == {"6"}
    assert es.catalog["A1"].startswith("A1 title es")
    large = EsciData(root, small_version=False, val_fraction=0.0)
    assert "5" in qids(large)["train"]
    wide = EsciData(root, min_exact=2, max_exact=11, val_fraction=0.0)
    assert {"4", "8"} <= qids(wide)["train"]


def test_csv_variant_and_subfolder(tmp_path, root):
    write_fixture(tmp_path / "csv" / "shopping_queries_dataset", fmt="csv")
    from_csv = EsciData(tmp_path / "csv", val_fraction=0.34, pool_size=12)
    from_parquet = EsciData(root, val_fraction=0.34, pool_size=12)
    assert from_csv.catalog == from_parquet.catalog
    for name in SPLITS:
        a, b = from_csv.split(name), from_parquet.split(name)
        assert [vars(x) for x in a] == [vars(y) for y in b]


def test_demos_and_max_queries(root, tmp_path):
    path = tmp_path / "demos.jsonl"
    path.write_text(json.dumps({"qid": "3", "demo": "trail running shoes"}) + "\n")
    data = EsciData(root, demos_path=path)
    assert {s.qid: s.demo for s in data.split("test")} == {"3": "trail running shoes", "7": None}
    capped = EsciData(root, max_queries=1, val_fraction=0.0)
    assert [len(capped.split(n)) for n in SPLITS] == [1, 0, 1]


def test_missing_files_name_what_to_get(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        EsciData(tmp_path / "nowhere")
    msg = str(err.value)
    assert "does not exist" in msg and f"{EXAMPLES}.parquet" in msg and f"{PRODUCTS}.parquet" in msg
    assert "github.com/amazon-science/esci-data" in msg and "shopping_queries_dataset/" in msg
    write_fixture(tmp_path / "half")
    (tmp_path / "half" / f"{PRODUCTS}.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {PRODUCTS}.parquet"):
        EsciData(tmp_path / "half")


def test_missing_column_is_named(tmp_path):
    examples, products = write_fixture(tmp_path / "a")
    write_fixture(tmp_path / "b", examples=examples.drop(columns=["esci_label"]), products=products)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['esci_label'\]"):
        EsciData(tmp_path / "b")
    write_fixture(
        tmp_path / "c", examples=examples, products=products.drop(columns=["product_color"])
    )
    with pytest.raises(ValueError, match=r"missing column\(s\) \['product_color'\]"):
        EsciData(tmp_path / "c")
    write_fixture(
        tmp_path / "d", fmt="csv", examples=examples.drop(columns=["split"]), products=products
    )
    with pytest.raises(ValueError, match=r"missing column\(s\) \['split'\]"):
        EsciData(tmp_path / "d")


def test_bad_values_are_named(tmp_path):
    examples, products = write_fixture(tmp_path / "a")
    bad = examples.copy()
    bad.loc[3, "esci_label"] = "X"
    write_fixture(tmp_path / "b", examples=bad, products=products)
    with pytest.raises(ValueError, match="column 'esci_label' has unknown value 'X'"):
        EsciData(tmp_path / "b")
    bad = examples.copy()
    bad.loc[0, "split"] = "dev"
    write_fixture(tmp_path / "c", examples=bad, products=products)
    with pytest.raises(ValueError, match="column 'split' has unknown value 'dev'"):
        EsciData(tmp_path / "c")
    with pytest.raises(
        ValueError, match="no example with product_locale == 'fr'.*'es', 'jp', 'us'"
    ):
        EsciData(tmp_path / "a", locale="fr")
    with pytest.raises(ValueError, match="no ESCI query left"):
        EsciData(tmp_path / "a", min_exact=20, max_exact=30)
    with pytest.raises(ValueError, match="min_exact"):
        EsciData(tmp_path / "a", min_exact=5, max_exact=3)


def test_reward_ranks_within_pool(root):
    """The samples work with the retriever: the raw query finds its exact products."""
    from ospo.metrics import ndcg_at_k
    from ospo.retriever import BM25

    data = EsciData(root, pool_size=12)
    bm25 = BM25()
    bm25.index(data.catalog)
    col = {d: i for i, d in enumerate(bm25.doc_ids)}
    s = next(x for x in data.split("train") + data.split("val") if x.qid == "1")
    scores = bm25.score(["A1 A2 A3"])[0]
    ranked = sorted(s.pool, key=lambda p: -scores[col[p]])
    assert ndcg_at_k(ranked, s.gains, 10) > 0.9
    assert np.isfinite(scores).all()
