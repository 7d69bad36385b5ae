"""Lineage: where a model came from, read back from the `lmforge.json` every stage writes beside its output.

Each output directory (a HF model dir, or an adapter dir) holds `lmforge.json`: its parent (a model directory or
`preset:NAME`; a merge also names its adapter), the datasets it trained on (manifest ids and where they were), the
parent's weights fingerprint, the config and its hash, the code version and the results. `trace` walks the
parents from a model to its roots and checks what changed since: a parent whose weights fingerprint is no longer
the recorded one, a dataset whose manifest id at its recorded path is another. `find_runs` lists the runs under a
directory; `Lineage.mermaid` and `plot_lineage` draw the graph (matplotlib boxes and arrows: no graphviz).

Recorded paths are as the training command was given them: absolute, or relative to its working directory. A
relative one is looked up beside the child first (under each of its ancestor directories, so a project that
moved still resolves), then under the current directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.errors import LmforgeError
from lmforge.fileio import cache_dir, replace_atomically
from lmforge.inspect import ADAPTER_DIR, RUN_CONFIG
from lmforge.model.hf import read_json_object
from lmforge.train.checkpoint import CHECKPOINTS, MODEL_DIR

LINEAGE_FILE = "lmforge.json"
EVALS_DIR = "evals"  # MODEL_DIR/evals/*.json: `lmforge eval --record` results
RESULTS_FILE = "results.json"
PRESET = "preset:"
_DATASET_ID = re.compile(r"[0-9a-f]{64}")  # a prepared dataset's manifest id (sha256)
_COMMIT = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # sha1 or sha256 object names
# Directories `find_runs` never enters: checkpoints repeat their run's lineage; the rest hold no runs.
_SKIP_DIRS = {CHECKPOINTS, EVALS_DIR, "__pycache__", "node_modules", "site-packages"}
EXPECTED = (
    f"expected a model or adapter directory written by an lmforge stage (with {LINEAGE_FILE}), or its run "
    f"directory ({RUN_CONFIG} and {MODEL_DIR}/ or {ADAPTER_DIR}/)"
)


# ------------------------------------------------------------------------------------- what a stage records


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a config's canonical JSON (sorted keys, no spaces): equal hashes, equal configs."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def code_version() -> dict[str, str | None]:
    """lmforge's version and, when it runs from a git checkout, the commit checked out (else None)."""
    return {"lmforge": __version__, "git_commit": _git_commit(Path(__file__).resolve().parent)}


def _git_commit(package: Path) -> str | None:
    """The commit HEAD names in the git checkout holding `package`, read from .git's files (no `git` process to
    fail or hang); None for an installed package or anything unreadable."""
    if {"site-packages", "dist-packages"} & set(package.parts):
        return None  # an installed copy inside some project's venv is not that project's code
    top = next((p for p in package.parents if (p / ".git").exists()), None)
    if top is None:
        return None
    try:
        git = top / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            git = (top / git.read_text(encoding="utf-8").strip().removeprefix("gitdir:").strip()).resolve()
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        if not head.startswith("ref:"):
            return head if _COMMIT.fullmatch(head) else None  # a detached HEAD holds the commit itself
        ref = head.removeprefix("ref:").strip()
        roots = [git]
        if (git / "commondir").is_file():  # a worktree keeps its branches in the main repository
            roots.append((git / (git / "commondir").read_text(encoding="utf-8").strip()).resolve())
        for root in roots:
            if (root / ref).is_file():
                sha = (root / ref).read_text(encoding="utf-8").strip()
                return sha if _COMMIT.fullmatch(sha) else None
            if (root / "packed-refs").is_file():
                for line in (root / "packed-refs").read_text(encoding="utf-8").splitlines():
                    sha, _, name = line.partition(" ")
                    if name == ref and _COMMIT.fullmatch(sha):
                        return sha
    except (OSError, UnicodeDecodeError):
        return None
    return None  # a branch without commits yet


