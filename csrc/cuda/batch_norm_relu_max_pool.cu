// CUDA kernels of batch_norm_relu_max_pool2d, its backward and its double
// backward: one block per channel, threads
// striding over the channel's N planes (consecutive threads read consecutive
// elements of a plane). The per-element arithmetic is ops_math.h's, which the
// CPU kernels call too.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../ops_math.h"
#include "batch_norm_relu_max_pool.cuh"
#include "block_reduce.cuh"

namespace imaml_ext {
namespace cuda {
namespace {

// block_sum's result in every thread. The barrier after the write also keeps the
// next block_sum from overwriting its warp sums before every thread has read them.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum_to_all(acc_t v) {
  __shared__ acc_t result;
  v = block_sum(v);
  if (threadIdx.x == 0) {
    result = v;
  }
  __syncthreads();
  v = result;
  __syncthreads();
  return v;
}

struct Channel {
  int64_t plane, pooled_plane, count, wo;
  __device__ Channel(const PoolDims& d)
      : plane(d.h * d.w), pooled_plane((d.h / 2) * (d.w / 2)), count(d.n * d.h * d.w), wo(d.w / 2) {}
  // Offset of the i-th element (over the N planes) of channel c.
  __device__ int64_t at(const PoolDims& d, int64_t c, int64_t i) const {
    const int64_t n = i / plane;
    return (n * d.c + c) * plane + (i - n * plane);
  }
  __device__ int64_t pooled_at(const PoolDims& d, int64_t c, int64_t i) const {
    const int64_t n = i / pooled_plane;
    return (n * d.c + c) * pooled_plane + (i - n * pooled_plane);
  }
  // Input offset of the top-left corner of the window of pooled offset o.
  __device__ int64_t window_at(const PoolDims& d, int64_t o) const {
    const int64_t plane_index = o / pooled_plane;  // n * C + c
    const int64_t r = o - plane_index * pooled_plane;
    const int64_t i = r / wo;
    return plane_index * plane + 2 * i * d.w + 2 * (r - i * wo);
  }
  // Input offset of position k (0..3, row-major) of that window.
  __device__ int64_t window_element_at(const PoolDims& d, int64_t o, uint8_t k) const {
    return window_at(d, o) + (k / 2) * d.w + k % 2;
  }
};

// The i-th window of channel c (over the N planes): its output offset o, the input offset e of its
// argmax, that element's value v and pre-activation y, and the gradient gy reaching y there.
template <typename acc_t>
struct ArgmaxElement {
  int64_t o, e;
  acc_t v, y, gy;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ ArgmaxElement<acc_t> argmax_element(
    const Channel& ch, const PoolDims& d, int64_t c, int64_t i, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ grad_out, const uint8_t* __restrict__ argmax, acc_t scale, acc_t shift) {
  const int64_t o = ch.pooled_at(d, c, i);
  const int64_t e = ch.window_element_at(d, o, argmax[o]);
  const acc_t v = static_cast<acc_t>(x[e]);
  const acc_t y = bn_relu_input(v, scale, shift);
  return {o, e, v, y, pooled_relu_grad<acc_t>(static_cast<acc_t>(grad_out[o]), y)};
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) batch_norm_relu_max_pool2d_kernel(
    const scalar_t* __restrict__ x, const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
    scalar_t* __restrict__ out, acc_t* __restrict__ mean, acc_t* __restrict__ invstd,
    uint8_t* __restrict__ argmax, PoolDims d, acc_t eps) {
  const int64_t c = blockIdx.x;
  const Channel ch(d);
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < ch.count; i += kThreads) {
    sum += static_cast<acc_t>(x[ch.at(d, c, i)]);
  }
  const acc_t m = block_sum_to_all(sum) / static_cast<acc_t>(ch.count);
  acc_t squares = 0;
  for (int64_t i = threadIdx.x; i < ch.count; i += kThreads) {
    const acc_t v = static_cast<acc_t>(x[ch.at(d, c, i)]) - m;
    squares += v * v;
  }
  const acc_t is = acc_t(1) / ::sqrt(block_sum_to_all(squares) / static_cast<acc_t>(ch.count) + eps);
  if (threadIdx.x == 0) {
    mean[c] = m;
    invstd[c] = is;
  }
  const BnAffine<acc_t> bn = bn_affine<acc_t>(m, is, weight[c], bias[c]);
  const acc_t scale = bn.scale, shift = bn.shift;
  for (int64_t i = threadIdx.x; i < d.n * ch.pooled_plane; i += kThreads) {
    const int64_t o = ch.pooled_at(d, c, i);
    const scalar_t* p = x + ch.window_at(d, o);
    const WindowMax<acc_t> window = relu_max4<acc_t>(bn_relu_input<acc_t>(static_cast<acc_t>(p[0]), scale, shift),
                                                     bn_relu_input<acc_t>(static_cast<acc_t>(p[1]), scale, shift),
                                                     bn_relu_input<acc_t>(static_cast<acc_t>(p[d.w]), scale, shift),
                                                     bn_relu_input<acc_t>(static_cast<acc_t>(p[d.w + 1]), scale, shift));
    out[o] = static_cast<scalar_t>(window.value);
    argmax[o] = static_cast<uint8_t>(window.argmax);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) batch_norm_relu_max_pool2d_backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x, const acc_t* __restrict__ weight,
    const acc_t* __restrict__ bias, const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
    const uint8_t* __restrict__ argmax, scalar_t* __restrict__ grad_x, acc_t* __restrict__ grad_weight,
    acc_t* __restrict__ grad_bias, PoolDims d) {
  const int64_t c = blockIdx.x;
  const Channel ch(d);
  const BnAffine<acc_t> bn = bn_affine<acc_t>(mean[c], invstd[c], weight[c], bias[c]);
  const acc_t m = bn.mean, is = bn.invstd, scale = bn.scale, shift = bn.shift;
  // Only a window's argmax with y > 0 receives a gradient: the sums read one element per window.
  acc_t sum_gy = 0, sum_gy_xhat = 0;
  for (int64_t i = threadIdx.x; i < d.n * ch.pooled_plane; i += kThreads) {
    const ArgmaxElement<acc_t> a = argmax_element(ch, d, c, i, x, grad_out, argmax, scale, shift);
    sum_gy += a.gy;
    sum_gy_xhat += a.gy * ((a.v - m) * is);
  }
  sum_gy = block_sum_to_all(sum_gy);
  sum_gy_xhat = block_sum_to_all(sum_gy_xhat);
  if (threadIdx.x == 0) {
    grad_weight[c] = sum_gy_xhat;
    grad_bias[c] = sum_gy;
  }
  const BnInputGrad<acc_t> coef = bn_input_grad_coefficients(
      scale, m, is, sum_gy / static_cast<acc_t>(ch.count), sum_gy_xhat / static_cast<acc_t>(ch.count));
  for (int64_t i = threadIdx.x; i < ch.count; i += kThreads) {
    const int64_t e = ch.at(d, c, i);
    grad_x[e] = static_cast<scalar_t>(bn_input_grad(acc_t(0), static_cast<acc_t>(x[e]), coef));
  }
  __syncthreads();  // the argmax elements below overwrite what other threads of the block wrote above
  for (int64_t i = threadIdx.x; i < d.n * ch.pooled_plane; i += kThreads) {
    const ArgmaxElement<acc_t> a = argmax_element(ch, d, c, i, x, grad_out, argmax, scale, shift);
    grad_x[a.e] = static_cast<scalar_t>(bn_input_grad(a.gy, a.v, coef));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) batch_norm_relu_max_pool2d_double_backward_kernel(
    const scalar_t* __restrict__ grad_grad_x, const acc_t* __restrict__ grad_grad_weight,
    const acc_t* __restrict__ grad_grad_bias, const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
    const acc_t* __restrict__ weight, const acc_t* __restrict__ bias, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ invstd, const uint8_t* __restrict__ argmax, scalar_t* __restrict__ grad_grad_out,
    scalar_t* __restrict__ grad_x, acc_t* __restrict__ grad_weight, PoolDims d) {
  const int64_t c = blockIdx.x;
  const Channel ch(d);
  const BnAffine<acc_t> bn = bn_affine<acc_t>(mean[c], invstd[c], weight[c], bias[c]);
  const acc_t m = bn.mean, is = bn.invstd, scale = bn.scale, shift = bn.shift;
  acc_t sum_gg = 0, sum_gg_xhat = 0;
  for (int64_t i = threadIdx.x; i < ch.count; i += kThreads) {
    const int64_t e = ch.at(d, c, i);
    const acc_t gg = static_cast<acc_t>(grad_grad_x[e]);
    sum_gg += gg;
    sum_gg_xhat += gg * ((static_cast<acc_t>(x[e]) - m) * is);
  }
  // d is nonzero only at a window's argmax with y > 0: one element per window
  acc_t sum_d = 0, sum_d_xhat = 0, sum_gg_d = 0;
  for (int64_t i = threadIdx.x; i < d.n * ch.pooled_plane; i += kThreads) {
    const ArgmaxElement<acc_t> a = argmax_element(ch, d, c, i, x, grad_out, argmax, scale, shift);
    sum_d += a.gy;
    sum_d_xhat += a.gy * ((a.v - m) * is);
    sum_gg_d += a.gy * static_cast<acc_t>(grad_grad_x[a.e]);
  }
  sum_gg = block_sum_to_all(sum_gg);
  sum_gg_xhat = block_sum_to_all(sum_gg_xhat);
  sum_d = block_sum_to_all(sum_d);
  sum_d_xhat = block_sum_to_all(sum_d_xhat);
  sum_gg_d = block_sum_to_all(sum_gg_d);
  const BnDoubleBackward<acc_t> coef = bn_double_backward_coefficients<acc_t>(
      weight[c], m, is, static_cast<acc_t>(ch.count), sum_d, sum_d_xhat, sum_gg, sum_gg_xhat, sum_gg_d,
      grad_grad_weight[c], grad_grad_bias[c]);
  if (threadIdx.x == 0) {
    grad_weight[c] = coef.grad_weight;
  }
  for (int64_t i = threadIdx.x; i < ch.count; i += kThreads) {
    const int64_t e = ch.at(d, c, i);
    grad_x[e] = static_cast<scalar_t>(bn_double_backward_input<acc_t>(
        acc_t(0), static_cast<acc_t>(grad_grad_x[e]), static_cast<acc_t>(x[e]), coef));
  }
  __syncthreads();  // the argmax elements below overwrite what other threads of the block wrote above
  for (int64_t i = threadIdx.x; i < d.n * ch.pooled_plane; i += kThreads) {
    const ArgmaxElement<acc_t> a = argmax_element(ch, d, c, i, x, grad_out, argmax, scale, shift);
    const acc_t gg = static_cast<acc_t>(grad_grad_x[a.e]);
    grad_x[a.e] = static_cast<scalar_t>(bn_double_backward_input<acc_t>(a.gy, gg, a.v, coef));
    // the gradient reaching d, where d depends on grad_out (y > 0)
    grad_grad_out[a.o] =
        static_cast<scalar_t>(pooled_relu_grad<acc_t>(bn_double_backward_grad_out<acc_t>(gg, a.v, coef), a.y));
  }
}

}  // namespace

template <typename scalar_t, typename acc_t>
void launch_batch_norm_relu_max_pool2d(
    const scalar_t* input, const acc_t* weight, const acc_t* bias, scalar_t* out, acc_t* mean,
    acc_t* invstd, uint8_t* argmax, PoolDims dims, acc_t eps, cudaStream_t stream) {
  batch_norm_relu_max_pool2d_kernel<scalar_t, acc_t><<<static_cast<unsigned>(dims.c), kThreads, 0, stream>>>(
      input, weight, bias, out, mean, invstd, argmax, dims, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_batch_norm_relu_max_pool2d_backward(
    const scalar_t* grad_out, const scalar_t* input, const acc_t* weight, const acc_t* bias,
    const acc_t* mean, const acc_t* invstd, const uint8_t* argmax, scalar_t* grad_input,
    acc_t* grad_weight, acc_t* grad_bias, PoolDims dims, cudaStream_t stream) {
  batch_norm_relu_max_pool2d_backward_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(dims.c), kThreads, 0, stream>>>(grad_out, input, weight, bias, mean, invstd,
                                                                argmax, grad_input, grad_weight, grad_bias, dims);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_batch_norm_relu_max_pool2d_double_backward(
    const scalar_t* grad_grad_input, const acc_t* grad_grad_weight, const acc_t* grad_grad_bias,
    const scalar_t* grad_out, const scalar_t* input, const acc_t* weight, const acc_t* bias, const acc_t* mean,
    const acc_t* invstd, const uint8_t* argmax, scalar_t* grad_grad_out, scalar_t* grad_input, acc_t* grad_weight,
    PoolDims dims, cudaStream_t stream) {
  batch_norm_relu_max_pool2d_double_backward_kernel<scalar_t, acc_t>
      <<<static_cast<unsigned>(dims.c), kThreads, 0, stream>>>(grad_grad_input, grad_grad_weight, grad_grad_bias,
                                                                grad_out, input, weight, bias, mean, invstd, argmax,
                                                                grad_grad_out, grad_input, grad_weight, dims);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define IMAML_EXT_INSTANTIATE(scalar_t, acc_t)                                                          \
  template void launch_batch_norm_relu_max_pool2d<scalar_t, acc_t>(                                     \
      const scalar_t*, const acc_t*, const acc_t*, scalar_t*, acc_t*, acc_t*, uint8_t*, PoolDims, acc_t, \
      cudaStream_t);                                                                                    \
  template void launch_batch_norm_relu_max_pool2d_backward<scalar_t, acc_t>(                            \
      const scalar_t*, const scalar_t*, const acc_t*, const acc_t*, const acc_t*, const acc_t*,         \
      const uint8_t*, scalar_t*, acc_t*, acc_t*, PoolDims, cudaStream_t);                            \
  template void launch_batch_norm_relu_max_pool2d_double_backward<scalar_t, acc_t>(                     \
      const scalar_t*, const acc_t*, const acc_t*, const scalar_t*, const scalar_t*, const acc_t*,       \
      const acc_t*, const acc_t*, const acc_t*, const uint8_t*, scalar_t*, scalar_t*, acc_t*, PoolDims, \
      cudaStream_t);

IMAML_EXT_INSTANTIATE(float, float)
IMAML_EXT_INSTANTIATE(double, double)
IMAML_EXT_INSTANTIATE(c10::Half, float)
IMAML_EXT_INSTANTIATE(c10::BFloat16, float)

#undef IMAML_EXT_INSTANTIATE

}  // namespace cuda
}  // namespace imaml_ext
