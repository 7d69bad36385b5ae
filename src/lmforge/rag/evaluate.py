"""`lmforge rag eval`: retrieval against gold documents (recall@k, MRR) and, with a model, answer accuracy with
and without retrieval, and how often a correct answer's passages hold its fact."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.eval.qa import QAItem, read_qa
from lmforge.eval.stats import wilson
from lmforge.rag.index import Hit, Mode, RagIndex


def read_questions(
    path: Path, gold_field: str, *, limit: int | None = None, groups: set[str] | None = None
) -> list[tuple[QAItem, str]]:
    """The questions of a QA file (as `eval/qa.py` reads them) with each one's gold value: its `gold_field`,
    which the relevant documents carry as a field of the same name."""
    out = []
    for item in read_qa(path, limit, groups):
        if gold_field not in item.fields:
            raise LmforgeError(
                f"{item.where}: no {gold_field!r} field to find its gold documents by (--gold-field)"
            )
        out.append((item, str(item.fields[gold_field])))
    if not out:
        raise LmforgeError(f"{path}: no questions (check --groups)")
    return out


def retrieval_metrics(
    index: RagIndex, questions: list[tuple[QAItem, str]], gold_field: str, *, k: int, mode: Mode | None
) -> dict[str, Any]:
    """recall@k (a gold chunk among the first k, with its 95% interval) and MRR@k over the questions."""
    if not any(gold_field in c.meta for c in index.chunks):
        raise LmforgeError(f"{index.path}: no indexed document has a {gold_field!r} field (--gold-field)")
    found, reciprocal = 0, 0.0
    for item, gold in questions:
        hits: list[Hit] = index.search(item.messages[-1]["content"], k, mode)
        rank = next((h.rank for h in hits if str(h.chunk.meta.get(gold_field)) == gold), None)
        found += rank is not None
        reciprocal += 1.0 / rank if rank else 0.0
    return {"k": k, "mode": mode or index.modes[-1], f"recall@{k}": wilson(found, len(questions)),
            f"mrr@{k}": reciprocal / len(questions)}  # fmt: skip


def evaluate(
    index_dir: Path,
    qa: Path,
    *,
    k: int = 5,
    mode: Mode | None = None,
    gold_field: str = "person",
    groups: set[str] | None = None,
    limit: int | None = None,
    model: Path | None = None,
    adapter: Path | None = None,
    max_new_tokens: int = 48,
    embedder: Path | None = None,
) -> dict[str, Any]:
    """Retrieval metrics in every mode the index answers (the asked one first), and with `model` the accuracy of
    its greedy answers without and with the passages, and the share of correct RAG answers whose passages hold
    the expected fact."""
    index = RagIndex(index_dir, embedder=embedder)
    questions = read_questions(qa, gold_field, limit=limit, groups=groups)
    modes = [mode] if mode else []
    modes += [m for m in index.modes if m not in modes]
    result: dict[str, Any] = {"index": str(index_dir), "qa": str(qa), "questions": len(questions),
                              "retrieval": {m: retrieval_metrics(index, questions, gold_field, k=k, mode=m)
                                            for m in modes}}  # fmt: skip
    if model is None:
        return result
    from lmforge.eval.qa import exact_match
    from lmforge.infer.engine import Engine
    from lmforge.rag.prompt import Retriever

    engine = Engine.from_dir(model, adapter=adapter)
    items = [item for item, _ in questions]
    start = time.perf_counter()
    without = exact_match(engine, items, max_new_tokens=max_new_tokens)
    middle = time.perf_counter()
    retriever = Retriever(index, k=k, mode=mode)
    with_rag = exact_match(engine, items, max_new_tokens=max_new_tokens, retriever=retriever)
    end = time.perf_counter()
    correct = [a for a in with_rag["answers"] if a["correct"]]
    supported = sum(any(_holds(p, a["expected"]) for p in a["passages"]) for a in correct)
    top = sum(bool(a["passages"]) and _holds(a["passages"][0], a["expected"]) for a in correct)
    result["answers"] = {
        "without_retrieval": without["intervals"]["all"],
        "with_retrieval": with_rag["intervals"]["all"],
        "correct_with_a_passage_holding_the_fact": wilson(supported, len(correct)),
        "correct_with_the_first_passage_holding_the_fact": wilson(top, len(correct)),
        "ms_per_answer_without": (middle - start) / len(items) * 1000,  # batched 32, greedy
        "ms_per_answer_with": (end - middle) / len(items) * 1000,  # retrieval included
        "examples": with_rag["answers"][:3],
    }
    return result


def _holds(passage: str, fact: str) -> bool:
    return " ".join(fact.lower().split()) in " ".join(passage.lower().split())
