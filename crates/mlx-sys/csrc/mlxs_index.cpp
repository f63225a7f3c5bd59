// SPDX-License-Identifier: EUPL-1.2
//
// Indexing: slices (static, strided and dynamic) and their updates, gathers
// (take, take_along_axis) and scatters (put_along_axis), and the index
// clamping they share with the gathered matmuls of mlxs_quant.cpp.

#include <algorithm>
#include <sstream>

#include "mlxs_internal.h"

using namespace mlxs;

namespace {

// Throws unless `ndim` bounds came for the `ndim` dimensions of `x`.
void check_bounds(const char* op, size_t ndim, const mx::array& x) {
  if (ndim != x.ndim()) {
    throw std::invalid_argument(std::string("[") + op + "] got " + std::to_string(ndim) +
                                " bounds for an array with " + std::to_string(x.ndim()) +
                                " dimensions");
  }
}

// MLX does not bounds-check gather and scatter indices (nor dynamic slice
// starts): an index outside the axis reads or writes foreign memory. These
// helpers make every index land inside its axis, lazily and cheaply: a
// negative index first counts from the end (as MLX itself does), then
// anything still outside is clamped to the nearest valid position.

int64_t normalised_axis(int axis, size_t ndim) {
  int64_t n = static_cast<int64_t>(ndim);
  int64_t ax = axis < 0 ? axis + n : axis;
  return (ax < 0 || ax >= n) ? -1 : ax;
}

void require_integer(const char* op, const mx::array& idx, const char* what) {
  if (!mx::issubdtype(idx.dtype(), mx::integer)) {
    std::ostringstream msg;
    msg << "[" << op << "] " << what << " must be integers, got " << idx.dtype();
    throw std::invalid_argument(msg.str());
  }
}

// `idx` with every element clamped to [lo, hi] (elementwise bounds, which
// broadcast), after negative ones have had `wrap` added.
mx::array clamp_indices(const mx::array& idx, const mx::array& wrap, const mx::array& lo,
                        const mx::array& hi, mx::StreamOrDevice s) {
  // Small integer types are widened so that `idx + wrap` cannot overflow;
  // int32 cannot overflow (a negative index plus a dimension fits) and
  // 64-bit types are wide enough.
  auto i = idx;
  auto dt = idx.dtype();
  if (dt.size() < 4) {
    dt = mx::issubdtype(dt, mx::signedinteger) ? mx::int32 : mx::uint32;
    i = mx::astype(i, dt, s);
  }
  if (mx::issubdtype(dt, mx::signedinteger)) {
    auto zero = mx::array(0, dt);
    auto wrapped = mx::add(i, mx::astype(wrap, dt, s), s);
    i = mx::where(mx::less(i, zero, s), wrapped, i, s);
    i = mx::maximum(i, mx::astype(lo, dt, s), s);
  }
  return mx::minimum(i, mx::astype(hi, dt, s), s);
}

// Indices into an axis of `n` elements, each landing in [0, n).
mx::array safe_indices(const char* op, const mx::array& idx, int64_t n, mx::StreamOrDevice s) {
  require_integer(op, idx, "indices");
  if (n <= 0) {
    if (idx.size() > 0) {
      throw std::invalid_argument(std::string("[") + op + "] Cannot index into an empty axis.");
    }
    return idx;
  }
  return clamp_indices(idx, mx::array(n), mx::array(0), mx::array(n - 1), s);
}

// The number of matrices in the batch of `x` ([..., M, N]).
int64_t batch_count(const mx::array& x) {
  int64_t n = 1;
  for (int i = 0; i + 2 < static_cast<int>(x.ndim()); ++i) {
    n *= x.shape(i);
  }
  return n;
}

// Dynamic slice starts over `axes`, each clamped so that a window of
// `extent[axis]` elements from it stays inside `shape`.
mx::array safe_starts(const char* op, const mx::array& start, const std::vector<int>& axes,
                      const mx::Shape& shape, const mx::Shape& extent, mx::StreamOrDevice s) {
  require_integer(op, start, "start indices");
  if (start.ndim() > 1 || start.size() != axes.size()) {
    return start;  // MLX reports the mismatch
  }
  std::vector<int64_t> wrap;
  std::vector<int64_t> hi;
  for (int ax : axes) {
    auto a = normalised_axis(ax, shape.size());
    if (a < 0) {
      return start;  // MLX reports the bad axis
    }
    int64_t dim = shape[a];
    wrap.push_back(dim);
    hi.push_back(std::max<int64_t>(0, dim - extent[a]));
  }
  auto sh = start.shape();
  mx::Shape len{static_cast<int>(axes.size())};
  auto w = mx::reshape(mx::array(wrap.begin(), len, mx::int64), sh, s);
  auto h = mx::reshape(mx::array(hi.begin(), len, mx::int64), sh, s);
  return clamp_indices(start, w, mx::array(0), h, s);
}

}  // namespace

