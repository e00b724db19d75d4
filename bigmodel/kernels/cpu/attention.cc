// Fused float32 attention for XLA:CPU: forward and backward as XLA FFI custom calls, for
// separate q, k, v and for self-attention's stacked projection.
//
// Layouts are the projections' own, so the model needs no head transposes:
//   q, o, dq      [Z, T, N, H]   (Z = all leading dimensions; N query heads of size H)
//   k, v, dk, dv  [Z, S, K, H]   (K key/value heads; N = G·K, query head n uses kv head n / G)
//   qkv, dqkv     [Z, T, N, 3, H] (the packed entry points: S = T, K = N)
//   lse           [Z, N, T]      (log-sum-exp of each row of scaled logits, kept for the backward)
// Causal attention lets query t see keys s <= t + S - T (the caller keeps S >= T).
//
// A unit of work is one (z, query head) in the forward and one (z, key/value head) in the
// backward. It runs over blocks of kBlock query rows: it computes a block's logits against
// only the keys the block can see, their softmax, and the products with V (forward) or the
// gradients (backward), without writing the T x S probabilities to memory. The products run
// through one register-blocked matmul kernel written with GCC vector extensions (16 floats a
// vector), compiled for the host CPU. Units are spread over XLA's intra-op thread pool.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

constexpr int64_t kBlock = 64;  // query rows per block

// Register tile of the matmul kernel: kRows rows of kCols vectors of C.
#ifdef __AVX512F__
constexpr int kRows = 6, kCols = 4;  // 24 accumulators of the 32 vector registers
#else
constexpr int kRows = 2, kCols = 2;  // narrower vector registers: each vector here is 2-4 of them
#endif

// C[R x 16·NV] (+)= A[R x k] · B[k x 16·NV]; element (r, p) of A is a[r·ar + p·ap], so the same
// kernel multiplies by A or by A's transpose. B and C rows are contiguous vectors.
template <int R, int NV>
inline void tile(const float* a, int64_t ar, int64_t ap, const float* b, int64_t ldb, float* c,
                 int64_t ldc, int64_t k, bool accumulate) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load(c + r * ldc + v * kVec) : vf{};
  for (int64_t p = 0; p < k; ++p) {
    vf bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b + p * ldb + v * kVec);
    for (int r = 0; r < R; ++r) {
      const float x = a[r * ar + p * ap];
      for (int v = 0; v < NV; ++v) acc[r][v] += x * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(c + r * ldc + v * kVec, acc[r][v]);
}

template <int NV, int R = kRows - 1>
inline void tail_rows(int64_t rows, const float* a, int64_t ar, int64_t ap, const float* b,
                      int64_t ldb, float* c, int64_t ldc, int64_t k, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R) return tile<R, NV>(a, ar, ap, b, ldb, c, ldc, k, accumulate);
    tail_rows<NV, R - 1>(rows, a, ar, ap, b, ldb, c, ldc, k, accumulate);
  }
}

template <int NV>
void panel(int64_t m, const float* a, int64_t ar, int64_t ap, const float* b, int64_t ldb, float* c,
           int64_t ldc, int64_t k, bool accumulate) {
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows)
    tile<kRows, NV>(a + i * ar, ar, ap, b, ldb, c + i * ldc, ldc, k, accumulate);
  if (i < m) tail_rows<NV>(m - i, a + i * ar, ar, ap, b, ldb, c + i * ldc, ldc, k, accumulate);
}

// C[m x n] (+)= A[m x k] · B[k x n] with n a multiple of 16.
void matmul(int64_t m, int64_t n, int64_t k, const float* a, int64_t ar, int64_t ap, const float* b,
            int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t j = 0;
  for (; j + kCols * kVec <= n; j += kCols * kVec)
    panel<kCols>(m, a, ar, ap, b + j, ldb, c + j, ldc, k, accumulate);
  for (; j + 2 * kVec <= n; j += 2 * kVec) panel<2>(m, a, ar, ap, b + j, ldb, c + j, ldc, k, accumulate);
  if (j < n) panel<1>(m, a, ar, ap, b + j, ldb, c + j, ldc, k, accumulate);
}

