"""Training objectives: what a step minimises, as small pure losses chosen by name from `OBJECTIVES`.

How the loop uses an objective (gradient accumulation normalised over the whole step, not per micro-batch):

    totals = total_counts(objective.counts(b) for b in micro_batches)  # no forward pass; all-reduce if DDP
    for b in micro_batches:
        normalized_loss(objective.losses(model, b), totals).backward()

`losses` returns every term SUMMED over its units (target tokens, masked positions, sentence pairs), so the
step minimises Σ_term (Σ_micro-batches summed loss) / (units of the term in the step): exactly the full
batch's mean, however unevenly the units fall into micro-batches. Averaging each micro-batch first weights a
micro-batch with 3 target tokens as much as one with 300 — the bug peers shipped.

Validation reads `Objective.evaluate`: (numerator, denominator) sums from one forward pass, which the loop adds
up over batches (and ranks) and divides at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.model.decoder import IGNORE_INDEX
from lmforge.model.encoder import PreTrainingOutput
from lmforge.train.logprobs import token_logprobs

Batch = dict[str, Tensor]
"""A batch: named tensors, (B, T) or (B,), as the data builders of `lmforge.data.batches` make them."""
Counts = dict[str, int]
"""Units each loss term averages over: {term: count}."""
Metrics = dict[str, tuple[float, float]]
"""Validation sums: {name: (numerator, denominator)}, e.g. {"mlm_accuracy": (hits, masked positions)}."""


@dataclass(frozen=True)
class Objective:
    """One training objective: how many units each loss term has, the summed losses, validation sums."""

    counts: Callable[[Batch], Counts]
    """Units per loss term, from the batch alone (no forward pass), so a step can total them first."""
    losses: Callable[[nn.Module, Batch], dict[str, Tensor]]
    """Each term's loss summed over its units (fp32 scalars with grad), one forward pass; keys as `counts`."""
    metrics: Callable[[nn.Module, Batch], Metrics] | None = None
    """Validation sums from one forward pass, the loss terms included; None: the loss terms only."""
    stat_unit: str | None = None
    """The term whose units average the statistics: `losses` may return, beside the terms of `counts`, summed
    statistics (e.g. DPO's "rewards/chosen"), which the loop logs each step divided by this term's units."""

    def evaluate(self, model: nn.Module, batch: Batch) -> Metrics:
        """Validation sums of one batch: `metrics`, or else each term as {"<term>_loss": (summed loss, units)}."""
        if self.metrics is not None:
            return self.metrics(model, batch)
        with torch.no_grad():
            losses = self.losses(model, batch)
        return {f"{t}_loss": (float(losses[t]), float(n)) for t, n in self.counts(batch).items()}


# ------------------------------------------------------------------------------------------ pure losses


def summed_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Σ −log softmax(logits)[label] over the positions whose label is not IGNORE_INDEX: an fp32 scalar.

    logits (..., V), labels (...): (B, T, V)/(B, T) for mlm, (B, 2)/(B,) for nsp; clm computes the same sum
    inside `CausalLM.forward(..., reduction="sum")`. Summed, not averaged: the loop divides by the step's units.
    """
    flat = logits.float().flatten(0, -2)  # (N, V), fp32 for a stable log-softmax
    return F.cross_entropy(flat, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def correct_predictions(logits: Tensor, labels: Tensor) -> tuple[float, float]:
    """(argmax hits, counted positions) over the labels that are not IGNORE_INDEX: an accuracy's two sums."""
    counted = labels != IGNORE_INDEX
    hits = (logits.argmax(-1) == labels) & counted
    return float(hits.sum()), float(counted.sum())


def count_units(labels: Tensor) -> int:
    """Number of labels that carry loss (not IGNORE_INDEX)."""
    return int((labels != IGNORE_INDEX).sum())


def total_counts(counts: Iterable[Counts]) -> Counts:
    """Units per term over all the micro-batches of a step."""
    totals: Counts = {}
    for c in counts:
        for term, n in c.items():
            totals[term] = totals.get(term, 0) + n
    return totals


def normalized_loss(losses: dict[str, Tensor], totals: Counts) -> Tensor:
    """A micro-batch's share of the step loss: Σ_term losses[term] / totals[term].

    Summed over the step's micro-batches this is Σ_term (mean loss of the term over the whole step), e.g.
    BERT's mlm mean + nsp mean. A term with no unit in the whole step adds 0 (its summed loss is 0), not NaN.
    """
    return sum(losses[term] / max(n, 1) for term, n in totals.items())  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- objectives


