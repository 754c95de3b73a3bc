"""The model (the paper's Conv4, or ResNet-12) and the learner that meta-trains and adapts it."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import torch

from ..batched import IMAML, MAML
from ..batched.choice import TUNING_ENV, TuningCache, tuning_cache
from ..data.cache import default_cache_dir
from ..models import Conv4, ResNet12
from .config import RunConfig
from .tasks import input_shape


@dataclasses.dataclass
class Learning:
    """What the meta-steps train: the model, the learner of --algo, the meta-optimizer and its schedule."""

    model: torch.nn.Module
    learner: Union[IMAML, MAML]
    optimizer: torch.optim.Optimizer
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler]


def build_learning(args: RunConfig) -> Learning:
    model = build_model(args)
    learner = build_imaml(model, args)
    optimizer_cls = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    optimizer = optimizer_cls(model.parameters(), lr=args.meta_lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps)
                 if args.scheduler == "cosine" else None)
    return Learning(model, learner, optimizer, scheduler)


def build_model(args: RunConfig) -> torch.nn.Module:
    """--model for --task's images, initialised from --seed."""
    channels, side = input_shape(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        if args.model == "resnet12":
            return ResNet12(args.ways, args.hidden_size, in_channels=channels).to(args.device)
        return Conv4(args.ways, args.hidden_size, in_channels=channels, image_size=side).to(args.device)


TF32_OPTION = {"torch": None, "on": True, "off": False}


def _tf32(args: RunConfig):
    """--tf32 as IMAML's tf32. Off CUDA there is nothing to set: RunConfig.check said so once, and
    no learner says it again."""
    if torch.device(args.device).type != "cuda":
        return None
    return TF32_OPTION[args.tf32]


def tuning_cache_of(args: RunConfig) -> Optional[TuningCache]:
    """--tuning_cache: a file or a folder, or none; by default $IMAML_TUNING_CACHE, else the image
    cache's folder's tuning/ (batched/choice.py: "auto" keeps its choices there for this machine)."""
    given = args.tuning_cache
    if given is None:
        given = os.environ.get(TUNING_ENV) or str(default_cache_dir() / "tuning")
    return tuning_cache(given)


def build_imaml(model, args: RunConfig) -> Union[IMAML, MAML]:
    """The learner of ``--algo``: IMAML, or MAML for maml / fomaml."""
    tf32, cache = _tf32(args), tuning_cache_of(args)
    if args.algo != "imaml":
        return MAML(model, inner_steps=args.inner_steps, inner_lr=args.base_lr, first_order=args.algo == "fomaml",
                    ways=args.ways, check_labels=False, forward=args.forward, tf32=tf32, nonfinite="skip",
                    tuning_cache=cache)
    return IMAML(model, inner_steps=args.inner_steps, inner_lr=args.base_lr, lam=args.lam,
                 cg_iterations=args.cg_iterations, ways=args.ways, check_labels=False, forward=args.forward,
                 cg_damping=args.cg_damping, lam_damping=args.lam_damping, nonfinite="skip",
                 precision=args.precision, hvp=args.hvp, tf32=tf32, tuning_cache=cache)


def evaluation_lam(args: RunConfig) -> float:
    """The lambda of the final evaluation's inner loop: --eval_lam, by default --lam (0 for maml / fomaml)."""
    if args.eval_lam is not None:
        return float(args.eval_lam)
    return float(args.lam) if args.algo == "imaml" else 0.0


def build_evaluator(model, args: RunConfig) -> Union[IMAML, MAML]:
    """The learner the final evaluation adapts ``model`` with: the training one, or with --eval_lam
    another lambda; at 0, plain SGD from theta (no proximal term), as the iMAML authors'
    measure_accuracy.py fine-tunes at test time."""
    lam = evaluation_lam(args)
    if args.algo != "imaml" or lam == args.lam:
        return build_imaml(model, args)
    if lam == 0:
        return MAML(model, inner_steps=args.inner_steps, inner_lr=args.base_lr, first_order=True, ways=args.ways,
                    check_labels=False, forward=args.forward, tf32=_tf32(args), tuning_cache=tuning_cache_of(args))
    return build_imaml(model, dataclasses.replace(args, lam=lam))
