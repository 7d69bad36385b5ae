"""Optimisers and learning-rate schedules: AdamW with nanoGPT's decay groups, Muon for hidden matrices.

`build_optimizer(model, cfg, device_type)` gives the loop one object to `step`, `zero_grad` and save;
`set_lr(optimizer, lr_at(step, total_steps, cfg))` drives every group from its own peak learning rate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.train.sections import OptimSection

log = logging.getLogger(__name__)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Quintic Newton–Schulz coefficients (a, b, c) of Keller Jordan's Muon: the steepest slope at zero."""

FUSED_DEVICES = ("cuda", "cpu")
"""Device types with PyTorch's fused AdamW kernel that lmforge runs on (CPU's since torch 2.4)."""


# ------------------------------------------------------------------------------------------- schedules


def lr_at(step: int, total_steps: int, cfg: OptimSection) -> float:
    """The learning-rate multiplier in [0, 1] of the peak for 0-based `step` of a `total_steps` run.

    Each step uses the value at its end: warmup reaches the peak at step warmup_steps - 1, and the decay
    reaches min_lr_ratio at the last step, total_steps - 1 (steps past the end stay there).
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    start = cfg.warmup_steps  # the first step of the decay
    if cfg.schedule == "wsd":
        start = max(start, total_steps - round(cfg.decay_fraction * total_steps))
    progress = min(1.0, max(0.0, (step + 1 - start) / max(1, total_steps - start)))
    low = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
    return 1 - (1 - low) * progress  # linear, and wsd's decay phase (1 before it starts)


def set_lr(optimizer: AnyOptimizer, multiplier: float) -> None:
    """Set every group's lr to multiplier x its peak (`initial_lr`; Muon groups hold Muon's own peak)."""
    for group in optimizer.param_groups:
        # Like torch's LRScheduler: a group built elsewhere takes its current lr as the peak.
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * multiplier


# --------------------------------------------------------------------------------------- param groups


def _embedding_ids(model: nn.Module) -> set[int]:
    """ids of every embedding table, so an output layer tied to one is recognised as the embedding."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters as AdamW groups: 2-D non-embedding weights decay, the rest (norms, biases,
    embeddings and a tied head) do not. Each Parameter appears once; empty groups are left out."""
    embeddings = _embedding_ids(model)
    decay, no_decay = [], []
    for p in model.parameters():  # a tied Parameter comes once
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights inside the layer stack (an nn.ModuleList): the matrices Muon is for.

    Embeddings, the LM head, the pooler and classifier heads sit outside the stack (nanochat gives Muon
    `transformer.h`'s parameters the same way); a module walk, not names, so wrappers do not matter.
    """
    embeddings = _embedding_ids(model)
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    params = dict.fromkeys(p for stack in stacks for p in stack.parameters())  # ordered, once each
    return [p for p in params if p.requires_grad and p.ndim == 2 and id(p) not in embeddings]


# ----------------------------------------------------------------------------------------------- Muon


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """An approximately semi-orthogonal matrix U S' V^T of 2-D `G` = U S V^T, S' roughly in [0.7, 1.2].

    Five steps of the quintic X <- aX + (bA + cA^2)X with A = XX^T. The coefficients trade exact
    convergence to 1 for a steep slope at 0, so small singular values grow fast (the Muon reference).
    """
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T  # iterate on the wide side: X X^T is then the smaller Gram matrix
    X = X / X.norm().clamp(min=1e-7)  # Frobenius norm >= spectral norm: singular values start in (0, 1]
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # bA + cA^2
        X = torch.addmm(X, B, X, beta=a)  # aX + BX
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton–Schulz (Keller Jordan, 2024) for 2-D hidden weight matrices.

    SGD with Nesterov momentum whose update is replaced by its orthogonalised form, scaled by
    sqrt(max(1, rows / cols)) so tall and wide matrices move alike; decoupled weight decay as in AdamW.
    Same steps as `torch.optim.Muon(adjust_lr_fn="original")` (a test checks it), kept because torch's runs
    Newton–Schulz in bf16 everywhere, ~20x slower than fp32 on a CPU; this one uses fp32 off CUDA.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps
        )
        super().__init__(params, defaults)
        # bf16 as in the reference on CUDA; fp32 elsewhere: bf16 matmuls are ~20x slower on a CPU without AMX.
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon takes 2-D weight matrices, got a parameter of shape {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)  # momentum * buf + (1 - momentum) * grad
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf  # not in place: grad stays
                dtype = self.ns_dtype or (torch.bfloat16 if p.is_cuda else torch.float32)
                update = zeropower_via_newtonschulz5(update, group["ns_steps"], dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * max(1, p.size(0) / p.size(1)) ** 0.5)
        return loss


# ------------------------------------------------------------------------------------------ the builder


class CombinedOptimizer:
    """Several optimizers stepped, zeroed, scheduled and saved as one (Muon + AdamW)."""

    def __init__(self, **optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every group of every optimizer: the live dicts, so `set_lr` reaches them all."""
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def step(self) -> None:
        """Step every optimizer."""
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear every optimizer's gradients."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """{name: that optimizer's state_dict}."""
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (same model, same optimizer names)."""
        if set(state_dict) != set(self.optimizers):
            raise ValueError(
                f"optimizer state holds {sorted(state_dict)}, expected {sorted(self.optimizers)}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])


AnyOptimizer = torch.optim.Optimizer | CombinedOptimizer
"""What `build_optimizer` returns: both have `step`, `zero_grad`, `state_dict`, `load_state_dict`, `param_groups`."""


def build_optimizer(model: nn.Module, cfg: OptimSection, device_type: str) -> AnyOptimizer:
    """AdamW over `param_groups` (fused on CPU/CUDA, else foreach), or Muon for `hidden_matrices` + AdamW.

    Every group records its peak as `initial_lr`, which `set_lr` scales.
    """
    groups = param_groups(model, cfg.weight_decay)
    impl = {"fused": True} if device_type in FUSED_DEVICES else {"foreach": True}
    adamw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **impl)
    if cfg.name == "adamw":
        if not groups:
            raise LmforgeError("the model has no trainable parameters")
        optimizer: AnyOptimizer = torch.optim.AdamW(groups, **adamw)
    else:
        hidden = hidden_matrices(model)
        if not hidden:
            log.warning(
                "optim.name=muon: no trainable 2-D weights inside a layer stack; AdamW trains everything"
            )
        ids = {id(p) for p in hidden}
        rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
        rest = [g for g in rest if g["params"]]
        parts: dict[str, torch.optim.Optimizer] = {}
        if hidden:
            parts["muon"] = Muon(
                hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay
            )
        if rest:
            parts["adamw"] = torch.optim.AdamW(rest, **adamw)
        if not parts:
            raise LmforgeError("the model has no trainable parameters")
        optimizer = CombinedOptimizer(**parts)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer
