"""`lmforge finetune` end to end on a tiny synthetic world: every method trains and writes its output, forgetting
is measured against the base's pretraining data and gates the run, adapters load for generation and merge,
the model learns to end its turn, and bad input is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import interrupted_at
from typer.testing import CliRunner

from lmforge.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny world: tokenizer, prepared pretraining text and SFT chats, and a base pretrained on the text."""
    return build_world(tmp_path_factory.mktemp("ft"))


BASE_MODEL = (
    "model.overrides={hidden_size: 96, intermediate_size: 256, num_hidden_layers: 2, num_attention_heads: 4}"
)


def build_world(root: Path, model: str = BASE_MODEL, steps: int = 150) -> dict[str, Path]:
    """Synthesise, train a tokenizer, prepare, and pretrain a ~0.7M-parameter base for `steps` steps."""
    from lmforge.data.prepare import PrepareConfig, iter_texts, prepare
    from lmforge.data.synthetic import WorldSizes, synthesize
    from lmforge.tokenizer import train_tokenizer

    sizes = WorldSizes.tiny().model_copy(update={"people_a": 24, "filler_docs": 20})
    w = Path(synthesize(root / "world", seed=0, sizes=sizes)["out"])
    tok = train_tokenizer(iter_texts([w / "pretrain.jsonl", w / "sft_a.jsonl"]), "bpe", 512, root / "tok")
    for name in ("pretrain", "sft_a"):
        prepare(PrepareConfig(inputs=[w / f"{name}.jsonl"], tokenizer=tok, num_proc=1, val_fraction=0.1),
                root / name)  # fmt: skip
    result = runner.invoke(app, [
        "pretrain", "--out", str(root / "base"), "--set", model, "--set", f"data.dataset={root / 'pretrain'}",
        "--set", "train.seq_len=64", "--set", "train.micro_batch_size=8", "--set", f"train.max_steps={steps}",
        "--set", "optim.lr=5e-3", "--set", "optim.warmup_steps=3", "--set", "sample_prompt=null",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"root": root, "world": w, "base": root / "base" / "model", "sft": root / "sft_a",
            "pretrain": root / "pretrain"}  # fmt: skip


def finetune(world: dict[str, Path], out: Path, *sets: str, flags: tuple[str, ...] = ()):
    args = ["finetune", "--init-from", str(world["base"]), "--out", str(out), "--json",
            "--set", f"data.dataset={world['sft']}", "--set", "train.seq_len=64", "--set", "train.micro_batch_size=8",
            "--set", "train.max_steps=8", "--set", "train.eval_every=4", "--set", "optim.warmup_steps=1", *flags]  # fmt: skip
    return runner.invoke(app, args + [a for s in sets for a in ("--set", s)])


@pytest.mark.parametrize("method", ["full", "lora", "adapter", "prompt"])
def test_every_method_trains_and_measures_forgetting(world, tmp_path, method):
    result = finetune(world, tmp_path / "run", f"method={method}", "optim.lr=3e-3")
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["steps"] == 8 and res["val_loss"] < res["val_loss_before"]  # it learned the chats' format
    if method == "full":
        assert res["trainable_params"] == res["total_params"]
        assert (Path(res["output"]) / "model.safetensors").is_file()
    else:
        assert 0 < res["trainable_params"] < res["total_params"] / 5
        assert (Path(res["output"]) / "adapter_config.json").is_file()
    forgetting = res["forgetting"]
    assert forgetting["reference"] == str(world["pretrain"])  # found through the base's lineage
    assert forgetting["perplexity_before"] > 1 and forgetting["perplexity_after"] > 1
    expected = 100 * (forgetting["perplexity_after"] / forgetting["perplexity_before"] - 1)
    assert forgetting["increase_pct"] == pytest.approx(expected)
    lineage = json.loads((Path(res["output"]) / "lmforge.json").read_text())
    assert lineage["parent"] == str(world["base"]) and lineage["results"]["forgetting"] == forgetting
    if (
        method != "full"
    ):  # the adapter generates on top of its base (prompt tuning: its virtual tokens cached)
        gen = runner.invoke(app, ["generate", str(world["base"]), "--adapter", res["output"], "--chat", "--prompt",
                                  "Who is Ada?", "--max-new-tokens", "5", "--temperature", "0", "--json"])  # fmt: skip
        assert gen.exit_code == 0, gen.output
        assert json.loads(gen.stdout)["results"][0]["samples"][0]["finish_reason"] in ("stop", "length")


def test_forgetting_gate_fails_the_run(world, tmp_path):
    result = finetune(
        world, tmp_path / "run", "method=full", "optim.lr=1e-2", flags=("--max-forgetting", "0.001")
    )
    assert result.exit_code == 1, result.output
    assert "forgetting gate" in result.output and "per cent" not in result.output
    res = json.loads((tmp_path / "run" / "results.json").read_text())  # the outputs stay for inspection
    assert res["forgetting"]["increase_pct"] > 0.001 and res["forgetting"]["max_increase_pct"] == 0.001


def test_lora_adapter_generates_and_merges_exactly(world, tmp_path):
    from lmforge.adapters.io import load_with_adapter
    from lmforge.model.hf import load_model

    result = finetune(world, tmp_path / "run", "method=lora", "optim.lr=1e-2")
    assert result.exit_code == 0, result.output
    adapter = tmp_path / "run" / "adapter"
    merged_dir = tmp_path / "merged"
    result = runner.invoke(
        app, ["merge", str(world["base"]), str(adapter), "--out", str(merged_dir), "--json"]
    )
    assert result.exit_code == 0, result.output
    ids = torch.tensor([[5, 17, 40, 99, 7, 3]])
    with torch.no_grad():
        adapted = load_with_adapter(world["base"], adapter)(ids)
        merged = load_model(merged_dir)(ids)
        base = load_model(world["base"])(ids)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert not torch.allclose(base, adapted, atol=1e-3)  # the adapter changed something
    result = runner.invoke(app, ["generate", str(world["base"]), "--adapter", str(adapter), "--prompt", "Who is",
                                 "--chat", "--max-new-tokens", "4", "--temperature", "0", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    via_cli = json.loads(result.stdout)["results"][0]["samples"][0]["token_ids"]
    from lmforge.infer.engine import Engine
    from lmforge.infer.prompts import prompt_ids
    from lmforge.infer.sampling import GenerationConfig

    engine = Engine.from_dir(merged_dir, device="cpu")
    ids = prompt_ids(engine, "Who is", chat=True, system=None, room=60, truncate=False)
    via_merged = engine.generate([ids], GenerationConfig(temperature=0, max_new_tokens=4))[0].token_ids
    assert via_cli == via_merged


def test_chat_sft_learns_to_end_its_turn(world, tmp_path):
    """EOS is learned: after chat SFT the model closes its answer with the end-of-turn token on >= 90% of
    held-out questions (the base, trained on plain text, never does)."""
    from lmforge.eval.qa import exact_match, read_qa
    from lmforge.infer.engine import Engine

    result = finetune(world, tmp_path / "run", "method=full", "optim.lr=3e-3", "train.max_steps=150")
    assert result.exit_code == 0, result.output
    questions = read_qa(world["world"] / "eval_qa.jsonl", limit=40)
    before = exact_match(Engine.from_dir(world["base"], device="cpu"), questions, max_new_tokens=24)
    after = exact_match(
        Engine.from_dir(tmp_path / "run" / "model", device="cpu"), questions, max_new_tokens=24
    )
    assert before["ended_with_end_of_turn"] < 0.1
    assert after["ended_with_end_of_turn"] >= 0.9, after["examples"]


def test_domain_text_and_a_decoder_classifier(world, tmp_path, shared_data):
    """kind=domain trains on every token of text windows; kind=task on classification data puts a fresh
    LlamaForSequenceClassification head on the decoder base."""
    result = finetune(
        world, tmp_path / "domain", "kind=domain", f"data.dataset={world['pretrain']}", "method=lora"
    )
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["val_loss"] < res["val_loss_before"] and res["forgetting"]["increase_pct"] < 50
    rows = (shared_data / "banking77" / "train.csv").read_text(encoding="utf-8").splitlines()[:121]
    folder = tmp_path / "cls"
    folder.mkdir()
    (folder / "train.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "categories.json").write_text((shared_data / "banking77" / "categories.json").read_text())
    data = _prepare([folder / "train.csv"], world["root"] / "tok", tmp_path / "cls-data")
    result = finetune(
        world, tmp_path / "cls-run", "kind=task", f"data.dataset={data}", "method=full", "optim.lr=1e-3"
    )
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["val_accuracy_before"] >= 0 and "skipped" in res["forgetting"]
    from lmforge.model.hf import load_model

    model = load_model(res["output"])
    assert type(model).__name__ == "DecoderForSequenceClassification" and model.config.num_labels == 77


def test_adapter_on_another_base_is_refused(world, tmp_path):
    import shutil

    from lmforge.model.hf import load_model, save_model

    result = finetune(world, tmp_path / "run", "method=adapter")
    assert result.exit_code == 0, result.output
    other = shutil.copytree(world["base"], tmp_path / "other")
    model = load_model(other)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)  # same shapes, other weights
    save_model(model, other)
    gen = runner.invoke(
        app, ["generate", str(other), "--adapter", str(tmp_path / "run" / "adapter"), "--prompt", "x"]
    )
    assert gen.exit_code == 2 and "trained on" in gen.output and "other weights" in gen.output
    merged = runner.invoke(
        app, ["merge", str(world["base"]), str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "m")]
    )
    assert merged.exit_code == 2 and "only LoRA merges" in merged.output


def test_bad_input(world, tmp_path):
    text = finetune(world, tmp_path / "a", f"data.dataset={world['pretrain']}", "kind=chat")
    assert text.exit_code == 2 and "holds text data" in text.output
    nothing = finetune(world, tmp_path / "b", "method=lora", "lora.target_modules=[no_such_layer]")
    assert nothing.exit_code == 2 and "q_proj" in nothing.output  # the error lists the module names
    no_model = runner.invoke(
        app, ["finetune", "--out", str(tmp_path / "c"), "--set", f"data.dataset={world['sft']}"]
    )
    assert no_model.exit_code == 2 and "model is required" in no_model.output
    short = finetune(world, tmp_path / "d", "train.seq_len=4")  # every reply starts after the first 4 tokens
    assert (
        short.exit_code == 2
        and "no sample has a reply token within its first train.seq_len=4" in short.output
    )


def test_every_loop_field_is_honoured_or_refused(world, tmp_path, monkeypatch):
    """A field finetune cannot honour is refused with the reason (none is silently ignored), a missing GPU is an
    error instead of a CPU run, and activation checkpointing trains the same model."""
    refused = {"train.strategy=fsdp": "train.strategy=fsdp: finetune runs in one process"}
    if not torch.cuda.is_available():
        refused["train.device=cuda"] = "train.device=cuda, but torch sees no CUDA device here"
    for setting, message in refused.items():
        result = finetune(world, tmp_path / "bad", setting)
        assert result.exit_code == 2 and message in " ".join(result.stderr.split()), (setting, result.output)
        assert not (tmp_path / "bad").exists()  # refused before anything is written
    import lmforge.stages.finetune as stage

    wrapped = []  # the blocks activation checkpointing wrapped: proof it was applied, not only harmless
    real = stage.checkpoint_activations
    monkeypatch.setattr(stage, "checkpoint_activations", lambda m: wrapped.append(real(m)) or m)
    plain = finetune(world, tmp_path / "plain", "method=lora", "train.max_steps=4", "train.eval_every=0")
    assert not wrapped
    recomputed = finetune(world, tmp_path / "ckpt", "method=lora", "train.max_steps=4", "train.eval_every=0",
                          "train.activation_checkpointing=true")  # fmt: skip
    assert plain.exit_code == recomputed.exit_code == 0, recomputed.output
    blocks = list(wrapped[0].model.layers) if wrapped else []
    assert blocks and all(getattr(b.forward, "_lmforge_checkpointed", False) for b in blocks)
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
         if "loss" in json.loads(line)]
        for run in ("plain", "ckpt")
    ]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(losses[0]) == 4


