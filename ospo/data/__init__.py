"""Data sets of shopping requests with graded product judgements (config group ``data``).

Every data set yields the same objects:

* :class:`Sample`: one request (the user's text, the chat messages the policy sees, the graded
  gains of the products judged for it, an optional candidate pool, and, for the embedded task,
  the latent-intent words and a demonstration for the supervised warm-up);
* :class:`Dataset`: a catalog (product id -> text the retriever indexes) and the three splits
  ``train``, ``val`` and ``test``.

Implementations: :class:`ospo.data.shop.ShopData` (the embedded synthetic task, the default),
:class:`ospo.data.esci.EsciData` (Amazon Shopping Queries) and :class:`ospo.data.hm.HMData`
(H&M contextualised search). Shared helpers live here: :func:`make_messages`,
:func:`build_pool`, :func:`load_demos` and :func:`attach_demos`, and the steps that the file
loaders (ESCI, H&M) share: reading and de-duplicating tables (:func:`read_csv`,
:func:`drop_duplicate_ids`, :func:`text_catalog`), the seeded splits (:func:`split_val`,
:func:`seeded_subset`) and the tail, :func:`samples_and_catalog` (:func:`build_splits`,
:func:`used_catalog`, :func:`attach_demos_file`).

Every row that a loader drops is logged with a count on the ``"ospo.data"`` logger.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger("ospo.data")

SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The split names every :class:`Dataset` has."""

ESCI_GAINS: dict[str, float] = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}
"""Graded gains of the ESCI labels (KDD Cup 2022): Exact, Substitute, Complement, Irrelevant."""

DEFAULT_SYSTEM_PROMPT = (
    "Rewrite the shopping request as a one-line search query: keep its words, add the product "
    "attributes it implies."
)
"""System prompt of the rewrite format unless the data config overrides it."""

APPEND_SYSTEM_PROMPT = (
    "List the product attributes the shopping request implies, as a few search words on one line."
)
"""System prompt of the append format unless the data config overrides it."""

COMPLETION_FORMATS: dict[str, str] = {
    "rewrite": DEFAULT_SYSTEM_PROMPT,
    "append": APPEND_SYSTEM_PROMPT,
}
"""What the policy writes (``data.completion``), and each format's default system prompt:

* ``rewrite``: the whole query (request words kept, attributes added); query = completion.
* ``append``: only the words it adds; the environment forms query = request + completion, so
  every generated token is a decision and v(empty) is the request's own score.
"""


@dataclass
class Sample:
    """One request and its judgements.

    ``gains`` maps product id -> graded gain (> 0 relevant; 0.0 entries are judged-irrelevant
    products, kept so that candidate pools can include them as hard negatives). ``pool`` is the
    list of candidate product ids ranked for this request, or None for the whole catalog.
    """

    qid: str
    request: str  # the user's request text
    messages: list[dict[str, str]]  # chat messages for the policy (system + user)
    gains: dict[str, float]  # product id -> graded gain (>0 relevant)
    pool: list[str] | None = None  # candidate product ids; None = full catalog
    intent_words: list[str] | None = None  # latent-intent words (embedded task only)
    demo: str | None = None  # demonstration completion for supervised warm-up
    prefix: str = ""  # put before the completion to form the query: the request (append) or ""


