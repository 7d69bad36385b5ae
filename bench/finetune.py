"""Fine-tuning on the CPU, lmforge vs `transformers` + `peft` (and TRL's `SFTTrainer`), side by side in one run.

  python bench/finetune.py [--preset llama-14m] [--seq-len 256] [--batch 8] [--steps 4] [--warmup 1]
                           [--threads N] [--variants lmforge-lora,peft-lora,...]

Data: the Self-Instruct seed tasks (../shared/data/self_instruct_seed), each a user turn (the instruction, then
the input) and an assistant turn (the output), as `lmforge data prepare` builds them from this format, rendered
with lmforge's ChatML template and a byte-level BPE trained on them (vocab 4096, inside the preset's); loss on
the assistant tokens only; samples cut to --seq-len tokens. Every variant starts from the same seeded weights
(bench/models.py's `build_pair`) with the same micro-batch, learning rate, fused AdamW (betas 0.9/0.95, weight
decay 0.1, which every LoRA matrix gets), clipping to norm 1.0 and a constant schedule. LoRA: r 16, alpha 32,
no dropout, on q/k/v/o/gate/up/down.

- lmforge: `apply_lora`, then the finetune stage's own path: `sft_rows(pack=True)` rows in an `EpochSampler`,
  stepped by `lmforge.train.loop.train` (fp32, and `train.autocast=bf16`). The `-padded` variant feeds the same
  loop the padded batches `transformers` gets, to separate packing from the rest.
- transformers + peft: `get_peft_model(LoraConfig(...))` and a plain loop (forward with labels and the padding
  mask, backward, clipping, fused AdamW) on batches padded to their longest sample, labels -100 on the prompt
  and the padding; fp32 and bf16 autocast.
- TRL `SFTTrainer` (`assistant_only_loss=True`, the same LoRA config; `bf16=False` and
  `gradient_checkpointing=False`, which SFTConfig turns on by default): its padding collator, and
  `packing=True` (best-fit decreasing, which TRL runs padding-free: one row of concatenated samples per batch,
  position ids restarting per sample).
- full fine-tuning, lmforge vs a plain `transformers` loop on the same padded batches, fp32 (bf16 autocast
  opt-in: --variants lmforge-full,lmforge-full-bf16,hf-full,hf-full-bf16).

Timing: the in-process variants run round-robin, one step each per round (drift in the machine's load hits
them alike), after --warmup rounds (the padded streams' first batch holds the longest samples); a step is the
wall time from fetching its batch to the end of the update (lmforge: one call of `train(max_steps=1)` on the
persistent stream and optimizer). TRL runs its own loop in a fresh process, timed between `on_step_end`
callbacks (which includes fetching and logging). The transformers bf16 variants (15-20x slower on a CPU
without bf16 GEMMs) run in a fresh process: --slow-steps steps, no warm-up, the first on the longest batch.
"all tok/s" is positions computed (padding included) per second over the timed steps; "trained tok/s" is that
times the trained share of one epoch's positions under the variant's own batching (lmforge's packed rows, the
padded epoch, TRL's dataloader): a few padded batches drawn at random would otherwise decide the share (the
timed steps' own trained tok/s is printed below the tables).
Memory: each variant again in a fresh process, with glibc's mmap threshold fixed at 64 KiB
(MALLOC_MMAP_THRESHOLD_, so freed tensors go back to the OS: at the default the same run's peak varied by ~300 MB,
and the setting slows steps by ~40%, hence separate runs): build, a no-grad forward that touches every weight,
reset the peak RSS (/proc/self/clear_refs), then steps on the longest batch, 8 x 256 with the defaults (packed
rows are all full; TRL gets its samples longest first, in order): 1 for LoRA, 2 for full fine-tuning (whose
second step holds the optimizer state); the peak RSS (VmHWM) minus the RSS before the steps is what training
added. Timing is over by then, so the memory runs go two at a time.
Before anything is timed, the first-step losses of lmforge (padded and packed) and transformers + peft on the
same samples must agree (fp32, 1e-4 relative); they are compared again after one update from the same adapters.
Prints Markdown tables; docs/benchmarks.md records the numbers with this command.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from itertools import count
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "self_instruct_seed" / "seed_tasks.jsonl"
VOCAB = 4096
IGNORE = -100
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R, LORA_ALPHA = 16, 32.0
BETAS, EPS, WEIGHT_DECAY, CLIP = (0.9, 0.95), 1e-8, 0.1, 1.0

VARIANTS = {
    "lmforge-lora": "lmforge + LoRA, packed rows, fp32",
    "lmforge-lora-bf16": "lmforge + LoRA, packed rows, bf16 autocast",
    "lmforge-lora-padded": "lmforge + LoRA, the padded batches, fp32",
    "peft-lora": "transformers + peft, padded, fp32",
    "peft-lora-bf16": "transformers + peft, padded, bf16 autocast",
    "trl-lora": "TRL SFTTrainer + peft, padded, fp32",
    "trl-lora-packed": "TRL SFTTrainer + peft, packing (padding-free), fp32",
    "lmforge-full": "lmforge full, the padded batches, fp32",
    "lmforge-full-bf16": "lmforge full, the padded batches, bf16 autocast",
    "hf-full": "transformers full, padded, fp32",
    "hf-full-bf16": "transformers full, padded, bf16 autocast",
}
# Full fine-tuning under bf16 autocast is opt-in (--variants lmforge-full,lmforge-full-bf16,hf-full,hf-full-bf16):
# transformers' step takes over a minute here, and the default run is kept under ~8 minutes.
DEFAULT_VARIANTS = [v for v in VARIANTS if v not in ("lmforge-full-bf16", "hf-full-bf16")]
OWN_PROCESS = {"trl-lora", "trl-lora-packed", "peft-lora-bf16", "hf-full-bf16"}  # timed in a fresh process
BASELINE = {"lora": "peft-lora", "full": "hf-full"}  # the ratio columns of each table divide by these
# Memory runs: steps on the longest batch: 2 for full fine-tuning (the second step holds the optimizer state,
# 110 MB), 1 for LoRA (its optimizer state is 5.6 MB; peft's bf16 LoRA takes ~1 min a step), with glibc's mmap
# threshold fixed: at its default (dynamic) the peak of one variant varied by ~300 MB between identical runs.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def memory_steps(variant: str) -> int:
    return 1 if "-lora" in variant else 2


Batch = dict[str, torch.Tensor]
Counts = tuple[int, int, int]  # (positions computed, real tokens, trained tokens) of one batch


# ------------------------------------------------------------------------------------------------ data


def self_instruct_chats(path: Path = DATA) -> list[list[dict[str, str]]]:
    """One user/assistant conversation per task instance, as lmforge's `self_instruct` format builds it."""
    chats = []
    for line in path.read_text(encoding="utf-8").splitlines():
        task = json.loads(line)
        for inst in task["instances"]:
            given = inst["input"]
            prompt = f"{task['instruction']}\n\n{given}" if given.strip() else task["instruction"]
            chats.append(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": inst["output"]}]
            )
    return chats


