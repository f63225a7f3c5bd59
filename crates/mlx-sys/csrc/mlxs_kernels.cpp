// SPDX-License-Identifier: EUPL-1.2
//
// Our own GPU kernels, used in place of MLX's where MLX's are the
// bottleneck (docs/benchmarks.md says which, and by how much).
//
// qmv: a 4-bit affine-quantised matrix times one vector (a decode step's
// projections). On an H200, Llama-3.1-8B's five shapes take MLX 0.32.4's CUDA
// kernel 24-295 us of GPU time (400-1,000 GB/s of weights) and this one
// 13-168 us (720-1,760 GB/s): 1.2-2.4x less. One warp per output row streams
// its packed words (16 bytes, 32 values, per lane per step; the loop unrolled
// 4 deep so several loads are in flight) and the matching x through L1,
// turns nibble pairs into bf16/fp16 pairs with the exponent trick
// ((w & 0x000F000F) | magic is 128 + n or 1024 + n exactly), dequantises them
// with one paired fma, multiplies by x in pairs and sums in float. Registers
// stay few, so many warps share an SM (the first version kept every word of a
// row in registers: 134 registers a thread, 12% occupancy).
//
// qmm_rows: the same for 2 to 32 rows of x (a batch's decode step), on the
// tensor cores; see kQmmRowsSource. In AUTO mode for 2 to 8 rows, where it
// reads the weights once for all rows: on an H100, 8 rows cost 0.8-1.06x one
// row (kQmmAutoMaxRows says more); and for one row of an output head
// (kQmmOneRowMinN).
//
// Used only where they apply exactly (CUDA device, affine 4-bit weights with
// biases, transposed, bf16 or fp16, one row of x, or up to 32 on compute
// capability 8.0 or later with K a multiple of 128, not under a transform: the
// kernels have no derivative); everything else goes to MLX's quantized_matmul.
// MLXR_CUSTOM_KERNELS=0 in the environment, or
// mlxs_set_custom_kernels(MLXS_KERNELS_OFF), turns it off.

#include <algorithm>
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
  // d += a (16 x 16, row-major fragments) * b (16 x 8, column-major), on the tensor cores.
  static __device__ __forceinline__ void mma(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ T2 offset() { return __float2bfloat162_rn(128.f); }
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ T2 splat(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
};
template <> struct QmvPair<__half> {
  using T2 = __half2;
  static constexpr unsigned int magic = 0x64006400u;
  static __device__ __forceinline__ void mma(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ T2 offset() { return __float2half2_rn(1024.f); }
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __half22float2(v); }
  static __device__ __forceinline__ T2 splat(__half v) { return __half2half2(v); }
};
// The dot product of one 32-bit word of 4-bit weights (8 values, lowest
// nibble first, dequantised as w * s + b) with the 8 values of x in xv, summed
// in float: the nibbles become 16-bit values by an OR into the mantissa of
// magic (offset + nibble), pairs at a time.
template <typename T>
__device__ __forceinline__ float qmv_word(unsigned int wq, uint4 xv, typename QmvPair<T>::T2 s2,
                                          typename QmvPair<T>::T2 b2) {
  using P = QmvPair<T>;
  using T2 = typename P::T2;
  const T2 off = P::offset();
  T2 xp[4];
  memcpy(xp, &xv, sizeof(xv));
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
  return ((a.x + a.y) + (b.x + b.y)) + ((cc.x + cc.y) + (d.x + d.y));
}
// One output row of a 4-bit matrix times one vector x of K values, in every
// lane of the warp (kQmvSource says how); x in shared memory (SHARED_X) or in
// global memory, read through L1. With KSPLIT warps a row, this warp's share:
// every KSPLIT-th step of 32 chunks from step `part`.
template <typename T, int K, int GROUP, bool SHARED_X, int KSPLIT = 1>
__device__ __forceinline__ float qmv_row(const unsigned int* wrow, bool w_aligned, const T* srow,
                                         const T* brow, const T* x, bool x_aligned, int lane,
                                         int part = 0) {
  using P = QmvPair<T>;
  using T2 = typename P::T2;
  constexpr int CHUNKS = K / 32;
  float acc = 0.f;
#pragma unroll 4
  for (int c = lane + 32 * part; c < CHUNKS; c += 32 * KSPLIT) {
    const uint4 wv = w_aligned
        ? __ldg(reinterpret_cast<const uint4*>(wrow) + c)
        : make_uint4(wrow[4 * c], wrow[4 * c + 1], wrow[4 * c + 2], wrow[4 * c + 3]);
    const int g = (c * 32) / GROUP;
    const T2 s2 = P::splat(srow[g]);
    const T2 b2 = P::splat(brow[g]);
    const unsigned int words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      uint4 xv;
      if (SHARED_X) {
        xv = reinterpret_cast<const uint4*>(x)[c * 4 + q];
      } else if (x_aligned) {
        xv = __ldg(reinterpret_cast<const uint4*>(x) + c * 4 + q);
      } else {
        T v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          v[e] = x[c * 32 + q * 8 + e];
        }
        memcpy(&xv, v, sizeof(xv));
      }
      acc += qmv_word<T>(words[q], xv, s2, b2);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    acc += __shfl_xor_sync(0xffffffffu, acc, o);
  }
  return acc;
}
)";

