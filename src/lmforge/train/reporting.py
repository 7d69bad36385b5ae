"""What a run shows and keeps of the loop's metric records: FLOPs and MFU, a live progress bar, TensorBoard and
W&B sinks, and the loss-curve PNG.

The loop (`lmforge.train.loop.train`) hands every record to one `progress(record)` callback and appends it to
`RUN/metrics.jsonl`; a stage composes the pieces here into that callback (see `ProgressBar`, `open_sinks`,
`with_mfu`), cuts the logs back to a resumed run's step first (`rewind_logs`) and draws `plot_loss_curve` from
the file when the run ends. The MFU denominator, the machine's matmul peak, is kept in lmforge's cache folder.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write, cache_dir, replace_atomically
from lmforge.model.configs import DecoderConfig, ModelConfig
from lmforge.model.linear import CPU_HAS_BF16_GEMM

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ FLOPs


def matmul_params(config: ModelConfig) -> int:
    """Weights of the matmuls one token goes through: every linear layer incl. the LM head (tied or not)."""
    L, C, H, V = config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    if isinstance(config, DecoderConfig):
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        per_layer = C * q + 2 * C * kv + q * C + 3 * C * H  # q, k, v (GQA: kv heads only), o; gate, up, down
        head = C * V  # lm_head: a matmul even when it shares the embedding's tensor
    else:
        per_layer = 4 * C * C + 2 * C * H  # query, key, value, output; intermediate, output
        head = C * C + C * V  # MLM head: transform dense, decoder (tied to the word embeddings)
    return L * per_layer + head


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * matmul_params + 12 * n_layers * q_width * seq_len.

    PaLM's (appendix B) and nanoGPT's convention: the LM head's matmul counts, the embedding lookups (a gather)
    and norms, biases and activations do not. Attention is QK^T and AV, 2 * 2 * seq_len * q_width forward per
    token and layer, x3 with the backward; it is *not* halved for a causal mask or a sliding window (nor by
    PaLM or nanoGPT), so MFU is comparable across them. For BERT the count is BertForMaskedLM's: the pooler
    and NSP head of BertForPreTraining run once per sequence ((C^2 + 2C) / seq_len a token) and are left out.
    """
    if isinstance(config, DecoderConfig):
        q_width = config.num_attention_heads * config.head_dim  # GQA shares k/v, not the score matmuls
    else:
        q_width = config.hidden_size
    return 6.0 * matmul_params(config) + 12.0 * config.num_hidden_layers * q_width * seq_len


