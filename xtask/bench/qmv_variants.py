# SPDX-License-Identifier: EUPL-1.2
"""Variants of the one-row 4-bit matrix-vector kernel (csrc/mlxs_kernels.cpp), timed per shape on a CUDA GPU.

Each variant runs through `mx.fast.cuda_kernel` on weight copies of 320 MB per shape (so every call reads from
HBM), is checked against MLX's `quantized_matmul`, and is timed by wall clock per call; run it under the CUPTI
injection library (`cupti_kernels.c`) for the GPU time per kernel name, which is what docs/benchmarks.md reports:

    CUDA_INJECTION64_PATH=libcupti_kernels.so CUPTI_KERNELS_TOP=120 python qmv_variants.py [s0,g4w4,xq,bw,bwx,bw2,bwp,xr4,ks2,rows,...]

`QMV_SHAPES=l-down,g-down` takes only those shapes (SHAPES below).

The pieces the variants are built from are in `qmv_parts.py`, the read-only probes in `qmv_reads.py`.
`rows` is the committed tensor-core kernel (kQmmRowsSource, read from the source file) on one row of x.
"""
import math, os, sys, time
import mlx.core as mx
from qmv_parts import HEADER, RAW, PRO, X_SHARED, ROW_POINTERS, ROW, ROW_END, indent
from qmv_reads import BW, BW2, BWP, STREAM

# s0: as committed (x copied into shared memory per block, one warp per row).
S0 = PRO + X_SHARED + ROW + r'''
  float acc = 0.f;
#pragma unroll UNROLL
  for (int c = lane; c < CHUNKS; c += 32) {
    const uint4 wv = __ldg(wrow + c);
    const int g = (c * 32) / GROUP;
    acc += qdot32<T>(wv, reinterpret_cast<const uint4*>(xsh) + c * 4, P::splat(srow[g]), P::splat(brow[g]));
  }
''' + ROW_END

# g: no shared memory; x read through L1 where each chunk needs it.
G = PRO + ROW + r'''
  const uint4* xq = reinterpret_cast<const uint4*>(x);
  float acc = 0.f;
#pragma unroll UNROLL
  for (int c = lane; c < CHUNKS; c += 32) {
    const uint4 wv = __ldg(wrow + c);
    const int g = (c * 32) / GROUP;
    uint4 xv[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) xv[q] = __ldg(xq + c * 4 + q);
    acc += qdot32<T>(wv, xv, P::splat(srow[g]), P::splat(brow[g]));
  }
''' + ROW_END

# p: the lane's weight words (and scales) of B chunks loaded before any x, then x through L1.
PF = PRO + ROW + r'''
  const uint4* xq = reinterpret_cast<const uint4*>(x);
  constexpr int PER = (CHUNKS + 31) / 32;
  float acc = 0.f;
#pragma unroll
  for (int b0 = 0; b0 < PER; b0 += UNROLL) {
    uint4 wv[UNROLL];
    T sc[UNROLL], bi[UNROLL];
#pragma unroll
    for (int i = 0; i < UNROLL; ++i) {
      const int c = lane + 32 * (b0 + i);
      if (b0 + i < PER && c < CHUNKS) {
        wv[i] = __ldg(wrow + c);
        sc[i] = srow[(c * 32) / GROUP];
        bi[i] = brow[(c * 32) / GROUP];
      }
    }
#pragma unroll
    for (int i = 0; i < UNROLL; ++i) {
      const int c = lane + 32 * (b0 + i);
      if (b0 + i < PER && c < CHUNKS) {
        uint4 xv[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) xv[q] = __ldg(xq + c * 4 + q);
        acc += qdot32<T>(wv[i], xv, P::splat(sc[i]), P::splat(bi[i]));
      }
    }
  }
''' + ROW_END

