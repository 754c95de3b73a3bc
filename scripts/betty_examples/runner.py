"""Runs one of Betty's example programs: ``runner.py LIBRARY PROGRAM [ARG ...]`` in the program's folder.

Seeds Python, numpy and torch with BETTY_EXAMPLES_SEED, installs ``fakes``, and records the loss
that each problem's ``training_step`` returned last (a ``Problem.__init_subclass__`` hook of the
library, so the program is unchanged); at exit it prints ``FINAL_LOSS <problem> <value>`` and
``LOSSES <problem> <value>,<value>,...`` (every call's, in order) lines.
A loss computed under a torch.func transform (imaml_ext's batched tasks) is not read, so that the
hook does not change which path imaml_ext takes.
"""

import atexit
import functools
import importlib
import os
import random
import runpy
import sys
from pathlib import Path

import numpy
import torch

import fakes

library, program, *arguments = sys.argv[1:]
seed = int(os.environ.get("BETTY_EXAMPLES_SEED", "0"))
random.seed(seed)
numpy.random.seed(seed)
torch.manual_seed(seed)
fakes.install(l2l="learn2learn" in Path(program).read_text())

history = {}


def record(step):
    @functools.wraps(step)
    def training_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        loss = out.get("loss") if isinstance(out, dict) else out
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 \
                and not torch._C._functorch.is_functorch_wrapped_tensor(loss):
            history.setdefault(str(getattr(self, "name", type(self).__name__)), []).append(loss.detach())
        return out

    return training_step


base = importlib.import_module(library + ".problems").Problem


def hook(cls, **kwargs):
    super(base, cls).__init_subclass__(**kwargs)
    if "training_step" in cls.__dict__:
        cls.training_step = record(cls.__dict__["training_step"])


base.__init_subclass__ = classmethod(hook)


@atexit.register
def report():
    for name, losses in history.items():
        print(f"FINAL_LOSS {name} {float(losses[-1]):.6g}", flush=True)
        print(f"LOSSES {name} " + ",".join(f"{float(loss):.7g}" for loss in losses), flush=True)


sys.argv = [program, *arguments]
sys.path.insert(0, str(Path(program).resolve().parent))
runpy.run_path(program, run_name="__main__")
