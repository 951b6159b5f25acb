"""ospo.report: loading summaries, statistics over seeds, markdown tables and the figure."""

import json
import math

import matplotlib.image
import numpy as np
import pytest

from ospo.report import (
    MISSING_GROUP,
    aggregate,
    duplicate_seeds,
    final_format_ok,
    group_runs,
    interpolate_curves,
    interval_side,
    keep_summaries,
    load_runs,
    main,
    mean_ci,
    older_runs,
    paired_differences,
    plot,
    relative_difference,
    render_markdown,
    sample_efficiency,
    steps_to_reach,
)

T_975_DF2 = 4.302652729911275  # Student t quantile 0.975 with 2 degrees of freedom


def _scores(ndcg, recall=0.5, mrr=0.4):
    return {"ndcg@10": ndcg, "recall@10": recall, "mrr": mrr, "format_ok": 1.0}


def _summary(label, seed, ndcg, recall, mrr, held_out=None, steps=(0, 10, 20), val=None):
    val = val or [0.1, 0.2, 0.3]
    test = {"train": _scores(ndcg, recall, mrr)}
    test.update({k: _scores(v) for k, v in (held_out or {}).items()})
    return {
        "label": label,
        "method": label.split("-")[0],
        "seed": seed,
        "steps": steps[-1],
        "wall_s": 100.0 + seed,  # whole job (a warm-up may be in it)
        "rl_wall_s": 60.0 + seed,
        "val_history": [
            {
                "step": s,
                "wall_s": 5.0 * s + seed,
                "val/ndcg@10": v,
                "val/recall@10": v,
                "val/mrr": v,
                "val/format_ok": 1.0,
            }
            for s, v in zip(steps, val, strict=True)
        ],
        "test": test,
    }


def _write(root, job, summary):
    folder = root / job
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path):
    """Three OSPO seeds (all held-out retrievers), two GRPO seeds (one without bm25_plus)."""
    root = tmp_path / "multirun"
    ospo = [(0.4, 0.6, 0.5), (0.5, 0.7, 0.6), (0.6, 0.8, 0.7)]
    for seed, (n, r, m) in enumerate(ospo):
        held = {"dense": n - 0.1 * (seed + 1), "bm25_plus": n}
        _write(root, str(seed), _summary("ospo-owen-phrase", seed, n, r, m, held))
    _write(
        root,
        "3",
        _summary("grpo", 0, 0.3, 0.5, 0.4, {"dense": 0.2, "bm25_plus": 0.3}, val=[0.1, 0.15, 0.2]),
    )
    _write(
        root,
        "4",
        _summary(
            "grpo",
            1,
            0.5,
            0.5,
            0.4,
            {"dense": 0.3},
            steps=(0, 10, 20, 30),
            val=[0.1, 0.2, 0.3, 0.4],
        ),
    )
    return root


def test_mean_ci_hand_computed():
    mean, half, n = mean_ci([0.4, 0.5, 0.6])
    assert (n, mean) == (3, pytest.approx(0.5))
    assert half == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))
    mean, half, n = mean_ci([0.7])
    assert (mean, n) == (0.7, 1) and math.isnan(half)
    mean, half, n = mean_ci([])
    assert n == 0 and math.isnan(mean) and math.isnan(half)
    mean, half, n = mean_ci([0.3, 0.5])  # t_{0.975,1} = 12.706
    assert half == pytest.approx(12.706204736 * math.sqrt(0.02) / math.sqrt(2), rel=1e-6)


def test_load_runs_finds_every_summary(sweep):
    runs = load_runs(sweep)
    assert len(runs) == 5
    assert all(r["path"].endswith("summary.json") for r in runs)


