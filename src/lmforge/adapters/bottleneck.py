"""Houlsby bottleneck adapters: y + up(act(down(y))) on each block's attention and MLP outputs, before the
residual add, attached from outside through forward hooks so the base keeps its modules and state-dict keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch import Tensor, nn

from lmforge.adapters.base import (
    CONFIG_FILE,
    AdapterLayer,
    adapter_layers,
    adapter_parameter_names,
    load_adapter_tensors,
    read_adapter_config,
    train_only_adapters,
    write_adapter_dir,
)
from lmforge.adapters.sections import BottleneckSection
from lmforge.errors import LmforgeError
from lmforge.model.decoder import Block
from lmforge.model.encoder import Layer
from lmforge.model.linear import Linear

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(AdapterLayer, nn.Module):
    """y → y + up(act(down(y))) on (..., C); `up` starts at zero, so an adapted model starts as its base."""

    adapter_names = ("down", "up")

    def __init__(self, dim: int, size: int, activation: str) -> None:
        super().__init__()
        # down keeps nn.Linear's kaiming-uniform init (as LoRA's A): with up = 0, up still gets a gradient.
        self.down = Linear(dim, size)
        self.act = ACTIVATIONS[activation]()
        self.up = Linear(size, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: Tensor) -> Tensor:
        if not self.adapter_active:
            return y
        return y + self.up(self.act(self.down(y)))  # (..., C)


def _adapt_output(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    # A module-level function (not a closure), so a deep-copied model's hooks call its own adapters.
    return module.adapter(output)


def houlsby_sites(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs Houlsby adapts, in order: each block's attention and MLP output projections."""
    sites: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, Block):  # pre-norm decoder: x + self_attn(...), then x + mlp(...)
            sites += [m.self_attn, m.mlp]
        elif isinstance(m, Layer):  # post-LN BERT: LayerNorm(dropout(dense(h)) + x) in each AddNorm
            sites += [m.attention.output.dense, m.output.dense]
    if not sites:
        raise LmforgeError(
            f"bottleneck adapters need a decoder or BERT model; {type(model).__name__} has no transformer blocks"
        )
    return sites


def apply_bottleneck(model: nn.Module, cfg: BottleneckSection) -> nn.Module:
    """Add a Bottleneck after every block's attention and MLP output (child `adapter` of that module, applied
    by a forward hook) and freeze everything else; returns `model`, changed in place."""
    sites = houlsby_sites(model)
    if any(hasattr(site, "adapter") for site in sites):
        raise LmforgeError("this model already has bottleneck adapters")
    dim = model.config.hidden_size
    for site in sites:
        ref = next(site.parameters())
        site.adapter = Bottleneck(dim, cfg.size, cfg.activation).to(device=ref.device, dtype=ref.dtype)
        site.register_forward_hook(_adapt_output)
    train_only_adapters(model)
    return model


def bottleneck_state(model: nn.Module) -> dict[str, Tensor]:
    """{qualified name: parameter} of the model's bottleneck adapters (what an adapter directory stores)."""
    prefixes = tuple(f"{name}." for name, m in adapter_layers(model) if isinstance(m, Bottleneck))
    if not prefixes:
        raise LmforgeError("the model has no bottleneck adapters (apply_bottleneck adds them)")
    params = dict(model.named_parameters())
    return {name: params[name] for name in adapter_parameter_names(model) if name.startswith(prefixes)}


def save_bottleneck(model: nn.Module, out_dir: Path, cfg: BottleneckSection, base_model: str) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (each atomically) to `out_dir`."""
    out_dir = Path(out_dir)
    state = {k: v.detach().contiguous() for k, v in bottleneck_state(model).items()}
    sizes = {v.shape[0] for k, v in state.items() if k.endswith(".down.weight")}
    if sizes != {cfg.size}:
        raise LmforgeError(f"the model's bottleneck size is {sorted(sizes)}, but the config says {cfg.size}")
    config = {
        "lmforge_adapter": "bottleneck",
        "size": cfg.size,
        "activation": cfg.activation,
        "base_model_name_or_path": base_model,
    }
    return write_adapter_dir(out_dir, state, config)


def load_bottleneck(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Apply the bottleneck adapters saved in `adapter_dir` to `model` and load their weights."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    file = adapter_dir / CONFIG_FILE
    if config.get("lmforge_adapter") != "bottleneck":
        kind = config.get("lmforge_adapter") or config.get("peft_type") or "unknown"
        raise LmforgeError(f"{file}: not a bottleneck adapter (its kind is {kind!r})")
    try:
        cfg = BottleneckSection(size=config.get("size"), activation=config.get("activation"))
    except ValidationError as e:
        raise LmforgeError(f"{file}: invalid bottleneck config: {e}".replace("\n", " ")) from None
    apply_bottleneck(model, cfg)
    load_adapter_tensors(bottleneck_state(model), adapter_dir)
    return model
