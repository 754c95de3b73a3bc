"""imaml_ext: implicit MAML for PyTorch with fused C++/CUDA kernels and a
Betty-compatible multilevel API (Env, ImplicitProblem, IterativeProblem,
Engine, Config, EngineConfig)."""

from . import ops
from .batched import IMAML, MAML, MetaStepResult, TaskBatchedModule
from .configs import Config, EngineConfig
from .engine import Engine
from .envs import Env
from .problems import ImplicitProblem, IterativeProblem, Problem

__version__ = "0.1.0"

__all__ = [
    "ops",
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
