"""Report of a Hydra sweep: learning curves and test tables over seeds (``python -m ospo.report``).

Usage::

    python -m ospo.report multirun/train/<date>_<time> [--out DIR] [--figure NAME=LABELS]
        [--group-by KEY[,KEY...]]

Reads every ``*/summary.json`` below the folder (one per job, written by
:func:`ospo.rl.run_train`) and writes, into ``--out`` (default: the sweep folder):

* ``report.png``: validation NDCG@10 against RL step and against RL wall time (s), one line
  per method label (mean over seeds) with a shaded 95% t-interval over seeds (on the step
  panel, with a baseline, the sample-efficiency target of (e) as a dashed line), and, with a
  baseline, each label minus the baseline on the same seed against step;
* ``report-NAME.png`` for each ``--figure NAME=LABEL[,LABEL...]``: the same figure with only
  those labels and the baseline (a sweep of many variants reads better as a few figures);
* ``report.md`` (also printed): (a) per label, the number of seeds, final test NDCG@10 /
  recall@10 / MRR as mean +- 95% half-width, validation NDCG@10 start -> end, mean RL wall
  time (``rl_wall_s``: the job that runs a seed's shared warm-up pays for it in ``wall_s``,
  so the whole-job time would not compare methods);
  (b) out of distribution: per label and held-out retriever, test NDCG@10 with the training
  retriever and with the held-out one, and the change (held-out minus training, so a drop is
  negative; absolute with its interval over seeds, and relative in %);
  (c) paired against a baseline label (``grpo`` by default): per other label, its test metrics
  and final validation NDCG@10 minus the baseline's on the same seed, the test NDCG@10
  difference also relative (in % of the baseline's mean test NDCG@10 over the same seeds),
  and on how many seeds it scored higher; below the table, one line per label stating
  whether the paired interval of the test NDCG@10 difference lies above zero, below zero or
  contains zero. Jobs of one seed share the warm-up, so the pairing removes the spread that
  the warm-up puts between seeds, which dominates the intervals of (a);
  (d) learning: per label, validation NDCG@10 start -> end (means over seeds), the change
  end - start paired per seed (mean +- half-width), the final validation format_ok (mean)
  and ``credit_cos_to_grpo`` (mean over seeds; the run mean of the per-step cosine between
  the method's token advantages and GRPO's, 1 for GRPO itself; "n/a" where the summaries
  lack it, "(k of n seeds)" where only some have it);
  (e) sample efficiency (with a baseline): the target is the baseline's final validation
  NDCG@10 averaged over its seeds; per label, how many seeds reach it ("k of n"), and over
  those that do, the mean +- half-width of the RL step and RL wall time (``wall_s`` of the
  validation point) at which they first do, and each seed's step ("never" if not reached).

Statistics (numbered as in :func:`aggregate`):

1. Runs are grouped by ``label``; each seed is one observation. ``--group-by KEY[,KEY...]``
   groups by other keys of summary.json instead (:func:`group_runs`; dotted keys reach into
   nested objects, e.g. ``config.baseline.advantage.weighting`` or ``commit``), and the tables
   name those groups where they would name labels. A run without a key is put in the group
   ``(missing)`` for it; several keys name a group by their values joined with " / ". The
   paired tables then need one run per group and seed (:func:`duplicate_seeds`; else they
   are left out, with a note); the default baseline is the group :func:`default_baseline`
   picks if all its runs are GRPO runs, else none.
2. Interval: mean +- t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation (ddof=1).
   One seed has no interval ("n/a").
3. Curves: each seed's (x, y) points are linearly interpolated onto the union of all seeds'
   x values, only inside that seed's own range (no extrapolation); at each grid point the mean
   and interval use the seeds covering it. The figure draws the points covered by the most
   seeds (normally all of them), so the mean does not jump where a seed's run ends.
4. Changes are paired per seed (held-out minus training on the same seed's completions); seeds
   missing a held-out retriever are left out of that retriever's row.
5. Paired differences (:func:`paired_differences`): per seed present in both labels, label
   minus baseline; mean and interval as in 2 over those seeds. The relative difference
   (:func:`relative_difference`) is 100 * mean difference / the baseline's mean over the same
   seeds; it has no interval of its own (the absolute interval is the one to read).
   :func:`interval_side` says where mean +- half lies relative to zero.
6. Learning change: per seed, last minus first validation point (by step), mean and interval
   as in 2. Start and end are the validation points with the lowest and highest step.
   Older summaries without ``val_format_ok_end`` fall back to ``val/format_ok`` of the last
   validation point; ``credit_cos_to_grpo`` absent or null leaves that seed out of its mean.
7. Sample efficiency (:func:`sample_efficiency`, :func:`steps_to_reach`): a seed reaches the
   target at its first validation point (by step) with value >= target (less 1e-9, for the
   rounding of the mean target only); no interpolation between validation points, so the step
   is an upper bound on the crossing at the resolution of the validation interval (and the
   wall time is that point's). A run at the target at step 0 reaches it at 0. Means are over
   the reaching seeds only (conditional on reaching it): read them with "k of n"; seeds that
   never reach it are counted in n, never dropped. The baseline's own row is included: with
   the target its mean final value, typically only some of its seeds reach it, and late.

Summaries made before summary.json recorded overrides, config and commit (no ``commit`` key;
the kept ones say so in ``provenance``) are counted in a printed note (:func:`older_runs`).

Pure functions: :func:`load_runs`, :func:`group_runs`, :func:`duplicate_seeds`,
:func:`older_runs`, :func:`val_points`, :func:`steps_to_reach`, :func:`relative_difference`,
:func:`interval_side`, :func:`final_format_ok`, :func:`check_labels`, :func:`sample_efficiency`,
:func:`paired_differences`, :func:`aggregate`, :func:`render_markdown`, :func:`plot`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ospo.io import write_json
from ospo.metrics import format_ci, mean_ci, t_quantile

__all__ = [
    "TEST_METRICS",
    "aggregate",
    "check_labels",
    "duplicate_seeds",
    "final_format_ok",
    "group_runs",
    "interpolate_curves",
    "interval_side",
    "keep_summaries",
    "load_runs",
    "main",
    "mean_ci",
    "older_runs",
    "paired_differences",
    "plot",
    "relative_difference",
    "render_markdown",
    "sample_efficiency",
    "steps_to_reach",
    "t_quantile",
    "val_points",
]

TEST_METRICS: tuple[str, ...] = ("ndcg@10", "recall@10", "mrr")
"""Test metrics of table (a), as keys of ``summary["test"][retriever]``."""

TRAIN_KEY = "train"
"""Key of the training retriever in ``summary["test"]``; the other keys are held out."""

MISSING_GROUP = "(missing)"
"""Group of the runs whose summary lacks a ``--group-by`` key."""


# ----------------------------------------------------------------------------- loading


def keep_summaries(runs: Sequence[dict[str, Any]], dest: str | Path) -> list[Path]:
    """Copy each run's summary.json to ``dest/<label>/seed<seed>/summary.json``, so that the
    tables and plots of a sweep split over sessions can be rebuilt from the repository
    (``python -m ospo.report <dest>``). An existing copy of the same label and seed is
    replaced (atomically). Returns the written paths."""
    out = []
    for run in runs:
        summary = {k: v for k, v in run.items() if k != "path"}
        path = Path(dest) / str(run["label"]) / f"seed{run['seed']}" / "summary.json"
        write_json(path, summary)
        out.append(path)
    return out


def load_runs(folder: str | Path, split: str = "test") -> list[dict[str, Any]]:
    """Every ``summary.json`` below ``folder`` (recursively), sorted by path.

    Each returned dict is the summary plus ``"path"`` (the summary file, as a string).
    Raises FileNotFoundError when the folder is missing or holds no summary, and ValueError
    naming the file when a summary is not valid JSON or lacks a required key.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: expected a Hydra multirun folder")
    paths = sorted(root.rglob("summary.json"))
    if not paths:
        raise FileNotFoundError(
            f"no summary.json found below {root}: expected one <job>/summary.json per Hydra "
            "job (written by ospo.rl.run_train when a training run finishes)"
        )
    runs = []
    for path in paths:
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(summary, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(summary).__name__}")
        missing = [k for k in ("label", "val_history", split) if k not in summary]
        if missing:
            raise ValueError(
                f"{path} lacks {missing}: expected a summary.json of ospo.rl.run_train "
                f"with keys label, seed, val_history and {split!r}"
            )
        if TRAIN_KEY not in summary[split]:
            raise ValueError(
                f"{path}: {split!r} has retrievers {sorted(summary[split])}, expected "
                f"{TRAIN_KEY!r} (the training retriever) among them"
            )
        summary["path"] = str(path)
        runs.append(summary)
    return runs


