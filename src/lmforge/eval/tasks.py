"""`lmforge eval`'s tasks: each measures one thing a stage may have taught, through the one inference engine
(generation) or the one log-prob path (`eval/loglik.py`), batched, and reports every rate with a 95% bootstrap
interval over its items.

A task returns per-item values (`Measured.items`: metric → one number per item, 0/1 for a rate) and the
statistic of each metric (the mean, unless `Measured.stats` says otherwise: macro-F1, perplexity). `run_task`
turns them into the result document; `eval compare` pairs two models' per-item values on the same items.

| task | data | model | metrics |
|---|---|---|---|
| perplexity | text (any reader format) or a prepared dataset | decoder | perplexity, bits_per_byte |
| qa | chat Q&A (expected reply or `value`) | decoder | accuracy, exact, f1, end_of_turn |
| gsm8k | GSM8K question/answer (`#### N`) | decoder | accuracy |
| classify | text + label | sequence classifier | accuracy, macro_f1 (+ confusion matrix) |
| choice | question, choices, answer | decoder | accuracy, accuracy_norm (by option length) |
| format | chat prompts (+ reference replies) | decoder | end_of_turn, shape, under_length, all |
| preference | prompt/chosen/rejected | reward model, or DPO model + reference | accuracy |
| winrate | prompts | decoder, against another, judged | winrate (+ wins, ties, losses) |
| safety | the probe sets shipped in the package | decoder | refusal, over-refusal, PII leak, injection |
"""

from __future__ import annotations

import datetime
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.eval.stats import bootstrap

TASKS = ("perplexity", "qa", "gsm8k", "classify", "choice", "format", "preference", "winrate", "safety")
_WORDS = re.compile(r"\w+")
_SENTENCES = re.compile(r"[.!?]+(?:\s|$)")


@dataclass
class Measured:
    """What a task measured: per-item values of each metric, and how each metric summarises them."""

    items: dict[str, list[float] | np.ndarray]
    """metric → one value per item (0/1 for a rate), or (n, k) rows for a statistic such as perplexity."""
    stats: dict[str, Callable[[np.ndarray], float]] = field(default_factory=dict)
    """metric → statistic of its rows (default: the mean)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Anything else the result shows: examples, a confusion matrix, counts."""
    ids: list[str] = field(default_factory=list)
    """Each item's place (FILE:LINE) or id, in order: what contamination flags and compare pairs."""
    texts: list[str] = field(default_factory=list)
    """Each item's text as the model saw it (question, prompt): what the contamination check reads."""


@dataclass(frozen=True)
class Target:
    """A model to evaluate: a directory and an optional adapter on it; `compile` compiles its decode step."""

    model: Path
    adapter: Path | None = None
    compile: bool = False

    def engine(self, device: str | None = None) -> Any:
        """The inference engine on this model (+ adapter)."""
        from lmforge.infer.engine import Engine

        return Engine.from_dir(self.model, adapter=self.adapter, device=device, compile=self.compile)

    @property
    def name(self) -> str:
        """MODEL or MODEL+ADAPTER, for tables."""
        return str(self.model) + (f"+{self.adapter}" if self.adapter else "")


def metrics_of(measured: Measured) -> dict[str, dict[str, Any]]:
    """Each metric's value with its 95% bootstrap interval and n."""
    return {name: bootstrap(values, measured.stats.get(name)) for name, values in measured.items.items()}


# ----------------------------------------------------------------------------------------- generation


