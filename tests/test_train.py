"""End-to-end runs of the real config with the tiny policy: warm-up, RL, resume, eval, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ospo.evaluate import run_eval
from ospo.provenance import PACKAGES
from ospo.rl import run_train

from .conftest import ROOT, TINY

# TINY alone (G = 2) leaves every group flat: the tiny GPT-2's random words after a request
# rarely change BM25's top 10, so both completions of a request get the same reward, every
# advantage is 0 and nothing is learned (loss 0, no gradient). With G = 4 most steps hold a
# group with unequal rewards, so credit and optimizer state matter; the tests assert it.
INFORMATIVE = ["rl.num_generations=4"]


def _metrics(run_dir: Path) -> list[dict]:
    """The per-step training metrics the csv logger wrote, without timing columns."""
    import csv

    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    keep = (
        "train/reward_mean",
        "train/loss",
        "train/completion_length",
        "train/ndcg@10",
        "train/frac_reward_zero_std",
        "advantage/adv_abs_mean",
        "advantage/adv_std",
    )
    out = []
    for r in rows:
        if r.get("train/reward_mean"):
            out.append({k: round(float(r[k]), 6) for k in keep if r.get(k)})
    return out


def _informative_steps(run_dir: Path) -> list[int]:
    """The rollout steps (0-based, in log order) whose advantages were not all zero: some
    group had unequal rewards (`train/frac_reward_zero_std` < 1) and `advantage/adv_abs_mean`
    > 0. A run without any trains on nothing (zero loss, zero gradients)."""
    return [
        i
        for i, r in enumerate(_metrics(run_dir))
        if r["train/frac_reward_zero_std"] < 1.0 and r["advantage/adv_abs_mean"] > 0.0
    ]


def _policy_state(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """The policy weights a checkpoint holds."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}


def _logged_cos(run_dir: Path) -> list[float]:
    """`credit/cos_to_grpo` of the steps that logged one (those with an informative group)."""
    import csv

    out = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            out += [
                float(r["credit/cos_to_grpo"])
                for r in csv.DictReader(f)
                if r.get("credit/cos_to_grpo") and r["credit/cos_to_grpo"] != "nan"
            ]
    return out


def _cos_on_flat_steps(run_dir: Path) -> list[int]:
    """The steps (in log order) whose csv row holds a `credit/cos_to_grpo` although every group
    of the step was flat (`train/frac_reward_zero_std` 1): such a step must log NaN."""
    import csv

    rows = []
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("train/reward_mean")]
    return [
        i
        for i, r in enumerate(rows)
        if r.get("credit/cos_to_grpo") not in (None, "", "nan")
        and float(r["train/frac_reward_zero_std"]) == 1.0
    ]


def _check_run_cos(cos, run_dir: Path, grpo: bool = False, ranks: int = 1) -> None:
    """The summary's credit_cos_to_grpo is the mean of the logged per-step values (flat steps
    log NaN), None when no step logged one; GRPO's is 1 on every informative step. In one
    process a flat step's row holds no cos (under DDP rank 0's flat step may log the others')."""
    if ranks == 1:
        flat = _cos_on_flat_steps(run_dir)
        assert not flat, (
            f"flat steps {flat} logged a credit/cos_to_grpo value: they must log NaN (a key "
            "left out repeats an earlier step's value: Lightning re-logs an on_step key)"
        )
    logged = _logged_cos(run_dir)
    if not logged:
        assert cos is None
        return
    assert cos == pytest.approx(sum(logged) / len(logged))
    assert all(c == 1.0 for c in logged) if grpo else all(-1.0 <= c <= 1.0 for c in logged)


