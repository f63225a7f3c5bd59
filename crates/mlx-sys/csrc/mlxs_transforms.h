// SPDX-License-Identifier: EUPL-1.2
//
// Closures over foreign callbacks and the transforms that take them: vjp,
// jvp, value_and_grad, checkpoint and compile, and a census of the primitives
// a graph would run (mlxs_transforms.cpp).
//
// Part of mlxs.h, which states the ABI's rules: include that one.

#ifndef MLXS_TRANSFORMS_H
#define MLXS_TRANSFORMS_H

#include "mlxs_types.h"

#ifdef __cplusplus
extern "C" {
#endif

// A callback: fills `outputs` from `inputs`. Returns 0 on success; non-zero
// means the callback failed (the Rust side keeps the error or panic).
typedef int (*mlxs_closure_fn)(void* payload, const mlxs_array* inputs, size_t n_inputs,
                               mlxs_vec outputs);
typedef void (*mlxs_payload_dtor)(void* payload);

// Takes ownership of `payload`: `dtor` runs once when the last copy of the
// closure is gone (also when this call fails).
int mlxs_closure_new(mlxs_closure* out, mlxs_closure_fn fn, void* payload, mlxs_payload_dtor dtor);
void mlxs_closure_free(mlxs_closure c);
int mlxs_closure_apply(mlxs_vec* out, mlxs_closure c, const mlxs_array* inputs, size_t n);
int mlxs_vjp(mlxs_vec* outputs, mlxs_vec* vjps, mlxs_closure c, const mlxs_array* primals,
             size_t n_primals, const mlxs_array* cotangents, size_t n_cotangents);
int mlxs_jvp(mlxs_vec* outputs, mlxs_vec* jvps, mlxs_closure c, const mlxs_array* primals,
             size_t n_primals, const mlxs_array* tangents, size_t n_tangents);
int mlxs_value_and_grad(mlxs_vag* out, mlxs_closure c, const int* argnums, size_t n);
void mlxs_vag_free(mlxs_vag f);
int mlxs_vag_apply(mlxs_vec* values, mlxs_vec* grads, mlxs_vag f, const mlxs_array* inputs,
                   size_t n);
int mlxs_checkpoint(mlxs_closure* out, mlxs_closure c);
int mlxs_compile(mlxs_closure* out, mlxs_closure c, bool shapeless);
int mlxs_set_compile_enabled(bool enabled);
// The primitives of the graph that evaluating `outputs` would run: every array
// reachable from them not yet scheduled, one count per primitive (siblings
// share theirs), as lines `NAME\tCOUNT` in name order. Free with
// mlxs_string_free.
int mlxs_graph_census(char** out, const mlxs_array* outputs, size_t n);

#ifdef __cplusplus
}
#endif

#endif  // MLXS_TRANSFORMS_H
