// SPDX-License-Identifier: EUPL-1.2
//
// Attention for one query position (a decode step) as one CUDA kernel of ours
// (try_sdpa_decode, called by mlxs_sdpa in mlxs_fast.cpp). MLX's CUDA backend
// has a fused kernel for head sizes 64, 96 and 128 without a mask array; for
// the rest (Gemma 3's head size of 256; a batch's left-padding mask, a sliding
// window) it runs its unfused attention, some five kernels a layer (the scale,
// a matmul, the mask, a softmax, a matmul), and a small model's decode step is
// bound by the host's cost a kernel (docs/benchmarks.md). This kernel takes
// those steps, with their roundings, in one launch. A second kernel does the
// same for 2 to 8 queries after cached keys (try_sdpa_few: speculative
// decoding's check), which grouped_sdpa composes from some eighteen. Both are
// compiled and launched as our other kernels are (mlxs_kernel_cache.cpp),
// through MLX's precompiled launch only: they take the keys' count as a scalar.

#include <algorithm>
#include <cstring>
#include <optional>

#include "mlx/primitives.h"
#include "mlxs_internal.h"

namespace {

// One block of WARPS warps a (batch row, key/value head): its REP query heads
// of D values (32 lanes x D / 32 each), over `len` keys of the buffers k and v
// ([B, hkv, cap, D], positions from 0). MLX's unfused attention's steps and
// roundings: q times the scale rounded to T (the scale itself rounded to T
// first), each score's dot product summed in float and rounded to T; a false
// in a boolean mask puts T's lowest value (`lowest`) in its place, an additive mask is
// added in T; a softmax in float (MLX's fast exponential, times the
// reciprocal of the sum) rounded to T; the probabilities times the values
// summed in float, rounded to T. Sums in another order than MLX's, so a value
// may differ in its last bit. Scores and probabilities live in dynamic shared
// memory (REP x len of T), then WARPS x D floats for the sums across warps.
// Template arguments: T, D, REP, MASK (0 none, 1 boolean, 2 additive of T),
// MASK_ROWS (1: a mask row per batch row, [B, len]; 0: one for all, [len]),
// WARPS. Inputs q [B, hkv * REP, 1, D], k, v, mask (q when MASK is 0);
// output out like q; scalars len, cap, hkv, scale, lowest.
constexpr const char* kSdpaDecodeSource = R"(
  constexpr int VPL = D / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int b = blockIdx.x / hkv;
  const int g = blockIdx.x % hkv;
  extern __shared__ float4 smem4[];
  T* sc = reinterpret_cast<T*>(smem4);
  float* red = reinterpret_cast<float*>(smem4) + ((REP * len * static_cast<int>(sizeof(T)) + 15) / 16) * 4;
  const float scale_t = static_cast<float>(static_cast<T>(scale));
  float qv[REP][VPL];
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    const T* qp = q + (static_cast<size_t>(b) * hkv * REP + g * REP + r) * D + lane * VPL;
#pragma unroll
    for (int e = 0; e < VPL; ++e) {
      qv[r][e] = static_cast<float>(static_cast<T>(scale_t * static_cast<float>(qp[e])));
    }
  }
  const size_t head = (static_cast<size_t>(b) * hkv + g) * static_cast<size_t>(cap) * D;
  const T* kb = k + head;
  const T* vb = v + head;
  const unsigned char* mb = reinterpret_cast<const unsigned char*>(mask) + (MASK_ROWS ? static_cast<size_t>(b) * len : 0);
  const T* ma = mask + (MASK_ROWS ? static_cast<size_t>(b) * len : 0);
  float mx_[REP];
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    mx_[r] = __int_as_float(0xff800000);
  }
  for (int s = warp; s < len; s += WARPS) {
    float kr[VPL];
    const T* kp = kb + static_cast<size_t>(s) * D + lane * VPL;
#pragma unroll
    for (int e = 0; e < VPL; ++e) {
      kr[e] = static_cast<float>(kp[e]);
    }
#pragma unroll
    for (int r = 0; r < REP; ++r) {
      float dot = 0.f;
#pragma unroll
      for (int e = 0; e < VPL; ++e) {
        dot += qv[r][e] * kr[e];
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        dot += __shfl_xor_sync(0xffffffffu, dot, o);
      }
      float score = static_cast<float>(static_cast<T>(dot));
      if (MASK == 1 && mb[s] == 0) {
        score = lowest;
      } else if (MASK == 2) {
        score = static_cast<float>(static_cast<T>(score + static_cast<float>(ma[s])));
      }
      mx_[r] = fmaxf(mx_[r], score);
      if (lane == 0) {
        sc[r * len + s] = static_cast<T>(score);
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < REP; ++r) {
      red[warp * REP + r] = mx_[r];
    }
  }
  __syncthreads();
  float m[REP];
  float l[REP];
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    m[r] = __int_as_float(0xff800000);
    for (int w = 0; w < WARPS; ++w) {
      m[r] = fmaxf(m[r], red[w * REP + r]);
    }
    l[r] = 0.f;
  }
  for (int s = threadIdx.x; s < len; s += WARPS * 32) {
#pragma unroll
    for (int r = 0; r < REP; ++r) {
      l[r] += __expf(static_cast<float>(sc[r * len + s]) - m[r]);
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    float v_ = l[r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      v_ += __shfl_xor_sync(0xffffffffu, v_, o);
    }
    if (lane == 0) {
      red[warp * REP + r] = v_;
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < REP; ++r) {
    float total = 0.f;
    for (int w = 0; w < WARPS; ++w) {
      total += red[w * REP + r];
    }
    l[r] = 1.f / total;
  }
  for (int s = threadIdx.x; s < len; s += WARPS * 32) {
#pragma unroll
    for (int r = 0; r < REP; ++r) {
      const float p = __expf(static_cast<float>(sc[r * len + s]) - m[r]) * l[r];
      sc[r * len + s] = static_cast<T>(p);
    }
  }
  __syncthreads();
  float acc[REP][VPL];
#pragma unroll
  for (int r = 0; r < REP; ++r) {
#pragma unroll
    for (int e = 0; e < VPL; ++e) {
      acc[r][e] = 0.f;
    }
  }
  for (int s = warp; s < len; s += WARPS) {
    float vr[VPL];
    const T* vp = vb + static_cast<size_t>(s) * D + lane * VPL;
#pragma unroll
    for (int e = 0; e < VPL; ++e) {
      vr[e] = static_cast<float>(vp[e]);
    }
#pragma unroll
    for (int r = 0; r < REP; ++r) {
      const float p = static_cast<float>(sc[r * len + s]);
#pragma unroll
      for (int e = 0; e < VPL; ++e) {
        acc[r][e] += p * vr[e];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < REP; ++r) {
#pragma unroll
    for (int e = 0; e < VPL; ++e) {
      red[warp * D + lane * VPL + e] = acc[r][e];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < D; i += WARPS * 32) {
      float total = 0.f;
      for (int w = 0; w < WARPS; ++w) {
        total += red[w * D + i];
      }
      out[(static_cast<size_t>(b) * hkv * REP + g * REP + r) * D + i] = static_cast<T>(total);
    }
    __syncthreads();
  }
)";

// A few queries a sequence (2 to 8: speculative decoding's check of its
// guesses) as one launch: one block of WARPS warps a (batch row, key/value
// head), its REP query heads of L queries each (ROWS = REP x L rows), the
// lower-right causal mask when CAUSAL (query i sees keys up to len - L + i).
// The steps and roundings of grouped_sdpa's several-query path (mlxs_fast.cpp:
// those of cuDNN's fused attention, which MLX's CUDA backend takes for them):
// q times the float scale in float, float scores, exp(s - max) in float, the
// float sum of those, each rounded to T for the product with v, the product
// summed in float and divided by the float sum, rounded once. Sums in another
// order than the matmuls', so a value may differ in its last bits. A lane
// takes a key for the scores (32 keys a warp at a time, the scaled queries
// read from shared memory), twice (the max, then the exponentials; the keys
// are read again rather than kept); a lane takes D / 32 values of a row for
// the product with v, the warp's 32 rounded exponentials a row passed through
// shared memory. Inputs q [B, hkv * REP, L, D], k and v ([B, hkv, cap, D],
// positions from 0); output out like q; scalars len, cap, hkv, scale.
constexpr const char* kSdpaFewSource = R"(
  constexpr int VPL = D / 32;
  constexpr int ROWS = REP * L;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int b = blockIdx.x / hkv;
  const int g = blockIdx.x % hkv;
  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);
  float* pe = qs + ROWS * D;
  float* mred = pe + WARPS * ROWS * 32;
  float* lred = mred + WARPS * ROWS;
  float* ared = lred + WARPS * ROWS;
  const size_t qbase = (static_cast<size_t>(b) * hkv + g) * ROWS * D;
  for (int i = threadIdx.x; i < ROWS * D; i += WARPS * 32) {
    qs[i] = scale * static_cast<float>(q[qbase + i]);
  }
  __syncthreads();
  const size_t head = (static_cast<size_t>(b) * hkv + g) * static_cast<size_t>(cap) * D;
  const T* kb = k + head;
  const T* vb = v + head;
  float m[ROWS];
  float lsum[ROWS];
#pragma unroll
  for (int j = 0; j < ROWS; ++j) {
    m[j] = __int_as_float(0xff800000);
    lsum[j] = 0.f;
  }
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    float acc[ROWS][VPL];
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
#pragma unroll
      for (int e = 0; e < VPL; ++e) {
        acc[j][e] = 0.f;
      }
    }
    for (int s0 = warp * 32; s0 < len; s0 += WARPS * 32) {
      const int s = s0 + lane;
      float dot[ROWS];
#pragma unroll
      for (int j = 0; j < ROWS; ++j) {
        dot[j] = 0.f;
      }
      if (s < len) {
        const T* kp = kb + static_cast<size_t>(s) * D;
        for (int e0 = 0; e0 < D; e0 += 8) {
          float kr[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            kr[e] = static_cast<float>(kp[e0 + e]);
          }
#pragma unroll
          for (int j = 0; j < ROWS; ++j) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              dot[j] += qs[j * D + e0 + e] * kr[e];
            }
          }
        }
      }
