"""Faults: damaged files lmforge reads back are exit 2 naming the file and what is wrong; a SIGKILL while a command
writes its output leaves the previous output intact, and the next run works.

(A SIGKILL inside a checkpoint write is tests/test_resume.py::test_run_killed_while_writing_a_checkpoint_...)
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_MODEL, error, invoke, snapshot

from lmforge.fileio import recover_output, staging_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A text file, its tokenizer, a prepared dataset, a tiny model and a short run with two checkpoints."""
    root = tmp_path_factory.mktemp("faults")
    text = "\n\n".join(f"the cat {i} sat on the mat and the dog {i % 7} ran to the park" for i in range(400))
    (root / "corpus.txt").write_text(text + "\n")
    assert (
        invoke(
            "tokenizer", "train", root / "corpus.txt", "--out", root / "tok", "--vocab-size", 300
        ).exit_code
        == 0
    )
    prepared = invoke(
        "data", "prepare", root / "corpus.txt", "--tokenizer", root / "tok", "--out", root / "ds"
    )
    assert prepared.exit_code == 0, prepared.output
    run = invoke("pretrain", "--out", root / "run", "--set", TINY_MODEL, "--set", f"data.dataset={root / 'ds'}",
                 "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2", "--set", "train.seq_len=16",
                 "--set", "sample_prompt=null")  # fmt: skip
    assert run.exit_code == 0, run.output
    return {
        "root": root,
        "corpus": root / "corpus.txt",
        "tok": root / "tok",
        "ds": root / "ds",
        "run": root / "run",
    }


def damaged_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_and_bad_config(world, tmp_path):
    model = damaged_copy(world["run"] / "model", tmp_path / "trunc")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = error(invoke("generate", model, "--prompt", "the cat"))
    assert f"{weights}: not a readable safetensors file" in message and "truncated or damaged" in message

    model = damaged_copy(world["run"] / "model", tmp_path / "cfg")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    assert f"{model}/config.json: required field 'hidden_size' is missing" in error(
        invoke("generate", model, "-p", "a")
    )
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "two"}))
    assert "config.json: num_hidden_layers: expected an integer, got 'two'" in error(
        invoke("generate", model, "-p", "a")
    )


def test_damaged_datasets(world, tmp_path):
    ds = damaged_copy(world["ds"], tmp_path / "ds")
    shard = next((ds / "train").glob("*.tokens.bin"))
    good = shard.read_bytes()
    shard.write_bytes(good[:-4])  # shorter than its document offsets say
    assert f"{shard}: {len(good) - 4:,} bytes, expected {len(good):,}" in error(invoke("data", "inspect", ds))
    shard.write_bytes(good[:-2] + b"\xff\xff")  # same length, other bytes: the manifest's sha256 disagrees
    message = error(invoke("data", "inspect", ds))
    assert f"{shard}: its sha256 differs from the one in {ds / 'manifest.json'}" in message
    pretrain = invoke(
        "pretrain", "--out", tmp_path / "run", "--set", f"data.dataset={ds}", "--set", TINY_MODEL
    )
    assert "its sha256 differs" in error(pretrain)  # a small dataset is verified before training on it
    shard.write_bytes(good)

    manifest = ds / "manifest.json"
    data = json.loads(manifest.read_text())
    data["splits"]["train"]["shards"][0]["files"][shard.name] = "0" * 64  # a wrong sha256 in the manifest
    manifest.write_text(json.dumps(data))
    assert f"{manifest}: its content does not match its id" in error(invoke("data", "inspect", ds))
    manifest.write_text(json.dumps(data)[:40])
    assert f"{manifest}: not a readable manifest" in error(invoke("data", "inspect", ds))
    assert "is a file; expected a prepared dataset directory" in error(invoke("data", "inspect", manifest))


@pytest.mark.parametrize("part", ["state.json", "optimizer.pt", "rng.pt"])
def test_damaged_checkpoint(world, tmp_path, part):
    run = damaged_copy(world["run"], tmp_path / "run")
    newest = sorted((run / "checkpoints").iterdir())[-1]
    file = newest / "train_state" / part
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    before = snapshot(run)
    message = error(invoke("pretrain", "--resume", run, "--set", "train.max_steps=6"))
    assert (
        f"{file}: unreadable" in message
        and f"delete {newest} to resume from the checkpoint before it" in message
    )
    assert snapshot(run) == before  # refused: nothing rewritten, config.yaml included


