// SPDX-License-Identifier: EUPL-1.2
//
// Errors, runtime, arrays, vectors, named maps, safetensors, memory and
// random numbers.

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <future>
#include <memory>
#include <mutex>
#include <sstream>

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
}

namespace mlxs {

void set_error(const char* msg) {
  last_error = msg == nullptr ? "" : msg;
}

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

std::string mode(const char* m) {
  return m == nullptr ? std::string("affine") : std::string(m);
}

} // namespace mlxs

using namespace mlxs;

extern "C" {

// ---------------------------------------------------------------- errors

const char* mlxs_last_error(void) {
  return last_error.c_str();
}

void mlxs_clear_error(void) {
  last_error.clear();
}

// ---------------------------------------------------------------- runtime

const char* mlxs_version(void) {
  return mx::version();
}

int mlxs_device_available(int kind, bool* out) {
  return guard([&] { *out = mx::is_available(device(kind)); });
}

int mlxs_device_count(int kind, int* out) {
  return guard([&] {
    auto d = device(kind);
    *out = mx::device_count(d.type);
  });
}

int mlxs_default_device(int* kind) {
  return guard([&] {
    *kind = mx::default_device().type == mx::Device::cpu ? MLXS_DEV_CPU
                                                          : MLXS_DEV_GPU;
  });
}

int mlxs_set_default_device(int kind) {
  return guard([&] { mx::set_default_device(device(kind)); });
}

namespace {
std::string json_escape(const std::string& s) {
  std::ostringstream o;
  for (unsigned char c : s) {
    switch (c) {
      case '"': o << "\\\""; break;
      case '\\': o << "\\\\"; break;
      case '\n': o << "\\n"; break;
      case '\r': o << "\\r"; break;
      case '\t': o << "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          o << buf;
        } else {
          o << c;
        }
    }
  }
  return o.str();
}
} // namespace

int mlxs_device_info_json(int kind, char** out) {
  return guard([&] {
    const auto& info = mx::device_info(device(kind));
    std::ostringstream o;
    o << "{";
    bool first = true;
    for (const auto& [k, v] : info) {
      if (!first) {
        o << ",";
      }
      first = false;
      o << "\"" << json_escape(k) << "\":";
      if (std::holds_alternative<std::string>(v)) {
        o << "\"" << json_escape(std::get<std::string>(v)) << "\"";
      } else {
        o << std::get<size_t>(v);
      }
    }
    o << "}";
    *out = strdup(o.str().c_str());
  });
}

void mlxs_string_free(char* s) {
  std::free(s);
}

int mlxs_synchronize(int kind) {
  return guard([&] {
    if (kind == MLXS_DEV_DEFAULT) {
      mx::synchronize();
    } else {
      mx::synchronize(mx::default_stream(device(kind)));
    }
  });
}

// ---------------------------------------------------------------- arrays

void mlxs_array_free(mlxs_array a) {
  delete a;
}

int mlxs_array_clone(mlxs_array* out, mlxs_array a) {
  return guard([&] { put(out, arr(a)); });
}

