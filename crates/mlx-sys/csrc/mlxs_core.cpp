// SPDX-License-Identifier: EUPL-1.2
//
// The core of the shim: the per-thread error message, the conversions every
// translation unit shares (mlxs_internal.h), arrays (making, reading,
// evaluating) and vectors of arrays. The runtime and memory are in
// mlxs_runtime.cpp, named maps and safetensors in mlxs_io.cpp and random
// numbers in mlxs_random.cpp.

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <future>
#include <memory>
#include <mutex>

#include "mlx/scheduler.h"
#include "mlxs_internal.h"

namespace {
thread_local std::string last_error;

// MLX's CPU stream workers outlive the threads that queued work on them, and
// a queued task holds buffers that it hands back to the allocator when it
// has run. The allocator is a function-local static, destroyed by exit(): a
// task still running then corrupts the heap. This handler, registered after
// the allocator exists (so it runs before the allocator is destroyed), waits
// a bounded time for every CPU stream to run what it holds. GPU streams can
// only be synchronised from their own thread; threads of this library do
// that themselves before they end (FinishThread on the Rust side).
void drain_cpu_streams() {
  try {
    std::vector<std::future<void>> waits;
    for (const auto& s : mx::get_streams()) {
      if (s.device != mx::Device::cpu) {
        continue;
      }
      auto done = std::make_shared<std::promise<void>>();
      waits.push_back(done->get_future());
      mx::scheduler::enqueue(s, [done] { done->set_value(); });
    }
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    for (auto& w : waits) {
      w.wait_until(deadline);
    }
  } catch (...) {
    // Exiting: nothing to report to, and a failed stream has no work left.
  }
}

void drain_at_exit() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Makes sure the allocator exists, so that its destructor is registered
    // before this handler and therefore runs after it.
    (void)mx::get_active_memory();
    std::atexit(drain_cpu_streams);
  });
}
}  // namespace

namespace mlxs {

void set_error(const char* msg) { last_error = msg == nullptr ? "" : msg; }

mx::Dtype dtype(int d) {
  switch (d) {
    case MLXS_BOOL: return mx::bool_;
    case MLXS_UINT8: return mx::uint8;
    case MLXS_UINT16: return mx::uint16;
    case MLXS_UINT32: return mx::uint32;
    case MLXS_UINT64: return mx::uint64;
    case MLXS_INT8: return mx::int8;
    case MLXS_INT16: return mx::int16;
    case MLXS_INT32: return mx::int32;
    case MLXS_INT64: return mx::int64;
    case MLXS_FLOAT16: return mx::float16;
    case MLXS_FLOAT32: return mx::float32;
    case MLXS_FLOAT64: return mx::float64;
    case MLXS_BFLOAT16: return mx::bfloat16;
    case MLXS_COMPLEX64: return mx::complex64;
    default: break;
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(d));
}

int dtype_code(mx::Dtype d) {
  switch (d.val()) {
    case mx::Dtype::Val::bool_: return MLXS_BOOL;
    case mx::Dtype::Val::uint8: return MLXS_UINT8;
    case mx::Dtype::Val::uint16: return MLXS_UINT16;
    case mx::Dtype::Val::uint32: return MLXS_UINT32;
    case mx::Dtype::Val::uint64: return MLXS_UINT64;
    case mx::Dtype::Val::int8: return MLXS_INT8;
    case mx::Dtype::Val::int16: return MLXS_INT16;
    case mx::Dtype::Val::int32: return MLXS_INT32;
    case mx::Dtype::Val::int64: return MLXS_INT64;
    case mx::Dtype::Val::float16: return MLXS_FLOAT16;
    case mx::Dtype::Val::float32: return MLXS_FLOAT32;
    case mx::Dtype::Val::float64: return MLXS_FLOAT64;
    case mx::Dtype::Val::bfloat16: return MLXS_BFLOAT16;
    case mx::Dtype::Val::complex64: return MLXS_COMPLEX64;
  }
  return -1;
}

mx::Device device(int kind) {
  switch (kind) {
    case MLXS_DEV_CPU: return mx::Device(mx::Device::cpu);
    case MLXS_DEV_GPU: return mx::Device(mx::Device::gpu);
    case MLXS_DEV_DEFAULT: return mx::default_device();
    default: break;
  }
  throw std::invalid_argument("unknown device kind " + std::to_string(kind));
}

mx::StreamOrDevice sod(int kind) {
  if (kind == MLXS_DEV_DEFAULT) {
    return {};
  }
  return device(kind);
}

mx::Shape shape(const int* dims, size_t ndim) {
  if (ndim > 0 && dims == nullptr) {
    throw std::invalid_argument("null shape pointer");
  }
  return mx::Shape(dims, dims + ndim);
}

std::vector<int> ints(const int* xs, size_t n) {
  if (n > 0 && xs == nullptr) {
    throw std::invalid_argument("null integer list pointer");
  }
  return std::vector<int>(xs, xs + n);
}

std::vector<mx::array> arrays(const mlxs_array* xs, size_t n) {
  if (n > 0 && xs == nullptr) {
    throw std::invalid_argument("null array list pointer");
  }
  std::vector<mx::array> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(arr(xs[i]));
  }
  return out;
}

std::optional<int> opt_int(int v) {
  if (v <= 0) {
    return std::nullopt;
  }
  return v;
}

