// CPU kernels: the chunk loop of each op over at::parallel_for, calling the
// per-element arithmetic of ops_math.h that the CUDA kernels call too.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <vector>

#include "../op_args.h"
#include "../ops_math.h"
#include "../tensor_lists.h"

namespace imaml_ext {
namespace {

// Chunks per parallel_for task: enough elements to amortise the thread hand-off.
constexpr int64_t kGrainChunks = 8;

template <typename scalar_t>
scalar_t* data_of(const at::Tensor& t) {
  return static_cast<scalar_t*>(t.data_ptr());
}

template <typename scalar_t>
std::vector<scalar_t*> pointers(at::TensorList list) {
  std::vector<scalar_t*> out;
  out.reserve(list.size());
  for (const at::Tensor& t : list) {
    out.push_back(data_of<scalar_t>(t));
  }
  return out;
}

template <typename F>
void for_each_chunk(const ListLayout& layout, F&& body) {
  at::parallel_for(0, layout.total_chunks(), kGrainChunks, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      body(locate_chunk(chunk, layout.chunk_start.data(), layout.numel_per_task.data(),
                        layout.task_chunk_offset.data(), static_cast<int>(layout.num_tensors())));
    }
  });
}

// Sums f(i) over [0, n) with four accumulators, so that the compiler can
// keep several additions in flight (a single chain is latency bound).
template <typename acc_t, typename F>
acc_t chunk_sum(int64_t n, F&& f) {
  acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a0 += f(i);
    a1 += f(i + 1);
    a2 += f(i + 2);
    a3 += f(i + 3);
  }
  for (; i < n; ++i) {
    a0 += f(i);
  }
  return (a0 + a1) + (a2 + a3);
}

// Sums each task's row of chunk partials, in chunk order, and hands it on.
template <typename acc_t, typename F>
void finalize_rows(const ListLayout& layout, const std::vector<acc_t>& partials, F&& finalize) {
  for (int64_t t = 0; t < layout.num_tasks; ++t) {
    acc_t sum = 0;
    for (int64_t c = 0; c < layout.row_chunks; ++c) {
      sum += partials[t * layout.row_chunks + c];
    }
    finalize(t, sum);
  }
}

template <typename scalar_t>
scalar_t per_task_or(const c10::optional<at::Tensor>& t, int64_t task, double fallback) {
  return t.has_value() ? data_of<scalar_t>(*t)[task] : static_cast<scalar_t>(fallback);
}

void prox_sgd_step_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList anchors,
    at::TensorList momentum_buffers, double lr, double lam, double momentum,
    const c10::optional<at::Tensor>& lr_per_task,
    const c10::optional<at::Tensor>& lam_per_task) {
  validate_prox_sgd_step(params, grads, anchors, momentum_buffers, lr, lam, momentum,
                         lr_per_task, lam_per_task);
  const ListLayout layout = make_layout(params);
  const bool use_momentum = !momentum_buffers.empty();
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "prox_sgd_step_cpu", [&] {
    using acc_t = typename OpMath<scalar_t>::type;
    const auto phi = pointers<scalar_t>(params);
    const auto g = pointers<scalar_t>(grads);
    const auto theta = pointers<scalar_t>(anchors);
    const auto buf = use_momentum ? pointers<scalar_t>(momentum_buffers) : phi;
    const acc_t mom = static_cast<acc_t>(momentum);
    for_each_chunk(layout, [&](const ChunkLocation& loc) {
      scalar_t* __restrict__ phi_c = phi[loc.tensor] + loc.offset;
      const scalar_t* __restrict__ g_c = g[loc.tensor] + loc.offset;
      const scalar_t* __restrict__ theta_c = theta[loc.tensor] + loc.within_tensor;
      const acc_t lr_t = per_task_or<scalar_t>(lr_per_task, loc.task, lr);
      const acc_t lam_t = per_task_or<scalar_t>(lam_per_task, loc.task, lam);
      if (use_momentum) {
        scalar_t* __restrict__ buf_c = buf[loc.tensor] + loc.offset;
        for (int64_t i = 0; i < loc.length; ++i) {
          prox_sgd_element<true>(phi_c[i], buf_c[i], g_c[i], theta_c[i], lr_t, lam_t, mom);
        }
      } else {
        for (int64_t i = 0; i < loc.length; ++i) {
          scalar_t unused;
          prox_sgd_element<false>(phi_c[i], unused, g_c[i], theta_c[i], lr_t, lam_t, mom);
        }
      }
    });
  });
}

void cg_init_cpu(
    at::TensorList r, const at::Tensor& scalars, const at::Tensor& status,
    const at::Tensor& counter, double tol) {
  validate_cg_init(r, scalars, status, counter, tol);
  const ListLayout layout = make_layout(r);
  AT_DISPATCH_FLOATING_TYPES(r[0].scalar_type(), "cg_init_cpu", [&] {
    using acc_t = typename OpMath<scalar_t>::type;
    const auto rp = pointers<scalar_t>(r);
    std::vector<acc_t> partials(layout.num_tasks * layout.row_chunks, acc_t(0));
    for_each_chunk(layout, [&](const ChunkLocation& loc) {
      const scalar_t* rc = rp[loc.tensor] + loc.offset;
      partials[loc.task * layout.row_chunks + loc.partial_index] = chunk_sum<acc_t>(
          loc.length, [&](int64_t i) { return static_cast<acc_t>(rc[i]) * static_cast<acc_t>(rc[i]); });
    });
    acc_t* sc = data_of<acc_t>(scalars);
    int32_t* st = status.data_ptr<int32_t>();
    finalize_rows(layout, partials, [&](int64_t t, acc_t sum) {
      cg_finalize_init(sc + t * kCgNumScalars, st + t, sum, static_cast<acc_t>(tol));
    });
  });
}

