"""Every recipe in recipes/ resolves against its stage's config (a typo in a recipe fails here, not in a run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.stages.configs import FinetuneConfig, PretrainConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
STAGES = {"pretrain": PretrainConfig, "sft": FinetuneConfig, "classify": FinetuneConfig}  # by name prefix


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_resolves(recipe):
    stage = recipe.name.split("-")[0]  # sft-*, classify-*: `lmforge finetune` recipes
    assert stage in STAGES, f"{recipe.name}: recipe names start with their stage ({', '.join(STAGES)})"
    cfg = load_config(STAGES[stage], recipe, ["train.max_steps=3"])
    assert cfg.train.max_steps == 3 and cfg.data.dataset is not None
