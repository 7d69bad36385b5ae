"""Bottleneck adapters and prompt tuning: start at the base, switch off to the base, train only themselves,
round-trip through their directories, and (prompt tuning) match PEFT's logits both ways; the registry of
every adapter kind."""

from __future__ import annotations

import ast
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_, save_random_hf_decoder

from lmforge.adapters.base import adapter_parameter_names, disable_adapter, parameter_counts
from lmforge.adapters.bottleneck import Bottleneck, apply_bottleneck, load_bottleneck, save_bottleneck
from lmforge.adapters.io import adapter_kind, load_adapter, save_adapter
from lmforge.adapters.prompt import PromptTunedCausalLM, apply_prompt_tuning, load_prompt, save_prompt
from lmforge.adapters.registry import ADAPTER_KINDS
from lmforge.errors import LmforgeError
from lmforge.model.configs import preset
from lmforge.model.decoder import IGNORE_INDEX, CausalLM, KVCache, positions_from_mask
from lmforge.model.hf import build_model, load_model
from lmforge.stages.configs import BottleneckSection, FinetuneConfig, PromptSection

SIZE = 8
N_VIRTUAL = 5
HF_SMALL = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip


def random_model(name: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A tiny preset model with non-trivial weights, in eval mode (BERT's dropout off)."""
    torch.manual_seed(seed)
    model = build_model(preset(name, **overrides))
    randomize_(model, seed)
    return model.eval()


def run(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Decoder logits (B, T, V), or BERT's last hidden states and pooled output side by side (B, T*C + C)."""
    out = model(ids)
    if isinstance(out, tuple):  # EncoderOutput
        return torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], -1)
    return out


def ids_for(model: torch.nn.Module, B: int = 2, T: int = 9, seed: int = 0) -> torch.Tensor:
    """Seeded random ids (B, T), clear of the special ids 0-2."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (B, T), generator=g)


@torch.no_grad()
def randomize_adapters_(model: torch.nn.Module, seed: int = 2) -> None:
    """Non-zero adapters (a fresh bottleneck's up projection, hence its output, is zero)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    for name in adapter_parameter_names(model):
        params[name].copy_(0.2 * torch.randn(params[name].shape, generator=g))


# ------------------------------------------------------------------------------------------- bottleneck


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_bottleneck_starts_at_base_and_switches_off_to_it(name):
    model = random_model(name)
    base, ids = copy.deepcopy(model), ids_for(model)
    base_keys = set(base.state_dict())
    apply_bottleneck(model, BottleneckSection(size=SIZE))
    with torch.no_grad():
        assert torch.equal(run(model, ids), run(base, ids))  # up = 0: exactly the base
        randomize_adapters_(model)
        assert not torch.allclose(run(model, ids), run(base, ids), atol=1e-3)
        with disable_adapter(model):
            assert torch.equal(run(model, ids), run(base, ids))
    # The base's keys and tensors are untouched; each adapter is a child of the module it adapts.
    state = model.state_dict()
    assert base_keys <= set(state)
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    first = "model.layers.0.self_attn" if name == "tiny-llama" else "encoder.layer.0.attention.output.dense"
    assert isinstance(model.get_submodule(f"{first}.adapter"), Bottleneck)
    assert sorted(set(state) - base_keys) == sorted(adapter_parameter_names(model))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_bottleneck_trains_only_its_parameters(name):
    model = random_model(name)
    base_total = parameter_counts(model)[1]
    apply_bottleneck(model, BottleneckSection(size=SIZE, activation="silu"))
    C, L = model.config.hidden_size, model.config.num_hidden_layers
    trainable, total = parameter_counts(model)
    assert trainable == 2 * L * (2 * C * SIZE + SIZE + C)  # two adapters per block
    assert total == base_total + trainable
    randomize_adapters_(model)
    ids = ids_for(model)
    loss = model(ids, ids).mean() if name == "tiny-llama" else run(model, ids).square().mean()
    loss.backward()
    wanted = set(adapter_parameter_names(model))
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in wanted), n
        assert p.grad is None or p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_bottleneck_save_load_round_trip(name, tmp_path):
    model = random_model(name)
    fresh = copy.deepcopy(model)
    cfg = BottleneckSection(size=SIZE, activation="relu")
    apply_bottleneck(model, cfg)
    randomize_adapters_(model)
    save_bottleneck(model, tmp_path / "adapter", cfg, base_model="base-dir")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved == {"lmforge_adapter": "bottleneck", "size": SIZE, "activation": "relu",
                     "base_model_name_or_path": "base-dir"}  # fmt: skip
    loaded = load_bottleneck(fresh, tmp_path / "adapter")
    ids = ids_for(model)
    with torch.no_grad():
        assert torch.equal(run(loaded, ids), run(model, ids))
    assert parameter_counts(loaded) == parameter_counts(model)


def test_bottleneck_of_another_width_is_refused(tmp_path):
    cfg = BottleneckSection(size=SIZE)
    save_bottleneck(apply_bottleneck(random_model("tiny-llama"), cfg), tmp_path / "a", cfg, "base")
    narrow = random_model("tiny-llama", hidden_size=32, intermediate_size=64)
    name = "model.layers.0.self_attn.adapter.down.weight"
    with pytest.raises(
        LmforgeError, match=rf"adapter_model.safetensors: tensor '{name}' has shape \(8, 64\).*\(8, 32\)"
    ):
        load_bottleneck(narrow, tmp_path / "a")
    with pytest.raises(LmforgeError, match="already has bottleneck adapters"):
        apply_bottleneck(narrow, cfg)  # the failed load left its (fresh) adapters; a second apply is refused
    deeper = random_model("tiny-llama", num_hidden_layers=3)
    with pytest.raises(LmforgeError, match=r"tensor 'model.layers.2.self_attn.adapter.down.weight' \(shape"):
        load_bottleneck(deeper, tmp_path / "a")


# -------------------------------------------------------------------------------------- prompt tuning


def prompt_tuned(seed: int = 0, **overrides: object) -> tuple[PromptTunedCausalLM, torch.nn.Module]:
    """A prompt-tuned tiny Llama and a copy of its base."""
    base = random_model("tiny-llama", seed, **overrides)
    torch.manual_seed(seed)
    return apply_prompt_tuning(copy.deepcopy(base), PromptSection(num_virtual_tokens=N_VIRTUAL)), base


def test_prompt_tuning_trains_only_the_prompt_and_switches_off_to_the_base():
    model, base = prompt_tuned()
    C = model.config.hidden_size
    assert parameter_counts(model)[0] == N_VIRTUAL * C
    assert adapter_parameter_names(model) == ["prompt_embeddings.weight"]
    ids = ids_for(model)
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == base(ids).shape
        assert not torch.allclose(logits, base(ids), atol=1e-3)
        with disable_adapter(model):
            assert torch.equal(model(ids), base(ids))
            assert torch.equal(model(ids, ids, reduction="none"), base(ids, ids, reduction="none"))
    model(ids, ids).backward()
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["prompt_embeddings.weight"]


def test_prompt_tuning_keeps_the_base_parameter_names():
    """No wrapper: the model is its base CausalLM (class switched in place) plus one parameter, as PEFT names it
    in an adapter file (`prompt_embeddings`), so every base key and tensor is the base's."""
    model, base = prompt_tuned()
    assert isinstance(model, CausalLM) and type(model) is PromptTunedCausalLM
    names = [n for n, _ in base.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == [*names, "prompt_embeddings.weight"]
    state = model.state_dict()
    assert list(state) == [*base.state_dict(), "prompt_embeddings.weight"]
    assert all(torch.equal(state[k], v) for k, v in base.state_dict().items())
    assert (base.extra_positions, model.extra_positions) == (0, N_VIRTUAL)
    with disable_adapter(model):
        assert model.extra_positions == 0  # switched off it puts nothing in front of the tokens


def test_prompt_tuning_losses_match_its_logits():
    model, _ = prompt_tuned()
    ids = ids_for(model)
    targets = ids.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    targets[0, :3] = IGNORE_INDEX
    with torch.no_grad():
        logits = model(ids)
        per_token = model(ids, targets, reduction="none")
        expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(
            targets.shape
        )
        torch.testing.assert_close(per_token, expected)
        torch.testing.assert_close(model(ids, targets), expected.sum() / (targets != IGNORE_INDEX).sum())
        torch.testing.assert_close(model(ids, last_only=True), logits[:, -1:])


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths left-padded with id 0: ids (B, T) and attention mask (B, T)."""
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :], mask[i, T - len(r) :] = r, 1
    return ids, mask


def test_prompt_tuning_left_padded_rows_equal_each_row_alone():
    model, _ = prompt_tuned()
    rows = [ids_for(model, 1, 9, seed=1)[0], ids_for(model, 1, 4, seed=2)[0]]
    ids, mask = left_padded(rows)
    # With the virtual tokens' ones prepended, positions restart after the padding: 0..n-1, then n, n+1, ...
    full = torch.cat([torch.ones(2, N_VIRTUAL, dtype=torch.long), mask], 1)
    torch.testing.assert_close(
        positions_from_mask(full, 0, full.shape[1])[1, -4:], torch.arange(4) + N_VIRTUAL
    )
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            torch.testing.assert_close(batch[i, -len(r) :], model(r[None])[0], atol=1e-5, rtol=1e-5)


def test_prompt_tuning_decodes_with_a_kv_cache():
    """Prefill, then one token at a time (as the engine does, left-padded), against full forwards."""
    model, _ = prompt_tuned()
    rows = [ids_for(model, 1, 10, seed=3)[0], ids_for(model, 1, 6, seed=4)[0]]
    ids, mask = left_padded(rows)
    prefill, T = 4, ids.shape[1]
    cache = KVCache(model.config, 2, model.extra_positions + T, "cpu", torch.float32)
    with torch.no_grad():
        step = model(ids[:, :prefill], attention_mask=mask[:, :prefill], cache=cache, last_only=True)
        for t in range(prefill, T + 1):
            full = model(ids[:, :t], attention_mask=mask[:, :t], last_only=True)
            torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
            if t < T:  # one new token: its logits (B, 1, V), no virtual positions to drop
                step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
    assert cache.length == cache.max_len


def test_prompt_tuning_init_from_text_repeats_its_tokens():
    class Tok:  # the one method apply_prompt_tuning uses of lmforge's Tokenizer
        def encode(self, text: str) -> list[int]:
            return [5, 6, 7]

    base = random_model("tiny-llama")
    model = apply_prompt_tuning(base, PromptSection(num_virtual_tokens=7, init_text="abc"), Tok())
    expected = base.model.embed_tokens.weight[[5, 6, 7, 5, 6, 7, 5]]
    assert torch.equal(model.prompt_embeddings.weight, expected)
    with pytest.raises(LmforgeError, match="tokenizer"):
        apply_prompt_tuning(random_model("tiny-llama"), PromptSection(init_text="abc"))


# -------------------------------------------------------------------------------------- against PEFT


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    pytest.importorskip("peft")
    return save_random_hf_decoder("LlamaConfig", HF_SMALL, tmp_path_factory.mktemp("hf"))


def hf_model(path):
    """The transformers model of a HF directory, eager attention, eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def test_prompt_tuning_matches_peft_both_ways(hf_dir, tmp_path):
    import peft

    ids = ids_for(load_model(hf_dir), 2, 7)
    mask = torch.ones_like(ids)
    # lmforge → PEFT: save_prompt, then peft.PeftModel.from_pretrained.
    cfg = PromptSection(num_virtual_tokens=N_VIRTUAL)
    ours = apply_prompt_tuning(load_model(hf_dir), cfg)
    save_prompt(ours, tmp_path / "ours", cfg, str(hf_dir))
    theirs = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits[:, N_VIRTUAL:]
        torch.testing.assert_close(ours(ids, attention_mask=mask), expected, atol=1e-4, rtol=1e-4)
    # PEFT → lmforge: get_peft_model, save_pretrained, then load_prompt.
    peft_cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL)
    theirs = peft.get_peft_model(hf_model(hf_dir), peft_cfg).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = load_prompt(load_model(hf_dir), tmp_path / "theirs")
    assert loaded.extra_positions == N_VIRTUAL and parameter_counts(loaded)[0] == N_VIRTUAL * 64
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits[:, N_VIRTUAL:]
        torch.testing.assert_close(loaded(ids), expected, atol=1e-4, rtol=1e-4)


def test_prompt_tuning_random_init_is_peft_sample_vocab(hf_dir):
    import peft

    peft_cfg = peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="SAMPLE_VOCAB"
    )
    hf = hf_model(hf_dir)
    torch.manual_seed(7)
    theirs = peft.get_peft_model(hf, peft_cfg).prompt_encoder["default"].embedding.weight
    torch.manual_seed(7)
    ours = apply_prompt_tuning(load_model(hf_dir), PromptSection(num_virtual_tokens=N_VIRTUAL))
    torch.testing.assert_close(ours.prompt_embeddings.weight, theirs, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------ bad input


def test_prompt_tuning_refuses_encoders_packing_and_other_widths(tmp_path):
    with pytest.raises(LmforgeError, match=r"prompt tuning needs a decoder \(CausalLM\); BertModel"):
        apply_prompt_tuning(random_model("tiny-bert"), PromptSection())
    model, _ = prompt_tuned()
    ids = ids_for(model)
    with pytest.raises(LmforgeError, match="packed rows"):
        model(ids, ids, segment_ids=torch.zeros_like(ids))
    save_prompt(model, tmp_path / "p", PromptSection(num_virtual_tokens=N_VIRTUAL), "base")
    narrow = random_model("tiny-llama", hidden_size=32, intermediate_size=64)
    with pytest.raises(LmforgeError, match="token_dim is 64, but the model's hidden_size is 32"):
        load_prompt(narrow, tmp_path / "p")
    assert type(narrow) is CausalLM  # a refused load leaves the model as it was
    with pytest.raises(LmforgeError, match="already prompt-tuned"):
        apply_prompt_tuning(model, PromptSection())
    with pytest.raises(LmforgeError, match="not prompt-tuned"):
        save_prompt(narrow, tmp_path / "q", PromptSection(), "base")
    with pytest.raises(LmforgeError, match="not a bottleneck adapter"):
        load_bottleneck(narrow, tmp_path / "p")
    cfg = BottleneckSection(size=SIZE)
    save_bottleneck(apply_bottleneck(random_model("tiny-llama"), cfg), tmp_path / "b", cfg, "base")
    with pytest.raises(LmforgeError, match="not a prompt-tuning adapter"):
        load_prompt(random_model("tiny-llama"), tmp_path / "b")


# ------------------------------------------------------------------------------------------- registry


def test_registry_lists_every_adapter_method_of_the_config():
    """One kind per adapter method of FinetuneConfig, each named by its section's attribute there."""
    methods = get_args(FinetuneConfig.model_fields["method"].annotation)
    assert sorted(ADAPTER_KINDS) == sorted(set(methods) - {"full"}) == ["adapter", "lora", "prompt"]
    for method, kind in ADAPTER_KINDS.items():
        assert kind.method == method
        assert FinetuneConfig.model_fields[kind.config_key].annotation is kind.section
        assert isinstance(kind.section_of(FinetuneConfig(method=method)), kind.section)
    saved = {m: (k.saved_field, k.saved_value) for m, k in ADAPTER_KINDS.items()}
    assert saved == {"lora": ("peft_type", "LORA"), "adapter": ("lmforge_adapter", "bottleneck"),
                     "prompt": ("peft_type", "PROMPT_TUNING")}  # fmt: skip


@pytest.mark.parametrize("method", sorted(ADAPTER_KINDS))
def test_every_adapter_kind_round_trips_through_the_registry(method, tmp_path):
    """apply → save_adapter → load_adapter on a fresh base gives the same keys and exactly the same logits."""
    kind = ADAPTER_KINDS[method]
    base = random_model("tiny-llama")
    fresh, ids = copy.deepcopy(base), ids_for(base)
    torch.manual_seed(0)
    model = kind.apply(base, kind.section())
    randomize_adapters_(model)
    save_adapter(model, method, kind.section(), tmp_path / "a", tmp_path / "base")
    assert adapter_kind(tmp_path / "a") == method
    loaded = load_adapter(fresh, tmp_path / "a")
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert parameter_counts(loaded) == parameter_counts(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        assert not torch.allclose(loaded(ids), random_model("tiny-llama")(ids), atol=1e-3)


def test_save_adapter_refuses_full_and_a_foreign_section(tmp_path):
    model = apply_bottleneck(random_model("tiny-llama"), BottleneckSection(size=SIZE))
    with pytest.raises(LmforgeError, match="method 'full' saves no adapter"):
        save_adapter(model, "full", BottleneckSection(), tmp_path / "a", tmp_path)
    with pytest.raises(TypeError, match="method 'adapter' takes a BottleneckSection, got PromptSection"):
        save_adapter(model, "adapter", PromptSection(), tmp_path / "a", tmp_path)


def test_adapter_modules_import_no_stage():
    """The transforms sit below the stages (whose configs embed the adapters' sections): no adapters module
    imports lmforge.stages, and the registry loads without torch (the transforms are imported on use)."""
    import lmforge.adapters

    root = Path(lmforge.adapters.__file__).parent
    for file in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[:2] == ["lmforge", "stages"] for m in modules), (
                f"{file.name}:{node.lineno}"
            )
    names = ", ".join(f"lmforge.adapters.{f.stem}" for f in sorted(root.glob("*.py")) if f.stem != "__init__")
    code = (
        "import sys, lmforge.adapters.registry\n"
        "print('torch' in sys.modules)\n"
        f"import {names}\n"
        "print(sorted(m for m in sys.modules if m.startswith('lmforge.stages')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["False", "[]"]
