"""`lmforge card`: a Hugging Face model card (README.md) for a model or adapter lmforge trained, made from its
lineage and its recorded evaluations.

The YAML front matter holds what the Hub indexes: base_model, library_name, license, datasets, tags,
pipeline_tag, metrics and `model-index` (one result per task and dataset, each metric's 95% interval and sample
count in its `args`), in the shape `huggingface_hub` parses. The body says how the model was made (its stages,
its data with their licences), what it scored, how to load it, and what it is for and not for.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write
from lmforge.inspect import ADAPTER_DIR
from lmforge.lineage import (
    PRESET,
    Lineage,
    dataset_label,
    display,
    key_result,
    manifest_of,
    read_evals,
    resolve_path,
    trace,
    variant,
)
from lmforge.model.hf import read_json_object
from lmforge.train.checkpoint import MODEL_DIR

CARD_FILE = "README.md"
MARK = "<!-- written by `lmforge card`, which rewrites this file: edit the model's runs, not this card -->"
_LICENSE = re.compile(
    r"[a-z0-9][a-z0-9.+-]*"
)  # the Hub's license ids: apache-2.0, mit, cc-by-4.0, llama3, other
# Architecture suffix in config.json → the Hub's pipeline tag.
_PIPELINES = {
    "ForCausalLM": "text-generation",
    "ForSequenceClassification": "text-classification",
    "ForMaskedLM": "fill-mask",
    "ForPreTraining": "fill-mask",
    "Model": "feature-extraction",
}


@dataclass
class Result:
    """One measured number: the task, the data it was measured on, the metric, its value and interval."""

    task: str
    dataset: str
    metric: str
    value: float
    ci95: list[float] | None = None
    n: int | None = None
    split: str | None = None
    source: str = "training run"


@dataclass
class Card:
    """A model card: the front matter (a dict), the whole README text, and the lineage it was made from."""

    metadata: dict[str, Any]
    text: str
    lineage: Lineage

    def write(self, out: Path, *, overwrite: bool = False) -> Path:
        """Write the card to `out` atomically; a README.md that `lmforge card` did not write is replaced only with
        `overwrite`."""
        out = Path(out)
        if out.is_dir():
            out = out / CARD_FILE
        if not out.parent.is_dir():
            raise LmforgeError(f"--out {out}: its directory {out.parent} does not exist")
        if out.exists() and not overwrite and MARK not in out.read_text(encoding="utf-8", errors="replace"):
            raise LmforgeError(
                f"--out {out} exists and was not written by lmforge card: add --overwrite to replace it, or give "
                "another --out"
            )
        return atomic_write(out, self.text)

    def summary(self, path: Path) -> dict[str, Any]:
        """What the card says, in short, for the command's output."""
        return {
            "card": str(path),
            "base_model": self.metadata.get("base_model"),
            "datasets": self.metadata.get("datasets", []),
            "license": self.metadata["license"],
            "metrics": [
                f"{r['task']['name']}.{m['type']}={m['value']:.4g}"
                for r in self.metadata.get("model-index", [{}])[0].get("results", [])
                for m in r["metrics"]
            ],
            "warnings": self.lineage.warnings,
        }


def write_card(
    model_dir: str | Path, out: str | Path | None = None, license: str = "other", *, overwrite: bool = False
) -> Path:
    """Write the model card of an lmforge output (model, adapter or run directory) to `out` (default: its
    README.md); the path written."""
    card = make_card(model_dir, license)
    return card.write(
        Path(out) if out is not None else card.lineage.nodes[0].path / CARD_FILE, overwrite=overwrite
    )


