"""Data governance: PII scrubbing, exact + MinHash-LSH near deduplication, n-gram contamination checks.

Dedup and contamination share one normalisation (`normalize`): lowercase, delete every character that is
neither a word character nor whitespace ("don't" -> "dont", "top-up" -> "topup"), collapse whitespace.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lmforge.errors import LmforgeError

PII_KINDS = ("email", "phone", "ip", "credit_card")
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>", "credit_card": "<CREDIT_CARD>"}

# Python's `re` skips fast only to a literal first character (~1 GB/s, against ~90 MB/s for a class and ~15 MB/s
# for a leading lookbehind), so each kind starts from a cheap seed and its full pattern runs only there: "@" for
# e-mails, ":hex:" for IPv6 (every address has "::" or seven colons), a digit-dense run for the rest.
_AT_DOMAIN = re.compile(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_LOCAL_PART = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}\Z")  # RFC 5321: at most 64 characters
_IPV6_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")
# the embedded-IPv4 tail (::ffff:192.0.2.1) is tried first, so "192" alone cannot end the match
_IPV6 = re.compile(
    r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)"
)
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")
_DIGIT_RUN = re.compile(r"[0-9][0-9 ().:+-]{5,}[0-9]")  # >= 7 characters: the shortest target is 1.2.3.4
# 13-19 digits, optionally grouped by spaces or dashes; not glued to other digits, decimals or dashes
_CARD = re.compile(r"(?<![0-9.,-])[0-9](?:[ -]?[0-9]){12,18}(?![0-9-]|[.,][0-9])")
# no dot-digit on either side: 1.2.3.4.5 is a version, not an address (a bare 1.2.3.4 is flagged)
_IPV4 = re.compile(r"(?<![0-9.])[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?!\.?[0-9])")
_END = r"(?![\w-]|[.,][0-9])"
_PHONE = re.compile(
    # international: +CC and 2-5 groups, 8-15 digits (checked below); `(?<![\w+])` keeps "48+24" out
    rf"(?<![\w+])\+[0-9]{{1,3}}(?:[ .-]?\([0-9]{{1,4}}\))?(?:[ .-]?[0-9]{{1,4}}){{2,5}}{_END}"
    # North American: (NXX) NXX-XXXX, or NXX-NXX-XXXX with one separator kind throughout
    rf"|(?<![\w(+.-])(?:1[-. ])?(?:\([0-9]{{3}}\) ?[0-9]{{3}}[-. ]|[0-9]{{3}}([-. ])[0-9]{{3}}\1)[0-9]{{4}}{_END}"
    # trunk-prefix national (UK 020 7946 0958, FR 06 12 34 56 78): 10-12 digits (checked below)
    rf"|(?<![\w+.-])0[0-9]{{1,4}}(?:[ -][0-9]{{2,4}}){{2,4}}{_END}"
)


def _is_card(s: str) -> bool:
    digits = [int(c) for c in s if c.isdigit()]
    groups = re.split(r"[ -]", s)
    luhn = sum(digits[-1::-2]) + sum(d * 2 - 9 * (d > 4) for d in digits[-2::-2])
    # issuer digit 2-6 (MasterCard 2-series, Amex/Diners/JCB, Visa, MasterCard, Discover/UnionPay) rules out
    # most long ids; a grouped number uses one separator kind and groups of 3-6 digits (4-4-4-4, 4-6-5)
    return (
        2 <= digits[0] <= 6
        and len(set(s) - set("0123456789")) <= 1
        and (len(groups) == 1 or all(3 <= len(g) <= 6 for g in groups))
        and luhn % 10 == 0
    )


def _is_ipv4(s: str) -> bool:
    return all(int(o) <= 255 and (o == "0" or o[0] != "0") for o in s.split("."))


def _is_phone(s: str) -> bool:
    n = sum(c.isdigit() for c in s)
    if s[0] == "+":
        return 8 <= n <= 15  # E.164: at most 15 digits
    return s[0] != "0" or (10 <= n <= 12 and len(set(re.findall(r"[ -]", s))) == 1)


def _ipv6s(text: str) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    for m in _IPV6_SEED.finditer(text):
        a = m.start()
        if out and a < out[-1][1]:
            continue  # a second seed inside an address already found
        while a > max(0, m.start() - 40) and text[a - 1] in _HEX_COLON:  # bounded: no O(n^2) on hex runs
            a -= 1
        if (c := _IPV6.match(text, a)) and any(ch.isdigit() for ch in c.group()):  # not "::" or "add::bad"
            try:
                ipaddress.IPv6Address(c.group())  # the pattern is loose; this rejects times like 10:30:00
                out.append((a, c.end(), "ip"))
            except ValueError:
                pass
    return out


_DIGIT_KINDS = (("credit_card", _CARD, _is_card), ("ip", _IPV4, _is_ipv4), ("phone", _PHONE, _is_phone))


def find_pii(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans of PII in `text`, sorted by start."""
    found = []
    if "@" in text:
        for m in _AT_DOMAIN.finditer(text):
            if local := _LOCAL_PART.search(text, max(0, m.start() - 64), m.start()):
                found.append((local.start(), m.end(), "email"))
    by_kind: dict[str, list[tuple[int, int, str]]] = {"credit_card": [], "ip": [], "phone": []}
    if ":" in text:
        by_kind["ip"] = _ipv6s(text)
    for seed in _DIGIT_RUN.finditer(text):
        # one character of context before ("+", "("), two after: the lookaheads read at most two
        lo, hi = max(0, seed.start() - 1), min(len(text), seed.end() + 2)
        for kind, pattern, valid in _DIGIT_KINDS:
            by_kind[kind] += [
                (m.start(), m.end(), kind) for m in pattern.finditer(text, lo, hi) if valid(m.group())
            ]
    if len(found) < 2 and not any(by_kind.values()):
        return found  # the common case: nothing to arbitrate
    spans: list[tuple[int, int, str]] = []
    # in priority order (e-mail, card, IP, phone), keep a span only if it overlaps none already kept
    for start, end, kind in found + by_kind["credit_card"] + by_kind["ip"] + by_kind["phone"]:
        i = bisect.bisect_left(spans, (start,))
        if (i == 0 or spans[i - 1][1] <= start) and (i == len(spans) or spans[i][0] >= end):
            spans.insert(i, (start, end, kind))
    return spans


