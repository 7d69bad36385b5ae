"""`lmforge ladder`: the recommendation rule on fixed numbers, a qa task (all four rungs) and a classify task
climbed end to end on a tiny world and model with every figure recomputed from the files the ladder writes, and
bad task files refused with one clear error before anything is written."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml
from helpers import error
from rich.console import Console
from typer.testing import CliRunner

from lmforge.commands import ladder as ladder_command
from lmforge.commands.common import make_app
from lmforge.errors import LmforgeError
from lmforge.eval.qa import QAItem, is_correct
from lmforge.eval.stats import wilson
from lmforge.ladder import RULE, RungResult, dir_bytes, recommend

# ------------------------------------------------------------------------------ the rule on fixed numbers


def rung(name: str, correct: int, n: int = 100, tokens: int = 0, setup: float = 0.0, p50: float = 10.0):
    """A rung that answered `correct` of `n` items, with its Wilson interval and the given costs."""
    w = wilson(correct, n)
    return RungResult(name, w["accuracy"], tuple(w["ci95"]), n, correct, train_tokens=tokens,
                      train_seconds=setup, latency_ms=[p50])  # fmt: skip


def test_the_best_rung_wins_when_every_other_lies_outside_its_interval():
    results = [rung("prompt", 2), rung("rag", 10, setup=5), rung("lora", 60, tokens=600_000, setup=40),
               rung("lora+rag", 35, tokens=600_000, setup=45)]  # fmt: skip
    low, high = results[2].ci95  # 60/100: about [0.50, 0.69]
    assert low > 0.35 and high < 0.7
    rec = recommend(results)
    assert rec["rung"] == rec["best"] == "lora" and rec["within"] == ["lora"]
    assert rec["best_ci95"] == [low, high] and rec["rule"] == RULE
    assert rec["why"].startswith("lora is the best (60.0% [")


def test_a_cheaper_rung_within_the_best_interval_wins():
    # lora+rag is best at 60%; rag (52%) and lora (55%) lie inside its interval; rag trained no tokens.
    results = [rung("prompt", 2), rung("rag", 52, setup=5, p50=30), rung("lora", 55, tokens=600_000, setup=40),
               rung("lora+rag", 60, tokens=600_000, setup=45, p50=35)]  # fmt: skip
    rec = recommend(results)
    assert rec["best"] == "lora+rag" and rec["within"] == ["rag", "lora", "lora+rag"]
    assert rec["rung"] == "rag"
    assert "rag (52.0%) lies within the best rung's interval (lora+rag: 60.0% [" in rec["why"]
    # Without rag the next cheapest inside is lora: fewer setup seconds than lora+rag at equal tokens.
    assert recommend([results[0], results[2], results[3]])["rung"] == "lora"


def test_the_interval_bounds_count_as_within():
    best = RungResult("lora", 0.6, (0.5, 0.7), 100, 60, train_tokens=10)
    edge = RungResult("prompt", 0.5, (0.4, 0.6), 100, 50)
    just_out = RungResult("prompt", 0.4999, (0.4, 0.6), 100, 50)
    assert recommend([best, edge])["rung"] == "prompt"
    assert recommend([best, just_out])["rung"] == "lora"


def test_ties_go_to_lower_latency_then_to_the_lower_rung():
    # Equal tokens and setup seconds: the lower p50 latency wins.
    lora, both = (
        rung("lora", 50, tokens=1000, setup=10, p50=50),
        rung("lora+rag", 50, tokens=1000, setup=10, p50=20),
    )
    assert recommend([lora, both])["rung"] == "lora+rag"
    # Everything equal: the lower rung, whatever order the results come in; equal best accuracy alike.
    prompt, rag = rung("prompt", 40), rung("rag", 40)
    assert recommend([rag, prompt])["rung"] == "prompt"
    assert recommend([rag, prompt])["best"] == "prompt"


def test_a_rung_with_no_items_is_left_out_and_none_at_all_is_an_error():
    empty = RungResult("lora", math.nan, (math.nan, math.nan), 0)
    assert recommend([rung("prompt", 3), empty])["rung"] == "prompt"
    with pytest.raises(LmforgeError, match="no rung answered any item"):
        recommend([empty])


# ------------------------------------------------------------------------- a tiny world and model


def ladder_app():
    """A root app with only `ladder` (as cli.py registers it)."""
    app = make_app()
    ladder_command.register(app)
    return app


def run(*args: object):
    return CliRunner().invoke(ladder_app(), ["ladder", *map(str, args)])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny world and a random tiny Llama with a 1,024-token context and a BPE trained on the world's text."""
    import torch

    from lmforge.data.prepare import iter_texts
    from lmforge.data.synthetic import WorldSizes, synthesize
    from lmforge.model.configs import preset
    from lmforge.model.hf import build_model, save_model
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("ladder")
    w = Path(synthesize(root / "world", seed=0, sizes=WorldSizes.tiny())["out"])
    model = root / "model"
    corpus = [w / "pretrain.jsonl", w / "bios_c.jsonl", w / "sft_c.jsonl"]
    tok = Tokenizer.from_dir(train_tokenizer(iter_texts(corpus), "bpe", 512, model))
    torch.manual_seed(0)
    config = preset("tiny-llama", vocab_size=512, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                    max_position_embeddings=1024)  # fmt: skip
    save_model(build_model(config), model)
    return {"root": root, "world": w, "model": model}


