// SPDX-License-Identifier: EUPL-1.2
//
// x Wᵀ for float32 x and a bfloat16 or float16 W, computed in float32 while
// W is read in its own 16-bit type: our CPU kernel, as an MLX primitive.
//
// Why: on an x86 CPU a 16-bit checkpoint computes in float32, since only
// float32 matmuls reach BLAS (docs/benchmarks.md). One row of x times a big
// matrix (the output head of a decode step, or of a prompt's last token) is
// bound by reading the matrix, and float32 reads twice the bytes of the
// checkpoint's type: Gemma 3 270M's tied head (262,144 x 640) takes OpenBLAS
// 88 ms in float32, MLX's own bfloat16 matmul 174 ms, MLX's promotion of a
// bfloat16 matrix to float32 328 ms, and this kernel 22 ms on 2 cores (2-core
// Xeon, 2026-12-05). bfloat16 to float32 is exact (a shift), so the products
// are those of the float32 matrix; only the order of the sums differs.
//
// The kernel: W's rows are split over threads; each row is read once and
// dotted with every row of x (x stays in cache; 1 to 32 rows), eight lanes
// with two accumulators (AVX2 and FMA when the CPU has them, chosen at run
// time; otherwise a portable loop of eight independent sums the compiler
// vectorises). It runs where it pays: a CPU stream, x float32 with at most
// kMaxRows rows, W 2-D bfloat16 or float16. Everything else is MLX's matmul
// with its usual type promotion, which is also what this computes. Its
// derivatives are matmul's (vjp), so training through it works.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <typeinfo>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "mlxs_internal.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MLXS_WIDEN_X86 1
#endif

namespace {

// More rows than this and the kernel (which reads each W row once but does
// the arithmetic with no blocking) loses to BLAS on a float32 copy of W.
constexpr int64_t kMaxRows = 32;
// Rows of W per thread at least, so small matrices stay on one thread.
constexpr int64_t kMinRowsPerThread = 2048;

struct Job {
  const float* x;     // [m, k]
  const uint16_t* w;  // [n, k]
  float* out;         // [m, n]
  int64_t m, k, n;
  bool bf16;
};

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

template <bool BF16>
void rows_portable(const Job& j, int64_t n0, int64_t n1) {
  for (int64_t r = n0; r < n1; ++r) {
    const uint16_t* wr = j.w + r * j.k;
    for (int64_t i = 0; i < j.m; ++i) {
      const float* xr = j.x + i * j.k;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t c = 0;
      for (; c + 8 <= j.k; c += 8) {
        for (int l = 0; l < 8; ++l) {
          float wv = BF16 ? bf16_to_f32(wr[c + l]) : f16_to_f32(wr[c + l]);
          acc[l] += wv * xr[c + l];
        }
      }
      float s = sum8(acc);
      for (; c < j.k; ++c) {
        s += (BF16 ? bf16_to_f32(wr[c]) : f16_to_f32(wr[c])) * xr[c];
      }
      j.out[i * j.n + r] = s;
    }
  }
}

#ifdef MLXS_WIDEN_X86
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

template <bool BF16>
__attribute__((target("avx2,fma,f16c"))) inline __m256 widen8(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  } else {
    return _mm256_cvtph_ps(v);
  }
}

template <bool BF16>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const Job& j, int64_t n0, int64_t n1) {
  for (int64_t r = n0; r < n1; ++r) {
    const uint16_t* wr = j.w + r * j.k;
    for (int64_t i = 0; i < j.m; ++i) {
      const float* xr = j.x + i * j.k;
      __m256 a0 = _mm256_setzero_ps();
      __m256 a1 = _mm256_setzero_ps();
      int64_t c = 0;
      for (; c + 16 <= j.k; c += 16) {
        a0 = _mm256_fmadd_ps(widen8<BF16>(wr + c), _mm256_loadu_ps(xr + c), a0);
        a1 = _mm256_fmadd_ps(widen8<BF16>(wr + c + 8), _mm256_loadu_ps(xr + c + 8), a1);
      }
      float s = hsum8(_mm256_add_ps(a0, a1));
      for (; c < j.k; ++c) {
        s += (BF16 ? bf16_to_f32(wr[c]) : f16_to_f32(wr[c])) * xr[c];
      }
      j.out[i * j.n + r] = s;
    }
  }
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return yes;
}
#endif

// Off: the portable loop even where the CPU has AVX2 (tests, measuring).
std::atomic<bool> simd_on{true};

