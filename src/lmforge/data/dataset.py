"""The prepared-dataset format (see `data/prepare.py` for the layout): writing shards, reading them back, and
`lmforge data inspect`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.fileio import sha256_file
from lmforge.paths import require_dir

Column = tuple[np.ndarray, np.ndarray, np.ndarray | None]
"""Many documents of one column: (ids, offsets, mask or None); document i is ids[offsets[i]:offsets[i + 1]]."""


@dataclass
class ShardWriter:
    """Accumulates tokenised documents of one split and writes whole-document shards."""

    root: Path
    dtype: np.dtype
    shard_tokens: int
    # per column, the parts added since the last shard: (ids, document lengths, mask or None)
    buffers: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = field(default_factory=dict)
    labels: list[np.ndarray] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)
    buffered: int = 0  # tokens waiting in `buffers` for the next shard
    documents: int = 0
    tokens: int = 0
    masked: int = 0

    def add(self, columns: dict[str, Column], labels: np.ndarray | None, select: np.ndarray) -> None:
        """Buffer the documents of `columns` where `select` (bool per document) is true, in order; write a shard
        each time `shard_tokens` are buffered (a shard ends after the document that reaches it)."""
        chosen = np.flatnonzero(select)
        sizes = sum(np.diff(offsets)[chosen] for _, offsets, _ in columns.values())  # tokens, all columns
        while len(chosen):
            reached = self.buffered + np.cumsum(sizes)
            n = min(int(np.searchsorted(reached, self.shard_tokens)) + 1, len(chosen))
            self._buffer(columns, labels, chosen[:n])
            self.buffered = int(reached[n - 1])
            if self.buffered >= self.shard_tokens:
                self.flush()
            chosen, sizes = chosen[n:], sizes[n:]

    def _buffer(self, columns: dict[str, Column], labels: np.ndarray | None, docs: np.ndarray) -> None:
        for name, (ids, offsets, mask) in columns.items():
            lengths = np.diff(offsets)
            picked = np.zeros(len(lengths), dtype=bool)
            picked[docs] = True
            tokens = np.repeat(picked, lengths)  # token-level selection of whole documents
            part = (ids[tokens], lengths[docs], None if mask is None else mask[tokens])
            self.buffers.setdefault(name, []).append(part)
            self.tokens += len(part[0])
            self.masked += 0 if part[2] is None else int(part[2].sum())
        if labels is not None:
            self.labels.append(labels[docs])
        self.documents += len(docs)

    def flush(self) -> None:
        """Write the buffered documents as one shard (token ids, document offsets, masks, labels)."""
        if not self.buffers:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        stem = f"{len(self.shards):05d}"
        files: dict[str, str] = {}
        for name, parts in self.buffers.items():
            lengths = np.concatenate([n for _, n, _ in parts])
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            ids = np.concatenate([ids for ids, _, _ in parts]).astype(self.dtype, copy=False)
            files[f"{stem}.{name}.bin"] = _write(self.root / f"{stem}.{name}.bin", ids)
            files[f"{stem}.{name}.docs.npy"] = _write(self.root / f"{stem}.{name}.docs.npy", offsets)
            if parts[0][2] is not None:
                mask = np.concatenate([m for _, _, m in parts])
                files[f"{stem}.{name}_mask.bin"] = _write(self.root / f"{stem}.{name}_mask.bin", mask)
        if self.labels:
            files[f"{stem}.labels.npy"] = _write(
                self.root / f"{stem}.labels.npy", np.concatenate(self.labels)
            )
        self.shards.append({"documents": len(lengths), "files": files})
        self.buffers, self.labels, self.buffered = {}, [], 0

    def relabel(self, ids: np.ndarray) -> None:
        """Renumber the written labels: label l becomes ids[l] (each shard's labels file rewritten, its sha256
        updated)."""
        for shard in self.shards:
            for name in [f for f in shard["files"] if f.endswith(".labels.npy")]:
                shard["files"][name] = _write(self.root / name, ids[np.load(self.root / name)])

    def summary(self) -> dict:
        """The split's manifest entry: counts and every shard's files with their sha256."""
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
    return sha256_file(path)


@dataclass(frozen=True)
class Document:
    """One prepared document: token ids, its loss mask (None: every token counts) and its label (the class of a
    classification document, the subset of a preference pair: manifest `labels` / `subsets` name them)."""

    ids: np.ndarray
    mask: np.ndarray | None
    label: int | None


VERIFY_BYTES = 1 << 30
"""Datasets up to this size have every shard's sha256 checked when opened (about 2 s here); larger ones their
lengths only (`lmforge data inspect` verifies any size)."""
MANIFEST_KEYS = ("id", "kind", "dtype", "splits", "tokenizer")


def _read_manifest(path: Path) -> dict[str, Any]:
    """A manifest.json: valid JSON with the keys lmforge reads, whose `id` is the hash of the rest."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise LmforgeError(f"{path}: not a readable manifest ({e}); prepare the dataset again") from None
    if not isinstance(manifest, dict) or (missing := [k for k in MANIFEST_KEYS if k not in manifest]):
        raise LmforgeError(
            f"{path}: missing {', '.join(missing) if isinstance(manifest, dict) else 'every key'}"
        )
    rest = {k: v for k, v in manifest.items() if k != "id"}
    if hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest() != manifest["id"]:
        raise LmforgeError(
            f"{path}: its content does not match its id (the manifest was edited or damaged); prepare the dataset "
            "again"
        )
    return manifest


