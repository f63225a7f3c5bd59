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
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <typeinfo>
#include <vector>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#include "mlxs_internal.h"
#include "mlxs_widen_internal.h"

namespace mlxs::widen {

// Off: the portable loop even where the CPU has AVX2 (tests, measuring).
std::atomic<bool> simd_on{true};

bool use_simd() {
#ifdef MLXS_WIDEN_X86
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  return simd_on.load(std::memory_order_relaxed) && avx2;
#else
  return false;
#endif
}

// A weight as the primitives take it, row-contiguous: as it is when it already is (an
// evaluated weight, known from its flags), else through MLX's copy. The rows of x are taken
// with any strides (strided_rows, packed_rows), so a decode step carries no copy node.
mx::array row_contiguous(const mx::array& a, const mx::Stream& s) {
  if (a.is_available() && a.flags().row_contiguous) {
    return a;
  }
  return mx::contiguous(a, false, s);
}

}  // namespace mlxs::widen

namespace {

// The helper threads of split_rows: each waits for a new job, takes its share
// (its index among the shares; none when the job has fewer), and counts itself
// done. One job at a time; a second stream's product finds them busy and runs
// on its own thread.
class RowPool {
 public:
  RowPool() {
    int64_t hw = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
    for (int64_t i = 1; i < std::min<int64_t>(hw, kMaxShares); ++i) {
      try {
        std::thread([this, i] { serve(static_cast<int>(i)); }).detach();
        ++helpers_;
      } catch (...) {
        break;
      }
    }
  }

  int max_shares() const { return helpers_ + 1; }

  // Runs the job in `shares` shares, the first here; false (nothing run) when
  // another job holds the helpers.
  bool run(int64_t n, int shares, const std::function<void(int64_t, int64_t)>& rows_of) {
    std::unique_lock<std::mutex> busy(submit_, std::try_to_lock);
    if (!busy.owns_lock()) {
      return false;
    }
    {
      std::lock_guard<std::mutex> g(m_);
      job_ = &rows_of;
      n_ = n;
      shares_ = shares;
      pending_ = shares - 1;
      ++generation_;
    }
    wake_.notify_all();
    rows_of(0, n / shares);
    spin_until([this] { return pending_.load(std::memory_order_acquire) == 0; });
    std::unique_lock<std::mutex> g(m_);
    done_.wait(g, [this] { return pending_ == 0; });
    job_ = nullptr;
    return true;
  }

 private:
  static constexpr int64_t kMaxShares = 16;
  // How long a thread polls, yielding, before it sleeps: a decode step's
  // products come tens of microseconds apart, and waking a sleeping thread
  // costs about as much as a small product's share (SmolLM2 4-bit's one-row
  // step 22 ms with sleeping helpers, 14-15 ms polling).
  static constexpr auto kPoll = std::chrono::microseconds(500);

  template <class Ready>
  static void spin_until(const Ready& ready) {
    auto until = std::chrono::steady_clock::now() + kPoll;
    while (!ready() && std::chrono::steady_clock::now() < until) {
      std::this_thread::yield();
    }
  }

  void serve(int index) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int64_t, int64_t)>* job = nullptr;
      int64_t n0 = 0, n1 = 0;
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      {
        std::unique_lock<std::mutex> g(m_);
        wake_.wait(g, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= shares_) {
          continue;
        }
        job = job_;
        n0 = n_ * index / shares_;
        n1 = n_ * (index + 1) / shares_;
      }
      (*job)(n0, n1);
      std::lock_guard<std::mutex> g(m_);
      if (--pending_ == 0) {
        done_.notify_one();
      }
    }
  }

  std::mutex submit_;
  std::mutex m_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t n_ = 0;
  int shares_ = 0;
  std::atomic<int> pending_{0};
  std::atomic<uint64_t> generation_{0};
  int helpers_ = 0;
};

}  // namespace

namespace mlxs::widen {

void split_rows(int64_t n, int64_t row_values,
                const std::function<void(int64_t, int64_t)>& rows_of) noexcept {
  int64_t values = n * std::max<int64_t>(row_values, 1);
  if (n < 2 || values < 2 * kMinValuesPerShare) {
    rows_of(0, n);
    return;
  }
  // Never destroyed: the helpers wait on it for the life of the process.
  static RowPool* pool = new RowPool();
  int64_t shares = std::min<int64_t>({values / kMinValuesPerShare, n, pool->max_shares()});
  if (shares < 2 || !pool->run(n, static_cast<int>(shares), rows_of)) {
    rows_of(0, n);
  }
}

}  // namespace mlxs::widen

namespace {

using namespace mlxs::widen;

struct Job {
  const float* x;     // [m, k]
  const uint16_t* w;  // [n, k]
  float* out;         // [m, n]
  int64_t m, k, n;
  bool bf16;
};
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
#endif

void rows(const Job& j, int64_t n0, int64_t n1) {
#ifdef MLXS_WIDEN_X86
  if (use_simd()) {
    j.bf16 ? rows_avx2<true>(j, n0, n1) : rows_avx2<false>(j, n0, n1);
    return;
  }
#endif
  j.bf16 ? rows_portable<true>(j, n0, n1) : rows_portable<false>(j, n0, n1);
}

void run(const Job& j) noexcept {
  split_rows(j.n, j.k, [&j](int64_t n0, int64_t n1) { rows(j, n0, n1); });
}

class WidenMatmul : public mx::UnaryPrimitive {
 public:
  explicit WidenMatmul(mx::Stream s) : mx::UnaryPrimitive(s) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    if (!w.flags().row_contiguous) {
      throw std::runtime_error("[widen_matmul] the matrix must be row-contiguous");
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
    enc.dispatch([j, rows = strided_rows(x)]() mutable {
      std::vector<float> packed;
      j.x = packed_rows(j.x, rows, j.k, packed);
      run(j);
    });
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
}  // namespace

int mlxs_set_widen_simd(bool on) {
  mlxs::widen::simd_on.store(on, std::memory_order_relaxed);
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
    std::vector<mx::array> inputs{xa, row_contiguous(wa, s)};
    put(out, mx::array(std::move(shape), mx::float32, std::make_shared<WidenMatmul>(s),
                       std::move(inputs)));
  });
}
