"""Where a training job's time goes, from its run folder: warm-up, each part of an RL step,
validation, test scoring and the rest (checkpoints, logging, the loop).

Reads what every run writes, so it profiles runs of older code too:

* `csv/version_*/metrics.csv` (`logger=csv`, as `experiment=compare_shop` sets): the step's own
  timers, `time/step_s`, `time/generate_s`, `time/sync_s`, `time/update_s` and
  `time/attribution_share` (credit seconds / step seconds); `time/reward_s` and
  `time/credit_s` where the code logs them;
* `summary.json`: `rl_wall_s` (RL, validations and test scoring) and `val_history`, whose
  `wall_s` stamps each validation's end; the seconds between two stamps minus the steps run
  between them are that validation (with any checkpoint written after those steps);
* `warmup.json` with `seconds` (written by a run that trained its warm-up).

    python train.py experiment=compare_shop baseline=ospo rl.steps=10 rl.val_every=10 \
        hydra.run.dir=outputs/profile
    python benchmarks/job_profile.py outputs/profile [more run folders, printed side by side]

Last line: ``rl_wall_s=<first run> [<second run> ratio=<second / first>]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path


def _float(x: str | None) -> float:
    try:
        return float(x) if x not in (None, "") else math.nan
    except ValueError:
        return math.nan


def step_rows(run: Path) -> list[dict[str, float]]:
    """One dict per training step from the run's CSV log (rows with `time/step_s`)."""
    files = sorted(run.glob("csv/version_*/metrics.csv"))
    if not files:
        raise SystemExit(f"{run}: no csv/version_*/metrics.csv (train with logger=csv)")
    rows = []
    with open(files[-1], newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("time/step_s"):
                rows.append({k: _float(v) for k, v in row.items() if k.startswith("time/")})
    return rows


def profile(run: Path) -> dict[str, float]:
    """Seconds per part of one job (totals over the job)."""
    summary = json.loads((run / "summary.json").read_text())
    steps = step_rows(run)
    total = {key: sum(r.get(key, 0.0) for r in steps) for key in steps[0]}
    step_s = total["time/step_s"]
    credit = total.get("time/credit_s")
    if credit is None or math.isnan(credit):
        credit = sum(r["time/attribution_share"] * r["time/step_s"] for r in steps)
    parts = {
        "steps": float(len(steps)),
        "rl step: generate": total["time/generate_s"],
        "rl step: engine sync": total.get("time/sync_s", 0.0),
        "rl step: credit": credit,
        "rl step: update (log-probs, loss, backward, optimizer)": total["time/update_s"],
    }
    parts["rl step: reward, advantages, rest"] = step_s - sum(
        v for k, v in parts.items() if k.startswith("rl step")
    )
    parts["rl steps, total"] = step_s
    hist = summary["val_history"]
    cum = [0.0]
    for r in steps:
        cum.append(cum[-1] + r["time/step_s"])
    val = hist[0]["wall_s"]  # the validation before RL (and the loop's start-up)
    for prev, cur in zip(hist, hist[1:], strict=False):
        val += cur["wall_s"] - prev["wall_s"] - (cum[int(cur["step"])] - cum[int(prev["step"])])
    parts["validation (+ checkpoints)"] = val
    parts["test scoring (all retrievers)"] = summary["rl_wall_s"] - hist[-1]["wall_s"]
    parts["rl_wall_s"] = summary["rl_wall_s"]
    warm = run / "warmup.json"
    seconds = json.loads(warm.read_text()).get("seconds") if warm.exists() else None
    parts["warm-up (train + check + save)"] = sum(seconds.values()) if seconds else math.nan
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (hydra.run.dir)")
    a = ap.parse_args()
    profiles = [profile(r) for r in a.runs]
    names = [r.name for r in a.runs]
    print("| part | " + " | ".join(names) + " |")
    print("|---" + "|---:" * len(names) + "|")
    for key in profiles[0]:
        cells = []
        for p in profiles:
            v = p.get(key, math.nan)
            cells.append("n/a" if math.isnan(v) else (f"{v:.0f}" if key == "steps" else f"{v:.1f}"))
        print(f"| {key} | " + " | ".join(cells) + " |")
    last = f"rl_wall_s={profiles[0]['rl_wall_s']:.1f}"
    if len(profiles) > 1:
        ratio = profiles[1]["rl_wall_s"] / profiles[0]["rl_wall_s"]
        last += f" {profiles[1]['rl_wall_s']:.1f} ratio={ratio:.3f}"
    print(last)


if __name__ == "__main__":
    main()