PEAKS_FILE = "matmul_peaks.json"  # in lmforge's cache folder: {"<machine> <dtype>": FLOP/s}
_PEAKS: dict[str, float] = {}  # this process's peaks, by `_peak_key`


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _peak_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a matmul peak is a property of: the chip (a CPU with the thread count torch uses) and the dtype."""
    if device.type == "cuda":
        machine = f"cuda {torch.cuda.get_device_name(device)}"
    elif device.type == "cpu":
        machine = f"cpu {_cpu_name()} x{torch.get_num_threads()} threads"
    else:
        machine = device.type
    return f"{machine} {str(dtype).removeprefix('torch.')}"


def _stored_peaks() -> dict[str, float]:
    """The peaks in the cache file; a missing or damaged file holds none (and is rewritten by `_store_peak`)."""
    folder = cache_dir()
    if folder is None or not (folder / PEAKS_FILE).is_file():
        return {}
    try:
        stored = json.loads((folder / PEAKS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.debug("ignoring the matmul peak cache %s: %s", folder / PEAKS_FILE, e)
        return {}
    if not isinstance(stored, dict):
        return {}
    return {
        k: float(v) for k, v in stored.items() if isinstance(v, int | float) and math.isfinite(v) and v > 0
    }


def _store_peak(key: str, flops: float) -> None:
    """Record `flops` as the peak of `key` in the cache file (atomically; a cache that cannot be written is
    skipped: the peak is only an MFU denominator)."""
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        peaks = {**_stored_peaks(), key: flops}
        atomic_write(folder / PEAKS_FILE, json.dumps(peaks, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        log.debug("cannot write the matmul peak cache in %s: %s", folder, e)


def _measure(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """The best FLOP/s of one square GEMM among those run for about `seconds` (at least three)."""
    n = 8192 if device.type == "cuda" else 1024  # big enough to be compute-bound, one GEMM << `seconds`
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b, out=c)  # warm-up: kernel selection, thread pool start
    sync()
    best, start = 0.0, time.perf_counter()
    for i in range(1_000_000):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
        if i >= 2 and time.perf_counter() - start > seconds:
            break
    return best


def _device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def matmul_peak(device: torch.device | str, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """The best FLOP/s a square GEMM reached on this machine in `dtype`: measured once per process (the best
    GEMM over about `seconds`) and kept in lmforge's cache folder per machine and dtype, so the peak is the
    best figure any run has seen, not one a busy moment at start made low.

    The MFU denominator, measured rather than looked up: a CPU VM has no published peak, and a GPU's datasheet
    number (dense, boost clock) is rarely reached by any GEMM, so measured MFU reads as "of what this machine
    can do". Uses torch's current thread count on CPU, as training does. `raise_peak` lifts it when a run
    beats it.
    """
    device = _device(device)
    key = _peak_key(device, dtype)
    if key not in _PEAKS:
        measured = _measure(device, dtype, seconds)
        stored = _stored_peaks().get(key, 0.0)
        _PEAKS[key] = max(measured, stored)
        if measured > stored:
            _store_peak(key, measured)
        log.info(
            "matmul peak on %s (%s): %.3g FLOP/s (measured now: %.3g)", device, dtype, _PEAKS[key], measured
        )
    return _PEAKS[key]


def raise_peak(device: torch.device | str, dtype: torch.dtype, achieved: float) -> float:
    """The `dtype` matmul peak of `device` after a run achieved `achieved` FLOP/s: a figure above the peak
    shows the measurement was low (a busy machine), so it becomes the peak, here and in the cache."""
    device = _device(device)
    peak = matmul_peak(device, dtype)
    if achieved > peak:
        key = _peak_key(device, dtype)
        log.info("matmul peak on %s (%s) raised to %.3g FLOP/s: a step achieved it", device, dtype, achieved)
        _PEAKS[key] = achieved
        _store_peak(key, achieved)
    return _PEAKS[_peak_key(device, dtype)]


def step_dtype(device: torch.device | str, bf16: bool) -> torch.dtype:
    """The dtype a training step's GEMMs actually run in.

    bf16 autocast runs bf16 GEMMs on CUDA and on CPUs with bf16 instructions; on other CPUs lmforge's
    `Linear` runs them as fp32 GEMMs (`model/linear.py`), so the fp32 peak is the honest ceiling there.
    """
    gemm_bf16 = bf16 and (torch.device(device).type != "cpu" or CPU_HAS_BF16_GEMM)
    return torch.bfloat16 if gemm_bf16 else torch.float32


def step_peak(device: torch.device | str, bf16: bool) -> float:
    """The MFU denominator of a training step: the matmul peak of the dtype its GEMMs run in (`step_dtype`)."""
    return matmul_peak(device, step_dtype(device, bf16))


def peak_memory(device: torch.device | str) -> int:
    """Peak memory in bytes: `torch.cuda.max_memory_allocated` on CUDA (tensors only), else the process's peak
    resident set size (`ru_maxrss`: everything the process ever held, Python and libraries included)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def with_mfu(
    record: dict[str, Any], flops_per_token: float, device: torch.device | str, dtype: torch.dtype
) -> dict[str, Any]:
    """The record plus "peak_memory" (bytes) and, for a training record, "mfu": achieved FLOP/s over the
    `dtype` matmul peak of `device`, at most 1 (a step above the peak raises it: `raise_peak`)."""
    out = {**record, "peak_memory": peak_memory(device)}
    if "tokens_per_s" in record:  # the loop's tokens_per_s counts step time only, not validation
        achieved = record["tokens_per_s"] * flops_per_token
        out["mfu"] = achieved / raise_peak(device, dtype, achieved)
    return out


# ---------------------------------------------------------------------------------------------- progress