def test_keep_summaries_rebuilds_the_same_report(sweep, tmp_path):
    """Summaries kept in a results folder give the same tables as the sweep folder."""
    kept = keep_summaries(load_runs(sweep), tmp_path / "results")
    assert len(kept) == 5 and all(p.parent.name.startswith("seed") for p in kept)
    again = load_runs(tmp_path / "results")
    assert render_markdown(aggregate(again)) == render_markdown(aggregate(load_runs(sweep)))
    keep_summaries(load_runs(sweep)[:1], tmp_path / "results")  # re-kept: replaced, not added
    assert len(load_runs(tmp_path / "results")) == 5


def test_load_runs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no summary.json found below .*empty"):
        (tmp_path / "empty" / "job0").mkdir(parents=True)
        load_runs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_runs(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    (bad / "0").mkdir(parents=True)
    (bad / "0" / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_runs(bad)
    (bad / "0" / "summary.json").write_text(json.dumps({"label": "grpo"}))
    with pytest.raises(ValueError, match="lacks"):
        load_runs(bad)


def test_aggregate_numbers(sweep):
    agg = aggregate(load_runs(sweep))
    assert list(agg["labels"]) == ["grpo", "ospo-owen-phrase"]
    assert agg["held_out"] == ["bm25_plus", "dense"]
    e = agg["labels"]["ospo-owen-phrase"]
    assert e["n"] == 3 and sorted(e["seeds"]) == [0, 1, 2]
    mean, half, n = e["test"]["ndcg@10"]
    assert (mean, half, n) == (pytest.approx(0.5), pytest.approx(T_975_DF2 * 0.1 / 3**0.5), 3)
    assert e["test"]["recall@10"][0] == pytest.approx(0.7)
    assert e["test"]["mrr"][0] == pytest.approx(0.6)
    assert e["val_start"][0] == pytest.approx(0.1) and e["val_end"][0] == pytest.approx(0.3)
    assert e["wall_s"][0] == pytest.approx(61.0)  # RL time, not the whole job
    # dense changes are -0.1, -0.2, -0.3 (paired per seed): mean -0.2, s = 0.1
    d = e["ood"]["dense"]
    assert d["change"][0] == pytest.approx(-0.2)
    assert d["change"][1] == pytest.approx(T_975_DF2 * 0.1 / 3**0.5)
    assert d["change_pct"] == pytest.approx(-40.0)
    assert e["ood"]["bm25_plus"]["change"][0] == pytest.approx(0.0)
    g = agg["labels"]["grpo"]
    assert g["ood"]["bm25_plus"]["held_out"][2] == 1  # one seed lacks bm25_plus
    assert g["ood"]["bm25_plus"]["change"][0] == pytest.approx(0.0)
    assert math.isnan(g["ood"]["bm25_plus"]["change"][1])
    assert g["ood"]["dense"]["change"][0] == pytest.approx(-0.15)
    assert g["ood"]["dense"]["change_pct"] == pytest.approx(-37.5)


def test_markdown_table(sweep):
    md = render_markdown(aggregate(load_runs(sweep)))
    half = T_975_DF2 * 0.1 / 3**0.5
    row = next(line for line in md.splitlines() if line.startswith("| ospo-owen-phrase | 3 |"))
    assert f"0.5000 ± {half:.4f}" in row
    assert f"0.7000 ± {half:.4f}" in row and f"0.6000 ± {half:.4f}" in row
    assert "0.1000 -> 0.3000" in row and "| 61 |" in row
    dense = next(
        line for line in md.splitlines() if line.startswith("| ospo-owen-phrase | dense |")
    )
    assert f"-0.2000 ± {half:.4f}" in dense and "-40.0%" in dense
    lone = next(line for line in md.splitlines() if line.startswith("| grpo | bm25_plus |"))
    assert "| 1 |" in lone and "0.3000 ± n/a" in lone


def test_paired_against_baseline(sweep):
    runs = load_runs(sweep)
    p = paired_differences(runs, "grpo")
    assert list(p) == ["ospo-owen-phrase"]
    e = p["ospo-owen-phrase"]
    # seeds 0 and 1 are in both labels (seed 2 has no grpo run)
    assert sorted(e["seeds"]) == [0, 1] and e["n"] == 2
    # ndcg: 0.4 - 0.3 = 0.1 and 0.5 - 0.5 = 0.0 -> one win, mean 0.05, s = 0.0707
    assert e["wins"] == 1
    mean, half, n = e["test"]["ndcg@10"]
    assert (mean, n) == (pytest.approx(0.05), 2)
    assert half == pytest.approx(12.706204736 * 0.05, rel=1e-6)
    assert e["test"]["recall@10"][0] == pytest.approx(0.15)  # 0.1 and 0.2
    # final validation: ospo ends at 0.3 on both seeds, grpo at 0.2 and 0.4
    assert e["val_end"][0] == pytest.approx(0.0)
    agg = aggregate(runs)
    assert agg["baseline"] == "grpo" and agg["paired"]["ospo-owen-phrase"]["n"] == 2
    md = render_markdown(agg)
    row = next(line for line in md.splitlines() if line.startswith("| ospo-owen-phrase | 2 |"))
    assert "+0.0500 ± 0.6353" in row and "| 1 of 2 |" in row
    assert "Paired against" not in render_markdown(aggregate(runs, baseline=None))
    with pytest.raises(ValueError, match="'sft'.*grpo"):
        paired_differences(runs, "sft")


def test_single_seed_and_missing_held_out(tmp_path):
    _write(tmp_path, "0", _summary("grpo", 0, 0.3, 0.5, 0.4))
    agg = aggregate(load_runs(tmp_path))
    md = render_markdown(agg)
    assert "0.3000 ± n/a" in md
    assert "No held-out retriever" in md
    assert "| 60 |" in md  # RL wall time
    older = _summary("ospo", 0, 0.4, 0.5, 0.4, {"dense": 0.2})
    del older["rl_wall_s"]  # a summary without the RL time: the whole job's time is shown
    _write(tmp_path, "1", older)
    md = render_markdown(aggregate(load_runs(tmp_path)))
    assert "| 100 |" in next(line for line in md.splitlines() if line.startswith("| ospo | 1 |"))
    assert "| grpo | dense | 0 | 0.3000 ± n/a | missing | n/a | n/a |" in md


def test_interpolate_curves_union_grid():
    c = interpolate_curves([[0, 10, 20], [0, 20, 40]], [[0.0, 1.0, 2.0], [0.0, 2.0, 4.0]])
    np.testing.assert_allclose(c["x"], [0, 10, 20, 40])
    np.testing.assert_allclose(c["mean"], [0.0, 1.0, 2.0, 4.0])
    np.testing.assert_array_equal(c["n"], [2, 2, 2, 1])
    assert np.isnan(c["lo"][3]) and c["lo"][0] == pytest.approx(0.0)


def test_plot_and_cli(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    png = plot(aggregate(load_runs(sweep)), out / "fig.png")
    assert png.stat().st_size > 1000
    # with a baseline a third panel (paired difference) widens the figure by half
    two = plot(aggregate(load_runs(sweep), baseline=None), out / "two.png")
    width3, width2 = (matplotlib.image.imread(f).shape[1] for f in (png, two))
    assert width3 == pytest.approx(1.5 * width2, rel=0.02)
    md = main([str(sweep), "--out", str(out)])
    printed = capsys.readouterr().out
    assert md in printed
    assert (out / "report.md").read_text() == md
    assert (out / "report.png").stat().st_size > 1000
    main([str(sweep)])  # default out = the sweep folder
    assert (sweep / "report.png").exists() and (sweep / "report.md").exists()


def test_figure_of_some_labels(sweep, tmp_path, capsys):
    agg = aggregate(load_runs(sweep))
    others = [lab for lab in agg["labels"] if lab != agg["baseline"]]
    assert others, "the sweep fixture needs a label besides the baseline"
    full = plot(agg, tmp_path / "full.png")
    same = plot(agg, tmp_path / "same.png", labels=others)  # the baseline is always drawn
    alone = plot(agg, tmp_path / "alone.png", labels=[])  # the baseline alone
    assert same.read_bytes() == full.read_bytes() != alone.read_bytes()
    assert matplotlib.image.imread(alone).shape == matplotlib.image.imread(full).shape
    with pytest.raises(ValueError, match=r"\['ppo'\] not among"):
        plot(agg, tmp_path / "bad.png", labels=["ppo"])
    main([str(sweep), "--out", str(tmp_path), "--figure", f"main={others[0]}"])
    assert (tmp_path / "report-main.png").stat().st_size > 1000
    assert "report-main.png" in capsys.readouterr().out
    for bad, message in (("main", "expected NAME=LABEL"), ("x=ppo", "--figure x: figure labels")):
        with pytest.raises(SystemExit):
            main([str(sweep), "--out", str(tmp_path), "--figure", bad])
        assert message in capsys.readouterr().err


def test_cli_error_names_the_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path)])
    assert f"no summary.json found below {tmp_path}" in capsys.readouterr().err


