"""Objectives: hand-derived losses, unit counts, and step normalisation over uneven micro-batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmforge.data.batches import collate, mask_tokens, nsp_pairs
from lmforge.errors import LmforgeError
from lmforge.model.configs import preset
from lmforge.model.decoder import IGNORE_INDEX
from lmforge.model.hf import build_model
from lmforge.train.objectives import (
    OBJECTIVES,
    correct_predictions,
    normalized_loss,
    summed_cross_entropy,
    total_counts,
)

X = IGNORE_INDEX
V = 256  # vocabulary of the tiny presets


def tiny(name: str, architecture: str | None = None) -> torch.nn.Module:
    """A tiny preset model, fp32, without dropout (so forward passes are deterministic)."""
    torch.manual_seed(0)  # build_model's init draws from the global RNG
    overrides = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if "bert" in name else {}
    return build_model(preset(name, **overrides), architecture)


# ------------------------------------------------------------------------------------------ pure losses


def test_summed_cross_entropy_uniform_logits():
    """Uniform logits over V = 4: p(any label) = 1/4, so each counted position costs -log(1/4) = log 4.

    Labels [[2, X, 0]]: 2 counted positions → 2 log 4 = 2.7725887; the X position adds nothing.
    """
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[2, X, 0]])
    assert summed_cross_entropy(logits, labels).item() == pytest.approx(2 * math.log(4), abs=1e-6)


def test_summed_cross_entropy_worked_example():
    """Logits [ln 3, 0, 0, 0] at both positions: softmax = [3, 1, 1, 1] / 6 = [1/2, 1/6, 1/6, 1/6].

    Label 0 costs -log(1/2) = log 2, label 1 costs -log(1/6) = log 6; sum = log 12 = 2.4849066.
    Accuracy: argmax is 0 at both positions, so 1 hit out of 2.
    """
    logits = torch.tensor([[math.log(3), 0.0, 0.0, 0.0]] * 2)  # (2, 4)
    labels = torch.tensor([0, 1])
    assert summed_cross_entropy(logits, labels).item() == pytest.approx(math.log(12), abs=1e-6)
    assert correct_predictions(logits, labels) == (1.0, 2.0)


def test_summed_cross_entropy_upcasts_bf16_logits():
    """bf16 logits are upcast before the log-softmax: the result is fp32."""
    loss = summed_cross_entropy(torch.zeros(2, 4, dtype=torch.bfloat16), torch.tensor([1, 2]))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2 * math.log(4), abs=1e-6)


def test_normalized_loss_sums_term_means():
    """Two micro-batches, totals mlm 4 + 6 = 10, nsp 2 + 2 = 4.

    Summed losses mlm 3.0 and 7.0, nsp 1.0 and 0.6: the step loss is (3 + 7) / 10 + (1 + 0.6) / 4
    = 1.0 + 0.4 = 1.4. A term with no unit in the step contributes 0, not NaN.
    """
    counts = [{"mlm": 4, "nsp": 2}, {"mlm": 6, "nsp": 2}]
    losses = [
        {"mlm": torch.tensor(3.0), "nsp": torch.tensor(1.0)},
        {"mlm": torch.tensor(7.0), "nsp": torch.tensor(0.6)},
    ]
    totals = total_counts(counts)
    assert totals == {"mlm": 10, "nsp": 4}
    step = sum(normalized_loss(lo, totals) for lo in losses)
    assert step.item() == pytest.approx(1.4, abs=1e-6)
    assert normalized_loss({"mlm": torch.tensor(0.0)}, {"mlm": 0}).item() == 0.0


# ----------------------------------------------------------------------------------------------- clm


def clm_batch() -> dict[str, torch.Tensor]:
    """8 rows of 12 tokens; row r ignores its first r targets, so the rows have 12, 11, ..., 5 targets."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(V, (8, 13), generator=g)
    targets = ids[:, 1:].clone()
    for r in range(8):
        targets[r, :r] = X
    return {"input_ids": ids[:, :-1], "targets": targets}


