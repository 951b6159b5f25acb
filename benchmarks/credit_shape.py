"""How far OSPO's token advantages are from GRPO's, for each weighting and clip setting
(docs/design.md sections 2.7-2.9).

Rollouts come from the warm-up policy of the default config (the cached warm-up folder that
`python train.py` writes), sampled as in training: `--batches` rollout steps of the training
schedule (B requests x G completions, `ospo.rollout.HFRollout` with the step's seed), rewards with
the format gate (`ospo.step.score`), credit with the configured segmenter and exact Owen
(`ospo.step.compute_credit`). Then every estimator setting below runs on the SAME rollouts and
credit, and for each one the table reports:

* `cos_to_grpo`: cosine between the batch's token advantages and GRPO's (A_i on every token),
  over completion tokens (`ospo.advantage.cos_to_grpo`, logged every step as
  `credit/cos_to_grpo`);
* `row_mean_err`: max over completions of |mean_t A_{i,t} - A_i| (0 when the shaping keeps
  which completion is better; clipping breaks it);
* `lift+`: in completions with A_i > 0, mean advantage on tokens of intent words over the mean
  on the other word tokens (> 1: the push goes to the right words);
* `blame-`: in completions with A_i < 0, mean |advantage| on tokens of non-intent words over
  the mean on intent-word tokens (> 1: the blame goes to the wrong words).

Intent words are the request's latent-intent words (embedded task only). Players are compared
too: one word per player (default), runs of up to two words (`max_phrase_words=2`), whole
phrases (`max_phrase_words=null`) and sentences (`segmenter=sentence`); a table gives the
players per completion of each, and the share of completions with a single player, where every
weighting gives GRPO's advantages exactly.

Last line: ``credit_cos_to_grpo=<default OSPO config's cosine on these rollouts>``.

    python benchmarks/credit_shape.py                  # 3 batches of 8 x 8
    python benchmarks/credit_shape.py --batches 1 --overrides rl.prompts_per_step=4
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from ospo.advantage import GRPO, OSPO, cos_to_grpo, group_advantages, token_credit  # noqa: E402
from ospo.build import (  # noqa: E402
    build_baseline,
    build_credit,
    build_data,
    build_reward,
    load_warm_policy,  # noqa: E402
)
from ospo.config import compose_config  # noqa: E402
from ospo.evaluate import autocast_for  # noqa: E402
from ospo.format import format_ok  # noqa: E402
from ospo.retriever import tokenize  # noqa: E402
from ospo.rollout import HFRollout  # noqa: E402
from ospo.segmenter import PhraseSegmenter, SentenceSegmenter  # noqa: E402
from ospo.sft import WARMUP_MARKER, warmup_dir  # noqa: E402
from ospo.step import PromptSchedule, Sampling, compute_credit, score, step_seed  # noqa: E402

SETTINGS: list[tuple[str, dict]] = [
    ("prop", {"weighting": "prop"}),
    ("rank", {"weighting": "rank"}),
    ("hybrid a=0.7 clip 2", {"weighting": "hybrid", "alpha": 0.7, "clip_kappa": 2.0}),
    ("hybrid a=0.7", {"weighting": "hybrid", "alpha": 0.7}),
    ("signed a=0.7 clip 2", {"weighting": "signed", "alpha": 0.7, "clip_kappa": 2.0}),
    ("signed a=0.7", {"weighting": "signed", "alpha": 0.7}),
    ("signed a=1.0", {"weighting": "signed", "alpha": 1.0}),
]


def intent_masks(texts, samples, segmentations, token_spans) -> list[np.ndarray]:
    """Per completion, (T_i,) +1 on tokens of intent-word players, -1 on tokens of other
    players, 0 on tokens of no player (EOS, punctuation)."""
    out = []
    for text, sample, seg, spans in zip(texts, samples, segmentations, token_spans, strict=True):
        intent = set(sample.intent_words or [])
        label = [1.0 if set(tokenize(t)) & intent else -1.0 for t in seg.texts(text)]  # (n,)
        credit, covered = token_credit(spans, seg.spans, label)  # (T_i,)
        out.append(np.where(covered.numpy(), credit.numpy(), 0.0))
    return out


def shape_metrics(adv: torch.Tensor, a: torch.Tensor, mask: torch.Tensor, labels) -> dict:
    """cos_to_grpo, row_mean_err, lift+ and blame- of advantages (N, T) (see the docstring)."""
    valid = mask.bool()
    row_err = max(
        abs(float(adv[i][valid[i]].mean()) - float(a[i])) for i in range(len(a)) if valid[i].any()
    )
    lift, blame = [], []
    for i, lab in enumerate(labels):
        row = adv[i][valid[i]].numpy()  # (T_i,)
        good, bad = row[lab > 0], row[lab < 0]
        if not len(good) or not len(bad) or a[i] == 0:
            continue
        if a[i] > 0 and bad.mean() != 0:
            lift.append(good.mean() / bad.mean())
        elif a[i] < 0 and good.mean() != 0:
            blame.append(np.abs(bad).mean() / np.abs(good).mean())
    return {
        "cos_to_grpo": cos_to_grpo(adv, a, mask),
        "row_mean_err": row_err,
        "lift+": float(np.median(lift)) if lift else float("nan"),
        "blame-": float(np.median(blame)) if blame else float("nan"),
        "n_lift": len(lift),
        "n_blame": len(blame),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="rollout steps to sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overrides", nargs="*", default=[], help="train.yaml overrides")
    args = parser.parse_args(argv)

    cfg = compose_config(args.overrides)
    pl.seed_everything(args.seed)
    data = build_data(cfg)
    reward = build_reward(cfg.retriever, cfg.reward, data.catalog)
    baseline = build_baseline(cfg)
    segmenter, attribution = build_credit(cfg, baseline)
    check = instantiate(cfg.format)
    init = warmup_dir(cfg)
    if not (init / WARMUP_MARKER).exists():
        raise FileNotFoundError(f"no warm-up at {init}: run `python train.py stage=sft` first")
    policy = load_warm_policy(cfg.model, init, cfg.trainer.precision).eval()
    sampling = Sampling(cfg.rl.max_new_tokens, cfg.rl.temperature, cfg.rl.top_p)
    G = cfg.rl.num_generations
    schedule = PromptSchedule(data.split("train"), cfg.rl.prompts_per_step, args.seed)
    players = {
        "words (default)": segmenter,
        "word pairs": PhraseSegmenter(max_phrase_words=2),
        "phrases": PhraseSegmenter(max_segments=8, max_phrase_words=None),
        "sentences": SentenceSegmenter(),
    }
    counts: dict[str, list[int]] = {pname: [] for pname in players}  # players per completion
    rows: dict[tuple[str, str], list[dict]] = {}
    default_cos = []
    for step in range(args.batches):
        prompts = schedule(step)
        samples = [s for s in prompts for _ in range(G)]
        with torch.no_grad(), autocast_for(cfg, policy):
            ro = HFRollout()(policy, prompts, G, sampling, step_seed(args.seed, step))
        ok = format_ok(ro.texts, ro.ended, check)
        r, _ = score(reward, ro.texts, samples, ok, cfg.rl.invalid_reward)  # (N,)
        a = group_advantages(r, G)  # (N,)
        mask = ro.completion_mask
        for pname, seg in players.items():
            credit = compute_credit(ro.texts, samples, seg, attribution, reward, True)
            counts[pname] += list(credit.segments)
            labels = intent_masks(ro.texts, samples, credit.segmentations, ro.token_spans)
            extra = {
                "token_spans": ro.token_spans,
                "segmentations": credit.segmentations,
                "phis": credit.phis,
            }
            grpo, _ = GRPO()(r, G, mask)
            rows.setdefault((pname, "grpo"), []).append(shape_metrics(grpo, a, mask, labels))
            for name, kw in SETTINGS:
                adv, _ = OSPO(**kw)(r, G, mask, **extra)
                rows.setdefault((pname, name), []).append(shape_metrics(adv, a, mask, labels))
            if seg is segmenter:
                players_n = credit.segments
                adv, _ = baseline.advantage(r, G, mask, **extra)
                default_cos.append(cos_to_grpo(adv, a, mask))
        print(
            f"batch {step}: reward mean {float(np.mean(r)):.3f}, format_ok {np.mean(ok):.2f}, "
            f"players/completion {np.mean(players_n):.1f}"
        )

    print(f"\n{args.batches} batches of {cfg.rl.prompts_per_step} x {G}; default: {baseline}")
    print("| players | weighting | cos_to_grpo | row_mean_err | lift+ | blame- |")
    print("|---|---|---:|---:|---:|---:|")
    for (pname, name), ms in rows.items():
        mean = {k: float(np.nanmean([m[k] for m in ms])) for k in ms[0]}
        print(
            f"| {pname} | {name} | {mean['cos_to_grpo']:.3f} | {mean['row_mean_err']:.3f} | "
            f"{mean['lift+']:.2f} | {mean['blame-']:.2f} |"
        )
    print("\n| players | per completion (mean) | completions with one player |")
    print("|---|---:|---:|")
    for pname, n in counts.items():
        print(f"| {pname} | {np.mean(n):.2f} | {np.mean(np.asarray(n) == 1):.0%} |")
    print(f"credit_cos_to_grpo={float(np.mean(default_cos)):.3f}")


if __name__ == "__main__":
    main()
