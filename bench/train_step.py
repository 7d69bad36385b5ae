"""Full training steps on the CPU, lmforge vs `transformers.LlamaForCausalLM`, side by side on the same weights.

  python bench/train_step.py [--preset llama-14m] [--batch 16] [--seq 256] [--steps 3] [--warmup 1]
                             [--variants lmforge,lmforge-compile,hf,hf-fp32]

One step, as each library's own training loop runs it: forward with the loss under bf16 autocast (fp32 master
weights), backward, global grad-norm clipping to 1.0, fused AdamW, zero_grad. lmforge: `model(x, y,
reduction="sum") / n` and `build_optimizer` (as `train.loop.train` does); transformers: `model(x, labels=x).loss`,
`clip_grad_norm_` and `torch.optim.AdamW(fused=True)` (the HF Trainer's default optimizer since torch 2.8,
"adamw_torch_fused"). Variants are timed round-robin, one step each per round, after warm-up steps (which
include compilation), and the median is reported. A GEMM peak is measured in the same run for the MFU.
Prints a Markdown table; docs/benchmarks.md records the numbers with this command.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from models import build_pair  # bench/models.py: lmforge's model and HF's, same weights

from lmforge.model.configs import DecoderConfig
from lmforge.train.optim import build_optimizer
from lmforge.train.reporting import flops_per_token, matmul_peak, step_peak
from lmforge.train.sections import OptimSection

VARIANTS = {
    "lmforge": "lmforge, eager",
    "lmforge-compile": "lmforge, torch.compile",
    "lmforge-fp32": "lmforge, eager, fp32 (no autocast)",
    "hf": "transformers, eager",
    "hf-compile": "transformers, torch.compile",
    "hf-fp32": "transformers, eager, fp32 (no autocast)",
}


def lmforge_step(model: torch.nn.Module, compile: bool, bf16: bool = True) -> Callable[[torch.Tensor], float]:
    """One step of lmforge's loop (train/loop.py): summed loss / token count, clip, fused AdamW."""
    cfg = OptimSection()
    optimizer = build_optimizer(model, cfg, "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    forward = torch.compile(model) if compile else model
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext

    def step(ids: torch.Tensor) -> float:
        x, y = ids[:, :-1], ids[:, 1:]
        with autocast():
            loss = forward(x, y, reduction="sum") / y.numel()
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def hf_step(model: torch.nn.Module, compile: bool, bf16: bool = True) -> Callable[[torch.Tensor], float]:
    """One step as HF's Trainer takes it: labels shifted inside the model, clip_grad_norm_, fused AdamW."""
    cfg = OptimSection()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=True
    )
    forward = torch.compile(model) if compile else model
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext

    def step(ids: torch.Tensor) -> float:
        x = ids[:, :-1]
        with autocast():
            loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def build_steps(preset_name: str, variants: list[str]) -> tuple[DecoderConfig, dict[str, Callable]]:
    """A step function per variant, each with its own copy of the same initial weights and optimizer."""
    ours, hf = build_pair(preset_name)
    ours.train(), hf.train()
    makers = {
        "lmforge": lambda: lmforge_step(copy.deepcopy(ours), compile=False),
        "lmforge-compile": lambda: lmforge_step(copy.deepcopy(ours), compile=True),
        "lmforge-fp32": lambda: lmforge_step(copy.deepcopy(ours), compile=False, bf16=False),
        "hf": lambda: hf_step(copy.deepcopy(hf), compile=False),
        "hf-compile": lambda: hf_step(copy.deepcopy(hf), compile=True),
        "hf-fp32": lambda: hf_step(copy.deepcopy(hf), compile=False, bf16=False),
    }
    return ours.config, {v: makers[v]() for v in variants}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-14m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant (compilation)")
    parser.add_argument("--variants", default="lmforge,lmforge-compile,lmforge-fp32,hf,hf-fp32",
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")  # fmt: skip
    args = parser.parse_args()
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    # GFLOP/s of the same measurement the training runs' MFU uses (`lmforge.train.reporting.matmul_peak`).
    peaks = {
        name: matmul_peak("cpu", dtype) / 1e9
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    config, steps = build_steps(args.preset, variants)
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=g)
        for _ in range(args.warmup + args.steps)
    ]
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    first_loss: dict[str, float] = {}
    for i, ids in enumerate(batches):  # round-robin: drift in the machine's load hits every variant alike
        for v, step in steps.items():
            t0 = time.perf_counter()
            loss = step(ids)
            elapsed = time.perf_counter() - t0
            if i >= args.warmup:
                seconds[v].append(elapsed)
            print(f"round {i}{' (warm-up)' if i < args.warmup else ''}: {v} {elapsed:.2f} s", file=sys.stderr)
            first_loss.setdefault(v, loss)

    tokens = args.batch * args.seq
    fpt = flops_per_token(config, args.seq)
    c = config
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.preset} (d {c.hidden_size}, "
        f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads, vocab {c.vocab_size}), batch "
        f"{args.batch} x {args.seq}; median of {args.steps} steps after {args.warmup} warm-up, round-robin\n"
    )
    print("GEMM peak, 1024x1024 by 1024x1024 (best over 0.5 s): "
          f"fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s")  # fmt: skip
    print(
        f"model FLOPs/token = 6*N + 12*L*d*T = {fpt / 1e6:.1f} MFLOP (N: matmul weights, LM head included)\n"
    )
    base = statistics.median(seconds["hf"]) if "hf" in seconds else None
    # MFU against the peak of the GEMMs lmforge's step runs (`step_peak`: the fp32 one on a CPU without bf16
    # GEMM, where a bf16 peak measures a reference path and would give MFUs far above 100%).
    peak = step_peak("cpu", bf16=True) / 1e9
    print(
        f"| variant | step loss (1st) | median s/step | tokens/s | vs transformers eager | MFU ({peak:.1f} GFLOP/s) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for v in variants:
        s = statistics.median(seconds[v])
        ratio = f"{base / s:.2f}x" if base else "—"
        flops = fpt * tokens / s / 1e9
        print(
            f"| {VARIANTS[v]} | {first_loss[v]:.4f} | {s:.2f} | {tokens / s:,.0f} | {ratio} | "
            f"{flops / peak:.1%} |"
        )
    print(
        "\nper-step seconds: "
        + "; ".join(f"{v} " + ", ".join(f"{t:.2f}" for t in seconds[v]) for v in variants)
    )


if __name__ == "__main__":
    main()
