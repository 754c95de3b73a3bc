"""The run's tasks: Omniglot from the images on disk (or downloaded with --download), or
Mini-ImageNet from learn2learn's cache files (--task mini-imagenet, never downloaded)."""

from __future__ import annotations

import pickle
from typing import Tuple, Union

import torch

from ..data import (
    CacheError,
    DownloadError,
    MiniImagenetTasks,
    OmniglotTasks,
    load_mini_imagenet,
    load_omniglot,
    mini_imagenet_tasks,
    omniglot_tasks,
    option_spelling,
)
from .config import RunConfig
from .errors import RunError

Tasks = Union[OmniglotTasks, MiniImagenetTasks]
# Each task's images: (channels, side).
INPUTS = {"omniglot": (1, 28), "mini-imagenet": (3, 84)}


def input_shape(args: RunConfig) -> Tuple[int, int]:
    """(channels, side) of the images of ``args.task``."""
    return INPUTS[args.task]


def load_images(args: RunConfig) -> torch.Tensor:
    try:
        with option_spelling(root="--data <folder>", download="--download"):  # the flags, in its messages
            return load_omniglot(args.data, download=args.download)
    # Missing or damaged data, or a folder that cannot be written: the message names it and what to do.
    except (FileNotFoundError, ValueError, DownloadError, CacheError) as error:
        raise RunError(str(error)) from None


def make_tasks(args: RunConfig, device: torch.device) -> Tasks:
    """The train, validation and test samplers of the run that ``args`` describe."""
    if args.task == "mini-imagenet":
        return _mini_imagenet(args, device)
    return omniglot_tasks(args.ways, args.shots, args.query, images=load_images(args), protocol=args.split,
                          split_seed=args.split_seed, seed=args.seed, device=device)


def _mini_imagenet(args: RunConfig, device: torch.device) -> MiniImagenetTasks:
    try:
        with option_spelling(root="--data <folder>", download="--download"):
            splits = load_mini_imagenet(args.data)
    except (OSError, ValueError, pickle.UnpicklingError) as error:  # missing, unsafe or damaged: the message names it
        raise RunError(str(error)) from None
    for name, split in splits.items():  # the counts are the files': checked once they are read
        classes, images = split.images.shape[:2]
        if args.ways > classes:
            raise RunError(f"--ways {args.ways} is more than the {classes} classes of the Mini-ImageNet {name} split "
                           f"({split.path})")
        if args.shots + args.query > images:
            raise RunError(f"--shots + --query must be <= {images} (the images per class of {split.path}; support "
                           f"and query images are distinct); got {args.shots} + {args.query}")
    return mini_imagenet_tasks(args.ways, args.shots, args.query, splits=splits, seed=args.seed, device=device)
