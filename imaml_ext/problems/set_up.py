"""A problem's module, optimizer, scheduler and loader as the Engine sets them up: the
constructor's argument or, when None, the ``configure_*`` hook's, checked for its kind."""

from __future__ import annotations

from torch import Tensor, nn

from .data import describe


class SetUp:
    """``Problem``'s ``configure_*`` hooks and the checks of what they give."""

    _EXPECTED = {
        "module": "a torch.nn.Module",
        "optimizer": "a torch optimizer (with step() and param_groups)",
        "scheduler": "a learning-rate scheduler (with step())",
        "train_data_loader": "an iterable of batches (a DataLoader, a list of batches) or a tuple of them",
    }

    def _configured(self, what: str, hook):
        """The constructor's ``what`` or, when None, ``hook()``'s, checked for its kind."""
        value, where = getattr(self, what), f"the {what}= argument"
        if value is None:
            value, where = hook(), f"configure_{what}()"
        if what == "train_data_loader":
            self._loader_origin = where
        if value is None or self._is_kind(what, value):
            return value
        raise TypeError(
            f'problem "{self.name}": {where} must give {self._EXPECTED[what]}; got {describe(value)}'
        )

    def _use_param_groups(self) -> None:
        """Betty 0.2's ``param_groups()`` (its patch_optimizer): where a problem defines it, the
        optimizer is rebuilt, its class and defaults, over the groups it returns, before the
        scheduler is set up, so ``configure_scheduler()`` sees the rebuilt optimizer."""
        if not callable(getattr(type(self), "param_groups", None)) or self.optimizer is None:
            return
        if self.scheduler is not None:
            raise ValueError(f'problem "{self.name}": param_groups() rebuilds the optimizer, and the scheduler= '
                             "argument was built on the one it replaces; build the scheduler in "
                             "configure_scheduler(), which sees the rebuilt optimizer")
        kind = type(self.optimizer)
        try:
            self.optimizer = kind(self.param_groups(), **self.optimizer.defaults)
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f'problem "{self.name}": param_groups() must give what {kind.__name__} takes as its '
                             f'params (parameters, or dicts with "params"); {kind.__name__} said: {error!r}') from None

    @staticmethod
    def _is_kind(what: str, value) -> bool:
        if what == "module":
            return isinstance(value, nn.Module)
        if what == "optimizer":
            return callable(getattr(value, "step", None)) and hasattr(value, "param_groups")
        if what == "scheduler":
            return callable(getattr(value, "step", None)) and not hasattr(value, "param_groups")
        loaders = value if isinstance(value, tuple) else (value,)
        return len(loaders) > 0 and all(
            hasattr(loader, "__iter__") and not isinstance(loader, (str, bytes, dict, Tensor, nn.Module))
            for loader in loaders
        )

    def configure_module(self):
        return None

    def configure_optimizer(self):
        return None

    def configure_scheduler(self):
        return None

    def configure_train_data_loader(self):
        return None


__all__ = ["SetUp"]
