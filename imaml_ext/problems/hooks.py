"""User hooks called as the user wrote them: Betty 0.1.1 passes the parameters to
``param_callback(params)``, Betty 0.2 calls ``param_callback()`` and ``grad_callback()`` with none."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def takes_argument(hook: Callable) -> bool:
    """Whether a (bound) hook accepts one positional argument (``*args`` included)."""
    function = getattr(hook, "__func__", hook)
    return _takes_argument(function, hasattr(hook, "__func__"))


@functools.lru_cache(maxsize=None)
def _takes_argument(function: Callable, bound: bool) -> bool:
    # asked every local step: inspect.signature once per function, not per step
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: call it as the library does
        return True
    if bound:
        parameters = parameters[1:]  # self
    return any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in parameters) or any(
        p.kind in _POSITIONAL for p in parameters)


def call_hook(hook: Callable, argument: Any) -> Any:
    """``hook(argument)`` where the hook takes one, else ``hook()``."""
    return hook(argument) if takes_argument(hook) else hook()


__all__ = ["call_hook", "takes_argument"]
