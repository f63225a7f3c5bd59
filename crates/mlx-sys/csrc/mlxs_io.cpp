// SPDX-License-Identifier: EUPL-1.2
//
// Named maps (tensors by name, with string metadata) and safetensors files
// loaded into and saved from them.

#include <algorithm>
#include <unordered_map>

#include "mlxs_internal.h"

using namespace mlxs;

namespace {

// The `i`th entry of one of `m`'s lists (`&mlxs_named_s::arrays` or
// `&mlxs_named_s::meta`), or nullptr when `m` is null or `i` out of range.
template <class Entries>
const typename Entries::value_type* nth(mlxs_named m, Entries mlxs_named_s::* list, size_t i) {
  if (m == nullptr || i >= (m->*list).size()) {
    return nullptr;
  }
  return &(m->*list)[i];
}

}  // namespace

extern "C" {

// ---------------------------------------------------------------- named maps

int mlxs_named_new(mlxs_named* out) {
  return guard([&] { *out = new mlxs_named_s{}; });
}

void mlxs_named_free(mlxs_named m) { delete m; }

size_t mlxs_named_len(mlxs_named m) { return m == nullptr ? 0 : m->arrays.size(); }

const char* mlxs_named_key(mlxs_named m, size_t i) {
  auto* entry = nth(m, &mlxs_named_s::arrays, i);
  return entry == nullptr ? nullptr : entry->first.c_str();
}

int mlxs_named_get(mlxs_array* out, mlxs_named m, size_t i) {
  return guard([&] {
    auto* entry = nth(m, &mlxs_named_s::arrays, i);
    if (entry == nullptr) {
      throw std::out_of_range("named array index out of range");
    }
    put(out, entry->second);
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

size_t mlxs_named_meta_len(mlxs_named m) { return m == nullptr ? 0 : m->meta.size(); }

const char* mlxs_named_meta_key(mlxs_named m, size_t i) {
  auto* entry = nth(m, &mlxs_named_s::meta, i);
  return entry == nullptr ? nullptr : entry->first.c_str();
}

const char* mlxs_named_meta_value(mlxs_named m, size_t i) {
  auto* entry = nth(m, &mlxs_named_s::meta, i);
  return entry == nullptr ? nullptr : entry->second.c_str();
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
    std::sort(m->arrays.begin(), m->arrays.end(),
              [](auto& x, auto& y) { return x.first < y.first; });
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
    std::unordered_map<std::string, std::string> meta(m->meta.begin(), m->meta.end());
    mx::save_safetensors(std::string(path), std::move(tensors), std::move(meta));
  });
}

}  // extern "C"
