"""`lmforge runs list|show|lineage` and `lmforge card`: the history of runs and a model card from it."""

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from lmforge.commands.common import JsonFlag, OverwriteFlag, emit, reflow
from lmforge.errors import LmforgeError

runs_app = typer.Typer(
    help="The runs under a directory, one run's record, a model's lineage.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
ModelArgument = Annotated[
    Path, typer.Argument(help="A model or adapter directory an lmforge stage wrote, or its run directory.")
]


@runs_app.command("list")
@reflow
def runs_list(
    directory: Annotated[Path, typer.Argument(help="Where to look (searched recursively).")] = Path("."),
    as_json: JsonFlag = False,
) -> None:
    """Every run under DIRECTORY, oldest first: its stage, method, date, key result and output directory.

    A run is a directory holding lmforge.json (a stage's or a merge's output), or a run directory with config.yaml
    and results.json; checkpoints and hidden directories are skipped.
    """
    from lmforge.lineage import find_runs

    runs = find_runs(directory)
    if as_json:
        print(json.dumps({"directory": str(directory), "runs": runs}, indent=2))
        return
    if not runs:
        print(f"no runs under {directory}", file=sys.stderr)
        return
    table = Table(box=None, padding=(0, 1))
    for name in ("run", "stage", "method", "date", "result", "output"):
        table.add_column(name, overflow="fold", no_wrap=name != "run")  # the run's path takes what is left
    for r in runs:
        result, run, output = r.get("result"), r.get("run"), r.get("output")
        if run and output and Path(output).parent == Path(run):
            output = Path(output).name  # model/ or adapter/ inside the run: the run column names the rest
        date = (r.get("date") or "-")[:16].replace("T", " ")
        cells = [run or "-", r.get("stage") or "-", r.get("method") or "-", date,
                 f"{result['name']} {result['value']:.4g}" if result else r.get("error", "-"), output or "-"]  # fmt: skip
        table.add_row(*(escape(str(c)) for c in cells))
    Console().print(table)


@runs_app.command("show")
@reflow
def runs_show(run: ModelArgument, as_json: JsonFlag = False) -> None:
    """One run's record: stage, method, date, parent, datasets, config hash, code version, key result, results
    (without sample answers), recorded evaluations and the run directory's files."""
    from lmforge.lineage import describe_run

    emit(describe_run(run), as_json)


@runs_app.command("lineage")
@reflow
def runs_lineage(
    model: ModelArgument,
    png: Annotated[
        Path | None, typer.Option(help="Also draw the graph into this PNG file.", show_default=False)
    ] = None,
    mermaid: Annotated[
        bool, typer.Option("--mermaid", help="Print a Mermaid graph instead of the tree.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """The tree of MODEL's parents through their lmforge.json: base models, datasets (manifest ids), config hash,
    code version and results; a warning for each parent whose weights, or dataset whose manifest id, changed
    since the child was trained on it.

    Recorded relative paths are looked up beside the model (under each of its parent directories), then in the
    current directory.
    """
    from lmforge.lineage import plot_lineage, trace

    if png is not None and not png.parent.is_dir():
        raise LmforgeError(f"--png {png}: its directory {png.parent} does not exist")
    if png is not None and png.is_dir():
        raise LmforgeError(f"--png {png}: is a directory; give a file name (e.g. {png / 'lineage.png'})")
    lineage = trace(model)
    if png is not None:
        plot_lineage(lineage, png)
    if as_json:
        doc: dict[str, Any] = lineage.as_json()
        if mermaid:
            doc["mermaid"] = lineage.mermaid()
        print(json.dumps(doc | {"png": str(png) if png else None}, indent=2))
    elif mermaid:
        print(lineage.mermaid(), end="")
    else:
        Console().print(_tree(lineage))
    for warning in lineage.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if png is not None and not as_json:
        print(f"graph written to {png}", file=sys.stderr)


def _tree(lineage: Any) -> Tree:
    """The lineage as a rich Tree: the model at the root, each node's parents and datasets below it."""
    from lmforge.lineage import dataset_label, key_result, variant

    marks = {"changed": " [bold red]changed since trained on[/]", "missing": " [bold red]not found[/]"}

    def label(i: int, status: str | None) -> str:
        node = lineage.nodes[i]
        record = node.record or {}
        stage = " ".join(str(x) for x in (record.get("stage"), variant(record)) if x) or node.kind
        key = key_result(record.get("results"))
        text = f"[bold]{escape(node.name)}[/]{marks.get(status or '', '')}  {escape(stage)}"
        text += f"  [cyan]{escape(key[0])} {key[1]:.4g}[/]" if key else ""
        return text + (
            f"  [dim]{escape(str(record['date'])[:16].replace('T', ' '))}[/]" if record.get("date") else ""
        )

    def grow(tree: Tree, i: int, seen: frozenset[int]) -> None:
        for d in lineage.nodes[i].datasets:
            text = f"[dim]data[/] {escape(dataset_label(d))}{marks.get(d.get('status', 'unchecked'), '')}"
            tree.add(text + (f" [dim]{d['id'][:12]}[/]" if d.get("id") else ""))
        for edge in (e for e in lineage.edges if e.child == i):
            role = "" if edge.role == "parent" else f"[dim]{edge.role}[/] "
            branch = tree.add(role + label(edge.parent, edge.status))
            if edge.parent not in seen:  # guards against a cycle in hand-edited records
                grow(branch, edge.parent, seen | {edge.parent})

    root = Tree(label(0, None))
    grow(root, 0, frozenset({0}))
    return root


@reflow
def card(
    model: ModelArgument,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="The card to write (default: MODEL's README.md).", show_default=False),
    ] = None,
    license: Annotated[
        str, typer.Option("--license", help="A Hugging Face license id (apache-2.0, mit, cc-by-4.0, ...).")
    ] = "other",
    overwrite: OverwriteFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Write a Hugging Face model card (README.md with YAML front matter: base_model, datasets, license, tags,
    metrics, model-index) from MODEL's lineage and its recorded evaluations (MODEL/evals/*.json).

    The body describes the stages that made it, its training data with their licences, its results with 95%
    intervals, how to load it, and its intended use and limits. A README.md lmforge card did not write is
    replaced only with --overwrite.
    """
    from lmforge.card import CARD_FILE, make_card

    made = make_card(model, license)
    path = made.write(out if out is not None else made.lineage.nodes[0].path / CARD_FILE, overwrite=overwrite)
    for warning in made.lineage.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    emit(made.summary(path), as_json)


def register(app: typer.Typer) -> None:
    """Add `runs` and `card` to the root app."""
    app.add_typer(runs_app, name="runs")
    app.command("card")(card)