class Dataset:
    """A catalog plus train/val/test splits of :class:`Sample`.

    Subclasses build ``catalog`` and ``splits`` and call ``Dataset.__init__``. Loaders of
    files name their config option and say where the files come from, for the error a
    missing ``data.root`` raises before anything is read (``ospo.config.validate``).
    """

    config_name: str = ""  # the `data` option that builds this class
    root_help: str = "the data folder"  # what `data.root` must hold, and where to get it

    def __init__(
        self,
        name: str,
        catalog: dict[str, str],
        splits: dict[str, list[Sample]],
        completion: str = "rewrite",
    ):
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise ValueError(f"splits must have keys {list(SPLITS)}, missing {missing}")
        extra = sorted(set(splits) - set(SPLITS))
        if extra:
            raise ValueError(f"splits must have keys {list(SPLITS)} only, got extra {extra}")
        self.name = name
        self.catalog = catalog
        self.splits = splits
        self.completion = completion
        for samples in splits.values():
            set_completion_format(samples, completion)

    def split(self, name: str) -> list[Sample]:
        """The samples of split ``name`` ("train", "val" or "test")."""
        if name not in self.splits:
            raise KeyError(
                f"unknown split {name!r} for data set {self.name!r}: expected one of "
                f"{list(self.splits)}"
            )
        return self.splits[name]

    def summary(self) -> dict[str, int | str]:
        """Sizes: ``{"name", "catalog", "train", "val", "test"}``."""
        out: dict[str, int | str] = {"name": self.name, "catalog": len(self.catalog)}
        out.update({s: len(v) for s, v in self.splits.items()})
        return out

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.summary().items() if k != "name")
        return f"{type(self).__name__}({self.name!r}: {sizes})"


def check_completion(completion: str) -> str:
    """``completion`` if it names a format of :data:`COMPLETION_FORMATS`, else a ValueError."""
    if completion not in COMPLETION_FORMATS:
        raise ValueError(
            f"data.completion={completion!r}: expected one of {', '.join(COMPLETION_FORMATS)}"
        )
    return completion


def default_prompt(completion: str, system_prompt: str | None) -> str | None:
    """The system prompt: ``system_prompt`` when given ("" = none), else the format's default."""
    if system_prompt is None:
        return COMPLETION_FORMATS[check_completion(completion)]
    return system_prompt or None


def set_completion_format(samples: Iterable[Sample], completion: str) -> None:
    """Set each sample's query prefix and demonstration for the ``completion`` format.

    append: prefix = the request, and a demonstration that starts with the request (as every
    loader writes them) keeps only what follows it. rewrite: prefix = "", demos unchanged.
    """
    append = check_completion(completion) == "append"
    for s in samples:
        s.prefix = s.request if append else ""
        if append and s.demo is not None and s.demo.startswith(s.request):
            s.demo = s.demo[len(s.request) :].strip()


def make_messages(
    request: str,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    user_template: str = "{request}",
    **fields: str,
) -> list[dict[str, str]]:
    """Chat messages for the policy: an optional system message and the user message.

    ``user_template`` is a ``str.format`` template; it receives ``request`` and every keyword in
    ``fields`` (H&M passes ``history``). A placeholder with no value raises a ``KeyError`` that
    names it and the available ones.
    """
    values = {"request": request, **fields}
    try:
        user = user_template.format(**values)
    except KeyError as err:
        raise KeyError(
            f"user_template {user_template!r} uses placeholder {err.args[0]!r}; available: "
            f"{sorted(values)}"
        ) from None
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": user})
    return messages


def build_pool(
    gains: Mapping[str, float],
    all_ids: Sequence[str],
    size: int,
    rng: np.random.Generator,
) -> list[str]:
    """Candidate pool of one request: its judged ids plus seeded random negatives, shuffled.

    1. Judged ids (every key of ``gains``, gain 0 included: judged-irrelevant products are hard
       negatives), ordered by decreasing gain with random tie order; if there are more than
       ``size`` of them, only the ``size`` highest-gain ones are kept (so the relevant ones stay).
    2. Negatives drawn uniformly without replacement from ``all_ids`` minus the judged ids until
       the pool has ``size`` ids (fewer if the catalog runs out).
    3. The pool is shuffled: rankers break score ties by position, so the order must carry no
       information about relevance.
    """
    if size < 1:
        raise ValueError(f"pool size must be a positive integer, got {size!r}")
    judged = list(gains)
    tie = rng.permutation(len(judged))  # random order among equal gains
    order = sorted(range(len(judged)), key=lambda i: (-gains[judged[i]], tie[i]))
    pool = [judged[i] for i in order[:size]]
    need = size - len(pool)
    if need > 0:
        judged_set = set(judged)
        # Rejection sampling keeps this O(size) for large catalogs; fall back to an exact draw
        # when the catalog is small or mostly judged.
        picked: list[str] = []
        seen: set[str] = set()
        for _ in range(4):
            for j in rng.integers(0, len(all_ids), size=2 * need + 8):
                doc = all_ids[int(j)]
                if doc not in judged_set and doc not in seen:
                    seen.add(doc)
                    picked.append(doc)
                    if len(picked) == need:
                        break
            if len(picked) == need:
                break
        if len(picked) < need:
            rest = [d for d in all_ids if d not in judged_set and d not in seen]
            extra = rng.permutation(len(rest))[: need - len(picked)]
            picked.extend(rest[int(j)] for j in extra)
        pool.extend(picked)
    return [pool[int(i)] for i in rng.permutation(len(pool))]


