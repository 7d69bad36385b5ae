"""GRPO's and PPO's data builder and objectives for `lmforge align`: rollouts of the policy itself (the one
inference engine), scored by rewards, with the reference's log-probs and the advantages each objective reads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.adapters.lora import lora_merged
from lmforge.errors import LmforgeError
from lmforge.eval.rewards import PromptItem, RewardModel, batched, load_reward
from lmforge.model.decoder import IGNORE_INDEX
from lmforge.stages.configs import AlignConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.logprobs import token_logprobs
from lmforge.train.objectives import Batch, Counts, Objective
from lmforge.train.rl import (
    ValueHead,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    group_advantages,
    grpo_loss,
    kl_per_token,
    masked_mean,
    policy_and_values,
    ppo_token_rewards,
    rollout,
    values,
    whiten,
)


def prompt_ids(
    model: nn.Module, tokenizer: Tokenizer, items: list[PromptItem], max_new_tokens: int
) -> list[list[int]]:
    """Each prompt rendered by the chat template with the assistant turn opened, cut to leave room to answer."""
    from lmforge.chat import render_chat

    room = model.config.max_position_embeddings - max_new_tokens - model.extra_positions
    if room < 1:
        raise LmforgeError(f"max_new_tokens={max_new_tokens} fills the model's context: no room for a prompt")
    return [render_chat(tokenizer, list(it.messages), add_generation_prompt=True).ids[-room:] for it in items]


def reward_fn(
    spec: str, model: nn.Module
) -> Callable[[list[PromptItem], list[str], list[bool]], list[float]]:
    """A batch reward: a reward-model directory's scores, or a built-in / `module:function` reward per item."""
    if Path(spec).is_dir():
        return RewardModel.from_dir(spec, device=next(model.parameters()).device).as_reward()
    return batched(load_reward(spec))


