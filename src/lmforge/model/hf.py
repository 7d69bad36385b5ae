"""Hugging Face model directories: `config.json` ↔ lmforge configs, safetensors (single or sharded) ↔ modules.

Module names already equal HF's, so the key map is the identity plus the base-model prefix (a `BertModel`
checkpoint has no `bert.` prefix). lmforge's RoPE uses HF's half-split layout, so no q/k permute is needed
for HF checkpoints (the permute only exists between Meta's original checkpoints and HF's).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lmforge.config import validation_message
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write, replace_atomically
from lmforge.model.configs import DecoderConfig, EncoderConfig, ModelConfig
from lmforge.model.decoder import CausalLM, DecoderForSequenceClassification
from lmforge.model.encoder import (
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
)

log = logging.getLogger(__name__)

DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_MODEL_TYPES = (*DECODER_TYPES, "bert")
BERT_CLASSES = (BertModel, BertForPreTraining, BertForMaskedLM, BertForSequenceClassification)
DECODER_CLASSES = (CausalLM, DecoderForSequenceClassification)
# model_type → the HF architecture names lmforge builds for it (a decoder class serves a name per family).
FAMILY_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    **{t: tuple(cls.architectures[t] for cls in DECODER_CLASSES) for t in DECODER_TYPES},
    "bert": tuple(cls.hf_architecture for cls in BERT_CLASSES),
}
ARCHITECTURES: dict[str, type[nn.Module]] = {
    **{arch: cls for cls in DECODER_CLASSES for arch in cls.architectures.values()},
    **{cls.hf_architecture: cls for cls in BERT_CLASSES},
}
DEFAULT_ARCHITECTURE = {**CausalLM.architectures, "bert": "BertModel"}
IGNORED_KEYS = ("rotary_emb.inv_freq", "embeddings.position_ids")  # buffers some HF checkpoints carry
DEFAULT_SHARD_BYTES = 2 * 1024**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# --------------------------------------------------------------------------------------------- configs


def decoder_config_from_hf(d: dict[str, Any]) -> DecoderConfig:
    """Read a Llama/Mistral/Qwen2/Qwen3 `config.json` (transformers 4 or 5 layout)."""
    model_type = d["model_type"]
    rope = dict(d.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    bias = d.get("attention_bias", False)
    sliding = model_type in ("qwen2", "qwen3") and d.get("use_sliding_window", False)
    window = d.get("sliding_window") if (model_type == "mistral" or sliding) else None
    layer_types = None
    if sliding:
        first_sliding = d.get("max_window_layers", 0)
        n = d["num_hidden_layers"]
        layer_types = d.get("layer_types") or [
            "sliding_attention" if i >= first_sliding else "full_attention" for i in range(n)
        ]
    return DecoderConfig(
        model_type=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads"),
        head_dim=d.get("head_dim"),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling={k: v for k, v in scaling.items() if k != "rope_theta"} if scaling else None,
        attention_bias=bias or model_type == "qwen2",
        o_proj_bias=bias and model_type in ("llama", "qwen3"),
        mlp_bias=d.get("mlp_bias", False) and model_type == "llama",
        qk_norm=model_type == "qwen3",
        sliding_window=window,
        layer_types=layer_types,
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        initializer_range=d.get("initializer_range", 0.02),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        id2label=_id2label_from_hf(d),
        torch_dtype=_dtype_name(d),
    )


def decoder_config_to_hf(config: DecoderConfig, architecture: str | None = None) -> dict[str, Any]:
    """The `config.json` HF writes for this family (readable by transformers 4 and 5); `architecture`
    defaults to the family's CausalLM."""
    c = config
    d: dict[str, Any] = {
        "architectures": [architecture or CausalLM.architectures[c.model_type]],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "initializer_range": c.initializer_range,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        # transformers 5 reads rope_parameters; 4 reads rope_theta/rope_scaling (5 accepts them too).
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "rope_parameters": {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta},
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": c.torch_dtype,
        "torch_dtype": c.torch_dtype,
    }
    if c.model_type in ("llama", "qwen3"):
        d["attention_bias"] = c.attention_bias
    if c.model_type == "llama":
        d["mlp_bias"] = c.mlp_bias
    if c.model_type == "mistral":
        d["sliding_window"] = c.sliding_window
    if c.model_type in ("qwen2", "qwen3"):
        d["use_sliding_window"] = c.sliding_window is not None
        d["sliding_window"] = c.sliding_window
        d["layer_types"] = c.layer_types
        d["max_window_layers"] = next(
            (i for i, t in enumerate(c.layer_types) if t == "sliding_attention"), c.num_hidden_layers
        )
    d |= _id2label_to_hf(c.id2label)  # nothing when unset, as transformers 5 omits the default labels
    # Not every combination of lmforge's flags is a HF family (e.g. q/k norm on Llama): refuse to write a
    # config.json that HF would read as a different model.
    if decoder_config_from_hf(d) != c:
        raise LmforgeError(
            f"this decoder config cannot be saved as HF model_type {c.model_type!r}: its biases, q/k norm or "
            "sliding-window settings do not match that family; pick the model_type that has them"
        )
    return d


