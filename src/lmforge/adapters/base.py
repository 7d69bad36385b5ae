"""What every adapter kind shares: the `AdapterLayer` marker, switching adapters off, freezing the base, counts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


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
