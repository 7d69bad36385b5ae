"""The `lmforge` command line: one Typer app; every command is a thin call into library code.

Conventions every command follows: results go to stdout (`--json`: one JSON document), logs to stderr; exit
status 0 on success, 1 when the work fails, 2 on bad input or usage, with one `error:` line and no
traceback (`lmforge --debug ...` shows it).
"""

import logging
import tempfile
import time
from collections.abc import Callable
from inspect import Parameter, signature
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lmforge.commands import evaluate as evaluate_commands
from lmforge.commands import feedback as feedback_commands
from lmforge.commands import lm_eval as lm_eval_commands
from lmforge.commands import monitor as monitor_commands
from lmforge.commands import report as report_commands
from lmforge.commands import runs as runs_commands
from lmforge.commands.common import (
    AdapterFlag,
    JsonFlag,
    MinScoreFlag,
    OverwriteFlag,
    RagFlag,
    RagKFlag,
    RagModeOption,
    emit,
    make_app,
    open_retriever,
    reflow,
)
from lmforge.commands.rag import rag_app
from lmforge.config import StageConfig, config_help, load_config, save_config
from lmforge.data.prepare import PrepareConfig
from lmforge.errors import LmforgeError
from lmforge.paths import check_run_dir
from lmforge.stages.configs import AlignConfig, FinetuneConfig, PretrainConfig

log = logging.getLogger(__name__)
C = TypeVar("C", bound=StageConfig)


def add_stage_command(
    app: typer.Typer,
    name: str,
    config_cls: type[C],
    run: Callable[[C, Path, bool], dict],
    help: str,
    shortcuts: dict[str, tuple[str, type, str]] | None = None,
) -> None:
    """Register `lmforge NAME [--config RECIPE] [--set KEY=VALUE]... --out DIR [--json]` calling `run(cfg, out, overwrite)`.

    `shortcuts` adds flags that set one config field each: {option name: (dotted key, type, help)}, e.g.
    {"max_forgetting": ("forgetting.max_increase_pct", float, ...)} gives `--max-forgetting PCT`.
    """
    shortcuts = shortcuts or {}

    def command(
        config: Annotated[
            Path | None, typer.Option("--config", "-c", help="YAML recipe.", metavar="RECIPE")
        ] = None,
        overrides: Annotated[
            list[str] | None,
            typer.Option(
                "--set",
                help="Override a config field (repeatable), e.g. train.max_steps=20.",
                metavar="KEY=VALUE",
            ),
        ] = None,
        out: Annotated[
            Path | None,
            typer.Option("--out", "-o", help="Run directory (config.yaml and results).", metavar="DIR"),
        ] = None,
        resume: Annotated[
            Path | None,
            typer.Option(
                help="Continue the run in RUN_DIR from its newest checkpoint, with its config.yaml "
                "(--config and --set still apply, e.g. --set train.max_steps=2000 to train longer).",
                metavar="RUN_DIR",
            ),
        ] = None,
        overwrite: Annotated[
            bool,
            typer.Option(
                help="Replace the run in --out: the new run starts empty, the old one is deleted when it ends."
            ),
        ] = False,
        init_from: Annotated[
            Path | None,
            typer.Option(help="Start from this HF model directory (continued training).", metavar="DIR"),
        ] = None,
        nproc: Annotated[
            int,
            typer.Option(
                min=1,
                help="Train with this many local processes (torchrun's launcher: one per GPU, or CPU "
                "processes with gloo); train.strategy picks DDP or FSDP.",
            ),
        ] = 1,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print the result as one JSON document.")
        ] = False,
        **flags: Any,
    ) -> None:
        from lmforge.train.distributed import is_main_process, launch, under_torchrun

        out = _run_dir(out, resume)
        # Shortcut flags first: an explicit --set of the same key still wins.
        sets = [f"{shortcuts[k][0]}={v}" for k, v in flags.items() if v is not None] + list(overrides or [])
        if resume is not None:
            config = config or resume / "config.yaml"
            sets.append("train.resume=true")
        if init_from is not None:
            if config_cls.init_from_key is None:
                raise LmforgeError(f"{name} starts from no model: --init-from does not apply")
            sets.insert(0, f"{config_cls.init_from_key}={init_from}")  # a --set may still change it
        cfg = load_config(config_cls, config, sets)
        if nproc > 1 and not under_torchrun():  # the workers rerun this command on the resolved config
            check_run_dir(out, cfg, overwrite)  # refuse here, once, rather than in a worker
            # The resolved config goes to a temporary file: nothing is written in --out before rank 0 checks it.
            with tempfile.TemporaryDirectory(prefix="lmforge-launch-") as tmp:
                where = "--resume" if resume is not None else "--out"
                argv = [name, "--config", str(save_config(cfg, Path(tmp))), where, str(out),
                        *(["--overwrite"] * overwrite), *(["--json"] * as_json)]  # fmt: skip
                status = launch(nproc, argv)
            if status:
                raise typer.Exit(status)
            return
        result = run(cfg, out, overwrite)  # checks `out` and writes config.yaml once its inputs are checked
        if is_main_process():  # under torchrun every rank's stdout is the terminal: one result
            emit(result, as_json)

    base = signature(command)
    params = [p for p in base.parameters.values() if p.kind is not p.VAR_KEYWORD]
    for option, (key, kind, text) in shortcuts.items():
        flag = typer.Option(help=f"{text} (sets {key}).", show_default=False)
        params.append(Parameter(option, Parameter.KEYWORD_ONLY, default=None,
                                annotation=Annotated[kind | None, flag]))  # fmt: skip
    command.__signature__ = base.replace(parameters=params)  # type: ignore[attr-defined]
    app.command(name, help=help, epilog=_epilog(config_cls))(command)


