"""Amazon Shopping Queries (ESCI) as a query-rewriting data set (``data=esci``).

Files (github.com/amazon-science/esci-data, folder ``shopping_queries_dataset/``), in ``root``
or in ``root/shopping_queries_dataset/``, as parquet or as CSV copies with the same columns:

* ``shopping_queries_dataset_examples.parquet``: example_id, query, query_id, product_id,
  product_locale, esci_label, small_version, large_version, split;
* ``shopping_queries_dataset_products.parquet``: product_id, product_locale, product_title,
  product_description, product_bullet_point, product_brand, product_color.

Loading uses pandas + pyarrow (not ``datasets``): both files are single tables, every step is a
columnar filter or group-by, and pandas reads parquet and CSV alike without an Arrow cache
folder. Products are read for the chosen locale only (a pyarrow filter), so the long text
columns of the other locales never reach memory.

Pipeline (each drop is logged with its count on the ``ospo.data`` logger):

1. examples: keep ``product_locale == locale`` and, with ``small_version``, ``small_version ==
   1``; an ``esci_label`` outside E/S/C/I or a ``split`` outside train/test is an error that
   names the column and the value;
2. products of the locale: text = the ``product_fields`` joined by " " (missing values
   skipped); products without any text are dropped, and so are the examples whose product is
   missing from the products file or has no text;
3. queries with ``min_exact``..``max_exact`` E labels are kept (the published setup: 3-10);
4. splits: the file's own ``split`` column (train / test); ``val_fraction`` of the train
   queries (seeded) become ``val``; ``max_queries`` (if set) caps each split (seeded subset);
5. gains E=1.0, S=0.1, C=0.01, I=0.0; judged-I products stay in ``gains`` with gain 0.0, so
   they enter the candidate pool as hard negatives;
6. candidate pools. The released setup ranked 1 target + 99 negatives per query. We keep every
   judged product of the query (E, S, C and I: all its labelled products, so NDCG's ideal DCG
   is the same as without pools) and add seeded random products of the locale catalog up to
   ``pool_size`` (default 100; a query with more judged products than that gets a pool of
   just its judged products), or exactly ``num_negatives`` of them when that is given.
   ``pool_size=None`` and ``num_negatives=None``: no pool, rank the whole locale catalog.
   With pools, ``catalog`` holds only the products some pool contains (BM25's statistics come
   from that set); without, every product of the locale that has text.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from ospo.data import (
    DEFAULT_SYSTEM_PROMPT,
    ESCI_GAINS,
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

EXAMPLES = "shopping_queries_dataset_examples"
PRODUCTS = "shopping_queries_dataset_products"
SOURCE = "github.com/amazon-science/esci-data (folder shopping_queries_dataset/)"
EXAMPLE_COLUMNS = (
    "query_id",
    "query",
    "product_id",
    "product_locale",
    "esci_label",
    "small_version",
    "split",
)
FILE_SPLITS = ("train", "test")
STR_COLUMNS = ("query_id", "query", "product_id", "product_locale", "esci_label", "split")
"""Columns read as strings from a CSV copy (parquet keeps its own types)."""

Query = tuple[str, str, dict[str, float]]
"""(query text, file split, gains product id -> gain) of one query."""


class EsciData(Dataset):
    """ESCI queries with graded product labels (see the module docstring for every step).

    Args:
        root: folder with the two ESCI files (parquet or CSV).
        locale: ``product_locale`` to keep ("us", "es" or "jp").
        small_version: keep only ``small_version == 1`` rows (the published task).
        min_exact, max_exact: keep queries with this many E labels (inclusive).
        val_fraction: share of the file's train queries held out as ``val`` (seeded).
        seed: seeds the validation split, the ``max_queries`` subsets and the pools.
        pool_size: candidates per query (judged + random negatives), None = whole catalog.
        num_negatives: if set, pools are the judged products + exactly this many negatives
            (overrides ``pool_size``).
        product_fields: product columns concatenated into the text the retriever indexes.
        demos_path: JSONL of warm-up demonstrations (``{"qid", "demo"}`` lines) or None.
        system_prompt, user_template: chat messages (``user_template`` takes ``{request}``).
        max_queries: cap on the queries of each split (seeded subset), None = all.
    """

    config_name = "esci"
    root_help = (
        "the folder holding shopping_queries_dataset_examples.parquet and "
        "shopping_queries_dataset_products.parquet (github.com/amazon-science/esci-data, "
        "folder shopping_queries_dataset/)"
    )

    def __init__(
        self,
        root: str | Path,
        locale: str = "us",
        small_version: bool = True,
        min_exact: int = 3,
        max_exact: int = 10,
        val_fraction: float = 0.1,
        seed: int = 0,
        pool_size: int | None = 100,
        num_negatives: int | None = None,
        product_fields: Sequence[str] = (
            "product_title",
            "product_brand",
            "product_color",
            "product_bullet_point",
        ),
        demos_path: str | Path | None = None,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        user_template: str = "{request}",
        max_queries: int | None = None,
    ) -> None:
        _check_args(val_fraction, min_exact, max_exact, pool_size, num_negatives)
        product_fields = _field_list(product_fields)
        root = Path(root).expanduser()
        locale = str(locale).lower()
        examples_path, products_path = find_file(root, EXAMPLES), find_file(root, PRODUCTS)
        ex = read_examples(examples_path, locale, small_version)
        full_catalog = read_products(products_path, locale, product_fields)
        ex = keep_queries(ex, full_catalog, min_exact, max_exact)
        _check_left(ex, locale, small_version, min_exact, max_exact)
        queries = query_table(ex)
        split_ids = split_queries(queries, val_fraction, max_queries, seed)
        make_sample = partial(
            _sample,
            queries=queries,
            all_ids=list(full_catalog),
            pool_size=pool_size,
            num_negatives=num_negatives,
            system_prompt=system_prompt,
            user_template=user_template,
        )
        pooled = pool_size is not None or num_negatives is not None
        catalog, splits = samples_and_catalog(
            split_ids, make_sample, seed, full_catalog, pooled, demos_path
        )
        self.locale = locale
        super().__init__(f"esci-{locale}", catalog, splits)


def _check_args(val_fraction, min_exact, max_exact, pool_size, num_negatives) -> None:
    """Raise a ``ValueError`` naming the first bad constructor argument."""
    check_val_fraction(val_fraction)
    if min_exact > max_exact:
        raise ValueError(f"min_exact ({min_exact}) must be <= max_exact ({max_exact})")
    check_pool_size(pool_size)
    if num_negatives is not None and num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0 or None, got {num_negatives}")


def _field_list(fields: Sequence[str]) -> list[str]:
    """The product columns as a list; none at all raises a ``ValueError``."""
    fields = list(fields)
    if not fields:
        raise ValueError("product_fields must name at least one product column")
    return fields


def find_file(root: Path, stem: str) -> Path:
    """``root/stem.parquet`` or ``root/stem.csv`` (also under ``root/shopping_queries_dataset``).

    Raises ``FileNotFoundError`` naming the expected files and where to get them.
    """
    for folder in (root, root / "shopping_queries_dataset"):
        for suffix in (".parquet", ".csv"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    where = "does not exist" if not root.is_dir() else f"has no {stem}.parquet (or .csv)"
    raise FileNotFoundError(
        f"ESCI data folder {str(root)!r} {where}. Expected {EXAMPLES}.parquet and "
        f"{PRODUCTS}.parquet (or .csv copies with the same columns) in it; get them from "
        f"{SOURCE}."
    )


def read_examples(path: Path, locale: str, small_version: bool):
    """Step 1: the examples of ``locale`` (and of the small version), ids as strings."""
    ex, _ = _read(path, EXAMPLE_COLUMNS)
    _check_values(ex, "esci_label", ESCI_GAINS, path)
    _check_values(ex, "split", FILE_SPLITS, path)
    locales = ex["product_locale"].astype(str).str.lower()
    keep = locales == locale
    if not keep.any():
        raise ValueError(
            f"{path}: no example with product_locale == {locale!r}; the file has "
            f"{sorted(locales.unique().tolist())}"
        )
    log_drop(int((~keep).sum()), f"ESCI examples of other locales than {locale!r}")
    ex = ex[keep]
    if small_version:
        small = _as_int(ex["small_version"], "small_version", path) == 1
        log_drop(int((~small).sum()), "ESCI examples outside the small version")
        ex = ex[small]
    return ex.assign(query_id=ex["query_id"].astype(str), product_id=ex["product_id"].astype(str))


def read_products(path: Path, locale: str, fields: list[str]) -> dict[str, str]:
    """Step 2: product id -> text of every product of ``locale`` that has text in ``fields``."""
    prod, other = _read(path, ["product_id", "product_locale", *fields], locale)
    log_drop(other, f"product rows of other locales than {locale!r}")
    prod = prod.assign(product_id=prod["product_id"].astype(str))
    prod = drop_duplicate_ids(
        prod, "product_id", f"duplicate product rows (product_id, locale {locale!r})"
    )
    return text_catalog(prod, "product_id", fields, "products")[1]


def keep_queries(ex, catalog: dict[str, str], min_exact: int, max_exact: int):
    """Steps 2-3: drop the examples whose product is not in ``catalog``, then the queries with
    fewer than ``min_exact`` or more than ``max_exact`` E labels."""
    known = ex["product_id"].isin(catalog.keys())
    log_drop(int((~known).sum()), "ESCI examples whose product is missing or has no text")
    ex = ex[known]
    num_exact = ex["esci_label"].eq("E").groupby(ex["query_id"]).sum()
    good = num_exact[(num_exact >= min_exact) & (num_exact <= max_exact)].index
    log_drop(
        int(len(num_exact) - len(good)),
        f"ESCI queries with fewer than {min_exact} or more than {max_exact} E labels",
    )
    return ex[ex["query_id"].isin(good)]


def _check_left(ex, locale: str, small_version: bool, min_exact: int, max_exact: int) -> None:
    """Raise a ``ValueError`` naming the filters when no example is left."""
    if ex.empty:
        raise ValueError(
            f"no ESCI query left after the filters (locale={locale!r}, small_version="
            f"{small_version}, {min_exact}-{max_exact} E labels)"
        )


def query_table(ex) -> dict[str, Query]:
    """Step 5: query_id -> (query text, file split, gains product id -> gain)."""
    table: dict[str, Query] = {}
    cols = zip(
        ex["query_id"], ex["query"], ex["split"], ex["product_id"], ex["esci_label"], strict=True
    )
    for qid, query, split, pid, label in cols:
        if qid not in table:
            table[qid] = (str(query), str(split), {})
        gains = table[qid][2]
        gains[pid] = max(gains.get(pid, 0.0), ESCI_GAINS[label])
    return table


def split_queries(
    queries: dict[str, Query], val_fraction: float, max_queries: int | None, seed: int
) -> dict[str, list[str]]:
    """Step 4: query ids of each split: the file's train/test, a seeded val share of train, and
    at most ``max_queries`` per split (each split's subset drawn from a fresh ``[seed, 1]``)."""
    by_split = {s: sorted(q for q, (_, sp, _) in queries.items() if sp == s) for s in FILE_SPLITS}
    split_ids = split_val(by_split["train"], by_split["test"], val_fraction, seed)
    if max_queries is None:
        return split_ids
    return {
        name: seeded_subset(ids, max_queries, np.random.default_rng([seed, 1]))
        for name, ids in split_ids.items()
    }


def _sample(
    qid: str,
    rng: np.random.Generator,
    *,
    queries: dict[str, Query],
    all_ids: list[str],
    pool_size: int | None,
    num_negatives: int | None,
    system_prompt: str | None,
    user_template: str,
) -> Sample:
    """Step 6: the sample of one query, with its candidate pool drawn from ``rng``."""
    query, _, gains = queries[qid]
    pool = None
    if num_negatives is not None:
        pool = build_pool(gains, all_ids, len(gains) + num_negatives, rng)
    elif pool_size is not None:
        pool = build_pool(gains, all_ids, max(pool_size, len(gains)), rng)
    return Sample(
        qid=qid,
        request=query,
        messages=make_messages(query, system_prompt, user_template),
        gains=gains,
        pool=pool,
    )


def _read(path: Path, columns: Sequence[str], locale: str | None = None):
    """Read ``columns`` of a parquet/CSV file (ids and labels as strings).

    Columns missing from the file raise a ``ValueError`` naming them. With ``locale``, only rows
    whose ``product_locale`` equals it (case-insensitive) are read; for parquet this is a pyarrow
    filter, so the other locales' rows never reach memory. Returns (frame, rows of other locales).
    """
    import pandas as pd
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        require_columns(pq.read_schema(path).names, columns, path)
        filters, other = None, 0
        if locale is not None:
            locales = pd.read_parquet(path, columns=["product_locale"])["product_locale"]
            match = locales.astype(str).str.lower() == locale
            other = int((~match).sum())
            values = sorted(locales[match].unique().tolist()) or [locale]
            filters = [("product_locale", "in", values)]
        return pd.read_parquet(path, columns=list(columns), filters=filters), other
    frame = read_csv(path, columns, [c for c in STR_COLUMNS if c in columns])
    other = 0
    if locale is not None:
        match = frame["product_locale"].astype(str).str.lower() == locale
        other = int((~match).sum())
        frame = frame[match]
    return frame, other


def _check_values(frame, column: str, allowed, path: Path) -> None:
    """Raise a ``ValueError`` naming ``column`` and its first value not in ``allowed``."""
    bad = frame[column][~frame[column].isin(list(allowed))]
    if len(bad):
        raise ValueError(
            f"{path}: column {column!r} has unknown value {bad.iloc[0]!r} ({len(bad)} rows); "
            f"expected one of {sorted(allowed)}"
        )


def _as_int(col, column: str, path: Path):
    """``col`` as integers; a non-integer value raises a ``ValueError`` naming it."""
    import pandas as pd

    values = pd.to_numeric(col, errors="coerce")
    if values.isna().any():
        bad = col[values.isna()].iloc[0]
        raise ValueError(
            f"{path}: column {column!r} has non-integer value {bad!r}; expected 0 or 1"
        )
    return values.astype(int)
