"""Decoding speed, lmforge's inference engine vs `transformers` `generate`, side by side on the same weights.

  python bench/decode.py [--presets llama-14m llama-124m] [--new-tokens 256] [--batch 16]
                         [--batch-new-tokens 64] [--repeats 3] [--threads N] [--profile] [--speculate K]
                         [--compile] [--trained DIR]

With `--compile` each table gains lmforge's compiled decode step (`Engine(compile=True)`) beside the eager one,
compiled for both batch buckets before any timing.

Greedy (temperature 0), fp32, CPU, inference_mode, the same thread count for both. Per preset:

1. Batch 1, a 16-token prompt, `--new-tokens` new tokens: time to first token (TTFT), the decode rate (new
   tokens after the first / time after the first) and end-to-end new tokens/s (wall time of the whole call).
2. Batch `--batch`, prompts of 8..38 tokens (left-padded, with an attention mask in `transformers`),
   `--batch-new-tokens` new tokens each: TTFT and aggregate new tokens/s (all rows' new tokens / wall time).

`transformers` gets the default dynamic cache and SDPA attention, with EOS switched off; its per-token times
come from a streamer. Both libraries must return every requested token, and their greedy ids are compared.
4. With `--trained DIR` (a model trained by lmforge, e.g. `runs/pretrain-stories/model`): natural text, greedy
   continuations of TinyStories openings from ../shared/data, both libraries plain and with prompt lookup.
3. With `--speculate K`, batch 1 again with lmforge's prompt-lookup speculative decoding (`speculate=K`,
   greedy output) against plain `transformers`, then against `transformers`' own prompt lookup
   (`prompt_lookup_num_tokens=K`).

Batch 1 is also read against the physical limit: the bytes a decode step must read (every weight once, the KV
cache of the positions before it, at the run's mean context) divided by this machine's memory read bandwidth,
measured in the same run (`read_bandwidth`: a sum and a GEMV over 256 MiB, before and after the timed calls),
give the tokens/s no implementation can beat; each library's decode
rate is reported as a share of it.

Calls alternate between the libraries and each figure is the median over `--repeats` calls. `--profile`
prints, for both batch sizes, the time inside vs outside the model's forward for each library, then
torch.profiler's op table and cProfile's top functions for lmforge.
Prints Markdown tables; docs/benchmarks.md records the numbers with this command.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).parent))
from models import build_pair

from lmforge.infer.engine import Engine
from lmforge.infer.sampling import GenerationConfig
from lmforge.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TEXT = (
    "The inference engine runs a prefill over the whole prompt, then decodes one token at a time from a "
    "key-value cache that was allocated once for the whole batch. Each step takes the logits of the last "
    "position, applies the processors in their documented order and picks the next token of every row."
)


@dataclass
class Run:
    """One `generate` call: the new ids of each row, and its timings in seconds from the call's start."""

    ids: list[list[int]]
    first: float  # time to the first new token
    last: float  # time to the last new token
    wall: float  # the whole call

    @property
    def new_tokens(self) -> int:
        return sum(len(r) for r in self.ids)

    @property
    def decode_rate(self) -> float:
        """Tokens/s after the first token, per row (the batch-1 decode rate)."""
        return (len(self.ids[0]) - 1) / (self.last - self.first)


class StepClock(BaseStreamer):
    """Records when `generate` emits its first and last new tokens (its first `put` is the prompt)."""

    def __init__(self, start: float):
        self.start, self.puts = start, []

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(time.perf_counter() - self.start)

    def end(self) -> None:
        pass


def make_tokenizer(out: Path) -> Tokenizer:
    """A small byte-level BPE trained on the repo's docs: the engine needs its pad/EOT ids, encode, decode."""
    texts = [line for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
             for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]  # fmt: skip
    train_tokenizer(texts, "bpe", 2048, out)
    return Tokenizer.from_dir(out)


def run_lmforge(engine: Engine, prompts: list[list[int]], new: int, speculate: int = 0) -> Run:
    cfg = GenerationConfig(temperature=0, max_new_tokens=new, speculate=speculate)
    t0 = time.perf_counter()
    done = engine.generate(prompts, cfg)
    wall = time.perf_counter() - t0
    # Completion timings run from the engine's own start, a few microseconds after t0.
    first = min(c.time_to_first_token for c in done)
    last = max(c.seconds for c in done)
    return Run([c.token_ids for c in done], first, last, wall)


