"""Log-likelihood requests/s through lm-eval's `lmforge` model vs lm-eval's own `hf` model, same weights.

  python bench/lm_eval_speed.py [--model DIR] [--preset llama-14m] [--questions 100] [--docs 24]
                                [--batch-size 16] [--repeats 3] [--threads N] [--no-record]

Both classes get the same model directory (default: a random `--preset` model saved with a BPE tokenizer
trained on ../shared/data's TinyStories sample, or synthetic sentences without it), the same batch size,
fp32 on the CPU, and the same requests, built as lm-eval builds them:

1. `loglikelihood`: HellaSwag-shaped multiple choice: `--questions` passage openings (60 words) with 4 endings
   each (the true next 15 words and three from other passages), so 4 requests per question;
2. `loglikelihood_rolling`: `--docs` passages of 100 to 1,000 words (perplexity; the longest fill more than
   one window of a 1024-position model).

Each figure is the median over `--repeats` calls, the two classes called alternately in one process (so drift
in machine load hits both alike). On a machine shared with other work, pass `--threads 1`: with 2 OpenMP
threads on 2 busy cores every op waits at its barrier for a descheduled thread (~8 ms an op was seen, both
libraries 4-15x slower), and the op count, not the arithmetic, sets the time.

Before anything is timed, every response is compared: log-likelihoods within 1e-4 + 1e-6 x |value|, greedy
flags equal. A JSON line per workload goes to bench/results/lm_eval.jsonl.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_machine, finish, lmforge_revision

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "data" / "tinystories" / "tinystories_val_sample.txt"
RESULTS = ROOT / "bench" / "results" / "lm_eval.jsonl"


def stories() -> list[str]:
    """TinyStories' validation sample as passages of 100 to 1,000 words (its stories run into each other), or
    seeded synthetic ones when it is absent."""
    rng = random.Random(0)
    if STORIES.is_file():
        words = STORIES.read_text(encoding="utf-8").split()
    else:
        vocab = [
            "the",
            "cat",
            "dog",
            "sat",
            "ran",
            "on",
            "a",
            "big",
            "red",
            "mat",
            "park",
            "hat",
            "saw",
            "and",
        ]
        words = [rng.choice(vocab) for _ in range(100_000)]
    passages, start = [], 0
    while start + 100 <= len(words):
        n = rng.choice([100, 150, 200, 300, 1000])
        passages.append(" ".join(words[start : start + n]))
        start += n
    return passages


def build_model(preset_name: str, texts: list[str], out: Path) -> Path:
    """A random `preset_name` decoder with a BPE tokenizer trained on `texts`, saved to `out`."""
    from lmforge.model.configs import preset
    from lmforge.model.hf import build_model as build
    from lmforge.model.hf import save_model
    from lmforge.tokenizer import train_tokenizer

    config = preset(preset_name, eos_token_id=3, pad_token_id=0)
    train_tokenizer(texts, "bpe", config.vocab_size, out)
    torch.manual_seed(0)
    save_model(build(config), out)
    return out


def requests(texts: list[str], questions: int, docs: int) -> tuple[list, list]:
    """(loglikelihood instances: 4 endings per question, loglikelihood_rolling instances: whole stories)."""
    from lm_eval.api.instance import Instance

    rng = random.Random(1)
    picked = rng.sample(texts, questions)
    endings = [" " + " ".join(t.split()[60:75]) for t in picked]
    mc = []
    for q, text in enumerate(picked):
        context = " ".join(text.split()[:60])
        choices = [endings[q], *rng.sample([e for i, e in enumerate(endings) if i != q], 3)]
        for c, ending in enumerate(choices):
            mc.append(Instance("loglikelihood", {}, (context, ending), c, ("bench_mc", q, 1)))
    rolling = [
        Instance("loglikelihood_rolling", {}, (text,), 0, ("bench_rolling", d, 1))
        for d, text in enumerate(rng.sample(texts, docs))
    ]
    return mc, rolling


def check_same(kind: str, ours: list, theirs: list) -> float:
    """The largest |difference| of two classes' responses, each within 1e-4 + 1e-6 x |value| (`hf` sums a
    document's thousands of log-probs in fp32); greedy flags must be equal."""
    worst = 0.0
    for a, b in zip(ours, theirs, strict=True):
        if kind == "loglikelihood":
            assert a[1] == b[1], f"greedy flags differ: {a} vs {b}"
            a, b = a[0], b[0]
        diff = abs(float(a) - float(b))
        assert diff <= 1e-4 + 1e-6 * abs(float(b)), f"{kind}: responses {a} and {b} differ by {diff}"
        worst = max(worst, diff)
    return worst


def timed(lm, kind: str, instances: list) -> tuple[float, list]:
    """Seconds of one `kind` call over `instances`, and its responses."""
    start = time.perf_counter()
    out = getattr(lm, kind)(instances, disable_tqdm=True)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="An HF model directory (default: a random --preset).")
    parser.add_argument("--preset", default="llama-14m")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--no-record", action="store_true", help="Do not append to bench/results/lm_eval.jsonl."
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as lm-eval's command line sets it
    import transformers
    from lm_eval.models.huggingface import HFLM

    from lmforge.eval.harness import LmforgeLM

    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    texts = stories()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or build_model(args.preset, texts, Path(tmp) / "model")
        ours = LmforgeLM(pretrained=str(model_dir), batch_size=args.batch_size, device="cpu")
        theirs = HFLM(pretrained=str(model_dir), batch_size=args.batch_size, device="cpu", dtype="float32")
        mc, rolling = requests(texts, args.questions, args.docs)
        records = []
        for kind, instances in (("loglikelihood", mc), ("loglikelihood_rolling", rolling)):
            load = os.getloadavg()[0]
            (_, a), (_, b) = timed(ours, kind, instances), timed(theirs, kind, instances)  # warm-up + check
            worst = check_same(kind, a, b)
            times: dict[str, list[float]] = {"lmforge": [], "hf": []}
            for _ in range(args.repeats):
                times["lmforge"].append(timed(ours, kind, instances)[0])
                times["hf"].append(timed(theirs, kind, instances)[0])
            rates = {name: len(instances) / statistics.median(t) for name, t in times.items()}
            record = {
                "bench": "lm-eval", "workload": kind, "requests": len(instances),
                "requests_s": rates, "ratio": rates["lmforge"] / rates["hf"], "max_abs_diff": worst,
                "seconds": times, "load_average": [load, os.getloadavg()[0]],
            }  # fmt: skip
            records.append(record)
            print(f"{kind}: {len(instances)} requests, lmforge {rates['lmforge']:.1f}/s, hf {rates['hf']:.1f}/s, "
                  f"ratio {record['ratio']:.2f}x (responses within {worst:.1e}); load {load:.1f}")  # fmt: skip
        model_name = str(args.model) if args.model else f"random {args.preset}"
    import lm_eval

    settings = {"model": model_name, "batch_size": args.batch_size, "questions": args.questions,
                "docs": args.docs, "repeats": args.repeats, "dtype": "float32"}  # fmt: skip
    versions = {"lmforge": lmforge_revision(), "lm_eval": lm_eval.__version__,
                "transformers": transformers.__version__}  # fmt: skip
    finish(RESULTS, records, started=t_start, load_start=load_start, record=not args.no_record,
           date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=cpu_machine(args.threads),
           versions=versions, settings=settings)  # fmt: skip


if __name__ == "__main__":
    main()