# Runs the CLI with one function stalled (a marker file touched, then a long sleep) at the moment a test kills it:
# `module attribute match marker -- lmforge args`: `module.attribute(path, ...)` stalls when `match` is in the
# name of its first argument (`os replace .ds.`: the rename of the staging directory `.ds.<id>.tmp` to `ds`).
STALL = """
import sys, time
from pathlib import Path
import importlib
from lmforge.cli import main

module, attribute, match, marker = sys.argv[1:5]
del sys.argv[1:6]
module = importlib.import_module(module)
real = getattr(module, attribute)

def stalled(path, *args, **kwargs):
    if match in Path(path).name:
        Path(marker).touch()
        time.sleep(600)
    return real(path, *args, **kwargs)

setattr(module, attribute, stalled)
main()
"""


def kill_when_stalled(tmp_path: Path, where: tuple[str, str, str], *args: object) -> None:
    """Run `lmforge args` stalled at `where` (module, attribute, file-name match), SIGKILL it there."""
    marker = tmp_path / "stalled"
    marker.unlink(missing_ok=True)
    command = [sys.executable, "-c", STALL, *where, str(marker), "--", *map(str, args)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the command never reached the stall"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_sigkill_during_data_prepare_keeps_the_old_dataset(world, tmp_path):
    ds = damaged_copy(world["ds"], tmp_path / "ds")
    old = snapshot(ds)
    prepare = ("data", "prepare", world["corpus"], "--tokenizer", world["tok"], "--out", ds)
    # killed with the new dataset complete beside the old one, before the rename
    kill_when_stalled(tmp_path, ("lmforge.data.prepare", "atomic_write", "manifest.json"), *prepare,
                      "--set", "val_fraction=0.3", "--overwrite")  # fmt: skip
    assert snapshot(ds) == old
    # killed between the two renames: the old dataset set aside, the new one not yet in place
    kill_when_stalled(tmp_path, ("os", "replace", ".ds."), *prepare,
                      "--set", "val_fraction=0.3", "--overwrite")  # fmt: skip
    assert not ds.exists() and hidden(tmp_path)  # what the kill left: only hidden directories
    again = invoke(*prepare, "--json")  # the next run finds the old dataset back in place: unchanged, reused
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["cache_hit"] is True and snapshot(ds) == old
    assert hidden(tmp_path) == []


def test_sigkill_during_tokenizer_train_keeps_the_old_tokenizer(world, tmp_path):
    tok = damaged_copy(world["tok"], tmp_path / "tok")
    old = snapshot(tok)
    train = ("tokenizer", "train", world["corpus"], "--out", tok, "--vocab-size", 280, "--overwrite")
    kill_when_stalled(tmp_path, ("lmforge.tokenizer", "atomic_write", "special_tokens_map.json"), *train)
    assert snapshot(tok) == old
    assert invoke(*train).exit_code == 0
    assert snapshot(tok) != old and hidden(tmp_path) == []


def test_sigkill_during_merge_keeps_the_old_model(world, tmp_path):
    from lmforge.adapters.lora import apply_lora, save_lora
    from lmforge.model.hf import load_model
    from lmforge.stages.configs import LoraSection

    base = world["run"] / "model"
    cfg = LoraSection(r=2, target_modules=["q_proj", "v_proj"])
    adapter = save_lora(apply_lora(load_model(base), cfg), tmp_path / "adapter", cfg, str(base))
    merged = tmp_path / "merged"
    assert invoke("merge", base, adapter, "--out", merged).exit_code == 0
    old = snapshot(merged)
    assert "already holds a model" in error(invoke("merge", base, adapter, "--out", merged))
    kill_when_stalled(tmp_path, ("lmforge.adapters.merge", "atomic_write", "lmforge.json"),
                      "merge", base, adapter, "--out", merged, "--overwrite")  # fmt: skip
    assert snapshot(merged) == old
    assert invoke("merge", base, adapter, "--out", merged, "--overwrite").exit_code == 0
    assert hidden(tmp_path) == []


def test_recover_output_puts_the_previous_output_back(tmp_path):
    out = tmp_path / "out"
    with staging_dir(out) as tmp:
        (tmp / "a").write_text("old")
    # the state a kill between staging_dir's two renames leaves: `out` moved aside, the new copy not renamed yet
    (tmp_path / ".out.0123456789ab.old").mkdir()
    (tmp_path / ".out.0123456789ab.old" / "a").write_text("old")
    (tmp_path / ".out.0123456789ab.tmp").mkdir()
    (tmp_path / ".out.0123456789ab.tmp" / "a").write_text("new")
    out.joinpath("a").unlink()
    out.rmdir()
    recover_output(out)
    assert (out / "a").read_text() == "old" and hidden(tmp_path) == []