def run_hf(hf: torch.nn.Module, prompts: list[list[int]], new: int, pad_id: int, lookup: int = 0) -> Run:
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])  # left-padded (B, P)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    clock = StepClock(t0)
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                      pad_token_id=pad_id, eos_token_id=None, streamer=clock, **extra)  # fmt: skip
    wall = time.perf_counter() - t0
    return Run(out[:, P:].tolist(), clock.puts[1], clock.puts[-1], wall)


def compare(engines: list[Engine], hf: torch.nn.Module, prompts: list[list[int]], new: int, repeats: int,
            speculate: int = 0, lookup: int = 0) -> list[list[Run]]:  # fmt: skip
    """Alternate the libraries `repeats` times (after a short warm-up); return each one's runs, `transformers`'
    last. `speculate` / `lookup`: lmforge's prompt-lookup speculation and `transformers`' prompt_lookup_num_tokens."""
    pad = engines[0].tokenizer.pad_id or 0
    calls = [lambda n, e=e: run_lmforge(e, prompts, n, speculate) for e in engines]
    calls.append(lambda n: run_hf(hf, prompts, n, pad, lookup))
    for call in calls:
        call(4)  # warm-up
    runs: list[list[Run]] = [[] for _ in calls]
    for r in range(repeats):
        order = list(enumerate(calls))
        for i, call in order[:: 1 if r % 2 == 0 else -1]:  # swap who goes first each round
            runs[i].append(call(new))
    return runs


def check(name: str, runs: list[list[Run]], new: int) -> str:
    """Every library returned every token; say whether each lmforge's greedy ids agree with `transformers`'
    (and where they first differ)."""
    for lib, lib_runs in enumerate(runs):
        short = [len(r) for run in lib_runs for r in run.ids if len(r) != new]
        if short:
            raise SystemExit(f"{name}: library {lib} stopped early ({short} tokens instead of {new})")
    verdicts = []
    for ours in runs[:-1]:
        a, b = ours[0].ids, runs[-1][0].ids
        differing = [i for i in range(len(a)) if a[i] != b[i]]
        if not differing:
            verdicts.append("identical")
            continue
        first = min(
            next(j for j, (x, y) in enumerate(zip(a[i], b[i], strict=True)) if x != y) for i in differing
        )
        verdicts.append(f"{len(differing)}/{len(a)} rows differ (first at new token {first})")
    return ", ".join(verdicts)


def row(name: str, what: str, values: list[float], higher_is_better: bool = True, fmt: str = ",.1f") -> str:
    """A Markdown row: each library's value (`transformers`' last), then each lmforge's ratio to it (> 1 favours
    lmforge)."""
    *ours, theirs = values
    ratios = [v / theirs if higher_is_better else theirs / v for v in ours]
    cells = [f"{v:{fmt}}" for v in values] + [f"{r:.2f}x" for r in ratios]
    return f"| {name} | {what} | " + " | ".join(cells) + " |"


def table_rows(name: str, what: str, runs: list[list[Run]], new: int, decode: bool = False):
    """Markdown rows (model, measure, each library's median, each lmforge's ratio to `transformers`)."""
    measures = [("end-to-end tok/s", lambda r: r.new_tokens / r.wall, True),
                ("TTFT ms", lambda r: r.first * 1000, False)]  # fmt: skip
    if decode:
        measures.insert(0, ("decode tok/s", lambda r: r.decode_rate, True))
    print(f"{name} {what}: greedy ids {check(name, runs, new)}; end-to-end tok/s per run "
          f"{[[round(r.new_tokens / r.wall, 1) for r in lib] for lib in runs]}", file=sys.stderr)  # fmt: skip
    for measure, value, higher_is_better in measures:
        medians = [statistics.median(value(r) for r in lib) for lib in runs]
        yield row(name, f"{what}: {measure}", medians, higher_is_better)