// Per-thread scratch memory, kept between calls: `sizes` floats each, in one allocation.
template <size_t N>
std::array<float*, N> scratch(const std::array<int64_t, N>& sizes) {
  thread_local std::vector<float> arena;
  int64_t total = 0;
  for (int64_t n : sizes) total += round_up(n, kVec);
  if (static_cast<int64_t>(arena.size()) < total) arena.resize(total);
  std::array<float*, N> out;
  float* p = arena.data();
  for (size_t i = 0; i < N; ++i) {
    out[i] = p;
    p += round_up(sizes[i], kVec);
  }
  return out;
}

struct Shape {
  int64_t z, t, s, n, kv, h;
  int64_t group() const { return n / kv; }
  int64_t hp() const { return round_up(h, kVec); }
  int64_t sp() const { return round_up(s, kVec); }
  // keys that query row `row` sees
  int64_t keys(int64_t row, bool causal) const { return causal ? std::min(s, row + 1 + s - t) : s; }
};

// Row (z, row, head) of a [Z, rows, heads, H] tensor, possibly one slice of a wider one (the
// stacked [Z, T, N, 3, H] projection): base + z·zs + row·rs + head·hs.
template <typename T>
struct View {
  T* base;
  int64_t zs, rs, hs;
  T* at(int64_t z, int64_t row, int64_t head) const { return base + z * zs + row * rs + head * hs; }
};

template <typename T>
View<T> dense(T* p, int64_t rows, int64_t heads, int64_t h) {
  return View<T>{p, rows * heads * h, heads * h, h};
}

// Slice i of q, k, v stacked as [Z, T, N, 3, H].
template <typename T>
View<T> packed(T* p, int64_t i, const Shape& d) {
  return View<T>{p + i * d.h, d.t * d.n * 3 * d.h, d.n * 3 * d.h, 3 * d.h};
}

// Row softmax pieces over the first `width` entries of x (vectorised, scalar tail).
inline float row_max(const float* x, int64_t width) {
  float m = -INFINITY;
  int64_t j = 0;
  if (width >= kVec) {
    vf mv = load(x);
    for (j = kVec; j + kVec <= width; j += kVec) {
      const vf y = load(x + j);
      mv = y > mv ? y : mv;
    }
    for (int i = 0; i < kVec; ++i) m = std::max(m, mv[i]);
  }
  for (; j < width; ++j) m = std::max(m, x[j]);
  return m;
}

// x[j] = exp(x[j] - shift) for j < keys, 0 for keys <= j < width (a multiple of 16); returns
// the sum.
inline float exp_row(float* x, int64_t keys, int64_t width, float shift) {
  vf sum = vf{};
  const vf sh = splat(shift);
  int64_t j = 0;
  for (; j + kVec <= keys; j += kVec) {
    const vf e = vexp(load(x + j) - sh);
    store(x + j, e);
    sum += e;
  }
  if (j < keys) {  // the vector holding the last visible key
    const vf e = vexp(load(x + j) - sh);
    vf keep;
    for (int i = 0; i < kVec; ++i) keep[i] = j + i < keys ? e[i] : 0.0f;
    store(x + j, keep);
    sum += keep;
    j += kVec;
  }
  for (; j < width; j += kVec) store(x + j, vf{});
  float total = 0;
  for (int i = 0; i < kVec; ++i) total += sum[i];
  return total;
}

// Σ a[i]·b[i]
inline float dot(const float* a, const float* b, int64_t n) {
  vf acc = vf{};
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) acc += load(a + i) * load(b + i);
  float total = 0;
  for (int j = 0; j < kVec; ++j) total += acc[j];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// Copies the [rows x h] slice at src (row stride `stride`) into dst [rows x ld], times `scale`,
// zero-padding columns h..ld.
void gather(const float* src, int64_t stride, int64_t rows, int64_t h, float* dst, int64_t ld, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < h; ++c) dst[r * ld + c] = src[r * stride + c] * scale;
    for (int64_t c = h; c < ld; ++c) dst[r * ld + c] = 0.0f;
  }
}

