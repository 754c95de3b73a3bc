#include "tensor_lists.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

#include "ops_math.h"

namespace imaml_ext {

std::string describe(const at::Tensor& t) {
  std::ostringstream out;
  out << "Tensor(shape=" << t.sizes() << ", dtype=" << t.scalar_type()
      << ", device=" << t.device() << ")";
  return out.str();
}

namespace {

void check_length(const char* op, const char* name, at::TensorList list,
                  const char* like_name, at::TensorList like) {
  TORCH_CHECK_VALUE(list.size() == like.size(), op, ": ", name, " must hold one tensor per ",
                    like_name, " tensor (", like.size(), "); got ", list.size());
}

// t (list entry i of `name`) has ref's dtype and device, and is contiguous.
void check_matches(const char* op, const char* name, size_t i, const at::Tensor& t,
                   const char* like_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, "[", i,
                   "] must have the dtype of ", like_name, "[", i, "] (", ref.scalar_type(),
                   "); got ", describe(t));
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, "[", i, "] must be on the device of ",
                    like_name, "[", i, "] (", ref.device(), "); got ", describe(t));
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, "[", i,
                    "] must be contiguous; got strides ", t.strides());
}

}  // namespace

ListLayout make_layout(at::TensorList tensors) {
  ListLayout layout;
  layout.num_tasks = tensors.empty() ? 0 : tensors[0].size(0);
  layout.chunk_start.push_back(0);
  for (const at::Tensor& t : tensors) {
    const int64_t numel = layout.num_tasks == 0 ? 0 : t.numel() / layout.num_tasks;
    const int64_t cpt = chunks_per_task(numel);
    layout.numel_per_task.push_back(numel);
    layout.task_chunk_offset.push_back(layout.row_chunks);
    layout.row_chunks += cpt;
    layout.chunk_start.push_back(layout.chunk_start.back() + cpt * layout.num_tasks);
  }
  return layout;
}

int64_t check_task_list(const char* op, const char* name, at::TensorList list) {
  TORCH_CHECK_VALUE(!list.empty(), op, ": ", name,
                    " must be a non-empty list of [T, ...] tensors; got an empty list");
  const at::Tensor& first = list[0];
  TORCH_CHECK_VALUE(first.dim() >= 1 && first.size(0) >= 1, op, ": ", name,
                    "[0] must have a leading task dimension T >= 1; got ", describe(first));
  const int64_t num_tasks = first.size(0);
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                     op, ": ", name, "[", i, "] must be float32 or float64; got ", describe(t));
    TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), op, ": ", name, "[", i,
                     "] must have the dtype of ", name, "[0] (", first.scalar_type(),
                     "); got ", describe(t));
    TORCH_CHECK_VALUE(t.device() == first.device(), op, ": ", name, "[", i,
                      "] must be on the device of ", name, "[0] (", first.device(),
                      "); got ", describe(t));
    TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) == num_tasks, op, ": ", name, "[", i,
                      "] must have T = ", num_tasks, " tasks in its first dimension (as ",
                      name, "[0]); got ", describe(t));
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, "[", i,
                      "] must be contiguous; got strides ", t.strides());
  }
  return num_tasks;
}

void check_same_list(
    const char* op, const char* name, at::TensorList list,
    const char* like_name, at::TensorList like) {
  check_length(op, name, list, like_name, like);
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::Tensor& ref = like[i];
    TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, "[", i, "] must have the shape of ",
                      like_name, "[", i, "] ", ref.sizes(), "; got ", describe(t));
    check_matches(op, name, i, t, like_name, ref);
  }
}

void check_anchor_list(
    const char* op, const char* name, at::TensorList anchors,
    const char* like_name, at::TensorList like) {
  check_length(op, name, anchors, like_name, like);
  for (size_t i = 0; i < anchors.size(); ++i) {
    const at::Tensor& t = anchors[i];
    const at::Tensor& ref = like[i];
    TORCH_CHECK_VALUE(t.sizes() == ref.sizes().slice(1), op, ": ", name, "[", i,
                      "] must have the shape of ", like_name, "[", i, "] without its task dimension ",
                      ref.sizes().slice(1), "; got ", describe(t));
    check_matches(op, name, i, t, like_name, ref);
  }
}

void check_per_task(
    const char* op, const char* name, const c10::optional<at::Tensor>& t,
    int64_t num_tasks, const at::Tensor& like) {
  if (!t.has_value()) {
    return;
  }
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == num_tasks && t->is_contiguous(), op, ": ",
                    name, " must be a contiguous [T] = [", num_tasks, "] tensor; got ", describe(*t));
  TORCH_CHECK_TYPE(t->scalar_type() == like.scalar_type(), op, ": ", name,
                   " must have the parameters' dtype (", like.scalar_type(), "); got ", describe(*t));
  TORCH_CHECK_VALUE(t->device() == like.device(), op, ": ", name,
                    " must be on the parameters' device (", like.device(), "); got ", describe(*t));
}

void check_state(
    const char* op, const char* name, const at::Tensor& t,
    c10::IntArrayRef shape, c10::ScalarType dtype, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.sizes() == shape && t.scalar_type() == dtype && t.is_contiguous() &&
                        t.device() == like.device(),
                    op, ": ", name, " must be a contiguous ", dtype, " tensor of shape ", shape,
                    " on ", like.device(), "; got ", describe(t));
}

void check_finite_nonnegative(const char* op, const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0.0, op, ": ", name,
                    " must be a finite number >= 0; got ", value);
}

}  // namespace imaml_ext
