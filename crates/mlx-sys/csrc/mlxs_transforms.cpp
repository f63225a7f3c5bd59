// SPDX-License-Identifier: EUPL-1.2
//
// Closures over foreign callbacks, and the transforms that take them:
// vjp, jvp, value_and_grad, checkpoint and compile; and a census of the
// primitives a graph would run.

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <sstream>
#include <unordered_set>

#include "mlx/primitives.h"
#include "mlxs_internal.h"

using Fn = std::function<std::vector<mx::array>(const std::vector<mx::array>&)>;
using VagFn = mx::ValueAndGradFn;

struct mlxs_closure_s {
  Fn f;
};
struct mlxs_vag_s {
  VagFn f;
};

using namespace mlxs;

namespace {

Fn& fn(mlxs_closure c) {
  if (c == nullptr) {
    throw std::invalid_argument("null closure handle");
  }
  return c->f;
}

// The payload is shared by every copy of the std::function (MLX copies
// functions freely); the destructor runs when the last copy is gone.
Fn make_fn(mlxs_closure_fn cb, void* payload, mlxs_payload_dtor dtor) {
  std::shared_ptr<void> owner(payload, [dtor](void* p) {
    if (dtor != nullptr) {
      dtor(p);
    }
  });
  return [cb, owner](const std::vector<mx::array>& inputs) {
    std::vector<mlxs_array_s> boxed;
    boxed.reserve(inputs.size());
    for (const auto& a : inputs) {
      boxed.push_back(mlxs_array_s{a});
    }
    std::vector<mlxs_array> handles;
    handles.reserve(boxed.size());
    for (auto& b : boxed) {
      handles.push_back(&b);
    }
    mlxs_vec_s outputs;
    int rc = cb(owner.get(), handles.data(), handles.size(), &outputs);
    if (rc != 0) {
      throw std::runtime_error("callback failed");
    }
    return std::move(outputs.v);
  };
}

}  // namespace

extern "C" {

int mlxs_closure_new(mlxs_closure* out, mlxs_closure_fn cb, void* payload, mlxs_payload_dtor dtor) {
  if (out == nullptr || cb == nullptr) {
    if (dtor != nullptr) {
      dtor(payload);
    }
    set_error("null closure output or callback");
    return 1;
  }
  return guard([&] { *out = new mlxs_closure_s{make_fn(cb, payload, dtor)}; });
}

void mlxs_closure_free(mlxs_closure c) { delete c; }

int mlxs_closure_apply(mlxs_vec* out, mlxs_closure c, const mlxs_array* inputs, size_t n) {
  return guard([&] { put_vec(out, fn(c)(arrays(inputs, n))); });
}

// The outputs of a closure at the primals and its vector product with the
// cotangents (vjp) or tangents (jvp): mlxs_vjp and mlxs_jvp take the same
// arguments.
#define MLXS_VECTOR_PRODUCT(name)                                                         \
  int mlxs_##name(mlxs_vec* outputs, mlxs_vec* products, mlxs_closure c,                  \
                  const mlxs_array* primals, size_t n_primals, const mlxs_array* vectors, \
                  size_t n_vectors) {                                                     \
    return guard([&] {                                                                    \
      auto [outs, prods] =                                                                \
          mx::name(fn(c), arrays(primals, n_primals), arrays(vectors, n_vectors));        \
      put_vec(outputs, std::move(outs));                                                  \
      put_vec(products, std::move(prods));                                                \
    });                                                                                   \
  }

MLXS_VECTOR_PRODUCT(vjp)
MLXS_VECTOR_PRODUCT(jvp)

#undef MLXS_VECTOR_PRODUCT

int mlxs_value_and_grad(mlxs_vag* out, mlxs_closure c, const int* argnums, size_t n) {
  return guard([&] {
    auto nums = ints(argnums, n);
    if (nums.empty()) {
      nums.push_back(0);
    }
    *out = new mlxs_vag_s{mx::value_and_grad(fn(c), nums)};
  });
}

void mlxs_vag_free(mlxs_vag f) { delete f; }

int mlxs_vag_apply(mlxs_vec* values, mlxs_vec* grads, mlxs_vag f, const mlxs_array* inputs,
                   size_t n) {
  return guard([&] {
    if (f == nullptr) {
      throw std::invalid_argument("null value_and_grad handle");
    }
    auto [vals, gs] = f->f(arrays(inputs, n));
    put_vec(values, std::move(vals));
    put_vec(grads, std::move(gs));
  });
}

int mlxs_checkpoint(mlxs_closure* out, mlxs_closure c) {
  return guard([&] { *out = new mlxs_closure_s{mx::checkpoint(fn(c))}; });
}

int mlxs_compile(mlxs_closure* out, mlxs_closure c, bool shapeless) {
  return guard([&] { *out = new mlxs_closure_s{mx::compile(fn(c), shapeless)}; });
}

int mlxs_set_compile_enabled(bool enabled) {
  return guard([&] {
    if (enabled) {
      mx::enable_compile();
    } else {
      mx::disable_compile();
    }
  });
}

int mlxs_graph_census(char** out, const mlxs_array* outputs, size_t n) {
  return guard([&] {
    std::unordered_set<std::uintptr_t> seen;
    std::map<std::string, size_t> counts;
    std::vector<mx::array> todo = arrays(outputs, n);
    while (!todo.empty()) {
      mx::array a = std::move(todo.back());
      todo.pop_back();
      if (!seen.insert(a.id()).second || !a.has_primitive() ||
          a.status() != mx::array::Status::unscheduled) {
        continue;
      }
      for (const auto& s : a.siblings()) {
        seen.insert(s.id());
      }
      counts[a.primitive().name()] += 1;
      for (const auto& in : a.inputs()) {
        todo.push_back(in);
      }
    }
    std::ostringstream o;
    for (const auto& [name, count] : counts) {
      o << name << '\t' << count << '\n';
    }
    *out = strdup(o.str().c_str());
  });
}

}  // extern "C"
