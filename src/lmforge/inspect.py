"""`lmforge inspect`: what a model, adapter or run directory holds, read from headers without loading weights.

Any directory of safetensors weights with a `config.json` is reported (parameters from the safetensors
headers, the config fields HF families share) with whether lmforge can run it; the families lmforge runs add
the embedding / non-embedding split. Adapter directories report their kind, base model and rank; run and
checkpoint directories name the model directory they hold and inspect it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.adapters.base import CONFIG_FILE as ADAPTER_CONFIG
from lmforge.adapters.base import read_adapter_config, weights_file
from lmforge.errors import LmforgeError
from lmforge.model.configs import DecoderConfig
from lmforge.model.hf import (
    ARCHITECTURES,
    IGNORED_KEYS,
    SUPPORTED_MODEL_TYPES,
    checkpoint_key_map,
    read_config,
    read_json_object,
    weight_files,
)
from lmforge.tokenizer import TOKENIZER_FILES
from lmforge.train.checkpoint import CHECKPOINTS, COMPLETE, MODEL_DIR, latest_checkpoint

RUN_CONFIG = "config.yaml"
ADAPTER_DIR = "adapter"
MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own limit: a larger length is a corrupt file
DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}  # fmt: skip
# Report field → the config.json keys HF families use for it (Llama-style names first, GPT-2's after).
CONFIG_FIELDS = {
    "vocab_size": ("vocab_size",),
    "context_length": ("max_position_embeddings", "n_positions", "n_ctx"),
    "layers": ("num_hidden_layers", "n_layer"),
    "hidden_size": ("hidden_size", "n_embd"),
    "attention_heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads",),
    "tied_embeddings": ("tie_word_embeddings",),
    "sliding_window": ("sliding_window",),
}
EXPECTED = (
    "expected a model directory (config.json and safetensors weights), an adapter directory "
    f"({ADAPTER_CONFIG}) or an lmforge run directory ({RUN_CONFIG})"
)


def inspect_path(path: str | Path) -> dict[str, Any]:
    """What a model, adapter, run or checkpoint directory holds (`lmforge inspect`)."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"{path}: no such directory")
    if not path.is_dir():
        raise LmforgeError(f"{path}: is a file; {EXPECTED}")
    if (path / "config.json").is_file():
        return inspect_model(path)
    if (path / ADAPTER_CONFIG).is_file():
        return inspect_adapter(path)
    if (path / RUN_CONFIG).is_file() or (path / CHECKPOINTS).is_dir():
        return inspect_run(path)
    if (path / COMPLETE).is_file() and (path / MODEL_DIR).is_dir():
        model = path / MODEL_DIR  # RUN/checkpoints/step-N: its HF model dir beside train_state/
        return {
            "path": str(path),
            "kind": "checkpoint",
            "model_dir": str(model),
            "model": inspect_model(model),
        }
    raise LmforgeError(f"{path}: not a model, adapter or run directory; {EXPECTED}")


def inspect_model(path: str | Path) -> dict[str, Any]:
    """Architecture, parameters, dtype, vocabulary, context, tokenizer, lineage of a HF model dir, and
    whether lmforge runs it (`supported`; `reason` when not)."""
    path = Path(path)
    d = read_json_object(path / "config.json")
    files = weight_files(path)
    tensors = {k: v for f in files for k, v in read_safetensors_header(f).items()}
    counts = {k: math.prod(shape) for k, (_, shape) in tensors.items() if not k.endswith(IGNORED_KEYS)}
    total = sum(counts.values())  # a tied tensor is stored once, so counted once
    architecture = next(iter(d.get("architectures") or []), None)
    info: dict[str, Any] = {"path": str(path), "kind": "model", "model_type": d.get("model_type")}
    fields = {
        field: next((d[k] for k in keys if d.get(k) is not None), None)
        for field, keys in CONFIG_FIELDS.items()
    }
    parameters: dict[str, int] = {"total": total}
    lmforge_view = _lmforge_view(path, d, tensors)
    if isinstance(lmforge_view, str):
        info |= {"architecture": architecture, "supported": False, "reason": lmforge_view}
    else:  # the config as lmforge reads it (its defaults filled in) and the embedding split
        architecture, fields, embedding = lmforge_view
        info |= {"architecture": architecture, "supported": True}
        parameters |= {"embedding": embedding, "non_embedding": total - embedding}
    info |= {"parameters": parameters, **_dtypes(tensors, counts), **fields}
    return info | {
        "weights": {"files": len(files), "bytes": sum(f.stat().st_size for f in files)},
        "tokenizer": [name for name in TOKENIZER_FILES if (path / name).exists()],
        "chat_template": _has_chat_template(path),
        "lineage": _read_lineage(path),
    }


