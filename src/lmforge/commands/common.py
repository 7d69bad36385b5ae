"""What every `lmforge` command shares: the root app with its error handling, `emit`, and the common flags.

Command modules (`lmforge.cli`, `lmforge.commands.*`) import from here, never from each other.
"""

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from inspect import cleandoc
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.core
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from lmforge import __version__
from lmforge.config import validation_message
from lmforge.errors import LmforgeError, RunFailed


def _fail(exc: BaseException, code: int, debug: bool) -> NoReturn:
    """Print one `error:` line (after the traceback with --debug) and exit with `code`."""
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, ValidationError):
        message = validation_message(exc)
    elif isinstance(exc, FileNotFoundError):
        message = f"{exc.strerror}: {exc.filename}"
    else:
        message = str(exc) or type(exc).__name__
    if code == 1 and not debug:
        message += f" ({type(exc).__name__}; rerun with `lmforge --debug ...` for the traceback)"
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


_METAVARS = {"int": "N", "float": "X", "Path": "PATH", "str": "TEXT"}


def _click_metavars(command: Any) -> None:
    """Click's plain metavars (N, X, PATH, TEXT, FILES...) on every value option and argument of `command` and
    its subcommands, where Typer would print `<int>`, `<list[Path]>`, `{files}`."""
    for param in command.params:
        if param.metavar is not None or getattr(param, "is_flag", False):
            continue
        if isinstance(param, typer.core.TyperArgument):
            param.metavar = param.name.upper()  # Typer adds "..." to one taking several
        else:
            bare = param.bare_type()  # "int", "list[str]", "Path"
            param.metavar = _METAVARS.get(bare.removeprefix("list[").removesuffix("]"), bare.upper())
    for sub in getattr(command, "commands", {}).values():
        _click_metavars(sub)


class _Group(TyperGroup):
    """The root command: turns exceptions out of any command into one error line and an exit status."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _click_metavars(self)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException, BrokenPipeError):
            raise  # usage errors (exit 2), --help, --version: Typer handles them
        except (LmforgeError, ValidationError, FileNotFoundError) as e:
            _fail(e, 2, ctx.params.get("debug", False))
        except RunFailed as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(1) from None
        except Exception as e:
            _fail(e, 1, ctx.params.get("debug", False))
        except KeyboardInterrupt as e:  # Ctrl-C: a run's `Interrupted` says where it stopped and how to go on
            if ctx.params.get("debug", False):
                traceback.print_exception(e)
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank is interrupted: rank 0 speaks
                print(str(e) or "interrupted", file=sys.stderr)
            raise typer.Exit(130) from None  # 128 + SIGINT, as a shell reports a Ctrl-C


def reflow(fn: Callable) -> Callable:
    """Join the lines of each docstring paragraph: Typer's rich help keeps single newlines as line breaks."""
    paragraphs = cleandoc(fn.__doc__ or "").split("\n\n")
    fn.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    return fn


def _version(value: bool) -> None:
    """`--version`: print `lmforge X.Y.Z` and exit 0."""
    if value:
        print(f"lmforge {__version__}")
        raise typer.Exit()


def _setup_logging(debug: bool) -> None:
    """Send `lmforge.*` logs to stderr: INFO, or DEBUG with --debug."""
    root = logging.getLogger("lmforge")
    for old in list(root.handlers):  # called once per run; tests run the app many times in one process
        root.removeHandler(old)
    root.addHandler(RichHandler(console=Console(stderr=True), show_path=False, log_time_format="[%X]"))
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def make_app() -> typer.Typer:
    """A fresh `lmforge` app with the global options and error handling, and no commands yet."""
    new = typer.Typer(
        name="lmforge",
        cls=_Group,
        help="Train, fine-tune, align, steer, serve and evaluate language models with one machinery.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @new.callback()
    def _root(
        version: Annotated[
            bool,
            typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
        ] = False,
        debug: Annotated[bool, typer.Option("--debug", help="Debug logs, and tracebacks on errors.")] = False,
    ) -> None:
        _setup_logging(debug)

    return new


def emit(result: dict, as_json: bool) -> None:
    """Print a command's result: one JSON document with `as_json`, else a two-column table for people."""
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    table = Table.grid(padding=(0, 2))
    for key, value in _flatten(result):
        table.add_row(escape(key), escape(_format(value)))
    Console().print(table)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as dotted keys: {"a": {"b": 1}} → [("a.b", 1)]."""
    rows: list[tuple[str, Any]] = []
    for key, value in d.items():
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return ", ".join(map(str, value)) or "-"
    return value if isinstance(value, str) else json.dumps(value, default=str)


# Options several commands take.
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document.")]
RagFlag = Annotated[
    Path | None,
    typer.Option(
        help="A RAG index (lmforge rag index): retrieved passages go into each prompt.", show_default=False
    ),
]
RagKFlag = Annotated[int, typer.Option("--k", help="Passages retrieved per prompt or question.")]
MinScoreFlag = Annotated[
    float | None,
    typer.Option(
        help="Relevance a passage needs (cosine, or BM25 without vectors; default 0.25 / > 0); with none, the "
        "model is told nothing supports an answer.",
        show_default=False,
    ),
]
RagModeOption = Annotated[
    str | None,
    typer.Option(
        "--rag-mode",
        "--mode",
        help="bm25, dense or hybrid (default: hybrid with vectors, else bm25).",
        show_default=False,
    ),
]
OverwriteFlag = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace what --out holds (an output of this command's kind; kept until the new one is whole).",
    ),
]
CompileFlag = Annotated[
    bool,
    typer.Option(
        "--compile/--no-compile",
        help="Compile the decode step (torch.compile on a static KV cache): the same tokens at 1.2-1.7x the "
        "tokens/s of eager decoding on a CPU, after compiling once for batch 1 and once for larger batches "
        "(20-70 s on 2 cores; seconds once Inductor's disk cache holds it).",
    ),
]
AdapterFlag = Annotated[
    Path | None,
    typer.Option(
        help="An adapter directory (LoRA, bottleneck, prompt tuning) to apply on MODEL.", show_default=False
    ),
]


def rag_mode(mode: str | None) -> Any:
    """--mode checked: bm25, dense, hybrid, or None for the index's default."""
    if mode not in (None, "bm25", "dense", "hybrid"):
        raise LmforgeError(f"--mode {mode}: expected bm25, dense or hybrid")
    return mode


def open_retriever(index: Path, k: int, mode: str | None, min_score: float | None) -> Any:
    """The Retriever behind --rag INDEX --k --mode --min-score."""
    from lmforge.rag.index import RagIndex
    from lmforge.rag.prompt import Retriever

    return Retriever(RagIndex(index), k=k, mode=rag_mode(mode), min_score=min_score)
