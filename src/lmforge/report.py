"""`lmforge report`: runs, evaluations and comparisons on one self-contained HTML page.

Each input is read for what it holds (`read_input`): a run directory (config.yaml with metrics.jsonl or
results.json, and the model/ or adapter/ it wrote), a model or adapter directory (lmforge.json, and any
evals/*.json beside it), an eval result JSON (`"kind": "eval"`) or a comparison JSON (`"kind": "compare"`). The
page has five sections — overview, training, evaluations, forgetting, knowledge vs behaviour — each rendered
even when it has nothing to show (one line says so). Plots are matplotlib PNGs (Agg, no pyplot state) embedded
as base64 data URIs and the CSS is inline, so the file opens offline and names no external URL; there is no
JavaScript. Keys a reader does not know are ignored, and a missing optional one only leaves its piece out.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge import __version__
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

SECTIONS = {
    "overview": "Overview",
    "training": "Training",
    "evaluations": "Evaluations",
    "forgetting": "Forgetting",
    "knowledge-vs-behaviour": "Knowledge vs behaviour",
}
"""Each section's element id and heading, in page order."""


@dataclass(frozen=True)
class SectionTable:
    """A section a caller adds after the report's own (the demo's measured sections): its element id, heading,
    a table of text cells and the lines that read it."""

    id: str
    title: str
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    readings: list[str] = field(default_factory=list)


FAMILIES = ("knowledge", "behaviour")  # a comparison's probe families, in plot order; others follow

# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class Doc:
    """An eval result or comparison JSON: where it was read and what it holds."""

    path: Path
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        """The document's kind: eval or compare."""
        return self.data["kind"]


@dataclass
class Run:
    """A run directory: its metric records, results.json, the lineage of the model or adapter it wrote."""

    path: Path
    records: list[dict[str, Any]]
    results: dict[str, Any]
    lineage: dict[str, Any]
    output: Path | None
    date: str | None


@dataclass
class ModelDir:
    """A model or adapter directory given on its own (its evals/ are read into the report's docs)."""

    path: Path
    kind: str  # "model" or "adapter"
    lineage: dict[str, Any]


@dataclass
class Inputs:
    """Everything the report shows, in the order the inputs were given (evals/ files after their owner)."""

    runs: list[Run] = field(default_factory=list)
    models: list[ModelDir] = field(default_factory=list)
    docs: list[Doc] = field(default_factory=list)
    given: list[tuple[Path, str]] = field(default_factory=list)  # (path, what it was read as)