def _run_dir(out: Path | None, resume: Path | None) -> Path:
    """The run directory named by --out or --resume (what it may hold is checked by the stage)."""
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise LmforgeError(f"--resume {resume} continues in its own directory; drop --out {out}")
        if not (resume / "config.yaml").is_file():
            raise LmforgeError(f"--resume {resume}: not a run directory (no config.yaml)")
        return resume
    if out is None:
        raise LmforgeError("give --out DIR for a new run (or --resume RUN_DIR to continue one)")
    return out


def _epilog(config_cls: type[StageConfig]) -> str:
    """The config listing as a `--help` epilog, laid out as given (click's \\b): 80 columns, as click's help."""
    return "\b\n" + config_help(config_cls, width=78)  # click indents an epilog by 2


app = make_app()


# Commands. Each is a thin call into library code; stages are registered with `add_stage_command`, other
# commands with `@app.command()` and print their result with `emit`.
@app.command()
@reflow
def inspect(
    model: Annotated[
        Path,
        typer.Argument(
            help="A Hugging Face model directory (any with safetensors weights), an adapter directory, or an "
            "lmforge run or checkpoint directory."
        ),
    ],
    as_json: JsonFlag = False,
) -> None:
    """Show what a model, adapter or run directory holds.

    A model directory: architecture, parameters (from the safetensors headers; embedding / rest for the
    families lmforge runs), dtype, vocabulary, context length, tokenizer and chat template, lineage, and
    whether lmforge can run it (`supported`, with the reason when not). An adapter directory: its kind, base
    model, rank and trainable parameters. A run directory: its model (RUN/model) or adapter, inspected.
    Reads headers only: instant even for large models.
    """
    from lmforge.inspect import inspect_path

    emit(inspect_path(model), as_json)


@app.command()
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
    from lmforge.pipeline import run_demo

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


# ------------------------------------------------------------------------------------------ inference


