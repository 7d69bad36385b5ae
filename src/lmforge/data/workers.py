"""What `data prepare`'s worker processes do: a chunk of one input (raw records, or a text file's whole
documents as bytes) → examples → PII → decontamination → split and dedup keys → token columns.

The main process (`prepare.py`) cuts inputs into `Task`s and merges the `Chunk`s that come back, in input
order; `worker_pool` and `in_process` run the same `_process` in forked or spawned workers or in-process.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import chain, compress
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.data.dataset import Column
from lmforge.data.formats import SUBSET_FIELDS, Example, to_examples
from lmforge.data.governance import DedupKey, Deduplicator, find_pii_many, masked
from lmforge.data.readers import BadRecord, Record, TextSplit, decode_chunk
from lmforge.errors import LmforgeError
from lmforge.tokenizer import insert_each

if TYPE_CHECKING:
    from lmforge.data.prepare import PrepareConfig


@dataclass
class Task:
    """A chunk of one input, what a worker turns into tokens: raw records, or for a text file whole documents'
    bytes (the worker decodes and splits them, so reading text costs the main process next to nothing)."""

    source: str
    fmt: str
    label_map: dict[str, int] | None
    records: list[tuple[int, Any, bool]]  # (line, data, by_index) of each Record: cheap to pickle
    text: tuple[int, bytes] | None = None  # (first line number, bytes) from `text_chunks`
    split: TextSplit | None = None


@dataclass
class Chunk:
    """A processed task: its kept examples' tokens in order, plus what the main process merges and reports. Arrays
    per column and per chunk, not one per document, so it crosses processes and is written cheaply."""

    columns: dict[str, Column] = field(default_factory=dict)
    labels: np.ndarray | None = None  # per kept example: class id (classification), subset name (preference)
    in_val: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    # With dedup on: each kept example's id, dedup key and first 200 characters, for the main process to add.
    ids: list[str] = field(default_factory=list)
    keys: list[DedupKey] = field(default_factory=list)
    snippets: list[str] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)
    records: int = 0
    examples: int = 0
    text_bytes: int = 0
    pii: Counter = field(default_factory=Counter)
    pii_dropped: int = 0
    decontaminated: int = 0
    rejects: list[BadRecord] = field(default_factory=list)


_worker: dict[str, Any] = {}


def _init_worker(cfg: PrepareConfig, template: str | None, drop_ids: set[str], tok: Any = None) -> None:
    """Per-process state: the tokenizer (loaded unless given), and a Deduplicator only to compute keys (the main
    process adds them)."""
    from lmforge.tokenizer import Tokenizer

    dedup = None if cfg.dedup == "off" else deduplicator(cfg)
    tok = tok if tok is not None else Tokenizer.from_dir(cfg.tokenizer)
    _worker.update(cfg=cfg, tok=tok, template=template, drop_ids=drop_ids, dedup=dedup)


def deduplicator(cfg: PrepareConfig) -> Deduplicator:
    """The Deduplicator `cfg` asks for (exact, or exact + near at its threshold; short documents kept)."""
    return Deduplicator(
        threshold=cfg.dedup_threshold, near=cfg.dedup == "near", min_chars=cfg.dedup_min_chars
    )


def _process(task: Task) -> Chunk:
    """Records → examples → PII → decontamination → split and dedup keys → tokens, in a worker or in-process."""
    cfg: PrepareConfig = _worker["cfg"]
    chunk = Chunk()
    on_bad = chunk.rejects.append if cfg.skip_bad else None
    examples: list[Example] | None = None
    if task.text is None:
        records: Iterator[Record] = (
            Record(task.source, line, data, by_index) for line, data, by_index in task.records
        )
    else:
        chunk.text_bytes = len(task.text[1])
        documents = decode_chunk(task.source, task.text, task.split, on_bad)  # type: ignore[arg-type]
        if task.fmt == "text":
            # A text file's documents are text examples as they come (cleaned, never empty), with `Record.where`
            # ids: made here directly, without a Record and a converter each (a third of the Python per document).
            examples = [Example(f"{task.source}:{line}", "text", text) for line, text in documents]
            chunk.records = len(examples)
        else:
            records = (Record(task.source, line, text) for line, text in documents)
    if examples is None:
        kwargs: dict[str, Any] = {"label_map": task.label_map, "on_bad": on_bad}
        if cfg.label_field:
            kwargs["label_field"] = cfg.label_field
        examples = list(to_examples(_counted(records, chunk), task.fmt, **kwargs))
    chunk.examples, chunk.kinds = len(examples), {ex.kind for ex in examples}
    if len(chunk.kinds) > 1:
        raise LmforgeError(f"{task.source}: holds examples of kinds {sorted(chunk.kinds)}; expected one kind")
    # The human-written strings of each example (what PII, dedup and contamination look at)
    texts = (
        [[ex.text] for ex in examples] if chunk.kinds == {"text"} else [example_texts(ex) for ex in examples]
    )
    if task.text is None:
        chunk.text_bytes = sum(len(t.encode()) for ts in texts for t in ts)
    if cfg.pii != "off":
        examples, texts = _scrub(examples, texts, cfg.pii, chunk)
    if drop_ids := _worker["drop_ids"]:
        keep = [ex.id not in drop_ids for ex in examples]
        chunk.decontaminated = keep.count(False)
        examples = list(compress(examples, keep))
        texts = list(compress(texts, keep))
    joined = [ts[0] if len(ts) == 1 else "\n".join(ts) for ts in texts]  # what the split and dedup hash
    chunk.in_val = in_val(joined, cfg.val_fraction, cfg.seed)
    if (dedup := _worker["dedup"]) is not None:
        chunk.ids = [ex.id for ex in examples]
        chunk.keys = dedup.keys(joined)
        chunk.snippets = [text[:200] for text in joined]
    chunk.columns, chunk.labels = _encode(examples)
    dtype = token_dtype(_worker["tok"])  # the shards' dtype already: a quarter of int64's bytes to send back
    chunk.columns = {name: (ids.astype(dtype), *rest) for name, (ids, *rest) in chunk.columns.items()}
    return chunk


def token_dtype(tok: Any) -> np.dtype:
    """The shards' token dtype: uint16 when the vocabulary fits, else uint32."""
    return np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)


