// Fused causal softmax attention for the CPU: forward and backward as XLA FFI custom calls.
//
// Scores are scale * q.k (the attribute "scale": 1/sqrt(head_dim) of the unpadded heads).
// Layouts (row-major, float32): q and out [B, S, KVH, G, D] (G query heads per key head),
// k and v [B, S, KVH, D], mask [MB, S, S] bool (MB is 1 or B; True where a query may see a
// key; causal: keys after the query are never read), lse [B, KVH, G, S] (log-sum-exp of each
// query's scaled scores; NaN marks a query whose keys are all masked, whose output is the mean
// of the values it could see, with no gradient through the scores).
//
// Each (batch, key head) pair is one task, run on XLA's intra-op thread pool: its keys and values are packed once, then
// tiles of kRows query rows of one head compute their scores against 16-key vectors (GCC vector
// extensions: AVX-512 where the compiler targets it, two AVX2 halves otherwise), the softmax in
// place, and the products with the values; the backward pass recomputes the probabilities from
// lse and accumulates dK and dV of the pair in a private buffer.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // floats per vector
constexpr int kRows = 8;    // query rows per tile
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));

struct Dims {
  int64_t B, S, KVH, G, D, MB, Spad;
};

struct Free {
  void operator()(float* p) const { std::free(p); }
};
using Buf = std::unique_ptr<float, Free>;

Buf alloc(int64_t n) {
  const size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes > 0 ? bytes : 64));
  std::memset(p, 0, bytes);
  return Buf(p);
}

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
inline vec splat(float x) { return vec{} + x; }

// out[r][j] = sum_d a[r][d] * bt[d][j] for r < kRows, j in [0, n) (n a multiple of kLanes);
// a is [kRows][D], bt is [D][Spad].
inline void rows_times_cols(const float* a, const float* bt, int64_t D, int64_t Spad, int64_t n, float* out) {
  for (int64_t j = 0; j < n; j += kLanes) {
    vec acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = vec{};
    for (int64_t d = 0; d < D; ++d) {
      const vec b = load(bt + d * Spad + j);
      for (int r = 0; r < kRows; ++r) acc[r] += a[r * D + d] * b;
    }
    for (int r = 0; r < kRows; ++r) store(out + r * Spad + j, acc[r]);
  }
}

// out[r][c : c + NV * kLanes] = sum_{j < n} w[r][j] * m[j][c : c + NV * kLanes] for r < kRows (NV vectors
// of columns held in registers per row).
template <int NV>
inline void weights_times_columns(const float* w, const float* m, int64_t D, int64_t Spad, int64_t n, int64_t c,
                                  float* out) {
  vec acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int u = 0; u < NV; ++u) acc[r][u] = vec{};
  for (int64_t j = 0; j < n; ++j) {
    vec mv[NV];
    for (int u = 0; u < NV; ++u) mv[u] = load(m + j * D + c + u * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const float x = w[r * Spad + j];
      for (int u = 0; u < NV; ++u) acc[r][u] += x * mv[u];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int u = 0; u < NV; ++u) store(out + r * D + c + u * kLanes, acc[r][u]);
}

// out[r][:] = sum_{j < n} w[r][j] * m[j][:] for r < kRows; w is [kRows][Spad], m is [Spad][D].
inline void weights_times_rows(const float* w, const float* m, int64_t D, int64_t Spad, int64_t n, float* out) {
  int64_t c = 0;
  for (; c + 2 * kLanes <= D; c += 2 * kLanes) weights_times_columns<2>(w, m, D, Spad, n, c, out);
  for (; c < D; c += kLanes) weights_times_columns<1>(w, m, D, Spad, n, c, out);
}

// acc[j][:] += sum_r w[r][j] * x[r][:] for j < n; w is [kRows][Spad], x is [kRows][D], acc [Spad][D].
inline void accumulate_outer(const float* w, const float* x, int64_t D, int64_t Spad, int64_t n, float* acc) {
  for (int64_t c = 0; c < D; c += kLanes) {
    vec xr[kRows];
    for (int r = 0; r < kRows; ++r) xr[r] = load(x + r * D + c);
    for (int64_t j = 0; j < n; ++j) {
      vec s = load(acc + j * D + c);
      for (int r = 0; r < kRows; ++r) s += w[r * Spad + j] * xr[r];
      store(acc + j * D + c, s);
    }
  }
}

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Offsets of row i of head g in a [B, S, KVH, G, D] tensor, and of key j in [B, S, KVH, D].
inline int64_t qoff(const Dims& d, int64_t b, int64_t i, int64_t kv, int64_t g) {
  return (((b * d.S + i) * d.KVH + kv) * d.G + g) * d.D;
}
inline int64_t koff(const Dims& d, int64_t b, int64_t j, int64_t kv) { return ((b * d.S + j) * d.KVH + kv) * d.D; }

