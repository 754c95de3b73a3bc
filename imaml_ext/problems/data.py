"""Where a problem's batches come from: its loaders (Betty's rule: only a tuple is several),
started at set-up, each restarted when it runs out, and what ``get_batch`` gives."""

from __future__ import annotations

import contextlib
from typing import Any

from torch import Tensor


def to_device(batch: Any, device) -> Any:
    """Moves the tensors of a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def describe(value: Any) -> str:
    """What came, for an error message: its type and a short repr."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"


class BatchSource:
    """``Problem``'s data: its ``train_data_loader`` read batch by batch."""

    def _loaders(self) -> tuple:
        """Betty's rule: only a tuple is several loaders."""
        loaders = self.train_data_loader
        return loaders if isinstance(loaders, tuple) else (loaders,)

    def _start_loaders(self, loaders: tuple) -> None:
        self._data_iterators = [iter(loader) for loader in loaders]
        self._data_epochs = [[0, 0] for _ in loaders]  # per loader: epochs ended, batches this epoch

    def get_batch(self):
        """The next batch of ``train_data_loader`` (a tuple of loaders: a tuple of batches), moved to
        this problem's device; each loader restarts when it runs out (``on_epoch_end`` for the
        first). Override it to read data elsewhere, e.g. ``self.env.batch["train"]`` as the tutorial does."""
        loaders = self.train_data_loader
        if loaders is None:
            raise ValueError(
                f'problem "{self.name}" has no train_data_loader: pass one (or a tuple of them) or override get_batch()'
            )
        single = not isinstance(loaders, tuple)
        loaders = self._loaders()
        if self._data_iterators is None or len(self._data_iterators) != len(loaders):
            self._start_loaders(loaders)  # a loader set after set-up
        batches = []
        for i, loader in enumerate(loaders):
            batch = self._next_batch(i, loader, "train_data_loader" if single else f"train_data_loader[{i}]")
            batches.append(to_device(batch, self.device))
        return batches[0] if single else tuple(batches)

    def _next_batch(self, i: int, loader, which: str):
        counts = self._data_epochs[i]
        for _ in range(2):
            try:
                batch = next(self._data_iterators[i])
            except StopIteration:
                if counts[1] == 0:
                    hint = "" if counts[0] == 0 else (
                        f" in epoch {counts[0] + 1}, after batches in the ones before: a one-shot iterator or "
                        "generator cannot start again; pass a list of batches or a DataLoader"
                    )
                    raise ValueError(
                        f'problem "{self.name}": {which} (from {self._loader_origin}: {describe(loader)}) '
                        f"yielded no batch{hint}"
                    ) from None
                if i == 0:
                    self.on_epoch_end()
                    self.epoch_callback()
                counts[0], counts[1] = counts[0] + 1, 0
                self._data_iterators[i] = iter(loader)
                continue
            counts[1] += 1
            return batch

    def set_train_data_loader(self, loader) -> None:
        """Betty 0.2's: a new loader (or a tuple of them), started now."""
        self.train_data_loader = loader
        self._start_loaders(self._loaders())

    @contextlib.contextmanager
    def feeding(self, batch):
        """``get_batch()`` gives ``batch`` inside the block: a recorded step replayed as it was."""
        self.get_batch = lambda: batch
        try:
            yield
        finally:
            del self.get_batch

    def on_epoch_end(self) -> None:
        """Called by get_batch when the first (or only) loader has run out, before it starts again."""

    def epoch_callback(self) -> None:
        """Betty 0.2's name of ``on_epoch_end``; both are called."""


__all__ = ["BatchSource", "describe", "to_device"]
