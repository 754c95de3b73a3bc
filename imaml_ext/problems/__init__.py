"""Problems: the levels of a multilevel optimisation (Betty's layout)."""

from .implicit_problem import ImplicitProblem
from .iterative_problem import HigherIterativeProblem, IterativeProblem, MetaIterativeProblem
from .problem import Problem

__all__ = ["Problem", "ImplicitProblem", "IterativeProblem", "HigherIterativeProblem", "MetaIterativeProblem"]
