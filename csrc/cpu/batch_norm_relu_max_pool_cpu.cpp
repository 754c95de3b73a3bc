// CPU kernels of batch_norm_relu_max_pool2d, its backward and its double
// backward: one channel per at::parallel_for item, the per-element arithmetic
// of ops_math.h (which the CUDA kernels call too). Forward: two reads of the
// channel for its statistics, one for the pooled output. Backward: one read of
// each window for the channel's sums, one writing the input gradient. Double
// backward: one read of the input and its upstream gradient for the channel's
// five sums, one writing both gradients. The sums' and the forward's loops run
// over a row of windows without branches, so that the compiler vectorises them
// (omp simd; the sums' order is then the compiler's, fixed for a build). Both
// backwards write a plane as if no element were an argmax (affine in the input,
// contiguous, vectorised), then each window's argmax over it, while the plane
// is still in cache.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "../op_args.h"
#include "../ops_math.h"

// The per-channel loops are compiled twice, for AVX2 + FMA and for the
// baseline x86-64 this package is built for, and the loader picks the one the
// CPU runs (an ifunc, as ATen's CPU_CAPABILITY dispatch): the baseline's
// 16-byte vectors made them slower than ATen's own AVX2 kernels.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define IMAML_EXT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define IMAML_EXT_CPU_CLONES
#endif

namespace imaml_ext {
namespace {

// Sizes of an [N, C, H, W] input and its [N, C, H / 2, W / 2] output.
struct PoolShape {
  int64_t n, c, h, w, ho, wo;
  int64_t plane() const { return h * w; }
  int64_t pooled_plane() const { return ho * wo; }
  int64_t count() const { return n * h * w; }  // elements per channel
};

PoolShape shape_of(const at::Tensor& input) {
  return {input.size(0), input.size(1), input.size(2), input.size(3), input.size(2) / 2, input.size(3) / 2};
}

template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  PoolShape s;
  const scalar_t* x;
  const acc_t* weight;
  const acc_t* bias;
  acc_t eps;
  scalar_t* out;
  acc_t* mean;
  acc_t* invstd;
  uint8_t* argmax;
};

// What the backward and the double backward both read.
template <typename scalar_t, typename acc_t>
struct BackwardInputs {
  PoolShape s;
  const scalar_t* grad_out;
  const scalar_t* x;
  const acc_t* weight;
  const acc_t* bias;
  const acc_t* mean;
  const acc_t* invstd;
  const uint8_t* argmax;

  BnAffine<acc_t> affine(int64_t c) const { return bn_affine<acc_t>(mean[c], invstd[c], weight[c], bias[c]); }
};

template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  BackwardInputs<scalar_t, acc_t> in;
  scalar_t* grad_x;
  acc_t* grad_weight;
  acc_t* grad_bias;
};

template <typename scalar_t, typename acc_t>
struct DoubleBackwardArgs {
  BackwardInputs<scalar_t, acc_t> in;
  const scalar_t* grad_grad_x;
  const acc_t* grad_grad_weight;
  const acc_t* grad_grad_bias;
  scalar_t* grad_grad_out;
  scalar_t* grad_x;
  acc_t* grad_weight;
};

template <typename scalar_t, typename acc_t>
BackwardInputs<scalar_t, acc_t> backward_inputs(const at::Tensor& grad_out, const at::Tensor& input,
                                                const at::Tensor& weight, const at::Tensor& bias,
                                                const at::Tensor& mean, const at::Tensor& invstd,
                                                const at::Tensor& argmax) {
  return {shape_of(input),
          grad_out.const_data_ptr<scalar_t>(),
          input.const_data_ptr<scalar_t>(),
          weight.const_data_ptr<acc_t>(),
          bias.const_data_ptr<acc_t>(),
          mean.const_data_ptr<acc_t>(),
          invstd.const_data_ptr<acc_t>(),
          argmax.const_data_ptr<uint8_t>()};
}

// The offset in its [H, W] plane of position k (0..3, row-major) of window (i, j).
inline int64_t window_element_offset(const PoolShape& s, int64_t i, int64_t j, int32_t k) {
  return (2 * i + k / 2) * s.w + 2 * j + k % 2;
}

// sum over the channel's N planes of f(v).
template <typename acc_t, typename scalar_t, typename F>
inline acc_t channel_sum(const scalar_t* x, const PoolShape& s, int64_t c, F&& f) {
  acc_t total = 0;
  for (int64_t n = 0; n < s.n; ++n) {
    const scalar_t* p = x + (n * s.c + c) * s.plane();
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < s.plane(); ++i) {
      sum += f(static_cast<acc_t>(p[i]));
    }
    total += sum;
  }
  return total;
}

