"""``ImplicitProblem``: a level whose parameters are updated in place by its
optimizer; its parents see it through implicit differentiation (the
hypergradient method named by its ``Config.type``)."""

from __future__ import annotations

from .problem import Problem


class ImplicitProblem(Problem):
    """A Betty ``ImplicitProblem``: no graph is kept across its steps; at its
    parents' step the best-response Jacobian is applied by cg, neumann or darts."""

    #: hypergradients whose CG solve broke down on some task (Config(type="cg")): 0 until one does.
    cg_breakdowns: int = 0


__all__ = ["ImplicitProblem"]
