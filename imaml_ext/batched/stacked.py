"""The "stacked" forwards' vmap batching rules: convolutions, BatchNorm and max-pooling run on
the tasks' channels side by side ([B, T*C, H, W]) instead of vmap's per-sample rules, as grouped
convolutions, im2col and one batched matrix product, or channels-last; ``StackedLayers``
intercepts the layers' functions for the forwards that name stacked rules (batched/forwards), and
``AutocastConvolutions`` brings autocast to vmapped convolutions."""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..ops.batch_norm_relu_max_pool import batch_norm_relu_max_pool2d

def _stacked(x: Tensor, dim: Optional[int], num_tasks: int) -> Tensor:
    """A batched input as [B, T, C, ...] whose tasks and channels merge into one dimension by a view
    (tasks outside channels in memory): free after another stacked layer, in either memory format
    (a channels-last output stays channels-last); otherwise one copy into that layout."""
    x = x.unsqueeze(1).expand(x.shape[0], num_tasks, *x.shape[1:]) if dim is None else x.movedim(dim, 1)
    if x.dim() >= 3 and (x.shape[2] == 1 or x.stride(1) == x.shape[2] * x.stride(2)) and x.stride(1) > 0:
        return x
    return x.contiguous()


def _per_task(t: Optional[Tensor], dim: Optional[int], num_tasks: int) -> Optional[Tensor]:
    """A parameter or buffer with its T tasks flattened into its first dimension: [T * shape[0], ...]."""
    if t is None:
        return None
    return (t.expand(num_tasks, *t.shape) if dim is None else t.movedim(dim, 0)).flatten(0, 1)


