"""Pipelines: one YAML recipe chains lmforge's stages, each writing `OUT/<stage name>`; a rerun skips what is
up to date (docs/pipelines.md).

    out: runs/medical                  # --out overrides it
    vars: {steps: 200}                 # free values; --set vars.steps=50 overrides one
    stages:
      - {name: world, run: synth, with: {seed: 0}}
      - {name: tok, run: tokenizer, with: {inputs: ["${world}/pretrain.jsonl"], vocab_size: 2048}}
      - {name: base, run: pretrain, recipe: ../pretrain-world.yaml, set: {train.max_steps: "${vars.steps}"}}

A stage is `run` (its kind: KINDS) with `with` (the kind's settings, validated like a config section), or for
the training kinds a `recipe` (relative to the pipeline's file) and `set` (dotted overrides, exactly the CLI's
`--set`). Strings may hold references, resolved before the stage runs: `${NAME}` (stage NAME's primary
output), `${NAME.dir}`, `${NAME.model}`, `${NAME.adapter}`, `${NAME.result}`, `${NAME.command}` (its named
outputs), `${vars.X}` and `${out}`. A string that is one reference and nothing else takes the value's type.

`OUT/pipeline.json` records each finished stage: its fingerprint (a hash of the kind, the resolved config, the
fingerprints of the stages it reads and the sha256 of every input file no stage wrote), the run ids of those
stages, its outputs, seconds and finish time. A rerun skips a stage whose record still holds and whose outputs
exist; a training stage's output must also carry the same config hash in its `lmforge.json`. The record is
written after each stage, atomically, so a failure resumes after the last finished stage.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import json
import logging
import re
import shlex
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, ValidationError, model_validator

from lmforge.config import Section, load_config, validation_message
from lmforge.data.prepare import PrepareConfig
from lmforge.data.synthetic import WorldSizes
from lmforge.errors import LmforgeError
from lmforge.fileio import atomic_write, sha256_tree
from lmforge.lineage import LINEAGE_FILE, config_hash
from lmforge.paths import config_paths
from lmforge.stages.configs import AlignConfig, FinetuneConfig, PretrainConfig

log = logging.getLogger(__name__)

STATE_FILE = "pipeline.json"
STATE_FORMAT = 1
Kind = Literal[
    "synth", "tokenizer", "prepare", "pretrain", "finetune", "align", "rag-index", "eval", "call", "serve"
]
KINDS: tuple[str, ...] = get_args(Kind)
TRAINING: dict[str, type[Section]] = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "align": AlignConfig,
}
RESERVED = ("vars", "out")
_REFERENCE = re.compile(r"\$\{([^{}]*)\}")
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_STAGE_KEYS = ("name", "run", "with", "recipe", "set", "function")


# ----------------------------------------------------------------------------------------- the schema


class SynthWith(Section):
    """`synth`: the synthetic world (lmforge data synth)."""

    seed: int = Field(0, ge=0)
    """Seed: the same seed and sizes give byte-identical files."""
    sizes: WorldSizes = Field(default_factory=WorldSizes)
    """The world's counts (people per group, biographies, medical Q&A, preference pairs, ...)."""


class TokenizerWith(Section):
    """`tokenizer`: train a tokenizer (lmforge tokenizer train)."""

    inputs: list[Path] = Field(min_length=1)
    """Text or dataset files (any format data prepare reads)."""
    kind: Literal["bpe", "wordpiece"] = "bpe"
    """bpe (byte-level, for decoders) or wordpiece (for BERT)."""
    vocab_size: int = Field(8192, ge=16)
    """Vocabulary size, special tokens included."""
    min_frequency: int = Field(2, ge=1)
    """Minimum pair frequency for a merge."""
    format: str | None = None
    """Record format; default: detected."""


class RagIndexWith(Section):
    """`rag-index`: index documents for retrieval (lmforge rag index)."""

    inputs: list[Path] = Field(min_length=1)
    """Data files or directories (a record's `text` is indexed, its other fields kept)."""
    chunk_tokens: int = Field(128, ge=8)
    """Tokens a chunk holds at most (sentences packed)."""
    overlap: int = Field(32, ge=0)
    """Tokens of the previous chunk's last sentences repeated."""
    embedder: Path | None = None
    """An encoder directory for dense vectors; default: all-MiniLM-L6-v2 when installed."""
    dense: bool = True
    """Compute dense vectors (false: BM25 only)."""