def find_pii_many(texts: Sequence[str]) -> list[list[tuple[int, int, str]]]:
    """`find_pii` of each text, from one scan of the texts joined by newlines: no pattern matches a newline, and
    each treats one as it treats a text's edge (every lookaround and class leaves it out), so a span never
    crosses texts and each text's spans are its own. One scan spares the per-text calls on mostly clean text."""
    starts, at = [], 0
    for text in texts:
        starts.append(at)
        at += len(text) + 1
    out: list[list[tuple[int, int, str]]] = [[] for _ in texts]
    for start, end, kind in find_pii("\n".join(texts)):
        i = bisect.bisect_right(starts, start) - 1
        out[i].append((start - starts[i], end - starts[i], kind))
    return out


def masked(text: str, spans: Sequence[tuple[int, int, str]]) -> str:
    """`text` with each PII span replaced by its kind's placeholder."""
    parts, pos = [], 0
    for start, end, kind in spans:
        parts += [text[pos:start], PLACEHOLDERS[kind]]
        pos = end
    return "".join([*parts, text[pos:]])


def scrub_pii(text: str, mode: Literal["report", "mask", "drop"]) -> tuple[str | None, Counter[str]]:
    """Find e-mails, phones, IPs and Luhn-valid cards; return (text as is | masked | None if any found, counts)."""
    if mode not in ("report", "mask", "drop"):
        raise LmforgeError(f"PII mode must be report, mask or drop, got {mode!r}")
    spans = find_pii(text)
    counts = Counter(kind for _, _, kind in spans) if spans else Counter()
    if mode == "report" or not spans:
        return text, counts
    return (None if mode == "drop" else masked(text, spans)), counts


_PUNCT = re.compile(r"[^\w\s]+")
_U64 = np.uint64


def normalize(text: str) -> str:
    """Lowercase, delete punctuation (anything neither word nor whitespace), collapse whitespace."""
    if text.isascii():  # the same in one bytes pass, 2x faster (O(1) test: CPython flags ASCII strings)
        return b" ".join(text.encode().translate(_ASCII_FOLD, _ASCII_PUNCT).split()).decode()
    return " ".join(_PUNCT.sub("", text.lower()).split())


# For ASCII text: the bytes _PUNCT deletes, and a table that lowercases and maps every str.isspace() byte to a
# space (bytes.split() alone would not split at the separators \x1c-\x1f that str.split() splits at).
_ASCII_PUNCT = bytes(c for c in range(128) if _PUNCT.fullmatch(chr(c)))
_ASCII_PUNCT_BUT_NUL = _ASCII_PUNCT.replace(b"\0", b"")
_ASCII_FOLD = bytes(
    c + 32 if 65 <= c <= 90 else 32 if c < 128 and chr(c).isspace() else c for c in range(256)
)