@app.command()
@reflow
def generate(
    model: Annotated[Path, typer.Argument(help="A Hugging Face decoder directory (with its tokenizer).")],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).", show_default=False)
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option(
            help="A UTF-8 file of prompts, one per line; .jsonl: records with 'prompt' or 'messages'.",
            show_default=False,
        ),
    ] = None,
    system: Annotated[
        str | None, typer.Option(help="A system prompt (implies --chat).", show_default=False)
    ] = None,
    chat: Annotated[bool, typer.Option(help="Render prompts with the model's chat template.")] = False,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens to generate at most.", show_default=False)
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sample at this temperature; 0 = greedy.", show_default=False)
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(help="Sample among the k most likely tokens (0 = off).", show_default=False)
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Nucleus sampling mass in (0, 1] (1 = off).", show_default=False)
    ] = None,
    min_p: Annotated[
        float | None,
        typer.Option(
            help="Sample among tokens above min_p x the top probability (0 = off).", show_default=False
        ),
    ] = None,
    repetition_penalty: Annotated[
        float | None, typer.Option(help="HF's repetition penalty (1 = off).", show_default=False)
    ] = None,
    frequency_penalty: Annotated[
        float | None, typer.Option(help="OpenAI's frequency penalty in [-2, 2].", show_default=False)
    ] = None,
    presence_penalty: Annotated[
        float | None, typer.Option(help="OpenAI's presence penalty in [-2, 2].", show_default=False)
    ] = None,
    no_repeat_ngram_size: Annotated[
        int | None, typer.Option(help="Never repeat an n-gram of this size.", show_default=False)
    ] = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop string (repeatable); not returned.", show_default=False)
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the sampling (same seed, same samples).", show_default=False)
    ] = None,
    n: Annotated[int | None, typer.Option("-n", help="Samples per prompt.", show_default=False)] = None,
    logprobs: Annotated[
        int | None,
        typer.Option(
            help="Most likely alternatives to report per token, in [0, 20] (--json).", show_default=False
        ),
    ] = None,
    speculate: Annotated[
        int | None,
        typer.Option(
            help="Greedy, one prompt: draft up to this many tokens from earlier text and check them in one "
            "forward (same output; faster when it repeats its context); decodes greedily unless a sampling flag "
            "is given. 0 = off.",
            show_default=False,
        ),
    ] = None,
    truncate: Annotated[
        bool, typer.Option(help="Keep the end of a prompt too long for the context.")
    ] = False,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda when available).", show_default=False)
    ] = None,
    adapter: AdapterFlag = None,
    rag: RagFlag = None,
    k: RagKFlag = 5,
    rag_mode: RagModeOption = None,
    min_score: MinScoreFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Generate text from a model: plain completion, or chat-templated with --chat / --system; with --rag INDEX
    each prompt gets its retrieved passages through the chat template and the answer its citations.

    Greedy by default, as transformers: the model's generation_config.json samples only if it says do_sample
    true (with its temperature, top_k, top_p; transformers' 1.0, 50, 1.0 where it leaves them out). Flags
    override it: --temperature above 0 samples, 0 is greedy; --top-k, --top-p or --min-p without --temperature
    sample at the file's temperature, else 1.0; --speculate alone decodes greedily. A single prompt streams to
    the terminal; --json prints one document with each prompt's samples: text, token ids, log-probs, each
    token's text and bytes with its top alternatives (OpenAI's logprobs.content), finish reason, time to first
    token and tokens/s.
    """
    from lmforge.infer.engine import Engine, TokenText, fit_prompts, prompt_ids, read_prompts
    from lmforge.infer.sampling import generation_config

    given = {k: v for k, v in locals().items() if k in GENERATION_FLAGS and v is not None}
    texts: list = list(prompt or []) + (read_prompts(prompts_file) if prompts_file else [])
    if not texts:
        raise LmforgeError("give --prompt TEXT or --prompts-file FILE")
    cfg = generation_config(given, model_dir=model)  # flags over the model's generation_config.json
    engine = Engine.from_dir(model, device=device, adapter=adapter)
    rags: list = [None] * len(texts)
    if rag is not None:
        from lmforge.infer.engine import as_messages
        from lmforge.rag.prompt import rag_prompt_ids

        retriever = open_retriever(rag, k, rag_mode, min_score)
        room = engine.context - cfg.max_new_tokens
        if room < 1:
            raise LmforgeError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for the passages in the "
                               f"model's context of {engine.context} tokens: lower it")  # fmt: skip
        built = [rag_prompt_ids(engine.tokenizer, retriever, as_messages(t, system), room) for t in texts]
        ids, rags = [b[0] for b in built], [b[1] for b in built]
    else:
        ids = [prompt_ids(engine, t, chat=chat, system=system) for t in texts]
    if "max_new_tokens" not in cfg.model_fields_set:  # lmforge's default, asked for by no one: what fits
        room = engine.context - max(map(len, ids))
        if 1 <= room < cfg.max_new_tokens:
            cfg = cfg.model_copy(update={"max_new_tokens": room})
    ids = fit_prompts(ids, engine.context, cfg.max_new_tokens, truncate=truncate)
    if not as_json and len(ids) * cfg.n == 1:  # one sample: stream it
        text = ""
        for delta in engine.stream(ids, cfg):
            text += delta.text
            print(delta.text, end="", flush=True)
        print()
        if rags[0] is not None:
            _print_citations(rags[0], text)
        return
    completions = engine.generate(ids, cfg)
    if as_json:
        results = [
            {"prompt": t, "prompt_tokens": len(i), "samples": []} for t, i in zip(texts, ids, strict=True)
        ]
        token_text = TokenText(engine.tokenizer)
        for c in completions:
            results[c.prompt_index]["samples"].append({
                "text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs,
                "top_logprobs": c.top_logprobs if cfg.logprobs else None,
                "tokens": token_text.logprobs(c),  # OpenAI's logprobs.content: token text, bytes, alternatives
                "finish_reason": c.finish_reason,
                "time_to_first_token": c.time_to_first_token, "tokens_per_s": c.tokens_per_s,
            })  # fmt: skip
            if rags[c.prompt_index] is not None:
                rag_prompt = rags[c.prompt_index]
                results[c.prompt_index]["rag"] = {"note": rag_prompt.note, "dropped": rag_prompt.dropped}
                results[c.prompt_index]["samples"][-1]["citations"] = rag_prompt.citations(c.text)
        emit({"model": str(model), "config": cfg.model_dump(), "results": results}, as_json=True)
        return
    console = Console()
    for c in completions:
        console.rule(f"prompt {c.prompt_index}" + (f", sample {c.sample_index}" if cfg.n > 1 else ""))
        console.print(escape(c.text), highlight=False)
        if rags[c.prompt_index] is not None:
            _print_citations(rags[c.prompt_index], c.text)


def _print_citations(rag: Any, answer: str) -> None:
    """The passages an answer was given, marked where it cites them, and RAG's note."""
    console = Console()
    for c in rag.citations(answer):
        mark = "cited" if c["cited"] else "given"
        console.print(f"  [{c['index']}] {escape(c['doc_id'])} chars {c['span'][0]}-{c['span'][1]} "
                      f"({mark}, score {c['score']:.3g})", highlight=False, style="dim")  # fmt: skip
    if rag.note:
        console.print(f"  ({rag.note})", style="dim", highlight=False)


