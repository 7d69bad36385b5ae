"""`data prepare` throughput vs `datasets.map(batched=True, num_proc=2)` with the same tokenizer, in one run.

  python bench/prepare.py [--repeat 10] [--runs 3]

Inputs: TinyShakespeare + the TinyStories samples from ../shared/data (1.7 MB), and the same text repeated
`--repeat` times (distinct copies, so startup costs are amortised). Tokenizer: an 8k byte-level BPE trained
by lmforge on the same text. MB/s = input bytes / wall seconds. lmforge's time covers reading, splitting,
governance (when on), tokenising, writing shards with sha256s and the manifest; the `datasets` time covers
`Dataset.from_dict` + `map` over the already-split documents (reading and writing to disk not counted).
The last column is two independent in-process prepares of half the files each, side by side. Every
measurement is made `--runs` times, interleaved (this shared VM's speed drifts by up to 1.7x within minutes);
the table gives medians, the ratio is the median of the rounds' ratios.
"""

from __future__ import annotations

import argparse
import statistics
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
    parser.add_argument(
        "--runs", type=int, default=3, help="rounds of every measurement; medians are reported"
    )
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
            times: dict[str, list[float]] = {"plain": [], "governed": [], "hf": [], "ideal": []}
            for r in range(args.runs):  # interleaved, so that each round's ratio sees one machine state
                out = tmp / f"out-{len(files)}-{r}"
                times["plain"].append(run_lmforge(files, tok, out / "plain", pii="off", dedup="off"))
                times["governed"].append(run_lmforge(files, tok, out / "gov"))  # PII report, exact dedup
                times["hf"].append(run_datasets(files, tok))
                times["ideal"].append(run_ideal_split(files, tok, out / "ideal"))
            ratios = [hf / plain for hf, plain in zip(times["hf"], times["plain"], strict=True)]
            rows.append(
                (name, mb, {k: statistics.median(v) for k, v in times.items()}, ratios, times["plain"])
            )
    head = "| input | MB | lmforge MB/s | + PII report + exact dedup | datasets.map MB/s | ratio | ideal 2-proc MB/s |"
    print(head + "\n|---|---:|---:|---:|---:|---:|---:|")
    for name, mb, t, ratios, _ in rows:
        cells = [name, f"{mb:.1f}", f"{mb / t['plain']:.1f}", f"{mb / t['governed']:.1f}", f"{mb / t['hf']:.1f}",
                 f"{statistics.median(ratios):.2f}x", f"{mb / t['ideal']:.1f}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print(f"\nmedians of {args.runs} interleaved rounds; lmforge plain MB/s per round:")
    for name, mb, _, _, plain in rows:
        print(f"  {name}: " + ", ".join(f"{mb / t:.1f}" for t in plain))


if __name__ == "__main__":
    main()