def inspect_adapter(path: str | Path) -> dict[str, Any]:
    """Kind, base model, rank (LoRA) or size, trainable parameters and dtype of an adapter directory."""
    from lmforge.adapters.io import adapter_kind
    from lmforge.adapters.lora import read_lora_options

    path = Path(path)
    config = read_adapter_config(path)
    file = weights_file(path)
    tensors = read_safetensors_header(file)
    counts = {k: math.prod(shape) for k, (_, shape) in tensors.items()}
    info: dict[str, Any] = {"path": str(path), "kind": "adapter", "peft_type": config.get("peft_type")}
    try:
        method = adapter_kind(path)
        if method == "lora":
            read_lora_options(config, path / ADAPTER_CONFIG)  # the options lmforge's LoRA refuses
        info |= {"method": method, "supported": True}
    except LmforgeError as e:
        info |= {"method": None, "supported": False, "reason": str(e)}
    info["base_model"] = config.get("base_model_name_or_path")
    if config.get("peft_type") == "LORA":
        info |= {key: config.get(name) for key, name in
                 [("r", "r"), ("alpha", "lora_alpha"), ("target_modules", "target_modules"),
                  ("rslora", "use_rslora"), ("dora", "use_dora")]}  # fmt: skip
    elif config.get("peft_type") == "PROMPT_TUNING":
        info["num_virtual_tokens"] = config.get("num_virtual_tokens")
    elif config.get("lmforge_adapter") == "bottleneck":
        info |= {"size": config.get("size"), "activation": config.get("activation")}
    return info | {
        "parameters": {"trainable": sum(counts.values())},
        **_dtypes(tensors, counts),
        "weights": {"files": 1, "bytes": file.stat().st_size},
        "lineage": _read_lineage(path),
    }


def inspect_run(path: str | Path) -> dict[str, Any]:
    """The model (or adapter) directory an lmforge run wrote, inspected; an error when it has none yet."""
    path = Path(path)
    latest = latest_checkpoint(path) if (path / CHECKPOINTS).is_dir() else None
    info: dict[str, Any] = {"path": str(path), "kind": "run"}
    info["latest_checkpoint"] = str(latest) if latest else None
    outputs = [(name, path / name) for name in (MODEL_DIR, ADAPTER_DIR) if (path / name).is_dir()]
    if not outputs:
        where = f"{path / MODEL_DIR} does not exist yet"
        if latest is not None:
            raise LmforgeError(
                f"{path}: a run directory without its final model ({where}); its newest checkpoint's model "
                f"is {latest / MODEL_DIR}: inspect that"
            )
        raise LmforgeError(
            f"{path}: a run directory without a model: {where} and {path / CHECKPOINTS} holds no complete "
            "checkpoint (the run has not saved one yet, or stopped before it did)"
        )
    for name, out in outputs:
        info[f"{name}_dir"] = str(out)
        info[name] = inspect_model(out) if name == MODEL_DIR else inspect_adapter(out)
    return info