@app.command()
@reflow
def chat(
    model: Annotated[Path, typer.Argument(help="A Hugging Face decoder directory with a chat template.")],
    system: Annotated[str | None, typer.Option(help="The system prompt.", show_default=False)] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens per answer at most.", show_default=False)
    ] = None,
    temperature: Annotated[
        float | None, typer.Option(help="Sample at this temperature; 0 = greedy.", show_default=False)
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Nucleus sampling mass in (0, 1] (1 = off).", show_default=False)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampling.", show_default=False)] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda when available).", show_default=False)
    ] = None,
    adapter: AdapterFlag = None,
    rag: RagFlag = None,
    k: RagKFlag = 5,
    rag_mode: RagModeOption = None,
    min_score: MinScoreFlag = None,
) -> None:
    """Chat with a model in the terminal, streamed as it decodes.

    The history goes through the model's chat template (the one training used). Type /reset to clear it,
    /system TEXT to change the system prompt, /set temperature 0.7 (any sampling setting), /exit to leave.
    Greedy by default unless the model's generation_config.json says do_sample true, as `generate`. With --rag
    INDEX each message gets its retrieved passages and the answer is followed by its sources.
    """
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import generation_config
    from lmforge.infer.session import ChatSession, run_chat

    given = {k: v for k, v in locals().items() if k in GENERATION_FLAGS and v is not None}
    cfg = generation_config(given, model_dir=model)
    engine = Engine.from_dir(model, device=device, adapter=adapter)
    if engine.tokenizer.chat_template is None:
        raise LmforgeError(
            f"{model}: its tokenizer has no chat template; use `lmforge generate` for plain text"
        )
    if cfg.max_new_tokens >= engine.context:
        raise LmforgeError(
            f"max_new_tokens {cfg.max_new_tokens}: the model's context is {engine.context} tokens, so at most "
            f"{engine.context - 1} new tokens fit, fewer the longer the conversation; lower --max-new-tokens"
        )
    retriever = open_retriever(rag, k, rag_mode, min_score) if rag is not None else None
    run_chat(ChatSession(engine, cfg, system, retriever))


