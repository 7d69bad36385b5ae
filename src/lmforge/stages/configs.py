"""Stage configs (pydantic only, no torch: the CLI imports them to build `--help`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

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
    """The prepared data (`lmforge data prepare`): train splits train, val splits validate."""

    dataset: Path | None = None
    """Prepared dataset directory (manifest.json and token shards)."""
    datasets: dict[str, Path] = Field(default_factory=dict)
    """Several named prepared datasets instead, mixed by `mix`, e.g. {domain: runs/med, general: runs/web}."""
    mix: dict[str, float] = Field(default_factory=dict)
    """Share of micro-batches from each of `datasets`, e.g. {domain: 0.8, general: 0.2} (replay against
    forgetting); normalised to sum to 1; empty: equal shares."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if self.dataset is not None and self.datasets:
            raise ValueError("give data.dataset or data.datasets (with data.mix), not both")
        if self.mix and set(self.mix) != set(self.datasets):
            raise ValueError(
                f"data.mix names {sorted(self.mix)} must be the data.datasets names {sorted(self.datasets)}"
            )
        return self

    def sources(self) -> dict[str, Path]:
        """Every dataset by name ("train" for a lone data.dataset)."""
        return dict(self.datasets) if self.datasets else ({"train": self.dataset} if self.dataset else {})

    def weights(self) -> dict[str, float]:
        """Each source's share of the micro-batches."""
        return dict(self.mix) if self.mix else dict.fromkeys(self.sources(), 1.0)


class PretrainConfig(StageConfig):
    """`lmforge pretrain`: model, data, loop and optimiser."""

    init_from_key: ClassVar[str | None] = "model.init_from"

    objective: Literal["clm", "mlm", "nsp", "mlm+nsp"] = "clm"
    """clm: next-token (decoders); mlm, nsp, mlm+nsp: BERT's masked-LM and next-sentence objectives (encoders)."""
    mlm_rate: float = Field(0.15, gt=0, lt=1)
    """mlm: share of tokens chosen for prediction (80% become [MASK], 10% a random token, 10% unchanged)."""
    model: ModelSection = Field(default_factory=ModelSection)
    """The model."""
    data: DataSection = Field(default_factory=DataSection)
    """The data."""
    train: LoopSection = Field(default_factory=LoopSection)
    """The training loop."""
    optim: OptimSection = Field(default_factory=OptimSection)
    """The optimiser and learning-rate schedule."""
    sample_prompt: str | None = "Once upon a time"
    """Decoders: prompt of the greedy text samples (null: none)."""
    sample_every: int = Field(0, ge=0)
    """Decoders: log a greedy sample every this many steps (0: only after training)."""
