"""Resumable checkpoints: a HF model dir plus `train_state/` beside it, written atomically, found by scanning.

A run directory's checkpoints look like this::

    RUN/checkpoints/step-000120/
        model/          a HF dir (`save_model`) + lmforge.json lineage: `from_pretrained` loads it unchanged
        train_state/    optimizer.pt, rng.pt (torch.save, loadable with weights_only=True), state.json
        COMPLETE        written last

Each checkpoint is filled in a hidden staging dir (`.step-000120.<id>.tmp`), every file fsynced, the
`COMPLETE` marker written last, then renamed into place. There is no `latest` symlink (not portable): the
newest `step-*` dir holding `COMPLETE` is the latest. A crash at any point leaves the earlier checkpoints
as they were; a staging dir a killed process left behind is never read and is removed by the next save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write, replace_atomically, staging_dir
from lmforge.model.hf import load_model, save_model
from lmforge.train.optim import AnyOptimizer

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
TRAIN_STATE = "train_state"
COMPLETE = "COMPLETE"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"step-(\d+)")
LEFTOVER = re.compile(r"\.step-\d+\..*\.(tmp|old)")  # staging_dir's temp and displaced dirs, our deletions


def checkpoint_name(step: int) -> str:
    """The directory name of step `step`'s checkpoint: `step-000120`."""
    return f"step-{step:06d}"


def config_hash(config: Any) -> str:
    """sha256 of a config's canonical JSON (sorted keys), to tell whether a resumed run changed its config."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """Every global RNG's state (Python, numpy, torch CPU, each CUDA device) as plain data and tensors."""
    version, internal, gauss = random.getstate()
    bit_generator, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": bit_generator,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set every global RNG back to what `capture_rng` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state((n["bit_generator"], key, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = list(state.get("cuda") or [])
    if not cuda:
        return
    if not torch.cuda.is_available():
        log.warning("the checkpoint holds CUDA RNG states but CUDA is not available: they are not restored")
        return
    count = torch.cuda.device_count()
    if count != len(cuda):
        log.warning("the checkpoint holds %d CUDA RNG states, this machine has %d devices", len(cuda), count)
    for device, s in enumerate(cuda[:count]):
        torch.cuda.set_rng_state(s, device)


# ---------------------------------------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: AnyOptimizer,
    *,
    tokens: int,
    data_state: dict[str, Any],
    lineage: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write `RUN/checkpoints/step-NNNNNN` atomically, then delete older checkpoints beyond the newest `keep`.

    The config hash in state.json is that of `lineage["config"]` (None when lineage has no config).
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the checkpoint just written), got {keep}")
    state = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "tokens": int(tokens),
        "data": data_state,
        "config_hash": config_hash(lineage["config"]) if lineage.get("config") is not None else None,
    }
    try:  # fail before writing anything when the cursor or lineage is not JSON
        state_json, lineage_json = _json(state), _json(lineage)
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"checkpoint data cursor and lineage must be JSON-serialisable: {e}") from None
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    out = root / checkpoint_name(step)
    with staging_dir(out) as tmp:
        inner = _unwrap(model)
        save_model(inner, tmp / MODEL_DIR)
        atomic_write(tmp / MODEL_DIR / "lmforge.json", lineage_json)
        train_state = tmp / TRAIN_STATE
        train_state.mkdir()
        _torch_save(optimizer.state_dict(), train_state / "optimizer.pt")
        _torch_save(capture_rng(), train_state / "rng.pt")
        atomic_write(train_state / "state.json", state_json)
        _fsync_dir(tmp / MODEL_DIR)
        _fsync_dir(train_state)
        atomic_write(tmp / COMPLETE, _json({"step": int(step)}))  # last: the checkpoint is whole
        _fsync_dir(tmp)
    _fsync_dir(root)  # the rename itself
    _prune(root, int(step), keep)
    return out


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename."""
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def _prune(root: Path, step: int, keep: int) -> None:
    """Delete complete checkpoints older than `step` beyond the newest `keep - 1` of them."""
    older = sorted((s, p) for s, p in _complete(root) if s < step)
    doomed = older[: max(0, len(older) - (keep - 1))]
    for _, path in doomed:
        # Hide it first (one atomic rename): a crash mid-delete leaves a leftover, never a gutted step-* dir.
        hidden = root / f".{path.name}.{uuid.uuid4().hex[:12]}.del.tmp"
        os.replace(path, hidden)
        shutil.rmtree(hidden)
    newer = [p.name for s, p in _complete(root) if s > step]
    if newer:
        log.warning("checkpoints newer than step %d are left in %s: %s", step, root, ", ".join(newer))


def _remove_leftovers(root: Path) -> None:
    """Remove staging, displaced and half-deleted dirs a killed save left behind."""
    for path in root.iterdir():
        if LEFTOVER.fullmatch(path.name) and path.is_dir():
            log.info("removing %s, left by an interrupted checkpoint save", path)
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------- loading


def _complete(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every `step-*` dir under `root` holding the COMPLETE marker."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = STEP_DIR.fullmatch(path.name)
        if m and (path / COMPLETE).is_file():
            found.append((int(m.group(1)), path))
    return found


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    return [p for _, p in sorted(_complete(Path(run_dir) / CHECKPOINTS))]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None when it has none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: AnyOptimizer | None) -> dict[str, Any]:
    """Restore weights (in place), optimizer state and every RNG from a checkpoint; return its state.json."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise LmforgeError(f"{path}: not a complete checkpoint ({COMPLETE} marker missing)")
    train_state = path / TRAIN_STATE
    state = json.loads((train_state / "state.json").read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise LmforgeError(
            f"{path}: checkpoint format {state.get('format_version')!r}, this lmforge reads {FORMAT_VERSION}"
        )
    inner = _unwrap(model)
    dtype = next(iter(inner.parameters())).dtype
    loaded = load_model(path / MODEL_DIR, dtype=dtype)
    inner.load_state_dict(loaded.state_dict())
    del loaded
    if optimizer is not None:
        optimizer.load_state_dict(
            torch.load(train_state / "optimizer.pt", map_location="cpu", weights_only=True)
        )
    restore_rng(torch.load(train_state / "rng.pt", map_location="cpu", weights_only=True))
    return state


# --------------------------------------------------------------------------------------------- helpers


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under `torch.compile` (`_orig_mod`) and DDP (`module`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json(d: Any) -> str:
    return json.dumps(d, indent=2, allow_nan=False) + "\n"