typedef int32_t ivec __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint8_t bvec __attribute__((vector_size(kLanes)));

// exp of each lane (Cephes' single-precision polynomial after reduction by ln 2; ~1 ulp);
// inputs below -87 give ~1e-38 (callers zero masked lanes themselves).
inline vec vexp(vec x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  const vec t = x * 1.44269504088896341f + 12582912.f;  // round(x / ln 2) in the low mantissa bits
  const vec n = t - 12582912.f;
  const vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const ivec e = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec scale;
  std::memcpy(&scale, &e, sizeof(vec));
  return p * scale;
}

// The probabilities of a tile in place: scores [kRows][Spad] -> exp(score - lse) on the keys a
// row may see, 0 elsewhere; with lse_in null they are computed (and written to lse_out).
// vis is a scratch byte row of Spad. Sets total[r] (the sum of a row's values: 1 with lse_in)
// and dead[r] (all keys of the row masked: its probabilities are uniform over keys 0..i).
inline void tile_probabilities(const Dims& d, const bool* mask_b, int64_t i0, int64_t n, float* sc,
                               const float* lse_in, float* lse_out, float* total, bool* dead, uint8_t* vis) {
  const float neg = -std::numeric_limits<float>::infinity();
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + r;
    float* s = sc + r * d.Spad;
    if (i >= d.S) {
      std::memset(s, 0, n * sizeof(float));
      dead[r] = true;
      total[r] = 1.f;
      continue;
    }
    std::memcpy(vis, mask_b + i * d.S, i + 1);
    std::memset(vis + i + 1, 0, n - i - 1);
    vec top_v = splat(neg);
    ivec any_v = ivec{};
    for (int64_t j = 0; j < n; j += kLanes) {
      bvec bv;
      std::memcpy(&bv, vis + j, kLanes);
      const ivec on = __builtin_convertvector(bv, ivec) != 0;
      any_v |= on;
      const vec sv = load(s + j);
      top_v = on ? (sv > top_v ? sv : top_v) : top_v;
    }
    bool any = false;
    float top = neg;
    for (int k = 0; k < kLanes; ++k) {
      any |= any_v[k] != 0;
      top = std::max(top, top_v[k]);
    }
    dead[r] = !any;
    if (!any) {
      const float u = 1.f / static_cast<float>(i + 1);
      for (int64_t j = 0; j < n; ++j) s[j] = j <= i ? u : 0.f;
      total[r] = 1.f;
      if (lse_out) lse_out[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (lse_in) top = lse_in[r];
    vec sum_v = vec{};
    for (int64_t j = 0; j < n; j += kLanes) {
      bvec bv;
      std::memcpy(&bv, vis + j, kLanes);
      const ivec on = __builtin_convertvector(bv, ivec) != 0;
      const vec p = on ? vexp(load(s + j) - top) : vec{};
      store(s + j, p);
      sum_v += p;
    }
    float sum = 0.f;
    for (int k = 0; k < kLanes; ++k) sum += sum_v[k];
    total[r] = lse_in ? 1.f : sum;
    if (lse_out) lse_out[r] = top + std::log(sum);
  }
}

void forward_pair(const Dims& d, int64_t b, int64_t kv, float scale, const float* q, const float* k, const float* v,
                  const bool* mask, float* out, float* lse) {
  const int64_t S = d.S, D = d.D, Sp = d.Spad;
  Buf kt = alloc(D * Sp), vv = alloc(Sp * D), qa = alloc(kRows * D), sc = alloc(kRows * Sp), oa = alloc(kRows * D);
  std::unique_ptr<uint8_t[]> vis(new uint8_t[Sp]);
  for (int64_t j = 0; j < S; ++j) {
    const float* kr = k + koff(d, b, j, kv);
    for (int64_t c = 0; c < D; ++c) kt.get()[c * Sp + j] = kr[c];
    std::memcpy(vv.get() + j * D, v + koff(d, b, j, kv), D * sizeof(float));
  }
  const bool* mb = mask + (d.MB == 1 ? 0 : b) * S * S;
  float total[kRows], lse_t[kRows];
  bool dead[kRows];
  for (int64_t g = 0; g < d.G; ++g) {
    for (int64_t i0 = 0; i0 < S; i0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, S - i0), n = round_up(i0 + rows);
      std::memset(qa.get(), 0, kRows * D * sizeof(float));
      for (int64_t r = 0; r < rows; ++r) {
        const float* qr = q + qoff(d, b, i0 + r, kv, g);
        for (int64_t c = 0; c < D; ++c) qa.get()[r * D + c] = qr[c] * scale;
      }
      rows_times_cols(qa.get(), kt.get(), D, Sp, n, sc.get());
      tile_probabilities(d, mb, i0, n, sc.get(), nullptr, lse_t, total, dead, vis.get());
      weights_times_rows(sc.get(), vv.get(), D, Sp, n, oa.get());
      float* l = lse + ((b * d.KVH + kv) * d.G + g) * S;
      for (int64_t r = 0; r < rows; ++r) {
        float* o = out + qoff(d, b, i0 + r, kv, g);
        const float inv = 1.f / total[r];
        for (int64_t c = 0; c < D; ++c) o[c] = oa.get()[r * D + c] * inv;
        l[i0 + r] = lse_t[r];
      }
    }
  }
}