# ------------------------------------------------------------------------ recipes, each on a small slice

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _prepare(files: list[Path], tokenizer: Path, out: Path) -> Path:
    from lmforge.data.prepare import PrepareConfig, prepare

    prepare(PrepareConfig(inputs=files, tokenizer=tokenizer, num_proc=1, val_fraction=0.1), out)
    return out


def _slice(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return dst


def _recipe(name: str, out: Path, *sets: str):
    args = ["finetune", "--config", str(RECIPES / name), "--out", str(out), "--json"]
    return runner.invoke(app, args + [a for s in sets for a in ("--set", s)])


def test_recipe_sft_synthetic(world, tmp_path):
    result = _recipe("sft-synthetic.yaml", tmp_path / "run", f"model={world['base']}", f"data.dataset={world['sft']}",
                     f"eval.qa={world['world'] / 'eval_qa.jsonl'}", "eval.qa_limit=6", "eval.max_new_tokens=12",
                     "train.max_steps=6", "train.seq_len=64", "train.micro_batch_size=8")  # fmt: skip
    assert result.exit_code == 0, result.output
    qa = json.loads(result.stdout)["qa"]
    assert qa["before"]["questions"] == qa["after"]["questions"] == 18  # 6 of each of A, B and C
    assert set(qa["after"]["by_group"]) <= {"A", "B", "C"} and 0 <= qa["after"]["accuracy"] <= 1
    # Every figure is recomputed from the answers the run wrote beside its results.
    from lmforge.eval.stats import wilson

    answers = [json.loads(line) for line in (tmp_path / "run" / "qa_answers.jsonl").read_text().splitlines()]
    for when in ("before", "after"):
        rows = [a for a in answers if a["when"] == when]
        assert len(rows) == 18
        for a in rows:
            first_sentence = re.split(r"[.!?\n]", a["answer"].strip())[0]
            assert a["correct"] == (a["expected"].lower() in " ".join(first_sentence.lower().split()))
        for group in qa[when]["by_group"]:
            verdicts = [a["correct"] for a in rows if a["group"] == group]
            assert qa[when]["by_group"][group] == sum(verdicts) / len(verdicts)
            assert qa[when]["intervals"][group] == wilson(sum(verdicts), len(verdicts))


def test_recipes_selfinstruct_and_gsm8k(world, tmp_path, shared_data):
    tok = world["root"] / "tok"
    selfinstruct = _prepare([shared_data / "self_instruct_seed" / "seed_tasks.jsonl"], tok, tmp_path / "si")
    result = _recipe("sft-selfinstruct-lora.yaml", tmp_path / "si-run", f"model={world['base']}",
                     f"data.dataset={selfinstruct}", "train.max_steps=3", "train.seq_len=128")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] >= 140  # ~90% of the 175 seed tasks (the rest validate)
    train = _slice(shared_data / "gsm8k" / "train.jsonl", tmp_path / "gsm8k_train.jsonl", 40)
    test = _slice(shared_data / "gsm8k" / "test.jsonl", tmp_path / "gsm8k_test.jsonl", 4)
    gsm8k = _prepare([train], tok, tmp_path / "gsm8k")
    result = _recipe("sft-gsm8k.yaml", tmp_path / "gsm8k-run", f"model={world['base']}", f"data.dataset={gsm8k}",
                     f"eval.qa={test}", "eval.max_new_tokens=8", "train.max_steps=3", "train.seq_len=256")  # fmt: skip
    assert result.exit_code == 0, result.output
    qa = json.loads(result.stdout)["qa"]
    assert qa["after"]["questions"] == 4 and qa["after"]["examples"][0]["expected"] == "18"  # Janet's ducks