# r2: two rows per warp, x loaded once for both.
R2 = PRO + r'''
  const int row0 = 2 * (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5));
  if (row0 >= n) return;
  const bool two = row0 + 1 < n;
  const uint4* w0 = reinterpret_cast<const uint4*>(w + static_cast<size_t>(row0) * (K / 8));
  const uint4* w1 = two ? w0 + K / 32 : w0;
  const uint4* xq = reinterpret_cast<const uint4*>(x);
  const T* s0 = scales + static_cast<size_t>(row0) * GROUPS;
  const T* bb0 = biases + static_cast<size_t>(row0) * GROUPS;
  const T* s1 = two ? s0 + GROUPS : s0;
  const T* bb1 = two ? bb0 + GROUPS : bb0;
  float a0 = 0.f, a1 = 0.f;
#pragma unroll UNROLL
  for (int c = lane; c < CHUNKS; c += 32) {
    const uint4 v0 = __ldg(w0 + c);
    const uint4 v1 = __ldg(w1 + c);
    const int g = (c * 32) / GROUP;
    uint4 xv[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) xv[q] = __ldg(xq + c * 4 + q);
    a0 += qdot32<T>(v0, xv, P::splat(s0[g]), P::splat(bb0[g]));
    a1 += qdot32<T>(v1, xv, P::splat(s1[g]), P::splat(bb1[g]));
  }
  a0 = warp_sum(a0);
  a1 = warp_sum(a1);
  if (lane == 0) { out[row0] = static_cast<T>(a0); if (two) out[row0 + 1] = static_cast<T>(a1); }
'''

# s: persistent blocks; x in shared memory once per block, each warp strides over rows.
SP = PRO + X_SHARED + r'''
  const int warps = gridDim.x * (blockDim.x >> 5);
  for (int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < n; row += warps) {
''' + indent(ROW_POINTERS) + r'''    float acc = 0.f;
#pragma unroll UNROLL
    for (int c = lane; c < CHUNKS; c += 32) {
      const uint4 wv = __ldg(wrow + c);
      const int g = (c * 32) / GROUP;
      acc += qdot32<T>(wv, reinterpret_cast<const uint4*>(xsh) + c * 4, P::splat(srow[g]), P::splat(brow[g]));
    }
''' + indent(ROW_END) + r'''  }
'''


# xq: x copied into shared memory as the nibble pairs' order ((0,4),(1,5),(2,6),(3,7) per 8 values), so no
# permutes per row; per word the four dequantised pairs are multiplied into one bf16x2 sum, then added in float.
XQ = PRO + r"""
  __shared__ __align__(16) unsigned int xsh[K / 2];
  for (int i = threadIdx.x; i < K / 8; i += blockDim.x) {
    const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x) + i);
    uint4 o;
    o.x = __byte_perm(xv.x, xv.z, 0x5410);
    o.y = __byte_perm(xv.x, xv.z, 0x7632);
    o.z = __byte_perm(xv.y, xv.w, 0x5410);
    o.w = __byte_perm(xv.y, xv.w, 0x7632);
    reinterpret_cast<uint4*>(xsh)[i] = o;
  }
  __syncthreads();
""" + ROW + r"""  const T2 off = P::offset();
  float acc = 0.f;
#pragma unroll UNROLL
  for (int c = lane; c < CHUNKS; c += 32) {
    const uint4 wv = __ldg(wrow + c);
    const int g = (c * 32) / GROUP;
    const T2 s2 = P::splat(srow[g]);
    const T2 b2 = P::splat(brow[g]);
    const unsigned int words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 xv = reinterpret_cast<const uint4*>(xsh)[c * 4 + q];
      const unsigned int xs[4] = {xv.x, xv.y, xv.z, xv.w};
      const unsigned int wq = words[q];
      T2 a2 = P::splat(static_cast<T>(0.f));
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        unsigned int u = ((wq >> (4 * p)) & 0x000F000Fu) | P::magic;
        const T2 wp = __hfma2(__hsub2(*reinterpret_cast<T2*>(&u), off), s2, b2);
        a2 = __hfma2(*reinterpret_cast<const T2*>(&xs[p]), wp, a2);
      }
      const float2 f = P::to_float2(a2);
      acc += f.x + f.y;
    }
  }
""" + ROW_END

