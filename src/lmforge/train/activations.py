"""Activation checkpointing applied from outside the model: each transformer block recomputes its activations
during the backward pass instead of keeping them, trading about one extra forward for memory that no longer
grows with the number of layers (only each block's input is kept)."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.train.distributed import layer_stack


def checkpoint_activations(model: nn.Module) -> nn.Module:
    """Make every block of `model` recompute its activations in backward; return the same model.

    Only each block's `forward` attribute is replaced, so the module tree, parameter names (the HF names
    checkpoints use) and hooks (FSDP's) are untouched. Non-reentrant checkpointing: works with inputs that
    need no grad, with keyword arguments (attention masks, positions) and under `torch.compile`.
    """
    for block in layer_stack(model):
        if not getattr(block.forward, "_lmforge_checkpointed", False):
            wrapped = functools.partial(checkpoint, block.forward, use_reentrant=False)
            wrapped._lmforge_checkpointed = True  # type: ignore[attr-defined]  (applying twice is a no-op)
            block.forward = wrapped
    return model
