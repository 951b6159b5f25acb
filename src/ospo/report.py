"""Report of a Hydra sweep: learning curves and test tables over seeds (``python -m ospo.report``).

Usage::

    python -m ospo.report multirun/train/<date>_<time> [--out DIR]

Reads every ``*/summary.json`` below the folder (one per job, written by
:func:`ospo.pipeline.run_train`) and writes, into ``--out`` (default: the sweep folder):

* ``report.png``: validation NDCG@10 against RL step and against wall time (s), one line per
  method label (mean over seeds) with a shaded 95% t-interval over seeds;
* ``report.md`` (also printed): (a) per label, the number of seeds, final test NDCG@10 /
  recall@10 / MRR as mean +- 95% half-width, validation NDCG@10 start -> end, mean wall time;
  (b) out of distribution: per label and held-out retriever, test NDCG@10 with the training
  retriever and with the held-out one, and the drop (held-out minus training; absolute with
  its interval over seeds, and relative in %).

Statistics (numbered as in :func:`aggregate`):

1. Runs are grouped by ``label``; each seed is one observation.
2. Interval: mean +- t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation (ddof=1).
   One seed has no interval ("n/a").
3. Curves: each seed's (x, y) points are linearly interpolated onto the union of all seeds'
   x values, only inside that seed's own range (no extrapolation); at each grid point the mean
   and interval use the seeds covering it. The figure draws the points covered by the most
   seeds (normally all of them), so the mean does not jump where a seed's run ends.
4. Drops are paired per seed (held-out minus training on the same seed's completions); seeds
   missing a held-out retriever are left out of that retriever's row.

Pure functions: :func:`load_runs`, :func:`aggregate`, :func:`render_markdown`, :func:`plot`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TEST_METRICS",
    "aggregate",
    "interpolate_curves",
    "load_runs",
    "main",
    "mean_ci",
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
            "job (written by ospo.pipeline.run_train when a training run finishes)"
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
                f"{path} lacks {missing}: expected a summary.json of ospo.pipeline.run_train "
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


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the two-sided t-interval, n) of the finite values.

    half = t_{(1+level)/2, n-1} * s / sqrt(n), s = sample std (ddof=1); NaN when n < 2.
    Mean is NaN when there is no finite value.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, n
    half = t_quantile(0.5 + level / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return mean, half, n


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


def aggregate(
    runs: Sequence[dict[str, Any]],
    split: str = "test",
    metric: str = "ndcg@10",
    level: float = 0.95,
) -> dict[str, Any]:
    """Per-label statistics over seeds (see the module docstring, steps 1-4).

    Returns ``{"metric", "split", "level", "held_out": [retriever names, sorted],
    "labels": {label: {...}}}``; per label: ``seeds`` (list), ``n``, ``test`` (metric ->
    (mean, half, n) with the training retriever), ``val_start`` / ``val_end`` / ``wall_s``
    ((mean, half, n)), ``curves`` ({"step": ..., "wall_s": ...} from
    :func:`interpolate_curves`) and ``ood`` (retriever -> {"train", "held_out", "drop":
    (mean, half, n) over the seeds having that retriever, "drop_pct": float}).
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
        entry["wall_s"] = mean_ci([run.get("wall_s", math.nan) for run in group], level)
        entry["curves"] = {  # 3. interpolated curves
            x: interpolate_curves(
                [[h.get(x, math.nan) for h in hist] for hist in hists],
                [[h[val_key] for h in hist] for hist in hists],
                level,
            )
            for x in ("step", "wall_s")
        }
        ood = {}
        for name in held_out:  # 4. paired drops
            pairs = [
                (run[split][TRAIN_KEY].get(metric, math.nan), run[split][name].get(metric))
                for run in group
                if name in run[split] and run[split][name].get(metric) is not None
            ]
            tr = np.array([a for a, _ in pairs], dtype=np.float64)
            ho = np.array([b for _, b in pairs], dtype=np.float64)
            drop = mean_ci(ho - tr, level)
            base = float(np.nanmean(tr)) if pairs else math.nan
            ood[name] = {
                "train": mean_ci(tr, level),
                "held_out": mean_ci(ho, level),
                "drop": drop,
                "drop_pct": 100.0 * drop[0] / base if pairs and base != 0 else math.nan,
            }
        entry["ood"] = ood
        labels[label] = entry
    return {
        "metric": metric,
        "split": split,
        "level": level,
        "held_out": held_out,
        "labels": labels,
    }


# ----------------------------------------------------------------------------- rendering


def _fmt(stat: tuple[float, float, int], digits: int = 4) -> str:
    """'mean ± half' ('mean ± n/a' for one seed, 'n/a' for none)."""
    mean, half, n = stat
    if n == 0 or not math.isfinite(mean):
        return "n/a"
    if not math.isfinite(half):
        return f"{mean:.{digits}f} ± n/a"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def _num(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"


def render_markdown(agg: dict[str, Any]) -> str:
    """The two markdown tables (a) per label and (b) out of distribution."""
    metric, split = agg["metric"], agg["split"]
    pct = round(100 * agg["level"])
    lines = [
        f"## Results per method ({split} split, mean ± {pct}% t-interval half-width over seeds)",
        "",
        f"| label | seeds | {split} ndcg@10 | {split} recall@10 | {split} mrr "
        f"| val {metric} start -> end | wall (s) |",
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
        return "\n".join(lines) + "\n"
    lines += [
        "| label | held-out retriever | seeds | training | held-out | drop | drop % |",
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
            pct_drop = f"{o['drop_pct']:+.1f}%" if math.isfinite(o["drop_pct"]) else "n/a"
            lines.append(
                f"| {label} | {name} | {o['held_out'][2]} | {_fmt(o['train'])} | "
                f"{_fmt(o['held_out'])} | {_fmt(o['drop'])} | {pct_drop} |"
            )
    return "\n".join(lines) + "\n"


def plot(agg: dict[str, Any], path: str | Path) -> Path:
    """Two panels: validation metric against step and against wall time, mean + interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    panels = (("step", "RL step"), ("wall_s", "wall time (s)"))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, xlabel) in zip(axes, panels, strict=True):
        for j, (label, e) in enumerate(agg["labels"].items()):
            c = e["curves"][key]
            if c["x"].size == 0:
                continue
            full = c["n"] == c["n"].max()  # the range every seed covers: no jumps in the mean
            x, mean, lo, hi = (c[k][full] for k in ("x", "mean", "lo", "hi"))
            colour = colours[j % len(colours)]
            ax.plot(
                x,
                mean,
                color=colour,
                marker="." if key == "step" and x.size < 30 else None,
                label=f"{label} (n={e['n']})",
            )
            ok = np.isfinite(lo)
            if ok.any():
                ax.fill_between(x, lo, hi, where=ok, color=colour, alpha=0.2, linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"val {agg['metric']}")
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
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.folder)
    try:
        runs = load_runs(args.folder, split=args.split)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    agg = aggregate(runs, split=args.split)
    markdown = render_markdown(agg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    plot(agg, out / "report.png")
    print(markdown, end="")
    print(f"wrote {out / 'report.md'} and {out / 'report.png'} ({len(runs)} runs)")
    return markdown


if __name__ == "__main__":
    main()