def load_demos(path: str | Path) -> dict[str, str]:
    """Read demonstrations from a JSONL file: one ``{"qid": ..., "demo": ...}`` object a line.

    Blank lines are skipped; a later line for the same qid replaces an earlier one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demos file {str(path)!r} not found (JSONL of qid/demo lines)")
    demos: dict[str, str] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or "qid" not in row or "demo" not in row:
                raise ValueError(
                    f"{path}:{lineno}: expected an object with keys 'qid' and 'demo', got "
                    f"{line.strip()[:80]!r}"
                )
            demos[str(row["qid"])] = str(row["demo"])
    return demos


def attach_demos(samples: Iterable[Sample], demos: Mapping[str, str]) -> int:
    """Set ``sample.demo`` from ``demos`` (qid -> text) where present; returns how many were set."""
    count = 0
    for sample in samples:
        demo = demos.get(sample.qid)
        if demo is not None:
            sample.demo = demo
            count += 1
    return count


def require_columns(present: Iterable[str], required: Iterable[str], path: Path | str) -> None:
    """Raise a ``ValueError`` naming each required column missing from ``present``."""
    present = list(present)
    missing = [c for c in required if c not in present]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {present}")


def log_drop(count: int, what: str) -> None:
    """Log a drop with its count on the ``ospo.data`` logger (nothing when ``count`` is 0)."""
    if count:
        logger.info("dropped %d %s", count, what)


# ---- steps shared by the file loaders (ESCI, H&M) ---------------------------------------------


def check_val_fraction(val_fraction: float) -> None:
    """Raise a ``ValueError`` unless ``val_fraction`` is in [0, 1)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def check_pool_size(pool_size: int | None) -> None:
    """Raise a ``ValueError`` unless ``pool_size`` is None or a positive integer."""
    if pool_size is not None and pool_size < 1:
        raise ValueError(f"pool_size must be a positive integer or None, got {pool_size}")


def read_csv(path: Path, columns: Sequence[str], str_columns: Sequence[str]):
    """Read ``columns`` of a CSV file, ``str_columns`` as strings and only empty cells as missing
    (so "NA" stays text); a missing column raises :func:`require_columns`' error first."""
    import pandas as pd

    require_columns(pd.read_csv(path, nrows=0).columns, columns, path)
    return pd.read_csv(
        path,
        usecols=list(columns),
        dtype={c: str for c in str_columns},
        keep_default_na=False,
        na_values=[""],
    )


def drop_duplicate_ids(frame, column: str, what: str):
    """``frame`` without the rows whose ``column`` repeats an earlier row's (drop logged)."""
    dup = frame[column].duplicated()
    log_drop(int(dup.sum()), what)
    return frame[~dup]


def join_fields(frame, fields: Sequence[str]) -> list[str]:
    """Per row, the non-missing values of ``fields`` joined by " " (whitespace collapsed)."""
    import pandas as pd

    parts = []
    for field in fields:
        col = frame[field]
        parts.append([None if pd.isna(v) else " ".join(str(v).split()) for v in col])
    return [" ".join(p for p in row if p) for row in zip(*parts, strict=True)]


