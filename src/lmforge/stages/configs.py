"""Stage configs (pydantic only, no torch: the CLI imports them to build `--help`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmforge.config import Section, StageConfig
from lmforge.train.sections import LoopSection, OptimSection


class ModelSection(Section):
    """Which model to train: a preset built fresh, or an existing HF directory to continue from."""

    preset: str = "llama-14m"
    """Preset to build (vocabulary and special ids are taken from the dataset's tokenizer)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Preset fields to change, e.g. {num_hidden_layers: 4, hidden_size: 256}."""
    init_from: Path | None = None
    """Continue pretraining this HF model directory instead of building the preset."""


class DataSection(Section):
    """The prepared dataset (`lmforge data prepare`): its train split trains, its val split validates."""

    dataset: Path | None = None
    """Prepared dataset directory (manifest.json and token shards)."""


class PretrainConfig(StageConfig):
    """`lmforge pretrain`: model, data, loop and optimiser."""

    objective: Literal["clm"] = "clm"
    """Training objective (MLM/NSP pretraining comes with the encoder stage)."""
    model: ModelSection = Field(default_factory=ModelSection)
    """The model."""
    data: DataSection = Field(default_factory=DataSection)
    """The data."""
    train: LoopSection = Field(default_factory=LoopSection)
    """The training loop."""
    optim: OptimSection = Field(default_factory=OptimSection)
    """The optimiser and learning-rate schedule."""
    sample_prompt: str | None = "Once upon a time"
    """Prompt of the greedy text sample printed after training (null: none)."""
