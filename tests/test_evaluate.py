"""The one evaluation path (ospo.evaluate.GreedyEvaluator), the one retrieval of a step
(Reward.evaluate), the step that train.py and the benchmarks build (ospo.build.build_step) and
the dense retriever's catalog cache."""

import numpy as np
import pytest
import torch

from ospo.build import build_data, build_policy, build_reward, build_step
from ospo.evaluate import GreedyEvaluator, build_evaluator
from ospo.format import FormatCheck, format_ok_rate
from ospo.retriever import BM25L
from ospo.reward import NDCG
from ospo.rollout import HFRollout

from .conftest import TINY


@pytest.fixture
def tiny_run(make_cfg):
    cfg = make_cfg(TINY)
    data = build_data(cfg)
    reward = build_reward(cfg.retriever, cfg.reward, data.catalog)
    return cfg, data, reward


def test_reward_evaluate_is_score_texts_and_metrics_from_one_retrieval(tiny_run, monkeypatch):
    _, data, reward = tiny_run
    samples = data.splits["val"][:6]
    texts = ["warm", "kids jacket", "", "waterproof warm", "warm", "red"]
    calls = []
    score = reward.retriever.score
    monkeypatch.setattr(reward.retriever, "score", lambda t: calls.append(len(t)) or score(t))
    r, metrics = reward.evaluate(texts, samples)
    assert calls == [6]  # one retrieval for the rewards and the logged metrics
    reward.clear_cache()
    assert np.array_equal(r, reward.score_texts(texts, samples))
    for k, v in reward.metrics(texts, samples).items():
        assert np.array_equal(metrics[k], v), k


def test_greedy_evaluator_scores_what_it_generates(tiny_run):
    cfg, data, reward = tiny_run
    policy = build_policy(cfg.model, data, cfg.trainer.precision)
    check = FormatCheck()
    ev = build_evaluator(cfg, reward, check)
    assert (ev.batch_size, ev.max_new_tokens) == (cfg.eval.batch_size, cfg.rl.max_new_tokens)
    samples = data.splits["val"][:6]
    out = ev(policy, samples)
    assert len(out.texts) == len(out.ended) == 6
    means = out.means()
    direct = reward.metrics(out.texts, samples)
    assert means["ndcg@10"] == pytest.approx(float(np.mean(direct["ndcg@10"])), abs=0)
    assert means["format_ok"] == pytest.approx(format_ok_rate(out.texts, out.ended, check), abs=0)
    # the same completions under another retriever
    other = BM25L()
    other.index(data.catalog)
    held = ev.with_retrievers(out.texts, out.ended, samples, {"bm25_l": NDCG(other)})
    assert held["bm25_l"]["ndcg@10"] == float(
        np.mean(NDCG(other).metrics(out.texts, samples)["ndcg@10"])
    )
    # batching does not change greedy completions of the tiny model here
    again = GreedyEvaluator(reward, check, cfg.rl.max_new_tokens, batch_size=2)(policy, samples)
    assert again.texts == out.texts


def test_build_step_is_the_training_step(make_cfg, tiny_run):
    """The step the benchmarks build carries the gate, format check, engine and credit of
    the config, as train.py's does."""
    cfg, data, reward = tiny_run
    cfg = make_cfg([*TINY, "rl.invalid_reward=-0.25", "baseline=ospo"])
    policy = build_policy(cfg.model, data)
    step = build_step(cfg, policy, reward)
    assert step.invalid_reward == -0.25 and step.format_check is not None
    assert type(step.engine) is HFRollout and step.baseline.needs_credit
    assert step.segmenter is not None and step.attribution is not None
    assert step.num_generations == cfg.rl.num_generations
    assert step.sampling.max_new_tokens == cfg.rl.max_new_tokens
    assert step.ref_policy is None  # beta = 0
    grpo = build_step(make_cfg([*TINY, "baseline=grpo", "baseline.loss.beta=0.1"]), policy, reward)
    assert grpo.ref_policy is not None and grpo.ref_policy is not policy
    assert not any(p.requires_grad for p in grpo.ref_policy.parameters())


@pytest.mark.slow
def test_dense_index_cache_holds_what_encoding_returns(tmp_path, monkeypatch):
    from ospo.retriever import Dense

    catalog = {f"p{i}": f"item {i} for kids with wheels under {i}" for i in range(12)}
    first = Dense(index_cache=str(tmp_path))
    first.index(catalog)
    files = list(tmp_path.glob("dense_*.npy"))
    assert len(files) == 1
    second = Dense(index_cache=str(tmp_path))
    monkeypatch.setattr(second, "_embed", lambda texts: pytest.fail("encoded again"))
    second.index(catalog)
    monkeypatch.undo()  # queries are encoded as usual
    assert np.array_equal(second._doc_emb, first._doc_emb)
    assert np.array_equal(second.score(["kids wheels"]), first.score(["kids wheels"]))
    third = Dense(index_cache=str(tmp_path))  # another catalog: another file
    third.index({**catalog, "p0": "something else"})
    assert len(list(tmp_path.glob("dense_*.npy"))) == 2
    assert torch.tensor(third._doc_emb).shape == torch.tensor(first._doc_emb).shape
