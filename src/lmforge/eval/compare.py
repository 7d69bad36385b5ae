"""`lmforge eval compare BASE TUNED`: the seeds' thesis as a table. Knowledge probes (question answering on
facts, perplexity of domain text) and behaviour probes (ending the turn, the taught answer's shape, refusing
harmful requests and not benign ones) run on both models over the same items; each delta carries a 95%
paired-bootstrap interval, and one line reads the table ("knowledge unchanged within CI, behaviour: end_of_turn
+62 points").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.eval.stats import bootstrap, paired_delta
from lmforge.eval.tasks import Measured, Target, run_task

FAMILIES = ("knowledge", "behaviour")


@dataclass(frozen=True)
class Probe:
    """One row of the comparison: a task's metric on a data file, and the family it speaks for."""

    name: str
    family: str
    task: str
    metric: str
    data: Path | None
    rate: bool = True  # a 0/1 rate (its delta read in points), else a statistic such as perplexity


def default_probes(
    families: Sequence[str], *, qa: Path | None, text: Path | None, prompts: Path | None, safety: bool
) -> list[Probe]:
    """The probes the given files allow: facts QA and perplexity (knowledge); end of turn and shape on the
    prompts, and the shipped safety probes (behaviour)."""
    probes = []
    if "knowledge" in families:
        if qa is not None:
            probes.append(Probe("fact_qa", "knowledge", "qa", "accuracy", qa))
        if text is not None:
            probes.append(Probe("perplexity", "knowledge", "perplexity", "perplexity", text, rate=False))
    if "behaviour" in families:
        if prompts is not None:
            probes += [Probe("end_of_turn", "behaviour", "format", "end_of_turn", prompts),
                       Probe("answer_shape", "behaviour", "format", "shape", prompts)]  # fmt: skip
        if safety:
            probes += [Probe("refusal", "behaviour", "safety", "refusal_rate", None),
                       Probe("over_refusal", "behaviour", "safety", "over_refusal_rate", None)]  # fmt: skip
    if not probes:
        raise LmforgeError(
            "nothing to compare: give --world DIR (the synthetic world) or --qa FILE / --text FILE / --prompts "
            f"FILE for the probe families {', '.join(families)}"
        )
    return probes


def _delta_text(probe: Probe, delta: dict[str, Any]) -> str:
    if probe.rate:
        return f"{probe.name} {100 * delta['value']:+.0f} points"
    return f"{probe.name} {delta['value']:+.3g}"


def reading(rows: list[dict[str, Any]], probes: list[Probe], families: Sequence[str]) -> str:
    """One line per the table: per family, the deltas whose interval excludes 0, or 'unchanged within CI'."""
    parts = []
    for family in families:
        moved = [
            _delta_text(p, r["delta"])
            for p, r in zip(probes, rows, strict=True)
            if p.family == family and not (r["delta"]["ci95"][0] <= 0 <= r["delta"]["ci95"][1])
        ]
        if any(p.family == family for p in probes):
            parts.append(f"{family}: " + ", ".join(moved) if moved else f"{family} unchanged within CI")
    return "; ".join(parts)


def compare(
    base: Target,
    tuned: Target,
    *,
    families: Sequence[str] = FAMILIES,
    qa: Path | None = None,
    text: Path | None = None,
    prompts: Path | None = None,
    safety: bool = True,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """Every probe on both models over the same items: values with intervals and each delta's paired interval."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise LmforgeError(f"--probes {','.join(unknown)}: expected {' or '.join(FAMILIES)}")
    probes = default_probes(families, qa=qa, text=text, prompts=prompts, safety=safety)
    runs: dict[tuple[str, Path | None, str], Measured] = {}

    def measured(task: str, data: Path | None, which: str, target: Target) -> Measured:
        key = (task, data, which)
        if key not in runs:  # one run per task and file serves every probe that reads it
            _, runs[key] = run_task(task, target, data, limit=limit, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, check_contamination=False)  # fmt: skip
        return runs[key]

    rows = []
    for probe in probes:
        a = measured(probe.task, probe.data, "base", base)
        b = measured(probe.task, probe.data, "tuned", tuned)
        stat = a.stats.get(probe.metric)
        va, vb = np.asarray(a.items[probe.metric]), np.asarray(b.items[probe.metric])
        rows.append({
            "name": probe.name, "family": probe.family, "task": probe.task, "metric": probe.metric,
            "data": str(probe.data) if probe.data else "lmforge safety probes", "n": len(va),
            "base": bootstrap(va, stat), "tuned": bootstrap(vb, stat), "delta": paired_delta(va, vb, stat),
        })  # fmt: skip
    return {
        "kind": "compare",
        "base": {"model": str(base.model), "adapter": str(base.adapter) if base.adapter else None},
        "tuned": {"model": str(tuned.model), "adapter": str(tuned.adapter) if tuned.adapter else None},
        "probes": rows,
        "reading": reading(rows, probes, families),
    }


def table(result: dict[str, Any]) -> list[list[str]]:
    """The comparison as rows of text: probe, family, base, tuned, delta with their intervals."""

    def cell(v: dict[str, Any], points: bool) -> str:
        if math.isnan(v["value"]):
            return "-"
        k = 100 if points else 1
        return f"{k * v['value']:.3g} [{k * v['ci95'][0]:.3g}, {k * v['ci95'][1]:.3g}]"

    out = []
    for r in result["probes"]:
        points = r["metric"] != "perplexity"
        name = r["name"] + (" (%)" if points else "")
        out.append(
            [name, r["family"], cell(r["base"], points), cell(r["tuned"], points), cell(r["delta"], points)]
        )
    return out
