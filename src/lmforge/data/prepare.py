"""`lmforge data prepare`: input files + tokenizer → token shards, loss masks and a manifest (the dataset's id).

Layout of a prepared dataset directory:

    manifest.json                     inputs (sha256, format, licence, counts), tokenizer hash, governance
                                      report, splits with shard sha256s, resolved config; its `id` is the version
    train/00000.tokens.bin            token ids, uint16 when the vocabulary fits, else uint32 (np.memmap-able)
    train/00000.tokens.docs.npy       int64 document offsets into the shard: doc i is [docs[i], docs[i+1])
    train/00000.tokens_mask.bin       uint8, 1 = trained on (chat data: assistant replies + end-of-turn)
    train/00000.labels.npy            int64 class per document (classification data)
    val/...                           the same for the validation split
    rejects.jsonl                     bad records, with --skip-bad

Preference data has two token columns, `chosen` and `rejected` (each with its mask and docs), aligned by
document index. Everything is written into a temporary directory beside the output and renamed into place.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import re
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from lmforge import __version__
from lmforge.config import Section
from lmforge.data.formats import Example, detect_format, load_label_map, to_examples
from lmforge.data.governance import Deduplicator, contamination, scrub_pii
from lmforge.data.readers import BadRecord, iter_files, read_records
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write, staging_dir

log = logging.getLogger(__name__)

CHUNK = 512  # examples per tokenisation task: large enough to amortise IPC, small enough to stream


class PrepareConfig(Section):
    """Everything `data prepare` needs; the resolved config is stored in the manifest."""

    inputs: list[Path] = Field(default_factory=list)
    """Input files or directories (.txt, .jsonl, .json, .csv, .parquet, their .gz, `datasets` dirs)."""
    tokenizer: Path | None = None
    """Tokenizer directory (tokenizer.json; tokenizer_config.json with the chat template)."""
    format: str | None = None
    """Record format; auto-detected from the first records when not set."""
    chat_template: Path | None = None
    """A Jinja chat template file used instead of the tokenizer's own."""
    text_separator: str | None = None
    """Document separator in .txt files; default: `<|endoftext|>` lines if present, else blank lines."""
    label_field: str | None = None
    """Classification label column; default: auto (`label`, or `category`)."""
    label_map: Path | None = None
    """JSON list or mapping of label names to ids; default: a categories.json/labels.json beside the input."""
    licence: str | None = None
    """Licence of the inputs; default: read from a SOURCE.md or LICENSE beside each input."""
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Fraction of documents in the validation split (chosen by a hash of each document's content)."""
    seed: int = 0
    """Salt of the split hash: another seed gives another split."""
    add_bos: bool = False
    """Prepend the BOS token to every text document."""
    append_eos: bool = True
    """Append the EOS token to every text document, so the model learns where documents end."""
    num_proc: int = Field(default_factory=lambda: min(2, os.cpu_count() or 1), ge=1)
    """Worker processes for chat/preference/classification data (1 = in-process); plain text is always
    tokenised in-process, where it is fastest."""
    shard_tokens: int = Field(100_000_000, ge=1)
    """Tokens per shard file at most (a shard holds whole documents)."""
    pii: Literal["off", "report", "mask", "drop"] = "report"
    """PII scrub (e-mail, phone, IP, credit card): count only, replace with placeholders, or drop documents."""
    dedup: Literal["off", "exact", "near"] = "exact"
    """Drop exact duplicates (normalised hash), or also near duplicates (MinHash-LSH)."""
    dedup_threshold: float = Field(0.8, gt=0.0, le=1.0)
    """Jaccard similarity above which two documents are near duplicates."""
    eval_sets: dict[str, list[Path]] = Field(default_factory=dict)
    """Evaluation sets to check for contamination: {name: [files]}."""
    contamination_ngram: int = Field(13, ge=1)
    """Word n-gram length of the contamination check."""
    decontaminate: bool = False
    """Drop training documents that share an n-gram with an evaluation set."""
    skip_bad: bool = False
    """Write bad records to rejects.jsonl and go on, instead of stopping at the first."""


# ------------------------------------------------------------------------------------- tokenisation


@dataclass
class _Encoded:
    """One tokenised example: per column (ids, mask or None), and the label for classification."""

    columns: dict[str, tuple[np.ndarray, np.ndarray | None]]
    label: int | None = None


_worker: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, template: str | None, add_bos: bool, append_eos: bool) -> None:
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(Path(tokenizer_dir))
    _worker.update(tok=tok, template=template, add_bos=add_bos, append_eos=append_eos)