void backward_pair(const Dims& d, int64_t b, int64_t kv, float scale, const float* q, const float* k,
                   const float* v, const bool* mask, const float* out, const float* lse, const float* dout, float* dq,
                   float* dk, float* dv) {
  const int64_t S = d.S, D = d.D, Sp = d.Spad;
  Buf kt = alloc(D * Sp), kk = alloc(Sp * D), vt = alloc(D * Sp), qa = alloc(kRows * D), da = alloc(kRows * D),
      sc = alloc(kRows * Sp), dp = alloc(kRows * Sp), qg = alloc(kRows * D), dka = alloc(Sp * D),
      dva = alloc(Sp * D);
  std::unique_ptr<uint8_t[]> vis(new uint8_t[Sp]);
  for (int64_t j = 0; j < S; ++j) {
    const float* kr = k + koff(d, b, j, kv);
    const float* vr = v + koff(d, b, j, kv);
    for (int64_t c = 0; c < D; ++c) {
      kt.get()[c * Sp + j] = kr[c];
      vt.get()[c * Sp + j] = vr[c];
    }
    std::memcpy(kk.get() + j * D, kr, D * sizeof(float));
  }
  const bool* mb = mask + (d.MB == 1 ? 0 : b) * S * S;
  float total[kRows], lse_t[kRows], delta[kRows];
  bool dead[kRows];
  for (int64_t g = 0; g < d.G; ++g) {
    const float* l = lse + ((b * d.KVH + kv) * d.G + g) * S;
    for (int64_t i0 = 0; i0 < S; i0 += kRows) {
      const int64_t rows = std::min<int64_t>(kRows, S - i0), n = round_up(i0 + rows);
      std::memset(qa.get(), 0, kRows * D * sizeof(float));
      std::memset(da.get(), 0, kRows * D * sizeof(float));
      for (int r = 0; r < kRows; ++r) {
        lse_t[r] = 0.f;
        delta[r] = 0.f;
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t off = qoff(d, b, i0 + r, kv, g);
        float dl = 0.f;
        for (int64_t c = 0; c < D; ++c) {
          qa.get()[r * D + c] = q[off + c] * scale;
          da.get()[r * D + c] = dout[off + c];
          dl += dout[off + c] * out[off + c];
        }
        delta[r] = dl;
        lse_t[r] = l[i0 + r];
      }
      rows_times_cols(qa.get(), kt.get(), D, Sp, n, sc.get());
      tile_probabilities(d, mb, i0, n, sc.get(), lse_t, nullptr, total, dead, vis.get());
      rows_times_cols(da.get(), vt.get(), D, Sp, n, dp.get());
      for (int r = 0; r < kRows; ++r) {
        float* s = sc.get() + r * Sp;
        float* ds = dp.get() + r * Sp;
        if (dead[r]) {
          std::memset(ds, 0, n * sizeof(float));
          continue;
        }
        for (int64_t j = 0; j < n; ++j) ds[j] = s[j] * (ds[j] - delta[r]);
      }
      weights_times_rows(dp.get(), kk.get(), D, Sp, n, qg.get());
      accumulate_outer(dp.get(), qa.get(), D, Sp, n, dka.get());
      accumulate_outer(sc.get(), da.get(), D, Sp, n, dva.get());
      for (int64_t r = 0; r < rows; ++r) {
        float* o = dq + qoff(d, b, i0 + r, kv, g);
        for (int64_t c = 0; c < D; ++c) o[c] = qg.get()[r * D + c] * scale;
      }
    }
  }
  for (int64_t j = 0; j < S; ++j) {
    std::memcpy(dk + koff(d, b, j, kv), dka.get() + j * D, D * sizeof(float));
    std::memcpy(dv + koff(d, b, j, kv), dva.get() + j * D, D * sizeof(float));
  }
}

