// SPDX-License-Identifier: EUPL-1.2
//
// MLX's fast RMS norm and rope on a CPU stream, each as one node of the graph.
//
// Why: MLX has no CPU kernels for them, so on a CPU stream fast::rms_norm and
// fast::rope return their fallback compositions: six computing nodes a norm
// (square, sum, a multiply for the mean, add, rsqrt, two multiplies) and some
// sixteen a rope (aranges, exp, the angles, cos, sin, four multiplies, the
// subtract and add, the concatenation). A small model's decode step on a CPU is
// bound by the count of nodes (MLX's CPU stream costs some 7 µs a node:
// docs/benchmarks.md), and these are most of them: SmolLM2 135M's step had
// 1,479 computing nodes, some 850 of them its norms' and ropes'.
//
// What they compute: the compositions' steps in float32, in their order (the
// mean as Σx² times 1/n, the angles with MLX's CPU exp, sin and cos, the
// rotation's products rounded before they are subtracted or added), so on a
// CPU where MLX's reductions run one lane wide (x86) the results are the
// fallback's to the bit; elsewhere the sum of squares may add in another
// order. They take float32 inputs (a CPU computes in float32: a 16-bit
// checkpoint is widened at load) and leave everything else to MLX. Their
// derivatives, vmap and jvp are those of the same compositions
// (FallbackPrimitive below), so training through them works as before.
// MLXR_CUSTOM_KERNELS=0 (fast::set_custom_kernels(Off)) turns them off.

#include <cmath>
#include <cstdint>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-compare"
#include "mlx/backend/cpu/simd/simd.h"
#pragma GCC diagnostic pop
#include "mlxs_internal.h"

namespace {

using Fallback = std::function<std::vector<mx::array>(const std::vector<mx::array>&)>;

// A primitive whose derivatives, jvp and vmap are those of `fallback`, MLX's
// composition of the same function (what fast::Custom does; its vtable is not
// exported from libmlx, so this is our own).
class FallbackPrimitive : public mx::Primitive {
 public:
  FallbackPrimitive(mx::Stream s, Fallback fallback)
      : mx::Primitive(s), fallback_(std::move(fallback)) {}

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>&) override {
    auto all = mx::vjp(fallback_, primals, cotangents).second;
    std::vector<mx::array> out;
    for (int a : argnums) {
      out.push_back(all[a]);
    }
    return out;
  }

  std::vector<mx::array> jvp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override {
    std::vector<mx::array> all;
    for (size_t i = 0, j = 0; i < primals.size(); ++i) {
      bool given = j < argnums.size() && argnums[j] == static_cast<int>(i);
      all.push_back(given ? tangents[j++] : mx::zeros_like(primals[i]));
    }
    return mx::jvp(fallback_, primals, all).second;
  }

  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>& inputs,
                                                           const std::vector<int>& axes) override {
    auto outs = mx::vmap(fallback_, axes)(inputs);
    return {outs, std::vector<int>(outs.size(), 0)};
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error(std::string("[") + name() + "] runs on the CPU only");
  }

 protected:
  Fallback fallback_;
};

// y = x · rsqrt(mean(x²) + eps) · w over the last axis, float32.
class CpuRmsNorm : public FallbackPrimitive {
 public:
  CpuRmsNorm(mx::Stream s, Fallback fallback, float eps, bool has_weight)
      : FallbackPrimitive(s, std::move(fallback)), eps_(eps), has_weight_(has_weight) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    enc.set_input_array(x);
    enc.set_input_array(w);
    enc.set_output_array(out);
    const int64_t d = x.shape(-1);
    const int64_t ws = w.ndim() == 1 ? w.strides()[0] : 0;
    enc.dispatch([xp = x.data<float>(), rows = mlxs::row_starts(x), wp = w.data<float>(), ws,
                  op = out.data<float>(), d, eps = eps_, has_weight = has_weight_] {
      const float inv_n = 1.0f / static_cast<float>(d);
      const int64_t xs = rows.step;
      for (size_t r = 0; r < rows.start.size(); ++r) {
        const float* xr = xp + rows.start[r];
        float* yr = op + static_cast<int64_t>(r) * d;
        // In order, as MLX's CPU sum of a row (one lane wide where it has no
        // SIMD type, as on x86).
        float ss = 0.0f;
        for (int64_t c = 0; c < d; ++c) {
          float sq = xr[c * xs] * xr[c * xs];
          ss += sq;
        }
        float mean = ss * inv_n;
        float inv = 1.0f / std::sqrt(mean + eps);
        for (int64_t c = 0; c < d; ++c) {
          float y = xr[c * xs] * inv;
          yr[c] = has_weight ? y * wp[c * ws] : y;
        }
      }
    });
  }

  const char* name() const override { return "CpuRMSNorm"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* o = dynamic_cast<const CpuRmsNorm*>(&other);
    return o != nullptr && o->eps_ == eps_ && o->has_weight_ == has_weight_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float eps_;
  bool has_weight_;
};