def make_card(model: str | Path, license: str = "other") -> Card:
    """The card of an lmforge output: front matter from its lineage and evaluations, and its body."""
    if not _LICENSE.fullmatch(license):
        raise LmforgeError(
            f"--license {license!r}: expected a Hugging Face license id (lowercase, e.g. apache-2.0, mit, "
            "cc-by-4.0, or other)"
        )
    lineage = trace(model)
    node = lineage.nodes[0]
    record = node.record or {}
    results = collect_results(record, node.path)
    datasets = _dataset_names(lineage)
    name = _model_name(node.path)
    meta: dict[str, Any] = {}
    base = _base_model(lineage)
    if base is not None:
        meta["base_model"] = base
    meta["library_name"] = _library(node.path)
    meta["license"] = license
    if datasets:
        meta["datasets"] = datasets
    meta["tags"] = _tags(lineage)
    pipeline = _pipeline(lineage)
    if pipeline is not None:
        meta["pipeline_tag"] = pipeline
    if results:
        meta["metrics"] = sorted({r.metric for r in results})
        meta["model-index"] = [{"name": name, "results": _model_index(results, pipeline)}]
        _check_model_index(meta["model-index"])
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    body = _body(name, lineage, results, datasets, license)
    return Card(meta, f"---\n{front}---\n\n{MARK}\n\n{body}", lineage)


# ------------------------------------------------------------------------------------------- results


def collect_results(record: dict[str, Any], output: Path | None) -> list[Result]:
    """The numbers a card reports: the run's own measurements (validation, QA accuracy, win rate, reward,
    forgetting) from its lineage, then every metric of `output/evals/*.json`."""
    res = record.get("results") or {}
    config = record.get("config") or {}
    trained = next((d.get("path") for d in record.get("datasets") or [] if d.get("path")), None)
    trained = trained or (config.get("data") or {}).get("dataset") or "training data"
    found: list[Result] = []
    if _number(res.get("val_loss")):
        found.append(Result("validation", str(trained), "loss", res["val_loss"], split="val"))
    for key, value in (res.get("val") or {}).items() if isinstance(res.get("val"), dict) else []:
        if _number(value) and key != "val_loss":  # align's val_loss repeats its method's own loss
            found.append(Result("validation", str(trained), key.removeprefix("val_"), value, split="val"))
    qa = res.get("qa") if isinstance(res.get("qa"), dict) else {}
    after = qa.get("after") if isinstance(qa.get("after"), dict) else {}
    if _number(after.get("accuracy")):
        interval = (after.get("intervals") or {}).get("all") or {}
        found.append(Result("qa", str(qa.get("file") or "qa"), "accuracy", after["accuracy"],
                            interval.get("ci95"), interval.get("n") or after.get("questions")))  # fmt: skip
    ev = res.get("eval") if isinstance(res.get("eval"), dict) else {}
    prompts = str((config.get("eval") or {}).get("prompts") or "eval prompts")
    if _number(ev.get("win_rate")):  # against the starting model, judged by a reward model
        interval = ev.get("win_rate_interval") or {}
        found.append(Result("win_rate", prompts, "win_rate", ev["win_rate"], interval.get("ci95"),
                            interval.get("n")))  # fmt: skip
    if _number(ev.get("reward_after")):
        found.append(Result("reward", prompts, "reward", ev["reward_after"], n=ev.get("prompts")))
    forgetting = res.get("forgetting") if isinstance(res.get("forgetting"), dict) else {}
    if _number(forgetting.get("perplexity_after")):
        found.append(Result("forgetting", str(forgetting.get("reference")), "perplexity",
                            forgetting["perplexity_after"], split="val"))  # fmt: skip
    for ev_record in read_evals(output) if output is not None else []:
        for metric, m in ev_record["metrics"].items():
            found.append(Result(ev_record["task"], str(ev_record.get("data") or ev_record["task"]), metric,
                                m["value"], m.get("ci95"), m.get("n") or ev_record.get("n"),
                                source=f"evals/{Path(ev_record['file']).name}"))  # fmt: skip
    for r in found:  # an interval that is not two finite numbers (nothing measured) is left out
        r.ci95 = [float(x) for x in r.ci95] if _interval(r.ci95) else None
    return [r for r in found if math.isfinite(r.value)]  # NaN: a metric over no items says nothing


