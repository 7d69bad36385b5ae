"""Model configurations (field names follow Hugging Face's `config.json`) and the presets, in one place."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmforge.config import validation_message
from lmforge.errors import LmforgeError

DecoderType = Literal["llama", "mistral", "qwen2", "qwen3"]
LayerType = Literal["full_attention", "sliding_attention"]


class DecoderConfig(BaseModel):
    """A Llama-family decoder: Llama 2/3, Mistral, Qwen2, Qwen3 and SmolLM (a Llama with tied embeddings)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    model_type: DecoderType = "llama"
    """Family, as in HF's `config.json`; decides the `architectures` entry on save."""
    vocab_size: int = Field(8192, ge=1)
    """Number of token ids the embedding and output layers cover."""
    hidden_size: int = Field(384, ge=1)
    """Width of the residual stream (d_model)."""
    intermediate_size: int = Field(1024, ge=1)
    """Width of the SwiGLU MLP's hidden layer."""
    num_hidden_layers: int = Field(6, ge=1)
    """Number of transformer blocks."""
    num_attention_heads: int = Field(6, ge=1)
    """Number of query heads."""
    num_key_value_heads: int | None = Field(None, ge=1)
    """Number of key/value heads (grouped-query attention); defaults to num_attention_heads."""
    head_dim: int | None = Field(None, ge=1)
    """Width of one head; defaults to hidden_size // num_attention_heads (Qwen3 sets it explicitly)."""
    max_position_embeddings: int = Field(2048, ge=1)
    """Context length the model was trained for."""
    rms_norm_eps: float = Field(1e-6, gt=0)
    """Epsilon of every RMSNorm."""
    rope_theta: float = Field(10000.0, gt=0)
    """Base of the rotary position embedding frequencies."""
    rope_scaling: dict | None = None
    """RoPE frequency scaling, HF's format; supported: {'rope_type': 'llama3', 'factor', 'low_freq_factor',
    'high_freq_factor', 'original_max_position_embeddings'}."""
    attention_bias: bool = False
    """Bias on the q/k/v projections (Llama's flag also covers o_proj; Qwen2 has it on q/k/v only)."""
    o_proj_bias: bool = False
    """Bias on the attention output projection."""
    mlp_bias: bool = False
    """Bias on the MLP projections."""
    qk_norm: bool = False
    """RMSNorm on each query and key head before RoPE (Qwen3)."""
    sliding_window: int | None = Field(None, ge=1)
    """Attention window (keys older than this many positions are not seen) on 'sliding_attention' layers."""
    layer_types: list[LayerType] | None = None
    """Per-layer attention kind; defaults to all sliding when sliding_window is set (Mistral), else all full."""
    tie_word_embeddings: bool = False
    """Share the input embedding matrix with the output layer (SmolLM, small Qwen)."""
    initializer_range: float = Field(0.02, ge=0)
    """Standard deviation of the normal init of linear and embedding weights."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence token id(s)."""
    pad_token_id: int | None = None
    """Padding token id (never the same as EOS in lmforge-made tokenizers); also how a classification head
    finds each row's last real token."""
    id2label: dict[int, str] | None = None
    """Class names of a sequence-classification head, by index."""
    torch_dtype: str = "float32"
    """Dtype the weights are stored in."""

    @property
    def num_labels(self) -> int:
        """Number of classes of the sequence-classification head (HF's default is 2)."""
        return len(self.id2label) if self.id2label else 2

    @model_validator(mode="after")
    def _derive_and_check(self) -> DecoderConfig:
        # Fill derived values once, so the model code reads plain ints.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            object.__setattr__(self, "layer_types", [kind] * self.num_hidden_layers)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries, expected num_hidden_layers={self.num_hidden_layers}"
            )
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("layer_types has 'sliding_attention' layers but sliding_window is not set")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported; supported: 'llama3', 'default'"
                )
        return self


class EncoderConfig(BaseModel):
    """A BERT encoder (post-LayerNorm blocks, learned absolute positions, token types)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    model_type: Literal["bert"] = "bert"
    """Family, as in HF's `config.json`."""
    vocab_size: int = Field(30522, ge=1)
    """Number of token ids."""
    hidden_size: int = Field(256, ge=1)
    """Width of the residual stream."""
    num_hidden_layers: int = Field(4, ge=1)
    """Number of transformer blocks."""
    num_attention_heads: int = Field(4, ge=1)
    """Number of attention heads."""
    intermediate_size: int = Field(1024, ge=1)
    """Width of the GELU MLP's hidden layer."""
    hidden_act: Literal["gelu"] = "gelu"
    """MLP activation (exact erf GELU, as BERT)."""
    hidden_dropout_prob: float = Field(0.1, ge=0, le=1)
    """Dropout on embeddings and block outputs during training."""
    attention_probs_dropout_prob: float = Field(0.1, ge=0, le=1)
    """Dropout on attention probabilities during training."""
    max_position_embeddings: int = Field(512, ge=1)
    """Number of learned positions (the context length)."""
    type_vocab_size: int = Field(2, ge=1)
    """Number of token types (segments A/B)."""
    layer_norm_eps: float = Field(1e-12, gt=0)
    """Epsilon of every LayerNorm."""
    initializer_range: float = Field(0.02, ge=0)
    """Standard deviation of the normal init of linear and embedding weights."""
    pad_token_id: int | None = 0
    """Padding token id."""
    classifier_dropout: float | None = Field(None, ge=0, le=1)
    """Dropout before the classification head; defaults to hidden_dropout_prob."""
    id2label: dict[int, str] | None = None
    """Class names of a sequence-classification head, by index."""
    torch_dtype: str = "float32"
    """Dtype the weights are stored in."""

    @property
    def num_labels(self) -> int:
        """Number of classes of the sequence-classification head."""
        return len(self.id2label) if self.id2label else 2

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        return self


ModelConfig = DecoderConfig | EncoderConfig

# Presets: `tiny-*` for tests, `llama-14m` for CPU benchmarks, `llama-124m` for one GPU, `bert-mini` (the
# published BERT-mini shape: 4 layers, 256 wide) for MLM/NSP pretraining on a laptop.
PRESETS: dict[str, ModelConfig] = {
    "tiny-llama": DecoderConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    ),
    "tiny-smollm": DecoderConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    ),
    "tiny-mistral": DecoderConfig(
        model_type="mistral", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=8,
    ),
    "tiny-qwen2": DecoderConfig(
        model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, attention_bias=True,
        rope_theta=1000000.0, tie_word_embeddings=True,
    ),
    "tiny-qwen3": DecoderConfig(
        model_type="qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128, qk_norm=True,
        rope_theta=1000000.0,
    ),
    "tiny-bert": EncoderConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128,
    ),
    "llama-14m": DecoderConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
        max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "llama-124m": DecoderConfig(
        vocab_size=32768, hidden_size=768, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    "bert-mini": EncoderConfig(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        max_position_embeddings=512,
    ),
}  # fmt: skip


def preset(name: str, **overrides: object) -> ModelConfig:
    """Return a copy of the named preset with `overrides` applied (validated)."""
    if name not in PRESETS:
        raise LmforgeError(f"unknown model preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    base = PRESETS[name]
    # exclude_unset: derived fields (head_dim, layer_types) are derived again from the overridden values.
    try:
        return type(base).model_validate({**base.model_dump(exclude_unset=True), **overrides})
    except ValidationError as e:  # a bad override: name the field, the allowed values and a close key
        raise LmforgeError(
            validation_message(e, type(base), lambda key: f"overriding preset {name}")
        ) from None
