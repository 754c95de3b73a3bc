"""Omniglot: reading it, resizing it as learn2learn does, class splits and samplers. Finding the
data is :mod:`imaml_ext.data.locate`, decoding the official layout :mod:`imaml_ext.data.official`,
the on-disk cache :mod:`imaml_ext.data.cache`.

A data folder holds Omniglot in one of these layouts (see :func:`find_data_root`):

- the NumPy arrays described in ``shared/data/omniglot/README.md``: ``images_background.npz``
  (bool ``[964, 20, 105, 105]``) and ``images_evaluation.npz`` (bool ``[659, 20, 105, 105]``),
  ``True`` being white paper; checked by the files' sha256;
- the official layout: ``images_background/<Alphabet>/characterNN/XXXX_YY.png`` and
  ``images_evaluation/...`` (XXXX the official character id 1..1623, YY the drawer 1..20), as
  folders or as the official zips ``images_background.zip`` / ``images_evaluation.zip``
  (:func:`imaml_ext.data.download_omniglot` fetches those); also torchvision's ``omniglot-py/``.
  Checked by the sha256 of the decoded pixels (:data:`PIXEL_SHA256`).

:func:`load_omniglot` returns all 1623 characters (background, then evaluation, i.e. official
character id ``c + 1`` at index ``c``) as one float32 tensor ``[1623, 20, S, S]`` in ``[0, 1]``
with strokes equal to 1, the same whichever layout it came from.

Pixel values match learn2learn's ``omniglot`` benchmark exactly: it opens each PNG as a PIL
``"L"`` image (0 or 255), applies ``transforms.Resize(28, interpolation=LANCZOS)``, then
``ToTensor()`` (``uint8 / 255`` in float32) and ``1 - x``. The resized ``uint8`` images are
cached on disk, since resizing 32,460 images takes seconds, and so are the decoded PNGs, each
checked on every read (:mod:`imaml_ext.data.cache`).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Dict, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from . import cache as _cache
from . import download as _download
from .cache import CACHE_ENV, default_cache_dir  # noqa: F401  (CACHE_ENV: this module's name since the start)
from .cache import sha256_file as _sha256
from .._device import check_device
from .locate import (  # noqa: F401  (DATA_ENV, default_search_paths, find_data_root: this module's names)
    DATA_ENV,
    SETS,
    SOURCES,
    PathLike,
    _detect,
    _given_root,
    _locate,
    _Source,
    default_download_dir,
    default_search_paths,
    find_data_root,
)
from .official import (  # noqa: F401  (NUM_BACKGROUND, NUM_EVALUATION: this module's names)
    _SET_CLASSES,
    NUM_BACKGROUND,
    NUM_DRAWERS,
    NUM_EVALUATION,
    PIXEL_SHA256,
    SOURCE_SIZE,
    _official_stamp,
    _read_official_set,
)
from .sampler import DeviceLike, TaskSampler

NUM_CLASSES = NUM_BACKGROUND + NUM_EVALUATION  # 1623

PROTOCOLS = ("l2l", "finn")
SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------- verifying the .npz layout


def _verify_sources(folder: Path, cache_dir: Optional[Path]) -> None:
    """Check the archives' sha256 against :data:`SOURCES`.

    With a cache, a file already verified (same resolved path, size and mtime) is not hashed
    again: the marker file in the cache remembers it.
    """
    marker = _cache.read_marker(cache_dir)
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

    if changed and cache_dir is not None:
        _cache.write_marker(cache_dir, marker)


# --------------------------------------------------------------------------- what the cache holds


def _cache_file(cache_dir: Path, image_size: int) -> Path:
    # The .npz digests name the content, not the layout: every layout is checked to hold these
    # very pixels before its resized images are written or read, so all share one cache file.
    digests = "-".join(SOURCES[name][:16] for name in sorted(SOURCES))
    return cache_dir / f"omniglot-v{_cache.FORMAT}-{image_size}px-{digests}.npz"


def _read_resized_cache(cache_dir: Path, image_size: int) -> Optional[np.ndarray]:
    return _cache.load_array(_cache_file(cache_dir, image_size), (NUM_CLASSES, NUM_DRAWERS, image_size, image_size),
                            np.uint8)


def _decoded_cache_file(cache_dir: Path, which: str) -> Path:
    return cache_dir / f"omniglot-v{_cache.FORMAT}-{SOURCE_SIZE}px-{which}-{PIXEL_SHA256[which][:16]}.npz"


def _pixel_digest(paper: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(paper).tobytes()).hexdigest()


def _read_decoded_cache(cache_dir: Path, which: str) -> Optional[np.ndarray]:
    """One set's decoded PNGs (stored bit-packed: 45 MB for both, not 358), checked against
    :data:`PIXEL_SHA256` on every read (a fraction of a second), ``None`` if absent or bad."""
    shape = (_SET_CLASSES[which], NUM_DRAWERS, SOURCE_SIZE, SOURCE_SIZE)
    count = int(np.prod(shape))
    packed = _cache.load_array(_decoded_cache_file(cache_dir, which), (-(-count // 8),), np.uint8, PIXEL_SHA256[which])
    return None if packed is None else np.unpackbits(packed, count=count).view(np.bool_).reshape(shape)


# --------------------------------------------------------------------------- the official layout


def _official_paper(src: _Source, cache_dir: Optional[Path], stamps: Optional[Dict[str, Dict[str, object]]]) -> np.ndarray:
    """All 1623 characters of an official-layout source as bool paper, each set checked against
    :data:`PIXEL_SHA256`; sets already verified (marker) come from the decoded cache."""
    marker = _cache.read_marker(cache_dir)
    parts = []
    for which, path in zip(SETS, src.parts):
        key = str(path.resolve())
        paper = None
        if cache_dir is not None and marker.get(key) == stamps[which]:
            paper = _read_decoded_cache(cache_dir, which)
        if paper is None:
            paper = _read_official_set(path, which)
            digest = _pixel_digest(paper)
            if digest != PIXEL_SHA256[which]:
                raise ValueError(
                    f"{str(path)!r}: its decoded pixels have sha256 {digest}, expected {PIXEL_SHA256[which]}: "
                    f"not the official Omniglot images ({which})."
                )
            if cache_dir is not None:
                _cache.save_array(_decoded_cache_file(cache_dir, which), np.packbits(paper))
                marker[key] = stamps[which]
                _cache.write_marker(cache_dir, marker)
        parts.append(paper)
    return np.concatenate(parts, axis=0)


def _load_official_uint8(src: _Source, image_size: int, cache_dir: Optional[Path]) -> np.ndarray:
    stamps = {which: _official_stamp(path, which) for which, path in zip(SETS, src.parts)} if cache_dir else None
    if cache_dir is not None and image_size != SOURCE_SIZE:
        marker = _cache.read_marker(cache_dir)
        if all(marker.get(str(path.resolve())) == stamps[which] for which, path in zip(SETS, src.parts)):
            cached = _read_resized_cache(cache_dir, image_size)
            if cached is not None:
                return cached  # verified source, resized already: nothing to decode
    paper = _official_paper(src, cache_dir, stamps)
    if cache_dir is not None and image_size != SOURCE_SIZE:
        cached = _read_resized_cache(cache_dir, image_size)  # e.g. written from the .npz layout
        if cached is not None:
            return cached
    arr = _resize(paper, image_size)
    if cache_dir is not None and image_size != SOURCE_SIZE:
        _cache.save_array(_cache_file(cache_dir, image_size), arr)
    return arr


# --------------------------------------------------------------------------- loading


def _resize(paper: np.ndarray, image_size: int) -> np.ndarray:
    """Bool paper ``[C, 20, 105, 105]`` as uint8 ``[C, 20, S, S]``: paper 255, ink 0, resized
    like torchvision."""
    from PIL import Image

    # The same 0/255 "L" image torchvision's Omniglot gets from Image.open(png).convert("L").
    # np.where, not a uint8 view: the archives' True bytes need not be 1.
    if image_size == SOURCE_SIZE:
        return np.where(paper, np.uint8(255), np.uint8(0))
    out = np.empty(paper.shape[:2] + (image_size, image_size), dtype=np.uint8)
    for c in range(paper.shape[0]):
        gray = np.where(paper[c], np.uint8(255), np.uint8(0))
        for d in range(paper.shape[1]):
            img = Image.fromarray(gray[d])
            # transforms.Resize(28) on a square PIL image is exactly this call.
            out[c, d] = np.asarray(img.resize((image_size, image_size), Image.LANCZOS))
    return out


def _resize_archive(path: Path, image_size: int) -> np.ndarray:
    """One archive as uint8 ``[C, 20, S, S]``: paper 255, ink 0, resized like torchvision."""
    with np.load(path) as archive:
        if "images" not in archive.files:
            raise ValueError(f"{str(path)!r} has no 'images' array; it holds {sorted(archive.files)}")
        paper = archive["images"]
    classes = {f"{which}.npz": n for which, n in _SET_CLASSES.items()}.get(path.name)
    if (paper.dtype != np.bool_ or paper.ndim != 4 or paper.shape[1:] != (NUM_DRAWERS, SOURCE_SIZE, SOURCE_SIZE)
            or (classes is not None and paper.shape[0] != classes)):
        raise ValueError(
            f"{str(path)!r}: 'images' must be bool [{classes or 'C'}, {NUM_DRAWERS}, {SOURCE_SIZE}, {SOURCE_SIZE}]; "
            f"got {paper.dtype} {list(paper.shape)}"
        )
    return _resize(paper, image_size)


def _load_uint8(folder: Path, image_size: int, cache_dir: Optional[Path]) -> np.ndarray:
    """The .npz layout as uint8 ``[1623, 20, S, S]`` (the archives already verified)."""
    if image_size == SOURCE_SIZE:
        cache_dir = None  # nothing to resize: reading the archives is as fast as a cache
    if cache_dir is not None:
        cached = _read_resized_cache(cache_dir, image_size)
        if cached is not None:
            return cached
    parts = [_resize_archive(folder / name, image_size) for name in SOURCES]
    arr = np.concatenate(parts, axis=0)
    if arr.shape[0] != NUM_CLASSES:
        raise ValueError(f"Omniglot archives in {str(folder)!r} hold {arr.shape[0]} characters, expected {NUM_CLASSES}")
    if cache_dir is not None:
        _cache.save_array(_cache_file(cache_dir, image_size), arr)
    return arr


def _download_dest(root: Optional[PathLike]) -> Path:
    given = _given_root(root)
    return given[1] if given is not None else default_download_dir()


def load_omniglot(
    root: Optional[PathLike] = None,
    image_size: int = 28,
    cache: bool = True,
    cache_dir: Optional[PathLike] = None,
    download: bool = False,
    progress: bool = True,
) -> Tensor:
    """All 1623 Omniglot characters as float32 ``[1623, 20, image_size, image_size]`` in [0, 1].

    Strokes are 1, paper 0. Index ``c`` is official character id ``c + 1`` (the background
    set's 964 characters, then the evaluation set's 659); index ``d`` on dim 1 is the drawer.
    The values are bitwise those of learn2learn's Omniglot benchmark transform
    (``Resize(image_size, LANCZOS)``, ``ToTensor()``, ``1 - x``), whichever layout the data
    come in.

    Args:
        root: the data folder (see :func:`find_data_root`).
        image_size: side of the returned images; 105 returns the originals.
        cache: keep the resized images (uint8), the decoded PNGs of the official layout and
            the checksum marker in ``cache_dir``. Each cached array is stored with its sha256
            and checked on every read; a damaged one is rebuilt, with a warning naming it.
        cache_dir: defaults to :func:`default_cache_dir`.
        download: when no data are found, download the official zips (checked by md5) into
            ``root``, else ``$IMAML_DATA``, else :func:`default_download_dir`, and read them.
            Data found but damaged raise instead: nothing is overwritten.
        progress: show a progress bar while downloading.

    Raises:
        FileNotFoundError: no data found (and ``download`` is False).
        ValueError: data found but not Omniglot's (checksum, shapes, missing or extra images), or
            ``root`` is a file.
        imaml_ext.data.DownloadError: the download failed (an ``OSError``), or its folder cannot
            be written.
        imaml_ext.data.CacheError: ``cache_dir`` cannot be made or written (an ``OSError``).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= SOURCE_SIZE:
        raise ValueError(f"load_omniglot: image_size must be an int in [1, {SOURCE_SIZE}]; got {image_size!r}")
    if not isinstance(download, bool):
        raise TypeError(f"load_omniglot: download must be a bool; got {type(download).__name__} {download!r}")
    try:
        src = _locate(root)
    except FileNotFoundError:
        if not download:
            raise
        dest = _download_dest(root)
        # Module attributes, read now: a mirror (or a test) may replace them.
        _download.download_omniglot(dest, base_url=_download.OFFICIAL_URL, md5s=_download.OFFICIAL_MD5,
                                    progress=progress)
        src = _detect(dest)
        if src is None:  # download_omniglot returned, so both zips are there
            raise FileNotFoundError(f"load_omniglot: downloaded into {str(dest)!r} but found no data there")
    cdir = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) if cache else None
    if cdir is not None:
        _cache.make_cache_dir(cdir)
    if src.layout == "npz":
        _verify_sources(src.folder, cdir)
        gray = _load_uint8(src.folder, image_size, cdir)
    else:
        gray = _load_official_uint8(src, image_size, cdir)
    gray = torch.from_numpy(gray)
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
    download: bool = False,
) -> OmniglotTasks:
    """Omniglot task samplers for the train, validation and test classes of ``protocol``.

    ``images`` (from :func:`load_omniglot`) skips loading. ``split_seed`` picks the class split
    (:func:`split_classes`); ``seed`` seeds the three samplers, each with its own stream
    (``numpy.random.SeedSequence(seed).spawn(3)``); ``None`` draws it from torch's global
    generator. ``download`` is passed to :func:`load_omniglot` (fetch the official zips when no
    data are found).
    """
    if device is not None:  # before the seconds of loading, not torch's error after
        check_device(device, "omniglot_tasks(device=...)")
    if images is None:
        images = load_omniglot(root, image_size=image_size, download=download)
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
