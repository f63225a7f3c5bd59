// SPDX-License-Identifier: EUPL-1.2
//
// Operations: creation, elementwise, reductions, shapes and convolution
// (mlxs_ops.cpp).
//
// Part of mlxs.h, which states the ABI's rules: include that one.

#ifndef MLXS_OPS_H
#define MLXS_OPS_H

#include "mlxs_types.h"

#ifdef __cplusplus
extern "C" {
#endif

// ---------------------------------------------------------------- creation

int mlxs_zeros(mlxs_array* out, const int* shape, size_t ndim, int dtype, int dev);
int mlxs_ones(mlxs_array* out, const int* shape, size_t ndim, int dtype, int dev);
int mlxs_full(mlxs_array* out, const int* shape, size_t ndim, mlxs_array value, int dtype, int dev);
int mlxs_arange(mlxs_array* out, double start, double stop, double step, int dtype, int dev);
int mlxs_eye(mlxs_array* out, int n, int m, int k, int dtype, int dev);
int mlxs_tri(mlxs_array* out, int n, int m, int k, int dtype, int dev);

// ---------------------------------------------------------------- elementwise

int mlxs_unary(mlxs_array* out, int op, mlxs_array a, int dev);
int mlxs_binary(mlxs_array* out, int op, mlxs_array a, mlxs_array b, int dev);
int mlxs_where(mlxs_array* out, mlxs_array cond, mlxs_array x, mlxs_array y, int dev);
// `lo` or `hi` may be NULL.
int mlxs_clip(mlxs_array* out, mlxs_array a, mlxs_array lo, mlxs_array hi, int dev);
int mlxs_astype(mlxs_array* out, mlxs_array a, int dtype, int dev);
int mlxs_addmm(mlxs_array* out, mlxs_array c, mlxs_array a, mlxs_array b, float alpha, float beta,
               int dev);
// x Wᵀ (matmul's type promotion), W [out, in]; for float32 x and a bfloat16
// or float16 W on the CPU, our kernel that reads W in its 16-bit type
// (mlxs_widen.cpp).
int mlxs_widen_matmul(mlxs_array* out, mlxs_array x, mlxs_array w, int dev);
// Whether mlxs_widen_matmul runs our kernel for these arrays (else MLX's matmul).
int mlxs_widen_matmul_applies(mlxs_array x, mlxs_array w, int dev, bool* out);
// false: that kernel's portable loop even on a CPU with AVX2 (tests).
int mlxs_set_widen_simd(bool on);
// x times an affine-quantised W [out, in] (transposed), in float32: x @ Wᵀ
// with W = scales · q + biases computed in float32; for float32 x (at most 32 rows), 4 or 8 bits,
// groups of 32, 64 or 128 on the CPU, our kernel that reads W packed (mlxs_widen.cpp). biases may
// be NULL (then always the dequantised matmul).
int mlxs_widen_quantized_matmul(mlxs_array* out, mlxs_array x, mlxs_array w, mlxs_array scales,
                                mlxs_array biases, int group_size, int bits, int dev);
int mlxs_widen_quantized_matmul_applies(mlxs_array x, mlxs_array w, mlxs_array scales,
                                        mlxs_array biases, int group_size, int bits, int dev,
                                        bool* out);
int mlxs_tril(mlxs_array* out, mlxs_array a, int k, int dev);
int mlxs_triu(mlxs_array* out, mlxs_array a, int k, int dev);

// ---------------------------------------------------------------- reductions

// naxes == 0 with all_axes == true reduces over every axis.
int mlxs_reduce(mlxs_array* out, int op, mlxs_array a, const int* axes, size_t naxes, bool all_axes,
                bool keepdims, int dev);
int mlxs_argmax(mlxs_array* out, mlxs_array a, int axis, bool keepdims, int dev);
int mlxs_argmin(mlxs_array* out, mlxs_array a, int axis, bool keepdims, int dev);
int mlxs_softmax(mlxs_array* out, mlxs_array a, const int* axes, size_t naxes, bool precise,
                 int dev);
int mlxs_scan(mlxs_array* out, int op, mlxs_array a, int axis, bool reverse, bool inclusive,
              int dev);
int mlxs_topk(mlxs_array* out, mlxs_array a, int k, int axis, int dev);
int mlxs_sort(mlxs_array* out, mlxs_array a, int axis, int dev);
int mlxs_argsort(mlxs_array* out, mlxs_array a, int axis, int dev);
int mlxs_argpartition(mlxs_array* out, mlxs_array a, int kth, int axis, int dev);
int mlxs_partition(mlxs_array* out, mlxs_array a, int kth, int axis, int dev);

// ---------------------------------------------------------------- shapes

int mlxs_reshape(mlxs_array* out, mlxs_array a, const int* shape, size_t ndim, int dev);
// naxes == 0 reverses the axes.
int mlxs_transpose(mlxs_array* out, mlxs_array a, const int* axes, size_t naxes, int dev);
int mlxs_expand_dims(mlxs_array* out, mlxs_array a, const int* axes, size_t naxes, int dev);
// naxes == 0 removes every axis of size one.
int mlxs_squeeze(mlxs_array* out, mlxs_array a, const int* axes, size_t naxes, int dev);
int mlxs_broadcast_to(mlxs_array* out, mlxs_array a, const int* shape, size_t ndim, int dev);
int mlxs_concatenate(mlxs_array* out, const mlxs_array* arrays, size_t n, int axis, int dev);
int mlxs_stack(mlxs_array* out, const mlxs_array* arrays, size_t n, int axis, int dev);
int mlxs_split_sections(mlxs_vec* out, mlxs_array a, int sections, int axis, int dev);
int mlxs_split_indices(mlxs_vec* out, mlxs_array a, const int* indices, size_t n, int axis,
                       int dev);
int mlxs_flatten(mlxs_array* out, mlxs_array a, int start_axis, int end_axis, int dev);
int mlxs_swapaxes(mlxs_array* out, mlxs_array a, int axis1, int axis2, int dev);
int mlxs_repeat(mlxs_array* out, mlxs_array a, int repeats, int axis, int dev);
int mlxs_pad(mlxs_array* out, mlxs_array a, const int* axes, const int* low, const int* high,
             size_t n, mlxs_array value, int dev);
int mlxs_as_strided(mlxs_array* out, mlxs_array a, const int* shape, const int64_t* strides,
                    size_t ndim, size_t offset, int dev);

// Input [N, H, W, C_in] (NHWC), weight [C_out, kH, kW, C_in / groups].
int mlxs_conv2d(mlxs_array* out, mlxs_array input, mlxs_array weight, int stride_h, int stride_w,
                int pad_h, int pad_w, int dilation_h, int dilation_w, int groups, int dev);

#ifdef __cplusplus
}
#endif

#endif  // MLXS_OPS_H
