"""Data-parallel training on PyTorch's own engine: torchrun launches, DDP or FSDP2 wraps, gloo or NCCL talks.

What a stage does (the loop and the checkpoints take `dist` and do the rest)::

    dist = init_distributed()  # torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK), or one process
    model = wrap_model(model.to(dist.device), "fsdp", dist, bf16=...)  # then build the optimizer
    batches = window_sampler(..., micro_batch_size * dist.world_size, ...)  # the GLOBAL micro-batch
    train(model, batches, ..., dist=dist)  # each rank trains on its rows of each (`shard_rows`)

Every rank draws the same global micro-batches (the samplers are seeded) and keeps a contiguous row slice of
each, so the data cursor is global: a run resumes on another world size at the same global batch. A step's
loss is normalised by the units of the whole global step and every backward is scaled by the world size, so
the averaged gradient equals the single-process gradient of the global batch (see `train`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as td
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.train.objectives import Batch

Strategy = Literal["ddp", "fsdp"]
"""How the model is replicated: DDP (a full copy per rank) or FSDP2 (`fully_shard`: parameters, gradients and
optimizer state sharded across ranks)."""


@dataclass(frozen=True)
class Dist:
    """Where this process sits in the job: its global rank, the number of processes, its GPU index, its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """The compute device, also the one collective tensors live on (CUDA for NCCL, CPU for gloo)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes metrics, results and shared files."""
        return self.rank == 0

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> Dist:
        """A single-process run on `device`."""
        return cls(device=torch.device(device))


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or `launch`), so a CLI must not launch again."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process torchrun did not start (read from the env, before any init)."""
    return os.environ.get("RANK", "0") == "0"


def training_device(name: str) -> str:
    """`train.device` resolved: "auto" is CUDA when torch sees a GPU, else the CPU; "cuda" without one is an
    error rather than a silent CPU run."""
    if name not in ("auto", "cpu", "cuda"):
        raise LmforgeError(f"training runs on cpu or cuda (or auto), got device {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(
            "train.device=cuda, but torch sees no CUDA device here: set train.device=auto or cpu"
        )
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def init_distributed(device: str | None = None) -> Dist:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) when WORLD_SIZE > 1, else a single process.

    `device` is "cpu" or "cuda" (default: CUDA when available); on CUDA each process takes GPU LOCAL_RANK.
    """
    device_type = training_device(device or "auto")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        return Dist.single(dev)
    if not td.is_initialized():
        if device_type == "cuda":  # device_id binds the communicator to this GPU at once (no lazy init)
            td.init_process_group("nccl", device_id=dev)
        else:
            td.init_process_group("gloo")
    return Dist(rank=td.get_rank(), world_size=td.get_world_size(), local_rank=local_rank, device=dev)


def close_distributed() -> None:
    """Leave the process group (a no-op in a single process)."""
    if td.is_initialized():
        td.destroy_process_group()


# --------------------------------------------------------------------------------------------- wrapping


def layer_stack(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the elements of every nn.ModuleList (`model.layers`, BERT's `encoder.layer`)."""
    return [block for stack in model.modules() if isinstance(stack, nn.ModuleList) for block in stack]


def wrap_model(
    model: nn.Module, strategy: Strategy, dist: Dist, *, bf16: bool = False, unused_parameters: bool = False
) -> nn.Module:
    """DDP, or FSDP2 `fully_shard` per block then the root (bf16 compute, fp32 gradient reduction if `bf16`).

    The model must already be on `dist.device`; build the optimizer after wrapping (FSDP replaces the
    parameters by sharded DTensors). A single process gets the model back unchanged. `unused_parameters`:
    the objective leaves some trainable parameters without a gradient (e.g. "mlm" on BertForPreTraining: the
    NSP head), which DDP must look for after every forward (FSDP copes without being told).
    """
    if dist.world_size == 1:
        return model
    if strategy == "ddp":
        ids = [dist.local_rank] if dist.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=unused_parameters
        )
    if strategy != "fsdp":
        raise LmforgeError(f"unknown distributed strategy {strategy!r}: use ddp or fsdp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # fully_shard keeps each rank's own slice of its local weights: start every rank from rank 0's, as DDP does.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            td.broadcast(tensor, src=0)
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    # bf16: parameters are cast to bf16 for compute, gradients reduced in fp32, the sharded master copy and
    # optimizer state stay fp32. Without it everything is fp32.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in layer_stack(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # The root takes the rest: embeddings, final norm, heads (a tied head stays with its embedding).
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or the model under `torch.compile`) is wrapped by FSDP2's `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def consolidate(model: nn.Module, dist: Dist) -> nn.Module | None:
    """On rank 0, the plain model with the full weights (None on other ranks), e.g. to save or sample from.

    Unwraps `torch.compile` and DDP (the same module, on its device); an FSDP model's shards are gathered into
    a new unsharded copy on rank 0's CPU, which makes this a collective: every rank must call it.
    """
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    if not is_sharded(model):
        return model if dist.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    # The full weights on rank 0's CPU (an empty dict elsewhere).
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main:
        return None
    # fully_shard swapped the class for a subclass of (FSDPModule, the model's class): build the latter.
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = cls(model.config)
    plain.load_state_dict(state, strict=False, assign=True)  # a tied weight may come under one key only
    plain.tie_weights()
    missing = [name for name, t in plain.state_dict().items() if t.is_meta]
    if missing:
        raise LmforgeError(f"the gathered FSDP state dict lacks {', '.join(missing[:5])}")
    return plain.train(model.training)


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within it, backward passes reduce gradients across ranks only if `enabled` (off: accumulate locally).

    DDP's `no_sync` and FSDP2's `set_requires_gradient_sync`; nothing to do for an unwrapped model.
    """
    model = getattr(model, "_orig_mod", model)
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    else:
        yield


# ------------------------------------------------------------------------------------------------- data


def shard_rows(batch: Batch, dist: Dist) -> Batch:
    """This rank's contiguous slice of a global batch's rows: (B, ...) → (about B / world_size, ...).

    Rows split as evenly as possible (`torch.tensor_split`); 0-d tensors are kept whole. Exact gradients do not
    need equal shards (the loss is normalised by the global units), but every rank needs at least one row.
    """
    if dist.world_size == 1:
        return batch
    rows = {v.size(0) for v in batch.values() if v.dim() > 0}
    if len(rows) != 1:
        raise LmforgeError(
            f"a batch's tensors must share their first (row) dimension, got sizes {sorted(rows)}"
        )
    (n,) = rows
    if n < dist.world_size:
        raise LmforgeError(f"a global micro-batch of {n} rows cannot feed {dist.world_size} ranks")
    return {k: v.tensor_split(dist.world_size)[dist.rank] if v.dim() > 0 else v for k, v in batch.items()}


# ---------------------------------------------------------------------------------------- collectives


def all_reduce_sum(values: dict[str, float], dist: Dist) -> dict[str, float]:
    """Each value summed over ranks, in float64 (exact for integer counts below 2**53); keys must match."""
    if dist.world_size == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dist.device)
    td.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def all_agree(ok: bool, dist: Dist) -> bool:
    """True on every rank if `ok` is true on every rank (a collective: all ranks must call it)."""
    if dist.world_size == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=dist.device)
    td.all_reduce(flag)
    return int(flag) == 0


def broadcast_object(obj: Any, dist: Dist) -> Any:
    """Rank 0's `obj` (picklable) on every rank."""
    if dist.world_size == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0, device=dist.device)
    return box[0]


