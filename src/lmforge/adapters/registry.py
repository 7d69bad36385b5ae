"""Every adapter kind in one table, keyed by the method name configs use: its config section, how its
directory's `adapter_config.json` names it, and its apply / save / load transforms (imported on first use, so
importing this module imports no torch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from lmforge.adapters.sections import BottleneckSection, LoraSection, PromptSection
from lmforge.config import Section

if TYPE_CHECKING:
    from torch import nn

    from lmforge.tokenizer import Tokenizer


class Transforms(NamedTuple):
    """An adapter kind's functions: apply(model, section, tokenizer), save(model, out_dir, section, base_model),
    load(model, adapter_dir); each returns the adapted model (save: the directory)."""

    apply: Callable[[nn.Module, Any, Tokenizer | None], nn.Module]
    save: Callable[[nn.Module, Path, Any, str], Path]
    load: Callable[[nn.Module, Path], nn.Module]


@dataclass(frozen=True)
class AdapterKind:
    """One adapter kind: its config section and where a stage config holds it, the `adapter_config.json` field
    and value that name it, and its transforms."""

    method: str
    """The method name in configs (`finetune.method`) and the key of ADAPTER_KINDS."""
    section: type[Section]
    """Its settings."""
    config_key: str
    """The stage config's attribute holding a `section` (FinetuneConfig.lora, .adapter, .prompt)."""
    saved_field: str
    """The `adapter_config.json` field naming the kind: PEFT's `peft_type`, or `lmforge_adapter` for kinds
    PEFT lacks."""
    saved_value: str
    """That field's value for this kind (LORA, PROMPT_TUNING, bottleneck)."""
    transforms: Callable[[], Transforms]
    """Imports and returns the kind's functions."""

    def section_of(self, config: Any) -> Section:
        """This kind's section of a stage config (e.g. a FinetuneConfig's `lora`)."""
        return getattr(config, self.config_key)

    def matches(self, adapter_config: dict[str, Any]) -> bool:
        """Whether an adapter directory's `adapter_config.json` (as a dict) holds this kind."""
        return adapter_config.get(self.saved_field) == self.saved_value

    def apply(self, model: nn.Module, section: Section, tokenizer: Tokenizer | None = None) -> nn.Module:
        """`model` with a fresh adapter of this kind, everything else frozen (the tokenizer: prompt tuning's
        text init)."""
        return self.transforms().apply(model, self._checked(section), tokenizer)

    def save(self, model: nn.Module, section: Section, out_dir: Path, base_model: str) -> Path:
        """Write the adapter of `model` (adapted with `section`) as an adapter directory `out_dir`."""
        return self.transforms().save(model, Path(out_dir), self._checked(section), base_model)

    def load(self, model: nn.Module, adapter_dir: Path) -> nn.Module:
        """`model` with the adapter saved in `adapter_dir` applied and loaded."""
        return self.transforms().load(model, Path(adapter_dir))

    def _checked(self, section: Section) -> Section:
        if not isinstance(section, self.section):
            raise TypeError(
                f"method {self.method!r} takes a {self.section.__name__}, got {type(section).__name__}"
            )
        return section


def _lora() -> Transforms:
    from lmforge.adapters.lora import apply_lora, load_lora, save_lora

    return Transforms(lambda model, cfg, tokenizer: apply_lora(model, cfg), save_lora, load_lora)


def _bottleneck() -> Transforms:
    from lmforge.adapters.bottleneck import apply_bottleneck, load_bottleneck, save_bottleneck

    return Transforms(
        lambda model, cfg, tokenizer: apply_bottleneck(model, cfg), save_bottleneck, load_bottleneck
    )


def _prompt() -> Transforms:
    from lmforge.adapters.prompt import apply_prompt_tuning, load_prompt, save_prompt

    return Transforms(apply_prompt_tuning, save_prompt, load_prompt)


ADAPTER_KINDS: dict[str, AdapterKind] = {
    kind.method: kind
    for kind in [
        AdapterKind("lora", LoraSection, "lora", "peft_type", "LORA", _lora),
        AdapterKind("adapter", BottleneckSection, "adapter", "lmforge_adapter", "bottleneck", _bottleneck),
        AdapterKind("prompt", PromptSection, "prompt", "peft_type", "PROMPT_TUNING", _prompt),
    ]
}
"""The adapter kinds by method name: lora (LoRA, DoRA, rsLoRA), adapter (Houlsby bottleneck), prompt (prompt
tuning)."""
