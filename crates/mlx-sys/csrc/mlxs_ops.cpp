// SPDX-License-Identifier: EUPL-1.2
//
// Operations: creation, elementwise, reductions, shapes and convolution.
// Indexing is in mlxs_index.cpp, quantisation in mlxs_quant.cpp and the
// fused kernels of mlx::core::fast in mlxs_fast.cpp.

#include "mlxs_internal.h"

using namespace mlxs;

namespace {

mx::array unary(int op, const mx::array& a, mx::StreamOrDevice s) {
  switch (op) {
    case MLXS_ABS: return mx::abs(a, s);
    case MLXS_NEGATIVE: return mx::negative(a, s);
    case MLXS_SIGN: return mx::sign(a, s);
    case MLXS_EXP: return mx::exp(a, s);
    case MLXS_LOG: return mx::log(a, s);
    case MLXS_LOG1P: return mx::log1p(a, s);
    case MLXS_SQRT: return mx::sqrt(a, s);
    case MLXS_RSQRT: return mx::rsqrt(a, s);
    case MLXS_RECIPROCAL: return mx::reciprocal(a, s);
    case MLXS_SQUARE: return mx::square(a, s);
    case MLXS_SIN: return mx::sin(a, s);
    case MLXS_COS: return mx::cos(a, s);
    case MLXS_TANH: return mx::tanh(a, s);
    case MLXS_SIGMOID: return mx::sigmoid(a, s);
    case MLXS_ERF: return mx::erf(a, s);
    case MLXS_FLOOR: return mx::floor(a, s);
    case MLXS_CEIL: return mx::ceil(a, s);
    case MLXS_ROUND: return mx::round(a, 0, s);
    case MLXS_LOGICAL_NOT: return mx::logical_not(a, s);
    case MLXS_ISNAN: return mx::isnan(a, s);
    case MLXS_ISINF: return mx::isinf(a, s);
    case MLXS_STOP_GRADIENT: return mx::stop_gradient(a, s);
    case MLXS_COPY: return mx::copy(a, s);
    case MLXS_ZEROS_LIKE: return mx::zeros_like(a, s);
    case MLXS_ONES_LIKE: return mx::ones_like(a, s);
    case MLXS_CONTIGUOUS: return mx::contiguous(a, false, s);
    default: break;
  }
  throw std::invalid_argument("unknown unary op code " + std::to_string(op));
}

mx::array binary(int op, const mx::array& a, const mx::array& b, mx::StreamOrDevice s) {
  switch (op) {
    case MLXS_ADD: return mx::add(a, b, s);
    case MLXS_SUBTRACT: return mx::subtract(a, b, s);
    case MLXS_MULTIPLY: return mx::multiply(a, b, s);
    case MLXS_DIVIDE: return mx::divide(a, b, s);
    case MLXS_REMAINDER: return mx::remainder(a, b, s);
    case MLXS_POWER: return mx::power(a, b, s);
    case MLXS_MAXIMUM: return mx::maximum(a, b, s);
    case MLXS_MINIMUM: return mx::minimum(a, b, s);
    case MLXS_EQUAL: return mx::equal(a, b, s);
    case MLXS_NOT_EQUAL: return mx::not_equal(a, b, s);
    case MLXS_GREATER: return mx::greater(a, b, s);
    case MLXS_GREATER_EQUAL: return mx::greater_equal(a, b, s);
    case MLXS_LESS: return mx::less(a, b, s);
    case MLXS_LESS_EQUAL: return mx::less_equal(a, b, s);
    case MLXS_LOGICAL_AND: return mx::logical_and(a, b, s);
    case MLXS_LOGICAL_OR: return mx::logical_or(a, b, s);
    case MLXS_MATMUL: return mx::matmul(a, b, s);
    case MLXS_LOGADDEXP: return mx::logaddexp(a, b, s);
    case MLXS_FLOOR_DIVIDE: return mx::floor_divide(a, b, s);
    default: break;
  }
  throw std::invalid_argument("unknown binary op code " + std::to_string(op));
}

std::vector<int> all_axes_of(const mx::array& a) {
  std::vector<int> axes(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) {
    axes[i] = static_cast<int>(i);
  }
  return axes;
}

mx::array reduce(int op, const mx::array& a, const std::vector<int>& axes, bool keepdims,
                 mx::StreamOrDevice s) {
  switch (op) {
    case MLXS_SUM: return mx::sum(a, axes, keepdims, s);
    case MLXS_MEAN: return mx::mean(a, axes, keepdims, s);
    case MLXS_MAX: return mx::max(a, axes, keepdims, s);
    case MLXS_MIN: return mx::min(a, axes, keepdims, s);
    case MLXS_PROD: return mx::prod(a, axes, keepdims, s);
    case MLXS_ALL: return mx::all(a, axes, keepdims, s);
    case MLXS_ANY: return mx::any(a, axes, keepdims, s);
    case MLXS_LOGSUMEXP: return mx::logsumexp(a, axes, keepdims, s);
    case MLXS_VAR: return mx::var(a, axes, keepdims, 0, s);
    case MLXS_STD: return mx::std(a, axes, keepdims, 0, s);
    default: break;
  }
  throw std::invalid_argument("unknown reduction op code " + std::to_string(op));
}

mx::array scan(int op, const mx::array& a, int axis, bool reverse, bool inclusive,
               mx::StreamOrDevice s) {
  switch (op) {
    case MLXS_CUMSUM: return mx::cumsum(a, axis, reverse, inclusive, s);
    case MLXS_CUMPROD: return mx::cumprod(a, axis, reverse, inclusive, s);
    case MLXS_CUMMAX: return mx::cummax(a, axis, reverse, inclusive, s);
    case MLXS_CUMMIN: return mx::cummin(a, axis, reverse, inclusive, s);
    case MLXS_LOGCUMSUMEXP: return mx::logcumsumexp(a, axis, reverse, inclusive, s);
    default: break;
  }
  throw std::invalid_argument("unknown scan op code " + std::to_string(op));
}

// `op(a)` (every axis) when no axes are given, else `op(a, axes)`.
template <class Op>
mx::array on_axes(const mx::array& a, const int* axes, size_t naxes, Op op) {
  return naxes == 0 ? op(a) : op(a, ints(axes, naxes));
}

mx::Strides strides_of(const int64_t* xs, size_t n) {
  if (n > 0 && xs == nullptr) {
    throw std::invalid_argument("null strides pointer");
  }
  return mx::Strides(xs, xs + n);
}

}  // namespace

