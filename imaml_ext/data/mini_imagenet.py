"""Mini-ImageNet from the files a user already has: learn2learn's pickles, read safely, as task samplers.

The three files are learn2learn's ``MiniImagenet`` caches (the split of Ravi & Larochelle,
2017: 64 train, 16 validation and 20 test classes of 600 images each):

- ``mini-imagenet-cache-train.pkl``, ``mini-imagenet-cache-validation.pkl``,
  ``mini-imagenet-cache-test.pkl``, each a pickled dict with ``"image_data"``, a uint8 array
  ``[N, 84, 84, 3]`` (RGB, channels last), and ``"class_dict"``, class name -> the rows of
  ``image_data`` of that class.

They are looked for in ``<root>/mini-imagenet/``, else in ``<root>`` itself (see
:func:`find_mini_imagenet`). Nothing is downloaded: Mini-ImageNet is made of ImageNet images,
which are not freely redistributable.

A pickle can run any code while it loads, so the files are read with an unpickler that builds
only what these files hold (NumPy arrays, their dtypes and scalars, dicts, lists, strings) and
refuses every other global with a ``pickle.UnpicklingError`` naming the file and the global.
What loads is then checked (keys, dtype, shape, class indices) before anything uses it.

:func:`mini_imagenet_tasks` gives one :class:`MiniImagenetSampler` per split, with the
interface and the seeding of the Omniglot samplers: ``sample(T)`` returns
``[T, ways*shots, 3, 84, 84]`` float32 images in [0, 1] (``uint8 / 255``, as learn2learn's
``lambda x: x / 255.0`` and torchvision's ``ToTensor`` give) and labels in ``0..ways-1``.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import download as _download
from .locate import DATA_ENV, PathLike, _given_root, default_search_paths
from .omniglot import SPLITS
from .sampler import DeviceLike, TaskBatch, TaskIndices, TaskSampler

IMAGE_SHAPE = (84, 84, 3)
#: The file of each split (learn2learn's names).
FILES: Dict[str, str] = {split: f"mini-imagenet-cache-{split}.pkl" for split in SPLITS}
#: The folder under the data root that holds the files (the files directly in the root work too).
FOLDER = "mini-imagenet"

# (module, name) -> (where it lives now, attribute): every global the files may name. NumPy 2
# renamed numpy.core to numpy._core; pickles written by either name either one.
_ALLOWED = {
    **{(f"{prefix}.multiarray", name): ("multiarray", name) for prefix in ("numpy.core", "numpy._core")
       for name in ("_reconstruct", "scalar")},
    **{(f"{prefix}.numeric", "_frombuffer"): ("numeric", "_frombuffer") for prefix in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("_codecs", "encode"),  # bytes in pickle protocols 0-2
    ("collections", "OrderedDict"): ("collections", "OrderedDict"),
}


class MiniImagenetSplit(NamedTuple):
    """One file, grouped by class: ``images[c, d]`` is image ``d`` of class ``classes[c]``."""

    images: np.ndarray  # uint8 [C, D, 84, 84, 3]
    classes: Tuple[str, ...]
    path: Path


class MiniImagenetTasks(NamedTuple):
    """One :class:`MiniImagenetSampler` per split, like :class:`imaml_ext.data.OmniglotTasks`."""

    train: "MiniImagenetSampler"
    validation: "MiniImagenetSampler"
    test: "MiniImagenetSampler"


# --------------------------------------------------------------------------- reading one file


class _Refused(pickle.UnpicklingError):
    """A global the files never hold: kept apart from the errors of a damaged stream."""


class _Unpickler(pickle.Unpickler):
    """Builds only the globals of ``_ALLOWED``; every other one is refused before it is imported."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # NumPy's advice for arrays pickled by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        where = _ALLOWED.get((module, name))
        if where is None:
            raise _Refused(
                f"{self.path}: refused to load global {module}.{name}: a Mini-ImageNet file holds only NumPy arrays, "
                f"dicts, lists and strings, and unpickling anything else could run code; the file is not "
                f"learn2learn's mini-imagenet-cache (nothing of it was run)"
            )
        owner, attribute = where
        if owner in ("multiarray", "numeric"):
            return getattr(_numpy_core(owner), attribute)
        return getattr(importlib.import_module(owner), attribute)


def _numpy_core(submodule: str):
    """numpy._core.<submodule> (NumPy 2), else numpy.core.<submodule> (NumPy 1)."""
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


