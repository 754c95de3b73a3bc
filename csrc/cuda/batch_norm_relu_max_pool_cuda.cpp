// CUDA host code of batch_norm_relu_max_pool2d: validation (shared with the CPU
// backend), the device guard, the outputs and the launch on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../op_args.h"
#include "batch_norm_relu_max_pool.cuh"

namespace imaml_ext {
namespace {

cuda::PoolDims dims_of(const at::Tensor& input) {
  return {input.size(0), input.size(1), input.size(2), input.size(3)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_max_pool2d_cuda(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const c10::cuda::CUDAGuard guard(input.device());
  const BatchNormPoolForward t = prepare_batch_norm_relu_max_pool2d(input, weight, bias, eps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_relu_max_pool2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch_batch_norm_relu_max_pool2d<scalar_t, acc_t>(
        input.const_data_ptr<scalar_t>(), t.weight.const_data_ptr<acc_t>(), t.bias.const_data_ptr<acc_t>(),
        t.out.data_ptr<scalar_t>(), t.mean.data_ptr<acc_t>(), t.invstd.data_ptr<acc_t>(), t.argmax.data_ptr<uint8_t>(),
        dims_of(input), static_cast<acc_t>(eps), c10::cuda::getCurrentCUDAStream().stream());
  });
  return {t.out, t.mean, t.invstd, t.argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_max_pool2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& argmax) {
  const c10::cuda::CUDAGuard guard(input.device());
  const BatchNormPoolBackward t =
      prepare_batch_norm_relu_max_pool2d_backward(grad_out, input, weight, bias, mean, invstd, argmax);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_relu_max_pool2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch_batch_norm_relu_max_pool2d_backward<scalar_t, acc_t>(
        grad_out.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(), t.weight.const_data_ptr<acc_t>(),
        t.bias.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
        argmax.const_data_ptr<uint8_t>(), t.grad_input.data_ptr<scalar_t>(), t.grad_weight.data_ptr<acc_t>(),
        t.grad_bias.data_ptr<acc_t>(), dims_of(input), c10::cuda::getCurrentCUDAStream().stream());
  });
  return {t.grad_input, t.grad_weight.to(weight.scalar_type()), t.grad_bias.to(bias.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_max_pool2d_double_backward_cuda(
    const at::Tensor& grad_grad_input, const at::Tensor& grad_grad_weight, const at::Tensor& grad_grad_bias,
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& argmax) {
  const c10::cuda::CUDAGuard guard(input.device());
  const BatchNormPoolDoubleBackward t = prepare_batch_norm_relu_max_pool2d_double_backward(
      grad_grad_input, grad_grad_weight, grad_grad_bias, grad_out, input, weight, bias, mean, invstd, argmax);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "batch_norm_relu_max_pool2d_double_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch_batch_norm_relu_max_pool2d_double_backward<scalar_t, acc_t>(
        grad_grad_input.const_data_ptr<scalar_t>(), t.grad_grad_weight.const_data_ptr<acc_t>(),
        t.grad_grad_bias.const_data_ptr<acc_t>(), grad_out.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
        t.weight.const_data_ptr<acc_t>(), t.bias.const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
        invstd.const_data_ptr<acc_t>(), argmax.const_data_ptr<uint8_t>(), t.grad_grad_out.data_ptr<scalar_t>(),
        t.grad_input.data_ptr<scalar_t>(), t.grad_weight.data_ptr<acc_t>(), dims_of(input),
        c10::cuda::getCurrentCUDAStream().stream());
  });
  return {t.grad_grad_out, t.grad_input, t.grad_weight.to(weight.scalar_type())};
}

}  // namespace
}  // namespace imaml_ext

TORCH_LIBRARY_IMPL(imaml_ext, CUDA, m) {
  m.impl("batch_norm_relu_max_pool2d", &imaml_ext::batch_norm_relu_max_pool2d_cuda);
  m.impl("batch_norm_relu_max_pool2d_backward", &imaml_ext::batch_norm_relu_max_pool2d_backward_cuda);
  m.impl("batch_norm_relu_max_pool2d_double_backward", &imaml_ext::batch_norm_relu_max_pool2d_double_backward_cuda);
}
