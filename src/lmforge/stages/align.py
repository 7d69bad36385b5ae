"""`lmforge align`: the third stage — preferences. A starting model (usually the SFT model) + preference pairs or
prompts + a method → the one training loop → a reward model, or an aligned policy (a HF model directory, or an
adapter on the starting model).

Every method is a data builder and an objective for the one loop, run by the shared stage runner:
- reward: Bradley–Terry on (chosen, rejected) rows through a scalar head (`*ForSequenceClassification`, num_labels 1);
- dpo, ipo, hinge (against the reference), simpo, orpo (reference-free): short pure losses of per-sequence
  log-probs (`train/preference.py`), all from the one per-token log-prob path (`train/logprobs.py`);
- grpo, ppo: the batches are rollouts of the policy itself (the inference engine, batched, KV cache), scored by
  programmatic rewards or a reward model (`eval/rewards.py`), with a KL penalty to the reference (`train/rl.py`;
  the data builder and objectives in `stages/rollouts.py`).

The reference is the starting model. With an adapter (`tuning: lora`, ...) it is the same model with the adapter
switched off (`disable_adapter`: no second model in memory); with full tuning its log-probs are computed once,
before the first step (preference methods), or by a frozen copy (grpo, ppo).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lmforge.adapters.base import disable_adapter, parameter_counts
from lmforge.adapters.io import base_fingerprint, load_adapter, save_adapter
from lmforge.adapters.lora import merge_lora
from lmforge.adapters.registry import ADAPTER_KINDS
from lmforge.data.auto import ensure_prepared
from lmforge.data.batches import preference_rows
from lmforge.data.dataset import PreparedDataset
from lmforge.data.samplers import EpochSampler, Rows, fixed
from lmforge.errors import LmforgeError
from lmforge.eval.rewards import PromptItem, RewardModel, pair_inputs, read_prompts
from lmforge.eval.stats import wilson
from lmforge.model.configs import DecoderConfig
from lmforge.model.decoder import IGNORE_INDEX, CausalLM, DecoderForSequenceClassification
from lmforge.model.hf import load_model, read_config, save_model
from lmforge.stages.configs import RL_METHODS, AlignConfig
from lmforge.stages.forgetting import forgetting_gate, forgetting_record, perplexity, reference_batches
from lmforge.stages.rollouts import RolloutBatches, grpo_objective, ppo_objective, prompt_ids, reward_fn
from lmforge.stages.run import Output, Plan, Stage, run_stage
from lmforge.tokenizer import Tokenizer
from lmforge.train.activations import checkpoint_activations
from lmforge.train.distributed import Dist
from lmforge.train.logprobs import token_logprobs
from lmforge.train.loop import evaluate
from lmforge.train.objectives import Batch, Counts, Metrics, Objective
from lmforge.train.preference import PREFERENCE_LOSSES, bradley_terry_loss, preference_loss
from lmforge.train.reporting import peak_memory
from lmforge.train.rl import (
    ValueHead,
)

log = logging.getLogger(__name__)


def run_align(cfg: AlignConfig, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Align `cfg.model` by `cfg.method`; write `out/model` (full, reward) or `out/adapter`, metrics, results.

    `out` must be new or empty, or hold a run that `cfg.train.resume` continues or `overwrite` replaces."""
    return run_stage(Align(cfg, out), overwrite=overwrite)


class Align(Stage):
    """Alignment's data builders (preference rows, rollouts), objectives and measurements."""

    name = "align"
    cfg: AlignConfig

    def check(self) -> None:
        """The model and the method's data are required; the loop fields RL cannot honour are refused."""
        cfg = self.cfg
        if cfg.model is None:
            raise LmforgeError(
                "align: model is required (--init-from DIR or --set model=DIR): the starting HF dir"
            )
        rl = cfg.method in RL_METHODS
        if rl and cfg.data.prompts is None:
            raise LmforgeError(f"align method {cfg.method} needs data.prompts: a file of prompt records")
        if not rl and cfg.data.dataset is None:
            raise LmforgeError(
                f"align method {cfg.method} needs data.dataset: preference pairs (prepared, or raw "
                "prompt/chosen/rejected or HH-RLHF records)"
            )
        if cfg.train.strategy != "ddp":
            raise LmforgeError(
                f"train.strategy={cfg.train.strategy}: align runs in one process; leave it at ddp"
            )
        if rl and cfg.train.checkpoint_every % cfg.rl.epochs:
            raise LmforgeError(
                f"train.checkpoint_every={cfg.train.checkpoint_every} must be a multiple of rl.epochs="
                f"{cfg.rl.epochs}: a checkpoint is taken between rollouts, never inside one"
            )
        if cfg.method == "reward" and cfg.tuning == "prompt":
            raise LmforgeError(
                "a reward model trains with tuning full, lora or adapter (prompt tuning needs an LM)"
            )

    # ------------------------------------------------------------------------------------------------ build

    def build(self, dist: Dist) -> Plan:
        """The starting model (its SFT adapter merged in), the method's transform, data and objective."""
        cfg, device = self.cfg, dist.device
        self.base_dir = base_dir = Path(cfg.model)
        self.tokenizer = tokenizer = Tokenizer.from_dir(base_dir)
        model = self._start_model().to(device)
        if cfg.train.seq_len > model.config.max_position_embeddings:
            raise LmforgeError(
                f"train.seq_len={cfg.train.seq_len} exceeds {base_dir}'s max_position_embeddings="
                f"{model.config.max_position_embeddings}"
            )
        self.lm = isinstance(model, CausalLM)
        if cfg.method != "reward" and not self.lm:
            raise LmforgeError(
                f"align method {cfg.method} trains a causal LM; {base_dir} holds {type(model).__name__}"
            )
        self.reference, self.ref_batches = (None, []) if cfg.method == "reward" else (
            reference_batches(cfg, base_dir, tokenizer))  # fmt: skip
        # Full-tuning RL samples every rollout's reference log-probs from a frozen copy of the start.
        frozen = None
        if cfg.tuning == "full" and cfg.method in RL_METHODS:
            frozen = copy.deepcopy(model).eval().requires_grad_(False)
        model = self._tune(model).to(device)
        if cfg.train.activation_checkpointing:
            checkpoint_activations(model)
        self.trainable, self.total = parameter_counts(model)
        self.reference_model = self._reference(model, frozen)
        groups = set(cfg.eval.groups) if cfg.eval.groups else None
        self.eval_items = read_prompts(cfg.eval.prompts, cfg.eval.limit, groups) if cfg.eval.prompts else []
        # The judge is loaded now: a directory that is no reward model is refused before anything is written.
        self.judge = RewardModel.from_dir(cfg.eval.judge) if cfg.eval.judge is not None else None
        plan = self._rl_plan(model) if cfg.method in RL_METHODS else self._preference_plan(model)
        log.info("align %s (%s): %s, %s trainable of %s parameters", cfg.method, cfg.tuning, base_dir,
                 f"{self.trainable:,}", f"{self.total:,}")  # fmt: skip
        return plan

    def _start_model(self) -> nn.Module:
        """The starting model: a sequence classifier with a fresh scalar head (reward) or the LM, with
        `model_adapter` merged into it."""
        cfg = self.cfg
        if cfg.method == "reward":
            config, _ = read_config(self.base_dir)
            if isinstance(config, DecoderConfig):
                architecture = DecoderForSequenceClassification.architectures[config.model_type]
            else:
                architecture = "BertForSequenceClassification"
            model = load_model(self.base_dir, architecture=architecture, id2label={0: "LABEL_0"})
            if isinstance(config, DecoderConfig) and model.config.pad_token_id is None:
                raise LmforgeError(
                    f"{self.base_dir}: a decoder reward model reads each row's last token that is not padding, "
                    "so its config needs a pad_token_id"
                )
        else:
            model = load_model(self.base_dir)
        if cfg.model_adapter is not None:
            model = load_adapter(model, cfg.model_adapter, self.base_dir)
            if not any("lora_" in name for name, _ in model.named_parameters()):
                raise LmforgeError(
                    f"model_adapter {cfg.model_adapter}: only a LoRA adapter merges into its base; give a merged "
                    "model directory (`lmforge merge`) instead"
                )
            model = merge_lora(model).requires_grad_(True)  # loading the adapter froze the base
        return model.train()

    def _tune(self, model: nn.Module) -> nn.Module:
        """Every weight trains (full), or a fresh adapter of the registry's kind; a reward head always trains."""
        cfg = self.cfg
        if cfg.tuning != "full":
            kind = ADAPTER_KINDS[cfg.tuning]
            model = kind.apply(model, kind.section_of(cfg), self.tokenizer)
            if cfg.method == "reward":
                head = model.score if hasattr(model, "score") else model.classifier
                head.requires_grad_(True)
        return model.train()

    def _reference(self, model: nn.Module, frozen: nn.Module | None) -> Callable[[], Any]:
        """How the reference computes: the policy with its adapter off, or the frozen copy (full tuning)."""
        if frozen is not None:
            return lambda: _Using(frozen)
        return lambda: _Using(model, disable=True)

    # ------------------------------------------------------------------------------------- preference data

    def _preference_plan(self, model: nn.Module) -> Plan:
        cfg = self.cfg
        if isinstance(model.config, DecoderConfig):
            ds = PreparedDataset(
                ensure_prepared(cfg.data.dataset, tokenizer=cfg.data.tokenizer or self.base_dir)
            )
            if ds.manifest["kind"] != "preference":
                raise LmforgeError(
                    f"{ds.path} holds {ds.manifest['kind']} data; align {cfg.method} reads preference pairs "
                    "(prompt/chosen/rejected or HH-RLHF records)"
                )
            if ds.manifest["tokenizer"]["vocab_size"] > model.config.vocab_size:
                raise LmforgeError(
                    f"{ds.path} was tokenised with a larger vocabulary than {self.base_dir}'s model"
                )
            self.subsets, data_id = ds.manifest.get("subsets") or {}, ds.id
            # A reward model pools each row's last token that is not its config's pad id: pad with that one.
            pad = model.config.pad_token_id if cfg.method == "reward" else self.tokenizer.pad_id
            (train, self.stats), (val, _) = (self._pairs(ds, split, pad or 0) for split in ("train", "val"))
        else:  # an encoder scores "[CLS] prompt [SEP] response [SEP]": pairs straight from the raw records
            (train, val), self.subsets, self.stats, data_id = _encoder_pairs(
                Path(cfg.data.dataset), self.tokenizer, cfg.train.seq_len
            )
        if len(train) == 0:
            raise LmforgeError(
                f"{cfg.data.dataset}: no training pair has a reply within train.seq_len={cfg.train.seq_len}"
            )
        self.val = val
        B = cfg.train.micro_batch_size
        self.val_batches = [val.batch(np.arange(i, min(i + B, len(val))), torch.Generator())
                            for i in range(0, min(len(val), cfg.train.eval_batches * B), B)]  # fmt: skip
        objective = (
            _reward_objective(cfg.reward.margin) if cfg.method == "reward" else _preference_objective(cfg)
        )
        lineage = {
            "method": cfg.method,
            "tuning": cfg.tuning,
            "base_fingerprint": base_fingerprint(self.base_dir),
        }
        return Plan(
            model=model,
            batches=EpochSampler(fixed(train), B, seed=cfg.train.seed),
            objective=objective,
            parent=str(self.base_dir),
            data=[data_id],
            eval_batches=(lambda: self.val_batches) if self.val_batches else None,
            lineage=lineage,
        )

    def _pairs(self, ds: PreparedDataset, split: str, pad: int) -> tuple[_PairRows, dict[str, int]]:
        """A split's pairs as rows, with each pair's subset and (methods with a reference) its reference log-probs."""
        chosen = list(ds.documents(split, "chosen"))
        rejected = list(ds.documents(split, "rejected"))
        rows, counts = preference_rows([((c.ids, c.mask), (r.ids, r.mask)) for c, r in zip(chosen, rejected, strict=True)],
                                       self.cfg.train.seq_len, pad)  # fmt: skip
        labels = [-1 if c.label is None else c.label for c in chosen]
        rows["subset"] = torch.tensor(labels, dtype=torch.int64)[rows["pair"]] if labels else rows["pair"]
        pairs = _PairRows(rows)
        method = PREFERENCE_LOSSES.get(self.cfg.method)
        if method is not None and method.needs_reference and len(pairs):
            pairs.rows.update(self._reference_logprobs(pairs))
        stats = {"pairs": len(chosen), "pairs_kept": len(pairs), "pairs_cut": counts["cut"],
                 "pairs_dropped": counts["dropped"]}  # fmt: skip
        return pairs, stats

    @torch.no_grad()
    def _reference_logprobs(self, pairs: _PairRows) -> dict[str, Tensor]:
        """Σ log-prob of each pair's chosen and rejected reply under the reference, computed once (N,) each."""
        out: dict[str, list[Tensor]] = {"ref_chosen": [], "ref_rejected": []}
        with self.reference_model() as ref:
            device = next(ref.parameters()).device
            for start in range(0, len(pairs), 32):
                b = pairs.batch(np.arange(start, min(start + 32, len(pairs))), torch.Generator())
                for side in ("chosen", "rejected"):
                    batch = {
                        "input_ids": b[f"{side}_input_ids"].to(device),
                        "targets": b[f"{side}_targets"].to(device),
                    }
                    out[f"ref_{side}"].append(token_logprobs(ref, batch).sum(-1).cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    # ---------------------------------------------------------------------------------------------- RL data

    def _rl_plan(self, model: nn.Module) -> Plan:
        cfg = self.cfg
        groups = set(cfg.data.prompt_groups) if cfg.data.prompt_groups else None
        items = read_prompts(cfg.data.prompts, cfg.data.prompts_limit, groups)
        if not items:
            raise LmforgeError(f"data.prompts {cfg.data.prompts}: no prompt records (of groups {groups})")
        rows = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
        if rows % cfg.rl.samples:
            raise LmforgeError(
                f"a step trains on train.micro_batch_size x train.grad_accum_steps = {rows} completions, which must "
                f"be a whole number of groups of rl.samples={cfg.rl.samples}"
            )
        self.rewards = [reward_fn(spec, model) for spec in cfg.rl.reward]
        value_head = None
        if cfg.method == "ppo":
            value_head = model.value_head = ValueHead(model.config.hidden_size).to(
                next(model.parameters()).device
            )
        self.batches = RolloutBatches(model, self.tokenizer, items, self.rewards, self.reference_model, cfg,
                                      value_head)  # fmt: skip
        objective = ppo_objective(cfg, value_head) if value_head is not None else grpo_objective(cfg)
        lineage = {"method": cfg.method, "tuning": cfg.tuning, "base_fingerprint": base_fingerprint(self.base_dir),
                   "rewards": list(cfg.rl.reward)}  # fmt: skip
        return Plan(
            model=model,
            batches=self.batches,
            objective=objective,
            parent=str(self.base_dir),
            data=[str(cfg.data.prompts)],
            lineage=lineage,
            on_record=self.batches.report,
        )

    # ------------------------------------------------------------------------------------- measurements

    def before(self, plan: Plan) -> dict[str, Any]:
        """The starting model: reference perplexity, validation metrics, greedy answers to the eval prompts."""
        model = plan.model
        with disable_adapter(model):
            before: dict[str, Any] = {
                "perplexity": perplexity(model, self.ref_batches) if self.ref_batches else None,
                "val": _evaluate(model, plan) if plan.eval_batches else {},
            }
            if self.eval_items and self.lm:
                before["answers"] = self._answers(model)
        return before

    def _answers(self, model: nn.Module) -> list[dict[str, Any]]:
        """Greedy answers to the eval prompts, with their training rewards (grpo, ppo)."""
        texts, finished = _greedy(model, self.tokenizer, self.eval_items, self.cfg.eval.max_new_tokens)
        out = [{"prompt": it.messages[-1]["content"], "answer": t, "finished": f}
               for it, t, f in zip(self.eval_items, texts, finished, strict=True)]  # fmt: skip
        if self.cfg.method in RL_METHODS:
            scores = sum(
                np.asarray(r(self.eval_items, texts, finished), dtype=np.float64) for r in self.rewards
            )
            for a, s in zip(out, scores, strict=True):
                a["reward"] = float(s)
        return out

    def finish(self, plan: Plan, model: nn.Module, summary: dict[str, Any], before: dict[str, Any]) -> Output:
        """What alignment changed: held-out pair accuracy, rewards, win rate, forgetting; the output dir."""
        cfg, out = self.cfg, self.out
        model.eval()
        results: dict[str, Any] = {
            "method": cfg.method,
            "tuning": cfg.tuning,
            "base": str(self.base_dir),
            "trainable_params": self.trainable,
            "total_params": self.total,
            "steps": summary["steps"],
            "tokens": summary["tokens"],
            "train_loss": summary["loss"],
            "val_before": before["val"],
            "val": summary["val"],
            "tokens_per_s": summary["tokens_per_s"],
            "peak_memory_mb": peak_memory(next(model.parameters()).device) / 2**20,
        }
        if cfg.method not in RL_METHODS:
            results.update(dataset=plan.data[0], **self.stats)
            if len(self.val):
                results["held_out"] = self._held_out(model)
        if cfg.method in RL_METHODS:
            results["rollouts"] = self.batches.summary()
        after_ppl = perplexity(model, self.ref_batches) if self.ref_batches else None
        if cfg.method == "reward":
            results["forgetting"] = {
                "skipped": "a reward model has no language-model head to measure perplexity with"
            }
        else:
            results["forgetting"] = forgetting_record(before["perplexity"], after_ppl, self.reference,
                                                      self.ref_batches, cfg)  # fmt: skip
        if "answers" in before:
            results["eval"] = self._compare(model, before["answers"])
        if getattr(model, "value_head", None) is not None:
            del model.value_head  # PPO's critic is not part of the policy
        model = model.cpu()
        if cfg.method == "reward" or cfg.tuning == "full":
            if cfg.tuning == "lora":  # the new head trains with the adapter: one plain model holds both
                model = merge_lora(model)
            target = save_model(model, out / "model")
        else:
            kind = ADAPTER_KINDS[cfg.tuning]
            target = save_adapter(model, cfg.tuning, kind.section_of(cfg), out / "adapter", self.base_dir)
        results["output"] = str(target)
        return Output(results, target)

    def _held_out(self, model: nn.Module) -> dict[str, Any]:
        """Accuracy (chosen scored above rejected, 95% interval) and mean margin on every held-out pair, overall
        and per subset: the reward model's scores, or the implicit rewards β (log π − log π_ref) of the policy."""
        device = next(model.parameters()).device
        margins, subsets = [], []
        with torch.no_grad():
            for start in range(0, len(self.val), 32):
                b = {k: v.to(device) for k, v in self.val.batch(np.arange(start, min(start + 32, len(self.val))),
                                                                torch.Generator()).items()}  # fmt: skip
                if self.cfg.method == "reward":
                    chosen, rejected = _scores(model, b)
                    margins.append((chosen - rejected).cpu())
                else:
                    margins.append(_preference_terms(self.cfg, model, b)[1]["rewards/margin"].cpu())
                subsets.append(b["subset"].cpu())
        margin, subset = torch.cat(margins), torch.cat(subsets)

        def summary(select: Tensor) -> dict[str, Any]:
            hits, n = int((margin[select] > 0).sum()), int(select.sum())
            return {"pairs": n, "accuracy": hits / max(n, 1), "interval": wilson(hits, n),
                    "mean_margin": float(margin[select].mean()) if n else math.nan}  # fmt: skip

        result = summary(torch.ones_like(subset, dtype=torch.bool))
        if self.subsets:
            result["by_subset"] = {name: summary(subset == int(i)) for i, name in self.subsets.items()}
        return result

    def _compare(self, model: nn.Module, before: list[dict[str, Any]]) -> dict[str, Any]:
        """The eval prompts' greedy answers after training against before: rewards and the judge's win rate."""
        after = self._answers(model)
        result: dict[str, Any] = {"prompts": len(after), "examples": [
            {"prompt": b["prompt"], "before": b["answer"], "after": a["answer"]} for b, a in zip(before[:3], after[:3], strict=True)]}  # fmt: skip
        if after and "reward" in after[0]:
            result["reward_before"] = float(np.mean([a["reward"] for a in before]))
            result["reward_after"] = float(np.mean([a["reward"] for a in after]))
        if self.judge is not None:
            judge = self.judge
            pairs = [(it.messages, a["answer"]) for it, a in zip(self.eval_items, after, strict=True)]
            old = [(it.messages, b["answer"]) for it, b in zip(self.eval_items, before, strict=True)]
            new_scores, old_scores = judge.score(pairs), judge.score(old)
            wins = float((new_scores > old_scores).sum() + 0.5 * (new_scores == old_scores).sum())
            result["judge"] = str(self.cfg.eval.judge)
            result["win_rate"] = wins / max(len(pairs), 1)
            result["win_rate_interval"] = wilson(round(wins), len(pairs))
        return result

    def tokenizer_dir(self) -> Path:
        """The starting model's tokenizer."""
        return self.base_dir

    def after(self, results: dict[str, Any]) -> None:
        """The forgetting gate."""
        forgetting_gate(results["forgetting"], self.cfg.forgetting.max_increase_pct, self.out)


# ------------------------------------------------------------------------------------------- helpers


class _Using:
    """`with _Using(model, disable=...)`: the reference model in eval mode (its adapter off), mode restored."""

    def __init__(self, model: nn.Module, disable: bool = False) -> None:
        self.model, self.disable = model, disable

    def __enter__(self) -> nn.Module:
        self.was_training = self.model.training
        self.context = disable_adapter(self.model) if self.disable else nullcontext(self.model)
        self.context.__enter__()
        return self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.context.__exit__(*exc)
        self.model.train(self.was_training)


class _PairRows(Rows):
    """Preference rows; a batch keeps only the columns its longest reply uses (chosen and rejected alike, so
    one forward reads both)."""

    def batch(self, rows: np.ndarray, generator: torch.Generator) -> Batch:
        """The rows `rows`, cut to their longest sample."""
        b = super().batch(rows, generator)
        n = int(torch.maximum(b["chosen_length"], b["rejected_length"]).max()) if len(rows) else 0
        return {k: v[:, :n] if v.dim() == 2 else v for k, v in b.items()}


def _scores(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """A reward model's scalar scores of each pair's chosen and rejected rows (B,), (B,), one forward."""
    both = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]])
            for k in ("input_ids", "attention_mask", "token_type_ids") if f"chosen_{k}" in batch}  # fmt: skip
    scores = model(**both)[:, 0].float()  # (2B,): a decoder pools its last non-pad token, an encoder [CLS]
    B = len(batch["pair"])
    return scores[:B], scores[B:]


