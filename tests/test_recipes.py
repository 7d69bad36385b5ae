"""Every recipe in recipes/ resolves against its stage's config (a typo in a recipe fails here, not in a run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.stages.configs import AlignConfig, FinetuneConfig, PretrainConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
STAGES = {
    "pretrain": PretrainConfig,
    "sft": FinetuneConfig,
    "classify": FinetuneConfig,
    "reward": AlignConfig,
    "dpo": AlignConfig,
    "grpo": AlignConfig,
    "ppo": AlignConfig,
}  # by name prefix


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_resolves(recipe):
    stage = recipe.name.split("-")[0]  # sft-*, classify-*: `lmforge finetune` recipes
    assert stage in STAGES, f"{recipe.name}: recipe names start with their stage ({', '.join(STAGES)})"
    cfg = load_config(STAGES[stage], recipe, ["train.max_steps=3"])
    if isinstance(cfg, PretrainConfig):
        sources = cfg.data.sources()
    elif isinstance(cfg, AlignConfig):
        sources = [cfg.data.prompts if cfg.method in ("grpo", "ppo") else cfg.data.dataset]
        assert recipe.name.startswith(cfg.method), f"{recipe.name}: an align recipe is named after its method"
    else:
        sources = [cfg.data.dataset]
    assert cfg.train.max_steps == 3 and all(sources)


def test_world_recipes_are_what_the_demo_trains():
    """recipes/pretrain-world.yaml and sft-synthetic.yaml hold the settings the demo's pipeline trains with."""
    import yaml

    from lmforge.demo import RECIPE

    demo = yaml.safe_load(RECIPE.read_text())
    stages = {s["name"]: s["set"] for s in demo["stages"] if "set" in s}
    root = Path(__file__).resolve().parents[1] / "recipes"
    pretrain = load_config(PretrainConfig, root / "pretrain-world.yaml", [])
    ours = stages["pretrain"]
    assert pretrain.model.overrides == ours["model.overrides"] and pretrain.data.weights() == ours["data.mix"]
    assert pretrain.train.max_steps == demo["vars"]["pretrain_steps"] and pretrain.data.sampling == "shuffle"
    assert (pretrain.optim.lr, pretrain.train.seq_len) == (ours["optim"]["lr"], ours["train"]["seq_len"])
    sft = load_config(FinetuneConfig, root / "sft-synthetic.yaml", [])
    ours = stages["sft"]
    assert (sft.train.max_steps, sft.optim.lr, sft.method) == (
        demo["vars"]["sft_steps"],
        ours["optim"]["lr"],
        "lora",
    )
    assert (sft.lora.r, sft.lora.alpha) == (ours["lora"]["r"], ours["lora"]["alpha"])
