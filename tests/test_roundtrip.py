"""Round trips through the files a run writes: train -> last.ckpt -> eval, interrupt -> resume,
LoRA warm-up folder -> RL checkpoint -> eval -> export, keep_query credit, and the warm-up
cache key."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ospo.build import build_data, build_reward, load_warm_policy
from ospo.evaluate import GreedyEvaluator, build_evaluator, load_checkpoint_policy, run_eval
from ospo.export import run_export
from ospo.module import RLModule
from ospo.policy import Policy
from ospo.rl import run_train
from ospo.sft import run_sft, warmup_dir
from ospo.step import compute_credit

from .conftest import CONF, TINY

LORA = "model.lora={r:4,alpha:8,dropout:0.0,target_modules:[c_attn]}"

# The tiny GPT-2's random words after a request rarely change BM25's top 10 (equal rewards, no
# update in two steps); as whole queries (the rewrite format) they do.
REWRITE = ["data.completion=rewrite", "format=rewrite", "rl.max_new_tokens=8"]


# ------------------------------------------------------------------ helpers
def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _policy_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The policy weights a checkpoint holds, under the policy's own key names."""
    return {
        k.removeprefix("policy."): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("policy.")
    }


def _fixed_batch(policy: Policy, samples, seed: int = 0):
    """Sampled completions (2 per request) to score every policy on the same token ids."""
    torch.manual_seed(seed)
    with policy.full_precision_frozen():
        return policy.generate(
            [s.messages for s in samples], num_generations=2, max_new_tokens=8, do_sample=True
        )


@torch.no_grad()
def _logprobs(policy: Policy, ro) -> torch.Tensor:
    """fp32 (no autocast) per-token log-probs of the fixed batch, (N, T)."""
    policy.eval()
    with policy.full_precision_frozen():
        return policy.token_logprobs(
            ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask
        )


def _stop_before_step(k: int):
    """A training_step that raises KeyboardInterrupt on its (k+1)-th call: k steps happen."""
    orig = RLModule.training_step
    calls = {"n": 0}

    def step(self, batch, idx):
        if calls["n"] == k:
            raise KeyboardInterrupt
        calls["n"] += 1
        return orig(self, batch, idx)

    return step


def _without_wall(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "wall_s"} for h in history]


