// SPDX-License-Identifier: EUPL-1.2
//
// Affine quantisation, the quantised and gathered matmuls, and the switch
// for our own kernels (mlxs_quant.cpp, mlxs_kernels.cpp).
//
// Part of mlxs.h, which states the ABI's rules: include that one.

#ifndef MLXS_QUANT_H
#define MLXS_QUANT_H

#include "mlxs_types.h"

#ifdef __cplusplus
extern "C" {
#endif

// mode: "affine" (NULL means affine). group_size/bits <= 0 mean MLX's default.
int mlxs_quantize(mlxs_vec* out, mlxs_array w, int group_size, int bits, const char* mode, int dev);
// biases may be NULL; out_dtype < 0 keeps MLX's choice.
int mlxs_dequantize(mlxs_array* out, mlxs_array w, mlxs_array scales, mlxs_array biases,
                    int group_size, int bits, const char* mode, int out_dtype, int dev);
int mlxs_quantized_matmul(mlxs_array* out, mlxs_array x, mlxs_array w, mlxs_array scales,
                          mlxs_array biases, bool transpose, int group_size, int bits,
                          const char* mode, int dev);
// Our own GPU kernels (mlxs_kernels.cpp) in place of MLX's where they apply.
// AUTO unless MLXR_CUSTOM_KERNELS was "0" (OFF) or "always" (ALWAYS) in the
// environment at first use.
enum mlxs_kernels_mode {
  MLXS_KERNELS_OFF = 0,
  MLXS_KERNELS_AUTO = 1,
  MLXS_KERNELS_ALWAYS = 2,
};
int mlxs_set_custom_kernels(int mode);
int mlxs_custom_kernels(void);
// Compiles every instantiation in the list of kernel_cache_check (in
// mlxs_kernels.cpp) with our own compile path (the default on a GPU),
// for compute capability `arch` (80 for 8.0), NVRTC opened from `nvrtc_path`,
// the CUDA headers in `include_dir`, the cache in `cache_dir`: twice, each
// time with a new compiler. `made`: the instantiations; `first_from_disk` and
// `second_from_disk`: those each pass read from the cache. Runs without a GPU.
int mlxs_kernel_cache_check(const char* nvrtc_path, const char* include_dir, int arch,
                            const char* cache_dir, int* made, int* first_from_disk,
                            int* second_from_disk);
// Stages `len` bytes of `cubin` in the directory `dir` as our kernel cache
// does in MLX's for a kernel named `name` (mlxs_kernel_cache.cpp,
// stage_for_mlx) and writes the staged .ptx file's path to `ptx_path` (at
// most `cap` bytes with its NUL; empty when nothing was staged). Runs without
// a GPU.
int mlxs_kernel_stage_check(const char* dir, const char* name, const char* cubin, size_t len,
                            char* ptx_path, size_t cap);
// lhs_indices/rhs_indices may be NULL.
int mlxs_gather_mm(mlxs_array* out, mlxs_array a, mlxs_array b, mlxs_array lhs_indices,
                   mlxs_array rhs_indices, bool sorted_indices, int dev);
int mlxs_gather_qmm(mlxs_array* out, mlxs_array x, mlxs_array w, mlxs_array scales,
                    mlxs_array biases, mlxs_array lhs_indices, mlxs_array rhs_indices,
                    bool transpose, int group_size, int bits, const char* mode, bool sorted_indices,
                    int dev);

#ifdef __cplusplus
}
#endif

#endif  // MLXS_QUANT_H
