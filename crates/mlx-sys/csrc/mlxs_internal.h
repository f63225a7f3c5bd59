// SPDX-License-Identifier: EUPL-1.2
//
// Helpers shared by the mlxs translation units. Not part of the C ABI.

#pragma once

#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "mlx/mlx.h"
#include "mlxs.h"

namespace mx = mlx::core;

struct mlxs_array_s {
  mx::array a;
};
struct mlxs_vec_s {
  std::vector<mx::array> v;
};
struct mlxs_named_s {
  std::vector<std::pair<std::string, mx::array>> arrays;
  std::vector<std::pair<std::string, std::string>> meta;
};

namespace mlxs {

void set_error(const char* msg);

// Runs `body` and converts any C++ exception into a status and a stored
// message. Nothing escapes.
template <typename F>
int guard(F&& body) noexcept {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    set_error(e.what());
  } catch (...) {
    set_error("unknown C++ exception");
  }
  return 1;
}

inline mx::array& arr(mlxs_array a) {
  if (a == nullptr) {
    throw std::invalid_argument("null array handle");
  }
  return a->a;
}

inline std::optional<mx::array> opt(mlxs_array a) {
  if (a == nullptr) {
    return std::nullopt;
  }
  return a->a;
}

inline mlxs_array wrap(mx::array a) { return new mlxs_array_s{std::move(a)}; }

inline void put(mlxs_array* out, mx::array a) {
  if (out == nullptr) {
    throw std::invalid_argument("null output pointer");
  }
  *out = wrap(std::move(a));
}

inline mlxs_vec wrap_vec(std::vector<mx::array> v) { return new mlxs_vec_s{std::move(v)}; }

inline void put_vec(mlxs_vec* out, std::vector<mx::array> v) {
  if (out == nullptr) {
    throw std::invalid_argument("null output pointer");
  }
  *out = wrap_vec(std::move(v));
}

mx::Dtype dtype(int d);
int dtype_code(mx::Dtype d);
mx::Device device(int kind);
mx::StreamOrDevice sod(int kind);
mx::Shape shape(const int* dims, size_t ndim);
std::vector<int> ints(const int* xs, size_t n);
std::vector<mx::array> arrays(const mlxs_array* xs, size_t n);
std::optional<int> opt_int(int v);
std::string mode(const char* m);

// Batch indices of a gathered matmul (gather_mm, gather_qmm) into the batch
// of matrices of `x` ([..., M, N]), each clamped into it as every gather
// index is (see mlxs_index.cpp): MLX does not bounds-check them.
std::optional<mx::array> safe_batch_indices(const char* op, const std::optional<mx::array>& idx,
                                            const mx::array& x, mx::StreamOrDevice s);

// Whether `s` is a stream of a CUDA GPU.
bool cuda_stream(mx::StreamOrDevice s);

// Whether our CUDA-only routes (our kernels, and the reshaped calls into
// MLX in mlxs_quant.cpp and mlxs_fast.cpp) may run on `s`: a CUDA GPU stream
// and custom kernels not off (MLXR_CUSTOM_KERNELS=0: MLX as it is).
bool cuda_routes_on(mx::StreamOrDevice s);

// Whether our CPU primitives for MLX's fast ops (mlxs_cpu_fast.cpp) may run on
// `s`: a CPU stream and custom kernels not off.
bool cpu_routes_on(mx::StreamOrDevice s);

// Where each row of `a` (each index over all axes but the last) starts, in
// elements from its data pointer, and the step along a row: any strides, so
// our CPU primitives read a transposed or sliced input where it lies (libmlx
// exports no copy for an eval to call). mlxs_cpu_fast.cpp.
struct RowStarts {
  std::vector<int64_t> start;
  int64_t step = 1;
};
RowStarts row_starts(const mx::array& a);

// fast::rms_norm and fast::rope, as one node each on a CPU stream where our
// primitives take the inputs (float32; mlxs_cpu_fast.cpp), else MLX's.
mx::array rms_norm(const mx::array& x, const std::optional<mx::array>& weight, float eps,
                   mx::StreamOrDevice s);