def read_bandwidth(mib: int = 256, repeats: int = 5) -> dict[str, float]:
    """This machine's memory read bandwidth in bytes/s, measured now with the benchmark's threads, by two kernels
    reading a `mib`-MiB fp32 tensor (far larger than the caches, so every byte comes from DRAM), best of
    `repeats`: a sum (the issue's yardstick) and a matrix-vector product (MKL's GEMV, the kernel of batch-1
    decoding, which reads 30-45% faster here)."""
    x = torch.ones(mib * 2**20 // 4)
    matrix, vector = x.view(mib * 64, 4096), torch.ones(4096)  # (rows, 4096) and (4096,)
    x.sum()  # touch every page first
    kernels = {"sum": x.sum, "GEMV": lambda: torch.mv(matrix, vector)}
    return {name: x.numel() * 4 / min(_timed(fn) for _ in range(repeats)) for name, fn in kernels.items()}


def best_bandwidth(args: argparse.Namespace) -> dict[str, float]:
    """Each kernel's best bandwidth so far, read once more now (after the timed calls: the VM's speed drifts);
    kept in `args.bandwidth` for the next preset."""
    now = read_bandwidth()
    args.bandwidth = {k: max(v, now[k]) for k, v in args.bandwidth.items()}
    return args.bandwidth


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bytes_per_token(model: torch.nn.Module, context: float) -> float:
    """Bytes one batch-1 decode step must read at least: every weight once (a tied embedding counted once: the
    LM head reads it whole, the input lookup one row) and the K and V caches of `context` earlier positions."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = (
        2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * context * 4
    )  # fp32 K and V, (layers, T, kv, d)
    return weights + kv


def bench_preset(name: str, tokenizer: Tokenizer, args: argparse.Namespace) -> list[str]:
    """Markdown rows: (measure, each library, each lmforge's ratio to transformers) for batch 1 and the batch."""
    ours, hf = build_pair(name)
    ours.eval(), hf.eval()
    engines = lmforge_engines(ours, tokenizer, args)
    hf.generation_config.eos_token_id = None  # never stop early (the random model could emit any id)
    ids = tokenizer.encode(PROMPT_TEXT)
    single = [ids[:16]]
    batch = [ids[i : i + 8 + 2 * i] for i in range(args.batch)]  # 8, 10, ..., 38 tokens
    with torch.inference_mode():
        single_runs = compare(engines, hf, single, args.new_tokens, args.repeats)
        batch_runs = compare(engines, hf, batch, args.batch_new_tokens, args.repeats)
    # The physical limit of batch-1 decoding: bytes each step must read / the bandwidth measured in this run.
    need = bytes_per_token(ours, len(single[0]) + args.new_tokens / 2)
    limits = []
    for kernel, bandwidth in best_bandwidth(args).items():
        limit = bandwidth / need
        shares = [statistics.median(r.decode_rate for r in lib) / limit for lib in single_runs]
        what = (f"batch 1: bandwidth limit {limit:,.0f} tok/s ({need / 1e6:.1f} MB read per token / "
                f"{bandwidth / 1e9:.1f} GB/s, a {kernel}): share reached")  # fmt: skip
        limits.append(row(name, what, shares, fmt=".0%"))
    rows = [
        *limits,
        *table_rows(name, f"batch 1, {args.new_tokens} new", single_runs, args.new_tokens, decode=True),
        *table_rows(
            name, f"batch {args.batch}, {args.batch_new_tokens} new", batch_runs, args.batch_new_tokens
        ),
    ]
    if args.speculate:  # batch 1: lmforge's speculation vs plain transformers, then vs its prompt lookup
        k = args.speculate
        for lookup, what in ((0, f"speculate={k} vs plain"), (k, f"speculate={k} vs prompt_lookup={k}")):
            with torch.inference_mode():
                runs = compare(engines, hf, single, args.new_tokens, args.repeats, speculate=k, lookup=lookup)
            rows += table_rows(
                name, f"batch 1, {args.new_tokens} new, {what}", runs, args.new_tokens, decode=True
            )
    if args.profile:
        profile(engines[0], hf, name, single, args.new_tokens)
        profile(engines[0], hf, name, batch, args.batch_new_tokens)
        if args.compile:
            profile_compiled(engines[1], name, single, args.new_tokens)
    return rows


def lmforge_engines(model: torch.nn.Module, tokenizer: Tokenizer, args: argparse.Namespace) -> list[Engine]:
    """The eager engine, and with `--compile` the compiled one beside it (compiled for both batch buckets
    before any timing; the seconds that took are printed)."""
    engines = [Engine(model, tokenizer)]
    if args.compile:
        engines.append(Engine(model, tokenizer, compile=True))
        start = time.perf_counter()
        with torch.inference_mode():  # as the timed calls run: a graph is compiled for each grad mode
            engines[-1].warm_up()
        print(
            f"compiling the decode step (batch 1 and 2+): {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    return engines


def bench_trained(path: Path, args: argparse.Namespace) -> None:
    """A trained model on natural text: greedy continuations of TinyStories openings, each library plain and with
    prompt lookup (lmforge `speculate=K`, `transformers` `prompt_lookup_num_tokens=K`), both going on past EOS (the
    model trained on one story per line ends a story within a few tokens; it then begins another) for
    `--new-tokens` tokens, so that the rates are decoding's and not the prompt's."""
    import transformers

    k = args.speculate or 4
    loaded = Engine.from_dir(path, device="cpu")
    engines = lmforge_engines(loaded.model, loaded.tokenizer, args)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    pad = loaded.tokenizer.pad_id or 0
    hf.generation_config.eos_token_id = None  # past EOS, as lmforge's ignore_eos
    stories = (ROOT.parent / "shared/data/tinystories/tinystories_val_sample.txt").read_text().split("\n\n")
    prompts = [loaded.encode(story[:120]) for story in stories[3 : 3 + args.trained_prompts]]

    def lmforge(ids: list[int], speculate: int, engine: Engine) -> list[int]:
        cfg = GenerationConfig(
            temperature=0, max_new_tokens=args.new_tokens, speculate=speculate, ignore_eos=True
        )
        return engine.generate([ids], cfg)[0].token_ids

    def hf_generate(ids: list[int], lookup: int) -> list[int]:
        extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
        return hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=args.new_tokens,
                           eos_token_id=None, pad_token_id=pad, **extra)[0, len(ids):].tolist()  # fmt: skip

    calls = {}
    for engine in engines:
        label = "lmforge compiled" if engine.compiled else "lmforge"
        calls[label] = lambda ids, e=engine: lmforge(ids, 0, e)
        calls[f"{label} speculate={k}"] = lambda ids, e=engine: lmforge(ids, k, e)
    calls["transformers"] = lambda ids: hf_generate(ids, 0)
    calls[f"transformers prompt_lookup={k}"] = lambda ids: hf_generate(ids, k)
    tokens, seconds, outputs = dict.fromkeys(calls, 0), dict.fromkeys(calls, 0.0), {}
    with torch.inference_mode():
        for call in calls.values():
            call(prompts[0][:4])  # warm-up
        for _ in range(args.repeats):
            for name, call in calls.items():
                for i, ids in enumerate(prompts):
                    t0 = time.perf_counter()
                    out = call(ids)
                    seconds[name] += time.perf_counter() - t0
                    tokens[name] += len(out)
                    outputs[name, i] = out
    same = all(outputs[name, i] == outputs["transformers", i] for name in calls for i in range(len(prompts)))
    print(
        f"\n{path}: {len(prompts)} TinyStories openings, greedy, {args.new_tokens} new tokens (past EOS), "
        f"{args.repeats} rounds; every output identical to transformers' plain greedy: {same}"
    )
    # The limit at the mean context of the outputs, by each kernel's bandwidth (as for the presets)
    new_mean = tokens["transformers"] / args.repeats / len(prompts)
    need = bytes_per_token(loaded.model, statistics.mean(map(len, prompts)) + new_mean / 2)
    bandwidth = best_bandwidth(args)
    kernels = " / ".join(f"{k} {bandwidth[k] / need:,.0f} tok/s" for k in bandwidth)
    print(f"Mean output {new_mean:.0f} tokens; limit ({need / 1e6:.1f} MB per token) by {kernels}")
    print("| library | end-to-end tok/s | vs transformers | share of the limit (sum / GEMV) |")
    print("|---|---:|---:|---:|")
    base = tokens["transformers"] / seconds["transformers"]
    for name in calls:
        rate = tokens[name] / seconds[name]
        shares = " / ".join(f"{rate * need / b:.0%}" for b in bandwidth.values())
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {shares} |")


def model_share(model: torch.nn.Module, call) -> tuple[float, float, int]:
    """(seconds inside `model`'s forward, seconds of the whole call, forward calls) of one `call()`."""
    inside, calls, started = 0.0, 0, []
    pre = model.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))

    def post(*_):
        nonlocal inside, calls
        inside, calls = inside + time.perf_counter() - started.pop(), calls + 1

    hook = model.register_forward_hook(post)
    t0 = time.perf_counter()
    call()
    total = time.perf_counter() - t0
    pre.remove(), hook.remove()
    return inside, total, calls