def _normalized_bytes(texts: Sequence[str]) -> list[bytes]:
    """`normalize(text).encode()` of each text; the ASCII ones (most) together: their bytes joined by NUL (which
    none of them holds: checked) go through one translate (every whitespace byte becomes a space) and a few
    passes that collapse runs of spaces, rather than splitting each text into words."""
    out: list[bytes | None] = [None] * len(texts)
    plain = [i for i, text in enumerate(texts) if text.isascii()]  # isascii is O(1) in CPython
    joined = "\0".join([texts[i] for i in plain])
    if plain and joined.count("\0") == len(plain) - 1:
        folded = joined.encode().translate(_ASCII_FOLD, _ASCII_PUNCT_BUT_NUL)
        while b"  " in folded:  # halves every run of spaces (a `re` substitution scans 10x slower)
            folded = folded.replace(b"  ", b" ")
        for i, part in zip(plain, folded.split(b"\0"), strict=True):
            out[i] = part.strip(b" ")
    return [normalize(text).encode() if norm is None else norm for text, norm in zip(texts, out, strict=True)]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads the rolling hash's linear structure over all 64 bits."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _token_hashes(tokens: list[str], cache: dict[str, int]) -> np.ndarray:
    """(L,) uint64 stable token hashes: blake2b, since Python's `hash` is salted per process."""
    if len(cache) > 2_000_000:  # bound memory on huge vocabularies; the values recompute identically
        cache.clear()
    out = []
    for t in tokens:
        if (h := cache.get(t)) is None:
            h = cache[t] = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
        out.append(h)
    return np.array(out, dtype=np.uint64)


