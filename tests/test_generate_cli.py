"""`lmforge generate`: plain and chat prompts, --json records, bad input named with its allowed range."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.model.configs import preset
from lmforge.model.hf import build_model, save_model
from lmforge.tokenizer import train_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    train_tokenizer(["the cat sat on the mat", "a dog ran"] * 40, "bpe", 300, path)
    torch.manual_seed(0)
    save_model(build_model(preset("tiny-llama", vocab_size=300, eos_token_id=3, pad_token_id=0)), path)
    return path


def generate(*args: str):
    return runner.invoke(app, ["generate", *args])


def test_json_records_per_prompt(model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "the cat"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = generate(str(model_dir), "--prompts-file", str(prompts), "--prompt", "a dog", "--json", "-n", "2",
                      "--temperature", "0.8", "--seed", "1", "--max-new-tokens", "5", "--logprobs", "2")  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [r["prompt"] for r in doc["results"]] == ["a dog", "the cat", [{"role": "user", "content": "hi"}]]
    sample = doc["results"][0]["samples"][0]
    assert len(doc["results"][0]["samples"]) == 2 and sample["finish_reason"] in ("stop", "length")
    assert len(sample["token_ids"]) == len(sample["logprobs"]) == len(sample["top_logprobs"]) <= 5
    assert all(len(top) == 2 for top in sample["top_logprobs"])
    assert doc["config"]["temperature"] == 0.8 and sample["time_to_first_token"] > 0
    again = json.loads(generate(str(model_dir), "--prompts-file", str(prompts), "--prompt", "a dog", "--json",
                                "-n", "2", "--temperature", "0.8", "--seed", "1", "--max-new-tokens", "5",
                                "--logprobs", "2").stdout)  # fmt: skip
    assert [s["token_ids"] for r in again["results"] for s in r["samples"]] == [
        s["token_ids"] for r in doc["results"] for s in r["samples"]
    ]


def test_chat_prompt_uses_the_template(model_dir):
    plain = json.loads(generate(str(model_dir), "-p", "hi", "--json", "--max-new-tokens", "2").stdout)
    chat = json.loads(generate(str(model_dir), "-p", "hi", "--system", "be brief", "--json",
                               "--max-new-tokens", "2").stdout)  # fmt: skip
    assert chat["results"][0]["prompt_tokens"] > plain["results"][0]["prompt_tokens"] + 4  # role headers


def test_single_prompt_streams_text(model_dir):
    result = generate(str(model_dir), "-p", "the cat", "--temperature", "0", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")


def test_speculate_gives_the_greedy_text(model_dir):
    args = [
        str(model_dir),
        "-p",
        "the cat sat on the mat the cat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "30",
    ]
    plain, fast = generate(*args, "--json"), generate(*args, "--json", "--speculate", "4")
    assert plain.exit_code == 0 and fast.exit_code == 0, fast.output
    samples = [json.loads(r.stdout)["results"][0]["samples"][0] for r in (plain, fast)]
    assert samples[0]["token_ids"] == samples[1]["token_ids"] and samples[0]["text"] == samples[1]["text"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "0"], "top_p: expected a value in (0, 1], got 0"),
        (["--temperature", "-1"], "temperature"),
        (["-n", "0"], "n:"),
        (["--max-new-tokens", "200"], "max_new_tokens: expected a value in [1, 127]"),
        (["--max-new-tokens", "100", "-p", "the cat " * 20], "leaves no room for max_new_tokens"),
        ([], "give --prompt TEXT or --prompts-file FILE"),
        (["--bogus", "1"], "No such option: --bogus"),
        (["--speculate", "3", "--temperature", "0.5"], "speculate=3 checks drafts against greedy decoding"),
    ],
)
def test_bad_input_names_the_parameter(model_dir, args, message):
    base = [] if args == [] else ["-p", "the cat"]
    result = generate(str(model_dir), *base, *args)
    assert result.exit_code == 2, result.output
    assert message in " ".join((result.stderr + result.output).split())


def test_chat_transcript_from_scripted_stdin(model_dir):
    script = "\n".join(["hello there", "/set temperature 0", "/set top_p 2", "/system be brief",
                        "again", "/bogus", "/reset", "/exit", "never read"]) + "\n"  # fmt: skip
    result = runner.invoke(
        app, ["chat", str(model_dir), "--max-new-tokens", "4", "--seed", "0"], input=script
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("lmforge chat — commands: /reset")
    assert lines[1].startswith("assistant> ")
    assert lines[2] == "temperature = 0.0"
    assert lines[3].startswith("error: top_p: expected a value in (0, 1], got 2")
    assert lines[4] == "system prompt set; history cleared"
    assert lines[5].startswith("assistant> ")
    assert lines[6].startswith("error: unknown command /bogus")
    assert lines[7] == "history cleared" and len(lines) == 8  # /exit: the last line is never read


def test_chat_session_keeps_the_history_in_the_template(model_dir):
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import GenerationConfig
    from lmforge.infer.session import ChatSession

    session = ChatSession(Engine.from_dir(model_dir, device="cpu"), GenerationConfig(temperature=0, max_new_tokens=3),
                          system="be brief")  # fmt: skip
    first = "".join(session.reply("hi"))
    "".join(session.reply("more"))
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages()[2]["content"] == first
