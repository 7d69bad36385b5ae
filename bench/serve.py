"""Serving throughput and latency, `lmforge serve` vs `transformers serve`, over OpenAI's streaming chat API.

  python bench/serve.py [--preset llama-14m | --model DIR] [--concurrency 1 4 16 64] [--requests-per-level N]
                        [--max-tokens 64] [--repeats 1] [--threads N] [--peer cb|plain|both]
                        [--adapters 4] [--adapter-requests 32] [--no-record]

The model: `--model DIR` (a HF decoder directory with a tokenizer that has a chat template), or a `--preset`
with seeded random weights (as bench/models.py's `build_pair`, saved with lmforge's `save_model`) and a byte-level
BPE of the preset's vocabulary size trained on ../shared/data's TinyStories + TinyShakespeare (the repo's docs
without them), so that every id the random model emits decodes to text; its vocabulary is the tokenizer's when
that falls short. fp32 on the CPU, `--threads` threads for both servers (OMP_NUM_THREADS / MKL_NUM_THREADS):
by default the cores less one, which the load generator and the servers' HTTP threads need. A server whose
OpenMP threads fill every core stalls whenever another process takes one (on 2 cores with a test run beside it,
lmforge at 16 streams swung between 30 and 530 tok/s with 2 threads, 400-430 with 1): run it on an idle machine
(the load average is printed at the start and end of the run and of each level in the JSON lines).

Each server runs alone as a subprocess on a free 127.0.0.1 port, never two at once; it is ready when GET /health
answers. The peer is `transformers serve MODEL --device cpu` (FORCE_MODEL is the local directory, loaded offline
with HF_HUB_OFFLINE=1; requests name it as their `model`): `--peer cb` adds `--continuous-batching` (paged
attention; its KV cache sized with `--cb-num-blocks` for the largest level, not 60% of the machine's RAM),
`--peer plain` runs one `generate` at a time, `--peer both` measures both; `--peer policy` measures lmforge
against itself under a guardrails policy (`--policy`: PII both ways, blocked topics), the policy layer's cost. lmforge runs
`lmforge serve MODEL --device cpu --max-batch B` with B = the largest concurrency level.

Servers alternate per concurrency level: for each level a fresh lmforge server, then a fresh peer (the order
flips every level, so drift in the machine's load hits both alike); each gets warm-up requests (one of
`--max-tokens` tokens, then a burst as wide as the level) before its measured requests. A level sends
`--requests-per-level` requests (default max(8, 2 x concurrency)) from `concurrency` client workers, each sending
its next request when its last one ends (closed loop), `--repeats` times. Every request streams
(`stream_options.include_usage`), greedy (temperature 0), `max_tokens` = `--max-tokens`, a chat message with a
TinyStories opening (a fixed list without ../shared/data). End-of-text and end-of-turn ids are banned with
`logit_bias` -100 (transformers: a float, its `sequence_bias`; its continuous batching ignores that, so its
requests also carry `generation_config` {"eos_token_id": -1}), so every request should produce `--max-tokens`
tokens; tokens/s counts the tokens each server reports in its usage chunk (content chunks where it sends none), and
the `short` count says how many requests ended early.

Per request: TTFT (request sent to first non-empty content chunk) and its mean inter-token latency, ITL ((last
content chunk - first) / (tokens - 1): the servers batch several tokens into a chunk when the client lags, so
chunk gaps are not token gaps). Per level: aggregate output tokens/s (all tokens / wall time of the level), p50/p95
of TTFT and ITL over its requests. The client (asyncio over raw sockets, no HTTP library) shares the machine's
cores with the server; its CPU time per level is in the JSON lines.

Multi-LoRA (lmforge only: `transformers serve` serves its one FORCE_MODEL and has no per-request adapters):
`--adapters` random LoRA adapters made with peft (r=8 on q/k/v/o_proj, init_lora_weights=False, seeds 0..),
served as `--adapter l0=DIR ...`; on that one server, 16 streams spread over the adapters (request i names adapter
i mod n) vs 16 streams on the base, alternated over `--repeats` x 2 rounds (ABBA); the ratio of their tok/s.

Prints Markdown tables; writes one JSON line per level and one for the multi-LoRA run to
bench/results/serve.jsonl (not with --no-record).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_machine, finish, lmforge_revision

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results" / "serve.jsonl"
BIN = Path(sys.executable).parent  # the venv's console scripts: lmforge, transformers
NAME = "bench"  # the base model's name on the lmforge server
FALLBACK_PROMPTS = [
    "Tell me a story about a little fox who finds a red ball in the forest.",
    "Once upon a time, there was a girl named Lily who loved to paint the sky.",
    "Write a short story about a robot learning to bake bread.",
    "A boy and his dog go to the beach on a windy day. What happens next?",
    "Tell me about a small bird that wants to fly over the mountain.",
    "Once there was a big tree in the park, and all the children liked to play under it.",
    "Write a story about a cat who is afraid of the rain.",
    "Sam found an old key in the garden. Tell me what it opens.",
]


# ----- the model, its prompts and adapters -----


def tokenizer_texts() -> list[str]:
    """Text to train the preset's tokenizer on: TinyStories + TinyShakespeare, else the repo's docs."""
    files = [DATA / "tinystories" / "tinystories_val_sample.txt", DATA / "tinyshakespeare" / "input.txt"]
    if all(f.is_file() for f in files):
        return [t for f in files for t in f.read_text(encoding="utf-8").split("\n\n") if t.strip()]
    return [line for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
            for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]  # fmt: skip


def build_model_dir(preset_name: str, out: Path, seed: int = 0) -> Path:
    """The preset with seeded random weights and a trained BPE (with lmforge's chat template), as one HF dir."""
    import torch

    from lmforge.model.configs import preset
    from lmforge.model.hf import build_model, save_model
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    config = preset(preset_name)
    train_tokenizer(tokenizer_texts(), "bpe", config.vocab_size, out / "tokenizer")
    tok = Tokenizer.from_dir(out / "tokenizer")
    config = config.model_copy(update={"vocab_size": min(config.vocab_size, tok.vocab_size),
                                       "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                                       "pad_token_id": tok.pad_id})  # fmt: skip
    torch.manual_seed(seed)
    model_dir = out / "model"
    save_model(build_model(config), model_dir)
    for f in (out / "tokenizer").iterdir():
        shutil.copy(f, model_dir / f.name)
    return model_dir


def stop_ids(model_dir: Path) -> list[int]:
    """The ids either server may stop on: the tokenizer's end-of-text / end-of-turn ids and the config's EOS."""
    from lmforge.tokenizer import Tokenizer

    ids = set(Tokenizer.from_dir(model_dir).eot_ids)
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return sorted(ids)


def load_prompts(count: int = 16) -> list[str]:
    """TinyStories openings (as bench/decode.py's --trained), else a fixed list."""
    path = DATA / "tinystories" / "tinystories_val_sample.txt"
    if not path.is_file():
        return FALLBACK_PROMPTS
    stories = path.read_text(encoding="utf-8").split("\n\n")
    return [s.strip()[:120] for s in stories[3 : 3 + count]]


def make_adapters(model_dir: Path, out: Path, count: int) -> dict[str, Path]:
    """`count` random LoRA adapters of the model, saved by peft: {name: dir}."""
    import peft
    import torch
    import transformers

    adapters = {}
    for i in range(count):
        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
        torch.manual_seed(i)
        config = peft.LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                 init_lora_weights=False)  # fmt: skip
        adapters[f"l{i}"] = out / f"l{i}"
        peft.get_peft_model(base, config).save_pretrained(adapters[f"l{i}"])
    return adapters


# ----- the servers -----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_peak_rss_mb(pgid: int) -> float:
    """The summed peak RSS (VmHWM) of the processes of a process group (the server and what it spawned)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        found = re.search(r"VmHWM:\s+(\d+)", status)
        total += int(found.group(1)) / 1024 if found else 0
    return total


class Server:
    """A server subprocess in its own process group: started, waited for (GET /health), stopped with its group."""

    def __init__(self, label: str, command: list[str], port: int, model: str, env: dict, log: Path):
        self.label, self.command, self.port, self.model = label, command, port, model
        self.env, self.log = env, log
        self.proc: subprocess.Popen | None = None
        self.peak_rss_mb = 0.0
        self.start_s = 0.0

    def __enter__(self) -> Server:
        t0 = time.perf_counter()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.label} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        self.start_s = time.perf_counter() - t0
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"{self.label} did not answer /health in 900 s:\n{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.peak_rss_mb = group_peak_rss_mb(self.proc.pid)
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        time.sleep(0.5)  # the group's other processes (transformers' model process) exit with their parent
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def server_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")  # fmt: skip
    return env


def lmforge_server(
    model_dir: Path, args, work: Path, adapters: dict[str, Path] | None = None, policy: bool = False
) -> Server:
    port = free_port()
    command = [str(BIN / "lmforge"), "serve", str(model_dir), "--name", NAME, "--port", str(port),
               "--device", "cpu", "--max-batch", str(args.max_batch), "--max-queue", "100000", "--timeout", "0"]  # fmt: skip
    for name, path in (adapters or {}).items():
        command += ["--adapter", f"{name}={path}"]
    label = "lmforge"
    if policy:  # the guardrails every request and every streamed token go through
        (work / "policy.yaml").write_text(POLICY)
        command += ["--policy", str(work / "policy.yaml")]
        label = "lmforge-policy"
    return Server(label, command, port, NAME, server_env(args.threads), work / f"{label}.log")


# PII redaction both ways (the output held back 64 characters), two blocked topics, a length cap above the
# requests' max_tokens: rules that run on every request and every streamed delta but change none of them.
POLICY = """redact_pii: {input: true, output: true}
blocked_topics:
  - {id: weapons, keywords: [build a bomb, make a gun], patterns: ['\\bnerve agents?\\b']}
  - {id: self-harm, keywords: [hurt myself]}
max_output_tokens: 100000
"""


def transformers_server(model_dir: Path, args, work: Path, cb: bool) -> Server:
    port = free_port()
    command = [str(BIN / "transformers"), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--log-level", "warning"]  # fmt: skip
    if cb:
        command += ["--continuous-batching", "--cb-num-blocks", str(args.cb_num_blocks)]
    command += args.transformers_args.split()
    label = "transformers-cb" if cb else "transformers"
    return Server(label, command, port, str(model_dir), server_env(args.threads), work / f"{label}.log")


# ----- the client -----


@dataclass(eq=False)
class Result:
    """One streamed request: its times (perf_counter seconds), tokens and error, if any."""

    sent: float
    first: float | None = None  # first non-empty content chunk
    last: float | None = None  # last non-empty content chunk
    chunks: int = 0  # non-empty content chunks
    usage: int | None = None  # completion_tokens of the usage chunk
    finish: str | None = None
    error: str | None = None
    text: str = ""

    @property
    def tokens(self) -> int:
        return self.usage if self.usage is not None else self.chunks

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def itl(self) -> float | None:
        return (self.last - self.first) / (self.tokens - 1) if self.tokens > 1 else None


async def body_pieces(reader: asyncio.StreamReader, chunked: bool):
    """The response body as it arrives (HTTP/1.1 chunked transfer encoding, or up to the end of the stream)."""
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readline()
        yield data


async def stream_request(port: int, body: dict) -> Result:
    """POST a streamed chat completion; time its content chunks."""
    payload = json.dumps(body).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n")  # fmt: skip
    result = Result(time.perf_counter())
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    try:
        writer.write(head.encode() + payload)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        chunked = "chunked" in headers.get("transfer-encoding", "")
        if status != 200:
            text = b"".join([p async for p in body_pieces(reader, chunked)]).decode(errors="replace")
            result.error = f"HTTP {status}: {text[:300]}"
            return result
        pending = b""
        async for piece in body_pieces(reader, chunked):
            now = time.perf_counter()
            *lines, pending = (pending + piece).split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return result
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])[:300]
                    return result
                if event.get("usage"):
                    result.usage = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    if content := (choice.get("delta") or {}).get("content"):
                        result.text += content
                        result.first = result.first or now
                        result.last, result.chunks = now, result.chunks + 1
                    result.finish = choice.get("finish_reason") or result.finish
        return result
    finally:
        writer.close()


def request_body(
    server: Server, prompt: str, max_tokens: int, banned: list[int], model: str | None = None
) -> dict:
    body = {"model": model or server.model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "logit_bias": {str(i): -100.0 for i in banned}}  # fmt: skip
    if server.label == "transformers-cb":  # its continuous batching ignores logit_bias
        body["generation_config"] = json.dumps({"eos_token_id": -1})
    return body


async def drive(
    port: int, bodies: list[dict], concurrency: int, timeout: float
) -> tuple[list[Result], float]:
    """Send `bodies` from `concurrency` workers (closed loop); their results, in order, and the wall time."""
    todo = iter(enumerate(bodies))
    results: list[Result] = [Result(0.0, error="not sent")] * len(bodies)

    async def worker() -> None:
        for i, body in todo:
            try:
                results[i] = await asyncio.wait_for(stream_request(port, body), timeout)
            except (
                OSError,
                ValueError,
                KeyError,
                IndexError,
                asyncio.TimeoutError,
                asyncio.IncompleteReadError,
            ) as e:
                results[i] = Result(time.perf_counter(), error=f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN without values."""
    if not values:
        return math.nan
    s = sorted(values)
    at = (len(s) - 1) * q / 100
    lo, hi = math.floor(at), math.ceil(at)
    return s[lo] + (s[hi] - s[lo]) * (at - lo)


def summarise(runs: list[tuple[list[Result], float]], max_tokens: int, cpu_s: float) -> dict:
    """Aggregate tokens/s over all runs, latency percentiles over all their requests (ms)."""
    results = [r for rs, _ in runs for r in rs]
    ok = [r for r in results if r.error is None and r.first is not None]
    ok_ids = {id(r) for r in ok}
    tokens, wall = sum(r.tokens for r in ok), sum(w for _, w in runs)
    ttft = [r.ttft * 1e3 for r in ok]
    itl = [r.itl * 1e3 for r in ok if r.itl is not None]
    errors = [r.error or "no content" for r in results if id(r) not in ok_ids]
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_ms": {"p50": percentile(ttft, 50), "p95": percentile(ttft, 95), "mean": sum(ttft) / max(len(ttft), 1)},
            "itl_ms": {"p50": percentile(itl, 50), "p95": percentile(itl, 95)},
            "short": sum(r.tokens < max_tokens for r in ok), "errors": len(errors), "first_error": errors[0] if errors else None,
            "client_cpu_s": cpu_s, "texts": [r.text for r in results]}  # fmt: skip


def measure(server: Server, args, prompts: list[str], banned: list[int], concurrency: int, requests: int,
            models: list[str] | None = None, repeats: int = 1) -> tuple[list, float]:  # fmt: skip
    """`repeats` runs of `requests` requests at `concurrency` on a warm server: [(results, wall s)], client CPU s."""

    def bodies(n: int, max_tokens: int) -> list[dict]:
        return [request_body(server, prompts[i % len(prompts)], max_tokens, banned,
                             models[i % len(models)] if models else None) for i in range(n)]  # fmt: skip

    cpu0 = time.process_time()
    runs = [asyncio.run(drive(server.port, bodies(requests, args.max_tokens), concurrency, args.request_timeout))
            for _ in range(repeats)]  # fmt: skip
    return runs, time.process_time() - cpu0


def warm_up(server: Server, args, prompts: list[str], banned: list[int], concurrency: int,
            models: list[str] | None = None) -> None:  # fmt: skip
    """One request of --max-tokens tokens, then a burst as wide as the level (a few tokens each)."""
    warm = [request_body(server, prompts[0], args.max_tokens, banned)]
    burst = [request_body(server, prompts[i % len(prompts)], 4, banned, models[i % len(models)] if models else None)
             for i in range(concurrency)]  # fmt: skip
    for bodies, width in ((warm, 1), (burst, concurrency)):
        results, _ = asyncio.run(drive(server.port, bodies, width, args.request_timeout))
        if failed := [r.error for r in results if r.error]:
            raise SystemExit(f"{server.label}: warm-up failed: {failed[0]}\n{server.log_tail()}")


# ----- the report -----


def fmt_pair(stats: dict, key: str) -> str:
    return f"{stats[key]['p50']:,.0f} / {stats[key]['p95']:,.0f}"


def flags(stats: dict) -> str:
    notes = []
    if stats["short"]:
        notes.append(f"{stats['short']} short")
    if stats["errors"]:
        notes.append(f"{stats['errors']} errors")
    return f" ({', '.join(notes)})" if notes else ""


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a / b) else "n/a"


