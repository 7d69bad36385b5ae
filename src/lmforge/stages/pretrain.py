"""`lmforge pretrain`: a prepared text dataset + a model (a preset, or `init_from` a HF dir) → the one loop → a
HF model directory with its tokenizer and lineage, with resumable checkpoints in `out/checkpoints` (`--set
train.resume=true` continues from the newest). Causal LM for now; MLM/NSP and distributed runs are the rest of
issue 5."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge import __version__
from lmforge.data.dataset import PreparedDataset
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write
from lmforge.model.configs import DecoderConfig, preset
from lmforge.model.hf import build_model, load_model, save_model
from lmforge.stages.configs import PretrainConfig
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import (
    CHECKPOINTS,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lmforge.train.loop import WindowSampler, train
from lmforge.train.objectives import OBJECTIVES
from lmforge.train.optim import build_optimizer

log = logging.getLogger(__name__)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _tokens(ds: PreparedDataset, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """All token ids of a split in document order (+ the loss mask for chat data)."""
    docs = list(ds.documents(split))
    if not docs:
        return np.zeros(0, dtype=np.int64), None
    ids = np.concatenate([d.ids for d in docs]).astype(np.int64)
    masks = [d.mask for d in docs]
    return ids, None if masks[0] is None else np.concatenate(masks)


@torch.no_grad()
def greedy_sample(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32) -> str:
    """A greedy continuation of `prompt` (a quick look at what the model learned; `generate` is the engine)."""
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-model.config.max_position_embeddings :]])
        next_id = int(model(context, last_only=True)[0, -1].argmax())
        if next_id == tokenizer.eos_id:
            break
        ids.append(next_id)
    return tokenizer.decode(ids, skip_special_tokens=True)


def run_pretrain(cfg: PretrainConfig, out: Path) -> dict[str, Any]:
    """Pretrain (or continue pretraining) and write `out/model` (HF dir), `out/metrics.jsonl`, `out/results.json`."""
    if cfg.data.dataset is None:
        raise LmforgeError(
            "pretrain: data.dataset is required (a directory written by `lmforge data prepare`)"
        )
    if not cfg.train.resume and any((out / name).exists() for name in (CHECKPOINTS, "model")):
        raise LmforgeError(f"{out} exists; use --set train.resume=true to continue or choose another --out")
    ds = PreparedDataset(cfg.data.dataset)
    tok = ds.manifest["tokenizer"]
    torch.manual_seed(cfg.train.seed)
    if cfg.model.init_from is not None:
        model = load_model(cfg.model.init_from).train()
        parent = str(cfg.model.init_from)
    else:
        ids = {"vocab_size": tok["vocab_size"], "eos_token_id": tok["eos_id"], "pad_token_id": tok["pad_id"]}
        model = build_model(preset(cfg.model.preset, **{**ids, **cfg.model.overrides}))
        parent = f"preset:{cfg.model.preset}"
    config = model.config
    if not isinstance(config, DecoderConfig):
        raise LmforgeError(
            f"pretrain objective 'clm' needs a decoder; {parent} is a {config.model_type} model"
        )
    if config.vocab_size < tok["vocab_size"]:
        raise LmforgeError(
            f"{cfg.data.dataset} was tokenised with a {tok['vocab_size']}-id vocabulary but the model has "
            f"{config.vocab_size} ids: prepare the data with the model's tokenizer"
        )
    if cfg.train.seq_len > config.max_position_embeddings:
        raise LmforgeError(
            f"train.seq_len={cfg.train.seq_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )

    train_ids, train_mask = _tokens(ds, "train")
    val_ids, val_mask = _tokens(ds, "val")
    if len(train_ids) <= cfg.train.seq_len * cfg.train.micro_batch_size:
        raise LmforgeError(
            f"{cfg.data.dataset}: {len(train_ids)} training tokens are fewer than one micro-batch "
            f"({cfg.train.micro_batch_size} x {cfg.train.seq_len})"
        )
    batches = WindowSampler(train_ids, cfg.train.seq_len, cfg.train.micro_batch_size, seed=cfg.train.seed,
                            mask=train_mask)  # fmt: skip
    eval_batches = None
    if len(val_ids) > cfg.train.seq_len * cfg.train.micro_batch_size:
        val = WindowSampler(val_ids, cfg.train.seq_len, cfg.train.micro_batch_size, seed=0, mask=val_mask)
        n = min(cfg.train.eval_batches, len(val.windows["input_ids"]) // cfg.train.micro_batch_size)
        fixed = [next(val) for _ in range(n)]
        eval_batches = lambda: fixed  # noqa: E731  (the same validation batches every time)
    optimizer = build_optimizer(model, cfg.optim, next(model.parameters()).device.type)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "pretrain: %s (%.1fM params) on %s, %d steps", parent, n_params / 1e6, ds.id[:12], cfg.train.max_steps
    )

    def report(record: dict) -> None:
        if "loss" in record:
            log.info("step %d  loss %.4f  lr %.2e  %.0f tok/s", record["step"], record["loss"], record["lr"],
                     record["tokens_per_s"])  # fmt: skip
        if "val_loss" in record:
            log.info("step %d  val loss %.4f", record["step"], record["val_loss"])

    out.mkdir(parents=True, exist_ok=True)
    run_config = json.loads(cfg.model_dump_json())
    start_step, start_tokens = 0, 0
    checkpoint = latest_checkpoint(out) if cfg.train.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)  # weights, optimizer state, every RNG
        batches.load_state_dict(state["data"])
        start_step, start_tokens = state["step"], state["tokens"]
        log.info("resuming from %s (step %d)", checkpoint, start_step)
    elif cfg.train.resume:
        log.info("train.resume: no checkpoint in %s, starting from scratch", out / CHECKPOINTS)

    def save(step: int) -> None:
        lineage = {"parent": parent, "data": [ds.id], "stage": "pretrain", "config": run_config,
                   "lmforge_version": __version__, "seed": cfg.train.seed, "step": step}  # fmt: skip
        tokens = step * cfg.train.grad_accum_steps * cfg.train.micro_batch_size * cfg.train.seq_len
        save_checkpoint(out, step, model, optimizer, tokens=tokens, data_state=batches.state_dict(),
                        lineage=lineage, keep=cfg.train.keep_checkpoints)  # fmt: skip

    summary = train(model, batches, OBJECTIVES["clm"], optimizer, cfg.optim, cfg.train,
                    eval_batches=eval_batches, metrics_path=out / "metrics.jsonl", progress=report,
                    start_step=start_step, start_tokens=start_tokens, save=save)  # fmt: skip

    model_dir = save_model(model.eval(), out / "model")
    tok_dir = Path(tok["path"])
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy2(tok_dir / name, model_dir / name)
    sample = (
        greedy_sample(model, Tokenizer.from_dir(tok_dir), cfg.sample_prompt) if cfg.sample_prompt else None
    )
    counts = np.bincount(train_ids, minlength=config.vocab_size).astype(np.float64)
    unigram = -(
        counts / counts.sum() * np.log(np.maximum(counts / counts.sum(), 1e-12))
    ).sum()  # entropy, nats
    results = {
        "parent": parent,
        "dataset": ds.id,
        "params": n_params,
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "train_loss": summary["loss"],
        "val_loss": summary["val"].get("val_loss", math.nan),
        "unigram_baseline": float(unigram),
        "tokens_per_s": (summary["tokens"] - start_tokens) / max(summary["seconds"], 1e-9),
        "bad_steps": summary["bad_steps"],
        "model_dir": str(model_dir),
        "sample": sample,
    }
    lineage = {"parent": parent, "data": [ds.id], "stage": "pretrain", "config": run_config,
               "lmforge_version": __version__, "seed": cfg.train.seed, "results": results}  # fmt: skip
    atomic_write(model_dir / "lmforge.json", json.dumps(lineage, indent=2) + "\n")
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results