@app.command()
@reflow
def serve(
    model: Annotated[Path, typer.Argument(help="A Hugging Face decoder directory (with its tokenizer).")],
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=DIR: a LoRA adapter served as model NAME beside the base, sharing its batches (repeat "
            "for more). A bare DIR (any adapter kind) is applied to the base itself.",
            show_default=False,
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="LMFORGE_API_KEY",
            help="Key every /v1 and /admin request must send as 'Authorization: Bearer KEY' (or LMFORGE_API_KEY).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The base model's name in requests (default: the directory's name).")
    ] = None,
    rag: Annotated[
        list[str] | None,
        typer.Option(
            help='[NAME=]INDEX: a RAG index a chat request uses with "rag": true (the first) or "rag": '
            "NAME; the response carries its citations (repeatable).",
            show_default=False,
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="A guardrails policy (YAML): PII redaction both ways, blocked topics, a required system prompt, "
            "length caps, per served name; the rules that acted come back in each response's 'policy'.",
            show_default=False,
        ),
    ] = None,
    route: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VARIANT:SHARE,VARIANT:SHARE: a request for NAME goes to one variant (the base's name or an "
            "adapter's), the same one for the same 'user' (repeatable).",
            show_default=False,
        ),
    ] = None,
    log_file: Annotated[
        Path | None,
        typer.Option(
            "--log",
            help="A request log (JSON lines, rotated at 10 MB): tokens, TTFT, latency, variant, policy actions, "
            "and POST /v1/feedback ratings; read by lmforge monitor.",
            show_default=False,
        ),
    ] = None,
    log_text: Annotated[
        bool, typer.Option(help="Also log each prompt and completion (for lmforge feedback export).")
    ] = False,
    max_batch: Annotated[int, typer.Option(min=1, help="Samples decoded together at most.")] = 32,
    max_queue: Annotated[
        int, typer.Option(min=0, help="Requests waiting at most; past it a request gets 429 and Retry-After.")
    ] = 256,
    timeout: Annotated[
        float, typer.Option(min=0, help="Seconds a request may take before it ends with a 504 (0: no limit).")
    ] = 600.0,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda when available).", show_default=False)
    ] = None,
) -> None:
    """Serve a model over OpenAI's API, with continuous batching and LoRA adapters chosen per request.

    A decoder serves POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not), an
    encoder (e.g. all-MiniLM-L6-v2) POST /v1/embeddings; both GET /v1/models, /health, /metrics (Prometheus)
    and a chat page at /. A request's "model" names the base or an adapter; with a key, POST /admin/adapters
    {"name", "path"} loads one and DELETE /admin/adapters/NAME unloads it.

    Any OpenAI client works: base_url http://HOST:PORT/v1. Without --api-key the server listens on 127.0.0.1
    only.
    """
    import uvicorn

    from lmforge.infer.embed import Embedder
    from lmforge.infer.engine import Engine
    from lmforge.model.configs import EncoderConfig
    from lmforge.model.hf import read_config
    from lmforge.serve.app import create_app
    from lmforge.serve.policy import load_policy
    from lmforge.serve.traffic import RequestLog, Route

    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        raise LmforgeError(
            f"--host {host} without --api-key (or LMFORGE_API_KEY) would serve anyone: give a key"
        )
    named: dict[str, Path] = {}
    applied: Path | None = None
    for value in adapter or []:
        key, sep, path = value.partition("=")
        if not sep:
            if applied is not None:
                raise LmforgeError(
                    f"--adapter {value}: one bare DIR at most is applied to the base; name others NAME=DIR"
                )
            applied = Path(value)
        elif not key or not path or key in named:
            raise LmforgeError(f"--adapter {value}: expected NAME=DIR with a name used once")
        else:
            named[key] = Path(path)
    if isinstance(read_config(model)[0], EncoderConfig):  # an encoder serves embeddings
        if adapter:
            raise LmforgeError("--adapter: an encoder is served for embeddings, without adapters")
        served_model: Engine | Embedder = Embedder(model, device=device or "cpu")
    else:
        served_model = Engine.from_dir(model, device=device, adapter=applied)
    served = name or Path(model).resolve().name
    indexes: dict[str, Path] = {}
    for value in rag or []:
        key, sep, path = value.rpartition("=")
        key = key if sep else "default"
        if not path or key in indexes:
            raise LmforgeError(f"--rag {value}: expected [NAME=]INDEX with a name used once")
        indexes[key] = Path(path)
    served_app = create_app(served_model, served, adapters=named, base_dir=model, api_key=api_key,
                            max_batch=max_batch, max_queue=max_queue, timeout=timeout or None, rag=indexes,
                            policy=load_policy(policy) if policy is not None else None,
                            routes=[Route.parse(r) for r in route or []],
                            request_log=RequestLog(log_file, text=log_text) if log_file is not None else None)  # fmt: skip
    if api_key is None:
        log.info("no API key: listening on %s only", host)
    log.info("serving %s as %r%s on http://%s:%d/v1", model, served,
             "".join(f", {a!r}" for a in named), host, port)  # fmt: skip
    uvicorn.run(served_app, host=host, port=port, log_level="warning")


