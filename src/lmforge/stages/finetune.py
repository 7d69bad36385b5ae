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
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge import __version__
from lmforge.adapters.base import parameter_counts
from lmforge.adapters.io import base_fingerprint, save_adapter
from lmforge.data.batches import classification_rows, sft_rows
from lmforge.data.dataset import PreparedDataset
from lmforge.data.samplers import EpochSampler, PaddedRows, Rows, Windows, fixed
from lmforge.errors import Interrupted, LmforgeError, RunFailed
from lmforge.eval.qa import exact_match, read_qa
from lmforge.fileio import atomic_write
from lmforge.model.configs import DecoderConfig
from lmforge.model.decoder import CausalLM
from lmforge.model.hf import load_model, read_config, save_model
from lmforge.paths import check_run_dir, start_run
from lmforge.stages.configs import FinetuneConfig, FinetuneLoop
from lmforge.tokenizer import Tokenizer, copy_tokenizer
from lmforge.train.activations import checkpoint_activations
from lmforge.train.distributed import training_device
from lmforge.train.loop import evaluate, train
from lmforge.train.objectives import OBJECTIVES
from lmforge.train.optim import build_optimizer
from lmforge.train.reporting import ProgressBar, open_sinks, peak_memory, plot_loss_curve

log = logging.getLogger(__name__)
# The prepared-data kinds each fine-tuning kind reads.
DATA_KINDS = {
    "instruction": ("chat",),
    "chat": ("chat",),
    "domain": ("text", "chat"),
    "task": ("classification", "chat"),
}