def _json_file(path: Path) -> Any:
    """A JSON file's value, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and any(
        (path / name).is_file() for name in ("metrics.jsonl", "results.json")
    )


def _model_kind(path: Path) -> str | None:
    """What a directory lmforge or Hugging Face wrote holds: an adapter, a model, or None for neither."""
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file() or (path / "lmforge.json").is_file():
        return "model"
    return None


def _doc(path: Path) -> Doc | None:
    """The eval or comparison document in a JSON file, or None when it is neither."""
    data = _json_file(path)
    if isinstance(data, dict) and data.get("kind") in ("eval", "compare"):
        return Doc(path, data)
    return None


def _mtime(path: Path) -> str | None:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
    except OSError:
        return None


def read_run(path: Path) -> Run:
    """A run directory as the report shows it (a run still going, with no results.json yet, reads too)."""
    from lmforge.train.reporting import read_metrics

    output = next((path / name for name in ("model", "adapter") if (path / name).is_dir()), None)
    results = _json_file(path / "results.json")
    lineage = _json_file(output / "lmforge.json") if output is not None else None
    ended = path / "results.json" if (path / "results.json").is_file() else path / "metrics.jsonl"
    return Run(path, read_metrics(path / "metrics.jsonl"), results if isinstance(results, dict) else {},
               lineage if isinstance(lineage, dict) else {}, output, _mtime(ended))  # fmt: skip


def _evals_of(directory: Path | None) -> list[Doc]:
    """The eval and comparison JSONs in DIRECTORY/evals (other JSON files there are skipped, with a warning)."""
    if directory is None or not (directory / "evals").is_dir():
        return []
    docs = []
    for path in sorted((directory / "evals").glob("*.json")):
        if (doc := _doc(path)) is not None:
            docs.append(doc)
        else:
            log.warning("%s: not an eval or comparison JSON, left out of the report", path)
    return docs


def read_inputs(paths: Sequence[Path]) -> Inputs:
    """Read every input, deciding by content what each is; a path that is none of them is an error naming it."""
    inputs = Inputs()
    seen: set[Path] = set()  # a doc reached twice (given, and in a model's evals/) is shown once

    def add_docs(docs: Iterable[Doc]) -> None:
        for doc in docs:
            if doc.path.resolve() not in seen:
                seen.add(doc.path.resolve())
                inputs.docs.append(doc)

    for path in map(Path, paths):
        if not path.exists():
            raise LmforgeError(f"{path}: no such file or directory")
        if path.is_dir() and _is_run(path):
            run = read_run(path)
            inputs.runs.append(run)
            inputs.given.append((path, "run"))
            add_docs(_evals_of(run.output))
        elif path.is_dir() and (kind := _model_kind(path)) is not None:
            lineage = _json_file(path / "lmforge.json")
            inputs.models.append(ModelDir(path, kind, lineage if isinstance(lineage, dict) else {}))
            inputs.given.append((path, kind))
            add_docs(_evals_of(path))
        elif path.is_file() and (doc := _doc(path)) is not None:
            inputs.given.append((path, doc.kind))
            add_docs([doc])
        else:
            raise LmforgeError(
                f"{path}: not a run directory (config.yaml + metrics.jsonl), a model or adapter directory, an "
                'eval result JSON ("kind": "eval") or a comparison JSON ("kind": "compare")'
            )
    return inputs


# ------------------------------------------------------------------------------------------------ numbers


def _number(x: Any) -> float | None:
    """x as a finite float, or None (missing, NaN, not a number)."""
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return None
    return float(x)


def _fmt(x: Any, signed: bool = False) -> str:
    v = _number(x)
    if v is None:
        return "–"
    if isinstance(x, int) and not signed:
        return f"{x:,}"
    if abs(v) >= 1e4:  # throughput, token counts: 14,894 rather than 1.489e+04
        return f"{v:+,.0f}" if signed else f"{v:,.0f}"
    return f"{v:+.4g}" if signed else f"{v:.4g}"


def _bounds(ci: Any) -> tuple[float, float] | None:
    """A 95% interval [low, high] as two floats, or None when it is missing or not two finite numbers."""
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_number(c) is not None for c in ci):
        return float(ci[0]), float(ci[1])
    return None


def _ci(ci: Any, signed: bool = False) -> str:
    bounds = _bounds(ci)
    return "–" if bounds is None else f"[{_fmt(bounds[0], signed)}, {_fmt(bounds[1], signed)}]"


def _point(x: Any) -> dict[str, Any]:
    """A measured value in the schemas' shapes — {"value", "ci95", "n"}, a results.json interval {"accuracy",
    ...}, or a bare number — as {"value", "ci95", "n"} (missing pieces None)."""
    if isinstance(x, dict):
        value = x.get("value", x.get("accuracy"))
        return {"value": _number(value), "ci95": x.get("ci95"), "n": x.get("n")}
    return {"value": _number(x), "ci95": None, "n": None}


def _intervals(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every interval record ({..., "ci95"}) in a run's results, labelled by where it sits: qa · before · A,
    held_out · by_subset · terse, eval · win_rate."""
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(x: Any, where: list[str]) -> None:
        if not isinstance(x, dict):
            return
        if "ci95" in x:
            found.append((" · ".join(where) or "result", _point(x)))
            return
        for key, value in x.items():
            name = key.removesuffix("_interval")
            walk(value, where if name in ("interval", "intervals") else [*where, name])

    walk(results, [])
    return found


# ------------------------------------------------------------------------------------------------ plots


def _png(fig: Figure) -> str:
    """A figure as a data: URI of its PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(width: float, height: float) -> Figure:
    # Imported here: matplotlib takes ~0.5 s to import. A bare Agg-backed Figure: no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def run_loss_figure(run: Run) -> Figure:
    """The run's loss curve: the same figure the run itself wrote as loss.png (`loss_figure`)."""
    from lmforge.train.reporting import loss_figure

    baseline = _number(run.results.get("unigram_baseline"))
    # The level the run's own loss.png draws: pretraining's unigram entropy (clm, mlm; not mlm+nsp's sum).
    baselines = (
        {"unigram baseline": baseline}
        if baseline and run.results.get("objective") in ("clm", "mlm")
        else None
    )
    return loss_figure(run.records, title=f"{run.path.name}: {_stage(run)}", baselines=baselines)


