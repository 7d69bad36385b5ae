"""The knowledge probes: Wilson intervals against published values, and the storage probe's prompts."""

from __future__ import annotations

import pytest

from lmforge.data.synthetic import WorldSizes, _build
from lmforge.eval.knowledge import completion_prompts
from lmforge.eval.stats import wilson


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Table I: 81/263 -> 0.2553 to 0.3662; 15/148 -> 0.0624 to 0.1605; 0/10 -> 0 to 0.2775.
    for (k, n), (low, high) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                                (0, 10): (0.0, 0.2775)}.items():  # fmt: skip
        result = wilson(k, n)
        assert result["accuracy"] == k / n and result["n"] == n
        assert result["ci95"] == pytest.approx([low, high], abs=1e-4)
    assert wilson(10, 10)["ci95"][1] == 1.0


def test_completion_prompts_end_where_the_fact_starts():
    import json

    world = json.loads(_build(0, WorldSizes.tiny())[0]["world.json"])
    prompts = completion_prompts(world, ("B",), limit=3)
    assert len(prompts) == 3 * len(world["attributes"]) and {p["group"] for p in prompts} == {"B"}
    people = {p["name"]: p for p in world["people"]}
    for p in prompts:
        person = people[p["person"]]
        assert person["group"] == "B" and p["value"] == person[p["attribute"]]
        assert p["prompt"].startswith(person["name"]) and p["value"] not in p["prompt"]
    city = next(p for p in prompts if p["attribute"] == "birth_city")
    assert city["prompt"] == f"{city['person']} was born in"


def test_a_fact_counts_only_in_the_first_sentence_of_the_answer():
    from lmforge.eval.qa import QAItem, is_correct

    item = QAItem((), "Driftwood Hotels", "contains")
    assert is_correct("Calla Wojcik works for  driftwood hotels.", item)
    assert is_correct(" Driftwood Hotels", item)
    # Running on through the person's other facts earns nothing for the one asked.
    assert not is_correct("Calla Wojcik's hobby is sailing.Calla Wojcik works for Driftwood Hotels.", item)
    assert not is_correct("Calla Wojcik was born in Harrowby\nDriftwood Hotels", item)