def _encode_chunk(examples: list[Example]) -> list[_Encoded]:
    """Tokenise a chunk in a worker (or in-process): text in one batched call, chats through the template."""
    tok, template = _worker["tok"], _worker["template"]
    out: list[_Encoded | None] = [None] * len(examples)
    texts = [(i, ex.text) for i, ex in enumerate(examples) if ex.kind == "text"]
    if texts:
        head = [tok.bos_id] if _worker["add_bos"] and tok.bos_id is not None else []
        tail = [tok.eos_id] if _worker["append_eos"] and tok.eos_id is not None else []
        for (i, _), ids in zip(texts, tok.encode_batch([t for _, t in texts]), strict=True):
            out[i] = _Encoded({"tokens": (np.asarray(head + ids + tail), None)})
    for i, ex in enumerate(examples):
        if ex.kind == "chat":
            from lmforge.chat import render_chat  # here, not above: Jinja's import costs plain text 0.1 s

            r = render_chat(tok, ex.messages, template=template)
            out[i] = _Encoded({"tokens": (np.asarray(r.ids), np.asarray(r.mask, dtype=np.uint8))})
        elif ex.kind == "classification":
            out[i] = _Encoded(
                {"tokens": (np.asarray(tok.encode(ex.text, add_special_tokens=True)), None)}, ex.label
            )
        elif ex.kind == "preference":
            from lmforge.chat import render_chat

            columns = {}
            for name in ("chosen", "rejected"):
                reply = {"role": "assistant", "content": getattr(ex, name)}
                r = render_chat(tok, [*ex.messages, reply], template=template)
                columns[name] = (np.asarray(r.ids), np.asarray(r.mask, dtype=np.uint8))
            out[i] = _Encoded(columns)
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ shards


@dataclass
class _SplitWriter:
    """Accumulates encoded documents of one split and writes whole-document shards."""

    root: Path
    dtype: np.dtype
    shard_tokens: int
    buffers: dict[str, list[np.ndarray]] = field(default_factory=dict)
    masks: dict[str, list[np.ndarray]] = field(default_factory=dict)
    labels: list[int] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)
    buffered: int = 0  # tokens waiting in `buffers` for the next shard
    documents: int = 0
    tokens: int = 0
    masked: int = 0

    def add(self, enc: _Encoded) -> None:
        for name, (ids, mask) in enc.columns.items():
            self.buffers.setdefault(name, []).append(ids)
            if mask is not None:
                self.masks.setdefault(name, []).append(mask)
                self.masked += int(mask.sum())
            self.tokens += len(ids)
            self.buffered += len(ids)
        if enc.label is not None:
            self.labels.append(enc.label)
        self.documents += 1
        if self.buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffers or not next(iter(self.buffers.values())):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        stem = f"{len(self.shards):05d}"
        files: dict[str, str] = {}
        for name, docs in self.buffers.items():
            offsets = np.zeros(len(docs) + 1, dtype=np.int64)
            np.cumsum([len(d) for d in docs], out=offsets[1:])
            files[f"{stem}.{name}.bin"] = _write(
                self.root / f"{stem}.{name}.bin", np.concatenate(docs).astype(self.dtype)
            )
            files[f"{stem}.{name}.docs.npy"] = _write(self.root / f"{stem}.{name}.docs.npy", offsets)
            if name in self.masks:
                mask = np.concatenate(self.masks[name])
                files[f"{stem}.{name}_mask.bin"] = _write(self.root / f"{stem}.{name}_mask.bin", mask)
        if self.labels:
            files[f"{stem}.labels.npy"] = _write(
                self.root / f"{stem}.labels.npy", np.asarray(self.labels, np.int64)
            )
        n_docs = len(next(iter(self.buffers.values())))
        self.shards.append({"documents": n_docs, "files": files})
        self.buffers, self.masks, self.labels, self.buffered = {}, {}, [], 0

    def summary(self) -> dict:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "masked_tokens": self.masked,
            "shards": self.shards,
        }


