"""learn2learn tasksets over our Omniglot arrays, and an adapter to :class:`TaskBatch`.

learn2learn's own ``get_tasksets("omniglot")`` downloads the data through torchvision, which
fails offline; :func:`l2l_tasksets` builds the same benchmark (same task transforms) over the
tensors of :func:`load_omniglot`. learn2learn is imported only when these functions run.

learn2learn 0.2.0's benchmark has two defects, reproduced only with ``exact_l2l=True``:

1. its task transforms are built on the unfiltered dataset, so the train, validation and
   test tasksets all draw their classes from all 1623 characters (the split is ignored);
2. ``RandomClassRotation`` appends ``lambda x: (rotation(x[0]), x[1])`` in a loop, and the
   closures read ``rotation`` when the data load, so every class of a task gets the rotation
   drawn for the last class.

By default each split's tasks draw from that split's classes only, and :class:`ClassRotation`
rotates each class independently.
"""

from __future__ import annotations

import contextlib
import functools
import io
import random
import sys
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .omniglot import NUM_CLASSES, PathLike, load_omniglot, split_classes
from .sampler import DeviceLike, TaskBatch


class OmniglotDataset(Dataset):
    """Flat ``(image [1, S, S], class id)`` view of ``[C, D, S, S]`` images, item ``c*D + d``."""

    def __init__(self, images: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"OmniglotDataset: images must be a Tensor [C, D, S, S]; got {shape}")
        self.images = images
        self.drawers = images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0] * self.drawers

    def __getitem__(self, item: int) -> Tuple[Tensor, int]:
        c, d = divmod(int(item), self.drawers)
        return self.images[c, d].unsqueeze(0), c

    def labels_to_indices(self) -> dict:
        """learn2learn's bookkeeping, given directly so MetaDataset need not load every item."""
        D = self.drawers
        return {c: list(range(c * D, (c + 1) * D)) for c in range(self.images.shape[0])}


def _rotate_sample(sample: Tuple[Tensor, Any], k: int) -> Tuple[Tensor, Any]:
    return torch.rot90(sample[0], k, dims=(-2, -1)), sample[1]


