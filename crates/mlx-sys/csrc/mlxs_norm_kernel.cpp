// SPDX-License-Identifier: EUPL-1.2
//
// A block's residual sum with the RMS norms around it as one CUDA kernel of
// ours (mlxs_fused_norm_add in mlxs_fast.cpp): MLX runs the norm, the add and
// the next norm as three kernels, and a small model's decode step is bound by
// the host's cost a kernel (docs/benchmarks.md). Compiled and launched as our
// other kernels are (mlxs_kernels.cpp, mlxs_kernel_cache.cpp).

#include <cstring>
#include <optional>
#include <utility>

#include "mlx/fast.h"
#include "mlxs_internal.h"

namespace {

// h = x + norm(r) (NORM_R; else x + r) and y = norm(h) (NORM_H), one row of D
// values a block of 256 threads, with MLX's roundings: a norm's x / rms(x)
// rounded to T, then its product with the weight in T; the sum in T; y from h
// as stored. Template arguments: T, D, NORM_R and NORM_H (0 or 1), EPS (eps's
// float bits). Inputs x, r, wr, wh (a weight not used may be any array);
// outputs h, y (y not written without NORM_H). The sums of squares are added
// in another order than MLX's, so a norm may differ from MLX's in its last bit.
constexpr const char* kNormAddSource = R"(
  constexpr int THREADS = 256;
  const float eps = __int_as_float(EPS);
  const int tid = threadIdx.x;
  const size_t row = blockIdx.x;
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
  T* hr = h + row * D;
  float r_scale = 1.f;
  if (NORM_R) {
    float sum = 0.f;
    for (int i = tid; i < D; i += THREADS) {
      float v = static_cast<float>(rr[i]);
      sum += v * v;
    }
    r_scale = rsqrtf(block_sum(sum) / D + eps);
  }
  float h_sum = 0.f;
  for (int i = tid; i < D; i += THREADS) {
    T rn = NORM_R ? T(wr[i] * T(static_cast<float>(rr[i]) * r_scale)) : rr[i];
    T hv = xr[i] + rn;
    hr[i] = hv;
    float f = static_cast<float>(hv);
    h_sum += f * f;
  }
  if (NORM_H) {
    const float h_scale = rsqrtf(block_sum(h_sum) / D + eps);
    T* yr = y + row * D;
    for (int i = tid; i < D; i += THREADS) {
      yr[i] = wh[i] * T(static_cast<float>(hr[i]) * h_scale);
    }
  }
)";
constexpr int kNormAddThreads = 256;
// The widest row the fused norm takes, and the most rows (the launch counts threads in an int).
constexpr int kNormAddMaxWidth = 1 << 16;
constexpr size_t kNormAddMaxRows = size_t{1} << 22;

const mx::fast::CustomKernelFunction& norm_add_kernel() {
  static const mx::fast::CustomKernelFunction k =
      mx::fast::cuda_kernel("mlxr_norm_add", {"x", "r", "wr", "wh"}, {"h", "y"}, kNormAddSource, "",
                            /* ensure_row_contiguous */ true);
  return k;
}

}  // namespace

namespace mlxs {

KernelSpec norm_add_spec(mx::Dtype t, int d, bool norm_r, bool norm_h, float eps) {
  int eps_bits = 0;
  std::memcpy(&eps_bits, &eps, sizeof eps_bits);
  return {"mlxr_norm_add",
          kNormAddSource,
          t,
          {{"D", d}, {"NORM_R", norm_r ? 1 : 0}, {"NORM_H", norm_h ? 1 : 0}, {"EPS", eps_bits}},
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
  std::vector<mx::Shape> shapes = {x.shape(), h_weight ? x.shape() : mx::Shape{1}};
  auto out = launch_all(
      norm_add_kernel(), spec, "", {x, r, r_weight.value_or(x), h_weight.value_or(x)}, shapes, {},
      {static_cast<int>(rows) * kNormAddThreads, 1, 1}, {kNormAddThreads, 1, 1}, stream);
  std::optional<mx::array> y;
  if (h_weight) {
    y = out.at(1);
  }
  return std::make_pair(out.at(0), y);
}

}  // namespace mlxs
