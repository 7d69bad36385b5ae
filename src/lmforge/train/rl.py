"""The pieces the align stage composes into GRPO and PPO steps: a rollout through the one inference engine,
small pure tensor functions (advantages, KL estimators, GAE, clipped losses) and a value head for PPO.

Layout. A rollout row is prompt + completion, right-padded, with next-token targets as everywhere in lmforge
(`data/batches.py` `sft_rows`; the decoder does not shift): targets[b, t] is input_ids[b, t + 1] where that
token is a completion token, IGNORE_INDEX elsewhere. So position t holds the state (prefix up to t) and its
target is the action taken there: log-probs, values, rewards, advantages and KL all live at the positions of
`completion_mask` (= targets != IGNORE_INDEX), shape (B, T). A completion ended by an end-of-turn/EOS id keeps
that id as its last token (TRL's completion mask covers the first EOS too), so the policy learns when to stop.

Conventions matched (file:line of the installed TRL 1.16 unless said otherwise):
- GRPO advantages: (r - group mean) / (group std + 1e-4), std with Bessel's correction (`nanstd`,
  trl/trainer/utils.py:1021-1043), scale_rewards="group" (grpo_trainer.py:2765-2787).
- GRPO loss: the clipped surrogate + beta x k3 per token (grpo_trainer.py:3100-3102, 3112-3119,
  3149-3150), reduced as the default loss_type "dapo" (grpo_config.py:801-809): a sum over every completion
  token divided by the completion tokens of the whole generation batch (grpo_trainer.py:3168-3174) — a
  token-level mean, not TRL's "grpo" per-sequence mean.
- PPO (TRL 1.16 has no PPO trainer; matched to TRL 0.x `trl/trainer/ppo_trainer.py` and `trl/core.py`,
  the InstructGPT recipe): per-token reward -kl_coef x (logp - ref) with the score added at the last
  completion token; GAE with the last token bootstrapping 0; `masked_whiten` (Bessel-corrected variance,
  rsqrt(var + 1e-8)); the clipped value loss 0.5 x max((v - R)^2, (v_clipped - R)^2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import GenerationConfig
from lmforge.model.decoder import IGNORE_INDEX, DecoderModel
from lmforge.tokenizer import Tokenizer
from lmforge.train.logprobs import Batch, token_logprobs

# ---------------------------------------------------------------------------------------------- rollout


@dataclass
class Rollout:
    """n sampled completions per prompt as training rows (prompt i's samples are rows i*n .. i*n+n-1)."""

    input_ids: Tensor  # (B, T) prompt + completion, right-padded with the pad id (or 0)
    targets: Tensor  # (B, T) next-token targets, IGNORE_INDEX except at completion tokens
    completion_mask: Tensor  # (B, T) bool, targets != IGNORE_INDEX
    prompt_lengths: Tensor  # (B,) int64
    completion_ids: list[list[int]]  # each row's completion, its closing EOS/end-of-turn id included
    texts: list[str]  # decoded completions, no special tokens
    finished: Tensor  # (B,) bool: ended with EOS/end-of-turn (False: hit max_new_tokens)
    old_logprobs: Tensor | None  # (B, T) fp32 completion tokens' log-probs under the sampling policy, else 0

    def batch(self) -> Batch:
        """The rows as a batch for `token_logprobs` / `values`: {"input_ids", "targets"} (B, T)."""
        return {"input_ids": self.input_ids, "targets": self.targets}


def rollout(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    seed: int,
    score: bool = True,
) -> Rollout:
    """Sample n completions per prompt with the inference engine (batched, KV cache) and score them.

    The model is in eval mode while it samples and scores, and back in its previous mode after. `old_logprobs`
    are recomputed by `token_logprobs` (the training forward, right-padded rows) rather than taken from the
    sampler: the sampler's numbers come from another path (left padding, KV cache), and the ratio
    exp(logp - old_logp) must compare one computation with itself, so it is exactly 1 before the first update
    (without dropout: they are computed in eval mode) and no sampling processor (top-p) enters it. They are
    the model's raw distribution (temperature 1), like every `token_logprobs`; TRL divides the logits by the
    sampling temperature first. `score=False` leaves them None (the caller computes them, or needs none).
    """
    was_training = model.training
    cfg = GenerationConfig(
        n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
    )
    try:
        completions = Engine(model, tokenizer).generate(prompts, cfg)  # puts the model in eval mode
        # The tokens the policy chose: the generated ids and the end-of-turn id that closed the sample.
        completion_ids = [
            c.token_ids + ([c.stop_token] if c.stop_token is not None else []) for c in completions
        ]
        prompt_lengths = [len(prompts[c.prompt_index]) for c in completions]
        T = max(p + len(ids) for p, ids in zip(prompt_lengths, completion_ids, strict=True))
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        input_rows, target_rows = [], []
        for c, p, ids in zip(completions, prompt_lengths, completion_ids, strict=True):
            row = [*prompts[c.prompt_index], *ids]
            input_rows.append(row + [pad] * (T - len(row)))
            # Position t predicts token t + 1: the completion's targets sit at p - 1 .. p + len(ids) - 2.
            target_rows.append([IGNORE_INDEX] * (p - 1) + ids + [IGNORE_INDEX] * (T - p + 1 - len(ids)))
        device = next(model.parameters()).device
        input_ids = torch.tensor(input_rows, dtype=torch.long, device=device)  # (B, T)
        targets = torch.tensor(target_rows, dtype=torch.long, device=device)  # (B, T)
        old_logprobs = (
            None  # without `score` the caller computes them (e.g. after sampling from merged weights)
        )
        if score:
            with torch.no_grad():
                old_logprobs = token_logprobs(model, {"input_ids": input_ids, "targets": targets})  # (B, T)
    finally:
        model.train(was_training)
    return Rollout(
        input_ids=input_ids,
        targets=targets,
        completion_mask=targets != IGNORE_INDEX,
        prompt_lengths=torch.tensor(prompt_lengths, dtype=torch.long, device=device),
        completion_ids=completion_ids,
        texts=[c.text for c in completions],
        finished=torch.tensor([c.finish_reason == "stop" for c in completions], device=device),
        old_logprobs=old_logprobs,
    )


# -------------------------------------------------------------------------------------- masked statistics


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is True (over `dim`, or all); 0 where nothing is masked."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked positions (TRL's `masked_whiten`), 0 outside the mask.

    The variance is Bessel-corrected as TRL's `masked_var`; `shift_mean=False` adds the mean back (TRL's
    reward whitening keeps the rewards' sign).
    """
    mean = masked_mean(x, mask)
    count = mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * count / (count - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out.masked_fill(~mask.bool(), 0.0)


def _token_mean(per_token: Tensor, mask: Tensor, num_tokens: float | Tensor | None) -> Tensor:
    """Σ over masked tokens / `num_tokens` (the whole step's completion tokens when a batch is split into
    micro-batches, as the loop normalises), or the masked mean of this batch when None."""
    if num_tokens is None:
        return masked_mean(per_token, mask)
    return (per_token * mask.to(per_token.dtype)).sum() / num_tokens


# ------------------------------------------------------------------------------------------------- GRPO


def group_advantages(rewards: Tensor, n: int, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's advantages (B,): each reward minus its group's mean, over the group's std + eps when `scale`.

    Groups are consecutive runs of n rows (a rollout's layout). The std is the unbiased one (n - 1), as TRL
    1.16's `nanstd` (trl/trainer/utils.py:1041-1043, Bessel's correction) used at grpo_trainer.py:2770, with
    eps = 1e-4 added to it (grpo_trainer.py:2787); a group of one has std 0 (TRL's eval-time fallback).
    """
    grouped = rewards.float().view(-1, n)  # (B / n, n)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale:
        std = grouped.std(1, keepdim=True) if n > 1 else torch.zeros_like(grouped[:, :1])
        advantages = advantages / (std + eps)
    return advantages.view(-1)


def kl_per_token(logp: Tensor, ref_logp: Tensor, estimator: Literal["k1", "k2", "k3"] = "k3") -> Tensor:
    """Per-token estimate (B, T) of KL(policy || reference) from the sampled tokens' log-probs.

    k1 = logp - ref (unbiased, can be negative); k2 = (logp - ref)^2 / 2; k3 = exp(ref - logp) - (ref - logp)
    - 1 (Schulman's unbiased, always >= 0 estimator; TRL GRPO's, grpo_trainer.py:3100-3102). Positions with
    logp = ref = 0 (outside the completion) give 0 for each.
    """
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio  # exp(x) - x - 1, accurate near 0
    raise ValueError(f"unknown KL estimator {estimator!r}: expected k1, k2 or k3")


def _clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO-clip per token: max(-A r, -A clip(r, 1 ± clip)), ratio r, where clipping acts; each (B, T)."""
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (B, 1): one advantage per sequence (GRPO)
    ratio = torch.exp(logp - old_logp)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    # Where the clipped term wins the loss is constant in logp: those tokens get no gradient.
    return torch.maximum(unclipped, clipped), ratio, clipped > unclipped


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip: float,
    kl_coef: float,
    num_tokens: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's loss: the clipped surrogate with one advantage (B,) per sequence + kl_coef x k3 KL to `ref_logp`
    per token, averaged over completion tokens as TRL 1.16's default loss_type "dapo" (token level).

    `num_tokens`: the completion tokens of the whole generation batch when this is one micro-batch of it
    (TRL's `num_items_in_batch`); None averages over this batch's (TRL "bnpo", equal for one micro-batch).
    Metrics (detached): clipfrac (TRL's clip_ratio/region_mean, grpo_trainer.py:3274-3276), ratio, kl (when a
    reference is given).
    """
    per_token, ratio, clipped = _clipped_surrogate(logp, old_logp, advantages, clip)  # (B, T) each
    metrics = {"clipfrac": masked_mean(clipped.float(), mask), "ratio": masked_mean(ratio, mask)}
    if ref_logp is not None:  # measured whenever a reference is given, a penalty only with kl_coef
        kl = kl_per_token(logp, ref_logp, "k3")  # (B, T)
        if kl_coef != 0:
            per_token = per_token + kl_coef * kl
        metrics["kl"] = masked_mean(kl, mask)
    loss = _token_mean(per_token, mask, num_tokens)
    return loss, {k: v.detach() for k, v in metrics.items()}


# -------------------------------------------------------------------------------------------------- PPO


def ppo_token_rewards(score: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """InstructGPT's per-token rewards (B, T): -kl_coef x (logp - ref_logp) at each completion token, plus the
    sequence's score (B,) at its last completion token; 0 outside the mask."""
    rewards = (-kl_coef * (logp - ref_logp)).masked_fill(~mask, 0.0)  # (B, T)
    positions = torch.arange(mask.size(1), device=mask.device)  # (T,)
    last = (positions * mask).argmax(1)  # (B,) each row's last completion position
    rows = torch.arange(mask.size(0), device=mask.device)
    has_tokens = mask.any(1)  # a row with no completion tokens gets no score
    return rewards.index_put((rows, last), score.to(rewards.dtype) * has_tokens, accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (advantages (B, T), returns = advantages + values (B, T)).

    Each row's masked positions are its time steps, in order; the step after the last one has value 0 (the
    episode ends), and positions outside the mask are skipped and get 0. Inputs are the rollout's constants
    (values from the old value head, detached).
    """
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = rewards.new_zeros(B)  # value of each row's next masked step, 0 past its last
    running = rewards.new_zeros(B)  # GAE of each row's next masked step
    for t in reversed(range(T)):  # every row's position t at once: T small (B,) steps
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        step = delta + gamma * lam * running
        advantages[:, t] = torch.where(m, step, 0.0)
        running = torch.where(m, step, running)
        next_value = torch.where(m, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, 0.0)
    return advantages, returns


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip: float,
    *,
    num_tokens: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip's loss: mean over completion tokens of max(-A r, -A clip(r, 1 ± clip)), r = exp(logp - old).

    `advantages` are per token (B, T) or per sequence (B,). Metrics (detached): clipfrac (tokens where
    clipping is active), approx_kl = mean (logp - old)^2 / 2 (TRL PPO's `approxkl`), ratio (mean r).
    """
    per_token, ratio, clipped = _clipped_surrogate(logp, old_logp, advantages, clip)  # (B, T) each
    metrics = {
        "clipfrac": masked_mean(clipped.float(), mask),
        "approx_kl": 0.5 * masked_mean((logp - old_logp) ** 2, mask),
        "ratio": masked_mean(ratio, mask),
    }
    return _token_mean(per_token, mask, num_tokens), {k: v.detach() for k, v in metrics.items()}


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float,
    *,
    num_tokens: float | Tensor | None = None,
) -> Tensor:
    """PPO's value loss: 0.5 x mean over completion tokens of max((v - R)^2, (clip(v, old ± clip) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)  # (B, T)
    per_token = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * _token_mean(per_token, mask, num_tokens)


# ------------------------------------------------------------------------------------------- value head


class ValueHead(nn.Module):
    """PPO's critic on the policy's trunk: Linear(hidden, 1) on the decoder's final (normed) hidden states."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        # Zero-initialised, so the first values are 0 rather than noise of the trunk's scale.
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """Values (B, T) in fp32 of hidden states (B, T, C)."""
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()


def values(model: nn.Module, value_head: ValueHead, batch: Batch) -> Tensor:
    """The value (B, T) of each position's state (its prefix) from one forward of `model`'s trunk."""
    # No position scored: the LM head runs on none, the trunk's hidden states are all that is computed.
    targets = torch.full_like(batch["input_ids"], IGNORE_INDEX)  # (B, T)
    return value_head(_forward_with_hidden(model, {**batch, "targets": targets})[1])


def policy_and_values(model: nn.Module, value_head: ValueHead, batch: Batch) -> tuple[Tensor, Tensor]:
    """`token_logprobs` (B, T) and `values` (B, T) from ONE decoder forward (LM head at scored positions)."""
    logp, hidden = _forward_with_hidden(model, batch)
    return logp, value_head(hidden)


def _forward_with_hidden(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """`token_logprobs(model, batch)` (B, T) and the trunk's final hidden states (B, T, C) of that forward.

    A forward hook on the decoder trunk (`DecoderModel`, whose output feeds the LM head) reads the hidden
    states, so the decoder's loss code stays the one path. Prompt tuning's trunk also sees its virtual tokens
    in front: the last T positions are the real ones.
    """
    trunk = next((m for m in model.modules() if isinstance(m, DecoderModel)), None)
    if trunk is None:
        raise TypeError(f"{type(model).__name__} has no decoder trunk (DecoderModel) to put a value head on")
    captured: list[Tensor] = []
    handle = trunk.register_forward_hook(lambda _module, _args, out: captured.append(out))
    try:
        logp = token_logprobs(model, batch)  # (B, T)
    finally:
        handle.remove()
    (hidden,) = captured  # (B, [n +] T, C)
    return logp, hidden[:, -batch["input_ids"].size(1) :]
