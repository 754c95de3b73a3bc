// Per-element and per-task arithmetic of every imaml_ext op, written once and
// called by both the CPU loops (csrc/cpu) and the CUDA kernels (csrc/cuda), so
// that the CPU tests exercise the very arithmetic the GPU runs.
//
// Only c10 macros here: this header is compiled by nvcc, and torch's full
// headers cost minutes there.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace imaml_ext {

// Work unit of every op: at most kChunkSize consecutive elements of ONE task
// of ONE tensor. Chunks never straddle tasks, so a per-task scalar (lr, lam,
// CG alpha/beta) is read once per chunk and a chunk's partial sum belongs to
// exactly one task.
constexpr int64_t kChunkSize = 4096;

// Tensors described per launch. Their metadata travels as a kernel argument
// (no host-to-device copy, so launches are CUDA-graph capturable); at 48
// tensors the largest argument struct stays under the classic 4 KiB limit.
// Longer lists take several launches that share one partial-sum buffer.
constexpr int kMaxTensorsPerLaunch = 48;

// CG status bits, per task. A task with any bit set no longer updates.
constexpr int32_t kCgConverged = 1;
constexpr int32_t kCgBreakdown = 2;

// Columns of the per-task CG scalar state ([T, kCgNumScalars]).
enum CgScalar : int {
  kCgGamma = 0,      // r.r of the current residual
  kCgGammaPrev = 1,  // r.r of the previous residual
  kCgAlpha = 2,      // step length of the last update; 0 before the first
  kCgBeta = 3,       // direction update factor of the next update
  kCgBNorm2 = 4,     // ||b||^2, the reference of the relative tolerance
  kCgNumScalars = 5,
};

template <typename T>
struct OpMath {
  using type = T;
};

// Where a chunk lives: tensor index within the launch, task, first element
// (relative to the tensor's start), element count and its column in the
// task's row of partial sums.
struct ChunkLocation {
  int tensor;
  int64_t task;
  int64_t offset;
  int64_t length;
  int64_t within_tensor;  // element offset inside the task's slice
  int64_t partial_index;  // chunk's column in its task's partial-sum row
};

C10_HOST_DEVICE inline int64_t chunks_per_task(int64_t numel_per_task) {
  return (numel_per_task + kChunkSize - 1) / kChunkSize;
}

