// Per-sample noise rows drawn in parallel, each from its own generator.
//
// Row i is what `torch.rand(shape, generator=torch.Generator().manual_seed(seeds[i]))` draws (or
// torch.randn when `gaussian`): the same ATen generator and the same fill, only without a Python
// loop around them. The engine draws the noise of every sample it admits (thousands at large batch
// sizes), and one generator per row lets the rows run on separate threads.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace genserve {
namespace {

at::Tensor stream_noise(const at::Tensor& seeds, at::IntArrayRef shape, bool gaussian) {
  TORCH_CHECK(seeds.device().is_cpu() && seeds.scalar_type() == at::kLong && seeds.dim() == 1,
              "seeds: expected a 1-dim int64 CPU tensor, got ", seeds.sizes(), " ", seeds.scalar_type());
  const at::Tensor keys = seeds.contiguous();
  const int64_t* key = keys.data_ptr<int64_t>();
  for (int64_t i = 0; i < keys.size(0); ++i) TORCH_CHECK(key[i] >= 0, "seeds: must be non-negative");
  std::vector<int64_t> sizes{keys.size(0)};
  sizes.insert(sizes.end(), shape.begin(), shape.end());
  at::Tensor noise = at::empty(sizes, at::kFloat);
  at::parallel_for(0, keys.size(0), 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(key[i]));
      at::Tensor row = noise.select(0, i);
      if (gaussian) {
        row.normal_(0.0, 1.0, generator);
      } else {
        row.uniform_(0.0, 1.0, generator);
      }
    }
  });
  return noise;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(genserve, m) {
  m.def("stream_noise(Tensor seeds, int[] shape, bool gaussian) -> Tensor");
}

TORCH_LIBRARY_IMPL(genserve, CPU, m) { m.impl("stream_noise", &stream_noise); }

}  // namespace genserve