def profile(engine: Engine, hf: torch.nn.Module, name: str, prompts: list[list[int]], new: int) -> None:
    """Where the time of a decode goes: inside vs outside the model's forward for both libraries, then
    lmforge's torch ops and Python functions."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    pad = engine.tokenizer.pad_id or 0
    with torch.inference_mode():
        for lib, model, call in (
            ("lmforge", engine.model, lambda: run_lmforge(engine, prompts, new)),
            ("transformers", hf, lambda: run_hf(hf, prompts, new, pad)),
        ):
            inside, total, calls = model_share(model, call)
            print(f"{name} batch {len(prompts)} x {new} new, {lib}: {total * 1e3:.0f} ms, of which "
                  f"{inside * 1e3:.0f} ms in {calls} model forwards; outside them "
                  f"{(total - inside) / new * 1e3:.2f} ms per step", file=sys.stderr)  # fmt: skip
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run_lmforge(engine, prompts, new)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), file=sys.stderr)
        stats = cProfile.Profile()
        stats.runcall(run_lmforge, engine, prompts, new)
    pstats.Stats(stats, stream=sys.stderr).sort_stats("tottime").print_stats(15)


def profile_compiled(engine: Engine, name: str, prompts: list[list[int]], new: int) -> None:
    """Where a compiled decode's time goes: inside the compiled step's calls vs the engine's loop around them,
    then the profiler's table (dynamo's guard check is "TorchDynamo Cache Lookup"; the graph itself runs in one
    C++ call)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step, spent = engine.compiled, [0.0, 0]

    def timed(*args):
        start = time.perf_counter()
        out = step(*args)
        spent[0], spent[1] = spent[0] + time.perf_counter() - start, spent[1] + 1
        return out

    engine.compiled = timed
    try:
        with torch.inference_mode():
            run = run_lmforge(engine, prompts, new)
            print(f"{name} batch {len(prompts)} x {new} new, lmforge compiled: {run.wall * 1e3:.0f} ms, of which "
                  f"{spent[0] * 1e3:.0f} ms in {spent[1]} compiled steps ({spent[0] / spent[1] * 1e3:.2f} ms each); "
                  f"outside them {(run.wall - spent[0]) / new * 1e3:.2f} ms per token", file=sys.stderr)  # fmt: skip
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                run_lmforge(engine, prompts, new)
    finally:
        engine.compiled = step
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="*", default=["llama-14m", "llama-124m"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads, both")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time lmforge's compiled decode step")
    parser.add_argument("--trained", type=Path, help="also run a trained model dir on TinyStories openings")
    parser.add_argument("--trained-prompts", type=int, default=6)
    parser.add_argument("--speculate", type=int, default=0,
                        help="also compare lmforge's prompt-lookup speculation (this many drafts) at batch 1")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    args.bandwidth = read_bandwidth()

    # The load average says whether other work shared the cores (it skews 2-thread runs most).
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, fp32 CPU, greedy, medians of {args.repeats}; memory read "
          f"bandwidth at the start (256 MiB, best of 5): "
          f"{', '.join(f'{k} {v / 1e9:.1f} GB/s' for k, v in args.bandwidth.items())}; "
          f"load average at start {Path('/proc/loadavg').read_text().split()[0]}\n")  # fmt: skip
    libs = ["lmforge", "lmforge compiled"] if args.compile else ["lmforge"]
    print("| model | measure | " + " | ".join(libs) + " | transformers | "
          + " | ".join(f"{lib} vs transformers" for lib in libs) + " |")  # fmt: skip
    print("|---|---|" + "---:|" * (2 * len(libs) + 1))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(Path(tmp))
        for name in args.presets:
            for line in bench_preset(name, tokenizer, args):
                print(line, flush=True)
    if args.trained:
        bench_trained(args.trained, args)
    print(f"\nload average at end {Path('/proc/loadavg').read_text().split()[0]}")


if __name__ == "__main__":
    main()