# gp: the product by persistent warps, each taking rows first, first + W, ... (W the warps launched) as one
# stream of steps (a step: one 16-byte word a lane, 512 bytes a warp, with its scale and bias) kept DEPTH
# steps ahead in a ring of registers, across the warp's rows: a warp never waits empty between rows, and a
# kernel launches a few blocks an SM instead of a block per four rows.
GP = PRO + r'''
  const int warps = gridDim.x * (blockDim.x >> 5);
  const int first = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  constexpr int PER = (CHUNKS + 31) / 32;
  const int my_rows = first < n ? (n - 1 - first) / warps + 1 : 0;
  const int total = my_rows * PER;
  const uint4* xq = reinterpret_cast<const uint4*>(x);
  uint4 wb[DEPTH];
  T sb[DEPTH], bb[DEPTH];
#define GP_FETCH(S, J)                                                                       \
  {                                                                                          \
    const size_t r = static_cast<size_t>(first) + static_cast<size_t>((S) / PER) * warps;    \
    const int c = lane + 32 * ((S) % PER);                                                   \
    if (c < CHUNKS) {                                                                        \
      wb[J] = __ldg(reinterpret_cast<const uint4*>(w + r * (K / 8)) + c);                    \
      const int g = (c * 32) / GROUP;                                                        \
      sb[J] = scales[r * GROUPS + g];                                                        \
      bb[J] = biases[r * GROUPS + g];                                                        \
    }                                                                                        \
  }
#pragma unroll
  for (int j = 0; j < DEPTH; ++j) {
    if (j < total) GP_FETCH(j, j)
  }
  float acc = 0.f;
  for (int base = 0; base < total; base += DEPTH) {
#pragma unroll
    for (int j = 0; j < DEPTH; ++j) {
      const int s = base + j;
      if (s < total) {
        const int c = lane + 32 * (s % PER);
        if (c < CHUNKS) {
          uint4 xv[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) xv[q] = __ldg(xq + c * 4 + q);
          acc += qdot32<T>(wb[j], xv, P::splat(sb[j]), P::splat(bb[j]));
        }
        if (s + DEPTH < total) GP_FETCH(s + DEPTH, j)
        if (s % PER == PER - 1) {
          acc = warp_sum(acc);
          if (lane == 0) out[first + (s / PER) * warps] = static_cast<T>(acc);
          acc = 0.f;
        }
      }
    }
  }
#undef GP_FETCH
'''

# xr: x read once a warp into registers (a lane's chunks: PER x 64 bytes), then RPW rows a warp, each
# row's words, scales and biases loaded a row ahead: x's reads through L1 (four times the weights' bytes in
# g4w4, which is what bwx showed cost 9-47 us over bw) fall RPW-fold. K up to 4,096 (PER <= 4).
XR = PRO + r'''
  constexpr int PER = (CHUNKS + 31) / 32;
  const int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * RPW;
  if (row0 >= n) return;
  const uint4* xq = reinterpret_cast<const uint4*>(x);
  uint4 xv[PER][4];
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = lane + 32 * i;
#pragma unroll
    for (int q = 0; q < 4; ++q) xv[i][q] = c < CHUNKS ? __ldg(xq + c * 4 + q) : make_uint4(0u, 0u, 0u, 0u);
  }
  uint4 wn[PER];
  T sn[PER], bn[PER];
  auto fetch = [&](int r) {
    const uint4* wr = reinterpret_cast<const uint4*>(w + static_cast<size_t>(r) * (K / 8));
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int c = lane + 32 * i;
      if (c < CHUNKS) {
        wn[i] = __ldg(wr + c);
        sn[i] = scales[static_cast<size_t>(r) * GROUPS + (c * 32) / GROUP];
        bn[i] = biases[static_cast<size_t>(r) * GROUPS + (c * 32) / GROUP];
      }
    }
  };
  fetch(row0);
  const int last = min(row0 + RPW, n);
  for (int row = row0; row < last; ++row) {
    uint4 wc[PER];
    T sc[PER], bc[PER];
#pragma unroll
    for (int i = 0; i < PER; ++i) { wc[i] = wn[i]; sc[i] = sn[i]; bc[i] = bn[i]; }
    if (row + 1 < last) fetch(row + 1);
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      if (lane + 32 * i < CHUNKS) acc += qdot32<T>(wc[i], xv[i], P::splat(sc[i]), P::splat(bc[i]));
    }
    acc = warp_sum(acc);
    if (lane == 0) out[row] = static_cast<T>(acc);
  }
'''