def test_tiny_run_end_to_end(make_cfg, tmp_path):
    cfg = make_cfg(TINY + INFORMATIVE)
    summary = run_train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    # it trained on something: a group with unequal rewards, and credit that moved advantage
    # between tokens (not GRPO's uniform A_i)
    assert _informative_steps(tmp_path / "run"), _metrics(tmp_path / "run")
    assert saved["credit_cos_to_grpo_steps"] > 0 and saved["credit_cos_to_grpo"] < 1.0
    # how it was made: overrides, resolved config, commit and versions
    assert saved["overrides"] == [*TINY, *INFORMATIVE, f"cache_dir={tmp_path / 'cache'}"]
    assert saved["config"]["model"] == OmegaConf.to_container(cfg.model, resolve=True)
    assert saved["config"]["rl"]["steps"] == 4
    assert saved["config"]["logger"]["csv"]["save_dir"] == str(tmp_path / "run")
    assert "hydra" not in saved["config"] and "${" not in json.dumps(saved["config"])
    assert saved["commit"] is None or len(saved["commit"]) == 40
    assert isinstance(saved["dirty"], bool) == (saved["commit"] is not None)
    assert saved["versions"]["torch"] == torch.__version__
    assert set(saved["versions"]) == {"python", *PACKAGES}
    for key in ("val_ndcg@10_start", "val_ndcg@10_end", "steps", "wall_s", "val_format_ok_end"):
        assert isinstance(saved[key], (int, float)), key
    _check_run_cos(saved["credit_cos_to_grpo"], tmp_path / "run")  # run mean, flat steps out
    assert saved["steps"] == 4 == summary["steps"]
    assert (tmp_path / "run" / "warmup.json").exists()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["ospo"]["rollout_step"] == 4
    assert list((tmp_path / "run" / "samples").glob("credit_step*.html"))
    assert len(_metrics(tmp_path / "run")) == 4

    # The warm-up is cached: a second run with the same settings skips it.
    cfg2 = make_cfg(TINY + ["rl.steps=1"], run_dir=tmp_path / "run2")
    run_train(cfg2, tmp_path / "run2")
    assert not (tmp_path / "run2" / "warmup.json").exists()

    # eval.py on the checkpoint: results.json and results.md, BM25 variants side by side.
    ecfg = make_cfg(
        TINY
        + [
            f"ckpt_path={last}",
            "~retriever@eval.retrievers.bm25_l",
            "~retriever@eval.retrievers.dense",
        ],
        name="eval",
        run_dir=tmp_path / "eval",
    )
    results = run_eval(ecfg, tmp_path / "eval")
    assert set(results["retrievers"]) == {"bm25", "qld"}
    assert (tmp_path / "eval" / "results.md").read_text().count("|") > 8
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["n"] == 4


@pytest.mark.parametrize(
    "method",
    [
        ["baseline.mu=2"],
        # random credit: its shuffles resume too. 16 tokens: more segments per completion, so
        # a permutation drawn from a wrongly restored generator changes the weights (with 8 a
        # fresh generator happened to shuffle the credit-bearing segments the same way)
        ["baseline=random_credit", "rl.max_new_tokens=16"],
    ],
    ids=lambda m: ",".join(m),
)
def test_resume_matches_straight_run(make_cfg, tmp_path, method):
    """4 steps straight = 2 steps, interrupted, resumed to 4: same metrics, same weights.

    Baseline OSPO (mu=2: AdamW moments and old log-probs) and its random-credit control (its
    permutation generator must resume). Only informative steps test this: the straight run
    must have a group with unequal rewards and credit that moves token advantages after the
    resume point (steps 2-3), else any state could be lost unnoticed."""
    method = [*INFORMATIVE, *method]
    straight = make_cfg(TINY + method, run_dir=tmp_path / "a")
    run_train(straight, tmp_path / "a")
    assert [s for s in _informative_steps(tmp_path / "a") if s >= 2], _metrics(tmp_path / "a")

    half = make_cfg(TINY + [*method, "rl.steps=4"], run_dir=tmp_path / "b")
    with pytest.MonkeyPatch.context() as mp:
        from ospo import module

        calls = {"n": 0}
        orig = module.RLModule.training_step

        def stop_after_two(self, batch, idx):
            if calls["n"] == 2:
                raise KeyboardInterrupt
            calls["n"] += 1
            return orig(self, batch, idx)

        mp.setattr(module.RLModule, "training_step", stop_after_two)
        try:
            run_train(half, tmp_path / "b")
        except (KeyboardInterrupt, SystemExit):
            pass
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    half_state = torch.load(ckpt, map_location="cpu", weights_only=False)["ospo"]
    assert half_state["rollout_step"] == 2
    w_half = _policy_state(ckpt)
    resumed = make_cfg(TINY + [*method, f"ckpt_path={ckpt}"], run_dir=tmp_path / "b")
    run_train(resumed, tmp_path / "b")
    straight_rows, resumed_rows = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert len(straight_rows) == 4
    assert straight_rows == resumed_rows
    # the weights after step 4, bit for bit, and moved since the interruption
    wa = _policy_state(tmp_path / "a" / "checkpoints" / "last.ckpt")
    wb = _policy_state(ckpt)
    assert wa and set(wa) == set(wb)
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []
    assert any(not torch.equal(wa[k], w_half[k]) for k in wa)
    state_a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)["ospo"]
    state_b = torch.load(ckpt, weights_only=False)["ospo"]
    # credit moved token advantages away from GRPO's after the resume point: the per-step
    # cos_to_grpo of the informative steps 2-3 (past the interrupted run's) has one below 1
    done = len(half_state["cos_to_grpo"])
    assert state_a["cos_to_grpo"][:done] == half_state["cos_to_grpo"]
    assert any(c < 1.0 for c in state_a["cos_to_grpo"][done:]), state_a["cos_to_grpo"]
    assert state_b["cos_to_grpo"] == state_a["cos_to_grpo"]
    # the random streams that live across steps end where the straight run's end
    rngs = sorted(k for k in state_a if k.endswith("_rng"))
    assert rngs == sorted(k for k in state_b if k.endswith("_rng"))
    assert [k for k in rngs if state_a[k] != state_b[k]] == []
    if "baseline=random_credit" in method:  # its permutations drew numbers after the resume
        assert state_a["advantage_rng"] != half_state["advantage_rng"]


