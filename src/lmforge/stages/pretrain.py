"""`lmforge pretrain`: prepared text + a model (a preset, or `init_from` a HF dir) → the one loop → a HF model
directory with its tokenizer and lineage, with resumable checkpoints in `out/checkpoints` (`--resume` continues
from the newest). Objectives: clm for decoders; mlm, nsp, mlm+nsp for BERT encoders. Several datasets can be
mixed in fixed proportions (continued pretraining with replay of the original data)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.data.auto import ensure_prepared
from lmforge.data.dataset import PreparedDataset
from lmforge.data.samplers import (
    DocumentStream,
    EpochSampler,
    MaskedWindows,
    MaskSpec,
    MixSampler,
    Windows,
    sentence_pairs,
    split_sentences,
    stream_epochs,
)
from lmforge.errors import LmforgeError
from lmforge.model.configs import DecoderConfig, EncoderConfig, preset
from lmforge.model.decoder import CausalLM
from lmforge.model.hf import build_model, load_model, read_config, save_model
from lmforge.stages.configs import PretrainConfig
from lmforge.stages.run import Output, Plan, Stage, run_stage
from lmforge.tokenizer import Tokenizer
from lmforge.train.activations import checkpoint_activations
from lmforge.train.distributed import Dist, consolidate, is_sharded, wrap_model
from lmforge.train.loop import evaluate
from lmforge.train.objectives import OBJECTIVES
from lmforge.train.reporting import flops_per_token, peak_memory

log = logging.getLogger(__name__)
# The head each encoder objective trains (a headless checkpoint gets it freshly initialised).
ENCODER_ARCHITECTURE = {
    "mlm": "BertForMaskedLM",
    "nsp": "BertForPreTraining",
    "mlm+nsp": "BertForPreTraining",
}


def _stream(ds: PreparedDataset, split: str) -> DocumentStream:
    """A split's documents as one token stream in prepared order (+ the loss mask for chat data)."""
    docs = list(ds.documents(split))
    if not docs:
        return DocumentStream(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    ids = np.concatenate([d.ids for d in docs]).astype(np.int64)
    masks = [d.mask for d in docs]
    lengths = np.array([len(d.ids) for d in docs], dtype=np.int64)
    return DocumentStream(ids, lengths, None if masks[0] is None else np.concatenate(masks))


SENTENCE_ENDERS = (".", "!", "?")


class _Examples:
    """Builds the samplers of one objective over prepared datasets (one tokenizer, the run's batch shape)."""

    def __init__(self, cfg: PretrainConfig, tokenizer: Tokenizer, rows: int) -> None:
        self.cfg, self.rows = cfg, rows  # rows: the global micro-batch (per-rank batch x world size)
        self.vocab_size, self.train_counts = tokenizer.vocab_size, None
        self.objective = cfg.objective
        if self.objective == "clm":
            return
        special = tokenizer.special_tokens
        named = {k: tokenizer.token_to_id(special[k]) if k in special else None
                 for k in ("cls_token", "sep_token", "mask_token", "pad_token")}  # fmt: skip
        needed = ["cls_token", "sep_token", "pad_token"] + (["mask_token"] if "mlm" in self.objective else [])
        lacking = [k for k in needed if named[k] is None]
        if lacking:
            raise LmforgeError(
                f"objective {self.objective!r} needs a tokenizer with {', '.join(lacking)} (a WordPiece "
                f"tokenizer: `lmforge tokenizer train --kind wordpiece`); {tokenizer.path} has none"
            )
        self.cls, self.sep, self.pad = named["cls_token"], named["sep_token"], named["pad_token"]
        self.spec = None
        if "mlm" in self.objective:
            self.spec = MaskSpec(tokenizer.vocab_size, named["mask_token"], (self.cls, self.sep, self.pad),
                                 cfg.mlm_rate)  # fmt: skip
        self.enders = [i for t in SENTENCE_ENDERS if (i := tokenizer.token_to_id(t)) is not None]

    def sampler(self, ds: PreparedDataset, split: str, seed: int) -> EpochSampler | None:
        """Micro-batches of a split, or None when it has too little data for one. The first train split read
        leaves its token ids' counts in `self.train_counts` (the baselines), so no split is read twice."""
        T, data = self.cfg.train.seq_len, self.cfg.data
        if self.objective in ("clm", "mlm"):
            stream = _stream(ds, split)
            self._count(split, stream.ids)

            def build(
                ids: np.ndarray, mask: np.ndarray | None, documents: np.ndarray
            ) -> Windows | MaskedWindows:
                if self.objective == "clm":
                    return Windows(ids, T, mask, documents if data.document_mask else None)
                return MaskedWindows(ids, T, self.cls, self.sep, self.spec)

            # Validation reads the same windows every time: only training draws them afresh.
            sampling = data.sampling if split == "train" else "fixed"
            epochs = stream_epochs(stream, build, sampling=sampling, period=T, seed=seed)
        else:  # nsp, mlm+nsp: sentence pairs drawn afresh every epoch
            docs = [split_sentences(d.ids, self.enders) for d in ds.documents(split)]
            self._count(split, np.concatenate([s for d in docs for s in d] or [np.zeros(0, np.int64)]))
            if sum(1 for d in docs if d) < 2:
                return None
            epochs = sentence_pairs(docs, max_len=T, cls_id=self.cls, sep_id=self.sep, pad_id=self.pad,
                                    seed=seed, spec=self.spec)  # fmt: skip
        try:
            return EpochSampler(epochs, self.rows, seed=seed)
        except LmforgeError:
            if split == "train":
                raise
            return None

    def _count(self, split: str, ids: np.ndarray) -> None:
        if split == "train" and self.train_counts is None:
            self.train_counts = np.bincount(ids, minlength=self.vocab_size)


def _build_model(cfg: PretrainConfig, tok: dict[str, Any]) -> tuple[torch.nn.Module, str]:
    """The model to train (a preset, or `init_from` a HF dir) and its lineage parent."""
    architecture = ENCODER_ARCHITECTURE.get(cfg.objective)
    if cfg.model.init_from is not None:
        config, _ = read_config(cfg.model.init_from)
        if architecture is not None and not isinstance(config, EncoderConfig):
            architecture = None  # the objective check below names the problem
        return load_model(cfg.model.init_from, architecture=architecture).train(), str(cfg.model.init_from)
    ids = {"vocab_size": tok["vocab_size"], "pad_token_id": tok["pad_id"]}
    if isinstance(preset(cfg.model.preset), DecoderConfig):
        ids["eos_token_id"] = tok["eos_id"]
    config = preset(cfg.model.preset, **{**ids, **cfg.model.overrides})
    return build_model(config, architecture if isinstance(config, EncoderConfig) else None), (
        f"preset:{cfg.model.preset}"
    )


def _check(
    cfg: PretrainConfig, model: torch.nn.Module, parent: str, tokenizer: Tokenizer, data: Path
) -> None:
    """Refuse a model that cannot train on this data (tokenised by `tokenizer`) with this objective."""
    config = model.config
    decoder = isinstance(config, DecoderConfig)
    if decoder != (cfg.objective == "clm"):
        need = "a decoder (e.g. model.preset=llama-14m)" if cfg.objective == "clm" else (
            "an encoder (e.g. model.preset=bert-mini)")  # fmt: skip
        raise LmforgeError(
            f"pretrain objective {cfg.objective!r} needs {need}; {parent} is a {config.model_type} model"
        )
    if decoder and not isinstance(model, CausalLM):
        raise LmforgeError(
            f"pretrain objective 'clm' needs a causal LM; {parent} holds a {type(model).__name__}"
        )
    init_from = cfg.model.init_from
    if init_from is not None and (Path(init_from) / "tokenizer.json").is_file():
        model_vocab = Tokenizer.from_dir(init_from).backend.get_vocab()
        if model_vocab != tokenizer.backend.get_vocab():
            raise LmforgeError(
                f"{data} was tokenised with {tokenizer.path}, whose vocabulary differs from {init_from}'s "
                f"tokenizer: prepare the data with --tokenizer {init_from}"
            )
    if config.vocab_size < tokenizer.vocab_size:
        raise LmforgeError(
            f"{data} was tokenised with a {tokenizer.vocab_size}-id vocabulary but the model has "
            f"{config.vocab_size} ids: prepare the data with the model's tokenizer"
        )
    if cfg.train.seq_len > config.max_position_embeddings:
        raise LmforgeError(
            f"train.seq_len={cfg.train.seq_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}"
        )


def _baselines(objective: str, counts: np.ndarray) -> dict[str, float]:
    """What a model that ignores the context scores, from the train tokens' counts: unigram entropy (nats)
    and majority-token accuracy."""
    p = counts / max(counts.sum(), 1)
    out = {"unigram_baseline": float(-(p * np.log(np.maximum(p, 1e-12))).sum())}
    if "mlm" in objective:
        out["mlm_accuracy_baseline"] = float(p.max())  # always guessing the most frequent token
    if "nsp" in objective:
        out["nsp_accuracy_baseline"] = 0.5  # the labels are a fair coin
    return out


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


def run_pretrain(cfg: PretrainConfig, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Pretrain (or continue pretraining) and write `out/model` (HF dir), `out/metrics.jsonl`, `out/results.json`.

    `out` must be new or empty, or hold a run that `cfg.train.resume` continues or `overwrite` replaces (kept
    until this one ends). Under torchrun (or `--nproc`) every process runs this; rank 0 writes the files and
    returns the results.
    """
    return run_stage(Pretrain(cfg, out), overwrite=overwrite)


class Pretrain(Stage):
    """Pretraining's data builder (windows or sentence pairs, mixed sources), model and measurements."""

    name = "pretrain"
    distributed = True
    cfg: PretrainConfig

    def check(self) -> None:
        """A dataset is required."""
        if not self.cfg.data.sources():
            raise LmforgeError(
                "pretrain: data.dataset (or data.datasets) is required: a directory written by "
                "`lmforge data prepare`"
            )

    def build(self, dist: Dist) -> Plan:
        """The datasets (one tokenizer), the model (preset or init_from) wrapped for the strategy, the samplers."""
        cfg = self.cfg
        tokenizer = cfg.data.tokenizer or cfg.model.init_from
        datasets = {}
        for name, path in cfg.data.sources().items():  # raw files prepared on first use
            purpose = "data.dataset" if cfg.data.dataset else f"data.datasets.{name}"
            datasets[name] = PreparedDataset(ensure_prepared(path, tokenizer=tokenizer, purpose=purpose))
        first = next(iter(datasets.values()))
        tok = first.manifest["tokenizer"]
        for name, ds in datasets.items():
            if ds.manifest["tokenizer"]["hash"] != tok["hash"]:
                raise LmforgeError(
                    f"data.datasets.{name} ({ds.path}) was prepared with another tokenizer than {first.path}: "
                    "a mix needs one vocabulary (prepare every dataset with the same --tokenizer)"
                )
        self.tokenizer, self.world_size = Tokenizer.from_dir(tok["path"]), dist.world_size
        model, parent = _build_model(cfg, tok)
        _check(cfg, model, parent, self.tokenizer, first.path)
        config = model.config  # (wrapping below hides it behind DDP)
        self.decoder = isinstance(config, DecoderConfig)
        self.n_params = sum(p.numel() for p in model.parameters())
        model = model.to(dist.device)
        if cfg.train.activation_checkpointing:
            checkpoint_activations(model)  # before wrapping: FSDP shards the blocks it finds
        bf16 = cfg.train.autocast == "bf16"
        model = wrap_model(
            model, cfg.train.strategy, dist, bf16=bf16, unused_parameters=cfg.objective == "nsp"
        )

        rows = (
            cfg.train.micro_batch_size * dist.world_size
        )  # the global micro-batch; each rank trains its rows
        self.examples = examples = _Examples(cfg, self.tokenizer, rows)
        samplers = {name: examples.sampler(ds, "train", cfg.train.seed) for name, ds in datasets.items()}
        batches = (
            next(iter(samplers.values())) if len(samplers) == 1 else MixSampler(samplers, cfg.data.weights())
        )
        self.val_sets: dict[str, list] = {}  # source -> fixed validation batches (the same every evaluation)
        for name, ds in datasets.items():
            val = examples.sampler(ds, "val", seed=0)
            if val is not None:
                n = max(1, min(cfg.train.eval_batches, val.n // rows))
                self.val_sets[name] = [next(val) for _ in range(n)]
        every_val = [b for fixed_batches in self.val_sets.values() for b in fixed_batches]
        data_ids = [ds.id for ds in datasets.values()]
        if dist.is_main:
            log.info("pretrain %s: %s (%.1fM params) on %s, %d steps, %d process(es)", cfg.objective, parent,
                     self.n_params / 1e6, ", ".join(i[:12] for i in data_ids), cfg.train.max_steps,
                     dist.world_size)  # fmt: skip
        # Mid-run samples read the local weights: not under FSDP, whose forward is a collective rank 0 cannot
        # run alone.
        self.sampler_model = None if is_sharded(model) else consolidate(model, dist)
        if cfg.sample_every and is_sharded(model) and dist.is_main:
            log.warning("sample_every: no mid-run samples under FSDP (the final sample is still taken)")
        self.tokenizer_path = Path(tok["path"])
        return Plan(
            model=model,
            batches=batches,
            objective=OBJECTIVES[cfg.objective],
            parent=parent,
            data=data_ids,
            eval_batches=(lambda: every_val) if every_val else None,
            flops_per_token=flops_per_token(config, cfg.train.seq_len),
            lineage={"objective": cfg.objective},
            on_record=self._sample,
        )

    def _sample(self, record: dict[str, Any]) -> None:
        """Every `sample_every` steps (decoders): a greedy sample in the log and `samples.jsonl`."""
        cfg, model = self.cfg, self.sampler_model
        step = record["step"]
        if model is None or not (self.decoder and cfg.sample_every and cfg.sample_prompt):
            return
        if "loss" in record and step % cfg.sample_every == 0:
            text = greedy_sample(model, self.tokenizer, cfg.sample_prompt)
            model.train()
            log.info("step %d sample: %s", step, text)
            with open(self.out / "samples.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "prompt": cfg.sample_prompt, "text": text}) + "\n")

    def measure(self, plan: Plan, dist: Dist) -> dict[str, Any]:
        """Continued pretraining: how each source fares (the general one shows forgetting)."""
        if len(self.val_sets) < 2:
            return {}
        return {name: evaluate(plan.model, plan.objective, b, dist=dist) for name, b in self.val_sets.items()}

    def finish(self, plan: Plan, model: nn.Module, summary: dict[str, Any], before: dict[str, Any]) -> Output:
        """The HF model dir, the greedy sample and the results with the unigram baselines."""
        cfg, device = self.cfg, next(model.parameters()).device
        model_dir = save_model(model.eval(), self.out / "model")
        baselines = _baselines(cfg.objective, self.examples.train_counts)
        sample = (
            greedy_sample(model, self.tokenizer, cfg.sample_prompt)
            if self.decoder and cfg.sample_prompt
            else None
        )
        results: dict[str, Any] = {
            "objective": cfg.objective,
            "parent": plan.parent,
            "datasets": plan.data,
            "params": self.n_params,
            "processes": self.world_size,
            "steps": summary["steps"],
            "tokens": summary["tokens"],
            "train_loss": summary["loss"],
            "val_loss": math.nan,
            **summary["val"],
            **baselines,
            "tokens_per_s": summary["tokens_per_s"],
            "mfu": summary["mfu"],
            "peak_memory_mb": peak_memory(device) / 2**20,
            "bad_steps": summary["bad_steps"],
            "model_dir": str(model_dir),
            "sample": sample,
        }
        if summary["measured"]:
            results["val_by_source"] = summary["measured"]
        # The unigram entropy bounds the loss of clm and mlm from above; nsp's loss is another quantity.
        unigram = (
            {"unigram baseline": baselines["unigram_baseline"]} if cfg.objective in ("clm", "mlm") else None
        )
        return Output(results, model_dir, unigram)

    def tokenizer_dir(self) -> Path:
        """The data's tokenizer."""
        return self.tokenizer_path
