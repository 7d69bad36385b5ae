"""Knowledge probes on the synthetic world: does a model complete a person's fact (storage), with intervals.

The storage probe asks a plain language model (no chat template) to continue the world's answer sentence up
to the fact, "Quentin Yarwood was born in", and counts it right when the greedy continuation holds the fact.
The prompt is one sentence with no biography before it, so a model that learned a biography by its position
in the stream, not by the name, cannot lean on the preceding text.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from lmforge.data.world_phrases import ANSWERS, QUESTIONS
from lmforge.eval.qa import QAItem, exact_match
from lmforge.eval.stats import wilson


def first_people(world: dict[str, Any], groups: tuple[str, ...], limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` people (all when None) of each of `groups`, in the world's order."""
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for person in world["people"]:
        group = person["group"]
        if group in groups and (limit is None or taken[group] < limit):
            taken[group] += 1
            chosen.append(person)
    return chosen


def completion_prompts(world: dict[str, Any], groups: tuple[str, ...], limit: int | None) -> list[dict]:
    """The probe's prompts: for the first `limit` people of each group, each attribute's answer sentence cut
    before the fact: {"prompt", "value", "group", "attribute", "person"}."""
    return [
        {"prompt": ANSWERS[attr].split("{v}")[0].format(name=person["name"]).rstrip(), "value": person[attr],
         "group": person["group"], "attribute": attr, "person": person["name"]}
        for person in first_people(world, groups, limit)
        for attr in world["attributes"]
    ]  # fmt: skip


def question_items(world: dict[str, Any], groups: tuple[str, ...], limit: int | None) -> list[QAItem]:
    """Questions about the first `limit` people of each group in the world's trained phrasings (each question
    the next phrasing in turn): new people asked in the shapes SFT taught, where `eval_qa.jsonl`'s held-out
    phrasing also asks for words the model never saw in a question."""
    phrasings = world["train_paraphrases"]
    items = []
    for person in first_people(world, groups, limit):
        for attr in world["attributes"]:
            question = QUESTIONS[attr][phrasings[len(items) % len(phrasings)]].format(name=person["name"])
            items.append(
                QAItem(({"role": "user", "content": question},), person[attr], "contains", person["group"])
            )
    return items


def fact_completion(
    model_dir: str | Path,
    world: dict[str, Any],
    *,
    groups: tuple[str, ...] = ("A", "B"),
    limit: int | None = None,
    max_new_tokens: int = 12,
) -> dict[str, Any]:
    """The storage probe on a base model directory: accuracy per group and per attribute (each with its 95%
    interval) and a few examples."""
    from lmforge.infer.engine import Engine

    prompts = completion_prompts(world, groups, limit)
    items = [QAItem(({"role": "user", "content": p["prompt"]},), p["value"], "contains", p["group"])
             for p in prompts]  # fmt: skip
    engine = Engine.from_dir(model_dir, device="cpu")
    result = exact_match(engine, items, max_new_tokens=max_new_tokens, batch_size=64, chat=False)
    by_attribute: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p, answer in zip(prompts, result["answers"], strict=True):
        by_attribute[p["attribute"]][0] += answer["correct"]
        by_attribute[p["attribute"]][1] += 1
    return {
        "by_group": {g: result["intervals"][g] for g in groups if g in result["intervals"]},
        "by_attribute": {a: wilson(*h) for a, h in by_attribute.items()},
        "examples": result["examples"],
    }
