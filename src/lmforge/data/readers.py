"""Streaming readers: txt, jsonl, json, csv and parquet files (each maybe gzipped) and `datasets` dirs → Records.

Bad input raises an LmforgeError naming the file, the line and what was expected, or, when the caller passes
`on_bad`, becomes a BadRecord handed to it while reading goes on.
"""

from __future__ import annotations

import csv
import gzip
import importlib
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO

from lmforge.errors import LmforgeError
from lmforge.paths import KINDS, output_kind

log = logging.getLogger(__name__)

EXTENSIONS = (".txt", ".jsonl", ".json", ".csv", ".parquet")
SUPPORTED = ".txt, .jsonl, .json, .csv or .parquet (each maybe .gz), or a datasets.save_to_disk directory"
LABEL_MAP_NAMES = ("categories.json", "labels.json")  # label maps kept beside data files, not data themselves
END_OF_TEXT = "<|endoftext|>"  # TinyStories v2's document separator line
_SNIFF_BYTES = 256 * 1024  # auto text mode looks this far for an END_OF_TEXT line (v2 stories are ~1 KB)
_BLOCK_BYTES = 1 << 18  # text files are read and split this many bytes at a time
_CR_LF = re.compile(r"\r+\n")
_RAW_CHARS = 200
_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)  # a truncated or corrupt .gz


@dataclass(slots=True)  # not frozen, which is 2x slower to create: one per document or row
class Record:
    """One record: its file, its position and its data (a JSON object, a CSV/parquet row or a text document)."""

    source: str
    line: int
    data: dict | str
    by_index: bool = False  # `line` is a 0-based record index (.json arrays, parquet, datasets), not a line

    @property
    def where(self) -> str:
        """`path:LINE` (1-based line) or `path[#INDEX]` (0-based record index), for messages."""
        return f"{self.source}[#{self.line}]" if self.by_index else f"{self.source}:{self.line}"


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be read or converted: where it is, why, and its text (clipped), for rejects."""

    source: str
    where: str
    reason: str
    raw: str


OnBad = Callable[[BadRecord], None]


def reject(on_bad: OnBad | None, bad: BadRecord) -> None:
    """Raise `bad` as an LmforgeError, or hand it to `on_bad` so the caller can count it and go on."""
    if on_bad is None:
        raise LmforgeError(f"{bad.where}: {bad.reason}")
    on_bad(bad)


def field_names(keys: Iterable[object]) -> str:
    """Field names for a one-line message: "a, b"; a name with a line break or other control character quoted."""
    return ", ".join(k if isinstance(k, str) and k.isprintable() else repr(k) for k in keys)


def clip(text: str, n: int = _RAW_CHARS) -> str:
    """`text` cut to `n` characters (with an ellipsis), for BadRecord.raw."""
    return text if len(text) <= n else text[: n - 1] + "…"


def is_datasets_dir(path: Path) -> bool:
    """Whether `path` is a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _kind(path: Path) -> tuple[str, bool] | None:
    """(extension, gzipped) of a supported data file, else None."""
    name = path.name.lower()
    gz = name.endswith(".gz")
    ext = os.path.splitext(name[:-3] if gz else name)[1]
    return (ext, gz) if ext in EXTENSIONS else None


_OUTPUT_KINDS = ("dataset", "model", "adapter", "run", "demo", "tokenizer")  # a synthetic world is input data
_RUN_FILES = ("metrics.jsonl", "results.json", "checkpoints", "model")


def lmforge_output(path: Path) -> str | None:
    """What lmforge wrote `path` as, in words with the files that show it (a prepared dataset, a model, adapter,
    run, demo, tokenizer or checkpoint directory), else None: their .json/.jsonl files are not training data."""
    kind = output_kind(path)
    if kind == "run" and not any((path / name).exists() for name in _RUN_FILES):
        return None  # a config.yaml beside data files may be the user's recipe: only a started run is skipped
    if kind == "demo" and not (path / "demo.json").is_file():
        return None  # a folder holding a synthetic world (`data synth`) holds input data
    if kind in _OUTPUT_KINDS:
        return KINDS[kind][0]
    if (path / "train_state").is_dir():  # its state.json would pass for a `datasets` dir
        return "a checkpoint (train_state/)"
    return None


