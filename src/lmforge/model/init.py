"""Weight initialisation and tying shared by every model class (HF's scheme, so statistics match)."""

from __future__ import annotations

import torch
from torch import nn


def empty_embedding(num_embeddings: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """An nn.Embedding without its own init: `init_weights` does that once.

    Skipping nn.Embedding's `normal_` matters beyond the wasted work: on the meta device it has no C++ kernel
    and its Python fallback imports torch._dynamo, which costs ~1.5 s the first time a model is built.
    """
    return nn.Embedding(
        num_embeddings, dim, padding_idx=padding_idx, _weight=torch.empty(num_embeddings, dim)
    )


@torch.no_grad()
def init_weights(model: nn.Module, std: float) -> None:
    """normal(0, std) Linear and Embedding weights, zero biases and padding rows, norms weight 1 / bias 0."""
    modules = list(model.modules())
    for m in modules:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) or type(m).__name__ == "RMSNorm":  # by name: decoder.py imports us
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    # Embeddings last: an output layer tied to the embedding is a Linear, and the padding row must end zero.
    for m in modules:
        if isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()


def tie_weights(model: nn.Module, ties: dict[str, str]) -> None:
    """Make each tied parameter {key: source key} the source's Parameter again (after `to_empty`, loading)."""
    for key, source in ties.items():
        owner, _, name = key.rpartition(".")
        setattr(model.get_submodule(owner), name, model.get_parameter(source))