def _counted(records: Iterator[Record], chunk: Chunk) -> Iterator[Record]:
    for record in records:
        chunk.records += 1
        yield record


def _scrub(
    examples: list[Example], texts: list[list[str]], mode: str, chunk: Chunk
) -> tuple[list[Example], list[list[str]]]:
    """PII over a chunk's examples (one scan of all their texts): counts per kind in `chunk`; "drop" leaves out
    the examples with any, "mask" puts placeholders in their texts."""
    spans = find_pii_many([t for ts in texts for t in ts])
    chunk.pii.update(kind for found in spans for _, _, kind in found)
    if mode == "report":
        return examples, texts
    kept_examples, kept_texts, at = [], [], 0
    for ex, ts in zip(examples, texts, strict=True):
        mine, at = spans[at : at + len(ts)], at + len(ts)
        if any(mine) and mode == "drop":
            chunk.pii_dropped += 1
            continue
        if any(mine):  # _map_texts visits the texts in example_texts' order
            each = iter(mine)
            ex = _map_texts(ex, lambda text, each=each: masked(text, next(each)))
            ts = example_texts(ex)
        kept_examples.append(ex)
        kept_texts.append(ts)
    return kept_examples, kept_texts


def _encode(examples: list[Example]) -> tuple[dict[str, Column], np.ndarray | None]:
    """Tokenise examples of one kind into columns (and labels: classes, or preference subsets by name): text in one
    batched call (EOS appended by it, BOS inserted by one array operation), chats and preference pairs through the
    chat template."""
    tok, template, cfg = _worker["tok"], _worker["template"], _worker["cfg"]
    kind = examples[0].kind if examples else None
    if kind == "text":
        end = tok.eos_id if cfg.append_eos else None
        ids, offsets = tok.encode_many([ex.text for ex in examples], end_id=end)
        if cfg.add_bos and tok.bos_id is not None:
            ids, offsets = insert_each(ids, offsets, tok.bos_id, at_end=False)
        return {"tokens": (ids, offsets, None)}, None
    if kind == "classification":
        ids, offsets = tok.encode_many([ex.text for ex in examples], add_special_tokens=True)
        return {"tokens": (ids, offsets, None)}, np.array([ex.label for ex in examples], np.int64)
    from lmforge.chat import render_chat  # here, not above: Jinja's import costs plain text 0.1 s
    from lmforge.tokenizer import flat_ids

    columns = {}
    for name in ("tokens",) if kind == "chat" else ("chosen", "rejected"):
        rendered = [render_chat(tok, _conversation(ex, name), template=template) for ex in examples]
        ids, offsets = flat_ids([r.ids for r in rendered])
        mask = np.fromiter(chain.from_iterable(r.mask for r in rendered), np.uint8, len(ids))
        columns[name] = (ids, offsets, mask)
    return columns, _subsets(examples) if kind == "preference" else None


