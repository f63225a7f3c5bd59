// SPDX-License-Identifier: EUPL-1.2
//
// Random numbers: keys, the global seed and sampling (mlxs_random.cpp).
//
// Part of mlxs.h, which states the ABI's rules: include that one.

#ifndef MLXS_RANDOM_H
#define MLXS_RANDOM_H

#include "mlxs_types.h"

#ifdef __cplusplus
extern "C" {
#endif

int mlxs_random_key(mlxs_array* out, uint64_t seed);
int mlxs_random_seed(uint64_t seed);
int mlxs_random_split(mlxs_array* out, mlxs_array key, int num, int dev);
// key may be NULL (global key sequence).
int mlxs_random_normal(mlxs_array* out, const int* shape, size_t ndim, int dtype, float loc,
                       float scale, mlxs_array key, int dev);
int mlxs_random_uniform(mlxs_array* out, mlxs_array low, mlxs_array high, const int* shape,
                        size_t ndim, int dtype, mlxs_array key, int dev);
int mlxs_random_categorical(mlxs_array* out, mlxs_array logits, int axis, mlxs_array key, int dev);
int mlxs_random_bernoulli(mlxs_array* out, mlxs_array p, const int* shape, size_t ndim,
                          mlxs_array key, int dev);
int mlxs_random_randint(mlxs_array* out, mlxs_array low, mlxs_array high, const int* shape,
                        size_t ndim, int dtype, mlxs_array key, int dev);

#ifdef __cplusplus
}
#endif

#endif  // MLXS_RANDOM_H
