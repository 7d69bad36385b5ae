"""Group C's facts three ways on the demo's pretrained model: fine-tuned in (LoRA SFT on `sft_c.jsonl`), retrieved
(RAG over the world's biographies), or both — the seeds' ladder between prompting and fine-tuning, measured.

  python bench/rag_vs_sft.py [--demo demo-out] [--out runs/rag-vs-sft] [--steps 300] [--read-steps 1500] [--k 1]
                             [--limit 0]

Needs `make demo` first (demo-out/pretrain/model, demo-out/world/). Every step is the command a user runs:

1. `lmforge rag index` over the world's pretraining biographies (groups A and B, with filler) and `bios_c.jsonl`
   (group C): 1,600 documents, so a C question's passages compete with everyone else's.
2. `lmforge rag augment --cite`: group A's SFT Q&A with each question's 2 passages in the system turn, exactly as
   `--rag` renders them, answers ending with [n] for the passages holding their fact. A model fine-tuned on plain
   Q&A never saw passages in its prompt; this teaches reading them — on group A only, never on C.
3. Reading practice: a model that has only ever seen A's facts in passages never needs to read them (it knows
   them). RAFT's remedy: train on people it cannot know. A second world (seed 1, 4,000 people; those sharing a
   name with the demo's world dropped) gives 8,000 Q&A records whose passages (`rag index --no-dense` over
   its biographies, `rag augment --cite`) are the only place their answers are; full fine-tuning on them,
   `--read-steps` steps of 16 x 256 tokens, alone ("read") and with C's plain Q&A ("read+sft-C").
4. Four LoRA adapters (`lmforge finetune`, the demo's SFT settings: r 16, lr 5e-4, 16 x `seq_len` tokens a step):
   sft-A (plain Q&A of A: the demo's), sft-C (plain Q&A of C: facts fine-tuned in), rag-A (A with passages),
   rag-A+sft-C (both files concatenated).
5. `lmforge rag eval --group C --model ... --adapter ...`: greedy answers to C's held-out question paraphrases
   (`eval_qa.jsonl`), without and with retrieval (k passages), exact match with 95% Wilson intervals.

Costs: each adapter's training seconds and tokens (its results.json), answer latency (seconds of the eval pass /
questions, batched 32, greedy, with and without passages), and sizes on disk (adapter, index). Prints a Markdown
table; appends one JSON line to bench/results/rag_vs_sft.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
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


def finetune(
    out: Path, model: Path, data: dict[str, Path], steps: int, seq_len: int, method: str = "lora"
) -> dict:
    """An SFT run on `data` (one file, or several concatenated): LoRA with the demo's settings, or full."""
    run = out / "runs" / "-".join(data)
    if not (run / "results.json").is_file():
        path = next(iter(data.values()))
        if len(data) > 1:  # finetune reads one dataset: the files concatenated
            path = out / f"{run.name}.jsonl"
            path.write_text("".join(Path(p).read_text().rstrip("\n") + "\n" for p in data.values()))
        data_cfg = {"dataset": str(path)}
        method_cfg = {"lora": {"r": 16, "alpha": 32}, "optim": {"lr": 5.0e-4, "warmup_steps": 20}}
        if method == "full":
            method_cfg = {"optim": {"lr": 1.0e-3, "warmup_steps": 20}}
        config = {"kind": "chat", "method": method, "model": str(model), "data": data_cfg, **method_cfg,
                  "train": {"max_steps": steps, "seq_len": seq_len, "micro_batch_size": 16, "eval_every": 0,
                            "seed": 0}}  # fmt: skip
        recipe = out / f"{run.name}.yaml"
        recipe.write_text(json.dumps(config))
        sh("finetune", "--config", recipe, "--out", run, "--overwrite")
    results = json.loads((run / "results.json").read_text())
    seconds = results["tokens"] / results["tokens_per_s"]  # the training loop's own clock
    output = run / ("model" if method == "full" else "adapter")
    return {"run": str(run), "output": str(output), "method": method, "train_seconds": seconds,
            "train_tokens": results["tokens"], "output_mb": size_mb(output)}  # fmt: skip


