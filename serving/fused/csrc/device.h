// The few CUDA C++ constructs the resident kernels use, spelled so that one source compiles two ways:
// - with nvcc, as CUDA (a block's threads, __syncthreads, warp shuffles, dynamic shared memory);
// - with a C++ compiler, on CPU threads: each block's threads are real threads that meet at real
//   barriers and exchange shuffled values through memory, so the very kernel a GPU runs is tested on
//   a machine without one (far too slow to serve: a barrier is a mutex here). With the environment's
//   GENSERVE_EMULATION_SEED set, a block's threads run one at a time in an order drawn at every barrier
//   (Scheduler, below): a hunt for races.
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

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
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

// One thread of a block at a time, the next drawn at random (a seeded generator) from those free to run
// whenever the running one reaches a barrier or ends. A read that races another thread's write between
// the same two barriers then sees the write or not depending on the seed, where free-running CPU threads
// may always order them the same way; and a barrier some threads never reach (one in a branch) is
// reported as an error instead of hanging.
class Scheduler {
 public:
  Scheduler(int threads, uint64_t seed) : free_(threads, true), done_(threads, false), turns_(threads), random_(seed) {}

  void begin() {  // hands the first turn out, once every thread is waiting for its own
    const std::lock_guard<std::mutex> lock(mutex_);
    pass();
  }

  void wait_turn(int thread) {
    std::unique_lock<std::mutex> lock(mutex_);
    wait(lock, thread);
  }

  // `thread` arrives at barrier `id` (0: the block's, 1 + w: warp w's) of `parties` threads.
  void arrive(int thread, int id, int parties) {
    std::unique_lock<std::mutex> lock(mutex_);
    std::vector<int>& waiting = waiting_[id];
    waiting.push_back(thread);
    free_[thread] = false;
    if (static_cast<int>(waiting.size()) == parties) {
      for (int t : waiting) free_[t] = true;
      waiting.clear();
    }
    pass();
    wait(lock, thread);
  }

  void finish(int thread) {
    const std::lock_guard<std::mutex> lock(mutex_);
    free_[thread] = false;
    done_[thread] = true;
    pass();
  }

 private:
  void pass() {  // the mutex held
    std::vector<int> candidates;
    for (int t = 0; t < static_cast<int>(free_.size()); ++t)
      if (free_[t]) candidates.push_back(t);
    if (candidates.empty()) {
      for (bool done : done_) failed_ = failed_ || !done;  // all waiting at barriers the others never reach
      for (std::condition_variable& turn : turns_) turn.notify_all();
      return;
    }
    holder_ = candidates[std::uniform_int_distribution<size_t>(0, candidates.size() - 1)(random_)];
    turns_[holder_].notify_all();
  }

  void wait(std::unique_lock<std::mutex>& lock, int thread) {
    turns_[thread].wait(lock, [&] { return holder_ == thread || failed_; });
    if (failed_) throw std::runtime_error("a barrier that some of the block's threads never reach");
  }

  std::mutex mutex_;
  std::vector<bool> free_, done_;  // free: may run (neither at an incomplete barrier nor done)
  std::vector<std::condition_variable> turns_;
  std::map<int, std::vector<int>> waiting_;  // by barrier
  std::mt19937_64 random_;
  int holder_ = -1;
  bool failed_ = false;
};

// What CUDA tells a thread about itself, and what its block shares.
struct ThreadContext {
  int thread = 0, threads = 0;
  int64_t block = 0;
  Barrier* block_barrier = nullptr;
  Barrier* warp_barrier = nullptr;
  Scheduler* scheduler = nullptr;  // where the threads run one at a time: it keeps the barriers
  float* warp_exchange = nullptr;  // one float per lane of this thread's warp
  float* shared = nullptr;
};

inline thread_local ThreadContext current;

inline void sync_threads() {
  if (current.scheduler) current.scheduler->arrive(current.thread, 0, current.threads);
  else current.block_barrier->wait();
}

inline void sync_warp() {
  if (current.scheduler) current.scheduler->arrive(current.thread, 1 + current.thread / kWarp, kWarp);
  else current.warp_barrier->wait();
}

// __shfl_xor_sync: every lane publishes its value, then reads its partner's once all have.
inline float shuffle_xor(float value, int lane_mask) {
  const int lane = current.thread % kWarp;
  current.warp_exchange[lane] = value;
  sync_warp();
  const float partner = current.warp_exchange[lane ^ lane_mask];
  sync_warp();  // every partner read before the next shuffle overwrites
  return partner;
}

// GENSERVE_EMULATION_SEED, if set: threads run one at a time (Scheduler), block b's order drawn with seed + b.
inline std::optional<uint64_t> schedule_seed() {
  const char* seed = std::getenv("GENSERVE_EMULATION_SEED");
  if (!seed || !*seed) return std::nullopt;
  return std::stoull(seed);
}

// kernel<<<blocks, threads, shared_bytes>>>(args...), one block after another. Where the threads run one
// at a time, each block's shared memory starts as NaNs, so that a read of what no thread wrote shows.
template <class Kernel, class... Args>
void launch(int64_t blocks, int threads, size_t shared_bytes, Kernel kernel, const Args&... args) {
  if (threads <= 0 || threads % kWarp != 0) throw std::invalid_argument("threads: a positive multiple of 32");
  const size_t shared_floats = (shared_bytes + sizeof(float) - 1) / sizeof(float);
  const std::optional<uint64_t> seed = schedule_seed();
  std::vector<float> shared(shared_floats);
  std::vector<float> exchange(threads);
  for (int64_t block = 0; block < blocks; ++block) {
    Barrier block_barrier(threads);
    std::vector<std::unique_ptr<Barrier>> warp_barriers;
    for (int w = 0; w < threads / kWarp; ++w) warp_barriers.push_back(std::make_unique<Barrier>(kWarp));
    std::unique_ptr<Scheduler> scheduler;
    if (seed) {
      scheduler = std::make_unique<Scheduler>(threads, *seed + static_cast<uint64_t>(block));
      std::fill(shared.begin(), shared.end(), std::numeric_limits<float>::quiet_NaN());
    }
    std::mutex error_mutex;
    std::string error;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        current = {t, threads, block, &block_barrier, warp_barriers[t / kWarp].get(), scheduler.get(),
                   exchange.data() + t / kWarp * kWarp, shared.data()};
        try {
          if (scheduler) scheduler->wait_turn(t);
          kernel(args...);
          if (scheduler) scheduler->finish(t);
        } catch (const std::exception& failure) {  // the scheduler's: a thread cannot throw past its own end
          const std::lock_guard<std::mutex> lock(error_mutex);
          if (error.empty()) error = failure.what();
        }
      });
    if (scheduler) scheduler->begin();
    for (std::thread& thread : pool) thread.join();
    if (!error.empty()) throw std::runtime_error("block " + std::to_string(block) + ": " + error);
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
