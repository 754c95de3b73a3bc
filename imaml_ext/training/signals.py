"""SIGTERM and SIGINT: the run ends after the current meta-step, with a checkpoint."""

from __future__ import annotations

import signal
from typing import Optional


class StopSignal:
    """SIGTERM / SIGINT end the run after the current meta-step, with a checkpoint."""

    def __init__(self):
        self.received: Optional[int] = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)



class Interrupted(Exception):
    """Ctrl-C outside the meta-steps (or a second one): what it left, printed as one line; the exit
    status is the shell's 128 + SIGINT."""
