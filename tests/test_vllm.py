"""`rollout=vllm`: vLLM samples what the HF path samples, and follows the policy's updates.

Needs the vllm extra (`bash scripts/setup.sh --vllm`); without it the module is skipped.
SmolLM2-135M-Instruct in float32, as in training; one engine per sync mode for the module.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="the vllm extra is not installed")

from ospo.build import build_data  # noqa: E402
from ospo.data.shop import ShopData  # noqa: E402
from ospo.evaluate import load_checkpoint_policy  # noqa: E402
from ospo.export import run_export  # noqa: E402
from ospo.policy import load_smollm2  # noqa: E402
from ospo.rl import run_train  # noqa: E402
from ospo.rollout import HFRollout, VLLMRollout, start_vllm  # noqa: E402
from ospo.step import Sampling  # noqa: E402

from .conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.slow

LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
MAX_NEW = 16


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smol")


@pytest.fixture(scope="module")
def requests():
    data = ShopData(num_products=300, num_train=16, num_val=4, num_test=4, seed=0)
    return data.splits["train"][:8]


def _policy(smol_dir):
    torch.manual_seed(0)
    return load_smollm2(cache_dir=smol_dir, lora=LORA).eval()


def _greedy(engine, policy, requests):
    """Greedy float32 completions (a policy built under bf16-mixed gets its float32 weights
    back for the call: `Policy.full_precision_frozen`)."""
    with policy.full_precision_frozen():
        return engine.generate(
            policy, [s.messages for s in requests], 1, MAX_NEW, do_sample=False, seed=0
        )


def _same(a, b) -> None:
    """The same rollouts, id for id: completions, masks, texts, spans, prompts."""
    assert a.texts == b.texts
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
    assert a.token_spans == b.token_spans and torch.equal(a.ended, b.ended)


def _large_step(policy, requests) -> None:
    """One optimizer step with a large learning rate, pushing every request towards one word,
    so the greedy completions change."""
    target = policy.tokenizer(" waterproof waterproof", add_special_tokens=False)["input_ids"]
    ids, mask = policy.encode_prompts([s.messages for s in requests])  # (B, P)
    completion = torch.tensor([target] * len(requests))  # (B, 2)
    policy.train()
    logp = policy.token_logprobs(ids, mask, completion, torch.ones_like(completion))  # (B, 2)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=5.0)
    (-logp.mean()).backward()
    opt.step()
    opt.zero_grad()
    policy.eval()


@pytest.mark.parametrize("sync", ["merged", "adapter"])
def test_vllm_greedy_matches_hf_before_and_after_an_update(smol_dir, requests, sync):
    policy = _policy(smol_dir)
    engine = VLLMRollout(sync=sync, cpu_kv_cache_gib=1, max_model_len=512)
    try:
        assert engine.sync(policy, version=0) > 0  # the engine starts from the policy
        before = _greedy(HFRollout(), policy, requests)
        _same(_greedy(engine, policy, requests), before)

        _large_step(policy, requests)
        after = _greedy(HFRollout(), policy, requests)
        assert after.texts != before.texts  # the update moved the greedy completions ...
        assert engine.sync(policy, version=0) == 0.0  # (same version: nothing to do)
        assert _greedy(engine, policy, requests).texts == before.texts  # ... not yet synced
        engine.sync(policy, version=1)
        _same(_greedy(engine, policy, requests), after)  # synced: vLLM follows the update
    finally:
        engine.close()


def test_vllm_sampling_is_seeded(smol_dir, requests):
    """Same step seed, same samples (a resumed run repeats); another seed, other samples;
    16 x 8 completions included (per-request seeds fail on CPU, the engine's generator
    does not)."""
    policy = load_smollm2(cache_dir=smol_dir)  # no LoRA: sync=merged copies full weights
    engine = VLLMRollout(cpu_kv_cache_gib=1, max_model_len=512)
    sampling = Sampling(max_new_tokens=MAX_NEW)
    try:
        engine.sync(policy, version=0)
        a = engine(policy, requests, 4, sampling, seed=123)
        b = engine(policy, requests, 4, sampling, seed=123)
        c = engine(policy, requests, 4, sampling, seed=124)
        _same(a, b)
        assert a.texts != c.texts
        assert len(a) == 32 and torch.equal(a.group, torch.arange(8).repeat_interleave(4))
        big = (requests * 2)[:16]
        x = engine(policy, big, 8, sampling, seed=7)
        y = engine(policy, big, 8, sampling, seed=7)
        assert len(x) == 128 and x.texts == y.texts
        # the rows of one request are distinct samples, not one sample repeated
        assert len(set(x.texts[:8])) > 1
    finally:
        engine.close()


def test_two_step_vllm_run_and_its_export_in_vllm(make_cfg, tmp_path, requests):
    """`python train.py rollout=vllm`: two RL steps write summary.json and a checkpoint; the
    checkpoint exported by `python -m ospo.export` gives vLLM the trained policy's greedy
    completions."""
    over = [
        "stage=rl",
        "logger=csv",
        "rollout=vllm",
        "rollout.max_model_len=512",
        "data.num_products=600",
        "rl.steps=2",
        "rl.prompts_per_step=2",
        "rl.num_generations=4",
        "rl.lr=1e-2",
        "rl.val_every=2",
        "rl.val_size=2",
        "rl.log_samples=1",
        "rl.ckpt_every=1",
        "eval.size=2",
        "eval.batch_size=2",
    ]
    cfg = make_cfg(over)
    summary = run_train(cfg, tmp_path / "run")
    assert summary["steps"] == 2
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["steps"] == 2 and "test" in saved
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["ospo"]["rollout_step"] == 2

    out = tmp_path / "exported"
    xcfg = make_cfg([*over, f"ckpt_path={last}", f"out={out}"], name="export", run_dir=tmp_path)
    run_export(xcfg)
    trained = load_checkpoint_policy(xcfg, last, build_data(xcfg)).eval()
    hf = _greedy(HFRollout(), trained, requests)
    llm = start_vllm(
        model=str(out), dtype="float32", max_model_len=512, kv_cache_memory_bytes=2**30
    )
    try:
        prompts = [
            {"prompt_token_ids": ids[m.bool()].tolist()}
            for ids, m in zip(*trained.encode_prompts([s.messages for s in requests]), strict=True)
        ]
        params = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_NEW, detokenize=False)
        outs = llm.generate(prompts, params, use_tqdm=False)  # stops at the exported EOS ids
        texts = [
            trained.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in outs
        ]
        assert texts == hf.texts
    finally:
        del llm


def test_ddp_one_engine_per_rank(tmp_path):
    """`trainer=ddp trainer.devices=2 rollout=vllm`: two CPU processes, each with its own
    engine in the ranks' process group (vLLM's external launcher)."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [
        "trainer=ddp",
        "trainer.devices=2",
        "rollout=vllm",
        "rollout.max_model_len=512",
        "stage=rl",
        "logger=csv",
        "data.num_products=600",
        "rl.steps=2",
        "rl.prompts_per_step=2",
        "rl.num_generations=4",
        "rl.val_every=2",
        "rl.val_size=2",
        "rl.log_samples=1",
        "eval.size=2",
        "eval.batch_size=2",
        f"hydra.run.dir={tmp_path}/run",
        f"cache_dir={tmp_path}/cache",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "MEMBER: 2/2" in out and out.count("external launcher for distributed inference") >= 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
