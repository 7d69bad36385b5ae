"""What every bench records beside its figures: the lmforge commit, the machine, and the results file."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def lmforge_revision() -> str:
    """The commit lmforge runs from, "+changes" when src/ differs from it."""
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "src") else "")


def cpu_machine(threads: int) -> str:
    """The CPU's model name, the thread count and torch's version."""
    import torch

    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return f"{cpu.group(1) if cpu else platform.processor()}, {threads} threads, torch {torch.__version__}"


def append_results(path: Path, records: Iterable[dict[str, Any]], **header: Any) -> None:
    """One JSON line per record, each with `header` (date, command, machine, versions, settings, ...) first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps({**header, **record}) + "\n")


def finish(path: Path, records: Iterable[dict[str, Any]], *, started: float, load_start: float, record: bool,
           **header: Any) -> float:  # fmt: skip
    """Print the run's seconds and the load average at its start and end; append the records (with `header`,
    `command` and `total_s`) unless `record` is False. Returns the seconds."""
    seconds = time.perf_counter() - started
    print(
        f"\n{seconds:.0f} s in all; load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    )
    if record:
        append_results(path, records, **header, command=" ".join(sys.argv), total_s=seconds)
    return seconds