// chunk_start has n_tensors + 1 entries (launch-local prefix sums of chunk
// counts); task_chunk_offset[j] is where tensor j's chunks start in a task's
// row of partial sums.
C10_HOST_DEVICE inline ChunkLocation locate_chunk(
    int64_t chunk,
    const int64_t* chunk_start,
    const int64_t* numel_per_task,
    const int64_t* task_chunk_offset,
    int n_tensors) {
  // Last tensor whose first chunk is <= chunk; empty tensors share their
  // start with the next one, so they are never picked.
  int lo = 0;
  int hi = n_tensors;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (chunk_start[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t numel = numel_per_task[lo];
  const int64_t cpt = chunks_per_task(numel);
  const int64_t local = chunk - chunk_start[lo];
  const int64_t task = local / cpt;
  const int64_t c = local - task * cpt;
  ChunkLocation loc;
  loc.tensor = lo;
  loc.task = task;
  loc.within_tensor = c * kChunkSize;
  loc.offset = task * numel + loc.within_tensor;
  const int64_t remaining = numel - loc.within_tensor;
  loc.length = remaining < kChunkSize ? remaining : kChunkSize;
  loc.partial_index = task_chunk_offset[lo] + c;
  return loc;
}

// ---------------------------------------------------------------------------
// Proximal SGD: phi <- phi - lr * d, d = g + lam * (phi - theta), with
// PyTorch's SGD momentum (dampening 0, buffer starting at zero) on d.
template <bool kMomentum, typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline void prox_sgd_element(
    scalar_t& phi,
    scalar_t& momentum_buffer,
    scalar_t grad,
    scalar_t anchor,
    acc_t lr,
    acc_t lam,
    acc_t momentum) {
  const acc_t p = static_cast<acc_t>(phi);
  acc_t d = static_cast<acc_t>(grad) + lam * (p - static_cast<acc_t>(anchor));
  if constexpr (kMomentum) {
    d = momentum * static_cast<acc_t>(momentum_buffer) + d;
    momentum_buffer = static_cast<scalar_t>(d);
  }
  phi = static_cast<scalar_t>(p - lr * d);
}

// ---------------------------------------------------------------------------
// Batched CG for (I + H/lam) x = b in the Chronopoulos-Gear form: one HVP of
// the residual r per iteration, the direction p and s = A p kept by
// recurrence. Then all vector work of an iteration is one reduction
// (r.Hr, which gives r.Ar) followed by one fused update whose own reduction
// (r.r of the new residual) is finished in the same launch: two launches per
// iteration, every scalar on the device. Equal to textbook CG in exact
// arithmetic (same iterates x_k after k HVPs).

// The fused update of one element. Returns the new residual.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t cg_update_element(
    scalar_t& x,
    scalar_t& r,
    scalar_t& p,
    scalar_t& s,
    scalar_t hr,
    acc_t inv_lam,
    acc_t alpha,
    acc_t beta) {
  const acc_t r_old = static_cast<acc_t>(r);
  const acc_t ar = r_old + static_cast<acc_t>(hr) * inv_lam;  // A r
  // beta == 0 starts a fresh direction; selecting (not multiplying) keeps a
  // non-finite leftover in p or s from leaking in.
  const acc_t p_new = beta == acc_t(0) ? r_old : r_old + beta * static_cast<acc_t>(p);
  const acc_t s_new = beta == acc_t(0) ? ar : ar + beta * static_cast<acc_t>(s);
  const acc_t r_new = r_old - alpha * s_new;
  p = static_cast<scalar_t>(p_new);
  s = static_cast<scalar_t>(s_new);
  x = static_cast<scalar_t>(static_cast<acc_t>(x) + alpha * p_new);
  r = static_cast<scalar_t>(r_new);
  return static_cast<acc_t>(r);
}

template <typename acc_t>
C10_HOST_DEVICE inline bool cg_isfinite(acc_t v) {
  return v - v == acc_t(0);  // false for NaN and +-Inf, without <cmath> on device
}

// After the initial reduction gamma = ||b||^2.
template <typename acc_t>
C10_HOST_DEVICE inline void cg_finalize_init(
    acc_t* scalars, int32_t* status, acc_t gamma, acc_t tol) {
  scalars[kCgGamma] = gamma;
  scalars[kCgGammaPrev] = gamma;
  scalars[kCgAlpha] = acc_t(0);
  scalars[kCgBeta] = acc_t(0);
  scalars[kCgBNorm2] = gamma;
  if (!cg_isfinite(gamma)) {
    *status = kCgBreakdown;
  } else if (gamma <= tol * tol * gamma) {  // b == 0, or tol >= 1
    *status = kCgConverged;
  } else {
    *status = 0;
  }
}

// After the reduction r_hr = r.(H r): the step length of this iteration.
template <typename acc_t>
C10_HOST_DEVICE inline void cg_finalize_alpha(
    acc_t* scalars, int32_t* status, acc_t r_hr, acc_t inv_lam) {
  if (*status != 0) {
    return;
  }
  const acc_t gamma = scalars[kCgGamma];
  const acc_t delta = gamma + r_hr * inv_lam;  // r.(A r)
  const acc_t alpha_prev = scalars[kCgAlpha];
  const bool first = alpha_prev == acc_t(0);
  const acc_t beta = first ? acc_t(0) : gamma / scalars[kCgGammaPrev];
  const acc_t p_ap = first ? delta : delta - beta * gamma / alpha_prev;  // p.(A p)
  const acc_t alpha = gamma / p_ap;
  if (!(p_ap > acc_t(0)) || !cg_isfinite(p_ap) || !cg_isfinite(alpha) ||
      !cg_isfinite(beta) || alpha == acc_t(0)) {
    *status |= kCgBreakdown;
    return;
  }
  scalars[kCgAlpha] = alpha;
  scalars[kCgBeta] = beta;
}

// After the update's reduction gamma_new = r.r of the new residual.
template <typename acc_t>
C10_HOST_DEVICE inline void cg_finalize_update(
    acc_t* scalars, int32_t* status, int64_t* iterations, acc_t gamma_new, acc_t tol) {
  if (*status != 0) {
    return;
  }
  *iterations += 1;
  scalars[kCgGammaPrev] = scalars[kCgGamma];
  scalars[kCgGamma] = gamma_new;
  if (!cg_isfinite(gamma_new)) {
    *status |= kCgBreakdown;
  } else if (gamma_new <= tol * tol * scalars[kCgBNorm2]) {
    *status |= kCgConverged;
  }
}

// ---------------------------------------------------------------------------
// BatchNorm (batch statistics) -> ReLU -> 2x2 max-pool (stride 2), fused, per
// channel of an [N, C, H, W] input: y = x * scale + shift with scale = w * invstd,
// shift = b - mean * scale; r = relu(y); out = the window's max of r. A window's
// argmax is its position 0..3 in row-major order (dh * 2 + dw); the first
// maximum wins, as in ATen's max_pool2d on ReLU's output.

// A channel's BatchNorm, y = x * scale + shift, from its statistics and affine weights: every
// kernel computes y this one way, so that a backward finds ReLU's mask where the forward left it.
template <typename acc_t>
struct BnAffine {
  acc_t mean, invstd, scale, shift;
};

template <typename acc_t>
C10_HOST_DEVICE inline BnAffine<acc_t> bn_affine(acc_t mean, acc_t invstd, acc_t weight, acc_t bias) {
  const acc_t scale = weight * invstd;
  return {mean, invstd, scale, bias - mean * scale};
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t bn_relu_input(acc_t x, acc_t scale, acc_t shift) {
  return x * scale + shift;  // the pre-activation y, computed the same way forward and backward
}

// "not <=" is "> or NaN": ReLU keeps a NaN, and a NaN met in a window becomes
// its maximum (the last NaN wins, as in ATen's max_pool2d). A NaN y arises only
// from the channel's statistics or scale (y = x * scale + shift, x, scale and
// shift finite cannot give one), so a channel's y are all NaN or none, and ATen's
// "keep a NaN once taken" never has a number after a NaN to keep it from.
// Without branches, so that the CPU loops vectorise (with -fno-trapping-math).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t relu_value(acc_t y) {
  return !(y <= acc_t(0)) ? y : acc_t(0);
}

template <typename acc_t>
struct WindowMax {
  acc_t value;
  int32_t argmax;  // 0..3, row-major
};

// ReLU then the window's max over four pre-activations in row-major order, and
// the winner's position.
template <typename acc_t>
C10_HOST_DEVICE inline WindowMax<acc_t> relu_max4(acc_t y0, acc_t y1, acc_t y2, acc_t y3) {
  acc_t best = relu_value(y0);
  int32_t k = 0;
  const acc_t r1 = relu_value(y1);
  const bool take1 = !(r1 <= best);
  best = take1 ? r1 : best;
  k = take1 ? 1 : k;
  const acc_t r2 = relu_value(y2);
  const bool take2 = !(r2 <= best);
  best = take2 ? r2 : best;
  k = take2 ? 2 : k;
  const acc_t r3 = relu_value(y3);
  const bool take3 = !(r3 <= best);
  return {take3 ? r3 : best, take3 ? 3 : k};
}

// The window element at position k (0..3, row-major).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t window_element(int32_t k, acc_t v0, acc_t v1, acc_t v2, acc_t v3) {
  acc_t v = v0;  // one select per position (a chain of ?: would branch)
  v = k == 1 ? v1 : v;
  v = k == 2 ? v2 : v;
  return k == 3 ? v3 : v;
}

