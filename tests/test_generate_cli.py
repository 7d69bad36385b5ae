"""`lmforge generate`: plain and chat prompts, --json records, bad input named with its allowed range."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from lmforge.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


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
    # OpenAI's logprobs.content beside the ids: each token's text, bytes and top alternatives.
    tokens = sample["tokens"]
    assert [t["id"] for t in tokens] == sample["token_ids"] and [t["logprob"] for t in tokens] == sample[
        "logprobs"
    ]
    assert all(len(t["top_logprobs"]) == 2 and set(t["top_logprobs"][0]) == {"id", "token", "logprob", "bytes"}
               for t in tokens)  # fmt: skip
    assert all(t["token"] == bytes(t["bytes"]).decode(errors="backslashreplace") for t in tokens)
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
    # --speculate needs no --temperature 0: decoding is greedy by default.
    args = [str(model_dir), "-p", "the cat sat on the mat the cat", "--max-new-tokens", "30", "--json"]
    plain, fast = generate(*args, "--temperature", "0"), generate(*args, "--speculate", "4")
    assert plain.exit_code == 0 and fast.exit_code == 0, fast.output
    samples = [json.loads(r.stdout)["results"][0]["samples"][0] for r in (plain, fast)]
    assert samples[0]["token_ids"] == samples[1]["token_ids"] and samples[0]["text"] == samples[1]["text"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "0"], "top_p: expected a value in (0, 1], got 0"),
        (["--temperature", "-1"], "temperature"),
        (["-n", "0"], "n:"),
        (["--max-new-tokens", "200"], "max_new_tokens 200: the model's context is 128 tokens and the prompt"),
        (
            ["--max-new-tokens", "100", "-p", "the cat " * 20],
            "(prompt 1, 42 tokens) leaves room for at most 86",
        ),
        (["--max-new-tokens", "128", "--truncate"], "leaves room for at most 127 new tokens"),
        (["--logprobs", "21"], "logprobs: expected a value in [0, 20], got 21"),
        (["--seed", "-1"], "seed: expected a value in [0, 18446744073709551615], got -1"),
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


def test_prompts_file_must_be_a_utf8_file(model_dir, tmp_path):
    result = generate(str(model_dir), "--prompts-file", str(tmp_path))
    assert (
        result.exit_code == 2 and f"{tmp_path}: is a directory; expected a file of prompts" in result.stderr
    )
    result = generate(str(model_dir), "--prompts-file", str(tmp_path / "nope.txt"))
    assert (
        result.exit_code == 2 and f"{tmp_path / 'nope.txt'}: no such file; expected a file" in result.stderr
    )
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("the cat\nol\u00e9\n".encode("latin-1"))
    result = generate(str(model_dir), "--prompts-file", str(latin1))
    assert result.exit_code == 2 and f"{latin1}:2: not UTF-8 text (byte 0xe9)" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the cat"}\n{"prompt": 5}\n', encoding="utf-8")
    result = generate(str(model_dir), "--prompts-file", str(bad))
    assert result.exit_code == 2 and f"{bad}:2: expected a JSON object with 'prompt' (text)" in result.stderr


def test_max_new_tokens_error_states_the_limit_that_then_works(model_dir):
    # Two prompts: the longest one sets the limit, and the message says which it is.
    args = [str(model_dir), "-p", "the cat", "-p", "the cat sat on the mat", "--json"]
    result = generate(*args, "--max-new-tokens", "5000")
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    limit = int(re.search(r"leaves room for at most (\d+) new tokens", message)[1])
    assert message.startswith("error: max_new_tokens 5000: the model's context is 128 tokens and the prompt "
                              f"(prompt 1, {128 - limit} tokens)")  # fmt: skip
    assert message.endswith("lower --max-new-tokens, shorten the prompt, or pass --truncate")
    assert generate(*args, "--max-new-tokens", str(limit)).exit_code == 0
    assert generate(*args, "--max-new-tokens", str(limit + 1)).exit_code == 2
    # --truncate cuts the prompts to make room: up to context - 1 new tokens.
    result = generate(*args, "--max-new-tokens", "127", "--truncate")
    assert result.exit_code == 0, result.output
    assert {r["prompt_tokens"] for r in json.loads(result.stdout)["results"]} == {1}


def test_the_default_max_new_tokens_fits_a_small_context(bare_model_dir):
    # 256 new tokens by default, which a 128-token context cannot hold: asked for by no one, it shrinks to fit.
    result = generate(str(bare_model_dir), "-p", "the cat sat on the mat", "--json", "--stop", "never")
    assert result.exit_code == 0, result.output
    (sample,) = json.loads(result.stdout)["results"][0]["samples"]
    prompt_tokens = json.loads(result.stdout)["results"][0]["prompt_tokens"]
    assert sample["finish_reason"] == "length" and len(sample["token_ids"]) == 128 - prompt_tokens


@pytest.fixture(scope="module")
def bare_model_dir(model_dir, tmp_path_factory):
    """The model without its generation_config.json."""
    path = tmp_path_factory.mktemp("bare")
    for f in model_dir.iterdir():
        if f.name != "generation_config.json":
            (path / f.name).write_bytes(f.read_bytes())
    return path


def _token_ids(*args: str) -> list[list[int]]:
    result = generate(*args, "--json", "--max-new-tokens", "12")
    assert result.exit_code == 0, result.output
    return [s["token_ids"] for r in json.loads(result.stdout)["results"] for s in r["samples"]]


def test_greedy_by_default_unless_the_model_asks_to_sample(model_dir, bare_model_dir, tmp_path):
    for path in (bare_model_dir, model_dir):  # no generation_config.json; one with token ids only
        default = _token_ids(str(path), "-p", "the cat", "-n", "3")
        assert default == _token_ids(str(path), "-p", "the cat", "-n", "3", "--temperature", "0")
        assert (
            default == _token_ids(str(path), "-p", "the cat", "-n", "3")
            and len(set(map(tuple, default))) == 1
        )
    # --top-p alone asks to sample (at temperature 1.0); so does the model's do_sample: true.
    assert (
        len(set(map(tuple, _token_ids(str(bare_model_dir), "-p", "the cat", "-n", "4", "--top-p", "0.99"))))
        > 1
    )
    sampling = tmp_path / "sampling"
    sampling.mkdir()
    for f in bare_model_dir.iterdir():
        (sampling / f.name).write_bytes(f.read_bytes())
    (sampling / "generation_config.json").write_text('{"do_sample": true, "temperature": 1.5}')
    result = generate(str(sampling), "-p", "the cat", "-n", "4", "--json", "--max-new-tokens", "12")
    doc = json.loads(result.stdout)
    assert (doc["config"]["temperature"], doc["config"]["top_k"]) == (1.5, 50)  # transformers' top_k default
    assert len({tuple(s["token_ids"]) for s in doc["results"][0]["samples"]}) > 1
    # --speculate needs no --temperature 0, whatever the file says.
    greedy = _token_ids(str(bare_model_dir), "-p", "the cat sat on the mat the cat")
    assert _token_ids(str(sampling), "-p", "the cat sat on the mat the cat", "--speculate", "4") == greedy


def test_chat_set_a_filter_samples_and_max_new_tokens_is_checked(model_dir):
    script = "/set top_p 0.9\n/set max_new_tokens 120\nthe cat sat on the mat\n/exit\n"
    result = runner.invoke(app, ["chat", str(model_dir), "--max-new-tokens", "4"], input=script)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1] == "top_p = 0.9 (sampling at temperature 1.0)" and lines[2] == "max_new_tokens = 120"
    assert re.search(r"error: max_new_tokens 120: the model's context is 128 tokens and the message takes \d+ "
                     r"with the chat template, leaving room for at most \d+ new tokens", lines[3])  # fmt: skip
    result = runner.invoke(app, ["chat", str(model_dir), "--max-new-tokens", "128"], input="")
    assert result.exit_code == 2 and "at most 127 new tokens fit" in " ".join(result.stderr.split())
