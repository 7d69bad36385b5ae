"""The one training loop every stage runs: `train(model, batches, objective, optimizer, optim_cfg, cfg)`.

Read it top to bottom like nanochat's `base_train.py`: `while step < max_steps` → once in a while (validation)
→ one step (micro-batches, clipping, schedule, update) → logging. No callbacks: a stage is a batch iterator
plus an `Objective`. Randomness: the caller seeds model init (`torch.manual_seed(cfg.seed)`); the loop draws
from the global torch RNG only through the model's own dropout; the samplers (`lmforge.data.samplers`) have
their own generators.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import Interrupted, LmforgeError
from lmforge.train.distributed import Dist, all_reduce_sum, gradient_sync, shard_rows
from lmforge.train.objectives import Batch, Objective, normalized_loss, total_counts
from lmforge.train.optim import AnyOptimizer, OptimSection, lr_at, set_lr
from lmforge.train.sections import LoopSection

log = logging.getLogger(__name__)
TOKENS = "\0tokens"  # the step's token count, reduced with the units (no objective term has this name)


# ------------------------------------------------------------------------------------------------ loop


def evaluate(
    model: nn.Module,
    objective: Objective,
    batches: Iterable[Batch],
    autocast: Any = nullcontext,
    dist: Dist | None = None,
) -> dict[str, float]:
    """Validation metrics: each `objective.evaluate` sum over `batches` divided once, as "val_<name>";
    "val_loss" is the sum of the "*_loss" means (the training loss's definition).

    With `dist`, every rank passes the same global batches, evaluates its rows and the sums are added over
    ranks before dividing: the same metrics on every rank, those of one process evaluating every row.
    """
    device = next(model.parameters()).device
    dist = dist or Dist.single(device)
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {}
    with torch.no_grad(), autocast():
        for batch in batches:
            for name, (num, den) in objective.evaluate(model, _to(shard_rows(batch, dist), device)).items():
                total = sums.setdefault(name, [0.0, 0.0])
                total[0], total[1] = total[0] + num, total[1] + den
    model.train(was_training)
    if dist.world_size > 1:  # every rank evaluated as many batches, so every rank has the same names
        names = sorted(sums)
        pairs = torch.tensor([sums[n] for n in names], dtype=torch.float64, device=dist.device)  # (names, 2)
        torch.distributed.all_reduce(pairs)
        sums = dict(zip(names, pairs.tolist(), strict=True))
    metrics = {f"val_{name}": num / max(den, 1.0) for name, (num, den) in sums.items()}
    metrics["val_loss"] = sum(v for k, v in metrics.items() if k.endswith("_loss"))
    return metrics


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(
    model: nn.Module,
    batches: Iterator[Batch],
    objective: Objective,
    optimizer: AnyOptimizer,
    optim_cfg: OptimSection,
    cfg: LoopSection,
    *,
    eval_batches: Callable[[], Iterable[Batch]] | None = None,
    metrics_path: Path | None = None,
    progress: Callable[[dict], None] | None = None,
    start_step: int = 0,
    start_tokens: int = 0,
    save: Callable[[int, int], None] | None = None,
    dist: Dist | None = None,
) -> dict[str, Any]:
    """Run `cfg.max_steps` optimizer steps; return {"loss", "val", "steps", "bad_steps", "tokens", "seconds",
    "losses"} (`losses`: every step's train loss, NaN or inf at a skipped step).

    Each step takes `grad_accum_steps` micro-batches from `batches` and minimises the objective's mean over
    all of them (`normalized_loss` against the step's total units). `eval_batches()` gives a fresh validation
    pass each time it is called. Every `log_every` steps one JSON line goes to `metrics_path` (appended) and
    the same dict to `progress`: step, loss, lr, grad_norm, tokens, tokens_per_s, elapsed, and val_* keys at
    evaluation steps; `progress` may add keys to the dict before it is written (the stage adds MFU).

    A resumed run passes `start_step` (steps already done) and `start_tokens` (tokens already seen) and must
    have restored the weights, optimizer, RNGs and `batches`' cursor itself. `save(n, tokens)` (if given) is
    called with `n` completed steps and the run's tokens so far every `cfg.checkpoint_every` steps and after
    the last step, once the step's update and logging are done. "steps" and "tokens" in the result are run totals; "seconds" and "losses"
    cover this call's steps only.

    Data parallel (`dist` with world_size > 1, `model` wrapped by `wrap_model`): every rank passes the same
    GLOBAL micro-batches (`batches` and `eval_batches` seeded alike) and trains on its rows (`shard_rows`).
    Units, tokens, the step loss and validation sums are added over ranks, so every rank logs, decides
    (NaN guard) and returns the same numbers, those of one process running the global batch. Only rank 0
    writes `metrics_path` and calls `progress`; `save` is called on every rank (a sharded save is collective).

    Ctrl-C (KeyboardInterrupt) ends the call with `Interrupted`, which carries the steps completed: the stage
    adds where the newest checkpoint is and how to resume.
    """
    device = next(model.parameters()).device
    dist = dist or Dist.single(device)
    parallel = dist.world_size > 1
    params = [p for p in model.parameters() if p.requires_grad]
    forward_model = torch.compile(model) if cfg.compile else model
    bf16 = cfg.autocast == "bf16"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses determinism without it
        torch.use_deterministic_algorithms(True)
    step, bad_steps, tokens, train_seconds = start_step, 0, start_tokens, 0.0
    losses: list[float] = []
    val: dict[str, float] = {}
    interval_tokens, interval_seconds = 0, 0.0  # since the last metrics line, for tokens_per_s
    start = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    try:
        while step < cfg.max_steps:
            # ---- once in a while: validation of the weights after `step` updates
            record: dict[str, Any] = {}
            if eval_batches is not None and cfg.eval_every and step % cfg.eval_every == 0:
                val = evaluate(model, objective, eval_batches(), autocast, dist)
                record.update(val)

            # ---- one step: units counted over every micro-batch first, then one backward per micro-batch
            t0 = time.perf_counter()
            micro = [_to(shard_rows(_next(batches, step), dist), device) for _ in range(cfg.grad_accum_steps)]
            totals = total_counts(objective.counts(b) for b in micro)
            step_tokens = sum(_tokens(b) for b in micro)
            if parallel:  # the global step's units: every rank normalises by the same totals
                summed = all_reduce_sum({**totals, TOKENS: step_tokens}, dist)
                step_tokens = int(summed.pop(TOKENS))
                totals = {term: int(n) for term, n in summed.items()}
            step_loss = torch.zeros((), device=device)
            stats: dict[str, torch.Tensor] = {}  # the objective's summed statistics over the step
            for i, b in enumerate(micro):
                # Gradients are reduced across ranks once per step, in the last micro-batch's backward.
                with gradient_sync(model, i == len(micro) - 1):
                    with autocast():
                        terms = objective.losses(forward_model, b)
                        loss = normalized_loss(terms, totals)
                    for name in terms.keys() - totals.keys():
                        stats[name] = stats.get(name, 0) + terms[name].detach().float()
                    # This rank's share of the global mean; DDP and FSDP average gradients over ranks, so
                    # x world_size makes the reduced gradient the sum of the shares: the global batch's.
                    (loss * dist.world_size if parallel else loss).backward()
                step_loss += loss.detach()
            if parallel:
                torch.distributed.all_reduce(step_loss)  # the global step loss, NaN on every rank if on one
            if stats:  # each statistic's step mean over the unit term (every rank: the global step's)
                unit = totals.get(objective.stat_unit, 0)
                if parallel:
                    summed = all_reduce_sum({k: float(v) for k, v in stats.items()}, dist)
                    stats = {k: torch.tensor(v) for k, v in summed.items()}
                stats = {k: float(v) / max(unit, 1) for k, v in stats.items()}
            grad_norm = _grad_norm(params)  # the norm before clipping, reported
            loss_value, norm_value = float(step_loss), float(grad_norm)  # one device sync per step
            lr = lr_at(step, cfg.max_steps, optim_cfg)
            if math.isfinite(loss_value) and math.isfinite(norm_value):
                if optim_cfg.grad_clip > 0:
                    torch.nn.utils.clip_grads_with_norm_(params, optim_cfg.grad_clip, grad_norm)
                set_lr(optimizer, lr)
                optimizer.step()
            else:  # NaN/inf guard: no update, the poisoned gradients are dropped below
                bad_steps += 1
                log.warning("step %d: loss %s, grad norm %s: skipped", step, loss_value, norm_value)
                if bad_steps >= cfg.max_bad_steps:
                    raise LmforgeError(
                        f"{bad_steps} steps had a NaN/inf loss or gradient (train.max_bad_steps="
                        f"{cfg.max_bad_steps}); last at step {step}: lower optim.lr or check the data"
                    )
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            tokens, train_seconds = tokens + step_tokens, train_seconds + seconds
            interval_tokens, interval_seconds = interval_tokens + step_tokens, interval_seconds + seconds
            losses.append(loss_value)

            # ---- logging
            if math.isfinite(loss_value) and (step % cfg.log_every == 0 or record):
                record = {
                    "step": step,
                    "loss": loss_value,
                    "lr": lr * optim_cfg.lr,
                    "grad_norm": norm_value,
                    "tokens": tokens,
                    "tokens_per_s": interval_tokens / max(interval_seconds, 1e-9),
                    "elapsed": time.perf_counter() - start,
                    **stats,
                    **record,
                }
                if dist.is_main:
                    _emit(record, metrics_path, progress)
                interval_tokens, interval_seconds = 0, 0.0

            # ---- once in a while: a resumable checkpoint of the weights after `step` updates. The count goes up
            # first: an interrupt once the checkpoint is written never reports a step before it.
            step += 1
            if save is not None and (
                step == cfg.max_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            ):
                save(step, tokens)

        # ---- after the last step: validate the final weights
        if eval_batches is not None and cfg.eval_every:
            val = evaluate(model, objective, eval_batches(), autocast, dist)
            if dist.is_main:
                _emit({"step": step, "elapsed": time.perf_counter() - start, **val}, metrics_path, progress)
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted):
            raise
        raise Interrupted(f"interrupted at step {step} of {cfg.max_steps}", step) from e
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    finite = [x for x in losses if math.isfinite(x)]
    return {
        "loss": finite[-1] if finite else math.nan,
        "val": val,
        "steps": step,
        "bad_steps": bad_steps,
        "tokens": tokens,
        "seconds": train_seconds,
        "losses": losses,
    }


def _tokens(batch: Batch) -> int:
    """Token positions a batch feeds the model: every `*input_ids` tensor (a preference pair's two rows too)."""
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))


def _grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients, a plain 0-d tensor equal on every rank."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    # FSDP's sharded (DTensor) gradients give a DTensor of partial norms: reduce it over ranks. Duck-typed:
    # importing torch.distributed.tensor costs every process a second.
    full_tensor = getattr(norm, "full_tensor", None)
    return full_tensor() if full_tensor is not None else norm


def _next(batches: Iterator[Batch], step: int) -> Batch:
    try:
        return next(batches)
    except StopIteration:
        raise LmforgeError(f"the training batches ran out at step {step}") from None


def _emit(record: dict[str, Any], path: Path | None, progress: Callable[[dict], None] | None) -> None:
    """The record to `progress` (which may add keys, e.g. MFU), then one metrics line to `path` (appended, so
    a resumed run continues the file)."""
    if progress is not None:
        progress(record)
    if path is not None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