def _reward_objective(margin: float) -> Objective:
    """Bradley–Terry on a scalar head: −log σ(r_chosen − r_rejected − margin), with accuracy and margin logged."""

    def counts(batch: Batch) -> Counts:
        return {"pairs": len(batch["pair"])}

    def losses(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        chosen, rejected = _scores(model, batch)
        m = torch.full_like(chosen, margin) if margin else None
        diff = (chosen - rejected).detach()
        return {"pairs": bradley_terry_loss(chosen, rejected, m).sum(), "accuracy": (diff > 0).float().sum(),
                "margin": diff.sum()}  # fmt: skip

    def metrics(model: nn.Module, batch: Batch) -> Metrics:
        with torch.no_grad():
            terms = losses(model, batch)
        B = float(len(batch["pair"]))
        return {"reward_loss": (float(terms["pairs"]), B), "accuracy": (float(terms["accuracy"]), B),
                "margin": (float(terms["margin"]), B)}  # fmt: skip

    return Objective(counts, losses, metrics, stat_unit="pairs")


def _preference_terms(
    cfg: AlignConfig, model: nn.Module, batch: Batch
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Per-pair losses (B,), metrics (B,) each (rewards/chosen, rewards/rejected, rewards/margin,
    rewards/accuracy) and the chosen replies' summed log-probs (B,), from one forward over 2B rows."""
    rows = {k: torch.cat([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ("input_ids", "targets")}
    sums = token_logprobs(model, rows).sum(-1)  # (2B,): chosen rows first, then rejected
    lengths = (rows["targets"] != IGNORE_INDEX).sum(-1)  # (2B,)
    B = len(batch["pair"])
    losses, metrics = preference_loss(
        cfg.method, sums[:B], sums[B:], batch.get("ref_chosen"), batch.get("ref_rejected"), lengths[:B],
        lengths[B:], beta=cfg.beta, label_smoothing=cfg.label_smoothing, gamma=cfg.gamma,
    )  # fmt: skip
    return losses, metrics, sums[:B]


def _preference_objective(cfg: AlignConfig) -> Objective:
    """The preference loss of `cfg.method` (+ ORPO's SFT term), with the implicit rewards logged each step."""
    orpo = cfg.method == "orpo"

    def counts(batch: Batch) -> Counts:
        units = {"pairs": len(batch["pair"])}
        if orpo:  # ORPO's SFT term: the chosen replies' negative log-likelihood per token
            units["nll"] = int((batch["chosen_targets"] != IGNORE_INDEX).sum())
        return units

    def losses(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        per_pair, metrics, chosen = _preference_terms(cfg, model, batch)
        terms = {"pairs": per_pair.sum(), **{k: v.detach().float().sum() for k, v in metrics.items()}}
        if orpo:
            terms["nll"] = -chosen.sum()
        return terms

    def metrics(model: nn.Module, batch: Batch) -> Metrics:
        with torch.no_grad():
            terms = losses(model, batch)
        B = float(len(batch["pair"]))
        out: Metrics = {f"{cfg.method}_loss": (float(terms["pairs"]), B)}
        out.update({k.replace("rewards/", "reward_"): (float(v), B) for k, v in terms.items() if "/" in k})
        return out

    return Objective(counts, losses, metrics, stat_unit="pairs")


def _evaluate(model: nn.Module, plan: Plan) -> dict[str, float]:
    """The validation metrics of `plan` for `model` now."""
    return evaluate(model, plan.objective, plan.eval_batches())


def _greedy(
    model: nn.Module, tokenizer: Tokenizer, items: list[PromptItem], max_new_tokens: int
) -> tuple[list[str], list[bool]]:
    """Greedy answers to `items` (batched, the engine) and whether each ended its turn; the model's mode kept."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import GenerationConfig

    was_training = model.training
    try:
        cfg = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens)
        completions = Engine(model, tokenizer).generate(
            prompt_ids(model, tokenizer, items, max_new_tokens), cfg
        )
    finally:
        model.train(was_training)
    return [c.text for c in completions], [c.finish_reason == "stop" for c in completions]


def _encoder_pairs(
    path: Path, tokenizer: Tokenizer, seq_len: int
) -> tuple[tuple[_PairRows, _PairRows], dict[str, str], dict[str, int], str]:
    """An encoder reward model's pairs from raw preference records: (train, val) rows of `pair_inputs` (the same
    encoding `RewardModel` scores with), the subset names, counts, and the data's id (sha256 of the files).

    The split is `data prepare`'s: a salted hash of each record's text, its default fraction and seed."""
    from lmforge.data.formats import detect_format, to_examples
    from lmforge.data.prepare import PrepareConfig, _peek_records, input_digests
    from lmforge.data.readers import iter_files, read_records
    from lmforge.data.workers import example_texts, in_val

    if (path / "manifest.json").is_file():
        raise LmforgeError(
            f"data.dataset {path} is prepared (token ids for a decoder's chat template); an encoder reward model "
            "reads the raw preference records: give the .jsonl file"
        )
    files = list(iter_files([path]))
    examples = [
        ex for f in files for ex in to_examples(read_records(f), detect_format(_peek_records(f, None)))
    ]
    if any(ex.kind != "preference" for ex in examples):
        raise LmforgeError(
            f"{path}: expected preference records (prompt/chosen/rejected or HH-RLHF transcripts)"
        )
    defaults = PrepareConfig(inputs=files)
    val = in_val(["\n".join(example_texts(ex)) for ex in examples], defaults.val_fraction, defaults.seed)
    names = sorted({ex.label_name for ex in examples if ex.label_name is not None})
    subset_id = {name: i for i, name in enumerate(names)}
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def rows(picked: list) -> _PairRows:
        out: dict[str, Tensor] = {
            "pair": torch.arange(len(picked)),
            "subset": torch.tensor([subset_id.get(ex.label_name, -1) for ex in picked], dtype=torch.int64),
        }
        sides = {side: [pair_inputs(tokenizer, True, ex.messages, getattr(ex, side), seq_len) for ex in picked]
                 for side in ("chosen", "rejected")}  # fmt: skip
        T = max((len(e["input_ids"]) for encoded in sides.values() for e in encoded), default=0)
        for side, encoded in sides.items():
            ids = torch.full((len(encoded), T), pad, dtype=torch.int64)  # (N, T), right-padded
            types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
            for i, e in enumerate(encoded):
                n = len(e["input_ids"])
                ids[i, :n], types[i, :n], mask[i, :n] = (
                    torch.tensor(e["input_ids"]),
                    torch.tensor(e["token_type_ids"]),
                    1,
                )
            out.update({f"{side}_input_ids": ids, f"{side}_token_type_ids": types, f"{side}_attention_mask": mask,
                        f"{side}_length": mask.sum(1)})  # fmt: skip
        return _PairRows(out)

    train = rows([ex for ex, v in zip(examples, val, strict=True) if not v])
    held_out = rows([ex for ex, v in zip(examples, val, strict=True) if v])
    digest = hashlib.sha256("".join(sorted(input_digests(files).values())).encode()).hexdigest()
    stats = {"pairs": len(examples), "pairs_kept": len(examples), "pairs_cut": 0, "pairs_dropped": 0}
    return (train, held_out), {str(i): n for n, i in subset_id.items()}, stats, digest