mx::array rope(const mx::array& x, int dims, bool traditional, std::optional<float> base,
               float scale, const mx::array& offset, const std::optional<mx::array>& freqs,
               mx::StreamOrDevice s);

struct KernelSpec;

// One call of our kernel `spec` (its header `header`; mlxs_kernels.cpp).
std::vector<mx::array> launch_all(const mx::fast::CustomKernelFunction& mlx_kernel,
                                  const KernelSpec& spec, const char* header,
                                  const std::vector<mx::array>& inputs,
                                  const std::vector<mx::Shape>& shapes,
                                  const std::vector<mx::fast::ScalarArg>& scalars,
                                  std::tuple<int, int, int> grid, std::tuple<int, int, int> block,
                                  const mx::Stream& stream);

// The header of the 4-bit product kernels (QmvPair, qmv_row), and their
// instantiations for dtype `t`, K = `k` and `group`: one row of x (K split
// over `ksplit` warps, 1 or 2), and 2 to 32 rows in `mt` tiles of 8 with K
// split over `ksplit` warps (mlxs_kernels.cpp).
const char* qmv_header();
KernelSpec qmv_spec(mx::Dtype t, int k, int group, int ksplit);
// Rows at least this long take two warps each in the one-row kernel (KSPLIT
// 2): Llama-3.1-8B's down projection (K = 14,336) has 4,096 rows, a seventh of
// gate/up's warps, and on an H100 reads at half their rate
// (docs/benchmarks.md). Custom kernels ALWAYS only, until measured on a GPU.
constexpr int kQmvSplitMinK = 8192;
KernelSpec qmm_rows_spec(mx::Dtype t, int k, int group, int mt, int ksplit);

// The fused norm's instantiation for dtype `t`, rows of `d`, the norms taken
// and `eps` (mlxs_norm_kernel.cpp).
KernelSpec norm_add_spec(mx::Dtype t, int d, bool norm_r, bool norm_h, float eps);

// The fused norm's threads a row of `d` values: one 16-byte vector (or fewer
// values where d is not a multiple of 8) each, a whole number of warps, at
// most 1,024 (mlxs_norm_kernel.cpp).
int norm_add_threads(int d);

// Attention for one query position (a decode step) as one kernel of ours on
// CUDA, with the steps and roundings of MLX's unfused attention, where MLX has
// no fused kernel (head sizes other than 64, 96 and 128, or a mask array):
// nullopt elsewhere, or when the inputs do not fit it (mlxs_attn_kernel.cpp).
std::optional<mx::array> try_sdpa_decode(const mx::array& q, const mx::array& k, const mx::array& v,
                                         float scale, bool causal,
                                         const std::optional<mx::array>& mask,
                                         mx::StreamOrDevice s);

// The decode attention's instantiation for dtype `t`, head size `d`, query
// heads per key/value head `rep` and mask kind `mask` (0 none, 1 boolean, 2
// additive; `mask_rows`: one mask row per batch row) (mlxs_attn_kernel.cpp).
KernelSpec sdpa_decode_spec(mx::Dtype t, int d, int rep, int mask, bool mask_rows);
// Attention for 2 to 8 queries a sequence after cached keys (at most 2,048;
// speculative decoding's check), causal or unmasked, as one kernel of ours with
// grouped_sdpa's several-query roundings (CUDA); nullopt elsewhere.
std::optional<mx::array> try_sdpa_few(const mx::array& q, const mx::array& k, const mx::array& v,
                                      float scale, bool causal,
                                      const std::optional<mx::array>& mask, mx::StreamOrDevice s);
KernelSpec sdpa_few_spec(mx::Dtype t, int d, int rep, int l, bool causal);

