"""What pretraining stores and fine-tuning extracts, on the synthetic world: one run of the knowledge pipeline.

  python bench/knowledge.py --out /tmp/know [--people-a 300 --people-b 150 --bios 5 --filler 1200
      --name-share 0.33 --steps 1500 --sampling shuffle --document-mask --mixed 0.0 ...]

World (seeded) → BPE tokenizer → prepared data → `lmforge pretrain` (lmforge's own stage) → greedy fact
completion of every pretrained person's biography sentence (the storage probe) → `lmforge finetune` on group A's
Q&A → exact match on the held-out question paraphrase for A, B (pretraining only) and C (never pretrained:
the control). Appends one JSON line (the knobs, the figures with 95% Wilson intervals, the seconds of each
step) to `--log`. docs/benchmarks.md ("Knowledge") records the table with these commands.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lmforge.data.prepare import PrepareConfig, iter_texts, prepare
from lmforge.data.synthetic import WorldSizes, synthesize
from lmforge.eval.knowledge import fact_completion
from lmforge.stages.configs import FinetuneConfig, PretrainConfig
from lmforge.stages.finetune import run_finetune
from lmforge.stages.pretrain import run_pretrain
from lmforge.tokenizer import train_tokenizer


def plot(log: Path, png: Path, tags: list[str], demos: list[Path]) -> None:
    """B's held-out accuracy after SFT on A (and the control C's) against pretraining tokens (CPU time), one
    point per run: the logged runs named by `tags` and the demo directories `demos`, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []  # (minutes, {"B": interval, "C": interval})
    for line in log.read_text().splitlines():
        row = json.loads(line)
        if row["tag"] in tags:
            points.append((row["pretrain_tokens"] / 1e6, row["qa_after"]))
    for demo in demos:
        knowledge = json.loads((demo / "knowledge.json").read_text())
        pretrained = json.loads((demo / "pretrain" / "results.json").read_text())
        points.append((pretrained["tokens"] / 1e6, knowledge["after_sft"]))
    points.sort(key=lambda p: p[0])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for group, colour in (("B", "tab:blue"), ("C", "tab:grey")):
        x = [m for m, _ in points]
        rates = [q[group] for _, q in points]
        y = [100 * r["accuracy"] for r in rates]
        err = [[100 * (r["accuracy"] - r["ci95"][0]) for r in rates],
               [100 * (r["ci95"][1] - r["accuracy"]) for r in rates]]  # fmt: skip
        label = "B (pretraining only)" if group == "B" else "C (never pretrained: control)"
        ax.errorbar(x, y, yerr=err, marker="o", linestyle="none", capsize=3, color=colour, label=label)
    ax.set_xlabel("pretraining tokens, millions (1M: ~1.2 minutes on 2 CPU cores)")
    ax.set_ylabel("held-out exact match after SFT on A (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot", type=Path, help="only draw the curve of --log's runs into this PNG")
    ap.add_argument("--plot-tag", action="append", default=[], help="--plot: a logged run's tag to draw")
    ap.add_argument("--demo", type=Path, action="append", default=[], help="--plot: a demo directory to draw")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--log", type=Path, default=Path("bench/results/knowledge.jsonl"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--people-a", type=int, default=300)
    ap.add_argument("--people-b", type=int, default=150)
    ap.add_argument("--people-c", type=int, default=150)
    ap.add_argument("--bios", type=int, default=5)
    ap.add_argument("--filler", type=int, default=1200)
    ap.add_argument("--name-share", type=float, default=1 / 3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--sampling", default="shuffle", choices=["fixed", "offset", "shuffle"])
    ap.add_argument("--document-mask", action="store_true")
    ap.add_argument("--mixed", type=float, default=0.0, help="share of pretraining batches from A's Q&A")
    ap.add_argument("--sft-method", default="lora", choices=["lora", "full"])
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--sft-lr", type=float, default=5e-4)
    ap.add_argument("--questions", type=int, default=150, help="held-out questions per group")
    ap.add_argument("--sft-only", action="store_true", help="reuse --out's world, data and pretrained model")
    ap.add_argument("--sft-data", type=Path, help="a prepared SFT dataset instead of --out's data/sft_a")
    args = ap.parse_args()
    if args.plot:
        plot(args.log, args.plot, args.plot_tag, args.demo)
        return
    if args.out is None:
        ap.error("--out is required to run the pipeline")
    torch.set_num_threads(2)
    seconds: dict[str, float] = {}

    def timed(name, fn, *a, **k):
        t0 = time.perf_counter()
        result = fn(*a, **k)
        seconds[name] = round(time.perf_counter() - t0, 1)
        return result

    sizes = WorldSizes(people_a=args.people_a, people_b=args.people_b, people_c=args.people_c,
                       bios_per_person=args.bios, filler_docs=args.filler, name_share=args.name_share)  # fmt: skip
    out = args.out
    w = out / "world"
    if args.sft_only:
        pre = json.loads((out / "pretrain" / "results.json").read_text())
    else:
        pre = pretrain(args, sizes, out, timed)
    model_dir = Path(pre["model_dir"])
    world = json.loads((w / "world.json").read_text())
    storage = timed("storage probe", fact_completion, model_dir, world, groups=("A", "B"),
                    limit=args.questions // 6)  # fmt: skip
    fcfg = FinetuneConfig.model_validate({
        "kind": "chat", "method": args.sft_method, "model": str(model_dir),
        "data": {"dataset": str(args.sft_data or out / "data" / "sft_a")},
        "lora": {"r": 16, "alpha": 32},
        "eval": {"qa": str(w / "eval_qa.jsonl"), "qa_limit": args.questions, "qa_groups": ["A", "B", "C"],
                 "max_new_tokens": 24},
        "train": {"max_steps": args.sft_steps, "seq_len": 128, "micro_batch_size": 16, "eval_every": 0,
                  "seed": args.seed},
        "optim": {"lr": args.sft_lr, "warmup_steps": 20},
    })  # fmt: skip
    sft = timed(
        "finetune",
        run_finetune,
        fcfg,
        out / ("sft-" + args.tag.replace(" ", "_") if args.sft_only else "sft"),
        overwrite=True,
    )
    after = sft["qa"]["after"]
    row = {
        "tag": args.tag,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "params": pre["params"],
        "pretrain_tokens": pre["tokens"],
        "train_loss": round(pre["train_loss"], 3),
        "tokens_per_s": round(pre["tokens_per_s"]),
        "storage": storage,
        "qa_after": after["intervals"],
        "qa_before": sft["qa"]["before"]["by_group"],
        "seconds": seconds,
    }
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("a") as f:
        f.write(json.dumps(row) + "\n")
    json.dump(row, sys.stdout, indent=1)
    print()


def pretrain(args: argparse.Namespace, sizes: WorldSizes, out: Path, timed) -> dict:
    """World, tokenizer, prepared data and `lmforge pretrain` into `out`; the pretraining results."""
    w = out / "world"
    timed("world", synthesize, w, seed=args.seed, sizes=sizes, overwrite=True)
    corpus = [w / "pretrain.jsonl", w / "sft_a.jsonl"]
    tok = timed(
        "tokenizer", train_tokenizer, iter_texts(corpus), "bpe", args.vocab, out / "tok", overwrite=True
    )
    for name in ("pretrain", "sft_a"):
        cfg = PrepareConfig(inputs=[w / f"{name}.jsonl"], tokenizer=tok, seed=args.seed)
        timed(f"prepare {name}", prepare, cfg, out / "data" / name, overwrite=True)
    data = {"dataset": str(out / "data" / "pretrain")}
    if args.mixed:
        data = {"datasets": {"world": data["dataset"], "qa": str(out / "data" / "sft_a")},
                "mix": {"world": 1 - args.mixed, "qa": args.mixed}}  # fmt: skip
    pcfg = PretrainConfig.model_validate({
        "model": {"overrides": {"hidden_size": args.hidden, "intermediate_size": 3 * args.hidden,
                                "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                                "num_key_value_heads": args.heads}},
        "data": {**data, "sampling": args.sampling, "document_mask": args.document_mask},
        "train": {"max_steps": args.steps, "seq_len": args.seq_len, "micro_batch_size": args.batch,
                  "eval_every": 0, "seed": args.seed, "log_every": 50},
        "optim": {"lr": args.lr, "warmup_steps": min(50, args.steps // 10), "schedule": args.schedule},
        "sample_prompt": None,
    })  # fmt: skip
    return timed("pretrain", run_pretrain, pcfg, out / "pretrain", overwrite=True)


if __name__ == "__main__":
    main()