def _group_value(summary: dict[str, Any], key: str) -> str:
    """The value at dotted ``key`` as a group name: strings as they are, other values as JSON
    (``null``, ``true``, ``0.7``), :data:`MISSING_GROUP` where some part of the key is absent."""
    value: Any = summary
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING_GROUP
        value = value[part]
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def group_runs(runs: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Copies of ``runs`` with ``label`` replaced by their group: the value of each dotted key
    of ``keys`` (:func:`_group_value`), joined with " / " when there are several, so that
    :func:`aggregate` groups by them. The runs themselves are left unchanged."""
    return [{**run, "label": " / ".join(_group_value(run, k) for k in keys)} for run in runs]


def duplicate_seeds(runs: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per label, the seeds it has more than one run of (labels without any left out): the
    paired tables, which match runs by seed, cannot use such a label."""
    seen: dict[str, dict[Any, int]] = {}
    for run in runs:
        counts = seen.setdefault(str(run["label"]), {})
        counts[run.get("seed")] = counts.get(run.get("seed"), 0) + 1
    dups = {
        lab: sorted((s for s, c in n.items() if c > 1), key=_seed_order) for lab, n in seen.items()
    }
    return {lab: seeds for lab, seeds in sorted(dups.items()) if seeds}


def _seeds_text(dups: dict[str, list[Any]]) -> str:
    """'label (seeds 0, 1); ...' for :func:`duplicate_seeds`."""
    return "; ".join(f"{lab} (seeds {', '.join(map(str, seeds))})" for lab, seeds in dups.items())


def older_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs whose summary records no commit: made before summary.json recorded overrides,
    config and commit (:mod:`ospo.provenance`); the kept ones are marked in ``provenance``."""
    return [run for run in runs if "commit" not in run]


# ----------------------------------------------------------------------------- statistics


def interpolate_curves(
    xs: Sequence[Sequence[float]], ys: Sequence[Sequence[float]], level: float = 0.95
) -> dict[str, np.ndarray]:
    """Mean curve and t-interval over seeds on the union of their x grids.

    xs[s], ys[s]: points of seed s. Each seed is linearly interpolated onto the union grid
    only inside [min xs[s], max xs[s]]. Returns ``x`` (G,), ``mean`` (G,), ``lo`` / ``hi`` (G,)
    (NaN where fewer than 2 seeds cover a point) and ``n`` (G,) seeds covering each point.
    """
    curves = []
    for x, y in zip(xs, ys, strict=True):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        ok = np.isfinite(x) & np.isfinite(y)
        order = np.argsort(x[ok], kind="stable")
        curves.append((x[ok][order], y[ok][order]))
    curves = [(x, y) for x, y in curves if x.size]
    if not curves:
        empty = np.zeros(0)
        return {"x": empty, "mean": empty, "lo": empty, "hi": empty, "n": empty.astype(int)}
    grid = np.unique(np.concatenate([x for x, _ in curves]))  # (G,)
    table = np.full((len(curves), grid.size), np.nan)  # (S, G)
    for s, (x, y) in enumerate(curves):
        inside = (grid >= x[0]) & (grid <= x[-1])
        table[s, inside] = np.interp(grid[inside], x, y)
    stats = [mean_ci(table[:, g], level) for g in range(grid.size)]
    mean = np.array([m for m, _, _ in stats])
    half = np.array([h for _, h, _ in stats])
    n = np.array([c for _, _, c in stats], dtype=int)
    return {"x": grid, "mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def val_points(run: dict[str, Any], metric: str = "ndcg@10") -> list[dict[str, Any]]:
    """The run's validation points that have ``step`` and ``val/<metric>``, sorted by step."""
    key = f"val/{metric}"
    hist = [h for h in run["val_history"] if key in h and "step" in h]
    return sorted(hist, key=lambda h: h["step"])


def steps_to_reach(
    run: dict[str, Any], target: float, metric: str = "ndcg@10", tol: float = 1e-9
) -> tuple[float, float] | None:
    """(step, RL wall seconds) of the first validation point with ``val/<metric>`` >= target.

    Points are taken in step order; there is no interpolation between validation points, so
    the step is the first *measured* one at or above the target (an upper bound on the true
    crossing, at the resolution of the validation interval). ``tol`` only absorbs floating
    point rounding of a mean target (a value >= target - tol counts: mean(0.2, 0.4) is
    0.30000000000000004, and 0.3 reaches it). The wall time is that point's ``wall_s`` (NaN
    when the point lacks it). A run already at the target at step 0 gives (0, its wall_s).
    Returns None when no point reaches the target (or the run has none). Raises ValueError
    when ``target`` is not a finite number.
    """
    if not math.isfinite(target):
        raise ValueError(f"target must be a finite {metric}, got {target!r}")
    key = f"val/{metric}"
    for h in val_points(run, metric):
        if h[key] is not None and h[key] >= target - tol:
            return h["step"], float(h.get("wall_s", math.nan))
    return None


def relative_difference(diff: float, base: float) -> float:
    """100 * diff / base, in % of the baseline's value; NaN when base is 0 or not finite."""
    if not (math.isfinite(diff) and math.isfinite(base)) or base == 0:
        return math.nan
    return 100.0 * diff / base


def interval_side(stat: tuple[float, float, int]) -> str:
    """Where the interval mean +- half lies: "above zero" (mean - half > 0), "below zero"
    (mean + half < 0), "contains zero" (else, ends included) or "no interval" (fewer than 2
    values, or no finite mean)."""
    mean, half, n = stat
    if n < 2 or not (math.isfinite(mean) and math.isfinite(half)):
        return "no interval"
    if mean - half > 0:
        return "above zero"
    if mean + half < 0:
        return "below zero"
    return "contains zero"


def _seed_order(seed: Any) -> tuple[bool, float, str]:
    """Sort key: numeric seeds by value, then other seeds by text, None last."""
    numeric = isinstance(seed, int | float) and not isinstance(seed, bool)
    return seed is None, float(seed) if numeric else math.inf, str(seed)


def sample_efficiency(
    runs: Sequence[dict[str, Any]],
    baseline: str,
    metric: str = "ndcg@10",
    level: float = 0.95,
) -> dict[str, Any]:
    """Steps and RL wall time to reach the baseline's final validation ``metric``.

    The target is the mean over the baseline's seeds of each seed's last validation value
    (by step). Per label (the baseline included), :func:`steps_to_reach` on each seed, seeds
    in numeric order. Returns ``{"target", "target_n" (baseline seeds with a validation
    point), "labels": {label: {"n" (seeds), "reached" (seeds reaching it), "per_seed":
    [(seed, (step, wall_s) or None)], "steps" / "wall_s": (mean, half, n) over the seeds
    that reach it}}}``. Seeds that never reach it are counted in ``n`` but not in the means,
    which therefore describe the reaching seeds only (read them together with ``reached``).
    ``labels`` is empty when the baseline has no validation point. Raises ValueError naming
    ``baseline`` and the labels when no run has that label.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(str(run["label"]), []).append(run)
    if baseline not in groups:
        raise ValueError(f"baseline label {baseline!r} not among the runs' labels {sorted(groups)}")
    key = f"val/{metric}"
    ends = [pts[-1][key] for pts in (val_points(r, metric) for r in groups[baseline]) if pts]
    target, _, target_n = mean_ci(ends, level)
    out: dict[str, Any] = {"target": target, "target_n": target_n, "labels": {}}
    if target_n == 0:
        return out
    for label in sorted(groups):
        group = sorted(groups[label], key=lambda run: _seed_order(run.get("seed")))
        per_seed = [(run.get("seed"), steps_to_reach(run, target, metric)) for run in group]
        hits = [hit for _, hit in per_seed if hit is not None]
        out["labels"][label] = {
            "n": len(per_seed),
            "reached": len(hits),
            "per_seed": per_seed,
            "steps": mean_ci([step for step, _ in hits], level),
            "wall_s": mean_ci([wall for _, wall in hits], level),
        }
    return out


def paired_differences(
    runs: Sequence[dict[str, Any]],
    baseline: str,
    split: str = "test",
    metric: str = "ndcg@10",
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Per label other than ``baseline``: (label - baseline) on the same seeds (step 5).

    Returns {label: {"seeds": [...], "n", "wins" (seeds where the label's test ``metric`` is
    higher), "test": {m: (mean, half, n)} for m in TEST_METRICS, "base_mean" (the baseline's
    mean test ``metric`` over the paired seeds), "rel_pct" (:func:`relative_difference` of the
    mean paired ``metric`` difference and ``base_mean``), "val_end": (mean, half, n),
    "curve": validation difference against RL step (:func:`interpolate_curves` of each seed's
    label points minus the baseline interpolated at those steps, inside the baseline's range)}}.
    Raises ValueError naming ``baseline`` and the labels when no run has that label.
    """
    by_label: dict[str, dict[Any, dict[str, Any]]] = {}
    for run in runs:
        by_label.setdefault(str(run["label"]), {})[run.get("seed")] = run
    if baseline not in by_label:
        raise ValueError(
            f"baseline label {baseline!r} not among the runs' labels {sorted(by_label)}"
        )
    val_key = f"val/{metric}"

    def xy(run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        hist = val_points(run, metric)
        x = np.array([h["step"] for h in hist], dtype=np.float64)  # (V,)
        y = np.array([h[val_key] for h in hist], dtype=np.float64)  # (V,)
        return x, y

    def val_end(run: dict[str, Any]) -> float:
        y = xy(run)[1]
        return float(y[-1]) if y.size else math.nan

    def val_diff(run: dict[str, Any], ref: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        (xa, ya), (xb, yb) = xy(run), xy(ref)
        if not (xa.size and xb.size):
            return np.zeros(0), np.zeros(0)
        inside = (xa >= xb[0]) & (xa <= xb[-1])
        return xa[inside], ya[inside] - np.interp(xa[inside], xb, yb)

    base = by_label[baseline]
    out = {}
    for label in sorted(by_label):
        if label == baseline:
            continue
        seeds = [s for s in by_label[label] if s in base]
        pairs = [(by_label[label][s], base[s]) for s in seeds]
        diffs = {
            m: np.array(
                [
                    a[split][TRAIN_KEY].get(m, math.nan) - b[split][TRAIN_KEY].get(m, math.nan)
                    for a, b in pairs
                ],
                dtype=np.float64,
            )
            for m in TEST_METRICS
        }
        curves = [val_diff(a, b) for a, b in pairs]
        test = {m: mean_ci(d, level) for m, d in diffs.items()}
        base_mean = mean_ci([b[split][TRAIN_KEY].get(metric, math.nan) for _, b in pairs])[0]
        out[label] = {
            "seeds": seeds,
            "n": len(seeds),
            "wins": int((diffs[metric] > 0).sum()) if metric in diffs else 0,
            "test": test,
            "base_mean": base_mean,
            "rel_pct": relative_difference(test[metric][0], base_mean)
            if metric in test
            else math.nan,
            "val_end": mean_ci([val_end(a) - val_end(b) for a, b in pairs], level),
            "curve": interpolate_curves([x for x, _ in curves], [y for _, y in curves], level),
        }
    return out


def final_format_ok(run: dict[str, Any]) -> float:
    """The run's final validation format_ok: ``val_format_ok_end``, else (older summaries)
    ``val/format_ok`` of its last validation point by step, else NaN."""
    value = run.get("val_format_ok_end")
    if value is None:
        hist = [h for h in run["val_history"] if "val/format_ok" in h and "step" in h]
        value = max(hist, key=lambda h: h["step"])["val/format_ok"] if hist else None
    return math.nan if value is None else float(value)


def default_baseline(runs: Sequence[dict[str, Any]]) -> str | None:
    """The label ``grpo`` if present, else the only label whose method is ``grpo``, else None."""
    labels = {str(run["label"]) for run in runs}
    if "grpo" in labels:
        return "grpo"
    grpo = {str(run["label"]) for run in runs if run.get("method") == "grpo"}
    return grpo.pop() if len(grpo) == 1 else None


def aggregate(
    runs: Sequence[dict[str, Any]],
    split: str = "test",
    metric: str = "ndcg@10",
    level: float = 0.95,
    baseline: str | None = "auto",
) -> dict[str, Any]:
    """Per-label statistics over seeds (see the module docstring, steps 1-7).

    Returns ``{"metric", "split", "level", "held_out": [retriever names, sorted],
    "labels": {label: {...}}, "baseline": label or None, "paired": {...}, "efficiency":
    {...}}``; ``baseline`` "auto" picks :func:`default_baseline`, None skips (c) and (e),
    ``paired`` is :func:`paired_differences` and ``efficiency`` :func:`sample_efficiency`
    (both empty without a baseline). Per label: ``seeds`` (list), ``n``, ``test`` (metric ->
    (mean, half, n) with the training retriever), ``val_start`` / ``val_end`` / ``wall_s``
    ((mean, half, n); ``wall_s`` is the RL wall time, ``rl_wall_s``, else ``wall_s`` for older
    summaries), ``val_change`` (end minus start per seed, step 6), ``val_format_ok_end``
    (:func:`final_format_ok`), ``credit_cos`` (``credit_cos_to_grpo`` over the seeds that
    have it; n = 0 when none does), ``curves`` ({"step": ..., "wall_s": ...} from
    :func:`interpolate_curves`) and ``ood`` (retriever -> {"train", "held_out", "change":
    (mean, half, n) over the seeds having that retriever, "change_pct": float}).
    """
    if not runs:
        raise ValueError("no runs to aggregate: got an empty list")
    val_key = f"val/{metric}"
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:  # 1. group by label
        groups.setdefault(str(run["label"]), []).append(run)
    held_out = sorted({r for run in runs for r in run[split] if r != TRAIN_KEY})
    labels = {}
    for label in sorted(groups):
        group = groups[label]
        train = [run[split][TRAIN_KEY] for run in group]
        entry: dict[str, Any] = {
            "seeds": [run.get("seed") for run in group],
            "n": len(group),
            "method": group[0].get("method"),
            "test": {  # 2. mean +- half-width over seeds
                m: mean_ci([s.get(m, math.nan) for s in train], level) for m in TEST_METRICS
            },
        }
        hists = [val_points(run, metric) for run in group]
        first = [h[0][val_key] if h else math.nan for h in hists]
        last = [h[-1][val_key] if h else math.nan for h in hists]
        entry["val_start"] = mean_ci(first, level)
        entry["val_end"] = mean_ci(last, level)
        entry["val_change"] = mean_ci(np.subtract(last, first, dtype=np.float64), level)  # 6.
        entry["val_format_ok_end"] = mean_ci([final_format_ok(run) for run in group], level)
        entry["credit_cos"] = mean_ci(  # None (older summaries, no credit) is left out
            [c if (c := run.get("credit_cos_to_grpo")) is not None else math.nan for run in group],
            level,
        )
        entry["wall_s"] = mean_ci(
            [run.get("rl_wall_s", run.get("wall_s", math.nan)) for run in group], level
        )
        entry["curves"] = {  # 3. interpolated curves
            x: interpolate_curves(
                [[h.get(x, math.nan) for h in hist] for hist in hists],
                [[h[val_key] for h in hist] for hist in hists],
                level,
            )
            for x in ("step", "wall_s")
        }
        ood = {}
        for name in held_out:  # 4. paired changes
            pairs = [
                (run[split][TRAIN_KEY].get(metric, math.nan), run[split][name].get(metric))
                for run in group
                if name in run[split] and run[split][name].get(metric) is not None
            ]
            tr = np.array([a for a, _ in pairs], dtype=np.float64)
            ho = np.array([b for _, b in pairs], dtype=np.float64)
            change = mean_ci(ho - tr, level)
            base = float(np.nanmean(tr)) if pairs else math.nan
            ood[name] = {
                "train": mean_ci(tr, level),
                "held_out": mean_ci(ho, level),
                "change": change,
                "change_pct": 100.0 * change[0] / base if pairs and base != 0 else math.nan,
            }
        entry["ood"] = ood
        labels[label] = entry
    if baseline == "auto":
        baseline = default_baseline(runs)
    paired = paired_differences(runs, baseline, split, metric, level) if baseline else {}
    efficiency = sample_efficiency(runs, baseline, metric, level) if baseline else {}
    return {
        "metric": metric,
        "split": split,
        "level": level,
        "held_out": held_out,
        "labels": labels,
        "baseline": baseline,
        "paired": paired,
        "efficiency": efficiency,
    }


# ----------------------------------------------------------------------------- rendering


def _num(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"


def render_markdown(agg: dict[str, Any]) -> str:
    """The markdown tables (a) per label, (b) out of distribution, (c) paired (with a baseline),
    (d) learning and (e) sample efficiency (with a baseline)."""
    metric, split = agg["metric"], agg["split"]
    pct = round(100 * agg["level"])
    lines = [
        f"## Results per method ({split} split, mean ± {pct}% t-interval half-width over seeds)",
        "",
        f"| label | seeds | {split} ndcg@10 | {split} recall@10 | {split} mrr "
        f"| val {metric} start -> end | RL wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, e in agg["labels"].items():
        cells = [format_ci(e["test"][m]) for m in TEST_METRICS]
        val = f"{_num(e['val_start'][0])} -> {_num(e['val_end'][0])}"
        lines.append(
            f"| {label} | {e['n']} | {' | '.join(cells)} | {val} | {_num(e['wall_s'][0], 0)} |"
        )
    lines += ["", f"## Out of distribution ({split} {metric}, held-out minus training retriever)"]
    lines.append("")
    if not agg["held_out"]:
        lines.append("No held-out retriever in the summaries (only the training retriever).")
    else:
        lines += _ood_rows(agg)
    if agg.get("baseline"):
        lines += _paired_rows(agg)
    lines += _learning_rows(agg)
    if agg.get("baseline"):
        lines += _efficiency_rows(agg)
    return "\n".join(lines) + "\n"


def _ood_rows(agg: dict[str, Any]) -> list[str]:
    """Rows of table (b)."""
    metric = agg["metric"]
    lines = [
        "| label | held-out retriever | seeds | training | held-out "
        "| held-out − training | relative |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, e in agg["labels"].items():
        for name in agg["held_out"]:
            o = e["ood"][name]
            if o["held_out"][2] == 0:
                lines.append(
                    f"| {label} | {name} | 0 | {format_ci(e['test'][metric])} | missing | n/a | n/a |"
                )
                continue
            rel = f"{o['change_pct']:+.1f}%" if math.isfinite(o["change_pct"]) else "n/a"
            lines.append(
                f"| {label} | {name} | {o['held_out'][2]} | {format_ci(o['train'])} | "
                f"{format_ci(o['held_out'])} | {format_ci(o['change'])} | {rel} |"
            )
    return lines


def _paired_rows(agg: dict[str, Any]) -> list[str]:
    """Heading and rows of table (c)."""
    metric, split, base = agg["metric"], agg["split"], agg["baseline"]
    pct = round(100 * agg["level"])
    lines = [
        "",
        f"## Paired against {base} (label minus {base} on the same seed, mean ± half-width)",
        "",
        f"| label | seeds | {split} ndcg@10 | relative | {split} recall@10 | {split} mrr "
        f"| val {metric} end | seeds with higher {split} {metric} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for label, p in agg["paired"].items():
        cells = [format_ci(p["test"][m], signed=True) for m in TEST_METRICS]
        rel = f"{p['rel_pct']:+.1f}%" if math.isfinite(p["rel_pct"]) else "n/a"
        cells.insert(1, rel)
        lines.append(
            f"| {label} | {p['n']} | {' | '.join(cells)} | {format_ci(p['val_end'], signed=True)} "
            f"| {p['wins']} of {p['n']} |"
        )
        mean, half, n = stat = p["test"].get(metric, (math.nan, math.nan, 0))
        side = interval_side(stat)
        if side == "no interval":
            diff = f"{mean:+.4f}" if math.isfinite(mean) else "n/a"
            verdicts.append(
                f"- {label}: {split} {metric} minus {base} = {diff} over {n} paired "
                f"seed{'s' if n != 1 else ''}: too few seeds for an interval."
            )
        else:
            verdicts.append(
                f"- {label}: {split} {metric} minus {base} = {mean:+.4f}, {pct}% interval "
                f"[{mean - half:+.4f}, {mean + half:+.4f}] over {n} paired seeds: "
                f"the interval {'lies ' if side != 'contains zero' else ''}{side}."
            )
    lines += [
        "",
        f"Relative: the mean difference of {split} {metric} in % of {base}'s mean over the "
        "same seeds. Where the paired interval of the difference lies:",
        "",
        *verdicts,
    ]
    return lines


def _learning_rows(agg: dict[str, Any]) -> list[str]:
    """Heading and rows of table (d)."""
    metric = agg["metric"]
    pct = round(100 * agg["level"])
    lines = [
        "",
        f"## Learning (validation {metric} over the RL run, mean over seeds; change: "
        f"end − start per seed, mean ± {pct}% half-width)",
        "",
        f"| label | seeds | val {metric} start -> end | end − start | val format_ok end "
        "| credit cos to grpo |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, e in agg["labels"].items():
        val = f"{_num(e['val_start'][0])} -> {_num(e['val_end'][0])}"
        cos_mean, _, cos_n = e["credit_cos"]
        cos = _num(cos_mean, 3) if cos_n else "n/a"
        if 0 < cos_n < e["n"]:
            cos += f" ({cos_n} of {e['n']} seeds)"
        lines.append(
            f"| {label} | {e['n']} | {val} | {format_ci(e['val_change'], signed=True)} "
            f"| {_num(e['val_format_ok_end'][0], 3)} | {cos} |"
        )
    return lines


def _efficiency_rows(agg: dict[str, Any]) -> list[str]:
    """Heading and rows of table (e)."""
    metric, base, eff = agg["metric"], agg["baseline"], agg["efficiency"]
    pct = round(100 * agg["level"])
    lines = ["", f"## Sample efficiency (steps to reach {base}'s final validation {metric})", ""]
    if not eff["labels"]:
        lines.append(f"No target: {base} has no validation {metric} point.")
        return lines
    lines += [
        f"Target: {eff['target']:.4f}, the final validation {metric} of {base} averaged over "
        f"its {eff['target_n']} seeds. A seed reaches it at its first validation point at or "
        "above it (no interpolation between validation points); steps and RL wall time are "
        f"mean ± {pct}% half-width over the seeds that reach it, the others are counted in "
        "'reached'.",
        "",
        "| label | reached | steps | RL wall (s) | step per seed |",
        "|---|---:|---:|---:|---|",
    ]
    for label, e in eff["labels"].items():
        per_seed = ", ".join(
            f"{seed}: {'never' if hit is None else f'{hit[0]:g}'}" for seed, hit in e["per_seed"]
        )
        lines.append(
            f"| {label} | {e['reached']} of {e['n']} | {format_ci(e['steps'], 0)} "
            f"| {format_ci(e['wall_s'], 0)} | {per_seed} |"
        )
    return lines


def check_labels(agg: dict[str, Any], labels: Sequence[str]) -> None:
    """Raise ValueError naming the labels of ``labels`` that the sweep ``agg`` does not have."""
    unknown = [lab for lab in labels if lab not in agg["labels"]]
    if unknown:
        raise ValueError(
            f"figure labels {unknown} not among the sweep's labels {sorted(agg['labels'])}"
        )


def plot(agg: dict[str, Any], path: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Validation metric against step and against wall time, mean + interval over seeds.

    With a baseline (``agg["paired"]``), a third panel shows each label minus the baseline on
    the same seed against step (the pairing removes the spread between seeds' warm-ups), and
    the step panel draws the sample-efficiency target (:func:`sample_efficiency`) dashed.
    ``labels`` draws only those labels (the baseline is drawn whenever it is there), so that
    a sweep with many variants can be shown as several readable figures; each label keeps
    its colour from the full set, so figures of one sweep agree.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is not None:
        check_labels(agg, labels)
    shown = set(agg["labels"] if labels is None else [*labels, agg.get("baseline")])
    paired = {k: v for k, v in (agg.get("paired") or {}).items() if k in shown}
    n_panels = 3 if agg.get("paired") else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 4), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour_of = {label: colours[j % len(colours)] for j, label in enumerate(agg["labels"])}

    def draw(ax: Any, c: dict[str, np.ndarray], label: str, legend: str, marker: bool) -> None:
        if c["x"].size == 0:
            return
        full = c["n"] == c["n"].max()  # the range every seed covers: no jumps in the mean
        x, mean, lo, hi = (c[k][full] for k in ("x", "mean", "lo", "hi"))
        colour = colour_of[label]
        ax.plot(x, mean, color=colour, marker="." if marker and x.size < 30 else None, label=legend)
        ok = np.isfinite(lo)
        if ok.any():
            ax.fill_between(x, lo, hi, where=ok, color=colour, alpha=0.2, linewidth=0)

    panels = (("step", "RL step"), ("wall_s", "RL wall time (s)"))
    target = (agg.get("efficiency") or {}).get("target", math.nan)
    for ax, (key, xlabel) in zip(axes[:2], panels, strict=True):
        for label, e in agg["labels"].items():
            if label in shown:
                draw(ax, e["curves"][key], label, f"{label} (n={e['n']})", key == "step")
        if key == "step" and math.isfinite(target):
            ax.axhline(
                target,
                color="grey",
                linestyle="--",
                linewidth=1,
                label=f"target: {agg['baseline']} final ({target:.3f})",
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"val {agg['metric']}")
        ax.grid(alpha=0.3)
    if agg.get("paired"):
        ax = axes[2]
        ax.axhline(0.0, color=colour_of.get(agg["baseline"], "grey"), linewidth=1)
        for label, p in paired.items():
            draw(ax, p["curve"], label, f"{label} (n={p['n']})", True)
        ax.set_xlabel("RL step")
        ax.set_ylabel(f"val {agg['metric']} minus {agg['baseline']} (same seed)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    pct = round(100 * agg["level"])
    fig.suptitle(f"Validation {agg['metric']}: mean over seeds, shaded {pct}% t-interval")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m ospo.report",
        description="Curves and tables over the seeds of a Hydra sweep (reads */summary.json).",
    )
    parser.add_argument("folder", help="the multirun folder (e.g. multirun/train/<date>_<time>)")
    parser.add_argument("--out", default=None, help="where to write report.png / report.md")
    parser.add_argument("--split", default="test", help="summary key of the test scores")
    parser.add_argument(
        "--baseline",
        default="auto",
        help="label the others are paired against (default: grpo if present; 'none' to skip)",
    )
    parser.add_argument(
        "--keep",
        default=None,
        help="also copy each job's summary.json to KEEP/<label>/seed<seed>/ (e.g. results/compare_shop)",
    )
    parser.add_argument(
        "--figure",
        action="append",
        default=[],
        metavar="NAME=LABEL[,LABEL...]",
        help="also write report-NAME.png with only these labels and the baseline (repeatable)",
    )
    parser.add_argument(
        "--group-by",
        default=None,
        metavar="KEY[,KEY...]",
        help="group runs by these dotted keys of summary.json instead of label (e.g. "
        "config.baseline.advantage.weighting, commit); runs without a key: '(missing)'",
    )
    args = parser.parse_args(argv)
    group_by = [k for k in (args.group_by or "").split(",") if k]
    if args.group_by is not None and not group_by:
        parser.error(f"--group-by {args.group_by!r}: expected KEY[,KEY...]")
    figures: dict[str, list[str]] = {}
    for spec in args.figure:
        name, _, labels = spec.partition("=")
        if not name or not labels:
            parser.error(f"--figure {spec!r}: expected NAME=LABEL[,LABEL...]")
        figures[name] = [lab for lab in labels.split(",") if lab]
    out = Path(args.out) if args.out else Path(args.folder)
    try:
        runs = load_runs(args.folder, split=args.split)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    if args.keep:
        kept = keep_summaries(runs, args.keep)
        print(f"kept {len(kept)} summaries under {args.keep}")
    baseline = None if args.baseline.lower() == "none" else args.baseline
    notes = []
    if group_by:
        runs = group_runs(runs, group_by)
        dups = duplicate_seeds(runs)
        if baseline == "auto":
            baseline = default_baseline(runs)
            if any(r.get("method") != "grpo" for r in runs if r["label"] == baseline):
                baseline = None
            if baseline and dups:
                notes.append(
                    "note: no paired tables, as some groups have several runs of a seed: "
                    + _seeds_text(dups)
                )
                baseline = None
        elif baseline and dups:
            parser.error(
                f"--baseline {baseline} pairs runs by seed, but some groups of --group-by "
                f"{args.group_by} have several runs of a seed: {_seeds_text(dups)}"
            )
    try:
        agg = aggregate(runs, split=args.split, baseline=baseline)
    except ValueError as err:
        parser.error(str(err))
    for name, labels in figures.items():  # before anything is written
        try:
            check_labels(agg, labels)
        except ValueError as err:
            parser.error(f"--figure {name}: {err}")
    markdown = render_markdown(agg)
    if group_by:
        markdown = (
            f"Groups: {' / '.join(group_by)} of summary.json (in place of label; "
            f"{MISSING_GROUP}: the summary lacks it).\n\n{markdown}"
        )
    older = older_runs(runs)
    if older:
        notes.append(
            f"note: {len(older)} of {len(runs)} runs are older summaries, without the "
            "overrides, config and commit that summary.json records now"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    written = [out / "report.md", plot(agg, out / "report.png")]
    for name, labels in figures.items():
        written.append(plot(agg, out / f"report-{name}.png", labels=labels))
    print(markdown, end="")
    for note in notes:
        print(note)
    print(f"wrote {', '.join(str(p) for p in written)} ({len(runs)} runs)")
    return markdown


if __name__ == "__main__":
    main()
