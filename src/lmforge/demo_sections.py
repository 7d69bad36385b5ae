"""The demo's measured sections beyond knowledge: behaviour (b), forgetting (d), alignment (e) and inference
control (f). Each is a function of the stage outputs it reads (model, adapter and run directories, the world),
returns plain JSON with a 95% interval on every figure, and is what a pipeline recipe's `call` stage runs
(recipes/pipelines/demo.yaml).

Intervals: rates and perplexities get a percentile bootstrap over items (eval/stats.py), a difference between two
models on the same items a paired bootstrap, so what the items share cancels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.eval.stats import bootstrap, paired_delta
from lmforge.eval.tasks import Target, run_task

Messages = Sequence[dict[str, str]]


def _target(model: str | Path, adapter: str | Path | None = None) -> Target:
    return Target(Path(model), Path(adapter) if adapter else None)


def _rows(values: dict[str, np.ndarray], base: str, stat: Any = None) -> dict[str, Any]:
    """Each model's figure with its interval, and its paired difference from `base`'s."""
    out = {}
    for name, v in values.items():
        out[name] = {**bootstrap(v, stat)}
        if name != base:
            out[name]["delta"] = paired_delta(values[base], v, stat)
    return out


# --------------------------------------------------------------------------------------- (b) behaviour


def redirect_items(world: str | Path, limit: int) -> list[Any]:
    """The world's medical questions whose right answer sends the user to real care (dose, diagnosis,
    emergency), the first `limit`; each record's messages start with the medical safety system prompt."""
    from lmforge.eval.rewards import is_redirect, read_prompts

    return [p for p in read_prompts(Path(world) / "medical_qa.jsonl") if is_redirect(p)][:limit]


def referrals(
    target: Target, items: Sequence[Any], messages: Sequence[Messages] | None = None
) -> dict[str, Any]:
    """Greedy replies to redirect questions (`messages` in place of their chats if given) and, per reply, 1.0
    when it sends the user to a doctor, pharmacist or emergency care (the medical reward), else 0:
    {"referred": (n,) array, "replies": [text]}."""
    from lmforge.eval.medical import medical_replies

    scored = medical_replies(target, items, messages=messages)
    return {"referred": np.array([score for _, score in scored]), "replies": [text for text, _ in scored]}


def _referral_rows(runs: dict[str, dict[str, Any]], base: str, questions: Sequence[str]) -> dict[str, Any]:
    """Each run's referral rate with its interval and paired change from `base`'s, and every reply."""
    rows = _rows({name: run["referred"] for name, run in runs.items()}, base)
    rows["replies"] = [{"question": q, **{name: run["replies"][i] for name, run in runs.items()}}
                       for i, q in enumerate(questions)]  # fmt: skip
    return rows


def behaviour(
    base: str, sft_adapter: str, medical_adapter: str, world: str, out: str, limit: int = 40
) -> dict[str, Any]:
    """(b) What fine-tuning taught: the base against its SFT on A's Q&A (`eval compare`: end of turn, the taught
    answer's shape, facts and perplexity for contrast), written to OUT/compare.json; and the base against its medical SFT
    on the redirect rule (a dose, a diagnosis or an emergency gets a referral to real care)."""
    from lmforge.eval.compare import compare
    from lmforge.fileio import atomic_write

    w = Path(world)
    compared = compare(_target(base), _target(base, sft_adapter), qa=w / "eval_qa.jsonl", text=w / "pretrain.jsonl",
                       prompts=w / "eval_qa.jsonl", limit=limit, max_new_tokens=48)  # fmt: skip
    atomic_write(Path(out) / "compare.json", json.dumps(compared, indent=2) + "\n")
    items = redirect_items(world, limit)
    runs = {
        "base": referrals(_target(base), items),
        "medical SFT": referrals(_target(base, medical_adapter), items),
    }
    care = _referral_rows(runs, "base", [p.messages[-1]["content"] for p in items])
    return {"compare": str(Path(out) / "compare.json"), "reading": compared["reading"], "probes": compared["probes"],
            "redirect_to_care": care}  # fmt: skip


