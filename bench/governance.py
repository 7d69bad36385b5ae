"""Governance on the shared datasets: PII counts and speed, dedup counts and speed, GSM8K contamination.

  python bench/governance.py [--show]     (--show prints every PII hit for inspection by eye)

Records are read with plain json/csv here (not lmforge's readers) so the numbers depend only on governance.py.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import Counter
from pathlib import Path

from lmforge.data.governance import Deduplicator, contamination, find_pii, scrub_pii

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def records(name: str) -> list[tuple[str, str]]:
    """(id, text) of one shared file: JSON fields joined, CSV `text`, a .txt file line by line."""
    path = DATA / name
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [(f"{name}:{i}", row["text"]) for i, row in enumerate(csv.DictReader(f))]
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            r = json.loads(line)
            parts = [r.get(k, "") for k in ("question", "answer", "instruction", "chosen", "rejected")]
            parts += [x[k] for x in r.get("instances", []) for k in ("input", "output")]
            out.append((f"{name}:{i}", "\n".join(p for p in parts if p)))
        return out
    return [(f"{name}:{i}", line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())]


FILES = [
    "tinyshakespeare/input.txt", "tinystories/tinystories_val_sample.txt",
    "tinystories/tinystories_v2_endoftext_sample.txt", "self_instruct_seed/seed_tasks.jsonl",
    "hh_rlhf/harmless_base_test.jsonl", "gsm8k/train.jsonl", "gsm8k/test.jsonl", "banking77/train.csv",
    "banking77/test.csv",
]  # fmt: skip


def mb_per_s(texts: list[str], repeat: int = 3) -> float:
    size = sum(len(t.encode()) for t in texts) / 1e6
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for t in texts:
            scrub_pii(t, "mask")
        best = min(best, time.perf_counter() - t0)
    return size / best


def main() -> None:
    show = "--show" in sys.argv
    print("## PII (mask mode)")
    total: Counter[str] = Counter()
    for name in FILES:
        recs = records(name)
        counts: Counter[str] = Counter()
        for rid, text in recs:
            counts += scrub_pii(text, "report")[1]
            if show:
                for a, b, kind in find_pii(text):
                    print(f"   {rid} {kind}: {text[max(0, a - 30) : b + 30]!r}")
        total += counts
        print(f"{name:48s} {len(recs):6d} records  {dict(counts)}")
    print(f"{'all':48s} {dict(total)}")
    shakespeare = (DATA / "tinyshakespeare/input.txt").read_text(encoding="utf-8")
    speeches = shakespeare.split("\n\n")
    gsm = [t for _, t in records("gsm8k/train.jsonl")]
    print(
        f"speed (MB/s): TinyShakespeare as one text {mb_per_s([shakespeare]):.0f}, per speech "
        f"({len(shakespeare) // len(speeches)} B) {mb_per_s(speeches):.0f}, per line {mb_per_s(shakespeare.splitlines()):.0f}; "
        f"GSM8K train per record {mb_per_s(gsm):.0f}"
    )

    print("\n## Dedup")
    for name in ("banking77/train.csv", "gsm8k/train.jsonl"):
        recs = records(name)
        for shingle, threshold in (("word", 0.8), ("char", 0.8), ("word", 0.7)):
            dedup = Deduplicator(threshold=threshold, shingle=shingle)
            t0 = time.perf_counter()
            for rid, text in recs:
                dedup.add(rid, text)
            dt = time.perf_counter() - t0
            r = dedup.report()
            print(f"{name:22s} {shingle} 5-grams t={threshold}: exact {r['exact']}, near {r['near']} "
                  f"(b={r['bands']}, r={r['rows']}) {len(recs) / dt:,.0f} docs/s")  # fmt: skip
            if show:
                for ex in r["examples"]:
                    print("   ", ex)

    print("\n## Contamination, n = 13")
    train, test = records("gsm8k/train.jsonl"), records("gsm8k/test.jsonl")
    t0 = time.perf_counter()
    rep = contamination(train, {"gsm8k_test": test}, n=13)
    dt = time.perf_counter() - t0
    s = rep["eval_sets"]["gsm8k_test"]
    print(
        f"GSM8K train vs test: {s['eval_contaminated']}/{s['eval_examples']} test examples overlap, "
        f"{rep['train_contaminated']}/{rep['train_examples']} train examples to drop ({dt:.2f} s)"
    )
    print("   eval ids:", s["eval_ids"][:20], "train ids:", s["train_ids"][:20])


if __name__ == "__main__":
    main()
