"""The official Omniglot layout: ``images_background/<Alphabet>/characterNN/XXXX_YY.png`` and
``images_evaluation/...`` (XXXX the official character id 1..1623, YY the drawer 1..20), as folders or
as the official zips, decoded into bool "paper" arrays ``[C, 20, 105, 105]`` (``True`` = white paper)
with every file name, size and gray level checked; :data:`PIXEL_SHA256` names the pixels they must give."""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import numpy as np

from . import download as _download

NUM_BACKGROUND = 964
NUM_EVALUATION = 659
NUM_DRAWERS = 20
SOURCE_SIZE = 105

_SET_CLASSES = {"images_background": NUM_BACKGROUND, "images_evaluation": NUM_EVALUATION}
_FIRST_ID = {"images_background": 1, "images_evaluation": NUM_BACKGROUND + 1}


#: sha256 of each set's pixels: ``np.packbits(paper)`` of the bool ``[C, 20, 105, 105]`` array
#: (``True`` = white paper, C order), i.e. of the official PNGs and of the .npz arrays alike.
#: Background's bit count is a multiple of 8, so hashing background's bytes then evaluation's
#: gives the digest of all 1623 characters packed together
#: (aa53f27e879e57ce9d0788d05aa99e972d01cc6b14a2e9224127b8403413ed02).
PIXEL_SHA256: Dict[str, str] = {
    "images_background": "50ac3e2043f457516ed8e84151b2d85718f4bbccc0a17ad355cd3b6f0c4ed5f3",
    "images_evaluation": "03b046317776af65e56eb1a168e35feb5e254765b51ce5fd1383ec242a5767f3",
}


_PNG_NAME = re.compile(r"(\d{4})_(\d{2})\.png")


def _official_stamp(path: Path, which: str) -> Dict[str, object]:
    """What the marker remembers of a verified zip (size, mtime) or folder (every file's
    relative path, size and mtime, hashed: ~32k stat calls, far cheaper than decoding)."""
    if path.is_file():
        st = path.stat()
        return {"zip_size": st.st_size, "mtime_ns": st.st_mtime_ns, "pixels": PIXEL_SHA256[which]}
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"listing": h.hexdigest(), "pixels": PIXEL_SHA256[which]}


def _decode_set(names: Sequence[str], read: Callable[[str], bytes], label: str, which: str) -> np.ndarray:
    """The bool paper array ``[C, 20, 105, 105]`` of one set from its files' relative paths
    (``<Alphabet>/characterNN/XXXX_YY.png``) and a reader; ``label`` names the set's folder or
    zip in errors. File names are checked for completeness before anything is decoded."""
    from PIL import Image

    first, count = _FIRST_ID[which], _SET_CLASSES[which]
    where: Dict[Tuple[int, int], str] = {}
    folder_of: Dict[int, str] = {}
    for rel in sorted(names):
        parts = rel.split("/")
        base = parts[-1]
        if base.startswith(".") or not base.lower().endswith(".png"):
            continue  # .DS_Store, Thumbs.db, macOS "._" twins: not images
        m = _PNG_NAME.fullmatch(base)
        if len(parts) != 3 or m is None:
            raise ValueError(
                f"{label}: unexpected image {rel!r}; expected <Alphabet>/characterNN/XXXX_YY.png "
                f"(XXXX the character id, YY the drawer)"
            )
        cid, drawer = int(m[1]), int(m[2])
        if not first <= cid < first + count:
            raise ValueError(
                f"{label}: {rel!r} has character id {cid}; {which} holds ids {first}..{first + count - 1}"
            )
        if not 1 <= drawer <= NUM_DRAWERS:
            raise ValueError(f"{label}: {rel!r} has drawer {drawer}; expected 01..{NUM_DRAWERS}")
        if (cid, drawer) in where:
            raise ValueError(
                f"{label}: character {cid:04d}, drawer {drawer:02d} appears twice: "
                f"{where[cid, drawer]!r} and {rel!r}"
            )
        parent = "/".join(parts[:2])
        if folder_of.setdefault(cid, parent) != parent:
            raise ValueError(
                f"{label}: character {cid:04d} has images in two folders, {folder_of[cid]!r} and {parent!r}"
            )
        where[cid, drawer] = rel

    missing = [(c, d) for c in range(first, first + count) for d in range(1, NUM_DRAWERS + 1) if (c, d) not in where]
    if missing:
        shown = ", ".join(
            f"{folder_of[c]}/{c:04d}_{d:02d}.png" if c in folder_of else f"{c:04d}_{d:02d}.png (no image of character {c:04d})"
            for c, d in missing[:5]
        )
        raise ValueError(
            f"{label}: {len(missing)} of {count * NUM_DRAWERS} images missing: {shown}"
            + (", ..." if len(missing) > 5 else "")
        )

    paper = np.empty((count, NUM_DRAWERS, SOURCE_SIZE, SOURCE_SIZE), dtype=np.bool_)
    for (cid, drawer), rel in sorted(where.items()):
        try:
            with Image.open(io.BytesIO(read(rel))) as img:
                size = img.size
                # What torchvision's Omniglot does with each PNG.
                gray = np.asarray(img.convert("L"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{label}: cannot decode {rel!r} as an image ({e})") from e
        if size != (SOURCE_SIZE, SOURCE_SIZE):
            raise ValueError(f"{label}: {rel!r} is {size[0]}x{size[1]} pixels; expected {SOURCE_SIZE}x{SOURCE_SIZE}")
        white = gray == 255
        if not (white | (gray == 0)).all():
            raise ValueError(
                f"{label}: {rel!r} has gray levels other than 0 and 255; the official images are black and white"
            )
        paper[cid - first, drawer - 1] = white
    return paper


def _read_official_set(path: Path, which: str) -> np.ndarray:
    """One set from its folder or zip (top-level folder ``<which>/``), as bool paper."""
    if path.is_dir():
        names = []
        for dirpath, _, filenames in os.walk(path):
            rel_dir = Path(dirpath).relative_to(path).as_posix()
            names += [name if rel_dir == "." else f"{rel_dir}/{name}" for name in filenames]
        return _decode_set(names, lambda rel: (path / rel).read_bytes(), repr(str(path)), which)
    try:
        with zipfile.ZipFile(path) as zf:
            names = []
            for info in zf.infolist():
                name = info.filename
                if info.is_dir() or name.startswith("__MACOSX/"):
                    continue
                if not name.startswith(which + "/"):
                    if name.lower().endswith(".png"):
                        raise ValueError(
                            f"{str(path)!r}: unexpected entry {name!r}; every image of the zip must be "
                            f"under its top-level folder {which}/"
                        )
                    continue
                names.append(name[len(which) + 1:])
            return _decode_set(names, lambda rel: zf.read(f"{which}/{rel}"), f"{str(path)!r} ({which}/)", which)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise ValueError(
            f"{str(path)!r} is not a readable zip file ({e}): it is truncated or damaged. Delete it and "
            f"download it again ({_download.spelled('download')})."
        ) from e


__all__ = ["NUM_BACKGROUND", "NUM_DRAWERS", "NUM_EVALUATION", "PIXEL_SHA256", "SOURCE_SIZE"]