def test_missing_checkpoint_is_named(make_cfg, tmp_path):
    cfg = make_cfg(TINY + ["ckpt_path=/nope/last.ckpt"], name="eval")
    with pytest.raises(FileNotFoundError, match="/nope/last.ckpt"):
        run_eval(cfg, tmp_path / "e")


def _run(args, cwd, timeout=900):
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_cli_sweep_and_wandb_offline(tmp_path):
    """`python train.py -m baseline=grpo,ospo seed=0,1`: four jobs, each with its own run."""
    over = [o for o in TINY if not o.startswith("logger")] + ["rl.steps=2", "rl.val_every=2"]
    _run(
        [
            str(ROOT / "train.py"),
            "-m",
            "baseline=grpo,ospo",
            "seed=0,1",
            *over,
            f"hydra.sweep.dir={tmp_path}/multi",
            f"cache_dir={tmp_path}/cache",
        ],
        cwd=tmp_path,
    )
    summaries = sorted((tmp_path / "multi").glob("*/summary.json"))
    assert len(summaries) == 4
    assert len(list((tmp_path / "multi").glob("*/wandb/offline-run-*"))) == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        ["attribution=owen", "segmenter=sentence"],
        ["attribution=shapley_mc"],
        ["attribution=shapley"],
        ["baseline=grpo"],
        ["baseline.advantage.weighting=hybrid", "baseline.advantage.alpha=0.7", "label=ospo-hyb"],
        ["reward=recall", "retriever=bm25_plus", "baseline.mu=2", "baseline.loss.beta=0.04"],
        ["data.completion=rewrite", "format=rewrite", "rl.max_new_tokens=12"],
        ["baseline=random_credit"],
        ["baseline=entropy"],
        ["rl.invalid_reward=0.0", "baseline.advantage.clip_kappa=2.0"],
        ["baseline=grpo", "baseline.loss.importance_level=sequence", "baseline.mu=2", *INFORMATIVE],
        ["baseline.loss.importance_level=sequence", "baseline.mu=2", *INFORMATIVE],
        ["baseline.loss.top_entropy_quantile=0.5", *INFORMATIVE],
    ],
    ids=lambda m: ",".join(m),
)
def test_method_variants_run(make_cfg, tmp_path, method):
    cfg = make_cfg(TINY + ["stage=rl", "rl.steps=2", *method])
    summary = run_train(cfg, tmp_path / "run")
    assert summary["steps"] == 2
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 2 and all(r["train/loss"] == r["train/loss"] for r in rows)  # no NaN
    named = [o.split("=", 1)[1] for o in method if o.startswith("label=")]
    label = summary["label"]
    assert label == named[0] if named else label.startswith(summary["method"])
    _check_run_cos(summary["credit_cos_to_grpo"], tmp_path / "run", "baseline=grpo" in method)


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel(tmp_path):
    over = [o for o in TINY if not o.startswith("logger")] + ["rl.steps=1", "stage=rl"]
    _run(
        [
            str(ROOT / "train.py"),
            "-m",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "baseline=grpo,ospo",
            *over,
            "logger=csv",
            f"hydra.sweep.dir={tmp_path}/multi",
            f"cache_dir={tmp_path}/cache",
        ],
        cwd=tmp_path,
    )
    assert len(list((tmp_path / "multi").glob("*/summary.json"))) == 2


@pytest.mark.slow
def test_smollm2_rl_step_end_to_end(make_cfg, tmp_path):
    """The real policy (converted from the PyPI GGUF) through one RL step and validation."""
    cfg = make_cfg(
        [
            "stage=rl",
            "logger=csv",
            "data.num_products=600",
            "rl.steps=1",
            "rl.prompts_per_step=2",
            "rl.num_generations=2",
            "rl.max_new_tokens=12",
            "rl.val_size=2",
            "rl.log_samples=1",
            "eval.size=2",
            "eval.batch_size=2",
        ]
    )
    summary = run_train(cfg, tmp_path / "run")
    assert summary["steps"] == 1
    rows = _metrics(tmp_path / "run")
    assert len(rows) == 1 and rows[0]["train/completion_length"] > 0
    assert list((tmp_path / "run" / "samples").glob("credit_step*.html"))


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    over = [o for o in TINY] + ["trainer=ddp", "trainer.devices=2", "rl.steps=2", "stage=rl"]
    proc = _run(
        [
            str(ROOT / "train.py"),
            *over,
            f"hydra.run.dir={tmp_path}/run",
            f"cache_dir={tmp_path}/cache",
        ],
        cwd=tmp_path,
    )
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # the second process joined
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    _check_run_cos(summary["credit_cos_to_grpo"], tmp_path / "run", ranks=2)  # rank mean
    # Each rank draws from its own generator, and the checkpoint keeps both for a resume.
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["ospo"]
    rank0, rank1 = state["attribution_rng_ranks"]
    assert rank0 == state["attribution_rng"] and rank0 != rank1