def forgetting_figure(rows: list[tuple[str, float, float, float]]) -> Figure:
    """Reference perplexity before → after each run ({label, before, after, increase %}): a dumbbell per run,
    the after dot red when it rose, green when it fell."""
    fig = _figure(8, 1.2 + 0.55 * len(rows))
    ax = fig.add_subplot()
    for y, (_, before, after, pct) in enumerate(rows):
        colour = "C3" if after > before else "C2"
        ax.plot([before, after], [y, y], color="0.6", lw=2, zorder=1)
        ax.scatter([before], [y], color="0.35", zorder=2, label="before" if y == 0 else None)
        ax.scatter([after], [y], color=colour, zorder=3, label="after" if y == 0 else None)
        ax.annotate(f"{pct:+.2f}%", (max(before, after), y), xytext=(8, 0), textcoords="offset points",
                    va="center", fontsize=9, color=colour)  # fmt: skip
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.invert_yaxis()  # the first run on top, as in the table
    ax.margins(x=0.15)
    ax.set_xlabel("reference perplexity (before → after)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # outside: never over a dot
    fig.tight_layout()
    return fig


def _family(probe: dict[str, Any]) -> str:
    return str(probe.get("family") or "other")


def _family_order(probe: dict[str, Any]) -> tuple[int, str]:
    """Knowledge probes first, then behaviour, then any other family (by name)."""
    family = _family(probe)
    return (FAMILIES.index(family) if family in FAMILIES else len(FAMILIES), family)


def _delta(probe: dict[str, Any]) -> dict[str, Any]:
    """A probe's delta as {"value", "ci95", "n"}: given, or tuned − base without an interval."""
    delta = _point(probe.get("delta"))
    if delta["value"] is None:
        base, tuned = _point(probe.get("base"))["value"], _point(probe.get("tuned"))["value"]
        if base is not None and tuned is not None:
            delta = {"value": tuned - base, "ci95": None, "n": None}
    return delta


def delta_figure(probes: list[dict[str, Any]], title: str) -> Figure:
    """Each probe's tuned − base delta with its 95% interval, grouped by family (knowledge, then behaviour), with
    the zero line: a delta whose whisker crosses it is no change within the interval."""
    plotted = [(p, d) for p in sorted(probes, key=_family_order) if (d := _delta(p))["value"] is not None]
    families = list(dict.fromkeys(_family(p) for p, _ in plotted))
    fig = _figure(8, 1.4 + 0.45 * max(len(plotted), 1))
    ax = fig.add_subplot()
    ax.axvline(0, color="0.3", lw=1, ls="--")
    for y, (probe, delta) in enumerate(plotted):
        family = _family(probe)
        first = y == 0 or _family(plotted[y - 1][0]) != family
        if first and y > 0:
            ax.axhline(y - 0.5, color="0.85", lw=1)  # a rule between families
        bounds = _bounds(delta["ci95"])
        err = None if bounds is None else [[delta["value"] - bounds[0]], [bounds[1] - delta["value"]]]
        ax.errorbar([delta["value"]], [y], xerr=err, fmt="o", capsize=4, color=f"C{families.index(family)}",
                    label=family if first else None)  # fmt: skip
    if plotted:
        ax.set_yticks(range(len(plotted)), [str(p.get("name", "?")) for p, _ in plotted])
        ax.set_ylim(-0.7, len(plotted) - 0.3)
        ax.invert_yaxis()  # the first probe on top, as in the table
        ax.legend(loc="best", fontsize=8)
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no probe has a delta", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("delta (tuned − base), 95% interval")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------ HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330; background: #fafbfc; }
header { background: #1d2330; color: #fff; padding: 1rem 2rem; }
header h1 { margin: 0 0 .3rem; font-size: 1.5rem; }
header p { margin: 0; color: #c7cdd8; font-size: .9rem; }
nav a { color: #9cc3ff; margin-right: 1rem; font-size: .9rem; }
main { max-width: 1000px; margin: 0 auto; padding: 1rem 2rem 3rem; }
section { background: #fff; border: 1px solid #e1e4e8; border-radius: 6px; padding: .5rem 1.5rem 1rem; margin: 1.2rem 0; }
h2 { border-bottom: 1px solid #e1e4e8; padding-bottom: .3rem; }
h3 { margin: 1.2rem 0 .4rem; font-size: 1.05rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #e1e4e8; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0; }
.empty { color: #6a737d; font-style: italic; }
.meta { color: #586069; font-size: .85rem; margin: .2rem 0; }
.flag { color: #b31d28; font-weight: 600; }
.reading { font-size: 1rem; background: #f1f8ff; border-left: 4px solid #0366d6; padding: .4rem .8rem; }
code { font-size: .85rem; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Iterable[int] = ()) -> str:
    """An HTML table; cells are escaped text, the `numeric` columns right-aligned."""
    right = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in right else ''}>{_e(c)}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">'


def _empty(text: str) -> str:
    return f'<p class="empty">{_e(text)}</p>'


def _stage(run: Run) -> str:
    """What the run was: its stage and variant ("pretrain clm", "finetune chat/lora")."""
    lineage = {**run.results, **run.lineage}
    variant = "/".join(str(lineage[k]) for k in ("objective", "kind", "method") if k in lineage)
    return f"{lineage.get('stage', 'run')} {variant}".strip()


def _parent(run: Run) -> str | None:
    return run.lineage.get("parent") or run.results.get("parent") or run.results.get("base")


def _model_of(data: dict[str, Any]) -> str:
    """A model (+ adapter) of an eval or comparison document, in words."""
    if not isinstance(data, dict):
        return "–"
    model, adapter = data.get("model"), data.get("adapter")
    return f"{model} + {adapter}" if adapter else str(model or "–")


def _key(path: Any) -> str:
    """A path as lineage compares it (resolved against the current directory, as the runs wrote it)."""
    return str(Path(str(path)).resolve()) if not str(path).startswith("preset:") else str(path)


def _chains(edges: list[tuple[str, str]]) -> list[list[str]]:
    """Lineage edges (parent, child) joined into chains from the oldest ancestor to each leaf."""
    parent_of = {_key(child): parent for parent, child in edges}
    name = {_key(child): child for _, child in edges}
    parents = {_key(parent) for parent, _ in edges}
    chains = []
    for key, child in name.items():
        if key in parents:
            continue  # not a leaf: a longer chain shows it
        chain, at = [child], key
        while at in parent_of and len(chain) <= len(edges):  # the bound guards a cyclic lineage
            parent = parent_of[at]
            chain.insert(0, name.get(_key(parent), parent))
            at = _key(parent)
        chains.append(chain)
    return chains


def overview_section(inputs: Inputs) -> tuple[str, int]:
    """The inputs (what each was read as, model, lineage, date) and the lineage chains parent → child."""
    rows, edges = [], []
    for run in inputs.runs:
        child = str(run.output) if run.output is not None else str(run.path)
        if (parent := _parent(run)) is not None:
            edges.append((str(parent), child))
        rows.append((run.path, "run", _stage(run), f"{parent or '–'} → {child}", run.date or "–"))
    for model in inputs.models:
        if (parent := model.lineage.get("parent")) is not None:
            edges.append((str(parent), str(model.path)))
        stage = " ".join(str(model.lineage[k]) for k in ("stage", "method") if k in model.lineage)
        rows.append((model.path, model.kind, stage or "–", f"{parent or '–'} → {model.path}", "–"))
    for doc in inputs.docs:
        d = doc.data
        if doc.kind == "eval":
            what, models = f"eval {d.get('task', '')}".strip(), _model_of(d)
        else:
            what, models = "comparison", f"{_model_of(d.get('base'))} vs {_model_of(d.get('tuned'))}"
        rows.append((doc.path, doc.kind, what, models, d.get("date") or "–"))
    if not rows:
        return _empty("No inputs."), 0
    parts = [_table(("input", "read as", "what", "model / lineage (parent → child)", "date"), rows)]
    chains = [c for c in _chains(edges) if len(c) > 1]
    if chains:
        parts.append(
            "<h3>Lineage</h3><ul>" + "".join(f"<li>{_e(' → '.join(c))}</li>" for c in chains) + "</ul>"
        )
    return "".join(parts), len(rows)


def training_section(runs: list[Run]) -> tuple[str, int]:
    """A loss curve per run (train loss, val loss, learning rate) and its steps, tokens and throughput."""
    if not runs:
        return _empty("No run directories given: no loss curves."), 0
    parts = []
    for run in runs:
        r, records = run.results, run.records
        train = [x for x in records if "loss" in x]
        val = [x for x in records if "val_loss" in x]
        rates = [x["tokens_per_s"] for x in train if _number(x.get("tokens_per_s")) is not None]
        stats = [
            ("steps", r.get("steps", train[-1]["step"] + 1 if train else None)),
            ("tokens", r.get("tokens", train[-1].get("tokens") if train else None)),
            ("tokens/s", r.get("tokens_per_s", sum(rates) / len(rates) if rates else None)),
            ("train loss (last)", r.get("train_loss", train[-1]["loss"] if train else None)),
            ("val loss before", r.get("val_loss_before")),
            ("val loss (last)", r.get("val_loss", val[-1]["val_loss"] if val else None)),
            ("MFU", r.get("mfu")),
            ("peak memory (MB)", r.get("peak_memory_mb")),
        ]
        parts.append(f"<h3>{_e(run.path)} <small>({_e(_stage(run))})</small></h3>")
        parts.append(_img(_png(run_loss_figure(run)), f"loss curve of {run.path}"))
        parts.append(_table(("", "value"), [(k, _fmt(v)) for k, v in stats if v is not None], numeric=(1,)))
    return "".join(parts), len(runs)


def _contamination(c: Any) -> str:
    if not isinstance(c, dict):
        return ""
    flagged = c.get("flagged", 0)
    items = c.get("items") or []
    line = f'<p class="{"flag" if flagged else "meta"}">contamination: {_e(flagged)} item(s) flagged</p>'
    if items:
        shown = [
            json.dumps(i, ensure_ascii=False, default=str) if not isinstance(i, str) else i
            for i in items[:10]
        ]
        more = f"<li>… and {len(items) - 10} more</li>" if len(items) > 10 else ""
        line += "<ul>" + "".join(f"<li><code>{_e(s[:300])}</code></li>" for s in shown) + more + "</ul>"
    return line


def evaluations_section(docs: list[Doc], runs: list[Run]) -> tuple[str, int]:
    """One table per eval JSON (metric, value, 95% CI, n; contamination flags), then the intervals each run
    measured itself (QA before/after, held-out preference accuracy, win rates)."""
    parts, tables = [], 0
    for doc in (d for d in docs if d.kind == "eval"):
        d = doc.data
        metrics = d.get("metrics") if isinstance(d.get("metrics"), dict) else {}
        meta = [f"model {_model_of(d)}"] + [
            f"{k} {d[k]}" for k in ("data", "n", "seconds", "date") if d.get(k) is not None
        ]
        parts.append(f"<h3>{_e(d.get('task', 'eval'))} <small>({_e(doc.path)})</small></h3>")
        parts.append(f'<p class="meta">{_e(" · ".join(meta))}</p>')
        if metrics:
            rows = []
            for name, m in metrics.items():
                p = _point(m)
                rows.append(
                    (
                        name,
                        _fmt(p["value"]),
                        _ci(p["ci95"]),
                        _fmt(p["n"] if p["n"] is not None else d.get("n")),
                    )
                )
            parts.append(_table(("metric", "value", "95% CI", "n"), rows, numeric=(1, 3)))
        else:
            parts.append(_empty("No metrics in this file."))
        parts.append(_contamination(d.get("contamination")))
        tables += 1
    for run in runs:
        found = _intervals(run.results)
        if found:
            parts.append(f"<h3>{_e(run.path)} <small>({_e(_stage(run))}, results.json)</small></h3>")
            rows = [(name, _fmt(p["value"]), _ci(p["ci95"]), _fmt(p["n"])) for name, p in found]
            parts.append(_table(("metric", "value", "95% CI", "n"), rows, numeric=(1, 3)))
            tables += 1
    if not tables:
        return _empty("No evaluation results given (eval JSONs, or runs that measured intervals)."), 0
    return "".join(parts), tables


def forgetting_section(runs: list[Run]) -> tuple[str, int]:
    """Reference perplexity before → after per run that measured it, with the increase in per cent."""
    rows, table, skipped = [], [], []
    for run in runs:
        f = run.results.get("forgetting")
        if not isinstance(f, dict):
            continue
        before, after = _number(f.get("perplexity_before")), _number(f.get("perplexity_after"))
        if before is None or after is None:
            skipped.append(f"{run.path}: {f.get('skipped', 'not measured')}")
            continue
        pct = _number(f.get("increase_pct"))
        pct = 100 * (after / before - 1) if pct is None else pct
        rows.append((run.path.name, before, after, pct))
        gate = f.get("max_increase_pct")
        table.append((run.path, f.get("reference", "–"), _fmt(before), _fmt(after), f"{pct:+.2f}%",
                      "–" if gate is None else f"{_fmt(gate)}%"))  # fmt: skip
    if not rows and not skipped:
        return _empty(
            "No run measured forgetting (pretraining runs do not; fine-tuning and alignment do)."
        ), 0
    parts = []
    if rows:
        parts.append(_img(_png(forgetting_figure(rows)), "reference perplexity before and after each run"))
        header = ("run", "reference", "perplexity before", "perplexity after", "increase", "gate")
        parts.append(_table(header, table, numeric=(2, 3, 4, 5)))
    if skipped:
        parts.append("<ul>" + "".join(f'<li class="empty">{_e(s)}</li>' for s in skipped) + "</ul>")
    return "".join(parts), len(rows)


def knowledge_behaviour_section(docs: list[Doc]) -> tuple[str, int]:
    """Per comparison: each probe's delta with its interval by family (plot), the reading, and the table."""
    compares = [d for d in docs if d.kind == "compare"]
    if not compares:
        return _empty("No comparison JSONs given (lmforge eval compare BASE TUNED --json)."), 0
    parts = []
    for doc in compares:
        d = doc.data
        probes = [p for p in d.get("probes") or [] if isinstance(p, dict)]
        title = f"{_model_of(d.get('base'))} → {_model_of(d.get('tuned'))}"
        parts.append(f"<h3>{_e(title)} <small>({_e(doc.path)})</small></h3>")
        if d.get("reading"):
            parts.append(f'<p class="reading">{_e(d["reading"])}</p>')
        if not probes:
            parts.append(_empty("No probes in this comparison."))
            continue
        parts.append(_img(_png(delta_figure(probes, title)), f"probe deltas of {title}"))
        rows = []
        for p in sorted(probes, key=_family_order):
            base, tuned, delta = _point(p.get("base")), _point(p.get("tuned")), _delta(p)
            rows.append((p.get("name", "?"), _family(p), p.get("metric", "–"), _fmt(p.get("n")),
                         _fmt(base["value"]), _ci(base["ci95"]), _fmt(tuned["value"]), _ci(tuned["ci95"]),
                         _fmt(delta["value"], signed=True), _ci(delta["ci95"], signed=True)))  # fmt: skip
        header = ("probe", "family", "metric", "n", "base", "base 95% CI", "tuned", "tuned 95% CI", "delta",
                  "delta 95% CI")  # fmt: skip
        parts.append(_table(header, rows, numeric=(3, 4, 6, 8)))
    return "".join(parts), len(compares)


def render(inputs: Inputs, extra: Sequence[SectionTable] = ()) -> tuple[str, dict[str, int]]:
    """The page's HTML and each section's count of items (0: the section says it has none); `extra` sections
    follow the report's own."""
    titles = {**SECTIONS, **{t.id: t.title for t in extra}}
    bodies = {
        "overview": overview_section(inputs),
        "training": training_section(inputs.runs),
        "evaluations": evaluations_section(inputs.docs, inputs.runs),
        "forgetting": forgetting_section(inputs.runs),
        "knowledge-vs-behaviour": knowledge_behaviour_section(inputs.docs),
        **{t.id: (_table(t.header, t.rows) + "".join(f'<p class="reading">{_e(r)}</p>' for r in t.readings),
                  len(t.rows)) for t in extra},
    }  # fmt: skip
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in titles.items())
    sections = "\n".join(
        f'<section id="{sid}"><h2>{_e(title)}</h2>{bodies[sid][0]}</section>' for sid, title in titles.items()
    )
    made = datetime.now().isoformat(timespec="seconds")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request: the page loads nothing from anywhere
        f"<title>lmforge report</title><style>{CSS}</style></head>\n<body><header><h1>lmforge report</h1>"
        f"<p>{len(inputs.given)} input(s) · written {_e(made)} by lmforge {_e(__version__)}</p><nav>{nav}</nav>"
        f"</header>\n<main>\n{sections}\n</main></body></html>\n"
    )
    return page, {sid: count for sid, (_, count) in bodies.items()}


def build_report(inputs: Sequence[Path], out: Path, extra: Sequence[SectionTable] = ()) -> dict[str, Any]:
    """Read `inputs`, write the report page to `out` atomically (with the `extra` sections after the report's
    own); returns {out, inputs, bytes, sections}."""
    read = read_inputs(inputs)  # every input checked before anything is written
    page, counts = render(read, extra)
    out = Path(out)
    atomic_write(out, page)
    return {"out": str(out), "inputs": len(read.given), "bytes": len(page.encode()), "sections": counts}
