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
from rich.text import Text

from lmforge.commands import demo as demo_commands
from lmforge.commands import evaluate as evaluate_commands
from lmforge.commands import feedback as feedback_commands
from lmforge.commands import infer as infer_commands
from lmforge.commands import ladder as ladder_commands
from lmforge.commands import lm_eval as lm_eval_commands
from lmforge.commands import monitor as monitor_commands
from lmforge.commands import pipeline as pipeline_commands
from lmforge.commands import report as report_commands
from lmforge.commands import runs as runs_commands
from lmforge.commands.common import (
    JsonFlag,
    OverwriteFlag,
    emit,
    make_app,
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


demo_commands.register(app)
infer_commands.register(app)


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
    pipeline_commands,
    evaluate_commands,
    ladder_commands,
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
