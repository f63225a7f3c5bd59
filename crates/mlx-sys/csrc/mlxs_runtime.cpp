// SPDX-License-Identifier: EUPL-1.2
//
// The runtime: MLX's version, devices (availability, count, the default,
// their properties as JSON), synchronisation, and the allocator's memory
// figures and limits.

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <variant>

#include "mlxs_internal.h"

using namespace mlxs;

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

}  // namespace

extern "C" {

// ---------------------------------------------------------------- runtime

const char* mlxs_version(void) { return mx::version(); }

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
  return guard(
      [&] { *kind = mx::default_device().type == mx::Device::cpu ? MLXS_DEV_CPU : MLXS_DEV_GPU; });
}

int mlxs_set_default_device(int kind) {
  return guard([&] { mx::set_default_device(device(kind)); });
}

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

void mlxs_string_free(char* s) { std::free(s); }

int mlxs_synchronize(int kind) {
  return guard([&] {
    if (kind == MLXS_DEV_DEFAULT) {
      mx::synchronize();
    } else {
      mx::synchronize(mx::default_stream(device(kind)));
    }
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

}  // extern "C"
