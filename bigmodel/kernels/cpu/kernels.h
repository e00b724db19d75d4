// Shared by bigmodel's XLA:CPU kernels (attention.cc, norm.cc, gelu.cc): 16-float
// vectors through GCC vector extensions, a vectorised exp, a parallel loop over XLA's
// intra-op thread pool, float32 buffer access, and rows with per-feature parameters. All of it
// has internal linkage: each kernel source gets its own copy.

#ifndef BIGMODEL_CPU_KERNELS_H_
#define BIGMODEL_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kVec = 16;  // floats per vector

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) {
  vf v;
  for (int i = 0; i < kVec; ++i) v[i] = x;
  return v;
}
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// exp for x <= 88.7 to about 2 ulp (Cody-Waite reduction, degree-6 polynomial); flushes to a
// tiny positive number below -87.3 (callers zero what they mask).
inline vf vexp(vf x) {
  x = x < -87.3f ? splat(-87.3f) : x;
  const vf t = x * 1.44269504088896341f;
  const vf n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// Runs fn(0..n-1) on the calling thread and the pool's threads. A helper that starts after
// the work ran out returns at once, so the caller never waits on a task that has not started.
inline void parallel_for(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct Job {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n = 0;
    const std::function<void(int64_t)>* fn = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto job = std::make_shared<Job>();
  job->n = n;
  job->fn = &fn;
  const auto work = [job] {
    int64_t mine = 0;
    for (int64_t i; (i = job->next.fetch_add(1)) < job->n; ++mine) (*job->fn)(i);
    if (mine && job->done.fetch_add(mine) + mine == job->n) {
      std::lock_guard<std::mutex> lock(job->mu);
      job->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(std::function<void()>(work));
  work();
  std::unique_lock<std::mutex> lock(job->mu);
  job->cv.wait(lock, [&] { return job->done.load() == job->n; });
}

inline const float* in(const ffi::AnyBuffer& b) { return static_cast<const float*>(b.untyped_data()); }
inline float* out(ffi::Result<ffi::AnyBuffer>& b) { return static_cast<float*>(b->untyped_data()); }

inline int64_t leading(const ffi::AnyBuffer::Dimensions& dims, int64_t trailing) {
  int64_t z = 1;
  for (int64_t i = 0; i + trailing < static_cast<int64_t>(dims.size()); ++i) z *= dims[i];
  return z;
}

// A tensor [R, D] (R = all leading dimensions) with per-feature parameters [P, D]: P = 1, or a
// vmapped batch of P parameter rows, each shared by R/P consecutive rows.
struct Rows {
  int64_t rows, d, groups;  // R, D, P
};

inline ffi::Error rows_of(const ffi::AnyBuffer& x, const ffi::AnyBuffer& param, const char* what, Rows& n) {
  const auto xd = x.dimensions(), pd = param.dimensions();
  if (xd.size() < 1 || pd.size() < 1 || xd.back() != pd.back())
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": x [.., D] and its parameters [.., D] need the same last dimension");
  n = Rows{leading(xd, 1), xd.back(), leading(pd, 1)};
  if (n.groups < 1 || n.rows % n.groups)
    return ffi::Error::InvalidArgument(std::string(what) +
                                       ": rows of x do not split evenly over the parameters' leading dimensions");
  return ffi::Error::Success();
}

// Consecutive rows [begin, end) that share parameter row `group`: the unit of parallel work.
struct Chunk {
  int64_t begin, end, group;
};

inline std::vector<Chunk> chunks(const Rows& n, int64_t size) {
  std::vector<Chunk> out;
  const int64_t per_group = n.rows / n.groups;
  for (int64_t g = 0; g < n.groups; ++g)
    for (int64_t r = g * per_group; r < (g + 1) * per_group; r += size)
      out.push_back({r, std::min(r + size, (g + 1) * per_group), g});
  return out;
}

// Gradients of per-feature parameters are sums over rows: each chunk c writes its part of sum
// k to parts[(c·count + k)·Dp ..] (Dp = D rounded up to a vector), and this adds the parts in
// chunk order into sums[k] [P, D]. The order is fixed, so results do not depend on which
// thread ran which chunk.
inline void add_parts(const std::vector<float>& parts, const std::vector<Chunk>& work, const Rows& n,
               int count, float* const* sums) {
  const int64_t dp = round_up(n.d, kVec);
  for (int k = 0; k < count; ++k) std::fill(sums[k], sums[k] + n.groups * n.d, 0.0f);
  for (size_t c = 0; c < work.size(); ++c)
    for (int k = 0; k < count; ++k) {
      const float* part = parts.data() + (c * count + k) * dp;
      float* sum = sums[k] + work[c].group * n.d;
      for (int64_t j = 0; j < n.d; ++j) sum[j] += part[j];
    }
}

}  // namespace

#endif  // BIGMODEL_CPU_KERNELS_H_
