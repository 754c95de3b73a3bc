"""The forwards imaml_ext ships. Why "auto" times what where: on a CPU "stacked" ran faster than
"vmap" at every shape measured there, and faster than "im2col"
(benchmarks/results/meta_step-im2col-cpu-2cores-2026-11-30.md) and "channels_last"
(meta_step-channels-last-cpu-2cores-2026-11-30.md); chunks of 8 or 4 tasks keep a stacked working
set in the caches (at T = 32 with 75 query images, all tasks stacked make the elementwise layers
memory-bound). On CUDA the loop is 13x slower than vmap (H200, 2026-11-28), and "stacked",
"im2col" and "channels_last" are untimed there yet."""

from . import Forward, register

register(Forward(
    "vmap", "torch.func.vmap over tasks, convolutions becoming grouped ones",
    auto_on=("cuda",), bf16_forward_mode=True))
register(Forward(
    "loop", "a Python loop over tasks through the dense layers",
    vmapped=False, auto_on=("cpu",)))
register(Forward(
    "stacked", "vmap with convolutions, BatchNorm and max-pooling on the tasks' stacked channels, "
               "[B, T*C, H, W]: grouped convolutions, no relayout between these layers",
    conv2d_rules=("conv2d",), auto_on=("cpu", "cuda"), chunked_on=("cpu",)))
register(Forward(
    "im2col", "stacked, with each dense 2-d convolution as im2col and one batched matrix product over tasks: "
              "GEMM kernels, TF32 tensor cores where TF32 is on",
    conv2d_rules=("conv2d_im2col", "conv2d"), auto_on=("cuda",), bf16_forward_mode=True))
# channels_last has no "+fused" form: the fused kernels read NCHW.
register(Forward(
    "channels_last", "stacked, with activations and convolution weights channels-last in memory, for "
                     "cuDNN's NHWC kernels of the grouped convolutions",
    conv2d_rules=("conv2d_channels_last",), auto_on=("cuda",), fusable=False))
