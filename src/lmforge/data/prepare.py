"""`lmforge data prepare`: input files + tokenizer → token shards, loss masks and a manifest (the dataset's id).

Layout of a prepared dataset directory:

    manifest.json                     inputs (sha256, format, licence, counts), tokenizer hash, governance
                                      report, splits with shard sha256s, resolved config; its `id` is the version
    train/00000.tokens.bin            token ids, uint16 when the vocabulary fits, else uint32 (np.memmap-able)
    train/00000.tokens.docs.npy       int64 document offsets into the shard: doc i is [docs[i], docs[i+1])
    train/00000.tokens_mask.bin       uint8, 1 = trained on (chat data: assistant replies + end-of-turn)
    train/00000.labels.npy            int64 class per document (classification data), or subset per pair
                                      (preference data whose records name one: manifest `subsets`, id -> name)
    val/...                           the same for the validation split
    rejects.jsonl                     bad records, with --skip-bad

Preference data has two token columns, `chosen` and `rejected` (each with its mask and docs), aligned by
document index. Everything is written into a temporary directory beside the output and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import Field

from lmforge import __version__
from lmforge.config import Section
from lmforge.data.dataset import ShardWriter
from lmforge.data.formats import SUBSET_FIELDS, Example, detect_format, load_label_map, to_examples
from lmforge.data.governance import contamination
from lmforge.data.readers import (
    BadRecord,
    iter_files,
    read_records,
    text_chunks,
    text_split,
)
from lmforge.data.workers import (
    Chunk,
    Task,
    deduplicator,
    example_texts,
    in_process,
    token_dtype,
    worker_pool,
)
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write, sha256_tree, staging_dir
from lmforge.paths import already_holds, check_output, config_paths

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK = 512  # records per tokenisation task: large enough to amortise IPC, small enough to stream
TEXT_CHUNK_BYTES = 1 << 18  # bytes of a text file per task (whole documents, so a little more)
MANIFEST_FORMAT = 2  # bumped when what prepare writes changes (2: "labels"), so older outputs are rebuilt


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
    seed: int = Field(0, ge=0, lt=2**64)
    """Salt of the split hash (8 bytes, so 0 <= seed < 2**64): another seed gives another split."""
    add_bos: bool = False
    """Prepend the BOS token to every text document."""
    append_eos: bool = True
    """Append the EOS token to every text document, so the model learns where documents end."""
    num_proc: int = Field(default_factory=lambda: min(2, os.cpu_count() or 1), ge=1)
    """Worker processes that turn records into tokens (1 = in-process); the output is the same for any value."""
    shard_tokens: int = Field(100_000_000, ge=1)
    """Tokens per shard file at most (a shard holds whole documents)."""
    pii: Literal["off", "report", "mask", "drop"] = "report"
    """PII scrub (e-mail, phone, IP, credit card): count only, replace with placeholders, or drop documents."""
    dedup: Literal["off", "exact", "near"] = "exact"
    """Drop exact duplicates (normalised hash), or also near duplicates (MinHash-LSH)."""
    dedup_threshold: float = Field(0.8, gt=0.0, le=1.0)
    """Jaccard similarity above which two documents are near duplicates."""
    dedup_min_chars: int = Field(100, ge=0)
    """Documents whose normalised text (lowercase, no punctuation) is shorter are never dropped as duplicates
    (0: dedup all). Short texts repeat legitimately: TinyShakespeare's 69 repeated speeches ("GLOUCESTER:",
    "CATESBY: My lord.") are all under 45 characters, while the duplicates worth removing (boilerplate, a
    repeated story or article) run to paragraphs."""
    eval_sets: dict[str, list[Path]] = Field(default_factory=dict)
    """Evaluation sets to check for contamination: {name: [files]}."""
    contamination_ngram: int = Field(13, ge=1)
    """Word n-gram length of the contamination check."""
    decontaminate: bool = False
    """Drop training documents that share an n-gram with an evaluation set."""
    skip_bad: bool = False
    """Write bad records to rejects.jsonl and go on, instead of stopping at the first."""


# --------------------------------------------------------------------------------------------- inputs


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


def fingerprint(cfg: PrepareConfig, digests: dict[Path, str], tokenizer_hash: str) -> str:
    """What the output depends on: the config, every input's bytes (their sha256s), the tokenizer, the version."""
    h = hashlib.sha256(cfg.model_dump_json().encode())
    for path, digest in digests.items():
        h.update(str(path).encode())
        h.update(digest.encode())
    h.update(tokenizer_hash.encode())
    h.update(f"{__version__} format {MANIFEST_FORMAT}".encode())
    return h.hexdigest()


