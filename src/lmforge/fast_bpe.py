"""A tiktoken encoding equivalent to a byte-level BPE `tokenizer.json`: the bulk-tokenisation hot path.

`tiktoken` applies the same byte-level BPE ~1.5-2x faster than `tokenizers` on one thread (measured on
TinyShakespeare, see docs/benchmarks.md). It is optional: without it, or for a tokenizer it cannot express
exactly, lmforge uses `tokenizers`. Equivalence holds when the pre-tokenizer is one regex split (GPT-2's
ByteLevel regex, or a Split regex followed by ByteLevel without its own), there is no normaliser, and merge
results have ids increasing in merge order with no token made by two merges: tiktoken ranks a merge by its
result's id, `tokenizers` by its position in the merge list. A self-check on a mixed-script sample guards the
rest; tests compare both paths on real corpora.
"""

from __future__ import annotations

import itertools
import logging
from functools import cache
from typing import Any

log = logging.getLogger(__name__)

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SELF_CHECK = (
    "Hello, world! It's 2026-11-25; café naïve — 東京 ümlaut 😀 émoji.\n\n  Tabs\tand   spaces  \r\n"
    "don't WON'T we'll I'M 1234567 3.14159 $19.99 #hashtag @user https://example.com/a?b=c"
)


@cache
def _bytes_of_char() -> dict[str, int]:
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


def tiktoken_encoding(spec: dict[str, Any], backend: Any) -> Any | None:
    """A tiktoken Encoding giving exactly `backend`'s ids for ordinary text, or None when that is not possible."""
    try:
        import tiktoken
    except ImportError:
        return None
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
    if not set("".join(tokens)) <= _bytes_of_char().keys():
        return None  # a vocab entry outside the byte-level alphabet
    # Each alphabet character → the character of its byte, then Latin-1: bytes without a loop per character.
    table = str.maketrans({c: chr(b) for c, b in _bytes_of_char().items()})
    ranks = {token.translate(table).encode("latin-1"): i for token, i in tokens.items()}
    if len(ranks) != len(vocab) - len(added & vocab.keys()) or any(
        bytes([b]) not in ranks for b in range(256)
    ):
        return None
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    try:
        enc = tiktoken.Encoding("lmforge", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    except Exception as e:  # an unsupported regex, for instance
        log.debug("tiktoken cannot express this tokenizer: %s", e)
        return None
    if enc.encode_ordinary(SELF_CHECK) != backend.encode(SELF_CHECK, add_special_tokens=False).ids:
        log.debug("tiktoken self-check differs from tokenizers; using tokenizers")
        return None
    return enc