class ClassRotation:
    """learn2learn's ``RandomClassRotation`` task transform with the late-binding defect fixed:
    each class of a task is rotated by its own ``random.choice(degrees)`` (Python's global
    ``random``, as learn2learn). Degrees must be multiples of 90; rotation is ``torch.rot90``,
    which equals torchvision's ``RandomRotation`` at those angles."""

    def __init__(self, dataset: Any, degrees: Sequence[float] = (0.0, 90.0, 180.0, 270.0)) -> None:
        if not degrees or any(float(d) % 90 != 0 for d in degrees):
            raise ValueError(f"ClassRotation: degrees must be non-empty multiples of 90; got {list(degrees)!r}")
        self.dataset = dataset
        self.degrees = list(degrees)

    def __call__(self, task_description: List[Any]) -> List[Any]:
        turns = {}
        for data_description in task_description:
            c = self.dataset.indices_to_labels[data_description.index]
            if c not in turns:
                turns[c] = int(float(random.choice(self.degrees)) // 90) % 4
            # partial binds k now; a lambda over a loop variable would read it later.
            data_description.transforms.append(functools.partial(_rotate_sample, k=turns[c]))
        return task_description


def import_learn2learn() -> Any:
    """``import learn2learn``, without the 4-line notice that gym (which learn2learn imports) prints
    to stderr at its import, that gym is unmaintained: about learn2learn's RL part, which nothing
    here uses. Anything else printed while importing is printed as it came."""
    if "learn2learn" in sys.modules:
        return sys.modules["learn2learn"]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            import learn2learn
    finally:
        sys.stderr.write(_without_gym_notice(printed.getvalue()))
    return learn2learn


def _without_gym_notice(text: str) -> str:
    try:
        from importlib.metadata import version

        from gym_notices.notices import notices
    except ImportError:
        return text
    notice = notices.get(version("gym"))
    return text.replace(notice + "\n", "", 1) if notice else text


def _benchmark_transforms(dataset: Any, ways: int, samples: int, exact_l2l: bool) -> List[Any]:
    """The task transforms of learn2learn's omniglot benchmark, in its order."""
    l2l = import_learn2learn()

    degrees = [0.0, 90.0, 180.0, 270.0]
    rotation = (l2l.vision.transforms.RandomClassRotation(dataset, degrees) if exact_l2l
                else ClassRotation(dataset, degrees))
    return [
        l2l.data.transforms.FusedNWaysKShots(dataset, n=ways, k=samples),
        l2l.data.transforms.LoadData(dataset),
        l2l.data.transforms.RemapLabels(dataset),
        l2l.data.transforms.ConsecutiveLabels(dataset),
        rotation,
    ]


def l2l_tasksets(
    train_ways: int = 5,
    train_samples: int = 10,
    test_ways: int = 5,
    test_samples: int = 10,
    num_tasks: int = -1,
    *,
    root: Optional[PathLike] = None,
    protocol: str = "l2l",
    seed: int = 0,
    image_size: int = 28,
    images: Optional[Tensor] = None,
    device: DeviceLike = None,
    exact_l2l: bool = False,
) -> Any:
    """learn2learn's Omniglot ``BenchmarkTasksets(train, validation, test)`` over our arrays.

    Same arguments and task transforms as ``l2l.vision.benchmarks.get_tasksets("omniglot",
    ...)``: ``tasksets.train.sample()`` returns ``(data [train_ways*train_samples, 1, S, S],
    labels)``, samples grouped by class, labels 0..ways-1, each class rotated by 0/90/180/270.
    Validation and test use ``test_ways`` / ``test_samples``.

    The classes come from :func:`split_classes` (``protocol``, ``seed``). Tasks are drawn, as in
    learn2learn, from Python's global ``random`` module: seed it for reproducible tasks.
    ``images`` (from :func:`load_omniglot`) skips loading; ``device`` moves them there.
    ``exact_l2l=True`` reproduces learn2learn 0.2.0's two defects (see the module docstring):
    every split samples from all 1623 classes, and all classes of a task share one rotation.
    """
    l2l = import_learn2learn()
    from learn2learn.vision.benchmarks import BenchmarkTasksets

    for name, value in (("train_ways", train_ways), ("train_samples", train_samples),
                        ("test_ways", test_ways), ("test_samples", test_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"l2l_tasksets: {name} must be an int >= 1; got {value!r}")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or (num_tasks < 1 and num_tasks != -1):
        raise ValueError(f"l2l_tasksets: num_tasks must be -1 (endless) or an int >= 1; got {num_tasks!r}")
    if not isinstance(exact_l2l, bool):
        raise TypeError(f"l2l_tasksets: exact_l2l must be a bool; got {type(exact_l2l).__name__} {exact_l2l!r}")
    if images is None:
        images = load_omniglot(root, image_size=image_size)
    if images.dim() != 4 or images.shape[0] != NUM_CLASSES:
        raise ValueError(f"l2l_tasksets: images must be [{NUM_CLASSES}, D, S, S]; got {list(images.shape)}")
    drawers = images.shape[1]
    for name, value in (("train_samples", train_samples), ("test_samples", test_samples)):
        if value > drawers:
            raise ValueError(f"l2l_tasksets: {name} must be <= {drawers} (images per class); got {value}")
    if device is not None:
        images = images.to(device)

    source = OmniglotDataset(images)
    dataset = l2l.data.MetaDataset(source, labels_to_indices=source.labels_to_indices())
    splits = [split_classes(s, seed=seed, protocol=protocol).tolist() for s in ("train", "validation", "test")]
    sizes = [(train_ways, train_samples), (test_ways, test_samples), (test_ways, test_samples)]
    tasksets = []
    for name, labels, (ways, samples) in zip(("train", "validation", "test"), splits, sizes):
        if ways > len(labels):
            raise ValueError(
                f"l2l_tasksets: {'train_ways' if name == 'train' else 'test_ways'} must be <= {len(labels)} "
                f"(classes in the {protocol!r} {name} split); got {ways}"
            )
        filtered = l2l.data.FilteredMetaDataset(dataset, labels=labels)
        # learn2learn builds the transforms on the unfiltered dataset, which ignores the split.
        on = dataset if exact_l2l else filtered
        transforms = _benchmark_transforms(on, ways, samples, exact_l2l)
        tasksets.append(l2l.data.Taskset(filtered, task_transforms=transforms, num_tasks=num_tasks))
    return BenchmarkTasksets(*tasksets)


def split_task(data: Tensor, labels: Tensor, shots: int, ways: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One learn2learn task (``2*shots`` consecutive samples per class) into support (even
    positions) and query (odd positions), as the Betty/learn2learn iMAML example does."""
    n = data.shape[0]
    if n != 2 * shots * ways:
        raise ValueError(
            f"split_task: a task must hold 2 * shots * ways = 2 * {shots} * {ways} = {2 * shots * ways} "
            f"samples (sample the taskset with samples = 2 * shots); got {n}"
        )
    return data[0::2], labels[0::2], data[1::2], labels[1::2]


def from_l2l_taskset(taskset: Any, T: int, shots: int, ways: int, device: DeviceLike = None) -> TaskBatch:
    """Sample T tasks from a learn2learn taskset into a :class:`TaskBatch` like
    :meth:`TaskSampler.sample`'s: support ``[T, ways*shots, 1, S, S]`` and query of the same
    size (``shots`` query images per class). The taskset must draw ``2 * shots`` samples per
    class (learn2learn's ``train_samples=2*shots``)."""
    for name, value in (("T", T), ("shots", shots), ("ways", ways)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"from_l2l_taskset: {name} must be an int >= 1; got {value!r}")
    parts = [split_task(*taskset.sample(), shots=shots, ways=ways) for _ in range(T)]
    sx, sy, qx, qy = (torch.stack([p[i] for p in parts]) for i in range(4))
    out = TaskBatch(sx, sy.long(), qx, qy.long())
    if device is not None:
        out = TaskBatch(*(t.to(device) for t in out))
    return out
