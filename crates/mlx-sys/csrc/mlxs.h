// SPDX-License-Identifier: EUPL-1.2
//
// mlxs: the project's thin C ABI over MLX C++.
//
// Rules (see docs/architecture.md):
// - Handles are opaque pointers; each `*_new`/op output is released with the
//   matching `*_free`.
// - Outputs go through the first pointer arguments; every call that can fail
//   returns an int status: 0 on success, non-zero on failure.
// - No C++ exception crosses this boundary. On failure the message is stored
//   per thread and read with `mlxs_last_error`.
// - `dev` arguments select where an op runs: MLXS_DEV_DEFAULT (MLX's default
//   device), MLXS_DEV_CPU or MLXS_DEV_GPU.
//
// After editing this header run `cargo xtask bindgen` and commit the result.

#ifndef MLXS_H
#define MLXS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---------------------------------------------------------------- handles

typedef struct mlxs_array_s* mlxs_array;
typedef struct mlxs_vec_s* mlxs_vec;
typedef struct mlxs_named_s* mlxs_named;
typedef struct mlxs_closure_s* mlxs_closure;
typedef struct mlxs_vag_s* mlxs_vag;
typedef struct mlxs_group_s* mlxs_group;

// ---------------------------------------------------------------- enums

enum mlxs_dtype {
  MLXS_BOOL = 0,
  MLXS_UINT8 = 1,
  MLXS_UINT16 = 2,
  MLXS_UINT32 = 3,
  MLXS_UINT64 = 4,
  MLXS_INT8 = 5,
  MLXS_INT16 = 6,
  MLXS_INT32 = 7,
  MLXS_INT64 = 8,
  MLXS_FLOAT16 = 9,
  MLXS_FLOAT32 = 10,
  MLXS_FLOAT64 = 11,
  MLXS_BFLOAT16 = 12,
  MLXS_COMPLEX64 = 13,
};

enum mlxs_device_kind {
  MLXS_DEV_DEFAULT = -1,
  MLXS_DEV_CPU = 0,
  MLXS_DEV_GPU = 1,
};

enum mlxs_unary_op {
  MLXS_ABS = 0,
  MLXS_NEGATIVE,
  MLXS_SIGN,
  MLXS_EXP,
  MLXS_LOG,
  MLXS_LOG1P,
  MLXS_SQRT,
  MLXS_RSQRT,
  MLXS_RECIPROCAL,
  MLXS_SQUARE,
  MLXS_SIN,
  MLXS_COS,
  MLXS_TANH,
  MLXS_SIGMOID,
  MLXS_ERF,
  MLXS_FLOOR,
  MLXS_CEIL,
  MLXS_ROUND,
  MLXS_LOGICAL_NOT,
  MLXS_ISNAN,
  MLXS_ISINF,
  MLXS_STOP_GRADIENT,
  MLXS_COPY,
  MLXS_ZEROS_LIKE,
  MLXS_ONES_LIKE,
  MLXS_CONTIGUOUS,
};

enum mlxs_binary_op {
  MLXS_ADD = 0,
  MLXS_SUBTRACT,
  MLXS_MULTIPLY,
  MLXS_DIVIDE,
  MLXS_REMAINDER,
  MLXS_POWER,
  MLXS_MAXIMUM,
  MLXS_MINIMUM,
  MLXS_EQUAL,
  MLXS_NOT_EQUAL,
  MLXS_GREATER,
  MLXS_GREATER_EQUAL,
  MLXS_LESS,
  MLXS_LESS_EQUAL,
  MLXS_LOGICAL_AND,
  MLXS_LOGICAL_OR,
  MLXS_MATMUL,
  MLXS_LOGADDEXP,
  MLXS_FLOOR_DIVIDE,
};

enum mlxs_reduce_op {
  MLXS_SUM = 0,
  MLXS_MEAN,
  MLXS_MAX,
  MLXS_MIN,
  MLXS_PROD,
  MLXS_ALL,
  MLXS_ANY,
  MLXS_LOGSUMEXP,
  MLXS_VAR,
  MLXS_STD,
};

enum mlxs_scan_op {
  MLXS_CUMSUM = 0,
  MLXS_CUMPROD,
  MLXS_CUMMAX,
  MLXS_CUMMIN,
  MLXS_LOGCUMSUMEXP,
};

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
int mlxs_array_from_data(
    mlxs_array* out,
    const void* data,
    size_t nbytes,
    const int* shape,
    size_t ndim,
    int dtype);
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

