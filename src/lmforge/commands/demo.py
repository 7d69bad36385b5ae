"""`lmforge demo`: the built-in end-to-end run on the synthetic world, and how its sections read in the terminal."""

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmforge.commands.common import (
    JsonFlag,
    emit,
    reflow,
)

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    """Add `demo` to the root app."""
    app.command()(demo)


@reflow
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for what the demo writes.")] = Path(
        "demo-out"
    ),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="The ~21-minute recipe: 5x the pretraining, every held-out question (tighter intervals).",
        ),
    ] = False,
    pretrain_steps: Annotated[
        int | None,
        typer.Option(
            help="Pretraining steps on the synthetic world [default: the recipe's].", show_default=False
        ),
    ] = None,
    sft_steps: Annotated[
        int | None,
        typer.Option(
            help="LoRA fine-tuning steps on group A's Q&A [default: the recipe's].", show_default=False
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo an earlier demo in --out (unchanged data is reused).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Run the built-in demo end to end (no downloads).

    Today: synthesise the world, train its tokenizer, prepare its datasets (pretraining text, SFT chats,
    medical Q&A, preference pairs), pretrain a 1.1M Llama on the world's biographies with group A's Q&A
    mixed in, probe which facts it stored, generate from it at two temperatures (the same weights, steered
    only by sampling), LoRA-fine-tune it on group A's Q&A and print section (a): exact-match answers about B
    (facts only in pretraining) against C (never pretrained: the control), with 95% intervals, plus
    end-of-turn and the forgetting delta; then build a ~14M Llama for the tokenizer, save it as a Hugging Face
    directory, reload it bit-exactly, inspect it and the real all-MiniLM-L6-v2, and compare sentences with
    MiniLM embeddings computed by lmforge's BERT. About 4.5 minutes on 2 cores (--full: about 21). It grows with
    each lmforge stage.
    """
    from lmforge.demo import run_demo

    result = run_demo(out, seed, pretrain_steps, sft_steps, overwrite=overwrite, full=full)
    if as_json:
        emit(result, as_json=True)
        return
    console = Console()
    console.rule("1. the synthetic world: records per file (bytes for the others)")
    emit(result["world"], as_json=False)
    console.rule("2. its byte-level BPE tokenizer")
    emit(result["tokenizer"], as_json=False)
    console.rule("3. prepared datasets (token shards + manifest; id = dataset version)")
    table = Table("dataset", "id", "kind", "documents", "tokens", "trained-on tokens")
    for name, d in result["datasets"].items():
        table.add_row(
            name, d["id"], d["kind"], f"{d['documents']:,}", f"{d['tokens']:,}", f"{d['trained_tokens']:,}"
        )
    console.print(table)
    console.rule("4. pretraining on the world (the one training loop)")
    emit(result["pretrain"], as_json=False)
    _print_knowledge(console, result["knowledge"])
    steering = result["steering"]
    console.rule(f"5. inference control: the same weights at two temperatures ({steering['prompt']!r})")
    for name, info in steering.items():
        if name != "prompt":
            console.print(
                f"{name}: {info['distinct_samples']}/4 distinct samples, distinct-2 {info['distinct_bigrams']}"
            )
            for text in info["samples"]:
                console.print(f"  … {escape(text)}", highlight=False)
    sft = result["sft"]
    console.rule("6. fine-tuning teaches the format, pretraining the knowledge (LoRA SFT on A's Q&A)")
    console.print(
        f"LoRA: {sft['trainable_params']:,} of {sft['total_params']:,} parameters trained; chat val loss "
        f"{sft['val_loss']['before']:.3f} → {sft['val_loss']['after']:.3f}"
    )
    table = Table("held-out questions", "before SFT", "after SFT")
    for group, accuracy in sft["exact_match"].items():
        table.add_row(
            f"group {group} ({WHERE[group]})", f"{accuracy['before']:.1%}", f"{accuracy['after']:.1%}"
        )
    table.add_row(
        "answers ending with end-of-turn",
        f"{sft['ends_turn']['before']:.1%}",
        f"{sft['ends_turn']['after']:.1%}",
    )
    console.print(table)
    f = sft["forgetting"]
    if "increase_pct" in f:
        console.print(
            f"forgetting: pretraining-text perplexity {f['perplexity_before']:.2f} → {f['perplexity_after']:.2f} "
            f"({f['increase_pct']:+.1f}%)"
        )
    for example in sft["examples_after"][:2]:
        console.print(f"  Q: {escape(example['question'])}  A: {escape(example['answer'])}", highlight=False)
    console.rule("7. knowledge vs behaviour: lmforge eval compare of the base and the SFT adapter")
    from lmforge.eval.compare import table as compare_table

    grid = Table("probe", "family", "base", "after SFT", "delta [95% CI]")
    for row in compare_table(result["compare"]):
        grid.add_row(*map(escape, row))
    console.print(grid)
    console.print(escape(result["compare"]["reading"]), highlight=False)
    for name, info in result["inspect"].items():
        console.rule(f"8. lmforge inspect: {name}")
        emit(info, as_json=False)
    console.rule("9. all-MiniLM-L6-v2 sentence similarity, computed by lmforge's BERT")
    table = Table("", *[f"s{i}" for i in range(len(result["minilm_similarity"]["sentences"]))])
    for i, (sentence, row) in enumerate(zip(*result["minilm_similarity"].values(), strict=True)):
        table.add_row(f"s{i} {sentence}", *[f"{c:.2f}" for c in row])
    console.print(table)
    console.print(
        f"saved and reloaded {result['model_dir']}: logits bit-exact = {result['reload_bit_exact']}"
    )
    console.print(f"seconds: {result['seconds']}")
    console.print(f"report: {result['report']} (training, evaluations, forgetting, knowledge vs behaviour)")
    model, adapter = result["pretrain"]["model_dir"], result["sft"]["adapter"]
    console.print(
        f"serve the base and the fine-tuned adapter over OpenAI's API: lmforge serve {model} --name world "
        f"--adapter sft={adapter} (then any OpenAI client with base_url http://127.0.0.1:8000/v1 and model "
        "'world' or 'sft', or the chat page at http://127.0.0.1:8000/)",
        highlight=False,
    )


WHERE = {"A": "in SFT + pretraining", "B": "in pretraining only", "C": "never seen: the control"}


def _print_knowledge(console: Console, knowledge: dict[str, Any]) -> None:
    """Section (a): what pretraining stored and what SFT on A extracts for B, against the control."""

    def rate(r: dict[str, Any]) -> str:
        low, high = r["ci95"]
        return f"{r['accuracy']:.1%} [{low:.1%}, {high:.1%}] of {r['n']}"

    console.rule(
        "(a) knowledge: pretraining stores facts, fine-tuning on A's Q&A extracts B's (95% intervals)"
    )
    seen = knowledge["after_sft_trained_phrasings"]
    table = Table("group", "completes its facts (base model)", "after SFT on A: held-out phrasing",
                  "after SFT on A: trained phrasings")  # fmt: skip
    for group, after in knowledge["after_sft"].items():
        storage = knowledge["storage"]["by_group"].get(group)
        table.add_row(f"{group} ({WHERE[group]})", rate(storage) if storage else "-", rate(after),
                      rate(seen[group]) if group in seen else "-")  # fmt: skip
    console.print(table)
    b, c = knowledge["after_sft"]["B"], knowledge["after_sft"]["C"]
    verdict = "above" if b["ci95"][0] > c["ci95"][1] else "not clearly above"
    console.print(
        f"B is {verdict} the never-pretrained control C; answering with each attribute's most common value "
        f"scores {knowledge['chance']:.1%}"
    )
