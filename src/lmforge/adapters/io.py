"""Adapter directories: save any kind, load any kind onto its base (PEFT's LoRA / prompt-tuning layouts, or
lmforge's bottleneck layout), and the base-model fingerprint that ties an adapter to the weights it trained on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.adapters.base import CONFIG_FILE, read_adapter_config
from lmforge.adapters.registry import ADAPTER_KINDS
from lmforge.config import Section
from lmforge.errors import LmforgeError
from lmforge.model.hf import load_model, weights_fingerprint


def base_fingerprint(model_dir: Path) -> str:
    """sha256 over a model directory's config.json and weight files: which base an adapter belongs on."""
    return weights_fingerprint(model_dir)


def adapter_kind(adapter_dir: Path) -> str:
    """The method name of a directory's adapter: "lora", "adapter" (bottleneck) or "prompt" (ADAPTER_KINDS keys)."""
    config = read_adapter_config(adapter_dir)
    for kind in ADAPTER_KINDS.values():
        if kind.matches(config):
            return kind.method
    known = ", ".join(f"{k.saved_field} {k.saved_value!r}" for k in ADAPTER_KINDS.values())
    raise LmforgeError(
        f"{Path(adapter_dir) / CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not supported; expected "
        f"one of: {known}"
    )


def save_adapter(model: nn.Module, method: str, section: Section, out_dir: Path, base_dir: Path) -> Path:
    """Write the adapter of `model`, adapted by `method` (an ADAPTER_KINDS key) with `section`, to `out_dir`;
    its `base_model_name_or_path` is `base_dir`."""
    if method not in ADAPTER_KINDS:
        raise LmforgeError(f"method {method!r} saves no adapter; adapter methods: {', '.join(ADAPTER_KINDS)}")
    return ADAPTER_KINDS[method].save(model, section, out_dir, str(Path(base_dir).resolve()))


def load_adapter(model: nn.Module, adapter_dir: Path, base_dir: Path | None = None) -> nn.Module:
    """`model` with the adapter of `adapter_dir` applied; with `base_dir`, refuse an adapter trained on other weights."""
    adapter_dir = Path(adapter_dir)
    kind = adapter_kind(adapter_dir)
    if base_dir is not None:
        check_base(adapter_dir, base_dir)
    return ADAPTER_KINDS[kind].load(model, adapter_dir)


def check_base(adapter_dir: Path, base_dir: Path) -> None:
    """Refuse an adapter whose lineage says it was trained on other weights than `base_dir`'s."""
    lineage_file = Path(adapter_dir) / "lmforge.json"
    if not lineage_file.is_file():
        return
    lineage = json.loads(lineage_file.read_text())
    expected, found = lineage.get("base_fingerprint"), base_fingerprint(base_dir)
    if expected and expected != found:
        raise LmforgeError(
            f"{adapter_dir} was trained on {lineage.get('parent')} (weights fingerprint {expected[:12]}); {base_dir} "
            f"has other weights (fingerprint {found[:12]}): load it on its own base"
        )


def load_with_adapter(
    base_dir: Path, adapter_dir: Path | None, *, device: str = "cpu", dtype: Any = None
) -> nn.Module:
    """The base model of `base_dir`, with `adapter_dir`'s adapter on top when given, on `device`, in eval mode."""
    model = load_model(base_dir, device=device, dtype=dtype)
    if adapter_dir is not None:
        model = load_adapter(model, Path(adapter_dir), Path(base_dir))
        model = model.to(device=device, dtype=next(model.parameters()).dtype)  # new adapter weights too
    return model.eval()