// The first `heads` heads of `d` values of y: [B, L, N] (a fused q/k/v
// projection's output, q's heads then k's), RMS-normed with the weight
// [heads, 1, d] and `eps` when `weight` is given, and rotated (MLX's rope over
// `dims` features: `base` or `freqs`, `scale`, `offset` an int32 scalar or one
// a batch row), as [B, heads, L, d]: one kernel of ours on CUDA where the
// inputs fit it, else MLX's ops, exactly (mlxs_rope_kernel.cpp).
mx::array qk_norm_rope(const mx::array& y, int heads, int d, const std::optional<mx::array>& weight,
                       float eps, int dims, bool traditional, std::optional<float> base,
                       float scale, const mx::array& offset, const std::optional<mx::array>& freqs,
                       mx::StreamOrDevice s);

// The header of the rope kernels: rope_pair, MLX's rotation of one pair
// (mlxs_rope_kernel.cpp).
const char* rope_header();

// The q/k norm and rope's instantiation for dtype `t`, head size `d`, `heads`
// heads, with or without the norm, the traditional rope, explicit frequencies
// and one offset a batch row, and `eps` (mlxs_rope_kernel.cpp).
KernelSpec qk_norm_rope_spec(mx::Dtype t, int d, int heads, bool norm, bool traditional, bool freqs,
                             bool offsets, float eps);

// h = x + norm(r) (or x + r without `r_weight`) and, with `h_weight`, y =
// norm(h): RMS norms over the last axis with weights `r_weight` and `h_weight`
// and `eps`, as one kernel of ours on CUDA (nullopt elsewhere, or when the
// inputs do not fit it; the caller then composes MLX's ops).
std::optional<std::pair<mx::array, std::optional<mx::array>>> try_fused_norm_add(
    const mx::array& x, const mx::array& r, const std::optional<mx::array>& r_weight,
    const std::optional<mx::array>& h_weight, float eps, mx::StreamOrDevice s);

// The rotation the norm with the 4-bit product applies to the first
// `qk_heads` heads of `head_dim` values of its output (none when qk_heads is
// 0): mlxr_qk_norm_rope's, without a norm, pairs (t, t + head_dim / 2), one
// int32 `offset`, the inverse frequencies `freqs` (float32, head_dim / 2) or
// the base's log2, and `scale`.
struct NormQmvRope {
  int qk_heads = 0;
  int head_dim = 0;
  std::optional<mx::array> offset;
  std::optional<mx::array> freqs;
  float scale = 1.f;
  float log2_base = 0.f;
};

// norm_add_spec's norm followed by the 4-bit product with w (group `group`,
// D = d), for one row of x, with `rope`'s rotation after it when it has one
// (mlxs_norm_kernel.cpp); its header.
KernelSpec norm_qmv_spec(mx::Dtype t, int d, int group, bool norm_r, float eps,
                         const NormQmvRope& rope);
const char* norm_qmv_header();

// try_fused_norm_add's h and the product of its y with the 4-bit affine matrix
// w (transposed, as a linear layer holds it; y itself is not returned), as one
// kernel of ours on CUDA for one row of x where our one-row product kernel
// would take y (nullopt elsewhere: the caller composes the two).
// With `rope`'s rotation (qk_heads > 0): the first heads of the product
// rotated, or nullopt where it does not fit (the caller then joins without
// it).
std::optional<std::pair<mx::array, mx::array>> try_fused_norm_add_qmv(
    const mx::array& x, const mx::array& r, const std::optional<mx::array>& r_weight,
    const mx::array& h_weight, float eps, const mx::array& w, const mx::array& scales,
    const std::optional<mx::array>& biases, int group, int bits, const std::string& mode,
    const NormQmvRope& rope, mx::StreamOrDevice s);

// Whether one row of x times a 4-bit matrix of n rows and k columns takes our
// one-row product kernel in the current mode (mlxs_kernels.cpp); `any_size`:
// whatever its size in AUTO mode (for a launch that replaces two, where the
// host time a kernel costs is saved anyway).
bool one_row_qmv(int n, int k, bool any_size);

// Our kernel for one row of x times 4-bit weights, where it applies (see
// mlxs_kernels.cpp); nullopt where MLX's quantized_matmul must run.
std::optional<mx::array> try_fast_qmv(const mx::array& x, const mx::array& w,
                                      const mx::array& scales,
                                      const std::optional<mx::array>& biases, bool transpose,
                                      std::optional<int> group_size, std::optional<int> bits,
                                      const std::string& mode, mx::StreamOrDevice s);

