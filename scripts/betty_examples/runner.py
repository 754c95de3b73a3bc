"""Runs one of Betty's example programs: ``runner.py LIBRARY PROGRAM [ARG ...]`` in the program's folder.

Seeds Python, numpy and torch with BETTY_EXAMPLES_SEED, installs ``fakes``, and records the loss
that each problem's ``training_step`` returned last (a ``Problem.__init_subclass__`` hook of the
library, so the program is unchanged); at exit it prints ``FINAL_LOSS <problem> <value>``,
``LOSSES <problem> <value>,<value>,...`` (every call's, in order) and ``PARAMS <problem> <digest>
<sum>`` (its module's parameters, in float64: a digest of their bytes, and their sum) lines, and
``RAISED <type>: <message>`` if the program raised. Under torchrun (WORLD_SIZE > 1) each line
starts with ``RANK<r> ``, since the ranks' outputs interleave.
A loss computed under a torch.func transform (imaml_ext's batched tasks) is not read, so that the
hook does not change which path imaml_ext takes.
"""

import atexit
import functools
import hashlib
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
problems = {}
tag = f"RANK{os.environ['RANK']} " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def record(step):
    @functools.wraps(step)
    def training_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        loss = out.get("loss") if isinstance(out, dict) else out
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 \
                and not torch._C._functorch.is_functorch_wrapped_tensor(loss):
            name = str(getattr(self, "name", type(self).__name__))
            history.setdefault(name, []).append(loss.detach())
            problems[name] = self
        return out

    return training_step


base = importlib.import_module(library + ".problems").Problem


def hook(cls, **kwargs):
    super(base, cls).__init_subclass__(**kwargs)
    if "training_step" in cls.__dict__:
        cls.training_step = record(cls.__dict__["training_step"])


base.__init_subclass__ = classmethod(hook)


def parameters(problem) -> str:
    """``<digest> <sum>`` of the problem's parameters; ``sharded`` where a rank holds only its shard
    (a DTensor: gathering it would need the other ranks, which may be gone at exit)."""
    module = getattr(problem, "module", None)
    params = list(module.parameters()) if isinstance(module, torch.nn.Module) else []
    if not params or any(hasattr(p, "to_local") for p in params):
        return "sharded 0" if params else "none 0"
    flat = torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in params])
    return f"{hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]} {float(flat.sum()):.10g}"


def say(line: str, stream=sys.stdout) -> None:
    """One write a line: torchrun's ranks share the pipe and run unbuffered (python -u), where print's
    text and newline are two writes and another rank's line can land between them; a write up to
    PIPE_BUF (4096 bytes) is not split. The newline before ends a line the program left open."""
    stream.write(f"\n{tag}{line}\n")
    stream.flush()


@atexit.register
def report():
    for name, losses in history.items():
        say(f"FINAL_LOSS {name} {float(losses[-1]):.6g}")
        say(f"LOSSES {name} " + ",".join(f"{float(loss):.7g}" for loss in losses))
        say(f"PARAMS {name} {parameters(problems[name])}")


sys.argv = [program, *arguments]
sys.path.insert(0, str(Path(program).resolve().parent))
try:
    runpy.run_path(program, run_name="__main__")
except Exception as error:  # the error's own line, which torchrun's summary of the ranks would bury
    message = str(error).strip().splitlines()
    say(f"RAISED {type(error).__name__}" + (f": {message[0]}" if message else ""), sys.stderr)
    raise
