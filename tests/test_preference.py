"""Preference losses: hand-derived values, parity with TRL 1.16's own loss code, and the method registry."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.train.preference import (
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    hinge_loss,
    implicit_rewards,
    ipo_loss,
    orpo_loss,
    preference_loss,
    simpo_loss,
)


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), rtol=1e-5, atol=atol)


# Three pairs of SUMMED reply log-probs and their reply lengths. Log-ratios (policy − reference):
#   pair 0: chosen −10 − (−11) = 1,  rejected −12 − (−11) = −1  → margin 2
#   pair 1: chosen −5 − (−5) = 0,    rejected −4 − (−5) = 1     → margin −1 (the policy prefers rejected)
#   pair 2: chosen −1 − (−10) = 9,   rejected −30 − (−10) = −20 → margin 29
PI_C, PI_R, REF_C, REF_R = t(-10, -5, -1), t(-12, -4, -30), t(-11, -5, -10), t(-11, -5, -10)
N_C, N_R = torch.tensor([4, 2, 2]), torch.tensor([3, 5, 6])
BETA = 0.1  # β · margin = 0.2, −0.1, 2.9


# ------------------------------------------------------------------------------------------ hand-derived


def test_bradley_terry_by_hand():
    """r_c − r_r = 1.5, −1, 0; −log σ(d) = log(1 + e^(−d)); a margin m shifts d to d − m."""
    chosen, rejected = t(2.0, -1.0, 0.3), t(0.5, 0.0, 0.3)
    close(
        bradley_terry_loss(chosen, rejected),
        [math.log(1 + math.exp(-1.5)), math.log(1 + math.e), math.log(2)],
    )
    # margins 1, 0, −2: d − m = 0.5, −1, 2
    expected = [math.log(1 + math.exp(-0.5)), math.log(1 + math.e), math.log(1 + math.exp(-2))]
    close(bradley_terry_loss(chosen, rejected, t(1.0, 0.0, -2.0)), expected)


def test_dpo_by_hand():
    """β · margin = 0.2, −0.1, 2.9: −log σ(z) = log(1 + e^(−z)); cDPO ε = 0.1 adds ε's flipped-label term."""
    plain = [math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.1)), math.log(1 + math.exp(-2.9))]
    close(dpo_loss(PI_C, PI_R, REF_C, REF_R, BETA), plain)
    flipped = [math.log(1 + math.exp(0.2)), math.log(1 + math.exp(-0.1)), math.log(1 + math.exp(2.9))]
    smoothed = [0.9 * a + 0.1 * b for a, b in zip(plain, flipped, strict=True)]
    close(dpo_loss(PI_C, PI_R, REF_C, REF_R, BETA, label_smoothing=0.1), smoothed)
    # a pair the model does not yet separate (margin 0) costs log 2, whatever ε
    close(dpo_loss(t(-3), t(-7), t(-3), t(-7), BETA, label_smoothing=0.25), [math.log(2)])


def test_hinge_by_hand():
    """max(0, 1 − β · margin): 1 − 0.2, 1 + 0.1, and 0 once β · margin = 2.9 ≥ 1."""
    close(hinge_loss(PI_C, PI_R, REF_C, REF_R, BETA), [0.8, 1.1, 0.0])


def test_ipo_by_hand():
    """Average log-ratios: pair 0 chosen 1/4, rejected −1/3 → h = 7/12; pair 1: 0/2 − 1/5 = −0.2; pair 2:
    9/2 + 20/6 = 47/6. 1/(2β) = 5, so (h − 5)² = (−53/12)², 5.2², (17/6)²."""
    expected = [(53 / 12) ** 2, 5.2**2, (17 / 6) ** 2]
    close(ipo_loss(PI_C / N_C, PI_R / N_R, REF_C / N_C, REF_R / N_R, BETA), expected, atol=1e-4)
    losses, _ = preference_loss("ipo", PI_C, PI_R, REF_C, REF_R, N_C, N_R, beta=BETA)  # sums + counts
    close(losses, expected, atol=1e-4)


def test_simpo_by_hand():
    """β = 2, γ = 1 on average log-probs: 2 · 0.5 − 1 = 0 → log 2; 2 · 1.3 − 1 = 1.6; 2 · (−0.5) − 1 = −2."""
    losses = simpo_loss(t(-0.5, -0.2, -1.0), t(-1.0, -1.5, -0.5), beta=2.0, gamma=1.0)
    close(losses, [math.log(2), math.log(1 + math.exp(-1.6)), math.log(1 + math.exp(2))])


