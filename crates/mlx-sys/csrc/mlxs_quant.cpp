// SPDX-License-Identifier: EUPL-1.2
//
// Affine quantisation: quantize, dequantize, the quantised matmul (with our
// own kernel for decode steps on CUDA, see mlxs_kernels.cpp) and the
// gathered matmuls of mixture-of-experts routing.

#include "mlxs_internal.h"

using namespace mlxs;

namespace {

// MLX's CUDA quantised matmul treats x [B, L, K] against one weight matrix
// as B separate products of L rows, each reading the whole matrix: a decode
// batch (L = 1) pays B times the weights (MLX issue #4265). The same rows as
// one [B * L, K] product read them once. Off with the custom kernels
// (MLXR_CUSTOM_KERNELS=0: MLX as it is).
std::optional<mx::array> collapsed_rows(const mx::array& x, const mx::array& w,
                                        const mx::array& scales,
                                        const std::optional<mx::array>& biases, bool transpose,
                                        std::optional<int> group_size, std::optional<int> bits,
                                        const std::string& mode, mx::StreamOrDevice s) {
  if (x.ndim() < 3 || w.ndim() != 2 || !cuda_routes_on(s)) {
    return std::nullopt;
  }
  auto x2 = mx::reshape(x, {-1, x.shape(-1)}, s);
  auto y = mx::quantized_matmul(x2, w, scales, biases, transpose, group_size, bits, mode, s);
  auto shape = x.shape();
  shape.back() = y.shape(-1);
  return mx::reshape(y, shape, s);
}

// A batched w on CUDA: the keys or values of a quantised KV cache, a slice
// of the cache's buffer with as many rows as the context. MLX 0.32.4's CUDA
// quantised matmul takes w, scales and biases only when each is contiguous
// as a whole (its checks read flags().contiguous: "No implementation for
// problem shape" otherwise, and mlx-lm's quantised cache fails so), and for
// these shapes (N, the context, rarely a multiple of 128; 8 or more rows of
// x over the batch) it has only its naive kernel: on an H100, Llama-3.1-8B
// with an 8-bit cache decoded 10 tokens a second after a 1,980-token prompt
// (the 16-bit cache: 190). So there the slice is dequantised (one
// elementwise kernel, into x's dtype; a transient of the slice's size) and
// multiplied by MLX's dense matmul. Only on CUDA, whatever the custom-kernel
// switch says: elsewhere MLX's quantised kernels take strided operands as
// they are.
std::optional<mx::array> cuda_dequantized(const mx::array& x, const mx::array& w,
                                          const mx::array& scales,
                                          const std::optional<mx::array>& biases, bool transpose,
                                          std::optional<int> group_size, std::optional<int> bits,
                                          const std::string& mode, mx::StreamOrDevice s) {
  if (w.ndim() <= 2 || !cuda_stream(s) || !mx::issubdtype(x.dtype(), mx::floating)) {
    return std::nullopt;
  }
  auto dense =
      mx::dequantize(w, scales, biases, group_size, bits, mode, std::nullopt, x.dtype(), s);
  return mx::matmul(x, transpose ? mx::swapaxes(dense, -1, -2, s) : dense, s);
}

}  // namespace

extern "C" {

int mlxs_quantize(mlxs_vec* out, mlxs_array w, int group_size, int bits, const char* m, int dev) {
  return guard([&] {
    put_vec(out, mx::quantize(arr(w), opt_int(group_size), opt_int(bits), mode(m), std::nullopt,
                              sod(dev)));
  });
}

int mlxs_dequantize(mlxs_array* out, mlxs_array w, mlxs_array scales, mlxs_array biases,
                    int group_size, int bits, const char* m, int out_dtype, int dev) {
  return guard([&] {
    std::optional<mx::Dtype> dt;
    if (out_dtype >= 0) {
      dt = dtype(out_dtype);
    }
    put(out, mx::dequantize(arr(w), arr(scales), opt(biases), opt_int(group_size), opt_int(bits),
                            mode(m), std::nullopt, dt, sod(dev)));
  });
}

int mlxs_quantized_matmul(mlxs_array* out, mlxs_array x, mlxs_array w, mlxs_array scales,
                          mlxs_array biases, bool transpose, int group_size, int bits,
                          const char* m, int dev) {
  return guard([&] {
    auto& xs = arr(x);
    auto& ws = arr(w);
    auto& ss = arr(scales);
    auto bs = opt(biases);
    auto gs = opt_int(group_size);
    auto nb = opt_int(bits);
    auto md = mode(m);
    auto s = sod(dev);
    if (auto y = try_fast_qmv(xs, ws, ss, bs, transpose, gs, nb, md, s)) {
      put(out, std::move(*y));
      return;
    }
    if (auto y = collapsed_rows(xs, ws, ss, bs, transpose, gs, nb, md, s)) {
      put(out, std::move(*y));
      return;
    }
    if (auto y = cuda_dequantized(xs, ws, ss, bs, transpose, gs, nb, md, s)) {
      put(out, std::move(*y));
      return;
    }
    put(out, mx::quantized_matmul(xs, ws, ss, bs, transpose, gs, nb, md, s));
  });
}

int mlxs_gather_mm(mlxs_array* out, mlxs_array a, mlxs_array b, mlxs_array lhs_indices,
                   mlxs_array rhs_indices, bool sorted_indices, int dev) {
  return guard([&] {
    auto& x = arr(a);
    auto& y = arr(b);
    auto lhs = safe_batch_indices("gather_mm", opt(lhs_indices), x, sod(dev));
    auto rhs = safe_batch_indices("gather_mm", opt(rhs_indices), y, sod(dev));
    put(out, mx::gather_mm(x, y, lhs, rhs, sorted_indices, sod(dev)));
  });
}

int mlxs_gather_qmm(mlxs_array* out, mlxs_array x, mlxs_array w, mlxs_array scales,
                    mlxs_array biases, mlxs_array lhs_indices, mlxs_array rhs_indices,
                    bool transpose, int group_size, int bits, const char* m, bool sorted_indices,
                    int dev) {
  return guard([&] {
    auto& xs = arr(x);
    auto& ws = arr(w);
    auto lhs = safe_batch_indices("gather_qmm", opt(lhs_indices), xs, sod(dev));
    auto rhs = safe_batch_indices("gather_qmm", opt(rhs_indices), ws, sod(dev));
    put(out,
        mx::gather_qmm(xs, ws, arr(scales), opt(biases), lhs, rhs, transpose, opt_int(group_size),
                       opt_int(bits), mode(m), std::nullopt, sorted_indices, sod(dev)));
  });
}

}  // extern "C"
