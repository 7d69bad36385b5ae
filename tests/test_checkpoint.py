"""Checkpoints: bit-identical resume, RNG restore, retention, crash safety, HF loadability."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.configs import preset
from lmforge.model.hf import build_model
from lmforge.train import checkpoint as ckpt
from lmforge.train.checkpoint import (
    capture_rng,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from lmforge.train.optim import AnyOptimizer, OptimSection, build_optimizer

LINEAGE = {"parent": None, "config": {"optim": {"lr": 0.01}, "train": {"seed": 0}}, "seed": 0}
CURSOR = {"seed": 0, "epoch": 1, "position": 6}


def tiny(seed: int) -> nn.Module:
    """A fp32 tiny-llama with seeded weights."""
    torch.manual_seed(seed)
    return build_model(preset("tiny-llama"))


def train_steps(model: nn.Module, optimizer: AnyOptimizer, steps: range) -> None:
    """One optimizer step per index on a batch seeded by the index (independent of the global RNG)."""
    for i in steps:
        g = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g)
        optimizer.zero_grad()
        model(ids[:, :-1], ids[:, 1:]).backward()
        optimizer.step()


def setup(seed: int = 0, name: str = "adamw") -> tuple[nn.Module, AnyOptimizer]:
    """A model and its optimizer."""
    model = tiny(seed)
    return model, build_optimizer(model, OptimSection(name=name, lr=0.01, warmup_steps=0), "cpu")


def save(run: Path, step: int, model: nn.Module, optimizer: AnyOptimizer, keep: int = 3) -> Path:
    """save_checkpoint with fixed extras."""
    return save_checkpoint(
        run, step, model, optimizer, tokens=16 * step, data_state=CURSOR, lineage=LINEAGE, keep=keep
    )


def assert_same_state(a: object, b: object) -> None:
    """Nested dicts/lists of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b)
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_round_trip_continues_bit_identically(tmp_path: Path, name: str) -> None:
    model, optimizer = setup(0, name)
    train_steps(model, optimizer, range(2))
    path = save(tmp_path, 2, model, optimizer)
    assert path == tmp_path / "checkpoints" / "step-000002"
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "model", "train_state"]
    assert sorted(p.name for p in (path / "train_state").iterdir()) == [
        "optimizer.pt",
        "rng.pt",
        "state.json",
    ]
    assert json.loads((path / "model" / "lmforge.json").read_text()) == LINEAGE

    fresh, fresh_opt = setup(1, name)  # different weights, empty optimizer state
    state = load_checkpoint(path, fresh, fresh_opt)
    assert state["step"] == 2 and state["tokens"] == 32 and state["data"] == CURSOR
    assert state["config_hash"] == ckpt.config_hash(LINEAGE["config"])
    assert_same_state(model.state_dict(), fresh.state_dict())
    assert_same_state(optimizer.state_dict(), fresh_opt.state_dict())

    train_steps(model, optimizer, range(2, 4))
    train_steps(fresh, fresh_opt, range(2, 4))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_saved_state_loads_with_weights_only(tmp_path: Path) -> None:
    model, optimizer = setup()
    train_steps(model, optimizer, range(1))
    path = save(tmp_path, 1, model, optimizer)
    for name in ("optimizer.pt", "rng.pt"):
        torch.load(path / "train_state" / name, weights_only=True)


def draws() -> tuple[float, np.ndarray, torch.Tensor]:
    """One draw from each global RNG."""
    return random.random(), np.random.rand(3), torch.rand(3)


def check_same_draws(a: tuple, b: tuple) -> None:
    """Draws are identical."""
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and torch.equal(a[2], b[2])


def test_rng_restore_reproduces_draws() -> None:
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # leave a cached gaussian in both
    state = capture_rng()
    first = draws()
    draws()
    restore_rng(state)
    check_same_draws(first, draws())


def test_checkpoint_restores_rng(tmp_path: Path) -> None:
    model, optimizer = setup()
    path = save(tmp_path, 1, model, optimizer)
    first = draws()
    load_checkpoint(path, model, None)
    check_same_draws(first, draws())