class ProgressBar:
    """A live rich bar fed the loop's records: step/max_steps, loss, tokens/s, last val loss, MFU, ETA.

    Use as a context manager and pass the instance as `train(..., progress=bar)`. A resumed run passes its
    `start_step`, so the bar and the ETA start there. When the console is not a terminal (CI logs, pytest
    capture) rich draws nothing live and prints the bar once at exit; this class adds one plain line every
    `line_every` records. The CLI owns the terminal: pass its `Console` (default: one on stderr).
    """

    def __init__(
        self, max_steps: int, start_step: int = 0, *, console: Console | None = None, line_every: int = 10
    ) -> None:
        self.console = console or Console(stderr=True)
        self.max_steps, self.start_step, self.line_every = max_steps, start_step, line_every
        self.records = 0
        self.fields: dict[str, str] = {}  # what the bar shows, formatted: {"loss": "loss 2.3456", ...}
        self._progress = Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[metrics]}"),
            TimeRemainingColumn(),
            console=self.console,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task("train", total=max_steps, completed=start_step, metrics="")

    def __enter__(self) -> ProgressBar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, record: dict[str, Any]) -> None:
        """Show one loop record (a training record, or the final validation one without "loss")."""
        # A training record's "step" is the step just taken (0-based); the final one's is the steps done.
        done = record["step"] + 1 if "loss" in record else record["step"]
        if "loss" in record:
            self.fields["loss"] = f"loss {record['loss']:.4f}"
            self.fields["tok/s"] = f"{record['tokens_per_s']:,.0f} tok/s"
        if "val_loss" in record:
            self.fields["val"] = f"val {record['val_loss']:.4f}"
        if "mfu" in record:
            self.fields["mfu"] = f"mfu {record['mfu']:.1%}"
        metrics = "  ".join(self.fields.values())
        self._progress.update(self._task, completed=done, metrics=metrics)
        if not self.console.is_terminal and self.records % self.line_every == 0:
            # Seconds per step over this call's steps (`elapsed` restarts with each `train` call).
            eta = record["elapsed"] / max(done - self.start_step, 1) * (self.max_steps - done)
            self.console.print(
                f"step {done}/{self.max_steps}  {metrics}  eta {_duration(eta)}",
                highlight=False,
                soft_wrap=True,
            )
        self.records += 1


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


# ------------------------------------------------------------------------------------------------- sinks

SINKS = ("tensorboard", "wandb")  # each is also the name of its package and of lmforge's pip extra


class Sinks:
    """The metrics sinks a run asked for; `sinks(record)` writes a record's numbers as scalars at its step."""

    def __init__(self, tensorboard: Any = None, wandb_run: Any = None) -> None:
        self.tensorboard, self.wandb_run = tensorboard, wandb_run

    def __call__(self, record: dict[str, Any]) -> None:
        """Write every int/float value but "step" under its record key (loss, val_loss, mfu, ...)."""
        step = int(record["step"])
        scalars = {
            k: float(v)
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self.tensorboard is not None:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)  # W&B drops steps below its last (a resumed range)

    def close(self) -> None:
        """Flush and close every sink."""
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def __enter__(self) -> Sinks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _require(sink: str) -> Any:
    try:
        return importlib.import_module(sink)
    except ImportError:
        raise LmforgeError(
            f"metrics sink {sink!r} needs the {sink} package: pip install 'lmforge[{sink}]' (or pip install {sink})"
        ) from None


def open_sinks(names: list[str], run_dir: str | Path, config: dict[str, Any], start_step: int = 0) -> Sinks:
    """Open the named sinks ⊆ {"tensorboard", "wandb"}: TensorBoard event files in `run_dir/tensorboard`, a W&B
    run (project $WANDB_PROJECT or "lmforge", $WANDB_MODE honoured, e.g. "offline") with `config` attached.

    A run resumed at `start_step` hides the TensorBoard scalars an earlier attempt logged from that step on
    (they are logged again), as `rewind_logs` cuts metrics.jsonl."""
    unknown = sorted(set(names) - set(SINKS))
    if unknown:
        raise LmforgeError(f"unknown metrics sink(s) {unknown}; available: {', '.join(SINKS)}")
    modules = {name: _require(name) for name in names}  # every missing package reported before any opens
    run_dir = Path(run_dir)
    sinks = Sinks()
    if "tensorboard" in modules:
        from torch.utils.tensorboard import SummaryWriter

        sinks.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step)
        sinks.tensorboard.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")
    if "wandb" in modules:
        sinks.wandb_run = modules["wandb"].init(
            project=os.environ.get("WANDB_PROJECT", "lmforge"),
            name=run_dir.name,
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE"),
        )
    return sinks


