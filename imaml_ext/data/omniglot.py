"""Omniglot: finding the arrays, resizing them as learn2learn does, caching, class splits.

The data are the two NumPy archives described in ``shared/data/omniglot/README.md``:
``images_background.npz`` (bool ``[964, 20, 105, 105]``) and ``images_evaluation.npz``
(bool ``[659, 20, 105, 105]``), ``True`` being white paper. :func:`load_omniglot` returns all
1623 characters (background, then evaluation, i.e. official character id ``c + 1`` at index
``c``) as one float32 tensor ``[1623, 20, S, S]`` in ``[0, 1]`` with strokes equal to 1.

Pixel values match learn2learn's ``omniglot`` benchmark exactly: it opens each PNG as a PIL
``"L"`` image (0 or 255), applies ``transforms.Resize(28, interpolation=LANCZOS)``, then
``ToTensor()`` (``uint8 / 255`` in float32) and ``1 - x``. The resized ``uint8`` images are
cached on disk, since resizing 32,460 images takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .sampler import DeviceLike, TaskSampler

PathLike = Union[str, "os.PathLike[str]"]

NUM_BACKGROUND = 964
NUM_EVALUATION = 659
NUM_CLASSES = NUM_BACKGROUND + NUM_EVALUATION  # 1623
NUM_DRAWERS = 20
SOURCE_SIZE = 105

#: The two archives and their sha256 (from the data's README).
SOURCES: Dict[str, str] = {
    "images_background.npz": "8bf84167413cd00beacdce3fe582f780ab538d8dbef043a6d688f2527bbce199",
    "images_evaluation.npz": "0b84c7ffd94c4841c0040e529c86a82eaaccb986d8eadad5673f7991b7475276",
}

DATA_ENV = "IMAML_DATA"
CACHE_ENV = "IMAML_CACHE"

PROTOCOLS = ("l2l", "finn")
SPLITS = ("train", "validation", "test")

# Bump when the cached array's meaning changes, so stale caches are never read.
_CACHE_FORMAT = 1
_VERIFIED_MARKER = "omniglot-verified.json"


# --------------------------------------------------------------------------- finding the data


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _omniglot_dir(candidate: Path) -> Optional[Path]:
    """``candidate`` itself or ``candidate/omniglot`` if it holds both archives."""
    for folder in (candidate, candidate / "omniglot"):
        if all((folder / name).is_file() for name in SOURCES):
            return folder
    return None


def default_search_paths() -> List[Path]:
    """Where :func:`find_data_root` looks when neither ``root`` nor ``IMAML_DATA`` is given."""
    paths = [Path("data"), Path("..") / "shared" / "data", _repo_root().parent / "shared" / "data"]
    out: List[Path] = []
    for p in paths:
        p = p.resolve()
        if p not in out:
            out.append(p)
    return out


def find_data_root(root: Optional[PathLike] = None) -> Path:
    """The folder holding ``images_background.npz`` and ``images_evaluation.npz``.

    ``root`` (or else the ``IMAML_DATA`` environment variable) may name that folder or its
    parent (the folder holding ``omniglot/``); when given it is the only place looked at.
    Otherwise ``./data``, ``../shared/data`` and ``<repo>/../shared/data`` are searched for an
    ``omniglot`` folder. Raises ``FileNotFoundError`` naming every place searched.
    """
    if root is not None:
        given: Optional[Tuple[str, Path]] = ("root=", Path(root).expanduser())
    elif os.environ.get(DATA_ENV):
        given = (f"${DATA_ENV}", Path(os.environ[DATA_ENV]).expanduser())
    else:
        given = None

    files = " and ".join(SOURCES)
    if given is not None:
        how, path = given
        found = _omniglot_dir(path)
        if found is None:
            raise FileNotFoundError(
                f"Omniglot data not found: {how} is {str(path)!r}, but neither it nor "
                f"{str(path / 'omniglot')!r} holds {files}."
            )
        return found.resolve()

    searched = default_search_paths()
    for candidate in searched:
        found = _omniglot_dir(candidate / "omniglot")
        if found is not None:
            return found.resolve()
    places = ", ".join(repr(str(p / "omniglot")) for p in searched)
    raise FileNotFoundError(
        f"Omniglot data not found: no folder holding {files} at {places}. "
        f"Pass root=<folder> or set {DATA_ENV}=<folder> (the folder with the two .npz files, "
        f"or its parent holding omniglot/)."
    )


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$IMAML_CACHE`` if set, else ``~/.cache/imaml_ext``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imaml_ext"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then ``os.replace``, so a reader
    (or a concurrent writer) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _verify_sources(folder: Path, cache_dir: Optional[Path]) -> None:
    """Check the archives' sha256 against :data:`SOURCES`.

    With a cache, a file already verified (same resolved path, size and mtime) is not hashed
    again: the marker file in the cache remembers it.
    """
    marker_path = cache_dir / _VERIFIED_MARKER if cache_dir is not None else None
    marker: Dict[str, Dict[str, object]] = {}
    if marker_path is not None and marker_path.is_file():
        try:
            marker = json.loads(marker_path.read_text())
        except (OSError, ValueError):
            marker = {}  # a damaged marker only costs a re-hash

    changed = False
    for name, expected in SOURCES.items():
        path = (folder / name).resolve()
        st = path.stat()
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected}
        if marker.get(str(path)) == stamp:
            continue
        actual = _sha256(path)
        if actual != expected:
            raise ValueError(
                f"Omniglot archive {str(path)!r} has sha256 {actual}, expected {expected}: "
                f"the file is damaged or not the official Omniglot arrays."
            )
        marker[str(path)] = stamp
        changed = True

    if changed and marker_path is not None:
        data = json.dumps(marker, indent=1, sort_keys=True).encode()
        _atomic_write(marker_path, lambda f: f.write(data))


def _cache_file(cache_dir: Path, image_size: int) -> Path:
    digests = "-".join(SOURCES[name][:16] for name in sorted(SOURCES))
    return cache_dir / f"omniglot-v{_CACHE_FORMAT}-{image_size}px-{digests}.npy"


# --------------------------------------------------------------------------- loading


def _resize_archive(path: Path, image_size: int) -> np.ndarray:
    """One archive as uint8 ``[C, 20, S, S]``: paper 255, ink 0, resized like torchvision."""
    from PIL import Image

    with np.load(path) as archive:
        paper = archive["images"]
    if paper.dtype != np.bool_ or paper.ndim != 4 or paper.shape[1:] != (NUM_DRAWERS, SOURCE_SIZE, SOURCE_SIZE):
        raise ValueError(
            f"{str(path)!r}: 'images' must be bool [C, {NUM_DRAWERS}, {SOURCE_SIZE}, {SOURCE_SIZE}]; "
            f"got {paper.dtype} {list(paper.shape)}"
        )
    # The same 0/255 "L" image torchvision's Omniglot gets from Image.open(png).convert("L").
    # np.where, not a uint8 view: the archives' True bytes need not be 1.
    gray = np.where(paper, np.uint8(255), np.uint8(0))
    if image_size == SOURCE_SIZE:
        return gray
    out = np.empty(paper.shape[:2] + (image_size, image_size), dtype=np.uint8)
    for c in range(paper.shape[0]):
        for d in range(NUM_DRAWERS):
            img = Image.fromarray(gray[c, d])
            # transforms.Resize(28) on a square PIL image is exactly this call.
            out[c, d] = np.asarray(img.resize((image_size, image_size), Image.LANCZOS))
    return out


def _load_uint8(folder: Path, image_size: int, cache_dir: Optional[Path]) -> np.ndarray:
    if image_size == SOURCE_SIZE:
        cache_dir = None  # nothing to resize: reading the archives is as fast as a cache
    if cache_dir is not None:
        cached = _cache_file(cache_dir, image_size)
        if cached.is_file():
            try:
                arr = np.load(cached)
                if arr.shape == (NUM_CLASSES, NUM_DRAWERS, image_size, image_size) and arr.dtype == np.uint8:
                    return arr
            except (OSError, ValueError):
                pass  # unreadable cache: rebuild it below
    parts = [_resize_archive(folder / name, image_size) for name in SOURCES]
    arr = np.concatenate(parts, axis=0)
    if arr.shape[0] != NUM_CLASSES:
        raise ValueError(f"Omniglot archives in {str(folder)!r} hold {arr.shape[0]} characters, expected {NUM_CLASSES}")
    if cache_dir is not None:
        _atomic_write(_cache_file(cache_dir, image_size), lambda f: np.save(f, arr))
    return arr


def load_omniglot(
    root: Optional[PathLike] = None,
    image_size: int = 28,
    cache: bool = True,
    cache_dir: Optional[PathLike] = None,
) -> Tensor:
    """All 1623 Omniglot characters as float32 ``[1623, 20, image_size, image_size]`` in [0, 1].

    Strokes are 1, paper 0. Index ``c`` is official character id ``c + 1`` (the background
    set's 964 characters, then the evaluation set's 659); index ``d`` on dim 1 is the drawer.
    The values are bitwise those of learn2learn's Omniglot benchmark transform
    (``Resize(image_size, LANCZOS)``, ``ToTensor()``, ``1 - x``).

    Args:
        root: the data folder (see :func:`find_data_root`).
        image_size: side of the returned images; 105 returns the originals.
        cache: keep the resized images (uint8) and the checksum marker in ``cache_dir``.
        cache_dir: defaults to :func:`default_cache_dir`.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= SOURCE_SIZE:
        raise ValueError(f"load_omniglot: image_size must be an int in [1, {SOURCE_SIZE}]; got {image_size!r}")
    folder = find_data_root(root)
    cdir = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) if cache else None
    _verify_sources(folder, cdir)
    gray = torch.from_numpy(_load_uint8(folder, image_size, cdir))
    # ToTensor's uint8 -> float32 division by 255, then learn2learn's `1 - x`: same bits.
    return 1.0 - gray.to(torch.float32).div(255)


