// SPDX-License-Identifier: EUPL-1.2
//
// Indexing: slices and slice updates, gathers and scatters, every index
// clamped into range (mlxs_index.cpp).
//
// Part of mlxs.h, which states the ABI's rules: include that one.

#ifndef MLXS_INDEX_H
#define MLXS_INDEX_H

#include "mlxs_types.h"

#ifdef __cplusplus
extern "C" {
#endif

int mlxs_slice(mlxs_array* out, mlxs_array a, const int* start, const int* stop, const int* strides,
               size_t ndim, int dev);
// Slice with a start given as a (possibly lazy) int array over `axes`.
int mlxs_slice_dynamic(mlxs_array* out, mlxs_array a, mlxs_array start, const int* axes,
                       size_t naxes, const int* sizes, size_t nsizes, int dev);
int mlxs_slice_update(mlxs_array* out, mlxs_array src, mlxs_array update, const int* start,
                      const int* stop, const int* strides, size_t ndim, int dev);
int mlxs_slice_update_dynamic(mlxs_array* out, mlxs_array src, mlxs_array update, mlxs_array start,
                              const int* axes, size_t naxes, int dev);
// has_axis == false indexes the flattened array.
int mlxs_take(mlxs_array* out, mlxs_array a, mlxs_array indices, int axis, bool has_axis, int dev);
int mlxs_take_along_axis(mlxs_array* out, mlxs_array a, mlxs_array indices, int axis, int dev);
int mlxs_put_along_axis(mlxs_array* out, mlxs_array a, mlxs_array indices, mlxs_array values,
                        int axis, int dev);

#ifdef __cplusplus
}
#endif

#endif  // MLXS_INDEX_H
