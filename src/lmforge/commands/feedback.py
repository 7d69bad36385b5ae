"""`lmforge feedback export`: users' ratings in a serving log → preference pairs for `data prepare` and DPO."""

from pathlib import Path
from typing import Annotated

import typer

from lmforge.commands.common import JsonFlag, OverwriteFlag, emit, reflow

feedback_app = typer.Typer(
    help="User feedback from a served model: ratings into preference data.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def register(app: typer.Typer) -> None:
    """Add `feedback` to the root app."""
    app.add_typer(feedback_app, name="feedback")


@feedback_app.command("export")
@reflow
def export(
    log: Annotated[Path, typer.Argument(help="A request log (lmforge serve --log FILE --log-text).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The preference JSONL to write.")],
    overwrite: OverwriteFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Pair an up-rated and a down-rated answer to the same prompt into {"prompt", "chosen", "rejected"}
    records, which `lmforge data prepare` reads and `lmforge align --set method=dpo` trains on."""
    from lmforge.errors import LmforgeError
    from lmforge.serve.traffic import export_preferences

    if out.exists() and not overwrite:
        raise LmforgeError(f"--out {out} exists; pass --overwrite to replace it")
    emit(export_preferences(log, out), as_json)