# ------------------------------------------------------------------ a. train -> eval
@pytest.mark.slow
def test_eval_reloads_exactly_the_trained_weights(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(TINY + REWRITE + ["rl.steps=2"])
    summary = run_train(cfg, tmp_path / "run")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = _ckpt(last)
    data = build_data(cfg)

    # The warm-up folder the run used: recorded in the checkpoint, the summary and warmup.json,
    # and the one the config names.
    used = Path(ckpt["ospo"]["init"]["dir"])
    assert used == warmup_dir(cfg) == Path(summary["warmup_dir"])
    assert Path(json.loads((tmp_path / "run" / "warmup.json").read_text())["dir"]) == used

    # Full fine-tuning: the checkpoint holds every trainable weight, and eval reloads them bit
    # for bit; RL moved them away from the warm-up.
    saved = _policy_state(ckpt)
    loaded = load_checkpoint_policy(cfg, last, data)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert saved and set(saved) == trainable
    live = loaded.state_dict()
    for k, v in saved.items():
        assert torch.equal(live[k], v), k
    warm = load_warm_policy(cfg.model, used).state_dict()
    moved = [k for k, v in saved.items() if not torch.equal(warm[k], v)]
    assert moved, "RL left every weight at its warm-up value"
    # a checkpoint that lost its weights is refused, not silently scored as the warm-up
    empty = {**ckpt, "state_dict": {}}
    torch.save(empty, tmp_path / "empty.ckpt")
    with pytest.raises(ValueError, match="holds none of"):
        load_checkpoint_policy(cfg, tmp_path / "empty.ckpt", data)
    # the output layer stays tied to the embeddings (it is not saved on its own)
    assert torch.equal(loaded.lm_head.weight, live["model.transformer.wte.weight"])

    # eval.py with held-out retrievers composed by Hydra: qld, and a BM25 without length
    # normalisation (BM25+ ranks these short expansions as BM25 does). Each score is that
    # retriever's reward of the expansions eval wrote (sampled, so that they hold words the
    # retrievers can disagree on), with the reward built here from the retriever's own file.
    direct_cfgs = {
        "qld": OmegaConf.load(CONF / "retriever" / "qld.yaml"),
        "bm25_flat": OmegaConf.merge(OmegaConf.load(CONF / "retriever" / "bm25.yaml"), {"b": 0.0}),
    }
    generated = []
    orig_generate = Policy.generate

    def spy(self, *args, **kwargs):
        ro = orig_generate(self, *args, **kwargs)
        generated.append(ro)
        return ro

    monkeypatch.setattr(Policy, "generate", spy)
    ecfg = make_cfg(
        TINY
        + REWRITE
        + [
            f"ckpt_path={last}",
            "~retriever@eval.retrievers.bm25",
            "~retriever@eval.retrievers.bm25_l",
            "~retriever@eval.retrievers.dense",
            "+retriever@eval.retrievers.bm25_flat=bm25",
            "eval.retrievers.bm25_flat.b=0.0",
            "eval.size=8",
            "eval.do_sample=true",
        ],
        name="eval",
        run_dir=tmp_path / "eval",
    )
    results = run_eval(ecfg, tmp_path / "eval")
    monkeypatch.undo()
    assert list(results["retrievers"]) == ["qld", "bm25_flat"]  # eval.retrievers only
    rows = [
        json.loads(line)
        for line in (tmp_path / "eval" / "expansions.jsonl").read_text().splitlines()
    ]
    texts = [t for ro in generated for t in ro.texts]
    ended = [bool(e) for ro in generated for e in ro.ended]
    assert [r["expansion"] for r in rows] == texts and results["n"] == len(rows) == 8
    samples = data.splits["test"][:8]
    assert [r["qid"] for r in rows] == [s.qid for s in samples]
    assert any(t.split() for t in texts)
    fmt = instantiate(ecfg.format)
    direct = {}
    for name in ("qld", "bm25_flat"):
        reward = build_reward(direct_cfgs[name], ecfg.reward, data.catalog)
        direct[name] = GreedyEvaluator(reward, fmt, 8).score(texts, ended, samples)
        direct[name] = {k: float(np.mean(v)) for k, v in direct[name].items()}
        assert results["retrievers"][name] == pytest.approx(direct[name], abs=1e-12), name
    # ... which is not the training retriever's score of the same expansions
    training = build_reward(ecfg.retriever, ecfg.reward, data.catalog)
    ndcg = float(np.mean(training.metrics(texts, samples)["ndcg@10"]))
    assert ndcg != pytest.approx(direct["bm25_flat"]["ndcg@10"], abs=1e-9)


# ------------------------------------------------------------------ b. resume
@pytest.mark.slow
def test_resume_restores_weights_optimizer_and_schedule(make_cfg, tmp_path):
    """4 rollout steps straight vs 2 steps, interrupted, resumed to 4 from last.ckpt.

    From the untrained tiny model (stage=rl: the warm-up plays no part in resuming), mu=2 (two
    AdamW steps per rollout step, old log-probs kept) and Monte-Carlo Shapley (its generator is
    part of the checkpoint). Compared exactly (torch.equal), not allclose: in one process the
    two runs do the same float operations in the same order (each step reseeds sampling from
    (seed, step, rank); the checkpoint holds fp32 weights and moments), so any difference
    means some state was not restored.
    """
    over = TINY + REWRITE + ["stage=rl", "baseline.mu=2", "attribution=shapley_mc"]
    run_train(make_cfg(over, run_dir=tmp_path / "a"), tmp_path / "a")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RLModule, "training_step", _stop_before_step(2))
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            run_train(make_cfg(over, run_dir=tmp_path / "b"), tmp_path / "b")
    half_path = tmp_path / "b" / "checkpoints" / "last.ckpt"
    half = _ckpt(half_path)
    assert half["ospo"]["rollout_step"] == 2 and half["global_step"] == 4
    run_train(make_cfg(over + [f"ckpt_path={half_path}"], run_dir=tmp_path / "b"), tmp_path / "b")

    a = _ckpt(tmp_path / "a" / "checkpoints" / "last.ckpt")
    b = _ckpt(half_path)
    assert a["ospo"]["rollout_step"] == b["ospo"]["rollout_step"] == 4
    assert a["global_step"] == b["global_step"] == 8
    # Validation history: the straight run validated at steps 0, 2 and 4 (summary.json). The
    # resumed run agrees wherever both validated, but it lacks step 2 (a known gap): last.ckpt
    # is written at the end of step 2's batch, before step 2's validation, and a resumed run
    # does not repeat that validation. Likewise each last.ckpt lacks its own step's validation.
    hist_a = _without_wall(json.loads((tmp_path / "a" / "summary.json").read_text())["val_history"])
    hist_b = _without_wall(json.loads((tmp_path / "b" / "summary.json").read_text())["val_history"])
    assert [h["step"] for h in hist_a] == [0, 2, 4]
    assert hist_b[0] == hist_a[0] and hist_b[-1] == hist_a[-1]
    assert all(h in hist_a for h in hist_b)
    ckpt_a, ckpt_b = (
        _without_wall(a["ospo"]["val_history"]),
        _without_wall(b["ospo"]["val_history"]),
    )
    assert ckpt_b and all(h in ckpt_a for h in ckpt_b)
    assert a["ospo"]["attribution_rng"] == b["ospo"]["attribution_rng"]
    assert a["ospo"]["attribution_rng"] != half["ospo"]["attribution_rng"]  # credit drew numbers
    # Steps 3-4 trained on something the credit shaped: `cos_to_grpo` holds one value per step
    # with a group of unequal rewards (non-zero advantages), and one of those after the
    # interruption is below 1 (the credit moved token advantages away from GRPO's A_i).
    done = len(half["ospo"]["cos_to_grpo"])
    assert a["ospo"]["cos_to_grpo"][:done] == half["ospo"]["cos_to_grpo"]
    assert any(c < 1.0 for c in a["ospo"]["cos_to_grpo"][done:]), a["ospo"]["cos_to_grpo"]
    assert b["ospo"]["cos_to_grpo"] == a["ospo"]["cos_to_grpo"]

    # policy weights: identical, and not those of the interrupted run's step 2
    wa, wb, wh = _policy_state(a), _policy_state(b), _policy_state(half)
    assert wa and set(wa) == set(wb)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert any(not torch.equal(wa[k], wh[k]) for k in wa)

    # AdamW state: step count and both moments of every parameter
    (oa,), (ob,) = a["optimizer_states"], b["optimizer_states"]
    assert len(oa["state"]) == len(ob["state"]) == len(wa)
    for i, sa in oa["state"].items():
        sb = ob["state"][i]
        assert float(sa["step"]) == float(sb["step"]) == 8.0
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]), i
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"]), i
    assert [g["lr"] for g in oa["param_groups"]] == [g["lr"] for g in ob["param_groups"]]

    # LR schedule: same position (8 optimizer steps) and learning rate
    (sa,), (sb,) = a["lr_schedulers"], b["lr_schedulers"]
    assert sa["last_epoch"] == sb["last_epoch"] == 8
    assert sa["_step_count"] == sb["_step_count"] == 9
    assert sa["_last_lr"] == sb["_last_lr"]
    assert half["lr_schedulers"][0]["last_epoch"] == 4


