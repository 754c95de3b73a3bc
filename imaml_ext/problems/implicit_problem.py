"""``ImplicitProblem``: a level whose parameters are updated in place by its
optimizer; its parents see it through implicit differentiation (the
hypergradient method named by its ``Config.type``)."""

from __future__ import annotations

from .problem import Problem


class ImplicitProblem(Problem):
    """A Betty ``ImplicitProblem``: no graph is kept across its steps; at its
    parents' step the best-response Jacobian is applied by cg, neumann or darts."""


__all__ = ["ImplicitProblem"]