// The input gradient of training-mode BatchNorm,
//   w * invstd * (gy - mean(gy) - xhat * mean(gy * xhat)),  xhat = (x - mean) * invstd,
// is affine in x, w * invstd * gy + slope * x + offset, with one slope and offset per
// channel: where gy = 0 (all but one element of each pooling window) it is one
// multiply-add, a pass the compiler vectorises.
template <typename acc_t>
struct BnInputGrad {
  acc_t w_invstd, slope, offset;
};

template <typename acc_t>
C10_HOST_DEVICE inline BnInputGrad<acc_t> bn_input_grad_coefficients(
    acc_t w_invstd, acc_t mean, acc_t invstd, acc_t mean_gy, acc_t mean_gy_xhat) {
  const acc_t slope = -w_invstd * invstd * mean_gy_xhat;
  return {w_invstd, slope, -w_invstd * mean_gy - slope * mean};
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t bn_input_grad(acc_t gy, acc_t x, const BnInputGrad<acc_t>& k) {
  return k.w_invstd * gy + (k.slope * x + k.offset);
}

// The gradient reaching the pre-activation y at a window's argmax: the
// window's output gradient where y > 0, else 0 (ReLU's derivative at 0 is 0).
// Every other element of the window gets 0.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t pooled_relu_grad(acc_t grad_out, acc_t y) {
  return y > acc_t(0) ? grad_out : acc_t(0);
}