def run_finetune(cfg: FinetuneConfig, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.data.dataset`; write `out/model` (full) or `out/adapter`, metrics, results.

    `out` must be new or empty, or hold a run that `overwrite` replaces (kept until this one ends)."""
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
    _refuse_unused_fields(cfg)
    replace = check_run_dir(out, cfg, overwrite)
    base_dir = Path(cfg.model)
    ds = PreparedDataset(cfg.data.dataset)
    kind = ds.manifest["kind"]
    if kind not in DATA_KINDS[cfg.kind]:
        raise LmforgeError(
            f"finetune kind {cfg.kind!r} reads {' or '.join(DATA_KINDS[cfg.kind])} data; {ds.path} holds {kind} "
            f"data (prepare it with the matching --format)"
        )
    classify = kind == "classification"
    if classify and cfg.method == "prompt":
        raise LmforgeError(
            "method 'prompt' trains causal LMs; a classifier fine-tunes with full, lora or adapter"
        )
    tokenizer = _tokenizer(base_dir, ds)
    device = torch.device(training_device(cfg.train.device))
    torch.manual_seed(cfg.train.seed)
    model = _classifier(base_dir, ds) if classify else load_model(base_dir)
    if not classify and not isinstance(model, CausalLM):
        raise LmforgeError(
            f"finetune kind {cfg.kind!r} trains a causal LM; {base_dir} holds a {type(model).__name__}"
        )
    if cfg.train.seq_len > model.config.max_position_embeddings:
        raise LmforgeError(
            f"train.seq_len={cfg.train.seq_len} exceeds {base_dir}'s max_position_embeddings="
            f"{model.config.max_position_embeddings}"
        )
    model = model.to(device)
    objective = OBJECTIVES["classify" if classify else "clm"]
    reference, ref_batches = (None, []) if classify else _reference_batches(cfg, base_dir, tokenizer)
    before = _perplexity(model, ref_batches) if ref_batches else None
    groups = set(cfg.eval.qa_groups) if cfg.eval.qa_groups else None
    qa = read_qa(cfg.eval.qa, limit=cfg.eval.qa_limit, groups=groups) if cfg.eval.qa is not None else None
    qa_before = _answer(model, tokenizer, qa, cfg) if qa else None

    model = _apply_method(cfg, model, tokenizer, classify).to(device)
    if cfg.train.activation_checkpointing:
        checkpoint_activations(model)
    trainable, total = parameter_counts(model)
    log.info("finetune %s/%s: %s, %s trainable of %s parameters (%.3f%%)", cfg.kind, cfg.method, base_dir,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)  # fmt: skip
    pack = cfg.data.packing and cfg.method != "prompt"  # a prompt-tuned row holds one sample
    train_examples, stats = _examples(ds, "train", cfg, tokenizer, pack)
    if train_examples is None:
        raise LmforgeError(f"{ds.path}: the train split is empty")
    batches = EpochSampler(fixed(train_examples), cfg.train.micro_batch_size, seed=cfg.train.seed)
    val_examples, _ = _examples(ds, "val", cfg, tokenizer, pack)
    val = _fixed_batches(val_examples, cfg.train.micro_batch_size, cfg.train.eval_batches)
    val_before = evaluate(model, objective, val) if val else {}
    optimizer = build_optimizer(model, cfg.optim, device.type)
    run_dir = start_run(out, cfg, replace)  # the inputs are checked: only now is anything written
    run_config = json.loads(cfg.model_dump_json())

    with ExitStack() as stack:
        bar = stack.enter_context(ProgressBar(cfg.train.max_steps, 0))
        sinks = stack.enter_context(open_sinks(cfg.train.report_to, out, run_config))

        def report(record: dict[str, Any]) -> None:
            bar(record)
            sinks(record)

        try:
            summary = train(model, batches, objective, optimizer, cfg.optim, cfg.train,
                            eval_batches=(lambda: val) if val else None, metrics_path=out / "metrics.jsonl",
                            progress=report)  # fmt: skip
        except Interrupted as stop:  # no checkpoints: the only way on is a new run
            raise Interrupted(f"{stop}; a finetune run is not resumable: run the same command again with "
                              f"--overwrite to start {out} afresh", stop.step) from stop  # fmt: skip
    model.eval()
    after = _perplexity(model, ref_batches) if ref_batches else None
    forgetting = _forgetting(before, after, reference, ref_batches, cfg)
    if classify:
        forgetting = {"skipped": "a classifier has no language-model head to measure perplexity with"}
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
        "val_loss_before": val_before.get("val_loss", math.nan),
        "val_loss": summary["val"].get("val_loss", math.nan),
        **stats,
        "forgetting": forgetting,
        "tokens_per_s": summary["tokens"] / max(summary["seconds"], 1e-9),
        "peak_memory_mb": peak_memory(device) / 2**20,
    }
    if classify:
        results["val_accuracy_before"] = val_before.get("val_cls_accuracy", math.nan)
        results["val_accuracy"] = summary["val"].get("val_cls_accuracy", math.nan)
        if cfg.eval.dataset is not None:
            results["test"] = _test_accuracy(model, cfg, ds, tokenizer)
    if qa:
        results["qa"] = {
            "file": str(cfg.eval.qa),
            "before": qa_before,
            "after": _answer(model, tokenizer, qa, cfg),
            "answers": str(out / "qa_answers.jsonl"),
        }
        # Every answer, before and after, beside the results: each figure can be recomputed from it.
        lines = [json.dumps({"when": when, **a}) for when in ("before", "after")
                 for a in results["qa"][when].pop("answers")]  # fmt: skip
        atomic_write(out / "qa_answers.jsonl", "".join(line + "\n" for line in lines))
    lineage = {"parent": str(base_dir), "base_fingerprint": base_fingerprint(base_dir), "data": [ds.id],
               "stage": "finetune", "kind": cfg.kind, "method": cfg.method, "config": run_config,
               "forgetting_reference": forgetting.get("reference"), "lmforge_version": __version__,
               "seed": cfg.train.seed, "results": results}  # fmt: skip
    model = model.cpu()
    if cfg.method == "full" or classify:
        if cfg.method == "lora":  # the new head trains with the adapter: one plain model holds both
            from lmforge.adapters.lora import merge_lora

            model = merge_lora(model)
        target = save_model(model, out / "model")
    else:
        target = save_adapter(model, cfg, out / "adapter", base_dir)
    copy_tokenizer(base_dir, target)
    results["output"] = str(target)
    atomic_write(target / "lmforge.json", json.dumps(lineage, indent=2) + "\n")
    title = f"{out.name}: finetune {cfg.kind}/{cfg.method} of {base_dir}"
    plot_loss_curve(out / "metrics.jsonl", out / "loss.png", title=title)
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    run_dir.done()
    limit = cfg.forgetting.max_increase_pct
    if limit is not None and "increase_pct" in forgetting and forgetting["increase_pct"] > limit:
        raise RunFailed(
            f"forgetting gate: reference perplexity rose {forgetting['increase_pct']:.2f}% "
            f"({forgetting['perplexity_before']:.3f} → {forgetting['perplexity_after']:.3f}), more than the "
            f"allowed {limit}% (forgetting.max_increase_pct / --max-forgetting); the outputs are in {out}"
        )
    return results


def _refuse_unused_fields(cfg: FinetuneConfig) -> None:
    """Loop fields that only pretraining's multi-process, checkpointed runs use: a value other than the default
    would be silently ignored here, so it is refused."""
    defaults = FinetuneLoop()
    unused = {
        "strategy": "finetune runs in one process (no --nproc yet)",
        "checkpoint_every": "finetune writes no resumable checkpoints yet (its model or adapter is written at the "
        "end; an interrupted run starts again with --overwrite)",
        "keep_checkpoints": "finetune writes no resumable checkpoints yet",
    }
    for field, why in unused.items():
        value = getattr(cfg.train, field)
        if value != getattr(defaults, field):
            raise LmforgeError(
                f"train.{field}={value}: {why}; leave it at its default ({getattr(defaults, field)})"
            )


def _classifier(base_dir: Path, ds: PreparedDataset) -> nn.Module:
    """The base loaded under a sequence-classification head sized for the dataset's labels (a fresh head)."""
    from lmforge.model.decoder import DecoderForSequenceClassification

    config, _ = read_config(base_dir)
    labels = ds.manifest.get("labels") or {}
    if not labels:
        raise LmforgeError(f"{ds.path}: classification data without labels in its manifest: prepare it again")
    if isinstance(config, DecoderConfig):
        architecture = DecoderForSequenceClassification.architectures[config.model_type]
    else:
        architecture = "BertForSequenceClassification"
    return load_model(base_dir, architecture=architecture, id2label={int(i): n for i, n in labels.items()})


def _fixed_batches(examples: Rows | None, size: int, most: int) -> list[dict]:
    """The first `most` micro-batches of `examples` in order (the same every evaluation)."""
    if examples is None or len(examples) == 0:
        return []
    n = min(len(examples), most * size)
    return [examples.batch(np.arange(i, min(i + size, n)), torch.Generator()) for i in range(0, n, size)]


def _test_accuracy(model: nn.Module, cfg: FinetuneConfig, ds: PreparedDataset, tokenizer: Tokenizer) -> dict:
    """Accuracy on every split of the `eval.dataset` test set, with the majority-class baseline."""
    test = PreparedDataset(cfg.eval.dataset)
    if (
        test.manifest["kind"] != "classification"
        or test.manifest["tokenizer"]["hash"] != ds.manifest["tokenizer"]["hash"]
    ):
        raise LmforgeError(
            f"eval.dataset {test.path}: expected classification data prepared with {ds.path}'s tokenizer"
        )
    docs = [d for split in ("train", "val") for d in test.documents(split)]
    docs.sort(key=lambda d: len(d.ids))  # batches of similar length: little padding, the same accuracy
    rows = PaddedRows(
        classification_rows([(d.ids, d.label) for d in docs], cfg.train.seq_len, _pad(tokenizer))
    )
    metrics = evaluate(model, OBJECTIVES["classify"], _fixed_batches(rows, 64, len(docs)))
    counts = np.bincount([d.label for d in docs])
    return {"dataset": test.id, "examples": len(docs), "accuracy": metrics["val_cls_accuracy"],
            "majority_baseline": float(counts.max() / counts.sum())}  # fmt: skip


def _answer(model: nn.Module, tokenizer: Tokenizer, items: list, cfg: FinetuneConfig) -> dict:
    """Exact-match accuracy of the model's greedy answers to `items` (evaluation mode, restored after)."""
    from lmforge.infer.engine import Engine

    was_training = model.training
    result = exact_match(Engine(model.eval(), tokenizer), items, max_new_tokens=cfg.eval.max_new_tokens)
    model.train(was_training)
    return result


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


def _apply_method(cfg: FinetuneConfig, model: nn.Module, tokenizer: Tokenizer, classify: bool) -> nn.Module:
    """The model the method trains: itself (full), or the base wrapped with a fresh adapter. A new
    classification head always trains in full (it starts from random weights)."""
    if cfg.method == "full":
        return model.train()
    if cfg.method == "lora":
        from lmforge.adapters.lora import apply_lora

        model = apply_lora(model, cfg.lora)
    elif cfg.method == "adapter":
        from lmforge.adapters.bottleneck import apply_bottleneck

        model = apply_bottleneck(model, cfg.adapter)
    else:
        from lmforge.adapters.prompt import apply_prompt_tuning

        model = apply_prompt_tuning(model, cfg.prompt, tokenizer)
    if classify:
        head = model.score if hasattr(model, "score") else model.classifier
        head.requires_grad_(True)
    return model.train()


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
    if ds.manifest["kind"] == "classification":
        cut = sum(len(d.ids) > T for d in docs)
        rows = classification_rows([(d.ids, d.label) for d in docs], T, _pad(tokenizer))
        return PaddedRows(rows, group_by_length=cfg.data.group_by_length), (
            {"samples": len(docs), "truncated_samples": cut} if split == "train" else {})  # fmt: skip
    if not any(d.mask is not None and d.mask.any() for d in docs):
        raise LmforgeError(f"{ds.path} ({split}): no sample has an assistant turn to train on")
    samples = [(d.ids, d.mask) for d in docs]
    rows, counts = sft_rows(samples, T, _pad(tokenizer), pack=pack)
    if len(rows["input_ids"]) == 0:
        raise LmforgeError(f"{ds.path} ({split}): no sample has a reply token within its first train.seq_len={T} "
                           "tokens: raise train.seq_len")  # fmt: skip
    stats = {"samples": len(samples), "rows": len(rows["input_ids"]), "truncated_samples": counts["cut"],
             "untrained_samples_dropped": counts["dropped"], "row_fill": counts["tokens"] / rows["input_ids"].numel(),
             "trained_tokens": int((rows["targets"] != -100).sum())}  # fmt: skip
    if split == "train":
        log.info("%s: %d samples in %d rows of %d (%.0f%% filled, %d cut to fit, %d left out: no reply token "
                 "within the first %d)", ds.path, len(samples), stats["rows"], T, 100 * stats["row_fill"],
                 counts["cut"], counts["dropped"], T)  # fmt: skip
    return Rows(rows), stats if split == "train" else {}


def _pad(tokenizer: Tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


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