GENERATION_FLAGS = (
    "max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
    "presence_penalty", "no_repeat_ngram_size", "stop", "seed", "n", "logprobs", "speculate",
)  # fmt: skip


# ------------------------------------------------------------------------------------------- stages


def _pretrain(cfg: PretrainConfig, out: Path, overwrite: bool) -> dict:
    from lmforge.stages.pretrain import run_pretrain

    return run_pretrain(cfg, out, overwrite=overwrite)


add_stage_command(
    app,
    "pretrain",
    PretrainConfig,
    _pretrain,
    help="Pretrain a model (a preset, or continue from a HF dir) on a prepared dataset with the one training loop.",
)


def _finetune(cfg: FinetuneConfig, out: Path, overwrite: bool) -> dict:
    from lmforge.stages.finetune import run_finetune

    return run_finetune(cfg, out, overwrite=overwrite)


add_stage_command(
    app,
    "finetune",
    FinetuneConfig,
    _finetune,
    help="Fine-tune a model (full, LoRA, bottleneck adapters, prompt tuning) on prepared chat, instruction or "
    "domain data; measures forgetting on a reference set before and after.",
    shortcuts={
        "max_forgetting": (
            "forgetting.max_increase_pct",
            float,
            "Fail the run when the reference perplexity rises by more than PCT per cent",
        )
    },
)


def _align(cfg: AlignConfig, out: Path, overwrite: bool) -> dict:
    from lmforge.stages.align import run_align

    return run_align(cfg, out, overwrite=overwrite)


add_stage_command(
    app,
    "align",
    AlignConfig,
    _align,
    help="Align a model to preferences: a reward model (method=reward), DPO and its family (dpo, ipo, hinge, "
    "simpo, orpo) on preference pairs, or RL from rewards (grpo, ppo) on prompts; measures held-out pair "
    "accuracy, rewards, win rate and forgetting.",
    shortcuts={
        "method": ("method", str, "reward, dpo, ipo, hinge, simpo, orpo, grpo or ppo"),
        "max_forgetting": (
            "forgetting.max_increase_pct",
            float,
            "Fail the run when the reference perplexity rises by more than PCT per cent",
        ),
    },
)


