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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.adapters.base import disable_adapter, parameter_counts
from lmforge.adapters.io import base_fingerprint, save_adapter
from lmforge.adapters.registry import ADAPTER_KINDS
from lmforge.data.auto import ensure_prepared
from lmforge.data.batches import classification_rows, sft_rows
from lmforge.data.dataset import PreparedDataset
from lmforge.data.samplers import EpochSampler, PaddedRows, Rows, Windows, fixed
from lmforge.errors import LmforgeError
from lmforge.eval.qa import exact_match, read_qa
from lmforge.fileio import atomic_write
from lmforge.model.configs import DecoderConfig
from lmforge.model.decoder import CausalLM
from lmforge.model.hf import load_model, read_config, save_model
from lmforge.stages.configs import FinetuneConfig, FinetuneLoop
from lmforge.stages.forgetting import forgetting_gate, forgetting_record, perplexity, reference_batches
from lmforge.stages.run import Output, Plan, Stage, run_stage
from lmforge.tokenizer import Tokenizer
from lmforge.train.activations import checkpoint_activations
from lmforge.train.distributed import Dist
from lmforge.train.loop import evaluate
from lmforge.train.objectives import OBJECTIVES
from lmforge.train.reporting import peak_memory

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

    `out` must be new or empty, or hold a run that `cfg.train.resume` continues or `overwrite` replaces (kept
    until this one ends)."""
    return run_stage(Finetune(cfg, out), overwrite=overwrite)


class Finetune(Stage):
    """Fine-tuning's data builder (SFT rows, domain windows, labelled rows), method and measurements."""

    name = "finetune"
    cfg: FinetuneConfig

    def check(self) -> None:
        """A base model and a dataset are required; loop fields this stage cannot honour are refused."""
        cfg = self.cfg
        if cfg.model is None:
            raise LmforgeError(
                "finetune: model is required (--init-from DIR or --set model=DIR): the base HF dir"
            )
        if cfg.data.dataset is None:
            raise LmforgeError(
                "finetune: data.dataset is required: a prepared dataset directory or a raw data file"
            )
        if cfg.train.strategy != FinetuneLoop().strategy:
            raise LmforgeError(
                f"train.strategy={cfg.train.strategy}: finetune runs in one process (no --nproc yet); leave it "
                f"at its default ({FinetuneLoop().strategy})"
            )

    def build(self, dist: Dist) -> Plan:
        """The data, the base (or a classifier on it) with the method applied, the reference sets."""
        cfg, device = self.cfg, dist.device
        base_dir = self.base_dir = Path(cfg.model)
        ds = PreparedDataset(ensure_prepared(cfg.data.dataset, tokenizer=cfg.data.tokenizer or base_dir))
        kind = ds.manifest["kind"]
        if kind not in DATA_KINDS[cfg.kind]:
            raise LmforgeError(
                f"finetune kind {cfg.kind!r} reads {' or '.join(DATA_KINDS[cfg.kind])} data; {ds.path} holds "
                f"{kind} data (prepare it with the matching --format)"
            )
        classify = self.classify = kind == "classification"
        if classify and cfg.method == "prompt":
            raise LmforgeError(
                "method 'prompt' trains causal LMs; a classifier fine-tunes with full, lora or adapter"
            )
        tokenizer = self.tokenizer = _tokenizer(base_dir, ds)
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
        self.objective = OBJECTIVES["classify" if classify else "clm"]
        self.reference, self.ref_batches = (
            (None, []) if classify else reference_batches(cfg, base_dir, tokenizer)
        )
        groups = set(cfg.eval.qa_groups) if cfg.eval.qa_groups else None
        self.qa = (
            read_qa(cfg.eval.qa, limit=cfg.eval.qa_limit, groups=groups) if cfg.eval.qa is not None else None
        )

        model = _apply_method(cfg, model.to(device), tokenizer, classify).to(device)
        if cfg.train.activation_checkpointing:
            checkpoint_activations(model)
        self.trainable, self.total = trainable, total = parameter_counts(model)
        log.info("finetune %s/%s: %s, %s trainable of %s parameters (%.3f%%)", cfg.kind, cfg.method, base_dir,
                 f"{trainable:,}", f"{total:,}", 100 * trainable / total)  # fmt: skip
        pack = cfg.data.packing and cfg.method != "prompt"  # a prompt-tuned row holds one sample
        train_examples, self.stats = _examples(ds, "train", cfg, tokenizer, pack)
        if train_examples is None:
            raise LmforgeError(f"{ds.path}: the train split is empty")
        val_examples, _ = _examples(ds, "val", cfg, tokenizer, pack)
        self.val = val = _fixed_batches(val_examples, cfg.train.micro_batch_size, cfg.train.eval_batches)
        self.dataset = ds
        lineage = {"kind": cfg.kind, "method": cfg.method, "base_fingerprint": base_fingerprint(base_dir),
                   "forgetting_reference": str(self.reference) if self.ref_batches else None}  # fmt: skip
        return Plan(
            model=model,
            batches=EpochSampler(fixed(train_examples), cfg.train.micro_batch_size, seed=cfg.train.seed),
            objective=self.objective,
            parent=str(base_dir),
            data=[ds.id],
            eval_batches=(lambda: val) if val else None,
            lineage=lineage,
        )

    def before(self, plan: Plan) -> dict[str, Any]:
        """The base model's reference perplexity, validation loss and QA answers (the adapter switched off)."""
        model = plan.model
        with disable_adapter(model):
            return {
                "perplexity": perplexity(model, self.ref_batches) if self.ref_batches else None,
                "val": evaluate(model, self.objective, self.val) if self.val else {},
                "qa": _answer(model, self.tokenizer, self.qa, self.cfg) if self.qa else None,
            }

    def finish(self, plan: Plan, model: nn.Module, summary: dict[str, Any], before: dict[str, Any]) -> Output:
        """Forgetting, accuracy and QA after training; the model or adapter dir."""
        cfg, out, ds, base_dir = self.cfg, self.out, self.dataset, self.base_dir
        model.eval()
        after = perplexity(model, self.ref_batches) if self.ref_batches else None
        forgetting = forgetting_record(before["perplexity"], after, self.reference, self.ref_batches, cfg)
        if self.classify:
            forgetting = {"skipped": "a classifier has no language-model head to measure perplexity with"}
        val_before = before["val"]
        results: dict[str, Any] = {
            "kind": cfg.kind,
            "method": cfg.method,
            "base": str(base_dir),
            "dataset": ds.id,
            "trainable_params": self.trainable,
            "total_params": self.total,
            "trainable_pct": 100 * self.trainable / self.total,
            "steps": summary["steps"],
            "tokens": summary["tokens"],
            "train_loss": summary["loss"],
            "val_loss_before": val_before.get("val_loss", math.nan),
            "val_loss": summary["val"].get("val_loss", math.nan),
            **self.stats,
            "forgetting": forgetting,
            "tokens_per_s": summary["tokens_per_s"],
            "peak_memory_mb": peak_memory(next(model.parameters()).device) / 2**20,
        }
        if self.classify:
            results["val_accuracy_before"] = val_before.get("val_cls_accuracy", math.nan)
            results["val_accuracy"] = summary["val"].get("val_cls_accuracy", math.nan)
            if cfg.eval.dataset is not None:
                results["test"] = _test_accuracy(model, cfg, ds, self.tokenizer)
        if self.qa:
            results["qa"] = {
                "file": str(cfg.eval.qa),
                "before": dict(before["qa"]),
                "after": _answer(model, self.tokenizer, self.qa, cfg),
                "answers": str(out / "qa_answers.jsonl"),
            }
            # Every answer, before and after, beside the results: each figure can be recomputed from it.
            lines = [json.dumps({"when": when, **a}) for when in ("before", "after")
                     for a in results["qa"][when].pop("answers")]  # fmt: skip
            atomic_write(out / "qa_answers.jsonl", "".join(line + "\n" for line in lines))
        model = model.cpu()
        if cfg.method == "full" or self.classify:
            if cfg.method == "lora":  # the new head trains with the adapter: one plain model holds both
                from lmforge.adapters.lora import merge_lora

                model = merge_lora(model)
            target = save_model(model, out / "model")
        else:
            section = ADAPTER_KINDS[cfg.method].section_of(cfg)
            target = save_adapter(model, cfg.method, section, out / "adapter", base_dir)
        results["output"] = str(target)
        return Output(results, target)

    def tokenizer_dir(self) -> Path:
        """The base model's tokenizer."""
        return self.base_dir

    def after(self, results: dict[str, Any]) -> None:
        """The forgetting gate: a run whose reference perplexity rose more than allowed fails (its files kept)."""
        forgetting_gate(results["forgetting"], self.cfg.forgetting.max_increase_pct, self.out)


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
    test = PreparedDataset(
        ensure_prepared(cfg.eval.dataset, tokenizer=Path(tokenizer.path), purpose="eval.dataset")
    )
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
    """The model the method trains: itself (full), or the base with a fresh adapter. A new
    classification head always trains in full (it starts from random weights)."""
    if cfg.method == "full":
        return model.train()
    kind = ADAPTER_KINDS[cfg.method]
    model = kind.apply(model, kind.section_of(cfg), tokenizer)
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
