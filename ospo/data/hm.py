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
from pathlib import Path

import numpy as np

from ospo.data import (
    DEFAULT_SYSTEM_PROMPT,
    SPLITS,
    Dataset,
    Sample,
    attach_demos,
    build_pool,
    load_demos,
    log_drop,
    logger,
    make_messages,
    require_columns,
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


def normalize_article_id(value: object) -> str:
    """Article id as a 10-character string: all-digit ids get their leading zeros back."""
    text = str(value).strip()
    return text.zfill(10) if text.isdigit() and len(text) < 10 else text


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


def _read_csv(path: Path, columns: Sequence[str], str_columns: Sequence[str]):
    """Read ``columns`` of a CSV (``str_columns`` as strings); missing columns are named."""
    import pandas as pd

    require_columns(pd.read_csv(path, nrows=0).columns, columns, path)
    return pd.read_csv(
        path,
        usecols=list(columns),
        dtype={c: str for c in str_columns},
        keep_default_na=False,
        na_values=[""],
    )


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
        import pandas as pd

        if history_len < 1 or min_history < 0 or min_history > history_len:
            raise ValueError(
                f"need history_len >= 1 and 0 <= min_history <= history_len, got "
                f"history_len={history_len}, min_history={min_history}"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not 0.0 <= hard_negative_fraction <= 1.0:
            raise ValueError(
                f"hard_negative_fraction must be in [0, 1], got {hard_negative_fraction}"
            )
        if pool_size is not None and pool_size < 1:
            raise ValueError(f"pool_size must be a positive integer or None, got {pool_size}")
        if test_days < 1:
            raise ValueError(f"test_days must be >= 1, got {test_days}")
        fields = _template_fields(template)
        root = Path(root).expanduser()
        articles_path, customers_path, transactions_path = find_files(root)

        # articles: text, template fields, history fields, product code
        article_fields = list(article_fields)
        needed = list(
            dict.fromkeys(
                ["article_id", *HISTORY_COLUMNS, *article_fields]
                + [TEMPLATE_FIELDS[f] for f in fields]
            )
        )
        has_code = "product_code" in pd.read_csv(articles_path, nrows=0).columns
        art = _read_csv(
            articles_path,
            needed + (["product_code"] if has_code else []),
            ["article_id", "product_code"] if has_code else ["article_id"],
        )
        art["article_id"] = art["article_id"].map(normalize_article_id)
        dup = art["article_id"].duplicated()
        log_drop(int(dup.sum()), "duplicate article rows")
        art = art[~dup].set_index("article_id", drop=False).rename_axis(None)
        if has_code:
            code = art["product_code"].astype(str).str.strip().str.zfill(7)
        else:
            code = art["article_id"].str[:7]
        texts = [
            " ".join(" ".join(str(v).split()) for v in row if not pd.isna(v) and str(v).strip())
            for row in art[article_fields].itertuples(index=False)
        ]
        has_text = np.array([bool(t) for t in texts], dtype=bool)
        log_drop(int((~has_text).sum()), f"articles without text in {article_fields}")
        art, code = art[has_text], code[has_text]
        full_catalog = dict(zip(art.index, (t for t in texts if t), strict=True))
        all_ids = list(full_catalog)
        variants = _variants(code)
        by_type = {
            t: ids.tolist()
            for t, ids in art.groupby("product_type_name", dropna=False)["article_id"]
        }

        # 1. transactions of known customers and articles, no repeats
        customers = _read_csv(customers_path, ["customer_id"], ["customer_id"])["customer_id"]
        tx = _read_transactions(transactions_path, since)
        tx["article_id"] = tx["article_id"].map(normalize_article_id)
        known_customer = tx["customer_id"].isin(set(customers))
        log_drop(int((~known_customer).sum()), f"transactions of customers not in {CUSTOMERS}")
        tx = tx[known_customer]
        known_article = tx["article_id"].isin(full_catalog.keys())
        log_drop(int((~known_article).sum()), f"transactions of articles missing from {ARTICLES}")
        tx = tx[known_article]
        repeat = tx.duplicated(["customer_id", "t_dat", "article_id"])
        log_drop(int(repeat.sum()), "repeated transactions (same customer, day and article)")
        tx = tx[~repeat]
        if tx.empty:
            raise ValueError(f"{transactions_path}: no transaction left after the filters")

        # 2-3. per-customer order and the time-based targets
        tx = tx.sort_values(["customer_id", "t_dat"], kind="stable").reset_index(drop=True)
        days = pd.to_datetime(tx["t_dat"], errors="coerce")
        if days.isna().any():
            bad = tx["t_dat"][days.isna()].iloc[0]
            raise ValueError(f"{transactions_path}: column 't_dat' has a non-date value {bad!r}")
        cutoff = days.max().normalize() - pd.Timedelta(days=test_days - 1)
        in_test = (days >= cutoff).to_numpy()  # (R,)
        cust = tx["customer_id"].to_numpy()
        pos = tx.groupby("customer_id", sort=False).cumcount().to_numpy()  # (R,) index in history
        size = tx.groupby("customer_id", sort=False)["t_dat"].transform("size").to_numpy()
        before = pd.Series(~in_test).groupby(cust).transform("sum").to_numpy()  # (R,)
        test_rows = np.flatnonzero((pos == size - 1) & in_test & (pos >= min_history))
        train_rows = np.flatnonzero((pos == before - 1) & ~in_test & (pos >= min_history))
        log_drop(
            int(len(np.unique(cust)) - len(np.unique(cust[np.r_[test_rows, train_rows]]))),
            f"customers without a target that has {min_history} earlier purchases",
        )
        rng = np.random.default_rng([seed, 0])
        perm = train_rows[rng.permutation(len(train_rows))]
        n_val = int(round(val_fraction * len(perm)))
        rows = {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val]), "test": test_rows}
        if max_samples is not None:
            sub_rng = np.random.default_rng([seed, 1])
            for name, r in rows.items():
                if len(r) > max_samples:
                    rows[name] = np.sort(r[sub_rng.permutation(len(r))[:max_samples]])

        # samples: history text, request text, gains, pools
        article = tx["article_id"].to_numpy()
        dates = tx["t_dat"].to_numpy()
        info = {
            c: art[c].to_dict()
            for c in dict.fromkeys([*HISTORY_COLUMNS, *(TEMPLATE_FIELDS[f] for f in fields)])
        }
        splits: dict[str, list[Sample]] = {}
        for k, name in enumerate(SPLITS):
            pool_rng = np.random.default_rng([seed, 2, k])
            samples = []
            for r in rows[name]:
                r = int(r)
                target = article[r]
                start = r - min(int(pos[r]), history_len)
                history = "; ".join(_describe(info, a) for a in article[start:r])
                request = template.format(
                    **{f: _value(info[TEMPLATE_FIELDS[f]], target) for f in fields}
                )
                gains = {target: 1.0}
                if variant_gain > 0:
                    gains.update(
                        {v: float(variant_gain) for v in variants.get(target, ()) if v != target}
                    )
                pool = None
                if pool_size is not None:
                    pool = self._pool(
                        gains,
                        all_ids,
                        by_type,
                        info,
                        target,
                        pool_size,
                        hard_negative_fraction,
                        pool_rng,
                    )
                samples.append(
                    Sample(
                        qid=f"{cust[r]}:{dates[r]}",
                        request=request,
                        messages=make_messages(
                            request, system_prompt, user_template, history=history
                        ),
                        gains=gains,
                        pool=pool,
                    )
                )
            splits[name] = samples
        if pool_size is None:
            catalog = full_catalog
        else:
            in_pools = {p for s in splits.values() for sample in s for p in sample.pool or ()}
            catalog = {a: full_catalog[a] for a in all_ids if a in in_pools}
        if demos_path is not None:
            demos = load_demos(demos_path)
            count = sum(attach_demos(s, demos) for s in splits.values())
            logger.info("attached %d demonstrations from %s", count, demos_path)
        self.cutoff = str(cutoff.date())
        super().__init__("hm", catalog, splits)

    @staticmethod
    def _pool(gains, all_ids, by_type, info, target, size, hard_fraction, rng) -> list[str]:
        """Judged ids + hard negatives of the target's product type + uniform negatives."""
        size = max(size, len(gains))
        same_type = by_type.get(info["product_type_name"].get(target), [])
        num_hard = int(round(hard_fraction * (size - len(gains))))
        hard = [
            a for a in build_pool(gains, same_type, len(gains) + num_hard, rng) if a not in gains
        ]
        # hard negatives enter build_pool as judged gain-0 ids, so they are always kept
        return build_pool({**gains, **dict.fromkeys(hard, 0.0)}, all_ids, size, rng)


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