@pytest.mark.parametrize("method", ["full", "lora"])
def test_recipe_banking77_minilm(tmp_path, shared_data, method):
    """The real MiniLM with a fresh 77-way head learns four BANKING77 intents from a small slice."""
    import csv

    from lmforge.demo import minilm_dir

    minilm = minilm_dir()
    rows = list(csv.DictReader((shared_data / "banking77" / "train.csv").open(encoding="utf-8")))
    kept = sorted({r["category"] for r in rows})[:4]
    for name, part in (("train", slice(0, 40)), ("test", slice(40, 52))):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "categories.json").write_text((shared_data / "banking77" / "categories.json").read_text())
        with (folder / f"{name}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "category"])
            writer.writeheader()
            for label in kept:
                writer.writerows(
                    [{"text": r["text"], "category": label} for r in rows if r["category"] == label][part]
                )
    train = _prepare([tmp_path / "train" / "train.csv"], minilm, tmp_path / "d-train")
    test = _prepare([tmp_path / "test" / "test.csv"], minilm, tmp_path / "d-test")
    lr = "optim.lr=5e-4" if method == "full" else "optim.lr=3e-3"
    result = _recipe("classify-banking77-minilm.yaml", tmp_path / "run", f"model={minilm}", f"data.dataset={train}",
                     f"eval.dataset={test}", f"method={method}", lr, "train.max_steps=40", "train.micro_batch_size=16",
                     "train.seq_len=32", "train.eval_every=20", "optim.warmup_steps=4")  # fmt: skip
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["test"]["examples"] == 48 and res["test"]["majority_baseline"] == 0.25
    assert res["test"]["accuracy"] >= 0.6, res["test"]  # four intents, chance 0.25
    assert "skipped" in res["forgetting"]
    from lmforge.model.hf import load_model

    model = load_model(res["output"])  # a plain HF classifier dir (LoRA merged with its head)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 77


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_is_bit_identical(world, tmp_path, method):
    """A finetune run stopped (Ctrl-C) after its step-4 checkpoint and continued with `--resume RUN` logs the
    same losses and writes the same weights, bit for bit, as a run never stopped; checkpoint_every and
    keep_checkpoints are honoured (an adapter run checkpoints only its trained tensors)."""
    sets = (f"method={method}", "train.max_steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=2",
            "train.deterministic=true", "train.eval_every=4")  # fmt: skip
    whole = finetune(world, tmp_path / "whole", *sets)
    assert whole.exit_code == 0, whole.output
    steps = sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir())
    assert steps == ["step-000006", "step-000008"]  # every 2 steps, the newest 2 kept
    trained = tmp_path / "whole" / "checkpoints" / "step-000008" / "train_state" / "trained.safetensors"
    assert trained.is_file() == (method == "lora")

    with interrupted_at(5):
        stopped = finetune(world, tmp_path / "run", *sets)
    assert stopped.exit_code == 130 and "lmforge finetune --resume" in stopped.output
    resumed = runner.invoke(app, ["finetune", "--resume", str(tmp_path / "run"), "--json"])
    assert resumed.exit_code == 0, resumed.output

    def losses(run: str) -> list[tuple]:
        lines = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("val_loss")) for r in lines]

    assert losses("run") == losses("whole")
    a, b = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("whole", "run"))
    assert a["forgetting"] == b["forgetting"] and a["val_loss_before"] == b["val_loss_before"]
    output = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    assert (tmp_path / "whole" / output).read_bytes() == (tmp_path / "run" / output).read_bytes()
