// CUDA backend of the imaml_ext ops: validation (shared with the CPU
// backend), the device guard, the current stream, and the launch metadata.
// The kernels themselves are in kernels.cu.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <limits>
#include <vector>

#include "../op_args.h"
#include "../tensor_lists.h"
#include "kernels.cuh"

namespace imaml_ext {
namespace {

template <int kLists>
struct Launch {
  cuda::LaunchMeta<kLists> meta;
  int64_t blocks;
};

// Groups the tensors into launches of at most kMaxTensorsPerLaunch tensors.
// Each launch's chunks are numbered from zero; the partial-sum columns stay
// global (task_chunk_offset), so one reduction spans all launches.
template <int kLists>
std::vector<Launch<kLists>> plan_launches(
    const ListLayout& layout, const std::array<at::TensorList, kLists>& lists) {
  std::vector<Launch<kLists>> launches;
  const int64_t n = layout.num_tensors();
  for (int64_t begin = 0; begin < n; begin += kMaxTensorsPerLaunch) {
    const int64_t end = std::min<int64_t>(n, begin + kMaxTensorsPerLaunch);
    Launch<kLists> launch{};
    launch.meta.n_tensors = static_cast<int>(end - begin);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t k = j - begin;
      for (int l = 0; l < kLists; ++l) {
        launch.meta.ptrs[l][k] = lists[l][j].data_ptr();
      }
      launch.meta.numel_per_task[k] = layout.numel_per_task[j];
      launch.meta.task_chunk_offset[k] = layout.task_chunk_offset[j];
      launch.meta.chunk_start[k] = layout.chunk_start[j] - layout.chunk_start[begin];
    }
    launch.meta.chunk_start[end - begin] = layout.chunk_start[end] - layout.chunk_start[begin];
    launch.blocks = launch.meta.chunk_start[end - begin];
    TORCH_CHECK(launch.blocks <= std::numeric_limits<int>::max(),
                "imaml_ext: a launch of ", launch.blocks, " blocks exceeds the grid limit");
    if (launch.blocks > 0) {
      launches.push_back(launch);
    }
  }
  return launches;
}

template <typename T>
const T* optional_data(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<const T*>(t->data_ptr()) : nullptr;
}

cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

template <typename scalar_t>
cuda::Reduction<scalar_t> make_reduction(
    const ListLayout& layout, const at::Tensor& partials, const at::Tensor& counter,
    const at::Tensor& scalars, const at::Tensor& status) {
  cuda::Reduction<scalar_t> red{};
  red.partials = static_cast<scalar_t*>(partials.data_ptr());
  red.counter = counter.data_ptr<int>();
  red.total_blocks = layout.total_chunks();
  TORCH_CHECK(red.total_blocks <= std::numeric_limits<int>::max(),
              "imaml_ext: ", red.total_blocks, " chunks exceed the reduction counter's range");
  red.num_tasks = layout.num_tasks;
  red.row_chunks = layout.row_chunks;
  red.scalars = static_cast<scalar_t*>(scalars.data_ptr());
  red.status = status.data_ptr<int32_t>();
  red.iterations = nullptr;
  return red;
}

at::Tensor partial_buffer(const ListLayout& layout, const at::Tensor& like) {
  return at::empty({layout.num_tasks * layout.row_chunks}, like.options());
}

void prox_sgd_step_cuda(
    at::TensorList params, at::TensorList grads, at::TensorList anchors,
    at::TensorList momentum_buffers, double lr, double lam, double momentum,
    const c10::optional<at::Tensor>& lr_per_task,
    const c10::optional<at::Tensor>& lam_per_task) {
  validate_prox_sgd_step(params, grads, anchors, momentum_buffers, lr, lam, momentum,
                         lr_per_task, lam_per_task);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const ListLayout layout = make_layout(params);
  const bool use_momentum = !momentum_buffers.empty();
  const auto launches =
      plan_launches<4>(layout, {params, grads, anchors, use_momentum ? momentum_buffers : params});
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "prox_sgd_step_cuda", [&] {
    for (const auto& launch : launches) {
      cuda::launch_prox_sgd<scalar_t>(
          launch.meta, launch.blocks, use_momentum, optional_data<scalar_t>(lr_per_task),
          optional_data<scalar_t>(lam_per_task), static_cast<scalar_t>(lr),
          static_cast<scalar_t>(lam), static_cast<scalar_t>(momentum), current_stream());
    }
  });
}