class PreparedDataset:
    """A `data prepare` output directory: its manifest and memory-mapped shards."""

    def __init__(self, path: str | Path, verify: bool | None = None):
        """Open a dataset, checking its manifest and every shard's presence and length; `verify` also compares
        each file's sha256 with the manifest (None: when the shards total at most VERIFY_BYTES)."""
        self.path = require_dir(
            path,
            "a prepared dataset directory (with manifest.json; made by `lmforge data prepare`)",
            "manifest.json",
        )
        self.manifest: dict[str, Any] = _read_manifest(self.path / "manifest.json")
        self.dtype = np.dtype(self.manifest["dtype"])
        files = self._check_shards()
        if verify or (verify is None and sum(f.stat().st_size for f in files) <= VERIFY_BYTES):
            self.verify()

    def _files(self) -> Iterator[tuple[Path, str]]:
        """Every shard file the manifest lists, with its sha256 there."""
        for split, info in self.manifest["splits"].items():
            for shard in info["shards"]:
                for name, digest in shard["files"].items():
                    yield self.path / split / name, digest

    def _check_shards(self) -> list[Path]:
        """Every shard file present, each token column as long as its document offsets say; the file paths."""
        files = [file for file, _ in self._files()]
        listed = set(files)
        for file in files:
            if not file.is_file():
                raise LmforgeError(f"{file}: missing (listed in {self.path / 'manifest.json'})")
        for file in (f for f in files if f.name.endswith(".docs.npy")):
            try:
                ends = np.load(file, mmap_mode="r")
            except (ValueError, OSError, EOFError) as e:
                raise LmforgeError(f"{file}: not a readable .npy file ({e})") from None
            tokens = int(ends[-1]) if len(ends) else 0
            stem = file.name.removesuffix(".docs.npy")
            # the token column (dtype items) and its loss mask (one byte each) hold one entry per token
            for sized, itemsize in ((file.with_name(f"{stem}.bin"), self.dtype.itemsize),
                                    (file.with_name(f"{stem}_mask.bin"), 1)):  # fmt: skip
                if sized in listed and sized.stat().st_size != tokens * itemsize:
                    raise LmforgeError(
                        f"{sized}: {sized.stat().st_size:,} bytes, expected {tokens * itemsize:,} ({tokens:,} "
                        "tokens by its document offsets): the file is truncated or was changed; prepare the "
                        "dataset again"
                    )
        return files

    def verify(self) -> None:
        """Compare every shard file's sha256 with the manifest's (reads all the data)."""
        for file, digest in self._files():
            if sha256_file(file) != digest:
                raise LmforgeError(
                    f"{file}: its sha256 differs from the one in {self.path / 'manifest.json'}: the file was "
                    "changed; prepare the dataset again"
                )

    @property
    def id(self) -> str:
        """The dataset's version id (hash of its manifest)."""
        return self.manifest["id"]

    def columns(self) -> list[str]:
        """Token columns: ["tokens"], or ["chosen", "rejected"] for preference data."""
        return ["chosen", "rejected"] if self.manifest["kind"] == "preference" else ["tokens"]

    def documents(self, split: str = "train", column: str = "tokens") -> Iterator[Document]:
        """Every document of a split, in order, as views into the memory-mapped shards."""
        root = self.path / split
        for shard in self.manifest["splits"][split]["shards"]:
            stem = next(iter(shard["files"])).split(".")[0]
            tokens = np.memmap(root / f"{stem}.{column}.bin", dtype=self.dtype, mode="r")
            offsets = np.load(root / f"{stem}.{column}.docs.npy")
            mask_file = root / f"{stem}.{column}_mask.bin"
            mask = np.memmap(mask_file, dtype=np.uint8, mode="r") if mask_file.exists() else None
            labels_file = root / f"{stem}.labels.npy"
            labels = np.load(labels_file) if labels_file.exists() else None
            for i in range(len(offsets) - 1):
                a, b = offsets[i], offsets[i + 1]
                yield Document(
                    tokens[a:b],
                    None if mask is None else mask[a:b],
                    None if labels is None else int(labels[i]),
                )

    def lengths(self, split: str = "train", column: str = "tokens") -> np.ndarray:
        """Token count of every document of a split."""
        root = self.path / split
        parts = [np.diff(np.load(root / f"{next(iter(s['files'])).split('.')[0]}.{column}.docs.npy"))
                 for s in self.manifest["splits"][split]["shards"]]  # fmt: skip
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def mask_segments(tokenizer: Any, ids: np.ndarray, mask: np.ndarray | None) -> list[tuple[str, bool]]:
    """Decoded runs of consecutive tokens with the same mask value: [(text, trained_on)]."""
    if mask is None:
        return [(tokenizer.decode(ids.tolist()), True)]
    segments, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            segments.append((tokenizer.decode(ids[start:i].tolist()), bool(mask[start])))
            start = i
    return segments