def test_cli_unknown_baseline_names_it(sweep, capsys):
    with pytest.raises(SystemExit):
        main([str(sweep), "--baseline", "ppo"])
    assert "baseline label 'ppo' not among" in capsys.readouterr().err


@pytest.fixture
def asymmetric(tmp_path):
    """Three seeds of GRPO and of two methods whose paired differences are not symmetric around
    zero: OSPO beats GRPO by +0.10, +0.02, +0.05 (test ndcg@10); "mixed" by +0.10, -0.02, 0.
    Final validation: OSPO ends +0.10, +0.05, +0.15 above GRPO."""
    root = tmp_path / "asym"
    grpo = [0.30, 0.40, 0.50]
    for seed, g in enumerate(grpo):
        _write(root, f"g{seed}", _summary("grpo", seed, g, 0.5, 0.4, val=[0.1, 0.2, 0.3]))
    for seed, (d, v) in enumerate(zip([0.10, 0.02, 0.05], [0.40, 0.35, 0.45], strict=True)):
        ospo = _summary("ospo-owen-phrase", seed, grpo[seed] + d, 0.6, 0.3, val=[0.1, 0.2, v])
        _write(root, f"o{seed}", ospo)
    for seed, d in enumerate([0.10, -0.02, 0.0]):
        _write(root, f"m{seed}", _summary("mixed", seed, grpo[seed] + d, 0.5, 0.4))
    return root