#pragma unroll
      for (int j = 0; j < ROWS; ++j) {
        const bool seen = s < len && (!CAUSAL || s <= len - L + j % L);
        if (pass == 0) {
          if (seen) {
            m[j] = fmaxf(m[j], dot[j]);
          }
        } else {
          const float ex = seen ? expf(dot[j] - m[j]) : 0.f;
          lsum[j] += ex;
          pe[(warp * ROWS + j) * 32 + lane] = static_cast<float>(static_cast<T>(ex));
        }
      }
      if (pass == 1) {
        __syncwarp();
        const int n = min(32, len - s0);
        for (int kk = 0; kk < n; ++kk) {
          float vr[VPL];
          const T* vp = vb + static_cast<size_t>(s0 + kk) * D + lane * VPL;
#pragma unroll
          for (int e = 0; e < VPL; ++e) {
            vr[e] = static_cast<float>(vp[e]);
          }
#pragma unroll
          for (int j = 0; j < ROWS; ++j) {
            const float p = pe[(warp * ROWS + j) * 32 + kk];
#pragma unroll
            for (int e = 0; e < VPL; ++e) {
              acc[j][e] += p * vr[e];
            }
          }
        }
        __syncwarp();
      }
    }
    float* red = pass == 0 ? mred : lred;
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      float x = pass == 0 ? m[j] : lsum[j];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float y = __shfl_xor_sync(0xffffffffu, x, o);
        x = pass == 0 ? fmaxf(x, y) : x + y;
      }
      if (lane == 0) {
        red[warp * ROWS + j] = x;
      }
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      float x = pass == 0 ? __int_as_float(0xff800000) : 0.f;
      for (int w = 0; w < WARPS; ++w) {
        x = pass == 0 ? fmaxf(x, red[w * ROWS + j]) : x + red[w * ROWS + j];
      }
      if (pass == 0) {
        m[j] = x;
      } else {
        lsum[j] = x;
      }
    }
    if (pass == 1) {
#pragma unroll
      for (int j = 0; j < ROWS; ++j) {
#pragma unroll
        for (int e = 0; e < VPL; ++e) {
          ared[warp * D + lane * VPL + e] = acc[j][e];
        }
        __syncthreads();
        for (int i = threadIdx.x; i < D; i += WARPS * 32) {
          float total = 0.f;
          for (int w = 0; w < WARPS; ++w) {
            total += ared[w * D + i];
          }
          out[qbase + j * D + i] = static_cast<T>(total / lsum[j]);
        }
        __syncthreads();
      }
    }
  }
)";

