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
:func:`build_pool`, :func:`load_demos` and :func:`attach_demos`.

Every row that a loader drops is logged with a count on the ``"ospo.data"`` logger.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
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
"""System prompt of every data set unless the data config overrides it."""


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
    demo: str | None = None  # demonstration expansion for supervised warm-up


class Dataset:
    """A catalog plus train/val/test splits of :class:`Sample`.

    Subclasses build ``catalog`` and ``splits`` and call ``Dataset.__init__``.
    """

    def __init__(self, name: str, catalog: dict[str, str], splits: dict[str, list[Sample]]):
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise ValueError(f"splits must have keys {list(SPLITS)}, missing {missing}")
        extra = sorted(set(splits) - set(SPLITS))
        if extra:
            raise ValueError(f"splits must have keys {list(SPLITS)} only, got extra {extra}")
        self.name = name
        self.catalog = catalog
        self.splits = splits

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


__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ESCI_GAINS",
    "SPLITS",
    "Dataset",
    "Sample",
    "attach_demos",
    "build_pool",
    "load_demos",
    "log_drop",
    "make_messages",
    "require_columns",
]