# -------------------------------------------------------------------------------------- (c) new facts


def new_facts(base: str, world: str, out: str, steps: int = 300, lr: float = 5e-4, limit: int = 150, seed: int = 0
              ) -> dict[str, Any]:  # fmt: skip
    """(c) New facts for group C (people never in pretraining), the ladder (recipes/ladder/world-c.yaml): the
    prompt alone, RAG over C's biographies (BM25, one passage), LoRA on C's Q&A for `steps`, and LoRA + RAG; exact
    match on `limit` held-out questions with Wilson intervals, cost, latency, and the rung the numbers
    recommend. The ladder's run is OUT/ladder."""
    from lmforge.ladder import LadderTask, run_ladder

    w = Path(world)
    task = LadderTask.model_validate({
        "name": "world-c", "kind": "qa", "model": base,
        "data": {"train": w / "sft_c.jsonl", "eval": w / "eval_qa.jsonl", "groups": ["C"], "limit": limit, "seed": seed},
        "prompt": {"system": "Answer in one sentence with the fact asked for.", "shots_from_train": 0},
        "rag": {"corpus": [w / "bios_c.jsonl"], "k": 1, "dense": False},
        "answer": {"max_new_tokens": 32, "latency_items": 5},
        "finetune": {"lora": {"r": 16, "alpha": 32}, "optim": {"lr": lr, "warmup_steps": 10},
                     "train": {"max_steps": steps, "seq_len": 128, "micro_batch_size": 16, "eval_every": 0, "seed": seed}},
    })  # fmt: skip
    return run_ladder(task, Path(out) / "ladder", overwrite=True)


# -------------------------------------------------------------------------------------- (d) forgetting


def forgetting(base: str, lora_adapter: str, full_model: str, world: str, limit: int = 64) -> dict[str, Any]:
    """(d) Full fine-tuning against LoRA on the same medical data and steps: perplexity of the general
    pretraining text (what is forgotten) and of the medical corpus (what is learned), each with its interval and
    its paired change from the base over the same documents."""
    models = {"base": _target(base), "LoRA": _target(base, lora_adapter), "full": _target(full_model)}
    out: dict[str, Any] = {}
    for name, file in (("general text", "pretrain.jsonl"), ("medical corpus", "medical_corpus.jsonl")):
        measured = {m: run_task("perplexity", t, Path(world) / file, limit=limit, check_contamination=False)[1]
                    for m, t in models.items()}  # fmt: skip
        stat = measured["base"].stats["perplexity"]
        out[name] = _rows({m: np.asarray(x.items["perplexity"]) for m, x in measured.items()}, "base", stat)
    for name in ("LoRA", "full"):
        before, after = out["general text"]["base"]["value"], out["general text"][name]["value"]
        out[f"{name} forgetting_pct"] = 100 * (after - before) / before
    return out


# --------------------------------------------------------------------------------------- (e) alignment


def alignment(reward_run: str, dpo_run: str) -> dict[str, Any]:
    """(e) Read from the two alignment runs: the reward model's accuracy on held-out preference pairs, the DPO
    model's own held-out pair accuracy (implicit reward), and its win rate over the SFT model it started from on
    the medical questions, judged by the reward model (the align stage's `eval.judge`)."""
    rm = json.loads((Path(reward_run) / "results.json").read_text())
    dpo = json.loads((Path(dpo_run) / "results.json").read_text())
    judged = dpo.get("eval", {})
    return {"reward_accuracy": rm["held_out"]["interval"], "reward_steps": rm["steps"],
            "dpo_pair_accuracy": dpo["held_out"]["interval"], "dpo_steps": dpo["steps"],
            "win_rate": judged.get("win_rate"), "win_rate_interval": judged.get("win_rate_interval"),
            "prompts": judged.get("prompts"), "examples": judged.get("examples", [])[:2]}  # fmt: skip


