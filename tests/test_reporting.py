"""Reporting: FLOPs against hand counts and the real models, MFU, the progress bar, sinks and the loss curve."""

from __future__ import annotations

import io
import json
import struct
import sys
import types
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.configs import preset
from lmforge.model.hf import build_model
from lmforge.train import reporting
from lmforge.train.reporting import (
    ProgressBar,
    flops_per_token,
    loss_figure,
    matmul_params,
    matmul_peak,
    open_sinks,
    peak_memory,
    plot_loss_curve,
    read_metrics,
    rewind_logs,
    with_mfu,
)

# ------------------------------------------------------------------------------------------------ FLOPs


def test_flops_per_token_tiny_llama_by_hand():
    """tiny-llama: V=256, C=64, I=128, 2 layers, 4 query heads and 2 kv heads of 16.

    per layer: q 64*64 + k, v 2*64*32 + o 64*64 + gate, up, down 3*64*128 = 4096+4096+4096+24576 = 36864
    N = 2*36864 + head 64*256 = 73728 + 16384 = 90112; 6N = 540672
    attention at T=32: 12 * 2 layers * 64 (4 heads * 16) * 32 = 49152; total 589824.
    """
    config = preset("tiny-llama")
    assert matmul_params(config) == 90112
    assert flops_per_token(config, 32) == 589824


def test_flops_per_token_tiny_bert_by_hand():
    """tiny-bert: V=256, C=64, I=128, 2 layers. Per layer 4*64*64 + 2*64*128 = 32768; MLM head 64*64 + 64*256
    = 20480; N = 65536 + 20480 = 86016. At T=128: 6N = 516096, attention 12*2*64*128 = 196608."""
    config = preset("tiny-bert")
    assert matmul_params(config) == 86016
    assert flops_per_token(config, 128) == 516096 + 196608


@pytest.mark.parametrize(
    ("name", "architecture"),
    [("tiny-llama", None), ("tiny-smollm", None), ("tiny-qwen3", None), ("tiny-bert", "BertForMaskedLM")],
)
def test_matmul_params_equal_the_models_linear_weights(name, architecture):
    config = preset(name)
    model = build_model(config, architecture)
    # Per module, so a tied lm_head (one tensor with the embedding) still counts once as a matmul.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert matmul_params(config) == linear


def test_attention_term_uses_query_heads_times_head_dim():
    # tiny-qwen3 sets head_dim=32: 4 heads x 32 = 128 wide queries in a 64-wide model.
    config = preset("tiny-qwen3")
    assert flops_per_token(config, 100) - flops_per_token(config, 0) == 12 * 2 * 128 * 100
    # Tying the head shares a tensor, not a matmul.
    assert flops_per_token(preset("tiny-llama", tie_word_embeddings=True), 64) == flops_per_token(
        preset("tiny-llama"), 64
    )


