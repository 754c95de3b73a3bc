"""The run's Omniglot tasks, from the images on disk (or downloaded with --download)."""

from __future__ import annotations

import torch

from ..data import DownloadError, OmniglotTasks, load_omniglot, omniglot_tasks, option_spelling
from .errors import RunError


def load_images(args) -> torch.Tensor:
    try:
        with option_spelling(root="--data <folder>", download="--download"):  # the flags, in its messages
            return load_omniglot(args.data, download=args.download)
    except (FileNotFoundError, ValueError, DownloadError) as error:  # missing or damaged data: the message names it
        raise RunError(str(error)) from None


def make_tasks(args, device: torch.device) -> OmniglotTasks:
    """The train, validation and test samplers of the run that ``args`` describe."""
    return omniglot_tasks(args.ways, args.shots, args.query, images=load_images(args), protocol=args.split,
                          split_seed=args.split_seed, seed=args.seed, device=device)