// The rotation of the first `dims` features of x [B, N, T, D] (float32) by the
// angles (t + offset[b]) · scale · inv_freq[i]; forward only (its derivative is
// the fallback's).
class CpuRope : public FallbackPrimitive {
 public:
  CpuRope(mx::Stream s, Fallback fallback, int dims, bool traditional, float base, float scale)
      : FallbackPrimitive(s, std::move(fallback)),
        dims_(dims),
        traditional_(traditional),
        base_(base),
        scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    const mx::array& x = inputs[0];
    const mx::array& offset = inputs[1];
    std::optional<mx::array> freqs;
    if (inputs.size() == 3) {
      freqs = inputs[2];
    }
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    enc.set_input_array(x);
    enc.set_input_array(offset);
    if (freqs) {
      enc.set_input_array(*freqs);
    }
    enc.set_output_array(out);
    Job j{};
    j.x = x.data<float>();
    j.rows = mlxs::row_starts(x);
    j.offset = offset.data<int32_t>();
    j.offsets = static_cast<int64_t>(offset.size());
    j.offset_step = offset.ndim() == 1 ? offset.strides()[0] : 0;
    j.freqs = freqs ? freqs->data<float>() : nullptr;
    j.freq_step = freqs ? freqs->strides()[0] : 0;
    j.out = out.data<float>();
    j.b = x.shape(0);
    j.t = x.shape(-2);
    j.d = x.shape(-1);
    j.n = static_cast<int64_t>(x.size()) / (j.b * j.t * j.d);
    j.dims = dims_;
    j.traditional = traditional_;
    j.base = base_;
    j.scale = scale_;
    enc.dispatch([j = std::move(j)] { run(j); });
  }

  const char* name() const override { return "CpuRoPE"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto* o = dynamic_cast<const CpuRope*>(&other);
    return o != nullptr && o->dims_ == dims_ && o->traditional_ == traditional_ &&
           o->base_ == base_ && o->scale_ == scale_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  struct Job {
    const float* x;
    mlxs::RowStarts rows;
    const int32_t* offset;
    int64_t offsets, offset_step;
    const float* freqs;  // null: from the base
    int64_t freq_step;
    float* out;
    int64_t b, n, t, d;
    int dims;
    bool traditional;
    float base, scale;
  };

  // MLX's CPU exp, sin and cos (its own approximations, not libm's), so the
  // angles and their sines are the fallback's to the bit.
  static float fexp(float v) { return mx::simd::exp(mx::simd::Simd<float, 1>(v)).value; }

  static void run(const Job& j) {
    const int half = j.dims / 2;
    // The fallback's inverse frequencies: exp(-i · log(base) / half), or 1 / freqs[i].
    std::vector<float> inv(static_cast<size_t>(half));
    const float step = static_cast<float>(std::log(j.base) / half);
    for (int i = 0; i < half; ++i) {
      inv[i] = j.freqs != nullptr ? 1.0f / j.freqs[i * j.freq_step]
                                  : fexp(static_cast<float>(-i) * step);
    }
    std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
    for (int64_t bi = 0; bi < j.b; ++bi) {
      const float off = static_cast<float>(j.offset[j.offsets == 1 ? 0 : bi * j.offset_step]);
      for (int64_t ti = 0; ti < j.t; ++ti) {
        const float pos = (static_cast<float>(ti) + off) * j.scale;
        for (int i = 0; i < half; ++i) {
          float theta = pos * inv[i];
          cs[i] = mx::simd::cos(mx::simd::Simd<float, 1>(theta)).value;
          sn[i] = mx::simd::sin(mx::simd::Simd<float, 1>(theta)).value;
        }
        for (int64_t ni = 0; ni < j.n; ++ni) {
          const int64_t row = (bi * j.n + ni) * j.t + ti;
          rotate(j, j.x + j.rows.start[static_cast<size_t>(row)], j.out + row * j.d, cs.data(),
                 sn.data());
        }
      }
    }
  }

  // One row: pairs (i, i + half), or (2i, 2i + 1) when traditional; the
  // features past `dims` as they are. Each product is its own statement, so
  // no compiler contracts one into the subtraction (the fallback rounds both).
  static void rotate(const Job& j, const float* x, float* y, const float* cs, const float* sn) {
    const int half = j.dims / 2;
    const int64_t xs = j.rows.step;
    for (int i = 0; i < half; ++i) {
      const int64_t a = j.traditional ? 2 * i : i;
      const int64_t b = j.traditional ? 2 * i + 1 : i + half;
      const float x1 = x[a * xs], x2 = x[b * xs];
      const float p = x1 * cs[i];
      const float q = x2 * sn[i];
      const float r = x1 * sn[i];
      const float u = x2 * cs[i];
      y[a] = p - q;
      y[b] = r + u;
    }
    for (int64_t c = j.dims; c < j.d; ++c) {
      y[c] = x[c * xs];
    }
  }

  int dims_;
  bool traditional_;
  float base_;
  float scale_;
};

}  // namespace

