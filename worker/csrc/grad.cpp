// tch cannot assign a parameter's `.grad`. The gradient buckets (src/comm/buckets.rs)
// make each trainable parameter's gradient a view into a flat buffer: autograd's
// AccumulateGrad then adds into that view in place (grad mode is off during
// backward), so the all-reduce reads the buffer with no copy.
#include <ATen/core/Tensor.h>

// Returns 0 on success, 1 if libtorch threw (shape or device mismatch).
extern "C" int declip_set_grad(const at::Tensor* param, const at::Tensor* grad) {
  try {
    param->mutable_grad() = *grad;
    return 0;
  } catch (...) {
    return 1;
  }
}
