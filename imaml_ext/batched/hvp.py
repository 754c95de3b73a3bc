"""The Hessian-vector products behind IMAML's CG solve: H_t v_t for every task t at once, H_t the
Hessian of task t's support loss at phi_t, two ways that give the same products:

- "reverse" (double backward): the support gradient's graph is built once per solve, with
  ``create_graph``, and each product is one backward through it. The graph is kept for the
  whole solve.
- "forward" (forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``): each product
  is one forward and one backward pass carrying tangents, and no graph outlives a product.

Which is faster depends on the device, the model and the number of CG iterations: "forward"
builds nothing up front but pays more per product (on a 2-core CPU it made the paper's
meta-step 3-22 % slower, benchmarks/results/meta_step-issue17-cpu-2cores-2026-11-30.md; with
the fused BatchNorm op's compiled double backward, a solve's five "reverse" products were
predicted at 0.80 s against "forward"'s 2.62 s at T = 16,
benchmarks/results/meta_step-double-backward-cpu-2cores-2026-11-30.md). ``choose`` times both
once per key (batched/choice.py), as ``torch.backends.cudnn.benchmark`` times convolution algorithms.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.func import grad, jvp

from .choice import choose as choice_of
from .timing import device_clock

HVPS = ("auto", "reverse", "forward")

# losses(phi, fresh_buffers) -> (the [T] support losses at phi, the buffers the forward used). With
# fresh_buffers, the forward runs on a copy of the module's buffers (e.g. running BatchNorm
# statistics) and changes no state; without, on the module's own.
Losses = Callable[[List[Tensor], bool], Tuple[Tensor, Dict[str, Tensor]]]


def load_jvp_decompositions() -> None:
    """torch loads its forward-AD decompositions at the first forward-mode product
    (torch.autograd.forward_ad, under the same condition as here), scripting them with
    torch.jit.script, which warns at every run that it is deprecated: a warning about torch's own
    code that no user can act on. Loaded here with only that warning ignored; nothing of ours is
    scripted."""
    loaded = "torch._decomp.decompositions_for_jvp" in sys.modules
    if loaded or os.environ.get("PYTORCH_JIT", "1") != "1" or not __debug__:
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        importlib.import_module("torch._decomp.decompositions_for_jvp")


class SupportHVP:
    """``hvp(vectors)`` for ``ops.cg_solve``, and ``losses``: the [T] support losses at phi
    (known once the first product has run, for "forward").

    Buffers change as under one support forward at phi: "reverse" runs it on the module's
    buffers; "forward" (whose transforms cannot mutate captured tensors) runs every product on
    a copy and hands the first product's copy to ``keep_buffers``."""

    def __init__(self, mode: str, losses: Losses, phi: Sequence[Tensor],
                 keep_buffers: Optional[Callable[[Dict[str, Tensor]], None]] = None):
        if mode not in ("reverse", "forward"):
            raise ValueError(f"SupportHVP: mode must be 'reverse' or 'forward'; got {mode!r}")
        self.mode = mode
        self.losses: Optional[Tensor] = None
        if mode == "reverse":
            self._phi = [p.detach().requires_grad_(True) for p in phi]
            with torch.enable_grad():
                losses_at_phi, _ = losses(self._phi, False)
                self._grads = torch.autograd.grad(losses_at_phi.sum(), self._phi, create_graph=True)
            self.losses = losses_at_phi.detach()
        else:
            load_jvp_decompositions()
            self._phi = tuple(p.detach() for p in phi)
            self._keep_buffers = keep_buffers
            self._calls = 0

            def total(params):
                per_task, buffers = losses(list(params), True)
                return per_task.sum(), (per_task, buffers)

            self._grad = grad(total, has_aux=True)

    def __call__(self, vectors: List[Tensor]) -> List[Tensor]:
        if self.mode == "reverse":
            out = torch.autograd.grad(self._grads, self._phi, grad_outputs=vectors, retain_graph=True)
            return [h.detach() for h in out]
        try:
            _, products, (per_task, buffers) = jvp(self._grad, (self._phi,), (tuple(vectors),), has_aux=True)
        except RuntimeError as error:
            if "saved tensor hooks" in str(error):
                raise RuntimeError(
                    "IMAML: hvp='forward' runs torch.func.jvp of torch.func.grad, which cannot run while "
                    "saved-tensor hooks are active (e.g. torch.autograd.graph.save_on_cpu); use hvp='reverse' "
                    f"there ({error})"
                ) from error
            if "should be the same" in str(error) and ("BFloat16" in str(error) or "Half" in str(error)):
                # torch 2.14's forward-mode convolution derivative under autocast mixes the dtypes
                # (vmap's grouped convolution does not).
                raise RuntimeError(
                    "IMAML: hvp='forward' under autocast (precision='bf16') fails in this torch's forward-mode "
                    "derivative of a dense convolution; use hvp='reverse', or forward='vmap' "
                    f"({str(error).splitlines()[0]})"
                ) from error
            raise
        if self._calls == 0:
            self.losses = per_task.detach()
            if self._keep_buffers is not None and buffers:
                self._keep_buffers(buffers)
        self._calls += 1
        return list(products)


def choose(losses: Losses, phi: Sequence[Tensor], products: int) -> Dict[str, object]:
    """``choice.choose`` between "reverse" and "forward", each measured as its setup (building its
    graph) plus ``products`` times one product: ``{"hvp": mode, "ms": {mode: predicted solve ms}}``, and
    ``"refused": {mode: cause}`` for a mode that could not run here. Only fresh buffers are used and
    the RNG state is restored, so the timing changes nothing."""
    device = phi[0].device
    now = device_clock(device)
    vectors = [p.detach().clone() for p in phi]

    def fresh(params, _first):
        return losses(params, True)

    def predicted_solve(mode: str) -> float:
        start = now()
        hvp = SupportHVP(mode, fresh, phi)
        built = now()
        hvp(vectors)  # a RuntimeError here (e.g. under the caller's saved-tensor hooks) leaves the mode out
        return (built - start) + products * (now() - built)

    choice = choice_of("hvp", ("reverse", "forward"), predicted_solve, device)
    if "refused" in choice:
        causes = "; ".join(f"{mode}: {cause}" for mode, cause in choice["refused"].items())
        warnings.warn(f"hvp='auto' left out {causes}; it keeps {choice['hvp']!r}", RuntimeWarning, stacklevel=5)
    return choice


__all__ = ["HVPS", "SupportHVP", "choose"]