def generate_replies(
    engine: Any, prompts: Sequence[Sequence[dict[str, str]]], *, max_new_tokens: int, batch_size: int = 32
) -> list[tuple[str, bool]]:
    """Greedy replies to chat prompts through the chat template: (text, ended its turn) each, in order."""
    from lmforge.eval.qa import greedy_completions, turn_end_ids
    from lmforge.infer.prompts import prompt_ids

    room = engine.context - max_new_tokens
    ids = [prompt_ids(engine, list(p), chat=True, system=None, room=room, truncate=True) for p in prompts]
    ends = turn_end_ids(engine.tokenizer)
    done = greedy_completions(engine, ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [(c.text, c.stop_token in ends) for c in done]


def token_f1(answer: str, expected: str) -> float:
    """SQuAD's token F1 between an answer and the expected one (lower-cased words)."""
    a, e = _WORDS.findall(answer.lower()), _WORDS.findall(expected.lower())
    if not a or not e:
        return float(a == e)
    common = sum(min(a.count(w), e.count(w)) for w in set(a) & set(e))
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(e)
    return 2 * precision * recall / (precision + recall)


def task_qa(target: Target, data: Path, *, limit: int | None, batch_size: int, max_new_tokens: int,
            number: bool = False, **_: Any) -> Measured:  # fmt: skip
    """Greedy answers to chat questions: accuracy by the item's rule (eval/qa.py), exact, token F1, end of turn."""
    from lmforge.eval.qa import _normal, exact_match, read_qa

    items = read_qa(data, limit=limit)
    if number and any(it.match != "number" for it in items):
        bad = next(it for it in items if it.match != "number")
        raise LmforgeError(
            f"{bad.where}: no GSM8K answer ('#### N'); task gsm8k expects GSM8K question/answer"
        )
    engine = target.engine()
    result = exact_match(engine, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    answers = result["answers"]
    measured = {"accuracy": [float(a["correct"]) for a in answers]}
    if not number:
        first = [_SENTENCES.split(a["answer"].strip(), maxsplit=1)[0] if it.match == "contains" else a["answer"]
                 for a, it in zip(answers, items, strict=True)]  # fmt: skip
        measured["exact"] = [
            float(_normal(f) == _normal(it.expected)) for f, it in zip(first, items, strict=True)
        ]
        measured["f1"] = [token_f1(f, it.expected) for f, it in zip(first, items, strict=True)]
    measured["end_of_turn"] = [float(a["ended"]) for a in answers]
    return Measured(measured, details={"examples": result["examples"]}, ids=[it.where for it in items],
                    texts=[it.messages[-1]["content"] for it in items])  # fmt: skip


def task_gsm8k(target: Target, data: Path, **opts: Any) -> Measured:
    """GSM8K: the final number of each greedy answer equals the reference's `#### N`."""
    return task_qa(target, data, number=True, **{**opts, "max_new_tokens": max(opts["max_new_tokens"], 256)})


def _reference_shape(reply: str, reference: str | None) -> bool:
    """The reply has the reference's shape: at most one sentence more than it, and between half and twice its
    length (a one-sentence answer is not an essay, nor a word). No reference: one paragraph, not empty."""
    text = reply.strip()
    if reference is None:
        return bool(text) and "\n\n" not in text
    ref = reference.strip()
    sentences = lambda s: len([p for p in _SENTENCES.split(s) if p.strip()])  # noqa: E731
    return sentences(text) <= sentences(ref) + 1 and 0.5 * len(ref) <= len(text) <= 2 * len(ref)


def task_format(target: Target, data: Path, *, limit: int | None, batch_size: int, max_new_tokens: int,
                max_chars: int = 2000, **_: Any) -> Measured:  # fmt: skip
    """Behaviour: the reply ends its turn, has the taught answer's shape, and stays under `max_chars`."""
    from lmforge.eval.rewards import read_prompts

    prompts = read_prompts(data, limit=limit)
    references = [_reference_reply(p.record) for p in prompts]
    replies = generate_replies(target.engine(), [p.messages for p in prompts], max_new_tokens=max_new_tokens,
                               batch_size=batch_size)  # fmt: skip
    ended = [float(e) for _, e in replies]
    shape = [float(_reference_shape(r, ref)) for (r, _), ref in zip(replies, references, strict=True)]
    short = [float(len(r.strip()) <= max_chars) for r, _ in replies]
    both = [e * s * u for e, s, u in zip(ended, shape, short, strict=True)]
    examples = [{"prompt": p.messages[-1]["content"], "reply": r, "ended": e}
                for p, (r, e) in zip(prompts[:3], replies[:3], strict=False)]  # fmt: skip
    return Measured({"end_of_turn": ended, "shape": shape, "under_length": short, "all": both},
                    details={"examples": examples, "max_chars": max_chars}, ids=[p.id for p in prompts],
                    texts=[p.messages[-1]["content"] for p in prompts])  # fmt: skip


def _reference_reply(record: dict[str, Any]) -> str | None:
    """A record's reference reply: its last assistant message, or `completion`/`chosen`/`response` text."""
    messages = record.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        return str(last.get("content", ""))
    for key in ("completion", "chosen", "response"):
        if isinstance(record.get(key), str):
            return record[key]
    return None


# ------------------------------------------------------------------------------------------ log-probs


def _text_documents(
    data: Path, tokenizer: Any, limit: int | None
) -> tuple[list[list[int]], list[int], list[str]]:
    """Token ids, byte counts and places of each document: a prepared dataset's (decoded for bytes), or any
    text the readers read (text records, and chat records as their rendered text)."""
    from lmforge.data.readers import read_records

    if (data / "manifest.json").is_file():
        from lmforge.data.dataset import PreparedDataset

        ds = PreparedDataset(data)
        docs, sizes, ids = [], [], []
        split = "val" if "val" in ds.manifest["splits"] else "train"  # held-out text when there is some
        for i, doc in enumerate(ds.documents(split, ds.columns()[0])):
            if limit is not None and i == limit:
                break
            docs.append(doc.ids.tolist())
            sizes.append(len(tokenizer.decode(docs[-1]).encode()))
            ids.append(f"{data}#{i}")
        return docs, sizes, ids
    from lmforge.data.formats import detect_format, to_examples

    records = list(read_records(data))
    if limit is not None:
        records = records[:limit]
    texts, where = [], []
    for record, ex in zip(records, to_examples(records, detect_format(records[:20])), strict=False):
        text = ex.text if ex.text is not None else "\n".join(m["content"] for m in ex.messages or ())
        if text:
            texts.append(text)
            where.append(record.where)
    return [tokenizer.encode(t) for t in texts], [len(t.encode()) for t in texts], where


def _perplexity(rows: np.ndarray) -> float:
    """exp(Σ loss / Σ tokens) over (n, 2) rows of (negative log-likelihood, tokens)."""
    return float(math.exp(rows[:, 0].sum() / max(rows[:, 1].sum(), 1)))


def _bits_per_byte(rows: np.ndarray) -> float:
    """Σ loss / ln 2 / Σ bytes over (n, 2) rows of (negative log-likelihood, bytes)."""
    return float(rows[:, 0].sum() / math.log(2) / max(rows[:, 1].sum(), 1))


def task_perplexity(target: Target, data: Path, *, limit: int | None, batch_size: int, **_: Any) -> Measured:
    """Perplexity and bits per byte of documents, each scored whole in disjoint windows of the model's context
    (lm-eval's rolling log-likelihood), summed over documents."""
    from lmforge.eval.loglik import model_window, rolling_logprob

    engine = target.engine()
    docs, sizes, ids = _text_documents(data, engine.tokenizer, limit)
    docs_kept = [(d, s, i) for d, s, i in zip(docs, sizes, ids, strict=True) if d]
    if not docs_kept:
        raise LmforgeError(f"{data}: no text to score; expected text records or a prepared dataset")
    window = model_window(engine.model)
    nll = [
        -rolling_logprob(engine.model, d, context=window, batch_size=batch_size).logprob
        for d, _, _ in docs_kept
    ]
    tokens = [len(d) for d, _, _ in docs_kept]
    per_token = np.column_stack([nll, tokens])  # (n, 2)
    per_byte = np.column_stack([nll, [s for _, s, _ in docs_kept]])  # (n, 2)
    return Measured({"perplexity": per_token, "bits_per_byte": per_byte},
                    stats={"perplexity": _perplexity, "bits_per_byte": _bits_per_byte},
                    details={"documents": len(docs_kept), "tokens": int(sum(tokens))},
                    ids=[i for _, _, i in docs_kept],
                    texts=[engine.tokenizer.decode(d) for d, _, _ in docs_kept])  # fmt: skip


@dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice question: its context, the options and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    answer: int
    where: str


def read_choices(data: Path, limit: int | None = None) -> list[ChoiceItem]:
    """Multiple-choice records: `question` (or `query`/`prompt`/`context`), `choices` (a list of strings),
    `answer` (or `gold`/`label`: an index, or the right choice's text)."""
    from lmforge.data.readers import read_records

    items = []
    for record in read_records(data):
        if limit is not None and len(items) == limit:
            break
        d = record.data if isinstance(record.data, dict) else {}
        context = next((d[k] for k in ("question", "query", "prompt", "context") if isinstance(d.get(k), str)),
                       None)  # fmt: skip
        choices, answer = d.get("choices"), next((d[k] for k in ("answer", "gold", "label") if k in d), None)
        if context is None or not isinstance(choices, list) or len(choices) < 2 or answer is None:
            raise LmforgeError(f"{record.where}: expected a multiple-choice record with question, choices (a list "
                               "of 2 or more strings) and answer (an index or the right choice)")  # fmt: skip
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise LmforgeError(f"{record.where}: answer {answer!r} is not one of the {len(choices)} choices")
        items.append(ChoiceItem(context, tuple(map(str, choices)), answer, record.where))
    if not items:
        raise LmforgeError(f"{data}: no multiple-choice records")
    return items


def choose(engine: Any, items: Sequence[ChoiceItem], *, batch_size: int) -> list[tuple[int, int]]:
    """Each item's likeliest option after its context (" " + option, as lm-eval joins them): (by total
    log-likelihood, by log-likelihood per byte of the option: lm-eval's acc_norm)."""
    from lmforge.eval.loglik import score_continuations

    tok = engine.tokenizer
    pairs = []
    for item in items:
        context = tok.encode(item.context, add_special_tokens=True)  # BOS where the tokenizer adds one
        pairs += [(context, tok.encode(" " + choice)) for choice in item.choices]
    scored = score_continuations(engine.model, pairs, batch_size=batch_size)
    chosen, k = [], 0
    for item in items:
        logp = np.array([s.logprob for s in scored[k : k + len(item.choices)]])
        k += len(item.choices)
        lengths = np.array([len((" " + c).encode()) for c in item.choices])
        chosen.append((int(np.argmax(logp)), int(np.argmax(logp / lengths))))
    return chosen


def task_choice(target: Target, data: Path, *, limit: int | None, batch_size: int, **_: Any) -> Measured:
    """Multiple choice by log-likelihood: the option the model finds likeliest after the question, raw and
    normalised by the option's length in bytes (lm-eval's acc_norm)."""
    items = read_choices(data, limit)
    chosen = choose(target.engine(), items, batch_size=batch_size)
    acc = [float(raw == item.answer) for (raw, _), item in zip(chosen, items, strict=True)]
    norm = [float(per_byte == item.answer) for (_, per_byte), item in zip(chosen, items, strict=True)]
    return Measured({"accuracy": acc, "accuracy_norm": norm}, ids=[it.where for it in items],
                    texts=[it.context for it in items])  # fmt: skip


# ------------------------------------------------------------------------------------- classification


def _macro_f1(rows: np.ndarray) -> float:
    """Macro-F1 over (n, 2) rows of (gold, predicted) class ids: the mean F1 of the classes that occur."""
    gold, pred = rows[:, 0].astype(int), rows[:, 1].astype(int)
    scores = []
    for c in np.union1d(gold, pred):
        tp = float(((gold == c) & (pred == c)).sum())
        fp, fn = float(((gold != c) & (pred == c)).sum()), float(((gold == c) & (pred != c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


@dataclass
class Classifier:
    """A sequence-classifier directory loaded for prediction (CPU): the model, its tokenizer and config."""

    model: Any
    tokenizer: Any
    config: Any

    @classmethod
    def from_dir(cls, path: Path) -> Classifier:
        """Load a `*ForSequenceClassification` directory with labels; anything else is refused, naming it."""
        from lmforge.model.hf import load_model, read_config, read_json_object
        from lmforge.tokenizer import Tokenizer

        declared = (read_json_object(path / "config.json").get("architectures") or ["?"])[0]
        config, architecture = read_config(path)
        if not architecture.endswith("ForSequenceClassification") or getattr(config, "num_labels", 1) < 2:
            raise LmforgeError(
                f"{path}: task classify needs a sequence classifier with labels (a *ForSequenceClassification "
                f"directory, e.g. from `lmforge finetune --set kind=task`); config.json describes {declared}"
            )
        return cls(load_model(path, device="cpu").eval(), Tokenizer.from_dir(path), config)

    @property
    def names(self) -> dict[int, str]:
        """Label id → name (config.json's id2label)."""
        return {int(i): n for i, n in (self.config.id2label or {}).items()}

    def predict(self, texts: Sequence[str], batch_size: int) -> list[int]:
        """The predicted label id of each text, `batch_size` texts per forward."""
        import torch

        config, tok = self.config, self.tokenizer
        pad = config.pad_token_id if config.pad_token_id is not None else 0
        encoder, window = config.model_type == "bert", config.max_position_embeddings
        preds: list[int] = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = [
                    tok.encode(t, add_special_tokens=True)[:window] for t in texts[start : start + batch_size]
                ]
                ids = torch.full((len(batch), max(map(len, batch))), pad)  # (B, T), right-padded
                mask = torch.zeros_like(ids)
                for i, row in enumerate(batch):
                    ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
                extra = {"token_type_ids": torch.zeros_like(ids)} if encoder else {}
                logits = self.model(ids, attention_mask=mask, **extra)  # (B, labels)
                preds += logits.argmax(-1).tolist()
        return preds


def task_classify(target: Target, data: Path, *, limit: int | None, batch_size: int, **_: Any) -> Measured:
    """A sequence classifier's accuracy, macro-F1 and confusion matrix on labelled texts."""
    from lmforge.data.formats import to_examples
    from lmforge.data.readers import read_records

    classifier = Classifier.from_dir(target.model)
    if target.adapter is not None:
        raise LmforgeError(
            f"--adapter {target.adapter}: task classify evaluates a classifier directory as is"
        )
    names = classifier.names
    records = list(read_records(data))[:limit]
    examples = list(to_examples(records, "classification", label_map={n: i for i, n in names.items()}))
    preds = classifier.predict([ex.text for ex in examples], batch_size)
    gold = [ex.label for ex in examples]
    rows = np.column_stack([gold, preds])  # (n, 2)
    labels = sorted(set(gold) | set(preds))
    confusion = [[int(((rows[:, 0] == g) & (rows[:, 1] == p)).sum()) for p in labels] for g in labels]
    return Measured({"accuracy": (rows[:, 0] == rows[:, 1]).astype(float), "macro_f1": rows},
                    stats={"macro_f1": _macro_f1},
                    details={"labels": [names.get(i, str(i)) for i in labels], "confusion": confusion},
                    ids=[r.where for r in records], texts=[ex.text for ex in examples])  # fmt: skip


# ------------------------------------------------------------------------------------------ preference


def _response_pairs(tok: Any, prompt: Sequence[dict[str, str]], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids with the assistant turn opened, the response's ids to its end of turn) by the chat template."""
    from lmforge.chat import render_chat

    head = render_chat(tok, list(prompt), add_generation_prompt=True).ids
    whole = render_chat(tok, [*prompt, {"role": "assistant", "content": response}]).ids
    if whole[: len(head)] != head:
        raise LmforgeError(f"{tok.path}: the chat template renders a reply's prompt differently from the prompt "
                           "alone; expected the prompt's tokens to begin the conversation's")  # fmt: skip
    return list(head), list(whole[len(head) :])


def _reference_of(target: Target, reference: Path | None) -> Target:
    """The model a DPO model's implicit reward is measured against: --ref, else the base under its adapter,
    else the parent its lmforge.json names."""
    if reference is not None:
        return Target(reference)
    if target.adapter is not None:
        return Target(target.model)
    from lmforge.model.hf import read_json_object

    lineage = target.model / "lmforge.json"
    parent = read_json_object(lineage).get("parent") if lineage.is_file() else None
    if not isinstance(parent, str) or not Path(parent).is_dir():
        raise LmforgeError(f"{target.model}: no reference model for the implicit reward (no adapter, and no "
                           "parent directory in lmforge.json); pass --ref MODEL")  # fmt: skip
    return Target(Path(parent))


def task_preference(target: Target, data: Path, *, limit: int | None, batch_size: int,
                    reference: Path | None = None, **_: Any) -> Measured:  # fmt: skip
    """Preference accuracy: a reward model scores the chosen reply above the rejected one; for a decoder (a DPO
    model), its implicit reward log π(y|x) − log π_ref(y|x) does."""
    from lmforge.data.formats import detect_format, to_examples
    from lmforge.data.readers import read_records
    from lmforge.model.hf import read_config

    records = list(read_records(data))[:limit]
    fmt = detect_format(records[:20])
    examples = list(to_examples(records, fmt))
    if not examples or any(ex.kind != "preference" for ex in examples):
        raise LmforgeError(f"{data}: a {fmt} file; task preference expects prompt/chosen/rejected pairs")
    _, architecture = read_config(target.model)
    if architecture.endswith("ForSequenceClassification"):
        from lmforge.eval.rewards import RewardModel

        rm = RewardModel.from_dir(target.model)
        chosen = rm.score([(ex.messages, ex.chosen) for ex in examples], batch_size).numpy()
        rejected = rm.score([(ex.messages, ex.rejected) for ex in examples], batch_size).numpy()
        margin, how = chosen - rejected, "reward model"
    else:
        from lmforge.eval.loglik import score_continuations

        def logps(t: Target) -> np.ndarray:
            engine = t.engine()
            pairs = [_response_pairs(engine.tokenizer, ex.messages, reply)
                     for ex in examples for reply in (ex.chosen, ex.rejected)]  # fmt: skip
            return np.array(
                [s.logprob for s in score_continuations(engine.model, pairs, batch_size=batch_size)]
            )

        ref = _reference_of(target, reference)
        diff = logps(target) - logps(ref)  # (2n,) implicit rewards / β: chosen, rejected, chosen, ...
        margin, how = diff[0::2] - diff[1::2], f"implicit reward against {ref.name}"
    return Measured({"accuracy": (margin > 0).astype(float)},
                    details={"scored_by": how, "mean_margin": float(np.mean(margin))},
                    ids=[r.where for r in records],
                    texts=[ex.messages[-1]["content"] for ex in examples])  # fmt: skip


def task_winrate(target: Target, data: Path, *, limit: int | None, batch_size: int, max_new_tokens: int,
                 against: Target | None = None, judge: str | None = None, **_: Any) -> Measured:  # fmt: skip
    """How often this model's greedy answer beats `against`'s on the same prompts, by a reward-model directory
    or a programmatic reward (facts, gsm8k, medical, format, or module:function): win 1, tie ½, loss 0."""
    from lmforge.eval.rewards import RewardModel, batched, load_reward, read_prompts

    if against is None or judge is None:
        raise LmforgeError("task winrate needs --against MODEL (the model to beat) and --judge (a reward-model "
                           "directory, or a reward: facts, gsm8k, medical, format, module:function)")  # fmt: skip
    prompts = read_prompts(data, limit=limit)
    messages = [p.messages for p in prompts]
    mine = generate_replies(target.engine(), messages, max_new_tokens=max_new_tokens, batch_size=batch_size)
    theirs = generate_replies(
        against.engine(), messages, max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    score = RewardModel.from_dir(judge).as_reward() if Path(judge).is_dir() else batched(load_reward(judge))
    a = np.array(score(prompts, [r for r, _ in mine], [e for _, e in mine]), dtype=float)
    b = np.array(score(prompts, [r for r, _ in theirs], [e for _, e in theirs]), dtype=float)
    outcome = np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))
    counts = {"wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum())}
    return Measured({"winrate": outcome}, details={"against": against.name, "judge": judge, **counts},
                    ids=[p.id for p in prompts], texts=[p.messages[-1]["content"] for p in prompts])  # fmt: skip


def task_safety(target: Target, data: Path | None, *, limit: int | None, batch_size: int, max_new_tokens: int,
                **_: Any) -> Measured:  # fmt: skip
    """The shipped safety probes: refusal of harmful requests, over-refusal of benign ones, PII leakage, and
    prompt injection against a system prompt."""
    from lmforge.eval.safety import load_probes, run_safety, safety_metrics

    if data is not None:
        raise LmforgeError("task safety runs the probe sets shipped with lmforge; drop --data")
    probes = load_probes(limit=limit)
    runs = run_safety(target.engine(), probes, max_new_tokens=max_new_tokens, batch_size=batch_size)
    items = safety_metrics({name: run["outcomes"] for name, run in runs.items()})
    examples = {name: [{"id": i, "reply": r} for i, r in zip(run["ids"][:2], run["replies"][:2], strict=False)]
                for name, run in runs.items()}  # fmt: skip
    return Measured(items, details={"examples": examples})


RUNNERS: dict[str, Callable[..., Measured]] = {
    "perplexity": task_perplexity,
    "qa": task_qa,
    "gsm8k": task_gsm8k,
    "classify": task_classify,
    "choice": task_choice,
    "format": task_format,
    "preference": task_preference,
    "winrate": task_winrate,
    "safety": task_safety,
}


def run_task(
    task: str,
    target: Target,
    data: Path | None,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    check_contamination: bool = True,
    **options: Any,
) -> tuple[dict[str, Any], Measured]:
    """Run one task on a model: the result document (metrics with 95% intervals, details, contamination) and
    what was measured per item."""
    from lmforge import __version__

    if task not in RUNNERS:
        raise LmforgeError(f"--task {task}: expected one of {', '.join(TASKS)}")
    if data is None and task != "safety":
        raise LmforgeError(f"task {task} needs --data PATH")
    if data is not None and not data.exists():
        raise LmforgeError(f"--data {data}: no such file or directory")
    started = time.perf_counter()
    measured = RUNNERS[task](target, data, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             **options)  # fmt: skip
    result: dict[str, Any] = {
        "kind": "eval", "task": task, "model": str(target.model),
        "adapter": str(target.adapter) if target.adapter else None,
        "data": str(data) if data is not None else "lmforge safety probes",
        "n": max((len(v) for v in measured.items.values()), default=0),
        "metrics": metrics_of(measured), **measured.details,
    }  # fmt: skip
    if check_contamination and measured.texts:
        from lmforge.eval.contamination import check_lineage

        result["contamination"] = check_lineage(target, measured.ids, measured.texts)
    result.update(seconds=time.perf_counter() - started, lmforge_version=__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))  # fmt: skip
    return result, measured