def iter_files(paths: Sequence[Path], *, warn: bool = True) -> list[Path]:
    """Expand inputs: directories recursively into their data files (sorted); a `datasets` dir is one input.
    lmforge's own outputs are refused when given, and skipped inside a given directory (a warning unless not
    `warn`: for a caller that expands the same inputs again)."""
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise LmforgeError(f"{path}: no such file or directory; expected {SUPPORTED}")
        if path.is_dir() and (what := lmforge_output(path)):
            which = "it was prepared from" if output_kind(path) == "dataset" else "themselves"
            raise LmforgeError(
                f"{path} is {what}, not input data; give the text/JSONL files {which} ({SUPPORTED})"
            )
        if path.is_dir() and not is_datasets_dir(path):
            found = _walk(path, warn)
            if not found:
                raise LmforgeError(f"{path}: the directory holds no data files; expected {SUPPORTED}")
            out.extend(found)
        elif path.is_file() and _kind(path) is None:
            raise LmforgeError(f"{path}: unsupported file type; expected {SUPPORTED}")
        else:
            out.append(path)
    return out


def _walk(root: Path, warn: bool) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        # e.g. `tokenizer train runs/`: a prepared dataset's manifest.json, a model's config.json are not data
        outputs = {d: what for d in dirs if not d.startswith(".") and (what := lmforge_output(here / d))}
        for d, what in outputs.items() if warn else ():
            log.warning("skipping %s: it is %s, not input data", here / d, what)
        datasets_dirs = [d for d in dirs if d not in outputs and is_datasets_dir(here / d)]
        found += [here / d for d in datasets_dirs]  # their .json/.arrow files are not separate inputs
        dirs[:] = [d for d in dirs if d not in outputs and d not in datasets_dirs and not d.startswith(".")]
        meta = {*LABEL_MAP_NAMES, *(("world.json",) if output_kind(here) == "world" else ())}  # not records
        data = [f for f in files if f not in meta and not f.startswith(".") and _kind(here / f)]
        found += [here / f for f in data]
    return sorted(found)


def read_records(
    path: Path, *, on_bad: OnBad | None = None, text_separator: str | None = None
) -> Iterator[Record]:
    """Stream the records of one data file or `datasets` dir; only a .json document is loaded whole.

    A text file yields one record per document: documents end at lines equal to `text_separator` ("" means blank
    lines); by default at `<|endoftext|>` lines, and also at blank lines unless the file's first 256 KiB hold an
    `<|endoftext|>` line. An input with no records is bad input too.
    """
    path = Path(path)
    if path.is_dir() and is_datasets_dir(path):
        kind = ("datasets", False)
    elif not path.is_file():
        raise LmforgeError(f"{path}: no such file; expected {SUPPORTED}")
    elif (kind := _kind(path)) is None:  # type: ignore[assignment]
        raise LmforgeError(f"{path}: unsupported file type; expected {SUPPORTED}")
    return _records(path, *kind, on_bad, text_separator)


def _records(path: Path, ext: str, gz: bool, on_bad: OnBad | None, sep: str | None) -> Iterator[Record]:
    n_bad = 0

    def count(bad: BadRecord) -> None:
        nonlocal n_bad
        n_bad += 1
        on_bad(bad)  # type: ignore[misc]  # installed only when on_bad is set

    note = None if on_bad is None else count
    records = {
        "datasets": lambda: _read_datasets(path),
        ".txt": lambda: _read_text(path, note, sep),
        ".jsonl": lambda: _read_jsonl(_Lines(path, gz, note), note),
        ".json": lambda: _read_json(path, gz, note),
        ".csv": lambda: _read_csv(_Lines(path, gz, note), note),
        ".parquet": lambda: _read_parquet(path, gz),
    }[ext]()
    n = 0
    for n, record in enumerate(records, 1):  # noqa: B007  # n is read after the loop
        yield record
    if n == 0 and n_bad == 0:
        reason = "no records (empty, or only blank lines or a header); expected at least one record"
        reject(on_bad, BadRecord(str(path), str(path), reason, ""))


