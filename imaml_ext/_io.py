"""Small file helpers shared by the data layer and the training command line."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore
    os.umask(mask)
    return mask


def unwritable_cause(folder: Path, error: OSError) -> str:
    """Why ``folder`` could not be made or written into: a file where a folder should be (mkdir's
    FileExistsError or NotADirectoryError say it less plainly), else the system's reason."""
    reason = error.strerror or str(error)
    for place in (Path(folder), *Path(folder).parents):
        if place.exists() or place.is_symlink():
            if not place.is_dir():
                return f"{str(place)!r} is a file, not a folder"
            return (f"no file can be written in it ({reason})" if place == Path(folder)
                    else f"no folder can be made in {str(place)!r} ({reason})")
    return reason


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file in the same folder, then ``os.replace``, so a reader
    (or a crash half-way) never leaves a half-written file under ``path``.

    The file gets the mode a plain ``open(path, "wb")`` would give it: an existing file's
    own mode, else ``0o666 & ~umask`` (``mkstemp`` alone makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
