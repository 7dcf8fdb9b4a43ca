// Run by scripts/setup-libtorch: proves the assembled libtorch links, starts,
// multiplies matrices and runs autograd, before anything is built against it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/generated/variable_factories.h>
#include <cmath>
#include <cstdio>

int main() {
  auto a = torch::ones({2, 3}, at::TensorOptions().requires_grad(true));
  auto b = torch::full({3, 2}, 2.0);
  auto loss = at::matmul(a, b).sum();  // every entry of a*b is 6, so loss = 24
  loss.backward();
  const double value = loss.item<double>();
  const double grad = a.grad().sum().item<double>();  // d/da = rowsum(b) = 4 per entry
  if (std::fabs(value - 24.0) > 1e-9 || std::fabs(grad - 24.0) > 1e-9) {
    std::fprintf(stderr, "libtorch self-test FAILED: loss %g, grad sum %g\n", value, grad);
    return 1;
  }
  std::printf("libtorch self-test ok: matmul 24, backward grad sum 24 (%d threads)\n",
              at::get_num_threads());
  return 0;
}