def write_task(path: Path, task: dict) -> Path:
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


def qa_task(world: dict[str, Path], **changes) -> dict:
    w = world["world"]
    task = {
        "name": "tiny-c", "kind": "qa", "rungs": ["prompt", "rag", "lora", "lora+rag"],
        "model": str(world["model"]),
        "data": {"train": str(w / "sft_c.jsonl"), "eval": str(w / "eval_qa.jsonl"), "groups": ["C"], "limit": 10},
        "prompt": {"system": "Answer in one sentence.", "shots_from_train": 1},
        "rag": {"corpus": [str(w / "bios_c.jsonl")], "k": 1, "dense": False, "chunk_tokens": 24, "overlap": 0,
                "train_with_passages": True},
        "answer": {"max_new_tokens": 6, "latency_items": 3, "batch_size": 8},
        "finetune": {"train": {"max_steps": 2, "seq_len": 256, "micro_batch_size": 4, "eval_every": 0},
                     "optim": {"warmup_steps": 1}},
    }  # fmt: skip
    task.update(changes)
    return task


def check_figures(doc: dict, out: Path) -> None:
    """Every rung's accuracy, interval, latency and bytes recomputed from what the ladder wrote."""
    for r in doc["rungs"]:
        answers = [json.loads(line) for line in (out / r["rung"] / "answers.jsonl").open()]
        assert r["answers"] == str(out / r["rung"] / "answers.jsonl")
        w = wilson(sum(a["correct"] for a in answers), len(answers))
        assert r["quality"] == {"metric": "accuracy", "accuracy": w["accuracy"], "correct": w["correct"],
                                "n": w["n"], "ci95": w["ci95"], "interval": "Wilson"}  # fmt: skip
        assert r["latency_ms"]["p50"] == statistics.median(r["latency_ms"]["each"]) > 0
        cost = r["cost"]
        assert cost["setup_seconds"] == pytest.approx(cost["train_seconds"] + cost["index_seconds"])
    results = [RungResult(r["rung"], r["quality"]["accuracy"], tuple(r["quality"]["ci95"]), r["quality"]["n"],
                          train_tokens=r["cost"]["train_tokens"], train_seconds=r["cost"]["setup_seconds"],
                          latency_ms=r["latency_ms"]["each"]) for r in doc["rungs"]]  # fmt: skip
    assert doc["recommendation"] == recommend(results)


