// SPDX-License-Identifier: EUPL-1.2
//
// mlxs: the project's thin C ABI over MLX C++.
//
// Rules (see docs/architecture.md):
// - Handles are opaque pointers; each `*_new`/op output is released with the
//   matching `*_free`.
// - Outputs go through the first pointer arguments; every call that can fail
//   returns an int status: 0 on success, non-zero on failure.
// - No C++ exception crosses this boundary. On failure the message is stored
//   per thread and read with `mlxs_last_error`.
// - `dev` arguments select where an op runs: MLXS_DEV_DEFAULT (MLX's default
//   device), MLXS_DEV_CPU or MLXS_DEV_GPU.
//
// The declarations are split by topic into the headers included below, in
// this order. After editing any of them run `cargo xtask bindgen` and commit
// the result: the bindings record the hash of this header and of those it
// includes, in the order of the includes.

#ifndef MLXS_H
#define MLXS_H

#include "mlxs_types.h"
#include "mlxs_core.h"
#include "mlxs_ops.h"
#include "mlxs_index.h"
#include "mlxs_quant.h"
#include "mlxs_fast.h"
#include "mlxs_random.h"
#include "mlxs_memory.h"
#include "mlxs_transforms.h"
#include "mlxs_distributed.h"

#endif  // MLXS_H