def reading_data(out: Path, world: Path, k: int, records: int = 8000) -> Path:
    """Chat records about people of a second world (none named as in `world`), each with its k passages."""
    path = out / "read_rag.jsonl"
    if path.is_file():
        return path
    from lmforge.data.synthetic import WorldSizes, synthesize

    second = out / "world-seed1"
    sizes = WorldSizes(people_a=1, people_b=0, people_c=4000, bios_per_person=1, filler_docs=0, medical_qa=0,
                       preference_pairs=0)  # fmt: skip
    synthesize(second, seed=1, sizes=sizes, overwrite=True)
    known = {p["name"] for p in json.loads((world / "world.json").read_text())["people"]}
    fresh = {p["name"] for p in json.loads((second / "world.json").read_text())["people"]} - known

    def keep(name: str, limit: int | None = None) -> Path:
        lines = [
            line for line in (second / name).read_text().splitlines() if json.loads(line)["person"] in fresh
        ]
        random.Random(0).shuffle(lines)
        kept = out / f"read_{name}"
        kept.write_text("\n".join(lines[:limit]) + "\n")
        return kept

    index = out / "read-index"
    sh("rag", "index", keep("bios_c.jsonl"), "--out", index, "--no-dense")
    sh("rag", "augment", index, keep("sft_c.jsonl", records), "--out", path, "--k", k, "--cite")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "demo-out")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "rag-vs-sft")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--read-steps", type=int, default=1500)
    parser.add_argument("--k", type=int, default=1)
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
    reading = reading_data(out, world, args.k)

    adapters = {
        "sft-A": finetune(out, model, {"sft_a": world / "sft_a.jsonl"}, args.steps, 128),
        "sft-C": finetune(out, model, {"sft_c": world / "sft_c.jsonl"}, args.steps, 128),
        "rag-A": finetune(out, model, {"sft_a_rag": augmented}, args.steps, 512),
        "rag-A+sft-C": finetune(
            out, model, {"sft_a_rag": augmented, "sft_c": world / "sft_c.jsonl"}, args.steps, 512
        ),
        "read": finetune(out, model, {"read_rag": reading}, args.read_steps, 256, "full"),
        "read+sft-C": finetune(
            out, model, {"read_rag": reading, "sft_c": world / "sft_c.jsonl"}, args.read_steps, 256, "full"
        ),
    }
    rows = {}
    for name, info in adapters.items():
        extra = ["--limit", args.limit] if args.limit else []
        tuned = (
            ["--model", info["output"]]
            if info["method"] == "full"
            else ["--model", model, "--adapter", info["output"]]
        )
        result = json.loads(sh("rag", "eval", index, "--qa", world / "eval_qa.jsonl", "--group", "C", "--k", args.k,
                               *tuned, "--json", *extra))  # fmt: skip
        rows[name] = {**info, **result["answers"], "retrieval": result["retrieval"]}
        rows[name].pop("examples", None)

    print(
        f"\nGroup C's held-out questions ({result['questions']}), exact match (95% interval), demo model {model}\n"
    )
    print(
        f"| model | trained on | train s | train tokens | no retrieval | with RAG (k={args.k}) | "
        "ms/answer plain / RAG |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    trained_on = {"sft-A": "A's Q&A", "sft-C": "C's Q&A", "rag-A": "A's Q&A with passages",
                  "rag-A+sft-C": "A's with passages + C's", "read": "second world's Q&A with passages (full FT)",
                  "read+sft-C": "second world's with passages + C's (full FT)"}  # fmt: skip
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
    sizes = ", ".join(f"{n} {r['output_mb']:.2f} MB" for n, r in rows.items())
    print(f"index {size_mb(index):.1f} MB; outputs {sizes}")
    print(f"{time.perf_counter() - start:.0f} s in all")
    if not args.no_record:
        line = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "command": "bench/rag_vs_sft.py " + " ".join(sys.argv[1:]), "k": args.k, "steps": args.steps, "read_steps": args.read_steps,
                "index_mb": size_mb(index), "rows": rows}  # fmt: skip
        with (ROOT / "bench" / "results" / "rag_vs_sft.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