def prepare(workdir: Path) -> dict[str, Any]:
    """Train the tokenizer into `workdir`, render every chat (ids, assistant mask) and save them there."""
    from lmforge.chat import render_chat
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    chats = self_instruct_chats()
    train_tokenizer([m["content"] for chat in chats for m in chat], "bpe", VOCAB, workdir / "tokenizer")
    tok = Tokenizer.from_dir(workdir / "tokenizer")
    rendered = [render_chat(tok, chat, require_assistant=True) for chat in chats]
    data = {"chats": chats, "ids": [r.ids for r in rendered], "mask": [r.mask for r in rendered],
            "pad_id": tok.pad_id, "vocab": tok.vocab_size}  # fmt: skip
    (workdir / "data.json").write_text(json.dumps(data))
    return data


def samples_of(data: dict[str, Any], seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) of every sample, cut to seq_len (the finetune stage keeps a sample's first seq_len tokens)."""
    return [(np.asarray(i[:seq_len], dtype=np.int64), np.asarray(m[:seq_len], dtype=np.int64))
            for i, m in zip(data["ids"], data["mask"], strict=True)]  # fmt: skip


def padded_batch(samples: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> Batch:
    """Right-padded to the longest sample: input_ids, attention_mask, labels (HF: -100 on the prompt and the
    padding, shifted inside the model) and targets (lmforge: the same labels shifted left by one)."""
    B, L = len(samples), max(len(ids) for ids, _ in samples)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    for r, (ids, mask) in enumerate(samples):
        n, ids_t = len(ids), torch.from_numpy(ids)
        input_ids[r, :n], attention_mask[r, :n] = ids_t, 1
        labels[r, :n] = torch.where(torch.from_numpy(mask) == 1, ids_t, IGNORE)
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "targets": targets}


def padded_stream(samples: list, batch: int, pad_id: int, longest_first: int = 1) -> Iterator[Batch]:
    """`longest_first` batches of the longest samples, then epochs of seeded permutations cut into full
    batches, each padded to its longest sample."""
    n = len(samples)
    longest = sorted(range(n), key=lambda i: -len(samples[i][0]))[:batch]
    for _ in range(longest_first):
        yield padded_batch([samples[i] for i in longest], pad_id)
    for epoch in count():
        order = np.random.default_rng([0, epoch]).permutation(n)
        for s in range(0, n - batch + 1, batch):
            yield padded_batch([samples[i] for i in order[s : s + batch]], pad_id)


def packed_stream(samples: list, batch: int, seq_len: int, pad_id: int) -> Iterator[Batch]:
    """The finetune stage's stream: `sft_rows(pack=True)` rows in an `EpochSampler` (stages/finetune.py)."""
    from lmforge.data.batches import sft_rows
    from lmforge.data.samplers import EpochSampler, Rows, fixed

    rows, _ = sft_rows(samples, seq_len, pad_id, pack=True)
    return EpochSampler(fixed(Rows(rows)), batch, seed=0)


def counts_of(batch: Batch) -> Counts:
    """(positions computed, real tokens, trained tokens). Trained: lmforge's targets, or HF labels after the
    model's shift (position 0 is never a target)."""
    positions = batch["input_ids"].numel()
    if "attention_mask" in batch:
        real = int(batch["attention_mask"].sum())
    elif "segment_ids" in batch:
        real = int((batch["segment_ids"] >= 0).sum())
    else:  # TRL padding-free: one row of samples, no padding
        real = positions
    if "targets" in batch:
        trained = int((batch["targets"] != IGNORE).sum())
    else:
        trained = int((batch["labels"][..., 1:] != IGNORE).sum())
    return positions, real, trained


def epoch_counts(samples: list, batch: int, seq_len: int, pad_id: int) -> dict[str, Counts]:
    """(positions, real, trained) of one epoch: lmforge's packed rows, and the first epoch of padded_stream
    (its full batches: the last len % batch samples of the order are left out)."""
    from lmforge.data.batches import sft_rows

    rows, _ = sft_rows(samples, seq_len, pad_id, pack=True)
    stream = padded_stream(samples, batch, pad_id, longest_first=0)
    padded = [counts_of(next(stream)) for _ in range(len(samples) // batch)]
    return {"packed": counts_of(rows), "padded": tuple(sum(c) for c in zip(*padded, strict=True))}


def is_packed(variant: str) -> bool:
    return variant in ("lmforge-lora", "lmforge-lora-bf16")


# ------------------------------------------------------------------------------------------------ steps


def lmforge_lora(model: torch.nn.Module) -> torch.nn.Module:
    from lmforge.adapters.lora import apply_lora
    from lmforge.stages.configs import LoraSection

    return apply_lora(model, LoraSection(r=LORA_R, alpha=LORA_ALPHA, target_modules=LORA_TARGETS)).train()


def peft_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")  # fmt: skip


def optim_section(lr: float):
    from lmforge.train.sections import OptimSection

    return OptimSection(lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip=CLIP,
                        schedule="constant", warmup_steps=0)  # fmt: skip


def hf_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """HF Trainer's default optimizer (adamw_torch_fused) over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)


def hf_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, bf16: bool) -> Callable[[Batch], float]:
    """One step of a plain PyTorch loop: forward with labels, backward, clip, AdamW step."""
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext

    def step(batch: Batch) -> float:
        with autocast():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"], use_cache=False)  # fmt: skip
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return step


def runner(variant: str, model: torch.nn.Module, samples: list, args: argparse.Namespace, pad_id: int,
           longest_first: int = 1) -> Callable[[], tuple[float, Counts]]:  # fmt: skip
    """A function taking the variant's next step on its own stream: (loss, counts of the batch).

    `model` is lmforge's model or HF's (adapters applied); the stream starts with `longest_first` batches of the
    longest samples (padded streams; packed rows are all full)."""
    bf16 = variant.endswith("-bf16")
    last: dict[str, Counts] = {}
    if variant.startswith("lmforge"):
        from lmforge.train.loop import train
        from lmforge.train.objectives import OBJECTIVES
        from lmforge.train.optim import build_optimizer
        from lmforge.train.sections import LoopSection

        if is_packed(variant):
            source = packed_stream(samples, args.batch, args.seq_len, pad_id)
        else:  # lmforge's unpacked rows carry no attention mask: causal attention ignores right padding
            source = ({"input_ids": b["input_ids"], "targets": b["targets"], "counts": counts_of(b)}
                      for b in padded_stream(samples, args.batch, pad_id, longest_first))  # fmt: skip

        def batches() -> Iterator[Batch]:
            for b in source:
                last["counts"] = b.pop("counts") if "counts" in b else counts_of(b)
                yield b

        stream, optim = batches(), optim_section(args.lr)
        optimizer = build_optimizer(model, optim, "cpu")
        loop = LoopSection(max_steps=1, micro_batch_size=args.batch, seq_len=args.seq_len,
                           autocast="bf16" if bf16 else "off")  # fmt: skip
        return lambda: (train(model, stream, OBJECTIVES["clm"], optimizer, optim, loop)["losses"][0],
                        last["counts"])  # fmt: skip
    step = hf_step(model, hf_optimizer(model, args.lr), bf16)
    stream = padded_stream(samples, args.batch, pad_id, longest_first)

    def hf_runner() -> tuple[float, Counts]:
        batch = next(stream)
        return step(batch), counts_of(batch)

    return hf_runner


def build(
    variant: str, lmforge_model: Callable[[], torch.nn.Module], hf_model: Callable[[], torch.nn.Module]
) -> torch.nn.Module:
    """The variant's model: lmforge's or HF's, with its LoRA adapters when the variant has them."""
    if variant.startswith("lmforge"):
        model = lmforge_model()
        return lmforge_lora(model) if "-lora" in variant else model.train()
    model = hf_model()
    if "-lora" in variant:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config())
    return model.train()


# ------------------------------------------------------------------------------------------ correctness


def check_losses(ours: torch.nn.Module, hf: torch.nn.Module, samples: list, args: argparse.Namespace,
                 pad_id: int) -> dict[str, float]:  # fmt: skip
    """Losses of lmforge (padded and packed) and transformers + peft on the same samples (the first
    --batch), before and after one update from the same adapters (peft's random A copied into lmforge's)."""
    from lmforge.data.batches import sft_rows
    from lmforge.train.objectives import OBJECTIVES
    from lmforge.train.optim import build_optimizer

    ours = lmforge_lora(copy.deepcopy(ours))
    theirs = build("peft-lora", lambda: ours, lambda: copy.deepcopy(hf))
    with torch.no_grad():  # the same adapters: PEFT's names are lmforge's, plus its prefix and adapter name
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                ours.get_parameter(name.removeprefix("base_model.model.").replace(".default", "")).copy_(p)
    chosen = samples[: args.batch]
    padded = padded_batch(chosen, pad_id)
    packed, _ = sft_rows(chosen, args.seq_len, pad_id, pack=True)
    clm = OBJECTIVES["clm"]
    n = counts_of(padded)[2]
    assert n == counts_of(packed)[2]
    hf_train = hf_step(theirs, hf_optimizer(theirs, args.lr), bf16=False)
    optimizer = build_optimizer(ours, optim_section(args.lr), "cpu")
    params = [p for p in ours.parameters() if p.requires_grad]
    losses = {}
    for when in ("first", "after one update"):
        with torch.no_grad():
            losses[f"lmforge padded, {when}"] = float(clm.losses(ours, padded)["clm"]) / n
            losses[f"lmforge packed, {when}"] = float(clm.losses(ours, packed)["clm"]) / n
        losses[f"peft padded, {when}"] = hf_train(padded)
        if when == "first":  # lmforge's update from the packed rows, as the loop takes it
            (clm.losses(ours, packed)["clm"] / n).backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return losses


# ------------------------------------------------------------------------------------------------ workers

STATUS = Path("/proc/self/status")


def rss_mb(field: str = "VmRSS") -> float:
    return int(re.search(rf"{field}:\s+(\d+)", STATUS.read_text()).group(1)) / 1024


def reset_peak() -> float:
    """Reset VmHWM to the current RSS (Linux clear_refs 5) and return that RSS in MB."""
    base = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")
    return base


def worker(variant: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: build, touch the weights, reset the peak RSS, run the steps; the record.

    `--worker-steps 0`: memory only, `memory_steps` untimed steps on the longest batch. Otherwise --worker-steps
    timed steps, no warm-up, the first on the longest batch (the transformers bf16 variants: a step takes most of
    a minute, next to which the first call's own overhead is small)."""
    data = json.loads((workdir / "data.json").read_text())
    samples = samples_of(data, args.seq_len)
    if variant.startswith("trl"):
        return trl_worker(variant, workdir, data, args)

    def lmforge_model() -> torch.nn.Module:
        from lmforge.model.configs import preset
        from lmforge.model.hf import build_model

        torch.manual_seed(0)  # build_pair's weights
        return build_model(preset(args.preset))

    def hf_model() -> torch.nn.Module:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        return transformers.AutoModelForCausalLM.from_pretrained(
            workdir / "model", attn_implementation="sdpa"
        )

    model = build(variant, lmforge_model, hf_model)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))
    warmup = memory_steps(variant) if args.worker_steps == 0 else 0
    step = runner(variant, model, samples, args, data["pad_id"], longest_first=max(warmup, 1))
    base = reset_peak()
    seconds, counts, losses = [], [], []
    for i in range(warmup + args.worker_steps):
        t0 = time.perf_counter()
        loss, c = step()
        if i >= warmup:
            seconds.append(time.perf_counter() - t0)
            counts.append(c)
        losses.append(loss)
    return {"seconds": seconds, "counts": counts, "losses": losses, "peak_mb": rss_mb("VmHWM") - base,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip


def trl_worker(variant: str, workdir: Path, data: dict, args: argparse.Namespace) -> dict[str, Any]:
    """SFTTrainer on the same conversations, --warmup + --worker-steps steps, timed between `on_step_end`s."""
    import logging

    import transformers
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    logging.getLogger("trl").setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "model", attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    chats = data["chats"]
    memory_only = args.worker_steps == 0
    if memory_only:  # the longest samples first, as the other variants' memory runs
        chats = [chats[i] for i in sorted(range(len(chats)), key=lambda i: -len(data["ids"][i]))]
    dataset = Dataset.from_list([{"messages": chat} for chat in chats])
    warmup = memory_steps(variant) if memory_only else args.warmup
    total = warmup + args.worker_steps
    cfg = SFTConfig(
        output_dir=str(workdir / f"trl-{os.getpid()}"), per_device_train_batch_size=args.batch, max_steps=total,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=WEIGHT_DECAY,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, max_grad_norm=CLIP, optim="adamw_torch_fused",
        max_length=args.seq_len, packing=variant.endswith("packed"), assistant_only_loss=True,
        gradient_checkpointing=False, bf16=False, use_cpu=True, logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0,
        train_sampling_strategy="sequential" if memory_only else "random",
    )  # fmt: skip
    marks: list[float] = []
    counts: list[Counts] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tok,
                         peft_config=peft_config(), callbacks=[Timer()])  # fmt: skip
    collate = trainer.data_collator
    epoch = [counts_of(b) for b in trainer.get_train_dataloader()]  # one epoch of TRL's own batches

    def counting_collator(examples):
        batch = collate(examples)
        counts.append(counts_of(batch))
        return batch

    trainer.data_collator = counting_collator
    with torch.no_grad():
        trainer.model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    base = reset_peak()
    trainer.train()
    # accelerate's loader fetches a batch ahead, so counts may hold one more; counts[i] is step i's batch.
    return {"seconds": np.diff(marks).tolist()[warmup:], "counts": counts[warmup:total],
            "losses": losses, "peak_mb": rss_mb("VmHWM") - base, "epoch": [sum(c) for c in zip(*epoch, strict=True)],
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}  # fmt: skip


def run_worker(variant: str, workdir: Path, args: argparse.Namespace, steps: int) -> dict[str, Any]:
    """Run `worker` in a fresh process: `steps` timed steps, or (0) a memory run, with glibc's mmap threshold
    fixed (MEMORY_ENV) so that freed tensors go back to the OS and the peak is reproducible."""
    env = {**os.environ, **MEMORY_ENV} if steps == 0 else None
    cmd = [sys.executable, __file__, "--worker", variant, "--workdir", str(workdir), "--worker-steps", str(steps),
           "--preset", args.preset, "--seq-len", str(args.seq_len), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--lr", str(args.lr), "--threads", str(args.threads)]  # fmt: skip
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"worker {variant} failed:\n{out.stderr[-4000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {variant} ({'memory' if steps == 0 else f'{steps} timed steps'}): {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)  # fmt: skip
    return record


# ------------------------------------------------------------------------------------------------ report


def rates(seconds: list[float], counts: list[Counts]) -> tuple[float, float]:
    """(positions computed/s, trained tokens/s) over the timed steps."""
    total = sum(seconds)
    return sum(c[0] for c in counts) / total, sum(c[2] for c in counts) / total


def report(timed: dict[str, dict], memory: dict[str, dict], args: argparse.Namespace) -> None:
    """A table per method. trained tok/s = all tok/s x the trained share of an epoch's positions under the
    variant's batching: which batches a few timed steps draw would otherwise decide the padded variants' share."""
    for kind, title in (("lora", "LoRA SFT"), ("full", "Full fine-tuning")):
        names = [v for v in timed if ("-lora" in v) == (kind == "lora")]
        if not names:
            continue
        base = BASELINE[kind]

        def speeds(v: str) -> tuple[float, float]:
            positions, _, trained = timed[v]["epoch"]
            all_rate = rates(timed[v]["seconds"], timed[v]["counts"])[0]
            return all_rate, all_rate * trained / positions

        ref = speeds(base) if base in timed else None
        ref_mem = memory.get(base, {}).get("peak_mb")
        print(f"\n{title}, {args.preset}, micro-batch {args.batch}, seq_len {args.seq_len}\n")
        print("| variant | steps timed | all tok/s | vs peer | padding % | trained % | trained tok/s | vs peer | "
              "peak RSS added (MB) | peer/this memory | trainable params |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for v in names:
            r = timed[v]
            positions, real, trained = r["epoch"]
            al, tr = speeds(v)
            vs = (f"{al / ref[0]:.2f}x", f"{tr / ref[1]:.2f}x") if ref else ("—", "—")
            mem = memory.get(v, {}).get("peak_mb")
            mem_vs = f"{ref_mem / mem:.2f}x" if ref_mem and mem else "—"
            where = "own process" if v in OWN_PROCESS else "round-robin"
            print(f"| {VARIANTS[v]} | {len(r['seconds'])} ({where}) | {al:,.0f} | {vs[0]} | "
                  f"{100 * (1 - real / positions):.0f} | {100 * trained / positions:.0f} | {tr:,.0f} | {vs[1]} | "
                  f"{f'{mem:,.0f}' if mem else '—'} | {mem_vs} | {r['trainable']:,} |")  # fmt: skip
    print("\nper variant: epoch (positions/real/trained); timed steps' trained tok/s; step seconds (positions/"
          "trained); first loss")  # fmt: skip
    for v, r in timed.items():
        steps = ", ".join(f"{s:.2f} ({c[0]}/{c[2]})" for s, c in zip(r["seconds"], r["counts"], strict=True))
        epoch = "/".join(f"{n:,}" for n in r["epoch"])
        print(
            f"- {v}: {epoch}; {rates(r['seconds'], r['counts'])[1]:,.0f}; {steps}; loss {r['losses'][0]:.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-14m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant (round-robin, and TRL)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (the longest batch first)")
    parser.add_argument("--slow-steps", type=int, default=1,
                        help="timed steps of the transformers bf16 variants (the first on the longest batch)")  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)"
    )
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")  # fmt: skip
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args)))
        return
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
        variants = [v for v in variants if not v.startswith("trl")]
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; transformers {transformers.__version__}, "
          f"peft {peft.__version__}, trl {trl_version or 'not installed (skipped)'}")  # fmt: skip
    from models import build_pair  # bench/models.py: lmforge's model and HF's, same weights

    from lmforge.model.hf import save_model

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = prepare(workdir)
        samples = samples_of(data, args.seq_len)
        epoch = epoch_counts(samples, args.batch, args.seq_len, data["pad_id"])
        cut = sum(len(ids) > args.seq_len for ids in data["ids"])
        print(f"data: {len(samples)} samples ({cut} cut to {args.seq_len} tokens), tokenizer vocab {data['vocab']}; "
              "one epoch (positions/real/trained): packed " + "/".join(f"{n:,}" for n in epoch["packed"])
              + ", padded (full batches) " + "/".join(f"{n:,}" for n in epoch["padded"]))  # fmt: skip
        ours, hf = build_pair(args.preset)
        save_model(ours, workdir / "model")  # the workers' weights (lmforge's rebuild them from the seed)
        losses = check_losses(ours, hf, samples, args, data["pad_id"])
        print("check on the same samples: " + "; ".join(f"{k} {v:.6f}" for k, v in losses.items()))
        for when in ("first", "after one update"):
            ref = losses[f"peft padded, {when}"]
            worst = max(abs(losses[f"lmforge {m}, {when}"] - ref) / ref for m in ("padded", "packed"))
            print(f"  {when}: largest relative difference to peft {worst:.1e}")
            if when == "first" and worst > 1e-4:
                sys.exit("lmforge's and transformers + peft's losses disagree: not benchmarking")

        # Round-robin timing of the in-process variants, each on its own copy of the same weights.
        local = [v for v in variants if v not in OWN_PROCESS]
        models = {v: build(v, partial(copy.deepcopy, ours), partial(copy.deepcopy, hf)) for v in local}
        timed: dict[str, dict] = {v: {"seconds": [], "counts": [], "losses": [], "trainable": sum(
            p.numel() for p in m.parameters() if p.requires_grad)} for v, m in models.items()}  # fmt: skip
        steps = {v: runner(v, m, samples, args, data["pad_id"]) for v, m in models.items()}
        del ours, hf, models
        for i in range(args.warmup + args.steps):
            for v, step in steps.items():
                t0 = time.perf_counter()
                loss, c = step()
                elapsed = time.perf_counter() - t0
                timed[v]["losses"].append(loss)
                if i >= args.warmup:
                    timed[v]["seconds"].append(elapsed)
                    timed[v]["counts"].append(c)
                print(f"  round {i}{' (warm-up)' if i < args.warmup else ''}: {v} {elapsed:.2f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
        del steps
        for v in variants:
            if v in OWN_PROCESS:
                n = args.steps if v.startswith("trl") else args.slow_steps
                timed[v] = run_worker(v, workdir, args, n)
            timed[v].setdefault("epoch", epoch["packed" if is_packed(v) else "padded"])
        # lmforge-lora-padded runs lmforge-lora's model on the same 8 x 256 shape (no segment mask): not repeated.
        measured = [v for v in variants if v != "lmforge-lora-padded"]
        with ThreadPoolExecutor(
            2
        ) as pool:  # timing is done: two memory runs at a time (peaks are per process)
            runs = {
                v: pool.submit(run_worker, v, workdir, args, 0) for v in ([] if args.no_memory else measured)
            }
            memory = {v: run.result() for v, run in runs.items()}
        timed = {v: timed[v] for v in variants}
        report(timed, memory, args)
    print(f"\n{time.perf_counter() - t_start:.0f} s in all")


if __name__ == "__main__":
    main()