# ------------------------------------------------------------------------------- (f) inference control

SAMPLING = {  # name → GenerationConfig fields: the weights stay the same, only the decoding changes
    "greedy": {"temperature": 0.0},
    "temperature 0.7": {"temperature": 0.7},
    "temperature 1.2": {"temperature": 1.2},
    "temperature 1.2, top-p 0.8": {"temperature": 1.2, "top_p": 0.8},
    "temperature 0.7, repetition penalty 1.3": {"temperature": 0.7, "repetition_penalty": 1.3},
}


def _distinct2(samples: Sequence[Sequence[int]]) -> float:
    """Distinct bigrams over all bigrams of a prompt's samples (distinct-2): 1 = no bigram said twice."""
    grams = [tuple(s[i : i + 2]) for s in samples for i in range(len(s) - 1)]
    return len(set(grams)) / max(len(grams), 1)


def _repetition(tokens: Sequence[int]) -> float:
    """Share of a sample's 3-grams that repeat an earlier 3-gram of the same sample (looping)."""
    grams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def inference_control(base: str, medical_adapter: str, world: str, seed: int = 0, prompts: int = 16,
                      samples: int = 4, limit: int = 40) -> dict[str, Any]:  # fmt: skip
    """(f) Steering without touching weights: for each decoding setting, `samples` continuations of `prompts`
    biography openings (group A), with diversity (distinct-2 per prompt), repetition (per sample) and how
    often a sample states the person's true fact; and the medical SFT's referral rate on redirect questions
    with its safety system prompt against without it."""
    from lmforge.eval.knowledge import completion_prompts
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import GenerationConfig

    facts = json.loads((Path(world) / "world.json").read_text())
    items = completion_prompts(facts, ("A",), None)[:prompts]
    engine = Engine.from_dir(base, device="cpu")
    ids = [engine.encode(p["prompt"]) for p in items]
    settings = {}
    for name, fields in SAMPLING.items():
        n = 1 if fields["temperature"] == 0 else samples
        cfg = GenerationConfig(**fields, n=n, seed=seed, max_new_tokens=32)
        done = engine.generate(ids, cfg)  # prompt 0's n samples first
        per_prompt = [done[i * n : (i + 1) * n] for i in range(len(items))]
        diverse = [_distinct2([c.token_ids for c in group]) for group in per_prompt]
        looping = [_repetition(c.token_ids) for c in done]
        right = [float(item["value"].lower() in c.text.lower()) for item, g in zip(items, per_prompt, strict=True)
                 for c in g]  # fmt: skip
        settings[name] = {"distinct_2": bootstrap(diverse), "repetition": bootstrap(looping),
                          "states_the_fact": bootstrap(right), "example": per_prompt[0][-1].text.strip()}  # fmt: skip
    questions = redirect_items(world, limit)
    without = [[m for m in p.messages if m["role"] != "system"] for p in questions]
    target = _target(base, medical_adapter)
    runs = {
        "with the system prompt": referrals(target, questions),
        "without it": referrals(target, questions, without),
    }
    care = _referral_rows(runs, "with the system prompt", [p.messages[-1]["content"] for p in questions])
    return {"prompt_example": items[0]["prompt"], "samples_per_prompt": samples, "sampling": settings,
            "system_prompt": care}  # fmt: skip


# ------------------------------------------------------------------------------------------------ (g) data


def data_levers(runs: dict[str, str]) -> dict[str, Any]:
    """(g) The two data levers of the knowledge recipe, read from SFT runs that differ only in their base's
    pretraining data ({label: SFT run dir}): exact match on B's held-out questions (facts only in pretraining)
    and C's (the control), with Wilson intervals, and whether B clears the control."""
    out = {}
    for label, run in runs.items():
        after = json.loads((Path(run) / "results.json").read_text())["qa"]["after"]["intervals"]
        out[label] = {
            "B": after["B"],
            "C": after["C"],
            "B_above_C": after["B"]["ci95"][0] > after["C"]["ci95"][1],
        }
    return out
