"""Adapter directories: save any kind, load any kind onto its base (PEFT's LoRA / prompt-tuning layouts, or
lmforge's bottleneck layout), and the base-model fingerprint that ties an adapter to the weights it trained on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.adapters.base import CONFIG_FILE, read_adapter_config
from lmforge.errors import LmforgeError
from lmforge.fileio import sha256_file
from lmforge.model.hf import load_model, weight_files


def base_fingerprint(model_dir: Path) -> str:
    """sha256 over a model directory's config.json and weight files: which base an adapter belongs on."""
    h = hashlib.sha256()
    for f in [Path(model_dir) / "config.json", *weight_files(Path(model_dir))]:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def adapter_kind(adapter_dir: Path) -> str:
    """ "lora", "prompt" or "adapter" (bottleneck), from the directory's adapter_config.json."""
    config = read_adapter_config(adapter_dir)
    kind = {"LORA": "lora", "PROMPT_TUNING": "prompt"}.get(config.get("peft_type") or "")
    if config.get("lmforge_adapter") == "bottleneck":
        kind = "adapter"
    if kind is None:
        raise LmforgeError(
            f"{Path(adapter_dir) / CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not supported; expected LORA or PROMPT_TUNING "
            "(or an lmforge bottleneck adapter)"
        )
    return kind


def save_adapter(model: nn.Module, cfg: Any, out_dir: Path, base_dir: Path) -> Path:
    """Write the adapter of a fine-tuned `model` (cfg: the FinetuneConfig) to `out_dir`."""
    base = str(Path(base_dir).resolve())
    if cfg.method == "lora":
        from lmforge.adapters.lora import save_lora

        return save_lora(model, out_dir, cfg.lora, base)
    if cfg.method == "adapter":
        from lmforge.adapters.bottleneck import save_bottleneck

        return save_bottleneck(model, out_dir, cfg.adapter, base)
    from lmforge.adapters.prompt import save_prompt

    return save_prompt(model, out_dir, cfg.prompt, base)


def load_adapter(model: nn.Module, adapter_dir: Path, base_dir: Path | None = None) -> nn.Module:
    """`model` with the adapter of `adapter_dir` applied; with `base_dir`, refuse an adapter trained on other weights."""
    adapter_dir = Path(adapter_dir)
    kind = adapter_kind(adapter_dir)
    lineage_file = adapter_dir / "lmforge.json"
    if base_dir is not None and lineage_file.is_file():
        expected = json.loads(lineage_file.read_text()).get("base_fingerprint")
        found = base_fingerprint(base_dir)
        if expected and expected != found:
            parent = json.loads(lineage_file.read_text()).get("parent")
            raise LmforgeError(
                f"{adapter_dir} was trained on {parent} (weights fingerprint {expected[:12]}); {base_dir} has other "
                f"weights (fingerprint {found[:12]}): load it on its own base"
            )
    if kind == "lora":
        from lmforge.adapters.lora import load_lora

        return load_lora(model, adapter_dir)
    if kind == "adapter":
        from lmforge.adapters.bottleneck import load_bottleneck

        return load_bottleneck(model, adapter_dir)
    from lmforge.adapters.prompt import load_prompt

    return load_prompt(model, adapter_dir)


def load_with_adapter(
    base_dir: Path, adapter_dir: Path | None, *, device: str = "cpu", dtype: Any = None
) -> nn.Module:
    """The base model of `base_dir`, with `adapter_dir`'s adapter on top when given, on `device`, in eval mode."""
    model = load_model(base_dir, device=device, dtype=dtype)
    if adapter_dir is not None:
        model = load_adapter(model, Path(adapter_dir), Path(base_dir))
        model = model.to(device=device, dtype=next(model.parameters()).dtype)  # new adapter weights too
    return model.eval()
