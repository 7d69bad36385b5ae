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
from lmforge.report import SectionTable

Messages = Sequence[dict[str, str]]


def _target(model: str | Path, adapter: str | Path | None = None) -> Target:
    return Target(Path(model), Path(adapter) if adapter else None)


def _rows(values: dict[str, np.ndarray], base: str, stat: Any = None) -> dict[str, Any]:
    """Each model's figure with its interval, and its paired difference from `base`'s."""
    out = {}
    for name, v in values.items():
        out[name] = bootstrap(v, stat)
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


# ------------------------------------------------------------------------------------- how sections read


WHERE = {"A": "in SFT + pretraining", "B": "in pretraining only", "C": "never seen: the control"}


def ci(r: dict[str, Any], pct: bool = True) -> str:
    """A figure with its 95% interval: a Wilson record ({accuracy, ci95}) or a bootstrap one ({value, ci95})."""
    value = r["accuracy"] if "accuracy" in r else r["value"]
    low, high = r["ci95"]
    if pct:
        return f"{100 * value:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
    return f"{value:.3g} [{low:.3g}, {high:.3g}]"


def delta(r: dict[str, Any], pct: bool = True) -> str:
    """A row's paired change from the base with its interval, or "-" for the base itself."""
    d = r.get("delta")
    if d is None:
        return "-"
    low, high = d["ci95"]
    if pct:
        return f"{100 * d['value']:+.1f} pts [{100 * low:+.1f}, {100 * high:+.1f}]"
    return f"{d['value']:+.3g} [{low:+.3g}, {high:+.3g}]"


def section_tables(results: dict[str, Any]) -> list[SectionTable]:
    """The demo's sections (a)-(f) and serving, from its stages' results ({stage name: result}), in report order;
    a section whose stage is absent is left out."""
    from lmforge.eval.compare import table as compare_table

    out = []
    if k := results.get("knowledge"):
        seen = k["after_sft_trained_phrasings"]
        rows = [(f"{g} ({WHERE[g]})", ci(k["storage"]["by_group"][g]) if g in k["storage"]["by_group"] else "-",
                 ci(after), ci(seen[g]) if g in seen else "-") for g, after in k["after_sft"].items()]  # fmt: skip
        b, c = k["after_sft"]["B"], k["after_sft"]["C"]
        verdict = "above" if b["ci95"][0] > c["ci95"][1] else "not clearly above"
        out.append(SectionTable(
            "knowledge", "(a) knowledge: pretraining stores facts, fine-tuning on A's Q&A extracts B's",
            ("group", "completes its facts (base)", "after SFT on A: held-out phrasing", "after SFT on A: trained phrasings"),
            rows, [f"B is {verdict} the never-pretrained control C; answering with each attribute's most common value "
                   f"scores {k['chance']:.1%}"]))  # fmt: skip
    if b := results.get("behaviour"):
        care = b["redirect_to_care"]
        readings = [b["reading"], f"medical referral rule (a dose, a diagnosis or an emergency sent to real care), "
                    f"{care['base']['n']} questions: base {ci(care['base'])}, medical SFT {ci(care['medical SFT'])}, "
                    f"change {delta(care['medical SFT'])}"]  # fmt: skip
        out.append(SectionTable("behaviour", "(b) behaviour: what fine-tuning changed (paired 95% intervals)",
                                ("probe", "family", "base", "after SFT on A", "delta [95% CI]"),
                                [tuple(r) for r in compare_table(b)], readings))  # fmt: skip
    if ladder := results.get("facts-c"):
        rows = [(r["rung"], ci(r["quality"]), f"{r['cost']['train_tokens']:,}", f"{r['cost']['setup_seconds']:.1f}",
                 f"{r['latency_ms']['p50']:.1f}", f"{r['memory']['added_bytes']:,}") for r in ladder["rungs"]]  # fmt: skip
        rec = ladder["recommendation"]
        out.append(SectionTable("new-facts", "(c) new facts for C: prompt → RAG → LoRA → LoRA + RAG (the ladder)",
                                ("rung", "exact match [95% CI]", "tokens trained", "setup s", "p50 ms/answer",
                                 "bytes added"), rows, [f"recommended: {rec['rung']}: {rec['why']}"]))  # fmt: skip
    if f := results.get("forgetting"):
        rows = [(text, ci(f[text]["base"], False), ci(f[text]["LoRA"], False), delta(f[text]["LoRA"], False),
                 ci(f[text]["full"], False), delta(f[text]["full"], False)) for text in ("general text", "medical corpus")]  # fmt: skip
        out.append(SectionTable("forgetting-lora-full", "(d) forgetting: full fine-tuning against LoRA on the medical Q&A",
                                ("perplexity", "base", "LoRA", "change", "full", "change"), rows,
                                [f"general-text perplexity: LoRA {f['LoRA forgetting_pct']:+.1f}%, full "
                                 f"{f['full forgetting_pct']:+.1f}%"]))  # fmt: skip
    if a := results.get("alignment"):
        rows = [("reward model: held-out pairs ranked right", ci(a["reward_accuracy"]), str(a["reward_steps"])),
                ("DPO: implicit reward on held-out pairs", ci(a["dpo_pair_accuracy"]), str(a["dpo_steps"]))]  # fmt: skip
        if a.get("win_rate_interval"):
            rows.append((f"DPO vs the SFT it started from, {a['prompts']} medical questions (judge: the reward "
                         "model), wins", ci(a["win_rate_interval"]), str(a["dpo_steps"])))  # fmt: skip
        out.append(SectionTable("alignment", "(e) alignment: a reward model, and DPO from the medical SFT",
                                ("measure", "value [95% CI]", "steps"), rows))  # fmt: skip
    if i := results.get("inference"):
        rows = [(name, ci(r["distinct_2"], False), ci(r["repetition"]), ci(r["states_the_fact"]))
                for name, r in i["sampling"].items()]  # fmt: skip
        sp = i["system_prompt"]
        out.append(SectionTable(
            "inference-control", f"(f) inference control: the same weights, decoded differently ({i['prompt_example']!r} …)",
            ("decoding", "distinct-2", "repeated 3-grams", "states the true fact"), rows,
            [f"medical SFT on referral questions: with its safety system prompt {ci(sp['with the system prompt'])}, "
             f"without it {ci(sp['without it'])} ({delta(sp['without it'])})"]))  # fmt: skip
    if s := results.get("serve"):
        rows = [(name, str(c["asked"]), f"{c['redirect_referred']}/{c['redirect_questions']}",
                 f"{c['other_referred']}/{c['other_questions']}", str(c["policy_acted"]),
                 ", ".join(f"{rule} {n}" for rule, n in c["rules"].items()) or "-") for name, c in s["models"].items()]  # fmt: skip
        out.append(SectionTable("serving", "serving: the base and the medical adapter under the medical policy, over HTTP",
                                ("model", "asked", "redirects sent to care", "others sent to care", "policy acted",
                                 "rules"), rows, [f"the same, in a terminal: {s['command']}"]))  # fmt: skip
    return out
