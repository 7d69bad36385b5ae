"""Model-level benchmarks, lmforge vs `transformers`, side by side on the same weights in one run.

  python bench/models.py [--preset llama-14m] [--batch 8] [--seq 256] [--load-preset llama-124m]

1. Training step (forward + backward) and inference forward tokens/s on the CPU benchmark preset.
2. Loading a saved HF directory: wall time and peak resident memory of a fresh process (lmforge reads
   tensor by tensor into a meta-device model; the goal is one copy of the weights, not two).
Prints a Markdown table; docs/benchmarks.md records the numbers with this command.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run in a fresh process per library: peak RSS after the imports, then after loading and one forward; the
# difference is what loading cost.
LOAD_SNIPPET = """
import json, re, sys, time
import torch
if sys.argv[1] == "lmforge":
    from lmforge.model.hf import load_model
else:
    from transformers import AutoModelForCausalLM
    load_model = AutoModelForCausalLM.from_pretrained
# VmHWM (this process's peak RSS), not ru_maxrss: Linux carries ru_maxrss over from the forking parent.
rss = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
before = rss()
t0 = time.perf_counter()
model = load_model(sys.argv[2])
with torch.no_grad():  # touch every weight: lmforge's tensors are memory-mapped until first use
    model(torch.zeros(1, 8, dtype=torch.long))
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "extra_rss_mb": rss() - before}))
"""


def build_pair(preset_name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """lmforge's model of a preset (seeded init) and `transformers`' model loaded from its saved HF directory:
    the same weights, HF's SDPA attention."""
    import transformers

    from lmforge.model.configs import preset
    from lmforge.model.hf import build_model, save_model

    torch.manual_seed(seed)
    ours = build_model(preset(preset_name))
    with tempfile.TemporaryDirectory() as tmp:
        save_model(ours, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")
    return ours, hf


def compare(ours, theirs, tokens: int, repeats: int = 7) -> tuple[float, float]:
    """Median tokens/s of two step functions, timed alternately (so drift in machine load hits both alike)."""
    ours(), theirs()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for step, bucket in ((ours, times[0]), (theirs, times[1])):
            t0 = time.perf_counter()
            step()
            bucket.append(time.perf_counter() - t0)
    return tuple(tokens / sorted(t)[len(t) // 2] for t in times)


def bench_steps(preset_name: str, batch: int, seq: int) -> list[tuple[str, float, float]]:
    """(what, lmforge tokens/s, transformers tokens/s) for a training step and an inference forward."""
    ours, hf = build_pair(preset_name)
    ids = torch.randint(0, ours.config.vocab_size, (batch, seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]

    def train_ours():
        ours.zero_grad(set_to_none=True)
        ours(x, y).backward()

    def train_hf():
        hf.zero_grad(set_to_none=True)
        hf(ids, labels=ids).loss.backward()

    rows = []
    ours.train(), hf.train()
    rows.append(("train step (fwd+bwd)", *compare(train_ours, train_hf, x.numel())))
    ours.eval(), hf.eval()
    with torch.no_grad():
        rows.append(("inference forward", *compare(lambda: ours(x), lambda: hf(x), x.numel())))
    return rows


def bench_load(preset_name: str) -> dict[str, dict]:
    """Load time and peak RSS of a fresh process loading the same saved directory with each library."""
    from lmforge.model.configs import preset
    from lmforge.model.hf import build_model, save_model

    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(preset(preset_name)), tmp)
        size_mb = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors")) / 2**20
        results = {
            lib: json.loads(
                subprocess.check_output([sys.executable, "-c", LOAD_SNIPPET, lib, tmp]).splitlines()[-1]
            )
            for lib in ("lmforge", "transformers")
        }
    for r in results.values():
        r["weights_mb"] = size_mb
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llama-14m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--load-preset", default="llama-124m")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU\n")
    print(f"| {args.preset}, batch {args.batch} x {args.seq} | lmforge tok/s | transformers tok/s | ratio |")
    print("|---|---:|---:|---:|")
    for what, ours, theirs in bench_steps(args.preset, args.batch, args.seq):
        print(f"| {what} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x |")
    load = bench_load(args.load_preset)
    print(
        f"\n| load {args.load_preset} ({load['lmforge']['weights_mb']:.0f} MB of weights) | lmforge | transformers | ratio |"
    )
    print("|---|---:|---:|---:|")
    a, b = load["lmforge"], load["transformers"]
    print(
        f"| load + first forward (s) | {a['seconds']:.2f} | {b['seconds']:.2f} | {b['seconds'] / a['seconds']:.2f}x faster |"
    )
    print(f"| peak RSS added by load + forward (MB) | {a['extra_rss_mb']:.0f} | {b['extra_rss_mb']:.0f} | "
          f"{b['extra_rss_mb'] / a['extra_rss_mb']:.2f}x less |")  # fmt: skip


if __name__ == "__main__":
    main()
