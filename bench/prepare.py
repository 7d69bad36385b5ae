"""`data prepare` throughput vs `datasets.map(batched=True, num_proc=2)` with the same tokenizer, in one run.

  python bench/prepare.py [--repeat 10]

Inputs: TinyShakespeare + the TinyStories samples from ../shared/data (1.7 MB), and the same text repeated
`--repeat` times (distinct copies, so startup costs are amortised). Tokenizer: an 8k byte-level BPE trained
by lmforge on the same text. MB/s = input bytes / wall seconds. lmforge's time covers reading, splitting,
governance (when on), tokenising, writing shards with sha256s and the manifest; the `datasets` time covers
`Dataset.from_dict` + `map` over the already-split documents (reading and writing to disk not counted).
The last column is the upper bound of any 2-process design on this machine: two independent prepares of half
the files each, side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = ["tinyshakespeare/input.txt", "tinystories/tinystories_val_sample.txt",
         "tinystories/tinystories_v2_endoftext_sample.txt"]  # fmt: skip


def run_lmforge(inputs: list[Path], tok: Path, out: Path, **governance) -> float:
    from lmforge.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(inputs=inputs, tokenizer=tok, num_proc=2, val_fraction=0.01, **governance)
    t0 = time.perf_counter()
    prepare(cfg, out)
    return time.perf_counter() - t0


def _prepare_plain(args: tuple[list[Path], Path, Path]) -> None:
    from lmforge.data.prepare import PrepareConfig, prepare

    files, tok, out = args
    prepare(
        PrepareConfig(inputs=files, tokenizer=tok, num_proc=1, val_fraction=0.01, pii="off", dedup="off"), out
    )


def run_ideal_split(inputs: list[Path], tok: Path, out: Path) -> float:
    """Upper bound of any 2-process design: two independent prepares of half the files each, side by side."""
    import multiprocessing as mp

    half = len(inputs) // 2
    jobs = [(inputs[:half], tok, out / "a"), (inputs[half:], tok, out / "b")]
    with mp.get_context("fork").Pool(2) as pool:
        t0 = time.perf_counter()
        pool.map(_prepare_plain, jobs)
        return time.perf_counter() - t0


def run_datasets(inputs: list[Path], tok: Path) -> float:
    import datasets
    import transformers

    from lmforge.data.readers import read_records

    datasets.disable_progress_bars()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tok)
    docs = [r.data for path in inputs for r in read_records(path)]
    t0 = time.perf_counter()
    ds = datasets.Dataset.from_dict({"text": docs})
    ds.map(lambda b: {"input_ids": hf_tok(b["text"])["input_ids"]}, batched=True, num_proc=2,
           remove_columns=["text"], load_from_cache_file=False)  # fmt: skip
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    from lmforge.data.prepare import iter_texts
    from lmforge.tokenizer import train_tokenizer

    inputs = [SHARED / f for f in FILES]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = train_tokenizer(iter_texts(inputs), "bpe", 8192, tmp / "tok")
        repeated = []
        for k in range(args.repeat):  # distinct copies: a marker line keeps dedup from collapsing them
            for f in inputs:
                copy = tmp / f"copy{k}_{f.name}"
                copy.write_text(
                    f"copy {k}\n\n" + f.read_text(encoding="utf-8").replace("\n\n", f" [{k}]\n\n")
                )
                repeated.append(copy)
        rows = []
        for name, files in (("1x (1.7 MB)", inputs), (f"{args.repeat}x", repeated)):
            mb = sum(p.stat().st_size for p in files) / 1e6
            plain = run_lmforge(files, tok, tmp / f"out-{len(files)}-plain", pii="off", dedup="off")
            governed = run_lmforge(files, tok, tmp / f"out-{len(files)}-gov")  # PII report, exact dedup
            hf = run_datasets(files, tok)
            ideal = run_ideal_split(files, tok, tmp / f"ideal-{len(files)}")
            rows.append((name, mb, plain, governed, hf, ideal))
    head = "| input | MB | lmforge MB/s | + PII report + exact dedup | datasets.map MB/s | ratio | ideal 2-proc MB/s |"
    print(head + "\n|---|---:|---:|---:|---:|---:|---:|")
    for name, mb, plain, governed, hf, ideal in rows:
        cells = [
            name,
            f"{mb:.1f}",
            f"{mb / plain:.1f}",
            f"{mb / governed:.1f}",
            f"{mb / hf:.1f}",
            f"{hf / plain:.2f}x",
        ]
        print("| " + " | ".join([*cells, f"{mb / ideal:.1f}"]) + " |")


if __name__ == "__main__":
    main()