class RolloutBatches:
    """GRPO's and PPO's data builder: micro-batches of the policy's own completions.

    Each rollout takes the next prompts (a fresh seeded order every pass over them), samples `rl.samples`
    completions of each with the inference engine, scores them with the rewards, and computes what the
    objective needs: the old and reference log-probs and the advantages (GRPO: group-relative; PPO: GAE on
    per-token rewards with the KL penalty, values from the critic). A rollout feeds `rl.epochs` optimizer steps
    of `train.grad_accum_steps` micro-batches each. A checkpoint falls between rollouts, so the cursor (prompts
    used, rollouts done) resumes it exactly: the rollout seeds follow from it.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        items: list[PromptItem],
        rewards: list[Callable[..., list[float]]],
        reference: Callable[[], Any],
        cfg: AlignConfig,
        value_head: ValueHead | None,
    ) -> None:
        self.model, self.tokenizer, self.items, self.rewards = model, tokenizer, items, rewards
        self.reference, self.cfg, self.value_head = reference, cfg, value_head
        self.prompt_ids = prompt_ids(model, tokenizer, items, cfg.rl.max_new_tokens)
        self.cursor, self.rollouts = 0, 0  # prompts taken, rollouts done
        self.pending: list[Batch] = []
        self.history: list[dict[str, float]] = []

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if not self.pending:
            self._rollout()
        return self.pending.pop(0)

    def _next_prompts(self, k: int) -> list[int]:
        taken = []
        for _ in range(k):
            epoch, at = divmod(self.cursor, len(self.items))
            order = np.random.default_rng([self.cfg.train.seed, epoch]).permutation(len(self.items))
            taken.append(int(order[at]))
            self.cursor += 1
        return taken

    @torch.no_grad()
    def _rollout(self) -> None:
        cfg, rl, model = self.cfg, self.cfg.rl, self.model
        rows = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
        chosen = self._next_prompts(rows // rl.samples)
        # Sampling reads a LoRA folded into its weights (as fast as the base); every log-prob below comes from
        # the training forward, so the policy ratio compares one computation with itself.
        with lora_merged(model):
            r = rollout(model, self.tokenizer, [self.prompt_ids[i] for i in chosen], n=rl.samples,
                        max_new_tokens=rl.max_new_tokens, temperature=1.0,
                        seed=cfg.train.seed * 1_000_003 + self.rollouts, score=False)  # fmt: skip
        items = [self.items[i] for i in chosen for _ in range(rl.samples)]
        finished = r.finished.tolist()
        scores = torch.zeros(len(items), dtype=torch.float32)
        for reward in self.rewards:
            scores += torch.tensor(reward(items, r.texts, finished), dtype=torch.float32)
        scores = scores.to(r.input_ids.device)  # (B,)
        batch, mask = r.batch(), r.completion_mask
        with self.reference() as ref:
            ref_logp = token_logprobs(ref, batch)  # (B, T)
        data = {**batch, "ref_logprobs": ref_logp}
        # The sampling policy's log-probs: with one step per rollout they are the first forward's own (detached),
        # so GRPO needs no extra forward for them (as TRL); PPO's per-token KL penalty needs them up front.
        old_logp = None
        if rl.epochs > 1 or self.value_head is not None:
            was_training = model.training
            model.eval()
            old_logp = token_logprobs(model, batch)  # (B, T)
            old_values = values(model, self.value_head, batch) if self.value_head is not None else None
            model.train(was_training)
            data["old_logprobs"] = old_logp
            kl = float(masked_mean(kl_per_token(old_logp, ref_logp, "k3"), mask))  # the sampling policy's
        if self.value_head is None:  # GRPO: one advantage per completion, relative to its group
            data["advantages"] = group_advantages(scores, rl.samples)
        else:  # PPO: per-token rewards (score at the end, KL penalty at every token), GAE on the critic's values
            token_rewards = ppo_token_rewards(scores, old_logp, ref_logp, mask, rl.kl_coef)
            advantages, returns = gae(token_rewards, old_values, mask, rl.gamma, rl.lam)
            data.update(advantages=whiten(advantages, mask), returns=returns, old_values=old_values)
        micro = cfg.train.micro_batch_size
        for _ in range(rl.epochs):
            self.pending += [{k: v[i : i + micro] for k, v in data.items()} for i in range(0, rows, micro)]
        self.rollouts += 1
        self.history.append({
            **({"kl": kl} if old_logp is not None else {}),  # else the step measures it (see `report`)
            "reward": float(scores.mean()),
            "completion_tokens": float(mask.sum(-1).float().mean()),
            "finished": float(r.finished.float().mean()),
        })  # fmt: skip

    def report(self, record: dict[str, Any]) -> None:
        """Add the latest rollout's reward and lengths to a metrics record, and keep the policy's KL to the
        reference that the step measured (k3 per completion token) with the rollout."""
        if self.history and "loss" in record:
            if "kl" in record:
                self.history[-1].setdefault("kl", record["kl"])
            record.update({f"rollout/{k}": v for k, v in self.history[-1].items()})

    def summary(self) -> dict[str, Any]:
        """The rollouts: how many, and their reward and KL at the start and the end (means of a tenth each)."""
        h = self.history
        if not h:
            return {"rollouts": 0}
        k = max(1, len(h) // 10)
        first, last = h[:k], h[-k:]
        mean = lambda part, key: float(np.mean([x[key] for x in part]))  # noqa: E731
        return {"rollouts": len(h), **{f"{key}_first": mean(first, key) for key in h[0]},
                **{f"{key}_last": mean(last, key) for key in h[0]}}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The cursor: prompts taken, rollouts done, micro-batches of the last rollout not yet trained on."""
        return {"cursor": self.cursor, "rollouts": self.rollouts, "pending": len(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after a checkpoint taken between rollouts."""
        if state["pending"]:
            raise LmforgeError(
                "this checkpoint was taken inside a rollout (train.checkpoint_every not a multiple of rl.epochs): "
                "it cannot be resumed exactly; start the run again with --overwrite"
            )
        self.cursor, self.rollouts = state["cursor"], state["rollouts"]


def _completion_counts(batch: Batch) -> Counts:
    return {"tokens": int((batch["targets"] != IGNORE_INDEX).sum())}


def grpo_objective(cfg: AlignConfig) -> Objective:
    """GRPO: the clipped surrogate with group-relative advantages + β k3 KL, a token-level mean over the step."""

    def losses(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logp = token_logprobs(model, batch)  # (B, T)
        mask = batch["targets"] != IGNORE_INDEX
        ref = batch["ref_logprobs"]
        old = batch["old_logprobs"] if "old_logprobs" in batch else logp.detach()  # one step per rollout
        loss, metrics = grpo_loss(logp, old, ref, batch["advantages"], mask, clip=cfg.rl.clip,
                                  kl_coef=cfg.rl.kl_coef, num_tokens=1)  # fmt: skip
        n = (
            mask.sum()
        )  # the statistics are token means: summed here, divided by the step's tokens by the loop
        return {"tokens": loss, **{k: v * n for k, v in metrics.items()}}

    return Objective(_completion_counts, losses, stat_unit="tokens")


def ppo_objective(cfg: AlignConfig, value_head: ValueHead) -> Objective:
    """PPO: the clipped policy loss on GAE advantages + value_coef x the clipped value loss, one forward."""

    def losses(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logp, vals = policy_and_values(model, value_head, batch)  # (B, T) each
        mask = batch["targets"] != IGNORE_INDEX
        policy, metrics = clipped_policy_loss(logp, batch["old_logprobs"], batch["advantages"], mask, cfg.rl.clip,
                                              num_tokens=1)  # fmt: skip
        value = clipped_value_loss(
            vals, batch["old_values"], batch["returns"], mask, cfg.rl.value_clip, num_tokens=1
        )
        n = mask.sum()
        return {"tokens": policy + cfg.rl.value_coef * value, "value_loss": value.detach(),
                **{k: v * n for k, v in metrics.items()}}  # fmt: skip

    return Objective(_completion_counts, losses, stat_unit="tokens")