def encoder_config_from_hf(d: dict[str, Any]) -> EncoderConfig:
    """Read a BERT `config.json`."""
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise LmforgeError(f"BERT position_embedding_type {d['position_embedding_type']!r} is not supported")
    fields = {k: d[k] for k in EncoderConfig.model_fields if k in d and k not in ("id2label", "torch_dtype")}
    return EncoderConfig(**fields, id2label=_id2label_from_hf(d), torch_dtype=_dtype_name(d))


def encoder_config_to_hf(config: EncoderConfig, architecture: str) -> dict[str, Any]:
    """The `config.json` HF writes for a BERT model."""
    d = config.model_dump(exclude={"id2label"})
    d |= {"architectures": [architecture], "position_embedding_type": "absolute", "dtype": config.torch_dtype}
    return d | _id2label_to_hf(config.id2label)


def _id2label_from_hf(d: dict[str, Any]) -> dict[int, str] | None:
    id2label = d.get("id2label")
    return {int(k): v for k, v in id2label.items()} if id2label else None


def _id2label_to_hf(id2label: dict[int, str] | None) -> dict[str, Any]:
    """`id2label` (JSON keys are strings) and its inverse `label2id`, or nothing when there are no labels."""
    if not id2label:
        return {}
    return {
        "id2label": {str(i): name for i, name in id2label.items()},
        "label2id": {name: i for i, name in id2label.items()},
    }


def _dtype_name(d: dict[str, Any]) -> str:
    name = d.get("dtype") or d.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise LmforgeError(f"config.json dtype {name!r} is not supported; supported: {', '.join(DTYPES)}")
    return name