// ---------------------------------------------------------------- creation

int mlxs_zeros(mlxs_array* out, const int* shape, size_t ndim, int dtype, int dev);
int mlxs_ones(mlxs_array* out, const int* shape, size_t ndim, int dtype, int dev);
int mlxs_full(
    mlxs_array* out,
    const int* shape,
    size_t ndim,
    mlxs_array value,
    int dtype,
    int dev);
int mlxs_arange(
    mlxs_array* out,
    double start,
    double stop,
    double step,
    int dtype,
    int dev);
int mlxs_eye(mlxs_array* out, int n, int m, int k, int dtype, int dev);
int mlxs_tri(mlxs_array* out, int n, int m, int k, int dtype, int dev);

// ---------------------------------------------------------------- elementwise

int mlxs_unary(mlxs_array* out, int op, mlxs_array a, int dev);
int mlxs_binary(mlxs_array* out, int op, mlxs_array a, mlxs_array b, int dev);
int mlxs_where(
    mlxs_array* out,
    mlxs_array cond,
    mlxs_array x,
    mlxs_array y,
    int dev);
// `lo` or `hi` may be NULL.
int mlxs_clip(mlxs_array* out, mlxs_array a, mlxs_array lo, mlxs_array hi, int dev);
int mlxs_astype(mlxs_array* out, mlxs_array a, int dtype, int dev);
int mlxs_addmm(
    mlxs_array* out,
    mlxs_array c,
    mlxs_array a,
    mlxs_array b,
    float alpha,
    float beta,
    int dev);
int mlxs_tril(mlxs_array* out, mlxs_array a, int k, int dev);
int mlxs_triu(mlxs_array* out, mlxs_array a, int k, int dev);

// ---------------------------------------------------------------- reductions

// naxes == 0 with all_axes == true reduces over every axis.
int mlxs_reduce(
    mlxs_array* out,
    int op,
    mlxs_array a,
    const int* axes,
    size_t naxes,
    bool all_axes,
    bool keepdims,
    int dev);
int mlxs_argmax(mlxs_array* out, mlxs_array a, int axis, bool keepdims, int dev);
int mlxs_argmin(mlxs_array* out, mlxs_array a, int axis, bool keepdims, int dev);
int mlxs_softmax(
    mlxs_array* out,
    mlxs_array a,
    const int* axes,
    size_t naxes,
    bool precise,
    int dev);
