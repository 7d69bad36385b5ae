"""The one output rule of every command that writes a directory: nothing a user owns is lost or half-written.

A new output must be absent or empty; an output of the same kind is replaced only with --overwrite (a prepared
dataset is reused when nothing changed); an output that is, contains or lies inside an input is refused; a refused
command changes nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import TINY_MODEL, error, invoke, snapshot


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """A folder with a text input and a tokenizer trained on it."""
    root = tmp_path_factory.mktemp("outputs")
    data = root / "data" / "x"
    data.mkdir(parents=True)
    text = "\n\n".join(
        f"story {i}: the cat sat on the mat and the dog ran to the park {i % 5}" for i in range(60)
    )
    (data / "input.txt").write_text(text + "\n")
    result = invoke("tokenizer", "train", data / "input.txt", "--out", root / "tok", "--vocab-size", 300)
    assert result.exit_code == 0, result.output
    return {"root": root, "input": data / "input.txt", "tok": root / "tok"}


def prepare(corpus, out: Path, *extra: object):
    return invoke("data", "prepare", corpus["input"], "--tokenizer", corpus["tok"], "--out", out, *extra)


def test_prepare_never_deletes_a_foreign_directory(corpus, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("my notes")
    for flags in ((), ("--overwrite",)):  # not even with --overwrite: lmforge did not write it
        message = error(prepare(corpus, out, *flags))
        assert f"--out {out} is not empty (notes.md) and does not hold a prepared dataset" in message
    assert snapshot(tmp_path) == {"mine/notes.md": hashlib.sha256(b"my notes").hexdigest()}


def test_prepare_refuses_its_input_as_output(corpus, tmp_path):
    before = snapshot(corpus["root"] / "data")
    for out, how in [
        (corpus["input"], "is the input"),
        (corpus["input"].parent / "prepared", "lies inside the input"),  # inputs given as a folder below
        (corpus["root"] / "data", "contains the input"),
    ]:
        given = corpus["input"].parent if how == "lies inside the input" else corpus["input"]
        result = invoke("data", "prepare", given, "--tokenizer", corpus["tok"], "--out", out)
        assert f"--out {out} {how} {given}" in error(result)
        result = invoke("data", "prepare", given, "--tokenizer", corpus["tok"], "--out", out, "--overwrite")
        assert how in error(result)
    assert snapshot(corpus["root"] / "data") == before  # the input untouched, nothing hidden beside it


def test_prepare_replaces_a_dataset_only_with_overwrite(corpus, tmp_path):
    out = tmp_path / "ds"
    first = prepare(corpus, out, "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(prepare(corpus, out, "--json").stdout)["cache_hit"] is True  # unchanged: reused
    old = snapshot(tmp_path)
    message = error(prepare(corpus, out, "--set", "val_fraction=0.2"))
    assert (
        "already holds a prepared dataset (manifest.json) prepared from other inputs or settings: add"
        in message
    )
    assert snapshot(tmp_path) == old
    replaced = prepare(corpus, out, "--set", "val_fraction=0.2", "--overwrite", "--json")
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.stdout)["id"] != json.loads(first.stdout)["id"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary or displaced directory left


def test_a_file_as_output_directory(corpus, tmp_path):
    file = tmp_path / "file.txt"
    file.write_text("keep")
    assert "is a file; expected a directory" in error(prepare(corpus, file, "--overwrite"))
    result = invoke("tokenizer", "train", corpus["input"], "--out", file, "--vocab-size", 300, "--overwrite")
    assert "is a file; expected a directory" in error(result)
    assert file.read_text() == "keep"


def test_tokenizer_train_output_rule(corpus, tmp_path):
    train = ("tokenizer", "train", corpus["input"], "--vocab-size", 300, "--out")
    assert "is the input" in error(invoke(*train, corpus["input"]))
    out = tmp_path / "tok"
    assert invoke(*train, out).exit_code == 0
    old = snapshot(out)
    assert "already holds a tokenizer (tokenizer.json): add --overwrite" in error(invoke(*train, out))
    assert snapshot(out) == old
    assert invoke(*train, out, "--overwrite").exit_code == 0
    assert snapshot(out) == old  # the same tokenizer, written again whole
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("a")
    assert "does not hold a tokenizer" in error(invoke(*train, foreign, "--overwrite"))


def test_synth_needs_overwrite(tmp_path):
    out = tmp_path / "world"
    assert invoke("data", "synth", "--out", out).exit_code == 0
    old = snapshot(out)
    assert "already holds a synthetic world" in error(invoke("data", "synth", "--out", out, "--seed", 1))
    assert snapshot(out) == old
    assert invoke("data", "synth", "--out", out, "--seed", 1, "--overwrite").exit_code == 0
    assert snapshot(out) != old


def test_refused_resume_changes_nothing(tmp_path, story_dataset):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: base\n")
    (run / "notes.md").write_text("mine")
    before = snapshot(run)
    result = invoke("finetune", "--resume", run, "--set", f"data.dataset={story_dataset}")
    assert "reads chat data" in error(result)  # refused on its inputs, after --resume was accepted
    assert snapshot(run) == before  # config.yaml not rewritten


def test_pretrain_overwrite_keeps_the_old_run_until_the_new_one_is_complete(tmp_path, story_dataset):
    run = tmp_path / "run"
    args = ("pretrain", "--set", TINY_MODEL, "--set", f"data.dataset={story_dataset}", "--set",
            "train.max_steps=2", "--set", "train.seq_len=16", "--set", "sample_prompt=null", "--json")  # fmt: skip
    assert invoke(*args, "--out", run).exit_code == 0
    old = snapshot(run)
    assert f"--out {run} holds a run: use --resume {run}" in error(invoke(*args, "--out", run))
    # refused for bad input after --overwrite was given: the old run is still whole, where it was
    bad = invoke(*args, "--out", run, "--overwrite", "--set", f"data.dataset={tmp_path / 'nothing'}")
    assert bad.exit_code == 2, bad.output
    assert snapshot(run) == old and [p.name for p in tmp_path.iterdir()] == ["run"]
    # an input inside the output: refused before anything is read or written
    inside = invoke(*args, "--out", run, "--overwrite", "--init-from", run / "model")
    assert f"--out {run} contains the input {run / 'model'}" in error(inside)
    assert snapshot(run) == old
    again = invoke(*args, "--out", run, "--overwrite", "--set", "train.max_steps=3")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["steps"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the old run deleted once the new one ended
