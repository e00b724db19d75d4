// Bias add and tanh-approximate GELU (GPT-2's MLP activation) for XLA:CPU: forward and
// backward as XLA FFI custom calls, float32.
//
//   h, y, dy, dh   [R, F]   (R = all leading dimensions: the MLP's hidden pre-activations)
//   bias, dbias    [P, F]   (see Rows in kernels.h)
//
// With z = h + bias and u = c·(z + 0.044715·z³), c = sqrt(2/π):
//   y  = 0.5·z·(1 + tanh u)
//   dh = dy·(0.5·(1 + tanh u) + 0.5·z·(1 - tanh² u)·c·(1 + 3·0.044715·z²)),  dbias = Σ_rows dh
// The backward recomputes z and tanh u from h (nothing but h is saved), and sums dbias in the
// same pass over the rows.

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace {

constexpr int64_t kChunk = 16;  // rows per unit of work
constexpr float kC = 0.7978845608028654f;  // sqrt(2/π)
constexpr float kA = 0.044715f;

// tanh u = 1 - 2/(exp(2u) + 1), with u clamped to ±10 (tanh is 1 to float precision there).
inline vf vtanh(vf u) {
  u = u > 10.0f ? splat(10.0f) : u;
  u = u < -10.0f ? splat(-10.0f) : u;
  return 1.0f - 2.0f / (vexp(u + u) + 1.0f);
}

inline float stanh(float u) { return std::tanh(u); }

void forward(ffi::ThreadPool& pool, const Rows& n, const float* h, const float* bias, float* y) {
  const std::vector<Chunk> work = chunks(n, kChunk);
  const int64_t f = n.d;
  parallel_for(pool, work.size(), [&](int64_t c) {
    const Chunk& ch = work[c];
    const float* b = bias + ch.group * f;
    for (int64_t r = ch.begin; r < ch.end; ++r) {
      const float* hr = h + r * f;
      float* yr = y + r * f;
      int64_t j = 0;
      for (; j + kVec <= f; j += kVec) {
        const vf z = load(hr + j) + load(b + j);
        store(yr + j, 0.5f * z * (1.0f + vtanh(kC * (z + kA * z * z * z))));
      }
      for (; j < f; ++j) {
        const float z = hr[j] + b[j];
        yr[j] = 0.5f * z * (1.0f + stanh(kC * (z + kA * z * z * z)));
      }
    }
  });
}

void backward(ffi::ThreadPool& pool, const Rows& n, const float* h, const float* bias, const float* dy,
              float* dh, float* dbias) {
  const std::vector<Chunk> work = chunks(n, kChunk);
  const int64_t f = n.d, fp = round_up(f, kVec);
  std::vector<float> parts(work.size() * fp, 0.0f);  // per chunk: Σ dh
  parallel_for(pool, work.size(), [&](int64_t c) {
    const Chunk& ch = work[c];
    const float* b = bias + ch.group * f;
    float* part = parts.data() + c * fp;
    for (int64_t r = ch.begin; r < ch.end; ++r) {
      const float* hr = h + r * f;
      const float* gr = dy + r * f;
      float* out = dh + r * f;
      int64_t j = 0;
      for (; j + kVec <= f; j += kVec) {
        const vf z = load(hr + j) + load(b + j), z2 = z * z;
        const vf t = vtanh(kC * z * (1.0f + kA * z2));
        const vf g = load(gr + j) * (0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kC * (1.0f + 3.0f * kA * z2));
        store(out + j, g);
        store(part + j, load(part + j) + g);
      }
      for (; j < f; ++j) {
        const float z = hr[j] + b[j], z2 = z * z;
        const float t = stanh(kC * z * (1.0f + kA * z2));
        const float g = gr[j] * (0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * kC * (1.0f + 3.0f * kA * z2));
        out[j] = g;
        part[j] += g;
      }
    }
  });
  float* const sums[] = {dbias};
  add_parts(parts, work, n, 1, sums);
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer h, ffi::AnyBuffer bias, ffi::Result<ffi::AnyBuffer> y) {
  Rows n;
  if (auto err = rows_of(h, bias, "bias_gelu", n); err.failure()) return err;
  forward(pool, n, in(h), in(bias), out(y));
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer h, ffi::AnyBuffer bias, ffi::AnyBuffer dy,
                    ffi::Result<ffi::AnyBuffer> dh, ffi::Result<ffi::AnyBuffer> dbias) {
  Rows n;
  if (auto err = rows_of(h, bias, "bias_gelu", n); err.failure()) return err;
  backward(pool, n, in(h), in(bias), in(dy), out(dh), out(dbias));
  return ffi::Error::Success();
}

}  // namespace

#define ARG .Arg<ffi::AnyBuffer>()
#define RET .Ret<ffi::AnyBuffer>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(BigmodelBiasGeluForward, Forward, ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() ARG ARG RET);
XLA_FFI_DEFINE_HANDLER_SYMBOL(BigmodelBiasGeluBackward, Backward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() ARG ARG ARG RET RET);
