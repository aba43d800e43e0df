"""Writing files so that a reader, or a crash, never sees half of one; checking, before any work,
that the place they go to can be written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from hybridnas.search_space.errors import UserError


class OutputError(UserError):
    """An output path that cannot be written (under a regular file, in a read-only directory)."""


def check_writable_dir(path: str | Path, what: str = "--out") -> Path:
    """``path`` made absolute, once it is certain that this process can create it (or write into
    it, when it exists) as a directory; otherwise an `OutputError` naming ``what`` and the path.

    Creates nothing: commands call this before they create a tracking store, a run or a folder, so a
    bad ``--out`` leaves nothing behind.
    """
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {shown(p)}: is a file, not a directory")
    _check_creatable(p, p, what)
    return p


def check_writable_file(path: str | Path, what: str = "--out") -> Path:
    """``path`` made absolute, once it is certain that a file can be written there (its folder can
    be made, or written into); otherwise an `OutputError`. Creates nothing."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise OutputError(f"{what} {shown(p)}: is a directory, not a file")
    _check_creatable(p, p.parent, what)
    return p


def _check_creatable(target: Path, folder: Path, what: str) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(
            f"{what} {shown(target)}: {shown(existing)} is a file, so nothing can be made under it"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {shown(target)}: directory {shown(existing)} is not writable")


def atomic_write(path: str | Path, data: str | bytes | Callable[[str], None]) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename.

    ``data`` is the content, or a function that writes the file at the path it is given (e.g.
    ``lambda p: torch.save(state, p)``). The file gets the permissions a plain ``open()`` would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp creates 0600
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def shown(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to read), else as is."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)
