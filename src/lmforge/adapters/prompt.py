"""Prompt tuning (PEFT's PROMPT_TUNING for causal LMs): n learned vectors prepended to every input's embeddings.

No wrapper: `apply_prompt_tuning` switches a CausalLM's class in place to `PromptTunedCausalLM`, which adds the
`prompt_embeddings` (n, C) parameter, so every base parameter keeps its name and state-dict key (as LoRA's
layers keep theirs) and `extra_positions` is n.

Positions follow PEFT: the virtual tokens sit at positions 0..n-1 and the real tokens after them, as if the
prompt were n real tokens. With an attention mask the mask gets n ones on the left, so lmforge's positions
restart after left padding as usual (virtual tokens 0..n-1 in every row, then each row's real tokens).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lmforge.adapters.base import (
    CONFIG_FILE,
    AdapterLayer,
    load_adapter_tensors,
    read_adapter_config,
    train_only_adapters,
    write_adapter_dir,
)
from lmforge.adapters.sections import PromptSection
from lmforge.errors import LmforgeError
from lmforge.model.configs import DecoderConfig
from lmforge.model.decoder import IGNORE_INDEX, CausalLM, KVCache

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

PEFT_KEY = "prompt_embeddings"
"""The tensor name PEFT stores a prompt-tuning adapter under in `adapter_model.safetensors`, (n, C)."""


class PromptTunedCausalLM(CausalLM, AdapterLayer):
    """A CausalLM whose inputs start with n learned vectors `prompt_embeddings` (n, C); CausalLM's parameter
    names and forward contract. With `adapter_active = False` it is exactly its base CausalLM.

    Its KV cache holds the virtual tokens too: size it for `extra_positions` more positions than the tokens.
    """

    adapter_names = ("prompt_embeddings",)

    def __init__(self, config: DecoderConfig, num_virtual_tokens: int) -> None:
        super().__init__(config)
        self.prompt_embeddings = nn.Embedding(num_virtual_tokens, config.hidden_size)

    @property
    def extra_positions(self) -> int:
        """Positions the virtual tokens take in front of the real ones (in the sequence and the KV cache)."""
        return self.prompt_embeddings.num_embeddings if self.adapter_active else 0

    def forward(
        self,
        input_ids: Tensor,
        targets: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        reduction: str = "mean",
        segment_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        """CausalLM's outputs for the real tokens only: logits (B, T, V) ((B, 1, V) with `last_only`) or, given
        targets (B, T), the loss (per-token (B, T) with `reduction="none"`).

        `attention_mask` and `position_ids` cover the real tokens as for the base (the mask: all cached and new
        ones); the virtual tokens are prepended only when the cache is absent or empty, since later decode
        steps find them in the cache. Given position ids are shifted by n, behind the virtual tokens.
        """
        if not self.adapter_active:
            return super().forward(input_ids, targets, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, last_only=last_only, reduction=reduction, segment_ids=segment_ids,
                                   inputs_embeds=inputs_embeds)  # fmt: skip
        if segment_ids is not None:
            raise LmforgeError(
                "prompt tuning cannot train on packed rows (segment_ids): every sample needs the virtual tokens "
                "in front of it, so give one sample per row (turn packing off)"
            )
        B, n = input_ids.shape[0], self.extra_positions
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        prepend = cache is None or cache.empty
        if prepend:
            prompts = self.prompt_embeddings.weight.to(x.dtype).expand(B, n, -1)  # (B, n, C)
            x = torch.cat([prompts, x], dim=1)  # (B, n + T, C)
        if attention_mask is not None:  # (B, past + T) → (B, n + past + T): virtual tokens are never padding
            attention_mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], dim=1)
        if position_ids is not None:
            position_ids = position_ids + n
            if prepend:
                virtual = torch.arange(n, device=position_ids.device).expand(B, n)
                position_ids = torch.cat([virtual, position_ids], dim=1)  # (B, n + T)
        if targets is not None and prepend:
            targets = torch.cat([targets.new_full((B, n), IGNORE_INDEX), targets], dim=1)  # (B, n + T)
        # input_ids is unused by the base when inputs_embeds is given.
        out = super().forward(input_ids, targets, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache, last_only=last_only, reduction=reduction, inputs_embeds=x)  # fmt: skip
        # The virtual positions carry no loss, so "mean"/"sum" are already over the real tokens; the last
        # position (last_only) is always a real one.
        per_position = (targets is None and not last_only) or (targets is not None and reduction == "none")
        return out[:, n:] if prepend and per_position else out


def _check_plain_decoder(model: nn.Module) -> None:
    """Refuse what prompt tuning cannot switch in place: anything but a plain CausalLM."""
    if isinstance(model, PromptTunedCausalLM):
        raise LmforgeError("this model is already prompt-tuned")
    if not isinstance(model, CausalLM):
        raise LmforgeError(
            f"prompt tuning needs a decoder (CausalLM); {type(model).__name__} is an encoder or another model "
            "(bottleneck adapters or LoRA work on encoders)"
        )
    if type(model) is not CausalLM:  # e.g. sharded: switching its class would drop the subclass's behaviour
        raise LmforgeError(
            f"prompt tuning applies to a plain CausalLM, not a {type(model).__name__}: apply it before sharding"
        )


def _attach(model: CausalLM, embedding: nn.Embedding) -> PromptTunedCausalLM:
    """Switch `model`'s class to PromptTunedCausalLM in place with `embedding` (n, C) as its prompt, and freeze
    all but the prompt."""
    model.__class__ = PromptTunedCausalLM
    # fp32 whatever the base's dtype (as PEFT): the only trained tensor; cast to the embeddings' dtype in use.
    model.prompt_embeddings = embedding.to(model.model.embed_tokens.weight.device).train(model.training)
    train_only_adapters(model)
    return model


@torch.no_grad()
def apply_prompt_tuning(
    model: nn.Module, cfg: PromptSection, tokenizer: Tokenizer | None = None
) -> PromptTunedCausalLM:
    """Give a CausalLM `cfg.num_virtual_tokens` learned vectors, initialised from the embeddings of
    `cfg.init_text`'s tokens (repeated or cut to n) or of random vocabulary tokens (torch's RNG), and freeze
    all but them; returns `model`, its class switched in place."""
    _check_plain_decoder(model)
    n, embed = cfg.num_virtual_tokens, model.model.embed_tokens
    # Built on the CPU as PEFT builds it, so the RNG draws that follow are PEFT's for the same seed.
    embedding = nn.Embedding(n, model.config.hidden_size)
    if cfg.init_text is not None:
        if tokenizer is None:
            raise LmforgeError(
                "prompt.init_text needs the model's tokenizer to initialise the virtual tokens"
            )
        ids = tokenizer.encode(cfg.init_text)
        if not ids:
            raise LmforgeError(f"prompt.init_text {cfg.init_text!r} has no tokens")
        ids = (ids * math.ceil(n / len(ids)))[:n]  # PEFT's TEXT init: repeat to length, then cut
        init_ids = torch.tensor(ids, device=embed.weight.device)
    else:  # PEFT's SAMPLE_VOCAB init: embeddings of uniformly drawn ids (the same draw for the same seed)
        init_ids = torch.randint(0, embed.num_embeddings, (n,)).to(embed.weight.device)
    embedding.weight.copy_(embed(init_ids).float())
    return _attach(model, embedding)


def save_prompt(model: nn.Module, out_dir: Path, cfg: PromptSection, base_model: str) -> Path:
    """Write a PEFT PROMPT_TUNING adapter (`adapter_config.json`, `adapter_model.safetensors`) to `out_dir`;
    `peft.PeftModel.from_pretrained` loads it."""
    if not isinstance(model, PromptTunedCausalLM):
        raise LmforgeError("the model is not prompt-tuned (apply_prompt_tuning gives it a prompt)")
    n = model.prompt_embeddings.num_embeddings
    if n != cfg.num_virtual_tokens:
        raise LmforgeError(f"the model has {n} virtual tokens, but the config says {cfg.num_virtual_tokens}")
    state = {PEFT_KEY: model.prompt_embeddings.weight}  # (n, C)
    c = model.config
    text = cfg.init_text
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": c.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": c.num_attention_heads,
        "num_layers": c.num_hidden_layers,
        "prompt_tuning_init": "SAMPLE_VOCAB" if text is None else "TEXT",
        "prompt_tuning_init_text": text,
        # PEFT's config refuses TEXT without a tokenizer; the base model's directory holds it.
        "tokenizer_name_or_path": None if text is None else base_model,
        "tokenizer_kwargs": None,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "modules_to_save": None,
        "auto_mapping": None,
        "revision": None,
    }
    return write_adapter_dir(out_dir, state, config)


def load_prompt(model: nn.Module, adapter_dir: Path) -> PromptTunedCausalLM:
    """Give a CausalLM the prompt-tuning adapter in `adapter_dir` (written by `save_prompt` or by PEFT's
    `save_pretrained`); returns `model`, its class switched in place (only once the adapter has loaded)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    file = adapter_dir / CONFIG_FILE
    kind = config.get("peft_type") or config.get("lmforge_adapter")
    if kind != "PROMPT_TUNING":
        raise LmforgeError(
            f"{file}: not a prompt-tuning adapter (its kind is {kind!r}; expected peft_type 'PROMPT_TUNING')"
        )
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise LmforgeError(
            f"{file}: task_type {config['task_type']!r}; lmforge loads CAUSAL_LM prompt tuning"
        )
    if config.get("num_transformer_submodules") not in (None, 1):
        raise LmforgeError(f"{file}: num_transformer_submodules must be 1 (a decoder-only model)")
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise LmforgeError(f"{file}: num_virtual_tokens must be a positive integer, got {n!r}")
    _check_plain_decoder(model)
    token_dim, hidden = config.get("token_dim"), model.config.hidden_size
    if token_dim != hidden:
        raise LmforgeError(
            f"{file}: token_dim is {token_dim}, but the model's hidden_size is {hidden}: the adapter was trained "
            "for another model"
        )
    embedding = nn.Embedding(n, hidden)
    load_adapter_tensors({PEFT_KEY: embedding.weight}, adapter_dir)
    return _attach(model, embedding)