// dst [h x ld] = transpose of the [rows x h] slice at src, zero-padding columns rows..ld.
// In-register transpose of a 16 x 16 block: at distance s = 8, 4, 2, 1 swap the off-diagonal
// s x s blocks of every 2s x 2s block (two-source shuffles).
template <int S>
inline void swap_blocks(vf* m) {
  vi lo, hi;
  for (int j = 0; j < kVec; ++j) {
    lo[j] = (j & S) ? kVec + j - S : j;
    hi[j] = (j & S) ? kVec + j : j + S;
  }
  for (int i = 0; i < kVec; ++i)
    if (!(i & S)) {
      const vf a = m[i], b = m[i + S];
      m[i] = __builtin_shuffle(a, b, lo);
      m[i + S] = __builtin_shuffle(a, b, hi);
    }
}

inline void transpose16(vf* m) {
  swap_blocks<8>(m);
  swap_blocks<4>(m);
  swap_blocks<2>(m);
  swap_blocks<1>(m);
}

// dst [h x ld] = transpose of the [rows x h] slice at src, zero-padding columns rows..ld.
void gather_transposed(const float* src, int64_t stride, int64_t rows, int64_t h, float* dst, int64_t ld) {
  const int64_t full_rows = rows / kVec * kVec, full_cols = h / kVec * kVec;
  vf block[kVec];
  for (int64_t r0 = 0; r0 < full_rows; r0 += kVec)
    for (int64_t c0 = 0; c0 < full_cols; c0 += kVec) {
      for (int i = 0; i < kVec; ++i) block[i] = load(src + (r0 + i) * stride + c0);
      transpose16(block);
      for (int i = 0; i < kVec; ++i) store(dst + (c0 + i) * ld + r0, block[i]);
    }
  for (int64_t r = 0; r < rows; ++r)  // what the 16 x 16 blocks left
    for (int64_t c = r < full_rows ? full_cols : 0; c < h; ++c) dst[c * ld + r] = src[r * stride + c];
  for (int64_t c = 0; c < h; ++c) std::fill(dst + c * ld + rows, dst + (c + 1) * ld, 0.0f);
}

void forward(ffi::ThreadPool& pool, const Shape& d, View<const float> q, View<const float> k,
             View<const float> v, View<float> o, float* lse, bool causal, float scale) {
  const int64_t hp = d.hp(), sp = d.sp();
  parallel_for(pool, d.z * d.n, [&](int64_t unit) {
    const int64_t z = unit / d.n, head = unit % d.n, kvh = head / d.group();
    auto [kt, vs, qb, logits, out, inv] =
        scratch<6>({d.h * sp, sp * hp, kBlock * d.h, kBlock * sp, kBlock * hp, kBlock});
    gather_transposed(k.at(z, 0, kvh), k.rs, d.s, d.h, kt, sp);
    gather(v.at(z, 0, kvh), v.rs, d.s, d.h, vs, hp, 1.0f);
    std::fill(vs + d.s * hp, vs + sp * hp, 0.0f);  // padded keys: zero probability times zero
    for (int64_t r0 = 0; r0 < d.t; r0 += kBlock) {
      const int64_t rows = std::min(kBlock, d.t - r0);
      const int64_t width = round_up(d.keys(r0 + rows - 1, causal), kVec);
      gather(q.at(z, r0, head), q.rs, rows, d.h, qb, d.h, scale);
      matmul(rows, width, d.h, qb, d.h, 1, kt, sp, logits, sp, false);
      for (int64_t r = 0; r < rows; ++r) {
        float* x = logits + r * sp;
        const int64_t keys = d.keys(r0 + r, causal);
        const float m = row_max(x, keys);
        const float total = exp_row(x, keys, width, m);
        inv[r] = 1.0f / total;
        lse[(z * d.n + head) * d.t + r0 + r] = m + std::log(total);
      }
      matmul(rows, hp, width, logits, sp, 1, vs, hp, out, hp, false);
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = o.at(z, r0 + r, head);
        for (int64_t c = 0; c < d.h; ++c) dst[c] = out[r * hp + c] * inv[r];
      }
    }
  });
}

