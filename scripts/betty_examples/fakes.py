"""Synthetic stand-ins for the data and the GPU calls of Betty's example programs.

Installed by ``runner.py`` before a program runs, the same way for Betty and for imaml_ext:

- torchvision's MNIST, FashionMNIST, CIFAR10 and CIFAR100 hold seeded random images of their real
  shape, dtype and layout (MNIST: a uint8 tensor N x 28 x 28; CIFAR: a uint8 array N x 32 x 32 x 3)
  and balanced labels; nothing is downloaded. N is BETTY_EXAMPLES_TRAIN / BETTY_EXAMPLES_TEST.
- learn2learn's ``vision.benchmarks.get_tasksets`` gives task sets whose ``sample()`` is a seeded
  random (images, labels) task of the requested ways and samples (Omniglot: 1 x 28 x 28).
- numpy's ``np.int`` / ``np.float`` / ``np.bool`` aliases (removed in numpy 2) are back.
- DataLoader workers are 0, so each run stays in one process with one thread.
- ``Tensor.cuda`` / ``Module.cuda`` leave things on the CPU and ``torch.cuda.set_device`` does
  nothing: the programs that write ``.cuda()`` or ``torch.device("cuda")`` (the latter rewritten
  to "cpu" in the copied source) run on a CPU.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch

TRAIN = int(os.environ.get("BETTY_EXAMPLES_TRAIN", "2000"))
TEST = int(os.environ.get("BETTY_EXAMPLES_TEST", "400"))


def _rng(*key) -> np.random.Generator:
    """A generator of its own per data set, so the program's seeding and RNG use are untouched."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _labels(rng, count: int, classes: int) -> np.ndarray:
    return rng.permutation(np.arange(count) % classes)


def _vision(base, shape, classes: int, as_tensor: bool):
    class Synthetic(base):
        def __init__(self, root, train=True, transform=None, target_transform=None, download=False, **_):
            torch.utils.data.Dataset.__init__(self)
            self.root, self.train = root, train
            self.transform, self.target_transform = transform, target_transform
            count = TRAIN if train else TEST
            rng = _rng(base.__name__, train)
            data = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
            labels = _labels(rng, count, classes)
            if as_tensor:
                self.data, self.targets = torch.from_numpy(data), torch.from_numpy(labels)
            else:
                self.data, self.targets = data, labels.tolist()
            if not getattr(self, "classes", None):
                self.classes = [str(c) for c in range(classes)]
            if not isinstance(getattr(base, "class_to_idx", None), property):
                self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    Synthetic.__name__ = Synthetic.__qualname__ = base.__name__
    return Synthetic


class _TaskSet:
    def __init__(self, name: str, ways: int, samples: int, shape):
        self.rng = _rng("tasks", name)
        self.ways, self.samples, self.shape = ways, samples, shape

    def sample(self):
        count = self.ways * self.samples
        x = torch.from_numpy(self.rng.standard_normal((count, *self.shape), dtype=np.float32))
        y = torch.arange(self.ways).repeat_interleave(self.samples)
        return x, y


def get_tasksets(name="omniglot", train_ways=5, train_samples=10, test_ways=5, test_samples=10, **_):
    from collections import namedtuple

    shape = (1, 28, 28) if name == "omniglot" else (3, 84, 84)
    sets = namedtuple("BenchmarkTasksets", ("train", "validation", "test"))
    return sets(_TaskSet("train", train_ways, train_samples, shape),
                _TaskSet("validation", test_ways, test_samples, shape),
                _TaskSet("test", test_ways, test_samples, shape))


def install(l2l: bool) -> None:
    import torchvision.datasets as datasets

    for name, shape, classes, as_tensor in [("MNIST", (28, 28), 10, True), ("FashionMNIST", (28, 28), 10, True),
                                             ("CIFAR10", (32, 32, 3), 10, False),
                                             ("CIFAR100", (32, 32, 3), 100, False)]:
        setattr(datasets, name, _vision(getattr(datasets, name), shape, classes, as_tensor))

    init = torch.utils.data.DataLoader.__init__

    def one_process(self, *args, **kwargs):
        kwargs["num_workers"] = 0
        kwargs.pop("prefetch_factor", None)
        kwargs.pop("persistent_workers", None)
        init(self, *args, **kwargs)

    torch.utils.data.DataLoader.__init__ = one_process
    # numpy 2 removed them; 0.1.1's Omniglot loader uses them
    for name, kind in (("int", int), ("float", float), ("bool", bool)):
        if name not in np.__dict__:
            setattr(np, name, kind)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.set_device = lambda *args, **kwargs: None
    if l2l:  # imported only for the programs that use it: it is slow to import
        import learn2learn.vision.benchmarks as benchmarks

        benchmarks.get_tasksets = get_tasksets
