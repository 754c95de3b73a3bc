"""Betty's scale-out strategies (``EngineConfig(strategy=...)``) on torch.distributed.

"distributed" and Betty 0.1.1's ``distributed=True``: data parallel over the processes that
``torchrun`` started. Each rank reads every ``world``-th batch of each problem's loader (offset by
its rank, as Betty's distributed loader shards batches), parameters start equal (rank 0's), and
every optimizer step first averages the gradients over the ranks in one all-reduce per problem
(what DistributedDataParallel's hooks do for ``.backward()``; here the gradients, hypergradients
included, come from ``torch.autograd.grad``). "zero" does the same with the optimizer's state
sharded over the ranks (``ZeroRedundancyOptimizer``).

Each rank computes the hypergradient of its own shard's upper loss through the lower problem's
curvature on its own shard; their mean is the single-process hypergradient when that curvature
is the same on every shard (a least-squares lower problem, for one), and close to it otherwise,
as under Betty's DDP.

"fsdp": torch's FSDP2 (``fully_shard``) of each problem's module, the parameters and the
optimizer's state sharded over the ranks at rest (``FullyShardedDataParallel`` below). Betty 0.2
wraps the module in FSDP1, whose flattened parameters are why it drops ``param_groups()`` there;
FSDP2 keeps each parameter, so the optimizer's param groups keep their settings.

"accelerate": Betty 0.2's, through Hugging Face's accelerate (``Accelerate`` below).

"cpu" and "gpu" (Betty 0.2) only pick the device.
"""

from __future__ import annotations

import importlib.util
import os
from typing import List

import torch
import torch.distributed as dist

from .logging import get_logger

class Single:
    """One process: nothing to shard or reduce."""

    name = "default"
    world, rank = 1, 0

    def device(self, default: torch.device) -> torch.device:
        return default

    def start(self, device: torch.device) -> None:
        pass

    def shard_loaders(self, loaders):
        return loaders

    def prepare(self, problem) -> None:
        pass

    def reduce_gradients(self, params: List[torch.Tensor]) -> None:
        pass

    def average(self, tensors: List[torch.Tensor]) -> None:
        pass

    def before_step(self, problem) -> None:
        pass

    def after_step(self, problem) -> None:
        pass

    def at_rest(self, problem) -> None:
        pass

    def stop(self) -> None:
        pass


class DevicePick(Single):
    """Betty 0.2's "cpu" and "gpu" strategies: the device, nothing else."""

    def __init__(self, name: str):
        self.name = name

    def device(self, default: torch.device) -> torch.device:
        if self.name == "gpu" and not torch.cuda.is_available():
            raise ValueError('EngineConfig(strategy="gpu") needs a CUDA device; torch sees none here')
        return torch.device("cuda" if self.name == "gpu" else "cpu")


