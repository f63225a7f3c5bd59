# SPDX-License-Identifier: EUPL-1.2
"""Read-only probes for `qmv_variants.py`: kernels that read what the one-row product reads and compute nothing,
so that a variant's time can be held against its reads' (bw, bwx, bw2, bwp, stream)."""
from qmv_parts import PRO, ROW

# bw: the weights, scales and biases read as g4w4 reads them and nothing computed (their bits xor-ed into
# the output): how fast this grid can stream the matrix at all. bwx: the same with x read as g4w4 reads it.
# Their error column is meaningless; against g4w4 they say whether the kernel is bound by its reads or by
# its arithmetic.
BW = PRO + ROW + r'''
  const uint4* xq = reinterpret_cast<const uint4*>(x);
  unsigned int acc = 0u;
#pragma unroll UNROLL
  for (int c = lane; c < CHUNKS; c += 32) {
    const uint4 wv = __ldg(wrow + c);
    const int g = (c * 32) / GROUP;
    acc ^= wv.x ^ wv.y ^ wv.z ^ wv.w ^ __bfloat16_as_ushort(srow[g]) ^ __bfloat16_as_ushort(brow[g]);
    if (WITH_X) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint4 xv = __ldg(xq + c * 4 + q);
        acc ^= xv.x ^ xv.y ^ xv.z ^ xv.w;
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) out[row] = static_cast<T>(static_cast<float>(acc & 7u));
'''

# Read patterns with more bytes in flight a warp, reads only (as bw), to pick one before wrapping the product
# around it. bw2: 32 bytes a lane a step (two neighbouring 16-byte words), so a warp reads 1 KB at a time.
BW2 = PRO + ROW + r'''
  unsigned int acc = 0u;
#pragma unroll UNROLL
  for (int c = 2 * lane; c < CHUNKS; c += 64) {
    const uint4 a = __ldg(wrow + c);
    const uint4 b = c + 1 < CHUNKS ? __ldg(wrow + c + 1) : make_uint4(0u, 0u, 0u, 0u);
    const int g = (c * 32) / GROUP;
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ __bfloat16_as_ushort(srow[g]) ^ __bfloat16_as_ushort(brow[g]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) out[row] = static_cast<T>(static_cast<float>(acc & 7u));
'''

# bwp: persistent warps (a few blocks an SM), each striding over rows with the next row's first words loaded
# before the current row's are used, so a warp never waits empty between rows.
BWP = PRO + r'''
  const int warps = gridDim.x * (blockDim.x >> 5);
  int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  constexpr int PER = (CHUNKS + 31) / 32;
  uint4 next[PER];
  auto fetch = [&](int r, uint4* dst) {
    const uint4* wr = reinterpret_cast<const uint4*>(w + static_cast<size_t>(r) * (K / 8));
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int c = lane + 32 * i;
      dst[i] = c < CHUNKS ? __ldg(wr + c) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  if (row < n) fetch(row, next);
  for (; row < n; row += warps) {
    uint4 cur[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) cur[i] = next[i];
    if (row + warps < n) fetch(row + warps, next);
    const T* srow = scales + static_cast<size_t>(row) * GROUPS;
    const T* brow = biases + static_cast<size_t>(row) * GROUPS;
    unsigned int acc = 0u;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int c = lane + 32 * i;
      const int g = (min(c, CHUNKS - 1) * 32) / GROUP;
      acc ^= cur[i].x ^ cur[i].y ^ cur[i].z ^ cur[i].w ^ __bfloat16_as_ushort(srow[g]) ^ __bfloat16_as_ushort(brow[g]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[row] = static_cast<T>(static_cast<float>(acc & 7u));
  }
'''

# stream: every byte of w, scales and biases read once, grid-stride in 16-byte words, four loads in flight a
# thread, nothing computed: what the card reads in a kernel of this size at all (the bound for any layout).
STREAM = r'''
  const size_t tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  unsigned int acc = 0u;
  const uint4* parts[3] = {reinterpret_cast<const uint4*>(w), reinterpret_cast<const uint4*>(scales),
                           reinterpret_cast<const uint4*>(biases)};
  const size_t counts[3] = {static_cast<size_t>(w_shape[0]) * (K / 32),
                            static_cast<size_t>(w_shape[0]) * (K / GROUP) / 8,
                            static_cast<size_t>(w_shape[0]) * (K / GROUP) / 8};
  for (int p = 0; p < 3; ++p) {
    const uint4* src = parts[p];
    const size_t cnt = counts[p];
    for (size_t i = tid; i < cnt; i += 4 * stride) {
      uint4 a[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const size_t j = i + u * stride;
        a[u] = j < cnt ? __ldg(src + j) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) acc ^= a[u].x ^ a[u].y ^ a[u].z ^ a[u].w;
    }
  }
  if (tid < static_cast<size_t>(w_shape[0])) out[tid] = static_cast<T>(static_cast<float>(acc & 7u));
'''
