"""imaml_ext: implicit MAML for PyTorch with fused C++/CUDA kernels and a
Betty-compatible multilevel API (Env, ImplicitProblem, IterativeProblem,
Engine, Config, EngineConfig)."""

from . import data, models, ops
from .batched import IMAML, MAML, BatchedModule, MetaStepResult, TaskBatchedModule, task_cross_entropy
from .configs import Config, EngineConfig
from .engine import Engine
from .envs import Env
from .models import Conv4
from .problems import ImplicitProblem, IterativeProblem, Problem

__version__ = "0.1.0"

__all__ = [
    "ops",
    "data",
    "models",
    "Conv4",
    "BatchedModule",
    "task_cross_entropy",
    "IMAML",
    "MAML",
    "MetaStepResult",
    "TaskBatchedModule",
    "Config",
    "EngineConfig",
    "Engine",
    "Env",
    "Problem",
    "ImplicitProblem",
    "IterativeProblem",
    "__version__",
]
