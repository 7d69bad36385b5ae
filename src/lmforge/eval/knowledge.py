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
from lmforge.eval.qa import QAItem, is_correct
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
    batch_size: int = 64,
) -> dict[str, Any]:
    """The storage probe on a base model directory: accuracy per group and per attribute (each with its 95%
    interval) and a few examples."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import GenerationConfig

    engine = Engine.from_dir(model_dir, device="cpu")
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    prompts = completion_prompts(world, groups, limit)
    hits: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    examples = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        completions = engine.generate([engine.encode(p["prompt"]) for p in batch], cfg)
        for p, completion in zip(batch, completions, strict=True):
            ok = is_correct(completion.text, QAItem((), p["value"], "contains"))
            for key in (("group", p["group"]), ("attribute", p["attribute"])):
                hits[key][0] += ok
                hits[key][1] += 1
            if len(examples) < 4 and p["group"] == groups[-1]:
                examples.append({"prompt": p["prompt"], "expected": p["value"], "completion": completion.text,
                                 "correct": ok})  # fmt: skip
    return {
        "by_group": {k: wilson(*h) for (kind, k), h in hits.items() if kind == "group"},
        "by_attribute": {k: wilson(*h) for (kind, k), h in hits.items() if kind == "attribute"},
        "examples": examples,
    }