def provenance(
    parent: str, data: list[str], config: dict[str, Any], recorded: dict[str, Any]
) -> dict[str, Any]:
    """The lineage fields the stage runner adds to a stage's own (`recorded`): the datasets with their paths, the
    parent's weights fingerprint (unless the stage recorded it), the config hash and the code version."""
    fields: dict[str, Any] = {
        "datasets": dataset_records(data, config),
        "config_hash": config_hash(config),
        "code_version": code_version(),
    }
    if "base_fingerprint" not in recorded and not parent.startswith(PRESET) and Path(parent).is_dir():
        from lmforge.model.hf import weights_fingerprint

        fields["base_fingerprint"] = weights_fingerprint(parent)
    return fields


def dataset_records(ids: list[str], config: dict[str, Any]) -> list[dict[str, Any]]:
    """Where each trained-on dataset lives, as the run sees it: [{"id", "path"}], from the prepared directories
    its config names, else the cache raw sources are prepared into (with "source": the raw inputs). An entry of
    `ids` that is no manifest id (RL's prompt file) is a path, with "id" None."""
    found = {m["id"]: (path, m) for path in _config_data_paths(config) if (m := manifest_of(Path(path)))}
    root = cache_dir()
    if root is not None and any(_DATASET_ID.fullmatch(i) and i not in found for i in ids):
        for path in sorted((root / "prepared").glob("*")):
            if (m := manifest_of(path)) and m["id"] not in found:
                found[m["id"]] = (str(path), m | {"cached": True})
    records: list[dict[str, Any]] = []
    for entry in ids:
        if not _DATASET_ID.fullmatch(entry):
            records.append({"id": None, "path": entry})
            continue
        path, manifest = found.get(entry, (None, {}))
        record: dict[str, Any] = {"id": entry, "path": path}
        if manifest.get("cached"):
            record["source"] = [str(p) for p in (manifest.get("config") or {}).get("inputs") or []]
        records.append(record)
    return records


def _config_data_paths(config: dict[str, Any] | None) -> list[str]:
    """Every string in a run config's `data` section (dataset, datasets, prompts, tokenizer...): the candidates."""
    found: list[str] = []
    stack: list[Any] = [(config or {}).get("data") or {}]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend(reversed(value))
    return found


def manifest_of(path: Path) -> dict[str, Any] | None:
    """A directory's manifest.json when it holds one with an id (a prepared dataset), else None; never raises."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and isinstance(manifest.get("id"), str)
    return manifest if ok else None


# ------------------------------------------------------------------------------------------- reading back


def find_output(path: str | Path) -> Path:
    """The directory holding `lmforge.json` that `path` names: itself, or its run directory's model/ or adapter/."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"{path}: no such directory; {EXPECTED}")
    if path.is_file():
        hint = f"; give its directory {path.parent}" if path.name == LINEAGE_FILE else ""
        raise LmforgeError(f"{path}: is a file; {EXPECTED}{hint}")
    if (path / LINEAGE_FILE).is_file():
        return path
    outputs = [path / name for name in (MODEL_DIR, ADAPTER_DIR) if (path / name / LINEAGE_FILE).is_file()]
    if len(outputs) == 1:
        return outputs[0]
    if outputs:
        raise LmforgeError(f"{path}: holds both {outputs[0]} and {outputs[1]}: give the one you mean")
    if (path / RUN_CONFIG).is_file():
        raise LmforgeError(
            f"{path}: a run directory without a finished output ({MODEL_DIR}/ or {ADAPTER_DIR}/ with "
            f"{LINEAGE_FILE}): the run has not finished, or failed before writing it"
        )
    raise LmforgeError(f"{path}: no {LINEAGE_FILE} (not written by an lmforge stage); {EXPECTED}")


def read_record(output: str | Path) -> dict[str, Any]:
    """The `lmforge.json` of an output directory."""
    return read_json_object(Path(output) / LINEAGE_FILE)


def resolve_path(recorded: str, beside: Path) -> Path | None:
    """Where a recorded path is now: an absolute one as is; a relative one under `beside` or one of its
    ancestors (the directory training ran in, wherever the project now is), else under the current
    directory; None when it is nowhere."""
    path = Path(recorded).expanduser()
    if path.is_absolute():
        return path if path.exists() else None
    here = Path(beside).resolve()
    for base in (here, *here.parents, Path.cwd()):
        if (base / path).exists():
            return base / path
    return None