class DataParallel(Single):
    """"distributed" / "zero": one process per rank, launched by torchrun."""

    def __init__(self, name: str, backend: str, world: int, rank: int, local_rank: int):
        self.name, self.backend = name, backend
        self.world, self.rank, self.local_rank = world, rank, local_rank
        self.started = False

    def device(self, default: torch.device) -> torch.device:
        if default.type == "cuda":
            device = torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
            torch.cuda.set_device(device)
            return device
        return default

    def start(self, device: torch.device) -> None:
        if dist.is_initialized():  # the program set up its own process group
            return
        backend = self.backend
        if device.type != "cuda" and backend == "nccl":
            backend = "gloo"  # NCCL runs on GPUs only; Betty's default names it
            get_logger().info(f'EngineConfig(strategy="{self.name}"): backend "nccl" runs on GPUs only; the '
                              f"process group on {device} uses gloo")
        dist.init_process_group(backend)
        self.started = True

    def shard_loaders(self, loaders):
        """This rank's share of a problem's loader (or tuple of them), before it starts."""
        if isinstance(loaders, tuple):
            return tuple(shard(loader, self.world, self.rank) for loader in loaders)
        return shard(loaders, self.world, self.rank)

    def prepare(self, problem) -> None:
        """Rank 0's parameters everywhere, and ZeRO's optimizer."""
        with torch.no_grad():
            for tensor in list(problem.module.parameters()) + list(problem.module.buffers()):
                dist.broadcast(tensor, 0)
        if self.name == "zero" and problem.optimizer is not None:
            problem.set_optimizer(zero_redundancy(problem.optimizer))

    def reduce_gradients(self, params: List[torch.Tensor]) -> None:
        """Each gradient becomes its mean over the ranks (a missing one counts as 0)."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.average([p.grad for p in params])

    def average(self, tensors: List[torch.Tensor]) -> None:
        """Each tensor, in place, its mean over the ranks: one all-reduce."""
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def stop(self) -> None:
        if self.started:
            dist.destroy_process_group()
            self.started = False


class FullyShardedDataParallel(DataParallel):
    """"fsdp": torch's FSDP2 (``fully_shard``) of each problem's module, in its SHARD_GRAD_OP form
    (``reshard_after_forward=False``).

    At rest each rank holds its shard of every parameter (a DTensor) and the optimizer steps the
    shards, so the optimizer's state is sharded. The whole parameters are all-gathered after each
    optimizer step and stay whole until the next one, because the hypergradient differentiates
    them across several forwards and programs read them directly (``self.upper.module.w``). The
    gradients of the whole parameters are averaged over the ranks in one all-reduce, so
    ``grad_callback`` and clipping see the global batch's gradient, and each rank's shard of it
    goes to its sharded parameter just before the step.
    """

    def __init__(self, *args):
        super().__init__(*args)
        self.pairs = {}  # id(problem) -> [(whole parameter, its shard)]
        self.mesh = None

    def prepare(self, problem) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        module, optimizer = problem.module, problem.optimizer
        if optimizer is not None and optimizer.state:
            raise ValueError(f'EngineConfig(strategy="fsdp"): problem "{problem.name}"\'s optimizer already has '
                             "state, which cannot follow its parameters into their shards; build it fresh")
        with torch.no_grad():  # rank 0's parameters everywhere, as FSDP's sync_module_states does
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor, 0)
        if self.mesh is None:
            self.mesh = init_device_mesh(torch.device(problem.device).type, (self.world,))
        before = list(module.parameters())
        fully_shard(module, mesh=self.mesh, reshard_after_forward=False)
        module.set_requires_gradient_sync(False)  # the gradients are averaged here, once per optimizer step
        module.set_reshard_after_backward(False)
        shards = {id(old): new for old, new in zip(before, module.parameters())}
        if optimizer is not None:  # the same optimizer object steps the shards (a scheduler keeps it)
            for group in optimizer.param_groups:
                group["params"] = [shards.get(id(p), p) for p in group["params"]]
        # FSDP's state_dict() and load_state_dict() reshard the module first (its state dict is the
        # shards); the whole parameters come back after them, as a program reads them next
        module.register_state_dict_post_hook(lambda m, *args: m.unshard())
        module.register_load_state_dict_post_hook(lambda m, keys: m.unshard())
        module.unshard()
        self.pairs[id(problem)] = list(zip(module.parameters(), shards.values()))

    def before_step(self, problem) -> None:
        """Each shard: this rank's part of the whole parameter (which the program may have changed
        in place) and of its averaged gradient."""
        self.at_rest(problem)
        for whole, shard in self.pairs[id(problem)]:
            if whole.grad is not None:
                shard.grad = self._shard_of(whole.grad, shard)

    def at_rest(self, problem) -> None:
        """After param_callback: what it changed in place (Betty's test_install clamps), into the
        shards, which FSDP's state_dict() gives and gathers the whole parameters back from."""
        with torch.no_grad():
            for whole, shard in self.pairs[id(problem)]:
                shard.copy_(self._shard_of(whole.detach(), shard))

    def _shard_of(self, tensor: torch.Tensor, like) -> torch.Tensor:
        """This rank's part of ``tensor`` (the same on every rank), as the DTensor ``like`` holds it."""
        from torch.distributed.tensor import DTensor, Replicate

        whole = DTensor.from_local(tensor, self.mesh, [Replicate()], run_check=False)
        return whole.redistribute(self.mesh, like.placements)  # a local slice: no communication

    def after_step(self, problem) -> None:
        """The updated shards all-gathered into the whole parameters."""
        for _, shard in self.pairs[id(problem)]:
            shard.grad = None
        problem.module.reshard()
        problem.module.unshard()


class Accelerate(DataParallel):
    """"accelerate": an ``accelerate.Accelerator`` sets up the processes (torchrun's, or this one
    alone) and the device, and ``prepare``s each problem's optimizer, scheduler and DataLoaders, as
    Betty 0.2 does. The module goes to the accelerator's device with rank 0's parameters but is not
    wrapped in DistributedDataParallel: the gradients come from ``torch.autograd.grad``, which DDP's
    hooks never see, and programs read the module's attributes (``self.upper.module.w``); they are
    averaged over the processes before each optimizer step, as under "distributed". The scheduler
    steps once per optimizer step (``step_scheduler_with_optimizer=False``): accelerate would step
    it once per process, which only equals one process's schedule when each batch is split.
    Another iterable of batches than a DataLoader is sharded as under "distributed"."""

    def __init__(self, world: int, rank: int, local_rank: int):
        super().__init__("accelerate", "gloo", world, rank, local_rank)
        self.accelerator = None

    def start(self, device: torch.device) -> None:
        from accelerate import Accelerator

        before = dist.is_initialized()  # the program set up its own process group
        # cpu=True is how accelerate runs torchrun's processes on CPUs (gloo)
        self.accelerator = Accelerator(cpu=device.type == "cpu", step_scheduler_with_optimizer=False)
        self.started = dist.is_initialized() and not before
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if self.accelerator.device.type != device.type:
            raise ValueError(f'EngineConfig(strategy="accelerate"): the Accelerator runs on {self.accelerator.device}, '
                             f"the Engine on {device}; set EngineConfig(device=...) to match")

    def shard_loaders(self, loaders):
        if isinstance(loaders, tuple):
            return tuple(self.shard_loaders(loader) for loader in loaders)
        if isinstance(loaders, torch.utils.data.DataLoader):
            return self.accelerator.prepare_data_loader(loaders, device_placement=False)
        return shard(loaders, self.world, self.rank)

    def prepare(self, problem) -> None:
        if self.world > 1:
            super().prepare(problem)  # rank 0's parameters everywhere, as DDP's construction does
        if problem.optimizer is not None:
            problem.optimizer = self.accelerator.prepare_optimizer(problem.optimizer, device_placement=False)
        if problem.scheduler is not None:
            problem.scheduler = self.accelerator.prepare_scheduler(problem.scheduler)

    def reduce_gradients(self, params: List[torch.Tensor]) -> None:
        if self.world > 1:
            super().reduce_gradients(params)

    def average(self, tensors: List[torch.Tensor]) -> None:
        if self.world > 1:
            super().average(tensors)

    def stop(self) -> None:
        from accelerate.state import AcceleratorState, GradientState

        super().stop()
        if self.accelerator is not None:  # the next Engine in this process builds its own Accelerator
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            self.accelerator = None


def make_strategy(config) -> Single:
    """The strategy that ``EngineConfig`` names, checked before anything is set up."""
    name = config.strategy
    if config.distributed and name == "default":
        name = "distributed"  # Betty 0.1.1's switch
    if name == "default":
        return Single()
    if name in ("cpu", "gpu"):
        return DevicePick(name)
    if name == "accelerate":
        if importlib.util.find_spec("accelerate") is None:
            raise ValueError('EngineConfig(strategy="accelerate") runs through Hugging Face\'s package accelerate, '
                             'which is not installed here: pip install accelerate, or use strategy="distributed"')
        world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        return Accelerate(world, rank, int(os.environ.get("LOCAL_RANK", rank)))
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        which = "distributed=True" if config.distributed else f'strategy="{name}"'
        raise ValueError(f"EngineConfig({which}) runs one process per rank: launch the program with torchrun "
                         f"(e.g. torchrun --nproc_per_node 2 program.py); WORLD_SIZE and RANK are not set")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    kind = FullyShardedDataParallel if name == "fsdp" else DataParallel
    return kind(name, config.backend, world, rank, int(os.environ.get("LOCAL_RANK", rank)))


# ----- the loaders and the optimizer -----
class _EveryNth(torch.utils.data.Sampler):
    """Every ``world``-th batch of ``batch_sampler``, from the ``rank``-th; a last group short of
    ``world`` batches is dropped, so every rank reads as many batches an epoch."""

    def __init__(self, batch_sampler, world: int, rank: int):
        self.batch_sampler, self.world, self.rank = batch_sampler, world, rank

    def __iter__(self):
        group = []
        for batch in self.batch_sampler:
            group.append(batch)
            if len(group) == self.world:
                yield group[self.rank]
                group = []

    def __len__(self) -> int:
        return len(self.batch_sampler) // self.world


class _EveryNthBatch:
    """The same over any iterable of batches (a list of batches, a generator function's iterable)."""

    def __init__(self, loader, world: int, rank: int):
        self.loader, self.world, self.rank = loader, world, rank

    def __iter__(self):
        return iter(_EveryNth(self.loader, self.world, self.rank))


def shard(loader, world: int, rank: int):
    """This rank's share of ``loader``'s batches."""
    if isinstance(loader, torch.utils.data.DataLoader) and loader.batch_sampler is not None:
        return torch.utils.data.DataLoader(
            loader.dataset, batch_sampler=_EveryNth(loader.batch_sampler, world, rank),
            num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        )
    return _EveryNthBatch(loader, world, rank)


def zero_redundancy(optimizer: torch.optim.Optimizer):
    """``optimizer`` with its state sharded over the ranks: its class, param groups and settings."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    groups = optimizer.param_groups
    # the optimizer's own settings; a scheduler's keys (initial_lr) go into the new groups after
    settings = {k: v for k, v in groups[0].items() if k in optimizer.defaults}
    zero = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=type(optimizer), **settings)
    for group in groups[1:]:
        zero.add_param_group({k: v for k, v in group.items() if k == "params" or k in optimizer.defaults})
    for new, old in zip(zero.param_groups, groups):
        new.update({k: v for k, v in old.items() if k != "params"})
    return zero


__all__ = ["make_strategy", "shard", "zero_redundancy"]