def _ngram_hashes(tok: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every n-token window of tok (L,) -> (L - n + 1,): a polynomial rolling hash, length mixed in."""
    m = len(tok) - n + 1
    h = np.zeros(max(m, 0), dtype=np.uint64)
    for j in range(n):
        h = h * _U64(0x9E3779B97F4A7C15) + tok[j : j + m]  # wraps mod 2^64
    return _mix(h + _U64(n))


DedupKey = tuple[bytes, np.ndarray | None, bool]
"""A document's dedup key: sha256 of its normalised text, its MinHash signature (None: exact only, or short) and
whether it is short (kept, never dropped as a duplicate). A plain tuple: workers send one per document, and a
NamedTuple pickles 15x slower."""


@dataclass(frozen=True)
class DupResult:
    """A duplicate: the kept document it repeats, how ("exact" or "near"), estimated Jaccard (1.0 if exact)."""

    kind: Literal["exact", "near"]
    duplicate_of: str
    jaccard: float


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands = num_perm // rows and the most rows (steepest S-curve) that still make a pair at
    the threshold a candidate with probability >= 0.9; so (1/b)^(1/r) sits a little below the threshold."""
    for r in range(num_perm, 0, -1):
        if 1 - (1 - threshold**r) ** (num_perm // r) >= 0.9:
            return num_perm // r, r
    return num_perm, 1


class Deduplicator:
    """Streaming exact (sha256 of `normalize(text)`) and near (MinHash-LSH) deduplication; deterministic per seed.

    Near: shingles are word n-grams of the normalised text (characters with shingle="char"; a text shorter than
    n is one shingle), MinHash is num_perm hashes (a*x + b) mod 2^64 keeping the top 32 bits of each minimum,
    and LSH candidates are accepted when their estimated Jaccard >= threshold (the highest wins, then the
    earliest). Only kept documents are indexed, so `duplicate_of` always names one that stays in the data.

    A document whose normalised text has fewer than `min_chars` characters is kept and not indexed: short texts
    repeat legitimately (a speaker's cue in a play); the report counts the repeats kept so (`kept_short`).
    """

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        ngram: int = 5,
        seed: int = 0,
        *,
        shingle: Literal["word", "char"] = "word",
        max_examples: int = 10,
        near: bool = True,
        min_chars: int = 0,
    ) -> None:
        bad = not 0 < threshold <= 1 or num_perm < 1 or ngram < 1 or min_chars < 0
        if bad or shingle not in ("word", "char"):
            raise LmforgeError(
                "dedup needs 0 < threshold <= 1, num_perm >= 1, ngram >= 1, min_chars >= 0, shingle word|char; "
                f"got threshold={threshold}, num_perm={num_perm}, ngram={ngram}, min_chars={min_chars}, "
                f"shingle={shingle!r}"
            )
        self.min_chars = min_chars
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        self.shingle, self.near = shingle, near  # near=False: exact duplicates only, no MinHash cost
        self.bands, self.rows = lsh_params(threshold, num_perm)
        rng = np.random.default_rng(seed)
        self._a = rng.integers(0, 2**64, num_perm, dtype=np.uint64) | _U64(1)  # odd: a bijection mod 2^64
        self._b = rng.integers(0, 2**64, num_perm, dtype=np.uint64)
        self._vocab: dict[str, int] = {}
        self._ids: list[str] = []  # kept documents, by index
        self._exact: dict[bytes, int] = {}
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint32)  # (capacity, num_perm); grows by doubling
        self._tables: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._counts = {"documents": 0, "exact": 0, "near": 0, "kept_short": 0}
        self._short: set[bytes] = set()  # digests of the short documents seen
        self._max_examples = max_examples
        self._examples: list[dict] = []
        self._snippets: dict[int, str] = {}  # kept documents' snippets, only until the examples are full

    def signature(self, text: str) -> np.ndarray | None:
        """MinHash signature (num_perm,) uint32 of a text, or None when it normalises to nothing."""
        return self._signature(normalize(text))

    def _signature(self, norm: str) -> np.ndarray | None:
        if not norm:
            return None
        if self.shingle == "word":
            tok = _token_hashes(norm.split(), self._vocab)
        else:
            tok = _mix(np.frombuffer(norm.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64))
        shingles = np.unique(_ngram_hashes(tok, min(self.ngram, len(tok))))
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for i in range(0, len(shingles), 2048):  # chunks bound the (S, num_perm) temporary on long documents
            np.minimum(sig, (shingles[i : i + 2048, None] * self._a + self._b).min(axis=0), out=sig)
        return (sig >> _U64(32)).astype(np.uint32)

    def add(self, doc_id: str, text: str) -> DupResult | None:
        """Record a document: None if it is new (it is kept and indexed), else the DupResult naming the earlier one."""
        return self.add_key(doc_id, self.key(text), text)

    def key(self, text: str) -> DedupKey:
        """What `add` compares: the exact digest, for near dedup the MinHash signature, and whether the text is
        short. Pure, so worker processes can compute keys (with a Deduplicator of the same settings) while one
        process adds them."""
        norm = normalize(text)
        short = len(norm) < self.min_chars
        sig = self._signature(norm) if self.near and not short else None
        return hashlib.sha256(norm.encode()).digest(), sig, short

    def keys(self, texts: Sequence[str]) -> list[DedupKey]:
        """`key` of each text (a chunk's, in a worker): for exact dedup, ASCII texts are normalised together."""
        if self.near:
            return [self.key(text) for text in texts]
        n = self.min_chars
        return [(hashlib.sha256(norm).digest(), None, _shorter(norm, n)) for norm in _normalized_bytes(texts)]

    def add_key(self, doc_id: str, key: DedupKey, text: str = "") -> DupResult | None:
        """`add` with a precomputed key; `text` (or its first 200 characters) only feeds the report's examples."""
        self._counts["documents"] += 1
        digest, sig, short = key
        if short:  # kept whatever it repeats; a repeat is counted, and nothing is indexed
            if digest in self._short:
                self._counts["kept_short"] += 1
            self._short.add(digest)
            return None
        if (j := self._exact.get(digest)) is not None:
            return self._found(doc_id, text, DupResult("exact", self._ids[j], 1.0), j)
        keys: list[bytes] = []
        if sig is not None:
            r = self.rows
            keys = [sig[i * r : (i + 1) * r].tobytes() for i in range(self.bands)]
            candidates = {
                c for table, key in zip(self._tables, keys, strict=True) for c in table.get(key, ())
            }
            if candidates:
                cand = np.array(sorted(candidates))
                est = (self._sigs[cand] == sig).mean(axis=1)  # (C,) estimated Jaccard
                best = int(np.argmax(est))  # the first maximum: the earliest kept document on ties
                if est[best] >= self.threshold:
                    j = int(cand[best])
                    return self._found(doc_id, text, DupResult("near", self._ids[j], float(est[best])), j)
        index = len(self._ids)
        self._ids.append(doc_id)
        self._exact[digest] = index
        if index < 100_000 and len(self._examples) < self._max_examples:  # bounded: ~20 MB at most
            self._snippets[index] = text[:200]  # made into a snippet only if a duplicate of it is reported
        if sig is not None:
            if index == len(self._sigs):
                self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
            self._sigs[index] = sig
            for table, key in zip(self._tables, keys, strict=True):
                table.setdefault(key, []).append(index)
        return None

    def _found(self, doc_id: str, text: str, dup: DupResult, j: int) -> DupResult:
        self._counts[dup.kind] += 1
        if len(self._examples) < self._max_examples and j in self._snippets:
            self._examples.append(
                {"kind": dup.kind, "id": doc_id, "duplicate_of": dup.duplicate_of, "jaccard": round(dup.jaccard, 3),
                 "text": _snippet(text[:200]), "original": _snippet(self._snippets[j])}
            )  # fmt: skip
            if len(self._examples) == self._max_examples:
                self._snippets.clear()
        return dup

    def report(self) -> dict:
        """Counts (documents, kept, exact, near; kept_short: repeats kept for being short, among the kept), the
        settings that produced them, and up to max_examples pairs."""
        kept = len(self._ids) + len(self._short) + self._counts["kept_short"]
        return {
            **self._counts, "kept": kept, "threshold": self.threshold, "num_perm": self.num_perm,
            "shingle": self.shingle, "ngram": self.ngram, "bands": self.bands, "rows": self.rows, "seed": self.seed,
            "min_chars": self.min_chars, "examples": list(self._examples),
        }  # fmt: skip


