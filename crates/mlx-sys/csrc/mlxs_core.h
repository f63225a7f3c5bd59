// SPDX-License-Identifier: EUPL-1.2
//
// Errors, the runtime (version, devices, synchronisation), arrays, vectors
// of arrays, named maps and safetensors (mlxs_core.cpp, mlxs_runtime.cpp,
// mlxs_io.cpp).
//
// Part of mlxs.h, which states the ABI's rules: include that one.

#ifndef MLXS_CORE_H
#define MLXS_CORE_H

#include "mlxs_types.h"

#ifdef __cplusplus
extern "C" {
#endif

// ---------------------------------------------------------------- errors

// The message of the last failed call on this thread ("" when none).
const char* mlxs_last_error(void);
void mlxs_clear_error(void);

// ---------------------------------------------------------------- runtime

const char* mlxs_version(void);
int mlxs_device_available(int kind, bool* out);
int mlxs_device_count(int kind, int* out);
int mlxs_default_device(int* kind);
int mlxs_set_default_device(int kind);
// JSON object with the device's properties; free with mlxs_string_free.
int mlxs_device_info_json(int kind, char** out);
void mlxs_string_free(char* s);
int mlxs_synchronize(int kind);

// ---------------------------------------------------------------- arrays

void mlxs_array_free(mlxs_array a);
int mlxs_array_clone(mlxs_array* out, mlxs_array a);
int mlxs_array_from_data(mlxs_array* out, const void* data, size_t nbytes, const int* shape,
                         size_t ndim, int dtype);
int mlxs_array_from_f64(mlxs_array* out, double v, int dtype);
int mlxs_array_from_i64(mlxs_array* out, int64_t v, int dtype);
int mlxs_array_from_bool(mlxs_array* out, bool v);
size_t mlxs_array_ndim(mlxs_array a);
// Copies min(ndim, cap) dimensions into `shape`.
void mlxs_array_shape(mlxs_array a, int* shape, size_t cap);
size_t mlxs_array_size(mlxs_array a);
size_t mlxs_array_nbytes(mlxs_array a);
int mlxs_array_dtype(mlxs_array a);
// Evaluates the array and copies its elements in row-major order into `out`
// (exactly `nbytes` = size * itemsize), whatever the view's layout.
int mlxs_array_read(mlxs_array a, void* out, size_t nbytes);
// Shape and strides (in elements) of the evaluated array's memory view.
int mlxs_array_strides(mlxs_array a, int64_t* strides, size_t cap);
bool mlxs_array_row_contiguous(mlxs_array a);

int mlxs_eval(const mlxs_array* arrays, size_t n);
int mlxs_async_eval(const mlxs_array* arrays, size_t n);

// ---------------------------------------------------------------- vectors

int mlxs_vec_new(mlxs_vec* out);
void mlxs_vec_free(mlxs_vec v);
size_t mlxs_vec_len(mlxs_vec v);
int mlxs_vec_get(mlxs_array* out, mlxs_vec v, size_t i);
int mlxs_vec_push(mlxs_vec v, mlxs_array a);

// ---------------------------------------------------------------- named maps

int mlxs_named_new(mlxs_named* out);
void mlxs_named_free(mlxs_named m);
size_t mlxs_named_len(mlxs_named m);
const char* mlxs_named_key(mlxs_named m, size_t i);
int mlxs_named_get(mlxs_array* out, mlxs_named m, size_t i);
int mlxs_named_push(mlxs_named m, const char* key, mlxs_array a);
size_t mlxs_named_meta_len(mlxs_named m);
const char* mlxs_named_meta_key(mlxs_named m, size_t i);
const char* mlxs_named_meta_value(mlxs_named m, size_t i);
int mlxs_named_push_meta(mlxs_named m, const char* key, const char* value);

int mlxs_load_safetensors(mlxs_named* out, const char* path);
int mlxs_save_safetensors(const char* path, mlxs_named m);

#ifdef __cplusplus
}
#endif

#endif  // MLXS_CORE_H
