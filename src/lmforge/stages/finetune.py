"""`lmforge finetune`: a base model + prepared data + a method (full, LoRA, bottleneck adapters, prompt tuning)
→ the one training loop → a HF model directory (full) or an adapter directory on top of the base.

Every run measures forgetting: the perplexity of a reference set (by default the base model's pretraining
validation data, found through its lineage) before and after, written to the results and the lineage;
`forgetting.max_increase_pct` (`--max-forgetting`) fails the run when the increase exceeds it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge import __version__
from lmforge.adapters.base import parameter_counts
from lmforge.adapters.io import base_fingerprint, save_adapter
from lmforge.data.batches import sft_rows
from lmforge.data.dataset import PreparedDataset
from lmforge.data.samplers import EpochSampler, Rows, Windows, fixed
from lmforge.errors import LmforgeError, RunFailed
from lmforge.fileio import atomic_write
from lmforge.model.decoder import CausalLM
from lmforge.model.hf import load_model, save_model
from lmforge.stages.configs import FinetuneConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import evaluate, train
from lmforge.train.objectives import OBJECTIVES
from lmforge.train.optim import build_optimizer
from lmforge.train.reporting import ProgressBar, open_sinks, peak_memory, plot_loss_curve

log = logging.getLogger(__name__)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
# The prepared-data kinds each fine-tuning kind reads.
DATA_KINDS = {"instruction": ("chat",), "chat": ("chat",), "domain": ("text", "chat"), "task": ("chat",)}


def run_finetune(cfg: FinetuneConfig, out: Path) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.data.dataset`; write `out/model` (full) or `out/adapter`, metrics, results."""
    if cfg.model is None:
        raise LmforgeError(
            "finetune: model is required (--init-from DIR or --set model=DIR): the base HF dir"
        )
    if cfg.data.dataset is None:
        raise LmforgeError(
            "finetune: data.dataset is required: a directory written by `lmforge data prepare`"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LmforgeError("finetune runs in one process for now: drop --nproc / torchrun")
    if cfg.train.resume:
        raise LmforgeError("finetune runs are short and not resumable yet: start it again with --overwrite")
    if (out / "model").exists() or (out / "adapter").exists():
        raise LmforgeError(f"{out} holds a finished run; use --overwrite or another --out")
    base_dir = Path(cfg.model)
    ds = PreparedDataset(cfg.data.dataset)
    kind = ds.manifest["kind"]
    if kind not in DATA_KINDS[cfg.kind]:
        raise LmforgeError(
            f"finetune kind {cfg.kind!r} reads {' or '.join(DATA_KINDS[cfg.kind])} data; {ds.path} holds {kind} "
            f"data (prepare it with the matching --format)"
        )
    tokenizer = _tokenizer(base_dir, ds)
    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.train.seed)
    model = load_model(base_dir)
    if not isinstance(model, CausalLM):
        raise LmforgeError(
            f"finetune kind {cfg.kind!r} trains a causal LM; {base_dir} holds a {type(model).__name__}"
        )
    if cfg.train.seq_len > model.config.max_position_embeddings:
        raise LmforgeError(
            f"train.seq_len={cfg.train.seq_len} exceeds {base_dir}'s max_position_embeddings="
            f"{model.config.max_position_embeddings}"
        )
    model = model.to(device)
    objective = OBJECTIVES["clm"]
    reference, ref_batches = _reference_batches(cfg, base_dir, tokenizer)
    before = _perplexity(model, ref_batches) if ref_batches else None

    model = _apply_method(cfg, model, tokenizer).to(device)
    trainable, total = parameter_counts(model)
    log.info("finetune %s/%s: %s, %s trainable of %s parameters (%.3f%%)", cfg.kind, cfg.method, base_dir,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)  # fmt: skip
    pack = cfg.data.packing and cfg.method != "prompt"  # a prompt-tuned row holds one sample
    train_examples, stats = _examples(ds, "train", cfg, tokenizer, pack)
    batches = EpochSampler(fixed(train_examples), cfg.train.micro_batch_size, seed=cfg.train.seed)
    val_examples, _ = _examples(ds, "val", cfg, tokenizer, pack)
    val = []
    if val_examples is not None and len(val_examples) > 0:
        n = min(len(val_examples), cfg.train.eval_batches * cfg.train.micro_batch_size)
        val = [val_examples.batch(np.arange(i, min(i + cfg.train.micro_batch_size, n)), torch.Generator())
               for i in range(0, n, cfg.train.micro_batch_size)]  # fmt: skip
    val_before = evaluate(model, objective, val)["val_loss"] if val else math.nan
    optimizer = build_optimizer(model, cfg.optim, device.type)
    out.mkdir(parents=True, exist_ok=True)
    run_config = json.loads(cfg.model_dump_json())

    with ExitStack() as stack:
        bar = stack.enter_context(ProgressBar(cfg.train.max_steps, 0))
        sinks = stack.enter_context(open_sinks(cfg.train.report_to, out, run_config))

        def report(record: dict[str, Any]) -> None:
            bar(record)
            sinks(record)

        summary = train(model, batches, objective, optimizer, cfg.optim, cfg.train,
                        eval_batches=(lambda: val) if val else None, metrics_path=out / "metrics.jsonl",
                        progress=report)  # fmt: skip
    model.eval()
    after = _perplexity(model, ref_batches) if ref_batches else None
    forgetting = _forgetting(before, after, reference, ref_batches, cfg)
    results: dict[str, Any] = {
        "kind": cfg.kind,
        "method": cfg.method,
        "base": str(base_dir),
        "dataset": ds.id,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_pct": 100 * trainable / total,
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "train_loss": summary["loss"],
        "val_loss_before": val_before,
        "val_loss": summary["val"].get("val_loss", math.nan),
        **stats,
        "forgetting": forgetting,
        "tokens_per_s": summary["tokens"] / max(summary["seconds"], 1e-9),
        "peak_memory_mb": peak_memory(device) / 2**20,
    }
    lineage = {"parent": str(base_dir), "base_fingerprint": base_fingerprint(base_dir), "data": [ds.id],
               "stage": "finetune", "kind": cfg.kind, "method": cfg.method, "config": run_config,
               "forgetting_reference": forgetting.get("reference") if forgetting else None,
               "lmforge_version": __version__, "seed": cfg.train.seed, "results": results}  # fmt: skip
    model = model.cpu()
    if cfg.method == "full":
        target = save_model(model, out / "model")
    else:
        target = save_adapter(model, cfg, out / "adapter", base_dir)
    for name in TOKENIZER_FILES:
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, target / name)
    results["output"] = str(target)
    atomic_write(target / "lmforge.json", json.dumps(lineage, indent=2) + "\n")
    plot_loss_curve(out / "metrics.jsonl", out / "loss.png")
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    limit = cfg.forgetting.max_increase_pct
    if limit is not None and forgetting and forgetting["increase_pct"] > limit:
        raise RunFailed(
            f"forgetting gate: reference perplexity rose {forgetting['increase_pct']:.2f}% "
            f"({forgetting['perplexity_before']:.3f} → {forgetting['perplexity_after']:.3f}), more than the "
            f"allowed {limit}% (forgetting.max_increase_pct / --max-forgetting); the outputs are in {out}"
        )
    return results