def input_digests(inputs: Sequence[Path]) -> dict[Path, str]:
    """Every input file (directories expanded as `data prepare` does) with the sha256 of its bytes: what
    `fingerprint` reads."""
    return {path: sha256_tree(path) for path in iter_files(inputs)}


def prepare(
    cfg: PrepareConfig, out: Path, progress: Callable[[int], None] | None = None, *, overwrite: bool = False
) -> dict:
    """Run `data prepare`; returns the manifest (with `cache_hit`). Re-running on unchanged inputs reuses `out`;
    another dataset there is replaced only with `overwrite` (see `lmforge.paths`)."""
    from lmforge.tokenizer import Tokenizer

    if not cfg.inputs:
        raise LmforgeError("data prepare: no input files given")
    if cfg.tokenizer is None:
        raise LmforgeError("data prepare: --tokenizer DIR is required")
    out = Path(out)
    holds_dataset = check_output(out, "dataset", inputs=config_paths(cfg), overwrite=True)
    inputs = iter_files(cfg.inputs)
    tok = Tokenizer.from_dir(cfg.tokenizer)
    digests = input_digests(inputs)  # read once: the cache key and the manifest use them
    key = fingerprint(cfg, digests, tok.hash)
    if holds_dataset:
        old = json.loads((out / "manifest.json").read_text())
        if old.get("fingerprint") == key:
            log.info("data prepare: cache hit, %s is up to date", out)
            return {**old, "cache_hit": True}
        if not overwrite:
            raise LmforgeError(
                already_holds(out, "dataset", detail=" prepared from other inputs or settings")
            )
    template = cfg.chat_template.read_text(encoding="utf-8") if cfg.chat_template else None

    with staging_dir(out) as tmp:
        manifest = _prepare_into(cfg, digests, tok, template, tmp, progress)
        manifest["fingerprint"] = key
        manifest["id"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
        atomic_write(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return {**manifest, "cache_hit": False}


def _prepare_into(
    cfg: PrepareConfig,
    digests: dict[Path, str],
    tok: Any,
    template: str | None,
    root: Path,
    progress: Callable | None,
) -> dict:
    """Cut every input into tasks here (records, or whole documents' bytes of a text file), turn them into tokens
    in workers (or here), then deduplicate and write in input order: the output does not depend on the number of
    workers."""
    inputs = list(digests)
    dtype = token_dtype(tok)
    rejects: list[BadRecord] = []
    pii_counts: Counter[str] = Counter()
    totals = Counter()
    dedup = None if cfg.dedup == "off" else deduplicator(cfg)
    dedup_dropped: Counter[str] = Counter()
    bad_records: Counter[str] = Counter()  # per input, of those the workers found
    input_reports: list[dict] = []
    kinds: set[str] = set()
    writers = {s: ShardWriter(root / s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    label_names: dict[int, str | None] = {}  # classification: every label id seen or named, with its name
    subset_ids: dict[str, int] = {}  # preference: every subset name seen, numbered in order of appearance
    subsets_named: set[bool] = set()  # whether chunks of preference pairs name subsets: never both

    contamination_report = _contamination_report(cfg, inputs) if cfg.eval_sets else None
    drop_ids = set(contamination_report["drop_ids"]) if contamination_report and cfg.decontaminate else set()

    def tasks() -> Iterator[tuple[Task, dict]]:
        for path in inputs:
            report = {"path": str(path), "bytes": _size(path), "sha256": digests[path], "records": 0,
                      "examples": 0, "licence": cfg.licence or read_licence(path)}  # fmt: skip
            # A text file holds documents, which only the text format reads: no records to peek at.
            text = path.name.lower().endswith((".txt", ".txt.gz"))
            fmt = cfg.format or ("text" if text else detect_format(_peek_records(path, cfg.text_separator)))
            report["format"] = fmt
            input_reports.append(report)
            label_map = load_label_map(cfg.label_map) if cfg.label_map else _label_map_beside(path)
            if label_map:
                label_names.update({i: name for name, i in label_map.items()})
            if text:
                split = text_split(path, cfg.text_separator)
                for chunk in text_chunks(path, split, TEXT_CHUNK_BYTES):
                    yield Task(str(path), fmt, label_map, [], chunk, split), report
                continue
            records = read_records(path, on_bad=rejects.append if cfg.skip_bad else None,
                                   text_separator=cfg.text_separator)  # fmt: skip
            for batch in _chunks(records, CHUNK):
                yield Task(str(path), fmt, label_map, [(r.line, r.data, r.by_index) for r in batch]), report

    def merge(chunk: Chunk, report: dict) -> None:
        report["records"] += chunk.records
        bad_records[report["path"]] += len(chunk.rejects)
        report["examples"] += chunk.examples
        for kind in chunk.kinds:
            if kinds and kind not in kinds:
                raise LmforgeError(
                    f"{report['path']}: holds {kind} examples but earlier inputs hold {next(iter(kinds))} "
                    "examples; prepare each kind into its own dataset"
                )
            kinds.add(kind)
        if progress:
            progress(chunk.text_bytes)
        pii_counts.update(chunk.pii)
        totals.update(pii_dropped=chunk.pii_dropped, decontaminated=chunk.decontaminated)
        rejects.extend(chunk.rejects)
        keep = np.ones(len(chunk.in_val), dtype=bool)
        if dedup is not None:
            for i, (doc_id, key, snippet) in enumerate(
                zip(chunk.ids, chunk.keys, chunk.snippets, strict=True)
            ):
                if dup := dedup.add_key(doc_id, key, snippet):
                    dedup_dropped[dup.kind] += 1
                    keep[i] = False
        if "preference" in chunk.kinds and len(chunk.in_val):
            subsets_named.add(chunk.labels is not None)
            if len(subsets_named) > 1:
                raise LmforgeError(
                    f"{report['path']}: some preference pairs name their subset ({' or '.join(SUBSET_FIELDS)}) "
                    "and others do not; expected every pair of a dataset to name its subset, or none"
                )
        if chunk.labels is not None and chunk.labels.dtype.kind == "U":  # preference subsets, by name
            names, index = np.unique(chunk.labels, return_inverse=True)
            ids = [subset_ids.setdefault(name, len(subset_ids)) for name in names.tolist()]
            chunk.labels = np.array(ids, np.int64)[index]
        elif chunk.labels is not None:
            for label in np.unique(chunk.labels).tolist():
                label_names.setdefault(label, None)
        writers["train"].add(chunk.columns, chunk.labels, keep & ~chunk.in_val)
        writers["val"].add(chunk.columns, chunk.labels, keep & chunk.in_val)

    init = (cfg, template, drop_ids, tok)
    with worker_pool(cfg.num_proc, init) if cfg.num_proc > 1 else in_process(init) as submit:
        # A bounded window of chunks in flight keeps memory flat whatever the input size.
        pending: deque = deque()
        for task, report in tasks():
            pending.append((submit(task), report))
            if len(pending) >= 2 * cfg.num_proc:
                result, done = pending.popleft()
                merge(result(), done)
        for result, done in pending:
            merge(result(), done)
    for report in input_reports:  # records of text files are only counted by the workers
        if report["records"] == 0 and not bad_records[report["path"]]:
            raise LmforgeError(f"{report['path']}: no records (empty file?)")
    for w in writers.values():
        w.flush()
    subsets = sorted(subset_ids)  # ids by sorted name: the same whatever order the pairs came in
    if subsets != list(subset_ids):
        renumber = np.empty(len(subsets), np.int64)
        renumber[[subset_ids[name] for name in subsets]] = np.arange(len(subsets))
        for w in writers.values():
            w.relabel(renumber)
    if rejects:
        lines = [
            json.dumps({"source": b.source, "where": b.where, "reason": b.reason, "raw": b.raw})
            for b in rejects
        ]
        atomic_write(root / "rejects.jsonl", "\n".join(lines) + "\n")
    dedup_report = dedup.report() if dedup else None
    governance: dict[str, Any] = {
        "pii": {"mode": cfg.pii, "found": dict(pii_counts), "documents_dropped": totals["pii_dropped"]},
        "dedup": {
            "mode": cfg.dedup,
            "dropped": dict(dedup_dropped),
            # repeats of a document shorter than dedup_min_chars, kept
            **({"kept_short": dedup_report["kept_short"], "report": dedup_report} if dedup_report else {}),
        },
    }
    if contamination_report is not None:
        governance["contamination"] = {
            **contamination_report,
            "decontaminated": cfg.decontaminate,
            "documents_dropped": totals["decontaminated"],
        }
    labels = None
    if label_names:  # id -> name for every id up to the largest (a fine-tuned head needs them all)
        labels = {str(i): label_names.get(i) or str(i) for i in range(max(label_names) + 1)}
    return {
        "lmforge_version": __version__,
        "kind": next(iter(kinds), None),
        "labels": labels,
        # only when pairs name subsets: the manifests (and ids) of other datasets stay as they were
        **({"subsets": {str(i): name for i, name in enumerate(subsets)}} if subsets else {}),
        "dtype": dtype.name,
        "inputs": input_reports,
        "rejected": len(rejects),
        "tokenizer": {
            "path": str(Path(cfg.tokenizer).resolve()),  # absolute: later stages run from anywhere
            "hash": tok.hash,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
        },
        "splits": {name: w.summary() for name, w in writers.items()},
        "governance": governance,
        "config": json.loads(cfg.model_dump_json()),
    }


def _chunks(items: Iterator[T], n: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
            yield from example_texts(ex)


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


def _examples(cfg: PrepareConfig, path: Path, fmt: str | None) -> Iterator[Example]:
    """The examples of one input with bad records skipped: what the contamination scan reads."""
    ignore = lambda bad: None  # noqa: E731  (the main pass reports bad records)
    kwargs: dict[str, Any] = {"on_bad": ignore, "label_map": _label_map_beside(path)}
    if cfg.label_field:
        kwargs["label_field"] = cfg.label_field
    records = read_records(path, on_bad=ignore, text_separator=cfg.text_separator)
    return to_examples(records, fmt or detect_format(_peek_records(path, cfg.text_separator)), **kwargs)


def _contamination_report(cfg: PrepareConfig, inputs: list[Path]) -> dict:
    """Word n-gram overlap of the training inputs with each evaluation set."""
    train = (
        (ex.id, "\n".join(example_texts(ex))) for path in inputs for ex in _examples(cfg, path, cfg.format)
    )
    evals = {
        name: [
            (ex.id, "\n".join(example_texts(ex)))
            for path in iter_files(files)
            for ex in _examples(cfg, path, None)
        ]
        for name, files in cfg.eval_sets.items()
    }
    return contamination(train, evals, n=cfg.contamination_ngram)
