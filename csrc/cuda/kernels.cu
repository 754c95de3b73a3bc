// CUDA kernels of imaml_ext. One block per chunk (ops_math.h), so a block
// works on one task of one tensor: per-task scalars are read once per block
// and a block's partial sum belongs to one task. 16-byte vector loads when
// the chunk's pointers allow them, scalar otherwise.
#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "block_reduce.cuh"
#include "kernels.cuh"

namespace imaml_ext {
namespace cuda {
namespace {


template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename scalar_t>
constexpr int pack_size() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <typename scalar_t, int kLists>
__device__ __forceinline__ scalar_t* ptr(const LaunchMeta<kLists>& meta, int list, const ChunkLocation& loc) {
  return static_cast<scalar_t*>(meta.ptrs[list][loc.tensor]) + loc.offset;
}

template <int kLists>
__device__ __forceinline__ ChunkLocation this_chunk(const LaunchMeta<kLists>& meta) {
  return locate_chunk(static_cast<int64_t>(blockIdx.x), meta.chunk_start, meta.numel_per_task,
                      meta.task_chunk_offset, meta.n_tensors);
}

// Stores this block's partial; the last block of all launches of the op then
// reduces each task's row (one warp per task, fixed order) and calls
// finalize(task, sum). The last block resets the counter for the next op.
template <typename acc_t, typename Finalize>
__device__ __forceinline__ void finish_reduction(
    acc_t thread_partial, int64_t slot, const Reduction<acc_t>& red, Finalize&& finalize) {
  __shared__ bool is_last;
  const acc_t total = block_sum(thread_partial);
  if (threadIdx.x == 0) {
    red.partials[slot] = total;
    __threadfence();  // the partial is visible before the count says so
    const int done = atomicAdd(red.counter, 1);
    is_last = static_cast<int64_t>(done) == red.total_blocks - 1;
  }
  __syncthreads();
  if (!is_last) {
    return;
  }
  __threadfence();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int64_t t = warp; t < red.num_tasks; t += kWarps) {
    acc_t sum = 0;
    for (int64_t c = lane; c < red.row_chunks; c += 32) {
      sum += __ldcg(red.partials + t * red.row_chunks + c);  // L2, never a stale L1 line
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      finalize(t, sum);
    }
  }
  if (threadIdx.x == 0) {
    *red.counter = 0;
  }
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t per_task_or(const scalar_t* per_task, int64_t task, scalar_t fallback) {
  return per_task != nullptr ? per_task[task] : fallback;
}

// ---------------------------------------------------------------------------
template <typename scalar_t, bool kMomentum>
__global__ void __launch_bounds__(kThreads) prox_sgd_kernel(
    const __grid_constant__ LaunchMeta<4> meta, const scalar_t* lr_per_task,
    const scalar_t* lam_per_task, scalar_t lr, scalar_t lam, scalar_t momentum) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr int kPack = pack_size<scalar_t>();
  using P = Pack<scalar_t, kPack>;
  const ChunkLocation loc = this_chunk(meta);
  scalar_t* phi = ptr<scalar_t>(meta, 0, loc);
  const scalar_t* grad = ptr<scalar_t>(meta, 1, loc);
  const scalar_t* anchor = static_cast<const scalar_t*>(meta.ptrs[2][loc.tensor]) + loc.within_tensor;
  scalar_t* buf = kMomentum ? ptr<scalar_t>(meta, 3, loc) : phi;
  const acc_t lr_t = per_task_or(lr_per_task, loc.task, lr);
  const acc_t lam_t = per_task_or(lam_per_task, loc.task, lam);
  const acc_t mom = momentum;

