"""The one per-token log-prob path: SFT's loss and evaluation, DPO's sequence log-probs and RL's ratios all read
`token_logprobs`, which asks the decoder for its per-token losses (`reduction="none"`), so the LM head and its
softmax run only at the positions that are scored."""

from __future__ import annotations

from torch import Tensor, nn

from lmforge.model.decoder import IGNORE_INDEX

Batch = dict[str, Tensor]


def token_logprobs(model: nn.Module, batch: Batch) -> Tensor:
    """log p(targets[b, t] | inputs[b, :t+1]) (B, T) in fp32; 0 where the target is IGNORE_INDEX.

    `batch`: `input_ids` (B, T), `targets` (B, T), optional `attention_mask`, `position_ids`, `segment_ids`.
    """
    return -model(
        batch["input_ids"],
        batch["targets"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        segment_ids=batch.get("segment_ids"),
        reduction="none",
    )


def sequence_logprobs(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(Σ_t log-prob (B,), scored tokens (B,)) of each row's targets: a reply's log-likelihood and its length."""
    per_token = token_logprobs(model, batch)  # (B, T)
    return per_token.sum(-1), (batch["targets"] != IGNORE_INDEX).sum(-1)
