"""Betty 0.1.1's other names for an iterative problem, so that its programs import unchanged."""

from __future__ import annotations

from .iterative_problem import IterativeProblem


class HigherIterativeProblem(IterativeProblem):
    """Betty 0.1.1's ``IterativeProblem`` on the ``higher`` library: the same
    contract (a parent differentiates through the unrolled updates), run here by
    ``IterativeProblem``; no ``higher`` needed."""


class MetaIterativeProblem(IterativeProblem):
    """Betty 0.1.1's ``IterativeProblem`` on its own ``MetaModule``: the same
    contract, run here by ``IterativeProblem``."""


__all__ = ["HigherIterativeProblem", "MetaIterativeProblem"]
