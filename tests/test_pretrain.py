"""`lmforge pretrain` end to end on a prepared dataset: it learns, writes a HF dir with lineage, refuses bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.tokenizer import train_tokenizer

runner = CliRunner()
SMALL = (
    "model.overrides={hidden_size: 64, intermediate_size: 192, num_hidden_layers: 2, num_attention_heads: 4}"
)
STORY = "the cat sat on the mat and the dog ran to the park where the children played until dark"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pt")
    docs = [f"{STORY} {i % 7}" for i in range(400)]
    src = root / "corpus.txt"
    src.write_text("\n\n".join(docs) + "\n")
    tok = train_tokenizer(docs, "bpe", 300, root / "tok")
    prepare(PrepareConfig(inputs=[src], tokenizer=tok, num_proc=1, dedup="off"), root / "data")
    return root / "data"


def pretrain(out, *overrides: str):
    args = [
        "pretrain",
        "--out",
        str(out),
        "--set",
        SMALL,
        "--json",
        *[a for o in overrides for a in ("--set", o)],
    ]
    return runner.invoke(app, args)


def test_pretrain_learns_and_writes_a_hf_dir(tmp_path, dataset):
    common = (
        f"data.dataset={dataset}",
        "train.seq_len=32",
        "train.micro_batch_size=8",
        "train.eval_every=10",
    )
    result = pretrain(
        tmp_path / "run", *common, "train.max_steps=40", "optim.lr=1e-2", "optim.warmup_steps=2"
    )
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["val_loss"] < 0.5 * res["unigram_baseline"]  # a repetitive corpus: far below unigram entropy
    assert res["sample"].startswith("Once upon a time")
    model_dir = tmp_path / "run" / "model"
    lineage = json.loads((model_dir / "lmforge.json").read_text())
    assert lineage["data"] == [json.loads((dataset / "manifest.json").read_text())["id"]]
    assert lineage["parent"] == "preset:llama-14m" and lineage["seed"] == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(40))
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoModelForCausalLM.from_pretrained(model_dir).config.num_hidden_layers == 2

    # Continued pretraining from the output, same data.
    again = pretrain(tmp_path / "more", *common, f"model.init_from={model_dir}", "train.max_steps=2")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["parent"] == str(model_dir)


def test_pretrain_bad_input(tmp_path, dataset):
    cases = {
        "data.dataset is required": (),
        "exceeds the model's max_position_embeddings": (f"data.dataset={dataset}", "train.seq_len=4096"),
        "not a prepared dataset": (f"data.dataset={tmp_path}",),
        "did you mean 'train.max_steps'": (f"data.dataset={dataset}", "train.max_step=3"),
    }
    for message, overrides in cases.items():
        result = pretrain(tmp_path / "bad", *overrides)
        assert result.exit_code == 2, (message, result.output)
        assert message in result.stderr, result.stderr
