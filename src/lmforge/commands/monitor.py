"""`lmforge monitor`: traffic, input drift and per-variant ratings from a server's request log."""

from pathlib import Path
from typing import Annotated

import typer

from lmforge.commands.common import JsonFlag, emit, reflow
from lmforge.errors import LmforgeError


@reflow
def monitor(
    log: Annotated[
        Path, typer.Argument(help="The server's request log (its rotated LOG.1, LOG.2 ... are read too).")
    ],
    reference: Annotated[
        Path | None,
        typer.Option(
            help="A prepared dataset (lmforge data prepare) the model was trained on: live prompts are compared "
            "with its train documents.",
            metavar="DATASET",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="A directory for monitor.json and drift.png.", metavar="DIR"),
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="Drift is flagged when a population stability index exceeds this.", min=0.0)
    ] = 0.2,
    as_json: JsonFlag = False,
) -> None:
    """Summarise a request log: traffic (requests, tokens, TTFT and latency percentiles, finish reasons, policy
    actions) overall and by variant; users' ratings per variant with 95% Wilson intervals, and whether the best
    variant beats the runner-up (two-proportion z-test, p < 0.05).

    With --reference, also the input drift: the population stability index and KL divergence of live prompt
    lengths (in the dataset's decile bins) and of their token ids (64 buckets), flagged past --threshold. A chat
    dataset's documents hold whole conversations, answers included, so live prompts read somewhat shorter.
    """
    from lmforge.serve.monitor import monitor as run_monitor

    if out is not None and out.exists() and not out.is_dir():
        raise LmforgeError(f"--out {out} is a file; expected a directory for monitor.json and drift.png")
    emit(run_monitor(log, reference, out, threshold), as_json)


def register(app: typer.Typer) -> None:
    """Add `monitor` to the root app."""
    app.command("monitor")(monitor)
