"""Alignment, lmforge `align` vs TRL's trainers, on the same model, data, batch and precision, in one run.

  python bench/align.py [--preset llama-14m] [--batch 8] [--seq-len 128] [--steps 4] [--warmup 1]
                        [--repeats 2] [--benches dpo-lora,dpo-full,grpo,reward] [--device cpu|cuda]
                        [--dtype fp32|bf16]

Benches, lmforge against each TRL variant named:
- dpo-lora: `lmforge align` method dpo, tuning lora (the reference log-probs computed once before the first
  step, with the adapter switched off), against `DPOTrainer` with a peft `LoraConfig` (TRL's default: a
  reference forward with the adapter disabled in every step) and with `precompute_ref_log_probs=True`.
- dpo-full: tuning full (lmforge: the reference log-probs computed once before the first step), against
  `DPOTrainer` with its default reference (a second copy of the model, a forward in every step) and with
  `precompute_ref_log_probs=True`.
- grpo: method grpo, tuning lora, against `GRPOTrainer` with the same `LoraConfig`: --prompts prompts a step,
  --samples completions each (TRL's num_generations), --new-tokens tokens at most (max_completion_length),
  temperature 1, clip 0.2, KL coefficient 0.05 (TRL's beta, whose default 0 drops the reference), one
  optimizer step per rollout (num_iterations 1), TRL's default loss "dapo" (a token mean over the step, as
  lmforge's), and the same Python reward (`reward_score`: words in the completion, capped at 20).
- reward: method reward, tuning full (a Bradley-Terry scalar head on the decoder), against `RewardTrainer`.

Model: the preset built by lmforge from seed 0 (llama-14m: d 384, 6 layers, vocab 8192, tied embeddings),
saved as a HF directory with a byte-level BPE (vocab 4096) trained on the pairs' texts and lmforge's ChatML
template; TRL loads it with `transformers` (SDPA attention). Data: HH-RLHF harmless-base pairs
(../shared/data/hh_rlhf), the first whose chosen and rejected conversations both fit in --seq-len tokens,
(--warmup + --steps) x --batch of them, so a run is one epoch. lmforge gets them prepared (`data prepare`, no
validation split, no dedup), TRL the same records as conversations in lmforge's epoch order (a sequential
sampler): step i of either library trains on the same pairs. GRPO prompts: the synthetic world's held-out
questions (`synthesize`, eval_qa.jsonl). Both libraries: fused AdamW (betas 0.9/0.95, eps 1e-8, no weight
decay), lr --lr, constant, no warm-up, clipping to norm 1.0, micro-batch --batch (GRPO: --prompts x --samples
completions), no gradient accumulation or checkpointing, no evaluation, no saving; TRL logs every step
(logging_steps=1), as lmforge's loop does. LoRA: r 16, alpha 32, no dropout, on q/k/v/o/gate/up/down.
Precision: fp32, or (--dtype bf16) bf16 autocast over fp32 weights: lmforge `train.autocast=bf16`, TRL
`bf16=True`.

Timing: every run is a fresh process, run after run: lmforge, TRL, TRL' (reversed every other repeat), so
drift in the machine's load hits both; --repeats rounds. A step's time is the wall time between the ends of
consecutive optimizer steps (lmforge: metrics.jsonl `elapsed`, written every step; TRL: a callback's
`on_step_end`, after `torch.cuda.synchronize()` on a GPU), so fetching batches, rollouts (GRPO) and each
library's logging count, setup (loading, tokenising, precomputing reference log-probs) does not. The first
--warmup steps are left out; a run's figure is the median of its timed steps; a TRL variant's speed-up in a
repeat is its figure over lmforge's in the same repeat, and the table gives the median over repeats.
Memory, the peak of a whole run over what the process held before loading the model (model, reference,
optimizer, data, steps): on CUDA `torch.cuda.max_memory_allocated()` of the timed runs (median); on the CPU
one more run of each variant, 2 steps, with glibc's mmap threshold fixed (`MEMORY_ENV`), its peak RSS
(VmHWM) minus its RSS before loading. Tokens/s: the real tokens of the timed steps' pairs (chosen and rejected
conversations, as lmforge renders them; the same pairs on both sides), GRPO: the completion tokens each
library generated.
Writes one JSON line per bench to bench/results/align.jsonl and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_machine, lmforge_revision

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh_rlhf" / "harmless_base_test.jsonl"
RESULTS = ROOT / "bench" / "results" / "align.jsonl"
VOCAB = 4096
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 16, 32
BETAS, EPS, CLIP = (0.9, 0.95), 1e-8, 1.0
DPO_BETA, RL_CLIP, KL_COEF = 0.1, 0.2, 0.05

# bench -> its variants, lmforge's first; the others are compared with it.
BENCHES = {
    "dpo-lora": ["lmforge-dpo-lora", "trl-dpo-lora", "trl-dpo-lora-precompute"],
    "dpo-full": ["lmforge-dpo-full", "trl-dpo-full", "trl-dpo-full-precompute"],
    "grpo": ["lmforge-grpo", "trl-grpo"],
    "reward": ["lmforge-reward", "trl-reward"],
}
DESCRIBE = {
    "lmforge-dpo-lora": "lmforge, LoRA, reference log-probs once (adapter off)",
    "trl-dpo-lora": "TRL DPOTrainer + peft, reference forward each step (adapter off)",
    "trl-dpo-lora-precompute": "TRL DPOTrainer + peft, precompute_ref_log_probs",
    "lmforge-dpo-full": "lmforge, full, reference log-probs once",
    "trl-dpo-full": "TRL DPOTrainer, full, reference model copy (default)",
    "trl-dpo-full-precompute": "TRL DPOTrainer, full, precompute_ref_log_probs",
    "lmforge-grpo": "lmforge GRPO, LoRA (engine rollouts)",
    "trl-grpo": "TRL GRPOTrainer + peft (transformers generate)",
    "lmforge-reward": "lmforge reward model, full",
    "trl-reward": "TRL RewardTrainer, full",
}


# ------------------------------------------------------------------------------------------------ reward


def reward_score(text: str) -> float:
    """The GRPO bench's reward: words in the completion, capped at 20, over 20 (cheap, and it varies)."""
    return min(len(text.split()), 20) / 20


