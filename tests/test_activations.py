"""Activation checkpointing: the same loss and gradients, fewer tensors kept for backward."""

from __future__ import annotations

import torch
from helpers import randomize_

from lmforge.model.configs import preset
from lmforge.model.hf import build_model
from lmforge.train.activations import checkpoint_activations


def saved_bytes_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, float, list[torch.Tensor]]:
    """Bytes of the tensors autograd keeps from the forward pass, the loss, and every gradient."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):  # fmt: skip
        loss = model(ids, ids, reduction="mean")
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return sum(kept), loss.item(), grads


def test_checkpointed_blocks_give_the_same_gradients_and_keep_less():
    torch.manual_seed(0)
    model = build_model(preset("tiny-llama", num_hidden_layers=4))
    randomize_(model)
    ids = torch.randint(0, 256, (4, 64))
    plain_bytes, plain_loss, plain_grads = saved_bytes_and_grads(model, ids)
    names = [n for n, _ in model.named_parameters()]

    checkpoint_activations(checkpoint_activations(model))  # twice: the second is a no-op
    ckpt_bytes, ckpt_loss, ckpt_grads = saved_bytes_and_grads(model, ids)

    assert [n for n, _ in model.named_parameters()] == names  # HF names untouched
    assert ckpt_loss == plain_loss
    for a, b in zip(plain_grads, ckpt_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ckpt_bytes < plain_bytes / 4  # 4 blocks keep only their inputs: 16% of the bytes when written
