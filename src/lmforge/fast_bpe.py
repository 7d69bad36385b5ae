"""Bulk encoders that give exactly the `tokenizers` ids: the hot path of `data prepare`.

`fastokens` (optional, `pip install lmforge[fast]`) loads a BPE `tokenizer.json` (it refuses BERT's normaliser)
and encodes a batch into one flat buffer 5-7x faster than tiktoken on one core (it caches the pieces it has
merged); it is used when it is installed and agrees with `tokenizers` on a self-check at load, including added
tokens and post-processor specials. Without it (no wheel for every platform), the tiktoken encoding below serves
byte-level BPE.

`tiktoken` applies the same byte-level BPE faster than `tokenizers` on one thread (1.5-2x per text on
TinyShakespeare; 8x on the 256 KiB chunks `data prepare` hands its workers: docs/benchmarks.md). It is optional: without it, or for a tokenizer it cannot express
exactly, lmforge uses `tokenizers`. Equivalence holds when the pre-tokenizer is one regex split (GPT-2's
ByteLevel regex, or a Split regex followed by ByteLevel without its own), there is no normaliser, and merge
results have ids increasing in merge order with no token made by two merges: tiktoken ranks a merge by its
result's id, `tokenizers` by its position in the merge list. A self-check on a mixed-script sample guards the
rest; tests compare both paths on real corpora.

Deriving the ranks means parsing the JSON in Python (25-60 ms for an 8k vocabulary, paid by every `data prepare`),
so they are kept in lmforge's cache folder by the file's sha256 and loaded from there in ~2 ms.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.fileio import cache_dir, replace_atomically

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # of the cached ranks' layout, in their file names
# What reading a bad cache file raises
_NOT_RANKS = (OSError, ValueError, LookupError, TypeError, AttributeError)

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SELF_CHECK = (
    "Hello, world! It's 2026-11-25; café naïve — 東京 ümlaut 😀 émoji.\n\n  Tabs\tand   spaces  \r\n"
    "don't WON'T we'll I'M 1234567 3.14159 $19.99 #hashtag @user https://example.com/a?b=c"
)


@cache
def byte_level_bytes() -> dict[str, int]:
    """GPT-2's byte ↔ printable-character table, inverted: ByteLevel vocab entries back to bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _pattern(spec: dict[str, Any]) -> str | None:
    """The one regex that splits text before byte-level BPE, or None if the pipeline is anything else."""
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_PATTERN
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) != 2:
        return None
    split, byte_level = steps
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in split.get("pattern", {})
        or byte_level.get("type") != "ByteLevel"
        or byte_level.get("use_regex", True)
        or byte_level.get("add_prefix_space")
    ):
        return None
    return split["pattern"]["Regex"]


def fastokens_encoder(path: Path, backend: Any) -> Any | None:
    """A fastokens Tokenizer of the `tokenizer.json` at `path` giving exactly `backend`'s ids (with and without
    special tokens, truncation and padding off as in `backend`), or None when fastokens is missing or differs."""
    try:
        import fastokens
    except ImportError:
        return None
    # lmforge parallelises by processes: fastokens' own BPE thread (started at its first call) would take a core
    # from the other worker, and after a fork it is gone (measured: 2-5x slower chunks in forked workers).
    os.environ.setdefault("FASTOKENS_BPE_THREADS", "1")
    try:
        encoder = fastokens.Tokenizer.from_file(str(path))
    except Exception as e:  # a tokenizer.json it does not support
        log.debug("fastokens cannot load %s: %s", path, e)
        return None
    encoder.no_truncation()
    encoder.no_padding()
    added = " ".join(t.content for t in backend.get_added_tokens_decoder().values())
    sample = [SELF_CHECK, f"{added} {SELF_CHECK} {added}", ""]
    for specials in (False, True):
        ids, offsets = flat_batch(encoder, sample, specials)
        got = [ids[a:b].tolist() for a, b in itertools.pairwise(offsets)]
        if got != [e.ids for e in backend.encode_batch_fast(sample, add_special_tokens=specials)]:
            log.debug("fastokens self-check differs from tokenizers for %s; not using it", path)
            return None
    return encoder


def flat_batch(encoder: Any, texts: Sequence[str], add_special_tokens: bool) -> tuple[np.ndarray, np.ndarray]:
    """fastokens' ids of many texts as one uint32 array and int64 offsets (text i is ids[offsets[i]:offsets[i + 1]])."""
    flat, ends = encoder.encode_batch_flat(list(texts), add_special_tokens=add_special_tokens)
    # little-endian uint32 ids and uint64 offsets, as fastokens documents them
    return np.frombuffer(flat, "<u4"), np.frombuffer(ends, "<u8").astype(np.int64)


def tiktoken_encoding(spec: dict[str, Any], backend: Any) -> Any | None:
    """A tiktoken Encoding giving exactly `backend`'s ids for ordinary text, or None when that is not possible."""
    if not _has_tiktoken():
        return None
    parts = _ranks(spec)
    return None if parts is None else _encoding(*parts, backend)


