// SPDX-License-Identifier: EUPL-1.2
//
// The allocator's memory figures and limits (mlxs_runtime.cpp).
//
// Part of mlxs.h, which states the ABI's rules: include that one.

#ifndef MLXS_MEMORY_H
#define MLXS_MEMORY_H

#include "mlxs_types.h"

#ifdef __cplusplus
extern "C" {
#endif

int mlxs_get_active_memory(size_t* out);
int mlxs_get_peak_memory(size_t* out);
int mlxs_get_cache_memory(size_t* out);
int mlxs_reset_peak_memory(void);
int mlxs_clear_cache(void);
int mlxs_set_memory_limit(size_t limit, size_t* previous);
int mlxs_get_memory_limit(size_t* out);
int mlxs_set_cache_limit(size_t limit, size_t* previous);
int mlxs_set_wired_limit(size_t limit, size_t* previous);

#ifdef __cplusplus
}
#endif

#endif  // MLXS_MEMORY_H
