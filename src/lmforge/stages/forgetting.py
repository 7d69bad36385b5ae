"""Forgetting, measured the same way by every stage that changes a pretrained model (finetune, align): the
perplexity of a reference set — by default the base model's pretraining validation data, found through its
lineage — before and after training."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmforge.data.dataset import PreparedDataset
from lmforge.data.samplers import Windows
from lmforge.errors import LmforgeError, RunFailed
from lmforge.stages.configs import AlignConfig, FinetuneConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.loop import evaluate
from lmforge.train.objectives import OBJECTIVES

log = logging.getLogger(__name__)


def reference_dataset(cfg: FinetuneConfig | AlignConfig, base_dir: Path) -> Path | None:
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


def reference_batches(
    cfg: FinetuneConfig | AlignConfig, base_dir: Path, tokenizer: Tokenizer
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
def perplexity(model: nn.Module, batches: list[dict]) -> float:
    """exp(mean next-token loss) over the reference batches."""
    return math.exp(evaluate(model, OBJECTIVES["clm"], batches)["val_loss"])


def forgetting_record(
    before: float | None,
    after: float | None,
    reference: Path | None,
    batches: list[dict],
    cfg: FinetuneConfig | AlignConfig,
) -> dict:
    """The forgetting record: reference, perplexities before/after and the increase in per cent."""
    if before is None or after is None:
        return {
            "skipped": "no reference set: the base has no lineage naming its data; give forgetting.reference"
        }
    return {
        "reference": str(reference),
        "windows": sum(len(b["input_ids"]) for b in batches),
        "perplexity_before": before,
        "perplexity_after": after,
        "increase_pct": 100 * (after / before - 1),
        "max_increase_pct": cfg.forgetting.max_increase_pct,
    }


def forgetting_gate(forgetting: dict, limit: float | None, out: Path) -> None:
    """Fail a complete run (its files kept) whose reference perplexity rose more than `limit` per cent."""
    if limit is not None and "increase_pct" in forgetting and forgetting["increase_pct"] > limit:
        raise RunFailed(
            f"forgetting gate: reference perplexity rose {forgetting['increase_pct']:.2f}% "
            f"({forgetting['perplexity_before']:.3f} → {forgetting['perplexity_after']:.3f}), more than the "
            f"allowed {limit}% (forgetting.max_increase_pct / --max-forgetting); the outputs are in {out}"
        )
