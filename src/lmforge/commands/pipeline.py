"""`lmforge pipeline RECIPE`: chain stages from one YAML recipe, skipping what is up to date."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmforge.commands.common import JsonFlag, emit, reflow

EPILOG = """\b
A recipe (docs/pipelines.md: the whole format; recipes/pipelines/: examples):
  out: runs/medical       # each stage writes OUT/<name>; --out overrides
  vars: {steps: 200}      # --set vars.steps=50 overrides
  stages:
    - {name: world, run: synth, with: {seed: 0}}
    - name: tok
      run: tokenizer
      with: {inputs: ["${world}/pretrain.jsonl"], vocab_size: 2048}
    - name: base
      run: pretrain
      recipe: ../pretrain-world.yaml  # relative to this file
      set: {data.dataset: "${world}/pretrain.jsonl",
            data.tokenizer: "${tok}", train.max_steps: "${vars.steps}"}
Kinds: synth, tokenizer, prepare, pretrain, finetune, align, rag-index,
  eval, call, serve.
References: ${NAME} (primary output),
  ${NAME.dir|model|adapter|result|command}, ${vars.X}, ${out}."""


def _table(result: dict) -> Table:
    """One row per stage: what it did (or would do) and why, its seconds and primary output."""
    title = f"pipeline {result['recipe']} -> {result['out']}" + (" (dry run)" if result["dry_run"] else "")
    table = Table(title=escape(title))
    for column in ("stage", "kind", "action", "seconds"):
        table.add_column(column, no_wrap=True, justify="right" if column == "seconds" else "left")
    table.add_column("output (under OUT)")
    table.add_column("why")
    out = Path(result["out"])
    for s in result["stages"]:
        seconds = f"{s['seconds']:.1f}" if s["seconds"] is not None else "-"
        output = Path(s["output"])
        shown = str(output.relative_to(out)) if output.is_relative_to(out) else str(output)
        table.add_row(*map(escape, (s["name"], s["kind"], s["action"], seconds, shown, s["reason"])))
    return table


@reflow
def pipeline(
    recipe: Annotated[Path, typer.Argument(help="A pipeline recipe (YAML).")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output root (default: the recipe's `out`).", metavar="DIR"),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a var (repeatable), e.g. vars.steps=50.", metavar="vars.X=V"),
    ] = None,
    start: Annotated[
        str | None,
        typer.Option("--from", help="Rerun this stage and every stage after it.", metavar="STAGE"),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan (each stage: run or skip, and why); run nothing."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Run a pipeline recipe: stages chained in order (synthetic world, tokenizer, data, pretraining,
    fine-tuning, alignment, RAG index, evaluation, calls into lmforge, serving), each writing
    OUT/<stage name>.

    Stages refer to earlier ones' outputs with ${NAME}, ${NAME.model}, ${NAME.adapter}, ${NAME.dir}, and to
    values with ${vars.X} and ${out}. OUT/pipeline.json records each finished stage's fingerprint (kind,
    resolved config, the stages it reads, the content of its other input files); a rerun skips a stage whose
    fingerprint and outputs still hold (a training stage's lineage must record the same config), and runs it
    when its config, an input or an upstream stage changed, or its output is gone. See docs/pipelines.md.
    """
    from lmforge.pipeline import run_pipeline

    result = run_pipeline(recipe, out=out, sets=list(overrides or []), start=start, dry_run=dry_run)
    if as_json:
        emit(result, True)
        return
    Console().print(_table(result))


def register(app: typer.Typer) -> None:
    """Add `pipeline` to the root app."""
    app.command("pipeline", epilog=EPILOG)(pipeline)
