"""Distributed training (issue 5): 2 gloo processes under DDP and FSDP2 train like one process at the same global
batch; checkpoints resume and the consolidated FSDP model dir loads in `transformers`; `launch` runs torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import lmforge
from lmforge.data.samplers import window_sampler
from lmforge.model.configs import preset
from lmforge.model.decoder import IGNORE_INDEX
from lmforge.model.hf import build_model, load_model
from lmforge.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from lmforge.train.distributed import (
    Dist,
    barrier,
    close_distributed,
    init_distributed,
    shard_rows,
    wrap_model,
)
from lmforge.train.loop import LoopSection, train
from lmforge.train.objectives import OBJECTIVES
from lmforge.train.optim import OptimSection, build_optimizer

WORLD, STEPS, ACCUM, ROWS, SEQ = 2, 4, 2, 4, 16  # ROWS: the global micro-batch, ROWS // WORLD rows per rank
# Adam's first update is lr * g / (|g| + eps): eps = 1e-6 keeps fp32 round-off in near-zero gradient elements
# (a different reduction order) from moving weights by more than ~1e-6 (see test_loop).
OPTIM = OptimSection(lr=1e-3, eps=1e-6, schedule="constant", warmup_steps=0, grad_clip=0.5)
CFG = LoopSection(max_steps=STEPS, micro_batch_size=ROWS // WORLD, grad_accum_steps=ACCUM, seq_len=SEQ,
                  eval_every=2, checkpoint_every=2)  # fmt: skip
LINEAGE = {"parent": None, "config": None}


def global_batches() -> list[dict[str, torch.Tensor]]:
    """STEPS x ACCUM global micro-batches whose target counts differ per row, so ranks and micro-batches hold
    very different numbers of loss tokens (a per-rank mean would be visibly wrong)."""
    rng = np.random.default_rng(0)
    stream = np.tile(rng.integers(0, 256, 64), 20)
    sampler = window_sampler(stream, SEQ, ROWS, seed=0)
    batches = []
    for i in range(STEPS * ACCUM):
        batch = next(sampler)
        for row, keep in enumerate(rng.integers(1, SEQ + 1, ROWS)):
            batch["targets"][row, keep if i % 2 else keep // 4 :] = IGNORE_INDEX
        batches.append(batch)
    return batches


def val_batches() -> list[dict[str, torch.Tensor]]:
    """Two global validation batches of 6 rows: 3 per rank."""
    sampler = window_sampler(np.tile(np.arange(256), 4), SEQ, 6, seed=1)
    return [next(sampler) for _ in range(2)]


def tiny() -> torch.nn.Module:
    """SmolLM-shaped (tied embeddings: the head must follow its embedding through sharding), seeded."""
    torch.manual_seed(0)
    return build_model(preset("tiny-smollm"))


def run(
    dist: Dist, strategy: str, run_dir: Path, *, resume: Path | None = None, metrics: Path | None = None
) -> tuple[torch.nn.Module, dict]:
    """Train the tiny model on the fixed global batches (from a checkpoint if `resume`), saving every 2 steps."""
    model = tiny() if resume is None else build_model(preset("tiny-smollm"))  # resume: weights from the file
    model = wrap_model(model, strategy, dist)  # type: ignore[arg-type]
    optimizer = build_optimizer(model, OPTIM, "cpu")
    start = load_checkpoint(resume, model, optimizer, dist=dist)["step"] if resume else 0
    batches = iter(global_batches()[start * ACCUM :])

    def save(step: int, tokens: int) -> None:
        save_checkpoint(run_dir, step, model, optimizer, tokens=0, data_state={}, lineage=LINEAGE, dist=dist)

    summary = train(model, batches, OBJECTIVES["clm"], optimizer, OPTIM, CFG, eval_batches=val_batches,
                    metrics_path=metrics, start_step=start, save=save, dist=dist)  # fmt: skip
    return model, summary


def worker(rank: int, port: int, strategy: str, out: Path) -> None:
    """One rank: train, resume from the step-2 checkpoint, compute logits on fixed ids; write what it saw."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))  # fmt: skip
    torch.set_num_threads(1)
    dist = init_distributed("cpu")
    try:
        model, summary = run(dist, strategy, out / "run", metrics=out / f"metrics-{rank}.jsonl")
        ids = torch.arange(24).view(2, 12)
        with torch.no_grad():
            logits = model.eval()(ids)  # every rank: an FSDP forward is collective
        first = list_checkpoints(out / "run")[0]
        _, resumed = run(dist, strategy, out / "resumed", resume=first)
        torch.save(
            {"summary": summary, "resumed": resumed, "logits": logits.detach()}, out / f"rank{rank}.pt"
        )
        # Leave together: a rank that destroys the group while the other still uses it can abort at exit
        # (gloo: "terminate called without an active exception"), as the stages' own barrier avoids.
        barrier(dist)
    finally:
        close_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(strategy: str, out: Path, timeout: float = 120) -> list[dict]:
    """Run `worker` on WORLD gloo processes; each rank's record."""
    context = mp.start_processes(worker, args=(free_port(), strategy, out), nprocs=WORLD, join=False,
                                 start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{strategy}: the {WORLD} processes did not finish within {timeout} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def single_process(resume: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """The reference: one process, micro-batches of the full ROWS rows (the same global batch); or the same
    continuing from a checkpoint `resume` (which may come from a 2-rank run)."""
    cfg = CFG.model_copy(update={"micro_batch_size": ROWS})
    model = tiny()
    optimizer = build_optimizer(model, OPTIM, "cpu")
    start = load_checkpoint(resume, model, optimizer)["step"] if resume else 0
    summary = train(model, iter(global_batches()[start * ACCUM :]), OBJECTIVES["clm"], optimizer, OPTIM, cfg,
                    eval_batches=val_batches, start_step=start)  # fmt: skip
    return model, summary


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(tmp_path: Path, strategy: str) -> None:
    ranks = spawn(strategy, tmp_path)
    reference, expected = single_process()
    summary = ranks[0]["summary"]
    # fp32, the same global batch: the same losses, validation, token count and final weights.
    assert summary["losses"] == pytest.approx(expected["losses"], abs=1e-5, rel=0)
    assert summary["val"] == pytest.approx(expected["val"], abs=1e-5, rel=0)
    assert summary["tokens"] == expected["tokens"] == STEPS * ACCUM * ROWS * SEQ
    same = lambda r: {k: v for k, v in r["summary"].items() if k != "seconds"}  # noqa: E731
    assert all(same(r) == same(ranks[0]) for r in ranks[1:])  # every rank logged and decided the same
    assert (tmp_path / "metrics-0.jsonl").is_file() and not (tmp_path / "metrics-1.jsonl").exists()
    final = latest_checkpoint(tmp_path / "run")
    assert final is not None and final.name == "step-000004"
    trained = load_model(final / "model")  # the consolidated weights (gathered from the shards under FSDP)
    for (name, a), b in zip(reference.state_dict().items(), trained.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-5, msg=name)
    # Resumed from the step-2 checkpoint (a fresh model, optimizer state and RNG from the files): the same
    # last two steps as the uninterrupted run.
    assert ranks[0]["resumed"]["losses"] == pytest.approx(summary["losses"][2:], abs=1e-6, rel=0)
    # ... and so does one process from the same checkpoint: the world size may change at the same global batch.
    _, alone = single_process(resume=list_checkpoints(tmp_path / "run")[0])
    assert alone["losses"] == pytest.approx(summary["losses"][2:], abs=1e-5, rel=0)
    train_state = final / "train_state"
    assert (train_state / "rng.pt").is_file() and (train_state / "rng-1.pt").is_file()
    assert (train_state / "dcp").is_dir() == (strategy == "fsdp")
    assert (train_state / "optimizer.pt").is_file() == (strategy == "ddp")
    if strategy == "fsdp":
        transformers = pytest.importorskip("transformers")
        hf = transformers.AutoModelForCausalLM.from_pretrained(final / "model")
        with torch.no_grad():
            logits = hf(torch.arange(24).view(2, 12)).logits
        torch.testing.assert_close(logits, ranks[0]["logits"], rtol=1e-4, atol=1e-4)


def test_shard_rows_splits_contiguously() -> None:
    batch = {"input_ids": torch.arange(10).view(5, 2), "flag": torch.ones(())}
    shards = [shard_rows(batch, Dist(rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards]), batch["input_ids"])
    assert [len(s["input_ids"]) for s in shards] == [3, 2] and shards[1]["flag"] is batch["flag"]
    assert shard_rows(batch, Dist.single()) is batch


LAUNCH = """
import sys
from lmforge.train.distributed import launch
ok = launch(2, ["--version"])
print(f"statuses {ok} {launch(2, ['inspect', sys.argv[1]])}")
"""


def test_launch_runs_ranks_and_reports_failure(tmp_path: Path) -> None:
    # `python -m lmforge` under torchrun's launcher, twice: one line of output from rank 0 only, exit 0; then
    # a bad input that fails on both ranks: exit status 2 and one `error:` line.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LAUNCH, str(tmp_path / "missing")], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"lmforge {lmforge.__version__}", "statuses 0 2"], proc.stderr
    assert proc.stderr.count("error:") == 1 and "missing" in proc.stderr, proc.stderr


def test_pretrain_nproc_matches_one_process(tmp_path: Path, story_dataset: Path) -> None:
    # `lmforge pretrain --nproc 2` (2 ranks x 4 rows) logs the losses of one process with 8 rows, and its
    # model dir is the same model.
    from helpers import TINY_MODEL

    settings = [TINY_MODEL, f"data.dataset={story_dataset}", "train.seq_len=32", "train.max_steps=4",
                "train.eval_every=2", "optim.warmup_steps=0", "sample_prompt=null"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(out: Path, *extra: str) -> list[dict]:
        argv = ["pretrain", "--out", str(out), "--json", *extra]
        argv += [a for s in settings for a in ("--set", s)]
        proc = subprocess.run([sys.executable, "-m", "lmforge", *argv], capture_output=True, text=True,
                              env=env, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["processes"] == (2 if "--nproc" in extra else 1)
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    one = run(tmp_path / "one", "--set", "train.micro_batch_size=8")
    two = run(
        tmp_path / "two", "--nproc", "2", "--set", "train.micro_batch_size=4", "--set", "train.strategy=ddp"
    )
    for a, b in zip(one, two, strict=True):
        assert a["step"] == b["step"] and a.get("tokens") == b.get("tokens")
        for key in ("loss", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5, (a, b)
    ref, ddp = load_model(tmp_path / "one" / "model"), load_model(tmp_path / "two" / "model")
    for (name, p), q in zip(ref.state_dict().items(), ddp.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-5, msg=name)
