"""Preference losses: reward models (Bradley–Terry) and alignment from pairs (DPO, IPO, hinge, SimPO, ORPO).

Each loss is a small pure function of per-sequence log-probs that returns one loss per pair, (B,) fp32; the
caller averages. Inputs are either SUMS of a reply's token log-probs (DPO, hinge) or their per-token AVERAGES
(IPO, SimPO, ORPO, the `length_normalised` methods): `preference_loss` takes sums and token counts and divides
where the method asks for it, so a training step reads one dict entry, not a `loss_type` chain.

Parity with TRL 1.16 (tests/test_preference.py runs TRL's own code on the same log-probs):
- dpo ≡ DPOTrainer loss_type "sigmoid" when label_smoothing = 0. TRL 1.16's "sigmoid" ignores
  label_smoothing; the conservative (cDPO) form here equals its "aot" loss on a single pair.
- ipo ≡ DPOTrainer "ipo": TRL divides each summed log-RATIO (policy − reference) by the reply's token count
  before the squared loss, so ipo_loss takes average log-probs and `preference_loss` divides.
- hinge ≡ DPOTrainer "hinge" (on sums).
- simpo ≡ experimental CPOTrainer loss_type "simpo" (average log-probs, `simpo_gamma` = gamma).
- orpo ≡ −ORPOTrainer.odds_ratio_loss (average log-probs); the SFT NLL on the chosen reply is the caller's.
- bradley_terry_loss ≡ RewardTrainer.compute_loss with a "margin" column.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import LmforgeError

# ------------------------------------------------------------------------------------------ reward models


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Reward-model loss −log σ(r_chosen − r_rejected − margin) per pair: rewards (B,), margin (B,) → (B,)."""
    # margin: Llama 2's preference-strength margin (TRL RewardTrainer's "margin" column); 0 = plain BT
    delta = chosen.float() - rejected.float()
    if margin is not None:
        delta = delta - margin.float()
    return -F.logsigmoid(delta)


# -------------------------------------------------------------------------- preference losses of log-probs


def implicit_rewards(pi: Tensor, ref: Tensor, beta: float) -> Tensor:
    """DPO's implicit reward β (log π − log π_ref) per sequence: (B,) → (B,)."""
    return beta * (pi.float() - ref.float())


def _margin(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor) -> Tensor:
    """(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected): (B,) fp32."""
    return (pi_chosen.float() - ref_chosen.float()) - (pi_rejected.float() - ref_rejected.float())


