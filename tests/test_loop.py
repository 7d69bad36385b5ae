"""The training loop: accumulation parity, a frozen golden run, the NaN guard, metrics lines, the data cursor."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.samplers import EpochSampler, window_sampler
from lmforge.errors import LmforgeError
from lmforge.model.configs import preset
from lmforge.model.decoder import IGNORE_INDEX
from lmforge.model.hf import build_model
from lmforge.train.loop import LoopSection, train
from lmforge.train.objectives import OBJECTIVES, Objective
from lmforge.train.optim import OptimSection, build_optimizer

CONSTANT = OptimSection(lr=3e-3, schedule="constant", warmup_steps=0)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(preset("tiny-llama"))


def token_stream(n_repeats: int = 40) -> np.ndarray:
    """A 64-token motif repeated, 10% of positions replaced by noise: learnable, so the loss falls."""
    rng = np.random.default_rng(0)
    stream = np.tile(rng.integers(0, 256, 64), n_repeats)
    noise = rng.random(len(stream)) < 0.1
    stream[noise] = rng.integers(0, 256, int(noise.sum()))
    return stream


def run(
    batches,
    cfg: LoopSection,
    optim_cfg: OptimSection = CONSTANT,
    objective: Objective = OBJECTIVES["clm"],
    **kw,
):
    model = tiny_llama()
    optimizer = build_optimizer(model, optim_cfg, "cpu")
    return model, train(model, iter(batches), objective, optimizer, optim_cfg, cfg, **kw)


def test_grad_accumulation_matches_one_big_batch() -> None:
    # 8 windows whose target counts differ a lot per pair of rows: averaging per micro-batch would be wrong.
    windows = window_sampler(token_stream(), 16, 8, seed=0).examples.rows
    batch = {k: v[:8].clone() for k, v in windows.items()}
    keep = [16, 16, 1, 2, 9, 16, 3, 12]  # targets per row
    for row, n in enumerate(keep):
        batch["targets"][row, n:] = IGNORE_INDEX
    # Adam's first update is lr * g / (|g| + eps): eps = 1e-6 bounds how much fp32 round-off in a near-zero
    # gradient element can move a weight (lr/eps = 1e3 x), where 1e-8 would turn 1e-10 noise into 1e-5.
    optim_cfg = OptimSection(lr=1e-3, eps=1e-6, schedule="constant", warmup_steps=0)
    big, big_summary = run([batch], LoopSection(max_steps=1, micro_batch_size=8, seq_len=16), optim_cfg)
    micro = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    small, small_summary = run(
        micro, LoopSection(max_steps=1, micro_batch_size=2, grad_accum_steps=4, seq_len=16), optim_cfg
    )
    # The reported step loss is the full batch's mean (per-micro-batch means averaged would give 5.5950).
    assert small_summary["losses"] == pytest.approx(big_summary["losses"], abs=1e-6)
    for (name, a), b in zip(big.named_parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert any(
        not torch.equal(a, b) for a, b in zip(big.parameters(), tiny_llama().parameters(), strict=True)
    )


# Regenerate (only after an intended change to init, data order or the loss): run test_golden_run with
# `print(", ".join(f"{x:.5f}" for x in summary["losses"]))` and paste the 20 values.
GOLDEN_LOSSES = [
    5.54952, 5.26010, 5.02582, 4.81430, 4.59218, 4.49602, 4.43540, 4.32389, 4.13718, 4.06484,
    3.65539, 3.70402, 3.60835, 3.75321, 3.01653, 3.40528, 2.94346, 2.84900, 2.85502, 2.67909,
]  # fmt: skip


def test_golden_run() -> None:
    cfg = LoopSection(max_steps=20, micro_batch_size=4, seq_len=32)
    _, summary = run(window_sampler(token_stream(), cfg.seq_len, cfg.micro_batch_size, seed=0), cfg)
    assert summary["losses"] == pytest.approx(GOLDEN_LOSSES, abs=1e-4)
    assert summary["steps"] == 20 and summary["bad_steps"] == 0 and summary["tokens"] == 20 * 4 * 32
    assert summary["loss"] == summary["losses"][-1] < summary["losses"][0] - 2


def poisoned_clm() -> Objective:
    """clm, but a batch carrying a "poison" key gets an inf loss (and so NaN/inf gradients)."""
    clm = OBJECTIVES["clm"]

    def losses(model, batch):
        loss = clm.losses(model, {k: v for k, v in batch.items() if k != "poison"})["clm"]
        return {"clm": loss * math.inf if "poison" in batch else loss}

    return Objective(clm.counts, losses)


def test_nan_guard_skips_counts_and_aborts() -> None:
    cfg = LoopSection(max_steps=4, micro_batch_size=2, seq_len=16, max_bad_steps=3)
    good = list(
        itertools.islice(window_sampler(token_stream(), cfg.seq_len, cfg.micro_batch_size, seed=0), 4)
    )
    bad = {**good[1], "poison": torch.ones(())}
    model, summary = run([good[0], bad, good[2], good[3]], cfg, objective=poisoned_clm())
    assert summary["bad_steps"] == 1 and not math.isfinite(summary["losses"][1])
    assert all(torch.isfinite(p).all() for p in model.parameters())

    with pytest.raises(LmforgeError, match=r"^3 steps had a NaN/inf loss"):
        run(
            [good[0], bad, good[2], bad, bad],
            LoopSection(**{**cfg.model_dump(), "max_steps": 5}),
            objective=poisoned_clm(),
        )


def test_skipped_step_leaves_the_weights() -> None:
    cfg = LoopSection(max_steps=1, micro_batch_size=2, seq_len=16)
    batch = {
        **next(window_sampler(token_stream(), cfg.seq_len, cfg.micro_batch_size, seed=0)),
        "poison": torch.ones(()),
    }
    model, summary = run([batch], cfg, objective=poisoned_clm())
    assert summary["bad_steps"] == 1
    for a, b in zip(model.parameters(), tiny_llama().parameters(), strict=True):
        assert torch.equal(a, b)


def test_metrics_lines_and_eval_cadence(tmp_path: Path) -> None:
    cfg = LoopSection(max_steps=6, micro_batch_size=2, seq_len=16, eval_every=3, log_every=2)
    stream = token_stream()
    val = lambda: itertools.islice(window_sampler(stream, cfg.seq_len, cfg.micro_batch_size, seed=1), 2)  # noqa: E731
    seen: list[dict] = []
    path = tmp_path / "metrics.jsonl"
    _, summary = run(
        window_sampler(stream, cfg.seq_len, cfg.micro_batch_size, seed=0),
        cfg,
        eval_batches=val,
        metrics_path=path,
        progress=seen.append,
    )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == seen
    # Logged steps 0, 2, 4 (log_every) and 3 (an evaluation), then the final evaluation after step 6.
    assert [r["step"] for r in records] == [0, 2, 3, 4, 6]
    keys = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"}
    for r in records[:-1]:
        assert keys <= r.keys()
        assert r["lr"] == pytest.approx(3e-3) and r["tokens"] == (r["step"] + 1) * 2 * 16
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]
    assert records[-1].keys() == {"step", "elapsed", "val_clm_loss", "val_loss"}
    assert summary["val"] == {k: records[-1][k] for k in ("val_clm_loss", "val_loss")}
    assert records[-1]["val_loss"] < records[0]["val_loss"]


def test_window_sampler_is_seeded_and_resumable() -> None:
    def take(sampler: EpochSampler, n: int) -> list[torch.Tensor]:
        return [next(sampler)["input_ids"] for _ in range(n)]

    stream = token_stream(5)  # 320 tokens: 19 windows of 16, 4 batches of 4 per epoch (3 windows dropped)
    a, b = window_sampler(stream, 16, 4, seed=7), window_sampler(stream, 16, 4, seed=7)
    first = take(a, 10)  # crosses two epoch boundaries
    assert all(torch.equal(x, y) for x, y in zip(first, take(b, 10), strict=True))
    assert not torch.equal(first[0], next(window_sampler(stream, 16, 4, seed=8))["input_ids"])
    assert not torch.equal(torch.cat(first[:4]), torch.cat(first[4:8]))  # a new order each epoch

    saved = window_sampler(stream, 16, 4, seed=7)
    take(saved, 6)
    assert saved.state_dict() == {"seed": 7, "epoch": 1, "position": 8}
    resumed = window_sampler(stream, 16, 4, seed=7)
    resumed.load_state_dict(saved.state_dict())
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 4), first[6:10], strict=True))
    with pytest.raises(LmforgeError, match="seed 7"):
        window_sampler(stream, 16, 4, seed=8).load_state_dict(saved.state_dict())
