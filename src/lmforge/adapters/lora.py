"""LoRA (with rsLoRA and DoRA) on lmforge's Linear layers, exact merging, and PEFT-format adapter directories.

A `LoraLinear` keeps the adapted layer's own `weight` and `bias` (the same tensors under the same state-dict
keys) and adds PEFT's parts under PEFT's names, so the tensors of an adapter directory are named
`base_model.model.` + the model's parameter names: `<layer>.lora_A.weight` (r, in), `<layer>.lora_B.weight`
(out, r) and, with DoRA, `<layer>.lora_magnitude_vector` (out,).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.adapters.base import (
    CONFIG_FILE,
    AdapterLayer,
    adapter_layers,
    adapter_parameter_names,
    read_adapter_config,
    train_only_adapters,
    weights_file,
    write_adapter_dir,
)
from lmforge.adapters.sections import LoraSection
from lmforge.errors import LmforgeError
from lmforge.model.hf import open_safetensors
from lmforge.model.linear import Linear

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the HF model)
TASK_TYPES = {
    "CausalLM": "CAUSAL_LM",
    "BertModel": "FEATURE_EXTRACTION",
    "BertForSequenceClassification": "SEQ_CLS",
}
# PEFT options that change which layers are adapted or what they compute; lmforge loads only their off value
# (null, false, {} or []).
UNSUPPORTED_OPTIONS = (
    "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "modules_to_save",
    "exclude_modules", "target_parameters", "trainable_token_indices", "layer_replication", "lora_bias",
    "fan_in_fan_out", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config", "kasa_config",
    "monteclora_config",
)  # fmt: skip


class LoraLinear(Linear, AdapterLayer):
    """W x + b + s B A dropout(x) with s = alpha / r (alpha / sqrt(r) with rsLoRA); with DoRA, PEFT's
    m / ||W + s B A||_row rescaling of each output row. `weight`, `bias`: the base layer's Parameters."""

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        rslora: bool = False,
        dora: bool = False,
    ) -> None:
        # Built on meta, then given the base's Parameters: the base weight is shared, never copied.
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # (out, in), (out,) or None
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        # nn.Linear's default init is PEFT's for A: kaiming_uniform_(a=sqrt(5)).
        self.lora_A = Linear(self.in_features, r, bias=False, **like)  # (r, in)
        self.lora_B = Linear(r, self.out_features, bias=False, **like)  # (out, r)
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapted layer starts as the base layer
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r = r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        if dora:  # m starts at the row norms of W + s B A (= W), so the layer starts as the base layer
            norms = self._updated_weight().norm(dim=1)  # (out,)
            self.lora_magnitude_vector = nn.Parameter(norms.to(self.weight.dtype))
        else:
            self.register_parameter("lora_magnitude_vector", None)
        self.adapter_names = ("lora_A", "lora_B", "lora_magnitude_vector") if dora else ("lora_A", "lora_B")
        self.train(base.training)

    @property
    def dora(self) -> bool:
        """Whether this layer learns DoRA's per-row magnitude."""
        return self.lora_magnitude_vector is not None

    def forward(self, x: Tensor) -> Tensor:
        result = super().forward(x)  # W x + b through Linear's path (fast bf16 on CPUs)  (..., out)
        if not self.adapter_active:
            return result
        h = self.lora_dropout(x)
        lora = self.lora_B(self.lora_A(h))  # (..., out)
        if not self.dora:
            return result + lora * self.scaling
        # PEFT's DoRA: m / ||W + s B A||_row rescales the updated weight's rows; the norm is a constant for
        # the gradient (DoRA paper, section 4.3). Under dropout the base part sees the dropped input too.
        scale = self.lora_magnitude_vector / self._updated_weight().norm(dim=1)  # (out,)
        dropped = self.training and not isinstance(self.lora_dropout, nn.Identity)
        base = super().forward(h) if dropped else result  # W h + b  (..., out)
        if self.bias is not None:
            base = base - self.bias
        return (result + ((scale - 1) * base + scale * lora * self.scaling)).to(result.dtype)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The weight (out, in) of a plain Linear computing what this layer computes (fp32)."""
        w = self._updated_weight()
        if self.dora:
            w = w * (self.lora_magnitude_vector.float() / w.norm(dim=1))[:, None]
        return w

    @torch.no_grad()
    def _updated_weight(self) -> Tensor:
        """W + s B A in fp32 (out, in), without gradient (DoRA's norm is a constant)."""
        return self.weight.float() + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, dora={self.dora}"


# ----------------------------------------------------------------------------------------- apply, merge


def apply_lora(model: nn.Module, cfg: LoraSection) -> nn.Module:
    """Replace every Linear whose qualified name ends with a match of a `cfg.target_modules` regex by a
    LoraLinear (`lm_head` only when a pattern names it), in place, and freeze all but the adapters."""
    patterns = []
    for p in cfg.target_modules:
        try:
            patterns.append((p, re.compile(rf"(^|\.)(?:{p})$")))
        except re.error as e:
            raise LmforgeError(
                f"LoRA target_modules pattern {p!r} is not a valid regular expression: {e}"
            ) from None
    linears = _linear_layers(model)
    targets = []
    for name, _ in linears:
        hits = [p for p, rx in patterns if rx.search(name)]
        if hits and (name.rsplit(".", 1)[-1] != "lm_head" or any("lm_head" in p for p in hits)):
            targets.append(name)
    if not targets:
        raise LmforgeError(
            f"LoRA target_modules {cfg.target_modules} match no Linear layer of this {type(model).__name__} "
            "(each is a regular expression matched against the end of a layer's qualified name; lm_head only "
            f"when a pattern names it); its Linear layers: {', '.join(_suffixes(n for n, _ in linears))}"
        )
    _inject(model, targets, cfg.r, cfg.alpha, cfg.dropout, rslora=cfg.rslora, dora=cfg.dora)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoraLinear into a plain Linear (W' = W + s B A; DoRA: rows rescaled to m), in place."""
    layers = lora_layers(model)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, layer in layers:  # check all before changing any: a refused merge leaves the model as it was
        tied = [n for n in owners[id(layer.weight)] if n != f"{name}.weight"]
        if tied:
            raise LmforgeError(
                f"cannot merge LoRA into {name}: its weight is tied to {', '.join(tied)}, which merging "
                "would change too; adapt untied layers only (e.g. not lm_head with tie_word_embeddings)"
            )
    for name, layer in layers:
        with torch.no_grad():
            layer.weight.copy_(layer.merged_weight())
        plain = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        plain.train(layer.training)
        model.set_submodule(name, plain)
    return model


@contextmanager
def lora_merged(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block each active, untied LoraLinear computes with W + s B A folded into its weight and its
    adapter branch off: one matmul per layer, as fast as the base (RL's sampling). The exact weights come back
    after (a copy of them is held meanwhile)."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    layers = [m for _, m in lora_layers(model) if m.adapter_active and owners[id(m.weight)] == 1]
    saved = []
    with torch.no_grad():
        for m in layers:
            saved.append(m.weight.detach().clone())
            m.weight.copy_(m.merged_weight().to(m.weight.dtype))
            m.adapter_active = False
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, weight in zip(layers, saved, strict=True):
                m.weight.copy_(weight)
                m.adapter_active = True


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """Every (qualified name, LoraLinear) of `model`."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


def _inject(
    model: nn.Module, names: list[str], r: int, alpha: float, dropout: float, *, rslora: bool, dora: bool
) -> None:
    """Swap each named Linear for a LoraLinear sharing its Parameters, then freeze all but the adapters."""
    for name in names:  # all checked before any is swapped
        if isinstance(model.get_submodule(name), AdapterLayer):
            raise LmforgeError(
                f"{name} already has an adapter; merge_lora first or start from the base model"
            )
    for name in names:
        layer = LoraLinear(model.get_submodule(name), r, alpha, dropout, rslora=rslora, dora=dora)
        model.set_submodule(name, layer)
    train_only_adapters(model)


def _linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The model's Linear layers by qualified name, not counting the parts inside adapter layers."""
    inside = tuple(f"{name}." for name, _ in adapter_layers(model))
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not (inside and name.startswith(inside))
    ]


def _suffixes(names: Iterable[str]) -> list[str]:
    """Distinct names after their last layer index: `model.layers.3.self_attn.q_proj` → `self_attn.q_proj`."""
    out: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        last_index = max((i for i, part in enumerate(parts) if part.isdigit()), default=-1)
        out[".".join(parts[last_index + 1 :])] = None
    return list(out)


# --------------------------------------------------------------------------------------- PEFT directories


def lora_config_dict(model: nn.Module, cfg: LoraSection, base_model: str) -> dict[str, Any]:
    """The `adapter_config.json` PEFT writes for this model's LoRA layers."""
    layers = lora_layers(model)
    if not layers:
        raise LmforgeError("the model has no LoRA layers to save (apply_lora first)")
    scaling = cfg.alpha / math.sqrt(cfg.r) if cfg.rslora else cfg.alpha / cfg.r
    for name, layer in layers:
        if layer.r != cfg.r or layer.dora != cfg.dora or not math.isclose(layer.scaling, scaling):
            raise LmforgeError(
                f"{name} has LoRA r={layer.r}, scaling={layer.scaling:g}, dora={layer.dora}, but the LoRA "
                f"config says r={cfg.r}, scaling={scaling:g}, dora={cfg.dora}; save with the config the "
                "model was adapted with"
            )
    return {
        "peft_type": "LORA",
        "task_type": TASK_TYPES.get(type(model).__name__),
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _peft_target_modules(model),
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_bias": False,
        "revision": None,
    }


def save_lora(model: nn.Module, out_dir: Path, cfg: LoraSection, base_model: str) -> Path:
    """Write the model's LoRA layers as a PEFT adapter directory (`adapter_config.json`,
    `adapter_model.safetensors`), replacing `out_dir` as a whole only once both files are complete."""
    config = lora_config_dict(model, cfg, base_model)
    inside = tuple(f"{name}." for name, _ in lora_layers(model))
    state = {
        PEFT_PREFIX + name: model.get_parameter(name).detach().contiguous()
        for name in adapter_parameter_names(model)
        if name.startswith(inside)
    }
    return write_adapter_dir(out_dir, state, config)


def load_lora(model: nn.Module, adapter_dir: Path) -> nn.Module:
    """Apply a PEFT LoRA adapter directory (`save_lora`'s or PEFT's `save_pretrained`'s) to `model`, in place.

    The file is checked against the layers it targets before the model changes: a missing or unexpected
    tensor, or one of another shape (an adapter for another base model), is an LmforgeError.
    """
    lora = read_lora(model, adapter_dir)
    _inject(model, lora.layers, lora.r, lora.alpha, lora.dropout, rslora=lora.rslora, dora=lora.dora)
    with torch.no_grad():
        for name, tensor in lora.tensors.items():
            model.get_parameter(name).copy_(tensor)
    return model


@dataclass
class LoraWeights:
    """A PEFT LoRA directory read against a model: the Linear layers it adapts, its options, and its tensors by
    the model's parameter names (`<layer>.lora_A.weight` (r, in), `<layer>.lora_B.weight` (out, r))."""

    layers: list[str]
    r: int
    alpha: float
    dropout: float
    rslora: bool
    dora: bool
    tensors: dict[str, Tensor]

    @property
    def scaling(self) -> float:
        """s of W x + s B A x."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


def read_lora(model: nn.Module, adapter_dir: Path) -> LoraWeights:
    """A PEFT LoRA adapter directory's options and tensors, checked against the layers of `model` it targets
    (a missing or unexpected tensor, or one of another shape, is an LmforgeError); `model` is not changed."""
    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / CONFIG_FILE
    config = read_adapter_config(adapter_dir)
    weights = weights_file(adapter_dir)
    target, r, alpha, dora = read_lora_options(config, config_file)

    inside = tuple(f"{name}." for name, _ in adapter_layers(model))
    names = []
    for name, m in model.named_modules():
        if not name or (inside and name.startswith(inside)) or not _peft_matches(target, name):
            continue
        if isinstance(m, nn.Linear):
            names.append(name)
        elif not list(m.children()):  # PEFT would adapt this leaf (an Embedding, a norm): lmforge cannot
            raise LmforgeError(
                f"{config_file}: target_modules select {name} ({type(m).__name__}); lmforge adapts Linear "
                "layers only"
            )
    if not names:
        raise LmforgeError(
            f"{config_file}: target_modules {target!r} select no layer of this {type(model).__name__} "
            "(an adapter for another model family?)"
        )

    # Expected tensors and shapes, from the layers' shapes.
    expected: dict[str, tuple[int, ...]] = {}
    for name in names:
        layer = model.get_submodule(name)
        expected[f"{name}.lora_A.weight"] = (r, layer.in_features)
        expected[f"{name}.lora_B.weight"] = (layer.out_features, r)
        if dora:
            expected[f"{name}.lora_magnitude_vector"] = (layer.out_features,)
    with open_safetensors(weights) as f:
        keys = list(f.keys())
        for key in keys:
            name = key.removeprefix(PEFT_PREFIX)
            if not key.startswith(PEFT_PREFIX) or name not in expected:
                raise LmforgeError(
                    f"{weights}: unexpected tensor {key!r}: adapter_config.json's target_modules and "
                    "options give it no place in this model (an adapter for another base model?)"
                )
            shape = tuple(f.get_slice(key).get_shape())
            if shape != expected[name]:
                raise LmforgeError(
                    f"{weights}: tensor {key!r} has shape {shape}, but this model needs "
                    f"{expected[name]} (an adapter for another base model?)"
                )
        missing = sorted(set(expected) - {k.removeprefix(PEFT_PREFIX) for k in keys})
        if missing:
            raise LmforgeError(
                f"{weights}: tensor {PEFT_PREFIX + missing[0]!r} is missing ({len(missing)} missing in all)"
            )
        tensors = {key.removeprefix(PEFT_PREFIX): f.get_tensor(key) for key in keys}
    dropout, rslora = config.get("lora_dropout") or 0.0, bool(config.get("use_rslora"))
    return LoraWeights(names, r, alpha, dropout, rslora, dora, tensors)


def read_lora_options(config: dict[str, Any], config_file: Path) -> tuple[str | list[str], int, float, bool]:
    """(target_modules, r, lora_alpha, use_dora) of a PEFT adapter config, refusing what lmforge lacks."""
    if config.get("peft_type") != "LORA":
        raise LmforgeError(
            f"{config_file}: peft_type {config.get('peft_type')!r} is not supported; expected 'LORA'"
        )
    if config.get("bias", "none") != "none":
        raise LmforgeError(
            f"{config_file}: bias={config['bias']!r} is not supported; lmforge loads bias='none'"
        )
    for option in UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise LmforgeError(
                f"{config_file}: {option}={config[option]!r} is not supported by lmforge's LoRA"
            )
    target = config.get("target_modules")
    if not target or not isinstance(target, (str, list)):
        raise LmforgeError(
            f"{config_file}: target_modules={target!r}; expected a regex string or a list of module names"
        )
    try:
        return target, int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_dora"))
    except KeyError as e:
        raise LmforgeError(f"{config_file}: required field {e.args[0]!r} is missing") from None


def _peft_matches(target: str | list[str], name: str) -> bool:
    """PEFT's module selection: a string is a regex matched against the whole name, a list holds names or
    dotted name suffixes."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return name in target or any(name.endswith(f".{t}") for t in target)


def _peft_target_modules(model: nn.Module) -> list[str]:
    """The shortest dotted suffixes of the LoRA layers' names that, as a PEFT target list, select exactly them
    (`output.dense` rather than `dense` in BERT, whose pooler.dense is not adapted)."""
    adapted = {name: None for name, _ in lora_layers(model)}
    inside = tuple(f"{name}." for name in adapted)
    others = [
        name
        for name, _ in model.named_modules()
        if name and name not in adapted and not name.startswith(inside)
    ]
    selects_other: dict[str, bool] = {}
    targets = set()
    for name in adapted:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if suffix not in selects_other:
                selects_other[suffix] = any(_peft_matches([suffix], other) for other in others)
            if not selects_other[suffix]:
                break
        targets.add(suffix)  # the full name at worst
    return sorted(targets)
