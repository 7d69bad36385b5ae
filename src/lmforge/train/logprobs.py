"""The one per-token log-prob path: SFT's loss and evaluation, DPO's sequence log-probs and RL's ratios all read
`token_logprobs`, which asks the decoder for its per-token losses (`reduction="none"`), so the LM head and its
softmax run only at the positions that are scored."""

from __future__ import annotations

from torch import Tensor, nn

from lmforge.model.decoder import IGNORE_INDEX, KVCache

Batch = dict[str, Tensor]


def token_logprobs(model: nn.Module, batch: Batch, *, cache: KVCache | None = None) -> Tensor:
    """log p(targets[b, t] | inputs[b, :t+1]) (B, T) in fp32; 0 where the target is IGNORE_INDEX.

    `batch`: `input_ids` (B, T), `targets` (B, T), optional `attention_mask`, `position_ids`, `segment_ids`.
    With a `cache` holding earlier tokens' keys and values, the inputs continue those tokens (evaluation runs a
    prefix its continuations share once); `attention_mask` then covers the cached and the new tokens.
    """
    cached = {} if cache is None else {"cache": cache}  # training calls stay exactly as they were
    return -model(
        batch["input_ids"],
        batch["targets"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        segment_ids=batch.get("segment_ids"),
        reduction="none",
        **cached,
    )


def token_logprobs_and_logits(
    model: nn.Module, batch: Batch, *, cache: KVCache | None = None
) -> tuple[Tensor, Tensor]:
    """`token_logprobs` (B, T) and the LM head's logits (N, V) in fp32 at the N scored positions, from the same
    forward (row-major, the order of `targets != IGNORE_INDEX`).

    What evaluation reads beside the log-probs, without a second softmax: whether a target is greedy
    (`logits.argmax(-1) == target`), and the log-prob of another token o at a scored position,
    log p(o) = log p(target) + logits[o] - logits[target].
    """
    captured: list[Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda _module, _args, out: captured.append(out))
    try:
        logp = token_logprobs(model, batch, cache=cache)
    finally:
        hook.remove()
    (logits,) = captured  # (N, V): the head runs only at scored positions
    counted = (batch["targets"] != IGNORE_INDEX).flatten()  # (B*T,)
    logits = logits.reshape(-1, logits.shape[-1])
    if logits.shape[0] != int(counted.sum()):  # compiled: the head ran at every position
        logits = logits[counted]
    return logp, logits.float()


def sequence_logprobs(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """(Σ_t log-prob (B,), scored tokens (B,)) of each row's targets: a reply's log-likelihood and its length."""
    per_token = token_logprobs(model, batch)  # (B, T)
    return per_token.sum(-1), (batch["targets"] != IGNORE_INDEX).sum(-1)
