"""What every adapter kind shares: the `AdapterLayer` marker, switching adapters off, freezing the base, counts,
and the adapter directory (`adapter_config.json` + `adapter_model.safetensors`, PEFT's layout)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write, replace_atomically, staging_dir
from lmforge.model.hf import open_safetensors

CONFIG_FILE = "adapter_config.json"  # PEFT's names, for every kind
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterLayer:
    """Mixin of every module that adds an adapter's computation; `adapter_active = False` gives the base's output.

    Subclasses name their trainable parameters with `adapter_names` (attribute names of submodules or
    parameters on the module), so a model's adapter parameters are found without knowing the kind.
    """

    adapter_active: bool = True
    adapter_names: tuple[str, ...] = ()


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (qualified name, module) of `model` that is an AdapterLayer."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, AdapterLayer)]


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block `model` computes what its base model computes (the frozen reference of alignment)."""
    layers = [m for _, m in adapter_layers(model)]
    before = [m.adapter_active for m in layers]
    for m in layers:
        m.adapter_active = False
    try:
        yield model
    finally:
        for m, active in zip(layers, before, strict=True):
            m.adapter_active = active


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of the adapter parameters of `model` (what an adapter directory stores)."""
    names = []
    for prefix, layer in adapter_layers(model):
        for attr in layer.adapter_names:
            part = getattr(layer, attr)
            if isinstance(part, nn.Module):
                names += [f"{prefix}.{attr}.{n}".lstrip(".") for n, _ in part.named_parameters()]
            elif part is not None:
                names.append(f"{prefix}.{attr}".lstrip("."))
    return names


def train_only_adapters(model: nn.Module) -> None:
    """Freeze every parameter but the adapters' (the base receives no gradient and no optimizer state)."""
    wanted = set(adapter_parameter_names(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each tensor counted once (tied weights are one tensor)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ------------------------------------------------------------------------------------ adapter directories


def write_adapter_dir(out_dir: Path, state: dict[str, Tensor], config: dict[str, Any]) -> Path:
    """Write `state` and `config` as an adapter directory, replacing `out_dir` as a whole once both are complete."""
    state = {k: v.detach().contiguous() for k, v in state.items()}
    with staging_dir(out_dir) as tmp:
        replace_atomically(tmp / WEIGHTS_FILE, lambda path: save_file(state, path, {"format": "pt"}))
        atomic_write(tmp / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def weights_file(adapter_dir: Path) -> Path:
    """The adapter's safetensors file (an error that says how to convert when only a pickle `.bin` is there)."""
    file = Path(adapter_dir) / WEIGHTS_FILE
    if not file.is_file():
        bin_only = (Path(adapter_dir) / "adapter_model.bin").exists()
        hint = " (only adapter_model.bin: convert it to safetensors)" if bin_only else ""
        raise LmforgeError(f"{adapter_dir}: {WEIGHTS_FILE} not found{hint}")
    return file


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The `adapter_config.json` of an adapter directory (lmforge's or PEFT's), as a dict."""
    file = Path(adapter_dir) / CONFIG_FILE
    if not file.is_file():
        raise LmforgeError(f"{adapter_dir}: not an adapter directory ({CONFIG_FILE} not found)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None


@torch.no_grad()
def load_adapter_tensors(params: dict[str, Tensor], adapter_dir: Path) -> None:
    """Copy each tensor of `adapter_dir`'s weights file into `params` {name: parameter}: every name must be
    there with the parameter's shape, and the file may hold nothing else."""
    file = weights_file(adapter_dir)
    with open_safetensors(file) as f:
        stored = set(f.keys())
        for name, p in params.items():
            if name not in stored:
                raise LmforgeError(
                    f"{file}: tensor {name!r} (shape {tuple(p.shape)} in this model) is missing"
                )
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(p.shape):
                raise LmforgeError(
                    f"{file}: tensor {name!r} has shape {shape}, but this model's adapter needs {tuple(p.shape)}"
                )
        extra = sorted(stored - set(params))
        if extra:
            raise LmforgeError(
                f"{file}: {len(extra)} tensor(s) this model has no adapter for: {', '.join(extra[:5])}"
                f"{', ...' if len(extra) > 5 else ''}"
            )
        for name, p in params.items():
            p.copy_(f.get_tensor(name))
