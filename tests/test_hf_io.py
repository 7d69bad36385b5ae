"""HF directory load/save: sharding, dtypes, meta-device building, and clear errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import LmforgeError
from lmforge.model.configs import PRESETS, DecoderConfig, preset
from lmforge.model.hf import (
    ARCHITECTURES,
    DEFAULT_ARCHITECTURE,
    build_model,
    decoder_config_to_hf,
    load_model,
    read_config,
    save_model,
)


@pytest.fixture
def tiny(tmp_path):
    """A tiny lmforge Llama saved as a HF dir."""
    torch.manual_seed(0)
    model = build_model(preset("tiny-llama", bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    save_model(model, tmp_path / "tiny")
    return model, tmp_path / "tiny"


def test_sharded_save_reloads_identically_and_loads_in_transformers(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = tiny
    out = save_model(model, tmp_path / "sharded", max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in model.state_dict().values())

    reloaded = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-4

    # Saving again unsharded removes the old shards and index: no stale weights left behind.
    save_model(model, out)
    assert sorted(p.name for p in out.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert not list(out.glob(".*.tmp"))


def test_build_on_meta_follows_init_scheme():
    config = preset("tiny-qwen2")
    model = build_model(config)
    assert not any(p.is_meta for p in model.parameters())
    q = model.model.layers[0].self_attn.q_proj
    assert abs(q.weight.std().item() - config.initializer_range) < 0.003
    assert torch.equal(q.bias, torch.zeros_like(q.bias))
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied survives to_empty


def test_dtype_is_respected_on_save_and_load(tiny, tmp_path):
    model, path = tiny
    bf16 = load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    save_model(bf16, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_model(tmp_path / "bf16")
    assert next(again.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        ids = torch.randint(0, 256, (1, 8))
        assert (again(ids).float() - model(ids)).abs().max() < 0.1  # bf16 rounding only


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(LmforgeError, match="no such directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmforgeError, match=r"config\.json not found"):
        load_model(tmp_path / "empty")


def test_unsupported_model_type_lists_supported(tiny):
    _, path = tiny
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(
        LmforgeError, match=r"'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3, bert"
    ):
        read_config(path)


def test_misshapen_tensor_names_it_and_both_shapes(tiny):
    _, path = tiny
    state = load_file(path / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(state, path / "model.safetensors")
    with pytest.raises(
        LmforgeError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(100, 64\).*\(128, 64\)"
    ):
        load_model(path)


def test_missing_tensor_is_named(tiny):
    _, path = tiny
    state = load_file(path / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(LmforgeError, match=r"missing from the checkpoint: model\.norm\.weight"):
        load_model(path)


def test_config_that_no_hf_family_expresses_is_refused(tmp_path):
    model = build_model(preset("tiny-llama", qk_norm=True))
    with pytest.raises(LmforgeError, match="cannot be saved as HF model_type 'llama'"):
        save_model(model, tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.json").exists()


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_on_meta_and_is_a_hf_family(name):
    config = PRESETS[name]
    with torch.device("meta"):
        model = ARCHITECTURES[DEFAULT_ARCHITECTURE[config.model_type]](config)
    n_params = sum(p.numel() for p in model.parameters())
    expected = {"llama-14m": 13_767_552, "llama-124m": 124_275_456}  # the sizes the names promise
    if name in expected:
        assert n_params == expected[name]
    if isinstance(config, DecoderConfig):
        decoder_config_to_hf(config)  # raises if transformers would read it as a different model


def test_preset_overrides_rederive_fields():
    assert preset("tiny-mistral", num_hidden_layers=3).layer_types == ["sliding_attention"] * 3
    assert preset("tiny-llama", hidden_size=128).head_dim == 32
    with pytest.raises(LmforgeError, match="unknown model preset 'gpt-9'; available: bert-mini"):
        preset("gpt-9")
