"""Contamination of an evaluation: its items' word 13-grams against the training data of every stage in the
model's lineage (the check `data prepare` runs, `data/governance.py`), so a score on items the model was trained
on is flagged, not trusted."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lmforge.data.governance import contamination

log = logging.getLogger(__name__)
MAX_FLAGGED = 100  # item ids listed in a result at most


def _documents(path: Path, fallback: Path) -> Iterator[tuple[str, str]]:
    """(id, text) of every training document of a prepared dataset, decoded with the tokenizer its manifest
    names (else `fallback`'s, the evaluated model's: a lineage shares its tokenizer)."""
    from lmforge.data.dataset import PreparedDataset
    from lmforge.tokenizer import Tokenizer

    ds = PreparedDataset(path)
    named = Path((ds.manifest.get("tokenizer") or {}).get("path") or fallback)
    tok = Tokenizer.from_dir(named if named.is_dir() else fallback)
    # A chat template's markers (<|im_end|>) would glue the words beside them into one: they become spaces.
    specials = [t.content for t in tok.backend.get_added_tokens_decoder().values() if t.special]
    marker = (
        re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None
    )
    column = ds.columns()[0]  # a preference pair's chosen conversation holds its prompt
    for i, doc in enumerate(ds.documents("train", column)):
        text = tok.decode(doc.ids.tolist())
        yield f"{path}#{i}", marker.sub(" ", text) if marker else text


def check_lineage(target: Any, ids: Sequence[str], texts: Sequence[str], n: int = 13) -> dict[str, Any]:
    """Which evaluation items share a word n-gram with the training data of any stage the model came from:
    {"n", "checked": [datasets], "missing": [recorded but gone], "flagged", "items": [ids, at most 100]}."""
    from lmforge.lineage import LINEAGE_FILE, resolve_path, trace

    checked, missing = [], []
    start = target.adapter if target.adapter is not None else target.model
    if (Path(start) / LINEAGE_FILE).is_file():  # a model lmforge did not train has no record to follow
        for node in trace(start).nodes:
            for dataset in node.datasets:
                if not dataset.get("id") or not isinstance(dataset.get("path"), str):
                    continue  # a prompt file, or a dataset whose place was never recorded
                where = resolve_path(dataset["path"], node.path or Path.cwd())
                (checked if where is not None else missing).append(str(where or dataset["path"]))
    checked = list(dict.fromkeys(checked))
    if not checked:
        return {"n": n, "checked": [], "missing": missing, "flagged": 0, "items": []}

    def train() -> Iterator[tuple[str, str]]:
        for path in checked:
            yield from _documents(Path(path), target.model)

    report = contamination(train(), {"eval": list(zip(ids, texts, strict=True))}, n=n, max_ids=MAX_FLAGGED)
    found = report["eval_sets"]["eval"]
    if found["eval_contaminated"]:
        log.warning("%d of %d evaluation items share a %d-gram with the training data (%s)",
                    found["eval_contaminated"], len(ids), n, ", ".join(checked))  # fmt: skip
    return {"n": n, "checked": checked, "missing": missing, "flagged": found["eval_contaminated"],
            "items": found["eval_ids"]}  # fmt: skip
