"""A batched N-way K-shot task sampler that lives on the device.

All images of a split sit in one tensor on the device; :meth:`TaskSampler.sample` draws a whole
meta-batch of T tasks with a handful of tensor ops (no Python loop over tasks, classes or
images, no host synchronisation), from its own ``torch.Generator`` so a seed replays it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .._device import check_device

DeviceLike = Union[str, torch.device, None]


class TaskBatch(NamedTuple):
    """A meta-batch of T tasks. Samples are grouped by class (``shots`` or ``query`` in a row)."""

    support_x: Tensor  # [T, ways*shots, 1, S, S] float
    support_y: Tensor  # [T, ways*shots] int64 in [0, ways)
    query_x: Tensor  # [T, ways*query, 1, S, S] float
    query_y: Tensor  # [T, ways*query] int64 in [0, ways)


class TaskIndices(NamedTuple):
    """What :meth:`TaskSampler.sample_indices` drew; :meth:`TaskSampler.gather` builds the batch."""

    classes: Tensor  # [T, ways] int64: the sampler's class ids (entries of its ``classes``)
    drawers: Tensor  # [T, ways, shots+query] int64: the first ``shots`` are the support
    rotations: Tensor  # [T, ways] int64 in [0, 4): quarter turns (torch.rot90's k)
    labels: Tensor  # [T, ways] int64: each row a permutation of 0..ways-1


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_count(name: str, value: object, low: int, high: Optional[int] = None, why: str = "") -> int:
    if not _is_int(value):
        raise TypeError(f"TaskSampler: {name} must be an int; got {type(value).__name__} {value!r}")
    value = int(value)  # type: ignore[arg-type]
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"TaskSampler: {name} must be {bound}{why}; got {value}")
    return value


class TaskSampler:
    """Samples meta-batches of ``ways``-way tasks with ``shots`` support and ``query`` query
    images per class.

    Args:
        images: ``[C, D, S, S]`` float images (class, drawer), e.g. :func:`load_omniglot`.
        classes: the class ids (indices into dim 0 of ``images``) to sample from, e.g.
            :func:`split_classes`; ``None`` takes all ``C``. Only these are copied to ``device``.
        ways, shots, query: classes per task, support and query images per class
            (``shots + query <= D``; support and query come from different drawers).
        rotations: rotate all images of a (task, class) by the same random multiple of 90
            degrees, so rotations act as new classes (Santoro et al.; Finn et al.).
        device: where the images live and the batches are made (default: ``images.device``).
        seed: seeds the sampler's own generator; ``None`` draws one from torch's global
            generator (so ``torch.manual_seed`` makes it reproducible).
        generator: use this generator instead (must be on ``device``); excludes ``seed``.

    A seed gives the same batches on the same kind of device (CPU and CUDA generators differ).
    """

    def __init__(
        self,
        images: Tensor,
        classes: Union[Tensor, Sequence[int], None],
        ways: int,
        shots: int,
        query: int,
        *,
        rotations: bool = True,
        device: DeviceLike = None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"TaskSampler: images must be a Tensor [C, D, S, S]; got {type(images).__name__}")
        if images.dim() != 4 or images.shape[-1] != images.shape[-2] or images.shape[0] < 1:
            raise ValueError(
                f"TaskSampler: images must be [C, D, S, S] (classes, drawers, square images); "
                f"got shape {list(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"TaskSampler: images must be a float tensor; got {images.dtype}")
        num_all, drawers, size = images.shape[0], images.shape[1], images.shape[-1]

        if classes is None:
            class_ids = torch.arange(num_all)
        else:
            class_ids = torch.as_tensor(classes)
            dt = class_ids.dtype
            is_int = not (dt.is_floating_point or dt.is_complex or dt == torch.bool)
            if class_ids.dim() != 1 or class_ids.numel() == 0 or not is_int:
                raise ValueError(
                    f"TaskSampler: classes must be a non-empty 1-D sequence of int class ids; "
                    f"got {class_ids.dtype} shape {list(class_ids.shape)}"
                )
            class_ids = class_ids.to("cpu", torch.int64)
            lo, hi = int(class_ids.min()), int(class_ids.max())
            if lo < 0 or hi >= num_all:
                raise ValueError(
                    f"TaskSampler: classes must be in [0, {num_all - 1}] (images has {num_all} classes); "
                    f"got values from {lo} to {hi}"
                )
            values, counts = class_ids.unique(return_counts=True)
            if bool((counts > 1).any()):
                repeated = values[counts > 1][:10].tolist()
                raise ValueError(f"TaskSampler: classes must be distinct class ids; got repeated ids {repeated}")
        num_classes = class_ids.numel()

        self.ways = _check_count("ways", ways, 1, num_classes, " (the number of classes given)")
        self.shots = _check_count("shots", shots, 1)
        self.query = _check_count("query", query, 1)
        if self.shots + self.query > drawers:
            raise ValueError(
                f"TaskSampler: shots + query must be <= {drawers} (images per class); "
                f"got shots + query = {self.shots} + {self.query} = {self.shots + self.query}"
            )
        if not isinstance(rotations, bool):
            raise TypeError(f"TaskSampler: rotations must be a bool; got {type(rotations).__name__} {rotations!r}")
        self.rotations = rotations

        self.device = check_device(device, "TaskSampler(device=...)") if device is not None else images.device
        if generator is not None:
            if seed is not None:
                raise ValueError("TaskSampler: pass seed or generator, not both")
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"TaskSampler: generator must be a torch.Generator; got {type(generator).__name__}")
            if generator.device.type != self.device.type:
                raise ValueError(
                    f"TaskSampler: generator must be on the sampler's device ({self.device.type}); "
                    f"got a generator on {generator.device.type}"
                )
            self.generator = generator
        else:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
            elif not _is_int(seed):
                raise TypeError(f"TaskSampler: seed must be an int or None; got {type(seed).__name__} {seed!r}")
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(int(seed))

        self.classes = class_ids.to(self.device)  # row of self.images -> class id in `images`
        row_of = torch.full((num_all,), -1, dtype=torch.int64)  # class id -> row of self.images
        row_of[class_ids] = torch.arange(num_classes)
        self._row_of = row_of.to(self.device)
        self.num_classes = num_classes
        self.drawers = drawers
        self.image_size = size
        # One flat [n, D, S*S] copy of the split on the device: a batch is one gather from it.
        subset = images.index_select(0, class_ids.to(images.device))
        self.images = subset.to(self.device).reshape(num_classes, drawers, size * size).contiguous()
        # _rot_index[k][p] is the source pixel of output pixel p for rot90 by k quarter turns,
        # so rotating a batch by per-class k is one gather (no loop over k).
        pixels = torch.arange(size * size).reshape(size, size)
        rot_index = [torch.rot90(pixels, k, dims=(0, 1)).reshape(-1) for k in range(4)]
        self._rot_index = torch.stack(rot_index).to(self.device)

    def __repr__(self) -> str:
        return (
            f"TaskSampler(classes={self.num_classes}, ways={self.ways}, shots={self.shots}, "
            f"query={self.query}, rotations={self.rotations}, image_size={self.image_size}, device={self.device})"
        )

    def sample_indices(self, T: int) -> TaskIndices:
        """Draw T tasks: distinct classes per task, distinct drawers per class, one rotation
        per (task, class) and a random label permutation per task."""
        if not _is_int(T) or int(T) < 1:
            raise ValueError(f"TaskSampler.sample: T (number of tasks) must be an int >= 1; got {T!r}")
        T = int(T)
        g, dev = self.generator, self.device
        # top-k of i.i.d. uniform keys = a uniform sample without replacement, for every row at once.
        picked = torch.rand(T, self.num_classes, generator=g, device=dev).topk(self.ways, dim=1).indices
        keys = torch.rand(T, self.ways, self.drawers, generator=g, device=dev)
        drawers = keys.topk(self.shots + self.query, dim=2).indices  # distinct; support first
        if self.rotations:
            rotations = torch.randint(0, 4, (T, self.ways), generator=g, device=dev)
        else:
            rotations = torch.zeros(T, self.ways, dtype=torch.int64, device=dev)
        labels = torch.rand(T, self.ways, generator=g, device=dev).argsort(dim=1)
        return TaskIndices(self.classes[picked], drawers, rotations, labels)

    def gather(self, idx: TaskIndices) -> TaskBatch:
        """Build the image and label tensors of drawn tasks."""
        T, W = idx.rotations.shape
        K, S = idx.drawers.shape[2], self.image_size
        rows = self._row_of[idx.classes]
        flat = self.images[rows.unsqueeze(-1), idx.drawers]  # [T, W, K, S*S]
        pix = self._rot_index[idx.rotations].unsqueeze(2).expand(T, W, K, S * S)
        x = flat.gather(3, pix).reshape(T, W, K, 1, S, S)
        y = idx.labels.unsqueeze(2)
        s, q = self.shots, K - self.shots
        return TaskBatch(
            x[:, :, :s].reshape(T, W * s, 1, S, S),
            y.expand(T, W, s).reshape(T, W * s),
            x[:, :, s:].reshape(T, W * q, 1, S, S),
            y.expand(T, W, q).reshape(T, W * q),
        )

    def sample(self, T: int) -> TaskBatch:
        """T tasks: ``(support_x, support_y, query_x, query_y)``, see :class:`TaskBatch`."""
        return self.gather(self.sample_indices(T))