def _model_index(results: list[Result], pipeline: str | None) -> list[dict[str, Any]]:
    """model-index results: one per (task, dataset, split), its metrics with their interval and n as args."""
    groups: dict[tuple[str, str, str | None], dict[str, Any]] = {}
    for r in results:
        key = (r.task, r.dataset, r.split)
        if key not in groups:
            dataset: dict[str, Any] = {"type": Path(r.dataset).name or r.dataset, "name": r.dataset}
            if r.split:
                dataset["split"] = r.split
            groups[key] = {"task": {"type": pipeline or "other", "name": r.task}, "dataset": dataset,
                           "metrics": []}  # fmt: skip
        metric: dict[str, Any] = {"type": r.metric, "value": float(r.value), "name": r.metric}
        args = {
            k: v for k, v in (("ci95", r.ci95), ("n", int(r.n) if _number(r.n) else None)) if v is not None
        }
        if args:
            metric["args"] = args
        groups[key]["metrics"].append(metric)
    return list(groups.values())


def _check_model_index(model_index: list[dict[str, Any]]) -> None:
    """Parse model-index as the Hub's client does (when it is installed): a card that does not parse is a bug."""
    try:
        from huggingface_hub.repocard_data import model_index_to_eval_results
    except ImportError:
        return
    model_index_to_eval_results(model_index)


# ------------------------------------------------------------------------------------------- front matter


def _base_model(lineage: Lineage) -> str | None:
    """The model this one was trained from (its first parent) as recorded; None when trained from a preset."""
    parents = lineage.nodes[0].parents
    if not parents:
        return None
    parent = lineage.nodes[parents[0]]
    return None if parent.ref.startswith(PRESET) else parent.ref


def _library(path: Path | None) -> str:
    """peft for a PEFT adapter, lmforge for its own bottleneck adapters, else transformers."""
    if path is None or not (path / "adapter_config.json").is_file():
        return "transformers"
    config = read_json_object(path / "adapter_config.json")
    return "lmforge" if config.get("lmforge_adapter") else "peft"


def _pipeline(lineage: Lineage) -> str | None:
    """The Hub pipeline tag from the architecture in config.json (an adapter's: its nearest model ancestor's)."""
    for node in lineage.chain():
        if node.path is not None and (node.path / "config.json").is_file():
            architectures = read_json_object(node.path / "config.json").get("architectures") or []
            for suffix, tag in _PIPELINES.items():
                if any(str(a).endswith(suffix) for a in architectures):
                    return tag
            return None
    return None


def _tags(lineage: Lineage) -> list[str]:
    """lmforge, then every stage and method along the chain (this model's first)."""
    tags = ["lmforge"]
    for node in lineage.chain():
        record = node.record or {}
        for tag in (record.get("stage"), record.get("method"), record.get("objective")):
            if isinstance(tag, str) and tag and tag not in tags:
                tags.append(tag)
    return tags


def _dataset_names(lineage: Lineage) -> list[str]:
    """Every dataset trained on along the chain, this model's first: the raw inputs of a cached copy, else the
    path the run was given."""
    names: list[str] = []
    for node in lineage.chain():
        for d in node.datasets:
            for name in d.get("source") or [d.get("path") or f"lmforge-dataset-{(d.get('id') or '?')[:12]}"]:
                if name not in names:
                    names.append(str(name))
    return names


def _model_name(path: Path | None) -> str:
    """The run's name for an output called model/ or adapter/ (`sft` for sft/adapter), else the directory's."""
    if path is None:
        return "model"
    path = path.resolve()
    return path.parent.name if path.name in (MODEL_DIR, ADAPTER_DIR) else path.name


# ------------------------------------------------------------------------------------------- body


