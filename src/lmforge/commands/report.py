"""`lmforge report`: one offline HTML page from runs, evaluations and comparisons."""

from pathlib import Path
from typing import Annotated

import typer

from lmforge.commands.common import JsonFlag, OverwriteFlag, emit, reflow
from lmforge.errors import LmforgeError


@reflow
def report(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Run directories, model or adapter directories (with evals/), eval JSONs, comparison JSONs."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML file to write.", metavar="FILE")],
    overwrite: OverwriteFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Write one self-contained HTML page: loss curves, evaluation tables with 95% intervals, forgetting, and
    knowledge vs behaviour deltas.

    Each input is read for what it holds: a run directory (lmforge pretrain|finetune|align --out RUN), a model or
    adapter directory (its evals/*.json are read too), an eval result (lmforge eval ... --json) or a comparison
    (lmforge eval compare BASE TUNED --json). The page loads nothing from anywhere: plots are embedded PNGs and
    the styles inline, so it opens offline and can be mailed or archived as one file.
    """
    from lmforge.report import build_report

    if out.is_dir():
        raise LmforgeError(f"--out {out} is a directory; expected the HTML file to write")
    if any(out.resolve() == Path(i).resolve() for i in inputs):
        raise LmforgeError(f"--out {out} is one of the inputs: writing there would replace what is read")
    if out.exists() and not overwrite:
        raise LmforgeError(f"--out {out} exists: add --overwrite to replace it, or give another --out")
    if not out.parent.is_dir():
        raise LmforgeError(f"--out {out}: the folder {out.parent} does not exist")
    emit(build_report(inputs, out), as_json)


def register(app: typer.Typer) -> None:
    """Add `report` to the root app."""
    app.command("report")(report)
