"""The ``Problem`` base class: one level of a multilevel optimisation, stepped
as Betty steps it (local steps, unrolling, gradient accumulation, parents
stepped after ``unroll_steps * gradient_accumulation`` local steps)."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .._device import check_device
from ..configs import Config
from ..logging import format_stats, get_logger
from .data import BatchSource
from .hooks import call_hook, takes_argument
from .losses import Losses
from .roll_back import RollBack
from .schedule import BettyNames, StepSchedule
from .set_up import SetUp

class Problem(SetUp, BatchSource, Losses, RollBack, BettyNames):
    """One level: a module, its optimizer and scheduler, its data, its loss.

    Subclasses define ``training_step(batch)`` returning the loss (a scalar
    tensor) or a dict with ``"loss"`` and other metrics to log. Data come from
    ``train_data_loader`` or an overridden ``get_batch()``. Betty's rule: a
    *tuple* is several loaders and ``get_batch`` returns a tuple of their
    batches; anything else (a list of batches included) is one loader and
    ``get_batch`` returns its batch. Hooks: ``on_inner_loop_start``,
    ``on_epoch_end`` (the first loader has run out and starts again),
    ``configure_module / optimizer / scheduler / train_data_loader`` (used when
    the constructor argument is None), ``grad_callback(params)`` (gradients
    complete, before clipping) and ``param_callback(params)`` (after the
    optimizer step).

    ``device`` (as in Betty): where this problem's module and batches live. It
    takes precedence over ``EngineConfig(device=...)``, which applies to the
    problems given none (and to the env); with neither, "cuda" when available,
    else "cpu".
    """

    def __init__(
        self,
        name: str,
        config: Optional[Config] = None,
        module: Optional[nn.Module] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        scheduler=None,
        train_data_loader=None,
        device=None,
        extra_config: Optional[dict] = None,
    ):
        if isinstance(device, dict) and extra_config is None:
            # Betty 0.2's seventh positional argument is extra_config (0.1.1's is device): a dict is never a device
            device, extra_config = None, device
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"Problem name must be a Python identifier (it becomes an attribute); got {name!r}")
        if config is None:
            config = Config()
        if not isinstance(config, Config):
            raise TypeError(f'problem "{name}": config must be an imaml_ext Config; got {type(config).__name__}')
        if device is not None:
            device = check_device(device, f'problem "{name}": device')
        self.name = name
        self.config = config
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_data_loader = train_data_loader
        self.extra_config = extra_config or {}
        self.cfg = extra_config  # Betty 0.2's name

        self._device_arg = device  # None: the Engine's device
        self.device = device
        self.engine = None
        self.env = None
        self.cur_batch = None
        self.scaler = None
        self.schedule = StepSchedule(config)
        self._parents: List[Problem] = []
        self._children: List[Problem] = []
        self._paths: List[List[Problem]] = []
        self._data_iterators = None
        self.task_batch = None  # the Engine's TaskBatcher while it runs this (lower) problem's tasks at once
        self._data_epochs: List[List[int]] = []
        self._loader_origin = "the train_data_loader= argument"
        self._logger = get_logger()
        self.last_hypergradient_info: Dict[str, Any] = {}

    # ----- graph (set by the Engine) -----
    @property
    def parents(self) -> List["Problem"]:
        return self._parents

    @property
    def children(self) -> List["Problem"]:
        return self._children

    @property
    def paths(self) -> List[List["Problem"]]:
        return self._paths

    @property
    def count(self) -> int:
        """Local steps taken."""
        return self.schedule.count

    # Betty's names for the schedule's state, which Betty programs read (``self._global_step``).

    @property
    def gas(self) -> int:
        return self.config.gradient_accumulation

    def add_parent(self, problem: "Problem") -> None:
        if problem not in self._parents:
            self._parents.append(problem)

    def add_child(self, problem: "Problem") -> None:
        if problem not in self._children:
            self._children.append(problem)
            self.schedule.reset_ready(len(self._children))

    def add_paths(self, paths: List[List["Problem"]]) -> None:
        """Betty's: paths from this problem through lower problems back to it, for the hypergradient."""
        self._paths.extend(paths)

    @contextlib.contextmanager
    def using_paths(self, paths: List[List["Problem"]]):
        """The hypergradient's paths replaced inside the block (the Engine's batched siblings: T paths as one)."""
        saved, self._paths = self._paths, paths
        try:
            yield
        finally:
            self._paths = saved

    # ----- set-up -----
    def initialize(self, engine) -> None:
        """Called once by the Engine: device, configure_* hooks, scaler."""
        self.engine = engine
        self.schedule.config = self.config
        # Betty: roll-back applies to the problems with parents
        self.schedule.roll_back = bool(engine.config.roll_back) and bool(self._parents)
        self.device = self._device_arg if self._device_arg is not None else engine.device
        self.train_data_loader = self._configured("train_data_loader", self.configure_train_data_loader)
        if self.train_data_loader is not None:
            self.train_data_loader = engine.strategy.shard_loaders(self.train_data_loader)
        self.module = self._configured("module", self.configure_module)
        if self.module is None:
            raise ValueError(f'problem "{self.name}" has no module: pass module= or override configure_module()')
        self.module.to(self.device)
        self.optimizer = self._configured("optimizer", self.configure_optimizer)
        if self.optimizer is None and self.trainable_parameters():
            raise ValueError(f'problem "{self.name}" has no optimizer: pass optimizer= or override configure_optimizer()')
        self._use_param_groups()
        self.scheduler = self._configured("scheduler", self.configure_scheduler)
        if self.config.precision == "fp16":
            self.scaler = torch.amp.GradScaler(
                torch.device(self.device).type,
                init_scale=self.config.initial_dynamic_scale,
                growth_factor=self.config.scale_factor,
            )
        self.schedule.reset_ready(len(self._children))
        # Betty 0.2 starts the loaders here, at set-up (a DataLoader draws its seed from torch's RNG when
        # it starts), so a seeded program sees Betty's batches
        if self.train_data_loader is not None:
            self._start_loaders(self._loaders())

    # ----- user-facing -----
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def training_step(self, batch):
        """This level's loss on ``batch`` (what ``get_batch`` returned): a scalar tensor, or a dict
        with a scalar tensor ``"loss"`` and other metrics to log. Override it. ``self.module`` is
        this level's network at its current parameters, ``self.<name>`` any other problem; under
        the Engine's task batching it runs once per task with that task's weights."""
        raise NotImplementedError(
            f'problem "{self.name}" ({type(self).__name__}) must define training_step(batch) '
            'returning a loss tensor or a dict with "loss"'
        )

    def on_inner_loop_start(self) -> None:
        """Called before the first local step of each inner loop (every ``unroll_steps x
        gradient_accumulation`` steps). The tutorial resets the lower problem here:
        ``self.module.load_state_dict(self.upper.module.state_dict())``. A hook that sets the whole
        module makes the inner loops independent tasks, which the Engine batches."""

    def start_inner_loop(self) -> None:
        self.on_inner_loop_start()

    def grad_callback(self, params: Sequence[Tensor]) -> None:
        """Written with ``params``: called with the complete gradients before clipping, on each
        accumulation boundary. Written without (Betty 0.2's ``grad_callback(self)``): called after
        every backward, as Betty 0.2 calls it."""

    def param_callback(self, params: Sequence[Tensor]) -> None:
        """After each optimizer step, with the parameters when written with ``params`` (Betty 0.1.1),
        without them when written without (Betty 0.2)."""

    def parameters(self) -> List[Tensor]:
        return list(self.module.parameters())

    @property
    def functional_module(self) -> nn.Module:
        """The module whose parameters ``functional_call`` replaces with a task's weights."""
        return self.module

    def trainable_parameters(self) -> List[Tensor]:
        if self.task_batch is not None and self.task_batch.running:
            return list(self.task_batch.phi)  # every task's weights, [T, *shape], for the hypergradient
        return [p for p in self.module.parameters() if p.requires_grad]

    def meta_trainable_parameters(self) -> List[Tensor]:
        """Betty 0.2's: what an upper problem's gradient is taken against and darts perturbs."""
        return self.trainable_parameters()

    def train(self) -> None:
        """Training mode: local steps count and unroll into the parents; the module in train()."""
        self.schedule.training = True
        self.module.train()

    def eval(self) -> None:
        """Evaluation mode: steps neither count nor step the parents; the module in eval()."""
        self.schedule.training = False
        self.module.eval()

    def state_dict(self) -> dict:
        state = {"module": self.module.state_dict(), **self.schedule.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.schedule.load_state_dict(state)
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    # ----- one local step -----
    def loss_for_hypergradient(self) -> Tensor:
        """This problem's loss on its last batch at its current parameters."""
        if self.task_batch is not None and self.task_batch.running:
            return self.task_batch.lower_loss_vector().sum()
        if self.cur_batch is None:
            raise RuntimeError(f'problem "{self.name}" has taken no step yet, so it has no loss to differentiate')
        loss, _ = self.parse_loss(self.training_step_exec(self.cur_batch))
        return loss.float()

    def get_loss(self, batch):
        loss, metrics = self.parse_loss(self.training_step_exec(batch))
        value = loss.item()  # Betty logs every loss; the same sync catches non-finite values
        if not math.isfinite(value):
            raise FloatingPointError(
                f'problem "{self.name}": training_step returned a non-finite loss ({value}) '
                f"at local step {self.schedule.count} (global step {self.schedule.global_step})"
            )
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss = loss / self.gas
        return loss, {"loss": value, **metrics}

    def set_grads(self, params: Sequence[Tensor], grads: Sequence[Optional[Tensor]]) -> None:
        for param, grad in zip(params, grads):
            if grad is None:
                continue
            grad = grad.detach()
            if param.grad is None:
                param.grad = grad.clone() if grad.dtype == param.dtype else grad.to(param.dtype)
            else:
                param.grad.add_(grad.to(param.grad.dtype))

    def backward(self, loss: Tensor) -> None:
        """Direct gradient of this problem's loss, plus, for every path to a
        lower problem, the hypergradient through it (the lower's Config.type)."""
        from ..hypergradient import get_grads

        params = self.trainable_parameters()
        # An IterativeProblem below keeps its updates in the graph, so the direct
        # gradient already goes through it.
        paths = [path for path in self._paths if not getattr(path[1], "differentiable_updates", False)]
        try:
            grads = torch.autograd.grad(
                loss,
                params,
                retain_graph=bool(paths) or self.config.retain_graph,
                create_graph=not self.config.first_order,
                allow_unused=self.config.allow_unused,
            )
        except RuntimeError as error:
            raise RuntimeError(f'problem "{self.name}": computing the gradient of its loss failed: {error}') from error
        self.set_grads(params, grads)
        for i, path in enumerate(paths):
            retain = i < len(paths) - 1 or self.config.retain_graph
            self.set_grads(params, get_grads(loss, path, retain_graph=retain))
        if params and all(p.grad is None for p in params) and not getattr(self, "_warned_no_grad", False):
            self._warned_no_grad = True
            warnings.warn(f'problem "{self.name}": none of its parameters received a gradient, so its optimizer '
                          f"steps nothing: {self._why_no_gradient()}", RuntimeWarning, stacklevel=2)

    def _why_no_gradient(self) -> str:
        """The likely cause, read from the dependency graph, for the warning above."""
        reached = {id(path[1]) for path in self._paths}
        missing = [child.name for child in self._children if id(child) not in reached]
        if missing:
            names = ", ".join(f'"{name}"' for name in missing)
            return (f"no dependencies['u2l'] entry makes it differentiate through its lower problem(s) {names}, so "
                    "no hypergradient reaches it; add them, e.g. dependencies={'u2l': {upper: [lower]}, 'l2u': "
                    "{lower: [upper]}}")
        if any(getattr(child, "differentiable_updates", False) for child in self._children):
            return ("its loss reaches them through no kept graph. An IterativeProblem below that starts from a "
                    "load_state_dict copy under Config(first_order=True) drops the only path, the proximal term's "
                    "mixed derivative; use Config(first_order=False), or start_from(self.upper.parameters())")
        return "its loss does not depend on them through any kept graph (is the loss computed from .detach()ed values?)"

    def zero_grad(self) -> None:
        for param in self.trainable_parameters():
            param.grad = None

    def optimizer_step(self) -> None:
        params = self.trainable_parameters()
        if self.engine is not None:
            self.engine.strategy.reduce_gradients(params)  # data parallel: the mean over the ranks
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if takes_argument(self.grad_callback):
            self.grad_callback(params)
        if self.config.gradient_clipping > 0:
            torch.nn.utils.clip_grad_norm_(params, self.config.gradient_clipping)
        if self.engine is not None:
            self.engine.strategy.before_step(self)  # fsdp: the gradients' shards onto the sharded parameters
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.engine is not None:
            self.engine.strategy.after_step(self)

    def one_step_descent(self, batch=None) -> dict:
        """One local step on ``batch`` (default: the next from ``get_batch``): loss, gradient, and on
        the accumulation boundary the optimizer step."""
        if batch is None:
            batch = self.get_batch()
        self.cur_batch = batch
        loss, stats = self.get_loss(batch)
        self.backward(loss)
        if not takes_argument(self.grad_callback):
            self.grad_callback()
        if self.schedule.accumulation_boundary():
            self.optimizer_step()
            call_hook(self.param_callback, self.trainable_parameters())
            if self.engine is not None:
                self.engine.strategy.at_rest(self)  # fsdp: what param_callback changed, into the shards
            self.zero_grad()
        return stats

    def check_ready(self) -> bool:
        return self.schedule.all_ready()

    def set_optimizer(self, optimizer) -> None:
        """Betty 0.2's: a new optimizer; the scheduler, if any, steps its learning rate."""
        self.optimizer = optimizer
        if self.scheduler is not None:
            self.scheduler.optimizer = optimizer

    def is_rank_zero(self) -> bool:
        return self.engine is None or self.engine.is_rank_zero()

    def log(self, stats: dict, global_step: Optional[int]) -> None:
        if not self.is_rank_zero():
            return
        count = self.schedule.count
        where = f"[Local Step {count}]" if global_step is None else f"[Global Step {global_step}] [Local Step {count}]"
        self._logger.info(f'[Problem "{self.name}"] {where} {format_stats(stats)}')
        if self.engine is not None:
            step = count if self.config.log_local_step or global_step is None else global_step
            self.engine.logger.log(stats, tag=self.name, step=step)

    def begin_local_step(self, global_step: Optional[int]) -> int:
        """Records the global step, starts an inner loop when one is due (``on_inner_loop_start``,
        then the roll-back cache) and counts the step; returns the count."""
        if self.schedule.begin(global_step):
            self.start_inner_loop()
            if self.schedule.roll_back:
                self.cache_states()
        return self.schedule.advance()

    def step_scheduler(self) -> None:
        if self.scheduler is None:
            return
        with warnings.catch_warnings():
            # Betty steps the scheduler every local step, also between the
            # accumulation boundaries where the optimizer does not step.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()

    def step_parents(self, global_step: Optional[int]) -> None:
        """This problem has unrolled: each parent marks it ready and steps."""
        for parent in self._parents:
            parent.schedule.mark_ready(parent.children.index(self))
            parent.step_normal(global_step=global_step)
        self.schedule.end_inner_loop()

    def step_normal(self, global_step: Optional[int] = None) -> None:
        if not self.check_ready():
            return
        self.begin_local_step(global_step)
        stats = self.one_step_descent()
        if not self.schedule.roll_back:  # with roll-back the scheduler steps after it (step_after_roll_back)
            self.step_scheduler()
        if self.schedule.logs():
            self.log(stats, global_step)
        if self.schedule.unrolled():
            self.step_parents(global_step)
        self.schedule.reset_ready(len(self._children))

    # ----- roll-back (EngineConfig(roll_back=True)): Betty's warm start -----

    def step(self, global_step: Optional[int] = None) -> None:
        """One local step (data, loss, gradient, update); then the parents' step
        when this problem has unrolled ``unroll_steps * gradient_accumulation``."""
        self.schedule.global_step = global_step
        batcher = getattr(self.engine, "task_batcher", None)
        if batcher is not None and batcher.records(self):
            batcher.lower_step(global_step, self)  # recorded; the Engine runs the meta-batch's tasks at once
            return
        self.step_normal(global_step=global_step)
        if self.schedule.roll_back and self.schedule.unrolled():
            self.step_after_roll_back()

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name="{self.name}")'