def barrier(dist: Dist) -> None:
    """Wait until every rank gets here."""
    if dist.world_size > 1:
        td.barrier(device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)


# ------------------------------------------------------------------------------------------- launching


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m lmforge <argv>` in `nproc` local processes through torchrun's launcher; its exit status.

    A standalone rendezvous on 127.0.0.1 (a free port), no restarts. Rank 0's output comes to this terminal,
    the other ranks' goes to files; when a run fails on another rank and rank 0 printed no `error:` line, the
    failing rank's (or its last lines) is repeated here. Multi-node runs use `torchrun` itself.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise LmforgeError(f"--nproc must be at least 1, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="lmforge-launch-") as tmp, _launch_env(nproc):
        logs = Path(tmp)
        # One copy of each log line and of a --json document: rank 0's stdout comes straight here, its stderr
        # through a file copied here as it grows (so we know whether it reported a failure), others' to files.
        redirects = {r: Std.ERR if r == 0 else Std.ALL for r in range(nproc)}
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",  # port 0: the rendezvous store binds a free port
            rdzv_configs={"is_host": True},
            max_restarts=0,
            logs_specs=DefaultLogsSpecs(log_dir=tmp, redirects=redirects),
        )
        done = threading.Event()
        copier = threading.Thread(target=_copy_stderr, args=(logs, done), daemon=True)
        copier.start()
        try:
            elastic_launch(config, sys.executable)("-u", "-m", "lmforge", *argv)
            failure = None
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()
        except SignalException as e:  # Ctrl-C reaches the launcher too: rank 0 has said where the run stopped
            if e.sigval != signal.SIGINT:
                raise
            raise KeyboardInterrupt from None
        finally:
            done.set()
            copier.join()
        if failure is None:
            return 0
        if rank != 0 and not any(line.startswith("error:") for line in _stderr_lines(logs, 0)):
            for line in _failure_lines(logs, failure.local_rank):
                print(f"[rank {rank}] {line}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1


def _copy_stderr(logs: Path, done: threading.Event) -> None:
    """Copy rank 0's stderr file to this process's stderr as it grows, to its end once `done` is set."""
    pos = 0
    while True:
        finished = done.is_set()  # then one last read: what was written before the flag
        for path in logs.glob("*/attempt_*/0/stderr.log"):
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(pos)
                text = f.read()
                pos = f.tell()
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()
        if finished:
            return
        time.sleep(0.05)


def _stderr_lines(logs: Path, local_rank: int) -> list[str]:
    """A worker's stderr lines (this run has one attempt)."""
    files = sorted(logs.glob(f"*/attempt_*/{local_rank}/stderr.log"))
    return files[-1].read_text(errors="replace").splitlines() if files else []


@contextmanager
def _launch_env(nproc: int) -> Iterator[None]:
    """Workers inherit this process's environment: share the cores between them (torchrun sets 1), quietly."""
    saved = os.environ.get("OMP_NUM_THREADS")
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    if saved is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    elastic.setLevel(logging.CRITICAL)  # the launcher's own failure report repeats what the workers said
    try:
        yield
    finally:
        elastic.setLevel(level)
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def _failure_lines(logs: Path, local_rank: int) -> list[str]:
    """A failed worker's `error:` lines, else the last lines of its stderr."""
    lines = _stderr_lines(logs, local_rank)
    return [line for line in lines if line.startswith("error:")] or lines[-10:]