def _open(path: Path, gz: bool) -> IO[bytes]:
    return gzip.open(path, "rb") if gz else open(path, "rb")


class _Lines:
    """A file's lines decoded as UTF-8, `lineno` counting from 1; a line that is not UTF-8 is a bad record."""

    def __init__(self, path: Path, gz: bool, on_bad: OnBad | None) -> None:
        self.path, self.gz, self.on_bad, self.lineno = path, gz, on_bad, 0

    def __iter__(self) -> Iterator[str]:
        src = str(self.path)
        try:
            with _open(self.path, self.gz) as f:
                for self.lineno, raw in enumerate(f, 1):
                    try:  # utf-8-sig on line 1: spreadsheet exports start with a byte-order mark
                        text = raw.decode("utf-8-sig" if self.lineno == 1 else "utf-8")
                    except UnicodeDecodeError as e:
                        reason = f"byte 0x{raw[e.start]:02x} (column {e.start + 1}) is not UTF-8; expected UTF-8 text"
                        text = raw.decode("utf-8", "replace").rstrip("\r\n")
                        reject(self.on_bad, BadRecord(src, f"{src}:{self.lineno}", reason, clip(text)))
                        continue
                    yield text
        except _GZIP_ERRORS as e:
            raise LmforgeError(f"{src}:{self.lineno + 1}: cannot decompress ({e}); expected gzip data") from e


def _raw_blocks(path: Path, size: int, cut: Callable[[bytes], int]) -> Iterator[tuple[int, bytes]]:
    """A file's bytes (gunzipped) in blocks read `size` at a time and ending where `cut(buffer)` says (0: read on),
    each with its first line's number (from 1); the rest of the file is the last block."""
    lineno, rest = 1, b""
    try:
        with _open(path, path.name.lower().endswith(".gz")) as f:
            while data := f.read(size):
                buf = rest + data
                if end := cut(buf):
                    yield lineno, buf[:end]
                    lineno += buf.count(b"\n", 0, end)
                    buf = buf[end:]
                rest = buf
    except _GZIP_ERRORS as e:
        raise LmforgeError(f"{path}:{lineno}: cannot decompress ({e}); expected gzip data") from e
    if rest:
        yield lineno, rest


def _text_blocks(path: Path, on_bad: OnBad | None) -> Iterator[tuple[int, str]]:
    """The file decoded in blocks of whole lines, each with its first line's number. A line that is not UTF-8 is a
    bad record and is left out; the text around it comes in separate blocks, so numbers stay right."""
    for lineno, raw in _raw_blocks(path, _BLOCK_BYTES, lambda buf: buf.rfind(b"\n") + 1):
        yield from _decoded(str(path), lineno, raw, on_bad)


def _decoded(src: str, lineno: int, block: bytes, on_bad: OnBad | None) -> Iterator[tuple[int, str]]:
    """`block` as text from line `lineno` on; line by line only when some line of it is not UTF-8."""
    try:  # utf-8-sig on line 1: spreadsheet exports start with a byte-order mark
        text = block.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError:
        yield from _decoded_lines(src, lineno, block, on_bad)
    else:
        yield lineno, text


