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


def _ci(r: dict[str, Any], pct: bool = True, digits: int = 1) -> str:
    """A figure with its 95% interval: a Wilson record ({accuracy, ci95}) or a bootstrap one ({value, ci95})."""
    value = r["accuracy"] if "accuracy" in r else r["value"]
    low, high = r["ci95"]
    if pct:
        return f"{100 * value:.{digits}f}% [{100 * low:.{digits}f}, {100 * high:.{digits}f}]"
    return f"{value:.3g} [{low:.3g}, {high:.3g}]"


def _delta(r: dict[str, Any], pct: bool = True) -> str:
    d = r.get("delta")
    if d is None:
        return "-"
    low, high = d["ci95"]
    if pct:
        return f"{100 * d['value']:+.1f} pts [{100 * low:+.1f}, {100 * high:+.1f}]"
    return f"{d['value']:+.3g} [{low:+.3g}, {high:+.3g}]"


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
    _print_knowledge(console, result["knowledge"])
    _print_behaviour(console, result["behaviour"])
    if "facts-c" in result:
        _print_ladder(console, result["facts-c"])
    _print_forgetting(console, result["forgetting"])
    _print_alignment(console, result["alignment"])
    _print_inference(console, result["inference"])
    _print_serving(console, result["serve"])
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


WHERE = {"A": "in SFT + pretraining", "B": "in pretraining only", "C": "never seen: the control"}


def _print_knowledge(console: Console, knowledge: dict[str, Any]) -> None:
    """Section (a): what pretraining stored and what SFT on A extracts for B, against the control."""

    console.rule(
        "(a) knowledge: pretraining stores facts, fine-tuning on A's Q&A extracts B's (95% intervals)"
    )
    seen = knowledge["after_sft_trained_phrasings"]
    table = Table("group", "completes its facts (base model)", "after SFT on A: held-out phrasing",
                  "after SFT on A: trained phrasings")  # fmt: skip
    for group, after in knowledge["after_sft"].items():
        storage = knowledge["storage"]["by_group"].get(group)
        table.add_row(f"{group} ({WHERE[group]})", _ci(storage) if storage else "-", _ci(after),
                      _ci(seen[group]) if group in seen else "-")  # fmt: skip
    console.print(table)
    b, c = knowledge["after_sft"]["B"], knowledge["after_sft"]["C"]
    verdict = "above" if b["ci95"][0] > c["ci95"][1] else "not clearly above"
    console.print(
        f"B is {verdict} the never-pretrained control C; answering with each attribute's most common value "
        f"scores {knowledge['chance']:.1%}"
    )
    for example in knowledge["examples_after"][:2]:
        console.print(f"  Q: {escape(example['question'])}  A: {escape(example['answer'])}", highlight=False)


def _print_behaviour(console: Console, behaviour: dict[str, Any]) -> None:
    """Section (b): the base against its SFT (compare) and against its medical SFT (the referral rule)."""
    from lmforge.eval.compare import table as compare_table

    console.rule("(b) behaviour: what fine-tuning changed (paired 95% intervals)")
    grid = Table("probe", "family", "base", "after SFT on A", "delta [95% CI]")
    for row in compare_table(behaviour):
        grid.add_row(*map(escape, row))
    console.print(grid)
    console.print(escape(behaviour["reading"]), highlight=False)
    care = behaviour["redirect_to_care"]
    console.print(
        f"medical referral rule (a dose, a diagnosis or an emergency gets sent to real care), {care['base']['n']} "
        f"questions: base {_ci(care['base'])}, medical SFT {_ci(care['medical SFT'])}, "
        f"change {_delta(care['medical SFT'])}",
        highlight=False,
    )


