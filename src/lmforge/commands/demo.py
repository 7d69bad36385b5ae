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
            help="The longer recipe: 8,000 pretraining steps, every held-out question (tighter intervals).",
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
    start: Annotated[
        str | None,
        typer.Option("--from", help="Run this stage and every one after it again.", metavar="STAGE"),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Run every stage again (unchanged prepared data is reused).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Run the built-in demo end to end (no downloads): the seeds' story, measured.

    The pipeline recipe recipes/pipelines/demo.yaml, each stage in a folder of --out named after it: synthesise
    the world, train its tokenizer, prepare its datasets, pretrain a 1.1M Llama on the biographies with group
    A's Q&A mixed in, then print each section with 95% intervals: (a) knowledge: SFT on A's Q&A answers about B
    (facts only in pretraining) against C (never seen); (b) behaviour: what SFT changed (end of turn, answer
    shape, the medical referral rule); (c) new facts for C: prompt, RAG, LoRA, LoRA + RAG (the ladder); (d)
    forgetting: full fine-tuning against LoRA on the same data; (e) alignment: a reward model and DPO; (f)
    inference control: decoding settings and the system prompt; then the medical adapter served under the
    medical policy and asked through HTTP, a 14M Llama saved and reloaded as a Hugging Face directory, MiniLM
    similarities, and demo-out/report.html. About 6 minutes on 2 cores (--full pretrains 8,000 steps, not
    1,300). A rerun skips every stage whose inputs and config did not change.
    """
    from lmforge.demo import run_demo

    result = run_demo(out, full=full, overwrite=overwrite, start=start, seed=seed, pretrain_steps=pretrain_steps,
                      sft_steps=sft_steps)  # fmt: skip
    if as_json:
        emit(result, as_json=True)
        return
    print_demo(Console(), result)


def print_demo(console: Console, result: dict[str, Any]) -> None:
    """The demo's sections in the terminal, in the report's order."""
    setup = result["summary"]
    console.rule("the synthetic world, its tokenizer and its prepared datasets")
    console.print(f"people per group: {setup['people']}; files: {setup['world']}", highlight=False)
    tok = setup["tokenizer"]
    console.print(
        f"byte-level BPE: {tok['vocab_size']:,} tokens, {tok['bytes_per_token']:.2f} bytes per token"
    )
    table = Table("dataset", "id", "kind", "documents", "tokens", "trained-on tokens")
    for name, d in setup["datasets"].items():
        table.add_row(
            name, d["id"], d["kind"], f"{d['documents']:,}", f"{d['tokens']:,}", f"{d['trained_tokens']:,}"
        )
    console.print(table)
    p = result["pretrain"]
    console.print(
        f"pretraining: {p['params']:,} parameters, {p['steps']:,} steps, {p['tokens']:,} tokens, val loss "
        f"{p['val_loss']:.3f} (unigram {p['unigram_baseline']:.3f}), {p['tokens_per_s']:,.0f} tokens/s",
        highlight=False,
    )
    from lmforge.demo_sections import section_tables

    for section in section_tables(result):
        console.rule(section.title)
        table = Table(*section.header)
        for row in section.rows:
            table.add_row(*map(escape, row))
        console.print(table)
        for reading in section.readings:
            console.print(escape(reading), highlight=False)
    hf = result["llama-14m-world"]
    console.rule("Hugging Face interop: a 14M Llama saved and reloaded; MiniLM by lmforge's BERT")
    console.print(f"{hf['model_dir']}: reloaded logits bit-exact = {hf['reload_bit_exact']}", highlight=False)
    sims = hf["minilm_similarity"]
    table = Table("", *[f"s{i}" for i in range(len(sims["sentences"]))])
    for i, (sentence, row) in enumerate(zip(sims["sentences"], sims["cosine"], strict=True)):
        table.add_row(f"s{i} {sentence}", *[f"{c:.2f}" for c in row])
    console.print(table)
    console.rule("the pipeline (recipes/pipelines/demo.yaml)")
    ran = result["pipeline"]
    table = Table("stage", "kind", "", "seconds")
    for s in ran["stages"]:
        table.add_row(
            s["name"], s["kind"], s["action"], "-" if s["seconds"] is None else f"{s['seconds']:.1f}"
        )
    console.print(table)
    console.print(f"{ran['seconds']:.0f} s in all; report: {result['report']['report']}", highlight=False)