def _decoded_lines(src: str, lineno: int, block: bytes, on_bad: OnBad | None) -> Iterator[tuple[int, str]]:
    """`block` decoded line by line: each bad line rejected, the runs of good lines between them yielded."""
    good: list[str] = []
    first = lineno
    for n, raw in enumerate(_split_lf(block), lineno):
        try:
            good.append(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
        except UnicodeDecodeError as e:
            reason = f"byte 0x{raw[e.start]:02x} (column {e.start + 1}) is not UTF-8; expected UTF-8 text"
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            reject(on_bad, BadRecord(src, f"{src}:{n}", reason, clip(text)))
            if good:
                yield first, "".join(good)
            good, first = [], n + 1
    if good:
        yield first, "".join(good)


def _split_lf(block: bytes) -> list[bytes]:
    """The lines of `block`, each with its b"\\n" (bytes.splitlines would also end lines at b"\\r")."""
    lines = [line + b"\n" for line in block.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


@dataclass(frozen=True)
class TextSplit:
    """Where a text file's documents end: at lines equal to `marker` (spaces around it allowed, "" for none) and,
    when `blank_ends`, at blank lines. A resolved `text_separator`, cheap to send to a worker process."""

    marker: str
    blank_ends: bool

    def pattern(self, space: str = r"[^\S\n]") -> str | None:
        """A regex matching the newline before each separator line and that line, without its own line end (for the
        text to split on, give it a leading newline). Starting at a literal newline, it is searched for fast; `space`
        is the whitespace class (for bytes, give an ASCII one: it then finds a subset of the separator lines, which is
        safe for cutting). Ending at the text's end, an empty match is no line."""
        ends = ([f"{space}*{re.escape(self.marker)}"] if self.marker else []) + (
            [""] if self.blank_ends else []
        )
        return rf"\n(?:{'|'.join(ends)}){space}*(?=\n|\Z)" if ends else None


def text_split(path: Path, separator: str | None) -> TextSplit:
    """Resolve `text_separator` for `path`: auto (None) ends documents at `<|endoftext|>` lines, and also at blank
    lines unless the file's first 256 KiB hold an `<|endoftext|>` line."""
    if separator is not None:
        return TextSplit(separator.strip(), separator == "")
    head, size = [], 0
    for _, text in _text_blocks(path, lambda bad: None):  # bad lines are reported when the documents are read
        head.append(text)
        size += len(text)
        if size >= _SNIFF_BYTES:
            break
    line = _marker_line("".join(head), END_OF_TEXT)
    return TextSplit(END_OF_TEXT, line is None or line >= _SNIFF_BYTES)


def _marker_line(text: str, marker: str) -> int | None:
    """Where the first line of `text` that is `marker` with spaces around starts, if any (found with str.find,
    much faster than a multi-line regex that tries every position)."""
    at = text.find(marker)
    while at >= 0:
        start, end = text.rfind("\n", 0, at) + 1, text.find("\n", at)
        if text[start : len(text) if end < 0 else end].strip() == marker:
            return start
        at = text.find(marker, at + len(marker))
    return None


def _read_text(path: Path, on_bad: OnBad | None, separator: str | None) -> Iterator[Record]:
    src = str(path)
    documents = text_documents(_text_blocks(path, on_bad), text_split(path, separator))
    return (Record(src, line, text) for line, text in documents)


def text_documents(blocks: Iterable[tuple[int, str]], split: TextSplit) -> Iterator[tuple[int, str]]:
    """(line, cleaned text) of each document in decoded blocks of whole lines ((first line number, text) pairs, as
    `_text_blocks` gives): each block split at separator lines by one regex rather than a Python loop over lines;
    documents may span blocks. A document's line is that of its first non-blank character; its text is never
    empty."""
    sep = re.compile(f"({pattern})") if (pattern := split.pattern()) else None
    carry: list[str] = []  # the open document's text from earlier blocks
    first = 0  # the line of the open document's first non-blank character (0: none yet)
    for lineno, text in blocks:
        # CRs before a line end are not text: dropped once per block, as no line end spans two blocks
        if "\r" in text:
            text = _CR_LF.sub("\n", text)
        # [text, separator, text, ..., text]; each separator holds one newline, each later text starts with one
        parts = sep.split("\n" + text) if sep else ["\n" + text]
        if len(parts) > 2 and parts[-2] == "\n" and not parts[-1]:  # the empty "line" after a final newline
            del parts[-2:]
        *closed, last = parts[::2]  # the texts between separators; the last goes on in the next block
        line = lineno - 1  # the line of a piece's first character, a newline before its first line
        for piece in closed:
            if carry:  # the document open since an earlier block ends here
                if not first and (rest := piece.lstrip()):
                    first = line + piece.count("\n", 0, len(piece) - len(rest))
                if first:
                    yield first, "".join([*carry, piece]).strip()
                carry, first = [], 0
            elif document := piece.strip():  # its first character is the first of the piece's non-blank part
                yield line + piece.count("\n", 0, piece.find(document[0])), document
            line += piece.count("\n") + 1
        if not first and (rest := last.lstrip()):
            first = line + last.count("\n", 0, len(last) - len(rest))
        carry.append(last[:-1] if last.endswith("\n") else last)  # the next block starts with this newline
    if first:
        yield first, "".join(carry).strip()


def text_chunks(path: Path, split: TextSplit, size: int) -> Iterator[tuple[int, bytes]]:
    """A text file's raw bytes in chunks of about `size` that end at a separator line (or the file's end), each
    with its first line's number: whole documents, for workers to decode and split (`decode_chunk`)."""
    pattern = split.pattern(space=r"[ \t\r\f\v]")
    sep = re.compile(pattern.encode()) if pattern else None

    def cut(buf: bytes) -> int:
        for window in (4096, 65536, len(buf)) if sep else ():  # separators are near the end, usually
            if end := _last_end(sep, buf, max(0, len(buf) - window)):  # type: ignore[arg-type]
                return end
        return 0  # one document so far: read on

    return _raw_blocks(path, size, cut)


def _last_end(sep: re.Pattern, buf: bytes, start: int) -> int:
    """Where the line after the last separator line in buf[start:] starts, or 0. A separator line at the buffer's
    end without its newline does not count: the next read may complete it into a longer line."""
    end = 0
    for m in sep.finditer(buf, start):
        end = m.end() + 1 if m.end() < len(buf) else end  # buf[m.end()] is the separator's newline
    return end


def decode_chunk(
    source: str, chunk: tuple[int, bytes], split: TextSplit, on_bad: OnBad | None
) -> Iterator[tuple[int, str]]:
    """(line, text) of each document of one `text_chunks` chunk: the records `read_records` gives for its lines."""
    lineno, raw = chunk
    return text_documents(_decoded(source, lineno, raw, on_bad), split)


def _read_jsonl(lines: _Lines, on_bad: OnBad | None) -> Iterator[Record]:
    src = str(lines.path)
    for text in lines:
        # without its line end: at the end of a cut-off line, json would report line 2, column 1 of the text
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        try:
            data = json.loads(text)
            found = "" if isinstance(data, dict) else f"found a JSON {type(data).__name__}"
        except json.JSONDecodeError as e:
            found = _malformed(e, e.pos + 1)  # the line holds no newline: pos + 1 is the column
        except RecursionError:  # json's parser recurses once per level: ~1000 nested [ or { exhaust the stack
            found = "JSON nested too deeply to read"
        if found:
            reason = f"{found}; expected one JSON object per line"
            reject(on_bad, BadRecord(src, f"{src}:{lines.lineno}", reason, clip(text)))
        else:
            yield Record(src, lines.lineno, data)


def _malformed(e: json.JSONDecodeError, column: int) -> str:
    # some messages end in " at" ("Invalid control character at"), which the column completes
    return f"malformed JSON ({e.msg.removesuffix(' at')} at column {column})"


def _read_json(path: Path, gz: bool, on_bad: OnBad | None) -> Iterator[Record]:
    src = str(path)
    try:
        with _open(path, gz) as f:
            raw = f.read()  # a JSON document has no record boundaries to stream on: it is loaded whole
    except _GZIP_ERRORS as e:
        raise LmforgeError(f"{src}: cannot decompress ({e}); expected gzip data") from e
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        line, found = raw[: e.start].count(b"\n") + 1, f"byte 0x{raw[e.start]:02x} is not UTF-8"
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines named .json, as `Dataset.to_json` writes them
            yield from _read_jsonl(_Lines(path, gz, on_bad), on_bad)
            return
        line, found = e.lineno, _malformed(e, e.colno)
    except RecursionError:  # json's parser recurses once per level: ~1000 nested [ or { exhaust the stack
        line, found = 1, "JSON nested too deeply to read"
    else:
        lists = (
            [key for key, value in doc.items() if isinstance(value, list)] if isinstance(doc, dict) else []
        )
        doc = doc[lists[0]] if len(lists) == 1 else doc
        keys = f" with keys {sorted(doc)}" if isinstance(doc, dict) else ""
        line, found = 1, "" if isinstance(doc, list) else f"found a JSON {type(doc).__name__}{keys}"
    if found:
        reason = f"{found}; expected a JSON array of objects, or an object holding one such list"
        text = (raw.splitlines()[line - 1 : line] or [b""])[0].decode("utf-8", "replace")
        reject(on_bad, BadRecord(src, f"{src}:{line}", reason, clip(text)))
        return
    for i, item in enumerate(doc):
        if isinstance(item, dict):
            yield Record(src, i, item, by_index=True)
        else:
            reason = f"found a JSON {type(item).__name__}; expected an object"
            reject(on_bad, BadRecord(src, f"{src}[#{i}]", reason, clip(json.dumps(item, ensure_ascii=False))))


def _read_csv(lines: _Lines, on_bad: OnBad | None) -> Iterator[Record]:
    src = str(lines.path)
    rows = csv.reader(lines)  # fed decoded lines with their line ends, as with open(newline="")
    try:
        header = next(rows, None)
        start = lines.lineno + 1  # a quoted field may span lines: a row is numbered by its first line
        for row in rows:
            if row and len(row) != len(header):  # type: ignore[arg-type]  # rows is empty when header is None
                reason = f"found {len(row)} fields; expected {len(header)} ({field_names(header)})"
                reject(on_bad, BadRecord(src, f"{src}:{start}", reason, clip(",".join(row))))
            elif row:
                yield Record(src, start, dict(zip(header, row, strict=True)))  # type: ignore[arg-type]
            start = lines.lineno + 1
    except csv.Error as e:  # the parser's state is unknown after this, so it is fatal even with on_bad
        raise LmforgeError(f"{src}:{lines.lineno}: {e}; expected CSV with a header row") from e


def _optional(module: str, path: Path) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise LmforgeError(
            f"{path}: reading it needs the optional package {package}; pip install {package}"
        ) from e


def _read_parquet(path: Path, gz: bool) -> Iterator[Record]:
    pa, pq = _optional("pyarrow", path), _optional("pyarrow.parquet", path)
    src, i = str(path), 0
    with _open(path, gz) as f:  # gzip: works, but Parquet's footer-first layout makes it decompress twice
        try:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield Record(src, i, row, by_index=True)
                    i += 1
        except (pa.ArrowException, OSError, *_GZIP_ERRORS) as e:
            raise LmforgeError(f"{src}[#{i}]: cannot read ({e}); expected a Parquet file") from e


def _read_datasets(path: Path) -> Iterator[Record]:
    datasets = _optional("datasets", path)
    try:
        loaded = datasets.load_from_disk(str(path))  # memory-mapped Arrow: rows are read as iterated
    # a stray state.json, or a damaged save: KeyError, JSON, Arrow, missing-file errors
    except Exception as e:
        raise LmforgeError(
            f"{path}: cannot load it as a `datasets` directory ({type(e).__name__}: {e}); expected a directory "
            "written by Dataset.save_to_disk or DatasetDict.save_to_disk"
        ) from e
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, dataset in splits:
        src = str(path / split) if split else str(path)
        for i, row in enumerate(dataset):
            yield Record(src, i, row, by_index=True)
