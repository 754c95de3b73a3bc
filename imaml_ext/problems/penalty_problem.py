"""Betty 0.2's ``betty.problems.penalty_problem.PenaltyProblem``, at the same path (Betty does
not export it from ``betty.problems`` either)."""

from __future__ import annotations

from .implicit_problem import ImplicitProblem


class PenaltyProblem(ImplicitProblem):
    """Betty 0.2's ``PenaltyProblem`` is a copy of its ``ImplicitProblem`` (constructor, optimizer
    step, roll-back cache) less the "sama" bookkeeping (penalty_problem.py:13-82), which imaml_ext
    does not have: here it is an ``ImplicitProblem``."""


__all__ = ["PenaltyProblem"]