def test_orpo_by_hand():
    """odds(p) = p/(1 − p). p_c = 1/2, p_r = 1/5: odds 1 and 1/4, ratio 4, σ(log 4) = 4/5 → β log(5/4).
    p_c = 1/4, p_r = 3/4: odds 1/3 and 3, ratio 1/9, σ(log 1/9) = 1/10 → β log 10. Equal p → β log 2."""
    chosen, rejected = t(math.log(0.5), math.log(0.25), -2.0), t(math.log(0.2), math.log(0.75), -2.0)
    close(
        orpo_loss(chosen, rejected, beta=0.1), [0.1 * math.log(5 / 4), 0.1 * math.log(10), 0.1 * math.log(2)]
    )


def test_orpo_is_stable_at_the_ends():
    """Average log-probs near 0 (a near-certain reply) and far below: finite values and gradients."""
    chosen = torch.tensor([-1e-4, -40.0, 0.0], requires_grad=True)
    rejected = torch.tensor([-40.0, -1e-4, -3.0], requires_grad=True)
    loss = orpo_loss(chosen, rejected, beta=1.0)
    # pair 0: log odds(chosen) = −1e-4 − log(1 − e^(−1e-4)) ≈ 9.21, log odds(rejected) ≈ −40 → σ ≈ 1 − 3e-22
    log_odds_ratio = (-1e-4 - math.log(-math.expm1(-1e-4))) - (-40.0 - math.log1p(-math.exp(-40.0)))
    close(loss[:2], [math.log1p(math.exp(-log_odds_ratio)), math.log1p(math.exp(log_odds_ratio))], atol=1e-4)
    loss.sum().backward()
    assert (
        torch.isfinite(loss).all()
        and torch.isfinite(chosen.grad).all()
        and torch.isfinite(rejected.grad).all()
    )


def test_implicit_rewards():
    close(implicit_rewards(PI_C, REF_C, BETA), [0.1, 0.0, 0.9])


# -------------------------------------------------------------------------------------------- registry


def test_preference_loss_metrics_reference_method():
    """DPO: rewards β (π − π_ref) on sums; margin 0.2, −0.1, 2.9; accuracy where chosen > rejected."""
    losses, metrics = preference_loss(
        "dpo", PI_C, PI_R, REF_C, REF_R, N_C, N_R, beta=BETA, label_smoothing=0.1, gamma=99.0
    )
    close(losses, dpo_loss(PI_C, PI_R, REF_C, REF_R, BETA, label_smoothing=0.1))  # gamma is SimPO's alone
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"}
    close(metrics["rewards/chosen"], [0.1, 0.0, 0.9])
    close(metrics["rewards/rejected"], [-0.1, 0.1, -2.0])
    close(metrics["rewards/margin"], [0.2, -0.1, 2.9])
    close(metrics["rewards/accuracy"], [1.0, 0.0, 1.0])
    assert all(m.shape == (3,) for m in metrics.values())


def test_preference_loss_metrics_reference_free():
    """SimPO: sums ÷ tokens = averages; reward β · average log π (−2.5, −2.5, −0.5 and −4, −0.8, −5) · β."""
    losses, metrics = preference_loss("simpo", PI_C, PI_R, None, None, N_C, N_R, beta=2.0, gamma=1.0)
    avg_c, avg_r = t(-2.5, -2.5, -0.5), t(-4.0, -0.8, -5.0)
    close(losses, simpo_loss(avg_c, avg_r, beta=2.0, gamma=1.0))
    close(metrics["rewards/chosen"], 2.0 * avg_c)
    close(metrics["rewards/rejected"], 2.0 * avg_r)
    close(metrics["rewards/margin"], [3.0, -3.4, 9.0])
    close(metrics["rewards/accuracy"], [1.0, 0.0, 1.0])


def test_registry_flags():
    assert {m for m, s in PREFERENCE_LOSSES.items() if s.needs_reference} == {"dpo", "ipo", "hinge"}
    assert {m for m, s in PREFERENCE_LOSSES.items() if s.length_normalised} == {"ipo", "simpo", "orpo"}
    assert all(s.doc and "\n" not in s.doc for s in PREFERENCE_LOSSES.values())