def _body(name: str, lineage: Lineage, results: list[Result], datasets: list[str], license: str) -> str:
    node = lineage.nodes[0]
    record = node.record or {}
    parts = [f"# {name}", "", _summary(lineage), ""]
    parts += [
        "## Lineage",
        "",
        "| | model | stage | method | trained on | result |",
        "|---|---|---|---|---|---|",
    ]
    for depth, n in enumerate(lineage.chain()):
        r = n.record or {}
        key = key_result(r.get("results"))
        data = ", ".join(f"{Path(dataset_label(d)).name} ({(d.get('id') or 'no id')[:12]})"
                         for d in n.datasets)  # fmt: skip
        role = "this model" if depth == 0 else ("parent" if depth == 1 else f"ancestor {depth}")
        cells = [role, f"`{display(n.path) or n.ref}`", r.get("stage") or n.kind, variant(r) or "",
                 data, f"{key[0]} {key[1]:.4g}" if key else ""]  # fmt: skip
        parts.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    parts.append("")
    for warning in lineage.warnings:
        parts.append(f"> **Warning:** {warning}")
    if lineage.warnings:
        parts.append("")
    version = record.get("code_version") or {"lmforge": record.get("lmforge_version")}
    commit = version.get("git_commit") if isinstance(version, dict) else None
    made = f"lmforge {version.get('lmforge') if isinstance(version, dict) else version}"
    made += f" (commit `{commit[:12]}`)" if commit else ""
    facts = [f"Trained with {made}"]
    if record.get("config_hash"):
        facts.append(f"config hash `{record['config_hash'][:16]}`")
    if record.get("seed") is not None:
        facts.append(f"seed {record['seed']}")
    res = record.get("results") or {}
    if _number(res.get("steps")):
        facts.append(f"{res['steps']:,} steps")
    if _number(res.get("tokens")):
        facts.append(f"{res['tokens']:,} tokens")
    parts += ["; ".join(facts) + ". The full config is in `lmforge.json` beside the weights.", ""]
    parts += ["## Training data", "", *_data_lines(lineage), ""]
    parts += ["## Results", "", *_result_lines(results, res), ""]
    parts += ["## How to use", "", *_usage(lineage), ""]
    parts += ["## Intended use and limitations", "", *_limits(lineage, results, datasets, license)]
    return "\n".join(parts) + "\n"


def _summary(lineage: Lineage) -> str:
    """One sentence per step of the chain: what this model is and what it was made from."""
    sentences = []
    for depth, n in enumerate(lineage.chain()):
        r = n.record or {}
        subject = "This model" if depth == 0 else f"`{n.ref}`"
        if n.record is None:
            what = (
                "a preset architecture with random weights"
                if n.kind == "preset"
                else "not trained by lmforge"
            )
            if n.kind == "missing":
                what = "no longer found, so the lineage ends there"
            sentences.append(f"{subject} is {what}.")
            continue
        kind = "an adapter" if n.kind == "adapter" else "a model"
        how = " ".join(str(x) for x in (r.get("stage"), variant(r)) if x)
        parent = r.get("parent")
        sentences.append(
            f"{subject} is {kind} made by lmforge {how}" + (f" from `{parent}`." if parent else ".")
        )
    return " ".join(sentences)


def _data_lines(lineage: Lineage) -> list[str]:
    """Each dataset along the chain: where it was, its id, what it was prepared from and under which licence."""
    lines = []
    for d, users in lineage.datasets():
        n = lineage.nodes[users[0][0]]
        where = resolve_path(d["path"], n.path) if isinstance(d.get("path"), str) and n.path else None
        manifest = manifest_of(where) if where is not None and where.is_dir() else None
        text = f"- `{dataset_label(d)}`"
        text += f" (id `{d['id'][:12]}`, {d.get('status', 'unchecked')})" if d.get("id") else ""
        text += f": trained on by {', '.join(f'`{lineage.nodes[i].name}`' for i, _ in users)}"
        if manifest:
            splits = manifest.get("splits") or {}
            docs = (splits.get("train") or {}).get("documents")
            text += f"; {manifest.get('kind')} data" + (f", {docs:,} training documents" if docs else "")
            for source in manifest.get("inputs") or []:
                licence = source.get("licence") or "licence not recorded"
                text += f"; from `{source.get('path')}` ({licence})"
        lines.append(text)
    return lines or ["No dataset is recorded in this model's lineage."]


