"""Group C's facts three ways on the demo's pretrained model: fine-tuned in (LoRA SFT on `sft_c.jsonl`), retrieved
(RAG over the world's biographies), or both — the seeds' ladder between prompting and fine-tuning, measured.

  python bench/rag_vs_sft.py [--demo demo-out] [--out runs/rag-vs-sft] [--steps 300] [--k 2] [--limit 0]

Needs `make demo` first (demo-out/pretrain/model, demo-out/world/). Every step is the command a user runs:

1. `lmforge rag index` over the world's pretraining biographies (groups A and B, with filler) and `bios_c.jsonl`
   (group C): 1,600 documents, so a C question's passages compete with everyone else's.
2. `lmforge rag augment --cite`: group A's SFT Q&A with each question's 2 passages in the system turn, exactly as
   `--rag` renders them, answers ending with [n] for the passages holding their fact. A model fine-tuned on plain
   Q&A never saw passages in its prompt; this teaches reading them — on group A only, never on C.
3. Four LoRA adapters (`lmforge finetune`, the demo's SFT settings: r 16, lr 5e-4, 16 x `seq_len` tokens a step):
   sft-A (plain Q&A of A: the demo's), sft-C (plain Q&A of C: facts fine-tuned in), rag-A (A with passages),
   rag-A+sft-C (both files concatenated).
4. `lmforge rag eval --group C --model ... --adapter ...`: greedy answers to C's held-out question paraphrases
   (`eval_qa.jsonl`), without and with retrieval (k passages), exact match with 95% Wilson intervals.

Costs: each adapter's training seconds and tokens (its results.json), answer latency (seconds of the eval pass /
questions, batched 32, greedy, with and without passages), and sizes on disk (adapter, index). Prints a Markdown
table; appends one JSON line to bench/results/rag_vs_sft.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LMFORGE = str(Path(sys.executable).parent / "lmforge")


def sh(*args: object) -> str:
    """Run an lmforge command; its stdout (stderr passes through)."""
    command = [LMFORGE, *map(str, args)]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6


def finetune(out: Path, model: Path, data: dict[str, Path], steps: int, seq_len: int) -> dict:
    """A LoRA SFT run with the demo's settings on `data` (one file, or several concatenated)."""
    run = out / "runs" / "-".join(data)
    if not (run / "results.json").is_file():
        path = next(iter(data.values()))
        if len(data) > 1:  # finetune reads one dataset: the files concatenated
            path = out / f"{run.name}.jsonl"
            path.write_text("".join(Path(p).read_text().rstrip("\n") + "\n" for p in data.values()))
        data_cfg = {"dataset": str(path)}
        config = {"kind": "chat", "method": "lora", "model": str(model), "data": data_cfg,
                  "lora": {"r": 16, "alpha": 32}, "optim": {"lr": 5.0e-4, "warmup_steps": 20},
                  "train": {"max_steps": steps, "seq_len": seq_len, "micro_batch_size": 16, "eval_every": 0,
                            "seed": 0}}  # fmt: skip
        recipe = out / f"{run.name}.yaml"
        recipe.write_text(json.dumps(config))
        sh("finetune", "--config", recipe, "--out", run, "--overwrite")
    results = json.loads((run / "results.json").read_text())
    seconds = results["tokens"] / results["tokens_per_s"]  # the training loop's own clock
    return {"run": str(run), "adapter": str(run / "adapter"), "train_seconds": seconds,
            "train_tokens": results["tokens"], "adapter_mb": size_mb(run / "adapter")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "demo-out")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "rag-vs-sft")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="questions of group C at most (0: all)")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    world, model = args.demo / "world", args.demo / "pretrain" / "model"
    if not (model / "config.json").is_file():
        sys.exit(f"{model}: not there; run `make demo` first")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    index = out / "index"
    if not (index / "manifest.json").is_file():
        sh("rag", "index", world / "pretrain.jsonl", world / "bios_c.jsonl", "--out", index)
    augmented = out / "sft_a_rag.jsonl"
    if not augmented.is_file():
        sh("rag", "augment", index, world / "sft_a.jsonl", "--out", augmented, "--k", args.k, "--cite")

    adapters = {
        "sft-A": finetune(out, model, {"sft_a": world / "sft_a.jsonl"}, args.steps, 128),
        "sft-C": finetune(out, model, {"sft_c": world / "sft_c.jsonl"}, args.steps, 128),
        "rag-A": finetune(out, model, {"sft_a_rag": augmented}, args.steps, 512),
        "rag-A+sft-C": finetune(
            out, model, {"sft_a_rag": augmented, "sft_c": world / "sft_c.jsonl"}, args.steps, 512
        ),
    }
    rows = {}
    for name, info in adapters.items():
        extra = ["--limit", args.limit] if args.limit else []
        result = json.loads(sh("rag", "eval", index, "--qa", world / "eval_qa.jsonl", "--group", "C", "--k", args.k,
                               "--model", model, "--adapter", info["adapter"], "--json", *extra))  # fmt: skip
        rows[name] = {**info, **result["answers"], "retrieval": result["retrieval"]}
        rows[name].pop("examples", None)

    print(
        f"\nGroup C's held-out questions ({result['questions']}), exact match (95% interval), demo model {model}\n"
    )
    print(
        f"| adapter | trained on | train s | train tokens | no retrieval | with RAG (k={args.k}) | "
        "ms/answer plain / RAG |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    trained_on = {"sft-A": "A's Q&A", "sft-C": "C's Q&A", "rag-A": "A's Q&A with passages",
                  "rag-A+sft-C": "both, concatenated"}  # fmt: skip
    for name, r in rows.items():
        plain, rag = r["without_retrieval"], r["with_retrieval"]
        fmt = lambda w: f"{w['accuracy']:.1%} [{w['ci95'][0]:.1%}, {w['ci95'][1]:.1%}]"  # noqa: E731
        print(
            f"| {name} | {trained_on[name]} | {r['train_seconds']:.0f} | {r['train_tokens']:,} | {fmt(plain)} | "
            f"{fmt(rag)} | {r['ms_per_answer_without']:.0f} / {r['ms_per_answer_with']:.0f} |"
        )
    hybrid = next(iter(rows.values()))["retrieval"]
    print(
        "\nretrieval of C's biographies: "
        + ", ".join(f"{m} recall@{args.k} {v[f'recall@{args.k}']['accuracy']:.1%}" for m, v in hybrid.items())
    )
    sizes = ", ".join(f"{n} {r['adapter_mb']:.2f} MB" for n, r in rows.items())
    print(f"index {size_mb(index):.1f} MB; adapters {sizes}")
    print(f"{time.perf_counter() - start:.0f} s in all")
    if not args.no_record:
        line = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": "bench/rag_vs_sft.py " + " ".join(sys.argv[1:]), "k": args.k, "steps": args.steps,
                "index_mb": size_mb(index), "rows": rows}  # fmt: skip
        with (ROOT / "bench" / "results" / "rag_vs_sft.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
