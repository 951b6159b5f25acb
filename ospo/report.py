"""Report of a Hydra sweep: learning curves and test tables over seeds (``python -m ospo.report``).

Usage::

    python -m ospo.report multirun/train/<date>_<time> [--out DIR]

Reads every ``*/summary.json`` below the folder (one per job, written by
:func:`ospo.rl.run_train`) and writes, into ``--out`` (default: the sweep folder):

* ``report.png``: validation NDCG@10 against RL step and against RL wall time (s), one line
  per method label (mean over seeds) with a shaded 95% t-interval over seeds, and, with a
  baseline, each label minus the baseline on the same seed against step;
* ``report.md`` (also printed): (a) per label, the number of seeds, final test NDCG@10 /
  recall@10 / MRR as mean +- 95% half-width, validation NDCG@10 start -> end, mean RL wall
  time (``rl_wall_s``: the job that runs a seed's shared warm-up pays for it in ``wall_s``,
  so the whole-job time would not compare methods);
  (b) out of distribution: per label and held-out retriever, test NDCG@10 with the training
  retriever and with the held-out one, and the change (held-out minus training, so a drop is
  negative; absolute with its interval over seeds, and relative in %);
  (c) paired against a baseline label (``grpo`` by default): per other label, its test metrics
  and final validation NDCG@10 minus the baseline's on the same seed, and on how many seeds it
  scored higher. Jobs of one seed share the warm-up, so the pairing removes the spread that
  the warm-up puts between seeds, which dominates the intervals of (a).

Statistics (numbered as in :func:`aggregate`):

1. Runs are grouped by ``label``; each seed is one observation.
2. Interval: mean +- t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation (ddof=1).
   One seed has no interval ("n/a").
3. Curves: each seed's (x, y) points are linearly interpolated onto the union of all seeds'
   x values, only inside that seed's own range (no extrapolation); at each grid point the mean
   and interval use the seeds covering it. The figure draws the points covered by the most
   seeds (normally all of them), so the mean does not jump where a seed's run ends.
4. Changes are paired per seed (held-out minus training on the same seed's completions); seeds
   missing a held-out retriever are left out of that retriever's row.
5. Paired differences (:func:`paired_differences`): per seed present in both labels, label
   minus baseline; mean and interval as in 2 over those seeds.

Pure functions: :func:`load_runs`, :func:`aggregate`, :func:`paired_differences`,
:func:`render_markdown`, :func:`plot`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ospo.metrics import mean_ci, t_quantile

__all__ = [
    "TEST_METRICS",
    "aggregate",
    "interpolate_curves",
    "load_runs",
    "main",
    "mean_ci",
    "paired_differences",
    "plot",
    "render_markdown",
    "t_quantile",
]

TEST_METRICS: tuple[str, ...] = ("ndcg@10", "recall@10", "mrr")
"""Test metrics of table (a), as keys of ``summary["test"][retriever]``."""

TRAIN_KEY = "train"
"""Key of the training retriever in ``summary["test"]``; the other keys are held out."""


# ----------------------------------------------------------------------------- loading


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


def paired_differences(
    runs: Sequence[dict[str, Any]],
    baseline: str,
    split: str = "test",
    metric: str = "ndcg@10",
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Per label other than ``baseline``: (label - baseline) on the same seeds (step 5).

    Returns {label: {"seeds": [...], "n", "wins" (seeds where the label's test ``metric`` is
    higher), "test": {m: (mean, half, n)} for m in TEST_METRICS, "val_end": (mean, half, n),
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

    def val_points(run: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        hist = [h for h in run["val_history"] if val_key in h and "step" in h]
        x = np.array([h["step"] for h in hist], dtype=np.float64)  # (V,)
        y = np.array([h[val_key] for h in hist], dtype=np.float64)  # (V,)
        order = np.argsort(x, kind="stable")
        return x[order], y[order]

    def val_end(run: dict[str, Any]) -> float:
        y = val_points(run)[1]
        return float(y[-1]) if y.size else math.nan

    def val_diff(run: dict[str, Any], ref: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        (xa, ya), (xb, yb) = val_points(run), val_points(ref)
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
        out[label] = {
            "seeds": seeds,
            "n": len(seeds),
            "wins": int((diffs[metric] > 0).sum()) if metric in diffs else 0,
            "test": {m: mean_ci(d, level) for m, d in diffs.items()},
            "val_end": mean_ci([val_end(a) - val_end(b) for a, b in pairs], level),
            "curve": interpolate_curves([x for x, _ in curves], [y for _, y in curves], level),
        }
    return out


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
    """Per-label statistics over seeds (see the module docstring, steps 1-5).

    Returns ``{"metric", "split", "level", "held_out": [retriever names, sorted],
    "labels": {label: {...}}, "baseline": label or None, "paired": {...}}``; ``baseline``
    "auto" picks :func:`default_baseline`, None skips (c), ``paired`` is
    :func:`paired_differences` (empty without a baseline). Per label: ``seeds`` (list),
    ``n``, ``test`` (metric -> (mean, half, n) with the training retriever), ``val_start`` /
    ``val_end`` / ``wall_s`` ((mean, half, n); ``wall_s`` is the RL wall time, ``rl_wall_s``,
    else ``wall_s`` for older summaries), ``curves`` ({"step": ..., "wall_s": ...} from
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
        hists = [[h for h in run["val_history"] if val_key in h and "step" in h] for run in group]
        first = [h[0][val_key] if h else math.nan for h in hists]
        last = [h[-1][val_key] if h else math.nan for h in hists]
        entry["val_start"] = mean_ci(first, level)
        entry["val_end"] = mean_ci(last, level)
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
    return {
        "metric": metric,
        "split": split,
        "level": level,
        "held_out": held_out,
        "labels": labels,
        "baseline": baseline,
        "paired": paired,
    }


# ----------------------------------------------------------------------------- rendering


def _fmt(stat: tuple[float, float, int], digits: int = 4, signed: bool = False) -> str:
    """'mean ± half' ('mean ± n/a' for one seed, 'n/a' for none); ``signed`` adds '+'."""
    mean, half, n = stat
    if n == 0 or not math.isfinite(mean):
        return "n/a"
    m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    if not math.isfinite(half):
        return f"{m} ± n/a"
    return f"{m} ± {half:.{digits}f}"


def _num(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"


def render_markdown(agg: dict[str, Any]) -> str:
    """The markdown tables (a) per label, (b) out of distribution, (c) paired (with a baseline)."""
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
        cells = [_fmt(e["test"][m]) for m in TEST_METRICS]
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
                    f"| {label} | {name} | 0 | {_fmt(e['test'][metric])} | missing | n/a | n/a |"
                )
                continue
            rel = f"{o['change_pct']:+.1f}%" if math.isfinite(o["change_pct"]) else "n/a"
            lines.append(
                f"| {label} | {name} | {o['held_out'][2]} | {_fmt(o['train'])} | "
                f"{_fmt(o['held_out'])} | {_fmt(o['change'])} | {rel} |"
            )
    return lines


def _paired_rows(agg: dict[str, Any]) -> list[str]:
    """Heading and rows of table (c)."""
    metric, split, base = agg["metric"], agg["split"], agg["baseline"]
    lines = [
        "",
        f"## Paired against {base} (label minus {base} on the same seed, mean ± half-width)",
        "",
        f"| label | seeds | {split} ndcg@10 | {split} recall@10 | {split} mrr "
        f"| val {metric} end | seeds with higher {split} {metric} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, p in agg["paired"].items():
        cells = [_fmt(p["test"][m], signed=True) for m in TEST_METRICS]
        lines.append(
            f"| {label} | {p['n']} | {' | '.join(cells)} | {_fmt(p['val_end'], signed=True)} "
            f"| {p['wins']} of {p['n']} |"
        )
    return lines


def plot(agg: dict[str, Any], path: str | Path) -> Path:
    """Validation metric against step and against wall time, mean + interval over seeds.

    With a baseline (``agg["paired"]``), a third panel shows each label minus the baseline on
    the same seed against step (the pairing removes the spread between seeds' warm-ups).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = agg.get("paired") or {}
    n_panels = 3 if paired else 2
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
    for ax, (key, xlabel) in zip(axes[:2], panels, strict=True):
        for label, e in agg["labels"].items():
            draw(ax, e["curves"][key], label, f"{label} (n={e['n']})", key == "step")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"val {agg['metric']}")
        ax.grid(alpha=0.3)
    if paired:
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
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.folder)
    try:
        runs = load_runs(args.folder, split=args.split)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    baseline = None if args.baseline.lower() == "none" else args.baseline
    try:
        agg = aggregate(runs, split=args.split, baseline=baseline)
    except ValueError as err:
        parser.error(str(err))
    markdown = render_markdown(agg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    plot(agg, out / "report.png")
    print(markdown, end="")
    print(f"wrote {out / 'report.md'} and {out / 'report.png'} ({len(runs)} runs)")
    return markdown


if __name__ == "__main__":
    main()
