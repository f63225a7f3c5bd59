// SPDX-License-Identifier: EUPL-1.2
//
// What the CPU products of mlxs_widen.cpp (16-bit matrices) and
// mlxs_widen_quant.cpp (affine-quantised ones) share: their limits, the
// reading of x's rows with any strides, the widening of 16-bit values, the
// switch for their AVX2 paths and the split of W's rows over threads.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "mlxs_internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MLXS_WIDEN_X86 1
#endif

namespace mlxs::widen {

// More rows than this and the kernel (which reads each W row once but does
// the arithmetic with no blocking) loses to BLAS on a float32 copy of W.
constexpr int64_t kMaxRows = 32;
// W's values a thread's share at least, so small products stay on one thread.
constexpr int64_t kMinValuesPerShare = int64_t{1} << 18;

// The rows of x where they start, when x is not row-contiguous (empty when it
// is): read when the task runs, for x's values exist only then.
inline mlxs::RowStarts strided_rows(const mx::array& x) {
  return x.flags().row_contiguous ? mlxs::RowStarts{} : mlxs::row_starts(x);
}

// x's rows packed one after another into `buf` when `rows` says they are
// strided; else x as it is.
inline const float* packed_rows(const float* x, const mlxs::RowStarts& rows, int64_t k,
                                std::vector<float>& buf) {
  if (rows.start.empty()) {
    return x;
  }
  buf.resize(rows.start.size() * static_cast<size_t>(k));
  for (size_t r = 0; r < rows.start.size(); ++r) {
    for (int64_t c = 0; c < k; ++c) {
      buf[r * static_cast<size_t>(k) + static_cast<size_t>(c)] = x[rows.start[r] + c * rows.step];
    }
  }
  return buf.data();
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float f16_to_f32(uint16_t v) {
  mx::float16_t h;
  std::memcpy(&h, &v, sizeof h);
  return static_cast<float>(h);
}

// The eight lanes of a portable loop's sums, added pairwise.
inline float sum8(const float (&acc)[8]) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

#ifdef MLXS_WIDEN_X86
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}
#endif

// Off (mlxs_set_widen_simd): the portable loops even where the CPU has AVX2.
extern std::atomic<bool> simd_on;

// Whether the kernels take their AVX2 path: the switch on and the CPU has
// AVX2, FMA and F16C.
bool use_simd();

// Runs rows_of(n0, n1) over [0, n) split between this thread (the CPU
// stream's) and helper threads kept for the purpose (started once; starting a
// thread per product costs more than a small product's share saves), about
// kMinValuesPerShare of W's values a share (`row_values` a row); whole on this
// thread when it is small, when the helpers are busy with another stream's
// product, or when none could start. Each row is computed by one thread the
// same way whatever the split, so the result does not depend on it. Never
// throws.
void split_rows(int64_t n, int64_t row_values,
                const std::function<void(int64_t, int64_t)>& rows_of) noexcept;

// A weight as the primitives take it, row-contiguous: as it is when it already is (an
// evaluated weight, known from its flags), else through MLX's copy. The rows of x are taken
// with any strides (strided_rows, packed_rows), so a decode step carries no copy node.
mx::array row_contiguous(const mx::array& a, const mx::Stream& s);

}  // namespace mlxs::widen
