"""Resume (issue 5, test 2): a pretrain run killed with SIGKILL after a checkpoint, or in the middle of writing
one, and resumed with `--resume RUN_DIR` logs the same losses, bit for bit, as a run never interrupted (CPU,
fp32, deterministic)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import TINY_MODEL
from typer.testing import CliRunner

from lmforge.cli import app

STEPS, EVERY, KILL_AFTER = 12, 4, 8


@pytest.fixture
def dataset(story_dataset):
    return story_dataset


def args(out, dataset, *overrides: str, resume: bool = False) -> list[str]:
    settings = (
        TINY_MODEL,
        f"data.dataset={dataset}",
        "train.seq_len=32",
        "train.micro_batch_size=8",
        "train.deterministic=true",
        f"train.max_steps={STEPS}",
        f"train.checkpoint_every={EVERY}",
        "optim.lr=1e-2",
        "optim.warmup_steps=2",
        "sample_prompt=null",
        *overrides,
    )
    where = ["--resume" if resume else "--out", str(out)]
    return ["pretrain", *where, "--json", *[a for s in settings for a in ("--set", s)]]


# Runs the CLI with checkpoint saves of step STALL_AT stalled after the model files are written (before the
# optimizer state and the COMPLETE marker): the test kills the process inside a checkpoint write.
STALLED_SAVE = """
import sys, time
import lmforge.train.checkpoint as checkpoint
from lmforge.cli import main

stall_at, save_model = int(sys.argv.pop(1)), checkpoint.save_model

def stalling_save_model(model, path, **kwargs):
    out = save_model(model, path, **kwargs)
    if path.parent.name.startswith(f".step-{stall_at:06d}."):  # the staging dir of that checkpoint
        (path.parent.parent / "stalled").touch()
        time.sleep(600)
    return out

checkpoint.save_model = stalling_save_model
sys.argv[0] = "lmforge"
main()
"""


def cli(argv: list[str], stall_at: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    launcher = ["-m", "lmforge"] if stall_at is None else ["-c", STALLED_SAVE, str(stall_at)]
    return subprocess.Popen(
        [sys.executable, *launcher, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()


def losses(lines: list[str]) -> dict[int, str]:
    """step -> the loss as written in the JSON (compared as text: bit-identical floats)."""
    found = {}
    for line in lines:
        record = json.loads(line)
        if "loss" in record:
            found[record["step"]] = line.split('"loss": ', 1)[1].split(",", 1)[0]
    return found


def steps(lines: list[str]) -> list[int]:
    """The steps of the training records, in file order."""
    return [record["step"] for record in map(json.loads, lines) if "loss" in record]


def test_killed_run_resumes_bit_identically(tmp_path, dataset):
    whole = cli(args(tmp_path / "whole", dataset))  # the uninterrupted run, alongside the killed one
    killed = tmp_path / "killed"
    proc = cli(args(killed, dataset))
    marker = killed / "checkpoints" / f"step-{KILL_AFTER:06d}" / "COMPLETE"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "no step-8 checkpoint within 120 s"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert not (killed / "model").exists() and not (killed / "results.json").exists()
    before = (killed / "metrics.jsonl").read_text().splitlines()

    finish(cli(args(killed, dataset, resume=True)))
    finish(whole)

    after = (killed / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in before if json.loads(line)["step"] < KILL_AFTER]
    assert after[: len(kept)] == kept  # what the checkpoint holds is kept; what came after it is logged again
    assert steps(after) == list(range(STEPS))
    reference = losses((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines())
    assert sorted(reference) == list(range(STEPS))
    assert losses(after) == reference
    results = json.loads((killed / "results.json").read_text())
    assert results["steps"] == STEPS and results["tokens"] == STEPS * 8 * 32
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000008", "step-000012"]  # keep_checkpoints=3


def test_run_killed_while_writing_a_checkpoint_resumes_from_the_one_before(tmp_path, dataset):
    killed = tmp_path / "killed"
    proc = cli(args(killed, dataset), stall_at=KILL_AFTER)
    root = killed / "checkpoints"
    deadline = time.monotonic() + 120
    while not (root / "stalled").exists():
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "no stalled step-8 save within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    (root / "stalled").unlink()
    staged = [p.name for p in root.iterdir() if p.name.startswith(f".step-{KILL_AFTER:06d}.")]
    assert len(staged) == 1 and not (root / f"step-{KILL_AFTER:06d}").exists()  # half-written, hidden
    before = (killed / "metrics.jsonl").read_text().splitlines()
    assert sorted(losses(before)) == list(range(KILL_AFTER))  # it had logged step 7 before saving

    whole = tmp_path / "whole"
    finish(cli(args(whole, dataset)))
    finish(cli(args(killed, dataset, resume=True)))  # from step-4: the torn step-8 is ignored

    after = (killed / "metrics.jsonl").read_text().splitlines()
    assert after[:EVERY] == before[:EVERY]  # steps 4..7 are logged again after step-4
    assert steps(after) == list(range(STEPS))
    assert losses(after) == losses((whole / "metrics.jsonl").read_text().splitlines())
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000008", "step-000012"]


def test_resume_without_checkpoints_starts_afresh_and_existing_runs_are_refused(tmp_path, dataset):
    runner = CliRunner()
    out = tmp_path / "run"
    fresh = runner.invoke(
        app, args(out, dataset, "train.max_steps=2", "train.resume=true")
    )  # nothing to resume
    assert fresh.exit_code == 0, fresh.output
    assert json.loads(fresh.stdout)["steps"] == 2
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (out / "checkpoints" / "step-000002" / "COMPLETE").is_file()

    again = runner.invoke(app, args(out, dataset, "train.max_steps=2"))
    assert again.exit_code == 2, again.output
    assert f"--out {out} holds a run: use --resume {out}" in again.stderr


def test_resume_cuts_the_logs_back_to_the_checkpoint_step(tmp_path, dataset):
    """A run logged steps 4 and 5 after its step-4 checkpoint and then died: resumed, metrics.jsonl and
    samples.jsonl hold each step once, not 4 and 5 twice."""
    runner = CliRunner()
    out = tmp_path / "run"
    sets = ("train.max_steps=6", "sample_every=1", "sample_prompt=the cat")
    first = runner.invoke(app, args(out, dataset, *sets))
    assert first.exit_code == 0, first.output
    (out / "checkpoints" / "step-000006" / "COMPLETE").unlink()  # as if it had died before its last save
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert steps(metrics) == list(range(6))

    resumed = runner.invoke(app, args(out, dataset, *sets, resume=True))
    assert resumed.exit_code == 0, resumed.output
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert steps(after) == list(range(6))
    assert after[:4] == metrics[:4]
    assert losses(after) == losses(metrics)  # deterministic: the resumed steps log the same losses
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == list(range(6))