def _conv2d_rule(T, dims, x, weight, bias, stride, padding, dilation, groups):
    xs = _stacked(x, dims[0], T)
    b, _, c = xs.shape[:3]
    w = _per_task(weight, dims[1], T)
    out = F.conv2d(xs.view(b, T * c, *xs.shape[3:]), w, _per_task(bias, dims[2], T), stride, padding, dilation,
                   T * groups)
    return out.view(b, T, w.shape[0] // T, *out.shape[2:]), 1


def _conv2d_channels_last_rule(T, dims, x, weight, bias, stride, padding, dilation, groups):
    """The stacked conv2d on channels-last ([B, H, W, T*C] in memory) input and weights: cuDNN's NHWC
    grouped kernels on CUDA. Its output stays channels-last, and so do BatchNorm's and max-pooling's
    after it (their rules keep the layout), until the next convolution."""
    xs = _stacked(x, dims[0], T)
    b, _, c = xs.shape[:3]
    w = _per_task(weight, dims[1], T).contiguous(memory_format=torch.channels_last)
    inputs = xs.view(b, T * c, *xs.shape[3:]).contiguous(memory_format=torch.channels_last)
    out = F.conv2d(inputs, w, _per_task(bias, dims[2], T), stride, padding, dilation, T * groups)
    return out.view(b, T, w.shape[0] // T, *out.shape[2:]), 1


def _conv2d_im2col_rule(T, dims, x, weight, bias, stride, padding, dilation, groups):
    """The stacked conv2d as im2col + one batched matrix product over tasks: out[t] = W[t] @ cols[t],
    W[t] as [O, C*kh*kw], cols[t] as [C*kh*kw, B*H'*W']. Every op here is twice differentiable."""
    xs = _stacked(x, dims[0], T)
    b, _, c = xs.shape[:3]
    w = weight if dims[1] is None else weight.movedim(dims[1], 0)
    kh, kw = w.shape[-2:]
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    padded = F.pad(xs, (pw, pw, ph, ph))
    # [B, T, C, H', W', kh, kw] as a view, then one copy into the GEMM's layout [T, C*kh*kw, B*H'*W']
    windows = padded.unfold(3, kh, sh).unfold(4, kw, sw)
    ho, wo = windows.shape[3:5]
    cols = windows.permute(1, 2, 5, 6, 0, 3, 4).reshape(T, c * kh * kw, b * ho * wo)
    out = torch.bmm(w.expand(T, *w.shape[-4:]).reshape(T, -1, c * kh * kw), cols)  # [T, O, B*H'*W']
    if bias is not None:  # in the product's dtype: under autocast, a convolution's bias is cast too
        bias = bias.expand(T, *bias.shape) if dims[2] is None else bias.movedim(dims[2], 0)
        out = out + bias.unsqueeze(-1).to(out.dtype)
    return out.view(T, -1, b, ho, wo).permute(2, 0, 1, 3, 4), 1


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def _batch_norm_rule(T, dims, x, running_mean, running_var, weight, bias, training, momentum, eps):
    xs = _stacked(x, dims[0], T)
    b, _, c = xs.shape[:3]
    stats = [_per_task(t, d, T) for t, d in zip((running_mean, running_var, weight, bias), dims[1:5])]
    out = F.batch_norm(xs.view(b, T * c, *xs.shape[3:]), *stats, training, momentum, eps)
    return out.view(xs.shape), 1


def _max_pool2d_rule(T, dims, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    xs = _stacked(x, dims[0], T)
    b, _, c = xs.shape[:3]
    out = F.max_pool2d(xs.view(b, T * c, *xs.shape[3:]), kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)
    return out.view(b, T, c, *out.shape[2:]), 1


def _batch_norm_relu_max_pool2d_rule(T, dims, x, weight, bias, eps):
    xs = _stacked(x, dims[0], T)
    b, _, c = xs.shape[:3]
    out = batch_norm_relu_max_pool2d(xs.reshape(b, T * c, *xs.shape[3:]), _per_task(weight, dims[1], T),
                                     _per_task(bias, dims[2], T), eps)
    return out.view(b, T, c, *out.shape[2:]), 1


class _StackedRule(torch.autograd.Function):
    """One of the rules above as the vmap rule of a layer: applied only under vmap (by
    StackedLayers), where torch.func calls ``vmap`` with the tensors' [T, ...] storage and
    autograd records the ops the rule runs, whose own derivatives (double backward included)
    then apply."""

    @staticmethod
    def forward(kind, *args):
        raise RuntimeError(f"imaml_ext: the stacked {kind} rule runs only under torch.func.vmap")

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("imaml_ext: the stacked rules run only under torch.func.vmap")

    @staticmethod
    def vmap(info, in_dims, kind, *args):
        return _RULES[kind][0](info.batch_size, in_dims[1:], *args)


def _accept_conv2d(a) -> bool:
    return a[0].dim() == 4


def _accept_conv2d_im2col(a) -> bool:
    # the rule's windows: zero padding given as numbers, no dilation, no grouping
    return (a[0].dim() == 4 and a[6] == 1 and _pair(a[5]) == (1, 1) and not isinstance(a[4], str)
            and len(_pair(a[4])) == 2 and len(_pair(a[3])) == 2)


def _accept_batch_norm(a) -> bool:
    # Training with running statistics updates them in place: left to vmap's own rule.
    return a[0].dim() >= 2 and not (a[5] and (a[1] is not None or a[2] is not None))


def _accept_max_pool2d(a) -> bool:
    return a[0].dim() == 4 and not a[6]


_REQUIRED = object()
_CONV2D_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV2D_DEFAULTS = (_REQUIRED, _REQUIRED, None, 1, 0, 1, 1)


# kind: (rule, acceptance test, argument names, their defaults)
_RULES = {
    "conv2d": (_conv2d_rule, _accept_conv2d, _CONV2D_ARGUMENTS, _CONV2D_DEFAULTS),
    "conv2d_channels_last": (_conv2d_channels_last_rule, _accept_conv2d, _CONV2D_ARGUMENTS, _CONV2D_DEFAULTS),
    "conv2d_im2col": (_conv2d_im2col_rule, _accept_conv2d_im2col, _CONV2D_ARGUMENTS, _CONV2D_DEFAULTS),
    "batch_norm": (_batch_norm_rule, _accept_batch_norm, ("input", "running_mean", "running_var", "weight", "bias",
                                                         "training", "momentum", "eps"),
                   (_REQUIRED, _REQUIRED, _REQUIRED, None, None, False, 0.1, 1e-5)),
    "max_pool2d": (_max_pool2d_rule, _accept_max_pool2d, ("input", "kernel_size", "stride", "padding", "dilation",
                                                          "ceil_mode", "return_indices"),
                   (_REQUIRED, _REQUIRED, None, 0, 1, False, False)),
}


_INTERCEPTED = {torch.conv2d: "conv2d", F.conv2d: "conv2d", F.batch_norm: "batch_norm", F.max_pool2d: "max_pool2d"}


class StackedLayers(TorchFunctionMode):
    """Inside a vmapped forward: conv2d, batch_norm and max_pool2d on a batched 4-d input (2-d and
    up for batch_norm) go to the stacked rules; everything else to vmap's own. A 2-d convolution runs
    by the first of ``conv2d_rules`` that accepts it: "conv2d" (grouped), "conv2d_im2col" (im2col + a
    batched matrix product; dense, undilated, zero-padded ones only), "conv2d_channels_last", or one
    added by ``add_conv2d_rule``."""

    def __init__(self, conv2d_rules: Sequence[str] = ("conv2d",)):
        super().__init__()
        unknown = [kind for kind in conv2d_rules if kind not in _RULES or not kind.startswith("conv2d")]
        if isinstance(conv2d_rules, str) or not conv2d_rules or unknown:
            raise ValueError(f"StackedLayers: conv2d_rules must be a sequence of conv2d rules "
                             f"({', '.join(k for k in _RULES if k.startswith('conv2d'))}); got {conv2d_rules!r}")
        self.conv2d_rules = tuple(conv2d_rules)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _INTERCEPTED.get(func)
        if kind is not None:
            _, _, names, defaults = _RULES[kind]
            if len(args) <= len(names) and set(kwargs) <= set(names[len(args):]):
                bound = list(args) + [kwargs.get(n, d) for n, d in zip(names[len(args):], defaults[len(args):])]
                if (all(v is not _REQUIRED for v in bound) and isinstance(bound[0], Tensor)
                        and torch._C._functorch.is_batchedtensor(bound[0])):
                    for rule in self.conv2d_rules if kind == "conv2d" else (kind,):
                        if _RULES[rule][1](bound):
                            return _StackedRule.apply(rule, *bound)
        return func(*args, **kwargs)


class AutocastConvolutions(TorchFunctionMode):
    """Autocast's cast for convolutions under vmap. torch.func's convolution batching rule runs before
    autocast sees the call, so a vmapped convolution would stay float32 under bf16 / fp16 autocast
    (torch 2.14, CPU; linear and matmul are cast): its floating inputs are cast here to the autocast
    dtype of their device, as autocast casts a convolution's, when autocast is on at the call."""

    CONVOLUTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                    torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
                    torch.conv_transpose3d}

    @classmethod
    def under(cls, device_type: str):
        """The mode when autocast is on for this device type now; a no-op context otherwise."""
        return cls() if _autocast_dtype(device_type) is not None else contextlib.nullcontext()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.CONVOLUTIONS and args and isinstance(args[0], Tensor):
            dtype = _autocast_dtype(args[0].device.type)
            if dtype is not None:
                def cast(value):
                    return value.to(dtype) if isinstance(value, Tensor) and value.is_floating_point() else value

                args, kwargs = [cast(a) for a in args], {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


_RULES["batch_norm_relu_max_pool2d"] = (_batch_norm_relu_max_pool2d_rule, lambda a: True,
                                        ("input", "weight", "bias", "eps"), (_REQUIRED, None, None, 1e-5))


def add_conv2d_rule(kind: str, rule: Callable, accepts: Callable[[list], bool]) -> None:
    """A new stacked 2-d convolution rule for a forward's ``conv2d_rules``: ``rule(T, in_dims, input,
    weight, bias, stride, padding, dilation, groups)`` returns (output as [B, T, O, H', W'], 1), the
    inputs batched over tasks along ``in_dims`` (None: shared by every task); ``accepts(arguments)``
    says whether it runs these arguments (else the next rule is tried). Built of differentiable torch
    ops, so IMAML's double backward and forward-mode products apply to it."""
    if not kind.startswith("conv2d") or kind in _RULES:
        raise ValueError(f"add_conv2d_rule: kind must be a new name starting with 'conv2d'; got {kind!r}")
    _RULES[kind] = (rule, accepts, _CONV2D_ARGUMENTS, _CONV2D_DEFAULTS)