  int64_t done = 0;
  if (aligned16(phi) && aligned16(grad) && aligned16(anchor) && aligned16(buf)) {
    const int64_t packs = loc.length / kPack;
    for (int64_t v = threadIdx.x; v < packs; v += kThreads) {
      P ph = reinterpret_cast<const P*>(phi)[v];
      const P g = reinterpret_cast<const P*>(grad)[v];
      const P th = reinterpret_cast<const P*>(anchor)[v];
      P b;
      if constexpr (kMomentum) {
        b = reinterpret_cast<const P*>(buf)[v];
      }
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        prox_sgd_element<kMomentum>(ph.v[k], b.v[k], g.v[k], th.v[k], lr_t, lam_t, mom);
      }
      reinterpret_cast<P*>(phi)[v] = ph;
      if constexpr (kMomentum) {
        reinterpret_cast<P*>(buf)[v] = b;
      }
    }
    done = packs * kPack;
  }
  for (int64_t i = done + threadIdx.x; i < loc.length; i += kThreads) {
    prox_sgd_element<kMomentum>(phi[i], buf[i], grad[i], anchor[i], lr_t, lam_t, mom);
  }
}

// ---------------------------------------------------------------------------
template <typename scalar_t, DotKind kKind>
__global__ void __launch_bounds__(kThreads) cg_dot_kernel(
    const __grid_constant__ LaunchMeta<2> meta, const Reduction<scalar_t> red,
    const scalar_t* lam_per_task, scalar_t lam, scalar_t tol) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr int kPack = pack_size<scalar_t>();
  using P = Pack<scalar_t, kPack>;
  const ChunkLocation loc = this_chunk(meta);
  const scalar_t* a = ptr<scalar_t>(meta, 0, loc);
  const scalar_t* b = ptr<scalar_t>(meta, 1, loc);
  // A stopped task's partial is never used: skip its reads.
  const bool active = kKind == DotKind::kInit || red.status[loc.task] == 0;
  const int64_t length = active ? loc.length : 0;

  acc_t sum = 0;
  int64_t done = 0;
  if (aligned16(a) && aligned16(b)) {
    const int64_t packs = length / kPack;
    for (int64_t v = threadIdx.x; v < packs; v += kThreads) {
      const P pa = reinterpret_cast<const P*>(a)[v];
      const P pb = reinterpret_cast<const P*>(b)[v];
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        sum += static_cast<acc_t>(pa.v[k]) * static_cast<acc_t>(pb.v[k]);
      }
    }
    done = packs * kPack;
  }
  for (int64_t i = done + threadIdx.x; i < length; i += kThreads) {
    sum += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  }

  finish_reduction(sum, loc.task * red.row_chunks + loc.partial_index, red, [&](int64_t t, acc_t total) {
    acc_t* scalars = red.scalars + t * kCgNumScalars;
    if constexpr (kKind == DotKind::kInit) {
      cg_finalize_init(scalars, red.status + t, total, static_cast<acc_t>(tol));
    } else {
      const acc_t inv_lam = acc_t(1) / static_cast<acc_t>(per_task_or(lam_per_task, t, lam));
      cg_finalize_alpha(scalars, red.status + t, total, inv_lam);
    }
  });
}