// The double backward: the gradients, for upstream gradients gg_x, gg_w, gg_b of
// the backward's outputs (grad_x, grad_w, grad_b), of its inputs grad_out, x and
// w (b only moves the ReLU mask, whose derivative is 0 almost everywhere). With
// d the gradient reaching y (nonzero only at an argmax with y > 0), M the
// channel's count, xhat = (x - mean) * invstd and the channel's sums
//   sum_d, sum_d_xhat (grad_b, grad_w), sum_gg, sum_gg_xhat, sum_gg_d:
//   e           = w invstd gg_x + c1 xhat + gg_b - w invstd sum_gg / M,
//                 c1 = gg_w - w invstd sum_gg_xhat / M   (the gradient reaching d)
//   grad grad_out = e at the window's argmax where y > 0, else 0
//   grad w      = invstd K,  K = sum_gg_d - sum_d sum_gg / M - sum_d_xhat sum_gg_xhat / M
//   grad x      = invstd (u - mean(u) - xhat mean(u xhat)) - w K invstd^2 xhat / M,
//                 u = c1 d - w invstd (sum_d_xhat / M) gg_x
// the last through xhat's and invstd's dependence on x (the statistics'). Both e
// and grad x are affine in (d, gg_x, x) with per-channel coefficients: where
// d = 0 (all but one element of each window), one multiply-add chain.
template <typename acc_t>
struct BnDoubleBackward {
  acc_t grad_weight;
  acc_t x_d, x_gg, x_x, x_offset;  // grad x = x_d d + x_gg gg_x + x_x x + x_offset
  acc_t e_gg, e_x, e_offset;       // e = e_gg gg_x + e_x x + e_offset
};

template <typename acc_t>
C10_HOST_DEVICE inline BnDoubleBackward<acc_t> bn_double_backward_coefficients(
    acc_t w, acc_t mean, acc_t invstd, acc_t count, acc_t sum_d, acc_t sum_d_xhat, acc_t sum_gg,
    acc_t sum_gg_xhat, acc_t sum_gg_d, acc_t gg_w, acc_t gg_b) {
  const acc_t mean_d = sum_d / count, mean_d_xhat = sum_d_xhat / count;
  const acc_t mean_gg = sum_gg / count, mean_gg_xhat = sum_gg_xhat / count;
  const acc_t w_invstd = w * invstd;
  const acc_t k = sum_gg_d - sum_d * mean_gg - sum_d_xhat * mean_gg_xhat;
  const acc_t c1 = gg_w - w_invstd * mean_gg_xhat;
  const acc_t c2 = w_invstd * mean_d_xhat;
  const acc_t mean_u = c1 * mean_d - c2 * mean_gg;
  const acc_t mean_u_xhat = c1 * mean_d_xhat - c2 * mean_gg_xhat;
  // grad x = invstd u - invstd mean(u) + beta xhat, xhat = invstd x - invstd mean
  const acc_t beta = -(invstd * mean_u_xhat + w * k * invstd * invstd / count);
  BnDoubleBackward<acc_t> r;
  r.grad_weight = invstd * k;
  r.x_d = invstd * c1;
  r.x_gg = -invstd * c2;
  r.x_x = beta * invstd;
  r.x_offset = -invstd * mean_u - beta * invstd * mean;
  r.e_gg = w_invstd;
  r.e_x = c1 * invstd;
  r.e_offset = gg_b - w_invstd * mean_gg - c1 * invstd * mean;
  return r;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t bn_double_backward_input(acc_t d, acc_t gg, acc_t x, const BnDoubleBackward<acc_t>& k) {
  return k.x_d * d + (k.x_gg * gg + (k.x_x * x + k.x_offset));
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t bn_double_backward_grad_out(acc_t gg, acc_t x, const BnDoubleBackward<acc_t>& k) {
  return k.e_gg * gg + (k.e_x * x + k.e_offset);
}

}  // namespace imaml_ext
