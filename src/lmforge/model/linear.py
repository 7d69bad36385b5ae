"""`Linear`: nn.Linear whose bf16-autocast matmuls stay fast on CPUs without bf16 instructions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm), as oneDNN reports it.
# Without it, PyTorch's bf16 GEMM takes a reference path 5-70x slower than its fp32 GEMM on the same cores
# (a 2-core AVX2 EPYC: docs/benchmarks.md, "Training step (CPU)").
def _cpu_has_bf16_gemm() -> bool:
    try:  # a private op: if a torch build lacks it, emulating is still exact bf16 arithmetic, only slower
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


CPU_HAS_BF16_GEMM: bool = _cpu_has_bf16_gemm()


# Inference on a CPU with 2..SMALL_ROWS rows (a decode step of a batch, a speculative check, a short prompt):
# MKL's x @ W.T packs the whole weight for a few rows, while W @ x.T streams it once. Measured on a 2-core AVX2
# EPYC, fp32, weights from DRAM: 1.2-4x faster at 4-16 rows for every llama-14m/124m projection and LM head,
# equal at 1 row (docs/benchmarks.md, "Decoding").
SMALL_ROWS = 64


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) with two CPU fast paths: fp32 inference on a few rows
    as W @ x.T (`_small_rows_linear`), and bf16 autocast matmuls on a CPU without bf16 GEMM as fp32 GEMMs of the
    bf16 operands, rounded to bf16 (`_Bf16AsFp32Linear`). Elsewhere (CUDA, training, one row) it is nn.Linear."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if 1 < rows <= SMALL_ROWS and x.is_cpu and x.dtype == torch.float32 and not torch.is_grad_enabled():
            return _small_rows_linear(x, self.weight, self.bias)
        if CPU_HAS_BF16_GEMM or not (x.is_cpu and _cpu_bf16_autocast()):
            return super().forward(x)
        bf16 = torch.bfloat16
        bias = None if self.bias is None else self.bias.to(bf16)
        return _Bf16AsFp32Linear.apply(x.to(bf16), self.weight.to(bf16), bias)


def _small_rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear of few rows computed as W @ x.T: (..., K) -> (..., N), the same math in another summation order."""
    y = (weight @ x.reshape(-1, x.shape[-1]).T).T.contiguous()  # (M, N)
    if bias is not None:
        y += bias  # in place: only ever called without autograd
    return y.view(*x.shape[:-1], weight.shape[0])


class _Bf16AsFp32Linear(torch.autograd.Function):
    """F.linear of bf16 tensors computed as fp32 GEMMs, forward and backward, each result rounded to bf16.

    That is what a bf16 GEMM computes: a product of two bf16 numbers is exact in fp32, and bf16 hardware
    accumulates in fp32, so only the summation order differs. Autocast is off in both directions: traced by
    torch.compile, the backward would otherwise inherit the forward's autocast and become bf16 GEMMs again.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)  # bf16 (..., K) and (N, K)
        ctx.has_bias = bias is not None
        with torch.autocast("cpu", enabled=False):
            y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())  # (..., N)
        return y.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        x, weight = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            g = grad.float().flatten(0, -2)  # (M, N)
            grad_x = (g @ weight.float()).view(x.shape)  # (..., K)
            grad_w = g.T @ x.float().flatten(0, -2)  # (N, K)
            grad_b = g.sum(0) if ctx.has_bias else None  # (N,)
        bf16 = torch.bfloat16
        return grad_x.to(bf16), grad_w.to(bf16), None if grad_b is None else grad_b.to(bf16)


def _cpu_bf16_autocast() -> bool:
    """Whether CPU autocast to bf16 is on (dynamo reads both flags while tracing: no graph break)."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
