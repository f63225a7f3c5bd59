// SPDX-License-Identifier: EUPL-1.2
//
// A block's residual sum with the RMS norms around it as one CUDA kernel of
// ours (mlxs_fused_norm_add in mlxs_fast.cpp): MLX runs the norm, the add and
// the next norm as three kernels, and a small model's decode step is bound by
// the host's cost a kernel (docs/benchmarks.md). Compiled and launched as our
// other kernels are (mlxs_kernels.cpp, mlxs_kernel_cache.cpp).

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "mlx/fast.h"
#include "mlxs_internal.h"

namespace {

// h = x + norm(r) (NORM_R; else x + r) and y = norm(h) (NORM_H), one row of D
// values a block of THREADS threads, with MLX's roundings: a norm's x / rms(x)
// rounded to T, then its product with the weight in T; the sum in T; y from h
// as stored. Each thread holds its share of the row in registers (ITEMS vectors
// of VEC values, 16 bytes where D allows), so x and r are read once, with
// 16-byte loads, and h is not read back: the first version (256 threads, one
// value a load, h read back from memory) took 10-12 us of an H100's time a call
// at D = 4,096, against 3 us for MLX's norm. Template arguments: T, D, NORM_R
// and NORM_H (0 or 1), EPS (eps's float bits), THREADS (norm_add_threads).
// Inputs x, r, wr, wh (a weight not used may be any array); outputs h, y (y not
// written without NORM_H). The sums of squares are added in another order than
// MLX's, so a norm may differ from MLX's in its last bit.
//
// The kernel is kNormAddRow and kNormAddCore; kNormQmvRow, kNormAddCore and
// kNormQmvTail are the same norm followed by the 4-bit product it feeds (below).
// kNormAddRow: a block a row, writing h and y there.
constexpr const char* kNormAddRow = R"(
  const size_t row = blockIdx.x;
  constexpr bool write_h = true;
  T* hr = h + row * D;
  T* yr = NORM_H ? y + row * D : hr;
)";
// kNormAddCore: row `row` of x and r; h to `hr` where `write_h`, y to `yr`.
constexpr const char* kNormAddCore = R"(
  constexpr int VEC = D % 8 == 0 ? 8 : (D % 4 == 0 ? 4 : (D % 2 == 0 ? 2 : 1));
  constexpr int NV = D / VEC;
  constexpr int ITEMS = (NV + THREADS - 1) / THREADS;
  struct alignas(sizeof(T) * VEC) Vec {
    T v[VEC];
  };
  const float eps = __int_as_float(EPS);
  // A 16-bit product rounded once, as MLX's norm rounds it: in float (where the
  // product of two 16-bit values is exact), then converted. T's own operator*
  // would let the compiler contract the product and the residual's add after
  // it into one fused multiply-add, rounded once where MLX rounds twice (12% of
  // a residual's values a last bit apart on an H100, enough to move a small
  // model's logits past mlx-lm's tolerance).
  auto mul = [](T a, T b) { return T(static_cast<float>(a) * static_cast<float>(b)); };
  const int tid = threadIdx.x;
  __shared__ float partial[THREADS / 32];
  auto block_sum = [&](float v) {
    for (int o = 16; o > 0; o >>= 1) {
      v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    if ((tid & 31) == 0) {
      partial[tid >> 5] = v;
    }
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < THREADS / 32; ++i) {
      total += partial[i];
    }
    __syncthreads();
    return total;
  };
  const T* xr = x + row * D;
  const T* rr = r + row * D;
  const bool aligned = ((reinterpret_cast<size_t>(xr) | reinterpret_cast<size_t>(rr) |
                         reinterpret_cast<size_t>(hr) | reinterpret_cast<size_t>(yr) |
                         reinterpret_cast<size_t>(wr) | reinterpret_cast<size_t>(wh)) %
                        sizeof(Vec)) == 0;
  auto load = [&](const T* p, int j, Vec& out) {
    if (aligned) {
      out = reinterpret_cast<const Vec*>(p)[j];
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        out.v[e] = p[j * VEC + e];
      }
    }
  };
  auto store = [&](T* p, int j, const Vec& in) {
    if (aligned) {
      reinterpret_cast<Vec*>(p)[j] = in;
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        p[j * VEC + e] = in.v[e];
      }
    }
  };
  Vec xv[ITEMS];
  Vec rv[ITEMS];
  float r_sum = 0.f;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int j = k * THREADS + tid;
    if (j < NV) {
      load(xr, j, xv[k]);
      load(rr, j, rv[k]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float f = static_cast<float>(rv[k].v[e]);
        r_sum += f * f;
      }
    }
  }
  const float r_scale = NORM_R ? rsqrtf(block_sum(r_sum) / D + eps) : 1.f;
  float h_sum = 0.f;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int j = k * THREADS + tid;
    if (j < NV) {
      Vec w;
      if (NORM_R) {
        load(wr, j, w);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const T rn = NORM_R ? mul(w.v[e], T(static_cast<float>(rv[k].v[e]) * r_scale)) : rv[k].v[e];
        const T hv = xv[k].v[e] + rn;
        xv[k].v[e] = hv;
        const float f = static_cast<float>(hv);
        h_sum += f * f;
      }
      if (write_h) {
        store(hr, j, xv[k]);
      }
    }
  }
  if (NORM_H) {
    const float h_scale = rsqrtf(block_sum(h_sum) / D + eps);
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int j = k * THREADS + tid;
      if (j < NV) {
        Vec w;
        load(wh, j, w);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          w.v[e] = mul(w.v[e], T(static_cast<float>(xv[k].v[e]) * h_scale));
        }
        store(yr, j, w);
      }
    }
  }
)";

