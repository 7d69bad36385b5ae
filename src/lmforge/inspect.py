"""`lmforge inspect`: what a model directory holds, read from its headers without loading the weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lmforge.model.configs import DecoderConfig
from lmforge.model.hf import ARCHITECTURES, read_config, weight_files
from lmforge.tokenizer import TOKENIZER_FILES


def inspect_model(path: str | Path) -> dict[str, Any]:
    """Architecture, parameter counts, dtype, vocabulary, context, tokenizer and lineage of a HF model dir."""
    path = Path(path)
    config, architecture = read_config(path)
    with torch.device("meta"):  # shapes only: counting costs no memory, whatever the model's size
        model = ARCHITECTURES[architecture](config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    if hasattr(model, "lm_head") and not config.tie_word_embeddings:
        embedding += model.lm_head.weight.numel()  # an untied output layer is an embedding table too
    files = weight_files(path)
    with safe_open(files[0], framework="pt") as f:
        dtype = f.get_slice(next(iter(f.keys()))).get_dtype()
    is_decoder = isinstance(config, DecoderConfig)
    return {
        "path": str(path),
        "model_type": config.model_type,
        "architecture": architecture,
        "parameters": {"total": total, "embedding": embedding, "non_embedding": total - embedding},
        "dtype": {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dtype, dtype),
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads if is_decoder else config.num_attention_heads,
        "tied_embeddings": config.tie_word_embeddings if is_decoder else True,
        "sliding_window": config.sliding_window if is_decoder else None,
        "weights": {"files": len(files), "bytes": sum(f.stat().st_size for f in files)},
        "tokenizer": [name for name in TOKENIZER_FILES if (path / name).exists()],
        "chat_template": _has_chat_template(path),
        "lineage": _read_lineage(path),
    }


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists():
        return True
    tokenizer_config = path / "tokenizer_config.json"
    return tokenizer_config.exists() and bool(json.loads(tokenizer_config.read_text()).get("chat_template"))


def _read_lineage(path: Path) -> dict[str, Any] | None:
    lineage = path / "lmforge.json"
    return json.loads(lineage.read_text()) if lineage.exists() else None