def read_mini_imagenet(path: PathLike) -> MiniImagenetSplit:
    """One of learn2learn's ``mini-imagenet-cache-<split>.pkl``, read with the restricted
    unpickler, checked, and grouped by class (classes in the file's order).

    Raises:
        FileNotFoundError: no such file.
        pickle.UnpicklingError: the file names a global other than NumPy's array pieces.
        ValueError: the file is truncated or damaged, or holds something else than a dict with
            ``image_data`` (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (class name -> row
            indices, the same number per class, each row in one class at most).
    """
    path = Path(path).expanduser()
    with open(path, "rb") as f:
        try:
            data = _Unpickler(f, path).load()
        except _Refused:
            raise
        except pickle.UnpicklingError as error:
            raise ValueError(f"{path}: not a readable pickle (truncated or damaged?): {error}") from None
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
            # What a cut or corrupted stream raises from inside pickle or NumPy's reconstruction.
            raise ValueError(f"{path}: not a readable pickle (truncated or damaged?): "
                             f"{type(error).__name__}: {error}") from None
    return _grouped(path, data)


def _grouped(path: Path, data: object) -> MiniImagenetSplit:
    expected = "a dict with 'image_data' (uint8 [N, 84, 84, 3]) and 'class_dict' (class name -> row indices)"
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {expected}; got {type(data).__name__}")
    missing = [key for key in ("image_data", "class_dict") if key not in data]
    if missing:
        raise ValueError(f"{path}: expected {expected}; got a dict without {' and '.join(map(repr, missing))} "
                         f"(keys: {', '.join(map(repr, list(data)[:10]))})")
    images, class_dict = data["image_data"], data["class_dict"]
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{path}: 'image_data' must be a NumPy array uint8 [N, 84, 84, 3]; got "
                         f"{type(images).__name__}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.shape[0] < 1:
        raise ValueError(f"{path}: 'image_data' must be uint8 [N, 84, 84, 3] with N >= 1; got {images.dtype} "
                         f"{list(images.shape)}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise ValueError(f"{path}: 'class_dict' must be a non-empty dict, class name -> row indices; got "
                         f"{type(class_dict).__name__}{' (empty)' if isinstance(class_dict, dict) else ''}")
    rows: List[np.ndarray] = []
    for name, indices in class_dict.items():
        row = np.asarray(indices)
        if row.ndim != 1 or row.size == 0 or row.dtype.kind not in "iu":
            raise ValueError(f"{path}: 'class_dict'[{name!r}] must be a non-empty list of int row indices; got "
                             f"{row.dtype} shape {list(row.shape)}")
        if row.size != (rows[0].size if rows else row.size):
            first = next(iter(class_dict))
            raise ValueError(f"{path}: every class must have as many images (the sampler draws from a [classes, "
                             f"images] grid); got {rows[0].size} for {first!r} and {row.size} for {name!r}")
        low, high = int(row.min()), int(row.max())
        if low < 0 or high >= images.shape[0]:
            raise ValueError(f"{path}: 'class_dict'[{name!r}] must index rows 0..{images.shape[0] - 1} of "
                             f"'image_data'; got indices from {low} to {high}")
        rows.append(row.astype(np.int64))
    grid = np.stack(rows)  # [C, D]
    if np.unique(grid).size != grid.size:
        raise ValueError(f"{path}: 'class_dict' lists some rows of 'image_data' in more than one class (or twice); "
                         f"each image must belong to one class")
    if np.array_equal(grid.reshape(-1), np.arange(grid.size)):
        grouped = images[: grid.size].reshape(grid.shape + IMAGE_SHAPE)  # learn2learn's files: a view, no copy
    else:
        grouped = images[grid]
    if not grouped.flags.writeable:  # torch.from_numpy wants a writable array
        grouped = grouped.copy()
    return MiniImagenetSplit(grouped, tuple(str(name) for name in class_dict), path)


# --------------------------------------------------------------------------- finding the files


def find_mini_imagenet(root: Optional[PathLike] = None) -> Path:
    """The folder holding the three ``mini-imagenet-cache-<split>.pkl`` files.

    ``root`` (else ``$IMAML_DATA``) names the data folder: the files are looked for in
    ``root/mini-imagenet/``, then in ``root`` itself. Without either, ``mini-imagenet/`` under
    the Omniglot search paths (``./data``, ``../shared/data``, ...). Raises
    ``FileNotFoundError`` naming the folders looked at and the files expected there.
    """
    given = _given_root(root)
    candidates = [given[1] / FOLDER, given[1]] if given is not None else [p / FOLDER for p in default_search_paths()]
    for folder in candidates:
        if all((folder / name).is_file() for name in FILES.values()):
            return folder
    *first, last = FILES.values()
    names = f"{', '.join(first)} and {last} (learn2learn's Mini-ImageNet caches)"
    partial = next((f for f in candidates if any((f / name).is_file() for name in FILES.values())), None)
    if partial is not None:
        missing = ", ".join(name for name in FILES.values() if not (partial / name).is_file())
        found = f"{str(partial)!r} holds only some of {names}: {missing} missing."
    elif given is not None:
        how, path = given
        found = (f"{how} is {str(path)!r}, but neither {str(path / FOLDER)!r} nor {str(path)!r} holds {names}. "
                 f"Put the three files in {str(path / FOLDER)!r}.")
    else:
        found = (f"no folder holding {names} at {', '.join(repr(str(f)) for f in candidates)}. Pass "
                 f"{_download.spelled('root')} or set {DATA_ENV}=<folder>, the folder holding {FOLDER}/ (or the "
                 f"files).")
    raise FileNotFoundError(
        f"Mini-ImageNet not found: {found} They are not downloaded: Mini-ImageNet's images are ImageNet's, which "
        f"are not freely redistributable (learn2learn's MiniImagenet(root, mode, download=True) writes these files)."
    )


