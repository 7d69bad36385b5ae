"""The `train` and `optim` config sections: plain pydantic, no torch, so the CLI starts fast."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lmforge.config import Section, TrainSection


class LoopSection(TrainSection):
    """The training loop: batch shape, accumulation, evaluation and logging cadence, precision, guards."""

    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward pass."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step (step batch = micro_batch_size x grad_accum_steps sequences)."""
    seq_len: int = Field(256, ge=1)
    """Tokens per training sequence."""
    eval_every: int = Field(0, ge=0)
    """Validate every this many steps (at steps 0, N, 2N, ... and after the last); 0 = never."""
    eval_batches: int = Field(20, ge=1)
    """Validation batches per evaluation (the stage's builder reads it)."""
    log_every: int = Field(1, ge=1)
    """Write a metrics line and report progress every this many steps."""
    max_bad_steps: int = Field(10, ge=1)
    """Steps with a NaN/inf loss or gradient are skipped; the run aborts when this many have been skipped."""
    autocast: Literal["off", "bf16"] = "off"
    """bf16: forward passes under bf16 autocast, weights and optimizer state stay fp32."""
    compile: bool = False
    """Run the model through `torch.compile` (applied from outside; the model itself is unchanged)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them: less memory, ~1/3 more compute."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto is CUDA when available (one GPU per process), else the CPU."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """With several processes (--nproc, torchrun): DDP replicates the model, FSDP2 shards weights, gradients
    and optimizer state across them."""
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    """Also send the metrics to TensorBoard (RUN/tensorboard) and/or Weights & Biases, when installed."""
    deterministic: bool = False
    """Deterministic algorithms only (torch.use_deterministic_algorithms): bit-identical reruns and resumes."""
    checkpoint_every: int = Field(0, ge=0)
    """Write a resumable checkpoint every this many steps (and after the last); 0 = only after the last."""
    keep_checkpoints: int = Field(3, ge=1)
    """Keep this many newest checkpoints in `--out/checkpoints`; older ones are deleted."""


Beta = Annotated[float, Field(ge=0, lt=1)]  # an exponential moving average's decay (torch refuses 1)


class OptimSection(Section):
    """The optimiser, its learning-rate schedule and gradient clipping (the `optim` section)."""

    name: Literal["adamw", "muon"] = "adamw"
    """adamw for every parameter, or muon for 2-D hidden weights (inside the layer stack) with AdamW for the rest."""
    lr: float = Field(6e-4, gt=0)
    """Peak AdamW learning rate (nanoGPT's GPT-2 124M value; recipes set their own)."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW decoupled weight decay on 2-D weights; norms, biases and embeddings get none (nanoGPT)."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """AdamW (beta1, beta2); 0.95 rather than 0.999 is the GPT-3 / Llama value, steadier for LMs."""
    eps: float = Field(1e-8, gt=0)
    """AdamW denominator epsilon."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this before each step; 0 disables clipping."""
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    """Learning-rate schedule after warmup: cosine or linear decay, constant, or warmup-stable-decay (wsd)."""
    warmup_steps: int = Field(100, ge=0)
    """Steps of linear warmup from peak/warmup_steps to the peak (every schedule); 0 starts at the peak."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of the peak (0.1: nanoGPT's and Chinchilla's 10x decay)."""
    decay_fraction: float = Field(0.2, ge=0, le=1)
    """wsd only: the last fraction of steps that decays linearly to min_lr_ratio (nanochat's warmdown 0.2)."""
    muon_lr: float = Field(0.02, gt=0)
    """Peak Muon learning rate, in spectral-norm units per step (the Muon reference default)."""
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    """Muon's Nesterov momentum (the Muon reference default)."""
    muon_weight_decay: float = Field(0.0, ge=0)
    """Muon decoupled weight decay (the Muon reference default 0: lr 0.02 would make 0.1 a strong pull)."""
