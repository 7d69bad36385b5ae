"""Resumable checkpoints: a HF model dir plus `train_state/` beside it, written atomically, found by scanning.

A run directory's checkpoints look like this::

    RUN/checkpoints/step-000120/
        model/          a HF dir (`save_model`) + lmforge.json lineage: `from_pretrained` loads it unchanged;
                        an adapter run (a model with frozen parameters) writes train_state/trained.safetensors
                        (the trained tensors by name) + train_state/lineage.json instead
        train_state/    optimizer.pt, rng.pt (torch.save, loadable with weights_only=True), state.json;
                        rng-<rank>.pt of ranks 1.. and, for a sharded (FSDP) run, dcp/ (model and
                        optimizer shards) instead of optimizer.pt
        COMPLETE        written last

Each checkpoint is filled in a hidden staging dir (`.step-000120.<id>.tmp`), every file fsynced, the
`COMPLETE` marker written last, then renamed into place. There is no `latest` symlink (not portable): the
newest `step-*` dir holding `COMPLETE` is the latest. A crash at any point leaves the earlier checkpoints
as they were; a staging dir a killed process left behind is never read and is removed by the next save.

Data-parallel runs (`dist`): every rank calls `save_checkpoint` and `load_checkpoint`; the run directory must be
one filesystem all ranks see. Rank 0 owns the staging dir, the model dir, state.json and the COMPLETE marker
(written once every rank has reported its part written); each rank writes its own RNG state. DDP weights and
optimizer state are the same on every rank, so rank 0 saves them as a single process does. FSDP saves model
and optimizer shards with `torch.distributed.checkpoint` (DCP, which reshards on load: resume on another
world size works) and gathers the full weights to rank 0 for the HF model dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write, remove_tree, replace_atomically, staging_dir
from lmforge.model.hf import load_model, save_model
from lmforge.train.distributed import Dist, all_agree, barrier, broadcast_object, consolidate, is_sharded
from lmforge.train.optim import AnyOptimizer, CombinedOptimizer

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MODEL_DIR = "model"
TRAIN_STATE = "train_state"
COMPLETE = "COMPLETE"
FORMAT_VERSION = 1
TRAINED = "trained.safetensors"  # train_state/trained.safetensors: an adapter run's trained tensors
DCP_DIR = "dcp"  # train_state/dcp: torch.distributed.checkpoint's shards of a sharded run
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
    dist: Dist | None = None,
) -> Path:
    """Write `RUN/checkpoints/step-NNNNNN` atomically, then delete older checkpoints beyond the newest `keep`.

    The config hash in state.json is that of `lineage["config"]` (None when lineage has no config). In a
    data-parallel run every rank calls it with the same arguments (`dist`); it returns once the checkpoint is
    complete, on every rank, or raises on every rank.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (the checkpoint just written), got {keep}")
    dist = dist or Dist.single()
    state = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "tokens": int(tokens),
        "data": data_state,
        "config_hash": config_hash(lineage["config"]) if lineage.get("config") is not None else None,
        "world_size": dist.world_size,
    }
    try:  # fail before writing anything when the cursor or lineage is not JSON
        state_json, lineage_json = _json(state), _json(lineage)
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"checkpoint data cursor and lineage must be JSON-serialisable: {e}") from None
    root = Path(run_dir) / CHECKPOINTS
    out = root / checkpoint_name(step)
    with ExitStack() as stack:
        tmp = None
        if dist.is_main:
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            tmp = stack.enter_context(staging_dir(out))
            (tmp / TRAIN_STATE).mkdir()
        tmp = Path(broadcast_object(str(tmp), dist))  # the staging dir's random name, the same on every rank
        failure: Exception | None = None
        try:
            _write_parts(tmp, model, optimizer, state_json, lineage_json, dist)
        except Exception as e:
            failure = e
        if not all_agree(failure is None, dist):  # every rank raises, so none waits for the others
            if failure is not None:
                raise failure
            raise LmforgeError(f"saving checkpoint {out.name} failed on another rank")
        if dist.is_main:
            _fsync_dir(tmp / TRAIN_STATE)
            atomic_write(tmp / COMPLETE, _json({"step": int(step)}))  # last: the checkpoint is whole
            _fsync_dir(tmp)
    if dist.is_main:
        _fsync_dir(root)  # the rename itself
        _prune(root, int(step), keep)
    barrier(dist)  # no rank goes on (or reads the checkpoint) before it is in place
    return out