def test_a_qa_task_climbs_all_four_rungs(world, tmp_path):
    out = tmp_path / "ladder"
    task = write_task(tmp_path / "task.yaml", qa_task(world))
    result = run("--task", task, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "ladder.json").read_text())
    assert [r["rung"] for r in doc["rungs"]] == ["prompt", "rag", "lora", "lora+rag"] and doc["items"] == 10
    check_figures(doc, out)
    by = {r["rung"]: r for r in doc["rungs"]}
    for r in doc["rungs"]:  # the verdicts themselves: the expected fact in the answer's first sentence
        for a in map(json.loads, (out / r["rung"] / "answers.jsonl").open()):
            assert a["correct"] == is_correct(a["answer"], QAItem((), a["expected"], "contains"))
            assert a["group"] == "C"
    # The same ten held-out items on every rung.
    ids = {r: [json.loads(line)["id"] for line in (out / r / "answers.jsonl").open()] for r in by}
    assert len(set(map(tuple, ids.values()))) == 1 and len(ids["prompt"]) == 10
    # Costs: prompt nothing; rag its index; lora its adapter; lora+rag (trained with passages) both.
    index, lora_adapter = out / "rag" / "index", out / "lora" / "run" / "adapter"
    assert by["prompt"]["cost"] == {"train_tokens": 0, "train_seconds": 0.0, "index_seconds": 0.0,
                                    "setup_seconds": 0.0} and by["prompt"]["memory"]["added_bytes"] == 0  # fmt: skip
    assert by["rag"]["cost"]["train_tokens"] == 0 and by["rag"]["cost"]["index_seconds"] > 0
    assert by["rag"]["memory"]["added_bytes"] == dir_bytes(index)
    runs = {r: json.loads((out / r / "run" / "results.json").read_text()) for r in ("lora", "lora+rag")}
    assert by["lora"]["cost"]["train_tokens"] == runs["lora"]["tokens"] == 2 * 4 * 256  # 2 steps of 4 x 256
    assert by["lora"]["cost"]["train_seconds"] == pytest.approx(
        runs["lora"]["tokens"] / runs["lora"]["tokens_per_s"]
    )
    assert by["lora"]["memory"]["added_bytes"] == dir_bytes(lora_adapter)
    assert by["lora+rag"]["memory"]["added_bytes"] == dir_bytes(
        out / "lora+rag" / "run" / "adapter"
    ) + dir_bytes(index)
    # lora+rag trained on the Q&A with each question's passage in its system turn.
    augmented = [json.loads(line) for line in (out / "lora+rag" / "train.jsonl").open()]
    assert augmented[0]["messages"][0]["role"] == "system" and "[1]" in augmented[0]["messages"][0]["content"]
    # The prompt and rag rungs were told the system prompt and one example drawn from the training Q&A.
    train = [json.loads(line)["messages"] for line in (world["world"] / "sft_c.jsonl").open()]
    assert by["prompt"]["shots"] == by["rag"]["shots"] and len(by["prompt"]["shots"]) == 1
    assert by["prompt"]["shots"][0] in [[m[0]["content"], m[-1]["content"]] for m in train]
    assert by["rag"]["system"] == "Answer in one sentence." and "shots" not in by["lora"]
    assert yaml.safe_load((out / "config.yaml").read_text())["rag"]["k"] == 1  # the resolved task is kept
    # Again without --overwrite: refused, and the ladder is kept.
    again = run("--task", task, "--out", out)
    assert "add --overwrite to replace it" in error(again)
    assert json.loads((out / "ladder.json").read_text()) == doc