// Whether the kernels take their AVX2 path.
bool use_simd() {
#ifdef MLXS_WIDEN_X86
  return simd_on.load(std::memory_order_relaxed) && has_avx2();
#else
  return false;
#endif
}

void rows(const Job& j, int64_t n0, int64_t n1) {
#ifdef MLXS_WIDEN_X86
  if (use_simd()) {
    j.bf16 ? rows_avx2<true>(j, n0, n1) : rows_avx2<false>(j, n0, n1);
    return;
  }
#endif
  j.bf16 ? rows_portable<true>(j, n0, n1) : rows_portable<false>(j, n0, n1);
}

// Runs rows(n0, n1) over [0, n) split between threads, on the CPU stream's
// thread and helpers; never throws (a thread that cannot start leaves its
// share to this one).
template <class F>
void split_rows(int64_t n, const F& rows_of) noexcept {
  constexpr int64_t kMaxThreads = 16;
  int64_t hw = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
  int64_t threads = std::clamp<int64_t>(n / kMinRowsPerThread, 1, std::min(hw, kMaxThreads));
  std::thread pool[kMaxThreads];
  for (int64_t t = 1; t < threads; ++t) {
    int64_t n0 = n * t / threads, n1 = n * (t + 1) / threads;
    try {
      pool[t] = std::thread([&rows_of, n0, n1] { rows_of(n0, n1); });
    } catch (...) {
      rows_of(n0, n1);
    }
  }
  rows_of(0, n / threads);
  for (auto& th : pool) {
    if (th.joinable()) {
      th.join();
    }
  }
}

void run(const Job& j) noexcept {
  split_rows(j.n, [&j](int64_t n0, int64_t n1) { rows(j, n0, n1); });
}

class WidenMatmul : public mx::UnaryPrimitive {
 public:
  explicit WidenMatmul(mx::Stream s) : mx::UnaryPrimitive(s) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    if (!x.flags().row_contiguous || !w.flags().row_contiguous) {
      throw std::runtime_error("[widen_matmul] the inputs must be row-contiguous");
    }
    out.set_data(mx::allocator::malloc(out.nbytes()));
    Job j{};
    j.k = w.shape(1);
    j.n = w.shape(0);
    j.m = j.k == 0 ? 0 : static_cast<int64_t>(x.size()) / j.k;
    j.bf16 = w.dtype() == mx::bfloat16;
    j.x = x.data<float>();
    j.w = static_cast<const uint16_t*>(static_cast<const void*>(w.data<char>()));
    j.out = out.data<float>();
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(x);
    enc.set_input_array(w);
    enc.set_output_array(out);
    enc.dispatch([j] { run(j); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[widen_matmul] runs on the CPU only");
  }

  // The products' derivatives, as matmul's, in the inputs' types (so
  // training through a narrow head works; a jvp is not needed and stays
  // MLX's error).
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    const mx::array& x = primals[0];
    const mx::array& w = primals[1];
    const mx::array& cot = cotangents[0];
    mx::Stream s = stream();
    std::vector<mx::array> out;
    for (int arg : argnums) {
      if (arg == 0) {
        // d/dx of x Wᵀ: cot W.
        out.push_back(mx::matmul(cot, mx::astype(w, mx::float32, s), s));
      } else {
        // d/dW: cotᵀ x over every row, in W's type.
        mx::array c2 = mx::reshape(cot, {-1, cot.shape(-1)}, s);
        mx::array x2 = mx::reshape(x, {-1, x.shape(-1)}, s);
        out.push_back(mx::astype(mx::matmul(mx::transpose(c2, {1, 0}, s), x2, s), w.dtype(), s));
      }
    }
    return out;
  }

  const char* name() const override { return "WidenMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return typeid(other) == typeid(*this);
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape s = inputs[0].shape();
    s.back() = inputs[1].shape(0);
    return {s};
  }
};

// Whether the kernel applies; otherwise MLX's matmul runs.
bool applies(const mx::array& x, const mx::array& w, const mx::Stream& s) {
  if (s.device != mx::Device::cpu || x.dtype() != mx::float32 || w.ndim() != 2 || x.ndim() < 1) {
    return false;
  }
  if (w.dtype() != mx::bfloat16 && w.dtype() != mx::float16) {
    return false;
  }
  int64_t k = w.shape(1);
  if (k <= 0 || w.shape(0) <= 0 || x.shape(-1) != k) {
    return false;
  }
  return static_cast<int64_t>(x.size()) / k <= kMaxRows && x.size() > 0;
}

// ---------------------------------------------------------------- quantised

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