void backward(ffi::ThreadPool& pool, const Shape& d, View<const float> q, View<const float> k,
              View<const float> v, View<const float> o, const float* lse, View<const float> dout,
              View<float> dq, View<float> dk, View<float> dv, bool causal, float scale) {
  const int64_t hp = d.hp(), sp = d.sp();
  // One unit per (z, kv head): it owns the key/value gradients of that head, summed over the
  // query heads that share it, and the query gradients of those heads.
  parallel_for(pool, d.z * d.kv, [&](int64_t unit) {
    const int64_t z = unit / d.kv, kvh = unit % d.kv;
    auto [kt, vt, ks, gk, gv, qb, gb, probs, dlogits, gq, delta] = scratch<11>(
        {d.h * sp, d.h * sp, sp * hp, sp * hp, sp * hp, kBlock * hp, kBlock * hp, kBlock * sp, kBlock * sp,
         kBlock * hp, kBlock});
    gather_transposed(k.at(z, 0, kvh), k.rs, d.s, d.h, kt, sp);
    gather_transposed(v.at(z, 0, kvh), v.rs, d.s, d.h, vt, sp);
    gather(k.at(z, 0, kvh), k.rs, d.s, d.h, ks, hp, 1.0f);
    std::fill(ks + d.s * hp, ks + sp * hp, 0.0f);
    std::fill(gk, gk + sp * hp, 0.0f);
    std::fill(gv, gv + sp * hp, 0.0f);
    for (int64_t head = kvh * d.group(); head < (kvh + 1) * d.group(); ++head) {
      for (int64_t r0 = 0; r0 < d.t; r0 += kBlock) {
        const int64_t rows = std::min(kBlock, d.t - r0);
        const int64_t width = round_up(d.keys(r0 + rows - 1, causal), kVec);
        gather(q.at(z, r0, head), q.rs, rows, d.h, qb, hp, scale);
        gather(dout.at(z, r0, head), dout.rs, rows, d.h, gb, hp, 1.0f);
        for (int64_t r = 0; r < rows; ++r) delta[r] = dot(dout.at(z, r0 + r, head), o.at(z, r0 + r, head), d.h);
        // P = exp(scaled logits - lse); dP = dO V^T; dS = P * (dP - delta)
        matmul(rows, width, d.h, qb, hp, 1, kt, sp, probs, sp, false);
        matmul(rows, width, d.h, gb, hp, 1, vt, sp, dlogits, sp, false);
        for (int64_t r = 0; r < rows; ++r) {
          float* p = probs + r * sp;
          float* g = dlogits + r * sp;
          exp_row(p, d.keys(r0 + r, causal), width, lse[(z * d.n + head) * d.t + r0 + r]);
          const vf dl = splat(delta[r]);
          for (int64_t j = 0; j < width; j += kVec) store(g + j, load(p + j) * (load(g + j) - dl));
        }
        // dQ = dS K · scale; dK += dS^T (Q · scale); dV += P^T dO
        matmul(rows, hp, width, dlogits, sp, 1, ks, hp, gq, hp, false);
        matmul(width, hp, rows, dlogits, 1, sp, qb, hp, gk, hp, true);
        matmul(width, hp, rows, probs, 1, sp, gb, hp, gv, hp, true);
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = dq.at(z, r0 + r, head);
          for (int64_t c = 0; c < d.h; ++c) dst[c] = gq[r * hp + c] * scale;
        }
      }
    }
    for (int64_t s = 0; s < d.s; ++s) {
      float* kdst = dk.at(z, s, kvh);
      float* vdst = dv.at(z, s, kvh);
      for (int64_t c = 0; c < d.h; ++c) {
        kdst[c] = gk[s * hp + c];
        vdst[c] = gv[s * hp + c];
      }
    }
  });
}

// q [.., T, N, H], k and v [.., S, K, H].
ffi::Error separate_shape(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v, Shape& d) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  const int64_t rank = qd.size();
  if (rank < 3 || kd.size() != qd.size() || vd.size() != qd.size())
    return ffi::Error::InvalidArgument("attention: q, k and v need the same rank, at least 3");
  for (int64_t i = 0; i < rank; ++i)
    if (kd[i] != vd[i] || (i + 3 < rank && qd[i] != kd[i]))
      return ffi::Error::InvalidArgument("attention: k and v differ in shape, or q in a leading dimension");
  d = Shape{leading(qd, 3), qd[rank - 3], kd[rank - 3], qd[rank - 2], kd[rank - 2], qd[rank - 1]};
  if (d.kv == 0 || d.n % d.kv || kd[rank - 1] != d.h)
    return ffi::Error::InvalidArgument("attention: query heads are not a multiple of key/value heads, or head sizes differ");
  return ffi::Error::Success();
}