def test_clm_uniform_logits_cost_log_vocab():
    """With lm_head zeroed, the logits are 0: uniform over V = 256, so each target costs log 256 = 5.5451774.

    Targets: 12 + 11 + ... + 5 = 68 counted tokens → summed loss 68 log 256 = 377.0720.
    """
    model = tiny("tiny-llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    batch = clm_batch()
    assert OBJECTIVES["clm"].counts(batch) == {"clm": 68}
    loss = OBJECTIVES["clm"].losses(model, batch)["clm"]
    assert loss.item() == pytest.approx(68 * math.log(256), rel=1e-6)
    assert OBJECTIVES["clm"].evaluate(model, batch) == {"clm_loss": (pytest.approx(68 * math.log(256)), 68.0)}


def test_clm_sum_over_count_is_the_decoder_mean():
    """losses / counts is the decoder's mean loss, and the sum equals summed_cross_entropy of its logits."""
    model = tiny("tiny-llama")
    batch = clm_batch()
    objective = OBJECTIVES["clm"]
    total = objective.losses(model, batch)["clm"]
    mean = model(batch["input_ids"], batch["targets"])
    assert (total / objective.counts(batch)["clm"]).item() == pytest.approx(mean.item(), rel=1e-6)
    logits = model(batch["input_ids"])
    reference = summed_cross_entropy(logits, batch["targets"])
    assert total.item() == pytest.approx(reference.item(), rel=1e-6)
    # The reduced loss runs the head on the counted positions only: the gradients must not notice.
    grads = torch.autograd.grad(total, list(model.parameters()))
    for ours, full in zip(grads, torch.autograd.grad(reference, list(model.parameters())), strict=True):
        torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ mlm / nsp


def bert_batch() -> dict[str, torch.Tensor]:
    """3 rows of 5 tokens; row 2 is padded after 3 tokens. Masked positions: 2 + 1 + 1 = 4."""
    return {
        "input_ids": torch.tensor([[2, 4, 9, 4, 3], [2, 7, 4, 8, 3], [2, 4, 3, 0, 0]]),
        "labels": torch.tensor([[X, 10, X, 11, X], [X, X, 12, X, X], [X, 13, X, X, X]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "token_type_ids": torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]]),
        "next_sentence_label": torch.tensor([0, 1, 1]),
    }


def zero_mlm_head(model: torch.nn.Module) -> None:
    """Make the MLM logits exactly 0: the head's LayerNorm outputs 0 and the decoder bias is 0."""
    head = model.cls.predictions
    with torch.no_grad():
        head.transform.LayerNorm.weight.zero_()
        head.transform.LayerNorm.bias.zero_()
        head.bias.zero_()


@pytest.mark.parametrize("architecture", ["BertForMaskedLM", "BertForPreTraining"])
def test_mlm_uniform_logits_cost_log_vocab(architecture):
    """Zero MLM logits: uniform over V = 256, each of the 4 masked positions costs log 256.

    Summed loss 4 log 256 = 22.180710; accuracy: argmax of all-zero logits is id 0, which no label is: 0 / 4.
    """
    model = tiny("tiny-bert", architecture)
    zero_mlm_head(model)
    batch = bert_batch()
    mlm = OBJECTIVES["mlm"]
    assert mlm.counts(batch) == {"mlm": 4}
    assert mlm.losses(model, batch)["mlm"].item() == pytest.approx(4 * math.log(256), rel=1e-6)
    metrics = mlm.evaluate(model, batch)
    assert metrics["mlm_loss"] == (pytest.approx(4 * math.log(256)), 4.0)
    assert metrics["mlm_accuracy"] == (0.0, 4.0)


def test_nsp_worked_example():
    """NSP head weight 0, bias [0, ln 3]: logits [0, ln 3] for every pair, softmax = [1/4, 3/4].

    Labels [0, 1, 1]: log 4 + 2 log(4/3) = log(4 * 16/9) = log(64/9) = 1.9616587 over 3 pairs.
    Accuracy: argmax is 1 everywhere, so 2 of 3. mlm+nsp gives both terms from one forward pass.
    """
    model = tiny("tiny-bert", "BertForPreTraining")
    zero_mlm_head(model)
    with torch.no_grad():
        model.cls.seq_relationship.weight.zero_()
        model.cls.seq_relationship.bias.copy_(torch.tensor([0.0, math.log(3)]))
    batch = bert_batch()
    nsp = OBJECTIVES["nsp"]
    assert nsp.counts(batch) == {"nsp": 3}
    assert nsp.losses(model, batch)["nsp"].item() == pytest.approx(math.log(64 / 9), rel=1e-6)
    assert nsp.evaluate(model, batch)["nsp_accuracy"] == (2.0, 3.0)

    both = OBJECTIVES["mlm+nsp"]
    assert both.counts(batch) == {"mlm": 4, "nsp": 3}
    losses = both.losses(model, batch)
    assert losses["mlm"].item() == pytest.approx(4 * math.log(256), rel=1e-6)
    assert losses["nsp"].item() == pytest.approx(math.log(64 / 9), rel=1e-6)
    # One step over this batch: mean mlm + mean nsp = log 256 + log(64/9) / 3 = 5.5451774 + 0.6538862.
    step = normalized_loss(losses, both.counts(batch))
    assert step.item() == pytest.approx(math.log(256) + math.log(64 / 9) / 3, rel=1e-6)
    assert set(both.evaluate(model, batch)) == {"mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"}