def _write_parts(
    tmp: Path, model: nn.Module, optimizer: AnyOptimizer, state_json: str, lineage_json: str, dist: Dist
) -> None:
    """Fill a staging dir: the collective parts first (every rank reaches them), then each rank's files."""
    train_state = tmp / TRAIN_STATE
    sharded = is_sharded(_unwrap(model))
    if sharded:
        from torch.distributed.checkpoint import save as dcp_save
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(_unwrap(model), _optimizers(optimizer))
        dcp_save({"model": model_state, "optimizer": optim_state}, checkpoint_id=train_state / DCP_DIR)
    full = consolidate(model, dist)  # rank 0: the model with full weights (FSDP: gathered, a collective)
    if full is not None:
        if not sharded and not all(p.requires_grad for p in full.parameters()):
            # An adapter run changes only its trained tensors: the frozen base is not written again.
            trained = {
                n: p.detach().cpu().contiguous() for n, p in full.named_parameters() if p.requires_grad
            }
            replace_atomically(train_state / TRAINED, lambda path: save_file(trained, path))
            atomic_write(train_state / "lineage.json", lineage_json)
        else:
            save_model(full, tmp / MODEL_DIR)
            atomic_write(tmp / MODEL_DIR / "lmforge.json", lineage_json)
        if not sharded:  # DDP's optimizer state is the same on every rank: rank 0's is the whole of it
            _torch_save(optimizer.state_dict(), train_state / "optimizer.pt")
    _torch_save(capture_rng(), _rng_file(train_state, dist.rank))
    if dist.is_main:
        atomic_write(train_state / "state.json", state_json)
        if (tmp / MODEL_DIR).is_dir():
            _fsync_dir(tmp / MODEL_DIR)


def _rng_file(train_state: Path, rank: int) -> Path:
    """Rank 0's (a single process's) RNG state is rng.pt, rank r's rng-r.pt."""
    return train_state / ("rng.pt" if rank == 0 else f"rng-{rank}.pt")