def _tokenizer(base_dir: Path, ds: PreparedDataset) -> Tokenizer:
    """The base model's tokenizer, which must be the one the data was prepared with."""
    data_tok = Tokenizer.from_dir(ds.manifest["tokenizer"]["path"])
    if not (base_dir / "tokenizer.json").is_file():
        return data_tok
    tok = Tokenizer.from_dir(base_dir)
    if tok.backend.get_vocab() != data_tok.backend.get_vocab():
        raise LmforgeError(
            f"{ds.path} was tokenised with {data_tok.path}, whose vocabulary differs from {base_dir}'s tokenizer: "
            f"prepare the data with --tokenizer {base_dir}"
        )
    return tok


def _apply_method(cfg: FinetuneConfig, model: nn.Module, tokenizer: Tokenizer) -> nn.Module:
    """The model the method trains: itself (full), or the base wrapped with a fresh adapter."""
    if cfg.method == "full":
        return model.train()
    if cfg.method == "lora":
        from lmforge.adapters.lora import apply_lora

        return apply_lora(model, cfg.lora).train()
    if cfg.method == "adapter":
        from lmforge.adapters.bottleneck import apply_bottleneck

        return apply_bottleneck(model, cfg.adapter).train()
    from lmforge.adapters.prompt import apply_prompt_tuning

    return apply_prompt_tuning(model, cfg.prompt, tokenizer).train()