int mlxs_scan(
    mlxs_array* out,
    int op,
    mlxs_array a,
    int axis,
    bool reverse,
    bool inclusive,
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
int mlxs_split_indices(
    mlxs_vec* out,
    mlxs_array a,
    const int* indices,
    size_t n,
    int axis,
    int dev);
int mlxs_flatten(mlxs_array* out, mlxs_array a, int start_axis, int end_axis, int dev);
int mlxs_swapaxes(mlxs_array* out, mlxs_array a, int axis1, int axis2, int dev);
int mlxs_repeat(mlxs_array* out, mlxs_array a, int repeats, int axis, int dev);
int mlxs_pad(
    mlxs_array* out,
    mlxs_array a,
    const int* axes,
    const int* low,
    const int* high,
    size_t n,
    mlxs_array value,
    int dev);
int mlxs_as_strided(
    mlxs_array* out,
    mlxs_array a,
    const int* shape,
    const int64_t* strides,
    size_t ndim,
    size_t offset,
    int dev);

// Input [N, H, W, C_in] (NHWC), weight [C_out, kH, kW, C_in / groups].
int mlxs_conv2d(
    mlxs_array* out,
    mlxs_array input,
    mlxs_array weight,
    int stride_h,
    int stride_w,
    int pad_h,
    int pad_w,
    int dilation_h,
    int dilation_w,
    int groups,
    int dev);

// ---------------------------------------------------------------- indexing

int mlxs_slice(
    mlxs_array* out,
    mlxs_array a,
    const int* start,
    const int* stop,
    const int* strides,
    size_t ndim,
    int dev);
// Slice with a start given as a (possibly lazy) int array over `axes`.
int mlxs_slice_dynamic(
    mlxs_array* out,
    mlxs_array a,
    mlxs_array start,
    const int* axes,
    size_t naxes,
    const int* sizes,
    size_t nsizes,
    int dev);
int mlxs_slice_update(
    mlxs_array* out,
    mlxs_array src,
    mlxs_array update,
    const int* start,
    const int* stop,
    const int* strides,
    size_t ndim,
    int dev);
int mlxs_slice_update_dynamic(
    mlxs_array* out,
    mlxs_array src,
    mlxs_array update,
    mlxs_array start,
    const int* axes,
    size_t naxes,
    int dev);
// has_axis == false indexes the flattened array.
int mlxs_take(
    mlxs_array* out,
    mlxs_array a,
    mlxs_array indices,
    int axis,
    bool has_axis,
    int dev);
int mlxs_take_along_axis(
    mlxs_array* out,
    mlxs_array a,
    mlxs_array indices,
    int axis,
    int dev);
int mlxs_put_along_axis(
    mlxs_array* out,
    mlxs_array a,
    mlxs_array indices,
    mlxs_array values,
    int axis,
    int dev);

// ---------------------------------------------------------------- quantisation

// mode: "affine" (NULL means affine). group_size/bits <= 0 mean MLX's default.
int mlxs_quantize(
    mlxs_vec* out,
    mlxs_array w,
    int group_size,
    int bits,
    const char* mode,
    int dev);
// biases may be NULL; out_dtype < 0 keeps MLX's choice.
int mlxs_dequantize(
    mlxs_array* out,
    mlxs_array w,
    mlxs_array scales,
    mlxs_array biases,
    int group_size,
    int bits,
    const char* mode,
    int out_dtype,
    int dev);
int mlxs_quantized_matmul(
    mlxs_array* out,
    mlxs_array x,
    mlxs_array w,
    mlxs_array scales,
    mlxs_array biases,
    bool transpose,
    int group_size,
    int bits,
    const char* mode,
    int dev);
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
// lhs_indices/rhs_indices may be NULL.
int mlxs_gather_mm(
    mlxs_array* out,
    mlxs_array a,
    mlxs_array b,
    mlxs_array lhs_indices,
    mlxs_array rhs_indices,
    bool sorted_indices,
    int dev);
int mlxs_gather_qmm(
    mlxs_array* out,
    mlxs_array x,
    mlxs_array w,
    mlxs_array scales,
    mlxs_array biases,
    mlxs_array lhs_indices,
    mlxs_array rhs_indices,
    bool transpose,
    int group_size,
    int bits,
    const char* mode,
    bool sorted_indices,
    int dev);

// ---------------------------------------------------------------- fast kernels

// weight may be NULL.
int mlxs_rms_norm(mlxs_array* out, mlxs_array x, mlxs_array weight, float eps, int dev);
// weight and bias may be NULL.
int mlxs_layer_norm(
    mlxs_array* out,
    mlxs_array x,
    mlxs_array weight,
    mlxs_array bias,
    float eps,
    int dev);
// Either has_base (base used) or freqs non-NULL. offset_arr may be NULL, then
// `offset` is used.
int mlxs_rope(
    mlxs_array* out,
    mlxs_array x,
    int dims,
    bool traditional,
    bool has_base,
    float base,
    float scale,
    int offset,
    mlxs_array offset_arr,
    mlxs_array freqs,
    int dev);
// mask_mode: "" (none, or the array mask), "causal". mask and sinks may be NULL.
int mlxs_sdpa(
    mlxs_array* out,
    mlxs_array q,
    mlxs_array k,
    mlxs_array v,
    float scale,
    const char* mask_mode,
    mlxs_array mask,
    mlxs_array sinks,
    int dev);

// ---------------------------------------------------------------- random

int mlxs_random_key(mlxs_array* out, uint64_t seed);
int mlxs_random_seed(uint64_t seed);
int mlxs_random_split(mlxs_array* out, mlxs_array key, int num, int dev);
// key may be NULL (global key sequence).
int mlxs_random_normal(
    mlxs_array* out,
    const int* shape,
    size_t ndim,
    int dtype,
    float loc,
    float scale,
    mlxs_array key,
    int dev);
int mlxs_random_uniform(
    mlxs_array* out,
    mlxs_array low,
    mlxs_array high,
    const int* shape,
    size_t ndim,
    int dtype,
    mlxs_array key,
    int dev);
int mlxs_random_categorical(
    mlxs_array* out,
    mlxs_array logits,
    int axis,
    mlxs_array key,
    int dev);
int mlxs_random_bernoulli(
    mlxs_array* out,
    mlxs_array p,
    const int* shape,
    size_t ndim,
    mlxs_array key,
    int dev);
int mlxs_random_randint(
    mlxs_array* out,
    mlxs_array low,
    mlxs_array high,
    const int* shape,
    size_t ndim,
    int dtype,
    mlxs_array key,
    int dev);

// ---------------------------------------------------------------- memory

int mlxs_get_active_memory(size_t* out);
int mlxs_get_peak_memory(size_t* out);
int mlxs_get_cache_memory(size_t* out);
int mlxs_reset_peak_memory(void);
int mlxs_clear_cache(void);
int mlxs_set_memory_limit(size_t limit, size_t* previous);
int mlxs_get_memory_limit(size_t* out);
int mlxs_set_cache_limit(size_t limit, size_t* previous);
int mlxs_set_wired_limit(size_t limit, size_t* previous);

// ---------------------------------------------------------------- closures

// A callback: fills `outputs` from `inputs`. Returns 0 on success; non-zero
// means the callback failed (the Rust side keeps the error or panic).
typedef int (*mlxs_closure_fn)(
    void* payload,
    const mlxs_array* inputs,
    size_t n_inputs,
    mlxs_vec outputs);
typedef void (*mlxs_payload_dtor)(void* payload);

// Takes ownership of `payload`: `dtor` runs once when the last copy of the
// closure is gone (also when this call fails).
int mlxs_closure_new(
    mlxs_closure* out,
    mlxs_closure_fn fn,
    void* payload,
    mlxs_payload_dtor dtor);
void mlxs_closure_free(mlxs_closure c);
int mlxs_closure_apply(mlxs_vec* out, mlxs_closure c, const mlxs_array* inputs, size_t n);
int mlxs_vjp(
    mlxs_vec* outputs,
    mlxs_vec* vjps,
    mlxs_closure c,
    const mlxs_array* primals,
    size_t n_primals,
    const mlxs_array* cotangents,
    size_t n_cotangents);
int mlxs_jvp(
    mlxs_vec* outputs,
    mlxs_vec* jvps,
    mlxs_closure c,
    const mlxs_array* primals,
    size_t n_primals,
    const mlxs_array* tangents,
    size_t n_tangents);
int mlxs_value_and_grad(mlxs_vag* out, mlxs_closure c, const int* argnums, size_t n);
void mlxs_vag_free(mlxs_vag f);
int mlxs_vag_apply(
    mlxs_vec* values,
    mlxs_vec* grads,
    mlxs_vag f,
    const mlxs_array* inputs,
    size_t n);
int mlxs_checkpoint(mlxs_closure* out, mlxs_closure c);
int mlxs_compile(mlxs_closure* out, mlxs_closure c, bool shapeless);
int mlxs_set_compile_enabled(bool enabled);

// ---------------------------------------------------------------- distributed

// MLX's own distributed layer. `backend` is "any", "ring", "mpi", "nccl" or
// "jaccl". A group handle is released with mlxs_group_free. Collective ops
// take a group (NULL: MLX's global group, initialising it if needed).
// Initialisation is serialised; it may block while peers join (the ring
// backend's first rank waits in accept), so callers put a deadline on it.
int mlxs_distributed_is_available(const char* backend, bool* out);
int mlxs_distributed_init(mlxs_group* out, bool strict, const char* backend);
void mlxs_group_free(mlxs_group g);
int mlxs_group_rank(mlxs_group g, int* out);
int mlxs_group_size(mlxs_group g, int* out);
int mlxs_group_split(mlxs_group* out, mlxs_group g, int color, int key);
int mlxs_all_sum(mlxs_array* out, mlxs_array x, mlxs_group g, int dev);
int mlxs_all_max(mlxs_array* out, mlxs_array x, mlxs_group g, int dev);
int mlxs_all_min(mlxs_array* out, mlxs_array x, mlxs_group g, int dev);
int mlxs_all_gather(mlxs_array* out, mlxs_array x, mlxs_group g, int dev);
int mlxs_send(mlxs_array* out, mlxs_array x, int dst, mlxs_group g, int dev);
int mlxs_recv(
    mlxs_array* out,
    const int* shape,
    size_t ndim,
    int dtype,
    int src,
    mlxs_group g,
    int dev);
int mlxs_recv_like(mlxs_array* out, mlxs_array like, int src, mlxs_group g, int dev);

#ifdef __cplusplus
}
#endif

#endif // MLXS_H
