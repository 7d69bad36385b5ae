"""The synthetic world's medical assistant, measured: its redirect rule and its medical facts.

- `redirect_compliance`: greedy replies to the world's medical questions (`medical_qa.jsonl`), judged by
  `rewards.medical_reward`: a redirect question (emergency, dosage, diagnosis) must send the user to real
  care, any other question must be answered, not refused or sent away. Each share with its 95% Wilson
  interval.
- `fact_questions`: one chat question per disease or drug and fact kind (symptoms, cause, treatment, use,
  side effect) from `world.json`, with the fact as `value` (what the answer's first sentence must hold,
  eval/qa.py's rule) and the disease or drug as `topic` (what `medical_corpus.jsonl`'s articles carry, so
  `rag eval --gold-field topic` finds their gold passages). The questions use the phrasings of
  `medical_qa.jsonl`: they ask what instruction tuning taught, with and without retrieval.

Both are plain functions of paths, for a pipeline's `call` stage (recipes/pipelines/medical.yaml).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.data import world_phrases as wp
from lmforge.errors import LmforgeError
from lmforge.eval.stats import wilson
from lmforge.fileio import atomic_write

FACT_KINDS = ("symptoms", "cause", "treatment", "drug_use", "side_effect")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _join(items: list[str]) -> str:
    # The world's own joining (data/synthetic.py): "a", "a and b", "a, b and c".
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def fact_questions(world: Path, out: Path, kinds: list[str] | None = None) -> dict[str, Any]:
    """Write `out/questions.jsonl`: a question per disease or drug and fact kind (the next phrasing each
    time), with the medical system prompt, the world's answer, `value` (the fact) and `topic`; return counts."""
    kinds = list(kinds or FACT_KINDS)
    if unknown := [k for k in kinds if k not in FACT_KINDS]:
        raise LmforgeError(f"kinds {unknown}: expected some of {', '.join(FACT_KINDS)}")
    path = Path(world) / "world.json"
    try:
        facts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LmforgeError(f"{path}: cannot read the world's ground truth ({e})") from None
    drugs = {d["name"]: d for d in facts["drugs"]}
    records: list[dict[str, Any]] = []

    def add(kind: str, topic: str, value: str, values: dict[str, str]) -> None:
        phrasings = wp.MEDICAL_QUESTIONS[kind]
        question = phrasings[len(records) % len(phrasings)].format(**values)
        answer = wp.MEDICAL_ANSWERS[kind].format(**values)
        messages = [
            {"role": "system", "content": wp.MEDICAL_SYSTEM_PROMPT},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        records.append({"messages": messages, "value": value, "topic": topic, "kind": kind})

    for disease in facts["diseases"]:
        drug = drugs[disease["treatment"]]
        values = {"d": disease["name"], "D": _cap(disease["name"]), "cause": disease["cause"],
                  "symptoms": _join(disease["symptoms"]), "drug": drug["name"], "cls": drug["drug_class"],
                  "form": drug["form"]}  # fmt: skip
        for kind, value in (("symptoms", values["symptoms"]), ("cause", disease["cause"]),
                            ("treatment", drug["name"])):  # fmt: skip
            if kind in kinds:
                add(kind, disease["name"], value, values)
    for drug in facts["drugs"]:
        values = {"drug": drug["name"], "Drug": _cap(drug["name"]), "cls": drug["drug_class"],
                  "treats": _join(drug["treats"]), "side_effect": drug["side_effect"]}  # fmt: skip
        for kind, value in (("drug_use", values["treats"]), ("side_effect", drug["side_effect"])):
            if kind in kinds:
                add(kind, drug["name"], value, values)
    target = Path(out) / "questions.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    by_kind = {k: sum(r["kind"] == k for r in records) for k in kinds}
    return {"questions": str(target), "count": len(records), "by_kind": by_kind}


def medical_replies(
    target: Any,
    items: Sequence[Any],
    *,
    messages: Sequence[Sequence[dict[str, str]]] | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 32,
) -> list[tuple[str, float]]:
    """Greedy replies of `target` (eval.tasks.Target) to medical questions (rewards.PromptItem), each with its
    `rewards.medical_reward` (1.0: the house rule kept); `messages` replaces the items' chats (e.g. without the
    system prompt) while the items still say which questions are redirects."""
    from lmforge.eval.rewards import medical_reward
    from lmforge.eval.tasks import generate_replies

    chats = messages if messages is not None else [it.messages for it in items]
    replies = generate_replies(target.engine(), chats, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [(text, medical_reward(it, text, ended)) for it, (text, ended) in zip(items, replies, strict=True)]


def redirect_compliance(
    model: Path,
    data: Path,
    adapter: Path | None = None,
    limit: int | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Greedy replies to the first `limit` medical questions of `data`: the share of redirect questions sent
    to real care and of the others not refused or sent away (rewards.medical_reward), 95% Wilson intervals."""
    from lmforge.eval.rewards import is_redirect, read_prompts
    from lmforge.eval.tasks import Target

    items = read_prompts(Path(data), limit=limit)
    if not items:
        raise LmforgeError(f"{data}: no questions")
    target = Target(Path(model), Path(adapter) if adapter is not None else None)
    replies = medical_replies(target, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scored = [(it, text, score) for it, (text, score) in zip(items, replies, strict=True)]
    redirect = [s for it, _, s in scored if is_redirect(it)]
    other = [s for it, _, s in scored if not is_redirect(it)]
    examples = [{"question": it.messages[-1]["content"], "kind": it.kind, "redirect": is_redirect(it),
                 "reply": text, "ok": score == 1.0}
                for it, text, score in [*[x for x in scored if is_redirect(x[0])][:3],
                                        *[x for x in scored if not is_redirect(x[0])][:2]]]  # fmt: skip
    return {
        "model": str(model),
        "adapter": str(adapter) if adapter is not None else None,
        "data": str(data),
        "questions": len(items),
        "redirect_referred": wilson(int(sum(redirect)), len(redirect)),
        "other_not_refused": wilson(int(sum(other)), len(other)),
        "examples": examples,
    }
