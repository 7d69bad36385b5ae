"""The adapter kinds' config sections (pydantic only, no torch: stage configs embed them and the CLI imports
those to build `--help`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.config import Section

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                        "query", "key", "value", r"attention\.output\.dense", r"intermediate\.dense",
                        r"output\.dense"]  # fmt: skip


class LoraSection(Section):
    """LoRA: W x + (alpha / r) B A x on the chosen Linear layers, B zero at the start (PEFT's layout and keys)."""

    r: int = Field(8, ge=1)
    """Rank of the update B A."""
    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch's input during training."""
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """Regular expressions; a Linear is adapted when one matches the end of its qualified name
    (default: the attention and MLP projections of the decoders and BERT)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    dora: bool = False
    """DoRA: also learn each output row's magnitude of the updated weight."""


class BottleneckSection(Section):
    """Houlsby bottleneck adapters after each block's attention and MLP: x + up(act(down(x))), up zero at start."""

    size: int = Field(32, ge=1)
    """Bottleneck width."""
    activation: Literal["relu", "gelu", "silu"] = "gelu"
    """Non-linearity between the down and up projections."""


class PromptSection(Section):
    """Prompt tuning: learned virtual-token embeddings prepended to every input (PEFT's PROMPT_TUNING)."""

    num_virtual_tokens: int = Field(16, ge=1)
    """Number of learned vectors."""
    init_text: str | None = None
    """Initialise the vectors from this text's token embeddings (repeated to length); null: random tokens'."""