def text_catalog(frame, id_column: str, fields: list[str], what: str):
    """Product texts from ``fields`` (:func:`join_fields`); rows without text are dropped (logged
    as ``what``). Returns (the rows kept, catalog id -> text in row order)."""
    texts = join_fields(frame, fields)
    has_text = np.array([bool(t) for t in texts], dtype=bool)  # (rows,)
    log_drop(int((~has_text).sum()), f"{what} without text in {fields}")
    ids = frame[id_column].to_numpy()[has_text].tolist()
    return frame[has_text], dict(zip(ids, (t for t in texts if t), strict=True))


def split_val(train_ids: Sequence, test_ids: Sequence, fraction: float, seed: int) -> dict:
    """Splits ``{"train", "val", "test"}``: a seeded ``fraction`` of ``train_ids`` (rounded) is
    held out as val; train and val come back sorted, ``test_ids`` as given."""
    perm = np.random.default_rng([seed, 0]).permutation(len(train_ids))
    n_val = int(round(fraction * len(train_ids)))
    return {
        "train": sorted(train_ids[int(i)] for i in perm[n_val:]),
        "val": sorted(train_ids[int(i)] for i in perm[:n_val]),
        "test": test_ids,
    }


def seeded_subset(ids: Sequence, size: int, rng: np.random.Generator) -> Sequence:
    """At most ``size`` of ``ids``: all of them, or a random subset drawn with ``rng``, sorted."""
    if len(ids) <= size:
        return ids
    return sorted(ids[int(i)] for i in rng.permutation(len(ids))[:size])


def build_splits(
    ids_by_split: Mapping[str, Iterable],
    make_sample: Callable[[object, np.random.Generator], Sample],
    seed: int,
) -> dict[str, list[Sample]]:
    """One sample per id of each split, ``make_sample(id, rng)``; each split has its own
    generator seeded ``[seed, 2, k]`` (k = index in :data:`SPLITS`) for its pools."""
    splits: dict[str, list[Sample]] = {}
    for k, name in enumerate(SPLITS):
        rng = np.random.default_rng([seed, 2, k])
        splits[name] = [make_sample(i, rng) for i in ids_by_split[name]]
    return splits


def used_catalog(
    catalog: dict[str, str], splits: Mapping[str, list[Sample]], pooled: bool
) -> dict[str, str]:
    """With pools, the products that some pool contains (in catalog order): the retriever's
    statistics then come from that set. Without, the whole ``catalog``."""
    if not pooled:
        return catalog
    in_pools = {p for samples in splits.values() for s in samples for p in s.pool or ()}
    return {p: text for p, text in catalog.items() if p in in_pools}


def attach_demos_file(splits: Mapping[str, list[Sample]], demos_path: str | Path | None) -> None:
    """Attach the demonstrations of the JSONL file ``demos_path`` (:func:`load_demos`), if
    given, to the samples of every split, and log how many found their sample."""
    if demos_path is None:
        return
    demos = load_demos(demos_path)
    count = sum(attach_demos(s, demos) for s in splits.values())
    logger.info("attached %d demonstrations from %s", count, demos_path)


def samples_and_catalog(
    ids_by_split: Mapping[str, Iterable],
    make_sample: Callable[[object, np.random.Generator], Sample],
    seed: int,
    catalog: dict[str, str],
    pooled: bool,
    demos_path: str | Path | None,
) -> tuple[dict[str, str], dict[str, list[Sample]]]:
    """The file loaders' tail: the samples of every split (:func:`build_splits`), the catalog
    trimmed to the products they use (:func:`used_catalog`) and their demonstrations
    (:func:`attach_demos_file`). Returns (catalog, splits)."""
    splits = build_splits(ids_by_split, make_sample, seed)
    catalog = used_catalog(catalog, splits, pooled)
    attach_demos_file(splits, demos_path)
    return catalog, splits


__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ESCI_GAINS",
    "SPLITS",
    "Dataset",
    "Sample",
    "attach_demos",
    "attach_demos_file",
    "build_pool",
    "build_splits",
    "check_pool_size",
    "check_val_fraction",
    "drop_duplicate_ids",
    "join_fields",
    "load_demos",
    "log_drop",
    "make_messages",
    "read_csv",
    "require_columns",
    "samples_and_catalog",
    "seeded_subset",
    "split_val",
    "text_catalog",
    "used_catalog",
]
