// tch exposes autocast on/off but not its dtype, and CUDA autocast defaults to
// float16. DeCLIP's GPU default is bfloat16, so the trainer sets it here.
#include <ATen/autocast_mode.h>

extern "C" void declip_set_cuda_autocast_bf16(int bf16) {
  at::autocast::set_autocast_dtype(at::kCUDA, bf16 ? at::kBFloat16 : at::kHalf);
}

extern "C" int declip_cuda_autocast_is_bf16() {
  return at::autocast::get_autocast_dtype(at::kCUDA) == at::kBFloat16;
}