# ------------------------------------------------------------------ c. LoRA
@pytest.mark.slow
def test_lora_warmup_folder_rl_checkpoint_and_eval(make_cfg, tmp_path, monkeypatch):
    # no LR warm-up and larger LRs, so that two steps of each stage move the adapters visibly
    cfg = make_cfg(
        TINY
        + REWRITE
        + [LORA, "sft.warmup_steps=0", "sft.lr=1e-2", "rl.steps=2", "rl.warmup_steps=0"]
        + ["rl.lr=1e-3"]
    )
    data = build_data(cfg)
    reward = build_reward(cfg.retriever, cfg.reward, data.catalog)

    saved_policies = []
    orig_save = Policy.save

    def spy_save(self, *args, **kwargs):
        saved_policies.append(self)
        return orig_save(self, *args, **kwargs)

    monkeypatch.setattr(Policy, "save", spy_save)
    evaluator = build_evaluator(cfg, reward, instantiate(cfg.format))
    folder = run_sft(cfg, data, evaluator, tmp_path / "run")
    monkeypatch.undo()
    assert folder == warmup_dir(cfg) and (folder / "warmup.json").exists()
    (sft_policy,) = saved_policies
    assert sft_policy.is_peft

    # merged weights, plain GPT-2 names: no adapter or base_layer keys
    files = sorted(folder.glob("*.safetensors"))
    assert [f.name for f in files] == ["model.safetensors"]
    with safe_open(str(files[0]), "pt") as f:
        keys = list(f.keys())
    assert "transformer.h.0.attn.c_attn.weight" in keys
    assert not [k for k in keys if "lora_" in k or "base_layer" in k]

    # the folder reproduces the warm-up policy (adapters merged, fresh adapters are zero)
    batch = _fixed_batch(sft_policy, data.splits["val"][:3])
    lp_sft = _logprobs(sft_policy, batch)
    with sft_policy.model.disable_adapter():
        lp_base = _logprobs(sft_policy, batch)
    assert (lp_sft - lp_base).abs().max() > 1e-3  # the warm-up adapters matter
    warm = load_warm_policy(cfg.model, folder)
    assert warm.is_peft
    # allclose, not equal: x W + (x A) B vs x (W + A B) round differently in float32
    torch.testing.assert_close(_logprobs(warm, batch), lp_sft, atol=1e-5, rtol=0)

    # RL from the cached warm-up; the checkpoint keeps only the trained adapters
    modules = []
    orig_setup = RLModule.setup

    def spy_setup(self, stage):
        modules.append(self)
        return orig_setup(self, stage)

    monkeypatch.setattr(RLModule, "setup", spy_setup)
    run_train(cfg, tmp_path / "run")
    monkeypatch.undo()
    trained = modules[-1].policy
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = _ckpt(last)
    assert Path(ckpt["ospo"]["init"]["dir"]) == folder  # RL started from the cached warm-up
    state = _policy_state(ckpt)
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert state and set(state) == trainable
    assert all("lora_" in k for k in state)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in state.items())  # RL moved them

    # eval.py's loaded policy = the policy RL ended with
    ecfg = make_cfg(TINY + REWRITE + [f"ckpt_path={last}"], name="eval", run_dir=tmp_path / "eval")
    loaded = load_checkpoint_policy(ecfg, last, data)
    assert loaded.is_peft
    lp_trained = _logprobs(trained, batch)
    assert torch.equal(_logprobs(loaded, batch), lp_trained)
    assert (lp_trained - lp_sft).abs().max() > 1e-4  # and it is not just the warm-up

    # python -m ospo.export: a merged folder that transformers opens as the trained policy
    out = tmp_path / "exported"
    over = TINY + REWRITE + [f"ckpt_path={last}", f"out={out}"]
    xcfg = make_cfg(over, name="export", run_dir=tmp_path / "export")
    assert run_export(xcfg) == out
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not hasattr(model, "peft_config")  # plain weights, adapters merged in
    assert tokenizer.chat_template == trained.tokenizer.chat_template
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert sorted(eos if isinstance(eos, list) else [eos]) == trained.eos_token_ids
    exported = Policy(model, tokenizer)
    torch.testing.assert_close(_logprobs(exported, batch), lp_trained, atol=1e-5, rtol=0)
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run_export(xcfg)