// qkv [.., T, N, 3, H].
ffi::Error packed_shape(const ffi::AnyBuffer& qkv, Shape& d) {
  const auto dims = qkv.dimensions();
  const int64_t rank = dims.size();
  if (rank < 4 || dims[rank - 2] != 3) return ffi::Error::InvalidArgument("attention: qkv must be [.., T, N, 3, H]");
  d = Shape{leading(dims, 4), dims[rank - 4], dims[rank - 4], dims[rank - 3], dims[rank - 3], dims[rank - 1]};
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::Result<ffi::AnyBuffer> o, ffi::Result<ffi::AnyBuffer> lse, bool causal, float scale) {
  Shape d;
  if (auto err = separate_shape(q, k, v, d); err.failure()) return err;
  forward(pool, d, dense(in(q), d.t, d.n, d.h), dense(in(k), d.s, d.kv, d.h),
          dense(in(v), d.s, d.kv, d.h), dense(out(o), d.t, d.n, d.h),
          out(lse), causal, scale);
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer o, ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dq,
                    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv, bool causal, float scale) {
  Shape d;
  if (auto err = separate_shape(q, k, v, d); err.failure()) return err;
  backward(pool, d, dense(in(q), d.t, d.n, d.h), dense(in(k), d.s, d.kv, d.h),
           dense(in(v), d.s, d.kv, d.h), dense(in(o), d.t, d.n, d.h),
           in(lse), dense(in(dout), d.t, d.n, d.h),
           dense(out(dq), d.t, d.n, d.h), dense(out(dk), d.s, d.kv, d.h),
           dense(out(dv), d.s, d.kv, d.h), causal, scale);
  return ffi::Error::Success();
}

ffi::Error PackedForward(ffi::ThreadPool pool, ffi::AnyBuffer qkv, ffi::Result<ffi::AnyBuffer> o,
                         ffi::Result<ffi::AnyBuffer> lse, bool causal, float scale) {
  Shape d;
  if (auto err = packed_shape(qkv, d); err.failure()) return err;
  const float* p = in(qkv);
  forward(pool, d, packed(p, 0, d), packed(p, 1, d), packed(p, 2, d), dense(out(o), d.t, d.n, d.h),
          out(lse), causal, scale);
  return ffi::Error::Success();
}

ffi::Error PackedBackward(ffi::ThreadPool pool, ffi::AnyBuffer qkv, ffi::AnyBuffer o, ffi::AnyBuffer lse,
                          ffi::AnyBuffer dout, ffi::Result<ffi::AnyBuffer> dqkv, bool causal, float scale) {
  Shape d;
  if (auto err = packed_shape(qkv, d); err.failure()) return err;
  const float* p = in(qkv);
  float* g = out(dqkv);
  backward(pool, d, packed(p, 0, d), packed(p, 1, d), packed(p, 2, d), dense(in(o), d.t, d.n, d.h),
           in(lse), dense(in(dout), d.t, d.n, d.h), packed(g, 0, d),
           packed(g, 1, d), packed(g, 2, d), causal, scale);
  return ffi::Error::Success();
}

}  // namespace

#define BUFFERS_1 .Arg<ffi::AnyBuffer>()
#define RESULTS_1 .Ret<ffi::AnyBuffer>()
#define ATTRS .Attr<bool>("causal").Attr<float>("scale")

XLA_FFI_DEFINE_HANDLER_SYMBOL(BigmodelAttentionForward, Forward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() BUFFERS_1 BUFFERS_1 BUFFERS_1 RESULTS_1 RESULTS_1 ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(BigmodelAttentionBackward, Backward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() BUFFERS_1 BUFFERS_1 BUFFERS_1 BUFFERS_1 BUFFERS_1
                                  BUFFERS_1 RESULTS_1 RESULTS_1 RESULTS_1 ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(BigmodelPackedAttentionForward, PackedForward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() BUFFERS_1 RESULTS_1 RESULTS_1 ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(BigmodelPackedAttentionBackward, PackedBackward,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() BUFFERS_1 BUFFERS_1 BUFFERS_1 BUFFERS_1 RESULTS_1
                                  ATTRS);
