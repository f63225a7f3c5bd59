// SPDX-License-Identifier: EUPL-1.2
//
// The fused kernels of mlx::core::fast: RMS and layer norms, rotary
// embeddings and scaled dot-product attention.

#include <cmath>
#include <optional>

#include "mlxs_internal.h"

using namespace mlxs;

namespace {

// Attention for short queries as matmuls with the query heads of each
// key/value head folded into the rows: q [B, H, L, D] becomes
// [B, H_kv, (H / H_kv) * L, D], so keys and values are used as they are and
// each product is one strided-batched matmul over B * H_kv. MLX's unfused
// attention broadcasts keys and values over the grouped heads instead, which
// its CUDA backend runs as one cuBLAS call per row and key/value head.
// `causal` is the lower-right causal mask; `mask` (boolean, true attends, or
// additive) broadcasts to [B, H, L, T]. Scale first, a floor of the type's
// lowest value where a boolean mask hides, a precise softmax: the steps of
// mlx::core::fast's own fallback. For several queries of a 16-bit type the
// steps are those of cuDNN's fused (flash) attention, which MLX's CUDA backend
// takes there: float32 scores, exp(s - max) in float32 rounded to the type for
// the product with v, the product summed in float32 and divided by the float32
// sum of the exponentials, then rounded once (scores rounded to 16 bits part
// from it by more than mlx-lm's tolerance: a 7-token prompt of the tiny Llama 3
// on an H100). One query keeps the 16-bit steps of MLX's own unfused attention.
mx::array grouped_sdpa(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                       bool causal, const std::optional<mx::array>& mask, mx::StreamOrDevice s) {
  int b = q.shape(0), h = q.shape(1), l = q.shape(2), d = q.shape(3);
  int hkv = k.shape(1), t = k.shape(2);
  int rep = h / hkv;
  auto work =
      l > 1 && (q.dtype() == mx::bfloat16 || q.dtype() == mx::float16) ? mx::float32 : q.dtype();
  auto qs = mx::reshape(mx::multiply(mx::array(scale, work), mx::astype(q, work, s), s),
                        {b, hkv, rep * l, d}, s);
  auto scores = mx::matmul(qs, mx::swapaxes(mx::astype(k, work, s), -1, -2, s), s);
  scores = mx::reshape(scores, {b, hkv, rep, l, t}, s);
  std::optional<mx::array> m;
  if (causal) {
    auto rows = mx::expand_dims(mx::arange(t - l, t, mx::int32, s), 1, s);
    auto cols = mx::expand_dims(mx::arange(0, t, mx::int32, s), 0, s);
    m = mx::greater_equal(rows, cols, s);
  } else if (mask.has_value()) {
    // [.., L, T] -> [B', 1 or H_kv, 1 or rep, L, T]
    auto m4 = *mask;
    while (m4.ndim() < 4) {
      m4 = mx::expand_dims(m4, 0, s);
    }
    m = m4.shape(1) == 1 ? mx::expand_dims(m4, 2, s)
                         : mx::reshape(m4, {m4.shape(0), hkv, rep, m4.shape(2), m4.shape(3)}, s);
  }
  if (m.has_value()) {
    if (m->dtype() == mx::bool_) {
      auto lowest = mx::array(mx::finfo(scores.dtype()).min, scores.dtype());
      scores = mx::where(*m, scores, lowest, s);
    } else {
      scores = mx::add(scores, mx::astype(*m, work, s), s);
    }
  }
  if (work != q.dtype()) {
    auto e = mx::exp(mx::subtract(scores, mx::max(scores, -1, true, s), s), s);
    auto total = mx::reshape(mx::sum(e, -1, true, s), {b, hkv, rep * l, 1}, s);
    auto p = mx::astype(mx::astype(e, v.dtype(), s), work, s);
    auto pv = mx::matmul(mx::reshape(p, {b, hkv, rep * l, t}, s), mx::astype(v, work, s), s);
    auto out = mx::astype(mx::divide(pv, total, s), v.dtype(), s);
    return mx::reshape(out, {b, h, l, v.shape(3)}, s);
  }
  scores = mx::softmax(scores, std::vector<int>{-1}, true, s);
  auto out = mx::matmul(mx::reshape(scores, {b, hkv, rep * l, t}, s), v, s);
  return mx::reshape(out, {b, h, l, v.shape(3)}, s);
}

// Whether grouped_sdpa takes these inputs: plain 4-D q, k, v of one type,
// grouped-query heads, a mask that broadcasts to the scores, no sinks.
bool grouped_fits(const mx::array& q, const mx::array& k, const mx::array& v,
                  const std::optional<mx::array>& mask, bool has_sinks) {
  if (has_sinks || q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || q.dtype() != k.dtype() ||
      q.dtype() != v.dtype() || !mx::issubdtype(q.dtype(), mx::floating)) {
    return false;
  }
  int b = q.shape(0), h = q.shape(1), l = q.shape(2), hkv = k.shape(1), t = k.shape(2);
  if (k.shape(0) != b || v.shape(0) != b || v.shape(1) != hkv || v.shape(2) != t ||
      k.shape(3) != q.shape(3) || hkv <= 0 || h % hkv != 0 || l > t) {
    return false;
  }
  if (!mask.has_value()) {
    return true;
  }
  const auto& ms = mask->shape();
  int ml = ms.size() >= 2 ? ms[ms.size() - 2] : 0;
  if (ms.size() > 4 || ms.size() < 2 || ms.back() != t || (ml != l && ml != 1)) {
    return false;
  }
  if (ms.size() >= 3 && ms[ms.size() - 3] != 1 && ms[ms.size() - 3] != h) {
    return false;
  }
  if (ms.size() == 4 && ms[0] != 1 && ms[0] != b) {
    return false;
  }
  return mask->dtype() == mx::bool_ || mask->dtype() == q.dtype();
}

// The rope's base as MLX takes it: none when the frequencies are explicit.
std::optional<float> rope_base(bool has_base, float base) {
  return has_base ? std::optional<float>(base) : std::nullopt;
}

// The queries at most this long take grouped_sdpa on CUDA (decode steps and
// speculative verification); longer ones go to MLX (cuDNN's fused attention).
constexpr int kGroupedMaxQuery = 8;

// Off with the custom kernels (MLXR_CUSTOM_KERNELS=0: MLX's own paths
// everywhere). On CUDA, MLX's fused kernels cover a decode step without a mask (the
// vector kernel: head sizes 64, 96 and 128, under 4 queries). A mask, or a
// short causal query block, takes its unfused fallback (one cuBLAS call per
// row and key/value head) or cuDNN (a graph built for every new key length,
// so at every step): grouped_sdpa instead; so does a batch with other head
// sizes.
bool use_grouped(const mx::array& q, const mx::array& k, const mx::array& v, bool causal,
                 const std::optional<mx::array>& mask, bool has_sinks, mx::StreamOrDevice s) {
  if (!cuda_routes_on(s) || (causal && mask.has_value()) ||
      !grouped_fits(q, k, v, mask, has_sinks) || q.shape(2) > kGroupedMaxQuery) {
    return false;
  }
  int b = q.shape(0), l = q.shape(2), d = q.shape(3);
  // A causal prompt from an empty cache (its keys are its own) is not a
  // decode step: MLX's attention, mlx-lm's there, whose graph is built once.
  if (causal && l == k.shape(2) && l > 1) {
    return false;
  }
  bool vector_kernel = (d == 64 || d == 96 || d == 128) && v.shape(3) == d && l < 4;
  bool masked = mask.has_value() || (causal && l > 1);
  // Unmasked without the vector kernel, one sequence's fallback is a few
  // launches, fewer than ours (Gemma 3's head size 256: 1.2 ms a step more
  // for Gemma3-1B on an H100); a batch's is one cuBLAS call per row.
  return masked || (!vector_kernel && b > 1);
}

}  // namespace

