# SPDX-License-Identifier: EUPL-1.2
"""The pieces `qmv_variants.py` builds its kernel variants from: the header (the dequantising dot product of
32 values, a warp's sum), the prologue, x copied to shared memory, a warp's row and its end."""

import re
from pathlib import Path

_CSRC = Path(__file__).resolve().parents[2] / "crates/mlx-sys/csrc/mlxs_kernels.cpp"
# The committed kernels' sources by constant name (kQmvHeader, kQmvSource, kQmmRowsSource, ...).
RAW = dict(re.findall(r'constexpr const char\* (\w+) =\s*R"\((.*?)\)";', _CSRC.read_text(), re.S))

# The committed header (QmvPair, qmv_word: one word's dequantising dot product) and, on it, 32 values' worth.
HEADER = RAW["kQmvHeader"] + r'''
template <typename T>
__device__ __forceinline__ float qdot32(uint4 wv, const uint4* xv, typename QmvPair<T>::T2 s2, typename QmvPair<T>::T2 b2) {
  const unsigned int words[4] = {wv.x, wv.y, wv.z, wv.w};
  float acc = 0.f;
#pragma unroll
  for (int q = 0; q < 4; ++q) acc += qmv_word<T>(words[q], xv[q], s2, b2);
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