# ------------------------------------------------------------------ d. keep_query
CATALOG = {
    **{f"p{i:02d}": f"generic household item number {i}" for i in range(20)},
    "ski": "insulated waterproof ski jacket for kids",
    "boots": "warm winter snow boots for kids",
    "shoe": "lightweight running shoes for men",
    "mug": "ceramic coffee mug",
}
REQUEST = "running shoes for kids"  # finds the kids' products below a judged-irrelevant one
COMPLETION = "waterproof ski jacket, ceramic mug, warm gloves"
GAINS = {"ski": 1.0, "boots": 0.5, "shoe": 0.0}


@pytest.mark.parametrize("attribution", ["shapley", "owen"])
def test_keep_query_sets_the_empty_coalition(make_cfg, attribution):
    """Efficiency, sum(phi) = v(all) - v(empty), pins down v(empty): with keep_query it is the
    reward of the request alone (and every coalition is the request + its segments), without
    it the reward of the empty text (and a coalition is its segments alone)."""
    cfg = make_cfg([f"attribution={attribution}", "segmenter=phrase"])
    reward = build_reward(cfg.retriever, cfg.reward, CATALOG)
    segmenter, att = instantiate(cfg.segmenter), instantiate(cfg.attribution)
    sample = SimpleNamespace(qid="q", request=REQUEST, gains=GAINS, pool=None)
    seg = segmenter(COMPLETION)
    assert seg.n >= 3
    everything = " ".join(seg.texts(COMPLETION))

    def r(text: str) -> float:
        return float(reward.score_texts([text], [sample])[0])

    v_query, v_blank = r(REQUEST), r("")
    v_all_query, v_all = r(f"{REQUEST} {everything}"), r(everything)
    # the request alone already finds relevant products, the empty text none; neither
    # grand coalition is perfect (so the two games differ in v(all) as well)
    assert 0 < v_query < v_all_query < 1 and v_blank == 0 < v_all < 1

    phis = {}
    for keep in (True, False):
        reward.clear_cache()
        credit = compute_credit([COMPLETION], [sample], segmenter, att, reward, keep)
        (segm,), (phi,) = credit.segmentations, credit.phis
        assert segm.spans == seg.spans and phi.shape == (seg.n,)
        assert credit.segments == [seg.n] and credit.coalitions > 0
        phis[keep] = phi
    assert phis[True].sum() == pytest.approx(v_all_query - v_query, abs=1e-9)
    assert phis[False].sum() == pytest.approx(v_all - v_blank, abs=1e-9)
    assert not np.allclose(phis[True].sum(), phis[False].sum())
    assert (phis[True] < 0).any() and (phis[False] > 0).any()  # not a constant split

    # a one-player game: phi_0 = v({0}) - v(empty)
    text = "ski jacket"
    whole = type(seg)(spans=[(0, len(text))], unions=[[0]])
    for keep, v_empty, v_full in (
        (True, v_query, r(f"{REQUEST} {text}")),
        (False, v_blank, r(text)),
    ):
        reward.clear_cache()
        (phi,) = compute_credit(
            [text], [sample], lambda t, reads=None: whole, att, reward, keep
        ).phis
        assert phi.tolist() == pytest.approx([v_full - v_empty], abs=1e-9)
    assert r(text) - v_blank != pytest.approx(r(f"{REQUEST} {text}") - v_query)


