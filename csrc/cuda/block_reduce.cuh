// Block-wide sums of the CUDA kernels (blocks of kThreads threads).
#pragma once

namespace imaml_ext {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over the block; the result is valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kWarps];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    warp_sums[warp] = v;
  }
  __syncthreads();
  v = threadIdx.x < kWarps ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    v = warp_sum(v);
  }
  return v;
}

}  // namespace cuda
}  // namespace imaml_ext