// Template arguments: T (x, scales, biases and output dtype), K (input
// features, a multiple of 32), GROUP (32, 64 or 128), KSPLIT (warps a row: 1,
// or 2 for a long row, their sums added through shared memory; the block's
// warps a multiple of it). N comes from w's shape. x is read where each chunk
// needs it, through L1 (every warp of the GPU reads the same few KB): no
// shared memory for it, so no limit on K and no wait at the start of a block
// before the first weight load.
constexpr const char* kQmvSource = R"(
  const int n = w_shape[0];
  const int lane = threadIdx.x & 31;
  const int wib = threadIdx.x >> 5;
  const int warp = blockIdx.x * (blockDim.x >> 5) + wib;
  const int row = warp / KSPLIT;
  const bool x_aligned = (reinterpret_cast<size_t>(x) & 15) == 0;
  const bool w_aligned = (reinterpret_cast<size_t>(w) & 15) == 0;
  float acc = 0.f;
  if (row < n) {
    acc = qmv_row<T, K, GROUP, false, KSPLIT>(w + static_cast<size_t>(row) * (K / 8), w_aligned,
                                              scales + static_cast<size_t>(row) * (K / GROUP),
                                              biases + static_cast<size_t>(row) * (K / GROUP), x,
                                              x_aligned, lane, warp % KSPLIT);
  }
  if (KSPLIT > 1) {
    __shared__ float partial[32];
    if (lane == 0) {
      partial[wib] = acc;
    }
    __syncthreads();
    if (warp % KSPLIT != 0) {
      return;
    }
#pragma unroll
    for (int j = 1; j < KSPLIT; ++j) {
      acc += partial[wib + j];
    }
  }
  if (row < n && lane == 0) {
    out[row] = static_cast<T>(acc);
  }
)";