constexpr int kSdpaDecodeWarps = 8;
// The most query heads a key/value head, the widest head, and the most shared
// memory a block (MLX raises the limit past 48,000 bytes only at a kernel's
// first load; this stays below it).
constexpr int kSdpaDecodeMaxRep = 8;
constexpr int kSdpaDecodeMaxD = 256;
constexpr int kSdpaDecodeMaxShared = 48000;
// The most keys: one block a key/value head reads them all, so longer ones
// go to MLX's matmuls, which spread them over the GPU.
constexpr int kSdpaDecodeMaxKeys = 2048;

int sdpa_decode_shared(const mx::array& q, int rep, int len) {
  int d = q.shape(3);
  return (rep * len * static_cast<int>(mx::size_of(q.dtype())) + 15) / 16 * 16 +
         kSdpaDecodeWarps * std::max(d, rep) * 4;
}

// The most queries a sequence for kSdpaFewSource, and the most values a lane
// holds for a row's product with v (ROWS x D / 32, registers).
constexpr int kSdpaFewMaxQuery = 8;
constexpr int kSdpaFewMaxLaneValues = 64;

int sdpa_few_shared(int rows, int d) {
  return (rows * d + kSdpaDecodeWarps * rows * 32 + 2 * kSdpaDecodeWarps * rows +
          kSdpaDecodeWarps * d) *
         4;
}