namespace mlxs {

RowStarts row_starts(const mx::array& a) {
  const auto& shape = a.shape();
  const auto& strides = a.strides();
  const int nd = a.ndim();
  const int64_t d = nd == 0 ? 1 : shape[nd - 1];
  const int64_t n = d == 0 ? 0 : static_cast<int64_t>(a.size()) / d;
  RowStarts r{std::vector<int64_t>(static_cast<size_t>(n)),
              nd == 0 ? 1 : static_cast<int64_t>(strides[nd - 1])};
  for (int64_t i = 0; i < n; ++i) {
    int64_t rest = i, off = 0;
    for (int ax = nd - 2; ax >= 0; --ax) {
      off += (rest % shape[ax]) * static_cast<int64_t>(strides[ax]);
      rest /= shape[ax];
    }
    r.start[static_cast<size_t>(i)] = off;
  }
  return r;
}

std::optional<mx::array> cpu_rms_norm(const mx::array& x, const std::optional<mx::array>& weight,
                                      float eps, mx::StreamOrDevice sd) {
  if (!cpu_routes_on(sd) || x.dtype() != mx::float32 || x.ndim() < 1 || x.shape(-1) <= 0 ||
      (weight && (weight->dtype() != mx::float32 || weight->ndim() != 1 ||
                  weight->shape(0) != x.shape(-1)))) {
    return std::nullopt;
  }
  auto s = mx::to_stream(sd);
  bool has_weight = weight.has_value();
  Fallback fallback = [eps, has_weight, s](const std::vector<mx::array>& in) {
    std::optional<mx::array> w;
    if (has_weight) {
      w = in[1];
    }
    return std::vector<mx::array>{mx::fast::rms_norm(in[0], w, eps, s)};
  };
  mx::array w = has_weight ? *weight : mx::array(1.0f, mx::float32);
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<CpuRmsNorm>(s, std::move(fallback), eps, has_weight), {x, w});
}

std::optional<mx::array> cpu_rope(const mx::array& x, int dims, bool traditional,
                                  std::optional<float> base, float scale, const mx::array& offset,
                                  const std::optional<mx::array>& freqs, mx::StreamOrDevice sd) {
  // Anything else goes to MLX's rope, whose checks name what is wrong.
  if (!cpu_routes_on(sd) || x.dtype() != mx::float32 || x.ndim() != 4 || dims <= 0 ||
      dims % 2 != 0 || dims > x.shape(-1) || base.has_value() == freqs.has_value() ||
      offset.dtype() != mx::int32 || offset.ndim() > 1 ||
      (offset.size() != 1 && offset.size() != static_cast<size_t>(x.shape(0))) ||
      (freqs &&
       (freqs->dtype() != mx::float32 || freqs->ndim() != 1 || freqs->shape(0) != dims / 2))) {
    return std::nullopt;
  }
  auto s = mx::to_stream(sd);
  Fallback fallback = [dims, traditional, base, scale, s](const std::vector<mx::array>& in) {
    std::optional<mx::array> f;
    if (in.size() == 3) {
      f = in[2];
    }
    return std::vector<mx::array>{
        mx::fast::rope(in[0], dims, traditional, base, scale, in[1], f, s)};
  };
  std::vector<mx::array> inputs{x, offset};
  if (freqs) {
    inputs.push_back(*freqs);
  }
  return mx::array(x.shape(), mx::float32,
                   std::make_shared<CpuRope>(s, std::move(fallback), dims, traditional,
                                             base.value_or(1.0f), scale),
                   std::move(inputs));
}

mx::array rms_norm(const mx::array& x, const std::optional<mx::array>& weight, float eps,
                   mx::StreamOrDevice s) {
  if (auto y = cpu_rms_norm(x, weight, eps, s)) {
    return *y;
  }
  return mx::fast::rms_norm(x, weight, eps, s);
}

mx::array rope(const mx::array& x, int dims, bool traditional, std::optional<float> base,
               float scale, const mx::array& offset, const std::optional<mx::array>& freqs,
               mx::StreamOrDevice s) {
  if (auto y = cpu_rope(x, dims, traditional, base, scale, offset, freqs, s)) {
    return *y;
  }
  return mx::fast::rope(x, dims, traditional, base, scale, offset, freqs, s);
}

}  // namespace mlxs