def _shorter(norm: bytes, n: int) -> bool:
    """Whether UTF-8 `norm` holds fewer than `n` characters (decoded only where its byte count cannot tell)."""
    return len(norm) < n or (len(norm) < 4 * n and len(norm.decode()) < n)


def _snippet(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def contamination(
    train: Iterable[tuple[str, str]],
    eval_sets: Mapping[str, Iterable[tuple[str, str]]],
    n: int = 13,
    max_ids: int = 100,
) -> dict:
    """Word n-gram overlap between (id, text) training examples and each named eval set.

    Tokens are the whitespace-split words of `normalize(text)`. A training example is contaminated for an eval
    set when it shares at least one n-gram with one of its examples; an eval example shorter than n words is
    itself the n-gram (a train text containing it verbatim matches; counted as "eval_short"). Returns
    {"n", "train_examples", "train_contaminated", "drop_ids": every contaminated train id in train order (what
    --decontaminate removes), "eval_sets": {name: {"eval_examples", "eval_short", "eval_contaminated",
    "eval_ids", "train_contaminated", "train_ids"}}}, the eval_sets id lists capped at max_ids.
    """
    if n < 1:
        raise LmforgeError(f"contamination n-gram size must be >= 1, got {n}")
    vocab: dict[str, int] = {}
    names = list(eval_sets)
    stats = {name: {"eval_examples": 0, "eval_short": 0} for name in names}
    eval_ids: list[str] = []
    eval_set: list[int] = []  # per eval example (global index): its set's index in names
    grams, owners, lengths = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)], {n}
    for s, name in enumerate(names):
        for eval_id, text in eval_sets[name]:
            stats[name]["eval_examples"] += 1
            if not len(tok := _token_hashes(normalize(text).split(), vocab)):
                continue
            k = min(n, len(tok))
            stats[name]["eval_short"] += k < n
            lengths.add(k)
            grams.append(np.unique(_ngram_hashes(tok, k)))
            owners.append(np.full(len(grams[-1]), len(eval_ids)))
            eval_ids.append(eval_id)
            eval_set.append(s)
    # every eval n-gram in one sorted uint64 array (8 bytes each, not a ~70-byte set entry), owners beside it
    order = np.argsort(all_grams := np.concatenate(grams), kind="stable")
    all_grams, owner = all_grams[order], np.concatenate(owners)[order]

    hit_evals: list[set[int]] = [set() for _ in names]
    hit_train: list[list[str]] = [[] for _ in names]
    drop: dict[str, None] = {}  # an ordered set
    n_train = 0
    for train_id, text in train:
        n_train += 1
        tok = _token_hashes(normalize(text).split(), vocab)
        h = np.concatenate(
            [all_grams[:0], *(_ngram_hashes(tok, k) for k in sorted(lengths) if k <= len(tok))]
        )
        lo, hi = np.searchsorted(all_grams, h, "left"), np.searchsorted(all_grams, h, "right")
        if not (hit := hi > lo).any():
            continue
        matched = {g for a, b in zip(lo[hit], hi[hit], strict=True) for g in owner[a:b].tolist()}
        for s in sorted({eval_set[g] for g in matched}):
            hit_train[s].append(train_id)
        for g in matched:
            hit_evals[eval_set[g]].add(g)
        drop[train_id] = None

    return {
        "n": n, "train_examples": n_train, "train_contaminated": len(drop), "drop_ids": list(drop),
        "eval_sets": {name: {
            **stats[name], "eval_contaminated": len(hit_evals[s]),
            "eval_ids": [eval_ids[g] for g in sorted(hit_evals[s])[:max_ids]],
            "train_contaminated": len(hit_train[s]), "train_ids": hit_train[s][:max_ids],
        } for s, name in enumerate(names)},
    }  # fmt: skip
