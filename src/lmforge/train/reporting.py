"""What a run shows and keeps of the loop's metric records: FLOPs and MFU, a live progress bar, TensorBoard and
W&B sinks, and the loss-curve PNG.

The loop (`lmforge.train.loop.train`) hands every record to one `progress(record)` callback and appends it to
`RUN/metrics.jsonl`; a stage composes the pieces here into that callback (see `ProgressBar`, `open_sinks`,
`with_mfu`) and draws `plot_loss_curve` from the file when the run ends.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lmforge.errors import LmforgeError
from lmforge.fileio import replace_atomically
from lmforge.model.configs import DecoderConfig, ModelConfig
from lmforge.model.linear import CPU_HAS_BF16_GEMM

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


_PEAKS: dict[tuple[str, torch.dtype], float] = {}  # matmul_peak's in-process cache


def matmul_peak(device: torch.device | str, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Best FLOP/s of a square GEMM measured on `device` for about `seconds` (cached per device and dtype).

    The MFU denominator, measured rather than looked up: a CPU VM has no published peak, and a GPU's datasheet
    number (dense, boost clock) is rarely reached by any GEMM, so measured MFU reads as "of what this machine
    can do". Uses torch's current thread count on CPU, as training does.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype)
    if key not in _PEAKS:
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
        _PEAKS[key] = best
        log.info("matmul peak on %s (%s): %.3g FLOP/s", device, dtype, best)
    return _PEAKS[key]


def step_peak(device: torch.device | str, bf16: bool) -> float:
    """The MFU denominator of a training step: the matmul peak of the dtype its GEMMs actually run in.

    bf16 autocast runs bf16 GEMMs on CUDA and on CPUs with bf16 instructions; on other CPUs lmforge's
    `Linear` runs them as fp32 GEMMs (`model/linear.py`), so the fp32 peak is the honest ceiling there.
    """
    device = torch.device(device)
    gemm_bf16 = bf16 and (device.type != "cpu" or CPU_HAS_BF16_GEMM)
    return matmul_peak(device, torch.bfloat16 if gemm_bf16 else torch.float32)


def peak_memory(device: torch.device | str) -> int:
    """Peak memory in bytes: `torch.cuda.max_memory_allocated` on CUDA (tensors only), else the process's peak
    resident set size (`ru_maxrss`: everything the process ever held, Python and libraries included)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def with_mfu(
    record: dict[str, Any], flops_per_token: float, peak_flops: float, device: torch.device | str
) -> dict[str, Any]:
    """The record plus "peak_memory" (bytes) and, for a training record, "mfu" (achieved / peak FLOP/s)."""
    out = {**record, "peak_memory": peak_memory(device)}
    if "tokens_per_s" in record:  # the loop's tokens_per_s counts step time only, not validation
        out["mfu"] = record["tokens_per_s"] * flops_per_token / peak_flops
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


def open_sinks(names: list[str], run_dir: str | Path, config: dict[str, Any]) -> Sinks:
    """Open the named sinks ⊆ {"tensorboard", "wandb"}: TensorBoard event files in `run_dir/tensorboard`, a W&B
    run (project $WANDB_PROJECT or "lmforge", $WANDB_MODE honoured, e.g. "offline") with `config` attached."""
    unknown = sorted(set(names) - set(SINKS))
    if unknown:
        raise LmforgeError(f"unknown metrics sink(s) {unknown}; available: {', '.join(SINKS)}")
    modules = {name: _require(name) for name in names}  # every missing package reported before any opens
    run_dir = Path(run_dir)
    sinks = Sinks()
    if "tensorboard" in modules:
        from torch.utils.tensorboard import SummaryWriter

        sinks.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
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


def plot_loss_curve(
    metrics_path: str | Path,
    png_path: str | Path,
    *,
    log_y: bool = False,
    size: tuple[float, float] = (8, 4.5),
) -> Path:
    """Write the train loss (line) and val loss (points) against step as a `size`-inch, 100-dpi PNG, atomically.

    An empty or missing metrics file gives an empty plot that says so, so the PNG always exists.
    """
    # Imported here: matplotlib takes ~0.5 s to import. A bare Agg-backed Figure: no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2, label="train loss")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=4, lw=1, label="val loss")
    if train or val:
        ax.legend()
        if log_y:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no loss records yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return replace_atomically(png_path, lambda tmp: fig.savefig(tmp, format="png"))
