"""`rollout=vllm`: vLLM samples what the HF path samples, and follows the policy's updates.

The engine tests (slow) need the vllm extra (`bash scripts/setup.sh --vllm`) and are skipped
without it: SmolLM2-135M-Instruct in float32, as in training, and the tiny GPT-2. The unit
tests of the engine's start-up (environment, `max_model_len`, tensor parallelism) run
without vLLM.
"""

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from hydra.utils import instantiate
from transformers import GPT2Config, LlamaConfig

from ospo.build import build_data
from ospo.data.shop import ShopData
from ospo.evaluate import load_checkpoint_policy
from ospo.export import run_export
from ospo.policy import load_smollm2
from ospo.rl import run_train
from ospo.rollout import (
    DERIVED_MAX_MODEL_LEN,
    HFRollout,
    VLLMRollout,
    check_tensor_parallel,
    engine_max_model_len,
    max_positions,
    scoped_environ,
    start_vllm,
)
from ospo.step import Sampling

from .conftest import ROOT, TINY

try:
    import vllm
except ImportError:
    vllm = None

needs_vllm = pytest.mark.skipif(vllm is None, reason="the vllm extra is not installed")

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


@pytest.mark.slow
@needs_vllm
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


@pytest.mark.slow
@needs_vllm
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


@pytest.mark.slow
@needs_vllm
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


@pytest.mark.slow
@needs_vllm
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


@pytest.mark.slow
@needs_vllm
def test_tiny_policy_run_and_its_export_in_vllm(make_cfg, tmp_path):
    """Issue 23: `model=tiny rollout=vllm` (a GPT-2 of 256 positions) stopped with vLLM's
    "max_model_len (1024) is greater than the derived max_model_len"; the engine's length now
    follows the policy, for two RL steps. Its export opens in vLLM at the policy's length."""
    over = [
        *TINY,
        "rollout=vllm",
        "stage=rl",
        "rl.steps=2",
        "rl.val_every=2",
        "rl.val_size=2",
        "eval.size=2",
        "eval.batch_size=2",
    ]
    assert run_train(make_cfg(over), tmp_path / "run")["steps"] == 2
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    out = tmp_path / "exported"
    run_export(make_cfg([*over, f"ckpt_path={last}", f"out={out}"], name="export"))
    llm = start_vllm(model=str(out), dtype="float32", kv_cache_memory_bytes=2**28)
    try:
        assert llm.llm_engine.model_config.max_model_len == 256
    finally:
        del llm