@pytest.mark.parametrize("method", ["dpo", "ipo", "hinge"])
def test_reference_methods_refuse_a_missing_reference(method):
    with pytest.raises(LmforgeError, match=rf"'{method}' needs reference log-probs.*reference-free"):
        preference_loss(method, PI_C, PI_R, None, None, N_C, N_R, beta=BETA)


def test_preference_loss_refusals():
    with pytest.raises(LmforgeError, match="unknown preference method 'kto'"):
        preference_loss("kto", PI_C, PI_R, REF_C, REF_R, N_C, N_R, beta=BETA)
    with pytest.raises(LmforgeError, match=r"'orpo' averages .* pass chosen_tokens"):
        preference_loss("orpo", PI_C, PI_R, None, None, None, None, beta=BETA)


# -------------------------------------------------------------------------------------- parity with TRL
# TRL 1.16 keeps the DPO losses inline in DPOTrainer._compute_loss (one `loss_type` branch each), so the
# test runs that method on a stub: a "model" whose output carries per-token log-probs chosen so their sums
# over each reply are our log-probs (what TRL's fused LM head returns: 0 off the reply), reference log-probs
# precomputed, identity gathers. CPO (SimPO) and ORPO have standalone methods, called unbound on a bare
# object. One pair per call: TRL returns the batch mean; B = 1 gives each pair's loss.


@pytest.fixture(scope="module")
def trl():
    """TRL's trainer classes (skips when TRL is not installed: `pip install -e .[dev]`)."""
    pytest.importorskip("trl", reason="TRL parity needs trl (the dev extra)")
    from trl import DPOTrainer, RewardTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return SimpleNamespace(
        DPOTrainer=DPOTrainer, RewardTrainer=RewardTrainer, CPO=CPOTrainer, ORPO=ORPOTrainer
    )


ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def bare(cls, **attrs):
    """A trainer instance without __init__ (no model, data or accelerate): just the attributes a loss reads."""
    obj = object.__new__(cls)
    for name, value in {"accelerator": ACCELERATOR, **attrs}.items():
        setattr(obj, name, value)
    return obj


def trl_dpo_pair(trl, loss_type, pc, pr, rc, rr, n_c, n_r, beta, label_smoothing=0.0):
    """TRL DPOTrainer._compute_loss on one pair; returns (loss, its metrics {name: value})."""
    T = 1 + max(n_c, n_r)  # one prompt token, then the reply (the longer one fills the row)
    completion_mask = torch.zeros(2, T, dtype=torch.long)  # rows: [chosen, rejected]
    completion_mask[0, 1 : 1 + n_c] = 1
    completion_mask[1, 1 : 1 + n_r] = 1
    # (2, T − 1): position j scores token j + 1; each reply's log-prob spread evenly over its tokens
    log_probs = completion_mask[:, 1:].float() * torch.tensor([[pc / n_c], [pr / n_r]])

    def model(**kwargs):  # the outputs _compute_loss reads
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer = bare(
        trl.DPOTrainer,
        model=SimpleNamespace(training=True),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2, T, dtype=torch.long),
        "attention_mask": torch.ones(2, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor([rc]),
        "ref_rejected_logps": torch.tensor([rr]),
    }
    loss = trl.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return float(loss), {k: v[0] for k, v in trainer._metrics["train"].items()}


def trl_dpo(trl, loss_type, beta, label_smoothing=0.0):
    """TRL's per-pair losses and reward metrics (B,) on the module's three pairs."""
    columns = zip(*(x.tolist() for x in (PI_C, PI_R, REF_C, REF_R, N_C, N_R)), strict=True)  # one per pair
    rows = [trl_dpo_pair(trl, loss_type, *pair, beta, label_smoothing) for pair in columns]
    metrics = {k: t(*(m[k] for _, m in rows)) for k in rows[0][1]}
    return t(*(loss for loss, _ in rows)), metrics


