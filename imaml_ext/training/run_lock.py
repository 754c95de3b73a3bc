"""One run per run folder: the default --out, made with an atomic mkdir so that runs started in
the same second get folders of their own, and a lock file held for the run's life, so that a
second run given the same --out is refused instead of mixing its files with the first's."""

from __future__ import annotations

import fcntl
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional

from .config import RunConfig
from .errors import RunError

# Held (flock) by the process running in the folder; the kernel releases it when the process
# ends, even by SIGKILL, so a file left behind by a killed run locks nothing.
LOCK_NAME = ".imaml-train.lock"


def default_out(args: RunConfig) -> str:
    """runs/<task>-<ways>w<shots>s-<date>-<time>, or the first free of -2, -3, ...: mkdir makes it,
    and only one process can make a given folder."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{args.task}-{args.ways}w{args.shots}s-{stamp}"
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        path, n = base, 1
        while True:
            try:
                path.mkdir()
                return str(path)
            except FileExistsError:
                n += 1
                path = base.with_name(f"{base.name}-{n}")
    except OSError as error:
        raise RunError(f"--out (default {base}): cannot make the run folder ({error.strerror or error}); "
                       f"choose another --out") from None


class RunLock:
    """Holds ``folder``/.imaml-train.lock for the run's life (made, with the folder, if absent);
    refuses a folder whose lock another live process holds. On leaving, removes the lock file, and
    the folder too if it made it and nothing else was written there. ``made``: the folder was
    made for this run already (the default --out)."""

    def __init__(self, folder: Path, made: bool = False):
        self.folder, self.made = Path(folder), made
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        if not self.folder.exists():
            try:
                self.folder.mkdir(parents=True)
                self.made = True
            except FileExistsError:  # another process made it meanwhile: the lock decides
                pass
            except OSError as error:
                raise RunError(f"--out {self.folder}: cannot make the run folder ({error.strerror or error})") from None
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as error:
                raise RunError(f"--out {self.folder}: cannot write in it ({error.strerror or error}); choose another "
                               f"--out") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                self._remove_made_folder()
                raise RunError(f"--out {self.folder} is in use by another run (process {holder or '?'}, which "
                               f"holds {self.path.name}); wait for it to end or choose another --out (nothing was "
                               f"written)") from None
            except OSError as error:  # a file system without locks (some network ones): run, but say so
                print(f"imaml-train: warning: cannot lock {self.path} ({error.strerror or error}): a second run "
                      f"given the same --out would not be refused", file=sys.stderr)
                self.fd = fd
                break
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                self.fd = fd
            else:  # its holder removed the file as we opened it: lock the new one
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc) -> None:
        # Unlinked while still held: a process that opened the old file retries on the new one.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        self._remove_made_folder()

    def _remove_made_folder(self) -> None:
        if self.made:
            try:
                self.folder.rmdir()  # only if empty: a run that wrote nothing leaves nothing
            except OSError:
                pass