def _clm_counts(batch: Batch) -> Counts:
    return {"clm": count_units(batch["targets"])}


def _clm_losses(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    # The one per-token log-prob path that DPO, RL and evaluation read too.
    return {"clm": -token_logprobs(model, batch).sum()}


clm = Objective(_clm_counts, _clm_losses)
"""Next-token prediction: `input_ids` (B, T), `targets` (B, T) (IGNORE_INDEX = no loss), optional
`attention_mask`, `position_ids`, `segment_ids` (packed samples); one term "clm" over the target tokens."""

# Which batch key holds each encoder term's labels: masked positions (B, T), sentence-pair labels (B,).
ENCODER_LABELS = {"mlm": "labels", "nsp": "next_sentence_label"}


def _encode(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    """One encoder forward: {"mlm": (B, T, V)} from BertForMaskedLM, plus {"nsp": (B, 2)} from BertForPreTraining."""
    out = model(
        batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        token_type_ids=batch.get("token_type_ids"),
    )
    if isinstance(out, PreTrainingOutput):
        return {"mlm": out.mlm_logits, "nsp": out.nsp_logits}
    return {"mlm": out}  # BertForMaskedLM returns the MLM logits alone


def encoder_objective(*terms: str) -> Objective:
    """BERT pretraining over some of its terms ("mlm", "nsp"), every term from one forward pass."""

    def counts(batch: Batch) -> Counts:
        return {t: count_units(batch[ENCODER_LABELS[t]]) for t in terms}

    def logits_of(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits = _encode(model, batch)
        missing = [t for t in terms if t not in logits]
        if missing:
            raise LmforgeError(
                f"objective {'+'.join(terms)!r} needs the {'/'.join(missing)} head; "
                f"{type(model).__name__} has none (use BertForPreTraining)"
            )
        return logits

    def losses(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits = logits_of(model, batch)
        return {t: summed_cross_entropy(logits[t], batch[ENCODER_LABELS[t]]) for t in terms}

    def metrics(model: nn.Module, batch: Batch) -> Metrics:
        with torch.no_grad():
            logits = logits_of(model, batch)
        sums: Metrics = {}
        for t in terms:
            labels = batch[ENCODER_LABELS[t]]
            sums[f"{t}_loss"] = (float(summed_cross_entropy(logits[t], labels)), float(count_units(labels)))
            sums[f"{t}_accuracy"] = correct_predictions(logits[t], labels)
        return sums

    return Objective(counts, losses, metrics)


def _classify_counts(batch: Batch) -> Counts:
    return {"cls": len(batch["labels"])}


def _classify_logits(model: nn.Module, batch: Batch) -> Tensor:
    """(B, num_labels) from a *ForSequenceClassification model (BERT or a decoder)."""
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"))


def _classify_losses(model: nn.Module, batch: Batch) -> dict[str, Tensor]:
    return {"cls": summed_cross_entropy(_classify_logits(model, batch), batch["labels"])}


def _classify_metrics(model: nn.Module, batch: Batch) -> Metrics:
    with torch.no_grad():
        logits = _classify_logits(model, batch)
    labels = batch["labels"]
    return {
        "cls_loss": (float(summed_cross_entropy(logits, labels)), float(len(labels))),
        "cls_accuracy": correct_predictions(logits, labels),
    }


classify = Objective(_classify_counts, _classify_losses, _classify_metrics)
"""Sequence classification: `input_ids` (B, T), `attention_mask` (B, T), `labels` (B,); one term "cls" over
the rows, and validation accuracy."""

OBJECTIVES: dict[str, Objective] = {
    "clm": clm,
    # `input_ids` already masked, `labels` (B, T) = original ids at masked positions, IGNORE_INDEX elsewhere,
    # `attention_mask`, optional `token_type_ids`. Works with BertForMaskedLM and BertForPreTraining.
    "mlm": encoder_objective("mlm"),
    # `input_ids`, `token_type_ids`, `attention_mask`, `next_sentence_label` (B,): 0 = B follows A, 1 = random.
    "nsp": encoder_objective("nsp"),
    # Both batches' keys; the loss is BERT's: mean over masked positions + mean over pairs.
    "mlm+nsp": encoder_objective("mlm", "nsp"),
    "classify": classify,
}
"""Every objective by the name a config gives."""