// A few rows of x (2 to 32) times the same 4-bit matrix: a decode step of a
// batch. One row's kernel above would read the weights once per row; this one
// reads them once for all rows and multiplies on the tensor cores
// (mma.sync m16n8k16, f32 accumulators). A block of KSPLIT warps takes 32
// output rows (two tiles of 16, the mma's A operand); each warp a share of
// the 128-value chunks of K, its partial sums added up through shared memory
// at the end. Per chunk a lane loads one 16-byte word group per output row
// (32 values) and, per 8-row tile of x, 8 values of x per step. The sum over k
// does not care about the order of k, so each lane feeds the mma the values
// its own words hold, in the order the nibble pairs come out of the exponent
// trick ((0,4), (1,5), (2,6), (3,7)), and permutes x to match (byte_perm):
// no weight crosses lanes. Template arguments: T, K (a multiple of 128),
// GROUP, MT (8-row tiles of x, 1 or 4), KSPLIT. x comes as [M, K].
constexpr const char* kQmmRowsSource = R"(
  using P = QmvPair<T>;
  using T2 = P::T2;
  constexpr int CHUNKS = K / 128;
  constexpr int ACC = 2 * MT * 4;
  __shared__ float partial[KSPLIT][32][ACC];
  const int m_rows = x_shape[0];
  const int n = w_shape[0];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int base = blockIdx.x * 32;
  // This lane's output rows: base + 8r + g; tile rt is r = 2rt (the mma's
  // row g) and r = 2rt + 1 (row g + 8). Rows past the end read the last one.
  const unsigned int* wr[4];
  const T* sr[4];
  const T* br[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int row = min(base + 8 * r + g, n - 1);
    wr[r] = w + static_cast<size_t>(row) * (K / 8);
    sr[r] = scales + static_cast<size_t>(row) * (K / GROUP);
    br[r] = biases + static_cast<size_t>(row) * (K / GROUP);
  }
  const T* xr[MT];
  bool xin[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    xin[mt] = 8 * mt + g < m_rows;
    xr[mt] = x + static_cast<size_t>(xin[mt] ? 8 * mt + g : 0) * K;
  }
  const bool w_aligned = (reinterpret_cast<size_t>(w) & 15) == 0;
  const bool x_aligned = (reinterpret_cast<size_t>(x) & 15) == 0;
  const T2 off = P::offset();
  float acc[2][MT][4] = {};