def recorded_datasets(record: dict[str, Any], beside: Path) -> list[dict[str, Any]]:
    """The datasets a record says its stage trained on ([{"id", "path"}]): its `datasets`, or, for a record
    written before lmforge kept them, its `data` ids matched to the prepared directories its config names."""
    if isinstance(record.get("datasets"), list):
        return [d for d in record["datasets"] if isinstance(d, dict)]
    ids = [i for i in record.get("data") or [] if isinstance(i, str)]
    found: dict[str, str] = {}
    for candidate in _config_data_paths(record.get("config")):
        where = resolve_path(candidate, beside)
        if where is not None and (m := manifest_of(where)):
            found.setdefault(m["id"], candidate)
    records = [
        {"id": i, "path": found.get(i)} if _DATASET_ID.fullmatch(i) else {"id": None, "path": i} for i in ids
    ]
    unplaced = [r for r in records if r["id"] and r["path"] is None]
    source = ((record.get("config") or {}).get("data") or {}).get("dataset")
    if len(unplaced) == 1 and isinstance(source, str) and source not in found.values():
        unplaced[0]["source"] = [
            source
        ]  # one dataset, given raw: it was prepared from that source into the cache
    return records


def dataset_label(dataset: dict[str, Any]) -> str:
    """How a recorded dataset is named to people: its path, else the raw sources it was prepared from."""
    return str(dataset.get("path") or ", ".join(map(str, dataset.get("source") or [])) or "?")


def read_evals(output: str | Path) -> list[dict[str, Any]]:
    """The evaluation records in `output/evals/*.json` (`lmforge eval --record`), by file name; a malformed
    one is an error naming it."""
    records = []
    for file in sorted((Path(output) / EVALS_DIR).glob("*.json")):
        record = read_json_object(file)
        metrics = record.get("metrics")
        if not isinstance(record.get("task"), str) or not isinstance(metrics, dict):
            raise LmforgeError(
                f"{file}: not an evaluation record (expected a 'task' name and a 'metrics' object)"
            )
        for name, metric in metrics.items():
            if not isinstance(metric, dict) or not _is_number(metric.get("value")):
                raise LmforgeError(f"{file}: metric {name!r} has no numeric 'value'")
        records.append(record | {"file": str(file)})
    return records


def variant(record: dict[str, Any]) -> str | None:
    """A record's stage variant: pretrain's objective, finetune's kind/method, align's method (as run titles say)."""
    keys = [str(record[k]) for k in ("objective", "kind", "method") if record.get(k)]
    return "/".join(keys) or None