def dpo_loss(
    pi_chosen: Tensor,
    pi_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Sigmoid DPO on summed log-probs, conservative (cDPO) when label_smoothing = ε > 0: (B,) each → (B,)."""
    # cDPO: the label is flipped with probability ε, so the loss is the expected -log σ over both labels
    z = beta * _margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected)  # (B,)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def ipo_loss(
    pi_chosen_avg: Tensor,
    pi_rejected_avg: Tensor,
    ref_chosen_avg: Tensor,
    ref_rejected_avg: Tensor,
    beta: float,
) -> Tensor:
    """IPO (h − 1/(2β))² on AVERAGE per-token log-probs, β = the paper's τ: (B,) each → (B,)."""
    # Averages, as TRL (and the IPO authors' runs): on sums the squared loss would grow with reply length
    h = _margin(pi_chosen_avg, pi_rejected_avg, ref_chosen_avg, ref_rejected_avg)  # (B,)
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(
    pi_chosen: Tensor,
    pi_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> Tensor:
    """Hinge (SLiC-style) max(0, 1 − β · margin of log-ratios) on summed log-probs: (B,) each → (B,)."""
    return torch.relu(1 - beta * _margin(pi_chosen, pi_rejected, ref_chosen, ref_rejected))


def simpo_loss(pi_chosen_avg: Tensor, pi_rejected_avg: Tensor, beta: float, gamma: float) -> Tensor:
    """SimPO −log σ(β (avg log π(chosen) − avg log π(rejected)) − γ), reference-free: (B,) each → (B,)."""
    # gamma is the target reward margin, in reward units (TRL applies it as simpo_gamma / beta inside β(...))
    return -F.logsigmoid(beta * (pi_chosen_avg.float() - pi_rejected_avg.float()) - gamma)


_LN2 = math.log(2)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (Mächler 2012; the same branches as TRL's ORPO)."""
    # x = 0 (a reply the model is certain of, in fp32) makes log(1 − e^x) = −inf, the log-odds +inf and the
    # gradient NaN (the unused torch.where branch also gets 0 · inf); just below 0 both branches stay finite.
    x = x.clamp(max=-1e-6)
    return torch.where(x < -_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(pi_chosen_avg: Tensor, pi_rejected_avg: Tensor, beta: float) -> Tensor:
    """ORPO's odds-ratio term −β log σ(log odds(chosen) − log odds(rejected)) on AVERAGE log-probs: (B,) → (B,).

    Only the odds-ratio term: the full ORPO loss adds the SFT NLL of the chosen reply (mean over its tokens),
    which the caller computes from the same forward pass.
    """
    pc, pr = pi_chosen_avg.float(), pi_rejected_avg.float()
    # log odds(p) = log p − log(1 − p), with log p = the average log-prob
    log_odds_ratio = (pc - _log1mexp(pc)) - (pr - _log1mexp(pr))  # (B,)
    return -beta * F.logsigmoid(log_odds_ratio)


# -------------------------------------------------------------------------------------------- registry

# Every registry fn takes (pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta, label_smoothing, gamma),
# already length-normalised where the method says so; each picks the arguments its method uses.
LossFn = Callable[[Tensor, Tensor, Tensor | None, Tensor | None, float, float, float], Tensor]


@dataclass(frozen=True)
class PreferenceLoss:
    """One preference method: its loss, whether it needs a reference model, whether it reads averages."""

    fn: LossFn
    needs_reference: bool
    length_normalised: bool  # True: log-probs are per-token averages (sums / reply tokens)
    doc: str


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(
        lambda pc, pr, rc, rr, beta, ls, gamma: dpo_loss(pc, pr, rc, rr, beta, ls),
        needs_reference=True,
        length_normalised=False,
        doc="DPO (sigmoid; conservative with label_smoothing > 0), summed log-probs, frozen reference.",
    ),
    "ipo": PreferenceLoss(
        lambda pc, pr, rc, rr, beta, ls, gamma: ipo_loss(pc, pr, rc, rr, beta),
        needs_reference=True,
        length_normalised=True,
        doc="IPO: squared loss pulling the log-ratio margin to 1/(2β), per-token average log-probs.",
    ),
    "hinge": PreferenceLoss(
        lambda pc, pr, rc, rr, beta, ls, gamma: hinge_loss(pc, pr, rc, rr, beta),
        needs_reference=True,
        length_normalised=False,
        doc="Hinge (SLiC): max(0, 1 − β · log-ratio margin), summed log-probs, frozen reference.",
    ),
    "simpo": PreferenceLoss(
        lambda pc, pr, rc, rr, beta, ls, gamma: simpo_loss(pc, pr, beta, gamma),
        needs_reference=False,
        length_normalised=True,
        doc="SimPO: reference-free, average log-probs, target reward margin gamma.",
    ),
    "orpo": PreferenceLoss(
        lambda pc, pr, rc, rr, beta, ls, gamma: orpo_loss(pc, pr, beta),
        needs_reference=False,
        length_normalised=True,
        doc="ORPO odds-ratio term (add the chosen reply's SFT NLL), reference-free, average log-probs.",
    ),
}


def preference_loss(
    method: str,
    pi_chosen: Tensor,
    pi_rejected: Tensor,
    ref_chosen: Tensor | None,
    ref_rejected: Tensor | None,
    chosen_tokens: Tensor | None,
    rejected_tokens: Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses (B,) of `method` on SUMMED log-probs (B,), and the (B,) reward metrics a step logs.

    chosen_tokens / rejected_tokens (B,): reply tokens per sequence, needed by the length-normalised methods.
    Metrics: rewards/chosen, rewards/rejected, rewards/margin, rewards/accuracy (1.0 where chosen > rejected).
    The reward is β (log π − log π_ref) on sums for reference methods (as TRL's DPOTrainer logs it, for IPO
    too) and β · average log π for reference-free ones (as TRL's CPO/SimPO and ORPO trainers).
    """
    spec = PREFERENCE_LOSSES.get(method)
    if spec is None:
        raise LmforgeError(
            f"unknown preference method {method!r}; expected one of {sorted(PREFERENCE_LOSSES)}"
        )
    if spec.needs_reference and (ref_chosen is None or ref_rejected is None):
        raise LmforgeError(
            f"preference method {method!r} needs reference log-probs (ref_chosen, ref_rejected) from a frozen "
            "reference model; pass them, or use a reference-free method ("
            + ", ".join(m for m, s in PREFERENCE_LOSSES.items() if not s.needs_reference)
            + ")"
        )
    if spec.length_normalised and (chosen_tokens is None or rejected_tokens is None):
        raise LmforgeError(
            f"preference method {method!r} averages log-probs over reply tokens; pass chosen_tokens and "
            "rejected_tokens (the number of reply tokens summed in each log-prob)"
        )
    pc, pr = pi_chosen.float(), pi_rejected.float()
    rc = None if ref_chosen is None else ref_chosen.float()
    rr = None if ref_rejected is None else ref_rejected.float()
    if spec.length_normalised:
        # clamp: an empty reply divides by 1 (its sum is 0), as TRL does
        nc, nr = chosen_tokens.clamp(min=1).float(), rejected_tokens.clamp(min=1).float()  # type: ignore[union-attr]
        pc, pr = pc / nc, pr / nr
        if rc is not None and rr is not None:
            rc, rr = rc / nc, rr / nr

    losses = spec.fn(pc, pr, rc, rr, beta, label_smoothing, gamma)  # (B,)
    with torch.no_grad():
        if spec.needs_reference:
            chosen = implicit_rewards(pi_chosen, ref_chosen, beta)  # type: ignore[arg-type]
            rejected = implicit_rewards(pi_rejected, ref_rejected, beta)  # type: ignore[arg-type]
        else:
            # pc, pr are averages here: the reference-free methods are length-normalised
            chosen, rejected = beta * pc, beta * pr
    metrics = {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margin": chosen - rejected,
        "rewards/accuracy": (chosen > rejected).float(),
    }
    return losses, metrics
