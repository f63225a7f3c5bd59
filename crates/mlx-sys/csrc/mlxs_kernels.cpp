// SPDX-License-Identifier: EUPL-1.2
//
// Our own GPU kernels, used in place of MLX's where MLX's are the
// bottleneck (docs/benchmarks.md says which, and by how much).
//
// qmv: a 4-bit affine-quantised matrix times one vector (a decode step's
// projections). On an H200, Llama-3.1-8B's five shapes take MLX 0.32.4's CUDA
// kernel 24-295 us of GPU time (400-1,000 GB/s of weights) and this one
// 13-168 us (720-1,760 GB/s): 1.2-2.4x less. One block of 8 warps copies x
// into shared memory once; then one warp per output row streams its packed
// words (16 bytes, 32 values, per lane per step; the loop unrolled 2 or 8
// deep, see qmv_unroll, so several loads are in flight), turns nibble pairs into
// bf16/fp16 pairs with the exponent trick ((w & 0x000F000F) | magic is
// 128 + n or 1024 + n exactly), dequantises them with one paired fma,
// multiplies by x in pairs and sums in float. Registers stay few, so many
// warps share an SM (the first version kept every word of a row in registers:
// 134 registers a thread, 12% occupancy).
//
// Used only where it applies exactly (CUDA device, affine 4-bit weights with
// biases, transposed, bf16 or fp16, one row of x, not under a transform: the
// kernel has no derivative); everything else goes to MLX's quantized_matmul.
// MLXR_CUSTOM_KERNELS=0 in the environment, or
// mlxs_set_custom_kernels(MLXS_KERNELS_OFF), turns it off.

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "mlx/backend/cuda/cuda.h"
#include "mlx/fast.h"
#include "mlxs_internal.h"

namespace {

// MLXS_KERNELS_OFF, _AUTO or _ALWAYS; -1 until read from the environment.
std::atomic<int> custom_kernels{-1};

int kernels_mode() {
  int v = custom_kernels.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("MLXR_CUSTOM_KERNELS");
    int from_env = MLXS_KERNELS_AUTO;
    if (env != nullptr && std::strcmp(env, "0") == 0) {
      from_env = MLXS_KERNELS_OFF;
    } else if (env != nullptr && std::strcmp(env, "always") == 0) {
      from_env = MLXS_KERNELS_ALWAYS;
    }
    int expected = -1;
    custom_kernels.compare_exchange_strong(expected, from_env);
    v = custom_kernels.load(std::memory_order_relaxed);
  }
  return v;
}

// A custom kernel costs about 9 us more host time per call than MLX's own
// (MLX assembles and hashes its source on every call), and a small model's
// decode step is bound by host time: so in AUTO mode only matrices of at
// least 4,096 x 4,096 values (8 MB at 4 bits), where the GPU time saved
// exceeds that and the step is bound by the GPU.
constexpr int64_t kQmvAutoMinValues = int64_t{4096} * 4096;

constexpr const char* kQmvHeader = R"(
template <typename T> struct QmvPair;
template <> struct QmvPair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr unsigned int magic = 0x43004300u;
  static __device__ __forceinline__ T2 offset() { return __float2bfloat162_rn(128.f); }
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ T2 splat(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
};
template <> struct QmvPair<__half> {
  using T2 = __half2;
  static constexpr unsigned int magic = 0x64006400u;
  static __device__ __forceinline__ T2 offset() { return __float2half2_rn(1024.f); }
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __half22float2(v); }
  static __device__ __forceinline__ T2 splat(__half v) { return __half2half2(v); }
};
)";

// Template arguments: T (x, scales, biases and output dtype), K (input
// features, a multiple of 32, at most kQmvMaxK), GROUP (32, 64 or 128),
// UNROLL. N comes from w's shape.
constexpr const char* kQmvSource = R"(
  using P = QmvPair<T>;
  using T2 = P::T2;
  constexpr int CHUNKS = K / 32;
  constexpr int GROUPS = K / GROUP;
  __shared__ __align__(16) T xsh[K];
  const int n = w_shape[0];
  const bool x_aligned = (reinterpret_cast<size_t>(x) & 15) == 0;
  if (x_aligned) {
    for (int i = threadIdx.x; i < K / 8; i += blockDim.x) {
      reinterpret_cast<uint4*>(xsh)[i] = __ldg(reinterpret_cast<const uint4*>(x) + i);
    }
  } else {
    for (int i = threadIdx.x; i < K; i += blockDim.x) {
      xsh[i] = x[i];
    }
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= n) {
    return;
  }
  const unsigned int* wrow = w + static_cast<size_t>(row) * (K / 8);
  const bool w_aligned = (reinterpret_cast<size_t>(w) & 15) == 0;
  const T2 off = P::offset();
  const T* srow = scales + static_cast<size_t>(row) * GROUPS;
  const T* brow = biases + static_cast<size_t>(row) * GROUPS;
  float acc = 0.f;
