"""lmforge's `Linear`: under CPU bf16 autocast without bf16 GEMM hardware it computes what a bf16 GEMM computes;
fp32 inference on a few rows matches nn.Linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_

from lmforge.model import linear
from lmforge.model.configs import preset
from lmforge.model.hf import build_model


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, ids, reduction="mean")
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("has_bf16_gemm", [True, False])
def test_emulated_bf16_matmuls_match_torch_bf16(monkeypatch, has_bf16_gemm):
    torch.manual_seed(0)
    model = build_model(preset("tiny-llama"))
    randomize_(model)
    ids = torch.randint(0, 256, (2, 32))
    monkeypatch.setattr(linear, "CPU_HAS_BF16_GEMM", True)  # torch's own bf16 GEMMs: the reference
    ref_loss, ref_grads = loss_and_grads(model, ids)
    monkeypatch.setattr(linear, "CPU_HAS_BF16_GEMM", has_bf16_gemm)
    loss, grads = loss_and_grads(model, ids)
    if has_bf16_gemm:
        assert loss == ref_loss  # the switch itself changes nothing
        return
    # Same bf16 operands and bf16-rounded results; only the fp32 summation order differs.
    assert abs(loss - ref_loss) < 2e-3 * abs(ref_loss)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.float32  # gradients reach the fp32 weights as with autocast
        assert (g - r).norm() <= 0.02 * r.norm() + 1e-6


def test_linear_is_nn_linear_outside_cpu_bf16_autocast(monkeypatch):
    monkeypatch.setattr(linear, "CPU_HAS_BF16_GEMM", False)
    layer = linear.Linear(8, 4)
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))  # fp32: untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # what autocast's nn.Linear returns


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 64, 65])
@pytest.mark.parametrize("bias", [True, False])
def test_few_rows_inference_matches_nn_linear(rows, bias):
    """fp32 inference on 2..64 rows goes through W @ x.T: F.linear's values up to summation order; one row,
    more rows and training take F.linear itself (bit-identical)."""
    from lmforge.model.linear import SMALL_ROWS, Linear

    torch.manual_seed(rows)
    layer = Linear(96, 160, bias=bias)
    x = torch.randn(1, rows, 96)  # (B, T, C) as a decode step or a speculative check gives it
    with torch.no_grad():
        got, want = layer(x), F.linear(x, layer.weight, layer.bias)
    assert got.shape == (1, rows, 160) and got.is_contiguous()
    if 1 < rows <= SMALL_ROWS:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # grad enabled: nn.Linear