def test_paired_differences_keep_their_sign(asymmetric):
    p = paired_differences(load_runs(asymmetric), "grpo")
    assert list(p) == ["mixed", "ospo-owen-phrase"]
    e = p["ospo-owen-phrase"]
    assert e["n"] == 3 and sorted(e["seeds"]) == [0, 1, 2]
    mean, half, n = e["test"]["ndcg@10"]
    diffs = np.array([0.10, 0.02, 0.05])
    assert mean > 0 and mean == pytest.approx(0.17 / 3)
    assert half == pytest.approx(T_975_DF2 * diffs.std(ddof=1) / math.sqrt(3))
    assert e["wins"] == 3
    assert e["test"]["recall@10"][0] == pytest.approx(0.1)  # 0.6 vs 0.5 on every seed
    assert e["test"]["mrr"][0] == pytest.approx(-0.1)  # 0.3 vs 0.4: a loss stays negative
    assert e["val_end"][0] == pytest.approx(0.1)  # +0.10, +0.05, +0.15
    curve = e["curve"]
    assert list(curve["x"]) == [0, 10, 20]
    np.testing.assert_allclose(curve["mean"], [0.0, 0.0, 0.1], atol=1e-12)
    m = p["mixed"]
    assert m["wins"] == 1  # neither -0.02 nor a tie is a win
    assert m["test"]["ndcg@10"][0] == pytest.approx(0.08 / 3)

    md = render_markdown(aggregate(load_runs(asymmetric)))
    paired = md.split("## Paired against grpo", 1)[1].splitlines()
    row = next(line for line in paired if line.startswith("| ospo-owen-phrase | 3 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == [
        f"+0.0567 ± {half:.4f}",
        "+14.2%",  # 0.0567 of grpo's mean 0.40
        "+0.1000 ± 0.0000",
        "-0.1000 ± 0.0000",
        f"+0.1000 ± {T_975_DF2 * 0.05 / math.sqrt(3):.4f}",
        "3 of 3",
    ]
    mixed = next(line for line in paired if line.startswith("| mixed | 3 |"))
    assert "| +0.0267 ±" in mixed and "| +6.7% |" in mixed and "| 1 of 3 |" in mixed
    assert p["ospo-owen-phrase"]["base_mean"] == pytest.approx(0.4)
    assert p["ospo-owen-phrase"]["rel_pct"] == pytest.approx(100 * (0.17 / 3) / 0.4)
    # diffs 0.10, 0.02, 0.05: half-width 0.100 > mean 0.057, so the interval contains zero
    assert (
        f"- ospo-owen-phrase: test ndcg@10 minus grpo = +0.0567, 95% interval "
        f"[{0.17 / 3 - half:+.4f}, {0.17 / 3 + half:+.4f}] over 3 paired seeds: "
        "the interval contains zero." in md
    )


def test_steps_to_reach_hand_computed():
    run = _summary("grpo", 1, 0.3, 0.5, 0.4, steps=(0, 10, 20, 30), val=[0.1, 0.2, 0.3, 0.4])
    # wall_s of a point is 5 * step + seed
    assert steps_to_reach(run, 0.3) == (20, 101.0)  # exactly on the point at step 20
    assert steps_to_reach(run, 0.25) == (20, 101.0)  # first point at or above, no interpolation
    assert steps_to_reach(run, (0.2 + 0.4) / 2) == (20, 101.0)  # 0.30000000000000004: rounding
    assert steps_to_reach(run, 0.41) is None  # never reached
    assert steps_to_reach(run, 0.1) == (0, 1.0)  # reached at step 0
    assert steps_to_reach(run, -1.0) == (0, 1.0)
    shuffled = dict(run, val_history=run["val_history"][::-1])  # taken in step order
    assert steps_to_reach(shuffled, 0.2) == (10, 51.0)
    del shuffled["val_history"][0]["wall_s"]  # step 30 without wall time
    step, wall = steps_to_reach(shuffled, 0.35)
    assert step == 30 and math.isnan(wall)
    assert steps_to_reach(dict(run, val_history=[]), 0.0) is None
    with pytest.raises(ValueError, match="target must be a finite ndcg@10"):
        steps_to_reach(run, math.nan)


def test_relative_difference_and_interval_side():
    assert relative_difference(0.05, 0.4) == pytest.approx(12.5)
    assert relative_difference(-0.1, 0.4) == pytest.approx(-25.0)
    assert math.isnan(relative_difference(0.1, 0.0))
    assert math.isnan(relative_difference(math.nan, 0.4))
    assert interval_side((0.05, 0.04, 3)) == "above zero"
    assert interval_side((-0.05, 0.04, 3)) == "below zero"
    assert interval_side((0.05, 0.06, 3)) == "contains zero"
    assert interval_side((0.05, 0.05, 3)) == "contains zero"  # an end at zero contains it
    assert interval_side((0.05, math.nan, 1)) == "no interval"
    assert interval_side((math.nan, math.nan, 0)) == "no interval"


def test_paired_verdict_lines(tmp_path):
    """Label 'up' beats grpo by 0.10, 0.11, 0.09; 'down' loses by as much; one 'lone' seed."""
    grpo = [0.30, 0.40, 0.50]
    for seed, (g, d) in enumerate(zip(grpo, [0.10, 0.11, 0.09], strict=True)):
        _write(tmp_path, f"g{seed}", _summary("grpo", seed, g, 0.5, 0.4))
        _write(tmp_path, f"u{seed}", _summary("up", seed, g + d, 0.5, 0.4))
        _write(tmp_path, f"d{seed}", _summary("down", seed, g - d, 0.5, 0.4))
    _write(tmp_path, "l0", _summary("lone", 0, 0.35, 0.5, 0.4))
    md = render_markdown(aggregate(load_runs(tmp_path)))
    half = T_975_DF2 * 0.01 / math.sqrt(3)  # s = 0.01
    assert (
        f"- up: test ndcg@10 minus grpo = +0.1000, 95% interval [{0.1 - half:+.4f}, "
        f"{0.1 + half:+.4f}] over 3 paired seeds: the interval lies above zero." in md
    )
    assert "over 3 paired seeds: the interval lies below zero." in md
    assert "| down | 3 | -0.1000 ± " in md and "| -25.0% |" in md  # -0.10 of grpo's 0.40
    assert (
        "- lone: test ndcg@10 minus grpo = +0.0500 over 1 paired seed: too few seeds for an "
        "interval." in md
    )
    assert "| lone | 1 | +0.0500 ± n/a | +16.7% |" in md  # 0.05 of grpo's seed-0 score 0.30


def test_sample_efficiency(sweep):
    """Target: grpo ends at 0.2 (seed 0) and 0.4 (seed 1), mean 0.3. grpo seed 1 hits 0.3 at
    step 20, seed 0 never does; every OSPO seed hits 0.3 at step 20 (wall 5 * 20 + seed)."""
    runs = load_runs(sweep)
    eff = sample_efficiency(runs, "grpo")
    assert eff["target"] == pytest.approx(0.3) and eff["target_n"] == 2
    g = eff["labels"]["grpo"]
    assert (g["n"], g["reached"]) == (2, 1)  # the seed that never reaches it is counted
    assert g["per_seed"] == [(0, None), (1, (20, 101.0))]
    assert g["steps"][:1] == (20.0,) and g["steps"][2] == 1 and math.isnan(g["steps"][1])
    o = eff["labels"]["ospo-owen-phrase"]
    assert (o["n"], o["reached"]) == (3, 3)
    assert o["steps"] == (20.0, 0.0, 3)
    assert o["wall_s"][0] == pytest.approx(101.0)
    assert o["wall_s"][1] == pytest.approx(T_975_DF2 * 1.0 / math.sqrt(3))  # 100, 101, 102
    agg = aggregate(runs)
    assert agg["efficiency"]["target"] == pytest.approx(0.3)
    assert aggregate(runs, baseline=None)["efficiency"] == {}
    md = render_markdown(agg)
    assert "Target: 0.3000, the final validation ndcg@10 of grpo averaged over its 2 seeds" in md
    assert "| grpo | 1 of 2 | 20 ± n/a | 101 ± n/a | 0: never, 1: 20 |" in md
    assert "| ospo-owen-phrase | 3 of 3 | 20 ± 0 | 101 ± 2 | 0: 20, 1: 20, 2: 20 |" in md
    assert "Sample efficiency" not in render_markdown(aggregate(runs, baseline=None))
    with pytest.raises(ValueError, match="'sft'.*grpo"):
        sample_efficiency(runs, "sft")
    no_val = [dict(r, val_history=[]) if r["label"] == "grpo" else r for r in runs]
    assert sample_efficiency(no_val, "grpo")["labels"] == {}
    assert "No target: grpo has no validation ndcg@10 point." in render_markdown(aggregate(no_val))


def test_learning_table(asymmetric):
    """OSPO validation: 0.1 -> 0.40, 0.35, 0.45, so the change is 0.30, 0.25, 0.35."""
    runs = load_runs(asymmetric)
    for run in runs:  # new summaries: format_ok and cosine to GRPO written by final_scores
        run["val_format_ok_end"] = {"grpo": 1.0, "mixed": 0.5}.get(
            run["label"], 0.8 + 0.05 * run["seed"]
        )
        run["credit_cos_to_grpo"] = 1.0 if run["label"] == "grpo" else 0.5 + 0.1 * run["seed"]
    mixed = [r for r in runs if r["label"] == "mixed"]
    mixed[0]["credit_cos_to_grpo"] = None  # a null cosine leaves the seed out of its mean
    del mixed[1]["credit_cos_to_grpo"]
    agg = aggregate(runs)
    o = agg["labels"]["ospo-owen-phrase"]
    mean, half, n = o["val_change"]
    assert (mean, n) == (pytest.approx(0.30), 3)
    assert half == pytest.approx(T_975_DF2 * 0.05 / math.sqrt(3))
    assert o["val_format_ok_end"][0] == pytest.approx(0.85)  # 0.80, 0.85, 0.90
    assert o["credit_cos"][0] == pytest.approx(0.6)  # 0.5, 0.6, 0.7
    assert agg["labels"]["mixed"]["credit_cos"] == (
        pytest.approx(0.7),
        pytest.approx(math.nan, nan_ok=True),
        1,
    )
    md = render_markdown(agg).split("## Learning", 1)[1]
    assert (
        f"| ospo-owen-phrase | 3 | 0.1000 -> 0.4000 | +0.3000 ± {half:.4f} | 0.850 | 0.600 |" in md
    )
    assert "| grpo | 3 | 0.1000 -> 0.3000 | +0.2000 ± 0.0000 | 1.000 | 1.000 |" in md
    assert (
        "| mixed | 3 | 0.1000 -> 0.3000 | +0.2000 ± 0.0000 | 0.500 | 0.700 (1 of 3 seeds) |" in md
    )


def test_old_summaries_lack_the_new_keys(tmp_path):
    """Older summaries: no val_format_ok_end (format_ok from the last validation point, or
    n/a without it) and no credit_cos_to_grpo (n/a)."""
    old = _summary("grpo", 0, 0.3, 0.5, 0.4, steps=(0, 10), val=[0.1, 0.2])
    old["val_history"][-1]["val/format_ok"] = 0.75
    assert final_format_ok(old) == 0.75
    older = _summary("ospo", 0, 0.4, 0.5, 0.4, steps=(0, 10), val=[0.1, 0.3])
    for h in older["val_history"]:
        del h["val/format_ok"]
    assert math.isnan(final_format_ok(older))
    assert final_format_ok(dict(older, val_format_ok_end=0.9)) == 0.9
    _write(tmp_path, "0", old)
    _write(tmp_path, "1", older)
    md = render_markdown(aggregate(load_runs(tmp_path)))
    learning = md.split("## Learning", 1)[1]
    assert "| grpo | 1 | 0.1000 -> 0.2000 | +0.1000 ± n/a | 0.750 | n/a |" in learning
    assert "| ospo | 1 | 0.1000 -> 0.3000 | +0.2000 ± n/a | n/a | n/a |" in learning
    assert "| ospo | 1 of 1 | 10 ± n/a | 50 ± n/a | 0: 10 |" in md  # target 0.2: grpo's end


def _weighted(label, seed, ndcg, weighting=None):
    """A summary with provenance whose config records `weighting` (no such key when None)."""
    summary = _summary(label, seed, ndcg, 0.5, 0.4)
    advantage = {"_target_": "ospo.advantage.OSPO"}
    if weighting is not None:
        advantage["weighting"] = weighting
    summary.update(
        overrides=[f"seed={seed}"],
        config={"seed": seed, "baseline": {"name": label, "advantage": advantage}},
        commit="0" * 40,
        dirty=False,
        versions={"python": "3.11.7"},
    )
    return summary


def test_group_by_a_nested_key(tmp_path, capsys):
    """Signed runs of 0.4, 0.6 and a rank run of 0.5 regroup across labels; GRPO runs lack the
    key and an older summary lacks the config: both go to "(missing)"."""
    root = tmp_path / "runs"
    _write(root, "a", _weighted("ospo-a", 0, 0.4, "signed"))
    _write(root, "b", _weighted("ospo-b", 1, 0.6, "signed"))
    _write(root, "c", _weighted("ospo-c", 0, 0.5, "rank"))
    _write(root, "g", _weighted("grpo", 0, 0.3))
    _write(root, "old", _summary("grpo", 1, 0.2, 0.5, 0.4))
    key = "config.baseline.advantage.weighting"
    runs = load_runs(root)
    grouped = group_runs(runs, [key])
    assert [r["label"] for r in grouped] == ["signed", "signed", "rank", MISSING_GROUP, "(missing)"]
    assert [r["label"] for r in runs] == ["ospo-a", "ospo-b", "ospo-c", "grpo", "grpo"]  # copies
    assert group_runs(runs, ["label", "seed"])[2]["label"] == "ospo-c / 0"
    assert group_runs(runs, ["config.seed"])[3]["label"] == "0"  # a number, as JSON
    assert group_runs(runs, ["dirty"])[0]["label"] == "false"
    agg = aggregate(grouped, baseline=None)
    assert sorted(agg["labels"]) == ["(missing)", "rank", "signed"]
    assert agg["labels"]["signed"]["test"]["ndcg@10"][:1] == (pytest.approx(0.5),)
    assert agg["labels"]["(missing)"]["seeds"] == [0, 1]

    md = main([str(root), "--out", str(tmp_path / "out"), "--group-by", key])
    assert md.startswith(f"Groups: {key} of summary.json")
    assert "| signed | 2 | 0.5000 ± " in md
    assert "| rank | 1 | 0.5000 ± n/a |" in md
    assert "| (missing) | 2 | 0.2500 ± " in md
    assert "## Paired against (missing)" in md  # the only group with GRPO runs, all GRPO
    # the default still groups by label
    assert "| grpo | 2 | 0.2500 ± " in main([str(root), "--out", str(tmp_path / "out")])
    capsys.readouterr()


def test_group_by_pairs_only_one_run_per_seed(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (0, 1):
        _write(root, f"g{seed}", _weighted("grpo", seed, 0.3))
        _write(root, f"o{seed}", _weighted("ospo", seed, 0.4, "signed"))
    out = str(tmp_path / "out")
    md = main([str(root), "--out", out, "--group-by", "baseline.name,config.baseline.name"])
    assert "| (missing) / grpo | 2 |" in md and "## Paired against (missing) / grpo" in md
    md = main([str(root), "--out", out, "--group-by", "config.baseline.name"])
    assert "## Paired against grpo" in md and "| ospo | 2 | +0.1000 ± 0.0000 |" in md
    by_commit = group_runs(load_runs(root), ["commit"])
    assert duplicate_seeds(by_commit) == {"0" * 40: [0, 1]}
    md = main([str(root), "--out", out, "--group-by", "commit", "--baseline", "none"])
    assert f"| {'0' * 40} | 4 |" in md
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([str(root), "--out", out, "--group-by", "commit", "--baseline", "0" * 40])
    assert "several runs of a seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(root), "--out", out, "--group-by", ","])
    assert "expected KEY[,KEY...]" in capsys.readouterr().err


def test_note_on_older_summaries(tmp_path, capsys):
    """Kept summaries marked older, and any without a commit, are counted in one printed line;
    the mark changes nothing else in the report."""
    root = tmp_path / "runs"
    _write(root, "new", _weighted("grpo", 0, 0.3))
    old = _summary("grpo", 1, 0.5, 0.5, 0.4)
    _write(root, "plain", old)
    out = str(tmp_path / "out")
    plain_md = main([str(root), "--out", out])
    marked = dict(old, provenance="older: made before summaries recorded overrides")
    (root / "plain" / "summary.json").write_text(json.dumps(marked))
    assert main([str(root), "--out", out]) == plain_md
    assert [r["seed"] for r in older_runs(load_runs(root))] == [1]
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert (
        notes
        == [
            "note: 1 of 2 runs are older summaries, without the overrides, config and commit "
            "that summary.json records now"
        ]
        * 2
    )
    (root / "plain" / "summary.json").unlink()
    (root / "plain").rmdir()
    main([str(root), "--out", out])
    assert "note:" not in capsys.readouterr().out