// ---------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) cg_update_kernel(
    const __grid_constant__ LaunchMeta<5> meta, const Reduction<scalar_t> red,
    const scalar_t* lam_per_task, scalar_t lam, scalar_t tol) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr int kPack = pack_size<scalar_t>();
  using P = Pack<scalar_t, kPack>;
  const ChunkLocation loc = this_chunk(meta);
  scalar_t* x = ptr<scalar_t>(meta, 0, loc);
  scalar_t* r = ptr<scalar_t>(meta, 1, loc);
  scalar_t* p = ptr<scalar_t>(meta, 2, loc);
  scalar_t* s = ptr<scalar_t>(meta, 3, loc);
  const scalar_t* hr = ptr<scalar_t>(meta, 4, loc);
  const bool active = red.status[loc.task] == 0;
  const int64_t length = active ? loc.length : 0;
  const acc_t* task_scalars = red.scalars + loc.task * kCgNumScalars;
  const acc_t alpha = task_scalars[kCgAlpha];
  const acc_t beta = task_scalars[kCgBeta];
  const acc_t inv_lam = acc_t(1) / static_cast<acc_t>(per_task_or(lam_per_task, loc.task, lam));

  acc_t sum = 0;
  int64_t done = 0;
  if (aligned16(x) && aligned16(r) && aligned16(p) && aligned16(s) && aligned16(hr)) {
    const int64_t packs = length / kPack;
    for (int64_t v = threadIdx.x; v < packs; v += kThreads) {
      P px = reinterpret_cast<const P*>(x)[v];
      P pr = reinterpret_cast<const P*>(r)[v];
      P pp = reinterpret_cast<const P*>(p)[v];
      P ps = reinterpret_cast<const P*>(s)[v];
      const P ph = reinterpret_cast<const P*>(hr)[v];
#pragma unroll
      for (int k = 0; k < kPack; ++k) {
        const acc_t r_new = cg_update_element(px.v[k], pr.v[k], pp.v[k], ps.v[k], ph.v[k], inv_lam, alpha, beta);
        sum += r_new * r_new;
      }
      reinterpret_cast<P*>(x)[v] = px;
      reinterpret_cast<P*>(r)[v] = pr;
      reinterpret_cast<P*>(p)[v] = pp;
      reinterpret_cast<P*>(s)[v] = ps;
    }
    done = packs * kPack;
  }
  for (int64_t i = done + threadIdx.x; i < length; i += kThreads) {
    const acc_t r_new = cg_update_element(x[i], r[i], p[i], s[i], hr[i], inv_lam, alpha, beta);
    sum += r_new * r_new;
  }

  finish_reduction(sum, loc.task * red.row_chunks + loc.partial_index, red, [&](int64_t t, acc_t total) {
    cg_finalize_update(red.scalars + t * kCgNumScalars, red.status + t, red.iterations + t, total,
                       static_cast<acc_t>(tol));
  });
}

}  // namespace

template <typename scalar_t>
void launch_prox_sgd(
    const LaunchMeta<4>& meta, int64_t blocks, bool momentum, const scalar_t* lr_per_task,
    const scalar_t* lam_per_task, scalar_t lr, scalar_t lam, scalar_t momentum_factor,
    cudaStream_t stream) {
  if (momentum) {
    prox_sgd_kernel<scalar_t, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        meta, lr_per_task, lam_per_task, lr, lam, momentum_factor);
  } else {
    prox_sgd_kernel<scalar_t, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        meta, lr_per_task, lam_per_task, lr, lam, momentum_factor);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_cg_dot(
    DotKind kind, const LaunchMeta<2>& meta, int64_t blocks, const Reduction<scalar_t>& red,
    const scalar_t* lam_per_task, scalar_t lam, scalar_t tol, cudaStream_t stream) {
  if (kind == DotKind::kInit) {
    cg_dot_kernel<scalar_t, DotKind::kInit><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        meta, red, lam_per_task, lam, tol);
  } else {
    cg_dot_kernel<scalar_t, DotKind::kAlpha><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        meta, red, lam_per_task, lam, tol);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_cg_update(
    const LaunchMeta<5>& meta, int64_t blocks, const Reduction<scalar_t>& red,
    const scalar_t* lam_per_task, scalar_t lam, scalar_t tol, cudaStream_t stream) {
  cg_update_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      meta, red, lam_per_task, lam, tol);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define IMAML_EXT_INSTANTIATE(scalar_t)                                                       \
  template void launch_prox_sgd<scalar_t>(const LaunchMeta<4>&, int64_t, bool, const scalar_t*, \
                                          const scalar_t*, scalar_t, scalar_t, scalar_t,       \
                                          cudaStream_t);                                       \
  template void launch_cg_dot<scalar_t>(DotKind, const LaunchMeta<2>&, int64_t,                 \
                                        const Reduction<scalar_t>&, const scalar_t*, scalar_t,  \
                                        scalar_t, cudaStream_t);                               \
  template void launch_cg_update<scalar_t>(const LaunchMeta<5>&, int64_t,                       \
                                           const Reduction<scalar_t>&, const scalar_t*,         \
                                           scalar_t, scalar_t, cudaStream_t);

IMAML_EXT_INSTANTIATE(float)
IMAML_EXT_INSTANTIATE(double)

#undef IMAML_EXT_INSTANTIATE

}  // namespace cuda
}  // namespace imaml_ext
