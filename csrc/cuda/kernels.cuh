// Interface between the host code (ops_cuda.cpp, compiled by the C++
// compiler with ATen) and the kernels (kernels.cu, compiled by nvcc with no
// torch headers, which keeps nvcc's time on this project to seconds).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../ops_math.h"

namespace imaml_ext {
namespace cuda {

// One launch's view of a tensor list: up to kMaxTensorsPerLaunch tensors,
// kLists pointers each. Passed by value as a __grid_constant__ kernel
// argument, so the launch needs no metadata copy and is graph-capturable.
template <int kLists>
struct LaunchMeta {
  void* ptrs[kLists][kMaxTensorsPerLaunch];
  int64_t numel_per_task[kMaxTensorsPerLaunch];
  int64_t task_chunk_offset[kMaxTensorsPerLaunch];
  int64_t chunk_start[kMaxTensorsPerLaunch + 1];  // launch-local
  int n_tensors;
};

// Per-task reductions of one op: every block's partial lands in
// partials[task * row_chunks + column]; the block that finishes last (over all
// launches of the op, counted in *counter, which it resets to zero) sums each
// task's row in a fixed order and updates the CG state. Deterministic.
template <typename acc_t>
struct Reduction {
  acc_t* partials;
  int* counter;
  int64_t total_blocks;  // over all launches of this op
  int64_t num_tasks;
  int64_t row_chunks;
  acc_t* scalars;     // [T, kCgNumScalars]
  int32_t* status;    // [T]
  int64_t* iterations;  // [T], cg_update only
};

enum class DotKind { kInit, kAlpha };

template <typename scalar_t>
void launch_prox_sgd(
    const LaunchMeta<4>& meta, int64_t blocks, bool momentum, const scalar_t* lr_per_task,
    const scalar_t* lam_per_task, scalar_t lr, scalar_t lam, scalar_t momentum_factor,
    cudaStream_t stream);

// kInit: sum r.r, then cg_finalize_init(tol). kAlpha: sum r.hr, then
// cg_finalize_alpha(1 / lam). ptrs[0] = r, ptrs[1] = hr (r again for kInit).
template <typename scalar_t>
void launch_cg_dot(
    DotKind kind, const LaunchMeta<2>& meta, int64_t blocks, const Reduction<scalar_t>& red,
    const scalar_t* lam_per_task, scalar_t lam, scalar_t tol, cudaStream_t stream);

// ptrs: x, r, p, s, hr.
template <typename scalar_t>
void launch_cg_update(
    const LaunchMeta<5>& meta, int64_t blocks, const Reduction<scalar_t>& red,
    const scalar_t* lam_per_task, scalar_t lam, scalar_t tol, cudaStream_t stream);

}  // namespace cuda
}  // namespace imaml_ext