def _write(path: Path, array: np.ndarray) -> str:
    """Write an array (raw .bin or .npy) and return its sha256."""
    if path.suffix == ".npy":
        np.save(path, array)
    else:
        array.tofile(path)
    return _sha256(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------- governance


def _texts(ex: Example) -> list[str]:
    """The human-written strings of an example (what PII, dedup and contamination look at)."""
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


def _in_val(ex: Example, fraction: float, seed: int) -> bool:
    """Deterministic split by a hash of the content (duplicates land on the same side)."""
    digest = hashlib.blake2b("\x1f".join(_texts(ex)).encode(), digest_size=8, salt=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") / 2**64 < fraction


def read_licence(path: Path) -> str | None:
    """The licence stated in a SOURCE.md or LICENSE beside `path` (first sentence), if any."""
    folder = path if path.is_dir() else path.parent
    source = folder / "SOURCE.md"
    if source.exists():
        m = re.search(r"\*\*Licen[cs]e:\*\*\s*(.+)", source.read_text(encoding="utf-8", errors="replace"))
        if m:
            return re.split(r"(?<=[^A-Z])\.\s", m.group(1).strip(), maxsplit=1)[0].strip(" .")[:160]
    for name in ("LICENSE", "LICENSE.txt", "LICENSE.md", "COPYING"):
        if (folder / name).exists():
            first = next(
                (line for line in (folder / name).read_text(errors="replace").splitlines() if line.strip()),
                "",
            )
            return first.strip()[:160] or None
    return None


# ------------------------------------------------------------------------------------------- prepare


def fingerprint(cfg: PrepareConfig, inputs: Sequence[Path], tokenizer_hash: str) -> str:
    """What the output depends on: the config, every input's bytes, the tokenizer and lmforge's version."""
    h = hashlib.sha256(cfg.model_dump_json().encode())
    for path in inputs:
        h.update(str(path).encode())
        h.update(_tree_sha256(path).encode())
    h.update(tokenizer_hash.encode())
    h.update(__version__.encode())
    return h.hexdigest()


def _tree_sha256(path: Path) -> str:
    if path.is_file():
        return _sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(_sha256(f).encode())
    return h.hexdigest()


def prepare(cfg: PrepareConfig, out: Path, progress: Callable[[int], None] | None = None) -> dict:
    """Run `data prepare`; returns the manifest (with `cache_hit`). Re-running on unchanged inputs reuses `out`."""
    from lmforge.tokenizer import Tokenizer

    if not cfg.inputs:
        raise LmforgeError("data prepare: no input files given")
    if cfg.tokenizer is None:
        raise LmforgeError("data prepare: --tokenizer DIR is required")
    inputs = iter_files(cfg.inputs)
    tok = Tokenizer.from_dir(cfg.tokenizer)
    key = fingerprint(cfg, inputs, tok.hash)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == key:
            log.info("data prepare: cache hit, %s is up to date", out)
            return {**old, "cache_hit": True}
    template = cfg.chat_template.read_text(encoding="utf-8") if cfg.chat_template else None

    with staging_dir(out) as tmp:
        manifest = _prepare_into(cfg, inputs, tok, template, tmp, progress)
        manifest["fingerprint"] = key
        manifest["id"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return {**manifest, "cache_hit": False}


def _prepare_into(
    cfg: PrepareConfig,
    inputs: list[Path],
    tok: Any,
    template: str | None,
    root: Path,
    progress: Callable | None,
) -> dict:
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32)
    rejects: list[BadRecord] = []
    on_bad = rejects.append if cfg.skip_bad else None
    pii_counts: Counter[str] = Counter()
    pii_dropped = 0
    dedup = (
        None if cfg.dedup == "off" else Deduplicator(threshold=cfg.dedup_threshold, near=cfg.dedup == "near")
    )
    dedup_dropped: Counter[str] = Counter()
    input_reports: list[dict] = []
    kinds: set[str] = set()

    def examples_of(path: Path, report: dict) -> Iterator[Example]:
        records = read_records(path, on_bad=on_bad, text_separator=cfg.text_separator)
        fmt = cfg.format or detect_format(_peek_records(path, cfg.text_separator))
        report["format"] = fmt
        label_map = load_label_map(cfg.label_map) if cfg.label_map else _label_map_beside(path)
        kwargs = {"label_map": label_map, "on_bad": on_bad}
        if cfg.label_field:
            kwargs["label_field"] = cfg.label_field
        for ex in to_examples(_count(records, report), fmt, **kwargs):
            report["examples"] += 1
            yield ex

    contamination_report = _contamination_report(cfg, inputs, examples_of) if cfg.eval_sets else None
    drop_ids = set(contamination_report["drop_ids"]) if contamination_report and cfg.decontaminate else set()

    def governed() -> Iterator[Example]:
        nonlocal pii_dropped
        for path in inputs:
            report = {"path": str(path), "bytes": _size(path), "sha256": _tree_sha256(path), "records": 0,
                      "examples": 0, "licence": cfg.licence or read_licence(path)}  # fmt: skip
            input_reports.append(report)
            for ex in examples_of(path, report):
                if kinds and ex.kind not in kinds:
                    raise LmforgeError(
                        f"{path}: holds {ex.kind} examples but earlier inputs hold {next(iter(kinds))} examples; "
                        "prepare each kind into its own dataset"
                    )
                kinds.add(ex.kind)
                if progress:
                    progress(sum(len(t.encode()) for t in _texts(ex)))
                if cfg.pii == "mask":
                    found: Counter[str] = Counter()

                    def scrub(text: str, found: Counter = found) -> str:
                        new, counts = scrub_pii(text, "mask")
                        found.update(counts)
                        return new

                    ex = _map_texts(ex, scrub)
                    pii_counts.update(found)
                elif cfg.pii != "off":
                    found = Counter()
                    for text in _texts(ex):
                        found.update(scrub_pii(text, "report")[1])
                    pii_counts.update(found)
                    if cfg.pii == "drop" and found:
                        pii_dropped += 1
                        continue
                if dedup is not None:
                    dup = dedup.add(ex.id, "\n".join(_texts(ex)))
                    if dup is not None:
                        dedup_dropped[dup.kind] += 1
                        continue
                if ex.id in drop_ids:
                    continue
                yield ex

    writers = {s: _SplitWriter(root / s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    chunks = _chunks(governed(), CHUNK)
    init = (str(cfg.tokenizer), template, cfg.add_bos, cfg.append_eos)
    first = next(chunks, None)
    chunks = itertools.chain([first] if first else [], chunks)
    # Plain text tokenises at several MB/s in-process (tiktoken or the Rust backend), faster than shipping it
    # to workers and back; chat templates and preference pairs are Python-heavy, and workers pay off there.
    if cfg.num_proc > 1 and first and first[0].kind != "text":
        # A bounded window of chunks in flight: workers tokenise while this process reads and governs, and
        # memory stays flat whatever the input size (Pool.imap would read the whole input ahead).
        with _worker_pool(cfg.num_proc, init) as pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append((chunk, pool.apply_async(_encode_chunk, (chunk,))))
                if len(pending) >= 2 * cfg.num_proc:
                    done, result = pending.popleft()
                    _route(done, result.get(), writers, cfg)
            for done, result in pending:
                _route(done, result.get(), writers, cfg)
    else:
        _init_worker(*init)
        for chunk in chunks:
            _route(chunk, _encode_chunk(chunk), writers, cfg)
    for w in writers.values():
        w.flush()
    if rejects:
        lines = [
            json.dumps({"source": b.source, "where": b.where, "reason": b.reason, "raw": b.raw})
            for b in rejects
        ]
        atomic_write(root / "rejects.jsonl", "\n".join(lines) + "\n")
    governance: dict[str, Any] = {
        "pii": {"mode": cfg.pii, "found": dict(pii_counts), "documents_dropped": pii_dropped},
        "dedup": {
            "mode": cfg.dedup,
            "dropped": dict(dedup_dropped),
            **({"report": dedup.report()} if dedup else {}),
        },
    }
    if contamination_report is not None:
        governance["contamination"] = {**contamination_report, "decontaminated": cfg.decontaminate}
    return {
        "lmforge_version": __version__,
        "kind": next(iter(kinds), None),
        "dtype": dtype.name,
        "inputs": input_reports,
        "rejected": len(rejects),
        "tokenizer": {
            "path": str(cfg.tokenizer),
            "hash": tok.hash,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
        },
        "splits": {name: w.summary() for name, w in writers.items()},
        "governance": governance,
        "config": json.loads(cfg.model_dump_json()),
    }


@contextmanager
def _worker_pool(n: int, init: tuple) -> Iterator[Any]:
    """A pool of tokenising workers. Fork where it exists: it starts in milliseconds and needs no `__main__`
    guard in the caller's script; TOKENIZERS_PARALLELISM is pinned while forking so the Rust thread pool
    neither warns nor deadlocks in the children."""
    method = "fork" if "fork" in mp.get_all_start_methods() and sys.platform != "darwin" else "spawn"
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = mp.get_context(method).Pool(n, _init_worker, init)
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    with pool:
        yield pool


def _route(
    chunk: list[Example], encoded: list[_Encoded], writers: dict[str, _SplitWriter], cfg: PrepareConfig
):
    for ex, enc in zip(chunk, encoded, strict=True):
        writers["val" if _in_val(ex, cfg.val_fraction, cfg.seed) else "train"].add(enc)


def _chunks(items: Iterator[Example], n: int) -> Iterator[list[Example]]:
    chunk: list[Example] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _count(records: Iterator, report: dict) -> Iterator:
    for r in records:
        report["records"] += 1
        yield r


def _peek_records(path: Path, text_separator: str | None, n: int = 20) -> list:
    """The first records of a file, for format detection."""
    records = []
    for r in read_records(path, on_bad=lambda bad: None, text_separator=text_separator):
        records.append(r)
        if len(records) == n:
            break
    if not records:
        raise LmforgeError(f"{path}: no records (empty file?)")
    return records


def iter_texts(
    paths: Sequence[Path], fmt: str | None = None, text_separator: str | None = None
) -> Iterator[str]:
    """Every human-written string in the inputs, whatever their format (what a tokenizer is trained on)."""
    for path in iter_files(paths):
        records = read_records(path, text_separator=text_separator)
        for ex in to_examples(records, fmt or detect_format(_peek_records(path, text_separator))):
            yield from _texts(ex)


def _label_map_beside(path: Path) -> dict[str, int] | None:
    folder = path if path.is_dir() else path.parent
    for name in ("categories.json", "labels.json"):
        if (folder / name).exists():
            return load_label_map(folder / name)
    return None


def _size(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def _eval_examples(cfg: PrepareConfig, examples_of: Callable) -> dict[str, list[tuple[str, str]]]:
    sets = {}
    for name, files in cfg.eval_sets.items():
        sets[name] = [
            (ex.id, "\n".join(_texts(ex)))
            for path in iter_files(files)
            for ex in examples_of(path, Counter())
        ]
    return sets


def _contamination_report(cfg: PrepareConfig, inputs: list[Path], examples_of: Callable) -> dict:
    train = ((ex.id, "\n".join(_texts(ex))) for path in inputs for ex in examples_of(path, Counter()))
    return contamination(train, _eval_examples(cfg, examples_of), n=cfg.contamination_ngram)