__attribute__((target("avx2,fma"))) float group_dot_avx2(const uint32_t* w, const float* x,
                                                         int64_t gs, int bits) {
  __m256 a0 = _mm256_setzero_ps();
  __m256 a1 = _mm256_setzero_ps();
  if (bits == 4) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i mask = _mm256_set1_epi32(0xF);
    for (int64_t c = 0; c < gs; c += 16) {
      __m256i q0 = _mm256_and_si256(
          _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w[c / 8])), shifts), mask);
      __m256i q1 = _mm256_and_si256(
          _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w[c / 8 + 1])), shifts), mask);
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), _mm256_loadu_ps(x + c), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), _mm256_loadu_ps(x + c + 8), a1);
    }
  } else {
    const uint8_t* b = reinterpret_cast<const uint8_t*>(w);
    for (int64_t c = 0; c < gs; c += 16) {
      __m256i q0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + c)));
      __m256i q1 =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + c + 8)));
      a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), _mm256_loadu_ps(x + c), a0);
      a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), _mm256_loadu_ps(x + c + 8), a1);
    }
  }
  return hsum8(_mm256_add_ps(a0, a1));
}
#endif

template <bool SIMD>
void qrows_with(const QJob& j, int64_t n0, int64_t n1) {
  const int64_t groups = j.k / j.gs;
  const int64_t words_per_group = j.gs * j.bits / 32;
  for (int64_t r = n0; r < n1; ++r) {
    const uint32_t* wr = j.w + r * groups * words_per_group;
    for (int64_t i = 0; i < j.m; ++i) {
      const float* xr = j.x + i * j.k;
      const float* xs = j.xsum + i * groups;
      float acc = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float dot;
#ifdef MLXS_WIDEN_X86
        if constexpr (SIMD) {
          dot = group_dot_avx2(wr + g * words_per_group, xr + g * j.gs, j.gs, j.bits);
        } else
#endif
        {
          dot = group_dot_portable(wr + g * words_per_group, xr + g * j.gs, j.gs, j.bits);
        }
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
    split_rows(j.n, [&j](int64_t n0, int64_t n1) { qrows_with<true>(j, n0, n1); });
    return;
  }
#endif
  split_rows(j.n, [&j](int64_t n0, int64_t n1) { qrows_with<false>(j, n0, n1); });
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
    for (const auto* a : {&x, &w, &scales, &biases}) {
      if (!a->flags().row_contiguous) {
        throw std::runtime_error("[widen_quantized_matmul] the inputs must be row-contiguous");
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
    enc.dispatch([j, xsum] { qrun(j); });
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

// `a` as the primitives take it, row-contiguous: as it is when it already is (an evaluated
// weight, known from its flags), else through MLX's copy. A decode step then carries a
// node for the activation only, not one for each of a product's three weight arrays.
mx::array row_contiguous(const mx::array& a, const mx::Stream& s) {
  if (a.is_available() && a.flags().row_contiguous) {
    return a;
  }
  return mx::contiguous(a, false, s);
}

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

int mlxs_set_widen_simd(bool on) {
  simd_on.store(on, std::memory_order_relaxed);
  return 0;
}

int mlxs_widen_matmul_applies(mlxs_array x, mlxs_array w, int dev, bool* out) {
  using namespace mlxs;
  return guard([&] {
    if (out == nullptr) {
      throw std::invalid_argument("null output pointer");
    }
    *out = applies(arr(x), arr(w), mx::to_stream(sod(dev)));
  });
}

int mlxs_widen_matmul(mlxs_array* out, mlxs_array x, mlxs_array w, int dev) {
  using namespace mlxs;
  return guard([&] {
    const mx::array& xa = arr(x);
    const mx::array& wa = arr(w);
    mx::Stream s = mx::to_stream(sod(dev));
    if (!applies(xa, wa, s)) {
      if (wa.ndim() != 2) {
        throw std::invalid_argument("[widen_matmul] the matrix must be 2-D [out, in]");
      }
      put(out, mx::matmul(xa, mx::transpose(wa, {1, 0}, s), s));
      return;
    }
    mx::Shape shape = xa.shape();
    shape.back() = wa.shape(0);
    std::vector<mx::array> inputs{row_contiguous(xa, s), row_contiguous(wa, s)};
    put(out, mx::array(std::move(shape), mx::float32, std::make_shared<WidenMatmul>(s),
                       std::move(inputs)));
  });
}

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
    std::vector<mx::array> inputs{row_contiguous(xa, s), row_contiguous(wa, s),
                                  row_contiguous(sa, s), row_contiguous(*ba, s)};
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
