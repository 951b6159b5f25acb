"""H&M loader on a small schema-exact fixture written to tmp_path (ospo.data.hm)."""

import json
import logging

import pandas as pd
import pytest

from ospo.data import SPLITS
from ospo.data.hm import ARTICLES, CUSTOMERS, TRANSACTIONS, HMData, normalize_article_id

ARTICLE_COLUMNS = [
    "article_id", "product_code", "prod_name", "product_type_no", "product_type_name",
    "product_group_name", "graphical_appearance_no", "graphical_appearance_name",
    "colour_group_code", "colour_group_name", "perceived_colour_value_id",
    "perceived_colour_value_name", "perceived_colour_master_id", "perceived_colour_master_name",
    "department_no", "department_name", "index_code", "index_name", "index_group_no",
    "index_group_name", "section_no", "section_name", "garment_group_no", "garment_group_name",
    "detail_desc",
]  # fmt: skip
CUSTOMER_COLUMNS = [
    "customer_id", "FN", "Active", "club_member_status", "fashion_news_frequency", "age",
    "postal_code",
]  # fmt: skip
TYPES = {  # product type -> (product group, section, garment group)
    "Trousers": ("Garment Lower body", "Womens Everyday Collection", "Trousers"),
    "Sweater": ("Garment Upper body", "Mens Casual", "Knitwear"),
    "Dress": ("Garment Full body", "Womens Tailoring", "Dresses Ladies"),
    "T-shirt": ("Garment Upper body", "Divided Basics", "Jersey Basic"),
}
COLOURS = ["Black", "White", "Dark Blue", "Light Pink"]


def article_rows():
    """24 articles: 12 products (product_code) x 2 colour variants, 3 products per type."""
    rows = []
    for p in range(12):
        ptype = list(TYPES)[p % 4]
        group, section, garment = TYPES[ptype]
        code = f"{108775 + p:07d}"  # leading zero, as in the real file
        for v in range(2):
            colour = COLOURS[(p + v) % 4]
            rows.append(
                {
                    "article_id": f"{code}{v + 1:03d}",
                    "product_code": code,
                    "prod_name": f"Item{p} {ptype}",
                    "product_type_no": 250 + p % 4,
                    "product_type_name": ptype,
                    "product_group_name": group,
                    "graphical_appearance_no": 1010016,
                    "graphical_appearance_name": "Solid",
                    "colour_group_code": 9 + v,
                    "colour_group_name": colour,
                    "perceived_colour_value_id": 4,
                    "perceived_colour_value_name": "Dark",
                    "perceived_colour_master_id": 5,
                    "perceived_colour_master_name": colour.split()[-1],
                    "department_no": 1676,
                    "department_name": f"{ptype} dept",
                    "index_code": "A",
                    "index_name": "Ladieswear",
                    "index_group_no": 1,
                    "index_group_name": "Ladieswear",
                    "section_no": 16,
                    "section_name": section,
                    "garment_group_no": 1002,
                    "garment_group_name": garment,
                    "detail_desc": None if p == 11 else f"Soft {ptype.lower()} number {p}.",
                }
            )
    return rows


def aid(p, v=0):
    return f"{108775 + p:07d}{v + 1:03d}"


def cid(n):
    return f"{n:064x}"


# customer -> [(day of September 2020, article)]
PURCHASES = {
    1: [(1, aid(0)), (3, aid(1)), (5, aid(2)), (10, aid(3)), (20, aid(4))],
    2: [(2, aid(0)), (4, aid(5))],  # one earlier purchase only: no target
    3: [(17, aid(1)), (18, aid(2)), (19, aid(6, 1))],  # all in the test window
    4: [(d, aid(d % 12, d % 2)) for d in range(1, 9)] + [(12, aid(8))],
    5: [(1, aid(0)), (2, aid(1)), (3, aid(2))],  # not in customers.csv
    6: [(1, aid(9)), (1, aid(9)), (2, "0999999001"), (3, aid(10)), (4, aid(1)), (22, aid(11))],
}
KNOWN_CUSTOMERS = [1, 2, 3, 4, 6, 7]