class EvalWith(Section):
    """`eval`: one task (lmforge eval), or with `rag` answers without and with retrieval (lmforge rag eval)."""

    model: Path
    """The model directory."""
    adapter: Path | None = None
    """An adapter on the model."""
    task: str = "perplexity"
    """perplexity, qa, gsm8k, classify, choice, format, preference, winrate or safety (with rag: qa)."""
    data: Path | None = None
    """The task's data."""
    limit: int | None = Field(None, ge=1)
    """Items at most (the first N; with rag: per group)."""
    batch_size: int = Field(32, ge=1)
    """Sequences per forward."""
    max_new_tokens: int = Field(64, ge=1)
    """Tokens per generated answer at most."""
    contamination: bool = True
    """Check the items against the training data of the model's lineage (13-grams)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """The task's other options: max_chars, reference, judge, against, against_adapter."""
    rag: Path | None = None
    """A RAG index: retrieval metrics and the accuracy of the answers without and with the passages."""
    k: int = Field(5, ge=1)
    """With rag: passages per question."""
    mode: Literal["bm25", "dense", "hybrid"] | None = None
    """With rag: bm25, dense or hybrid (default: hybrid with vectors, else bm25)."""
    gold_field: str = "person"
    """With rag: the field a question shares with its gold documents (the world's medical articles: topic)."""

    @model_validator(mode="after")
    def _known_task(self) -> EvalWith:
        from lmforge.eval.tasks import TASKS

        if self.task not in TASKS:
            raise ValueError(
                f"task {self.task!r}{_did_you_mean(self.task, TASKS)} (tasks: {', '.join(TASKS)})"
            )
        if self.rag is not None and (self.task != "qa" or self.data is None):
            raise ValueError("with rag, the questions of `data` are answered: give task: qa and data")
        return self


class ProbeChat(Section):
    """One chat sent to the server."""

    model: str
    """The served name to ask (the base's name or an adapter's)."""
    messages: list[dict[str, str]] = Field(min_length=1)
    """The chat, ending with a user turn."""
    redirect: bool = False
    """Whether the right reply sends the user to real care (counted in `referred`)."""


class ProbeData(Section):
    """Chats from a file sent to the server, each to every named model."""

    data: Path
    """Chat records (e.g. the world's medical_qa.jsonl: its `redirect` flags are counted)."""
    model: str | list[str]
    """The served name (or names) to ask."""
    limit: int | None = Field(20, ge=1)
    """Chats at most (the first N)."""


class ServeWith(Section):
    """`serve`: the `lmforge serve` command line, and with `probe` the app run and asked."""

    model: Path
    """The base model directory."""
    name: str | None = None
    """The base's name in requests (default: the directory's name)."""
    adapters: dict[str, Path] = Field(default_factory=dict)
    """NAME: DIR, LoRA adapters served beside the base."""
    policy: Path | None = None
    """A guardrails policy (recipes/policies/medical.yaml)."""
    route: list[str] = Field(default_factory=list)
    """NAME=VARIANT:SHARE,VARIANT:SHARE A/B routes."""
    port: int = Field(8000, ge=1, le=65535)
    """The port of the command line (a probe runs on a free one)."""
    probe: list[ProbeChat] | ProbeData | None = None
    """Chats to send through HTTP: a list of {model, messages}, or {data, model, limit}."""
    max_new_tokens: int = Field(48, ge=1)
    """Tokens per probe reply at most."""


WITH: dict[str, type[Section]] = {
    "synth": SynthWith,
    "tokenizer": TokenizerWith,
    "prepare": PrepareConfig,
    "rag-index": RagIndexWith,
    "eval": EvalWith,
    "serve": ServeWith,
}


class StageSpec(Section):
    """One stage of a recipe, as written (references unresolved)."""

    name: str
    """The stage's name: its folder under OUT and what `${NAME}` refers to."""
    run: Kind
    """What the stage does (KINDS)."""
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    """The kind's settings (not for the training kinds)."""
    recipe: str | None = None
    """Training kinds: a stage recipe, relative to the pipeline's file."""
    set: dict[str, Any] = Field(default_factory=dict)
    """Training kinds: dotted overrides, as the CLI's --set KEY=VALUE."""
    function: str | None = None
    """call: `lmforge.MODULE:FUNCTION`."""


class PipelineRecipe(Section):
    """A pipeline recipe: the output root, free values and the stages in order."""

    out: str | None = None
    """The output root; each stage writes OUT/<name> (--out overrides it)."""
    vars: dict[str, Any] = Field(default_factory=dict)
    """Free values stages refer to as ${vars.X} (--set vars.X=V overrides one)."""
    stages: list[dict[str, Any]] = Field(min_length=1)
    """The stages, run in order."""


@dataclass
class Pipeline:
    """A loaded recipe: its file, output root, values and stages (checked, references unresolved)."""

    path: Path
    out: Path
    vars: dict[str, Any]
    stages: list[StageSpec]