int mlxs_array_from_data(
    mlxs_array* out,
    const void* data,
    size_t nbytes,
    const int* dims,
    size_t ndim,
    int dt) {
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
      throw std::invalid_argument(
          "data has " + std::to_string(nbytes) + " bytes but the shape needs " +
          std::to_string(count * d.size()));
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

size_t mlxs_array_ndim(mlxs_array a) {
  return a == nullptr ? 0 : a->a.ndim();
}

void mlxs_array_shape(mlxs_array a, int* dims, size_t cap) {
  if (a == nullptr || dims == nullptr) {
    return;
  }
  const auto& s = a->a.shape();
  for (size_t i = 0; i < s.size() && i < cap; ++i) {
    dims[i] = s[i];
  }
}

size_t mlxs_array_size(mlxs_array a) {
  return a == nullptr ? 0 : a->a.size();
}

size_t mlxs_array_nbytes(mlxs_array a) {
  return a == nullptr ? 0 : a->a.nbytes();
}

int mlxs_array_dtype(mlxs_array a) {
  return a == nullptr ? -1 : dtype_code(a->a.dtype());
}

int mlxs_array_read(mlxs_array a, void* out, size_t nbytes) {
  return guard([&] {
    auto x = arr(a);
    if (x.nbytes() != nbytes) {
      throw std::invalid_argument(
          "read buffer has " + std::to_string(nbytes) +
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

void mlxs_vec_free(mlxs_vec v) {
  delete v;
}

size_t mlxs_vec_len(mlxs_vec v) {
  return v == nullptr ? 0 : v->v.size();
}

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

// ---------------------------------------------------------------- named maps

int mlxs_named_new(mlxs_named* out) {
  return guard([&] { *out = new mlxs_named_s{}; });
}

void mlxs_named_free(mlxs_named m) {
  delete m;
}

size_t mlxs_named_len(mlxs_named m) {
  return m == nullptr ? 0 : m->arrays.size();
}

const char* mlxs_named_key(mlxs_named m, size_t i) {
  if (m == nullptr || i >= m->arrays.size()) {
    return nullptr;
  }
  return m->arrays[i].first.c_str();
}

int mlxs_named_get(mlxs_array* out, mlxs_named m, size_t i) {
  return guard([&] {
    if (m == nullptr || i >= m->arrays.size()) {
      throw std::out_of_range("named array index out of range");
    }
    put(out, m->arrays[i].second);
  });
}

int mlxs_named_push(mlxs_named m, const char* key, mlxs_array a) {
  return guard([&] {
    if (m == nullptr || key == nullptr) {
      throw std::invalid_argument("null named map or key");
    }
    m->arrays.emplace_back(key, arr(a));
  });
}

size_t mlxs_named_meta_len(mlxs_named m) {
  return m == nullptr ? 0 : m->meta.size();
}

const char* mlxs_named_meta_key(mlxs_named m, size_t i) {
  if (m == nullptr || i >= m->meta.size()) {
    return nullptr;
  }
  return m->meta[i].first.c_str();
}

const char* mlxs_named_meta_value(mlxs_named m, size_t i) {
  if (m == nullptr || i >= m->meta.size()) {
    return nullptr;
  }
  return m->meta[i].second.c_str();
}

int mlxs_named_push_meta(mlxs_named m, const char* key, const char* value) {
  return guard([&] {
    if (m == nullptr || key == nullptr || value == nullptr) {
      throw std::invalid_argument("null named map, key or value");
    }
    m->meta.emplace_back(key, value);
  });
}

int mlxs_load_safetensors(mlxs_named* out, const char* path) {
  return guard([&] {
    if (path == nullptr) {
      throw std::invalid_argument("null path");
    }
    auto [tensors, meta] = mx::load_safetensors(std::string(path));
    auto* m = new mlxs_named_s{};
    m->arrays.reserve(tensors.size());
    for (auto& [k, v] : tensors) {
      m->arrays.emplace_back(k, v);
    }
    std::sort(m->arrays.begin(), m->arrays.end(), [](auto& x, auto& y) {
      return x.first < y.first;
    });
    for (auto& [k, v] : meta) {
      m->meta.emplace_back(k, v);
    }
    std::sort(m->meta.begin(), m->meta.end());
    *out = m;
  });
}

int mlxs_save_safetensors(const char* path, mlxs_named m) {
  return guard([&] {
    if (path == nullptr || m == nullptr) {
      throw std::invalid_argument("null path or named map");
    }
    std::unordered_map<std::string, mx::array> tensors;
    for (auto& [k, v] : m->arrays) {
      if (!tensors.emplace(k, v).second) {
        throw std::invalid_argument("duplicate tensor name " + k);
      }
    }
    std::unordered_map<std::string, std::string> meta(
        m->meta.begin(), m->meta.end());
    mx::save_safetensors(std::string(path), std::move(tensors), std::move(meta));
  });
}

// ---------------------------------------------------------------- memory

int mlxs_get_active_memory(size_t* out) {
  return guard([&] { *out = mx::get_active_memory(); });
}

int mlxs_get_peak_memory(size_t* out) {
  return guard([&] { *out = mx::get_peak_memory(); });
}

int mlxs_get_cache_memory(size_t* out) {
  return guard([&] { *out = mx::get_cache_memory(); });
}

int mlxs_reset_peak_memory(void) {
  return guard([&] { mx::reset_peak_memory(); });
}

int mlxs_clear_cache(void) {
  return guard([&] { mx::clear_cache(); });
}

int mlxs_set_memory_limit(size_t limit, size_t* previous) {
  return guard([&] { *previous = mx::set_memory_limit(limit); });
}

int mlxs_get_memory_limit(size_t* out) {
  return guard([&] { *out = mx::get_memory_limit(); });
}

int mlxs_set_cache_limit(size_t limit, size_t* previous) {
  return guard([&] { *previous = mx::set_cache_limit(limit); });
}

int mlxs_set_wired_limit(size_t limit, size_t* previous) {
  return guard([&] { *previous = mx::set_wired_limit(limit); });
}

// ---------------------------------------------------------------- random

int mlxs_random_key(mlxs_array* out, uint64_t seed) {
  return guard([&] { put(out, mx::random::key(seed)); });
}

int mlxs_random_seed(uint64_t seed) {
  return guard([&] { mx::random::seed(seed); });
}

int mlxs_random_split(mlxs_array* out, mlxs_array key, int num, int dev) {
  return guard([&] { put(out, mx::random::split(arr(key), num, sod(dev))); });
}

int mlxs_random_normal(
    mlxs_array* out,
    const int* dims,
    size_t ndim,
    int dt,
    float loc,
    float scale,
    mlxs_array key,
    int dev) {
  return guard([&] {
    put(out,
        mx::random::normal(
            shape(dims, ndim),
            dtype(dt),
            mx::array(loc),
            mx::array(scale),
            opt(key),
            sod(dev)));
  });
}

int mlxs_random_uniform(
    mlxs_array* out,
    mlxs_array low,
    mlxs_array high,
    const int* dims,
    size_t ndim,
    int dt,
    mlxs_array key,
    int dev) {
  return guard([&] {
    put(out,
        mx::random::uniform(
            arr(low), arr(high), shape(dims, ndim), dtype(dt), opt(key), sod(dev)));
  });
}

int mlxs_random_categorical(
    mlxs_array* out,
    mlxs_array logits,
    int axis,
    mlxs_array key,
    int dev) {
  return guard([&] {
    put(out, mx::random::categorical(arr(logits), axis, opt(key), sod(dev)));
  });
}

int mlxs_random_bernoulli(
    mlxs_array* out,
    mlxs_array p,
    const int* dims,
    size_t ndim,
    mlxs_array key,
    int dev) {
  return guard([&] {
    put(out, mx::random::bernoulli(arr(p), shape(dims, ndim), opt(key), sod(dev)));
  });
}

int mlxs_random_randint(
    mlxs_array* out,
    mlxs_array low,
    mlxs_array high,
    const int* dims,
    size_t ndim,
    int dt,
    mlxs_array key,
    int dev) {
  return guard([&] {
    put(out,
        mx::random::randint(
            arr(low), arr(high), shape(dims, ndim), dtype(dt), opt(key), sod(dev)));
  });
}

} // extern "C"