@pytest.mark.slow
def test_keep_query_run_uses_the_request_as_base(make_cfg, tmp_path, monkeypatch):
    """A tiny OSPO run with keep_query=true: every coalition value starts from the request."""
    cfg = make_cfg(TINY + ["stage=rl", "rl.steps=2", "baseline.keep_query=true"])
    reward_cls = get_class(cfg.reward._target_)
    bases = []
    orig = reward_cls.coalition_value_fn

    def spy(self, text, segmentation, sample, base_text=""):
        bases.append((base_text, sample.request))
        return orig(self, text, segmentation, sample, base_text=base_text)

    monkeypatch.setattr(reward_cls, "coalition_value_fn", spy)
    summary = run_train(cfg, tmp_path / "run")
    assert summary["steps"] == 2
    assert bases and all(b == req and b for b, req in bases)


# ------------------------------------------------------------------ e. warm-up cache key
def _changed(value):
    """A different value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value else 0.01
    raise TypeError(f"no rule to change {value!r}")


def test_warmup_dir_is_keyed_by_every_warmup_setting(make_cfg, tmp_path):
    base = make_cfg(TINY)
    here = warmup_dir(base)
    assert here.parent == Path(base.cache_dir) / "warmup"
    assert warmup_dir(make_cfg(TINY, run_dir=tmp_path / "other")) == here  # stable

    keys = [k for k in base.sft if k != "init" and not OmegaConf.is_dict(base.sft[k])]
    assert {
        "steps",
        "batch_size",
        "lr",
        "weight_decay",
        "warmup_steps",
        "max_length",
        "min_format_ok",
        "min_lr_ratio",
    } <= set(keys)
    seen = {here}
    for key in keys:
        cfg = make_cfg(TINY + [f"sft.{key}={_changed(base.sft[key])}"])
        assert warmup_dir(cfg) not in seen, f"sft.{key} does not change the warm-up folder"
        seen.add(warmup_dir(cfg))
    for override in (
        "sft.optimizer._target_=torch.optim.Adam",  # the factories are part of the key too
        "sft.scheduler.num_warmup_steps=1",
        "data.num_products=601",
        "data.seed=1",
        "model.n_embd=32",
        "format.max_words=20",
        "seed=1",
    ):
        cfg = make_cfg(TINY + [override])
        assert warmup_dir(cfg) not in seen, f"{override} does not change the warm-up folder"
        seen.add(warmup_dir(cfg))
    # RL-only settings share the warm-up (GRPO and OSPO runs of a sweep start alike)
    for override in ("rl.lr=0.5", "rl.steps=7", "baseline=grpo", "attribution=shapley_mc"):
        assert warmup_dir(make_cfg(TINY + [override])) == here, override
    # sft.init names the folder outright
    init = tmp_path / "my_warmup"
    assert warmup_dir(make_cfg(TINY + [f"sft.init={init}"])) == init
