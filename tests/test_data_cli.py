"""The data verbs end to end through the CLI: synth → tokenizer train → data prepare → data inspect."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lmforge.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_synth_tokenizer_prepare_inspect(tmp_path):
    world = tmp_path / "world"
    result = invoke("data", "synth", "--out", world, "--seed", 3, "--json")
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["files"]
    assert files["pretrain.jsonl"]["records"] > 0 and (world / "SOURCE.md").exists()

    tok = tmp_path / "tok"
    result = invoke(
        "tokenizer", "train", world / "pretrain.jsonl", "--out", tok, "--vocab-size", 1000, "--json"
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["vocab_size"] == 1000 and info["special"]["pad_id"] != info["special"]["eos_id"]

    stats = json.loads(
        invoke("tokenizer", "stats", world / "pretrain.jsonl", "--tokenizer", tok, "--json").stdout
    )
    assert 2.0 < stats["bytes_per_token"] < 8.0 and stats["unknown_tokens"] == 0

    out = tmp_path / "sft"
    args = (
        "data",
        "prepare",
        world / "sft_a.jsonl",
        "--tokenizer",
        tok,
        "--out",
        out,
        "--set",
        "pii=mask",
        "--json",
    )
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    prepared = json.loads(result.stdout)
    assert prepared["kind"] == "chat" and not prepared["cache_hit"] and prepared["pii"]["mode"] == "mask"
    assert 0 < prepared["splits"]["train"]["masked_tokens"] < prepared["splits"]["train"]["tokens"]
    assert json.loads(invoke(*args).stdout)["cache_hit"] is True

    inspected = json.loads(invoke("data", "inspect", out, "--samples", 1, "--json").stdout)
    assert inspected["id"] == prepared["id"] and inspected["inputs"][0]["licence"].startswith("CC0")
    (sample,) = inspected["samples"]
    trained = "".join(text for text, on in sample["segments"] if on)
    assert trained.endswith("<|im_end|>") and "<|im_start|>user" not in trained
    human = invoke("data", "inspect", out, "--samples", 1)
    assert human.exit_code == 0 and "document lengths" in human.stdout


def test_prepare_bad_input_is_one_error_line(tmp_path):
    tok = tmp_path / "tok"
    assert invoke("tokenizer", "train", *[tmp_path / "missing.txt"], "--out", tok).exit_code == 2
    (tmp_path / "c.txt").write_text("some text for a tokenizer\n\nand another document\n" * 20)
    assert invoke("tokenizer", "train", tmp_path / "c.txt", "--out", tok, "--vocab-size", 300).exit_code == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    result = invoke("data", "prepare", bad, "--tokenizer", tok, "--out", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.jsonl:2" in lines[0]
    assert not (tmp_path / "out").exists()
    skipped = invoke(
        "data", "prepare", bad, "--tokenizer", tok, "--out", tmp_path / "out", "--skip-bad", "--json"
    )
    assert skipped.exit_code == 0 and json.loads(skipped.stdout)["rejected"] == 1
    typo = invoke(
        "data", "prepare", bad, "--tokenizer", tok, "--out", tmp_path / "out", "--set", "dedupe=near"
    )
    assert typo.exit_code == 2 and "did you mean 'dedup'" in typo.stderr


def test_prepare_error_is_exactly_one_stderr_line_with_its_column(tmp_path):
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer(
        ["some text for a tokenizer", "and another document"] * 20, "bpe", 300, tmp_path / "tok"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "' + "a" * 62 + '", "n": \n')  # line 2 ends at column 80
    result = invoke("data", "prepare", bad, "--tokenizer", tok, "--out", tmp_path / "out")
    assert result.exit_code == 2
    # nothing else: no empty line left by the progress bar
    assert result.stderr == (
        f"error: {bad}:2: malformed JSON (Expecting value at column 81); expected one JSON object per line\n"
    )


def test_tokenizer_train_skips_datasets_and_says_why_the_vocabulary_is_short(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "c.txt").write_text("some text for a tokenizer\n\nand another document\n\n" * 20)
    tok = tmp_path / "tok"
    assert invoke("tokenizer", "train", runs / "c.txt", "--out", tok, "--vocab-size", 300).exit_code == 0
    result = invoke("data", "prepare", runs / "c.txt", "--tokenizer", tok, "--out", runs / "ds", "--json")
    assert result.exit_code == 0, result.output
    dedup = json.loads(result.stdout)["dedup"]  # 40 short documents, 2 distinct: every repeat kept
    assert dedup == {"mode": "exact", "dropped": {}, "kept_short": 38}

    result = invoke("tokenizer", "train", runs, "--out", tmp_path / "tok2", "--vocab-size", 8192, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["requested_vocab_size"] == 8192 and info["vocab_size"] < 8192
    squeezed = lambda text: "".join(text.split())  # noqa: E731  (rich wraps log lines, even inside a path)
    stderr = squeezed(result.stderr)
    assert (
        squeezed(f"skipping {runs / 'ds'}: it is a prepared dataset (manifest.json), not input data")
        in stderr
    )
    assert squeezed(f"the tokenizer has {info['vocab_size']} ids, fewer than the 8192 asked for") in stderr

    given = invoke("tokenizer", "train", runs / "ds", "--out", tmp_path / "tok3")
    assert given.exit_code == 2
    assert given.stderr.startswith(
        f"error: {runs / 'ds'} is a prepared dataset (manifest.json), not input data"
    )
    assert "give the text/JSONL files it was prepared from" in given.stderr and given.stderr.count("\n") == 1