def cached_tiktoken_encoding(path: Path, backend: Any) -> Any | None:
    """`tiktoken_encoding` of the `tokenizer.json` at `path` (the same `backend`'s), its ranks cached by the file's
    sha256 (also the answer "not expressible"). A cache that is unreadable or cannot be written is rebuilt or
    skipped, never an error."""
    if not _has_tiktoken():
        return None
    raw = path.read_bytes()
    name = f"v{CACHE_VERSION}-{hashlib.sha256(raw).hexdigest()}"
    cached = None if (folder := cache_dir()) is None else folder / "tiktoken" / name
    if cached is not None and cached.is_file():
        try:
            parts = _unpack(cached.read_bytes())
        except _NOT_RANKS as e:  # truncated, or not such a file: rebuilt below
            log.debug("ignoring the cached tiktoken ranks %s: %s", cached, e)
        else:
            return None if parts is None else _encoding(*parts, backend)
    try:
        spec = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: not valid JSON ({e})") from None
    parts = _ranks(spec)
    enc = None if parts is None else _encoding(*parts, backend)
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            data = _pack(parts if enc is not None else None)
            replace_atomically(cached, lambda tmp: Path(tmp).write_bytes(data))
        except OSError as e:
            log.debug("cannot cache the tiktoken ranks at %s: %s", cached, e)
    return enc


def _has_tiktoken() -> bool:
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return False
    return True


Ranks = tuple[str, dict[bytes, int], dict[str, int]]
"""What a tiktoken Encoding is made of: the split regex, token bytes → id, special token → id."""


def _ranks(spec: dict[str, Any]) -> Ranks | None:
    """The regex, ranks and special tokens equivalent to a `tokenizer.json`, or None when there are none."""
    model = spec.get("model", {})
    pattern = _pattern(spec)
    if model.get("type") != "BPE" or pattern is None or model.get("byte_fallback") or model.get("dropout"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    added = {t["content"] for t in spec.get("added_tokens", [])}
    vocab: dict[str, int] = model["vocab"]
    merged = [
        vocab.get(m.replace(" ", "") if isinstance(m, str) else "".join(m)) for m in model.get("merges", [])
    ]
    if None in merged or any(a >= b for a, b in itertools.pairwise(merged)):
        return None  # merge order and id order disagree: tiktoken would merge in another order
    tokens = {token: i for token, i in vocab.items() if token not in added}
    if not set("".join(tokens)) <= byte_level_bytes().keys():
        return None  # a vocab entry outside the byte-level alphabet
    # Each alphabet character → the character of its byte, then Latin-1: bytes without a loop per character.
    table = str.maketrans({c: chr(b) for c, b in byte_level_bytes().items()})
    ranks = {token.translate(table).encode("latin-1"): i for token, i in tokens.items()}
    if len(ranks) != len(vocab) - len(added & vocab.keys()) or any(
        bytes([b]) not in ranks for b in range(256)
    ):
        return None
    return pattern, ranks, {t["content"]: t["id"] for t in spec.get("added_tokens", [])}


def _encoding(pattern: str, ranks: dict[bytes, int], specials: dict[str, int], backend: Any) -> Any | None:
    """The tiktoken Encoding, if tiktoken accepts it and it passes the self-check against `backend`."""
    import tiktoken

    try:
        enc = tiktoken.Encoding("lmforge", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except Exception as e:  # an unsupported regex, for instance
        log.debug("tiktoken cannot express this tokenizer: %s", e)
        return None
    if enc.encode_ordinary(SELF_CHECK) != backend.encode(SELF_CHECK, add_special_tokens=False).ids:
        log.debug("tiktoken self-check differs from tokenizers; using tokenizers")
        return None
    return enc


def _pack(parts: Ranks | None) -> bytes:
    """Ranks as one file: a JSON header line, then uint32 token lengths, uint32 ids, and the token bytes."""
    if parts is None:
        return b'{"expressible": false}\n'
    pattern, ranks, specials = parts
    head = json.dumps({"pattern": pattern, "specials": specials, "tokens": len(ranks)}).encode()
    lengths = np.fromiter(map(len, ranks), np.uint32, len(ranks))
    ids = np.fromiter(ranks.values(), np.uint32, len(ranks))
    return b"".join([head, b"\n", lengths.tobytes(), ids.tobytes(), *ranks])


def _unpack(data: bytes) -> Ranks | None:
    """`_pack`'s ranks back; one of _NOT_RANKS when `data` is not such a file."""
    end = data.index(b"\n")
    head = json.loads(data[:end])
    if head.get("expressible", True) is False:
        return None
    n, at = head["tokens"], end + 1
    lengths = np.frombuffer(data, np.uint32, n, at).astype(np.int64)
    ids = np.frombuffer(data, np.uint32, n, at + 4 * n).tolist()
    bounds = np.cumsum(lengths) + (at + 8 * n)
    if n == 0 or bounds[-1] != len(data):
        raise ValueError(f"{len(data)} bytes where the header says {int(bounds[-1]) if n else 0}")
    ends = bounds.tolist()
    starts = [at + 8 * n, *ends[:-1]]
    return (
        str(head["pattern"]),
        dict(zip(map(data.__getitem__, map(slice, starts, ends)), ids, strict=True)),
        dict(head["specials"]),
    )