template <typename scalar_t, typename acc_t>
IMAML_EXT_CPU_CLONES void forward_channels(const ForwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const PoolShape& s = a.s;
  for (int64_t c = begin; c < end; ++c) {
    const acc_t m = channel_sum<acc_t>(a.x, s, c, [](acc_t v) { return v; }) / static_cast<acc_t>(s.count());
    const acc_t var =
        channel_sum<acc_t>(a.x, s, c, [m](acc_t v) { return (v - m) * (v - m); }) / static_cast<acc_t>(s.count());
    const acc_t is = acc_t(1) / std::sqrt(var + a.eps);
    a.mean[c] = m;
    a.invstd[c] = is;
    const BnAffine<acc_t> bn = bn_affine<acc_t>(m, is, a.weight[c], a.bias[c]);
    const acc_t scale = bn.scale, shift = bn.shift;
    for (int64_t n = 0; n < s.n; ++n) {
      const scalar_t* xp = a.x + (n * s.c + c) * s.plane();
      scalar_t* op = a.out + (n * s.c + c) * s.pooled_plane();
      uint8_t* ap = a.argmax + (n * s.c + c) * s.pooled_plane();
      for (int64_t i = 0; i < s.ho; ++i) {
        const scalar_t* top = xp + 2 * i * s.w;
        const scalar_t* below = top + s.w;
#pragma omp simd
        for (int64_t j = 0; j < s.wo; ++j) {
          const WindowMax<acc_t> window = relu_max4<acc_t>(
              bn_relu_input<acc_t>(top[2 * j], scale, shift), bn_relu_input<acc_t>(top[2 * j + 1], scale, shift),
              bn_relu_input<acc_t>(below[2 * j], scale, shift), bn_relu_input<acc_t>(below[2 * j + 1], scale, shift));
          op[i * s.wo + j] = static_cast<scalar_t>(window.value);
          ap[i * s.wo + j] = static_cast<uint8_t>(window.argmax);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
IMAML_EXT_CPU_CLONES void backward_channels(const BackwardArgs<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const BackwardInputs<scalar_t, acc_t>& in = a.in;
  const PoolShape& s = in.s;
  for (int64_t c = begin; c < end; ++c) {
    const BnAffine<acc_t> bn = in.affine(c);
    const acc_t m = bn.mean, is = bn.invstd, scale = bn.scale, shift = bn.shift;
    // Only a window's argmax with y > 0 receives a gradient: the sums read one element per window.
    acc_t sum_gy = 0, sum_gy_xhat = 0;
    for (int64_t n = 0; n < s.n; ++n) {
      const scalar_t* xp = in.x + (n * s.c + c) * s.plane();
      const scalar_t* gp = in.grad_out + (n * s.c + c) * s.pooled_plane();
      const uint8_t* ap = in.argmax + (n * s.c + c) * s.pooled_plane();
      for (int64_t i = 0; i < s.ho; ++i) {
        const scalar_t* top = xp + 2 * i * s.w;
        const scalar_t* below = top + s.w;
#pragma omp simd reduction(+ : sum_gy, sum_gy_xhat)
        for (int64_t j = 0; j < s.wo; ++j) {
          const acc_t v = window_element<acc_t>(ap[i * s.wo + j], top[2 * j], top[2 * j + 1], below[2 * j],
                                                below[2 * j + 1]);
          const acc_t gy = pooled_relu_grad<acc_t>(gp[i * s.wo + j], bn_relu_input(v, scale, shift));
          sum_gy += gy;
          sum_gy_xhat += gy * ((v - m) * is);
        }
      }
    }
    a.grad_weight[c] = sum_gy_xhat;
    a.grad_bias[c] = sum_gy;
    const BnInputGrad<acc_t> coef = bn_input_grad_coefficients(
        scale, m, is, sum_gy / static_cast<acc_t>(s.count()), sum_gy_xhat / static_cast<acc_t>(s.count()));
    for (int64_t n = 0; n < s.n; ++n) {
      const scalar_t* xp = in.x + (n * s.c + c) * s.plane();
      scalar_t* gxp = a.grad_x + (n * s.c + c) * s.plane();
      const scalar_t* gp = in.grad_out + (n * s.c + c) * s.pooled_plane();
      const uint8_t* ap = in.argmax + (n * s.c + c) * s.pooled_plane();
#pragma omp simd
      for (int64_t e = 0; e < s.plane(); ++e) {
        gxp[e] = static_cast<scalar_t>(bn_input_grad(acc_t(0), static_cast<acc_t>(xp[e]), coef));
      }
      for (int64_t i = 0; i < s.ho; ++i) {
        for (int64_t j = 0; j < s.wo; ++j) {
          const int32_t k = ap[i * s.wo + j];
          const int64_t e = window_element_offset(s, i, j, k);
          const acc_t v = xp[e];
          const acc_t gy = pooled_relu_grad<acc_t>(gp[i * s.wo + j], bn_relu_input(v, scale, shift));
          gxp[e] = static_cast<scalar_t>(bn_input_grad(gy, v, coef));
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
IMAML_EXT_CPU_CLONES void double_backward_channels(const DoubleBackwardArgs<scalar_t, acc_t>& a, int64_t begin,
                                                   int64_t end) {
  const BackwardInputs<scalar_t, acc_t>& in = a.in;
  const PoolShape& s = in.s;
  for (int64_t c = begin; c < end; ++c) {
    const BnAffine<acc_t> bn = in.affine(c);
    const acc_t m = bn.mean, is = bn.invstd, scale = bn.scale, shift = bn.shift;
    acc_t sum_gg = 0, sum_gg_xhat = 0, sum_d = 0, sum_d_xhat = 0, sum_gg_d = 0;
    for (int64_t n = 0; n < s.n; ++n) {
      const int64_t plane = (n * s.c + c) * s.plane(), pooled = (n * s.c + c) * s.pooled_plane();
      const scalar_t* xp = in.x + plane;
      const scalar_t* ggp = a.grad_grad_x + plane;
#pragma omp simd reduction(+ : sum_gg, sum_gg_xhat)
      for (int64_t i = 0; i < s.plane(); ++i) {
        const acc_t gg = ggp[i];
        sum_gg += gg;
        sum_gg_xhat += gg * ((static_cast<acc_t>(xp[i]) - m) * is);
      }
      // d is nonzero only at a window's argmax with y > 0: one element per window
      const scalar_t* gp = in.grad_out + pooled;
      const uint8_t* ap = in.argmax + pooled;
      for (int64_t i = 0; i < s.ho; ++i) {
        const scalar_t* top = xp + 2 * i * s.w;
        const scalar_t* below = top + s.w;
        const scalar_t* gg_top = ggp + 2 * i * s.w;
        const scalar_t* gg_below = gg_top + s.w;
#pragma omp simd reduction(+ : sum_d, sum_d_xhat, sum_gg_d)
        for (int64_t j = 0; j < s.wo; ++j) {
          const int32_t k = ap[i * s.wo + j];
          const acc_t v = window_element<acc_t>(k, top[2 * j], top[2 * j + 1], below[2 * j], below[2 * j + 1]);
          const acc_t gg = window_element<acc_t>(k, gg_top[2 * j], gg_top[2 * j + 1], gg_below[2 * j],
                                                 gg_below[2 * j + 1]);
          const acc_t d = pooled_relu_grad<acc_t>(gp[i * s.wo + j], bn_relu_input(v, scale, shift));
          sum_d += d;
          sum_d_xhat += d * ((v - m) * is);
          sum_gg_d += gg * d;
        }
      }
    }
    const BnDoubleBackward<acc_t> coef = bn_double_backward_coefficients<acc_t>(
        in.weight[c], m, is, static_cast<acc_t>(s.count()), sum_d, sum_d_xhat, sum_gg, sum_gg_xhat, sum_gg_d,
        a.grad_grad_weight[c], a.grad_grad_bias[c]);
    a.grad_weight[c] = coef.grad_weight;
    for (int64_t n = 0; n < s.n; ++n) {
      const int64_t plane = (n * s.c + c) * s.plane(), pooled = (n * s.c + c) * s.pooled_plane();
      const scalar_t* xp = in.x + plane;
      const scalar_t* ggp = a.grad_grad_x + plane;
      scalar_t* gxp = a.grad_x + plane;
#pragma omp simd
      for (int64_t i = 0; i < s.plane(); ++i) {  // as if d = 0 everywhere; the argmax elements are rewritten below
        gxp[i] = static_cast<scalar_t>(
            bn_double_backward_input<acc_t>(acc_t(0), ggp[i], static_cast<acc_t>(xp[i]), coef));
      }
      const scalar_t* gp = in.grad_out + pooled;
      const uint8_t* ap = in.argmax + pooled;
      scalar_t* ggop = a.grad_grad_out + pooled;
      for (int64_t i = 0; i < s.ho; ++i) {
        for (int64_t j = 0; j < s.wo; ++j) {
          const int32_t k = ap[i * s.wo + j];
          const int64_t e = window_element_offset(s, i, j, k);
          const acc_t v = xp[e], gg = ggp[e];
          const acc_t y = bn_relu_input(v, scale, shift);
          const acc_t d = pooled_relu_grad<acc_t>(gp[i * s.wo + j], y);
          gxp[e] = static_cast<scalar_t>(bn_double_backward_input<acc_t>(d, gg, v, coef));
          // the gradient reaching d, where d depends on grad_out (y > 0)
          ggop[i * s.wo + j] = static_cast<scalar_t>(pooled_relu_grad<acc_t>(bn_double_backward_grad_out<acc_t>(gg, v, coef), y));
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_max_pool2d_cpu(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const BatchNormPoolForward t = prepare_batch_norm_relu_max_pool2d(input, weight, bias, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_relu_max_pool2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardArgs<scalar_t, acc_t> args{
        shape_of(input), input.const_data_ptr<scalar_t>(), t.weight.const_data_ptr<acc_t>(),
        t.bias.const_data_ptr<acc_t>(), static_cast<acc_t>(eps), t.out.data_ptr<scalar_t>(), t.mean.data_ptr<acc_t>(),
        t.invstd.data_ptr<acc_t>(), t.argmax.data_ptr<uint8_t>()};
    at::parallel_for(0, args.s.c, 1, [&](int64_t begin, int64_t end) { forward_channels(args, begin, end); });
  });
  return {t.out, t.mean, t.invstd, t.argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_max_pool2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& argmax) {
  const BatchNormPoolBackward t =
      prepare_batch_norm_relu_max_pool2d_backward(grad_out, input, weight, bias, mean, invstd, argmax);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_relu_max_pool2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t, acc_t> args{
        backward_inputs<scalar_t, acc_t>(grad_out, input, t.weight, t.bias, mean, invstd, argmax),
        t.grad_input.data_ptr<scalar_t>(), t.grad_weight.data_ptr<acc_t>(), t.grad_bias.data_ptr<acc_t>()};
    at::parallel_for(0, args.in.s.c, 1, [&](int64_t begin, int64_t end) { backward_channels(args, begin, end); });
  });
  return {t.grad_input, t.grad_weight.to(weight.scalar_type()), t.grad_bias.to(bias.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_max_pool2d_double_backward_cpu(
    const at::Tensor& grad_grad_input, const at::Tensor& grad_grad_weight, const at::Tensor& grad_grad_bias,
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& argmax) {
  const BatchNormPoolDoubleBackward t = prepare_batch_norm_relu_max_pool2d_double_backward(
      grad_grad_input, grad_grad_weight, grad_grad_bias, grad_out, input, weight, bias, mean, invstd, argmax);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_relu_max_pool2d_double_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const DoubleBackwardArgs<scalar_t, acc_t> args{
        backward_inputs<scalar_t, acc_t>(grad_out, input, t.weight, t.bias, mean, invstd, argmax),
        grad_grad_input.const_data_ptr<scalar_t>(), t.grad_grad_weight.const_data_ptr<acc_t>(),
        t.grad_grad_bias.const_data_ptr<acc_t>(), t.grad_grad_out.data_ptr<scalar_t>(),
        t.grad_input.data_ptr<scalar_t>(), t.grad_weight.data_ptr<acc_t>()};
    at::parallel_for(0, args.in.s.c, 1, [&](int64_t begin, int64_t end) { double_backward_channels(args, begin, end); });
  });
  return {t.grad_grad_out, t.grad_input, t.grad_weight.to(weight.scalar_type())};
}

}  // namespace
}  // namespace imaml_ext

TORCH_LIBRARY_IMPL(imaml_ext, CPU, m) {
  m.impl("batch_norm_relu_max_pool2d", &imaml_ext::batch_norm_relu_max_pool2d_cpu);
  m.impl("batch_norm_relu_max_pool2d_backward", &imaml_ext::batch_norm_relu_max_pool2d_backward_cpu);
  m.impl("batch_norm_relu_max_pool2d_double_backward", &imaml_ext::batch_norm_relu_max_pool2d_double_backward_cpu);
}
