// SPDX-License-Identifier: EUPL-1.2
//
// x Wᵀ for float32 x and an affine-quantised W on a CPU stream: our kernel as
// an MLX primitive (WidenQuantizedMatmul), the quantised twin of mlxs_widen.cpp.

#include <cstdint>
#include <memory>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "mlxs_internal.h"
#include "mlxs_widen_internal.h"

namespace {

using namespace mlxs::widen;

// x Wᵀ for float32 x and an affine-quantised W (4 or 8 bits, groups of 32,
// 64 or 128, scales and biases of any float type), in float32: the values
// are scale · q + bias in float32 (dequantising with the scales widened to
// float32 first; MLX's dequantize computes in the scales' type), summed as
// scale · Σ q·x + bias · Σ x per group, so a decode step reads W packed (an
// eighth or a quarter of float32's bytes) instead of a dense float32 copy.
struct QJob {
  const float* x;      // [m, k]
  const uint32_t* w;   // [n, k * bits / 32]
  const void* scales;  // [n, k / gs]
  const void* biases;  // [n, k / gs]
  mx::Dtype sdtype = mx::float32;
  float* xsum;  // [m, k / gs]: each group's Σ x, filled first
  float* out;   // [m, n]
  int64_t m, k, n, gs;
  int bits;
};

inline float float_at(const void* p, mx::Dtype t, int64_t i) {
  if (t == mx::bfloat16) {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
  if (t == mx::float16) {
    return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
  return static_cast<const float*>(p)[i];
}

// Σ q·x over one group: `gs` values packed in `w`.
float group_dot_portable(const uint32_t* w, const float* x, int64_t gs, int bits) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int per = 32 / bits;
  const uint32_t mask = (1u << bits) - 1;
  for (int64_t c = 0; c < gs; c += per) {
    uint32_t word = w[c / per];
    for (int l = 0; l < per; ++l) {
      acc[(c + l) & 7] += static_cast<float>((word >> (bits * l)) & mask) * x[c + l];
    }
  }
  return sum8(acc);
}

#ifdef MLXS_WIDEN_X86

// One row of W dotted with row i of x, all groups in one loop: each group's
// Σ q·x stays eight lanes wide and is scaled into a vector total (one
// horizontal sum a row, not one a group), each group's two accumulators are
// new chains, so groups overlap in the core and no call or lane shuffle sits
// between them.
template <int BITS>
__attribute__((target("avx2,fma"))) float qrow_avx2(const QJob& j, int64_t r, int64_t i) {
  const int64_t groups = j.k / j.gs;
  const int64_t words_per_group = j.gs * BITS / 32;
  const uint32_t* wr = j.w + r * groups * words_per_group;
  const float* xr = j.x + i * j.k;
  const float* xs = j.xsum + i * groups;
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(0xF);
  __m256 total = _mm256_setzero_ps();
  float bias_sum = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const uint32_t* w = wr + g * words_per_group;
    const float* x = xr + g * j.gs;
    __m256 a0 = _mm256_setzero_ps();
    __m256 a1 = _mm256_setzero_ps();
    for (int64_t c = 0; c < j.gs; c += 16) {
      __m256i q0, q1;
      if constexpr (BITS == 4) {
        q0 = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w[c / 8])), shifts), mask);
        q1 = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w[c / 8 + 1])), shifts), mask);
      } else {
        const uint8_t* b = reinterpret_cast<const uint8_t*>(w) + c;
        q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
        q1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 8)));
      }
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), _mm256_loadu_ps(x + c), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), _mm256_loadu_ps(x + c + 8), a1);
    }
    float scale = float_at(j.scales, j.sdtype, r * groups + g);
    total = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_add_ps(a0, a1), total);
    bias_sum += float_at(j.biases, j.sdtype, r * groups + g) * xs[g];
  }
  return hsum8(total) + bias_sum;
}

__attribute__((target("avx2,fma"))) void qrows_avx2(const QJob& j, int64_t n0, int64_t n1) {
  for (int64_t r = n0; r < n1; ++r) {
    for (int64_t i = 0; i < j.m; ++i) {
      j.out[i * j.n + r] = j.bits == 4 ? qrow_avx2<4>(j, r, i) : qrow_avx2<8>(j, r, i);
    }
  }
}
#endif

void qrows_portable(const QJob& j, int64_t n0, int64_t n1) {
  const int64_t groups = j.k / j.gs;
  const int64_t words_per_group = j.gs * j.bits / 32;
  for (int64_t r = n0; r < n1; ++r) {
    const uint32_t* wr = j.w + r * groups * words_per_group;
    for (int64_t i = 0; i < j.m; ++i) {
      const float* xr = j.x + i * j.k;
      const float* xs = j.xsum + i * groups;
      float acc = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float dot = group_dot_portable(wr + g * words_per_group, xr + g * j.gs, j.gs, j.bits);
        float scale = float_at(j.scales, j.sdtype, r * groups + g);
        float bias = float_at(j.biases, j.sdtype, r * groups + g);
        acc += scale * dot + bias * xs[g];
      }
      j.out[i * j.n + r] = acc;
    }
  }
}

void qrun(const QJob& j) noexcept {
  const int64_t groups = j.k / j.gs;
  for (int64_t i = 0; i < j.m; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = j.x + i * j.k + g * j.gs;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t c = 0; c < j.gs; ++c) {
        acc[c & 7] += xg[c];
      }
      j.xsum[i * groups + g] = sum8(acc);
    }
  }
#ifdef MLXS_WIDEN_X86
  if (use_simd()) {
    split_rows(j.n, j.k, [&j](int64_t n0, int64_t n1) { qrows_avx2(j, n0, n1); });
    return;
  }