std::string mode(const char* m) { return m == nullptr ? std::string("affine") : std::string(m); }

}  // namespace mlxs

using namespace mlxs;

extern "C" {

// ---------------------------------------------------------------- errors

const char* mlxs_last_error(void) { return last_error.c_str(); }

void mlxs_clear_error(void) { last_error.clear(); }

// ---------------------------------------------------------------- arrays

void mlxs_array_free(mlxs_array a) { delete a; }

int mlxs_array_clone(mlxs_array* out, mlxs_array a) {
  return guard([&] { put(out, arr(a)); });
}

int mlxs_array_from_data(mlxs_array* out, const void* data, size_t nbytes, const int* dims,
                         size_t ndim, int dt) {
  return guard([&] {
    auto d = dtype(dt);
    auto sh = shape(dims, ndim);
    size_t count = 1;
    for (auto s : sh) {
      if (s < 0) {
        throw std::invalid_argument("negative dimension in shape");
      }
      count *= static_cast<size_t>(s);
    }
    if (count * d.size() != nbytes) {
      throw std::invalid_argument("data has " + std::to_string(nbytes) +
                                  " bytes but the shape needs " + std::to_string(count * d.size()));
    }
    void* copy = std::malloc(nbytes == 0 ? 1 : nbytes);
    if (copy == nullptr) {
      throw std::bad_alloc();
    }
    if (nbytes > 0) {
      std::memcpy(copy, data, nbytes);
    }
    put(out, mx::array(copy, std::move(sh), d, [](void* p) { std::free(p); }));
  });
}

int mlxs_array_from_f64(mlxs_array* out, double v, int dt) {
  return guard([&] { put(out, mx::array(v, dtype(dt))); });
}

int mlxs_array_from_i64(mlxs_array* out, int64_t v, int dt) {
  return guard([&] { put(out, mx::array(v, dtype(dt))); });
}

int mlxs_array_from_bool(mlxs_array* out, bool v) {
  return guard([&] { put(out, mx::array(v)); });
}

size_t mlxs_array_ndim(mlxs_array a) { return a == nullptr ? 0 : a->a.ndim(); }

void mlxs_array_shape(mlxs_array a, int* dims, size_t cap) {
  if (a == nullptr || dims == nullptr) {
    return;
  }
  const auto& s = a->a.shape();
  for (size_t i = 0; i < s.size() && i < cap; ++i) {
    dims[i] = s[i];
  }
}

size_t mlxs_array_size(mlxs_array a) { return a == nullptr ? 0 : a->a.size(); }

size_t mlxs_array_nbytes(mlxs_array a) { return a == nullptr ? 0 : a->a.nbytes(); }

int mlxs_array_dtype(mlxs_array a) { return a == nullptr ? -1 : dtype_code(a->a.dtype()); }

int mlxs_array_read(mlxs_array a, void* out, size_t nbytes) {
  return guard([&] {
    auto x = arr(a);
    if (x.nbytes() != nbytes) {
      throw std::invalid_argument("read buffer has " + std::to_string(nbytes) +
                                  " bytes but the array has " + std::to_string(x.nbytes()));
    }
    if (nbytes == 0) {
      return;
    }
    x.eval();
    drain_at_exit();
    if (!x.flags().row_contiguous) {
      // The host reads the result, so copy on the CPU: every dtype has CPU
      // kernels (GPU backends have no float64), and the memory is shared.
      x = mx::contiguous(x, false, mx::Device(mx::Device::cpu));
      x.eval();
    }
    std::memcpy(out, x.data<char>(), nbytes);
  });
}

int mlxs_array_strides(mlxs_array a, int64_t* strides, size_t cap) {
  return guard([&] {
    auto& x = arr(a);
    x.eval();
    const auto& st = x.strides();
    for (size_t i = 0; i < st.size() && i < cap; ++i) {
      strides[i] = st[i];
    }
  });
}

bool mlxs_array_row_contiguous(mlxs_array a) {
  if (a == nullptr) {
    return false;
  }
  return a->a.flags().row_contiguous;
}

int mlxs_eval(const mlxs_array* xs, size_t n) {
  return guard([&] {
    mx::eval(arrays(xs, n));
    drain_at_exit();
  });
}

int mlxs_async_eval(const mlxs_array* xs, size_t n) {
  return guard([&] {
    mx::async_eval(arrays(xs, n));
    drain_at_exit();
  });
}

// ---------------------------------------------------------------- vectors

int mlxs_vec_new(mlxs_vec* out) {
  return guard([&] { *out = new mlxs_vec_s{}; });
}

void mlxs_vec_free(mlxs_vec v) { delete v; }

size_t mlxs_vec_len(mlxs_vec v) { return v == nullptr ? 0 : v->v.size(); }

int mlxs_vec_get(mlxs_array* out, mlxs_vec v, size_t i) {
  return guard([&] {
    if (v == nullptr || i >= v->v.size()) {
      throw std::out_of_range("vector index out of range");
    }
    put(out, v->v[i]);
  });
}

int mlxs_vec_push(mlxs_vec v, mlxs_array a) {
  return guard([&] {
    if (v == nullptr) {
      throw std::invalid_argument("null vector handle");
    }
    v->v.push_back(arr(a));
  });
}

}  // extern "C"