extern "C" {

int mlxs_rms_norm(mlxs_array* out, mlxs_array x, mlxs_array weight, float eps, int dev) {
  return guard([&] { put(out, mlxs::rms_norm(arr(x), opt(weight), eps, sod(dev))); });
}

int mlxs_fused_norm_add(mlxs_array* h, mlxs_array* y, mlxs_array x, mlxs_array r,
                        mlxs_array r_weight, mlxs_array h_weight, float eps, int dev) {
  return guard([&] {
    auto s = sod(dev);
    auto rw = opt(r_weight);
    auto hw = opt(h_weight);
    if (auto fused = try_fused_norm_add(arr(x), arr(r), rw, hw, eps, s)) {
      if (fused->second) {
        put(y, *fused->second);
      } else {
        *y = nullptr;
      }
      put(h, fused->first);
      return;
    }
    auto rn = rw ? mlxs::rms_norm(arr(r), rw, eps, s) : arr(r);
    auto sum = mx::add(arr(x), rn, s);
    if (hw) {
      put(y, mlxs::rms_norm(sum, hw, eps, s));
    } else {
      *y = nullptr;
    }
    put(h, sum);
  });
}

int mlxs_fused_norm_add_qmv(mlxs_array* h, mlxs_array* out, int* applied, mlxs_array x,
                            mlxs_array r, mlxs_array r_weight, mlxs_array h_weight, float eps,
                            mlxs_array w, mlxs_array scales, mlxs_array biases, int group_size,
                            int bits, int rope_heads, int head_dim, bool has_base, float base,
                            float scale, int offset, mlxs_array freqs, int dev) {
  return guard([&] {
    *applied = 0;
    mlxs::NormQmvRope rope;
    if (rope_heads > 0) {
      rope = {rope_heads, head_dim, mx::array(offset, mx::int32),
              opt(freqs), scale,    has_base ? std::log2(base) : 0.f};
    }
    auto fused = try_fused_norm_add_qmv(arr(x), arr(r), opt(r_weight), arr(h_weight), eps, arr(w),
                                        arr(scales), opt(biases), group_size, bits, "affine", rope,
                                        sod(dev));
    if (fused) {
      put(h, fused->first);
      put(out, fused->second);
      *applied = 1;
    }
  });
}

int mlxs_layer_norm(mlxs_array* out, mlxs_array x, mlxs_array weight, mlxs_array bias, float eps,
                    int dev) {
  return guard(
      [&] { put(out, mx::fast::layer_norm(arr(x), opt(weight), opt(bias), eps, sod(dev))); });
}

int mlxs_rope(mlxs_array* out, mlxs_array x, int dims, bool traditional, bool has_base, float base,
              float scale, int offset, mlxs_array offset_arr, mlxs_array freqs, int dev) {
  return guard([&] {
    auto b = rope_base(has_base, base);
    if (offset_arr != nullptr) {
      put(out,
          mlxs::rope(arr(x), dims, traditional, b, scale, arr(offset_arr), opt(freqs), sod(dev)));
    } else {
      put(out, mlxs::rope(arr(x), dims, traditional, b, scale, mx::array(offset, mx::int32),
                          opt(freqs), sod(dev)));
    }
  });
}

int mlxs_qk_norm_rope(mlxs_array* out, mlxs_array y, int heads, int d, mlxs_array norm_weight,
                      float eps, int dims, bool traditional, bool has_base, float base, float scale,
                      int offset, mlxs_array offset_arr, mlxs_array freqs, int dev) {
  return guard([&] {
    auto b = rope_base(has_base, base);
    auto off = offset_arr != nullptr ? arr(offset_arr) : mx::array(offset, mx::int32);
    put(out, qk_norm_rope(arr(y), heads, d, opt(norm_weight), eps, dims, traditional, b, scale, off,
                          opt(freqs), sod(dev)));
  });
}

int mlxs_sdpa(mlxs_array* out, mlxs_array q, mlxs_array k, mlxs_array v, float scale,
              const char* mask_mode, mlxs_array mask, mlxs_array sinks, int dev) {
  return guard([&] {
    std::string mm = mask_mode == nullptr ? "" : mask_mode;
    if (mask != nullptr && mm.empty()) {
      mm = "array";
    }
    bool causal = mm == "causal";
    if (sinks == nullptr) {
      if (auto o = try_sdpa_decode(arr(q), arr(k), arr(v), scale, causal, opt(mask), sod(dev))) {
        put(out, *o);
        return;
      }
    }
    if (use_grouped(arr(q), arr(k), arr(v), causal, opt(mask), sinks != nullptr, sod(dev))) {
      if (auto o = try_sdpa_few(arr(q), arr(k), arr(v), scale, causal, opt(mask), sod(dev))) {
        put(out, *o);
        return;
      }
      put(out, grouped_sdpa(arr(q), arr(k), arr(v), scale, causal, opt(mask), sod(dev)));
      return;
    }
    put(out, mx::fast::scaled_dot_product_attention(arr(q), arr(k), arr(v), scale, mm, opt(mask),
                                                    opt(sinks), false, sod(dev)));
  });
}

int mlxs_sdpa_grouped(mlxs_array* out, mlxs_array q, mlxs_array k, mlxs_array v, float scale,
                      const char* mask_mode, mlxs_array mask, int dev) {
  return guard([&] {
    std::string mm = mask_mode == nullptr ? "" : mask_mode;
    bool causal = mm == "causal";
    if (causal && mask != nullptr) {
      throw std::invalid_argument("[sdpa_grouped] a causal mask takes no mask array");
    }
    if (!grouped_fits(arr(q), arr(k), arr(v), opt(mask), false)) {
      throw std::invalid_argument(
          "[sdpa_grouped] needs 4-D q, k, v of one floating type, whole groups of query heads "
          "per key/value head, no more queries than keys and a mask that broadcasts to the scores");
    }
    put(out, grouped_sdpa(arr(q), arr(k), arr(v), scale, causal, opt(mask), sod(dev)));
  });
}

}  // extern "C"
