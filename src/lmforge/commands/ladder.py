"""`lmforge ladder --task TASK.yaml --out DIR`: prompt only → RAG → LoRA → LoRA + RAG on one task, measured alike,
and the rung the numbers recommend."""

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmforge.commands.common import JsonFlag, emit, reflow
from lmforge.config import config_help, load_config
from lmforge.ladder import RUNGS, LadderTask


def register(app: typer.Typer) -> None:
    """Add `ladder` to the root app."""
    # The task file's fields as the epilog, laid out as given (click's \b), as the stage commands show theirs.
    fields = config_help(LadderTask, width=78).replace("the --config recipe", "the --task file", 1)
    app.command("ladder", epilog="\b\n" + fields)(ladder)


@reflow
def ladder(
    task: Annotated[
        Path, typer.Option("--task", "-t", help="The task file (YAML; see the fields below).", metavar="TASK")
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Where ladder.json, each rung's answers, the index and runs go.",
            metavar="DIR",
        ),
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override a task field (repeatable), e.g. data.limit=50.", metavar="KEY=VALUE"
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the ladder in --out (the old one is deleted when the new one ends).")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Climb one task's ladder — prompt only (system prompt + few-shot), RAG, LoRA, LoRA + RAG, as the task file
    lists its rungs — and recommend one.

    Every rung answers the same held-out items. Per rung: accuracy with its 95% Wilson interval, training cost
    (tokens trained; seconds of training and indexing), answer latency (p50 ms, answered one at a time), and the
    bytes on disk the rung adds (index, adapter). The recommendation is the cheapest rung whose accuracy lies
    within the best rung's interval (cheapest: fewest tokens trained, then setup seconds, then p50 latency; a tie
    goes to the lower rung). Writes DIR/ladder.json (atomically), DIR/RUNG/answers.jsonl, the RAG index and the
    fine-tuning runs; prints a table, or the JSON with --json. Paths in the task file are relative to the working
    directory, as in every recipe."""
    from lmforge.ladder import run_ladder

    cfg = load_config(LadderTask, task, list(overrides or []))
    result = run_ladder(cfg, out, overwrite=overwrite)
    if as_json:
        emit(result, as_json=True)
        return
    print_table(result)


def print_table(result: dict[str, Any], console: Console | None = None) -> None:
    """ladder.json as a table, one row per rung (n/a rows for the rungs that do not apply), and the
    recommendation."""
    console = console or Console()
    grid = Table("rung", "accuracy [95% CI]", "tokens trained", "setup s", "p50 ms/answer", "adds (on disk)",
                 title=f"ladder: {result['task']} ({result['items']} items)")  # fmt: skip
    by_rung = {r["rung"]: r for r in result["rungs"]}
    pick = result["recommendation"]["rung"]
    for rung in RUNGS:
        if rung in by_rung:
            r = by_rung[rung]
            q, cost = r["quality"], r["cost"]
            name = f"{rung} *" if rung == pick else rung
            grid.add_row(
                escape(name),
                f"{_pct(q['accuracy'])} [{_pct(q['ci95'][0])}, {_pct(q['ci95'][1])}]",
                f"{cost['train_tokens']:,}",
                f"{cost['setup_seconds']:.1f}",
                f"{r['latency_ms']['p50']:.1f}",
                escape(f"{_size(r['memory']['added_bytes'])} {r['memory']['what']}"),
            )
        elif rung in result["not_applicable"]:
            grid.add_row(escape(rung), escape(f"n/a: {result['not_applicable'][rung]}"), "", "", "", "")
    console.print(grid)
    console.print(escape(f"recommended: {pick} — {result['recommendation']['why']}"))
    console.print(escape(f"rule: {result['recommendation']['rule']}"), style="dim")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 10_000 else f"{n:,} B"
