// SPDX-License-Identifier: EUPL-1.2
//
// The q and k heads of a fused q/k/v projection, RMS-normed (for models with
// q/k norms) and rotated, as one CUDA kernel of ours (mlxs_qk_norm_rope in
// mlxs_fast.cpp). MLX runs the slice's copy, the norm, the weight's product and
// the rope as three or four kernels a layer, and a small model's decode step is
// bound by the host's cost a kernel (docs/benchmarks.md). Compiled and
// launched as our other kernels are (mlxs_kernels.cpp, mlxs_kernel_cache.cpp).

#include <cmath>
#include <cstring>
#include <optional>
#include <string>

#include "mlx/fast.h"
#include "mlxs_internal.h"

namespace {

// MLX's rotation of one pair (a, c) at frequency index i of `half`, in place
// (rope_pair): the rope kernel below and the norm with the 4-bit product
// (mlxs_norm_kernel.cpp) both call it, so that they round alike.
constexpr const char* kRopeHeader = R"(
template <typename T, bool FREQS>
__device__ __forceinline__ void rope_pair(T& a, T& c, int i, int half, int position, float scale,
                                          float base, const float* freqs) {
  const float inv_freq = FREQS ? static_cast<float>(1.0 / freqs[i])
                               : exp2f(-(static_cast<float>(i) / static_cast<float>(half)) * base);
  const float theta = scale * static_cast<float>(position) * inv_freq;
  const float co = cosf(theta);
  const float si = sinf(theta);
  const float x1 = static_cast<float>(a);
  const float x2 = static_cast<float>(c);
  a = static_cast<T>(x1 * co - x2 * si);
  c = static_cast<T>(x1 * si + x2 * co);
}
)";

// One head of one position a block of D / 2 threads, each thread one pair of
// values the rope rotates together (i and i + D / 2, or 2i and 2i + 1 when
// TRAD). y: [B, L, row] with the heads' D values side by side from its start;
// out: [B, HEADS, L, D]. With MLX's roundings: the norm's x / rms(x) rounded to
// T, its product with the weight (w: [HEADS, 1, D]) in T, then MLX's rope
// (rope_single and rope in mlx/backend/cuda/rope.cu): the angle from the
// position times `scale` times the inverse frequency, exp2(-i / (D / 2) *
// log2(base)), or 1 / freqs[i] in double (FREQS), cos and sin in float, the
// rotation in float rounded to T. Template arguments: T, D, HEADS, NORM, TRAD,
// FREQS (0 or 1), OFFSETS (0: one offset for every row; 1: one a batch row),
// EPS (eps's float bits). Inputs y, w, offset (int32), freqs (float32; each
// declared a T pointer, as our kernels' inputs are; an input not used may be
// any array); scalars len (L), row, scale, base (log2 of the
// base). The norm's sum of squares is added in another order than MLX's, so
// it may differ from MLX's in its last bit.
constexpr const char* kQkNormRopeSource = R"(
  constexpr int HALF = D / 2;
  const int tid = threadIdx.x;
  const int head = blockIdx.x % HEADS;
  const int bl = blockIdx.x / HEADS;
  const int l = bl % len;
  const int b = bl / len;
  const int i1 = TRAD ? 2 * tid : tid;
  const int i2 = TRAD ? i1 + 1 : tid + HALF;
  const T* xr = y + static_cast<size_t>(bl) * row + static_cast<size_t>(head) * D;
  T a = xr[i1];
  T c = xr[i2];
  if (NORM) {
    __shared__ float partial[HALF / 32];
    const float fa = static_cast<float>(a);
    const float fc = static_cast<float>(c);
    float s = fa * fa + fc * fc;
    for (int o = 16; o > 0; o >>= 1) {
      s += __shfl_xor_sync(0xffffffffu, s, o);
    }
    if ((tid & 31) == 0) {
      partial[tid >> 5] = s;
    }
    __syncthreads();
    float total = 0.f;
    for (int i = 0; i < HALF / 32; ++i) {
      total += partial[i];
    }
    const float n = rsqrtf(total / D + __int_as_float(EPS));
    const T* wr = w + static_cast<size_t>(head) * D;
    a = wr[i1] * static_cast<T>(fa * n);
    c = wr[i2] * static_cast<T>(fc * n);
  }
  const int position = reinterpret_cast<const int*>(offset)[OFFSETS ? b : 0] + l;
  rope_pair<T, FREQS>(a, c, tid, HALF, position, scale, base,
                      reinterpret_cast<const float*>(freqs));
  T* o = out + ((static_cast<size_t>(b) * HEADS + head) * len + l) * D;
  o[i1] = a;
  o[i2] = c;
)";

// Head sizes a multiple of 64 (a whole number of warps a head), at most 512
// (256 threads a block); at most this many blocks.
constexpr int kQkRopeMaxD = 512;
constexpr size_t kQkRopeMaxBlocks = size_t{1} << 22;

