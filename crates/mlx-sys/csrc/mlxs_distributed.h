// SPDX-License-Identifier: EUPL-1.2
//
// MLX's distributed layer: groups and collectives (mlxs_distributed.cpp).
//
// Part of mlxs.h, which states the ABI's rules: include that one.

#ifndef MLXS_DISTRIBUTED_H
#define MLXS_DISTRIBUTED_H

#include "mlxs_types.h"

#ifdef __cplusplus
extern "C" {
#endif

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
int mlxs_recv(mlxs_array* out, const int* shape, size_t ndim, int dtype, int src, mlxs_group g,
              int dev);
int mlxs_recv_like(mlxs_array* out, mlxs_array like, int src, mlxs_group g, int dev);

#ifdef __cplusplus
}
#endif

#endif  // MLXS_DISTRIBUTED_H
