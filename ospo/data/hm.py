"""H&M contextualised product search (``data=hm``).

Files (kaggle.com/competitions/h-and-m-personalized-fashion-recommendations), in ``root``:
``articles.csv``, ``customers.csv`` and ``transactions_train.csv``. Ids are read as strings;
all-digit article ids shorter than 10 characters get their leading zeros back ("108775015" ->
"0108775015"), so both files agree however they were saved.

A sample is one purchase in context: the customer's purchase history (the ``history_len``
purchases before the target, oldest first, each as "product name (product type, colour)") plus
an under-specified request made from the target article through ``template`` (default
``"{product_type}"``: the type alone, so the history has to say which one). The retriever
ranks the candidate pool with the policy's rewrite; the target article has gain 1.0 and the
other colour variants of the same product (same ``product_code``) get ``variant_gain``
(default 0.1: same garment, wrong colour); set 0 to judge the target alone.

Pipeline (each drop is logged with its count on the ``ospo.data`` logger):

1. transactions whose customer is not in customers.csv or whose article is not in
   articles.csv are dropped, and so are repeated rows (same customer, day and article);
2. purchases are ordered by day per customer (file order within a day);
3. time-based split: the last ``test_days`` days of the file form the test window. Per
   customer, the test target is the customer's last purchase if it lies in the window, the
   train target the last purchase before the window; a target needs ``min_history`` earlier
   purchases. ``val_fraction`` of the train samples (seeded) become ``val``; ``max_samples``
   (if set) caps each split (seeded subset);
4. candidate pools: the judged articles (target + variants) plus seeded negatives up to
   ``pool_size``; a ``hard_negative_fraction`` of the negatives share the target's product
   type (otherwise a random pool is easy for the type alone), the rest are uniform.
   ``pool_size=None``: rank the whole article catalog. With pools, ``catalog`` holds only the
   articles some pool contains.

``since`` ("YYYY-MM-DD") keeps only transactions from that day on, read in batches, so a slice
of the 31M-row file can be used without loading all of it.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ospo.data import (
    DEFAULT_SYSTEM_PROMPT,
    Dataset,
    Sample,
    build_pool,
    check_pool_size,
    check_val_fraction,
    drop_duplicate_ids,
    log_drop,
    make_messages,
    read_csv,
    require_columns,
    samples_and_catalog,
    seeded_subset,
    split_val,
    text_catalog,
)

ARTICLES, CUSTOMERS, TRANSACTIONS = "articles.csv", "customers.csv", "transactions_train.csv"
SOURCE = "kaggle.com/competitions/h-and-m-personalized-fashion-recommendations"

TEMPLATE_FIELDS: dict[str, str] = {
    "prod_name": "prod_name",
    "product_type": "product_type_name",
    "product_group": "product_group_name",
    "colour": "colour_group_name",
    "perceived_colour": "perceived_colour_master_name",
    "department": "department_name",
    "index": "index_name",
    "section": "section_name",
    "garment_group": "garment_group_name",
    "detail_desc": "detail_desc",
}
"""Placeholders of the request ``template`` -> articles.csv column."""

ARTICLE_FIELDS = (
    "prod_name",
    "product_type_name",
    "product_group_name",
    "colour_group_name",
    "perceived_colour_master_name",
    "department_name",
    "index_name",
    "section_name",
    "garment_group_name",
    "detail_desc",
)
"""Default articles.csv columns joined into the text the retriever indexes."""

HISTORY_COLUMNS = ("prod_name", "product_type_name", "colour_group_name")


@dataclass
class Articles:
    """The articles with text, as the samples need them."""

    catalog: dict[str, str]  # article id -> text the retriever indexes
    ids: list[str]  # the catalog's ids, in its order (the uniform negatives' source)
    info: dict[str, dict[str, object]]  # column -> article id -> value (history, template)
    variants: dict[str, list[str]]  # article id -> the article ids of its product code
    by_type: dict[object, list[str]]  # product_type_name -> article ids


@dataclass
class Purchases:
    """Known purchases ordered by customer, then day (file order within a day); (R,) arrays."""

    customer: np.ndarray
    article: np.ndarray
    day: np.ndarray  # t_dat as in the file ("YYYY-MM-DD")
    pos: np.ndarray  # index of the purchase in its customer's history


class HMData(Dataset):
    """H&M next-purchase search with purchase-history context (see the module docstring).

    Args:
        root: folder with articles.csv, customers.csv, transactions_train.csv.
        history_len: purchases shown as context (the most recent ones before the target).
        min_history: a target needs at least this many earlier purchases.
        template: request text from the target's attributes; placeholders in
            :data:`TEMPLATE_FIELDS` ({product_type}, {colour}, {section}, ...).
        val_fraction: share of the train samples held out as ``val`` (seeded).
        seed: seeds the validation split, the ``max_samples`` subsets and the pools.
        pool_size: candidates per request (judged + negatives), None = whole catalog.
        hard_negative_fraction: share of the negatives drawn from the target's product type.
        variant_gain: gain of the target's other colour variants (same product_code).
        test_days: length of the test window at the end of the transactions, in days.
        article_fields: articles.csv columns joined into the product text.
        demos_path: JSONL of warm-up demonstrations (``{"qid", "demo"}`` lines) or None.
        system_prompt, user_template: chat messages (``user_template`` takes ``{request}`` and
            ``{history}``).
        max_samples: cap on the samples of each split (seeded subset), None = all.
        since: keep only transactions from this day on ("YYYY-MM-DD"), None = all.
    """

    config_name = "hm"
    root_help = (
        "the folder holding articles.csv, customers.csv and transactions_train.csv "
        "(kaggle.com/competitions/h-and-m-personalized-fashion-recommendations)"
    )

    def __init__(
        self,
        root: str | Path,
        history_len: int = 5,
        min_history: int = 2,
        template: str = "{product_type}",
        val_fraction: float = 0.1,
        seed: int = 0,
        pool_size: int | None = 100,
        hard_negative_fraction: float = 0.5,
        variant_gain: float = 0.1,
        test_days: int = 7,
        article_fields: Sequence[str] = ARTICLE_FIELDS,
        demos_path: str | Path | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        user_template: str = "Recent purchases: {history}\nRequest: {request}",
        max_samples: int | None = None,
        since: str | None = None,
    ) -> None:
        _check_args(
            history_len, min_history, val_fraction, hard_negative_fraction, pool_size, test_days
        )
        fields = _template_fields(template)
        articles_path, customers_path, transactions_path = find_files(Path(root).expanduser())
        articles = read_articles(articles_path, list(article_fields), fields)
        tx = read_purchases(transactions_path, customers_path, articles.catalog, since)
        purchases, days = order_purchases(tx, transactions_path)
        cutoff = window_start(days, test_days)
        targets = time_targets(purchases, days, cutoff, min_history)
        rows = split_targets(targets, val_fraction, max_samples, seed)
        make_sample = partial(
            _sample,
            purchases=purchases,
            articles=articles,
            template=template,
            fields=fields,
            history_len=history_len,
            variant_gain=variant_gain,
            pool_size=pool_size,
            hard_negative_fraction=hard_negative_fraction,
            system_prompt=system_prompt,
            user_template=user_template,
        )
        catalog, splits = samples_and_catalog(
            rows, make_sample, seed, articles.catalog, pool_size is not None, demos_path
        )
        self.cutoff = str(cutoff.date())
        super().__init__("hm", catalog, splits)


def _check_args(history_len, min_history, val_fraction, hard_fraction, pool_size, test_days):
    """Raise a ``ValueError`` naming the first bad constructor argument."""
    if history_len < 1 or min_history < 0 or min_history > history_len:
        raise ValueError(
            f"need history_len >= 1 and 0 <= min_history <= history_len, got "
            f"history_len={history_len}, min_history={min_history}"
        )
    check_val_fraction(val_fraction)
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_negative_fraction must be in [0, 1], got {hard_fraction}")
    check_pool_size(pool_size)
    if test_days < 1:
        raise ValueError(f"test_days must be >= 1, got {test_days}")


def _template_fields(template: str) -> list[str]:
    """Placeholders of ``template``; an unknown one raises a ``KeyError`` listing the known."""
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    unknown = [n for n in names if n not in TEMPLATE_FIELDS]
    if unknown or not names:
        raise KeyError(
            f"template {template!r} must use placeholders among {sorted(TEMPLATE_FIELDS)}"
            + (f"; unknown: {unknown}" if unknown else "")
        )
    return names


def find_files(root: Path) -> tuple[Path, Path, Path]:
    """The three H&M files in ``root``; a missing one raises a ``FileNotFoundError`` that names
    all three and where to get them."""
    paths = tuple(root / name for name in (ARTICLES, CUSTOMERS, TRANSACTIONS))
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        where = "does not exist" if not root.is_dir() else f"lacks {missing}"
        raise FileNotFoundError(
            f"H&M data folder {str(root)!r} {where}. Expected {ARTICLES}, {CUSTOMERS} and "
            f"{TRANSACTIONS} in it; get them from {SOURCE} (data tab, needs a Kaggle account)."
        )
    return paths  # type: ignore[return-value]


def read_articles(path: Path, article_fields: list[str], fields: list[str]) -> Articles:
    """The articles with text: ids normalised, repeated rows dropped, text from
    ``article_fields``, plus the columns the history and the ``template`` ``fields`` use."""
    import pandas as pd

    needed = list(
        dict.fromkeys(
            ["article_id", *HISTORY_COLUMNS, *article_fields] + [TEMPLATE_FIELDS[f] for f in fields]
        )
    )
    has_code = "product_code" in pd.read_csv(path, nrows=0).columns
    art = read_csv(
        path,
        needed + (["product_code"] if has_code else []),
        ["article_id", "product_code"] if has_code else ["article_id"],
    )
    art["article_id"] = art["article_id"].map(normalize_article_id)
    art = drop_duplicate_ids(art, "article_id", "duplicate article rows")
    art = art.set_index("article_id", drop=False).rename_axis(None)
    art, catalog = text_catalog(art, "article_id", article_fields, "articles")
    if has_code:
        code = art["product_code"].astype(str).str.strip().str.zfill(7)
    else:
        code = art["article_id"].str[:7]
    by_type = art.groupby("product_type_name", dropna=False)["article_id"]
    return Articles(
        catalog=catalog,
        ids=list(catalog),
        info={
            c: art[c].to_dict()
            for c in dict.fromkeys([*HISTORY_COLUMNS, *(TEMPLATE_FIELDS[f] for f in fields)])
        },
        variants=_variants(code),
        by_type={t: ids.tolist() for t, ids in by_type},
    )


def read_purchases(transactions_path: Path, customers_path: Path, catalog: dict, since):
    """Step 1: the transactions (from ``since`` on) of known customers and of articles in
    ``catalog``, without repeated rows (same customer, day and article)."""
    customers = read_csv(customers_path, ["customer_id"], ["customer_id"])["customer_id"]
    tx = _read_transactions(transactions_path, since)
    tx["article_id"] = tx["article_id"].map(normalize_article_id)
    known_customer = tx["customer_id"].isin(set(customers))
    log_drop(int((~known_customer).sum()), f"transactions of customers not in {CUSTOMERS}")
    tx = tx[known_customer]
    known_article = tx["article_id"].isin(catalog.keys())
    log_drop(int((~known_article).sum()), f"transactions of articles missing from {ARTICLES}")
    tx = tx[known_article]
    repeat = tx.duplicated(["customer_id", "t_dat", "article_id"])
    log_drop(int(repeat.sum()), "repeated transactions (same customer, day and article)")
    tx = tx[~repeat]
    if tx.empty:
        raise ValueError(f"{transactions_path}: no transaction left after the filters")
    return tx


def order_purchases(tx, path: Path):
    """Step 2: the purchases ordered by customer and day, and their parsed days (a value that is
    not a date raises a ``ValueError`` naming it)."""
    import pandas as pd

    tx = tx.sort_values(["customer_id", "t_dat"], kind="stable").reset_index(drop=True)
    days = pd.to_datetime(tx["t_dat"], errors="coerce")
    if days.isna().any():
        bad = tx["t_dat"][days.isna()].iloc[0]
        raise ValueError(f"{path}: column 't_dat' has a non-date value {bad!r}")
    purchases = Purchases(
        customer=tx["customer_id"].to_numpy(),
        article=tx["article_id"].to_numpy(),
        day=tx["t_dat"].to_numpy(),
        pos=tx.groupby("customer_id", sort=False).cumcount().to_numpy(),
    )
    return purchases, days


def window_start(days, test_days: int):
    """Step 3: first day of the test window, the last ``test_days`` days of the file."""
    import pandas as pd

    return days.max().normalize() - pd.Timedelta(days=test_days - 1)


def time_targets(purchases: Purchases, days, cutoff, min_history: int) -> dict:
    """Step 3: rows of the targets, ``{"train", "test"}``. A customer's test target is the last
    purchase if it lies in the test window (from ``cutoff`` on), the train target the last one
    before it; either needs ``min_history`` earlier purchases."""
    import pandas as pd

    cust, pos = purchases.customer, purchases.pos
    in_test = (days >= cutoff).to_numpy()  # (R,)
    size = pd.Series(cust).groupby(cust, sort=False).transform("size").to_numpy()  # (R,)
    before = pd.Series(~in_test).groupby(cust).transform("sum").to_numpy()  # (R,)
    test_rows = np.flatnonzero((pos == size - 1) & in_test & (pos >= min_history))
    train_rows = np.flatnonzero((pos == before - 1) & ~in_test & (pos >= min_history))
    log_drop(
        int(len(np.unique(cust)) - len(np.unique(cust[np.r_[test_rows, train_rows]]))),
        f"customers without a target that has {min_history} earlier purchases",
    )
    return {"train": train_rows, "test": test_rows}


def split_targets(targets: dict, val_fraction: float, max_samples: int | None, seed: int) -> dict:
    """Step 3: target rows of each split: a seeded val share of the train targets, and at most
    ``max_samples`` per split (the subsets drawn in turn from one ``[seed, 1]`` generator)."""
    rows = split_val(targets["train"], targets["test"], val_fraction, seed)
    if max_samples is None:
        return rows
    rng = np.random.default_rng([seed, 1])
    return {name: seeded_subset(r, max_samples, rng) for name, r in rows.items()}


def _sample(
    r,
    rng: np.random.Generator,
    *,
    purchases: Purchases,
    articles: Articles,
    template: str,
    fields: list[str],
    history_len: int,
    variant_gain: float,
    pool_size: int | None,
    hard_negative_fraction: float,
    system_prompt: str | None,
    user_template: str,
) -> Sample:
    """Steps 3-4: the sample of the target in row ``r``: history, request, gains and pool."""
    r = int(r)
    info, article = articles.info, purchases.article
    target = article[r]
    start = r - min(int(purchases.pos[r]), history_len)
    history = "; ".join(_describe(info, a) for a in article[start:r])
    request = template.format(**{f: _value(info[TEMPLATE_FIELDS[f]], target) for f in fields})
    gains = {target: 1.0}
    if variant_gain > 0:
        variants = articles.variants.get(target, ())
        gains.update({v: float(variant_gain) for v in variants if v != target})
    pool = None
    if pool_size is not None:
        pool = hard_pool(gains, target, articles, pool_size, hard_negative_fraction, rng)
    return Sample(
        qid=f"{purchases.customer[r]}:{purchases.day[r]}",
        request=request,
        messages=make_messages(request, system_prompt, user_template, history=history),
        gains=gains,
        pool=pool,
    )


def hard_pool(gains, target, articles: Articles, size, hard_fraction, rng) -> list[str]:
    """Step 4: judged ids + hard negatives of the target's product type + uniform negatives."""
    size = max(size, len(gains))
    same_type = articles.by_type.get(articles.info["product_type_name"].get(target), [])
    num_hard = int(round(hard_fraction * (size - len(gains))))
    hard = [a for a in build_pool(gains, same_type, len(gains) + num_hard, rng) if a not in gains]
    # hard negatives enter build_pool as judged gain-0 ids, so they are always kept
    return build_pool({**gains, **dict.fromkeys(hard, 0.0)}, articles.ids, size, rng)


