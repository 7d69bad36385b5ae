"""The stage runner: the scaffolding every training stage shares, written once.

A stage (`pretrain`, `finetune`, `align`) supplies only what is its own — the model it trains (built, transformed
by its method), its data builder's batches, its objective, and what it measures and writes at the end — as a
`Stage` subclass. `run_stage` does the rest, in this order, for every stage:

    check the run directory (nothing written)    → join the process group, pick the device, seed
    stage.build(): data, model, objective        → the optimizer; restore the newest checkpoint (--resume)
    config.yaml written (inputs all checked)     → progress bar + report sinks → the one loop (`train`)
    checkpoints every train.checkpoint_every      → Ctrl-C: where to resume from
    stage.finish(): the output dir and results    → tokenizer copy, lineage (lmforge.json: `lineage.provenance`),
                                                    results.json, loss plot
    the replaced run deleted                      → stage.after(): gates that fail a complete run

A resumed run is bit-identical to an uninterrupted one: the checkpoint holds the trained weights (the whole model,
or only the trainable tensors of an adapter run), the optimizer, every RNG and the data cursor; what a stage
measured before training (e.g. the base model's perplexity) is kept in `RUN/before.json` and read back.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lmforge import __version__
from lmforge.errors import Interrupted, LmforgeError
from lmforge.fileio import atomic_write
from lmforge.lineage import provenance
from lmforge.paths import check_run_dir, start_run
from lmforge.tokenizer import copy_tokenizer
from lmforge.train.checkpoint import (
    CHECKPOINTS,
    STEP_DIR,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lmforge.train.distributed import (
    Dist,
    barrier,
    close_distributed,
    consolidate,
    init_distributed,
    is_main_process,
    under_torchrun,
)
from lmforge.train.loop import train
from lmforge.train.objectives import Batch, Objective
from lmforge.train.optim import build_optimizer
from lmforge.train.reporting import (
    ProgressBar,
    open_sinks,
    plot_loss_curve,
    raise_peak,
    rewind_logs,
    step_dtype,
    step_peak,
    with_mfu,
)

log = logging.getLogger(__name__)
BEFORE = "before.json"  # what a stage measured before training, read back by a resumed run


@dataclass
class Plan:
    """What a stage built before anything is written: the model to train, its batches and objective."""

    model: nn.Module
    """On the training device, wrapped for its strategy, only the parameters to train requiring grad."""
    batches: Iterator[Batch]
    """The training micro-batches; `state_dict()` / `load_state_dict()` make the cursor resumable."""
    objective: Objective
    """What a step minimises."""
    parent: str
    """Where the weights started: a model directory or `preset:NAME` (the lineage's parent)."""
    data: list[str]
    """The dataset ids trained on."""
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    """A fresh validation pass each call, or None."""
    flops_per_token: float | None = None
    """Training FLOPs per token of one device (the MFU numerator), or None: no MFU."""
    lineage: dict[str, Any] = field(default_factory=dict)
    """The stage's own lineage fields (e.g. objective, kind, method)."""
    on_record: Callable[[dict[str, Any]], None] | None = None
    """Called with every metrics record on rank 0 (e.g. pretraining's mid-run samples)."""


@dataclass
class Output:
    """What a finished stage wrote: its results, the output directory, the loss plot's reference lines."""

    results: dict[str, Any]
    directory: Path
    baselines: dict[str, float] | None = None


class Stage(ABC):
    """One training stage: its config, how it builds a `Plan`, and what it writes when training is done."""

    name: ClassVar[str]
    """The command (`pretrain`): run records, lineage and messages name it."""
    distributed: ClassVar[bool] = False
    """Whether it runs under torchrun / --nproc (otherwise a multi-process launch is refused)."""

    def __init__(self, cfg: Any, out: Path) -> None:
        self.cfg, self.out = cfg, Path(out)  # the config and the run directory

    def check(self) -> None:
        """Refuse a config that cannot run (before the run directory is looked at); nothing is written."""
        return None

    @abstractmethod
    def build(self, dist: Dist) -> Plan:
        """Read the data, build the model, check they fit; write nothing."""

    def before(self, plan: Plan) -> dict[str, Any]:
        """Measurements of the untrained model that `finish` compares against (kept for a resumed run)."""
        return {}

    def measure(self, plan: Plan, dist: Dist) -> dict[str, Any]:
        """Measurements of the trained model that every rank takes part in (a collective evaluation)."""
        return {}

    @abstractmethod
    def finish(self, plan: Plan, model: nn.Module, summary: dict[str, Any], before: dict[str, Any]) -> Output:
        """Measure the trained `model` (plain, on rank 0; `summary` is the loop's, with `tokens_per_s`, `mfu`
        and `measured`) and write its output dir."""

    def tokenizer_dir(self) -> Path | None:
        """The tokenizer copied beside the output (None: none)."""
        return None

    def after(self, results: dict[str, Any]) -> None:
        """Gates on a complete run (its files are all written): raise `RunFailed` to fail it."""
        return None


def run_stage(stage: Stage, *, overwrite: bool = False) -> dict[str, Any]:
    """Run `stage` into its run directory `stage.out` (see the module's docstring); rank 0 returns the results.

    `stage.out` must be new or empty, or hold a run that `cfg.train.resume` continues or `overwrite` replaces (kept
    until this one ends). Under torchrun every process runs this; rank 0 writes the files.
    """
    cfg, out = stage.cfg, stage.out
    if under_torchrun() and not stage.distributed:
        raise LmforgeError(f"{stage.name} runs in one process: drop --nproc / torchrun")
    stage.check()
    replace = check_run_dir(out, cfg, overwrite) if is_main_process() else False
    dist = init_distributed(cfg.train.device)
    try:
        return _run(stage, dist, replace)
    finally:
        close_distributed()


def _run(stage: Stage, dist: Dist, replace: bool) -> dict[str, Any]:
    cfg, out = stage.cfg, stage.out
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    plan = stage.build(dist)
    model, batches = plan.model, plan.batches
    optimizer = build_optimizer(model, cfg.optim, dist.device.type)  # after wrapping: FSDP swaps parameters
    run_config = json.loads(cfg.model_dump_json())

    start_step, start_tokens = 0, 0
    checkpoint = latest_checkpoint(out) if cfg.train.resume else None
    before_file = out / BEFORE
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, dist=dist)  # weights, optimizer, every RNG
        batches.load_state_dict(state["data"])
        start_step, start_tokens = state["step"], state["tokens"]
        log.info("resuming from %s (step %d)", checkpoint, start_step)
    elif cfg.train.resume:
        log.info("resume: no checkpoint in %s, starting from scratch", out / CHECKPOINTS)
    if checkpoint is not None and before_file.is_file():
        before = json.loads(before_file.read_text(encoding="utf-8"))
    else:
        before = stage.before(plan)
    # The inputs are checked: only now is anything written (a replaced run is kept aside until the end).
    run_dir = start_run(out, cfg, replace) if dist.is_main else None
    if dist.is_main and before:
        atomic_write(before_file, json.dumps(before, indent=2) + "\n")

    # Dataset paths, the parent's weights fingerprint, config hash, code version: once (fingerprints read weights).
    recorded = provenance(plan.parent, plan.data, run_config, plan.lineage)

    def lineage(**extra: Any) -> dict[str, Any]:
        return {"parent": plan.parent, "data": plan.data, "stage": stage.name, **plan.lineage, **recorded,
                "config": run_config, "lmforge_version": __version__, "seed": cfg.train.seed, **extra}  # fmt: skip

    def save(step: int, tokens: int) -> None:
        save_checkpoint(out, step, model, optimizer, tokens=tokens,
                        data_state=batches.state_dict(), lineage=lineage(step=step),
                        keep=cfg.train.keep_checkpoints, dist=dist)  # fmt: skip

    bf16 = cfg.train.autocast == "bf16"
    gemm_dtype = step_dtype(dist.device, bf16)
    if dist.is_main:
        if plan.flops_per_token is not None:
            step_peak(
                dist.device, bf16
            )  # the MFU denominator, measured now rather than inside the first step
        rewind_logs(out, start_step)  # a resumed run logs again from its checkpoint's step
    with ExitStack() as stack:
        bar = sinks = None
        if dist.is_main:
            bar = stack.enter_context(ProgressBar(cfg.train.max_steps, start_step))
            sinks = stack.enter_context(open_sinks(cfg.train.report_to, out, run_config, start_step))

        def report(record: dict[str, Any]) -> None:  # rank 0 only: enrich the metrics line, show it, send it
            if plan.flops_per_token is not None:
                per_device = plan.flops_per_token / dist.world_size
                record.update(with_mfu(record, per_device, dist.device, gemm_dtype))
            bar(record)
            sinks(record)
            if plan.on_record is not None:
                plan.on_record(record)

        try:
            summary = train(model, batches, plan.objective, optimizer, cfg.optim, cfg.train,
                            eval_batches=plan.eval_batches, metrics_path=out / "metrics.jsonl", progress=report,
                            start_step=start_step, start_tokens=start_tokens, save=save, dist=dist)  # fmt: skip
        except Interrupted as stop:
            raise _interrupted(stage.name, stop, out, dist) from stop
    summary["tokens_per_s"] = (summary["tokens"] - start_tokens) / max(summary["seconds"], 1e-9)
    if plan.flops_per_token is not None:
        achieved = summary["tokens_per_s"] / dist.world_size * plan.flops_per_token  # FLOP/s of one device
        summary["mfu"] = achieved / raise_peak(dist.device, gemm_dtype, achieved)
    summary["measured"] = stage.measure(plan, dist)
    full = consolidate(model, dist)  # collective under FSDP; the plain model on rank 0
    if not dist.is_main:
        # Wait for rank 0 to write the run: a rank that leaves the process group while another still holds it
        # can abort at exit (gloo: "terminate called without an active exception").
        barrier(dist)
        return {"rank": dist.rank, "steps": summary["steps"]}

    output = stage.finish(plan, full, summary, before)
    results = {**output.results, "loss_curve": str(out / "loss.png")}
    tokenizer = stage.tokenizer_dir()
    if tokenizer is not None:
        copy_tokenizer(tokenizer, output.directory)
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write(
        output.directory / "lmforge.json", json.dumps(lineage(results=results, date=date), indent=2) + "\n"
    )
    title = f"{out.name}: {stage.name} {_what(plan)} of {plan.parent}"
    plot_loss_curve(out / "metrics.jsonl", out / "loss.png", title=title, baselines=output.baselines)
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    run_dir.done()
    barrier(dist)  # the other ranks leave with this one
    stage.after(results)
    return results


def _what(plan: Plan) -> str:
    """The stage's variant for titles: pretrain's objective, finetune's kind/method, align's method."""
    keys = [plan.lineage[k] for k in ("objective", "kind", "method") if k in plan.lineage]
    return "/".join(str(k) for k in keys)


def _interrupted(name: str, stop: Interrupted, out: Path, dist: Dist) -> Interrupted:
    """Ctrl-C's report: the step reached, the newest checkpoint and the command that resumes."""
    newest = latest_checkpoint(out)
    nproc = f" --nproc {dist.world_size}" if dist.world_size > 1 else ""
    resume = f"lmforge {name} --resume {out}{nproc}"
    if newest is None:
        return Interrupted(f"{stop}; no checkpoint yet: {resume} starts it again from step 0", stop.step)
    step = int(STEP_DIR.fullmatch(newest.name).group(1))
    return Interrupted(f"{stop}; newest checkpoint: {newest} (step {step}); resume with: {resume}", stop.step)
