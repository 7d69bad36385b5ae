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
    matmul_params,
    matmul_peak,
    open_sinks,
    peak_memory,
    plot_loss_curve,
    read_metrics,
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


def test_with_mfu_by_hand():
    """1000 tok/s x 6e6 FLOP/token = 6e9 FLOP/s of a 1.2e10 peak: MFU 0.5."""
    record = {"step": 3, "loss": 2.0, "tokens_per_s": 1000.0}
    out = with_mfu(record, 6e6, 1.2e10, "cpu")
    assert out["mfu"] == pytest.approx(0.5)
    assert out["peak_memory"] > 0 and out["loss"] == 2.0
    final = with_mfu({"step": 4, "elapsed": 1.0, "val_loss": 1.5}, 6e6, 1.2e10, "cpu")
    assert "mfu" not in final and final["peak_memory"] > 0


def test_matmul_peak_is_measured_once_per_device_and_dtype():
    peak = matmul_peak("cpu", torch.float32, seconds=0.05)
    assert peak > 0
    assert reporting._PEAKS[("cpu", torch.float32)] == peak
    assert matmul_peak(torch.device("cpu"), torch.float32) == peak  # cached: not measured again


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
