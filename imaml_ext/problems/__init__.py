"""Problems: the levels of a multilevel optimisation (Betty's layout)."""

from .implicit_problem import ImplicitProblem
from .betty_names import HigherIterativeProblem, MetaIterativeProblem
from .iterative_problem import IterativeProblem
from .problem import Problem

__all__ = ["Problem", "ImplicitProblem", "IterativeProblem", "HigherIterativeProblem", "MetaIterativeProblem"]