// The norm and the 4-bit product after it, for one row of x (a decode step):
// the fused norm and the one-row product kernel (mlxs_kernels.cpp) as one
// launch, a kernel fewer a norm. Every block computes the norm as the fused
// norm does (kNormAddCore, THREADS threads: the same bits) into shared memory
// and each of its THREADS / 32 warps takes a row of w as the one-row kernel
// does (qmv_row: the same bits); block 0 writes h. With ROPE (a fused q/k/v
// projection of a model without q/k norms), the first QK_HEADS heads of HD
// values are rotated as mlxr_qk_norm_rope rotates them (rope_pair, one offset,
// pairs (t, t + HD / 2)): a block's warps take WARPS / 2 such pairs of one
// head, their rounded sums meet in shared memory and are rotated there.
// Template arguments: T, D (x's width, w's K), GROUP, NORM_R, NORM_H (1), EPS,
// THREADS, ROPE, HD, QK_HEADS, FREQS; inputs x, r, wr, wh, w, scales, biases,
// offset (int32), freqs (float32) (all declared T pointers; those not used may
// be any array); outputs h, out; scalars n (w's rows), scale, base (log2).
constexpr const char* kNormQmvRow = R"(
  __shared__ __align__(16) T ys[D];
  const size_t row = 0;
  const bool write_h = blockIdx.x == 0;
  T* hr = h;
  T* yr = ys;
)";
constexpr const char* kNormQmvTail = R"(
  __syncthreads();
  constexpr int WARPS = THREADS / 32;
  constexpr int PAIRS = WARPS / 2 > 0 ? WARPS / 2 : 1;
  constexpr int HALF = ROPE ? HD / 2 : PAIRS;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int head = ROPE ? static_cast<int>(blockIdx.x) / (HALF / PAIRS) : 0;
  const int t0 = ROPE ? (static_cast<int>(blockIdx.x) % (HALF / PAIRS)) * PAIRS : 0;
  const int orow = ROPE ? head * HD + t0 + (warp >> 1) + (warp & 1) * HALF
                        : static_cast<int>(blockIdx.x) * WARPS + warp;
  T value = static_cast<T>(0.f);
  if (orow < n) {
    const unsigned int* wq = reinterpret_cast<const unsigned int*>(w);
    value = static_cast<T>(qmv_row<T, D, GROUP, true>(
        wq + static_cast<size_t>(orow) * (D / 8), (reinterpret_cast<size_t>(wq) & 15) == 0,
        scales + static_cast<size_t>(orow) * (D / GROUP),
        biases + static_cast<size_t>(orow) * (D / GROUP), ys, true, lane));
    if (!ROPE && lane == 0) {
      out[orow] = value;
    }
  }
  if (ROPE) {
    __shared__ T pair_rows[WARPS];
    if (lane == 0) {
      pair_rows[warp] = value;
    }
    __syncthreads();
    if (threadIdx.x < PAIRS) {
      const int t = t0 + static_cast<int>(threadIdx.x);
      T a = pair_rows[2 * threadIdx.x];
      T c = pair_rows[2 * threadIdx.x + 1];
      if (head < QK_HEADS) {
        rope_pair<T, FREQS>(a, c, t, HALF, reinterpret_cast<const int*>(offset)[0], scale, base,
                            reinterpret_cast<const float*>(freqs));
      }
      out[head * HD + t] = a;
      out[head * HD + t + HALF] = c;
    }
  }
)";