#pragma unroll 2
  for (int c = warp; c < CHUNKS; c += KSPLIT) {
    const int word = c * 16 + 4 * t;
    const int gi = (c * 128 + 32 * t) / GROUP;
    uint4 wv[4];
    T2 s2[4];
    T2 b2[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      wv[r] = w_aligned ? __ldg(reinterpret_cast<const uint4*>(wr[r] + word))
                        : make_uint4(wr[r][word], wr[r][word + 1], wr[r][word + 2], wr[r][word + 3]);
      s2[r] = P::splat(sr[r][gi]);
      b2[r] = P::splat(br[r][gi]);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // x values k .. k + 7 of each of this lane's rows of x, as the pairs
      // (0,4), (1,5), (2,6), (3,7).
      unsigned int xb[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int k = c * 128 + 32 * t + 8 * j;
        uint4 xv = make_uint4(0u, 0u, 0u, 0u);
        if (xin[mt]) {
          if (x_aligned) {
            xv = __ldg(reinterpret_cast<const uint4*>(xr[mt] + k));
          } else {
            T v[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              v[e] = xr[mt][k + e];
            }
            memcpy(&xv, v, sizeof(xv));
          }
        }
        xb[mt][0] = __byte_perm(xv.x, xv.z, 0x5410);
        xb[mt][1] = __byte_perm(xv.x, xv.z, 0x7632);
        xb[mt][2] = __byte_perm(xv.y, xv.w, 0x5410);
        xb[mt][3] = __byte_perm(xv.y, xv.w, 0x7632);
      }
#pragma unroll
      for (int rt = 0; rt < 2; ++rt) {
        const unsigned int* lo_words = reinterpret_cast<const unsigned int*>(&wv[2 * rt]);
        const unsigned int* hi_words = reinterpret_cast<const unsigned int*>(&wv[2 * rt + 1]);
        const unsigned int lo = lo_words[j];
        const unsigned int hi = hi_words[j];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          // Nibble pairs (0,4) and (1,5), then (2,6) and (3,7).
          const int sh = 8 * half;
          unsigned int a[4];
          unsigned int u;
          T2 v;
          u = ((lo >> sh) & 0x000F000Fu) | P::magic;
          v = __hfma2(__hsub2(*reinterpret_cast<T2*>(&u), off), s2[2 * rt], b2[2 * rt]);
          a[0] = *reinterpret_cast<unsigned int*>(&v);
          u = ((hi >> sh) & 0x000F000Fu) | P::magic;
          v = __hfma2(__hsub2(*reinterpret_cast<T2*>(&u), off), s2[2 * rt + 1], b2[2 * rt + 1]);
          a[1] = *reinterpret_cast<unsigned int*>(&v);
          u = ((lo >> (sh + 4)) & 0x000F000Fu) | P::magic;
          v = __hfma2(__hsub2(*reinterpret_cast<T2*>(&u), off), s2[2 * rt], b2[2 * rt]);
          a[2] = *reinterpret_cast<unsigned int*>(&v);
          u = ((hi >> (sh + 4)) & 0x000F000Fu) | P::magic;
          v = __hfma2(__hsub2(*reinterpret_cast<T2*>(&u), off), s2[2 * rt + 1], b2[2 * rt + 1]);
          a[3] = *reinterpret_cast<unsigned int*>(&v);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            P::mma(acc[rt][mt], a, xb[mt][2 * half], xb[mt][2 * half + 1]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int rt = 0; rt < 2; ++rt) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        partial[warp][lane][(rt * MT + mt) * 4 + q] = acc[rt][mt][q];
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 32 * ACC; i += blockDim.x) {
    const int l = i / ACC;
    const int e = i % ACC;
    float sum = 0.f;
#pragma unroll
    for (int wi = 0; wi < KSPLIT; ++wi) {
      sum += partial[wi][l][e];
    }
    // The accumulator's place: tile rt, x tile mt, and in the mma's output
    // row (l >> 2) or (l >> 2) + 8, column 2 (l & 3) or one more.
    const int q = e & 3;
    const int mt = (e >> 2) % MT;
    const int rt = (e >> 2) / MT;
    const int row = base + 16 * rt + (l >> 2) + (q >= 2 ? 8 : 0);
    const int m = 8 * mt + 2 * (l & 3) + (q & 1);
    if (row < n && m < m_rows) {
      out[static_cast<size_t>(m) * n + row] = static_cast<T>(sum);
    }
  }
)";

// Four warps (rows) a block, x through L1: on an H100, 2-6% less GPU time
// than eight with x in shared memory on four of Llama-3.1-8B's five shapes,
// the same on the fifth (docs/benchmarks.md).
constexpr int kQmvWarpsPerBlock = 4;
// The launch counts threads in an int: 32 per row.
constexpr int kQmvMaxRows = 1 << 25;

const mx::fast::CustomKernelFunction& qmv_kernel() {
  static const mx::fast::CustomKernelFunction k =
      mx::fast::cuda_kernel("mlxr_qmv4", {"x", "w", "scales", "biases"}, {"out"}, kQmvSource,
                            kQmvHeader, /* ensure_row_contiguous */ true);
  return k;
}

const mx::fast::CustomKernelFunction& qmm_rows_kernel() {
  static const mx::fast::CustomKernelFunction k =
      mx::fast::cuda_kernel("mlxr_qmm_rows4", {"x", "w", "scales", "biases"}, {"out"},
                            kQmmRowsSource, kQmvHeader, /* ensure_row_contiguous */ true);
  return k;
}

// The most rows of x the multi-row kernel takes (four 8-row tiles), and the
// most it takes in AUTO mode. On an H100 (docs/benchmarks.md), for
// Llama-3.1-8B's shapes, 2 to 8 rows cost 0.8-1.06x one row (MLX's kernels:
// 1.6-5.3x at 2 and 4 rows); 16 and 32 rows, with four tiles, 1.5-2.4x, where
// MLX's tensor-core kernel is as fast or faster (0.6-1.1x ours).
constexpr int kQmmMaxRows = 32;
constexpr int kQmmAutoMaxRows = 8;
// The fewest output rows for which one row of x goes to the multi-row kernel.
constexpr int kQmmOneRowMinN = 65536;

// mma.sync with bf16 needs compute capability 8.0 (Ampere) or later.
bool has_bf16_mma() {
  static const bool ok = [] {
    auto major = mlxs::gpu_info_size("compute_capability_major");
    return major && *major >= 8;
  }();
  return ok;
}

// Warps a row for the one-row kernel (kQmvSource's KSPLIT).
int qmv_ksplit(int k) {
  return kernels_mode() == MLXS_KERNELS_ALWAYS && k >= mlxs::kQmvSplitMinK ? 2 : 1;
}

// One call of a quantised matmul kernel: x's and w's rows are its scalars.
mx::array launch(const mx::fast::CustomKernelFunction& mlx_kernel, const mlxs::KernelSpec& spec,
                 const std::vector<mx::array>& inputs, const mx::Shape& shape, int x_rows,
                 int w_rows, std::tuple<int, int, int> grid, std::tuple<int, int, int> block,
                 const mx::Stream& stream) {
  return mlxs::launch_all(mlx_kernel, spec, kQmvHeader, inputs, {shape}, {x_rows, w_rows}, grid,
                          block, stream)
      .at(0);
}

}  // namespace

