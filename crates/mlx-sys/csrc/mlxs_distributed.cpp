// SPDX-License-Identifier: EUPL-1.2
//
// MLX's distributed layer: communication groups (ring, MPI, NCCL, JACCL) and
// the collective ops over them. No transport of our own: everything here
// forwards to mlx::core::distributed.

#include <mutex>

#include "mlx/distributed/distributed.h"
#include "mlx/distributed/ops.h"
#include "mlxs_internal.h"

namespace mxd = mlx::core::distributed;

struct mlxs_group_s {
  mxd::Group g;
};

using namespace mlxs;

namespace {

// MLX keeps its initialised groups in an unsynchronised process-wide map, so
// initialisation is serialised here.
std::mutex& init_mutex() {
  static std::mutex m;
  return m;
}

std::string backend_name(const char* backend) {
  if (backend == nullptr) {
    throw std::invalid_argument("null backend name");
  }
  return std::string(backend);
}

std::optional<mxd::Group> grp(mlxs_group g) {
  if (g == nullptr) {
    return std::nullopt;
  }
  return g->g;
}

}  // namespace

extern "C" {

int mlxs_distributed_is_available(const char* backend, bool* out) {
  return guard([&] {
    if (out == nullptr) {
      throw std::invalid_argument("null output pointer");
    }
    *out = mxd::is_available(backend_name(backend));
  });
}

int mlxs_distributed_init(mlxs_group* out, bool strict, const char* backend) {
  return guard([&] {
    if (out == nullptr) {
      throw std::invalid_argument("null output pointer");
    }
    auto name = backend_name(backend);
    std::lock_guard<std::mutex> lock(init_mutex());
    *out = new mlxs_group_s{mxd::init(strict, name)};
  });
}

void mlxs_group_free(mlxs_group g) { delete g; }

int mlxs_group_rank(mlxs_group g, int* out) {
  return guard([&] {
    if (g == nullptr || out == nullptr) {
      throw std::invalid_argument("null group handle or output pointer");
    }
    *out = g->g.rank();
  });
}

int mlxs_group_size(mlxs_group g, int* out) {
  return guard([&] {
    if (g == nullptr || out == nullptr) {
      throw std::invalid_argument("null group handle or output pointer");
    }
    *out = g->g.size();
  });
}

int mlxs_group_split(mlxs_group* out, mlxs_group g, int color, int key) {
  return guard([&] {
    if (g == nullptr || out == nullptr) {
      throw std::invalid_argument("null group handle or output pointer");
    }
    *out = new mlxs_group_s{g->g.split(color, key)};
  });
}

int mlxs_all_sum(mlxs_array* out, mlxs_array x, mlxs_group g, int dev) {
  return guard([&] { put(out, mxd::all_sum(arr(x), grp(g), sod(dev))); });
}

int mlxs_all_max(mlxs_array* out, mlxs_array x, mlxs_group g, int dev) {
  return guard([&] { put(out, mxd::all_max(arr(x), grp(g), sod(dev))); });
}

int mlxs_all_min(mlxs_array* out, mlxs_array x, mlxs_group g, int dev) {
  return guard([&] { put(out, mxd::all_min(arr(x), grp(g), sod(dev))); });
}

int mlxs_all_gather(mlxs_array* out, mlxs_array x, mlxs_group g, int dev) {
  return guard([&] { put(out, mxd::all_gather(arr(x), grp(g), sod(dev))); });
}

int mlxs_send(mlxs_array* out, mlxs_array x, int dst, mlxs_group g, int dev) {
  return guard([&] { put(out, mxd::send(arr(x), dst, grp(g), sod(dev))); });
}

int mlxs_recv(mlxs_array* out, const int* dims, size_t ndim, int dt, int src, mlxs_group g,
              int dev) {
  return guard([&] { put(out, mxd::recv(shape(dims, ndim), dtype(dt), src, grp(g), sod(dev))); });
}

int mlxs_recv_like(mlxs_array* out, mlxs_array like, int src, mlxs_group g, int dev) {
  return guard([&] { put(out, mxd::recv_like(arr(like), src, grp(g), sod(dev))); });
}

}  // extern "C"
