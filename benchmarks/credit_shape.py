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
* `gap+`: in completions with A_i > 0, (mean advantage on tokens of intent words - mean on
  the other word tokens) / |A_i| (> 0: the push goes to the right words);
* `gap-`: the same in completions with A_i < 0 (> 0: the blame goes to the other words);
* `jitter`: max over tokens of |A_{i,t}(phi + noise) - A_{i,t}(phi)| / |A_i|, the noise uniform
  in +-1e-5 (far below what a retriever tells apart): how much a credit difference at noise
  level moves the advantages (continuous weightings: about 4e-5; min-max ones: up to 2).

Intent words are the request's latent-intent words (embedded task only). Players are compared
too: one word per player (default), runs of up to two words (`max_phrase_words=2`), whole
phrases (`max_phrase_words=null`) and sentences (`segmenter=sentence`); a table gives the
players per completion of each, and the share of completions with a single player, where every
weighting gives GRPO's advantages exactly.

Credit is computed as the step computes it: players are the words the training retriever reads,
coalitions keep the rest of the completion as context, and completions the format gate zeroed
get no credit (their A_i stays uniform). A last table counts the coalitions per batch of three
games: every word a player and every completion scored (the game before players were the words
the retriever reads), players the retriever reads, and that without the gated completions (the
step's game).

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
    ("hybrid a=0.7", {"weighting": "hybrid", "alpha": 0.7}),
    ("signed a=0.7", {"weighting": "signed", "alpha": 0.7}),
    ("signed a=1.0 (previous default)", {"weighting": "signed", "alpha": 1.0}),
    ("signed a=1.0 mass=segment", {"weighting": "signed", "alpha": 1.0, "mass": "segment"}),
    *[(f"relative l={x:g}", {"weighting": "relative", "strength": x}) for x in (1, 2, 4, 8)],
    ("relative l=4 mass=segment", {"weighting": "relative", "strength": 4.0, "mass": "segment"}),
    *[(f"additive l={x:g}", {"weighting": "additive", "strength": x}) for x in (1, 2, 4)],
]
JITTER = 1e-5  # credit noise of the `jitter` column


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
    """cos_to_grpo, row_mean_err, gap+ and gap- of advantages (N, T) (see the docstring)."""
    valid = mask.bool()
    row_err = max(
        abs(float(adv[i][valid[i]].mean()) - float(a[i])) for i in range(len(a)) if valid[i].any()
    )
    gaps: dict[bool, list[float]] = {True: [], False: []}
    for i, lab in enumerate(labels):
        row = adv[i][valid[i]].numpy()  # (T_i,)
        good, bad = row[lab > 0], row[lab < 0]
        if len(good) and len(bad) and a[i] != 0:
            gaps[bool(a[i] > 0)].append((good.mean() - bad.mean()) / abs(float(a[i])))
    return {
        "cos_to_grpo": cos_to_grpo(adv, a, mask),
        "row_mean_err": row_err,
        "gap+": float(np.median(gaps[True])) if gaps[True] else float("nan"),
        "gap-": float(np.median(gaps[False])) if gaps[False] else float("nan"),
    }


def jitter(estimator, r, G, mask, extra, rng) -> float:
    """max_(i,t) |A_it(phi + U(-JITTER, JITTER)) - A_it(phi)| / |A_i| over A_i != 0."""
    adv, _ = estimator(r, G, mask, **extra)
    noisy = [
        None if p is None else p + rng.uniform(-JITTER, JITTER, p.shape) for p in extra["phis"]
    ]
    moved, _ = estimator(r, G, mask, **{**extra, "phis": noisy})
    a = group_advantages(r, G)  # (N,)
    keep = a != 0
    if not keep.any():
        return 0.0
    return float(((moved - adv).abs().amax(1)[keep] / a[keep].abs()).max())


def every_word(segmenter):
    """The segmenter without the retriever's `reads`: every word a player."""
    return lambda text, reads=None: segmenter(text)


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
    games = {"every word, all completions": [], "read words, all": [], "the step's game": []}
    rng = np.random.default_rng(args.seed)
    for step in range(args.batches):
        prompts = schedule(step)
        samples = [s for s in prompts for _ in range(G)]
        with torch.no_grad(), autocast_for(cfg, policy):
            ro = HFRollout()(policy, prompts, G, sampling, step_seed(args.seed, step))
        ok = format_ok(ro.texts, ro.ended, check)
        r, _ = score(reward, ro.texts, samples, ok, cfg.rl.invalid_reward)  # (N,)
        a = group_advantages(r, G)  # (N,)
        mask = ro.completion_mask
        gated = ok if cfg.rl.invalid_reward is not None else None
        keep_query = baseline.keep_query
        for game, seg, scored in zip(
            games, (every_word(segmenter), segmenter, segmenter), (None, None, gated), strict=True
        ):
            credit = compute_credit(ro.texts, samples, seg, attribution, reward, keep_query, scored)
            games[game].append(credit.coalitions)
        for pname, seg in players.items():
            credit = compute_credit(ro.texts, samples, seg, attribution, reward, keep_query, gated)
            counts[pname] += list(credit.segments)
            labels = intent_masks(ro.texts, samples, credit.segmentations, ro.token_spans)
            extra = {
                "token_spans": ro.token_spans,
                "segmentations": credit.segmentations,
                "phis": credit.phis,
            }
            grpo, _ = GRPO()(r, G, mask)
            rows.setdefault((pname, "grpo"), []).append(
                {**shape_metrics(grpo, a, mask, labels), "jitter": 0.0}
            )
            for name, kw in SETTINGS:
                adv, _ = OSPO(**kw)(r, G, mask, **extra)
                metrics = shape_metrics(adv, a, mask, labels)
                metrics["jitter"] = jitter(OSPO(**kw), r, G, mask, extra, rng)
                rows.setdefault((pname, name), []).append(metrics)
            if seg is segmenter:
                players_n = credit.segments
                adv, _ = baseline.advantage(r, G, mask, **extra)
                default_cos.append(cos_to_grpo(adv, a, mask))
        print(
            f"batch {step}: reward mean {float(np.mean(r)):.3f}, format_ok {np.mean(ok):.2f}, "
            f"players/completion {np.mean(players_n):.1f}"
        )

    print(f"\n{args.batches} batches of {cfg.rl.prompts_per_step} x {G}; default: {baseline}")
    print("| players | weighting | cos_to_grpo | row_mean_err | gap+ | gap- | jitter |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (pname, name), ms in rows.items():
        mean = {k: float(np.nanmean([m[k] for m in ms])) for k in ms[0]}
        worst = max(m["jitter"] for m in ms)
        print(
            f"| {pname} | {name} | {mean['cos_to_grpo']:.3f} | {mean['row_mean_err']:.3f} | "
            f"{mean['gap+']:.2f} | {mean['gap-']:.2f} | {worst:.1e} |"
        )
    print("\n| players | per completion (mean) | completions with one player |")
    print("|---|---:|---:|")
    for pname, n in counts.items():
        print(f"| {pname} | {np.mean(n):.2f} | {np.mean(np.asarray(n) == 1):.0%} |")
    print("\n| game | coalitions per batch (mean) |")
    print("|---|---:|")
    for game, n in games.items():
        print(f"| {game} | {np.mean(n):,.0f} |")
    print(f"credit_cos_to_grpo={float(np.mean(default_cos)):.3f}")


if __name__ == "__main__":
    main()
