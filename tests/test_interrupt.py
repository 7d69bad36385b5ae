"""Ctrl-C during a run (issue 15, item 8): exit status 130 and one message with the step reached, the newest
checkpoint and the command that resumes; a resume with that command continues and logs each step once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import TINY_MODEL
from typer.testing import CliRunner

import lmforge.train.loop as loop
from lmforge.cli import app

runner = CliRunner()


def settings(dataset, *overrides: str) -> list[str]:
    sets = (TINY_MODEL, f"data.dataset={dataset}", "train.seq_len=32", "train.micro_batch_size=8",
            "sample_prompt=null", *overrides)  # fmt: skip
    return [a for s in sets for a in ("--set", s)]


@pytest.fixture
def ctrl_c_at(monkeypatch):
    """`ctrl_c_at(n)`: the loop's batch iterator raises KeyboardInterrupt (as a SIGINT would) at step n."""

    def arm(at: int) -> None:
        real = loop._next

        def next_or_interrupt(batches, step):
            if step == at:
                raise KeyboardInterrupt
            return real(batches, step)

        monkeypatch.setattr(loop, "_next", next_or_interrupt)

    return arm


def test_sigint_says_the_step_the_newest_checkpoint_and_the_command_that_resumes(tmp_path, story_dataset):
    out = tmp_path / "run"
    argv = ["pretrain", "--out", str(out), *settings(story_dataset, "train.max_steps=100000",
                                                      "train.checkpoint_every=4")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # SIGINT handled as in a terminal even when this test runs in a background job (which ignores SIGINT).
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "step-000004" / "COMPLETE").exists():
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "no step-4 checkpoint within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stderr = err.decode()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "error:" not in stderr and "Aborted" not in stderr
    found = re.search(
        r"^interrupted at step (\d+) of 100000; newest checkpoint: (\S+) \(step (\d+)\); resume with: "
        r"lmforge pretrain --resume (\S+)$",
        stderr,
        re.MULTILINE,
    )
    assert found, stderr
    reached, newest, step, resume_dir = int(found[1]), found[2], int(found[3]), found[4]
    assert step >= 4 and step % 4 == 0 and reached >= step
    assert newest == str(out / "checkpoints" / f"step-{step:06d}") and resume_dir == str(out)
    assert (out / "checkpoints" / f"step-{step:06d}" / "COMPLETE").is_file()

    # The command it gives resumes (told to stop 2 steps later), and the logs hold each step once.
    resumed = runner.invoke(app, ["pretrain", "--resume", resume_dir, "--json", "--set",
                                  f"train.max_steps={step + 2}"])  # fmt: skip
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["steps"] == step + 2
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(step + 2))


def test_ctrl_c_before_the_first_checkpoint_says_there_is_none(tmp_path, story_dataset, ctrl_c_at):
    out = tmp_path / "run"
    ctrl_c_at(3)
    result = runner.invoke(app, ["pretrain", "--out", str(out), *settings(story_dataset, "train.max_steps=20",
                                                                          "train.checkpoint_every=10")])  # fmt: skip
    assert result.exit_code == 130, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"interrupted at step 3 of 20; no checkpoint yet: lmforge pretrain --resume {out} starts it again "
        "from step 0"
    )
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_ctrl_c_during_finetune_says_how_to_start_again(tmp_path, story_dataset, ctrl_c_at):
    base = tmp_path / "base"
    pretrained = runner.invoke(
        app, ["pretrain", "--out", str(base), *settings(story_dataset, "train.max_steps=1")]
    )
    assert pretrained.exit_code == 0, pretrained.output
    out = tmp_path / "ft"
    ctrl_c_at(2)
    sets = ("kind=domain", f"data.dataset={story_dataset}", "train.seq_len=32", "train.micro_batch_size=8",
            "train.max_steps=5")  # fmt: skip
    argv = [
        "finetune",
        "--init-from",
        str(base / "model"),
        "--out",
        str(out),
        *[a for s in sets for a in ("--set", s)],
    ]
    result = runner.invoke(app, argv)
    assert result.exit_code == 130, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"interrupted at step 2 of 5; no checkpoint yet: lmforge finetune --resume {out} starts it again from step 0"
    )