namespace mlxs {

std::optional<mx::array> safe_batch_indices(const char* op, const std::optional<mx::array>& idx,
                                            const mx::array& x, mx::StreamOrDevice s) {
  if (!idx) {
    return idx;
  }
  return safe_indices(op, *idx, batch_count(x), s);
}

}  // namespace mlxs

extern "C" {

int mlxs_slice(mlxs_array* out, mlxs_array a, const int* start, const int* stop, const int* strides,
               size_t ndim, int dev) {
  return guard([&] {
    auto& x = arr(a);
    check_bounds("slice", ndim, x);
    put(out, mx::slice(x, shape(start, ndim), shape(stop, ndim), shape(strides, ndim), sod(dev)));
  });
}

int mlxs_slice_dynamic(mlxs_array* out, mlxs_array a, mlxs_array start, const int* axes,
                       size_t naxes, const int* sizes, size_t nsizes, int dev) {
  return guard([&] {
    auto& x = arr(a);
    auto ax = ints(axes, naxes);
    auto sz = shape(sizes, nsizes);
    for (auto d : sz) {
      if (d < 0) {
        throw std::invalid_argument("[slice] Negative slice size.");
      }
    }
    auto st = sz.size() == x.ndim() ? safe_starts("slice", arr(start), ax, x.shape(), sz, sod(dev))
                                    : arr(start);
    put(out, mx::slice(x, st, std::move(ax), std::move(sz), sod(dev)));
  });
}

int mlxs_slice_update(mlxs_array* out, mlxs_array src, mlxs_array update, const int* start,
                      const int* stop, const int* strides, size_t ndim, int dev) {
  return guard([&] {
    auto& x = arr(src);
    check_bounds("slice_update", ndim, x);
    put(out, mx::slice_update(x, arr(update), shape(start, ndim), shape(stop, ndim),
                              shape(strides, ndim), sod(dev)));
  });
}

int mlxs_slice_update_dynamic(mlxs_array* out, mlxs_array src, mlxs_array update, mlxs_array start,
                              const int* axes, size_t naxes, int dev) {
  return guard([&] {
    auto& x = arr(src);
    auto& u = arr(update);
    if (u.ndim() > x.ndim()) {
      // MLX 0.32 computes ndim differences in size_t and would underflow.
      throw std::invalid_argument("[slice_update] The update has more dimensions than the source.");
    }
    auto ax = ints(axes, naxes);
    // The extent MLX broadcasts the update to (see mlx::core::slice_update).
    size_t diff = x.ndim() - u.ndim();
    mx::Shape extent = x.shape();
    for (size_t d = 0; d < x.ndim(); ++d) {
      extent[d] = d < diff ? 1 : std::min(u.shape(d - diff), x.shape(d));
    }
    auto st = safe_starts("slice_update", arr(start), ax, x.shape(), extent, sod(dev));
    put(out, mx::slice_update(x, u, st, std::move(ax), sod(dev)));
  });
}

int mlxs_take(mlxs_array* out, mlxs_array a, mlxs_array indices, int axis, bool has_axis, int dev) {
  return guard([&] {
    auto& x = arr(a);
    auto& idx = arr(indices);
    require_integer("take", idx, "indices");
    if (has_axis) {
      auto ax = normalised_axis(axis, x.ndim());
      auto safe =
          ax < 0 || x.shape(ax) == 0 ? idx : safe_indices("take", idx, x.shape(ax), sod(dev));
      put(out, mx::take(x, safe, axis, sod(dev)));
    } else {
      auto n = static_cast<int64_t>(x.size());
      auto safe = n == 0 ? idx : safe_indices("take", idx, n, sod(dev));
      put(out, mx::take(x, safe, sod(dev)));
    }
  });
}

int mlxs_take_along_axis(mlxs_array* out, mlxs_array a, mlxs_array indices, int axis, int dev) {
  return guard([&] {
    auto& x = arr(a);
    auto idx = arr(indices);
    require_integer("take_along_axis", idx, "indices");
    auto ax = normalised_axis(axis, x.ndim());
    if (ax >= 0 && idx.ndim() == x.ndim()) {
      idx = safe_indices("take_along_axis", idx, x.shape(ax), sod(dev));
    }
    put(out, mx::take_along_axis(x, idx, axis, sod(dev)));
  });
}

int mlxs_put_along_axis(mlxs_array* out, mlxs_array a, mlxs_array indices, mlxs_array values,
                        int axis, int dev) {
  return guard([&] {
    auto& x = arr(a);
    auto idx = arr(indices);
    require_integer("put_along_axis", idx, "indices");
    auto ax = normalised_axis(axis, x.ndim());
    if (ax >= 0 && idx.ndim() == x.ndim() && x.size() > 0) {
      idx = safe_indices("put_along_axis", idx, x.shape(ax), sod(dev));
    }
    put(out, mx::put_along_axis(x, idx, arr(values), axis, sod(dev)));
  });
}

}  // extern "C"