def read_config(path: str | Path) -> tuple[ModelConfig, str]:
    """The model config and HF architecture name of a model directory."""
    d = read_json_object(_model_dir(path) / "config.json")
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LmforgeError(
            f"{path}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        config = encoder_config_from_hf(d) if model_type == "bert" else decoder_config_from_hf(d)
    except KeyError as e:
        raise LmforgeError(f"{path}/config.json: required field {e.args[0]!r} is missing") from None
    except ValidationError as e:
        raise LmforgeError(f"{path}/config.json: {validation_message(e)}") from None
    except ValueError as e:
        raise LmforgeError(f"{path}/config.json: {e}".replace("\n", " ")) from None
    architecture = next(iter(d.get("architectures") or []), None) or DEFAULT_ARCHITECTURE[model_type]
    if architecture not in FAMILY_ARCHITECTURES[model_type]:
        architecture = DEFAULT_ARCHITECTURE[model_type]  # e.g. LlamaModel: load the family's default head
    return config, architecture


# ---------------------------------------------------------------------------------------------- models


def build_model(
    config: ModelConfig,
    architecture: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A freshly initialised model: built on the meta device, materialised once, initialised by its scheme.

    `architecture` is a HF name of the config's family (`FAMILY_ARCHITECTURES`, e.g. "LlamaForCausalLM",
    "Qwen2ForSequenceClassification", "BertForMaskedLM"); it defaults to the family's usual one.
    """
    cls = _model_class(config, architecture or DEFAULT_ARCHITECTURE[config.model_type])
    with torch.device("meta"):
        model = cls(config)
    model.to_empty(device=device)
    model.init_weights()
    return model.to(dtype or DTYPES[config.torch_dtype])


def load_model(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    architecture: str | None = None,
    id2label: dict[int, str] | None = None,
) -> nn.Module:
    """Load a HF model directory (single or sharded safetensors) into lmforge's model, in eval mode.

    Weights are read tensor by tensor from the memory-mapped files and assigned into a meta-device model, so
    the weights are never held twice. `dtype` defaults to the checkpoint's `torch_dtype`. `architecture`
    loads the weights under another head of the same family (e.g. a `BertModel` checkpoint as
    `BertForMaskedLM` to continue its pretraining, a `LlamaForCausalLM` one as
    `LlamaForSequenceClassification`): the heads the checkpoint lacks start from lmforge's init, as
    `from_pretrained` does, and its tensors the new model has no place for (`lm_head`) are skipped.
    `id2label` replaces the config's class names before the model is built: a classification head of
    another size than the checkpoint's starts fresh; one of the same size keeps its weights (only the
    names change, as `from_pretrained(path, id2label=...)`).
    """
    path = _model_dir(path)
    config, saved_architecture = read_config(path)
    relabel = False
    if id2label is not None:
        if sorted(id2label) != list(range(len(id2label))):
            raise LmforgeError(f"id2label keys must be 0..{len(id2label) - 1}; got {sorted(id2label)}")
        relabel = len(id2label) != config.num_labels  # the head's shape changes: it cannot be loaded
        config = config.model_copy()
        config.id2label = dict(id2label)  # validated on assignment
    dtype = dtype or DTYPES[config.torch_dtype]
    new_heads = relabel or (architecture is not None and architecture != saved_architecture)
    if new_heads:  # initialised weights for what the checkpoint lacks; the rest is overwritten below
        model = build_model(config, architecture or saved_architecture, device=device, dtype=dtype)
    else:
        with torch.device("meta"):
            model = ARCHITECTURES[saved_architecture](config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = model.tied_weights()
    base = model.base_model_prefix + "."
    key_map = checkpoint_key_map(_checkpoint_keys(path), set(expected), model.base_model_prefix)
    loaded: set[str] = set()
    for file in weight_files(path):
        with open_safetensors(file, device=str(device)) as f:
            state = {}
            for ckpt_key in f.keys():  # noqa: SIM118  (safe_open is not a dict)
                key = key_map.get(ckpt_key)
                if key is None:
                    continue
                shape = tuple(f.get_slice(ckpt_key).get_shape())
                if shape != tuple(expected[key]) and relabel and not key.startswith(base):
                    continue  # the old label set's head (e.g. classifier.weight (2, C)); the new one is fresh
                if shape != tuple(expected[key]):
                    raise LmforgeError(
                        f"{file}: tensor {ckpt_key!r} has shape {shape}, but config.json implies "
                        f"{tuple(expected[key])}"
                    )
                state[key] = f.get_tensor(ckpt_key).to(dtype)
        model.load_state_dict(state, strict=False, assign=not new_heads)
        loaded |= set(state)
    missing = sorted(set(expected) - loaded - set(tied))
    if new_heads:
        if missing:
            name = architecture or saved_architecture
            log.info("%s: new %s weights, not in the checkpoint: %s", path, name, ", ".join(missing))
        missing = [k for k in missing if k.startswith(base)]  # only the heads may start fresh
    if missing:
        raise LmforgeError(
            f"{path}: {len(missing)} tensor(s) the config needs are missing from the checkpoint: "
            f"{', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}"
        )
    model.tie_weights()
    return model.eval()


def save_model(model: nn.Module, path: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `config.json`, `generation_config.json` (decoders) and safetensors, sharded past the size limit.

    Each file is written to a temporary name and renamed, so a crash never leaves a half-written file; weight
    files from an earlier save that the new one does not use are removed.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    tied = model.tied_weights()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    dtype_name = next(name for name, dt in DTYPES.items() if dt == next(iter(state.values())).dtype)
    config = config.model_copy(update={"torch_dtype": dtype_name})
    if isinstance(config, DecoderConfig):
        hf_config = decoder_config_to_hf(config, model.hf_architecture)
        # HF writes generation_config.json for generative models only (not for classifiers).
        if model.hf_architecture in CausalLM.architectures.values():
            generation = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            atomic_write(
                path / "generation_config.json", _json({k: v for k, v in generation.items() if v is not None})
            )
    else:
        hf_config = encoder_config_to_hf(config, model.hf_architecture)

    shards = _plan_shards(state, max_shard_bytes)  # {file name: keys}
    for name, keys in shards.items():
        write = lambda tmp, keys=keys: save_file({k: state[k] for k in keys}, tmp, {"format": "pt"})  # noqa: E731
        replace_atomically(path / name, write)
    index = path / "model.safetensors.index.json"
    if len(shards) > 1:
        weight_map = {k: name for name, keys in shards.items() for k in keys}
        total = sum(t.numel() * t.element_size() for t in state.values())
        atomic_write(index, _json({"metadata": {"total_size": total}, "weight_map": weight_map}))
    stale = [p for p in path.glob("model*.safetensors") if p.name not in shards]
    if len(shards) == 1 and index.exists():
        stale.append(index)
    for file in stale:
        file.unlink()
    atomic_write(path / "config.json", _json(hf_config))
    return path


def _model_class(config: ModelConfig, architecture: str) -> type[nn.Module]:
    """The lmforge class of a HF architecture name, which must be one of the config's family."""
    names = FAMILY_ARCHITECTURES[config.model_type]
    if architecture not in names:
        raise LmforgeError(
            f"architecture {architecture!r} is not one lmforge builds for model_type {config.model_type!r}; "
            f"supported: {', '.join(names)}"
        )
    return ARCHITECTURES[architecture]


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> dict[str, list[str]]:
    """Greedy split of the keys, in order, into files of at most max_bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    return {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": keys for i, keys in enumerate(shards)}


def checkpoint_key_map(ckpt_keys: list[str], model_keys: set[str], prefix: str) -> dict[str, str]:
    """Checkpoint key → model key: identical, or with the base-model prefix added or removed."""
    mapping, unexpected = {}, []
    for k in ckpt_keys:
        if k in model_keys:
            mapping[k] = k
        elif f"{prefix}.{k}" in model_keys:
            mapping[k] = f"{prefix}.{k}"
        elif k.startswith(f"{prefix}.") and k[len(prefix) + 1 :] in model_keys:
            mapping[k] = k[len(prefix) + 1 :]
        elif not k.endswith(IGNORED_KEYS):
            unexpected.append(k)
    if unexpected:
        log.warning("ignoring %d checkpoint tensor(s) this architecture has no place for: %s", len(unexpected),
                    ", ".join(unexpected[:5]))  # fmt: skip
    return mapping


def _checkpoint_keys(path: Path) -> list[str]:
    keys = []
    for file in weight_files(path):
        with open_safetensors(file) as f:
            keys.extend(f.keys())
    return keys


def open_safetensors(file: str | Path, device: str = "cpu") -> Any:
    """`safetensors.safe_open` whose failure on a truncated or damaged file is an error naming the file."""
    try:
        return safe_open(file, framework="pt", device=device)
    except (SafetensorError, OSError) as e:
        raise LmforgeError(
            f"{file}: not a readable safetensors file ({e}); it is truncated or damaged"
        ) from None


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 over a model directory's config.json and weight files: which weights an adapter or an index was
    made with."""
    import hashlib

    from lmforge.fileio import sha256_file

    h = hashlib.sha256()
    for f in [Path(model_dir) / "config.json", *weight_files(Path(model_dir))]:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model dir: the index's shards, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json_object(index).get("weight_map", {}).values()))
        missing = [f for f in files if not (path / f).exists()]
        if missing:
            raise LmforgeError(f"{index}: shard file(s) {', '.join(missing)} do not exist")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    if (path / "pytorch_model.bin").exists():
        raise LmforgeError(
            f"{path}: only pytorch_model.bin found; lmforge loads safetensors (convert with transformers: "
            "model.save_pretrained(dir, safe_serialization=True))"
        )
    raise LmforgeError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"{path}: no such directory")
    if not path.is_dir():
        raise LmforgeError(f"{path}: expected a Hugging Face model directory, got a file")
    if not (path / "config.json").exists():
        raise LmforgeError(f"{path}: not a Hugging Face model directory (config.json not found)")
    return path


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file holding an object (config.json, an index, lineage); else an error naming the file."""
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{file}: invalid JSON (not UTF-8: {e.reason})") from None
    if not isinstance(d, dict):
        raise LmforgeError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d


def _json(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=2) + "\n"