def normalize_article_id(value: object) -> str:
    """Article id as a 10-character string: all-digit ids get their leading zeros back."""
    text = str(value).strip()
    return text.zfill(10) if text.isdigit() and len(text) < 10 else text


def _read_transactions(path: Path, since: str | None):
    """t_dat, customer_id, article_id as strings, streamed in batches (``since`` filters)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    columns = ["t_dat", "customer_id", "article_id"]
    require_columns(pd.read_csv(path, nrows=0).columns, columns, path)
    reader = pacsv.open_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            include_columns=columns, column_types={c: pa.string() for c in columns}
        ),
    )
    batches, before = [], 0
    for batch in reader:
        if since is not None:
            before += batch.num_rows
            batch = batch.filter(pc.greater_equal(batch.column("t_dat"), pa.scalar(since)))
        batches.append(batch)
    table = pa.Table.from_batches(batches, schema=reader.schema)
    if since is not None:
        log_drop(before - table.num_rows, f"transactions before {since}")
    return table.to_pandas()


def _variants(code) -> dict[str, list[str]]:
    """article id -> every article id with the same product code (itself included)."""
    groups: dict[str, list[str]] = {}
    for article_id, c in code.items():
        groups.setdefault(c, []).append(article_id)
    return {a: groups[c] for a, c in code.items()}


def _value(column: dict, article_id: str) -> str:
    value = column.get(article_id)
    return "" if value is None or value != value else str(value)


def _describe(info: dict, article_id: str) -> str:
    """History entry: "product name (product type, colour)"."""
    name, ptype, colour = (_value(info[c], article_id) for c in HISTORY_COLUMNS)
    detail = ", ".join(x for x in (ptype, colour) if x)
    return f"{name} ({detail})" if detail else name