# ks: KS warps a row (split K), each taking every KS-th step of 512 bytes, their sums added through shared
# memory: more warps and loads in flight for a long row (Llama's down projection, K = 14,336: 4,096 rows make
# only 4,096 warps, where gate/up has 28,672).
KS = PRO + r'''
  const int wib = threadIdx.x >> 5;
  const int warp = blockIdx.x * (blockDim.x >> 5) + wib;
  const int row = warp / KSPLIT;
  const int part = warp % KSPLIT;
  const bool valid = row < n;
  const uint4* xq = reinterpret_cast<const uint4*>(x);
  float acc = 0.f;
  if (valid) {
    const uint4* wrow = reinterpret_cast<const uint4*>(w + static_cast<size_t>(row) * (K / 8));
    const T* srow = scales + static_cast<size_t>(row) * GROUPS;
    const T* brow = biases + static_cast<size_t>(row) * GROUPS;
#pragma unroll UNROLL
    for (int c = lane + 32 * part; c < CHUNKS; c += 32 * KSPLIT) {
      const uint4 wv = __ldg(wrow + c);
      const int g = (c * 32) / GROUP;
      uint4 xv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) xv[q] = __ldg(xq + c * 4 + q);
      acc += qdot32<T>(wv, xv, P::splat(srow[g]), P::splat(brow[g]));
    }
  }
  acc = warp_sum(acc);
  __shared__ float partial[32];
  if (lane == 0) partial[wib] = acc;
  __syncthreads();
  if (valid && part == 0 && lane == 0) {
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < KSPLIT; ++j) s += partial[wib + j];
    out[row] = static_cast<T>(s);
  }
'''

def committed_unroll(k):
    return 2 if (k % 1024 == 0 and k <= 8192) else 8

VARIANTS = {
    # name: (source, warps per block, rows per warp, unroll(k), persistent blocks per SM or 0)
    "s0": (S0, 8, 1, committed_unroll, 0),
    "g2": (G, 8, 1, lambda k: 2, 0),
    "g4": (G, 8, 1, lambda k: 4, 0),
    "g8": (G, 8, 1, lambda k: 8, 0),
    "g4w4": (G, 4, 1, lambda k: 4, 0),
    "p4": (PF, 8, 1, lambda k: 4, 0),
    "p8": (PF, 8, 1, lambda k: 8, 0),
    "r2": (R2, 8, 2, lambda k: 2, 0),
    "r2u4": (R2, 8, 2, lambda k: 4, 0),
    "sp": (SP, 8, 1, committed_unroll, 8),
    "xq": (XQ, 8, 1, committed_unroll, 0),
    "xq4": (XQ, 8, 1, lambda k: 4, 0),
    "bw": (BW.replace("WITH_X", "false"), 4, 1, lambda k: 4, 0),
    "bwx": (BW.replace("WITH_X", "true"), 4, 1, lambda k: 4, 0),
    "bw2": (BW2, 4, 1, lambda k: 4, 0),
    "bw2w8": (BW2, 8, 1, lambda k: 4, 0),
    "bwp": (BWP, 4, 1, lambda k: 1, 8),
    "bwp16": (BWP, 4, 1, lambda k: 1, 16),
    "stream": (STREAM, 8, 1, lambda k: 1, 8),
    "gp4": (GP.replace("DEPTH", "4"), 4, 1, lambda k: 1, 8),
    "gp8": (GP.replace("DEPTH", "8"), 4, 1, lambda k: 1, 8),
    "gp8p4": (GP.replace("DEPTH", "8"), 4, 1, lambda k: 1, 4),
    "gp16p4": (GP.replace("DEPTH", "16"), 4, 1, lambda k: 1, 4),
    "xr2": (XR.replace("RPW", "2"), 4, 2, lambda k: 1, 0),
    "xr4": (XR.replace("RPW", "4"), 4, 4, lambda k: 1, 0),
    "xr8": (XR.replace("RPW", "8"), 4, 8, lambda k: 1, 0),
    "xr4w8": (XR.replace("RPW", "4"), 8, 4, lambda k: 1, 0),
    "ks2": (KS.replace("KSPLIT", "2"), 4, 1 / 2, lambda k: 4, 0),
    "ks4": (KS.replace("KSPLIT", "4"), 8, 1 / 4, lambda k: 4, 0),
    "ks2w8": (KS.replace("KSPLIT", "2"), 8, 1 / 2, lambda k: 4, 0),
    "ks4u2": (KS.replace("KSPLIT", "4"), 8, 1 / 4, lambda k: 2, 0),
    "rows": (None, 0, 0, None, 0),
}

SHAPES = {
    "l-qkv": (6144, 4096), "l-o": (4096, 4096), "l-gateup": (28672, 4096), "l-down": (4096, 14336),
    "l-head": (128256, 4096), "g-gateup": (13824, 1152), "g-head": (262144, 1152), "g-down": (1152, 6912),
}
NSM = 132

