// LayerNorm and RMSNorm over the last axis for XLA:CPU: forward and backward as XLA FFI
// custom calls, float32.
//
//   x, y, dy, dx   [R, D]   (R = all leading dimensions)
//   scale, bias    [P, D]   (P = 1, or a vmapped batch of parameters: rows r·P/R .. share one)
//   mean, rstd     [R]      (saved by the forward for the backward; mean is 0 for RMSNorm)
//
// LayerNorm (center = true): y = (x - mean)·rstd·scale + bias, rstd = 1/sqrt(var + eps), var
// the biased variance from a second pass over the row (no E[x²] - E[x]² cancellation).
// RMSNorm (center = false): y = x·rstd·scale + bias, rstd = 1/sqrt(mean(x²) + eps).
// Backward, with x̂ = (x - mean)·rstd and g = dy·scale:
//   dx = rstd·(g - mean(g) - x̂·mean(g·x̂))   (RMSNorm drops the mean(g) term)
//   dscale = Σ_rows dy·x̂,  dbias = Σ_rows dy
// Rows go in chunks of kChunk over XLA's intra-op thread pool; each chunk sums its own part of
// dscale and dbias (`add_parts`).

#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace {

constexpr int64_t kChunk = 64;  // rows per unit of work

// Σ f(j) over j < d, vectorised with a scalar tail.
template <typename F>
inline float row_sum(int64_t d, F f) {
  vf acc{};
  int64_t j = 0;
  for (; j + kVec <= d; j += kVec) acc += f(j);
  float total = 0.0f;
  for (int i = 0; i < kVec; ++i) total += acc[i];
  for (; j < d; ++j) total += f.scalar(j);
  return total;
}

void forward(ffi::ThreadPool& pool, const Rows& n, const float* x, const float* scale,
             const float* bias, float* y, float* mean, float* rstd, float eps, bool center) {
  const std::vector<Chunk> work = chunks(n, kChunk);
  const int64_t d = n.d;
  parallel_for(pool, work.size(), [&](int64_t c) {
    const Chunk& ch = work[c];
    const float* s = scale + ch.group * d;
    const float* b = bias + ch.group * d;
    for (int64_t r = ch.begin; r < ch.end; ++r) {
      const float* xr = x + r * d;
      float* yr = y + r * d;
      struct Sum {
        const float* p;
        vf operator()(int64_t j) const { return load(p + j); }
        float scalar(int64_t j) const { return p[j]; }
      };
      const float mu = center ? row_sum(d, Sum{xr}) / d : 0.0f;
      struct Square {
        const float* p;
        float m;
        vf operator()(int64_t j) const {
          const vf v = load(p + j) - m;
          return v * v;
        }
        float scalar(int64_t j) const { return (p[j] - m) * (p[j] - m); }
      };
      const float inv = 1.0f / std::sqrt(row_sum(d, Square{xr, mu}) / d + eps);
      int64_t j = 0;
      for (; j + kVec <= d; j += kVec) store(yr + j, (load(xr + j) - mu) * inv * load(s + j) + load(b + j));
      for (; j < d; ++j) yr[j] = (xr[j] - mu) * inv * s[j] + b[j];
      mean[r] = mu;
      rstd[r] = inv;
    }
  });
}

void backward(ffi::ThreadPool& pool, const Rows& n, const float* x, const float* scale,
              const float* mean, const float* rstd, const float* dy, float* dx, float* dscale,
              float* dbias, bool center) {
  const std::vector<Chunk> work = chunks(n, kChunk);
  const int64_t d = n.d, dp = round_up(d, kVec);
  std::vector<float> parts(work.size() * 2 * dp, 0.0f);  // per chunk: Σ dy·x̂, then Σ dy
  parallel_for(pool, work.size(), [&](int64_t c) {
    const Chunk& ch = work[c];
    const float* s = scale + ch.group * d;
    float* ps = parts.data() + c * 2 * dp;
    float* pb = ps + dp;
    for (int64_t r = ch.begin; r < ch.end; ++r) {
      const float* xr = x + r * d;
      const float* gr = dy + r * d;
      float* out = dx + r * d;
      const float mu = mean[r], inv = rstd[r];
      struct G {
        const float *g, *s;
        vf operator()(int64_t j) const { return load(g + j) * load(s + j); }
        float scalar(int64_t j) const { return g[j] * s[j]; }
      };
      struct GX {
        const float *g, *s, *x;
        float mu, inv;
        vf operator()(int64_t j) const { return load(g + j) * load(s + j) * ((load(x + j) - mu) * inv); }
        float scalar(int64_t j) const { return g[j] * s[j] * ((x[j] - mu) * inv); }
      };
      const float a = center ? row_sum(d, G{gr, s}) / d : 0.0f;
      const float b = row_sum(d, GX{gr, s, xr, mu, inv}) / d;
      int64_t j = 0;
      for (; j + kVec <= d; j += kVec) {
        const vf g = load(gr + j), xh = (load(xr + j) - mu) * inv;
        store(out + j, inv * (g * load(s + j) - a - xh * b));
        store(ps + j, load(ps + j) + g * xh);
        store(pb + j, load(pb + j) + g);
      }
      for (; j < d; ++j) {
        const float xh = (xr[j] - mu) * inv;
        out[j] = inv * (gr[j] * s[j] - a - xh * b);
        ps[j] += gr[j] * xh;
        pb[j] += gr[j];
      }
    }
  });
  float* const sums[] = {dscale, dbias};
  add_parts(parts, work, n, 2, sums);
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer bias,
                   ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                   ffi::Result<ffi::AnyBuffer> rstd, float eps, bool center) {
  Rows n;
  if (auto err = rows_of(x, scale, "norm", n); err.failure()) return err;
  if (bias.element_count() != scale.element_count())
    return ffi::Error::InvalidArgument("norm: bias and scale differ in size");
  forward(pool, n, in(x), in(scale), in(bias), out(y), out(mean), out(rstd), eps, center);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer mean,
                    ffi::AnyBuffer rstd, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::AnyBuffer> dscale, ffi::Result<ffi::AnyBuffer> dbias, bool center) {
  Rows n;
  if (auto err = rows_of(x, scale, "norm", n); err.failure()) return err;
  backward(pool, n, in(x), in(scale), in(mean), in(rstd), in(dy), out(dx), out(dscale), out(dbias), center);
  return ffi::Error::Success();
}

}  // namespace

#define ARG .Arg<ffi::AnyBuffer>()
#define RET .Ret<ffi::AnyBuffer>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(BigmodelNormForward, Forward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() ARG ARG ARG RET RET RET
                                  .Attr<float>("eps").Attr<bool>("center"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(BigmodelNormBackward, Backward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() ARG ARG ARG ARG ARG RET RET RET
                                  .Attr<bool>("center"));