namespace mlxs {

const char* qmv_header() { return kQmvHeader; }

KernelSpec qmv_spec(mx::Dtype t, int k, int group, int ksplit) {
  return {"mlxr_qmv4", kQmvSource, t, {{"K", k}, {"GROUP", group}, {"KSPLIT", ksplit}}};
}

KernelSpec qmm_rows_spec(mx::Dtype t, int k, int group, int mt, int ksplit) {
  return {"mlxr_qmm_rows4",
          kQmmRowsSource,
          t,
          {{"K", k}, {"GROUP", group}, {"MT", mt}, {"KSPLIT", ksplit}}};
}

// One call of our kernel `spec` (its header `header`): compiled by us and
// launched as a precompiled kernel where that works (mlxs_kernel_cache.cpp;
// MLXR_KERNEL_CACHE=0: never), with `scalars` after its arrays; else through
// MLX's cuda_kernel `mlx_kernel`, the ints as template arguments.
std::vector<mx::array> launch_all(const mx::fast::CustomKernelFunction& mlx_kernel,
                                  const KernelSpec& spec, const char* header,
                                  const std::vector<mx::array>& inputs,
                                  const std::vector<mx::Shape>& shapes,
                                  const std::vector<mx::fast::ScalarArg>& scalars,
                                  std::tuple<int, int, int> grid, std::tuple<int, int, int> block,
                                  const mx::Stream& stream) {
  std::vector<mx::Dtype> dtypes(shapes.size(), spec.dtype);
  if (kernel_cache_on()) {
    if (auto kernel = cached_kernel(spec, header)) {
      // The short handle when the cubin is staged for MLX (hashed on every call), else the cubin.
      const auto& code = kernel->handle.empty() ? kernel->cubin : kernel->handle;
      return mx::fast::precompiled_cuda_kernel(kernel->name, code, inputs, shapes, dtypes, scalars,
                                               grid, block, 0, std::nullopt, true, stream);
    }
  }
  std::vector<std::pair<std::string, mx::fast::TemplateArg>> targs = {{"T", spec.dtype}};
  for (const auto& [name, value] : spec.ints) {
    targs.emplace_back(name, value);
  }
  return mlx_kernel(inputs, shapes, dtypes, grid, block, targs, std::nullopt, false, stream);
}

bool cuda_stream(mx::StreamOrDevice s) {
  return mx::to_stream(s).device.type == mx::Device::gpu && mx::cu::is_available();
}

bool cuda_routes_on(mx::StreamOrDevice s) {
  return kernels_mode() != MLXS_KERNELS_OFF && cuda_stream(s);
}

bool cpu_routes_on(mx::StreamOrDevice s) {
  return kernels_mode() != MLXS_KERNELS_OFF && mx::to_stream(s).device.type == mx::Device::cpu;
}

bool one_row_qmv(int n, int k, bool any_size) {
  int kernels = kernels_mode();
  if (kernels == MLXS_KERNELS_OFF || n <= 0 || n > kQmvMaxRows ||
      (kernels == MLXS_KERNELS_AUTO && !any_size &&
       static_cast<int64_t>(n) * k < kQmvAutoMinValues)) {
    return false;
  }
  // An output head goes to the tensor-core kernel (try_fast_qmv).
  return !(n >= kQmmOneRowMinN && k % 128 == 0 && has_bf16_mma());
}

std::optional<mx::array> try_fast_qmv(const mx::array& x, const mx::array& w,
                                      const mx::array& scales,
                                      const std::optional<mx::array>& biases, bool transpose,
                                      std::optional<int> group_size, std::optional<int> bits,
                                      const std::string& mode, mx::StreamOrDevice s) {
  int group = group_size.value_or(64);
  int kernels = kernels_mode();
  if (!transpose || mode != "affine" || bits.value_or(4) != 4 || !biases.has_value() ||
      (group != 32 && group != 64 && group != 128) || !cuda_routes_on(s)) {
    return std::nullopt;
  }
  auto stream = mx::to_stream(s);
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
  if (x.shape(-1) != k || k % 32 != 0 || k % group != 0 || scales.shape(0) != n ||
      scales.shape(1) != k / group || b.shape() != scales.shape() || n <= 0 || n > kQmvMaxRows) {
    return std::nullopt;
  }
  if (kernels == MLXS_KERNELS_AUTO && static_cast<int64_t>(n) * k < kQmvAutoMinValues) {
    return std::nullopt;
  }
  auto out_shape = x.shape();
  out_shape.back() = n;
  size_t rows = x.size() / static_cast<size_t>(k);
  if (rows == 0) {
    return std::nullopt;
  }
  // One row of x times a matrix of many rows (an output head) goes to the
  // tensor-core kernel too: on an H100 Gemma 3's head (262,144 x 1,152) takes
  // 91 us there against 155 in the one-row kernel, Llama's (128,256 x 4,096)
  // 145 against 152; smaller matrices are faster in the one-row kernel.
  bool head = rows == 1 && n >= kQmmOneRowMinN && k % 128 == 0 && has_bf16_mma();
  if (rows >= 2 || head) {
    size_t most = kernels == MLXS_KERNELS_AUTO ? kQmmAutoMaxRows : kQmmMaxRows;
    if (rows > most || k % 128 != 0 || !has_bf16_mma()) {
      return std::nullopt;
    }
    int m = static_cast<int>(rows);
    int ksplit = std::min(8, k / 128);
    int threads = 32 * ksplit;
    int blocks = (n + 31) / 32;
    auto x2 = mx::reshape(x, {m, k}, stream);
    auto y =
        launch(qmm_rows_kernel(), qmm_rows_spec(t, k, group, m <= 8 ? 1 : 4, ksplit),
               {x2, w, scales, b}, {m, n}, m, n, {blocks * threads, 1, 1}, {threads, 1, 1}, stream);
    return mx::reshape(y, out_shape, stream);
  }
  int ksplit = qmv_ksplit(k);
  if (n > kQmvMaxRows / ksplit) {
    return std::nullopt;
  }
  int threads = 32 * kQmvWarpsPerBlock;
  int blocks = (n * ksplit + kQmvWarpsPerBlock - 1) / kQmvWarpsPerBlock;
  return launch(qmv_kernel(), qmv_spec(t, k, group, ksplit), {x, w, scales, b}, out_shape,
                static_cast<int>(rows), n, {blocks * threads, 1, 1}, {threads, 1, 1}, stream);
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
