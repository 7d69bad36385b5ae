"""`lmforge pretrain` end to end on a prepared dataset: it learns, writes a HF dir with lineage, refuses bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import TINY_MODEL
from typer.testing import CliRunner

from lmforge.cli import app

runner = CliRunner()


@pytest.fixture
def dataset(story_dataset):
    return story_dataset


def pretrain(out, *overrides: str):
    args = [
        "pretrain",
        "--out",
        str(out),
        "--set",
        TINY_MODEL,
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
        tmp_path / "run", *common, "train.max_steps=40", "optim.lr=1e-2", "optim.warmup_steps=2",
        "train.report_to=[tensorboard]", "sample_every=20",
    )  # fmt: skip
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
    assert all(0 < r["mfu"] <= 1 and r["peak_memory"] > 0 for r in lines if "loss" in r)
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 20] and samples[1]["text"].startswith("Once upon a time")
    if importlib.util.find_spec("tensorboard") is not None:
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoModelForCausalLM.from_pretrained(model_dir).config.num_hidden_layers == 2

    # Continued pretraining from the output, same data.
    again = pretrain(tmp_path / "more", *common, f"model.init_from={model_dir}", "train.max_steps=2")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["parent"] == str(model_dir)


def test_pretrain_bad_input(tmp_path, dataset):
    cases = {
        "data.dataset (or data.datasets) is required": (),
        "exceeds the model's max_position_embeddings": (f"data.dataset={dataset}", "train.seq_len=4096"),
        "data.dataset: " + str(tmp_path / "empty") + ": the directory holds no data files": (
            f"data.dataset={tmp_path / 'empty'}",
        ),
        "lies inside the input": (f"data.dataset={tmp_path}",),  # --out tmp_path/bad
        "did you mean 'train.max_steps'": (f"data.dataset={dataset}", "train.max_step=3"),
        # Options the objective cannot use are refused with the reason.
        "data.document_mask needs objective clm: 'mlm' trains BERT": (
            f"data.dataset={dataset}",
            "objective=mlm",
            "data.document_mask=true",
        ),
        "data.sampling='fixed' cannot apply to objective 'nsp': NSP draws fresh sentence pairs": (
            f"data.dataset={dataset}",
            "objective=nsp",
            "data.sampling=fixed",
        ),
        "data.sampling: expected 'fixed', 'offset' or 'shuffle', got 'random'": (
            f"data.dataset={dataset}",
            "data.sampling=random",
        ),
        # Shards of another tokenizer: 300 ids in the data, a model with 64.
        "tokenised with a 300-id vocabulary but the model has 64 ids": (
            f"data.dataset={dataset}",
            TINY_MODEL.replace("}", ", vocab_size: 64}"),
        ),
    }
    import torch

    if not torch.cuda.is_available():  # a missing GPU is an error, not a silent CPU run
        cases["train.device=cuda, but torch sees no CUDA device here"] = (
            f"data.dataset={dataset}",
            "train.device=cuda",
        )
    (tmp_path / "empty").mkdir()
    for message, overrides in cases.items():
        result = pretrain(tmp_path / "bad", *overrides)
        assert result.exit_code == 2, (message, result.output)
        assert message in result.stderr, result.stderr


def test_pretrain_refuses_shards_of_another_tokenizer(tmp_path, dataset):
    from lmforge.model.configs import preset
    from lmforge.model.hf import build_model, save_model
    from lmforge.tokenizer import copy_tokenizer, train_tokenizer

    model_dir = save_model(build_model(preset("tiny-llama", vocab_size=300)), tmp_path / "model")
    other = train_tokenizer(["other words, another vocabulary entirely"] * 50, "bpe", 300, tmp_path / "tok")
    copy_tokenizer(other, model_dir)
    result = pretrain(tmp_path / "run", f"data.dataset={dataset}", f"model.init_from={model_dir}")
    assert result.exit_code == 2, result.output
    assert f"whose vocabulary differs from {model_dir}'s tokenizer" in " ".join(result.stderr.split())


def test_document_mask_trains_and_leaves_the_exported_model_unchanged(tmp_path, dataset):
    """The sampling options change what training sees, never what it writes: the same config.json and
    weight names, loadable by transformers with the same logits as lmforge's."""
    transformers = pytest.importorskip("transformers")
    import torch
    from safetensors import safe_open

    from lmforge.model.hf import load_model

    common = (f"data.dataset={dataset}", "train.seq_len=32", "train.micro_batch_size=4", "train.max_steps=6")
    runs = {
        "plain": ("data.sampling=fixed",),
        "masked": ("data.sampling=shuffle", "data.document_mask=true"),
    }
    for name, options in runs.items():
        result = pretrain(tmp_path / name, *common, *options)
        assert result.exit_code == 0, result.output
    dirs = {name: tmp_path / name / "model" for name in runs}
    configs = {name: json.loads((d / "config.json").read_text()) for name, d in dirs.items()}
    assert configs["plain"] == configs["masked"]
    keys = {}
    for name, d in dirs.items():
        with safe_open(d / "model.safetensors", "pt") as f:
            keys[name] = sorted(f.keys())
    assert keys["plain"] == keys["masked"]
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    ours = load_model(dirs["masked"]).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(dirs["masked"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)
    assert not torch.equal(ours(ids), load_model(dirs["plain"])(ids))  # the option did change the training
