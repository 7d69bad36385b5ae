"""`lmforge eval`: tasks through the one inference engine and log-prob path, and `eval compare`."""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from lmforge.commands.common import AdapterFlag, CompileFlag, JsonFlag, emit, reflow
from lmforge.errors import LmforgeError


class _DefaultRun(TyperGroup):
    """`lmforge eval MODEL ...` is `lmforge eval run MODEL ...`; `compare` stays a subcommand."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=_DefaultRun,
    help="Evaluate models: `lmforge eval MODEL --task T --data PATH` (perplexity, qa, gsm8k, classify, choice, "
    "format, preference, winrate, safety; every rate with a 95% bootstrap interval), and `lmforge eval compare "
    "BASE TUNED` (knowledge vs behaviour).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
LimitFlag = Annotated[int | None, typer.Option(help="Items at most (the first N).", show_default=False)]
BatchFlag = Annotated[int, typer.Option(min=1, help="Sequences per forward.")]
NewTokensFlag = Annotated[int, typer.Option(min=1, help="Tokens per generated answer at most.")]
OutFlag = Annotated[
    Path | None, typer.Option("--out", "-o", help="Also write the result (JSON) here.", show_default=False)
]


def register(app: typer.Typer) -> None:
    """Add `eval` to the root app."""
    app.add_typer(eval_app, name="eval")


def _write(result: dict[str, Any], out: Path | None) -> None:
    from lmforge.fileio import atomic_write

    if out is not None:
        atomic_write(out, json.dumps(result, indent=2, default=str) + "\n")


@eval_app.command("run")
@reflow
def run(
    model: Annotated[
        Path, typer.Argument(help="A model directory (a decoder, a classifier or a reward model).")
    ],
    task: Annotated[
        str,
        typer.Option(
            help="perplexity, qa, gsm8k, classify, choice, format, preference, winrate or safety.",
        ),
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            help="The task's data (any format the readers know; not for safety).", show_default=False
        ),
    ] = None,
    adapter: AdapterFlag = None,
    limit: LimitFlag = None,
    batch_size: BatchFlag = 32,
    max_new_tokens: NewTokensFlag = 64,
    compile: CompileFlag = False,
    max_chars: Annotated[int, typer.Option(help="format: a reply's length limit in characters.")] = 2000,
    ref: Annotated[
        Path | None,
        typer.Option(
            help="preference, for a DPO model: the reference model (default: the base under --adapter, else "
            "the parent lmforge.json names).",
            show_default=False,
        ),
    ] = None,
    against: Annotated[
        Path | None, typer.Option(help="winrate: the model to beat.", show_default=False)
    ] = None,
    against_adapter: Annotated[
        Path | None, typer.Option(help="winrate: an adapter on --against.", show_default=False)
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option(
            help="winrate: a reward-model directory, or a reward (facts, gsm8k, medical, format, module:function).",
            show_default=False,
        ),
    ] = None,
    contamination: Annotated[
        bool,
        typer.Option(help="Check the items against the training data of the model's lineage (13-grams)."),
    ] = True,
    record: Annotated[
        bool,
        typer.Option(
            help="Keep the result in the model's (or adapter's) evals/ folder, for cards and reports."
        ),
    ] = False,
    out: OutFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Run one evaluation task on MODEL (the default command: `lmforge eval MODEL ...`). Generation goes
    through the inference engine (greedy), scoring through the one log-prob path; every metric carries a 95%
    bootstrap interval over the items, and the items are checked for contamination against the training data
    of every stage in the model's lineage."""
    from lmforge.eval.tasks import Target, run_task

    options: dict[str, Any] = {"max_chars": max_chars, "reference": ref, "judge": judge}
    if against is not None:
        options["against"] = Target(against, against_adapter, compile)
    result, _ = run_task(task, Target(model, adapter, compile), data, limit=limit, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, check_contamination=contamination, **options)  # fmt: skip
    _write(result, out)
    if record:
        from lmforge.fileio import atomic_write

        stem = f"{task}-{data.stem}" if data is not None else task
        where = (adapter or model) / "evals" / f"{stem}.json"
        where.parent.mkdir(exist_ok=True)
        atomic_write(where, json.dumps(result, indent=2, default=str) + "\n")
        result["recorded"] = str(where)
    emit(result, as_json)


@eval_app.command("compare")
@reflow
def compare_command(
    base: Annotated[Path, typer.Argument(help="The model before (a decoder directory).")],
    tuned: Annotated[
        Path, typer.Argument(help="The model after (a directory, or BASE again with --adapter).")
    ],
    adapter: Annotated[
        Path | None,
        typer.Option(help="An adapter on TUNED (e.g. the LoRA SFT run's adapter).", show_default=False),
    ] = None,
    base_adapter: Annotated[Path | None, typer.Option(help="An adapter on BASE.", show_default=False)] = None,
    probes: Annotated[str, typer.Option(help="Probe families, comma-separated.")] = "knowledge,behaviour",
    world: Annotated[
        Path | None,
        typer.Option(
            help="A synthetic world (lmforge data synth): --qa, --text and --prompts default to its eval_qa.jsonl, "
            "pretrain.jsonl and eval_qa.jsonl.",
            show_default=False,
        ),
    ] = None,
    qa: Annotated[
        Path | None, typer.Option(help="Knowledge: questions about facts.", show_default=False)
    ] = None,
    text: Annotated[
        Path | None, typer.Option(help="Knowledge: domain text for perplexity.", show_default=False)
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(
            help="Behaviour: chat prompts (with reference replies) for format probes.", show_default=False
        ),
    ] = None,
    safety: Annotated[bool, typer.Option(help="Behaviour: the shipped refusal probes.")] = True,
    limit: LimitFlag = 200,
    batch_size: BatchFlag = 32,
    max_new_tokens: NewTokensFlag = 64,
    out: OutFlag = None,
    as_json: JsonFlag = False,
) -> None:
    """Knowledge vs behaviour, before and after: each probe on both models over the same items, every delta with
    a 95% paired-bootstrap interval, and one line that reads the table."""
    from lmforge.eval.compare import compare, table
    from lmforge.eval.tasks import Target

    if world is not None:
        if not (world / "eval_qa.jsonl").is_file():
            raise LmforgeError(
                f"--world {world}: no eval_qa.jsonl; expected a world from `lmforge data synth`"
            )
        qa, text = qa or world / "eval_qa.jsonl", text or world / "pretrain.jsonl"
        prompts = prompts or world / "eval_qa.jsonl"
    result = compare(Target(base, base_adapter), Target(tuned, adapter),
                     families=[f.strip() for f in probes.split(",") if f.strip()], qa=qa, text=text,
                     prompts=prompts, safety=safety, limit=limit, batch_size=batch_size,
                     max_new_tokens=max_new_tokens)  # fmt: skip
    _write(result, out)
    if as_json:
        emit(result, True)
        return
    grid = Table("probe", "family", "base", "tuned", "delta (95% CI)", title="knowledge vs behaviour")
    for row in table(result):
        grid.add_row(*map(escape, row))
    console = Console()
    console.print(grid)
    console.print(escape(result["reading"]))