def _subsets(examples: list[Example]) -> np.ndarray | None:
    """Preference pairs' subsets by name (the main process numbers them, as it sees the whole dataset), or None
    when no pair names one."""
    names = [ex.label_name for ex in examples]
    if all(name is None for name in names):
        return None
    if None in names:
        named = next(ex.id for ex in examples if ex.label_name is not None)
        unnamed = next(ex.id for ex in examples if ex.label_name is None)
        raise LmforgeError(
            f"preference pair {unnamed} names no subset ({' or '.join(SUBSET_FIELDS)}) but pair {named} does; "
            "expected every pair of a dataset to name its subset, or none"
        )
    return np.array(names, dtype=np.str_)


def _conversation(ex: Example, column: str) -> Sequence[dict]:
    """The messages rendered into `column`: a chat's, or a preference prompt with its chosen or rejected reply."""
    if column == "tokens":
        return ex.messages  # type: ignore[return-value]
    return [*ex.messages, {"role": "assistant", "content": getattr(ex, column)}]  # type: ignore[misc]


# --------------------------------------------------------------------------------------- governance


def example_texts(ex: Example) -> list[str]:
    """The human-written strings of an example (what PII, dedup and contamination look at)."""
    if ex.kind == "text":
        return [ex.text]  # type: ignore[list-item]  # the common case, made cheap: one call per document
    parts = [ex.text] if ex.text is not None else []
    parts += [m["content"] for m in ex.messages or ()]
    parts += [s for s in (ex.chosen, ex.rejected) if s is not None]
    return parts


def _map_texts(ex: Example, fn: Callable[[str], str]) -> Example:
    """The example with `fn` applied to every string it holds."""
    messages = tuple({**m, "content": fn(m["content"])} for m in ex.messages) if ex.messages else ex.messages
    return replace(
        ex,
        text=fn(ex.text) if ex.text is not None else None,
        messages=messages,
        chosen=fn(ex.chosen) if ex.chosen is not None else None,
        rejected=fn(ex.rejected) if ex.rejected is not None else None,
    )


def in_val(texts: list[str], fraction: float, seed: int) -> np.ndarray:
    """Which texts go to validation: a deterministic split by a salted hash of each one's content (duplicates land
    on the same side). Text i is in when its 64-bit blake2b digest / 2**64 < `fraction`."""
    salted = hashlib.blake2b(digest_size=8, salt=seed.to_bytes(8, "little"))
    digests = []
    for text in texts:
        h = salted.copy()  # cheaper than a new salted hasher per text
        h.update(text.encode())
        digests.append(h.digest())
    # float64 / 2**64 as Python's int / 2**64: the same correctly rounded value, so the same split
    return np.frombuffer(b"".join(digests), "<u8").astype(np.float64) / 2**64 < fraction


@contextmanager
def worker_pool(n: int, init: tuple) -> Iterator[Callable]:
    """Worker processes; yields submit(task) -> result getter. Fork where it exists: it starts in milliseconds, needs
    no `__main__` guard in the caller's script, and the children inherit this process's tokenizer with its tiktoken
    encoding already built (80 ms each to load again). TOKENIZERS_PARALLELISM is pinned while forking so the Rust
    thread pool neither warns nor deadlocks in the children."""
    fork = "fork" in mp.get_all_start_methods() and sys.platform != "darwin"
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        if fork:
            _init_worker(*init)
            _worker["tok"].encode_many(["warm-up"])  # builds the fast encoding once, here, for every child
            pool = mp.get_context("fork").Pool(n)
        else:
            pool = mp.get_context("spawn").Pool(n, _init_worker, init[:-1])  # each child loads the tokenizer
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    try:
        with pool:
            yield lambda task: pool.apply_async(_process, (task,)).get
    finally:
        _worker.clear()


@contextmanager
def in_process(init: tuple) -> Iterator[Callable]:
    """The same work in this process; yields submit(task) -> result getter (the task runs at once)."""
    _init_worker(*init)

    def submit(task: Task) -> Callable[[], Chunk]:
        result = _process(task)
        return lambda: result

    try:
        yield submit
    finally:
        _worker.clear()
