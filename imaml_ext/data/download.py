"""Downloading the official Omniglot zips (``images_background.zip``, ``images_evaluation.zip``).

Each file goes to a temporary file in the destination folder and is renamed into place only
after its md5 matched, so a failed, interrupted or corrupt download leaves nothing behind and
never replaces a good file. Plain ``urllib`` (``http(s)://`` and ``file://`` URLs), no extra
dependency; a ``tqdm`` progress bar on stderr when tqdm is installed.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional, Union

from .._io import atomic_write, unwritable_cause

PathLike = Union[str, "os.PathLike[str]"]

#: Where the Omniglot authors publish the zips (the files torchvision's ``Omniglot`` fetches).
OFFICIAL_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"

#: md5 of the official zips, as torchvision checks them.
OFFICIAL_MD5: Mapping[str, str] = MappingProxyType({
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
})

ZIP_NAMES = tuple(OFFICIAL_MD5)

_CHUNK = 1 << 16

# How the data errors name the options: the Python API's keywords by default, the command
# line's flags inside option_spelling(...) (imaml_ext.train).
_SPELLING: ContextVar[Mapping[str, str]] = ContextVar(
    "omniglot_option_spelling", default=MappingProxyType({"root": "root=<folder>", "download": "download=True"}))


@contextmanager
def option_spelling(root: str, download: str):
    """Inside it, the data layer's messages name ``root`` and ``download`` as given here
    (``option_spelling("--data <folder>", "--download")`` for a command line)."""
    token = _SPELLING.set(MappingProxyType({"root": root, "download": download}))
    try:
        yield
    finally:
        _SPELLING.reset(token)


def spelled(option: str) -> str:
    """``"root"`` or ``"download"`` as the current messages name it."""
    return _SPELLING.get()[option]


class DownloadError(OSError):
    """A download failed for a reason outside the file's content (network, HTTP status, a
    transfer cut short). A file with the wrong checksum raises ``ValueError`` instead."""


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)  # an integrity check, not a security one
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _progress_bar(total: Optional[int], desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: no bar without it
            pass
        else:
            return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)
    return _NoBar()


def _manual_hint(dest: Path) -> str:
    names = " and ".join(ZIP_NAMES)
    return (
        f"To install the data by hand, download {names} from {OFFICIAL_URL} and put them into "
        f"{str(dest)!r} (or into any folder, then pass {spelled('root')} or set IMAML_DATA=<folder>); "
        f"the folders images_background/ and images_evaluation/ extracted from them work too."
    )


def _stopped(url: str, got: int, total: Optional[int], dest: Path) -> str:
    of = f" of {total}" if total is not None else ""
    return f"Download of {url} stopped after {got}{of} bytes. Try again, or: {_manual_hint(dest)}"


def _fetch(url: str, target: Path, expected: str, progress: bool, timeout: Optional[float]) -> None:
    """``url`` -> ``target`` through :func:`atomic_write`: a failed transfer or a wrong md5
    raises inside the write, so the temporary file is removed and ``target`` is untouched."""

    def write(f) -> None:
        h = hashlib.md5(usedforsecurity=False)
        got, total = 0, None
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                total = int(length) if length is not None and length.isdigit() else None
                with _progress_bar(total, target.name, progress) as bar:
                    for chunk in iter(lambda: resp.read(_CHUNK), b""):
                        f.write(chunk)
                        h.update(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
        except http.client.IncompleteRead as e:
            # Some Python versions raise when the connection drops early...
            raise DownloadError(_stopped(url, got, total, target.parent)) from e
        except (urllib.error.URLError, http.client.HTTPException, socket.timeout, ConnectionError) as e:
            reason = getattr(e, "reason", None) or e
            raise DownloadError(f"Could not download {url}: {reason}. {_manual_hint(target.parent)}") from e
        if total is not None and got != total:  # ...others return a short body without complaint
            raise DownloadError(_stopped(url, got, total, target.parent))
        actual = h.hexdigest()
        if actual != expected:
            raise ValueError(
                f"Downloaded {url} has md5 {actual}, expected {expected}: the file is damaged or not the "
                f"official one; nothing was written to {str(target)!r}."
            )

    atomic_write(target, write)


def download_omniglot(
    dest: PathLike,
    base_url: str = OFFICIAL_URL,
    md5s: Mapping[str, str] = OFFICIAL_MD5,
    progress: bool = True,
    timeout: Optional[float] = 60.0,
) -> Path:
    """Download ``images_background.zip`` and ``images_evaluation.zip`` into ``dest``.

    ``dest`` is created if needed. A zip already there whose md5 matches is kept (not fetched
    again); any other is fetched from ``<base_url>/<name>`` (``https://``, ``http://`` or
    ``file://``) into a temporary file in ``dest``, checked against ``md5s[name]`` and only
    then renamed over the old one. :func:`imaml_ext.data.load_omniglot` reads the zips as
    they are: nothing is extracted. Returns ``dest``.

    Raises:
        ValueError: ``md5s`` lacks a name or a 32-digit hex value, or a downloaded file's md5
            differs (the message names the URL, the expected and the actual md5).
        DownloadError: (an ``OSError``) the network or server failed (the message says where to
            put the files by hand), or ``dest`` cannot be made or written.
    """
    if not isinstance(progress, bool):
        raise TypeError(f"download_omniglot: progress must be a bool; got {type(progress).__name__} {progress!r}")
    if not isinstance(base_url, str) or not base_url:
        raise ValueError(f"download_omniglot: base_url must be a non-empty URL string; got {base_url!r}")
    for name in ZIP_NAMES:
        value = md5s.get(name) if isinstance(md5s, Mapping) else None
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{32}", value):
            raise ValueError(
                f"download_omniglot: md5s must map {name!r} to a 32-digit hex md5; got {value!r}"
            )
    dest = Path(dest).expanduser()
    try:  # the folder first: a file in its place, no permission or a read-only disk is no network error
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=dest):
            pass
    except OSError as error:
        raise DownloadError(f"cannot download into {str(dest)!r}: {unwritable_cause(dest, error)}; pass "
                            f"{spelled('root')} with a writable folder, or set IMAML_DATA to one") from None
    for name in ZIP_NAMES:
        target = dest / name
        expected = md5s[name].lower()
        if target.is_file() and _md5(target) == expected:
            continue
        _fetch(f"{base_url.rstrip('/')}/{name}", target, expected, progress, timeout)
    return dest
