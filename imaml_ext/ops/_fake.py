"""Fake (meta) kernels, so torch.compile and FakeTensor tracing see the ops.

Every imaml_ext op mutates its arguments in place and returns nothing: the
fake kernel only has to exist.
"""

import torch


@torch.library.register_fake("imaml_ext::prox_sgd_step_")
def _prox_sgd_step_fake(params, grads, anchors, momentum_buffers, lr, lam, momentum, lr_per_task, lam_per_task):
    return None


@torch.library.register_fake("imaml_ext::cg_init_")
def _cg_init_fake(r, scalars, status, counter, tol):
    return None


@torch.library.register_fake("imaml_ext::cg_alpha_")
def _cg_alpha_fake(r, hr, scalars, status, counter, lam, lam_per_task):
    return None


@torch.library.register_fake("imaml_ext::cg_update_")
def _cg_update_fake(x, r, p, s, hr, scalars, status, iterations, counter, lam, lam_per_task, tol):
    return None
