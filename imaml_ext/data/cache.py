"""The on-disk cache of decoded and resized images: ``$IMAML_CACHE``, else ``~/.cache/imaml_ext``.

Each array is one ``.npz`` file holding the array and the sha256 of its bytes, written
atomically. Every read checks that digest, so a damaged file (a failing disk, a copy cut short, an
edit) is never used: the reader gets ``None`` and rebuilds the file from the source data, and a
warning names the file and what was wrong. A folder the cache cannot be written to raises
:class:`CacheError`, naming the folder and what to do, instead of a ``PermissionError`` from deep
inside a write.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .._io import atomic_write, unwritable_cause

CACHE_ENV = "IMAML_CACHE"

# Bump when a cached file's layout or meaning changes, so stale caches are never read
# (2: an .npz holding the array and its sha256; 1 was a bare .npy).
FORMAT = 2

VERIFIED_MARKER = "omniglot-verified.json"


class CacheError(OSError):
    """The cache folder cannot be made or written (a file in its place, no permission, a read-only
    file system); the message names it and says what to do."""


def default_cache_dir() -> Path:
    """``$IMAML_CACHE`` if set, else ``~/.cache/imaml_ext``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imaml_ext"


def _cache_error(folder: Path, error: OSError) -> CacheError:
    where = "" if os.environ.get(CACHE_ENV) else f" ({CACHE_ENV} is not set, so the cache is ~/.cache/imaml_ext)"
    return CacheError(f"cannot write the image cache in {str(folder)!r}: {unwritable_cause(folder, error)}; set "
                      f"{CACHE_ENV} to a writable folder{where}")


def make_cache_dir(cache_dir: Path) -> None:
    """Creates ``cache_dir`` if needed, up front: a misplaced cache fails before seconds of decoding."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cache_error(cache_dir, error) from None


def _write(path: Path, write: Callable) -> None:
    try:
        atomic_write(path, write)
    except OSError as error:
        raise _cache_error(path.parent, error) from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_marker(cache_dir: Optional[Path]) -> Dict[str, Dict[str, object]]:
    """What the cache remembers of source files already verified (see omniglot's ``_verify_sources``)."""
    path = cache_dir / VERIFIED_MARKER if cache_dir is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged marker only costs a re-check
    return marker if isinstance(marker, dict) else {}


def write_marker(cache_dir: Path, marker: Dict[str, Dict[str, object]]) -> None:
    data = json.dumps(marker, indent=1, sort_keys=True).encode()
    _write(cache_dir / VERIFIED_MARKER, lambda f: f.write(data))


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def save_array(path: Path, arr: np.ndarray) -> None:
    """``arr`` and its sha256 into ``path``, atomically."""
    digest = _digest(arr)
    _write(path, lambda f: np.savez(f, array=arr, sha256=np.array(digest)))


def _damaged(path: Path, cause: str) -> None:
    warnings.warn(f"image cache {str(path)!r} is damaged ({cause}); rebuilding it from the source data",
                  RuntimeWarning, stacklevel=2)


def load_array(path: Path, shape: Tuple[int, ...], dtype, digest: Optional[str] = None) -> Optional[np.ndarray]:
    """The array :func:`save_array` wrote to ``path``, checked against the sha256 stored with it (and
    against ``digest`` when the content's digest is known); ``None`` when absent or damaged."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arr, stored = f["array"], str(f["sha256"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        return _damaged(path, f"unreadable: {error}")
    actual = _digest(arr)
    if actual != stored:
        return _damaged(path, f"its array's sha256 is {actual}, but {stored} was stored with it")
    if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype) or (digest is not None and actual != digest):
        return _damaged(path, f"it holds {arr.dtype} {list(arr.shape)} with sha256 {actual}, expected "
                              f"{np.dtype(dtype)} {list(shape)}" + (f" with sha256 {digest}" if digest else ""))
    return arr


__all__ = ["CACHE_ENV", "CacheError", "FORMAT", "VERIFIED_MARKER", "default_cache_dir", "load_array", "make_cache_dir",
           "read_marker", "save_array", "sha256_file", "write_marker"]