def test_nsp_needs_the_nsp_head():
    """nsp on a BertForMaskedLM (no pooler, no NSP head) is a clear error, not a KeyError."""
    with pytest.raises(LmforgeError, match="nsp head"):
        OBJECTIVES["mlm+nsp"].losses(tiny("tiny-bert", "BertForMaskedLM"), bert_batch())


def test_counts_need_no_model():
    """counts read the batch alone: the loop totals them before any forward pass."""
    assert OBJECTIVES["clm"].counts(clm_batch()) == {"clm": 68}
    assert OBJECTIVES["mlm+nsp"].counts(bert_batch()) == {"mlm": 4, "nsp": 3}
    assert OBJECTIVES["classify"].counts({"labels": torch.tensor([2, 0, 1])}) == {"cls": 3}
    assert set(OBJECTIVES) == {"clm", "mlm", "nsp", "mlm+nsp", "classify"}


def test_classify_sums_cross_entropy_and_counts_hits():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.5], [1.0, 1.5, 0.0]])  # argmax 0, 1, 1
    labels = torch.tensor([0, 1, 2])
    batch = {"input_ids": torch.zeros(3, 4, dtype=torch.long), "labels": labels}

    def model(input_ids, attention_mask=None):
        return logits

    loss = OBJECTIVES["classify"].losses(model, batch)["cls"]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    metrics = OBJECTIVES["classify"].evaluate(model, batch)
    assert metrics["cls_accuracy"] == (2.0, 3.0) and metrics["cls_loss"][1] == 3.0


# ---------------------------------------------------------------------- gradient accumulation property


def accumulate(model, objective, micro_batches) -> tuple[float, list[torch.Tensor]]:
    """The loop's step: total the units first, then backward each micro-batch's normalised loss."""
    model.zero_grad()
    totals = total_counts(objective.counts(b) for b in micro_batches)
    step = 0.0
    for b in micro_batches:
        loss = normalized_loss(objective.losses(model, b), totals)
        loss.backward()
        step += loss.item()
    return step, [p.grad.clone() for p in model.parameters()]


def assert_split_equals_full(model, objective, batch, counts_key):
    """4 micro-batches of 2 give the loss and gradients of 1 batch of 8 (fp32, 1e-6); per-micro means do not."""
    micro = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    units = [objective.counts(b)[counts_key] for b in micro]
    assert len(set(units)) == 4, f"micro-batches should have uneven units, got {units}"
    full_loss, full_grads = accumulate(model, objective, [batch])
    split_loss, split_grads = accumulate(model, objective, micro)
    assert split_loss == pytest.approx(full_loss, abs=1e-6)
    for g_full, g_split in zip(full_grads, split_grads, strict=True):
        torch.testing.assert_close(g_split, g_full, rtol=1e-6, atol=1e-6)
    # The peers' bug: the mean of per-micro-batch means is a different number on the same data.
    naive = sum(normalized_loss(objective.losses(model, b), objective.counts(b)).item() for b in micro) / 4
    assert abs(naive - full_loss) > 1e-4  # 100x the tolerance above


def test_clm_accumulation_matches_full_batch():
    """tiny-llama, rows with 12..5 targets: micro-batches have 23, 19, 15, 11 targets."""
    assert_split_equals_full(tiny("tiny-llama"), OBJECTIVES["clm"], clm_batch(), "clm")


def test_mlm_nsp_accumulation_matches_full_batch():
    """tiny BertForPreTraining on real NSP pairs, masked with mask_tokens: uneven masked counts per micro-batch."""
    rng = np.random.default_rng(0)
    docs = [[rng.integers(5, V, size=int(rng.integers(3, 9))) for _ in range(6)] for _ in range(6)]
    pairs = nsp_pairs(docs, max_len=24, cls_id=2, sep_id=3, rng=rng)[:8]
    batch = collate(pairs, pad_id=0)
    special = torch.isin(batch["input_ids"], torch.tensor([0, 2, 3]))
    g = torch.Generator().manual_seed(5)
    batch["input_ids"], batch["labels"] = mask_tokens(
        batch["input_ids"], special, vocab_size=V, mask_id=4, rate=0.3, generator=g
    )
    model = tiny("tiny-bert", "BertForPreTraining")
    assert_split_equals_full(model, OBJECTIVES["mlm+nsp"], batch, "mlm")
