"""`lmforge lm-eval ARGS...`: lm-evaluation-harness's own command line with the `lmforge` model class registered."""

import shutil
import sys
import textwrap
from collections.abc import Sequence

import typer

from lmforge.commands.common import reflow
from lmforge.errors import LmforgeError


def run_lm_eval(args: Sequence[str]) -> None:
    """lm-eval's command line on `args` (its flags unchanged) with the `lmforge` model registered; its exit
    status other than 0 (argparse's usage errors) becomes this command's."""
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        raise LmforgeError("lm-eval is not installed: pip install 'lmforge[eval]'") from None
    import lmforge.eval.harness  # noqa: F401  (registers --model lmforge)

    if 1 <= len(args) <= 2 and args[-1] in ("-h", "--help"):  # lm-eval's help, fitted to the terminal
        from lm_eval._cli import HarnessCLI

        cli = HarnessCLI()
        sub = cli._subparsers.choices.get(args[0]) if len(args) == 2 else None
        print(_fit_width((sub or cli._parser).format_help()), end="")
        return
    argv = sys.argv
    sys.argv = ["lm-eval", *args]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    except SystemExit as e:
        if e.code not in (0, None):
            raise typer.Exit(e.code if isinstance(e.code, int) else 2) from None
    finally:
        sys.argv = argv


def _fit_width(text: str) -> str:
    """lm-eval's help with its preformatted lines (examples up to ~100 columns) wrapped to the terminal, as
    every lmforge help reads."""
    width = shutil.get_terminal_size().columns
    lines = []
    for line in text.splitlines():
        indent = " " * (len(line) - len(line.lstrip()))
        wrapped = textwrap.wrap(line, width, subsequent_indent=indent + "  ", break_on_hyphens=False)
        lines += wrapped if len(line) > width else [line]
    return "\n".join(lines) + "\n"


def register(app: typer.Typer) -> None:
    """Add `lm-eval` to the root app."""

    @app.command(
        "lm-eval",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,  # --help goes to lm-eval
    )
    @reflow
    def lm_eval(ctx: typer.Context) -> None:
        """Run lm-evaluation-harness (every lm_eval flag, unchanged) with lmforge models: --model lmforge
        --model_args pretrained=DIR[,adapter=DIR][,max_length=N][,dtype=T] --tasks TASKS [--batch_size N]
        [--device D] [--include_path DIR] [--output_path DIR] ... (needs lmforge[eval]). `lmforge lm-eval --help`
        prints lm-eval's own help."""
        run_lm_eval(ctx.args)