def _optimizers(optimizer: AnyOptimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside `optimizer`, for DCP's state-dict helpers."""
    if isinstance(optimizer, CombinedOptimizer):
        return list(optimizer.optimizers.values())
    return [optimizer]


def _torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename."""
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))


def _prune(root: Path, step: int, keep: int) -> None:
    """Delete complete checkpoints older than `step` beyond the newest `keep - 1` of them."""
    older = sorted((s, p) for s, p in _complete(root) if s < step)
    doomed = older[: max(0, len(older) - (keep - 1))]
    for _, path in doomed:
        # Hidden first (one rename): a crash mid-delete leaves a leftover, never a gutted step-* dir.
        remove_tree(path)
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


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: AnyOptimizer | None, *, dist: Dist | None = None
) -> dict[str, Any]:
    """Restore weights (in place), optimizer state and every RNG from a checkpoint; return its state.json.

    In a data-parallel run every rank calls it (`dist`). A sharded (FSDP) checkpoint is read through DCP, on
    any world size and into a sharded model or not; another checkpoint is read from its HF dir and
    optimizer.pt, into an unsharded (single process or DDP) model only. Each rank restores its own RNG state.
    """
    path = Path(path)
    dist = dist or Dist.single()
    if not (path / COMPLETE).is_file():
        raise LmforgeError(f"{path}: not a complete checkpoint ({COMPLETE} marker missing)")
    train_state = path / TRAIN_STATE
    state = _read_part(train_state / "state.json", lambda f: json.loads(f.read_text(encoding="utf-8")))
    if state.get("format_version") != FORMAT_VERSION:
        raise LmforgeError(
            f"{path}: checkpoint format {state.get('format_version')!r}, this lmforge reads {FORMAT_VERSION}"
        )
    inner = _unwrap(model)
    if (train_state / DCP_DIR).is_dir():
        _load_dcp(train_state / DCP_DIR, inner, optimizer)
    elif is_sharded(inner):
        raise LmforgeError(
            f"{path} was saved by an unsharded run (no {TRAIN_STATE}/{DCP_DIR}): resume it with DDP or one "
            "process, or start the FSDP run from its model dir (model.init_from)"
        )
    elif (train_state / TRAINED).is_file():
        _load_trained(train_state / TRAINED, _read_part(train_state / TRAINED, load_file), inner)
        if optimizer is not None:
            optimizer.load_state_dict(_read_part(train_state / "optimizer.pt", _torch_load))
    else:
        dtype = next(iter(inner.parameters())).dtype
        loaded = load_model(path / MODEL_DIR, dtype=dtype)
        inner.load_state_dict(loaded.state_dict())
        del loaded
        if optimizer is not None:
            optimizer.load_state_dict(_read_part(train_state / "optimizer.pt", _torch_load))
    rng = _rng_file(train_state, dist.rank)
    if rng.is_file():
        restore_rng(_read_part(rng, _torch_load))
    else:  # a rank the saving run did not have: its RNG keeps the seeded state
        log.warning("%s has no RNG state for rank %d: this rank's RNG is not restored", path, dist.rank)
    return state


@torch.no_grad()
def _load_trained(file: Path, stored: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Copy an adapter run's trained tensors (read from `file`) into `model`, which must train exactly those."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(stored) != set(trainable):
        missing, extra = sorted(set(trainable) - set(stored)), sorted(set(stored) - set(trainable))
        raise LmforgeError(
            f"{file}: its trained tensors differ from the ones this run trains (missing {missing[:3]}, "
            f"unexpected {extra[:3]}): the run's method or config changed; start it again with --overwrite"
        )
    for name, p in trainable.items():
        p.copy_(stored[name])


def _torch_load(file: Path) -> Any:
    return torch.load(file, map_location="cpu", weights_only=True)


def _read_part(file: Path, read: Callable[[Path], Any]) -> Any:
    """`read(file)` for one file of a checkpoint; a missing, cut or damaged file is an error that names it."""
    try:
        value = read(file)
    except (OSError, ValueError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise LmforgeError(
            f"{file}: unreadable ({type(e).__name__}: {str(e)[:120]}): the checkpoint {file.parents[1].name} is "
            f"damaged; delete {file.parents[1]} to resume from the checkpoint before it"
        ) from None
    if file.suffix == ".json" and not isinstance(value, dict):
        raise LmforgeError(
            f"{file}: expected a JSON object; delete {file.parents[1]} to resume from the one before"
        )
    return value


def _load_dcp(directory: Path, model: nn.Module, optimizer: AnyOptimizer | None) -> None:
    """Read DCP shards into `model` (sharded or not) and `optimizer` in place; resharded to this world size."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    single = not torch.distributed.is_initialized()  # e.g. an FSDP run's checkpoint resumed by one process
    optimizers = _optimizers(optimizer) if optimizer is not None else []
    if optimizers:
        model_state, optim_state = get_state_dict(model, optimizers)
        target = {"model": model_state, "optimizer": optim_state}
    else:
        target = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # DCP's note on no_dist: intended
        dcp_load(target, checkpoint_id=directory, no_dist=single)  # in place, into this rank's shards
    if optimizers:
        set_state_dict(
            model, optimizers, model_state_dict=target["model"], optim_state_dict=target["optimizer"]
        )
    else:
        set_model_state_dict(model, target["model"])


# --------------------------------------------------------------------------------------------- helpers


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under `torch.compile` (`_orig_mod`) and DDP (`module`) wrappers (FSDP2 wraps in place)."""
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
