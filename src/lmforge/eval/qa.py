"""Question answering by generation: exact-match accuracy of a model's greedy answers, overall and per group.

Two kinds of expected answer, from the data itself:
- a fact (`value` beside `messages`, as in the synthetic world's `eval_qa.jsonl`): correct when the answer's
  first sentence contains it (case and spacing ignored), since a full-sentence reply wraps the fact in words;
  only the first sentence, so a model that does not end its turn and runs on through a person's other facts
  gets no credit for the one it was not asked (a value never holds ".", "!" or "?");
- GSM8K's final answer (`#### N`): correct when the last number of the answer (or the number after its own
  `####`) equals N.
Other chat data is scored on the whole reply (normalised). Prompts go through the model's chat template, the
same renderer as training, so what is measured is what the fine-tuned format produces.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.data.formats import detect_format, to_examples
from lmforge.data.readers import read_records
from lmforge.errors import LmforgeError
from lmforge.eval.stats import wilson

Match = Literal["contains", "number", "exact"]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_SENTENCE_END = re.compile(r"[.!?\n]")


@dataclass(frozen=True)
class QAItem:
    """One question: the prompt messages (ending with the user turn), the expected answer, how to match it."""

    messages: tuple[dict[str, str], ...]
    expected: str
    match: Match
    group: str | None = None
    where: str = ""
    """FILE:LINE of its record, for messages."""
    fields: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Its record's other fields (e.g. the person asked about, which `rag eval` finds gold documents by)."""


def read_qa(path: Path, limit: int | None = None, groups: set[str] | None = None) -> list[QAItem]:
    """Questions of a chat/GSM8K file: every record's turns before its last reply, and what that reply must hold.

    `limit` keeps the first questions of each `group` (records without one form one group); `groups` keeps
    only those groups.
    """
    records = list(read_records(path))
    fmt = detect_format(records[:20])
    examples = list(to_examples(records, fmt))
    if len(examples) != len(records):
        raise LmforgeError(f"{path}: expected one question per record ({fmt} format)")
    items: list[QAItem] = []
    taken: dict[str | None, int] = defaultdict(int)
    for record, ex in zip(records, examples, strict=True):
        if ex.kind != "chat":
            raise LmforgeError(f"{record.where}: a {ex.kind} record; expected a question with its answer")
        data: dict[str, Any] = record.data if isinstance(record.data, dict) else {}
        group = data.get("group")
        if (groups is not None and group not in groups) or (limit is not None and taken[group] == limit):
            continue
        taken[group] += 1
        *prompt, reply = ex.messages
        if ex.answer is not None:
            expected, match = ex.answer, "number"
        elif isinstance(data.get("value"), str):
            expected, match = data["value"], "contains"
        else:
            expected, match = reply["content"], "exact"
        fields = {k: v for k, v in data.items() if k != "messages"}
        items.append(QAItem(tuple(prompt), expected, match, group, record.where, fields))
    return items


def is_correct(answer: str, item: QAItem) -> bool:
    """Whether a generated answer matches the item's expected answer (by the item's rule)."""
    if item.match == "number":
        own = answer.rpartition("####")[2] if "####" in answer else answer
        numbers = _NUMBER.findall(own)
        return bool(numbers) and _number(numbers[-1]) == _number(item.expected)
    if item.match == "contains":
        return _normal(item.expected) in _normal(_SENTENCE_END.split(answer.lstrip(), maxsplit=1)[0])
    return _normal(answer) == _normal(item.expected)


def turn_end_ids(tok: Any) -> set[int]:
    """The chat template's end-of-turn ids (e.g. <|im_end|>), not EOS: a base model ends text with EOS, a chat
    model must learn to end its turn (EOS itself when it is the template's only end marker)."""
    return (set(tok.eot_ids) - {tok.eos_id}) or {tok.eos_id}


def greedy_completions(
    engine: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int = 32
) -> list[Any]:
    """Greedy completions (lmforge.infer.engine.Completion) of token-id prompts, `batch_size` at a time, in
    order: what every evaluation that generates decodes with."""
    from lmforge.infer.sampling import GenerationConfig

    cfg = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    out: list[Any] = []
    for start in range(0, len(prompts), batch_size):
        out += engine.generate([list(p) for p in prompts[start : start + batch_size]], cfg)
    return out


def exact_match(
    engine: Any,
    items: list[QAItem],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 32,
    chat: bool = True,
    retriever: Any = None,
) -> dict:
    """Greedy answers to every item (batched; through the chat template, or with `chat=False` the last message
    as plain text for a base model to continue): accuracy overall and per group (with 95% Wilson intervals), a
    few examples, and under "answers" every item's question, group, expected value, answer and verdict. With a
    `retriever` (lmforge.rag.prompt.Retriever), each question gets its passages and each answer its citations."""
    from lmforge.infer.prompts import prompt_ids

    room = engine.config.max_position_embeddings - max_new_tokens - engine.model.extra_positions
    tok = engine.tokenizer
    turn_end = turn_end_ids(tok)
    if retriever is not None:
        from lmforge.rag.prompt import rag_prompt_ids

        prompts = [rag_prompt_ids(tok, retriever, list(it.messages), room) for it in items]
        ids, rags = [p[0] for p in prompts], [p[1] for p in prompts]
    else:
        ids = [prompt_ids(engine, list(it.messages) if chat else it.messages[-1]["content"], chat=chat,
                          system=None, room=room, truncate=True) for it in items]  # fmt: skip
        rags = [None] * len(items)
    hits: dict[str | None, list[int]] = defaultdict(lambda: [0, 0])
    stopped, examples, answers = 0, [], []
    completions = greedy_completions(engine, ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
    for item, completion, rag in zip(items, completions, rags, strict=True):
        ok = is_correct(completion.text, item)
        for key in (None, item.group) if item.group is not None else (None,):
            hits[key][0] += ok
            hits[key][1] += 1
        stopped += completion.stop_token in turn_end
        answers.append({"question": item.messages[-1]["content"], "group": item.group,
                        "expected": item.expected, "answer": completion.text, "correct": ok,
                        "ended": completion.stop_token in turn_end})  # fmt: skip
        if rag is not None:
            answers[-1]["passages"] = [h.chunk.text for h in rag.passages]
            answers[-1]["citations"] = rag.citations(completion.text)
        if len(examples) < 3:
            question = item.messages[-1]["content"]
            examples.append({"question": question, "expected": item.expected, "answer": completion.text,
                             "correct": ok})  # fmt: skip
    total = hits[None]
    return {
        "questions": total[1],
        "accuracy": total[0] / max(total[1], 1),
        "by_group": {
            g: h[0] / h[1] for g, h in sorted(hits.items(), key=lambda kv: str(kv[0])) if g is not None
        },
        "intervals": {str(g) if g is not None else "all": wilson(*h) for g, h in hits.items()},
        "ended_with_end_of_turn": stopped / max(total[1], 1),
        "examples": examples,
        "answers": answers,
    }


def _normal(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None