# ------------------------------------------------------------------------------------------ loading


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LmforgeError(f"cannot read pipeline recipe {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        line = f", line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else ""
        raise LmforgeError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a mapping with out, vars and stages, got {type(data).__name__}")
    return data


def _set_vars(values: dict[str, Any], sets: Sequence[str]) -> dict[str, Any]:
    """`values` with each `vars.X=V` of `sets` applied (V read as YAML: 50 is an int)."""
    values = dict(values)
    for text in sets:
        key, sep, raw = text.partition("=")
        if not sep or not key.startswith("vars.") or not key[5:]:
            raise LmforgeError(f"--set {text}: expected vars.NAME=VALUE (a pipeline's --set sets its vars)")
        name = key[5:]
        if name not in values:
            raise LmforgeError(
                f"--set {text}: the recipe has no var {name!r}{_did_you_mean(name, list(values))}"
            )
        try:
            values[name] = yaml.safe_load(raw)
        except yaml.YAMLError:
            values[name] = raw
    return values


def load_pipeline(path: Path, *, out: Path | None = None, sets: Sequence[str] = ()) -> Pipeline:
    """Read and check a recipe: the schema, each stage's keys and kind, and every reference's target."""
    path = Path(path)
    data = _read_yaml(path)
    try:
        recipe = PipelineRecipe.model_validate(data)
    except ValidationError as e:
        raise LmforgeError(f"{path}: {validation_message(e, PipelineRecipe, lambda key: '')}") from None
    stages: list[StageSpec] = []
    for i, raw in enumerate(recipe.stages):
        stages.append(_stage_spec(path, i, raw, [s.name for s in stages]))
    names = [s.name for s in stages]
    root = out if out is not None else Path(recipe.out) if recipe.out is not None else None
    if root is None:
        raise LmforgeError(f"{path}: no output root: give --out DIR or `out:` in the recipe")
    pipeline = Pipeline(path, Path(root), _set_vars(recipe.vars, list(sets)), stages)
    for i, stage in enumerate(stages):
        for where, ref in _references(stage):
            _check_reference(pipeline, i, where, ref, names)
    return pipeline


def _stage_spec(path: Path, i: int, raw: Any, earlier: list[str]) -> StageSpec:
    """Stage `i` of the recipe checked: known keys, a known kind, a unique name, the kind's own fields."""
    if not isinstance(raw, dict):
        raise LmforgeError(f"{path}: stages[{i}]: expected a mapping with name and run, got {raw!r}")
    label = f"stage {raw.get('name', i)!r}" if isinstance(raw.get("name"), str) else f"stages[{i}]"
    for key in raw:
        if key not in _STAGE_KEYS:
            raise LmforgeError(f"{path}: {label}: unknown key {key!r}{_did_you_mean(str(key), _STAGE_KEYS)}")
    kind = raw.get("run")
    if isinstance(kind, str) and kind not in KINDS:
        raise LmforgeError(
            f"{path}: {label}: unknown kind run: {kind!r}{_did_you_mean(kind, KINDS)} "
            f"(kinds: {', '.join(KINDS)})"
        )
    try:
        spec = StageSpec.model_validate(raw)
    except ValidationError as e:
        raise LmforgeError(f"{path}: {label}: {validation_message(e)}") from None
    label = f"stage {spec.name!r}"
    if not _NAME.fullmatch(spec.name) or spec.name in RESERVED:
        raise LmforgeError(
            f"{path}: {label}: a name starts with a letter and holds letters, digits, - and _ (not vars or out)"
        )
    if spec.name in earlier:
        raise LmforgeError(f"{path}: {label}: the name is used twice")
    training = spec.run in TRAINING
    misplaced = [k for k, bad in (("with", training and spec.with_), ("recipe", not training and spec.recipe),
                                  ("set", not training and spec.set),
                                  ("function", spec.run != "call" and spec.function)) if bad]  # fmt: skip
    if misplaced:
        takes = "recipe and set" if training else "function and with" if spec.run == "call" else "with"
        raise LmforgeError(f"{path}: {label} ({spec.run}) takes {takes}, not {misplaced[0]}")
    if spec.run == "call":
        if not spec.function:
            raise LmforgeError(f"{path}: {label} (call): give function: lmforge.MODULE:FUNCTION")
        _function(spec.function, label)  # an unknown or foreign function fails now, before any stage runs
    if spec.recipe is not None and "${" in spec.recipe:
        raise LmforgeError(
            f"{path}: {label}: recipe is a path relative to the pipeline's file, not a reference"
        )
    return spec


def _references(stage: StageSpec) -> Iterator[tuple[str, str]]:
    """Every reference in the stage's `with` and `set`: (where, e.g. "with.inputs[0]", the text inside ${})."""

    def walk(value: Any, where: str) -> Iterator[tuple[str, str]]:
        if isinstance(value, str):
            for m in _REFERENCE.finditer(value):
                yield where, m.group(1).strip()
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{where}.{k}")
        elif isinstance(value, list):
            for n, v in enumerate(value):
                yield from walk(v, f"{where}[{n}]")

    yield from walk(stage.with_, "with")
    yield from walk(stage.set, "set")


def _outputs_of(kind: str) -> tuple[str, ...]:
    """The named outputs a stage of `kind` may have."""
    if kind in TRAINING:
        return ("dir", "model", "adapter")
    return {"eval": ("dir", "result"), "call": ("dir", "result"), "serve": ("dir", "command", "result")}.get(
        kind, ("dir",)
    )


def _check_reference(pipeline: Pipeline, i: int, where: str, ref: str, names: list[str]) -> None:
    """A reference names an earlier stage (and one of its outputs), a var, or out; else a clear error."""
    stage = pipeline.stages[i]
    at = f"{pipeline.path}: stage {stage.name!r} {where}: ${{{ref}}}"
    head, _, attr = ref.partition(".")
    if head == "out" and not attr:
        return
    if head == "vars":
        if attr.split(".")[0] not in pipeline.vars:
            raise LmforgeError(f"{at}: no var {attr!r}{_did_you_mean(attr, list(pipeline.vars))}")
        return
    if head not in names:
        hint = _did_you_mean(head, [*names[:i], "vars", "out"])
        raise LmforgeError(
            f"{at}: no stage {head!r}{hint} (earlier stages: {', '.join(names[:i]) or 'none'})"
        )
    j = names.index(head)
    if j >= i:
        what = "is this stage" if j == i else f"runs later (stage {j + 1} of {len(names)})"
        raise LmforgeError(f"{at}: stage {head!r} {what}; a stage refers only to stages before it")
    kind = pipeline.stages[j].run
    if attr and attr not in _outputs_of(kind):
        outputs = _outputs_of(kind)
        raise LmforgeError(
            f"{at}: stage {head!r} ({kind}) has no output {attr!r}{_did_you_mean(attr, outputs)} "
            f"(its outputs: {', '.join(outputs)})"
        )


# ------------------------------------------------------------------------------------------ planning


@dataclass
class Step:
    """A stage resolved for this invocation: its config, outputs, fingerprint, and whether it runs and why."""

    spec: StageSpec
    dir: Path
    config: Any  # the validated config (a stage config or `with` section), or a call's kwargs
    config_json: dict[str, Any]
    outputs: dict[str, Path]
    primary: str
    upstream: dict[str, str]  # the stages it reads → their fingerprints
    inputs: dict[str, str]
    fingerprint: str
    action: str = "run"
    reason: str = ""
    seconds: float | None = None

    @property
    def name(self) -> str:
        """The stage's name."""
        return self.spec.name


def _predicted_outputs(kind: str, d: Path, config: Any) -> tuple[dict[str, Path], str]:
    """The named outputs a stage will write and which is primary (model/ or adapter/: the stages' own rule)."""
    outputs: dict[str, Path] = {"dir": d}
    if kind == "pretrain":
        outputs["model"] = d / "model"
    elif kind == "finetune":
        full = config.method == "full" or config.kind == "task"  # a classifier is saved merged
        outputs["model" if full else "adapter"] = d / ("model" if full else "adapter")
    elif kind == "align":
        full = config.method == "reward" or config.tuning == "full"
        outputs["model" if full else "adapter"] = d / ("model" if full else "adapter")
    elif kind in ("eval", "call"):
        outputs["result"] = d / "result.json"
    elif kind == "serve":
        outputs["command"] = d / "command.txt"
        if config.probe is not None:
            outputs["result"] = d / "result.json"
    primary = next((k for k in ("model", "adapter", "result", "command") if k in outputs), "dir")
    if kind == "serve" and "result" in outputs:
        primary = "result"
    return outputs, primary


def _set_text(key: str, value: Any) -> str:
    """One `set` entry as the CLI's KEY=VALUE: text as given, anything else as YAML (JSON is YAML)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value, default=str)}"


def _function(spec: str, label: str) -> Callable[..., Any]:
    """`lmforge.MODULE:FUNCTION` imported; a function outside the lmforge package is refused."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise LmforgeError(f"{label} (call): function {spec!r}: expected lmforge.MODULE:FUNCTION")
    if module != "lmforge" and not module.startswith("lmforge."):
        raise LmforgeError(
            f"{label} (call): function {spec!r} is outside the lmforge package: a recipe runs lmforge's own "
            "code only (lmforge.MODULE:FUNCTION)"
        )
    try:
        found = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError:
        raise LmforgeError(f"{label} (call): function {spec!r}: no module {module!r}") from None
    except AttributeError:
        raise LmforgeError(f"{label} (call): function {spec!r}: {module} has no {name!r}") from None
    if not callable(found):
        raise LmforgeError(f"{label} (call): {spec!r} is not a function")
    return found


def _call_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], d: Path, label: str) -> dict[str, Any]:
    """`with` checked against the function's parameters; a parameter `out` not given gets the stage's folder."""
    params = inspect.signature(fn).parameters
    kwargs = dict(kwargs)
    if "out" in params and "out" not in kwargs:
        kwargs["out"] = str(d)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        if key not in params and not takes_any:
            names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            raise LmforgeError(
                f"{label} (call): with.{key}: the function takes no {key!r}{_did_you_mean(key, names)}"
            )
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise LmforgeError(f"{label} (call): with: {e}") from None
    return kwargs