def load_mini_imagenet(root: Optional[PathLike] = None) -> Dict[str, MiniImagenetSplit]:
    """The train, validation and test files of :func:`find_mini_imagenet`'s folder, read and checked
    by :func:`read_mini_imagenet`."""
    folder = find_mini_imagenet(root)
    return {split: read_mini_imagenet(folder / FILES[split]) for split in SPLITS}


# --------------------------------------------------------------------------- tasks


class MiniImagenetSampler(TaskSampler):
    """:class:`TaskSampler`'s draws (classes, images, label permutations; no rotations) over
    colour images: ``gather`` returns float32 ``[T, ways*shots, 3, S, S]`` in [0, 1].

    Args:
        images: uint8 ``[C, D, S, S, 3]`` (class, image, height, width, RGB), e.g.
            :attr:`MiniImagenetSplit.images`; every class is sampled from.
        ways, shots, query, device, seed, generator: as for :class:`TaskSampler`.

    The uint8 images stay as they are on ``device`` (a quarter of float32's memory); a batch is
    converted when gathered. The parent samples over a stand-in ``[C, D, 1, 1]`` float64 tensor
    holding each image's flat index, so it draws (from the same generator, in the same order)
    and groups exactly as for Omniglot; ``gather`` then looks the indices up.
    """

    def __init__(self, images: Tensor, ways: int, shots: int, query: int, *, device: DeviceLike = None,
                 seed: Optional[int] = None, generator: Optional[torch.Generator] = None) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 5 \
                or images.shape[-1] != 3 or images.shape[2] != images.shape[3]:
            got = f"{images.dtype} {list(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"MiniImagenetSampler: images must be a uint8 tensor [C, D, S, S, 3]; got {got}")
        classes, drawers = images.shape[:2]
        index = torch.arange(classes * drawers, dtype=torch.float64).reshape(classes, drawers, 1, 1)
        super().__init__(index, None, ways, shots, query, rotations=False, device=device if device is not None
                         else images.device, seed=seed, generator=generator)
        self.pixels = images.to(self.device).flatten(0, 1)  # [C*D, S, S, 3]
        # (image_size stays the stand-in's 1: the parent's gather reads it.)
        self.image_shape = (images.shape[4], images.shape[2], images.shape[3])

    def __repr__(self) -> str:
        return (f"MiniImagenetSampler(classes={self.num_classes}, images_per_class={self.drawers}, ways={self.ways}, "
                f"shots={self.shots}, query={self.query}, image_shape={list(self.image_shape)}, device={self.device})")

    def gather(self, idx: TaskIndices) -> TaskBatch:
        index = super().gather(idx)  # the images' flat indices, [T, n, 1, 1, 1], laid out as a batch
        return TaskBatch(self._images(index.support_x), index.support_y, self._images(index.query_x), index.query_y)

    def _images(self, index: Tensor) -> Tensor:
        T, n = index.shape[:2]
        x = self.pixels[index.reshape(T, n).long()]  # [T, n, S, S, 3] uint8
        return x.permute(0, 1, 4, 2, 3).contiguous().to(torch.float32).div_(255)


def mini_imagenet_tasks(
    ways: int,
    shots: int,
    query: int,
    *,
    root: Optional[PathLike] = None,
    splits: Optional[Dict[str, MiniImagenetSplit]] = None,
    seed: Optional[int] = None,
    device: DeviceLike = "cpu",
) -> MiniImagenetTasks:
    """Mini-ImageNet task samplers for the train, validation and test files.

    ``splits`` (from :func:`load_mini_imagenet`) skips reading the files under ``root``.
    ``seed`` seeds the three samplers, each with its own stream, exactly as
    :func:`imaml_ext.data.omniglot_tasks` does; ``None`` draws it from torch's global generator.
    """
    if splits is None:
        splits = load_mini_imagenet(root)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    streams = np.random.SeedSequence(seed).spawn(len(SPLITS))
    samplers = [
        MiniImagenetSampler(torch.from_numpy(splits[split].images), ways, shots, query, device=device,
                            seed=int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)))
        for split, ss in zip(SPLITS, streams)
    ]
    return MiniImagenetTasks(*samplers)


__all__ = [
    "FILES",
    "FOLDER",
    "IMAGE_SHAPE",
    "MiniImagenetSampler",
    "MiniImagenetSplit",
    "MiniImagenetTasks",
    "find_mini_imagenet",
    "load_mini_imagenet",
    "mini_imagenet_tasks",
    "read_mini_imagenet",
]