@pytest.mark.parametrize("method, loss_type", [("dpo", "sigmoid"), ("ipo", "ipo"), ("hinge", "hinge")])
def test_dpo_family_matches_trl(trl, method, loss_type):
    """Same summed log-probs and reply lengths → TRL's losses and logged rewards (IPO: TRL averages too)."""
    ours, metrics = preference_loss(method, PI_C, PI_R, REF_C, REF_R, N_C, N_R, beta=BETA)
    theirs, trl_metrics = trl_dpo(trl, loss_type, BETA)
    close(ours, theirs, atol=1e-5)
    for key, trl_key in [("chosen", "chosen"), ("rejected", "rejected"), ("margin", "margins")]:
        close(metrics[f"rewards/{key}"], trl_metrics[f"rewards/{trl_key}"])
    close(metrics["rewards/accuracy"], trl_metrics["rewards/accuracies"])


def test_conservative_dpo_matches_trl(trl):
    """TRL 1.16's "sigmoid" ignores label_smoothing (it now feeds "robust", "exo_pair" and "aot" only); its
    "aot" loss on a single pair (sorting one value is the identity) is exactly cDPO."""
    theirs, _ = trl_dpo(trl, "aot", BETA, label_smoothing=0.1)
    close(dpo_loss(PI_C, PI_R, REF_C, REF_R, BETA, label_smoothing=0.1), theirs, atol=1e-5)
    sigmoid_smoothed, _ = trl_dpo(trl, "sigmoid", BETA, label_smoothing=0.1)
    close(dpo_loss(PI_C, PI_R, REF_C, REF_R, BETA), sigmoid_smoothed, atol=1e-5)


def test_simpo_matches_trl(trl):
    """CPOTrainer.cpo_loss, loss_type "simpo" (TRL feeds it average log-probs), and its logged rewards."""
    cpo = bare(trl.CPO, loss_type="simpo", beta=2.0, simpo_gamma=1.0, label_smoothing=0.0, alpha=0.0)
    avg_c, avg_r = PI_C / N_C, PI_R / N_R
    theirs, chosen_rewards, rejected_rewards = trl.CPO.cpo_loss(cpo, avg_c, avg_r)
    ours, metrics = preference_loss("simpo", PI_C, PI_R, None, None, N_C, N_R, beta=2.0, gamma=1.0)
    close(ours, theirs)
    close(metrics["rewards/chosen"], chosen_rewards)
    close(metrics["rewards/rejected"], rejected_rewards)


def test_orpo_matches_trl(trl):
    """ORPOTrainer.odds_ratio_loss returns β log σ(log odds ratio), which TRL subtracts from the NLL."""
    orpo = bare(trl.ORPO, beta=0.1)
    avg_c, avg_r = t(-0.7, -0.01, -3.0, -25.0), t(-1.2, -2.0, -0.05, -24.0)
    their_terms, chosen_rewards, rejected_rewards, _, _ = trl.ORPO.odds_ratio_loss(orpo, avg_c, avg_r)
    close(orpo_loss(avg_c, avg_r, beta=0.1), -their_terms)
    _, metrics = preference_loss(
        "orpo", avg_c * 3, avg_r * 5, None, None, t(3, 3, 3, 3), t(5, 5, 5, 5), beta=0.1
    )
    close(metrics["rewards/chosen"], chosen_rewards)
    close(metrics["rewards/rejected"], rejected_rewards)


def test_bradley_terry_matches_trl(trl):
    """RewardTrainer.compute_loss on a stub reward model whose scores are given, with a "margin" column."""
    chosen, rejected, margin = t(2.0, -1.0, 0.3), t(0.5, 0.0, 0.3), t(1.0, 0.0, -2.0)

    def trl_pair(c, r, m):
        def model(**kwargs):
            return SimpleNamespace(logits=torch.tensor([[c], [r]]))  # (2, 1): [chosen, rejected] scores

        trainer = bare(
            trl.RewardTrainer,
            model=SimpleNamespace(training=True),
            args=SimpleNamespace(center_rewards_coefficient=None),
            _metrics={"train": defaultdict(list)},
            _total_train_tokens=0,
            _tp_size=1,
        )
        inputs = {"attention_mask": torch.ones(2, 3, dtype=torch.long), "margin": torch.tensor([m])}
        return float(trl.RewardTrainer.compute_loss(trainer, model, inputs))

    theirs = t(*(trl_pair(*map(float, x)) for x in zip(chosen, rejected, margin, strict=True)))
    close(bradley_terry_loss(chosen, rejected, margin), theirs)