def test_keep_deletes_older_checkpoints(tmp_path: Path) -> None:
    model, optimizer = setup()
    for step in range(1, 6):
        save(tmp_path, step, model, optimizer, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000005"
    with pytest.raises(ValueError, match="keep"):
        save(tmp_path, 6, model, optimizer, keep=0)


@pytest.mark.parametrize("target", ["save_model", "_torch_save", "atomic_write"])
def test_crash_mid_save_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    model, optimizer = setup()
    first = save(tmp_path, 1, model, optimizer)
    real = getattr(ckpt, target)
    calls = []

    def crash(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2 or target == "save_model":  # let one write through where there are several
            raise OSError("disk full")
        real(*args, **kwargs)

    monkeypatch.setattr(ckpt, target, crash)
    train_steps(model, optimizer, range(1))
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, model, optimizer)
    assert latest_checkpoint(tmp_path) == first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    restored, _ = setup(1)
    assert load_checkpoint(first, restored, None)["step"] == 1


def test_incomplete_step_dir_is_never_returned(tmp_path: Path) -> None:
    model, optimizer = setup()
    first = save(tmp_path, 1, model, optimizer)
    second = save(tmp_path, 2, model, optimizer)
    (second / "COMPLETE").unlink()  # e.g. a copy interrupted before its last file
    assert latest_checkpoint(tmp_path) == first
    with pytest.raises(LmforgeError, match="COMPLETE"):
        load_checkpoint(second, model, optimizer)
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_leftover_staging_dir_is_ignored_and_removed(tmp_path: Path) -> None:
    model, optimizer = setup()
    first = save(tmp_path, 1, model, optimizer)
    leftover = tmp_path / "checkpoints" / ".step-000002.0123456789ab.tmp"
    leftover.mkdir()
    (leftover / "COMPLETE").write_text("{}")  # even a marker inside a staging dir does not count
    assert latest_checkpoint(tmp_path) == first
    save(tmp_path, 2, model, optimizer)
    assert not leftover.exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import torch
from lmforge.model.configs import preset
from lmforge.model.hf import build_model
from lmforge.train import checkpoint as ckpt
from lmforge.train.optim import OptimSection, build_optimizer

run = Path(sys.argv[1])
model = build_model(preset("tiny-llama"))
opt = build_optimizer(model, OptimSection(), "cpu")
kw = dict(tokens=0, data_state={}, lineage={})
ckpt.save_checkpoint(run, 1, model, opt, **kw)
ckpt._torch_save = lambda obj, path: os.kill(os.getpid(), signal.SIGKILL)
ckpt.save_checkpoint(run, 2, model, opt, **kw)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_save(tmp_path: Path) -> None:
    """A process killed inside a save leaves its staging dir; the previous checkpoint is the latest."""
    script = textwrap.dedent(KILLED_SAVE)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[0].startswith(".step-000002.") and names[0].endswith(".tmp") and names[1:] == ["step-000001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000001"
    model, optimizer = setup()
    load_checkpoint(latest_checkpoint(tmp_path), model, optimizer)
    save(tmp_path, 2, model, optimizer)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_model_dir_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model, optimizer = setup()
    train_steps(model, optimizer, range(1))
    path = save(tmp_path, 1, model, optimizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path / "model")
    ours, theirs = model.state_dict(), hf.state_dict()
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)


def test_cursor_must_be_json(tmp_path: Path) -> None:
    model, optimizer = setup()
    with pytest.raises(LmforgeError, match="JSON"):
        save_checkpoint(tmp_path, 1, model, optimizer, tokens=0, data_state={"x": object()}, lineage={})
    assert latest_checkpoint(tmp_path) is None


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    model, optimizer = setup()
    save(tmp_path, 1, model, optimizer)
    train_steps(model, optimizer, range(1))
    path = save(tmp_path, 1, model, optimizer)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000001"]
    restored, _ = setup(1)
    load_checkpoint(path, restored, None)
    assert_same_state(model.state_dict(), restored.state_dict())