def read_safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} of a safetensors file, read from its JSON header only."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else 0
        if size < 8 or length > min(size - 8, MAX_HEADER_BYTES):
            raise LmforgeError(
                f"{file}: truncated or not a safetensors file: its header length field says {length} bytes, "
                f"the file holds {max(size - 8, 0)} after it"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{file}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise LmforgeError(f"{file}: corrupt safetensors header (a JSON object was expected)")
    tensors, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not (
                isinstance(dtype, str)
                and all(isinstance(n, int) and n >= 0 for n in shape)
                and 0 <= begin <= stop
            ):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise LmforgeError(
                f"{file}: corrupt safetensors header: tensor {name!r} has no valid dtype, shape and data_offsets"
            ) from None
        tensors[name] = (dtype, tuple(shape))
        end = max(end, stop)
    if 8 + length + end > size:
        raise LmforgeError(
            f"{file}: truncated: its header describes {8 + length + end} bytes, the file holds {size}"
        )
    return tensors


def _lmforge_view(
    path: Path, d: dict[str, Any], tensors: dict[str, tuple[str, tuple[int, ...]]]
) -> tuple[str, dict[str, Any], int] | str:
    """(architecture, config fields, embedding parameters) as lmforge would load the dir, or why it cannot."""
    if d.get("model_type") not in SUPPORTED_MODEL_TYPES:
        return f"model_type {d.get('model_type')!r}: lmforge runs {', '.join(SUPPORTED_MODEL_TYPES)}"
    try:
        config, architecture = read_config(path)
    except LmforgeError as e:
        return str(e)
    with torch.device("meta"):  # shapes only: costs no memory, whatever the model's size
        model = ARCHITECTURES[architecture](config)
    # What load_model checks: every tensor the model needs (tied ones aside) is stored, with its shape.
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in model.tied_weights()}
    names = checkpoint_key_map(
        list(tensors), set(expected), model.base_model_prefix
    )  # checkpoint key -> model key
    stored = {names[k]: shape for k, (_, shape) in tensors.items() if k in names}
    missing = sorted(set(expected) - set(stored))
    if missing:
        more = ", ..." if len(missing) > 3 else ""
        return (
            f"{architecture} needs {len(missing)} tensor(s) the weights lack: {', '.join(missing[:3])}{more}"
        )
    for key, shape in expected.items():
        if stored[key] != shape:
            return f"tensor {key!r} has shape {stored[key]}, but config.json implies {shape}"
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    if hasattr(model, "lm_head") and not config.tie_word_embeddings:
        embedding += model.lm_head.weight.numel()  # an untied output layer is an embedding table too
    is_decoder = isinstance(config, DecoderConfig)
    fields = {
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads if is_decoder else config.num_attention_heads,
        "tied_embeddings": config.tie_word_embeddings if is_decoder else True,
        "sliding_window": config.sliding_window if is_decoder else None,
    }
    return architecture, fields, embedding


def _dtypes(tensors: dict[str, tuple[str, tuple[int, ...]]], counts: dict[str, int]) -> dict[str, Any]:
    """{"dtype": the dtype of most parameters}, plus {"dtypes": {dtype: parameters}} when they are mixed."""
    by_dtype: Counter[str] = Counter()
    for key, n in counts.items():
        by_dtype[DTYPE_NAMES.get(tensors[key][0], tensors[key][0])] += n
    if not by_dtype:
        return {"dtype": None}
    ranked = dict(by_dtype.most_common())
    return {"dtype": next(iter(ranked))} | ({"dtypes": ranked} if len(ranked) > 1 else {})


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists():
        return True
    tokenizer_config = path / "tokenizer_config.json"
    return tokenizer_config.exists() and bool(read_json_object(tokenizer_config).get("chat_template"))


def _read_lineage(path: Path) -> dict[str, Any] | None:
    lineage = path / "lmforge.json"
    return read_json_object(lineage) if lineage.exists() else None