@pytest.fixture
def peaks(tmp_path, monkeypatch) -> Path:
    """A fresh peak cache: nothing measured in this process, an empty cache folder; its peaks file's path."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(reporting, "_PEAKS", {})
    return tmp_path / "cache" / reporting.PEAKS_FILE


CPU_F32 = reporting._peak_key(torch.device("cpu"), torch.float32)


def test_with_mfu_by_hand(peaks):
    """1000 tok/s x 6e6 FLOP/token = 6e9 FLOP/s of a 1.2e10 peak: MFU 0.5."""
    reporting._PEAKS[CPU_F32] = 1.2e10
    record = {"step": 3, "loss": 2.0, "tokens_per_s": 1000.0}
    out = with_mfu(record, 6e6, "cpu", torch.float32)
    assert out["mfu"] == pytest.approx(0.5)
    assert out["peak_memory"] > 0 and out["loss"] == 2.0
    final = with_mfu({"step": 4, "elapsed": 1.0, "val_loss": 1.5}, 6e6, "cpu", torch.float32)
    assert "mfu" not in final and final["peak_memory"] > 0


def test_matmul_peak_is_measured_once_per_machine_and_dtype_and_stored(peaks):
    peak = matmul_peak("cpu", torch.float32, seconds=0.05)
    assert peak > 0
    assert CPU_F32.startswith("cpu ") and CPU_F32.endswith(f" x{torch.get_num_threads()} threads float32")
    assert reporting._PEAKS[CPU_F32] == peak
    assert matmul_peak(torch.device("cpu"), torch.float32) == peak  # cached: not measured again
    assert json.loads(peaks.read_text()) == {CPU_F32: peak}


def test_a_stored_peak_above_this_measurement_is_read_back(peaks, monkeypatch):
    """A run started on a busy CPU measures a low peak; the best figure an earlier run stored still counts."""
    peaks.parent.mkdir()
    peaks.write_text(json.dumps({CPU_F32: 5e10, "cuda Other GPU bfloat16": 1e15}))
    monkeypatch.setattr(reporting, "_measure", lambda device, dtype, seconds: 1e10)
    assert matmul_peak("cpu", torch.float32) == 5e10
    assert json.loads(peaks.read_text()) == {CPU_F32: 5e10, "cuda Other GPU bfloat16": 1e15}  # unchanged


def test_a_step_faster_than_the_peak_raises_it_and_mfu_stays_at_most_one(peaks, monkeypatch):
    """Measured at start on a busy CPU: 1e9 FLOP/s. A step then does 1000 tok/s x 3.169e6 FLOP/token = 3.169e9
    FLOP/s: that is the machine's peak now (MFU 100%, not 316.9%), kept for later steps and later runs."""
    monkeypatch.setattr(reporting, "_measure", lambda device, dtype, seconds: 1e9)
    assert reporting.step_peak("cpu", bf16=False) == 1e9
    fast = with_mfu({"step": 5, "loss": 2.0, "tokens_per_s": 1000.0}, 3.169e6, "cpu", torch.float32)
    assert fast["mfu"] == 1.0
    assert matmul_peak("cpu", torch.float32) == pytest.approx(3.169e9)
    assert json.loads(peaks.read_text()) == {CPU_F32: pytest.approx(3.169e9)}
    slower = with_mfu({"step": 6, "loss": 2.0, "tokens_per_s": 500.0}, 3.169e6, "cpu", torch.float32)
    assert slower["mfu"] == pytest.approx(0.5)
    monkeypatch.setattr(reporting, "_PEAKS", {})  # a later run reads it back
    assert matmul_peak("cpu", torch.float32) == pytest.approx(3.169e9)


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"KEY": "fast"}', ""])
def test_a_damaged_peak_cache_is_ignored_and_rebuilt(peaks, monkeypatch, damage):
    peaks.parent.mkdir()
    peaks.write_text(damage.replace("KEY", CPU_F32))
    monkeypatch.setattr(reporting, "_measure", lambda device, dtype, seconds: 2e9)
    assert matmul_peak("cpu", torch.float32) == 2e9
    assert json.loads(peaks.read_text()) == {CPU_F32: 2e9}
    assert [p.name for p in peaks.parent.iterdir()] == [peaks.name]  # no temporaries left