def _path_values(config: Any, kind: str) -> list[str]:
    """The paths a stage reads: its config's Path fields; a call's string arguments that name a file or dir,
    but for `out` (where the function writes, not what it reads)."""
    if kind != "call":
        return [str(p) for p in config_paths(config)]
    config = {k: v for k, v in config.items() if k != "out"}
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str) and value not in ("", ".", "..") and Path(value).exists():
            found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(config)
    return found


class _Resolver:
    """References resolved against the vars, the output root and the earlier steps' outputs."""

    def __init__(self, pipeline: Pipeline, steps: dict[str, Step]) -> None:
        self.pipeline, self.steps = pipeline, steps
        self.used: list[str] = []

    def value(self, ref: str, label: str) -> Any:
        head, _, attr = ref.strip().partition(".")
        if head == "out":
            return str(self.pipeline.out)
        if head == "vars":
            value: Any = self.pipeline.vars
            for part in attr.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise LmforgeError(f"{label}: ${{{ref}}}: no var {attr!r}")
                value = value[part]
            return value
        step = self.steps[head]  # checked when the recipe was loaded: an earlier stage
        self.used.append(head)
        key = attr or step.primary
        if key not in step.outputs:
            other = next((k for k in ("model", "adapter") if k in step.outputs), None)
            hint = f"; did you mean ${{{head}.{other}}}?" if other else ""
            raise LmforgeError(
                f"{label}: ${{{ref}}}: stage {head!r} ({step.spec.run}) writes no {key}{hint} "
                f"(its outputs: {', '.join(step.outputs)})"
            )
        return str(step.outputs[key])

    def resolve(self, value: Any, label: str) -> Any:
        if isinstance(value, str):
            whole = _REFERENCE.fullmatch(value.strip())
            if whole:  # one reference alone keeps its value's type (an int stays an int)
                return self.value(whole.group(1), label)
            return _REFERENCE.sub(lambda m: str(self.value(m.group(1), label)), value)
        if isinstance(value, dict):
            return {k: self.resolve(v, f"{label}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, f"{label}[{n}]") for n, v in enumerate(value)]
        return value


def _resolve_step(pipeline: Pipeline, spec: StageSpec, steps: dict[str, Step]) -> Step:
    """The stage's config with its references resolved and validated, its outputs, inputs and fingerprint."""
    label = f"stage {spec.name!r}"
    d = pipeline.out / spec.name
    resolver = _Resolver(pipeline, steps)
    kind = spec.run
    if kind in TRAINING:
        sets = resolver.resolve(spec.set, f"{label} set")
        recipe = (pipeline.path.parent / spec.recipe) if spec.recipe is not None else None
        try:
            config: Any = load_config(TRAINING[kind], recipe, [_set_text(k, v) for k, v in sets.items()])
        except LmforgeError as e:
            message = str(e).replace("from --set ", "from set: ")  # the stage's `set`, not the command's
            raise LmforgeError(f"{pipeline.path}: {label} ({kind}): {message}") from None
        config_json = json.loads(config.model_dump_json())  # what the stage runner hashes into lmforge.json
    elif kind == "call":
        kwargs = resolver.resolve(spec.with_, f"{label} with")
        config = _call_kwargs(_function(spec.function or "", label), kwargs, d, label)
        config_json = {"function": spec.function, "with": json.loads(json.dumps(config, default=str))}
    else:
        cls = WITH[kind]
        values = resolver.resolve(spec.with_, f"{label} with")
        try:
            config = cls.model_validate(values)
        except ValidationError as e:
            message = validation_message(e, cls, lambda key: f"from {label} with")
            raise LmforgeError(f"{pipeline.path}: {label} ({kind}): {message}") from None
        if kind == "rag-index" and config.dense and config.embedder is None:
            from lmforge.rag.index import default_embedder

            config = config.model_copy(update={"embedder": default_embedder()})  # hashed as an input
        config_json = json.loads(config.model_dump_json())
    outputs, primary = _predicted_outputs(kind, d, config)
    upstream = list(dict.fromkeys(resolver.used))  # in order of first use
    inputs: dict[str, str] = {}
    for value in _path_values(config, kind):
        path = Path(value).resolve()
        owner = next((n for n, s in steps.items() if path.is_relative_to(s.dir.resolve())), None)
        if owner is not None:  # written by an earlier stage: its fingerprint stands for the content
            upstream = list(dict.fromkeys([*upstream, owner]))
        elif not any(path.is_relative_to((pipeline.out / s.name).resolve()) for s in pipeline.stages):
            inputs[value] = sha256_tree(path) if path.exists() else "missing"
    fingerprints = {n: steps[n].fingerprint for n in upstream}
    parts = {"kind": kind, "config": config_json, "upstream": fingerprints, "inputs": inputs}
    fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return Step(spec, d, config, config_json, outputs, primary, fingerprints, inputs, fingerprint)


def read_state(out: Path) -> dict[str, Any]:
    """OUT/pipeline.json (an empty record when absent)."""
    path = Path(out) / STATE_FILE
    if not path.is_file():
        return {"format": STATE_FORMAT, "stages": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmforgeError(f"{path}: unreadable ({e}); delete it to run every stage again") from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
        raise LmforgeError(f"{path}: not a pipeline record; delete it to run every stage again")
    return state


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _why_run(
    step: Step, record: dict[str, Any] | None, state: dict[str, Any], running: set[str]
) -> str | None:
    """Why the stage must run (None: it is up to date)."""
    if record is None:
        return "not run before"
    if reran := [n for n in step.upstream if n in running]:
        return f"upstream {reran[0]!r} reruns"
    was = record.get("upstream", {})
    if record.get("fingerprint") != step.fingerprint:
        if changed := [n for n, fp in step.upstream.items() if was.get(n, {}).get("fingerprint") != fp]:
            return f"upstream {changed[0]!r} changed"
        if record.get("kind") != step.spec.run:
            return "changed kind"
        if keys := _changed_keys(record.get("config"), step.config_json):
            return f"changed config ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        old = record.get("inputs", {})
        if changed := [p for p in dict.fromkeys([*old, *step.inputs]) if old.get(p) != step.inputs.get(p)]:
            return f"changed input {changed[0]}"
        return "changed fingerprint"
    for n in step.upstream:  # an upstream stage that reran since (same fingerprint, new output)
        if was.get(n, {}).get("run_id") != state["stages"].get(n, {}).get("run_id"):
            return f"upstream {n!r} reran since"
    if missing := [p for p in step.outputs.values() if not p.exists()]:
        return f"no output ({missing[0]})"
    if step.spec.run in TRAINING:
        out_dir = step.outputs.get("model") or step.outputs["adapter"]
        try:
            recorded = json.loads((out_dir / LINEAGE_FILE).read_text(encoding="utf-8")).get("config_hash")
        except (OSError, ValueError, AttributeError):
            return f"no lineage ({out_dir / LINEAGE_FILE} unreadable)"
        if recorded != config_hash(step.config_json):
            return f"lineage: {out_dir / LINEAGE_FILE} records another config"
    return None


def plan(pipeline: Pipeline, start: str | None = None) -> list[Step]:
    """Every stage resolved, with whether it runs and why (changed config or input, upstream reran, no output,
    forced by `start`: that stage and every one after it run)."""
    names = [s.name for s in pipeline.stages]
    if start is not None and start not in names:
        raise LmforgeError(
            f"--from {start}: no such stage{_did_you_mean(start, names)} (stages: {', '.join(names)})"
        )
    state = read_state(pipeline.out)
    steps: dict[str, Step] = {}
    running: set[str] = set()
    forced = names.index(start) if start is not None else len(names)
    for i, spec in enumerate(pipeline.stages):
        step = _resolve_step(pipeline, spec, steps)
        why = (
            f"forced by --from {start}"
            if i >= forced
            else _why_run(step, state["stages"].get(spec.name), state, running)
        )
        step.action, step.reason = ("run", why) if why else ("skip", "up to date")
        if why:
            running.add(spec.name)
        steps[spec.name] = step
    return list(steps.values())


# ------------------------------------------------------------------------------------------ running


def _check_root(out: Path) -> None:
    """The output root is new, empty, or an earlier pipeline's (with pipeline.json): never a folder of others."""
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out} is a file; expected a directory for the pipeline's stages")
    if out.is_dir() and any(out.iterdir()) and not (out / STATE_FILE).is_file():
        raise LmforgeError(
            f"--out {out} is not empty and holds no {STATE_FILE}: lmforge writes a pipeline only into a new, "
            "empty or earlier pipeline's directory"
        )


def run_pipeline(
    path: Path,
    *,
    out: Path | None = None,
    sets: Sequence[str] = (),
    start: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Load, plan and run a recipe (only plan with `dry_run`); return each stage's action, reason, seconds and
    primary output."""
    pipeline = load_pipeline(path, out=out, sets=list(sets))
    _check_root(pipeline.out)
    steps = plan(pipeline, start)
    started = time.perf_counter()
    if not dry_run:
        pipeline.out.mkdir(parents=True, exist_ok=True)
        state = read_state(pipeline.out)
        state["recipe"] = str(pipeline.path)
        for step in steps:
            if step.action == "skip":
                log.info("stage %s (%s): skipped, up to date", step.name, step.spec.run)
                continue
            log.info("stage %s (%s): running (%s)", step.name, step.spec.run, step.reason)
            # Until it finishes, the stage has no record: a failure here reruns it next time.
            state["stages"].pop(step.name, None)
            _write_state(pipeline.out, state)
            t0 = time.perf_counter()
            RUNNERS[step.spec.run](step)
            step.seconds = time.perf_counter() - t0
            if missing := [p for p in step.outputs.values() if not p.exists()]:
                raise LmforgeError(
                    f"stage {step.name!r} ({step.spec.run}) finished without writing {missing[0]}"
                )
            upstream = {
                n: {k: state["stages"][n][k] for k in ("fingerprint", "run_id")} for n in step.upstream
            }
            state["stages"][step.name] = {
                "kind": step.spec.run,
                "fingerprint": step.fingerprint,
                "run_id": uuid.uuid4().hex,  # what the stages reading this one record, to see it rerun
                "config": step.config_json,
                "inputs": step.inputs,
                "upstream": upstream,
                "outputs": {k: str(v) for k, v in step.outputs.items()},
                "primary": step.primary,
                "seconds": round(step.seconds, 2),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            _write_state(pipeline.out, state)
            log.info("stage %s (%s): done in %.1f s", step.name, step.spec.run, step.seconds)
    return {
        "recipe": str(pipeline.path),
        "out": str(pipeline.out),
        "dry_run": dry_run,
        "stages": [
            {
                "name": s.name,
                "kind": s.spec.run,
                "action": s.action if dry_run else ("ran" if s.action == "run" else "skipped"),
                "reason": s.reason,
                "seconds": round(s.seconds, 2) if s.seconds is not None else None,
                "output": str(s.outputs[s.primary]),
            }
            for s in steps
        ],
        "seconds": round(time.perf_counter() - started, 2),
    }


def _write_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write(
        out / STATE_FILE, json.dumps({"format": STATE_FORMAT, **state}, indent=2, default=str) + "\n"
    )


def _write_result(step: Step, result: dict[str, Any]) -> None:
    step.dir.mkdir(parents=True, exist_ok=True)
    atomic_write(step.outputs["result"], json.dumps(result, indent=2, default=str) + "\n")


def _run_synth(step: Step) -> None:
    from lmforge.data.synthetic import synthesize

    synthesize(step.dir, seed=step.config.seed, sizes=step.config.sizes, overwrite=True)


def _run_tokenizer(step: Step) -> None:
    from lmforge.data.prepare import iter_texts
    from lmforge.tokenizer import train_tokenizer

    c = step.config
    texts = iter_texts(c.inputs, c.format)
    train_tokenizer(texts, c.kind, c.vocab_size, step.dir, min_frequency=c.min_frequency, inputs=c.inputs,
                    overwrite=True)  # fmt: skip


def _run_prepare(step: Step) -> None:
    from lmforge.data.prepare import prepare

    prepare(step.config, step.dir, overwrite=True)


def _run_training(step: Step) -> None:
    from lmforge.stages.align import run_align
    from lmforge.stages.finetune import run_finetune
    from lmforge.stages.pretrain import run_pretrain

    run = {"pretrain": run_pretrain, "finetune": run_finetune, "align": run_align}[step.spec.run]
    run(step.config, step.dir, overwrite=True)


def _run_rag_index(step: Step) -> None:
    from lmforge.rag.index import build_index

    c = step.config
    build_index(c.inputs, step.dir, chunk_tokens=c.chunk_tokens, overlap=c.overlap,
                embedder=c.embedder if c.dense else None)  # fmt: skip


def _run_eval(step: Step) -> None:
    from lmforge.eval.tasks import Target, run_task

    c: EvalWith = step.config
    if c.rag is not None:
        from lmforge.rag.evaluate import evaluate

        assert c.data is not None  # EvalWith requires it with rag
        result = evaluate(
            c.rag, c.data, k=c.k, mode=c.mode, gold_field=c.gold_field, limit=c.limit, model=c.model,
            adapter=c.adapter, max_new_tokens=c.max_new_tokens,
        )  # fmt: skip
    else:
        options = dict(c.options)
        if "against" in options:
            against = options.pop("against_adapter", None)
            options["against"] = Target(Path(options["against"]), Path(against) if against else None)
        result, _ = run_task(
            c.task, Target(c.model, c.adapter), c.data, limit=c.limit, batch_size=c.batch_size,
            max_new_tokens=c.max_new_tokens, check_contamination=c.contamination, **options,
        )  # fmt: skip
    _write_result(step, result)


def _run_call(step: Step) -> None:
    fn = _function(step.spec.function or "", f"stage {step.name!r}")
    step.dir.mkdir(parents=True, exist_ok=True)
    result = fn(**step.config)
    if not isinstance(result, dict):
        raise LmforgeError(
            f"stage {step.name!r} (call): {step.spec.function} returned {type(result).__name__}; expected a "
            "dict (written to result.json)"
        )
    _write_result(step, result)


def serve_command(c: ServeWith) -> list[str]:
    """The `lmforge serve` command line of a serve stage's settings."""
    argv = ["lmforge", "serve", str(c.model)]
    argv += ["--name", c.name] if c.name else []
    argv += [a for name, d in c.adapters.items() for a in ("--adapter", f"{name}={d}")]
    argv += ["--policy", str(c.policy)] if c.policy is not None else []
    argv += [a for r in c.route for a in ("--route", r)]
    return [*argv, "--port", str(c.port)]


def _run_serve(step: Step) -> None:
    c: ServeWith = step.config
    step.dir.mkdir(parents=True, exist_ok=True)
    atomic_write(step.outputs["command"], shlex.join(serve_command(c)) + "\n")
    if c.probe is not None:
        _write_result(step, probe_server(c))


# ------------------------------------------------------------------------------------------ serving probe


def _probe_chats(c: ServeWith) -> list[Any]:
    """The serve stage's probe as chats: each record of a file asked of every named model, or the chats given."""
    from lmforge.serve.probe import Chat

    if isinstance(c.probe, ProbeData):
        from lmforge.eval.rewards import is_redirect, read_prompts

        models = [c.probe.model] if isinstance(c.probe.model, str) else c.probe.model
        items = read_prompts(c.probe.data, limit=c.probe.limit)
        return [
            Chat(m, [dict(x) for x in it.messages], is_redirect(it), it.kind) for m in models for it in items
        ]
    return [Chat(p.model, p.messages, p.redirect) for p in c.probe or []]


def probe_server(c: ServeWith) -> dict[str, Any]:
    """Serve the model (adapters, policy, routes) in-process and ask it the probe's chats over HTTP
    (serve/probe.py): per served name, redirect questions sent to real care and the rules the policy applied."""
    from lmforge.infer.engine import Engine
    from lmforge.serve.app import create_app
    from lmforge.serve.policy import load_policy
    from lmforge.serve.probe import probe
    from lmforge.serve.traffic import Route

    name = c.name or Path(c.model).resolve().name
    app = create_app(Engine.from_dir(c.model), name, adapters=c.adapters, base_dir=c.model,
                     policy=load_policy(c.policy) if c.policy is not None else None,
                     routes=[Route.parse(r) for r in c.route])  # fmt: skip
    asked = probe(app, _probe_chats(c), c.max_new_tokens)
    return {"command": shlex.join(serve_command(c)), "served": name, "adapters": list(c.adapters),
            "policy": str(c.policy) if c.policy is not None else None, **asked}  # fmt: skip


RUNNERS: dict[str, Callable[[Step], None]] = {
    "synth": _run_synth,
    "tokenizer": _run_tokenizer,
    "prepare": _run_prepare,
    "pretrain": _run_training,
    "finetune": _run_training,
    "align": _run_training,
    "rag-index": _run_rag_index,
    "eval": _run_eval,
    "call": _run_call,
    "serve": _run_serve,
}