#endif
  split_rows(j.n, j.k, [&j](int64_t n0, int64_t n1) { qrows_portable(j, n0, n1); });
}

class WidenQuantizedMatmul : public mx::UnaryPrimitive {
 public:
  WidenQuantizedMatmul(mx::Stream s, int group_size, int bits)
      : mx::UnaryPrimitive(s), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    const mx::array& scales = inputs[2];
    const mx::array& biases = inputs[3];
    for (const auto* a : {&w, &scales, &biases}) {
      if (!a->flags().row_contiguous) {
        throw std::runtime_error("[widen_quantized_matmul] the weights must be row-contiguous");
      }
    }
    out.set_data(mx::allocator::malloc(out.nbytes()));
    QJob j{};
    j.gs = group_size_;
    j.bits = bits_;
    j.n = w.shape(0);
    j.k = static_cast<int64_t>(w.shape(1)) * 32 / bits_;
    j.m = static_cast<int64_t>(x.size()) / j.k;
    j.x = x.data<float>();
    j.w = w.data<uint32_t>();
    j.scales = scales.data<char>();
    j.biases = biases.data<char>();
    j.sdtype = scales.dtype();
    j.out = out.data<float>();
    auto xsum = std::make_shared<std::vector<float>>(static_cast<size_t>(j.m * (j.k / j.gs)));
    j.xsum = xsum->data();
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (const auto* a : {&x, &w, &scales, &biases}) {
      enc.set_input_array(*a);
    }
    enc.set_output_array(out);
    enc.dispatch([j, xsum, rows = strided_rows(x)]() mutable {
      std::vector<float> packed;
      j.x = packed_rows(j.x, rows, j.k, packed);
      qrun(j);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[widen_quantized_matmul] runs on the CPU only");
  }

  const char* name() const override { return "WidenQuantizedMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const WidenQuantizedMatmul*>(&other);
    return o != nullptr && o->group_size_ == group_size_ && o->bits_ == bits_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape s = inputs[0].shape();
    s.back() = inputs[1].shape(0);
    return {s};
  }

 private:
  int group_size_;
  int bits_;
};

bool is_float(const mx::array& a) {
  return a.dtype() == mx::float32 || a.dtype() == mx::bfloat16 || a.dtype() == mx::float16;
}

// Whether the quantised kernel applies; otherwise x times W dequantised.
bool qapplies(const mx::array& x, const mx::array& w, const mx::array& scales,
              const mx::array* biases, int gs, int bits, const mx::Stream& s) {
  if (s.device != mx::Device::cpu || x.dtype() != mx::float32 || x.ndim() < 1 || x.size() == 0) {
    return false;
  }
  if ((bits != 4 && bits != 8) || (gs != 32 && gs != 64 && gs != 128) || biases == nullptr) {
    return false;
  }
  if (w.dtype() != mx::uint32 || w.ndim() != 2 || scales.ndim() != 2 || biases->ndim() != 2) {
    return false;
  }
  if (!is_float(scales) || biases->dtype() != scales.dtype()) {
    return false;
  }
  int64_t n = w.shape(0);
  int64_t k = static_cast<int64_t>(w.shape(1)) * 32 / bits;
  if (n <= 0 || k <= 0 || k % gs != 0 || x.shape(-1) != k) {
    return false;
  }
  if (scales.shape(0) != n || scales.shape(1) != k / gs || biases->shape() != scales.shape()) {
    return false;
  }
  return static_cast<int64_t>(x.size()) / k <= kMaxRows;
}

}  // namespace

int mlxs_widen_quantized_matmul(mlxs_array* out, mlxs_array x, mlxs_array w, mlxs_array scales,
                                mlxs_array biases, int group_size, int bits, int dev) {
  using namespace mlxs;
  return guard([&] {
    const mx::array& xa = arr(x);
    const mx::array& wa = arr(w);
    const mx::array& sa = arr(scales);
    std::optional<mx::array> ba = opt(biases);
    mx::Stream s = mx::to_stream(sod(dev));
    if (!qapplies(xa, wa, sa, ba ? &*ba : nullptr, group_size, bits, s)) {
      // Scales and biases widened first: MLX's dequantize computes in their type.
      std::optional<mx::array> b32;
      if (ba) {
        b32 = mx::astype(*ba, mx::float32, s);
      }
      mx::array dense = mx::dequantize(wa, mx::astype(sa, mx::float32, s), b32, group_size, bits,
                                       "affine", std::nullopt, mx::float32, s);
      put(out, mx::matmul(xa, mx::transpose(dense, {1, 0}, s), s));
      return;
    }
    mx::Shape shape = xa.shape();
    shape.back() = wa.shape(0);
    std::vector<mx::array> inputs{xa, row_contiguous(wa, s), row_contiguous(sa, s),
                                  row_contiguous(*ba, s)};
    put(out,
        mx::array(std::move(shape), mx::float32,
                  std::make_shared<WidenQuantizedMatmul>(s, group_size, bits), std::move(inputs)));
  });
}

int mlxs_widen_quantized_matmul_applies(mlxs_array x, mlxs_array w, mlxs_array scales,
                                        mlxs_array biases, int group_size, int bits, int dev,
                                        bool* out) {
  using namespace mlxs;
  return guard([&] {
    if (out == nullptr) {
      throw std::invalid_argument("null output pointer");
    }
    std::optional<mx::array> ba = opt(biases);
    *out = qapplies(arr(x), arr(w), arr(scales), ba ? &*ba : nullptr, group_size, bits,
                    mx::to_stream(sod(dev)));
  });
}
