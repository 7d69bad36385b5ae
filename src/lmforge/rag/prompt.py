"""Retrieved passages into a conversation, through the model's own chat template, and citations out of the answer.

The passages enter as a numbered context block appended to the system turn (a new system turn when there is
none; the last user turn when the template refuses a system role), with an instruction to answer from them and
cite them as [1], [2]. Passages below the relevance threshold are left out; with none left the model is told that
nothing supports an answer and the response notes it. When the rendered prompt does not fit the room the answer
needs, passages are dropped lowest-ranked first, and the response says how many.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.rag.index import Hit, Mode, RagIndex

INSTRUCTION = (
    "Answer from the numbered passages below and cite the ones you use as [1], [2]. If they do not contain the "
    "answer, say that you do not know."
)
NO_PASSAGE = "No passage in the knowledge base supports an answer to this question: say that you do not know."
MIN_COSINE = 0.25  # below it a passage is not relevant (all-MiniLM-L6-v2: unrelated sentences score ~0-0.2)
_CITE = re.compile(r"\[(\d+)\]")


@dataclass
class RagPrompt:
    """A conversation with its passages: the messages to render, the passages given (numbered from 1), how many
    were dropped to fit, and a note for the response (None when all went well)."""

    messages: list[dict[str, str]]
    passages: list[Hit] = field(default_factory=list)
    dropped: int = 0
    note: str | None = None

    def citations(self, answer: str) -> list[dict[str, Any]]:
        """Each passage given: number, document, span, scores, and whether `answer` cites it as [n]."""
        cited = {int(n) for n in _CITE.findall(answer)}
        return [{"index": i, "doc_id": h.chunk.doc_id, "chunk_id": h.chunk.id, "span": [h.chunk.start, h.chunk.end],
                 "score": h.score, "cosine": h.cosine, "bm25": h.bm25, "cited": i in cited}
                for i, h in enumerate(self.passages, 1)]  # fmt: skip


class Retriever:
    """An index and how to use it: `k` passages by `mode`, relevant above `min_score` (the cosine when the index
    has vectors, else the BM25 score)."""

    def __init__(
        self, index: RagIndex, *, k: int = 5, mode: Mode | None = None, min_score: float | None = None
    ) -> None:
        self.index, self.k, self.mode = index, k, mode
        self.min_score = (
            min_score if min_score is not None else (MIN_COSINE if index.vectors is not None else 0.0)
        )

    def relevant(self, hit: Hit) -> bool:
        """Whether a hit passes the threshold."""
        score = hit.cosine if hit.cosine is not None else hit.bm25
        return score is not None and score > 0 and score >= self.min_score

    def prompt(
        self, messages: Sequence[dict[str, str]], fits: Callable[[list[dict[str, str]]], bool]
    ) -> RagPrompt:
        """`messages` with the passages for their last user turn, as many as `fits` (the rendered prompt leaves
        the answer its room) allows."""
        users = [m for m in messages if m.get("role") == "user"]
        if not users:
            raise LmforgeError("RAG needs a user turn to retrieve for")
        found = self.index.search(users[-1]["content"], self.k, self.mode, cosines=True)
        hits = [h for h in found if self.relevant(h)]
        if not hits:
            out = RagPrompt(with_context(messages, NO_PASSAGE), note="no supporting passage found")
            if not fits(out.messages):
                raise LmforgeError("the conversation does not fit the model's context with RAG's note")
            return out
        kept = list(hits)
        while kept and not fits(with_context(messages, context_block(kept))):
            kept.pop()  # the lowest-ranked first
        dropped = len(hits) - len(kept)
        if not kept:
            raise LmforgeError(
                "the conversation with even one passage does not fit the model's context: shorten it, lower "
                "max_tokens, or index shorter chunks (--chunk-tokens)"
            )
        note = f"{dropped} lower-ranked passage(s) dropped to fit the context" if dropped else None
        return RagPrompt(with_context(messages, context_block(kept)), kept, dropped, note)


def context_block(hits: Sequence[Hit]) -> str:
    """The instruction and the numbered passages."""
    return "\n\n".join([INSTRUCTION, *(f"[{i}] {h.chunk.text}" for i, h in enumerate(hits, 1))])


def with_context(messages: Sequence[dict[str, str]], block: str) -> list[dict[str, str]]:
    """The messages with `block` at the end of the system turn (a new first turn when there is none)."""
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{block}"
    else:
        out.insert(0, {"role": "system", "content": block})
    return out


def in_user_turn(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """A context block moved from the system turn into the last user turn (templates without a system role)."""
    out = [dict(m) for m in messages]
    system = out.pop(0)["content"] if out and out[0]["role"] == "system" else ""
    last = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last]["content"] = f"{system}\n\nQuestion: {out[last]['content']}"
    return out


def rag_prompt_ids(
    tokenizer: Any, retriever: Retriever, messages: Sequence[dict[str, str]], room: int
) -> tuple[list[int], RagPrompt]:
    """The ids of `messages` with their passages, rendered by the tokenizer's chat template (the context block in
    the system turn, or in the last user turn when the template refuses a system role), at most `room` tokens."""
    from lmforge.chat import render_chat

    def render(msgs: list[dict[str, str]]) -> list[int]:
        try:
            return render_chat(tokenizer, msgs, add_generation_prompt=True).ids
        except LmforgeError:
            if msgs[0]["role"] != "system" or messages[0].get("role") == "system":
                raise
            return render_chat(tokenizer, in_user_turn(msgs), add_generation_prompt=True).ids

    rag = retriever.prompt(messages, lambda msgs: len(render(msgs)) <= room)
    return render(rag.messages), rag


def augment(
    retriever: Retriever, records: Iterable[dict[str, Any]], *, cite: bool = False
) -> Iterator[dict[str, Any]]:
    """Chat records with the passages for their question in the system turn, exactly as `--rag` puts them at
    inference (for fine-tuning a model to answer from passages); other fields are kept. With `cite`, a record's
    answer gets " [n]" for each passage holding the fact it states (its record's "value", else the answer's
    capitalised words and numbers that the question does not have), so the model learns to cite."""
    for record in records:
        messages = [dict(m) for m in record["messages"]]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        prompt = retriever.prompt(messages[: last_user + 1], lambda _: True)
        answer = messages[last_user + 1 :]
        if cite and answer:
            facts = _facts(record.get("value"), answer[0]["content"], messages[last_user]["content"])
            marks = [f"[{i}]" for i, h in enumerate(prompt.passages, 1)
                     if facts and all(f in h.chunk.text.lower() for f in facts)]  # fmt: skip
            if marks:
                answer[0]["content"] = f"{answer[0]['content']} {''.join(marks)}"
        yield {**record, "messages": prompt.messages + answer}


def _facts(value: Any, answer: str, question: str) -> list[str]:
    """What an answer asserts, lower-cased: `value` when given, else its names and numbers not in the question."""
    if isinstance(value, str) and value.strip():
        return [value.lower()]
    asked = set(re.findall(r"\w+", question.lower()))
    words = (w.lower().rstrip(",") for w in re.findall(r"\b(?:[A-Z]\w*|\d[\d,]*)", answer))
    return [w for w in words if w not in asked]
