"""The ``Engine``: builds the dependency graph of the problems and runs them
as Betty does (``train_step`` each global step, ``validation`` every
``valid_step`` steps)."""

from __future__ import annotations

import collections
import math
import warnings
from typing import Dict, Iterable, List, Optional

import torch

from .configs import EngineConfig
from .envs import Env
from .logging import format_stats, get_logger, make_logger
from .problems.problem import Problem
from .strategies import make_strategy


class Engine:
    """``Engine(problems, config=None, dependencies={"u2l": {...}, "l2u": {...}}, env=None)``.

    ``l2u`` maps a lower problem to the problems it steps after unrolling (its
    parents); ``u2l`` maps an upper problem to the lower problems whose
    best-response Jacobian its gradient goes through. Every problem and the
    env become attributes, by name, of the engine, of every other problem and
    of the env (``self.lower`` inside a problem, ``engine.upper``).
    """

    _RESERVED = frozenset(
        {"problems", "config", "env", "logger", "device", "leaves", "dependencies", "global_step",
         "train_iters", "valid_step", "task_batching", "task_batcher"}
    )

    def __init__(
        self,
        problems: Iterable[Problem],
        config: Optional[EngineConfig] = None,
        dependencies: Optional[Dict[str, dict]] = None,
        env: Optional[Env] = None,
    ):
        if config is None:
            config = EngineConfig()
        if not isinstance(config, EngineConfig):
            raise TypeError(f"Engine: config must be an imaml_ext EngineConfig; got {type(config).__name__}")
        self.config = config
        self.train_iters = config.train_iters
        self.valid_step = config.valid_step
        self.global_step = 0
        self.env = env
        self.logger = None
        self._stopped = False
        self._best_metric = None
        self._bad_validations = 0

        self.problems: List[Problem] = self._check_problems(problems)
        if env is not None and not isinstance(env, Env):
            raise TypeError(f"Engine: env must be an imaml_ext Env (or None); got {type(env).__name__}")
        self.dependencies = self._check_dependencies(dependencies)
        self.strategy = make_strategy(config)
        if config.device is not None:
            self.device = torch.device(config.device)
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = self.strategy.device(self.device)
        try:
            self._set_up(config)
        except BaseException:
            self.strategy.stop()  # no process group left open behind an error
            raise

    def _set_up(self, config: EngineConfig) -> None:
        self._check_names_against_attributes()
        self._parse_dependencies()
        self._check_hypergradient_types()
        self._check_strategy()
        self.strategy.start(self.device)  # after every check that needs no process group
        self.logger = make_logger(config.logger_type, config.log_dir)
        self._stdout = get_logger()
        self._set_problem_attributes()
        for problem in self.problems:
            problem.initialize(self)
            self.strategy.prepare(problem)
        if self.env is not None:
            self.env.initialize(self)
        self.task_batcher = None
        self.task_batching = self._plan_task_batching()

    def _check_strategy(self) -> None:
        from .problems.iterative_problem import IterativeProblem

        if self.strategy.world > 1:
            for problem in self.problems:
                if isinstance(problem, IterativeProblem) and problem.parents:
                    raise ValueError(
                        f'EngineConfig(strategy="{self.strategy.name}"): problem "{problem.name}" is an '
                        "IterativeProblem under a parent, whose unrolled updates are not averaged over the ranks; "
                        "run it in one process, or make it an ImplicitProblem")
        if self.strategy.name == "fsdp":
            self._check_fsdp()

    def _check_fsdp(self) -> None:
        """What the sharded module cannot hold (strategies.FullyShardedDataParallel)."""
        from .problems.iterative_problem import IterativeProblem

        cause = None
        for problem in self.problems:
            if cause is None and isinstance(problem, IterativeProblem):
                cause = (f'problem "{problem.name}" is an IterativeProblem, whose steps update its own copies of '
                         'the weights, not the sharded module; make it an ImplicitProblem, or use '
                         'strategy="distributed"')
            if cause is None and problem.config.precision == "fp16":
                cause = (f'problem "{problem.name}" has Config(precision="fp16"), whose loss scaler unscales the '
                         'gradients before they reach the shards; use "bf16" or "fp32", or strategy="distributed"')
        if cause is not None:
            raise ValueError(f'EngineConfig(strategy="fsdp"): {cause}')

    def is_rank_zero(self) -> bool:
        """Betty's: whether this process logs (rank 0, or the only one)."""
        return self.strategy.rank == 0

    def _plan_task_batching(self):
        """engine.task_batching: whether the G inner loops of a meta-step run as one batch."""
        from .task_batching import NotBatchable, SiblingBatcher, TaskBatcher, TaskBatchingInfo, find_pattern

        mode = self.config.task_batching
        info = TaskBatchingInfo(mode=mode)
        if mode == "off":
            info.reason = "EngineConfig(task_batching='off')"
            return info
        try:
            plan = find_pattern(self)
            if self.strategy.name == "fsdp":
                raise NotBatchable('EngineConfig(strategy="fsdp"): the batched inner step reads the lower '
                                   "optimizer's settings by its whole parameters, and under FSDP the optimizer holds "
                                   "their shards", pattern=plan.pattern)
            for problem in self.problems:
                if type(problem).meta_trainable_parameters is not Problem.meta_trainable_parameters:
                    raise NotBatchable(f'problem "{problem.name}" overrides meta_trainable_parameters(), which the '
                                       "batched tasks' stacked weights do not follow", pattern=plan.pattern)
        except NotBatchable as cause:
            info.reason, info.pattern = str(cause), cause.pattern
            if mode == "on":
                raise ValueError(f"EngineConfig(task_batching='on'): {cause}") from None
            if not cause.structural:
                warnings.warn(f"task batching: {cause}; running task by task", RuntimeWarning, stacklevel=3)
            return info
        info.active, info.pattern, info.tasks = True, plan.pattern, plan.tasks
        if plan.pattern == "siblings":
            batcher, lower = SiblingBatcher, plan.lowers
        else:
            batcher, lower = TaskBatcher, plan.lowers[0]
        self.task_batcher = batcher(self, plan.upper, lower, info, self.config.task_batching_forward,
                                     self.config.task_batching_max_tasks)
        return info

    def _flush_tasks(self) -> None:
        """Runs recorded tasks whose meta-step is not complete, task by task."""
        if self.task_batcher is not None:
            self.task_batcher.flush()

    # ----- validation of the arguments -----
    def _check_problems(self, problems) -> List[Problem]:
        if isinstance(problems, Problem) or not isinstance(problems, Iterable):
            raise TypeError(f"Engine: problems must be a list of Problem; got {type(problems).__name__}")
        problems = list(problems)
        if not problems:
            raise ValueError("Engine: problems must hold at least one Problem; got an empty list")
        for i, problem in enumerate(problems):
            if not isinstance(problem, Problem):
                raise TypeError(f"Engine: problems[{i}] must be a Problem; got {type(problem).__name__}")
        self._rename_shared_names(problems)
        names = {}
        for i, problem in enumerate(problems):
            if problem.name in names:
                raise ValueError(
                    f'Engine: two problems are named "{problem.name}" (problems[{names[problem.name]}] and '
                    f"problems[{i}]) after several problems that shared a name were numbered; names must be "
                    "unique, since each becomes an attribute"
                )
            names[problem.name] = i
            if hasattr(type(self), problem.name) or problem.name in self.__dict__ or problem.name in self._RESERVED:
                raise ValueError(
                    f'Engine: problem name "{problem.name}" clashes with the Engine attribute of that name; '
                    "rename the problem"
                )
        return problems

    @staticmethod
    def _rename_shared_names(problems: List[Problem]) -> None:
        """As Betty does: problems that share a name become name_0, name_1, ... in
        the order of ``problems`` (``problem.name`` and the attribute alike)."""
        shared = collections.Counter(problem.name for problem in problems)
        taken: Dict[str, int] = {}
        for problem in problems:
            base = problem.name
            if shared[base] > 1:
                problem.name = f"{base}_{taken.get(base, 0)}"
                taken[base] = taken.get(base, 0) + 1

    def _check_names_against_attributes(self) -> None:
        """A problem becomes an attribute of every other problem and of the env,
        so its name must not hide one of theirs (e.g. a problem called "optimizer")."""
        for problem in self.problems:
            holders = [p for p in self.problems if p is not problem] + ([self.env] if self.env is not None else [])
            for holder in holders:
                if hasattr(holder, problem.name):
                    kind = "env" if holder is self.env else f'problem "{holder.name}"'
                    raise ValueError(
                        f'Engine: problem name "{problem.name}" clashes with the attribute of that name of {kind} '
                        f"({type(holder).__name__}); rename the problem"
                    )

    def _check_dependencies(self, dependencies) -> Dict[str, dict]:
        if dependencies is None:
            dependencies = {}
        if not isinstance(dependencies, dict):
            raise TypeError(f'Engine: dependencies must be a dict with keys "u2l" and "l2u"; got {type(dependencies).__name__}')
        unknown = [k for k in dependencies if k not in ("u2l", "l2u")]
        if unknown:
            raise ValueError(f'Engine: dependencies has unknown key {unknown[0]!r}; valid keys are "u2l" and "l2u"')
        known = {id(p) for p in self.problems}
        for kind in ("u2l", "l2u"):
            mapping = dependencies.get(kind, {})
            if not isinstance(mapping, dict):
                raise TypeError(f"Engine: dependencies[{kind!r}] must be a dict problem -> [problems]; got {type(mapping).__name__}")
            for key, values in mapping.items():
                if isinstance(values, Problem) or not isinstance(values, (list, tuple, set)):
                    raise TypeError(
                        f"Engine: dependencies[{kind!r}][{getattr(key, 'name', key)!r}] must be a list of problems; "
                        f"got {type(values).__name__}"
                    )
                for problem in [key, *values]:
                    if not isinstance(problem, Problem):
                        raise TypeError(f"Engine: dependencies[{kind!r}] holds {problem!r}, which is not a Problem")
                    if id(problem) not in known:
                        raise ValueError(
                            f'Engine: dependencies[{kind!r}] names problem "{problem.name}", which is not in '
                            f"problems ({', '.join(p.name for p in self.problems)}); pass it to the Engine"
                        )
        return {"u2l": dict(dependencies.get("u2l", {})), "l2u": dict(dependencies.get("l2u", {}))}

    # ----- the graph -----
    def _parse_dependencies(self) -> None:
        l2u = self.dependencies["l2u"]
        u2l = self.dependencies["u2l"]
        self._check_acyclic(l2u, "l2u")
        self._check_acyclic(u2l, "u2l")
        for lower, uppers in l2u.items():
            for upper in uppers:
                if upper is lower:
                    raise ValueError(f'Engine: dependencies["l2u"] makes problem "{lower.name}" its own parent')
                lower.add_parent(upper)
                upper.add_child(lower)
        for upper, lowers in u2l.items():
            for lower in lowers:
                paths = self._find_paths(lower, upper, l2u)
                if not paths:
                    raise ValueError(
                        f'Engine: dependencies["u2l"] says "{upper.name}" depends on "{lower.name}", but '
                        f'dependencies["l2u"] has no chain of parents from "{lower.name}" up to "{upper.name}"'
                    )
                for path in paths:
                    upper.add_paths([[upper] + path])
        parents_of_someone = {id(u) for uppers in l2u.values() for u in uppers}
        self.leaves = [p for p in self.problems if id(p) not in parents_of_someone]

    @staticmethod
    def _check_acyclic(mapping: dict, kind: str) -> None:
        state: Dict[int, int] = {}  # 1: on the stack, 2: done

        def visit(node, stack):
            state[id(node)] = 1
            for nxt in mapping.get(node, []):
                if state.get(id(nxt)) == 1:
                    cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                    raise ValueError(
                        f"Engine: dependencies[{kind!r}] has a cycle: " + " -> ".join(p.name for p in cycle)
                    )
                if state.get(id(nxt)) is None:
                    visit(nxt, stack + [nxt])
            state[id(node)] = 2

        for node in mapping:
            if state.get(id(node)) is None:
                visit(node, [node])

    @staticmethod
    def _find_paths(src: Problem, dst: Problem, l2u: dict) -> List[List[Problem]]:
        """Every chain src -> parent -> ... -> dst along l2u."""
        if src is dst:
            return [[dst]]
        paths = []
        for parent in l2u.get(src, []):
            for rest in Engine._find_paths(parent, dst, l2u):
                paths.append([src] + rest)
        return paths

    def _check_hypergradient_types(self) -> None:
        from .problems.iterative_problem import IterativeProblem

        for problem in self.problems:
            if isinstance(problem, IterativeProblem):
                continue
            if problem.config.type == "cg" and problem.children:
                raise ValueError(
                    f'problem "{problem.name}": Config.type="cg" needs a lowest-level problem (no lower problems '
                    f"of its own), since its implicit gradient holds only while its own lower problems are fixed; "
                    f'"{problem.name}" has lower problems {[c.name for c in problem.children]}'
                )
            if problem.config.proximal_lambda is not None:
                if not problem.parents:
                    raise ValueError(
                        f'problem "{problem.name}": Config.proximal_lambda declares a proximal term to a parent, '
                        "but it has no parent in dependencies['l2u']"
                    )
                from .hypergradient.utils import check_proximal_pairing

                for parent in problem.parents:
                    if parent.module is not None and problem.module is not None:
                        check_proximal_pairing(problem, parent)

    def _set_problem_attributes(self) -> None:
        for problem in self.problems:
            setattr(self, problem.name, problem)
            for other in self.problems:
                if other is not problem:
                    setattr(other, problem.name, problem)
            if self.env is not None:
                setattr(self.env, problem.name, problem)
        for problem in self.problems:
            problem.env = self.env

    # ----- running -----
    def train_step(self) -> None:
        """One global step: every leaf problem steps (its parents follow when it
        has unrolled). Override to step an Env first, as the iMAML tutorial does."""
        for leaf in self.leaves:
            leaf.step(global_step=self.global_step)

    def validation(self):
        """Override to return a dict of metrics; called every valid_step steps."""
        return None

    @property
    def do_validation(self) -> bool:
        return type(self).validation is not Engine.validation and self.valid_step > 0

    def train(self) -> None:
        """Every problem in training mode (run() calls it before training and after each validation)."""
        for problem in self.problems:
            problem.train()

    def eval(self) -> None:
        """Every problem in evaluation mode (run() calls it around validation). Tasks recorded for a
        batched meta-step that is not complete run first, task by task."""
        self._flush_tasks()
        for problem in self.problems:
            problem.eval()

    def run(self) -> None:
        """``train_iters`` global steps, validating every ``valid_step``."""
        try:
            self.train()
            for it in range(1, self.train_iters + 1):
                self.global_step += 1
                self.train_step()
                if self.do_validation and it % self.valid_step == 0:
                    self.eval()
                    stats = self.validation()
                    self.train()
                    if stats:
                        self._stdout.info(f"[Validation] [Global Step {self.global_step}] {format_stats(stats)}")
                        self.logger.log(stats, tag="validation", step=self.global_step)
                        if self._early_stop(stats):
                            self._stdout.info(f"[Early Stopping] [Global Step {self.global_step}]")
                            break
            self._flush_tasks()
            self.logger.close()
        finally:
            self.strategy.stop()  # Betty's cleanup: the process group ends with the run, or with its error

    def _early_stop(self, stats: dict) -> bool:
        cfg = self.config
        if not cfg.early_stopping:
            return False
        if cfg.early_stopping_metric not in stats:
            raise KeyError(
                f"EngineConfig.early_stopping_metric={cfg.early_stopping_metric!r} is not among the validation "
                f"metrics {sorted(stats)}"
            )
        value = float(stats[cfg.early_stopping_metric])
        better = self._best_metric is None or (
            value < self._best_metric if cfg.early_stopping_mode == "min" else value > self._best_metric
        )
        if better and not math.isnan(value):
            self._best_metric, self._bad_validations = value, 0
            return False
        self._bad_validations += 1
        return self._bad_validations >= cfg.early_stopping_tolerance


__all__ = ["Engine"]