# ---------------------------------------------------------------------------------------------- the curve


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl in step order; a missing file has none.

    Steps rise within one run, so a line whose step is at or below the previous line's starts a resumed
    segment: it and what follows replace every earlier record from that step on (the later lines win). A line
    that is not JSON (a crash mid-write) is skipped.
    """
    path = Path(path)
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d is not JSON, skipped", path, n)
            continue
        if records and record["step"] <= records[-1]["step"]:
            records = [r for r in records if r["step"] < record["step"]]
        records.append(record)
    return records


RUN_LOGS = ("metrics.jsonl", "samples.jsonl")  # a run's append-only logs, one JSON record per line


def rewind_logs(run_dir: str | Path, step: int, names: tuple[str, ...] = RUN_LOGS) -> None:
    """Cut each append-only log in `run_dir` back to what the run logged before `step` (the steps a resumed
    run starts from), so the resumed run's lines do not repeat steps; `step` 0 empties them (a fresh start).

    A record's "step" is the step it was logged at (0-based: after that many updates), so those at `step` and
    after belong to work the checkpoint does not hold and are logged again. Records without a step (a header)
    are kept, lines that are not JSON (a crash mid-write) dropped. Each file is rewritten atomically, and only
    when something goes: a crash here leaves the old file or the cut one, never a half-written one.
    """
    for name in names:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if _logged_before(line, step)]
        if len(kept) < len(lines):
            log.info("%s: %d line(s) from step %d on dropped (logged again from there)", path,
                     len(lines) - len(kept), step)  # fmt: skip
            atomic_write(path, "".join(line + "\n" for line in kept))


def _logged_before(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    if not isinstance(record, dict):
        return False
    return not isinstance(record.get("step"), int) or record["step"] < step


def plot_loss_curve(
    metrics_path: str | Path,
    png_path: str | Path,
    *,
    title: str | None = None,
    baselines: dict[str, float] | None = None,
    log_y: bool = False,
    size: tuple[float, float] = (8, 4.5),
) -> Path:
    """Write `loss_figure` of a metrics file as a `size`-inch, 100-dpi PNG, atomically; the title defaults to
    the run directory's name. An empty or missing metrics file gives a plot that says so: the PNG always exists.
    """
    records = read_metrics(metrics_path)
    fig = loss_figure(records, title=title or Path(metrics_path).resolve().parent.name, baselines=baselines,
                      log_y=log_y, size=size)  # fmt: skip
    return replace_atomically(png_path, lambda tmp: fig.savefig(tmp, format="png"))


def loss_figure(
    records: list[dict[str, Any]],
    *,
    title: str,
    baselines: dict[str, float] | None = None,
    log_y: bool = False,
    size: tuple[float, float] = (8, 4.5),
) -> Figure:
    """The loss curve of a run's metric records: train loss (line) and val loss (points) against the step, with
    each of `baselines` ({label: loss}, e.g. the unigram entropy) as a dashed level, and below it, on the same
    step axis, the learning rate. A record's step counts the updates before it was measured, for the train
    loss (that step's batch) and the val loss alike, so the two lines compare the same weights."""
    # Imported here: matplotlib takes ~0.5 s to import. A bare Agg-backed Figure: no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    lr = [r for r in records if "lr" in r]
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    if lr:
        ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    else:
        ax, lr_ax = fig.add_subplot(), None
    ax.set_title(title)
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2, label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=4, lw=1, label="val loss")
    if train or val:
        for i, (label, level) in enumerate((baselines or {}).items()):
            ax.axhline(level, ls="--", lw=1, color=f"C{i + 2}", label=f"{label} ({level:.3f})")
        ax.legend()
        if log_y:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no loss records yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if lr_ax is not None:
        lr_ax.plot([r["step"] for r in lr], [r["lr"] for r in lr], lw=1.2, color="C4", label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        lr_ax.grid(alpha=0.3)
    (lr_ax or ax).set_xlabel("step")
    fig.tight_layout()
    return fig