def write_fixture(root, articles=None, customers=None, transactions=None):
    root.mkdir(parents=True, exist_ok=True)
    if articles is None:
        articles = pd.DataFrame(article_rows(), columns=ARTICLE_COLUMNS)
    if customers is None:
        customers = pd.DataFrame(
            [
                {
                    "customer_id": cid(n), "FN": None, "Active": None,
                    "club_member_status": "ACTIVE", "fashion_news_frequency": "NONE",
                    "age": 20 + n, "postal_code": f"{n:064x}",
                }
                for n in KNOWN_CUSTOMERS
            ],
            columns=CUSTOMER_COLUMNS,
        )  # fmt: skip
    if transactions is None:
        rows = [
            {
                "t_dat": f"2020-09-{day:02d}",
                "customer_id": cid(n),
                # one row saved without the leading zero, as a spreadsheet would
                "article_id": art.lstrip("0") if (n, day) == (4, 2) else art,
                "price": 0.0339,
                "sales_channel_id": 2,
            }
            for n, items in PURCHASES.items()
            for day, art in items
        ]
        transactions = pd.DataFrame(rows)
    articles.to_csv(root / ARTICLES, index=False)
    customers.to_csv(root / CUSTOMERS, index=False)
    transactions.to_csv(root / TRANSACTIONS, index=False)
    return articles, customers, transactions


@pytest.fixture
def root(tmp_path):
    write_fixture(tmp_path / "hm")
    return tmp_path / "hm"


def by_qid(data):
    return {s.qid: (name, s) for name in SPLITS for s in data.split(name)}


def test_time_split_targets_and_history(root, caplog):
    with caplog.at_level(logging.INFO, logger="ospo.data"):
        data = HMData(root, val_fraction=0.0, pool_size=None)
    assert data.cutoff == "2020-09-16"  # last day 2020-09-22, 7-day test window
    samples = by_qid(data)
    assert set(samples) == {
        f"{cid(1)}:2020-09-10", f"{cid(1)}:2020-09-20", f"{cid(3)}:2020-09-19",
        f"{cid(4)}:2020-09-12", f"{cid(6)}:2020-09-04", f"{cid(6)}:2020-09-22",
    }  # fmt: skip
    assert samples[f"{cid(1)}:2020-09-20"][0] == "test"
    assert samples[f"{cid(1)}:2020-09-10"][0] == "train"
    name, s = samples[f"{cid(1)}:2020-09-10"]
    assert s.gains == {aid(3): 1.0, aid(3, 1): 0.1}
    assert s.request == "T-shirt"
    user = s.messages[-1]["content"]
    assert user == (
        "Recent purchases: Item0 Trousers (Trousers, Black); Item1 Sweater (Sweater, White); "
        "Item2 Dress (Dress, Dark Blue)\nRequest: T-shirt"
    )
    assert s.messages[0]["role"] == "system"
    # history_len caps the context at the most recent purchases
    user = samples[f"{cid(4)}:2020-09-12"][1].messages[-1]["content"]
    assert user.count(";") == 4 and "Item4" in user and "Item1 " not in user
    log = caplog.text
    assert "dropped 3 transactions of customers not in customers.csv" in log
    assert "dropped 1 transactions of articles missing from articles.csv" in log
    assert "dropped 1 repeated transactions" in log
    assert "dropped 1 customers without a target" in log  # customer 2


def test_leading_zeros_and_variant_gain(root):
    data = HMData(root, val_fraction=0.0, pool_size=None, variant_gain=0.0)
    assert all(len(a) == 10 and a.startswith("0") for a in data.catalog)
    assert normalize_article_id(108775001) == "0108775001"
    assert normalize_article_id("0108775001") == "0108775001"
    for name in SPLITS:
        for s in data.split(name):
            assert list(s.gains.values()) == [1.0]
    # the article saved without its zero still joins: customer 4's history keeps 5 entries
    s = by_qid(data)[f"{cid(4)}:2020-09-12"][1]
    assert s.messages[-1]["content"].count(";") == 4
    assert len(data.catalog) == 24
    assert data.catalog[aid(0)].startswith("Item0 Trousers Trousers Garment Lower body Black")
    assert "Soft" not in data.catalog[aid(11)]  # missing detail_desc skipped


def test_templates(root):
    data = HMData(root, template="{colour} {product_type} {section}", val_fraction=0.0)
    s = by_qid(data)[f"{cid(1)}:2020-09-10"][1]
    assert s.request == "Light Pink T-shirt Divided Basics"
    custom = HMData(root, user_template="{request} | {history}", system_prompt=None)
    assert custom.split("test")[0].messages[0]["role"] == "user"
    with pytest.raises(KeyError, match="unknown: \\['color'\\]"):
        HMData(root, template="{color}")