// One instantiation of one of our CUDA kernels (mlxs_kernel_cache.cpp): the
// stem of its entry point's name, its body (as MLX's cuda_kernel takes it),
// its activation dtype (bfloat16 or float16) and its integer template
// arguments, in order. Its entry point takes x, w, scales, biases, out and
// then the rows of x and of w as ints.
// A kernel whose `inputs` and `outputs` are named takes them instead, in that
// order, each a pointer to the dtype (MLX's cuda_kernel signature), and no ints.
struct KernelSpec {
  const char* kernel;
  const char* body;
  mx::Dtype dtype;
  std::vector<std::pair<std::string, int>> ints;
  std::vector<const char*> inputs = {};
  std::vector<const char*> outputs = {};
  // Scalar parameters after the outputs, as declared ("int len"): passed by
  // MLX's precompiled launch only (mx::fast::precompiled_cuda_kernel).
  std::vector<const char*> scalars = {};
  // The entry point's name: the stem, the dtype and each argument.
  std::string entry_name() const;
  // The whole program: the CUDA headers, `header`, the entry point.
  std::string source(const char* header) const;
};

struct Nvrtc;

// A compiled instantiation: its entry point's name and its cubin, and the
// short handle MLX takes in the cubin's place once the cubin is staged in
// MLX's module cache on disk (empty when it is not; see stage_for_mlx in
// mlxs_kernel_cache.cpp).
struct CompiledKernel {
  std::string name;
  std::string cubin;
  std::string handle;
};

// Compiles KernelSpecs with NVRTC into cubins, kept under a cache directory
// (none if empty) and in memory. Empty paths and an arch of 0 mean: NVRTC
// from the process, the CUDA headers where MLX finds them, this GPU.
class KernelCompiler {
 public:
  // `stage`: each kernel is also staged for MLX (CompiledKernel::handle).
  KernelCompiler(std::string nvrtc_path, std::string include_dir, std::string cache_dir, int arch,
                 bool stage = false);
  ~KernelCompiler();
  KernelCompiler(const KernelCompiler&) = delete;
  KernelCompiler& operator=(const KernelCompiler&) = delete;
  // The compiled kernel, or null when it cannot be made here (why() says
  // why); `from_disk`, if given, says whether the cache directory had it.
  std::shared_ptr<const CompiledKernel> compile(const KernelSpec& spec, const char* header,
                                                bool* from_disk);
  std::string why();

 private:
  bool ready();
  std::string nvrtc_path_;
  std::string include_;
  std::string cache_;
  int arch_;
  bool stage_;
  bool checked_ = false;
  std::unique_ptr<Nvrtc> api_;
  std::string why_;
  std::mutex mutex_;
  std::unordered_map<std::string, std::shared_ptr<const CompiledKernel>> memo_;
};

// The GPU's device_info entry `key` when it is a number (the compute
// capability's "compute_capability_major" and "_minor"), else nothing.
std::optional<size_t> gpu_info_size(const char* key);

// Whether our kernels are compiled by us and cached on disk (the default;
// MLXR_KERNEL_CACHE=0: by MLX's cuda_kernel instead).
bool kernel_cache_on();

// Stages `cubin` where MLX 0.32.4 loads compiled modules from (`dir`, or when
// null MLX's PTX cache directory: MLX_PTX_CACHE_DIR, else
// <temp>/mlx/<version>/ptx) under the module name MLX derives from a short
// handle, and returns the handle (empty, and `ptx_path` untouched, when that
// cannot be done here or MLXR_KERNEL_STAGE=0).
std::string stage_for_mlx(const std::string& name, const std::string& cubin, const char* dir,
                          std::string* ptx_path);

// The process's compiler's kernel for `spec` (said once on standard error
// when it cannot be made: the caller then uses MLX's cuda_kernel).
std::shared_ptr<const CompiledKernel> cached_kernel(const KernelSpec& spec, const char* header);

}  // namespace mlxs