def test_no_peak_cache_when_the_cache_is_off(peaks, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", "off")
    monkeypatch.setattr(reporting, "_measure", lambda device, dtype, seconds: 2e9)
    assert matmul_peak("cpu", torch.float32) == 2e9
    assert reporting.raise_peak("cpu", torch.float32, 3e9) == 3e9
    assert not peaks.parent.exists()


def test_peak_memory_on_cpu_is_the_peak_rss_in_bytes():
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so the pages are resident
    assert peak_memory("cpu") >= x.numel() * 4


# ---------------------------------------------------------------------------------------------- progress


def _records(start: int, stop: int) -> list[dict]:
    return [
        {"step": s, "loss": 4.0 - s / 10, "lr": 1e-3, "grad_norm": 1.0, "tokens": 64 * (s + 1),
         "tokens_per_s": 1500.0, "elapsed": float(s - start + 1), **({"val_loss": 2.5} if s == 15 else {})}
        for s in range(start, stop)
    ]  # fmt: skip


def test_progress_bar_resumed_without_a_terminal_prints_plain_lines_and_the_last_loss():
    buf = io.StringIO()
    with ProgressBar(20, start_step=10, console=Console(file=buf, width=160), line_every=4) as bar:
        for record in _records(10, 20):
            bar(record)
        bar({"step": 20, "elapsed": 11.0, "val_loss": 1.75})
    text = buf.getvalue()
    lines = [line for line in text.splitlines() if line.startswith("step ")]
    # Records 0, 4 and 8 of 11 give plain lines (steps 11, 15, 19 done); rich adds the final bar at exit.
    assert lines[:3] == [
        "step 11/20  loss 3.0000  1,500 tok/s  eta 0:00:09",
        "step 15/20  loss 2.6000  1,500 tok/s  eta 0:00:05",
        "step 19/20  loss 2.2000  1,500 tok/s  val 2.5000  eta 0:00:01",
    ]
    assert len(lines) == 4 and "20/20" in lines[3] and "loss 2.1000" in lines[3] and "val 1.7500" in lines[3]
    assert "\x1b" not in text  # no escape codes in a log file


def test_progress_bar_on_a_terminal_ends_with_the_last_loss():
    buf = io.StringIO()
    with ProgressBar(20, start_step=10, console=Console(file=buf, width=160, force_terminal=True)) as bar:
        for record in _records(10, 20):
            bar(record)
    final = buf.getvalue().rsplit("\r", 1)[-1]
    assert "20/20" in final and "loss 2.1000" in final
    assert "step 11/20  loss" not in buf.getvalue()  # plain lines are for non-terminals only


# ------------------------------------------------------------------------------------------------- sinks


def test_tensorboard_scalars_read_back_equal_the_records(tmp_path):
    pytest.importorskip("tensorboard", reason="needs tensorboard (pip install 'lmforge[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [*_records(10, 20), {"step": 20, "elapsed": 11.0, "val_loss": 1.75}]
    with open_sinks(["tensorboard"], tmp_path, {"model": {"preset": "tiny-llama"}}) as sinks:
        for record in records:
            sinks(record)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"])) for r in records if "loss" in r]
    val = [(e.step, e.value) for e in events.Scalars("val_loss")]
    assert val == [(15, pytest.approx(2.5)), (20, pytest.approx(1.75))]
    assert "step" not in events.Tags()["scalars"]


def test_tensorboard_of_a_resumed_run_shows_each_step_once(tmp_path):
    """A run logged steps 10..19 and was resumed from its step-15 checkpoint: TensorBoard hides the first
    attempt's 15..19, as metrics.jsonl is cut back."""
    pytest.importorskip("tensorboard", reason="needs tensorboard (pip install 'lmforge[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open_sinks(["tensorboard"], tmp_path, {}) as sinks:
        for record in _records(10, 20):
            sinks(record)
    with open_sinks(["tensorboard"], tmp_path, {}, start_step=15) as sinks:
        for record in _records(15, 20):
            sinks({**record, "loss": 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in loss] == list(range(10, 20))
    assert [value for step, value in loss if step >= 15] == [0.5] * 5


@pytest.mark.parametrize("sink", ["wandb", "tensorboard"])
def test_a_sink_whose_package_is_missing_says_what_to_install(sink, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, sink, None)  # `import sink` now raises ImportError
    with pytest.raises(LmforgeError, match=rf"needs the {sink} package: pip install 'lmforge\[{sink}\]'"):
        open_sinks([sink], tmp_path, {})
    assert not (tmp_path / "tensorboard").exists()


def test_wandb_sink_logs_scalars_at_the_step_in_the_mode_of_wandb_mode(monkeypatch, tmp_path):
    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class Run:  # what open_sinks uses of a wandb Run
        def log(self, data, step):
            calls["log"].append((data, step))

        def finish(self):
            calls["finish"].append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)  # wandb itself is not installed: no network possible
    monkeypatch.setenv("WANDB_MODE", "offline")
    with open_sinks(["wandb"], tmp_path / "run", {"seed": 1}) as sinks:
        sinks({"step": 7, "loss": 2.5, "tokens": 448, "note": "text is skipped"})
    (init,) = calls["init"]
    assert init["mode"] == "offline" and init["config"] == {"seed": 1} and init["name"] == "run"
    assert calls["log"] == [({"loss": 2.5, "tokens": 448.0}, 7)] and calls["finish"] == [True]


def test_unknown_sink_and_no_sinks(tmp_path):
    with pytest.raises(LmforgeError, match=r"unknown metrics sink\(s\) \['mlflow'\]"):
        open_sinks(["mlflow"], tmp_path, {})
    with open_sinks([], tmp_path, {}) as sinks:
        sinks({"step": 0, "loss": 1.0})  # nothing asked for, nothing written
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- the curve


def _write_resumed_metrics(path: Path) -> None:
    """A run logged steps 0..40 (val at 0 and 20), crashed, and resumed from its step-20 checkpoint to 60."""
    first = [{"step": s, "loss": 5.0 - s / 20} for s in range(0, 50, 10)]
    first[0]["val_loss"], first[2]["val_loss"] = 5.5, 4.5
    second = [{"step": s, "loss": 3.0 - s / 100} for s in range(20, 60, 10)]
    second[0]["val_loss"] = 4.0
    final = {"step": 60, "elapsed": 9.0, "val_loss": 2.0}
    lines = [json.dumps(r) for r in [*first, *second, final]]
    path.write_text("\n".join(lines) + '\n{"step": 6')  # a torn last line


def test_read_metrics_lets_the_resumed_lines_win(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_resumed_metrics(path)
    records = read_metrics(path)
    assert [r["step"] for r in records] == [0, 10, 20, 30, 40, 50, 60]
    assert [r.get("loss") for r in records] == [5.0, 4.5, 2.8, 2.7, 2.6, 2.5, None]
    assert [r["val_loss"] for r in records if "val_loss" in r] == [5.5, 4.0, 2.0]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_rewind_logs_cuts_every_log_back_to_the_checkpoint_step(tmp_path):
    """Resumed from the step-3 checkpoint (3 updates done): the records of steps 3 and 4 are logged again."""
    metrics = [
        {"run": "header"},
        *({"step": s, "loss": 5.0 - s} for s in range(5)),
        {"step": 5, "val_loss": 1.0},
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in metrics) + '{"step": 5, "lo'
    )
    samples = [{"step": s, "prompt": "the", "text": f"the {s}"} for s in (0, 2, 4)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    rewind_logs(tmp_path, 3)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == metrics[:4]  # the header and steps 0, 1, 2; the torn last line is gone
    assert [json.loads(x)["step"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()] == [0, 2]
    before = (tmp_path / "samples.jsonl").stat().st_mtime_ns
    rewind_logs(tmp_path, 3)  # nothing to cut: the file is left as it is
    assert (tmp_path / "samples.jsonl").stat().st_mtime_ns == before
    rewind_logs(tmp_path, 0)  # a resume without a checkpoint starts afresh
    assert (tmp_path / "metrics.jsonl").read_text() == '{"run": "header"}\n'
    assert (tmp_path / "samples.jsonl").read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "samples.jsonl"]  # no temporaries
    rewind_logs(tmp_path / "missing", 3)  # no logs yet: nothing to do


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("log_y", [False, True])
def test_plot_loss_curve_writes_a_png_of_the_asked_size(tmp_path, log_y):
    metrics = tmp_path / "metrics.jsonl"
    _write_resumed_metrics(metrics)
    png = plot_loss_curve(metrics, tmp_path / "loss.png", log_y=log_y)
    assert png == tmp_path / "loss.png"
    assert _png_size(png) == (800, 450)  # 8 x 4.5 inches at 100 dpi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temporaries left


def test_plot_loss_curve_of_an_empty_file_still_writes_a_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    assert _png_size(plot_loss_curve(metrics, tmp_path / "loss.png", size=(4, 3))) == (400, 300)


def test_loss_figure_has_a_title_train_and_val_on_one_step_axis_the_baseline_and_the_lr():
    records = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3 * min(1, (s + 1) / 4)} for s in range(10)]
    records[0]["val_loss"], records[5]["val_loss"] = 5.2, 4.6
    records.append({"step": 10, "elapsed": 3.0, "val_loss": 4.3})
    fig = loss_figure(
        records, title="run-7: pretrain clm of preset:llama-14m", baselines={"unigram baseline": 4.25}
    )
    loss_ax, lr_ax = fig.axes
    assert loss_ax.get_title() == "run-7: pretrain clm of preset:llama-14m"
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert sorted(lines) == ["train loss", "unigram baseline (4.250)", "val loss"]
    assert list(lines["train loss"].get_xdata()) == list(range(10))
    assert list(lines["val loss"].get_xdata()) == [0, 5, 10] and list(lines["val loss"].get_ydata()) == [
        5.2,
        4.6,
        4.3,
    ]
    assert list(lines["unigram baseline (4.250)"].get_ydata()) == [4.25, 4.25]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == [
        "train loss", "val loss", "unigram baseline (4.250)"
    ]  # fmt: skip
    assert lr_ax.get_ylabel() == "learning rate" and lr_ax.get_xlabel() == "step"
    assert loss_ax.get_shared_x_axes().joined(loss_ax, lr_ax)  # one step axis for both panels
    (lr,) = lr_ax.get_lines()
    assert list(lr.get_ydata()) == [r["lr"] for r in records[:10]]


def test_plot_loss_curve_titles_the_plot_with_the_run_by_default(tmp_path, monkeypatch):
    run = tmp_path / "my-run"
    run.mkdir()
    _write_resumed_metrics(run / "metrics.jsonl")
    titles = []
    real = reporting.loss_figure
    monkeypatch.setattr(
        reporting, "loss_figure", lambda records, **kw: titles.append(kw["title"]) or real(records, **kw)
    )
    plot_loss_curve(run / "metrics.jsonl", run / "loss.png", baselines={"unigram baseline": 3.0})
    plot_loss_curve(run / "metrics.jsonl", run / "loss.png", title="mine")
    assert titles == ["my-run", "mine"]
