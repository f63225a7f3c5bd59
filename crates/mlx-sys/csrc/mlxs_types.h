// SPDX-License-Identifier: EUPL-1.2
//
// The handles of the mlxs C ABI and the codes its calls take: dtypes,
// devices and the op codes of the generic unary, binary, reduction and scan
// calls.
//
// Part of mlxs.h, which states the ABI's rules: include that one.

#ifndef MLXS_TYPES_H
#define MLXS_TYPES_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// ---------------------------------------------------------------- handles

typedef struct mlxs_array_s* mlxs_array;
typedef struct mlxs_vec_s* mlxs_vec;
typedef struct mlxs_named_s* mlxs_named;
typedef struct mlxs_closure_s* mlxs_closure;
typedef struct mlxs_vag_s* mlxs_vag;
typedef struct mlxs_group_s* mlxs_group;

// ---------------------------------------------------------------- enums

enum mlxs_dtype {
  MLXS_BOOL = 0,
  MLXS_UINT8 = 1,
  MLXS_UINT16 = 2,
  MLXS_UINT32 = 3,
  MLXS_UINT64 = 4,
  MLXS_INT8 = 5,
  MLXS_INT16 = 6,
  MLXS_INT32 = 7,
  MLXS_INT64 = 8,
  MLXS_FLOAT16 = 9,
  MLXS_FLOAT32 = 10,
  MLXS_FLOAT64 = 11,
  MLXS_BFLOAT16 = 12,
  MLXS_COMPLEX64 = 13,
};

enum mlxs_device_kind {
  MLXS_DEV_DEFAULT = -1,
  MLXS_DEV_CPU = 0,
  MLXS_DEV_GPU = 1,
};

enum mlxs_unary_op {
  MLXS_ABS = 0,
  MLXS_NEGATIVE,
  MLXS_SIGN,
  MLXS_EXP,
  MLXS_LOG,
  MLXS_LOG1P,
  MLXS_SQRT,
  MLXS_RSQRT,
  MLXS_RECIPROCAL,
  MLXS_SQUARE,
  MLXS_SIN,
  MLXS_COS,
  MLXS_TANH,
  MLXS_SIGMOID,
  MLXS_ERF,
  MLXS_FLOOR,
  MLXS_CEIL,
  MLXS_ROUND,
  MLXS_LOGICAL_NOT,
  MLXS_ISNAN,
  MLXS_ISINF,
  MLXS_STOP_GRADIENT,
  MLXS_COPY,
  MLXS_ZEROS_LIKE,
  MLXS_ONES_LIKE,
  MLXS_CONTIGUOUS,
};

enum mlxs_binary_op {
  MLXS_ADD = 0,
  MLXS_SUBTRACT,
  MLXS_MULTIPLY,
  MLXS_DIVIDE,
  MLXS_REMAINDER,
  MLXS_POWER,
  MLXS_MAXIMUM,
  MLXS_MINIMUM,
  MLXS_EQUAL,
  MLXS_NOT_EQUAL,
  MLXS_GREATER,
  MLXS_GREATER_EQUAL,
  MLXS_LESS,
  MLXS_LESS_EQUAL,
  MLXS_LOGICAL_AND,
  MLXS_LOGICAL_OR,
  MLXS_MATMUL,
  MLXS_LOGADDEXP,
  MLXS_FLOOR_DIVIDE,
};

enum mlxs_reduce_op {
  MLXS_SUM = 0,
  MLXS_MEAN,
  MLXS_MAX,
  MLXS_MIN,
  MLXS_PROD,
  MLXS_ALL,
  MLXS_ANY,
  MLXS_LOGSUMEXP,
  MLXS_VAR,
  MLXS_STD,
};

enum mlxs_scan_op {
  MLXS_CUMSUM = 0,
  MLXS_CUMPROD,
  MLXS_CUMMAX,
  MLXS_CUMMIN,
  MLXS_LOGCUMSUMEXP,
};

#endif  // MLXS_TYPES_H
