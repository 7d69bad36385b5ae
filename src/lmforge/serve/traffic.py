"""What a served model's traffic leaves behind and how it is split: the request log (JSON lines, rotated), A/B
routes (a request for a route's name goes to one variant, the same one for the same `user`), and the export of
user ratings into preference pairs that `data prepare` reads and `lmforge align --set method=dpo` trains on.

A log holds two kinds of line: `{"type": "request", ...}` (time, id, model asked, variant that answered, route,
user, token counts, TTFT, latency, finish reason, policy actions, a 64-bucket histogram of the prompt's token
ids, and the messages and completion only with --log-text) and `{"type": "feedback", ...}` (response id, rating
up or down, comment), written by `RequestLog` and read back by `read_log` (`lmforge monitor`, serve/monitor.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write

BUCKETS = 64
"""Token-id buckets of `prompt_token_hist`: bucket b holds the ids with id * BUCKETS // vocab_size == b."""
REQUEST_KEYS = ("id", "variant", "prompt_tokens", "completion_tokens", "ttft_s", "latency_s")
FEEDBACK_KEYS = ("response_id", "rating")


def bucket_counts(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """(BUCKETS,) counts of token ids by bucket id * BUCKETS // vocab_size, as the server logs them."""
    buckets = np.asarray(ids, dtype=np.int64) * BUCKETS // vocab_size
    return np.bincount(np.clip(buckets, 0, BUCKETS - 1), minlength=BUCKETS)


def log_files(path: str | Path) -> list[Path]:
    """The files of a rotated log, oldest first: LOG.N ... LOG.2, LOG.1, then LOG."""
    path = Path(path)
    rotated = []
    if path.parent.is_dir():
        pattern = re.compile(re.escape(path.name) + r"\.(\d+)")
        for sibling in path.parent.iterdir():
            if (m := pattern.fullmatch(sibling.name)) and sibling.is_file():
                rotated.append((int(m.group(1)), sibling))
    files = [p for _, p in sorted(rotated, reverse=True)] + ([path] if path.is_file() else [])
    if not files:
        raise LmforgeError(f"{path}: no request log there (nor rotated {path.name}.1 ...)")
    return files


def _check_entry(entry: Any) -> str | None:
    """Why a parsed line is not a log entry, or None when it is one."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    kind = entry.get("type")
    if kind not in ("request", "feedback"):
        return f"type {kind!r}: expected 'request' or 'feedback'"
    missing = [k for k in (REQUEST_KEYS if kind == "request" else FEEDBACK_KEYS) if k not in entry]
    if missing:
        return f"a {kind} entry without {', '.join(missing)}"
    if kind == "feedback" and entry["rating"] not in ("up", "down"):
        return f"rating {entry['rating']!r}: expected 'up' or 'down'"
    hist = entry.get("prompt_token_hist")
    if kind == "request" and hist is not None and (not isinstance(hist, list) or len(hist) != BUCKETS):
        return f"prompt_token_hist: expected a list of {BUCKETS} counts"
    return None


def read_log(path: str | Path) -> list[dict]:
    """Every entry of a request log and its rotated files, oldest first; a bad line raises naming file:line."""
    entries = []
    for file in log_files(path):
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except ValueError as e:
                    raise LmforgeError(f"{file}:{number}: not JSON ({e})") from None
                if problem := _check_entry(entry):
                    raise LmforgeError(f"{file}:{number}: {problem}")
                entries.append(entry)
    return entries


class RequestLog:
    """An append-only JSON-lines log, rotated past `max_bytes` into LOG.1 ... LOG.`backups` (oldest dropped)."""

    def __init__(
        self, path: Path, *, max_bytes: int = 10 << 20, backups: int = 5, text: bool = False
    ) -> None:
        self.path, self.max_bytes, self.backups, self.text = Path(path), max_bytes, backups, text
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        """Append one entry (one line), rotating first when the file is full."""
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self._rotate()
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))


@dataclass(frozen=True)
class Route:
    """A served name split between variants (the base's name or adapters') by share, sticky per user."""

    name: str
    variants: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, spec: str) -> Route:
        """`NAME=VARIANT:SHARE,VARIANT:SHARE...` (shares sum to 1)."""
        name, _, rest = spec.partition("=")
        variants = []
        for part in rest.split(","):
            variant, _, share = part.partition(":")
            try:
                variants.append((variant.strip(), float(share)))
            except ValueError:
                variants = []
                break
        if not name.strip() or not variants or any(not v or s <= 0 for v, s in variants):
            raise LmforgeError(f"--route {spec}: expected NAME=VARIANT:SHARE,VARIANT:SHARE (shares > 0)")
        total = sum(s for _, s in variants)
        if abs(total - 1) > 1e-6:
            shares = " + ".join(f"{v} {s:g}" for v, s in variants)
            raise LmforgeError(f"--route {spec}: the shares sum to {total:g} ({shares}); expected 1")
        return cls(name.strip(), tuple(variants))

    def choose(self, user: str | None, rng: random.Random | None = None) -> str:
        """The variant for a request: the same for the same user (a hash of user and route), else drawn."""
        if user:
            digest = hashlib.sha256(f"{self.name}\0{user}".encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64
        else:
            u = (rng or random).random()
        for variant, share in self.variants:
            u -= share
            if u < 0:
                return variant
        return self.variants[-1][0]  # rounding at the top end


def export_preferences(log: Path, out: Path) -> dict[str, Any]:
    """Preference pairs from rated answers: for each prompt with an up-rated and a down-rated answer, one record
    {"prompt": messages, "chosen": up, "rejected": down} per pair (each answer used once); JSONL, atomic."""
    requests, ratings = {}, {}
    for entry in read_log(log):
        if entry["type"] == "request":
            requests[entry.get("id")] = entry
        else:
            ratings[entry.get("response_id")] = entry.get("rating")
    rated = [(requests[i], r) for i, r in ratings.items() if i in requests]
    if rated and not all("messages" in q and "completion" in q for q, _ in rated):
        raise LmforgeError(f"{log}: the rated requests carry no text; start lmforge serve with --log-text to "
                           "export preference pairs")  # fmt: skip
    by_prompt: dict[str, dict[str, list[str]]] = defaultdict(lambda: {"up": [], "down": []})
    prompts = {}
    for request, rating in rated:
        key = json.dumps(request["messages"], sort_keys=True)
        prompts[key] = request["messages"]
        if rating in ("up", "down"):
            by_prompt[key][rating].append(request["completion"])
    records = [{"prompt": prompts[k], "chosen": up, "rejected": down}
               for k, answers in by_prompt.items() for up, down in zip(answers["up"], answers["down"], strict=False)
               if up != down]  # fmt: skip
    atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return {"out": str(out), "rated": len(rated), "prompts": len(by_prompt), "pairs": len(records)}