# ---- the engine's start-up, without vLLM ---------------------------------------------------
START_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "RANK", "WORLD_SIZE")
INSECURE = "VLLM_ALLOW_INSECURE_SERIALIZATION"


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` module whose `LLM` records its arguments and the environment it
    started in (`starts`), and which, like vLLM's external launcher, writes a variable."""
    starts = []

    class LLM:
        def __init__(self, **kwargs):
            starts.append((kwargs, {k: os.environ.get(k) for k in (*START_ENV, INSECURE)}))
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

        def generate(self, *args, **kwargs):
            raise AssertionError("a batch that does not fit reached the engine")

    monkeypatch.setitem(
        sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=dict, starts=starts)
    )
    for key in (*START_ENV, INSECURE):
        monkeypatch.delenv(key, raising=False)
    return starts


def test_scoped_environ_puts_back_what_was_there(monkeypatch):
    monkeypatch.setenv("OSPO_TEST_SET", "before")
    monkeypatch.delenv("OSPO_TEST_ABSENT", raising=False)
    monkeypatch.setenv("OSPO_TEST_UNSET", "kept")
    values = {"OSPO_TEST_SET": "during", "OSPO_TEST_ABSENT": "during", "OSPO_TEST_UNSET": None}
    with scoped_environ(values):
        assert os.environ["OSPO_TEST_SET"] == os.environ["OSPO_TEST_ABSENT"] == "during"
        assert "OSPO_TEST_UNSET" not in os.environ
        os.environ["OSPO_TEST_ABSENT"] = "changed inside"  # as vLLM does with its own flags
    assert os.environ["OSPO_TEST_SET"] == "before" and os.environ["OSPO_TEST_UNSET"] == "kept"
    assert "OSPO_TEST_ABSENT" not in os.environ
    with pytest.raises(RuntimeError), scoped_environ({"OSPO_TEST_SET": "during"}):
        raise RuntimeError
    assert os.environ["OSPO_TEST_SET"] == "before"


def test_engine_start_sets_its_environment_and_puts_it_back(fake_vllm, monkeypatch):
    """The engine starts in-process with this rank's RANK and WORLD_SIZE (a stale RANK is
    corrected), and the environment is as before once it is up; with tensor parallelism the
    workers' serialization flag stays set, as vLLM checks it at every call."""
    monkeypatch.setenv("RANK", "7")  # left over by another launcher
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    start_vllm(model="m", distributed_executor_backend="external_launcher")
    seen = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "RANK": "1", "WORLD_SIZE": "2", INSECURE: None}
    assert fake_vllm[-1][1] == seen
    assert os.environ["RANK"] == "7"
    assert not {"VLLM_ENABLE_V1_MULTIPROCESSING", "WORLD_SIZE", INSECURE} & set(os.environ)
    start_vllm(model="m")  # one process: the rank variables are left alone
    assert fake_vllm[-1][1] == {**seen, "RANK": "7", "WORLD_SIZE": None}
    start_vllm(model="m", tensor_parallel_size=2)
    assert fake_vllm[-1][1][INSECURE] == "1" and os.environ[INSECURE] == "1"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ


def test_max_positions_of_a_model_config():
    assert max_positions(GPT2Config(n_positions=256)) == 256
    assert max_positions(types.SimpleNamespace(n_positions=256)) == 256  # GPT-2's own key
    assert max_positions(LlamaConfig(max_position_embeddings=8192)) == 8192
    assert max_positions(types.SimpleNamespace()) is None


def test_engine_max_model_len():
    """Derived: the policy's positions up to a cap, never less than a batch needs; explicit:
    honoured within the policy's positions and above what a batch needs; else an error
    naming the lengths and the key to change."""
    assert engine_max_model_len(256) == 256  # the tiny GPT-2
    assert engine_max_model_len(8192) == DERIVED_MAX_MODEL_LEN == 2048  # SmolLM2
    assert engine_max_model_len(None) == DERIVED_MAX_MODEL_LEN
    assert engine_max_model_len(256, 200, 16) == 256
    assert engine_max_model_len(8192, 3000, 40) == 3040
    assert engine_max_model_len(8192, 200, 16, requested=512) == 512
    assert engine_max_model_len(None, 200, 16, requested=4096) == 4096
    with pytest.raises(
        ValueError,
        match=r"the longest prompt \(250 tokens\) plus rl.max_new_tokens=16 is 266 tokens, "
        r"more than the policy's 256 positions .*: lower rl.max_new_tokens",
    ):
        engine_max_model_len(256, 250, 16)
    with pytest.raises(
        ValueError,
        match=r"rollout.max_model_len=1024 is more than the policy's 256 positions .*: set "
        r"rollout.max_model_len=null \(derived from the policy\) or at most 256",
    ):
        engine_max_model_len(256, requested=1024)
    with pytest.raises(
        ValueError,
        match=r"prompt \(600 tokens\) plus rl.max_new_tokens=40 is 640 tokens, more than "
        r"rollout.max_model_len=512: set rollout.max_model_len=null .* or at least 640",
    ):
        engine_max_model_len(8192, 600, 40, requested=512)
    with pytest.raises(ValueError, match="rollout.max_model_len=0: expected a positive"):
        engine_max_model_len(8192, requested=0)


def test_engine_length_follows_the_policy(fake_vllm, make_cfg):
    """Issue 23 without vLLM: the tiny GPT-2's engine gets its 256 positions (it got 1024,
    which vLLM refuses); an explicit length above them stops before the engine starts; a
    batch that does not fit stops before it reaches the engine."""
    shop = ShopData(num_products=300, num_train=16, num_val=4, num_test=4, seed=0)
    texts = list(shop.catalog.values())[:200]
    messages = [s.messages for s in shop.splits["train"][:2]]
    cfg = make_cfg(["model=tiny", "rollout=vllm"])
    policy = instantiate(cfg.model, texts=texts)
    engine = instantiate(cfg.rollout)
    try:
        engine.sync(policy, version=0)
        assert fake_vllm[-1][0]["max_model_len"] == engine.engine_max_model_len == 256
        with pytest.raises(ValueError, match=r"more than the policy's 256 positions"):
            engine.generate(policy, messages, 2, max_new_tokens=250)
    finally:
        engine.close()
    explicit = instantiate(make_cfg(["rollout=vllm", "rollout.max_model_len=1024"]).rollout)
    with pytest.raises(ValueError, match="rollout.max_model_len=1024 is more than the policy's"):
        explicit.sync(policy, version=0)
    assert len(fake_vllm) == 1  # refused before the engine started
    # the training prompts are checked before any engine starts (`run_train` calls this)
    fresh = instantiate(cfg.rollout)
    fresh.check_prompts(policy, shop.splits["train"], max_new_tokens=16)
    with pytest.raises(ValueError, match=r"the longest prompt \(\d+ tokens\) plus "):
        fresh.check_prompts(policy, shop.splits["train"], max_new_tokens=250)
    assert len(fake_vllm) == 1 and fresh.llm is None

    long = instantiate(make_cfg(["model=tiny", "model.n_positions=4096"]).model, texts=texts)
    engine = instantiate(cfg.rollout)
    try:
        engine.sync(long, version=0)
        assert fake_vllm[-1][0]["max_model_len"] == DERIVED_MAX_MODEL_LEN
        with pytest.raises(
            ValueError,
            match=r"more than the engine's derived max_model_len \(2048\): set "
            r"rollout.max_model_len=\d+ \(at most the policy's 4096\)",
        ):
            engine.generate(long, messages, 2, max_new_tokens=2040)
    finally:
        engine.close()


def test_tensor_parallel_engine_refused_under_ddp(monkeypatch):
    """`ospo.config.validate` refuses it from the config; the engine itself, from the
    process group, before the policy is saved or vLLM loads."""
    check_tensor_parallel(2, 1)
    check_tensor_parallel(1, 4)
    with pytest.raises(ValueError, match=r"rollout.tensor_parallel_size=2 with 4 training"):
        check_tensor_parallel(2, 4)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="not supported until it has been tested on GPUs"):
        VLLMRollout(tensor_parallel_size=2).sync(policy=None, version=0)
