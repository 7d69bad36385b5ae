"""Where lmforge reads and writes: input paths checked for the kind they must be, and the one rule for outputs.

The output rule, for every command that writes a directory (`data prepare`, `data synth`, `tokenizer train`,
`merge`, every stage, the demo): a new output must be absent or empty; an existing output of the same kind is
replaced only with `--overwrite`; an output that equals, contains or lies inside an input is refused. Each check
runs before anything is written, so a refused command changes nothing. The replacement itself keeps the old
output until the new one is complete: staged outputs are built beside it and renamed over it
(`fileio.staging_dir`); a run moves the old directory aside and deletes it when the new one ends (`Replaced`); the
demo replaces its outputs one by one, each by this rule.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.fileio import hidden_siblings, recover_output

log = logging.getLogger(__name__)


def _json_has(path: Path, key: str) -> bool:
    try:
        return key in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):  # TypeError: a JSON list or number
        return False


_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "dataset": ("a prepared dataset (manifest.json)", lambda p: _json_has(p / "manifest.json", "splits")),
    "model": (
        "a model (config.json + weights)",
        lambda p: (p / "config.json").is_file() and any((p / w).is_file() for w in _WEIGHTS),
    ),
    "adapter": ("an adapter (adapter_config.json)", lambda p: (p / "adapter_config.json").is_file()),
    "run": ("a run (config.yaml)", lambda p: (p / "config.yaml").is_file()),
    "demo": (
        "a demo output (demo.json)",  # or world/ alone: written before demo.json existed
        lambda p: (
            _json_has(p / "demo.json", "lmforge_demo") or _json_has(p / "world" / "world.json", "generator")
        ),
    ),
    "world": ("a synthetic world (world.json)", lambda p: _json_has(p / "world.json", "generator")),
    "tokenizer": ("a tokenizer (tokenizer.json)", lambda p: (p / "tokenizer.json").is_file()),
}
"""Each kind of output lmforge writes: (what it is, in words; whether a directory holds one), the most specific
first: a model directory holds a tokenizer.json too."""


def output_kind(path: str | Path) -> str | None:
    """The kind of lmforge output directory `path` holds (a key of KINDS), or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    return next((kind for kind, (_, holds) in KINDS.items() if holds(path)), None)


def _overlap(out: Path, inputs: Iterable[str | Path], flag: str) -> None:
    """Refuse an output that equals, contains or lies inside an input (symlinks resolved)."""
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source:
            how = "is"
        elif target.is_relative_to(source):
            how = "lies inside"
        elif source.is_relative_to(target):
            how = "contains"
        else:
            continue
        raise LmforgeError(
            f"{flag} {out} {how} the input {given}: writing there would change what the command reads; "
            "give another output directory"
        )


def check_output(
    out: str | Path,
    kind: str,
    *,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    flag: str = "--out",
) -> bool:
    """Refuse an output that would lose or corrupt user files; True when `out` holds a `kind` output that
    `overwrite` allows to replace, False when it is absent or empty. Writes nothing."""
    out = Path(out)
    _overlap(out, inputs, flag)
    recover_output(out)  # a killed earlier write: its previous output back in place, its leftovers gone
    if not out.exists() and not out.is_symlink():
        return False
    what = KINDS[kind][0]
    if not out.is_dir():
        raise LmforgeError(
            f"{flag} {out} is a file; expected a directory to write {what} into (absent or empty)"
        )
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return False
    if output_kind(out) != kind:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise LmforgeError(
            f"{flag} {out} is not empty ({shown}) and does not hold {what}: lmforge never deletes files it did "
            "not write; give a new or empty directory"
        )
    if not overwrite:
        raise LmforgeError(already_holds(out, kind, flag))
    return True


def already_holds(out: str | Path, kind: str, flag: str = "--out", detail: str = "") -> str:
    """The refusal of an existing output of the same kind without --overwrite (`detail` follows the kind)."""
    return (
        f"{flag} {out} already holds {KINDS[kind][0]}{detail}: add --overwrite to replace it, or give another "
        f"{flag}"
    )


def config_paths(cfg: Any) -> list[Path]:
    """Every path a config holds (fields typed Path, in lists and mappings, nested sections): its inputs."""
    from pydantic import BaseModel

    found: list[Path] = []

    def walk(value: Any) -> None:
        if isinstance(value, Path):
            found.append(value)
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)

    walk(cfg)
    return found


def check_run_dir(out: str | Path, cfg: Any, overwrite: bool) -> bool:
    """Refuse a stage's run directory that would lose files (see `check_output`); `cfg.train.resume` continues
    the run in `out`. True when `out` holds a run that `overwrite` replaces. Writes nothing."""
    inputs = config_paths(cfg)
    if cfg.train.resume:
        if overwrite:
            raise LmforgeError("--resume continues a run and --overwrite replaces it: give one of them")
        check_output(out, "run", inputs=inputs, overwrite=True)  # an absent or empty `out` starts afresh
        return False
    if (Path(out) / "config.yaml").is_file() and not overwrite:
        raise LmforgeError(
            f"--out {out} holds a run: use --resume {out} to continue it, --overwrite to replace it, or another "
            "--out"
        )
    return check_output(out, "run", inputs=inputs, overwrite=overwrite)


class Replaced:
    """An output directory started afresh in place, its old content kept aside until `done()`.

    For outputs written step by step where they live (a run, which `--resume` must find at its own path): the old
    directory is renamed to a hidden `.NAME.<id>.replaced` sibling (one atomic step), a new one is created, and
    the old one is deleted only when the new one is complete. A run interrupted and then resumed to its end
    deletes what its start set aside.
    """

    def __init__(self, out: str | Path, replace: bool) -> None:
        self.out = Path(out)
        self.aside = hidden_siblings(self.out, "replaced")
        if replace and self.out.exists():
            self.aside.append(self.out.parent / f".{self.out.name}.{uuid.uuid4().hex[:12]}.replaced")
            os.replace(self.out, self.aside[-1])
            log.info("%s: the old content is kept at %s until this one completes", self.out, self.aside[-1])
        self.out.mkdir(parents=True, exist_ok=True)

    def done(self) -> None:
        """The new output is complete: delete the old one."""
        for path in self.aside:
            shutil.rmtree(path, ignore_errors=True)
        self.aside = []


def require_dir(path: str | Path, what: str, marker: str | None = None, flag: str | None = None) -> Path:
    """`path` as an existing directory (holding `marker` when given), else an error saying what was expected.

    `what` names the directory ("a tokenizer directory"); a file given in its place, e.g. the marker file itself
    (`.../tokenizer.json` for its directory), gets an error that points to the directory.
    """
    path = Path(path)
    name = f"{flag} {path}" if flag else str(path)
    if path.is_file():
        hint = f"; give its directory {path.parent}" if marker and path.name == marker else ""
        raise LmforgeError(f"{name} is a file; expected {what}{hint}")
    if not path.exists():
        raise LmforgeError(f"{name} does not exist; expected {what}")
    if marker is not None and not (path / marker).exists():
        raise LmforgeError(f"{name} has no {marker}; expected {what}")
    return path


def start_run(out: str | Path, cfg: Any, replace: bool) -> Replaced:
    """Begin writing a run whose inputs are checked: the old run set aside when `replace`, config.yaml written;
    call `.done()` on the result when the run is complete."""
    from lmforge.config import save_config  # config.py sits above this module

    run_dir = Replaced(out, replace)
    log.info("config written to %s", save_config(cfg, run_dir.out))
    return run_dir