def _result_lines(results: list[Result], res: dict[str, Any]) -> list[str]:
    """The results table (value, 95% interval, n, where it was measured) and the before/after comparisons."""
    if not results:
        return ["No results were recorded: run `lmforge eval --record` on this model to add them."]
    lines = ["| task | dataset | metric | value | 95% CI | n | source |", "|---|---|---|---|---|---|---|"]
    for r in results:
        ci = f"{r.ci95[0]:.4g} – {r.ci95[1]:.4g}" if r.ci95 else ""
        cells = [r.task, f"`{r.dataset}`" + (f" ({r.split})" if r.split else ""), r.metric, f"{r.value:.4g}", ci,
                 f"{r.n:,}" if r.n is not None else "", r.source]  # fmt: skip
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    notes = []
    if _number(res.get("val_loss_before")) and _number(res.get("val_loss")):
        notes.append(
            f"validation loss {res['val_loss_before']:.4g} before training, {res['val_loss']:.4g} after"
        )
    qa = res.get("qa") if isinstance(res.get("qa"), dict) else {}
    before, after = (qa.get(k) if isinstance(qa.get(k), dict) else {} for k in ("before", "after"))
    if _number(before.get("accuracy")) and _number(after.get("accuracy")):
        notes.append(f"QA accuracy {before['accuracy']:.3f} before, {after['accuracy']:.3f} after")
    forgetting = res.get("forgetting") if isinstance(res.get("forgetting"), dict) else {}
    if _number(forgetting.get("increase_pct")):
        notes.append(
            f"forgetting: perplexity on `{forgetting.get('reference')}` {forgetting['perplexity_before']:.4g} → "
            f"{forgetting['perplexity_after']:.4g} ({forgetting['increase_pct']:+.2f}%)"
        )
    if notes:
        lines += ["", "Measured by the training run: " + "; ".join(notes) + "."]
    return lines


def _usage(lineage: Lineage) -> list[str]:
    node = lineage.nodes[0]
    here = display(node.path)
    if node.kind == "adapter":
        base = _base_model(lineage) or "BASE"
        return ["```bash", f"lmforge generate {base} --adapter {here} --chat --prompt 'Hello'", "```"]
    return ["```bash", f"lmforge generate {here} --prompt 'Hello'", "```", "",
            "The directory is a Hugging Face model directory: `transformers` loads it as well."]  # fmt: skip


def _limits(lineage: Lineage, results: list[Result], datasets: list[str], license: str) -> list[str]:
    """Intended use and limits: what the data and measurements support, and what nobody checked."""
    data = ", ".join(f"`{d}`" for d in datasets[:5]) + (", ..." if len(datasets) > 5 else "")
    lines = [
        f"- Intended for research and experiments on the tasks its training data cover ({data or 'not recorded'}).",
        "- It knows only what its training data hold, and states wrong facts as fluently as right ones.",
        "- The results above hold for the data they were measured on; they need not carry over to other data.",
        "- It was not evaluated for safety, bias or toxicity: do not deploy it where those matter without "
        "evaluating them.",
    ]
    if lineage.warnings:
        lines.append("- Its lineage has warnings (above): a parent or dataset changed, so it cannot be reproduced "
                     "from what is on disk now.")  # fmt: skip
    if not results:
        lines.append("- No evaluation is recorded.")
    lines.append(
        f"- License: {license}"
        + (" (no license was chosen: pass `lmforge card --license ID`)." if license == "other" else ".")
    )
    return lines


def _cell(text: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _interval(ci: Any) -> bool:
    return isinstance(ci, list | tuple) and len(ci) == 2 and all(_number(x) and math.isfinite(x) for x in ci)