def key_result(results: dict[str, Any] | None) -> tuple[str, float] | None:
    """The one number that says how a run went: QA accuracy, win rate, reward, validation accuracy or loss,
    else the training loss (the first a run measured)."""
    if not isinstance(results, dict):
        return None

    def at(*keys: str) -> Any:
        value: Any = results
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    candidates = [
        ("qa_accuracy", at("qa", "after", "accuracy")),
        ("win_rate", at("eval", "win_rate")),
        ("reward", at("eval", "reward_after")),
        ("val_reward_accuracy", at("val", "val_reward_accuracy")),
        ("val_accuracy", at("val", "val_accuracy")),
        ("val_loss", at("val_loss")),
        ("val_loss", at("val", "val_loss")),
        ("train_loss", at("train_loss")),
    ]
    return next(((name, float(v)) for name, v in candidates if _is_number(v) and math.isfinite(v)), None)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _date(record: dict[str, Any], file: Path) -> str:
    """When a run finished: its record's date, else (records written before lmforge kept one) the file's time."""
    if isinstance(record.get("date"), str):
        return record["date"]
    return datetime.fromtimestamp(file.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")


def display(path: Path | None) -> str | None:
    """A path as people read it: relative to the current directory when under it, else absolute."""
    if path is None:
        return None
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------- the graph


@dataclass
class Node:
    """One model in a lineage: what its child recorded, where it is now, its own record and what changed."""

    ref: str
    """The reference as recorded (a path, `preset:NAME`), or the path asked about."""
    path: Path | None
    """Where it is now; None for a preset, or a parent that is nowhere to be found."""
    kind: str
    """"model", "adapter", "directory", "preset" or "missing"."""
    record: dict[str, Any] | None = None
    """Its lmforge.json; None at a root that lmforge did not train (a preset, a downloaded model)."""
    parents: list[int] = field(default_factory=list)
    datasets: list[dict[str, Any]] = field(default_factory=list)
    """The recorded datasets, each with "status" now (same, changed, missing, unchecked) and "now" (its id)."""
    warnings: list[str] = field(default_factory=list)
    fingerprint: str | None = None
    """Its weights fingerprint now (computed once, when a child recorded one to compare)."""

    @property
    def name(self) -> str:
        """A short label: the last two path components (`sft/adapter`), or the reference."""
        if self.path is None:
            return self.ref
        parts = Path(display(self.path) or self.ref).parts
        return "/".join(parts[-2:]) if parts else self.ref

    def as_json(self, index: int) -> dict[str, Any]:
        """The node for `--json`: its reference, place, stage, data, versions, key result, parents, warnings."""
        record = self.record or {}
        key = key_result(record.get("results"))
        return {
            "id": index,
            "ref": self.ref,
            "path": display(self.path),
            "kind": self.kind,
            "stage": record.get("stage"),
            "method": variant(record),
            "datasets": self.datasets,
            "base_fingerprint": record.get("base_fingerprint"),
            "config_hash": record.get("config_hash")
            or (config_hash(record["config"]) if isinstance(record.get("config"), dict) else None),
            "code_version": record.get("code_version") or record.get("lmforge_version"),
            "seed": record.get("seed"),
            "date": record.get("date"),
            "result": {"name": key[0], "value": key[1]} if key else None,
            "parents": self.parents,
            "warnings": self.warnings,
        }


@dataclass
class Edge:
    """A parent → child link: which role the parent plays and whether its weights are still those trained on."""

    parent: int
    child: int
    role: str
    """"parent", or "adapter" (the second parent of a merge)."""
    status: str
    """"same", "changed", "missing" or "unchecked" (no fingerprint recorded, a preset, an adapter)."""


@dataclass
class Lineage:
    """A model's lineage graph: `nodes[0]` is the model asked about, then its ancestors breadth-first."""

    nodes: list[Node]
    edges: list[Edge]

    @property
    def warnings(self) -> list[str]:
        """Every warning, the model's first: parents and datasets changed or gone."""
        return [w for node in self.nodes for w in node.warnings]

    def chain(self) -> list[Node]:
        """The model, its parent, its parent's parent... to the root (first parents only)."""
        out, seen, i = [], set(), 0
        while i not in seen:
            seen.add(i)
            out.append(self.nodes[i])
            if not self.nodes[i].parents:
                break
            i = self.nodes[i].parents[0]
        return out

    def as_json(self) -> dict[str, Any]:
        """The graph as JSON: nodes (the model first), edges parent → child, the chain, every warning."""
        return {
            "model": display(self.nodes[0].path),
            "chain": [display(n.path) or n.ref for n in self.chain()],
            "nodes": [n.as_json(i) for i, n in enumerate(self.nodes)],
            "edges": [vars(e) for e in self.edges],
            "warnings": self.warnings,
        }

    def mermaid(self) -> str:
        """A Mermaid `graph TD`: models as boxes, datasets as cylinders, edges parent → child (changed ones
        labelled)."""
        lines = ["graph TD"]
        for box in self._boxes():
            text = box.label.replace('"', "#quot;").replace("\n", "<br/>")
            shape = f'[("{text}")]' if box.kind == "dataset" else f'["{text}"]'
            lines.append(f"  {box.key}{shape}")
        for arrow in self._arrows():
            label = f"|{arrow.note}|" if arrow.note else ""
            lines.append(f"  {arrow.src} -->{label} {arrow.dst}")
        # The parent or dataset that changed (or is gone) is marked, not the child trained on it.
        changed = sorted({a.src for a in self._arrows() if a.note})
        if changed:
            lines.append("  classDef warn stroke:#c00,stroke-width:2px")
            lines.append(f"  class {','.join(changed)} warn")
        return "\n".join(lines) + "\n"

    def _boxes(self) -> list[_Box]:
        boxes = []
        for i, node in enumerate(self.nodes):
            record = node.record or {}
            what = " ".join(str(x) for x in (record.get("stage"), variant(record)) if x)
            key = key_result(record.get("results"))
            lines = [node.name, what or node.kind]
            if key:
                lines.append(f"{key[0]} {key[1]:.4g}")
            boxes.append(_Box(f"n{i}", "\n".join(lines), node.kind))
        for j, (dataset, _) in enumerate(self.datasets()):
            name = Path(dataset_label(dataset).split(", ")[0]).name
            ident = (dataset.get("id") or "")[:12]
            boxes.append(_Box(f"d{j}", f"{name}\n{ident}" if ident else name, "dataset"))
        return boxes

    def _arrows(self) -> list[_Arrow]:
        arrows = [
            _Arrow(
                f"n{e.parent}",
                f"n{e.child}",
                {"changed": "weights changed", "missing": "missing"}.get(e.status),
            )
            for e in self.edges
        ]
        for j, (_, users) in enumerate(self.datasets()):
            for child, status in users:
                arrows.append(
                    _Arrow(f"d{j}", f"n{child}", status if status in ("changed", "missing") else None)
                )
        return arrows

    def datasets(self) -> list[tuple[dict[str, Any], list[tuple[int, str]]]]:
        """Each dataset recorded along the graph once (by id, else path), with the nodes that trained on it and
        its status for each."""
        found: dict[str, tuple[dict[str, Any], list[tuple[int, str]]]] = {}
        for i, node in enumerate(self.nodes):
            for d in node.datasets:
                key = d.get("id") or str(d.get("path"))
                found.setdefault(key, (d, []))[1].append((i, d.get("status", "unchecked")))
        return list(found.values())


@dataclass
class _Box:
    key: str
    label: str
    kind: str


@dataclass
class _Arrow:
    src: str
    dst: str
    note: str | None


def trace(model: str | Path) -> Lineage:
    """The lineage of a model, adapter or run directory: its parents through their `lmforge.json` up to the
    roots, with what changed since each child was trained (parent weights, datasets) in warnings."""
    start = find_output(model)
    nodes = [Node(ref=str(model), path=start, kind=_kind(start), record=read_record(start))]
    keys = {str(start.resolve()): 0}
    edges: list[Edge] = []
    queue = deque([0])
    while queue:
        i = queue.popleft()
        child = nodes[i]
        if child.record is None or child.path is None:
            continue
        child.datasets = _check_datasets(child)
        for role in ("parent", "adapter"):  # a merge has two: its base and the adapter it folded in
            ref = child.record.get(role)
            if not isinstance(ref, str) or not ref:
                continue
            where = None if ref.startswith(PRESET) else resolve_path(ref, child.path)
            key = str(where.resolve()) if where is not None else ref
            if key not in keys:
                keys[key] = len(nodes)
                nodes.append(_parent_node(ref, where))
                queue.append(keys[key])
            j = keys[key]
            child.parents.append(j)
            edges.append(Edge(j, i, role, _check_parent(nodes[j], child, role)))
    return Lineage(nodes, edges)


def _kind(path: Path) -> str:
    if (path / "adapter_config.json").is_file():
        return "adapter"
    return "model" if (path / "config.json").is_file() else "directory"


def _parent_node(ref: str, where: Path | None) -> Node:
    """A parent's node: a preset, a missing directory, or a directory with (or without) its own record."""
    if ref.startswith(PRESET):
        return Node(ref=ref, path=None, kind="preset")
    if where is None:
        return Node(ref=ref, path=None, kind="missing")
    node = Node(ref=ref, path=where, kind=_kind(where))
    if (where / LINEAGE_FILE).is_file():
        try:
            node.record = read_record(where)
        except LmforgeError as e:  # a damaged ancestor ends the walk there, it does not hide the rest
            node.warnings.append(f"{ref}: its lineage is unreadable: {e}")
    return node


def _check_parent(parent: Node, child: Node, role: str) -> str:
    """Whether `parent`'s weights are still the ones `child` recorded (a warning on the child when not)."""
    if parent.kind == "preset":
        return "unchecked"
    if parent.path is None:
        child.warnings.append(
            f"{child.name}: its {role} {parent.ref} is not found (looked beside {display(child.path)} and in "
            f"{Path.cwd()}): its lineage ends there"
        )
        return "missing"
    expected = child.record.get("base_fingerprint") if role == "parent" and child.record else None
    if not isinstance(expected, str) or parent.kind != "model":
        return "unchecked"
    if parent.fingerprint is None:
        from lmforge.model.hf import weights_fingerprint

        try:
            parent.fingerprint = weights_fingerprint(parent.path)
        except (LmforgeError, OSError) as e:
            child.warnings.append(f"{child.name}: its {role} {display(parent.path)} cannot be checked: {e}")
            return "changed"
    if parent.fingerprint == expected:
        return "same"
    child.warnings.append(
        f"{child.name}: its {role} {display(parent.path)} changed since it was trained on it (weights "
        f"fingerprint {expected[:12]} recorded, {parent.fingerprint[:12]} now)"
    )
    return "changed"


def _check_datasets(node: Node) -> list[dict[str, Any]]:
    """The node's recorded datasets, each with its status now; a warning for each one changed or gone."""
    from lmforge.data.dataset import PreparedDataset

    checked = []
    for dataset in recorded_datasets(node.record or {}, node.path or Path.cwd()):
        entry = dict(dataset)
        ident, path = entry.get("id"), entry.get("path")
        where = resolve_path(path, node.path) if isinstance(path, str) and ident else None
        if not ident or not isinstance(path, str):
            entry["status"] = "unchecked"  # a prompt file, or a dataset whose place was never recorded
        elif where is None:
            entry["status"] = "missing"
            node.warnings.append(
                f"{node.name}: its dataset {path} (id {ident[:12]}) is gone: it cannot be checked"
            )
        else:
            try:
                entry["now"] = PreparedDataset(where).id
                entry["status"] = "same" if entry["now"] == ident else "changed"
                why = f"manifest id {ident[:12]} recorded, {entry['now'][:12]} now"
            except LmforgeError as e:
                entry |= {"now": None, "status": "changed"}
                why = str(e)
            if entry["status"] == "changed":
                node.warnings.append(
                    f"{node.name}: its dataset {display(where)} changed since it was trained on it ({why})"
                )
        checked.append(entry)
    return checked


# ------------------------------------------------------------------------------------------- runs


def find_runs(root: str | Path) -> list[dict[str, Any]]:
    """Every run under `root`, oldest first: directories holding `lmforge.json` (outside checkpoints) and run
    directories (config.yaml + results.json), one entry each with its stage, method, date, key result, output."""
    root = Path(root)
    if not root.is_dir():
        raise LmforgeError(
            f"{root}: {'is a file' if root.exists() else 'no such directory'}; expected a directory"
        )
    outputs, runs = [], []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        if LINEAGE_FILE in files:
            outputs.append(Path(here))
        elif RUN_CONFIG in files and RESULTS_FILE in files:
            runs.append(Path(here))
    entries = []
    for out in outputs:
        run = (
            out.parent
            if out.name in (MODEL_DIR, ADAPTER_DIR) and (out.parent / RUN_CONFIG).is_file()
            else None
        )
        try:
            record = read_record(out)
        except LmforgeError as e:
            entries.append({"run": display(run), "output": display(out), "error": str(e)})
            continue
        entries.append(_entry(run, out, record, record.get("results"), out / LINEAGE_FILE))
    listed = {Path(e["run"]).resolve() for e in entries if e.get("run")}
    for run in runs:
        if run.resolve() not in listed:  # a run whose output has no lineage (written by an older lmforge)
            try:
                results = read_json_object(run / RESULTS_FILE)
            except LmforgeError as e:
                entries.append({"run": display(run), "output": None, "error": str(e)})
                continue
            entries.append(_entry(run, None, {}, results, run / RESULTS_FILE))
    return sorted(entries, key=lambda e: (e.get("date") or "", _written_ns(e.get("output") or e.get("run"))))


def _written_ns(path: str | None) -> int:
    """When a directory last changed (ns): orders runs that finished within the same second of their dates."""
    try:
        return Path(path).stat().st_mtime_ns if path else 0
    except OSError:
        return 0


def _entry(
    run: Path | None, out: Path | None, record: dict[str, Any], results: Any, file: Path
) -> dict[str, Any]:
    key = key_result(results)
    return {
        "run": display(run),
        "stage": record.get("stage"),
        "method": variant(record) or (variant(results) if isinstance(results, dict) else None),
        "date": _date(record, file),
        "result": {"name": key[0], "value": key[1]} if key else None,
        "parent": record.get("parent"),
        "output": display(out),
    }


def describe_run(path: str | Path) -> dict[str, Any]:
    """A run or its output for `runs show`: stage, parent, datasets, config hash, code version, date, the key
    result, the results (without sample answers), recorded evaluations and the run's files."""
    out = find_output(path)
    record = read_record(out)
    run = out.parent if (out.parent / RUN_CONFIG).is_file() else None
    key = key_result(record.get("results"))
    config = record.get("config")
    return {
        "run": display(run),
        "output": display(out),
        "kind": _kind(out),
        "stage": record.get("stage"),
        "method": variant(record),
        "date": _date(record, out / LINEAGE_FILE),
        "parent": record.get("parent"),
        "adapter": record.get("adapter"),
        "datasets": [
            f"{dataset_label(d)} ({(d.get('id') or 'no id')[:12]})" for d in recorded_datasets(record, out)
        ],
        "base_fingerprint": record.get("base_fingerprint"),
        "config_hash": record.get("config_hash")
        or (config_hash(config) if isinstance(config, dict) else None),
        "code_version": record.get("code_version") or {"lmforge": record.get("lmforge_version")},
        "seed": record.get("seed"),
        "result": {"name": key[0], "value": key[1]} if key else None,
        "results": _without_examples(record.get("results") or {}),
        "evals": {
            f"{e['task']}.{name}": m["value"] for e in read_evals(out) for name, m in e["metrics"].items()
        },
        "files": sorted(p.name for p in (run or out).iterdir() if not p.name.startswith(".")),
    }


def _without_examples(value: Any) -> Any:
    """Results without their sample answers and generated text (long lists of examples people read elsewhere)."""
    if isinstance(value, dict):
        return {k: _without_examples(v) for k, v in value.items() if k not in ("examples", "sample")}
    return value


# ------------------------------------------------------------------------------------------- the picture


def plot_lineage(lineage: Lineage, png: str | Path) -> Path:
    """The lineage graph as a PNG, written atomically: boxes (datasets grey), arrows parent → child, roots on top,
    changed parents and datasets in red."""
    # Imported here: matplotlib takes ~0.5 s to import. A bare Agg-backed Figure: no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    boxes, arrows = lineage._boxes(), lineage._arrows()
    level = {b.key: 0 for b in boxes}
    for _ in range(len(boxes)):  # longest path from the model: each parent one level above its lowest child
        moved = False
        for a in arrows:
            if level[a.src] < level[a.dst] + 1:
                level[a.src], moved = level[a.dst] + 1, True
        if not moved:
            break
    rows: dict[int, list[_Box]] = {}
    for box in boxes:
        rows.setdefault(level[box.key], []).append(box)
    width, height = max(len(r) for r in rows.values()), max(rows) + 1
    fig = Figure(figsize=(max(4.0, 3.2 * width), max(2.5, 1.5 * height)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(-0.6, height - 0.4)
    ax.axis("off")
    where, texts = {}, {}
    for y, row in rows.items():
        for k, box in enumerate(row):
            where[box.key] = x, _ = ((k + 0.5) * width / len(row) - 0.5, y)
            warn = any(a.note for a in arrows if a.src == box.key)  # what changed, not what was trained on it
            face = "#eeeeee" if box.kind == "dataset" else "#dbe9f6"
            texts[box.key] = ax.text(
                x, y, box.label, ha="center", va="center", fontsize=8, zorder=2,
                bbox={"boxstyle": "round,pad=0.5", "fc": face, "ec": "#c00000" if warn else "#333333",
                      "lw": 2 if warn else 1},
            )  # fmt: skip
    for a in arrows:
        color = "#c00000" if a.note else "#333333"
        ax.annotate("", xy=(0.5, 1.0), xycoords=texts[a.dst], xytext=(0.5, 0.0), textcoords=texts[a.src],
                    arrowprops={"arrowstyle": "->", "color": color, "shrinkA": 7, "shrinkB": 7,
                                "linestyle": "--" if a.note else "-"}, zorder=1)  # fmt: skip
        if a.note:
            (x0, y0), (x1, y1) = where[a.src], where[a.dst]
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, a.note, color=color, fontsize=7, ha="center", va="center",
                    bbox={"fc": "white", "ec": "none", "pad": 1})  # fmt: skip
    return replace_atomically(png, lambda tmp: fig.savefig(tmp, format="png"))
