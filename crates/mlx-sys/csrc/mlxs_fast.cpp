// SPDX-License-Identifier: EUPL-1.2
//
// The fused kernels of mlx::core::fast: RMS and layer norms, rotary
// embeddings and scaled dot-product attention.

#include "mlxs_internal.h"

using namespace mlxs;

extern "C" {

int mlxs_rms_norm(mlxs_array* out, mlxs_array x, mlxs_array weight, float eps, int dev) {
  return guard([&] { put(out, mx::fast::rms_norm(arr(x), opt(weight), eps, sod(dev))); });
}

int mlxs_layer_norm(mlxs_array* out, mlxs_array x, mlxs_array weight, mlxs_array bias, float eps,
                    int dev) {
  return guard(
      [&] { put(out, mx::fast::layer_norm(arr(x), opt(weight), opt(bias), eps, sod(dev))); });
}

int mlxs_rope(mlxs_array* out, mlxs_array x, int dims, bool traditional, bool has_base, float base,
              float scale, int offset, mlxs_array offset_arr, mlxs_array freqs, int dev) {
  return guard([&] {
    std::optional<float> b;
    if (has_base) {
      b = base;
    }
    if (offset_arr != nullptr) {
      put(out, mx::fast::rope(arr(x), dims, traditional, b, scale, arr(offset_arr), opt(freqs),
                              sod(dev)));
    } else {
      put(out, mx::fast::rope(arr(x), dims, traditional, b, scale, offset, opt(freqs), sod(dev)));
    }
  });
}

int mlxs_sdpa(mlxs_array* out, mlxs_array q, mlxs_array k, mlxs_array v, float scale,
              const char* mask_mode, mlxs_array mask, mlxs_array sinks, int dev) {
  return guard([&] {
    std::string mm = mask_mode == nullptr ? "" : mask_mode;
    if (mask != nullptr && mm.empty()) {
      mm = "array";
    }
    put(out, mx::fast::scaled_dot_product_attention(arr(q), arr(k), arr(v), scale, mm, opt(mask),
                                                    opt(sinks), false, sod(dev)));
  });
}

}  // extern "C"