def inspect_dataset(path: str | Path, samples: int = 3, bins: int = 10) -> dict[str, Any]:
    """Manifest summary, document-length histogram and a few decoded samples with their loss masks."""
    from lmforge.tokenizer import Tokenizer

    ds = PreparedDataset(path, verify=True)  # every sha256: a look at a dataset is also its check
    m = ds.manifest
    column = ds.columns()[0]
    lengths = ds.lengths("train", column)
    # Integer bins [from, to) that cover every length: np.histogram's float edges would print as "26-26".
    lo, hi = (int(lengths.min()), int(lengths.max()) + 1) if len(lengths) else (0, 1)
    edges = np.unique(np.linspace(lo, hi, min(bins, hi - lo) + 1).round().astype(np.int64))
    counts, _ = np.histogram(lengths, bins=edges)
    tok_path = Path(m["tokenizer"]["path"])
    tokenizer = Tokenizer.from_dir(tok_path) if tok_path.exists() else None
    decoded = []
    if tokenizer is not None:
        for doc, _ in zip(ds.documents("train", column), range(samples), strict=False):
            decoded.append({"label": doc.label, "segments": mask_segments(tokenizer, doc.ids, doc.mask)})
    return {
        "path": str(ds.path),
        "id": ds.id,
        "kind": m["kind"],
        "dtype": m["dtype"],
        "inputs": [
            {k: i[k] for k in ("path", "format", "licence", "records", "examples")} for i in m["inputs"]
        ],
        "splits": {s: {k: v for k, v in info.items() if k != "shards"} for s, info in m["splits"].items()},
        "rejected": m["rejected"],
        "governance": m["governance"],
        "length_histogram": [
            {"from": int(edges[i]), "to": int(edges[i + 1]), "documents": int(c)}
            for i, c in enumerate(counts)
        ],
        "samples": decoded,
    }