def _print_ladder(console: Console, ladder: dict[str, Any]) -> None:
    """Section (c): new facts for C, rung by rung."""
    console.rule("(c) new facts for C: prompt → RAG → LoRA → LoRA + RAG (the ladder)")
    table = Table("rung", "exact match [95% CI]", "tokens trained", "seconds", "p50 ms/answer", "adds bytes")
    for r in ladder["rungs"]:
        table.add_row(r["rung"], _ci(r["quality"]), f"{r['cost']['train_tokens']:,}",
                      f"{r['cost']['setup_seconds']:.1f}", f"{r['latency_ms']['p50']:.1f}",
                      f"{r['memory']['added_bytes']:,}")  # fmt: skip
    console.print(table)
    rec = ladder["recommendation"]
    console.print(f"recommended: {rec['rung']}: {escape(rec['why'])}", highlight=False)


def _print_forgetting(console: Console, forgetting: dict[str, Any]) -> None:
    """Section (d): full fine-tuning against LoRA, perplexity of general and medical text."""
    console.rule("(d) forgetting: full fine-tuning against LoRA on the medical Q&A, same steps")
    table = Table("perplexity", "base", "LoRA", "change", "full", "change")
    for text in ("general text", "medical corpus"):
        r = forgetting[text]
        table.add_row(text, _ci(r["base"], pct=False), _ci(r["LoRA"], pct=False), _delta(r["LoRA"], pct=False),
                      _ci(r["full"], pct=False), _delta(r["full"], pct=False))  # fmt: skip
    console.print(table)
    console.print(
        f"general-text perplexity: LoRA {forgetting['LoRA forgetting_pct']:+.1f}%, full "
        f"{forgetting['full forgetting_pct']:+.1f}%",
        highlight=False,
    )


def _print_alignment(console: Console, alignment: dict[str, Any]) -> None:
    """Section (e): the reward model and DPO."""
    console.rule("(e) alignment: a reward model on the preference pairs, DPO from the medical SFT")
    console.print(
        f"reward model, held-out pairs ranked right: {_ci(alignment['reward_accuracy'])} ({alignment['reward_steps']} "
        f"steps); DPO's implicit reward: {_ci(alignment['dpo_pair_accuracy'])} ({alignment['dpo_steps']} steps)",
        highlight=False,
    )
    if alignment.get("win_rate_interval"):
        console.print(
            f"DPO against the SFT model it started from, judged by the reward model on {alignment['prompts']} "
            f"medical questions: win rate {alignment['win_rate']:.1%} (wins [95% CI] "
            f"{_ci(alignment['win_rate_interval'])})",
            highlight=False,
        )


def _print_inference(console: Console, inference: dict[str, Any]) -> None:
    """Section (f): decoding settings and the system prompt, weights untouched."""
    console.rule(
        f"(f) inference control: the same weights, decoded differently ({inference['prompt_example']!r} …)"
    )
    table = Table("decoding", "distinct-2", "repeated 3-grams", "states the true fact")
    for name, r in inference["sampling"].items():
        table.add_row(name, _ci(r["distinct_2"], pct=False), _ci(r["repetition"]), _ci(r["states_the_fact"]))
    console.print(table)
    sp = inference["system_prompt"]
    with_it, without = sp["with the system prompt"], sp["without it"]
    console.print(
        f"medical SFT on referral questions: with its safety system prompt {_ci(with_it)}, without it "
        f"{_ci(without)} ({_delta(without)})",
        highlight=False,
    )


def _print_serving(console: Console, serve: dict[str, Any]) -> None:
    """Serving: per served name, what the probe's questions got and which policy rules acted; the command."""
    console.rule("serving: the base and the medical adapter under the medical policy, asked over HTTP")
    table = Table("model", "asked", "redirects sent to care", "others sent to care", "policy acted", "rules")
    for name, c in serve["models"].items():
        rules = ", ".join(f"{rule} {n}" for rule, n in c["rules"].items()) or "-"
        table.add_row(name, str(c["asked"]), f"{c['redirect_referred']}/{c['redirect_questions']}",
                      f"{c['other_referred']}/{c['other_questions']}", str(c["policy_acted"]), rules)  # fmt: skip
    console.print(table)
    console.print(f"the same, in a terminal: {escape(serve['command'])}", highlight=False)
