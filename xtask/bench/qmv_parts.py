# SPDX-License-Identifier: EUPL-1.2
"""The pieces `qmv_variants.py` builds its kernel variants from: the header (the dequantising dot product of
32 values, a warp's sum), the prologue, x copied to shared memory, a warp's row and its end."""

HEADER = r'''
template <typename T> struct QmvPair;
template <> struct QmvPair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr unsigned int magic = 0x43004300u;
  static __device__ __forceinline__ T2 offset() { return __float2bfloat162_rn(128.f); }
  static __device__ __forceinline__ float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ T2 splat(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
};
template <typename T>
__device__ __forceinline__ float qdot32(uint4 wv, const uint4* xv, typename QmvPair<T>::T2 s2, typename QmvPair<T>::T2 b2) {
  using P = QmvPair<T>;
  using T2 = typename P::T2;
  const T2 off = P::offset();
  const unsigned int words[4] = {wv.x, wv.y, wv.z, wv.w};
  float acc = 0.f;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    T2 xp[4];
    memcpy(xp, &xv[q], sizeof(uint4));
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
  return acc;
}
__device__ __forceinline__ float warp_sum(float acc) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  return acc;
}
'''

PRO = r'''
  using P = QmvPair<T>;
  using T2 = P::T2;
  constexpr int CHUNKS = K / 32;
  constexpr int GROUPS = K / GROUP;
  const int n = w_shape[0];
  const int lane = threadIdx.x & 31;
'''

# x copied into shared memory once per block.
X_SHARED = r'''
  __shared__ __align__(16) T xsh[K];
  for (int i = threadIdx.x; i < K / 8; i += blockDim.x)
    reinterpret_cast<uint4*>(xsh)[i] = __ldg(reinterpret_cast<const uint4*>(x) + i);
  __syncthreads();
'''

# The warp's output row and its words, scales and biases.
ROW_POINTERS = r'''
  const uint4* wrow = reinterpret_cast<const uint4*>(w + static_cast<size_t>(row) * (K / 8));
  const T* srow = scales + static_cast<size_t>(row) * GROUPS;
  const T* brow = biases + static_cast<size_t>(row) * GROUPS;
'''
ROW = r'''
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= n) return;
''' + ROW_POINTERS

# The warp's sum, written by its first lane.
ROW_END = r'''
  acc = warp_sum(acc);
  if (lane == 0) out[row] = static_cast<T>(acc);
'''


def indent(code):
    return "".join("  " + line if line.strip() else line for line in code.splitlines(True))