def lmforge_reward(item: Any, completion: str, finished: bool) -> float:
    """`reward_score` as lmforge's `rl.reward` (`align:lmforge_reward`, this file imported as `align`)."""
    return reward_score(completion)


def trl_reward(completions: list, **kwargs: Any) -> list[float]:
    """`reward_score` as a TRL reward function (conversational completions: the assistant message)."""
    return [reward_score(c[-1]["content"] if isinstance(c, list) else c) for c in completions]


# ------------------------------------------------------------------------------------------------ setup


def prepare(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Tokenizer, model, pairs (prepared for lmforge, as records for TRL) and prompts in `workdir`; the setup."""
    import numpy as np
    import torch

    from lmforge.chat import render_chat
    from lmforge.data.dataset import PreparedDataset
    from lmforge.data.formats import to_examples
    from lmforge.data.prepare import PrepareConfig
    from lmforge.data.prepare import prepare as prepare_data
    from lmforge.data.readers import read_records
    from lmforge.data.synthetic import synthesize
    from lmforge.model.configs import preset
    from lmforge.model.hf import build_model, save_model
    from lmforge.tokenizer import Tokenizer, copy_tokenizer, train_tokenizer

    pairs = list(to_examples(read_records(HH), "hh_rlhf"))
    texts = [m["content"] for p in pairs for m in p.messages] + [
        t for p in pairs for t in (p.chosen, p.rejected)
    ]
    train_tokenizer(texts, "bpe", VOCAB, workdir / "tokenizer")
    tok = Tokenizer.from_dir(workdir / "tokenizer")

    # Pairs whose chosen and rejected conversations both fit in seq_len, in file order: one epoch of steps.
    n = args.batch * (args.warmup + args.steps)
    records, lengths = [], []
    for p in pairs:
        rows = [
            render_chat(tok, [*p.messages, {"role": "assistant", "content": r}]).ids
            for r in (p.chosen, p.rejected)
        ]
        if max(map(len, rows)) <= args.seq_len:
            records.append({"prompt": list(p.messages), "chosen": [{"role": "assistant", "content": p.chosen}],
                            "rejected": [{"role": "assistant", "content": p.rejected}]})  # fmt: skip
            lengths.append([len(r) for r in rows])
        if len(records) == n:
            break
    if len(records) < n:
        sys.exit(f"only {len(records)} HH-RLHF pairs fit in --seq-len {args.seq_len}; {n} needed")
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    prepare_data(PrepareConfig(inputs=[workdir / "pairs.jsonl"], tokenizer=workdir / "tokenizer", val_fraction=0.0,
                               dedup="off", pii="off", num_proc=1), workdir / "pairs")  # fmt: skip
    chosen = [d.ids.tolist() for d in PreparedDataset(workdir / "pairs").documents("train", "chosen")]
    if [len(c) for c in chosen] != [c for c, _ in lengths]:
        sys.exit("the prepared pairs are not the records in file order: TRL's order would not be lmforge's")
    # lmforge's EpochSampler draws epoch 0 as this permutation (data/samplers.py); TRL gets the records so.
    order = np.random.default_rng([0, 0]).permutation(n).tolist()

    world = synthesize(workdir / "world")["out"]
    questions = [json.loads(line) for line in (Path(world) / "eval_qa.jsonl").read_text().splitlines()]
    k = args.prompts * (args.warmup + args.steps)
    (workdir / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": q["messages"][:-1]}) + "\n" for q in questions[:k]), encoding="utf-8"
    )

    torch.manual_seed(0)
    ids = {"pad_token_id": tok.pad_id, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    model = build_model(preset(args.preset, **ids))
    save_model(model, workdir / "model")
    copy_tokenizer(workdir / "tokenizer", workdir / "model")
    params = sum(p.numel() for p in model.parameters())
    step_pairs = [
        [order[i] for i in range(s * args.batch, (s + 1) * args.batch)] for s in range(n // args.batch)
    ]
    setup = {"pairs": n, "order": order, "params": params, "vocab": tok.vocab_size,
             # real tokens of each step's pairs (chosen + rejected rows), and the positions lmforge computes:
             # both rows of every pair padded to the step's longest
             "step_tokens": [sum(sum(lengths[i]) for i in s) for s in step_pairs],
             "step_positions": [2 * len(s) * max(max(lengths[i]) for i in s) for s in step_pairs],
             "mean_pair_tokens": float(np.mean([sum(x) for x in lengths])), "prompts": k}  # fmt: skip
    (workdir / "setup.json").write_text(json.dumps(setup))
    return setup


# ------------------------------------------------------------------------------------------------ memory


def rss_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def memory_start(device: str) -> float:
    """Start measuring the peak: CUDA's peak counter, or the RSS high-water mark reset to the RSS now (MB)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    base = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return base


def memory_peak(device: str, base: float) -> float:
    """The peak since `memory_start`, above what was there then (MB)."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20 - base
    return rss_mb("VmHWM") - base


# ------------------------------------------------------------------------------------------------ workers


def lmforge_config(variant: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The `AlignConfig` of a lmforge variant, as the fields a recipe would give."""
    method = variant.split("-")[1]
    cfg: dict[str, Any] = {
        "method": method,
        "model": str(workdir / "model"),
        "tuning": "full" if variant.endswith("full") or method == "reward" else "lora",
        "train": {"max_steps": args.warmup + args.steps, "micro_batch_size": args.batch, "grad_accum_steps": 1,
                  "seq_len": args.seq_len, "eval_every": 0, "log_every": 1, "device": args.device,
                  "autocast": "bf16" if args.dtype == "bf16" else "off", "seed": 0},
        "optim": {"lr": args.lr, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0, "betas": BETAS,
                  "eps": EPS, "grad_clip": CLIP},
    }  # fmt: skip
    if cfg["tuning"] == "lora":  # a config refuses the settings of what it does not train
        cfg["lora"] = {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0.0, "target_modules": LORA_TARGETS}
    if method == "dpo":
        cfg["beta"] = DPO_BETA
    if method == "grpo":
        cfg["data"] = {"prompts": str(workdir / "prompts.jsonl")}
        cfg["train"]["micro_batch_size"] = args.prompts * args.samples
        cfg["rl"] = {"reward": ["align:lmforge_reward"], "samples": args.samples, "max_new_tokens": args.new_tokens,
                     "epochs": 1, "clip": RL_CLIP, "kl_coef": KL_COEF}  # fmt: skip
    else:
        cfg["data"] = {"dataset": str(workdir / "pairs")}
    return cfg


def lmforge_worker(variant: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`run_align` on the variant's config; step times from its metrics.jsonl."""
    import lmforge.infer.engine  # noqa: F401  (imported before the memory baseline, as TRL's modules are)
    from lmforge.stages.align import run_align
    from lmforge.stages.configs import AlignConfig

    cfg = AlignConfig(**lmforge_config(variant, workdir, args))
    out = workdir / f"run-{variant}-{os.getpid()}"
    base = memory_start(args.device)
    results = run_align(cfg, out)
    peak = memory_peak(args.device, base)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss" in r]
    ends, tokens = [r["elapsed"] for r in steps], [0] + [r["tokens"] for r in steps]
    record = {
        "seconds": [b - a for a, b in pairwise(ends)][args.warmup - 1 :],
        "losses": [r["loss"] for r in steps],
        "peak_mb": peak,
        "trainable": results["trainable_params"],
        "positions": [b - a for a, b in pairwise(tokens)],  # each step's, padding included
    }
    if variant == "lmforge-grpo":
        record["completion_tokens"] = [r["rollout/completion_tokens"] for r in steps][args.warmup :]
    shutil.rmtree(out)
    return record


def trl_worker(variant: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The variant's TRL trainer on the same model and data; step times from an `on_step_end` callback."""
    import logging

    import torch
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer

    logging.getLogger("trl").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    setup = json.loads((workdir / "setup.json").read_text())
    model_dir = workdir / "model"
    total = args.warmup + args.steps
    common = dict(
        output_dir=str(workdir / f"trl-{os.getpid()}"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=total, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS,
        max_grad_norm=CLIP, optim="adamw_torch_fused", gradient_checkpointing=False, bf16=args.dtype == "bf16",
        use_cpu=args.device == "cpu", logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM")  # fmt: skip
    pairs = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    pairs = Dataset.from_list([pairs[i] for i in setup["order"]])  # lmforge's epoch order, read sequentially
    tok = AutoTokenizer.from_pretrained(model_dir)
    marks: list[float] = []
    logged: list[dict[str, float]] = []  # every step's log (logging_steps=1)
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not marks:
                sync()
                marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                logged.append(dict(logs))

    base = memory_start(args.device)
    load = dict(attn_implementation="sdpa", dtype=torch.float32)
    if variant.startswith("trl-dpo"):
        cfg = DPOConfig(**common, train_sampling_strategy="sequential", max_length=args.seq_len, beta=DPO_BETA,
                        loss_type=["sigmoid"], precompute_ref_log_probs=variant.endswith("precompute"))  # fmt: skip
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, **load), args=cfg,
                             train_dataset=pairs, processing_class=tok,
                             peft_config=lora if "-lora" in variant else None, callbacks=[Timer()])  # fmt: skip
    elif variant == "trl-reward":
        cfg = RewardConfig(**common, train_sampling_strategy="sequential", max_length=args.seq_len)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, **load)
        trainer = RewardTrainer(
            model=model, args=cfg, train_dataset=pairs, processing_class=tok, callbacks=[Timer()]
        )
    else:
        prompts = [json.loads(line) for line in (workdir / "prompts.jsonl").read_text().splitlines()]
        cfg = GRPOConfig(**{**common, "per_device_train_batch_size": args.prompts * args.samples},
                         num_generations=args.samples, max_completion_length=args.new_tokens, temperature=1.0,
                         beta=KL_COEF, epsilon=RL_CLIP, num_iterations=1, loss_type="dapo", scale_rewards="group")  # fmt: skip
        trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, **load), reward_funcs=trl_reward,
                              args=cfg, train_dataset=Dataset.from_list(prompts), processing_class=tok,
                              peft_config=lora, callbacks=[Timer()])  # fmt: skip
    trainer.train()
    peak = memory_peak(args.device, base)
    seconds = [b - a for a, b in pairwise(marks)]
    record = {"seconds": seconds[args.warmup :], "losses": [r["loss"] for r in logged], "peak_mb": peak,
              "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}  # fmt: skip
    if variant == "trl-grpo":
        record["completion_tokens"] = [r["completions/mean_length"] for r in logged][args.warmup :]
    return record


# glibc's mmap threshold fixed at 64 KiB for the memory runs, so freed tensors go back to the OS and the peak RSS
# is what was live (as bench/finetune.py): at the default, glibc keeps freed memory and the peak of lmforge's
# DPO-LoRA run was 1,120 MB against 578 MB live; the setting slows steps, hence separate runs.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_worker(variant: str, workdir: Path, args: argparse.Namespace, memory: bool = False) -> dict[str, Any]:
    """One run of `variant` in a fresh process, timed (--warmup + --steps steps) or for memory (2 steps); its
    record."""
    keys = ("preset", "batch", "seq_len", "lr", "prompts", "samples", "new_tokens", "device", "dtype")
    cmd = [sys.executable, __file__, "--worker", variant, "--workdir", str(workdir)]
    cmd += [x for k in keys for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    cmd += (
        ["--warmup", "1", "--steps", "1"]
        if memory
        else ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    )
    t0 = time.perf_counter()
    out = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, **MEMORY_ENV} if memory else None
    )
    if out.returncode:
        sys.exit(f"worker {variant} failed:\n{out.stderr[-6000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["wall_s"] = time.perf_counter() - t0
    what = "memory run" if memory else f"median step {statistics.median(record['seconds']):.2f} s"
    print(
        f"  {variant}: {record['wall_s']:.0f} s, {what}, peak {record['peak_mb']:,.0f} MB",
        file=sys.stderr,
        flush=True,
    )
    return record


# ------------------------------------------------------------------------------------------------ report


def summarise(bench: str, runs: dict[str, list[dict]], memory: dict[str, dict], setup: dict,
              args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """Per variant: median step seconds, rates and peak memory over the repeats, and the memory run's peak; per
    TRL variant: the speed-up of each repeat (its step time over lmforge's) and their median, and the ratio of
    peaks (the memory runs' on the CPU, the timed runs' median on CUDA). Ratios > 1 favour lmforge."""
    ours = BENCHES[bench][0]
    units = args.prompts * args.samples if bench == "grpo" else args.batch
    timed = slice(args.warmup, args.warmup + args.steps)
    out: dict[str, Any] = {
        "bench": bench,
        "unit": "completions" if bench == "grpo" else "pairs",
        "variants": {},
    }
    for v, records in runs.items():
        steps = [statistics.median(r["seconds"]) for r in records]
        if bench == "grpo":  # generated tokens of the timed steps, each library's own completions
            tokens = [units * sum(r["completion_tokens"]) / sum(r["seconds"]) for r in records]
        else:  # the same pairs in the same order on both sides: real tokens of the timed steps
            tokens = [sum(setup["step_tokens"][timed]) / sum(r["seconds"]) for r in records]
        peaks = [r["peak_mb"] for r in records]
        row = out["variants"][v] = {
            "describe": DESCRIBE[v], "step_s": steps, "median_step_s": statistics.median(steps),
            "units_per_s": units / statistics.median(steps), "tokens_per_s": statistics.median(tokens),
            "timed_peak_mb": peaks, "peak_mb": memory[v]["peak_mb"] if v in memory else statistics.median(peaks),
            "first_loss": [r["losses"][0] for r in records], "trainable": records[0]["trainable"],
            "wall_s": [r["wall_s"] for r in records], "seconds": [r["seconds"] for r in records],
        }  # fmt: skip
        if bench == "grpo":
            row["completion_tokens"] = [statistics.mean(r["completion_tokens"]) for r in records]
        if v != ours:
            lm = out["variants"][ours]
            row["speedup_per_repeat"] = [a / b for a, b in zip(steps, lm["step_s"], strict=True)]
            row["speedup"] = statistics.median(row["speedup_per_repeat"])
            row["memory_ratio"] = row["peak_mb"] / lm["peak_mb"]
    if bench != "grpo":  # lmforge's positions per step against the ones its epoch order predicts
        out["order_check"] = all(r["positions"] == setup["step_positions"][: len(r["positions"])]
                                 for r in runs[ours])  # fmt: skip
    return out


def table(summaries: list[dict], args: argparse.Namespace, device: str) -> None:
    cuda = args.device == "cuda"
    mem = "peak MB (max_memory_allocated)" if cuda else "peak RSS added, MB (memory run)"
    print(f"\n{device}; {args.preset}, {args.dtype}; medians of {args.repeats} runs each, {args.steps} timed steps a "
          f"run after {args.warmup} warm-up\n")  # fmt: skip
    print(
        f"| bench | variant | s/step | units/s | tokens/s | lmforge speed-up | {mem} | TRL/lmforge memory |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for s in summaries:
        for r in s["variants"].values():
            speed = f"**{r['speedup']:.2f}x**" if "speedup" in r else "—"
            memory = f"{r['memory_ratio']:.2f}x" if "memory_ratio" in r else "—"
            print(f"| {s['bench']} | {r['describe']} | {r['median_step_s']:.2f} | {r['units_per_s']:.1f} {s['unit']} | "
                  f"{r['tokens_per_s']:,.0f} | {speed} | {r['peak_mb']:,.0f} | {memory} |")  # fmt: skip
    what = "peak MB" if cuda else "peak RSS added in the timed runs (default malloc), MB"
    print(
        f"\nper variant, run by run: step s (median of its timed steps); {what}; first loss; trainable parameters"
    )
    for s in summaries:
        for v, r in s["variants"].items():
            ratio = (
                f"; speed-up {', '.join(f'{x:.2f}' for x in r['speedup_per_repeat'])}"
                if "speedup" in r
                else ""
            )
            extra = (
                f"; completion tokens {', '.join(f'{x:.1f}' for x in r['completion_tokens'])}"
                if "completion_tokens" in r
                else ""
            )
            print(f"- {v}: {', '.join(f'{x:.2f}' for x in r['step_s'])}; {', '.join(f'{x:,.0f}' for x in r['timed_peak_mb'])}; "
                  f"{', '.join(f'{x:.4f}' for x in r['first_loss'])}; {r['trainable']:,}{ratio}{extra}")  # fmt: skip
        if s.get("order_check") is False:
            print(
                f"  warning: {s['bench']}: lmforge's batches are not the predicted epoch order (TRL's order differs)"
            )


def machine(args: argparse.Namespace) -> str:
    import torch

    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return cpu_machine(torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-14m")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (dpo, reward)")
    parser.add_argument(
        "--seq-len", type=int, default=128, help="longest pair row (prompt + reply), in tokens"
    )
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, interleaved")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--prompts", type=int, default=4, help="grpo: prompts per step")
    parser.add_argument(
        "--samples", type=int, default=4, help="grpo: completions per prompt (num_generations)"
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="grpo: max completion length")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights"
    )
    parser.add_argument(
        "--benches", default=",".join(BENCHES), help=f"comma-separated, from: {', '.join(BENCHES)}"
    )
    parser.add_argument(
        "--variants", default="", help="only these variants (lmforge's of each bench always runs)"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="CPU: skip the memory runs (report the timed runs' peaks)"
    )
    parser.add_argument(
        "--no-record", action="store_true", help=f"do not append to {RESULTS.relative_to(ROOT)}"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (a step's time is measured from the end of the one before)")
    if args.worker:
        worker = lmforge_worker if args.worker.startswith("lmforge") else trl_worker
        print(json.dumps(worker(args.worker, args.workdir, args)))
        return
    benches = args.benches.split(",")
    if unknown := set(benches) - set(BENCHES):
        parser.error(f"unknown benches {sorted(unknown)}; choose from {', '.join(BENCHES)}")
    only = set(args.variants.split(",")) if args.variants else None

    import peft
    import torch
    import transformers
    import trl

    device = machine(args)
    versions = {"lmforge": lmforge_revision(), "torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "trl": trl.__version__}  # fmt: skip
    print(f"{device}; " + ", ".join(f"{k} {v}" for k, v in versions.items()), file=sys.stderr)
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        setup = prepare(workdir, args)
        print(f"setup: {setup['pairs']} pairs ({setup['mean_pair_tokens']:.0f} tokens a pair, chosen + rejected), "
              f"{setup['prompts']} prompts, {setup['params']:,} parameters, vocab {setup['vocab']}", file=sys.stderr)  # fmt: skip
        plan = {
            b: [v for v in BENCHES[b] if only is None or v in only or v.startswith("lmforge")]
            for b in benches
        }
        runs: dict[str, dict[str, list]] = {b: {v: [] for v in plan[b]} for b in benches}
        for r in range(args.repeats):
            for b in benches:
                for v in plan[b] if r % 2 == 0 else plan[b][::-1]:
                    runs[b][v].append(run_worker(v, workdir, args))
        memory: dict[str, dict] = {}
        if args.device == "cpu" and not args.no_memory:
            memory = {v: run_worker(v, workdir, args, memory=True) for b in benches for v in plan[b]}
        summaries = [summarise(b, runs[b], memory, setup, args) for b in benches]
    table(summaries, args, device)
    seconds = time.perf_counter() - t_start
    print(
        f"\n{seconds:.0f} s in all; load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    )
    if not args.no_record:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        settings = {k: getattr(args, k) for k in ("preset", "batch", "seq_len", "steps", "warmup", "repeats", "lr",
                                                   "prompts", "samples", "new_tokens", "device", "dtype")}  # fmt: skip
        with open(RESULTS, "a", encoding="utf-8") as f:
            for s in summaries:
                f.write(json.dumps({"date": date, "command": " ".join(sys.argv), "machine": device, "versions": versions,
                                    "settings": settings, "setup": {k: setup[k] for k in ("pairs", "params", "vocab",
                                    "mean_pair_tokens", "prompts")}, "load_average": [load_start, os.getloadavg()[0]],
                                    "total_s": seconds, **s}) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