@pytest.fixture(scope="module")
def intents(world) -> dict[str, Path]:
    """Three intents told apart by one keyword each (train 60 / test 30), with a label map beside each file."""
    root = world["root"] / "intents"
    root.mkdir()
    words = {"card": "card", "cash": "cash", "loan": "loan"}
    fillers = ["please help with my", "I have a question about the", "what happened to my", "tell me about my",
               "there is a problem with my", "I want to check my"]  # fmt: skip
    for name, count in (("train", 60), ("test", 30)):
        folder = root / name
        folder.mkdir()
        (folder / "categories.json").write_text(json.dumps(list(words)))
        with (folder / f"{name}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "category"])
            for i in range(count):
                label = list(words)[i % 3]
                writer.writerow([f"{fillers[(i // 3) % len(fillers)]} {words[label]} {i}", label])
    return {"train": root / "train" / "train.csv", "test": root / "test" / "test.csv"}


def test_a_classify_task_prompts_a_decoder_and_fine_tunes_a_classifier(world, intents, tmp_path):
    out = tmp_path / "ladder"
    task = {
        "name": "intents", "kind": "classify", "rungs": ["lora", "prompt"],
        "not_applicable": {"rag": "a classifier reads no passages", "lora+rag": "as rag"},
        "model": str(world["model"]),
        "data": {"train": str(intents["train"]), "eval": str(intents["test"]), "limit": 24},
        "prompt": {"system": "Pick the intent.", "template": "Query: {text}\nIntent:", "shots_from_train": 2},
        "answer": {"latency_items": 3},
        "finetune": {"model": str(world["model"]), "lora": {"r": 4, "alpha": 8},
                     "train": {"max_steps": 40, "seq_len": 32, "micro_batch_size": 8, "eval_every": 0},
                     "optim": {"lr": 1.0e-2, "warmup_steps": 2}},
    }  # fmt: skip
    result = run("--task", write_task(tmp_path / "task.yaml", task), "--out", out)
    assert result.exit_code == 0, result.output
    assert "recommended: lora" in result.stdout and "n/a:" in result.stdout
    doc = json.loads((out / "ladder.json").read_text())
    wide = Console(width=200, file=io.StringIO())
    ladder_command.print_table(doc, wide)
    table = wide.file.getvalue()
    assert "n/a: a classifier reads no passages" in table and "lora *" in table  # * marks the recommended
    assert f"recommended: lora — {doc['recommendation']['why']}" in table
    assert [r["rung"] for r in doc["rungs"]] == ["prompt", "lora"]  # ladder order, whatever the file's
    assert doc["not_applicable"] == {"rag": "a classifier reads no passages", "lora+rag": "as rag"}
    check_figures(doc, out)
    by = {r["rung"]: r for r in doc["rungs"]}
    assert by["prompt"]["labels"] == 3 and by["prompt"]["cost"]["train_tokens"] == 0
    # The keyword decides the intent: the classifier learns it; a random decoder is near chance (1/3).
    assert by["lora"]["quality"]["accuracy"] >= 0.9, by["lora"]["quality"]
    assert by["prompt"]["quality"]["accuracy"] < by["lora"]["quality"]["ci95"][0]
    assert doc["recommendation"]["rung"] == "lora"
    # The classifier's own predictions, recomputed from its saved model directory.
    from lmforge.eval.tasks import Classifier

    classifier = Classifier.from_dir(out / "lora" / "run" / "model")
    answers = [json.loads(line) for line in (out / "lora" / "answers.jsonl").open()]
    predicted = classifier.predict([a["text"] for a in answers], 8)
    assert [a["answer"] for a in answers] == [classifier.names[i] for i in predicted]
    assert by["lora"]["memory"]["added_bytes"] == dir_bytes(out / "lora" / "run" / "model")
    # The sample spreads over the (label-sorted or not) file: every label is asked about.
    assert {a["expected"] for a in answers} == {"card", "cash", "loan"}


# ------------------------------------------------------------------------------------- bad task files


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rungz": ["prompt"]}, "unknown config key 'rungz' (from {task}); did you mean 'rungs'?"),
        ({"answer": {"latency_item": 3}}, "did you mean 'answer.latency_items'?"),
        (
            {"rungs": ["prompt", "lorra"]},
            "unknown rung 'lorra'; did you mean 'lora'? (the rungs: prompt, rag, lora",
        ),
        ({"not_applicable": {"rags": "x"}}, "unknown rung 'rags'; did you mean 'rag'?"),
        ({"rungs": ["prompt", "prompt"]}, "expected each of prompt, rag, lora, lora+rag at most once"),
        (
            {"rungs": ["rag"], "not_applicable": {"rag": "no"}},
            "rung rag is listed in rungs and in not_applicable",
        ),
        ({"rag": {"k": 1}}, "rung rag needs rag.corpus: the documents to index"),
        ({"kind": "classify"}, "rung rag puts passages in a decoder's prompt"),
        ({"finetune": {"method": "full"}}, "finetune.method=full: the lora rungs train LoRA"),
    ],
)
def test_a_bad_task_file_is_one_clear_error(world, tmp_path, change, message):
    path = tmp_path / "task.yaml"
    task = qa_task(world)
    task.update(change)
    if "rungz" in change:
        del task["rungs"]
    result = run("--task", write_task(path, task), "--out", tmp_path / "out")
    assert message.format(task=path) in error(result)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_missing_input_is_named(world, tmp_path):
    task = qa_task(world, model=str(tmp_path / "no-model"))
    task["rag"]["corpus"].append(str(tmp_path / "gone.jsonl"))
    result = run("--task", write_task(tmp_path / "task.yaml", task), "--out", tmp_path / "out")
    line = error(result)
    assert f"model {tmp_path / 'no-model'}" in line and f"rag.corpus[1] {tmp_path / 'gone.jsonl'}" in line
    assert not (tmp_path / "out").exists()
    result = run("--task", tmp_path / "nope.yaml", "--out", tmp_path / "out")
    assert f"cannot read recipe {tmp_path / 'nope.yaml'}" in error(result)


def test_help_explains_the_rule_and_lists_the_fields():
    result = run("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "cheapest rung whose accuracy lies within the best rung's interval" in text
    assert "data.limit" in text and "rag.train_with_passages" in text and "finetune.train.max_steps" in text
    assert "set in the --task file" in text