@app.command()
@reflow
def merge(
    base: Annotated[Path, typer.Argument(help="The base model directory the adapter was trained on.")],
    adapter: Annotated[Path, typer.Argument(help="A LoRA adapter directory (lmforge's or PEFT's).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the merged model.", metavar="DIR")],
    overwrite: OverwriteFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Fold a LoRA adapter into its base's weights: a plain Hugging Face model directory.

    The merged model computes what base + adapter computes (within float rounding) with no adapter code at
    inference. Its tokenizer is the base's; lmforge.json records the base and the adapter.
    """
    from lmforge.adapters.merge import merge_adapter

    emit(merge_adapter(base, adapter, out, overwrite=overwrite), as_json)


# ------------------------------------------------------------------------------------- tokenizer, data

tokenizer_app = typer.Typer(
    help="Train tokenizers and measure them.", no_args_is_help=True, rich_markup_mode=None
)
data_app = typer.Typer(
    help="Synthesise, prepare and inspect datasets.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")
app.add_typer(rag_app, name="rag")
for _commands in (
    evaluate_commands,
    lm_eval_commands,
    runs_commands,
    report_commands,
    feedback_commands,
    monitor_commands,
):
    _commands.register(app)
FormatOption = Annotated[
    str | None,
    typer.Option("--format", help="Record format (text, messages, alpaca, ...); default: detected."),
]


@tokenizer_app.command("train")
@reflow
def tokenizer_train(
    files: Annotated[
        list[Path], typer.Argument(help="Text or dataset files (any format `data prepare` reads).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the tokenizer files.")],
    kind: Annotated[
        str, typer.Option(help="bpe (byte-level, for decoders) or wordpiece (for BERT).")
    ] = "bpe",
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size, special tokens included.")] = 8192,
    min_frequency: Annotated[int, typer.Option(help="Minimum pair frequency for a merge.")] = 2,
    fmt: FormatOption = None,
    overwrite: OverwriteFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Train a tokenizer that transformers.AutoTokenizer loads unchanged.

    Byte-level BPE gets bos/eos/pad/unk and <|im_start|>/<|im_end|> chat tokens plus lmforge's ChatML chat
    template; WordPiece gets [PAD] [UNK] [CLS] [SEP] [MASK]. Pad is never EOS.
    """
    from lmforge.data.prepare import iter_texts
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    if kind not in ("bpe", "wordpiece"):
        raise LmforgeError(f"--kind {kind!r}: expected bpe or wordpiece")
    path = train_tokenizer(
        iter_texts(files, fmt),
        kind,
        vocab_size,
        out,
        min_frequency=min_frequency,
        inputs=files,
        overwrite=overwrite,
    )
    tok = Tokenizer.from_dir(path)
    specials = {"bos": tok.bos_token, "eos": tok.eos_token, "pad_id": tok.pad_id, "eos_id": tok.eos_id}
    # the trainer may stop short of --vocab-size (it warns why): both are shown
    sizes = {"requested_vocab_size": vocab_size, "vocab_size": tok.vocab_size}
    emit({"out": str(path), "kind": kind, **sizes, "special": specials, "hash": tok.hash}, as_json)


@tokenizer_app.command("stats")
@reflow
def tokenizer_stats(
    files: Annotated[list[Path], typer.Argument(help="Text or dataset files to measure on.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer directory (tokenizer.json).")],
    fmt: FormatOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Bytes per token, tokens per word, unknown-token rate and vocabulary use of a tokenizer on FILES."""
    from lmforge.data.prepare import iter_texts
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer import tokenizer_stats as stats

    emit(stats(Tokenizer.from_dir(tokenizer), iter_texts(files, fmt)), as_json)


@data_app.command("synth")
@reflow
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the world's files.")],
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives byte-identical files.")] = 0,
    overwrite: OverwriteFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Generate the synthetic world: people (groups A/B/C), biographies, Q&A, a medical domain, preferences."""
    from lmforge.data.synthetic import synthesize

    emit(synthesize(out, seed=seed, overwrite=overwrite), as_json)


@data_app.command("prepare", epilog=_epilog(PrepareConfig))
@reflow
def data_prepare(
    files: Annotated[list[Path] | None, typer.Argument(help="Input files or directories.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output dataset directory.")] = ...,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory.")] = None,
    fmt: FormatOption = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Write bad records to rejects.jsonl, go on.")
    ] = False,
    decontaminate: Annotated[
        bool, typer.Option("--decontaminate", help="Drop training documents that overlap eval_sets.")
    ] = False,
    overwrite: OverwriteFlag = False,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML recipe.", metavar="RECIPE")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field, e.g. pii=mask.", metavar="KEY=VALUE"),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Tokenise inputs into shards (+ loss masks, labels) with a manifest that versions the dataset.

    Governance (PII scrub, deduplication, contamination) is reported in the manifest. Re-running on
    unchanged inputs reuses the output; the output appears atomically.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from lmforge.data.prepare import prepare
    from lmforge.data.readers import iter_files

    cfg = load_config(PrepareConfig, config, overrides or [])
    given = {
        "inputs": files,
        "tokenizer": tokenizer,
        "format": fmt,
        "skip_bad": skip_bad,
        "decontaminate": decontaminate,
    }
    cfg = PrepareConfig.model_validate({**cfg.model_dump(), **{k: v for k, v in given.items() if v}})
    # warn=False: prepare() expands the inputs again and warns of what it skips
    inputs = iter_files(cfg.inputs, warn=False) if cfg.inputs else []
    total = sum(p.stat().st_size for p in inputs if p.is_file())
    columns = (TextColumn("prepare"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    started = time.perf_counter()
    console = Console(stderr=True)
    # a bar only on a terminal: elsewhere rich's Progress prints an empty line when it stops, even on an error
    with Progress(*columns, console=console, transient=True, disable=not console.is_interactive) as bar:
        task = bar.add_task("prepare", total=total or None)
        manifest = prepare(cfg, out, progress=lambda n: bar.advance(task, n), overwrite=overwrite)
    seconds = time.perf_counter() - started
    splits = {s: {k: v for k, v in info.items() if k != "shards"} for s, info in manifest["splits"].items()}
    result = {"out": str(out), "id": manifest["id"], "kind": manifest["kind"], "cache_hit": manifest["cache_hit"],
              "splits": splits, "rejected": manifest["rejected"], "seconds": round(seconds, 3),
              "input_mb_per_s": round(total / 1e6 / seconds, 2)}  # fmt: skip
    for name, report in manifest["governance"].items():
        result[name] = {k: v for k, v in report.items() if k not in ("report", "examples")}
    emit(result, as_json)


@data_app.command("inspect")
@reflow
def data_inspect(
    path: Annotated[Path, typer.Argument(help="A prepared dataset directory.")],
    samples: Annotated[int, typer.Option(help="Decoded samples to show.")] = 3,
    as_json: JsonFlag = False,
) -> None:
    """Manifest summary, length histogram and decoded samples (trained-on tokens highlighted)."""
    from lmforge.data.dataset import inspect_dataset

    info = inspect_dataset(path, samples=samples)
    if as_json:
        emit(info, as_json=True)
        return
    console = Console()
    emit({k: v for k, v in info.items() if k not in ("length_histogram", "samples")}, as_json=False)
    console.rule("document lengths (train, tokens)")
    peak = max((b["documents"] for b in info["length_histogram"]), default=1) or 1
    for b in info["length_histogram"]:
        console.print(
            f"{b['from']:>7,}-{b['to']:<7,} {'█' * round(40 * b['documents'] / peak)} {b['documents']:,}"
        )
    for i, sample in enumerate(info["samples"]):
        label = f" (label {sample['label']})" if sample["label"] is not None else ""
        console.rule(f"sample {i}{label}: [bold green]trained on[/] / [dim]context[/]")
        text = Text()
        for segment, trained in sample["segments"]:
            text.append(segment, style="bold green" if trained else "dim")
        console.print(text)


def main() -> None:
    """Console-script entry point (`lmforge`, `python -m lmforge`)."""
    app(prog_name="lmforge")
