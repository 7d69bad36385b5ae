"""Raw data files prepared on first use: a recipe's `data.dataset` may name a .jsonl/.json/.txt/.parquet file, a
directory or a glob of them, as LitGPT's and torchtune's `--data path` do, not only a `data prepare` output.

The prepared copy lives in lmforge's cache, `<cache_dir()>/prepared/<fingerprint>`, where the fingerprint is the
one `data prepare` stores in its manifest (the inputs' sha256s, the tokenizer's hash, the resolved config, the
lmforge version): unchanged inputs are tokenised once, and a changed file or tokenizer gets a new directory.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmforge.config import validation_message
from lmforge.data.dataset import PreparedDataset
from lmforge.data.prepare import PrepareConfig, fingerprint, input_digests, prepare
from lmforge.data.readers import iter_files
from lmforge.errors import LmforgeError
from lmforge.fileio import cache_dir, remove_tree
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def ensure_prepared(
    source: Path | str, *, tokenizer: Path | None, purpose: str = "data.dataset", **options: Any
) -> Path:
    """A prepared dataset directory for `source`: itself when it is one, else its cached `data prepare` output
    (prepared now with `tokenizer` and PrepareConfig's defaults, `options` overriding them, unless cached)."""
    if (Path(source).expanduser() / "manifest.json").is_file():
        return Path(source).expanduser()
    inputs = _inputs(source, purpose)
    if tokenizer is None:
        raise LmforgeError(
            f"{purpose} {source} is not a prepared dataset (no manifest.json) and no tokenizer was given to "
            f"prepare it with: give data.tokenizer (a directory with tokenizer.json), or prepare it with "
            f"`lmforge data prepare {source} --tokenizer DIR --out DATASET` and give DATASET"
        )
    if (root := cache_dir()) is None:
        raise LmforgeError(
            f"{purpose} {source} is not a prepared dataset (no manifest.json), and with LMFORGE_CACHE=off lmforge "
            f"has nowhere to prepare it: prepare it with `lmforge data prepare {source} --tokenizer {tokenizer} "
            "--out DATASET` and give DATASET, or enable the cache (unset LMFORGE_CACHE or name a folder)"
        )
    if "inputs" in options:
        raise LmforgeError(f"{purpose}: `inputs` is given by the source {source}, not as an option")
    try:
        cfg = PrepareConfig(**{**options, "inputs": inputs, "tokenizer": Path(tokenizer).resolve()})
    except ValidationError as e:
        raise LmforgeError(f"{purpose} {source}: {validation_message(e, PrepareConfig)}") from None
    key = fingerprint(cfg, input_digests(cfg.inputs), Tokenizer.from_dir(cfg.tokenizer).hash)
    out = root / "prepared" / key
    if out.exists():
        if _holds(out, key):
            log.info("using cached prepared data %s for %s %s", out, purpose, source)
            return out
        log.warning("%s holds no complete prepared dataset; preparing %s again", out, source)
        remove_tree(out)  # the cache's own directory: an interrupted or damaged copy
    log.info("preparing %s for %s into %s", source, purpose, out)
    manifest = prepare(cfg, out)  # staged beside `out` and renamed into place: never half-written
    splits = manifest["splits"]
    log.info(
        "prepared %s into %s (%s, %d train and %d val documents)",
        source, out, manifest["kind"], splits["train"]["documents"], splits["val"]["documents"],
    )  # fmt: skip
    return out


def _inputs(source: Path | str, purpose: str) -> list[Path]:
    """The input files or directories `source` names (a glob expanded, sorted), absolute, checked as `data prepare`
    checks them."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists() or not any(c in text for c in "*?["):
        paths = [path]
    else:
        paths = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        if not paths:
            raise LmforgeError(
                f"{purpose} {source}: no files match; expected a prepared dataset directory, or data files "
                "(a file, a directory or a glob)"
            )
    try:
        iter_files(paths, warn=False)  # `prepare` expands them again, and warns of what it skips
    except LmforgeError as e:
        raise LmforgeError(f"{purpose}: {e}") from None
    return [p.resolve() for p in paths]


def _holds(out: Path, key: str) -> bool:
    """Whether `out` holds a complete prepared dataset with fingerprint `key` (shards present, lengths right)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("fingerprint") != key:
            return False
        PreparedDataset(out, verify=False)  # the manifest's id, every shard's presence and length
    except (OSError, ValueError, LmforgeError):
        return False
    return True