void cg_alpha_cpu(
    at::TensorList r, at::TensorList hr, const at::Tensor& scalars, const at::Tensor& status,
    const at::Tensor& counter, double lam, const c10::optional<at::Tensor>& lam_per_task) {
  validate_cg_alpha(r, hr, scalars, status, counter, lam, lam_per_task);
  const ListLayout layout = make_layout(r);
  AT_DISPATCH_FLOATING_TYPES(r[0].scalar_type(), "cg_alpha_cpu", [&] {
    using acc_t = typename OpMath<scalar_t>::type;
    const auto rp = pointers<scalar_t>(r);
    const auto hp = pointers<scalar_t>(hr);
    const int32_t* st = status.data_ptr<int32_t>();
    std::vector<acc_t> partials(layout.num_tasks * layout.row_chunks, acc_t(0));
    for_each_chunk(layout, [&](const ChunkLocation& loc) {
      if (st[loc.task] != 0) {
        return;
      }
      const scalar_t* rc = rp[loc.tensor] + loc.offset;
      const scalar_t* hc = hp[loc.tensor] + loc.offset;
      partials[loc.task * layout.row_chunks + loc.partial_index] = chunk_sum<acc_t>(
          loc.length, [&](int64_t i) { return static_cast<acc_t>(rc[i]) * static_cast<acc_t>(hc[i]); });
    });
    acc_t* sc = data_of<acc_t>(scalars);
    int32_t* stw = status.data_ptr<int32_t>();
    finalize_rows(layout, partials, [&](int64_t t, acc_t sum) {
      const acc_t lam_t = per_task_or<scalar_t>(lam_per_task, t, lam);
      cg_finalize_alpha(sc + t * kCgNumScalars, stw + t, sum, acc_t(1) / lam_t);
    });
  });
}

void cg_update_cpu(
    at::TensorList x, at::TensorList r, at::TensorList p, at::TensorList s, at::TensorList hr,
    const at::Tensor& scalars, const at::Tensor& status, const at::Tensor& iterations,
    const at::Tensor& counter, double lam, const c10::optional<at::Tensor>& lam_per_task,
    double tol) {
  validate_cg_update(x, r, p, s, hr, scalars, status, iterations, counter, lam, lam_per_task, tol);
  const ListLayout layout = make_layout(r);
  AT_DISPATCH_FLOATING_TYPES(r[0].scalar_type(), "cg_update_cpu", [&] {
    using acc_t = typename OpMath<scalar_t>::type;
    const auto xp = pointers<scalar_t>(x);
    const auto rp = pointers<scalar_t>(r);
    const auto pp = pointers<scalar_t>(p);
    const auto sp = pointers<scalar_t>(s);
    const auto hp = pointers<scalar_t>(hr);
    const acc_t* sc = data_of<acc_t>(scalars);
    const int32_t* st = status.data_ptr<int32_t>();
    std::vector<acc_t> partials(layout.num_tasks * layout.row_chunks, acc_t(0));
    for_each_chunk(layout, [&](const ChunkLocation& loc) {
      if (st[loc.task] != 0) {
        return;
      }
      const acc_t inv_lam = acc_t(1) / per_task_or<scalar_t>(lam_per_task, loc.task, lam);
      const acc_t alpha = sc[loc.task * kCgNumScalars + kCgAlpha];
      const acc_t beta = sc[loc.task * kCgNumScalars + kCgBeta];
      scalar_t* xc = xp[loc.tensor] + loc.offset;
      scalar_t* rc = rp[loc.tensor] + loc.offset;
      scalar_t* pc = pp[loc.tensor] + loc.offset;
      scalar_t* scc = sp[loc.tensor] + loc.offset;
      const scalar_t* hc = hp[loc.tensor] + loc.offset;
      partials[loc.task * layout.row_chunks + loc.partial_index] =
          chunk_sum<acc_t>(loc.length, [&](int64_t i) {
            const acc_t r_new = cg_update_element(xc[i], rc[i], pc[i], scc[i], hc[i], inv_lam, alpha, beta);
            return r_new * r_new;
          });
    });
    acc_t* scw = data_of<acc_t>(scalars);
    int32_t* stw = status.data_ptr<int32_t>();
    int64_t* it = iterations.data_ptr<int64_t>();
    finalize_rows(layout, partials, [&](int64_t t, acc_t sum) {
      cg_finalize_update(scw + t * kCgNumScalars, stw + t, it + t, sum, static_cast<acc_t>(tol));
    });
  });
}

}  // namespace
}  // namespace imaml_ext

TORCH_LIBRARY_IMPL(imaml_ext, CPU, m) {
  m.impl("prox_sgd_step_", &imaml_ext::prox_sgd_step_cpu);
  m.impl("cg_init_", &imaml_ext::cg_init_cpu);
  m.impl("cg_alpha_", &imaml_ext::cg_alpha_cpu);
  m.impl("cg_update_", &imaml_ext::cg_update_cpu);
}