def main():
    only = sys.argv[1].split(",") if len(sys.argv) > 1 else list(VARIANTS)
    mx.random.seed(0)
    print("| shape | variant | wall us/call | GB/s (wall) | max rel err |")
    print("|---|---|---|---|---|")
    shapes = os.environ.get("QMV_SHAPES", "").split(",") if os.environ.get("QMV_SHAPES") else list(SHAPES)
    for sname, (n, k) in ((name, SHAPES[name]) for name in shapes):
        g = 64
        nbytes = n * k // 2 + 2 * n * (k // g) * 2
        copies = max(2, math.ceil((320 << 20) / nbytes))
        ws = [mx.random.randint(0, 2**31 - 1, (n, k // 8)).astype(mx.uint32) for _ in range(copies)]
        ss = [(mx.random.uniform(shape=(n, k // g)) * 0.02).astype(mx.bfloat16) for _ in range(copies)]
        bs = [(mx.random.uniform(shape=(n, k // g)) * -0.1).astype(mx.bfloat16) for _ in range(copies)]
        x = mx.random.normal((1, k)).astype(mx.bfloat16)
        mx.eval(ws, ss, bs, x)
        ref = mx.quantized_matmul(x, ws[0], ss[0], bs[0], transpose=True, group_size=g, bits=4).astype(mx.float32)
        # MLX's own, for reference
        def mlx_call(i):
            return mx.quantized_matmul(x, ws[i], ss[i], bs[i], transpose=True, group_size=g, bits=4)
        calls = {"mlx": mlx_call}
        for vname in only:
            src, wpb, rpw, unroll, persist = VARIANTS[vname]
            if vname.startswith("xr") and k > 4096:
                continue  # x would not fit a lane's registers
            if vname == "rows":
                rk = mx.fast.cuda_kernel(name=f"qv_rows_{sname.replace('-', '_')}", input_names=["x", "w", "scales", "biases"],
                                         output_names=["out"], source=RAW["kQmmRowsSource"], header=RAW["kQmvHeader"])
                ks = min(8, k // 128)
                def rcall(i, rk=rk, ks=ks):
                    return rk(inputs=[x, ws[i], ss[i], bs[i]], output_shapes=[(1, n)], output_dtypes=[mx.bfloat16],
                              grid=(((n + 31) // 32) * 32 * ks, 1, 1), threadgroup=(32 * ks, 1, 1),
                              template=[("T", mx.bfloat16), ("K", k), ("GROUP", g), ("MT", 1), ("KSPLIT", ks)])[0]
                calls["rows"] = rcall
                continue
            kern = mx.fast.cuda_kernel(name=f"qv_{vname}_{sname.replace('-', '_')}", input_names=["x", "w", "scales", "biases"],
                                       output_names=["out"], source=src, header=HEADER)
            warps = math.ceil(n / rpw)
            blocks = math.ceil(warps / wpb)
            if persist:
                # as many warps as the cap allows with every warp given the same number of rows (within one)
                per_warp = math.ceil(warps / (NSM * persist * wpb))
                blocks = math.ceil(math.ceil(warps / per_warp) / wpb)
            def call(i, kern=kern, wpb=wpb, blocks=blocks, unroll=unroll):
                return kern(inputs=[x, ws[i], ss[i], bs[i]], output_shapes=[(1, n)], output_dtypes=[mx.bfloat16],
                            grid=(blocks * 32 * wpb, 1, 1), threadgroup=(32 * wpb, 1, 1),
                            template=[("T", mx.bfloat16), ("K", k), ("GROUP", g), ("UNROLL", unroll(k))])[0]
            calls[vname] = call
        for vname, call in calls.items():
            o = call(0).astype(mx.float32)
            err = (mx.abs(o - ref).max() / mx.abs(ref).max()).item()
            times = []
            for rep in range(7):
                mx.synchronize()
                t0 = time.perf_counter()
                outs = [call(i) for i in range(copies)]
                mx.eval(outs)
                mx.synchronize()
                times.append((time.perf_counter() - t0) / copies)
            t = sorted(times)[3]
            print(f"| {sname} | {vname} | {t * 1e6:.1f} | {nbytes / t / 1e9:.0f} | {err:.2e} |", flush=True)
        del ws, ss, bs
        mx.clear_cache()

main()