// The buffer a prefix slice of keys or values was cut from ([B, H, cap, D],
// its first positions the slice), so that the kernel reads them in place
// instead of MLX copying the slice to make it contiguous; else `a` itself.
mx::array key_buffer(const mx::array& a) {
  // By name: libmlx exports no type information for its primitives.
  if (!a.has_primitive() || std::strcmp(a.primitive().name(), "Slice") != 0 ||
      a.inputs().size() != 1) {
    return a;
  }
  const auto& src = a.inputs()[0];
  auto [start, stop, strides] = static_cast<const mx::Slice&>(a.primitive()).state();
  if (src.ndim() != 4 || start.size() != 4 || stop.size() != 4 || strides.size() != 4) {
    return a;
  }
  for (int i = 0; i < 4; ++i) {
    bool whole = i == 2 || (stop[i] == src.shape(i));
    if (start[i] != 0 || strides[i] != 1 || !whole) {
      return a;
    }
  }
  return src;
}

}  // namespace

namespace mlxs {

namespace {

// Whether our attention kernels take q, k and v (and `mask`) at all: CUDA
// with our compile path, q, k and v 4-D of one 16-bit type, not traced, whole
// groups of query heads a key/value head, keys and values alike, head sizes a
// multiple of 32 up to kSdpaDecodeMaxD, 1 to kSdpaDecodeMaxKeys keys (one
// block a key/value head reads them all: longer ones go to MLX's matmuls,
// which spread them over the GPU).
bool attention_fits(const mx::array& q, const mx::array& k, const mx::array& v,
                    const std::optional<mx::array>& mask, mx::StreamOrDevice s) {
  auto t = q.dtype();
  if (!cuda_routes_on(s) || !kernel_cache_on() || (t != mx::bfloat16 && t != mx::float16) ||
      q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || k.dtype() != t || v.dtype() != t ||
      q.is_tracer() || k.is_tracer() || v.is_tracer() || (mask && mask->is_tracer())) {
    return false;
  }
  int h = q.shape(1), d = q.shape(3), hkv = k.shape(1), len = k.shape(2);
  return hkv > 0 && h % hkv == 0 && k.shape(0) == q.shape(0) && k.shape(3) == d &&
         v.shape() == k.shape() && d % 32 == 0 && d <= kSdpaDecodeMaxD && len >= 1 &&
         len <= kSdpaDecodeMaxKeys;
}

// Launches the attention kernel `spec` (a block of kSdpaDecodeWarps warps a
// batch row and key/value head, q's shape out) on q and the buffers the first
// `len` positions of k and v were cut from (read in place), `extra` inputs
// after them, and the keys' count, the buffers' length and `tail` as its
// scalars: nullopt where the buffers are not alike or the kernel does not
// compile.
std::optional<mx::array> launch_attention(const KernelSpec& spec, const mx::array& q,
                                          const mx::array& k, const mx::array& v, int len,
                                          std::vector<mx::array> extra,
                                          std::vector<mx::fast::ScalarArg> tail, int shared,
                                          const mx::Stream& stream) {
  auto kbuf = key_buffer(k);
  auto vbuf = key_buffer(v);
  int b = k.shape(0), hkv = k.shape(1);
  if (kbuf.shape() != vbuf.shape() || kbuf.shape(0) != b || kbuf.shape(1) != hkv ||
      kbuf.shape(3) != k.shape(3) || kbuf.shape(2) < len) {
    return std::nullopt;
  }
  auto kernel = cached_kernel(spec, "");
  if (!kernel) {
    return std::nullopt;
  }
  const auto& code = kernel->handle.empty() ? kernel->cubin : kernel->handle;
  int threads = 32 * kSdpaDecodeWarps;
  std::vector<mx::array> inputs = {q, kbuf, vbuf};
  inputs.insert(inputs.end(), extra.begin(), extra.end());
  std::vector<mx::fast::ScalarArg> scalars = {len, kbuf.shape(2)};
  scalars.insert(scalars.end(), tail.begin(), tail.end());
  return mx::fast::precompiled_cuda_kernel(kernel->name, code, inputs, {q.shape()}, {q.dtype()},
                                           scalars, {b * hkv * threads, 1, 1}, {threads, 1, 1},
                                           shared, std::nullopt, true, stream)[0];
}

}  // namespace

KernelSpec sdpa_decode_spec(mx::Dtype t, int d, int rep, int mask, bool mask_rows) {
  return {"mlxr_sdpa_decode",
          kSdpaDecodeSource,
          t,
          {{"D", d},
           {"REP", rep},
           {"MASK", mask},
           {"MASK_ROWS", mask_rows ? 1 : 0},
           {"WARPS", kSdpaDecodeWarps}},
          {"q", "k", "v", "mask"},
          {"out"},
          {"int len", "int cap", "int hkv", "float scale", "float lowest"}};
}

std::optional<mx::array> try_sdpa_decode(const mx::array& q, const mx::array& k, const mx::array& v,
                                         float scale, bool causal,
                                         const std::optional<mx::array>& mask,
                                         mx::StreamOrDevice s) {
  // One query (a lower-right causal mask then hides nothing).
  if (!attention_fits(q, k, v, mask, s) || q.shape(2) != 1 || (causal && mask)) {
    return std::nullopt;
  }
  auto t = q.dtype();
  int b = q.shape(0), h = q.shape(1), d = q.shape(3);
  int hkv = k.shape(1), len = k.shape(2);
  int rep = h / hkv;
  // MLX's fused vector kernel takes the unmasked head sizes it has.
  bool fused = d == 64 || d == 96 || d == 128;
  if (rep > kSdpaDecodeMaxRep || (fused && !mask) ||
      sdpa_decode_shared(q, rep, len) > kSdpaDecodeMaxShared) {
    return std::nullopt;
  }
  auto stream = mx::to_stream(s);
  int kind = 0;
  bool rows = false;
  mx::array m = q;
  if (mask) {
    // Broadcasts to [B, H, 1, len] with no per-head rows: [len], [1, len],
    // [1, 1, len], [1 or B, 1, 1, len].
    const auto& ms = mask->shape();
    if (ms.empty() || ms.size() > 4 || ms.back() != len ||
        (mask->dtype() != mx::bool_ && mask->dtype() != t)) {
      return std::nullopt;
    }
    for (size_t i = 0; i + 1 < ms.size(); ++i) {
      bool batch = ms.size() == 4 && i == 0 && ms[0] == b;
      if (ms[i] != 1 && !batch) {
        return std::nullopt;
      }
    }
    rows = ms.size() == 4 && ms[0] == b && b > 1;
    kind = mask->dtype() == mx::bool_ ? 1 : 2;
    m = mx::reshape(*mask, {rows ? b : 1, len}, stream);
  }
  auto lowest = static_cast<float>(mx::finfo(t).min);
  return launch_attention(sdpa_decode_spec(t, d, rep, kind, rows), q, k, v, len, {m},
                          {hkv, scale, lowest}, sdpa_decode_shared(q, rep, len), stream);
}

KernelSpec sdpa_few_spec(mx::Dtype t, int d, int rep, int l, bool causal) {
  return {
      "mlxr_sdpa_few",
      kSdpaFewSource,
      t,
      {{"D", d}, {"REP", rep}, {"L", l}, {"CAUSAL", causal ? 1 : 0}, {"WARPS", kSdpaDecodeWarps}},
      {"q", "k", "v"},
      {"out"},
      {"int len", "int cap", "int hkv", "float scale"}};
}

std::optional<mx::array> try_sdpa_few(const mx::array& q, const mx::array& k, const mx::array& v,
                                      float scale, bool causal,
                                      const std::optional<mx::array>& mask, mx::StreamOrDevice s) {
  // Several queries after keys already cached (a causal prompt from an empty
  // cache is MLX's, as use_grouped decides), no mask array. Checked on an H100
  // (docs/benchmarks.md, 2026-12-07, session 26).
  if (mask || !attention_fits(q, k, v, mask, s)) {
    return std::nullopt;
  }
  auto t = q.dtype();
  int h = q.shape(1), l = q.shape(2), d = q.shape(3);
  int hkv = k.shape(1), len = k.shape(2);
  if (l < 2 || l > kSdpaFewMaxQuery || l >= len) {
    return std::nullopt;
  }
  int rep = h / hkv;
  int rows = rep * l;
  if (rows * (d / 32) > kSdpaFewMaxLaneValues || sdpa_few_shared(rows, d) > kSdpaDecodeMaxShared) {
    return std::nullopt;
  }
  return launch_attention(sdpa_few_spec(t, d, rep, l, causal), q, k, v, len, {}, {hkv, scale},
                          sdpa_few_shared(rows, d), mx::to_stream(s));
}

}  // namespace mlxs
