"""LoRA, rsLoRA and DoRA: the adapted model starts as its base, only the adapters train, disabling them gives
the base, merging is exact, and adapter directories round-trip with `peft` both ways (decoder and BERT)."""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"  # the base models are local directories; nothing may be downloaded

import pytest
import torch
from helpers import randomize_, save_random_hf_decoder
from safetensors.torch import load_file, save_file

from lmforge.adapters.base import AdapterLayer, adapter_parameter_names, disable_adapter, parameter_counts
from lmforge.adapters.lora import (
    LoraLinear,
    apply_lora,
    load_lora,
    lora_layers,
    lora_merged,
    merge_lora,
    save_lora,
)
from lmforge.errors import LmforgeError
from lmforge.model.configs import DecoderConfig, preset
from lmforge.model.hf import build_model, load_model
from lmforge.model.linear import Linear
from lmforge.stages.configs import LoraSection

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = {"plain": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}
IDS = torch.randint(4, 128, (2, 9), generator=torch.Generator().manual_seed(0))
TOL = 1e-4


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    """A seeded random Qwen2 (biased q/k/v, unbiased o/MLP: both DoRA bias paths) saved by transformers."""
    return save_random_hf_decoder("Qwen2Config", SMALL, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A seeded random `tiny-bert` BertModel saved by transformers."""
    config = preset("tiny-bert")
    hf_config = transformers.BertConfig(
        **config.model_dump(exclude={"id2label", "torch_dtype"}), attn_implementation="eager"
    )
    torch.manual_seed(0)
    model = transformers.BertModel(hf_config)
    randomize_(model)
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path)
    return path


def hf_model(path):
    """The transformers model of a base directory (eager attention, eval mode)."""
    cls = transformers.BertModel if "bert" in path.name else transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, attn_implementation="eager").eval()


def out(model, ids=IDS) -> torch.Tensor:
    """Decoder logits or BERT's last hidden state, for lmforge, transformers and peft models alike."""
    with torch.no_grad():
        y = model(ids)
    return y if isinstance(y, torch.Tensor) else y[0]


def train_lora_(model, seed: int = 1) -> None:
    """Stand-in for training: random B (A is already random) and DoRA magnitudes moved off the row norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))
            if layer.dora:
                m = layer.lora_magnitude_vector
                m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))


def test_zero_b_starts_as_the_base_sharing_its_weights_and_trains_only_lora(decoder_dir):
    for dora in (False, True):
        model = load_model(decoder_dir)
        base, base_keys = out(model), set(model.state_dict())
        linears = {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS}
        weights = {n: m.weight for n, m in linears.items()}
        apply_lora(model, LoraSection(r=4, dora=dora))

        assert torch.equal(out(model), base)
        # All 7 projections of both layers, and not lm_head.
        assert {n for n, _ in lora_layers(model)} == set(linears)
        assert all(model.get_submodule(n).weight is w for n, w in weights.items())  # shared, not copied
        assert base_keys <= set(model.state_dict())  # the base keeps its keys
        # r (in + out) per layer for A (r, in) and B (out, r), plus DoRA's magnitude (out,).
        expected = sum(4 * (m.in_features + m.out_features) + dora * m.out_features for m in linears.values())
        assert parameter_counts(model)[0] == expected
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(adapter_parameter_names(model))


def test_only_adapter_parameters_receive_gradients(decoder_dir):
    model = apply_lora(load_model(decoder_dir), LoraSection(r=4, dora=True))
    train_lora_(model)
    model(IDS, targets=IDS).backward()
    adapters = set(adapter_parameter_names(model))
    assert any(n.endswith("lora_magnitude_vector") for n in adapters)
    for name, p in model.named_parameters():
        if name in adapters:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_disabled_adapters_give_exactly_the_base(decoder_dir):
    model = load_model(decoder_dir)
    base = out(model)
    apply_lora(model, LoraSection(r=4, alpha=8, dropout=0.1, dora=True)).eval()
    train_lora_(model)
    adapted = out(model)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with disable_adapter(model):
        assert torch.equal(out(model), base)
    assert torch.equal(out(model), adapted)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_is_exact_and_leaves_the_base_layout(decoder_dir, variant):
    model = load_model(decoder_dir)
    base_keys = list(model.state_dict())
    apply_lora(model, LoraSection(r=4, alpha=8, **VARIANTS[variant]))
    train_lora_(model)
    adapted = out(model)
    merge_lora(model)
    torch.testing.assert_close(out(model), adapted, atol=1e-5, rtol=0)
    assert list(model.state_dict()) == base_keys
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)} == {Linear}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_merged_samples_like_the_adapter_and_restores_every_weight(decoder_dir, variant):
    """RL's sampling context: inside, the merged weights give the adapter's outputs (1e-5) with no adapter
    branch; after, every tensor is bit-identical to before and the adapter is back on."""
    model = load_model(decoder_dir)
    apply_lora(model, LoraSection(r=4, alpha=8, **VARIANTS[variant])).eval()
    train_lora_(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = out(model)
    with lora_merged(model):
        assert not any(m.adapter_active for _, m in lora_layers(model))
        torch.testing.assert_close(out(model), adapted, atol=1e-5, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(out(model), adapted)


def test_merge_refuses_a_tied_weight():
    config = DecoderConfig(**SMALL, tie_word_embeddings=True)
    model = apply_lora(build_model(config), LoraSection(r=2, target_modules=["lm_head"]))
    with pytest.raises(LmforgeError, match=r"lm_head: its weight is tied to model\.embed_tokens\.weight"):
        merge_lora(model)
    assert len(lora_layers(model)) == 1  # refused before anything changed


# Every variant and both families each way: the decoder mostly lmforge → PEFT, BERT mostly PEFT → lmforge.
TO_PEFT = [("qwen2", "plain"), ("qwen2", "rslora"), ("qwen2", "dora"), ("bert", "dora")]
FROM_PEFT = [("bert", "plain"), ("bert", "rslora"), ("bert", "dora"), ("qwen2", "dora")]


def base_dir(request, family: str):
    """The base model directory of a family."""
    return request.getfixturevalue("decoder_dir" if family == "qwen2" else "bert_dir")


@pytest.mark.parametrize(("family", "variant"), TO_PEFT)
def test_lmforge_adapter_loads_in_peft(request, family, variant, tmp_path):
    base = base_dir(request, family)
    model = load_model(base)
    cfg = LoraSection(r=4, alpha=8, dropout=0.05, **VARIANTS[variant])
    apply_lora(model, cfg).eval()
    train_lora_(model)
    adapter = save_lora(model, tmp_path / "adapter", cfg, str(base))

    saved = json.loads((adapter / "adapter_config.json").read_text())
    if family == "bert":  # `dense` alone would also select the unadapted pooler.dense
        assert saved["target_modules"] == ["intermediate.dense", "key", "output.dense", "query", "value"]
        assert saved["task_type"] == "FEATURE_EXTRACTION"
    else:
        assert saved["target_modules"] == sorted(PROJECTIONS)
        assert saved["task_type"] == "CAUSAL_LM"
    peft_model = peft.PeftModel.from_pretrained(hf_model(base), adapter).eval()
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert wrapped == {n for n, _ in lora_layers(model)}
    torch.testing.assert_close(out(peft_model), out(model), atol=TOL, rtol=0)


@pytest.mark.parametrize(("family", "variant"), FROM_PEFT)
def test_peft_adapter_loads_in_lmforge(request, family, variant, tmp_path):
    base, bert = base_dir(request, family), family == "bert"
    # A list (names or dotted suffixes) for the decoder, a regex PEFT full-matches against the name for BERT.
    targets = r".*\.(query|value|output\.dense)" if bert else ["q_proj", "v_proj", "down_proj"]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_rslora=variant == "rslora",
        use_dora=variant == "dora", init_lora_weights=False,  # random B: a non-trivial adapter
    )  # fmt: skip
    peft_model = peft.get_peft_model(hf_model(base), config).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # DoRA's magnitude starts at the row norms; move it as training would
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(tmp_path / "adapter")

    model = load_lora(load_model(base), tmp_path / "adapter")
    adapted = {n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)}
    assert adapted == ({"query", "value", "dense"} if bert else {"q_proj", "v_proj", "down_proj"})
    assert all(layer.dora == (variant == "dora") for _, layer in lora_layers(model))
    torch.testing.assert_close(out(model), out(peft_model), atol=TOL, rtol=0)


def test_bf16_autocast_keeps_linears_cpu_path():
    torch.manual_seed(0)
    base = Linear(16, 8)
    layer = LoraLinear(base, r=4, alpha=8, dora=True)
    train_lora_(torch.nn.ModuleDict({"layer": layer}))
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = base(x)
        with disable_adapter(layer):
            assert torch.equal(layer(x), want)  # the base part is Linear's own bf16 computation
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.02)  # bf16 against fp32
    y.float().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_magnitude_vector.grad is not None


# --------------------------------------------------------------------------------------------- bad input


def test_targets_matching_nothing_list_the_linear_layers(decoder_dir):
    model = load_model(decoder_dir)
    with pytest.raises(LmforgeError) as e:
        apply_lora(model, LoraSection(target_modules=["qproj", "attn"]))
    msg = str(e.value)
    assert "['qproj', 'attn']" in msg
    for suffix in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "lm_head"):
        assert suffix in msg
    assert "layers.1" not in msg  # one entry per kind of layer, not per layer
    assert not lora_layers(model)


@pytest.fixture(scope="module")
def plain_adapter(decoder_dir, tmp_path_factory):
    """A plain LoRA adapter of the decoder, saved by lmforge."""
    cfg = LoraSection(r=4, target_modules=["q_proj", "v_proj"])
    model = apply_lora(load_model(decoder_dir), cfg)
    return save_lora(model, tmp_path_factory.mktemp("plain") / "adapter", cfg, str(decoder_dir))


def test_adapter_for_another_width_names_the_tensor_and_both_shapes(decoder_dir, tmp_path):
    wider = DecoderConfig(model_type="qwen2", **{**SMALL, "hidden_size": 48}, attention_bias=True)
    cfg = LoraSection(r=4, target_modules=["q_proj", "v_proj"])
    adapter = save_lora(apply_lora(build_model(wider), cfg), tmp_path / "wide", cfg, "wide")
    model = load_model(decoder_dir)
    with pytest.raises(LmforgeError) as e:
        load_lora(model, adapter)
    msg = str(e.value)
    assert "adapter_model.safetensors" in msg
    assert "tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape (4, 48)" in msg
    assert "this model needs (4, 32)" in msg
    assert not lora_layers(model)  # checked before the model changed


@pytest.mark.parametrize(
    ("option", "value"),
    [("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"q_proj": 32}), ("layers_to_transform", [0]),
     ("modules_to_save", ["lm_head"]), ("bias", "all"), ("peft_type", "LOHA")],
)  # fmt: skip
def test_unsupported_peft_options_are_named(decoder_dir, plain_adapter, tmp_path, option, value):
    adapter = shutil.copytree(plain_adapter, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, option: value}))
    with pytest.raises(LmforgeError, match=option):
        load_lora(load_model(decoder_dir), adapter)


def test_missing_tensor_is_named(decoder_dir, plain_adapter, tmp_path):
    adapter = shutil.copytree(plain_adapter, tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[key]
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(LmforgeError, match=rf"tensor '{key}' is missing"):
        load_lora(load_model(decoder_dir), adapter)


def test_save_replaces_the_directory_whole_or_not_at_all(decoder_dir, plain_adapter, tmp_path, monkeypatch):
    adapter = shutil.copytree(plain_adapter, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    cfg = LoraSection(r=2, target_modules=["k_proj"])
    model = apply_lora(load_model(decoder_dir), cfg)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lmforge.adapters.base.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_lora(model, adapter, cfg, str(decoder_dir))
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging leftovers
    monkeypatch.undo()
    save_lora(model, adapter, cfg, str(decoder_dir))
    assert json.loads((adapter / "adapter_config.json").read_text())["target_modules"] == ["k_proj"]
    loaded = load_lora(load_model(decoder_dir), adapter)
    assert isinstance(loaded.model.layers[0].self_attn.k_proj, LoraLinear)