// MLX's composition of the same steps: the first `heads` heads of y split out,
// normed, scaled by the weight and rotated (exactly what the kernel replaces).
mx::array qk_norm_rope_ops(const mx::array& y, int heads, int d,
                           const std::optional<mx::array>& weight, float eps, int dims,
                           bool traditional, std::optional<float> base, float scale,
                           const mx::array& offset, const std::optional<mx::array>& freqs,
                           mx::StreamOrDevice s) {
  int b = y.shape(0), l = y.shape(1);
  auto qk = mx::slice(y, {0, 0, 0}, {b, l, heads * d}, s);
  qk = mx::transpose(mx::reshape(qk, {b, l, heads, d}, s), {0, 2, 1, 3}, s);
  if (weight) {
    qk = mx::multiply(mlxs::rms_norm(qk, std::nullopt, eps, s), *weight, s);
  }
  return mlxs::rope(qk, dims, traditional, base, scale, offset, freqs, s);
}

}  // namespace

namespace mlxs {

const char* rope_header() { return kRopeHeader; }

KernelSpec qk_norm_rope_spec(mx::Dtype t, int d, int heads, bool norm, bool traditional, bool freqs,
                             bool offsets, float eps) {
  int eps_bits = 0;
  std::memcpy(&eps_bits, &eps, sizeof eps_bits);
  return {"mlxr_qk_norm_rope",
          kQkNormRopeSource,
          t,
          {{"D", d},
           {"HEADS", heads},
           {"NORM", norm ? 1 : 0},
           {"TRAD", traditional ? 1 : 0},
           {"FREQS", freqs ? 1 : 0},
           {"OFFSETS", offsets ? 1 : 0},
           {"EPS", eps_bits}},
          {"y", "w", "offset", "freqs"},
          {"out"},
          {"int len", "int row", "float scale", "float base"}};
}

mx::array qk_norm_rope(const mx::array& y, int heads, int d, const std::optional<mx::array>& weight,
                       float eps, int dims, bool traditional, std::optional<float> base,
                       float scale, const mx::array& offset, const std::optional<mx::array>& freqs,
                       mx::StreamOrDevice s) {
  if (y.ndim() != 3 || heads <= 0 || d <= 0 || static_cast<int64_t>(heads) * d > y.shape(2)) {
    std::string shape;
    for (auto n : y.shape()) {
      shape += (shape.empty() ? "" : ", ") + std::to_string(n);
    }
    throw std::invalid_argument("qk_norm_rope: y must be [B, L, N] with N at least heads (" +
                                std::to_string(heads) + ") times d (" + std::to_string(d) +
                                "), got [" + shape + "]");
  }
  if (weight && (weight->ndim() != 3 || weight->shape(0) != heads || weight->shape(1) != 1 ||
                 weight->shape(2) != d)) {
    throw std::invalid_argument("qk_norm_rope: the norm's weight must be [heads, 1, d]");
  }
  auto t = y.dtype();
  int b = y.shape(0), l = y.shape(1);
  size_t blocks = static_cast<size_t>(b) * l * heads;
  bool offsets = offset.ndim() == 1 && offset.shape(0) == b && b > 1;
  bool fits =
      cuda_routes_on(s) && kernel_cache_on() && (t == mx::bfloat16 || t == mx::float16) &&
      dims == d && d % 64 == 0 && d <= kQkRopeMaxD && blocks > 0 && blocks <= kQkRopeMaxBlocks &&
      (offset.ndim() == 0 || offsets || offset.size() == 1) && offset.dtype() == mx::int32 &&
      (!weight || weight->dtype() == t) &&
      (!freqs || (freqs->dtype() == mx::float32 && freqs->size() == static_cast<size_t>(d / 2))) &&
      (base || freqs) && !y.is_tracer() && !offset.is_tracer() &&
      !(weight && weight->is_tracer()) && !(freqs && freqs->is_tracer());
  std::shared_ptr<const CompiledKernel> kernel;
  if (fits) {
    kernel = cached_kernel(qk_norm_rope_spec(t, d, heads, weight.has_value(), traditional,
                                             freqs.has_value(), offsets, eps),
                           kRopeHeader);
  }
  if (!kernel) {
    return qk_norm_rope_ops(y, heads, d, weight, eps, dims, traditional, base, scale, offset, freqs,
                            s);
  }
  auto stream = mx::to_stream(s);
  const auto& code = kernel->handle.empty() ? kernel->cubin : kernel->handle;
  int threads = d / 2;
  float log2_base = base ? std::log2(*base) : 0.f;
  std::vector<mx::fast::ScalarArg> scalars = {l, y.shape(2), scale, log2_base};
  return mx::fast::precompiled_cuda_kernel(
      kernel->name, code, {y, weight.value_or(y), offset, freqs.value_or(offset)},
      {{b, heads, l, d}}, {t}, scalars, {static_cast<int>(blocks) * threads, 1, 1}, {threads, 1, 1},
      0, std::nullopt, true, stream)[0];
}

}  // namespace mlxs