def test_pools_hard_negatives_and_catalog(root):
    data = HMData(root, pool_size=10, hard_negative_fraction=1.0, seed=2)
    type_of = pd.read_csv(root / ARTICLES, dtype={"article_id": str}).set_index("article_id")[
        "product_type_name"
    ]
    for name in SPLITS:
        for s in data.split(name):
            assert len(s.pool) == 10 == len(set(s.pool)) and set(s.gains) <= set(s.pool)
            target = next(a for a, g in s.gains.items() if g == 1.0)
            same = sum(type_of[p] == type_of[target] for p in s.pool)
            assert same == 6  # 3 products x 2 variants of the type, all in the pool
    assert set(data.catalog) == {p for n in SPLITS for s in data.split(n) for p in s.pool}
    again = HMData(root, pool_size=10, hard_negative_fraction=1.0, seed=2)
    assert [s.pool for s in again.split("test")] == [s.pool for s in data.split("test")]
    full = HMData(root, pool_size=None)
    assert all(s.pool is None for n in SPLITS for s in full.split(n)) and len(full.catalog) == 24


def test_val_max_samples_since_and_demos(root, tmp_path):
    data = HMData(root, val_fraction=0.5, seed=0)
    assert len(data.split("train")) == 1 and len(data.split("val")) == 2  # round(0.5 * 3)
    vals = {HMData(root, val_fraction=0.5, seed=s).split("val")[0].qid for s in range(8)}
    assert len(vals) > 1
    capped = HMData(root, max_samples=1, val_fraction=0.0)
    assert [len(capped.split(n)) for n in SPLITS] == [1, 0, 1]
    late = HMData(root, since="2020-09-17", val_fraction=0.0)
    assert {s.qid for s in late.split("test")} == {f"{cid(3)}:2020-09-19"}
    assert late.split("train") == []
    path = tmp_path / "demos.jsonl"
    qid = f"{cid(3)}:2020-09-19"
    path.write_text(json.dumps({"qid": qid, "demo": "pink dress"}) + "\n")
    demo = HMData(root, demos_path=path)
    assert {s.qid: s.demo for s in demo.split("test")}[qid] == "pink dress"


def test_missing_files_name_what_to_get(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        HMData(tmp_path / "nowhere")
    msg = str(err.value)
    for part in (ARTICLES, CUSTOMERS, TRANSACTIONS, "kaggle.com/competitions/h-and-m-personalized"):
        assert part in msg
    write_fixture(tmp_path / "hm")
    (tmp_path / "hm" / CUSTOMERS).unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['customers.csv'\]"):
        HMData(tmp_path / "hm")


def test_missing_columns_are_named(tmp_path):
    articles, customers, transactions = write_fixture(tmp_path / "a")
    write_fixture(
        tmp_path / "b", articles.drop(columns=["colour_group_name"]), customers, transactions
    )
    with pytest.raises(
        ValueError, match=r"articles.csv: missing column\(s\) \['colour_group_name'\]"
    ):
        HMData(tmp_path / "b")
    write_fixture(tmp_path / "c", articles, customers, transactions.drop(columns=["t_dat"]))
    with pytest.raises(
        ValueError, match=r"transactions_train.csv: missing column\(s\) \['t_dat'\]"
    ):
        HMData(tmp_path / "c")
    write_fixture(
        tmp_path / "d", articles, customers.rename(columns={"customer_id": "id"}), transactions
    )
    with pytest.raises(ValueError, match=r"customers.csv: missing column\(s\) \['customer_id'\]"):
        HMData(tmp_path / "d")
    bad = transactions.copy()
    bad["t_dat"] = bad["t_dat"].astype(object)
    bad.loc[0, "t_dat"] = "yesterday"
    write_fixture(tmp_path / "e", articles, customers, bad)
    with pytest.raises(ValueError, match="column 't_dat' has a non-date value 'yesterday'"):
        HMData(tmp_path / "e")


def test_bad_arguments(root):
    with pytest.raises(ValueError, match="min_history"):
        HMData(root, history_len=2, min_history=3)
    with pytest.raises(ValueError, match="hard_negative_fraction"):
        HMData(root, hard_negative_fraction=1.5)