def _examples(
    ds: PreparedDataset, split: str, cfg: FinetuneConfig, tokenizer: Tokenizer, pack: bool
) -> tuple[Rows | None, dict[str, Any]]:
    """Rows of a split: SFT samples (packed or one per row) for chat data, windows of the stream for text."""
    T = cfg.train.seq_len
    docs = list(ds.documents(split))
    if not docs:
        return None, {}
    if ds.manifest["kind"] == "text":  # domain text: every token, windows across documents (as pretraining)
        return Windows(np.concatenate([d.ids for d in docs]).astype(np.int64), T), {}
    if not any(d.mask is not None and d.mask.any() for d in docs):
        raise LmforgeError(f"{ds.path} ({split}): no sample has an assistant turn to train on")
    samples = [(d.ids, d.mask) for d in docs]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    rows, cut = sft_rows(samples, T, pad, pack=pack)
    real = sum(min(len(ids), T) for ids, _ in samples)
    stats = {"samples": len(samples), "rows": len(rows["input_ids"]), "truncated_samples": cut,
             "row_fill": real / rows["input_ids"].numel(),
             "trained_tokens": int((rows["targets"] != -100).sum())}  # fmt: skip
    if split == "train":
        log.info("%s: %d samples in %d rows of %d (%.0f%% filled, %d cut to fit)", ds.path, len(samples),
                 stats["rows"], T, 100 * stats["row_fill"], cut)  # fmt: skip
    return Rows(rows), stats if split == "train" else {}


# ------------------------------------------------------------------------------------------- forgetting


def reference_dataset(cfg: FinetuneConfig, base_dir: Path) -> Path | None:
    """The forgetting reference: the configured one, else the base's pretraining data from its lineage."""
    if cfg.forgetting.reference is not None:
        return Path(cfg.forgetting.reference)
    lineage_file = base_dir / "lmforge.json"
    if not lineage_file.is_file():
        return None
    lineage = json.loads(lineage_file.read_text())
    if lineage.get("forgetting_reference"):  # a fine-tuned base keeps its own base's reference
        return Path(lineage["forgetting_reference"])
    data = (lineage.get("config") or {}).get("data") or {}
    found = data.get("dataset") or next(iter((data.get("datasets") or {}).values()), None)
    return Path(found) if found else None


def _reference_batches(
    cfg: FinetuneConfig, base_dir: Path, tokenizer: Tokenizer
) -> tuple[Path | None, list[dict]]:
    """The reference dataset and fixed CLM windows of its validation split (train split when it has none)."""
    path = reference_dataset(cfg, base_dir)
    if path is None:
        log.warning(
            "forgetting: %s has no lineage naming its pretraining data; give forgetting.reference", base_dir
        )
        return None, []
    if not (path / "manifest.json").is_file():
        raise LmforgeError(f"forgetting.reference {path}: not a prepared dataset (no manifest.json)")
    ref = PreparedDataset(path)
    if ref.manifest["tokenizer"]["vocab_size"] > tokenizer.vocab_size:
        raise LmforgeError(f"forgetting.reference {path} uses a larger vocabulary than the model's tokenizer")
    T, B = cfg.train.seq_len, cfg.train.micro_batch_size
    for split in ("val", "train"):
        docs = list(ref.documents(split))
        if docs:
            windows = Windows(np.concatenate([d.ids for d in docs]).astype(np.int64), T)
            n = min(len(windows), cfg.forgetting.batches * B)
            if n:
                return path, [
                    windows.batch(np.arange(i, min(i + B, n)), torch.Generator()) for i in range(0, n, B)
                ]
    log.warning("forgetting: %s is too small for one window of %d tokens", path, T)
    return path, []


@torch.no_grad()
def _perplexity(model: nn.Module, batches: list[dict]) -> float:
    """exp(mean next-token loss) over the reference batches."""
    return math.exp(evaluate(model, OBJECTIVES["clm"], batches)["val_loss"])


def _forgetting(
    before: float | None,
    after: float | None,
    reference: Path | None,
    batches: list[dict],
    cfg: FinetuneConfig,
) -> dict:
    """The forgetting record: reference, perplexities before/after and the increase in per cent."""
    if before is None or after is None:
        return {}
    return {
        "reference": str(reference),
        "windows": sum(len(b["input_ids"]) for b in batches),
        "perplexity_before": before,
        "perplexity_after": after,
        "increase_pct": 100 * (after / before - 1),
        "max_increase_pct": cfg.forgetting.max_increase_pct,
    }