extern "C" {

// ---------------------------------------------------------------- creation

int mlxs_zeros(mlxs_array* out, const int* dims, size_t ndim, int dt, int dev) {
  return guard([&] { put(out, mx::zeros(shape(dims, ndim), dtype(dt), sod(dev))); });
}

int mlxs_ones(mlxs_array* out, const int* dims, size_t ndim, int dt, int dev) {
  return guard([&] { put(out, mx::ones(shape(dims, ndim), dtype(dt), sod(dev))); });
}

int mlxs_full(mlxs_array* out, const int* dims, size_t ndim, mlxs_array value, int dt, int dev) {
  return guard([&] { put(out, mx::full(shape(dims, ndim), arr(value), dtype(dt), sod(dev))); });
}

int mlxs_arange(mlxs_array* out, double start, double stop, double step, int dt, int dev) {
  return guard([&] { put(out, mx::arange(start, stop, step, dtype(dt), sod(dev))); });
}

int mlxs_eye(mlxs_array* out, int n, int m, int k, int dt, int dev) {
  return guard([&] { put(out, mx::eye(n, m, k, dtype(dt), sod(dev))); });
}

int mlxs_tri(mlxs_array* out, int n, int m, int k, int dt, int dev) {
  return guard([&] { put(out, mx::tri(n, m, k, dtype(dt), sod(dev))); });
}

// ---------------------------------------------------------------- elementwise

int mlxs_unary(mlxs_array* out, int op, mlxs_array a, int dev) {
  return guard([&] { put(out, unary(op, arr(a), sod(dev))); });
}

int mlxs_binary(mlxs_array* out, int op, mlxs_array a, mlxs_array b, int dev) {
  return guard([&] { put(out, binary(op, arr(a), arr(b), sod(dev))); });
}

int mlxs_where(mlxs_array* out, mlxs_array c, mlxs_array x, mlxs_array y, int dev) {
  return guard([&] { put(out, mx::where(arr(c), arr(x), arr(y), sod(dev))); });
}

int mlxs_clip(mlxs_array* out, mlxs_array a, mlxs_array lo, mlxs_array hi, int dev) {
  return guard([&] { put(out, mx::clip(arr(a), opt(lo), opt(hi), sod(dev))); });
}

int mlxs_astype(mlxs_array* out, mlxs_array a, int dt, int dev) {
  return guard([&] { put(out, mx::astype(arr(a), dtype(dt), sod(dev))); });
}

int mlxs_addmm(mlxs_array* out, mlxs_array c, mlxs_array a, mlxs_array b, float alpha, float beta,
               int dev) {
  return guard([&] { put(out, mx::addmm(arr(c), arr(a), arr(b), alpha, beta, sod(dev))); });
}

int mlxs_tril(mlxs_array* out, mlxs_array a, int k, int dev) {
  return guard([&] { put(out, mx::tril(arr(a), k, sod(dev))); });
}

int mlxs_triu(mlxs_array* out, mlxs_array a, int k, int dev) {
  return guard([&] { put(out, mx::triu(arr(a), k, sod(dev))); });
}

// ---------------------------------------------------------------- reductions

int mlxs_reduce(mlxs_array* out, int op, mlxs_array a, const int* axes, size_t naxes, bool all_axes,
                bool keepdims, int dev) {
  return guard([&] {
    auto& x = arr(a);
    auto ax = all_axes ? all_axes_of(x) : ints(axes, naxes);
    put(out, reduce(op, x, ax, keepdims, sod(dev)));
  });
}

int mlxs_argmax(mlxs_array* out, mlxs_array a, int axis, bool keepdims, int dev) {
  return guard([&] { put(out, mx::argmax(arr(a), axis, keepdims, sod(dev))); });
}

int mlxs_argmin(mlxs_array* out, mlxs_array a, int axis, bool keepdims, int dev) {
  return guard([&] { put(out, mx::argmin(arr(a), axis, keepdims, sod(dev))); });
}

int mlxs_softmax(mlxs_array* out, mlxs_array a, const int* axes, size_t naxes, bool precise,
                 int dev) {
  return guard([&] { put(out, mx::softmax(arr(a), ints(axes, naxes), precise, sod(dev))); });
}

int mlxs_scan(mlxs_array* out, int op, mlxs_array a, int axis, bool reverse, bool inclusive,
              int dev) {
  return guard([&] { put(out, scan(op, arr(a), axis, reverse, inclusive, sod(dev))); });
}

int mlxs_topk(mlxs_array* out, mlxs_array a, int k, int axis, int dev) {
  return guard([&] { put(out, mx::topk(arr(a), k, axis, sod(dev))); });
}

int mlxs_sort(mlxs_array* out, mlxs_array a, int axis, int dev) {
  return guard([&] { put(out, mx::sort(arr(a), axis, sod(dev))); });
}

int mlxs_argsort(mlxs_array* out, mlxs_array a, int axis, int dev) {
  return guard([&] { put(out, mx::argsort(arr(a), axis, sod(dev))); });
}

int mlxs_argpartition(mlxs_array* out, mlxs_array a, int kth, int axis, int dev) {
  return guard([&] { put(out, mx::argpartition(arr(a), kth, axis, sod(dev))); });
}

int mlxs_partition(mlxs_array* out, mlxs_array a, int kth, int axis, int dev) {
  return guard([&] { put(out, mx::partition(arr(a), kth, axis, sod(dev))); });
}

// ---------------------------------------------------------------- shapes

int mlxs_reshape(mlxs_array* out, mlxs_array a, const int* dims, size_t ndim, int dev) {
  return guard([&] { put(out, mx::reshape(arr(a), shape(dims, ndim), sod(dev))); });
}

int mlxs_transpose(mlxs_array* out, mlxs_array a, const int* axes, size_t naxes, int dev) {
  return guard([&] {
    put(out, on_axes(arr(a), axes, naxes,
                     [&](const auto&... args) { return mx::transpose(args..., sod(dev)); }));
  });
}

int mlxs_expand_dims(mlxs_array* out, mlxs_array a, const int* axes, size_t naxes, int dev) {
  return guard([&] { put(out, mx::expand_dims(arr(a), ints(axes, naxes), sod(dev))); });
}

int mlxs_squeeze(mlxs_array* out, mlxs_array a, const int* axes, size_t naxes, int dev) {
  return guard([&] {
    put(out, on_axes(arr(a), axes, naxes,
                     [&](const auto&... args) { return mx::squeeze(args..., sod(dev)); }));
  });
}

int mlxs_broadcast_to(mlxs_array* out, mlxs_array a, const int* dims, size_t ndim, int dev) {
  return guard([&] { put(out, mx::broadcast_to(arr(a), shape(dims, ndim), sod(dev))); });
}

int mlxs_concatenate(mlxs_array* out, const mlxs_array* xs, size_t n, int axis, int dev) {
  return guard([&] { put(out, mx::concatenate(arrays(xs, n), axis, sod(dev))); });
}

int mlxs_stack(mlxs_array* out, const mlxs_array* xs, size_t n, int axis, int dev) {
  return guard([&] { put(out, mx::stack(arrays(xs, n), axis, sod(dev))); });
}

int mlxs_split_sections(mlxs_vec* out, mlxs_array a, int sections, int axis, int dev) {
  return guard([&] { put_vec(out, mx::split(arr(a), sections, axis, sod(dev))); });
}

int mlxs_split_indices(mlxs_vec* out, mlxs_array a, const int* indices, size_t n, int axis,
                       int dev) {
  return guard([&] { put_vec(out, mx::split(arr(a), shape(indices, n), axis, sod(dev))); });
}

int mlxs_flatten(mlxs_array* out, mlxs_array a, int start_axis, int end_axis, int dev) {
  return guard([&] { put(out, mx::flatten(arr(a), start_axis, end_axis, sod(dev))); });
}

int mlxs_swapaxes(mlxs_array* out, mlxs_array a, int axis1, int axis2, int dev) {
  return guard([&] { put(out, mx::swapaxes(arr(a), axis1, axis2, sod(dev))); });
}

int mlxs_repeat(mlxs_array* out, mlxs_array a, int repeats, int axis, int dev) {
  return guard([&] { put(out, mx::repeat(arr(a), repeats, axis, sod(dev))); });
}

int mlxs_pad(mlxs_array* out, mlxs_array a, const int* axes, const int* low, const int* high,
             size_t n, mlxs_array value, int dev) {
  return guard([&] {
    put(out, mx::pad(arr(a), ints(axes, n), shape(low, n), shape(high, n), arr(value), "constant",
                     sod(dev)));
  });
}

int mlxs_as_strided(mlxs_array* out, mlxs_array a, const int* dims, const int64_t* strides,
                    size_t ndim, size_t offset, int dev) {
  return guard([&] {
    auto& x = arr(a);
    auto sh = shape(dims, ndim);
    auto st = strides_of(strides, ndim);
    // as_strided trusts its arguments; refuse views that read outside the
    // source buffer instead of reading foreign memory.
    int64_t lo = static_cast<int64_t>(offset);
    int64_t hi = static_cast<int64_t>(offset);
    bool empty = false;
    for (size_t i = 0; i < ndim; ++i) {
      if (sh[i] < 0) {
        throw std::invalid_argument("[as_strided] negative dimension");
      }
      if (sh[i] == 0) {
        empty = true;
      }
      int64_t span = static_cast<int64_t>(sh[i] - 1) * st[i];
      if (span < 0) {
        lo += span;
      } else {
        hi += span;
      }
    }
    if (!empty && (lo < 0 || hi >= static_cast<int64_t>(x.size()))) {
      throw std::invalid_argument("[as_strided] the view reaches elements [" + std::to_string(lo) +
                                  ", " + std::to_string(hi) + "] outside the source of " +
                                  std::to_string(x.size()) + " elements");
    }
    put(out, mx::as_strided(x, std::move(sh), std::move(st), offset, sod(dev)));
  });
}

int mlxs_conv2d(mlxs_array* out, mlxs_array input, mlxs_array weight, int stride_h, int stride_w,
                int pad_h, int pad_w, int dilation_h, int dilation_w, int groups, int dev) {
  return guard([&] {
    put(out, mx::conv2d(arr(input), arr(weight), {stride_h, stride_w}, {pad_h, pad_w},
                        {dilation_h, dilation_w}, groups, sod(dev)));
  });
}

}  // extern "C"