# --------------------------------------------------------------------------- class splits


def split_classes(split: str, seed: int = 0, protocol: str = "l2l") -> Tensor:
    """Indices (int64, into dim 0 of :func:`load_omniglot`) of the classes of one split.

    Protocols:

    - ``"l2l"``: learn2learn's ``omniglot`` benchmark: ``list(range(1623))`` shuffled by
      Python's ``random.shuffle``, then 1100 train, 100 validation, 423 test. Here the
      shuffle uses ``random.Random(seed)``, so the index lists equal learn2learn's after
      ``random.seed(seed)`` directly before ``get_tasksets``. learn2learn's class index,
      though, is the position in torchvision's ``os.listdir`` order of the alphabet and
      character folders, which is file-system dependent; ours is the official id minus 1.
      The same lists therefore name the same characters only where that listing is sorted.
    - ``"finn"``: Finn et al. (MAML) / Rajeswaran et al. (iMAML): the first 1200 characters
      for meta-training, the remaining 423 for testing. Validation is carved out of those
      1200: train is characters 0..1099, validation 1100..1199, so the three are disjoint.
      Fixed, ``seed`` is ignored. (Finn's reference code shuffles its folder list before
      slicing; that order is file-system dependent, so we take the official order.)
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"split_classes: protocol must be one of {PROTOCOLS}; got {protocol!r}")
    if split not in SPLITS:
        raise ValueError(f"split_classes: split must be one of {SPLITS}; got {split!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"split_classes: seed must be an int; got {type(seed).__name__} {seed!r}")
    order = list(range(NUM_CLASSES))
    if protocol == "l2l":
        random.Random(seed).shuffle(order)
    bounds = {"train": (0, 1100), "validation": (1100, 1200), "test": (1200, NUM_CLASSES)}
    lo, hi = bounds[split]
    return torch.tensor(order[lo:hi], dtype=torch.int64)


# --------------------------------------------------------------------------- samplers per split


class OmniglotTasks(NamedTuple):
    """One :class:`TaskSampler` per split, like learn2learn's ``BenchmarkTasksets``."""

    train: TaskSampler
    validation: TaskSampler
    test: TaskSampler


def omniglot_tasks(
    ways: int,
    shots: int,
    query: int,
    *,
    root: Optional[PathLike] = None,
    images: Optional[Tensor] = None,
    image_size: int = 28,
    protocol: str = "l2l",
    split_seed: int = 0,
    seed: Optional[int] = None,
    rotations: bool = True,
    device: DeviceLike = "cpu",
) -> OmniglotTasks:
    """Omniglot task samplers for the train, validation and test classes of ``protocol``.

    ``images`` (from :func:`load_omniglot`) skips loading. ``split_seed`` picks the class split
    (:func:`split_classes`); ``seed`` seeds the three samplers, each with its own stream
    (``numpy.random.SeedSequence(seed).spawn(3)``); ``None`` draws it from torch's global
    generator.
    """
    if images is None:
        images = load_omniglot(root, image_size=image_size)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    streams = np.random.SeedSequence(seed).spawn(len(SPLITS))
    samplers = [
        TaskSampler(
            images,
            split_classes(split, seed=split_seed, protocol=protocol),
            ways,
            shots,
            query,
            rotations=rotations,
            device=device,
            seed=int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)),
        )
        for split, ss in zip(SPLITS, streams)
    ]
    return OmniglotTasks(*samplers)
