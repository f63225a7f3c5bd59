// SPDX-License-Identifier: EUPL-1.2
//
// Random numbers: keys, the global seed, and sampling from normal, uniform,
// categorical, Bernoulli and integer distributions.

#include "mlxs_internal.h"

using namespace mlxs;

extern "C" {

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

int mlxs_random_normal(mlxs_array* out, const int* dims, size_t ndim, int dt, float loc,
                       float scale, mlxs_array key, int dev) {
  return guard([&] {
    put(out, mx::random::normal(shape(dims, ndim), dtype(dt), mx::array(loc), mx::array(scale),
                                opt(key), sod(dev)));
  });
}

// Samples of shape `dims` between `low` and `high`: mlxs_random_uniform and
// mlxs_random_randint take the same arguments.
#define MLXS_RANDOM_RANGE(name)                                                              \
  int mlxs_random_##name(mlxs_array* out, mlxs_array low, mlxs_array high, const int* dims,  \
                         size_t ndim, int dt, mlxs_array key, int dev) {                     \
    return guard([&] {                                                                       \
      put(out, mx::random::name(arr(low), arr(high), shape(dims, ndim), dtype(dt), opt(key), \
                                sod(dev)));                                                  \
    });                                                                                      \
  }

MLXS_RANDOM_RANGE(uniform)

int mlxs_random_categorical(mlxs_array* out, mlxs_array logits, int axis, mlxs_array key, int dev) {
  return guard([&] { put(out, mx::random::categorical(arr(logits), axis, opt(key), sod(dev))); });
}

int mlxs_random_bernoulli(mlxs_array* out, mlxs_array p, const int* dims, size_t ndim,
                          mlxs_array key, int dev) {
  return guard(
      [&] { put(out, mx::random::bernoulli(arr(p), shape(dims, ndim), opt(key), sod(dev))); });
}

MLXS_RANDOM_RANGE(randint)

#undef MLXS_RANDOM_RANGE

}  // extern "C"
