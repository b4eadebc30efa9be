// The few CUDA C++ constructs the resident kernels use, spelled so that one source compiles two ways:
// - with nvcc, as CUDA (a block's threads, __syncthreads, warp shuffles, dynamic shared memory);
// - with a C++ compiler, on CPU threads: each block's threads are real threads that meet at real
//   barriers and exchange shuffled values through memory, so the very kernel a GPU runs is tested on
//   a machine without one (far too slow to serve: a barrier is a mutex here).
#pragma once

#ifdef __CUDACC__

#define GENSERVE_GLOBAL __global__
#define GENSERVE_DEVICE __device__ __forceinline__
#define GENSERVE_HOST_DEVICE __host__ __device__ inline
#define GENSERVE_UNROLL _Pragma("unroll")
#define GENSERVE_THREAD static_cast<int>(threadIdx.x)
#define GENSERVE_THREADS static_cast<int>(blockDim.x)
#define GENSERVE_BLOCK static_cast<int64_t>(blockIdx.x)
#define GENSERVE_SYNC() __syncthreads()
// Every lane of the warp takes part (the kernels keep their control flow uniform around shuffles).
#define GENSERVE_SHUFFLE_XOR(value, lane_mask) __shfl_xor_sync(0xffffffffu, value, lane_mask)
#define GENSERVE_SHARED_FLOATS(name) extern __shared__ float name[]
// A product rounded on its own, never fused into a following addition (nvcc fuses by default).
#define GENSERVE_MUL(a, b) __fmul_rn(a, b)

namespace genserve {
using Float4 = float4;  // four floats moved by one 16-byte load or store
}  // namespace genserve

#else

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace genserve {
struct alignas(16) Float4 {
  float x, y, z, w;
};
}  // namespace genserve

namespace genserve::emulation {

// A reusable barrier for `count` threads (C++17 has none).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      all_arrived_.notify_all();
      return;
    }
    all_arrived_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  const int count_;
  int arrived_ = 0;
  int64_t generation_ = 0;
};

constexpr int kWarp = 32;

// What CUDA tells a thread about itself, and what its block shares.
struct ThreadContext {
  int thread = 0, threads = 0;
  int64_t block = 0;
  Barrier* block_barrier = nullptr;
  Barrier* warp_barrier = nullptr;
  float* warp_exchange = nullptr;  // one float per lane of this thread's warp
  float* shared = nullptr;
};

inline thread_local ThreadContext current;

inline void sync_threads() { current.block_barrier->wait(); }

// __shfl_xor_sync: every lane publishes its value, then reads its partner's once all have.
inline float shuffle_xor(float value, int lane_mask) {
  const int lane = current.thread % kWarp;
  current.warp_exchange[lane] = value;
  current.warp_barrier->wait();
  const float partner = current.warp_exchange[lane ^ lane_mask];
  current.warp_barrier->wait();  // every partner read before the next shuffle overwrites
  return partner;
}

// kernel<<<blocks, threads, shared_bytes>>>(args...), one block after another.
template <class Kernel, class... Args>
void launch(int64_t blocks, int threads, size_t shared_bytes, Kernel kernel, const Args&... args) {
  if (threads <= 0 || threads % kWarp != 0) throw std::invalid_argument("threads: a positive multiple of 32");
  const size_t shared_floats = (shared_bytes + sizeof(float) - 1) / sizeof(float);
  std::vector<float> shared(shared_floats);
  std::vector<float> exchange(threads);
  for (int64_t block = 0; block < blocks; ++block) {
    Barrier block_barrier(threads);
    std::vector<std::unique_ptr<Barrier>> warp_barriers;
    for (int w = 0; w < threads / kWarp; ++w) warp_barriers.push_back(std::make_unique<Barrier>(kWarp));
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        current = {t, threads, block, &block_barrier, warp_barriers[t / kWarp].get(),
                   exchange.data() + t / kWarp * kWarp, shared.data()};
        kernel(args...);
      });
    for (std::thread& thread : pool) thread.join();
  }
}

}  // namespace genserve::emulation

// Internal linkage: the CUDA library's kernel has the same name (its host stub), and the two libraries
// share a process.
#define GENSERVE_GLOBAL static
#define GENSERVE_DEVICE inline
#define GENSERVE_HOST_DEVICE inline
#define GENSERVE_UNROLL
#define GENSERVE_THREAD (::genserve::emulation::current.thread)
#define GENSERVE_THREADS (::genserve::emulation::current.threads)
#define GENSERVE_BLOCK (::genserve::emulation::current.block)
#define GENSERVE_SYNC() ::genserve::emulation::sync_threads()
#define GENSERVE_SHUFFLE_XOR(value, lane_mask) ::genserve::emulation::shuffle_xor(value, lane_mask)
#define GENSERVE_SHARED_FLOATS(name) float* name = ::genserve::emulation::current.shared
#define GENSERVE_MUL(a, b) ((a) * (b))  // ISO C++ (-std=c++17) does not fuse it either

#endif
