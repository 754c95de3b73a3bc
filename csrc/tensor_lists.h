// Host-side description of a meta-batch of tensor lists ([T, *shape] per
// network parameter) and the guards every op's entry applies, shared by the
// CPU and CUDA backends so both reject the same inputs with the same words.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace imaml_ext {

// Chunk bookkeeping of a list of [T, *shape] tensors (see ops_math.h).
struct ListLayout {
  int64_t num_tasks = 0;
  int64_t row_chunks = 0;                  // chunks of one task, all tensors
  std::vector<int64_t> numel_per_task;     // per tensor
  std::vector<int64_t> task_chunk_offset;  // per tensor, within a task's row
  std::vector<int64_t> chunk_start;        // n + 1 prefix sums of T * chunks

  int64_t total_chunks() const { return chunk_start.back(); }
  int64_t num_tensors() const { return static_cast<int64_t>(numel_per_task.size()); }
};

ListLayout make_layout(at::TensorList tensors);

// "Tensor(shape=[...], dtype=..., device=...)", for error messages.
std::string describe(const at::Tensor& t);

// `list` holds [T, *shape] tensors of one floating dtype on one device,
// contiguous, T >= 1 and the same T for all. Returns T.
int64_t check_task_list(const char* op, const char* name, at::TensorList list);

// `list` matches `like` tensor by tensor: same length, shapes, dtype, device.
void check_same_list(
    const char* op, const char* name, at::TensorList list,
    const char* like_name, at::TensorList like);

// anchors[i] has the shape of like[i] without its task dimension.
void check_anchor_list(
    const char* op, const char* name, at::TensorList anchors,
    const char* like_name, at::TensorList like);

// An optional per-task [T] tensor of `like`'s dtype and device.
void check_per_task(
    const char* op, const char* name, const c10::optional<at::Tensor>& t,
    int64_t num_tasks, const at::Tensor& like);

// A per-task state tensor of a fixed shape and dtype on `like`'s device.
void check_state(
    const char* op, const char* name, const at::Tensor& t,
    c10::IntArrayRef shape, c10::ScalarType dtype, const at::Tensor& like);

void check_finite_nonnegative(const char* op, const char* name, double value);

}  // namespace imaml_ext
