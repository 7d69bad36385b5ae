"""BERT: a post-LayerNorm encoder and its heads, with Hugging Face's module names (HF conversion is an identity
key map; HF's `embeddings.position_ids` buffer is not kept: positions come from arange)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.model.configs import EncoderConfig
from lmforge.model.init import empty_embedding, init_weights, tie_weights
from lmforge.model.linear import Linear

# The MLM decoder reads out with the input embedding matrix; its bias is the head's own `cls.predictions.bias`.
MLM_TIES = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}


class EncoderOutput(NamedTuple):
    """What BertModel returns."""

    last_hidden_state: Tensor  # (B, T, C)
    pooler_output: Tensor | None  # (B, C); None in a model built without the pooler (BertForMaskedLM)


class PreTrainingOutput(NamedTuple):
    """What BertForPreTraining returns."""

    mlm_logits: Tensor  # (B, T, vocab_size)
    nsp_logits: Tensor  # (B, 2)


def mean_pool(last_hidden_state: Tensor, attention_mask: Tensor) -> Tensor:
    """Average the hidden states over non-padding positions (sentence-transformers' mean pooling)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # (B, T, 1)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, C)


class Embeddings(nn.Module):
    """Word + token type + learned position embeddings, then LayerNorm and dropout."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        C = config.hidden_size
        self.word_embeddings = empty_embedding(config.vocab_size, C, config.pad_token_id)
        self.position_embeddings = empty_embedding(config.max_position_embeddings, C)
        self.token_type_embeddings = empty_embedding(config.type_vocab_size, C)
        self.LayerNorm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, position_ids: Tensor) -> Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)  # (B, T, C)
        x = x + self.position_embeddings(position_ids)  # (B, T, C)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention over the non-padding keys, through SDPA."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        C = config.hidden_size
        self.n_head = config.num_attention_heads
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = Linear(C, C)
        self.key = Linear(C, C)
        self.value = Linear(C, C)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        B, T, C = x.shape
        shape = (B, T, self.n_head, C // self.n_head)
        q = self.query(x).view(shape).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = self.key(x).view(shape).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = self.value(x).view(shape).transpose(1, 2)  # (B, n_head, T, head_dim)
        p = self.dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, n_head, T, head_dim)
        return y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)


class AddNorm(nn.Module):
    """dense → dropout → add the residual → LayerNorm: the post-LN output of a sublayer (HF's Bert*Output)."""

    def __init__(self, d_in: int, config: EncoderConfig) -> None:
        super().__init__()
        self.dense = Linear(d_in, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)  # (B, T, C)


class Layer(nn.Module):
    """One post-LN block: attention, then the exact (erf) GELU MLP, each closed by residual add and LayerNorm."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        # ModuleDicts are plain containers that give HF's key paths (attention.self.query, intermediate.dense).
        self.attention = nn.ModuleDict(
            {"self": SelfAttention(config), "output": AddNorm(config.hidden_size, config)}
        )
        self.intermediate = nn.ModuleDict({"dense": Linear(config.hidden_size, config.intermediate_size)})
        self.output = AddNorm(config.intermediate_size, config)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.attention.output(self.attention.self(x, mask), x)  # (B, T, C)
        h = F.gelu(self.intermediate.dense(x))  # (B, T, intermediate_size)
        return self.output(h, x)  # (B, T, C)


class _BertBase(nn.Module):
    # The contract every lmforge model class follows; the HF loader relies on it.
    hf_architecture: str
    base_model_prefix = "bert"
    config: EncoderConfig

    def init_weights(self) -> None:
        """(Re)tie and initialise every parameter, e.g. after building on the meta device and `to_empty`."""
        self.tie_weights()
        init_weights(self, self.config.initializer_range)

    def tied_weights(self) -> dict[str, str]:
        """State-dict key of each tied parameter → key of the parameter it shares (the MLM head's decoder)."""
        cls = getattr(self, "cls", None)
        return dict(MLM_TIES) if cls is not None and "predictions" in cls else {}

    def tie_weights(self) -> None:
        """Make tied parameters one Parameter again (after building, `to_empty` or load_state_dict(assign=True))."""
        tie_weights(self, self.tied_weights())


class BertModel(_BertBase):
    """The BERT encoder: embeddings, post-LN layers and (unless add_pooling_layer=False) the [CLS] pooler."""

    hf_architecture = "BertModel"

    def __init__(self, config: EncoderConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.embeddings = Embeddings(config)
        layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layer": layers})  # HF's key path: encoder.layer.{i}
        # The [CLS] summary that NSP and classification read: tanh(dense(x[:, 0])).
        self.pooler = nn.ModuleDict({"dense": Linear(C, C)}) if add_pooling_layer else None

    def forward(
        self,
        input_ids: Tensor,  # (B, T)
        attention_mask: Tensor | None = None,  # (B, T), 1 = token, 0 = padding
        token_type_ids: Tensor | None = None,  # (B, T), defaults to all 0 (segment A)
        position_ids: Tensor | None = None,  # (B, T), defaults to 0..T-1
    ) -> EncoderOutput:
        B, T = input_ids.shape
        if self.config.max_position_embeddings < T:
            raise LmforgeError(
                f"input has {T} tokens; this model has max_position_embeddings={self.config.max_position_embeddings}"
            )
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)  # (B, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)  # (B, T)
        # Boolean SDPA mask, True = attend; padding is masked as a key only, so no query row is empty.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, C)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        pooled = torch.tanh(self.pooler.dense(x[:, 0])) if self.pooler is not None else None  # (B, C)
        return EncoderOutput(x, pooled)


class LMPredictionHead(nn.Module):
    """dense → GELU → LayerNorm, then the decoder (tied to the word embeddings) with its own bias."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        C = config.hidden_size
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))  # `decoder.bias` is this Parameter once tied
        self.transform = nn.ModuleDict(
            {"dense": Linear(C, C), "LayerNorm": nn.LayerNorm(C, eps=config.layer_norm_eps)}
        )
        self.decoder = Linear(C, config.vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))  # (B, T, C)
        return self.decoder(x)  # (B, T, vocab_size)


class BertForPreTraining(_BertBase):
    """BERT with the masked-LM and next-sentence-prediction heads it is pretrained with."""

    hf_architecture = "BertForPreTraining"

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = nn.ModuleDict(
            {"predictions": LMPredictionHead(config), "seq_relationship": Linear(config.hidden_size, 2)}
        )
        self.tie_weights()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> PreTrainingOutput:
        x, pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids)  # (B, T, C), (B, C)
        return PreTrainingOutput(self.cls.predictions(x), self.cls.seq_relationship(pooled))


class BertForMaskedLM(_BertBase):
    """BERT with the masked-LM head only (no pooler, as in HF); returns logits (B, T, vocab_size)."""

    hf_architecture = "BertForMaskedLM"

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.cls = nn.ModuleDict({"predictions": LMPredictionHead(config)})
        self.tie_weights()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        x = self.bert(input_ids, attention_mask, token_type_ids, position_ids).last_hidden_state  # (B, T, C)
        return self.cls.predictions(x)  # (B, T, vocab_size)


class BertForSequenceClassification(_BertBase):
    """BERT with dropout and a linear classifier on the pooled [CLS]; returns logits (B, num_labels)."""

    hf_architecture = "BertForSequenceClassification"

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = Linear(config.hidden_size, config.num_labels)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        pooled = self.bert(input_ids, attention_mask, token_type_ids, position_ids).pooler_output  # (B, C)
        return self.classifier(self.dropout(pooled))  # (B, num_labels)
