// SPDX-License-Identifier: EUPL-1.2
//
// mlxs_kernel_cache_check: every instantiation of our CUDA kernels that the
// dispatch code makes (tests/nvrtc_check.py compiles the same through a
// stand-in for MLX's wrapper), compiled through our own compile path
// (mlxs_kernel_cache.cpp) on a machine without a GPU, twice: the second
// compiler reads each cubin back from the cache directory.

#include <cstring>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

#include "mlxs_internal.h"

extern "C" {

int mlxs_kernel_cache_check(const char* nvrtc_path, const char* include_dir, int arch,
                            const char* cache_dir, int* made, int* first_from_disk,
                            int* second_from_disk) {
  return mlxs::guard([&] {
    // The instantiations tests/nvrtc_check.py compiles through MLX's wrapper.
    std::vector<mlxs::KernelSpec> specs;
    for (auto t : {mx::bfloat16, mx::float16}) {
      for (auto [k, g] : {std::pair{4096, 64}, {1152, 32}, {14336, 128}, {25600, 64}}) {
        specs.push_back(mlxs::qmv_spec(t, k, g, k >= mlxs::kQmvSplitMinK ? 2 : 1));
      }
      for (auto [k, g] : {std::pair{4096, 64}, {640, 32}, {14336, 128}}) {
        for (int mt : {1, 4}) {
          specs.push_back(mlxs::qmm_rows_spec(t, k, g, mt, std::min(8, k / 128)));
        }
      }
    }
    for (auto t : {mx::bfloat16, mx::float16}) {
      for (auto [d, norm_r, norm_h] : {std::tuple{1152, true, true},
                                       {1152, true, false},
                                       {4096, false, true},
                                       {4099, true, true}}) {
        specs.push_back(mlxs::norm_add_spec(t, d, norm_r, norm_h, 1e-6f));
      }
      for (auto [d, rep, mask, rows] : {std::tuple{256, 4, 0, false},
                                        {256, 4, 1, false},
                                        {256, 1, 2, true},
                                        {128, 4, 1, true},
                                        {64, 3, 2, false}}) {
        specs.push_back(mlxs::sdpa_decode_spec(t, d, rep, mask, rows));
      }
      // A few queries: SmolLM2, Llama 3 and Gemma 3 checking guesses, one unmasked.
      for (auto [d, rep, l, causal] :
           {std::tuple{64, 3, 4, true}, {128, 4, 4, true}, {256, 4, 2, true}, {128, 4, 2, false}}) {
        specs.push_back(mlxs::sdpa_few_spec(t, d, rep, l, causal));
      }
      // Gemma 3 (a scalar offset, one a batch row), Llama 3 (its frequencies), SmolLM2 (traditional
      // here, to compile that branch).
      for (auto [d, heads, norm, trad, freqs, rows] :
           {std::tuple{256, 5, true, false, false, false},
            {256, 5, true, false, false, true},
            {128, 40, false, false, true, true},
            {64, 12, false, true, false, false}}) {
        specs.push_back(mlxs::qk_norm_rope_spec(t, d, heads, norm, trad, freqs, rows, 1e-6f));
      }
    }
    // The norm with the 4-bit product: Llama 3 8B's width, Gemma 3 1B's with its post-norm; and
    // with the rope after it: Llama 3 8B's q/k/v (its frequencies), a 2,048 wide one with a base.
    for (auto t : {mx::bfloat16, mx::float16}) {
      for (auto [d, g, norm_r] :
           {std::tuple{4096, 64, false}, {1152, 64, true}, {2048, 128, false}}) {
        specs.push_back(mlxs::norm_qmv_spec(t, d, g, norm_r, 1e-6f, {}));
      }
      mlxs::NormQmvRope llama{40, 128, std::nullopt, mx::array(0.f), 1.f, 0.f};
      specs.push_back(mlxs::norm_qmv_spec(t, 4096, 64, false, 1e-5f, llama));
      mlxs::NormQmvRope based{48, 64, std::nullopt, std::nullopt, 1.f, 13.2f};
      specs.push_back(mlxs::norm_qmv_spec(t, 2048, 128, false, 1e-5f, based));
    }
    int read[2] = {0, 0};
    for (int pass = 0; pass < 2; ++pass) {
      mlxs::KernelCompiler compiler(nvrtc_path, include_dir, cache_dir, arch);
      for (const auto& spec : specs) {
        bool disk = false;
        // Each kernel with the header its dispatch compiles it with.
        const char* header = spec.inputs.empty() ? mlxs::qmv_header() : "";
        if (std::strcmp(spec.kernel, "mlxr_norm_qmv4") == 0) {
          header = mlxs::norm_qmv_header();
        } else if (std::strcmp(spec.kernel, "mlxr_qk_norm_rope") == 0) {
          header = mlxs::rope_header();
        }
        if (compiler.compile(spec, header, &disk) == nullptr) {
          throw std::runtime_error(compiler.why());
        }
        read[pass] += disk ? 1 : 0;
      }
    }
    *made = static_cast<int>(specs.size());
    *first_from_disk = read[0];
    *second_from_disk = read[1];
  });
}

}  // extern "C"
