"""What lmforge writes has what vLLM reads (docs/serving.md, "Beyond one machine"), checked without vLLM.

A LoRA adapter trained the way a user trains one (`lmforge data prepare`, then `lmforge finetune method=lora`) is
checked against vLLM's LoRA loader (vllm/lora/peft_helper.py and lora_model.py): `adapter_config.json` with
`peft_type` LORA, an integer `r`, `lora_alpha`, `target_modules` naming Linear layers of the base, no option
vLLM refuses (`modules_to_save`, DoRA, a bias) or ignores (rank / alpha patterns, `layers_to_transform`); and
`adapter_model.safetensors` holding only PEFT's `base_model.model.<layer>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r) for layers `<layer>.weight` (out, in) of the base's safetensors. PEFT loads the
directory onto the transformers model with no missing or unexpected tensor. The base directory is what
`vllm serve DIR` loads: config.json, safetensors weights, a tokenizer with its chat template,
generation_config.json (vLLM's default sampling settings)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from lmforge.cli import app

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PEFT_KEY = re.compile(r"base_model\.model\.(?P<layer>.+)\.lora_(?P<part>[AB])\.weight")
MAX_VLLM_RANK = 512  # the largest --max-lora-rank vLLM accepts (1, 8, 16, 32, 64, 128, 256, 320, 512)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tensors(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama and a LoRA adapter fine-tuned on it for 2 steps, through the command line."""
    root = tmp_path_factory.mktemp("vllm-files")
    chats = [{"messages": [{"role": "user", "content": f"the cat {i}"},
                           {"role": "assistant", "content": "sat on the mat"}]} for i in range(40)]  # fmt: skip
    (root / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    runner = CliRunner()
    result = runner.invoke(app, ["data", "prepare", str(root / "sft.jsonl"), "--out", str(root / "sft"),
                                 "--tokenizer", str(tiny_model_dir), "--set", "num_proc=1",
                                 "--set", "dedup=off", "--set", "val_fraction=0.1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["finetune", "--init-from", str(tiny_model_dir), "--out", str(root / "run"),
                                 "--json", "--set", "method=lora", "--set", f"data.dataset={root / 'sft'}",
                                 "--set", "train.seq_len=32", "--set", "train.micro_batch_size=4",
                                 "--set", "train.max_steps=2", "--set", "train.eval_every=0",
                                 "--set", "optim.lr=1e-2", "--set", "optim.warmup_steps=1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    adapter = Path(json.loads(result.stdout)["output"])
    return {"base": Path(tiny_model_dir), "adapter": adapter}


def test_adapter_config_has_what_vllm_reads(trained):
    config = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    r = config["r"]
    assert isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_VLLM_RANK
    assert isinstance(config["lora_alpha"], (int, float)) and config["lora_alpha"] > 0
    assert Path(config["base_model_name_or_path"]) == trained["base"].resolve()  # PEFT's; vLLM ignores it
    # What vLLM refuses: modules_to_save, DoRA, a bias; what it ignores (and would silently serve without).
    assert not config.get("modules_to_save") and not config.get("use_dora") and config.get("bias") == "none"
    assert isinstance(config.get("use_rslora", False), bool)  # vLLM scales by alpha / sqrt(r) when true
    for ignored in ("rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern"):
        assert not config.get(ignored), ignored
    assert not config.get("fan_in_fan_out") and not config.get("lora_bias")

    targets = config["target_modules"]
    assert isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    base = tensors(trained["base"] / "model.safetensors")
    for target in targets:  # each names Linear layers (2-D weights) of the base
        layers = [k for k in base if k.endswith(f".{target}.weight")]
        assert layers and all(base[k].dim() == 2 for k in layers), target


def test_adapter_tensors_are_peft_lora_pairs_of_base_layers(trained):
    config = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    r, targets = config["r"], config["target_modules"]
    base = tensors(trained["base"] / "model.safetensors")
    adapter = tensors(trained["adapter"] / "adapter_model.safetensors")
    pairs: dict[str, set[str]] = {}
    for key, tensor in adapter.items():
        match = PEFT_KEY.fullmatch(key)
        assert match, f"{key}: not a PEFT LoRA tensor (vLLM reads only lora_A / lora_B weights)"
        layer, part = match["layer"], match["part"]
        assert layer.rsplit(".", 1)[-1] in targets, key  # vLLM checks each tensor's module name
        weight = base.get(f"{layer}.weight")
        assert weight is not None and weight.dim() == 2, f"{key}: the base has no Linear {layer}"
        out_features, in_features = weight.shape
        expected = (r, in_features) if part == "A" else (out_features, r)
        assert tuple(tensor.shape) == expected, (key, tuple(tensor.shape), expected)
        assert tensor.dtype in (torch.float32, torch.float16, torch.bfloat16)
        pairs.setdefault(layer, set()).add(part)
    assert pairs and all(parts == {"A", "B"} for parts in pairs.values())
    adapted = {k.removesuffix(".weight") for k in base for t in targets if k.endswith(f".{t}.weight")}
    assert set(pairs) == adapted  # every targeted layer, and only those
    assert any(adapter[f"base_model.model.{layer}.lora_B.weight"].any() for layer in pairs)  # B trained off 0


def test_adapter_directory_holds_nothing_vllm_would_misread(trained):
    files = {p.name for p in trained["adapter"].iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    # vLLM falls back to a .bin / .pt when the safetensors is absent, and once read new_embeddings.*
    misread = {"adapter_model.bin", "adapter_model.pt", "new_embeddings.safetensors", "new_embeddings.bin"}
    assert not files & misread
    # vLLM uses a tokenizer found in an adapter directory for that adapter's requests: it must be the base's.
    for name in TOKENIZER_FILES:
        if name in files:
            assert (trained["adapter"] / name).read_bytes() == (trained["base"] / name).read_bytes(), name


def test_peft_loads_the_adapter_with_no_missing_or_unexpected_tensor(trained):
    from lmforge.adapters.io import load_with_adapter

    model = transformers.AutoModelForCausalLM.from_pretrained(trained["base"], dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(model, trained["adapter"]).eval()
    assert not [str(w.message) for w in caught if re.search("missing|unexpected", str(w.message), re.I)]
    saved = tensors(trained["adapter"] / "adapter_model.safetensors")
    loaded = {n.replace(".default.", "."): p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert loaded.keys() == saved.keys()  # nothing missing, nothing unexpected
    for key, tensor in saved.items():
        torch.testing.assert_close(loaded[key].detach(), tensor, atol=0, rtol=0)
    ids = torch.tensor([[5, 17, 40, 99, 7, 3]])
    with torch.no_grad():
        expected = load_with_adapter(trained["base"], trained["adapter"])(ids)
        got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_base_directory_has_what_vllm_serve_loads(trained):
    base = trained["base"]
    config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert list(base.glob("*.safetensors")) and not list(base.glob("*.bin"))
    assert all((base / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    assert tokenizer.chat_template  # /v1/chat/completions renders it
    assert tokenizer.eos_token_id == config["eos_token_id"]
    generation = transformers.GenerationConfig.from_pretrained(base)  # vLLM's --generation-config auto
    assert generation.eos_token_id == config["eos_token_id"]
    context = transformers.AutoConfig.from_pretrained(base).max_position_embeddings  # vLLM's max_model_len
    assert context == config["max_position_embeddings"]