def print_tables(levels: dict[int, dict[str, dict]], peers: list[str], lora: dict | None) -> None:
    for peer in peers:
        print(f"\n| streams | requests | lmforge tok/s | {peer} tok/s | lmforge / {peer} | TTFT p50 / p95 ms, "
              f"lmforge | TTFT p50 / p95 ms, {peer} | ITL p50 / p95 ms, lmforge | ITL p50 / p95 ms, {peer} |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c, stats in levels.items():
            a, b = stats["lmforge"], stats[peer]
            print(f"| {c} | {a['requests']} | {a['tok_s']:,.1f}{flags(a)} | {b['tok_s']:,.1f}{flags(b)} | "
                  f"{ratio(a['tok_s'], b['tok_s'])} | {fmt_pair(a, 'ttft_ms')} | {fmt_pair(b, 'ttft_ms')} | "
                  f"{fmt_pair(a, 'itl_ms')} | {fmt_pair(b, 'itl_ms')} |")  # fmt: skip
    tok_s = lambda c, s: levels[c][s]["tok_s"] if c in levels else math.nan  # noqa: E731
    print("\n| summary | value | goal |\n|---|---:|---:|")
    print(f"| lmforge 16 streams / 1 stream, aggregate tok/s | {ratio(tok_s(16, 'lmforge'), tok_s(1, 'lmforge'))} "
          "| >= 4x |")  # fmt: skip
    for peer in peers:
        print(f"| lmforge / {peer} at 16 streams | {ratio(tok_s(16, 'lmforge'), tok_s(16, peer))} | >= 2x |")
    if lora:
        base, mixed = lora["base"], lora["mixed"]
        print(f"| lmforge {lora['streams']} streams over {lora['adapters']} LoRA adapters / on the base "
              f"({mixed['tok_s']:,.1f}{flags(mixed)} vs {base['tok_s']:,.1f}{flags(base)} tok/s; ITL p50 "
              f"{mixed['itl_ms']['p50']:,.0f} vs {base['itl_ms']['p50']:,.0f} ms) | "
              f"{ratio(mixed['tok_s'], base['tok_s'])} | >= 0.7x |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", default="llama-14m", help="random-weight model to build (without --model)"
    )
    parser.add_argument(
        "--model", type=Path, help="an existing HF decoder dir (tokenizer with a chat template)"
    )
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-level", type=int, help="default: max(8, 2 x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="measured runs per level on each server")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="torch threads of both servers (default: the cores less one, left to the client)")  # fmt: skip
    parser.add_argument("--peer", choices=["cb", "plain", "both", "policy"], default="cb",
                        help="transformers serve with --continuous-batching, without, or both")  # fmt: skip
    parser.add_argument(
        "--max-batch", type=int, help="lmforge --max-batch (default: the largest concurrency)"
    )
    parser.add_argument("--cb-num-blocks", type=int,
                        help="transformers --cb-num-blocks (default: 2 x what the largest level needs)")  # fmt: skip
    parser.add_argument("--transformers-args", default="", help="more flags for transformers serve")
    parser.add_argument(
        "--adapters", type=int, default=4, help="LoRA adapters for the multi-LoRA run (0: skip)"
    )
    parser.add_argument("--adapter-streams", type=int, default=16)
    parser.add_argument("--adapter-requests", type=int, default=32, help="requests per multi-LoRA round")
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/results/serve.jsonl")
    args = parser.parse_args()
    args.max_batch = args.max_batch or max([*args.concurrency, args.adapter_streams])
    peers = {
        "cb": ["transformers-cb"],
        "plain": ["transformers"],
        "both": ["transformers-cb", "transformers"],
        "policy": ["lmforge-policy"],
    }[args.peer]

    import torch
    import transformers

    from lmforge.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)  # for building the model and adapters here
    device = cpu_machine(args.threads)
    versions = {
        "lmforge": lmforge_revision(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    if load_start > 1.0:
        print(f"warning: load average {load_start:.2f} before the run: other work skews these numbers",
              file=sys.stderr)  # fmt: skip
    print(
        f"{device}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; load average {load_start:.2f}"
    )
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        model_dir = args.model.resolve() if args.model else build_model_dir(args.preset, work)
        if Tokenizer.from_dir(model_dir).chat_template is None:
            raise SystemExit(f"{model_dir}: the tokenizer has no chat template (both servers need one)")
        banned, prompts = stop_ids(model_dir), load_prompts()
        model_config = json.loads((model_dir / "config.json").read_text())
        prompt_room = (
            max(len(Tokenizer.from_dir(model_dir).encode(p)) for p in prompts) + 32
        )  # + the template
        if args.cb_num_blocks is None:  # 256-token pages, twice what the widest level holds at once
            args.cb_num_blocks = 2 * math.ceil(
                max([*args.concurrency, 1]) * (prompt_room + args.max_tokens) / 256
            )
        settings = {k: getattr(args, k) for k in ("preset", "concurrency", "requests_per_level", "max_tokens",
                                                   "repeats", "threads", "peer", "max_batch", "cb_num_blocks",
                                                   "transformers_args", "adapters", "adapter_streams",
                                                   "adapter_requests")}  # fmt: skip
        settings.update(model=str(args.model) if args.model else None, vocab=model_config["vocab_size"],
                        banned_ids=banned, prompts=len(prompts))  # fmt: skip
        print(f"model {args.model or args.preset} (vocab {model_config['vocab_size']}, "
              f"{model_config['num_hidden_layers']} layers x {model_config['hidden_size']}), {len(prompts)} prompts, "
              f"{args.max_tokens} tokens a request, banned ids {banned}; peers {', '.join(peers)}\n", flush=True)  # fmt: skip

        levels: dict[int, dict[str, dict]] = {}
        for index, c in enumerate(args.concurrency):
            requests = args.requests_per_level or max(8, 2 * c)
            order = ["lmforge", *peers] if index % 2 == 0 else [*peers[::-1], "lmforge"]
            load = os.getloadavg()[0]
            levels[c] = {}
            for label in order:
                server = (lmforge_server(model_dir, args, work, policy=label == "lmforge-policy")
                          if label.startswith("lmforge")
                          else transformers_server(model_dir, args, work, cb=label == "transformers-cb"))  # fmt: skip
                with server:
                    warm_up(server, args, prompts, banned, c)
                    done, cpu_s = measure(server, args, prompts, banned, c, requests, repeats=args.repeats)
                stats = summarise(done, args.max_tokens, cpu_s)
                stats.update(start_s=server.start_s, peak_rss_mb=server.peak_rss_mb)
                levels[c][label] = stats
                print(f"{c} streams, {label}: {stats['tok_s']:,.1f} tok/s{flags(stats)}, TTFT p50 "
                      f"{stats['ttft_ms']['p50']:,.0f} ms, ITL p50 {stats['itl_ms']['p50']:,.1f} ms, "
                      f"{stats['tokens']} tokens in {stats['wall_s']:.1f} s (started in {server.start_s:.0f} s, "
                      f"client CPU {stats['client_cpu_s']:.2f} s)", file=sys.stderr, flush=True)  # fmt: skip
                if stats["first_error"]:
                    print(f"  first error: {stats['first_error']}", file=sys.stderr)
            texts = {label: stats.pop("texts") for label, stats in levels[c].items()}
            for peer in peers:  # the same greedy text for the same request: the same work on both servers
                same = sum(a == b for a, b in zip(texts["lmforge"], texts[peer], strict=True)) / len(
                    texts[peer]
                )
                levels[c][peer]["same_text_as_lmforge"] = same
                print(
                    f"{c} streams: {same:.0%} of {peer}'s answers are lmforge's, word for word",
                    file=sys.stderr,
                )
            records.append({"bench": "serve", "concurrency": c, "requests": requests, "order": order,
                            "servers": levels[c], "load_average": [load, os.getloadavg()[0]]})  # fmt: skip

        lora = None
        if args.adapters:
            adapters = make_adapters(model_dir, work / "adapters", args.adapters)
            names, load = list(adapters), os.getloadavg()[0]
            runs: dict[str, list] = {"base": [], "mixed": []}
            cpu = dict.fromkeys(runs, 0.0)
            with lmforge_server(model_dir, args, work, adapters) as server:
                warm_up(server, args, prompts, banned, args.adapter_streams, names)
                for r in range(args.repeats * 2):
                    for variant in ("base", "mixed") if r % 2 == 0 else ("mixed", "base"):
                        done, cpu_s = measure(server, args, prompts, banned, args.adapter_streams,
                                              args.adapter_requests, names if variant == "mixed" else None)  # fmt: skip
                        runs[variant] += done
                        cpu[variant] += cpu_s
            lora = {
                "streams": args.adapter_streams,
                "adapters": len(names),
                "peak_rss_mb": server.peak_rss_mb,
            }
            for variant, done in runs.items():
                lora[variant] = {**summarise(done, args.max_tokens, cpu[variant]),
                                 "rounds_tok_s": [sum(r.tokens for r in rs if r.error is None) / w for rs, w in done]}  # fmt: skip
            base_texts, mixed_texts = lora["base"].pop("texts"), lora["mixed"].pop("texts")
            lora["differ_from_base"] = sum(
                a != b for a, b in zip(base_texts, mixed_texts, strict=True)
            ) / len(base_texts)
            print(f"multi-LoRA: base {lora['base']['rounds_tok_s']}, mixed {lora['mixed']['rounds_tok_s']} tok/s; "
                  f"{lora['differ_from_base']:.0%} of the adapters' answers differ from the base's", file=sys.stderr)  # fmt: skip
            records.append({"bench": "serve-multi-lora", **lora, "ratio": lora["mixed"]["tok_s"] / lora["base"]["tok_s"],
                            "load_average": [load, os.getloadavg()[0]]})  # fmt: skip

    print_tables(levels, peers, lora)
    finish(RESULTS, records, started=t_start, load_start=load_start, record=not args.no_record, date=date,
           machine=device, versions=versions, settings=settings)  # fmt: skip


if __name__ == "__main__":
    main()
