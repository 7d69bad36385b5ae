"""Crash-safe file writes: write a temporary file beside the target, fsync it, then rename over the target."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def replace_atomically(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` on a temporary file in path's directory, fsync it and rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cache_dir() -> Path | None:
    """lmforge's cache folder (what is derived from input files and rebuilt when missing): $LMFORGE_CACHE, else
    $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge; None when LMFORGE_CACHE is "off"."""
    if (chosen := os.environ.get("LMFORGE_CACHE")) is not None and chosen.strip():
        return None if chosen.strip().lower() == "off" else Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, or of a directory's files (relative names and contents, in name order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text or bytes to `path` so a reader never sees a half-written file."""
    mode = "w" if isinstance(data, str) else "wb"

    def write(tmp: str) -> None:
        with open(tmp, mode) as f:
            f.write(data)

    return replace_atomically(path, write)


def hidden_siblings(out: Path, kind: str) -> list[Path]:
    """The hidden `.NAME.<id>.KIND` siblings of `out` that lmforge sets aside (`staging_dir`'s "tmp" and "old",
    `remove_tree`'s "del.tmp", a replaced run's "replaced")."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[0-9a-f]{{12}}\.{re.escape(kind)}")
    if not out.parent.is_dir():
        return []
    return [p for p in out.parent.iterdir() if pattern.fullmatch(p.name)]


def recover_output(out: str | Path) -> None:
    """Undo what a process killed inside `staging_dir` left: the previous `out` put back when the kill came between
    its two renames, unfinished and displaced copies deleted."""
    out = Path(out)
    displaced = hidden_siblings(out, "old")
    if displaced and not out.exists() and not out.is_symlink():
        os.replace(displaced.pop(), out)  # the previous complete output, set aside just before the kill
    for path in displaced + hidden_siblings(out, "tmp") + hidden_siblings(out, "del.tmp"):
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staging_dir(out: str | Path) -> Iterator[Path]:
    """A fresh directory beside `out` to fill; on success it replaces `out` (an old `out` is removed last), on
    error it is deleted, so `out` is always either the old complete version or the new complete one (after a
    SIGKILL between the two renames, `recover_output` puts the old one back)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_output(out)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()  # respects the umask, unlike tempfile.mkdtemp's 0700
    try:
        yield tmp
        if out.exists():
            old = tmp.with_suffix(".old")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tree(path: str | Path) -> None:
    """Delete a directory tree: renamed aside first (one atomic step), so a crash mid-delete leaves a hidden
    `.NAME.<id>.del.tmp` leftover, never a half-deleted tree under the original name."""
    path = Path(path)
    hidden = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.del.tmp"
    os.replace(path, hidden)
    if hidden.is_dir():
        shutil.rmtree(hidden)
    else:
        hidden.unlink()