const char* norm_add_body() {
  static const std::string body = std::string(kNormAddRow) + kNormAddCore;
  return body.c_str();
}

const char* norm_qmv_body() {
  static const std::string body = std::string(kNormQmvRow) + kNormAddCore + kNormQmvTail;
  return body.c_str();
}

// The widest row the fused norm takes, and the most rows (the launch counts
// threads in an int: at most 1,024 a row).
constexpr int kNormAddMaxWidth = 1 << 16;
constexpr size_t kNormAddMaxRows = size_t{1} << 20;
// The widest x the norm with the product takes: x's norm is kept in shared
// memory (32 KB in 16 bits).
constexpr int kNormQmvMaxWidth = 1 << 14;

const mx::fast::CustomKernelFunction& norm_add_kernel() {
  static const mx::fast::CustomKernelFunction k =
      mx::fast::cuda_kernel("mlxr_norm_add", {"x", "r", "wr", "wh"}, {"h", "y"}, norm_add_body(),
                            "", /* ensure_row_contiguous */ true);
  return k;
}

}  // namespace

namespace mlxs {

int norm_add_threads(int d) {
  int vec = d % 8 == 0 ? 8 : (d % 4 == 0 ? 4 : (d % 2 == 0 ? 2 : 1));
  int vectors = d / vec;
  return std::clamp((vectors + 31) / 32 * 32, 32, 1024);
}

KernelSpec norm_add_spec(mx::Dtype t, int d, bool norm_r, bool norm_h, float eps) {
  int eps_bits = 0;
  std::memcpy(&eps_bits, &eps, sizeof eps_bits);
  return {"mlxr_norm_add",
          norm_add_body(),
          t,
          {{"D", d},
           {"NORM_R", norm_r ? 1 : 0},
           {"NORM_H", norm_h ? 1 : 0},
           {"EPS", eps_bits},
           {"THREADS", norm_add_threads(d)}},
          {"x", "r", "wr", "wh"},
          {"h", "y"}};
}

std::optional<std::pair<mx::array, std::optional<mx::array>>> try_fused_norm_add(
    const mx::array& x, const mx::array& r, const std::optional<mx::array>& r_weight,
    const std::optional<mx::array>& h_weight, float eps, mx::StreamOrDevice s) {
  auto t = x.dtype();
  if (!cuda_routes_on(s) || (t != mx::bfloat16 && t != mx::float16) || r.dtype() != t ||
      x.shape() != r.shape() || x.ndim() < 1 || x.is_tracer() || r.is_tracer()) {
    return std::nullopt;
  }
  int d = x.shape(-1);
  size_t rows = d > 0 ? x.size() / static_cast<size_t>(d) : 0;
  if (d > kNormAddMaxWidth || rows == 0 || rows > kNormAddMaxRows) {
    return std::nullopt;
  }
  for (const auto* w : {&r_weight, &h_weight}) {
    if (w->has_value() &&
        ((*w)->dtype() != t || (*w)->ndim() != 1 || (*w)->shape(0) != d || (*w)->is_tracer())) {
      return std::nullopt;
    }
  }
  auto stream = mx::to_stream(s);
  auto spec = norm_add_spec(t, d, r_weight.has_value(), h_weight.has_value(), eps);
  int threads = norm_add_threads(d);
  std::vector<mx::Shape> shapes = {x.shape(), h_weight ? x.shape() : mx::Shape{1}};
  auto out =
      launch_all(norm_add_kernel(), spec, "", {x, r, r_weight.value_or(x), h_weight.value_or(x)},
                 shapes, {}, {static_cast<int>(rows) * threads, 1, 1}, {threads, 1, 1}, stream);
  std::optional<mx::array> y;
  if (h_weight) {
    y = out.at(1);
  }
  return std::make_pair(out.at(0), y);
}

KernelSpec norm_qmv_spec(mx::Dtype t, int d, int group, bool norm_r, float eps,
                         const NormQmvRope& rope) {
  int eps_bits = 0;
  std::memcpy(&eps_bits, &eps, sizeof eps_bits);
  return {"mlxr_norm_qmv4",
          norm_qmv_body(),
          t,
          {{"D", d},
           {"GROUP", group},
           {"NORM_R", norm_r ? 1 : 0},
           {"NORM_H", 1},
           {"EPS", eps_bits},
           {"THREADS", norm_add_threads(d)},
           {"ROPE", rope.qk_heads > 0 ? 1 : 0},
           {"HD", rope.head_dim},
           {"QK_HEADS", rope.qk_heads},
           {"FREQS", rope.freqs ? 1 : 0}},
          {"x", "r", "wr", "wh", "w", "scales", "biases", "offset", "freqs"},
          {"h", "out"},
          {"int n", "float scale", "float base"}};
}

const char* norm_qmv_header() {
  static const std::string header = std::string(qmv_header()) + rope_header();
  return header.c_str();
}

std::optional<std::pair<mx::array, mx::array>> try_fused_norm_add_qmv(
    const mx::array& x, const mx::array& r, const std::optional<mx::array>& r_weight,
    const mx::array& h_weight, float eps, const mx::array& w, const mx::array& scales,
    const std::optional<mx::array>& biases, int group, int bits, const std::string& mode,
    const NormQmvRope& rope, mx::StreamOrDevice s) {
  auto t = x.dtype();
  int d = x.ndim() >= 1 ? x.shape(-1) : 0;
  if (!cuda_routes_on(s) || !kernel_cache_on() || mode != "affine" || bits != 4 || !biases ||
      (group != 32 && group != 64 && group != 128) || (t != mx::bfloat16 && t != mx::float16) ||
      r.dtype() != t || x.shape() != r.shape() || d <= 0 || x.size() != static_cast<size_t>(d) ||
      d % 32 != 0 || d % group != 0 || d > kNormQmvMaxWidth || x.is_tracer() || r.is_tracer()) {
    return std::nullopt;
  }
  for (const auto* v : {&h_weight, r_weight ? &*r_weight : &h_weight}) {
    if (v->dtype() != t || v->ndim() != 1 || v->shape(0) != d || v->is_tracer()) {
      return std::nullopt;
    }
  }
  const auto& b = *biases;
  if (w.dtype() != mx::uint32 || w.ndim() != 2 || w.shape(1) * 8 != d || scales.dtype() != t ||
      b.dtype() != t || scales.ndim() != 2 || scales.shape(0) != w.shape(0) ||
      scales.shape(1) != d / group || b.shape() != scales.shape() || w.is_tracer() ||
      scales.is_tracer() || b.is_tracer()) {
    return std::nullopt;
  }
  int n = w.shape(0);
  int threads = norm_add_threads(d);
  int warps = threads / 32;
  int64_t blocks = (static_cast<int64_t>(n) + warps - 1) / warps;
  // Any size in AUTO mode: the launch replaces two (the norm and a product),
  // so it saves a kernel's host time where the one-row kernel alone would not.
  if (n <= 0 || !one_row_qmv(n, d, true) || blocks * threads > std::numeric_limits<int>::max()) {
    return std::nullopt;
  }
  if (rope.qk_heads > 0) {
    // A block's warps take whole pairs of one head: an even number of warps
    // that divides a head's pairs, whole heads, one int32 offset.
    int hd = rope.head_dim;
    bool fits = warps % 2 == 0 && hd > 0 && hd % 2 == 0 && (hd / 2) % (warps / 2) == 0 &&
                n % hd == 0 && static_cast<int64_t>(rope.qk_heads) * hd <= n && rope.offset &&
                rope.offset->dtype() == mx::int32 && rope.offset->size() == 1 &&
                !rope.offset->is_tracer() &&
                (!rope.freqs ||
                 (rope.freqs->dtype() == mx::float32 &&
                  rope.freqs->size() == static_cast<size_t>(hd / 2) && !rope.freqs->is_tracer()));
    if (!fits) {
      return std::nullopt;
    }
  }
  auto kernel =
      cached_kernel(norm_qmv_spec(t, d, group, r_weight.has_value(), eps, rope), norm_qmv_header());
  if (!kernel) {
    return std::nullopt;
  }
  auto out_shape = x.shape();
  out_shape.back() = n;
  const auto& code = kernel->handle.empty() ? kernel->cubin : kernel->handle;
  const auto& offset = rope.offset.value_or(x);
  std::vector<mx::fast::ScalarArg> scalars = {n, rope.scale, rope.log2_base};
  auto out = mx::fast::precompiled_cuda_kernel(
      kernel->name, code,
      {x, r, r_weight.value_or(h_weight), h_weight, w, scales, b, offset,
       rope.freqs.value_or(offset)},
      {x.shape(), out_shape}, {t, t}, scalars, {static_cast<int>(blocks) * threads, 1, 1},
      {threads, 1, 1}, 0, std::nullopt, true, mx::to_stream(s));
  return std::make_pair(out.at(0), out.at(1));
}

}  // namespace mlxs