// Runs fn(t) for t in [0, n) on the caller and up to num_threads - 1 workers of XLA's pool;
// every thread takes the next t from a shared counter, so a worker the pool starts late finds
// nothing left and returns, and the caller never waits on work nobody has claimed.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, fn]() {
    for (int64_t t; (t = state->next.fetch_add(1)) < n;) {
      fn(t);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

ffi::Error check(const Dims& d, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::PRED>& mask) {
  auto kd = k.dimensions();
  auto md = mask.dimensions();
  if (kd.size() != 4 || kd[0] != d.B || kd[1] != d.S || kd[2] != d.KVH || kd[3] != d.D)
    return ffi::Error::InvalidArgument("apiq_cpu_attention: k/v must be [B, S, KVH, D] matching q [B, S, KVH, G, D]");
  if (md.size() != 3 || (md[0] != 1 && md[0] != d.B) || md[1] != d.S || md[2] != d.S)
    return ffi::Error::InvalidArgument("apiq_cpu_attention: mask must be [1 or B, S, S]");
  if (d.D % kLanes != 0)
    return ffi::Error::InvalidArgument("apiq_cpu_attention: head_dim must be a multiple of 16");
  return ffi::Error::Success();
}

Dims dims_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::PRED>& mask) {
  auto qd = q.dimensions();
  Dims d{qd[0], qd[1], qd[2], qd[3], qd[4], mask.dimensions()[0], 0};
  d.Spad = round_up(d.S);
  return d;
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                       ffi::Buffer<ffi::PRED> mask, float scale, ffi::ResultBuffer<ffi::F32> out,
                       ffi::ResultBuffer<ffi::F32> lse) {
  if (q.dimensions().size() != 5) return ffi::Error::InvalidArgument("apiq_cpu_attention: q must be 5-D");
  const Dims d = dims_of(q, mask);
  if (auto e = check(d, k, mask); e.failure()) return e;
  parallel_for(pool, d.B * d.KVH, [&](int64_t t) {
    forward_pair(d, t / d.KVH, t % d.KVH, scale, q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(),
                 out->typed_data(), lse->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                        ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                        ffi::Buffer<ffi::F32> dout, float scale, ffi::ResultBuffer<ffi::F32> dq,
                        ffi::ResultBuffer<ffi::F32> dk,
                        ffi::ResultBuffer<ffi::F32> dv) {
  if (q.dimensions().size() != 5) return ffi::Error::InvalidArgument("apiq_cpu_attention: q must be 5-D");
  const Dims d = dims_of(q, mask);
  if (auto e = check(d, k, mask); e.failure()) return e;
  parallel_for(pool, d.B * d.KVH, [&](int64_t t) {
    backward_pair(d, t / d.KVH, t % d.KVH, scale, q.typed_data(), k.typed_data(), v.typed_data(), mask.typed_data(),
                  out.typed_data(), lse.typed_data(), dout.typed_data(), dq->typed_data(), dk->typed_data(),
                  dv->typed_data());
  });
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;

// The arguments both handlers start with: XLA's thread pool, q, k, v and the mask.
auto bind_qkv_mask() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<ffi::Buffer<ffi::PRED>>();
}

}  // namespace

// (q, k, v, mask; scale) -> (out, lse)
XLA_FFI_DEFINE_HANDLER_SYMBOL(ApiqAttentionForward, ForwardImpl,
                              bind_qkv_mask().Attr<float>("scale").Ret<F32>().Ret<F32>());

// (q, k, v, mask, out, lse, dout; scale) -> (dq, dk, dv)
XLA_FFI_DEFINE_HANDLER_SYMBOL(ApiqAttentionBackward, BackwardImpl,
                              bind_qkv_mask().Arg<F32>().Arg<F32>().Arg<F32>().Attr<float>("scale").Ret<F32>()
                                  .Ret<F32>().Ret<F32>());