#pragma unroll UNROLL
  for (int c = lane; c < CHUNKS; c += 32) {
    const uint4 wv = w_aligned
        ? __ldg(reinterpret_cast<const uint4*>(wrow) + c)
        : make_uint4(wrow[4 * c], wrow[4 * c + 1], wrow[4 * c + 2], wrow[4 * c + 3]);
    const int g = (c * 32) / GROUP;
    const T2 s2 = P::splat(srow[g]);
    const T2 b2 = P::splat(brow[g]);
    const unsigned int words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 xv = reinterpret_cast<const uint4*>(xsh)[c * 4 + q];
      T2 xp[4];
      memcpy(xp, &xv, sizeof(xv));
      const unsigned int wq = words[q];
      unsigned int u04 = (wq & 0x000F000Fu) | P::magic;
      unsigned int u15 = ((wq >> 4) & 0x000F000Fu) | P::magic;
      unsigned int u26 = ((wq >> 8) & 0x000F000Fu) | P::magic;
      unsigned int u37 = ((wq >> 12) & 0x000F000Fu) | P::magic;
      const T2 w04 = __hfma2(__hsub2(*reinterpret_cast<T2*>(&u04), off), s2, b2);
      const T2 w15 = __hfma2(__hsub2(*reinterpret_cast<T2*>(&u15), off), s2, b2);
      const T2 w26 = __hfma2(__hsub2(*reinterpret_cast<T2*>(&u26), off), s2, b2);
      const T2 w37 = __hfma2(__hsub2(*reinterpret_cast<T2*>(&u37), off), s2, b2);
      T2 w01, w23, w45, w67;
      w01.x = w04.x; w01.y = w15.x;
      w23.x = w26.x; w23.y = w37.x;
      w45.x = w04.y; w45.y = w15.y;
      w67.x = w26.y; w67.y = w37.y;
      const float2 a = P::to_float2(__hmul2(xp[0], w01));
      const float2 b = P::to_float2(__hmul2(xp[1], w23));
      const float2 cc = P::to_float2(__hmul2(xp[2], w45));
      const float2 d = P::to_float2(__hmul2(xp[3], w67));
      acc += ((a.x + a.y) + (b.x + b.y)) + ((cc.x + cc.y) + (d.x + d.y));
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    acc += __shfl_xor_sync(0xffffffffu, acc, o);
  }
  if (lane == 0) {
    out[row] = static_cast<T>(acc);
  }
)";

constexpr int kQmvWarpsPerBlock = 8;
// x lives in static shared memory, at most 48 KB a block.
constexpr int kQmvMaxK = 24576;
// The launch counts threads in an int: 32 per row.
constexpr int kQmvMaxRows = 1 << 25;

// Measured on an H200 (docs/benchmarks.md): 2 is best for rows of 4,096,
// 8 for long rows (12,288, 14,336) and for widths that leave some lanes a
// chunk short (1,152: Gemma 3 1B's head takes 163 us at 8, 227 at 2).
int qmv_unroll(int k) { return (k % 1024 == 0 && k <= 8192) ? 2 : 8; }

const mx::fast::CustomKernelFunction& qmv_kernel() {
  static const mx::fast::CustomKernelFunction k =
      mx::fast::cuda_kernel("mlxr_qmv4", {"x", "w", "scales", "biases"}, {"out"}, kQmvSource,
                            kQmvHeader, /* ensure_row_contiguous */ true);
  return k;
}

}  // namespace

namespace mlxs {

std::optional<mx::array> try_fast_qmv(const mx::array& x, const mx::array& w,
                                      const mx::array& scales,
                                      const std::optional<mx::array>& biases, bool transpose,
                                      std::optional<int> group_size, std::optional<int> bits,
                                      const std::string& mode, mx::StreamOrDevice s) {
  int group = group_size.value_or(64);
  int kernels = kernels_mode();
  if (kernels == MLXS_KERNELS_OFF || !transpose || mode != "affine" || bits.value_or(4) != 4 ||
      !biases.has_value() || (group != 32 && group != 64 && group != 128)) {
    return std::nullopt;
  }
  auto stream = mx::to_stream(s);
  if (stream.device.type != mx::Device::gpu || !mx::cu::is_available()) {
    return std::nullopt;
  }
  const auto& b = *biases;
  auto t = x.dtype();
  if ((t != mx::bfloat16 && t != mx::float16) || scales.dtype() != t || b.dtype() != t ||
      w.dtype() != mx::uint32 || w.ndim() != 2 || scales.ndim() != 2 || b.ndim() != 2 ||
      x.ndim() < 1) {
    return std::nullopt;
  }
  // Under a transform (grad, vmap, compile) the kernel has no rules to follow.
  if (x.is_tracer() || w.is_tracer() || scales.is_tracer() || b.is_tracer()) {
    return std::nullopt;
  }
  int n = w.shape(0);
  int k = w.shape(1) * 8;
  if (x.shape(-1) != k || x.size() != static_cast<size_t>(k) || k % 32 != 0 || k > kQmvMaxK ||
      k % group != 0 || scales.shape(0) != n || scales.shape(1) != k / group ||
      b.shape() != scales.shape() || n <= 0 || n > kQmvMaxRows) {
    return std::nullopt;
  }
  if (kernels == MLXS_KERNELS_AUTO && static_cast<int64_t>(n) * k < kQmvAutoMinValues) {
    return std::nullopt;
  }
  auto out_shape = x.shape();
  out_shape.back() = n;
  int threads = 32 * kQmvWarpsPerBlock;
  int blocks = (n + kQmvWarpsPerBlock - 1) / kQmvWarpsPerBlock;
  auto outs =
      qmv_kernel()({x, w, scales, b}, {out_shape}, {t}, {blocks * threads, 1, 1}, {threads, 1, 1},
                   {{"T", t}, {"K", k}, {"GROUP", group}, {"UNROLL", qmv_unroll(k)}}, std::nullopt,
                   false, stream);
  return outs.at(0);
}

}  // namespace mlxs

extern "C" {

int mlxs_set_custom_kernels(int mode) {
  if (mode != MLXS_KERNELS_OFF && mode != MLXS_KERNELS_AUTO && mode != MLXS_KERNELS_ALWAYS) {
    mlxs::set_error(("unknown custom kernel mode " + std::to_string(mode)).c_str());
    return 1;
  }
  custom_kernels.store(mode, std::memory_order_relaxed);
  return 0;
}

int mlxs_custom_kernels(void) { return kernels_mode(); }

}  // extern "C"
