// Interface between the host code of batch_norm_relu_max_pool2d
// (batch_norm_relu_max_pool_cuda.cpp) and its kernels (batch_norm_relu_max_pool.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace imaml_ext {
namespace cuda {

struct PoolDims {
  int64_t n, c, h, w;  // of the [N, C, H, W] input; the output is [N, C, H / 2, W / 2]
};

// One block per channel. weight, bias, mean, invstd: [C] of acc_t.
template <typename scalar_t, typename acc_t>
void launch_batch_norm_relu_max_pool2d(
    const scalar_t* input, const acc_t* weight, const acc_t* bias, scalar_t* out, acc_t* mean,
    acc_t* invstd, uint8_t* argmax, PoolDims dims, acc_t eps, cudaStream_t stream);

template <typename scalar_t, typename acc_t>
void launch_batch_norm_relu_max_pool2d_backward(
    const scalar_t* grad_out, const scalar_t* input, const acc_t* weight, const acc_t* bias,
    const acc_t* mean, const acc_t* invstd, const uint8_t* argmax, scalar_t* grad_input,
    acc_t* grad_weight, acc_t* grad_bias, PoolDims dims, cudaStream_t stream);

template <typename scalar_t, typename acc_t>
void launch_batch_norm_relu_max_pool2d_double_backward(
    const scalar_t* grad_grad_input, const acc_t* grad_grad_weight, const acc_t* grad_grad_bias,
    const scalar_t* grad_out, const scalar_t* input, const acc_t* weight, const acc_t* bias, const acc_t* mean,
    const acc_t* invstd, const uint8_t* argmax, scalar_t* grad_grad_out, scalar_t* grad_input, acc_t* grad_weight,
    PoolDims dims, cudaStream_t stream);

}  // namespace cuda
}  // namespace imaml_ext