void cg_init_cuda(
    at::TensorList r, const at::Tensor& scalars, const at::Tensor& status,
    const at::Tensor& counter, double tol) {
  validate_cg_init(r, scalars, status, counter, tol);
  const c10::cuda::CUDAGuard guard(r[0].device());
  const ListLayout layout = make_layout(r);
  const auto launches = plan_launches<2>(layout, {r, r});
  const at::Tensor partials = partial_buffer(layout, r[0]);
  AT_DISPATCH_FLOATING_TYPES(r[0].scalar_type(), "cg_init_cuda", [&] {
    const auto red = make_reduction<scalar_t>(layout, partials, counter, scalars, status);
    for (const auto& launch : launches) {
      cuda::launch_cg_dot<scalar_t>(cuda::DotKind::kInit, launch.meta, launch.blocks, red, nullptr,
                                    scalar_t(1), static_cast<scalar_t>(tol), current_stream());
    }
  });
}

void cg_alpha_cuda(
    at::TensorList r, at::TensorList hr, const at::Tensor& scalars, const at::Tensor& status,
    const at::Tensor& counter, double lam, const c10::optional<at::Tensor>& lam_per_task) {
  validate_cg_alpha(r, hr, scalars, status, counter, lam, lam_per_task);
  const c10::cuda::CUDAGuard guard(r[0].device());
  const ListLayout layout = make_layout(r);
  const auto launches = plan_launches<2>(layout, {r, hr});
  const at::Tensor partials = partial_buffer(layout, r[0]);
  AT_DISPATCH_FLOATING_TYPES(r[0].scalar_type(), "cg_alpha_cuda", [&] {
    const auto red = make_reduction<scalar_t>(layout, partials, counter, scalars, status);
    for (const auto& launch : launches) {
      cuda::launch_cg_dot<scalar_t>(cuda::DotKind::kAlpha, launch.meta, launch.blocks, red,
                                    optional_data<scalar_t>(lam_per_task), static_cast<scalar_t>(lam),
                                    scalar_t(0), current_stream());
    }
  });
}

void cg_update_cuda(
    at::TensorList x, at::TensorList r, at::TensorList p, at::TensorList s, at::TensorList hr,
    const at::Tensor& scalars, const at::Tensor& status, const at::Tensor& iterations,
    const at::Tensor& counter, double lam, const c10::optional<at::Tensor>& lam_per_task,
    double tol) {
  validate_cg_update(x, r, p, s, hr, scalars, status, iterations, counter, lam, lam_per_task, tol);
  const c10::cuda::CUDAGuard guard(r[0].device());
  const ListLayout layout = make_layout(r);
  const auto launches = plan_launches<5>(layout, {x, r, p, s, hr});
  const at::Tensor partials = partial_buffer(layout, r[0]);
  AT_DISPATCH_FLOATING_TYPES(r[0].scalar_type(), "cg_update_cuda", [&] {
    auto red = make_reduction<scalar_t>(layout, partials, counter, scalars, status);
    red.iterations = iterations.data_ptr<int64_t>();
    for (const auto& launch : launches) {
      cuda::launch_cg_update<scalar_t>(launch.meta, launch.blocks, red,
                                       optional_data<scalar_t>(lam_per_task),
                                       static_cast<scalar_t>(lam), static_cast<scalar_t>(tol),
                                       current_stream());
    }
  });
}

}  // namespace
}  // namespace imaml_ext

TORCH_LIBRARY_IMPL(imaml_ext, CUDA, m) {
  m.impl("prox_sgd_step_", &imaml_ext::prox_sgd_step_cuda);
  m.impl("cg_init_", &imaml_ext::cg_init_cuda);
  m.impl("cg_alpha_", &imaml_ext::cg_alpha_cuda);
  m.impl("cg_update_", &imaml_ext::cg_update_cuda);
}
