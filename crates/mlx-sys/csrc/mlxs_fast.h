// SPDX-License-Identifier: EUPL-1.2
//
// The fused kernels of mlx::core::fast: norms, rotary embeddings and
// attention (mlxs_fast.cpp).
//
// Part of mlxs.h, which states the ABI's rules: include that one.

#ifndef MLXS_FAST_H
#define MLXS_FAST_H

#include "mlxs_types.h"

#ifdef __cplusplus
extern "C" {
#endif

// weight may be NULL.
int mlxs_rms_norm(mlxs_array* out, mlxs_array x, mlxs_array weight, float eps, int dev);
// h = x + rms_norm(r, r_weight) (x + r when r_weight is NULL) and, when
// h_weight is not NULL, y = rms_norm(h, h_weight), both norms with `eps`; *y is
// NULL otherwise. On CUDA one kernel of ours where the inputs fit it (its norms
// may differ from MLX's in the last bit); elsewhere MLX's ops, exactly.
int mlxs_fused_norm_add(mlxs_array* h, mlxs_array* y, mlxs_array x, mlxs_array r,
                        mlxs_array r_weight, mlxs_array h_weight, float eps, int dev);
// mlxs_fused_norm_add's h and y (h_weight not NULL) with y's product by the
// transposed 4-bit affine matrix w (scales, biases, group_size, bits) as one
// kernel of ours where it applies (CUDA, one row of x, where our one-row
// product kernel would take y): *applied is 1 and *h and *out are set, the
// same bits as the two kernels give. With rope_heads > 0 the first
// rope_heads heads of head_dim values of the product are rotated as
// mlxs_qk_norm_rope rotates them without a norm (not traditional, dims =
// head_dim; has_base/base or freqs, scale, one offset). Elsewhere *applied is 0 and nothing is set:
// the caller composes the steps (mlxs_fused_norm_add, mlxs_quantized_matmul, mlxs_qk_norm_rope).
int mlxs_fused_norm_add_qmv(mlxs_array* h, mlxs_array* out, int* applied, mlxs_array x,
                            mlxs_array r, mlxs_array r_weight, mlxs_array h_weight, float eps,
                            mlxs_array w, mlxs_array scales, mlxs_array biases, int group_size,
                            int bits, int rope_heads, int head_dim, bool has_base, float base,
                            float scale, int offset, mlxs_array freqs, int dev);
// weight and bias may be NULL.
int mlxs_layer_norm(mlxs_array* out, mlxs_array x, mlxs_array weight, mlxs_array bias, float eps,
                    int dev);
// Either has_base (base used) or freqs non-NULL. offset_arr may be NULL, then
// `offset` is used.
int mlxs_rope(mlxs_array* out, mlxs_array x, int dims, bool traditional, bool has_base, float base,
              float scale, int offset, mlxs_array offset_arr, mlxs_array freqs, int dev);
// The first `heads` heads of `d` values of y [B, L, N] (q's heads then k's, as
// a fused q/k/v projection lays them out) as [B, heads, L, d], RMS-normed with
// norm_weight [heads, 1, d] and `eps` unless norm_weight is NULL, then rotated
// as mlxs_rope rotates (its dims, traditional, has_base/base, scale, offset,
// offset_arr, freqs). On CUDA one kernel of ours where the inputs fit it (its
// norm may differ from MLX's in the last bit); elsewhere MLX's ops, exactly.
int mlxs_qk_norm_rope(mlxs_array* out, mlxs_array y, int heads, int d, mlxs_array norm_weight,
                      float eps, int dims, bool traditional, bool has_base, float base, float scale,
                      int offset, mlxs_array offset_arr, mlxs_array freqs, int dev);
// mask_mode: "" (none, or the array mask), "causal". mask and sinks may be NULL.
int mlxs_sdpa(mlxs_array* out, mlxs_array q, mlxs_array k, mlxs_array v, float scale,
              const char* mask_mode, mlxs_array mask, mlxs_array sinks, int dev);
// The matmul form mlxs_sdpa takes on CUDA for short queries under a mask
// (mask_mode as mlxs_sdpa's, without sinks; mask may be NULL).
int mlxs_sdpa_grouped(mlxs_array* out, mlxs_array q, mlxs_array k, mlxs_array v, float scale,
                      const char* mask_mode, mlxs_array mask, int dev);

#ifdef __cplusplus
}
#endif

#endif  // MLXS_FAST_H
