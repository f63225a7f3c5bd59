// SPDX-License-Identifier: EUPL-1.2
//
// Our CUDA kernels compiled by us, kept on disk, and launched as MLX's
// precompiled kernels. MLX's fast::cuda_kernel compiles a kernel with NVRTC
// at its first call with each set of template arguments, wrapped in MLX's own
// device headers, and never keeps the result (its custom kernels ask for no
// disk cache): on an H100 a fresh `mlxr generate` of Llama-3.1-8B spent about
// 3 s of its first decode steps there (docs/benchmarks.md, session 15). Here
// each instantiation is compiled once per machine, with only the CUDA headers
// it needs (cuda_bf16.h, cuda_fp16.h), into machine code for this GPU (a
// cubin), kept under the cache directory and read back by later processes.
//
// On by default (checked on an H100 in session 16: every kernel against its
// reference, greedy parity on real weights, a fresh `generate` of
// Llama-3.1-8B 6.5-7.1 s -> 3.1-3.7 s); MLXR_KERNEL_CACHE=0 turns it off.
// Anything missing (NVRTC's symbols, the CUDA headers, a compile error) falls
// back to MLX's cuda_kernel, once said on standard error.
//
// NVRTC is the one libmlx links (its symbols are in the process), or
// MLXR_NVRTC names a library to open. The CUDA headers: MLXR_CUDA_INCLUDE, else
// where MLX looks (the Python wheel's nvidia/cu13 or nvidia/cuda_runtime
// beside the mlx package, $CUDA_HOME, $CUDA_PATH, /usr/local/cuda). The cache:
// MLXR_KERNEL_CACHE_DIR, else $XDG_CACHE_HOME/mlxr/cuda-kernels, else
// ~/.cache/mlxr/cuda-kernels. A file holds its whole key (the source, the
// options, NVRTC's version) and the cubin's size before the cubin, and is used
// only when the key and the size match: no hash collision can load the wrong
// code, and no file cut short.

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <unordered_map>
#include <variant>

#ifndef _WIN32
#include <dlfcn.h>
#include <unistd.h>
#endif

#include "mlx/backend/gpu/device_info.h"
#include "mlx/fast.h"
#include "mlx/version.h"
#include "mlxs_internal.h"

namespace fs = std::filesystem;

namespace mlxs {

using Program = void*;

// The NVRTC entry points used here (nvrtcResult is an int enum; 0 is success).
struct Nvrtc {
  int (*version)(int*, int*) = nullptr;
  int (*create)(Program*, const char*, const char*, int, const char* const*,
                const char* const*) = nullptr;
  int (*compile)(Program, int, const char* const*) = nullptr;
  int (*destroy)(Program*) = nullptr;
  int (*log_size)(Program, size_t*) = nullptr;
  int (*log)(Program, char*) = nullptr;
  int (*cubin_size)(Program, size_t*) = nullptr;
  int (*cubin)(Program, char*) = nullptr;
  int major = 0;
  int minor = 0;
};

}  // namespace mlxs

namespace {

using mlxs::Nvrtc;
using mlxs::Program;

template <typename F>
bool resolve(void* lib, const char* name, F& f) {
#ifndef _WIN32
  f = reinterpret_cast<F>(dlsym(lib, name));
#endif
  return f != nullptr;
}

// NVRTC from `path` (opened), or from the process when `path` is empty.
std::optional<Nvrtc> load_nvrtc(const std::string& path, std::string& why) {
#ifdef _WIN32
  why = "not on Windows";
  return std::nullopt;
#else
  void* lib = RTLD_DEFAULT;
  if (!path.empty()) {
    lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      why = "cannot open " + path;
      return std::nullopt;
    }
  }
  Nvrtc a;
  bool ok =
      resolve(lib, "nvrtcVersion", a.version) && resolve(lib, "nvrtcCreateProgram", a.create) &&
      resolve(lib, "nvrtcCompileProgram", a.compile) &&
      resolve(lib, "nvrtcDestroyProgram", a.destroy) &&
      resolve(lib, "nvrtcGetProgramLogSize", a.log_size) &&
      resolve(lib, "nvrtcGetProgramLog", a.log) &&
      resolve(lib, "nvrtcGetCUBINSize", a.cubin_size) && resolve(lib, "nvrtcGetCUBIN", a.cubin);
  if (!ok || a.version(&a.major, &a.minor) != 0) {
    why = "NVRTC's symbols are not in this process (MLXR_NVRTC names its library)";
    return std::nullopt;
  }
  // Older NVRTCs cannot make machine code for every compute capability.
  if (a.major < 12) {
    why = "NVRTC " + std::to_string(a.major) + "." + std::to_string(a.minor) + " is before 12";
    return std::nullopt;
  }
  return a;
#endif
}

bool has_headers(const fs::path& dir) {
  std::error_code e;
  return !dir.empty() && fs::exists(dir / "cuda_bf16.h", e);
}

// The directory of libmlx (where MLX's own search starts), if found.
fs::path libmlx_dir() {
#ifndef _WIN32
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&mx::fast::precompiled_cuda_kernel), &info) != 0 &&
      info.dli_fname != nullptr) {
    return fs::path(info.dli_fname).parent_path();
  }
#endif
  return {};
}

fs::path cuda_include(int nvrtc_major) {
  std::vector<fs::path> candidates;
  if (const char* d = std::getenv("MLXR_CUDA_INCLUDE"); d != nullptr && *d != '\0') {
    candidates.emplace_back(d);
  }
  if (auto lib = libmlx_dir(); !lib.empty()) {
    // site-packages/mlx/lib/libmlx.so -> site-packages/nvidia/...
    auto nvidia = lib.parent_path().parent_path() / "nvidia";
    candidates.push_back(nvidia / (nvrtc_major >= 13 ? "cu13" : "cuda_runtime") / "include");
  }
  for (const char* env : {"CUDA_HOME", "CUDA_PATH"}) {
    if (const char* d = std::getenv(env); d != nullptr && *d != '\0') {
      candidates.push_back(fs::path(d) / "include");
    }
  }
  candidates.emplace_back("/usr/local/cuda/include");
  for (const auto& c : candidates) {
    if (has_headers(c)) {
      return c;
    }
  }
  return {};
}

fs::path cache_dir() {
  if (const char* d = std::getenv("MLXR_KERNEL_CACHE_DIR"); d != nullptr && *d != '\0') {
    return d;
  }
  if (const char* d = std::getenv("XDG_CACHE_HOME"); d != nullptr && *d != '\0') {
    return fs::path(d) / "mlxr" / "cuda-kernels";
  }
  if (const char* h = std::getenv("HOME"); h != nullptr && *h != '\0') {
    return fs::path(h) / ".cache" / "mlxr" / "cuda-kernels";
  }
  return {};
}

const char* cuda_type(mx::Dtype t) { return t == mx::bfloat16 ? "__nv_bfloat16" : "__half"; }

const char* type_tag(mx::Dtype t) { return t == mx::bfloat16 ? "bf16" : "f16"; }

constexpr const char* kMagic = "mlxr-cubin-2\n";

// The cubin stored under `path` for exactly `key`, if any.
std::optional<std::string> read_cached(const fs::path& path, const std::string& key) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return std::nullopt;
  }
  std::string magic(std::strlen(kMagic), '\0');
  size_t key_size = 0;
  if (!in.read(magic.data(), magic.size()) || magic != kMagic ||
      !in.read(reinterpret_cast<char*>(&key_size), sizeof key_size) || key_size != key.size()) {
    return std::nullopt;
  }
  std::string stored(key_size, '\0');
  if (!in.read(stored.data(), key_size) || stored != key) {
    return std::nullopt;
  }
  size_t cubin_size = 0;
  if (!in.read(reinterpret_cast<char*>(&cubin_size), sizeof cubin_size) || cubin_size == 0) {
    return std::nullopt;
  }
  std::ostringstream rest;
  rest << in.rdbuf();
  std::string cubin = rest.str();
  // A file cut short (or grown) is not used.
  if (cubin.size() != cubin_size) {
    return std::nullopt;
  }
  return cubin;
}

// `bytes` at `path` through a file of its own and a rename, so that a reader
// in another process sees the whole file or none: whether the rename was made.
bool replace_file(const fs::path& path, const std::string& bytes) {
#ifndef _WIN32
  auto pid = std::to_string(static_cast<long>(getpid()));
#else
  std::string pid = "0";
#endif
  std::error_code e;
  auto tmp = path;
  tmp += ".tmp" + pid;
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    // Closed before the check, so that a failed final flush counts too.
    out.close();
    if (!out) {
      fs::remove(tmp, e);
      return false;
    }
  }
  fs::rename(tmp, path, e);
  if (e) {
    fs::remove(tmp, e);
    return false;
  }
  return true;
}

// Stores `cubin` under `path` for `key` (replace_file). Failing to write only
// costs the next process a compile.
void write_cached(const fs::path& path, const std::string& key, const std::string& cubin) {
  std::error_code e;
  fs::create_directories(path.parent_path(), e);
  std::string bytes(kMagic);
  size_t key_size = key.size();
  bytes.append(reinterpret_cast<const char*>(&key_size), sizeof key_size);
  bytes += key;
  size_t cubin_size = cubin.size();
  bytes.append(reinterpret_cast<const char*>(&cubin_size), sizeof cubin_size);
  bytes += cubin;
  replace_file(path, bytes);
}

// MLX names a custom kernel's module by hashing its whole source every time
// the kernel is evaluated (CustomKernel::eval_gpu: `<name>_<hex of
// std::hash(source)>`), and a precompiled kernel's source is its cubin: 25-56
// KB, 4-9 us of host time a call on a slow CPU (docs/benchmarks.md, session
// 17). So the cubin is also written where MLX's module loader looks before it
// builds a module (read_cached_ptx: `<module>.ptx` holding the code,
// `<module>.txt` the entry point's name, tab, its symbol), under the module
// name MLX derives from a short handle; MLX then hashes the handle, loads the
// staged file once, and keeps the module in memory. Both files are written
// whole (a rename) and read back; anything amiss leaves the kernel on its
// cubin.

// MLX 0.32.4's ptx_cache_dir(): MLX_PTX_CACHE_DIR as given, else
// <temp>/mlx/<version>/ptx; empty (no disk cache) when it cannot be made.
fs::path mlx_ptx_cache_dir() {
  std::error_code e;
  fs::path dir;
  if (const char* c = std::getenv("MLX_PTX_CACHE_DIR"); c != nullptr) {
    dir = c;
  } else {
    dir = fs::temp_directory_path(e);
    if (e) {
      return {};
    }
    dir = dir / "mlx" / mx::version() / "ptx";
  }
  if (dir.empty() || (!fs::exists(dir, e) && !fs::create_directories(dir, e))) {
    return {};
  }
  return fs::is_directory(dir, e) ? dir : fs::path();
}

std::string hex_hash(const std::string& s) {
  char hex[2 * sizeof(size_t) + 1];
  std::snprintf(hex, sizeof hex, "%zx", std::hash<std::string>{}(s));
  return hex;
}

std::optional<std::string> read_whole(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return std::nullopt;
  }
  std::ostringstream all;
  all << in.rdbuf();
  return all.str();
}

// `bytes` at `path`, written whole (replace_file) unless it is there already,
// then read back: whether the file now holds exactly `bytes`.
bool write_whole(const fs::path& path, const std::string& bytes) {
  if (read_whole(path) == bytes) {
    return true;
  }
  return replace_file(path, bytes) && read_whole(path) == bytes;
}

// NVRTC's cubin of `source` for `arch`, or why not.
std::optional<std::string> nvrtc_compile(const Nvrtc& api, const std::string& source,
                                         const std::vector<std::string>& options,
                                         std::string& why) {
  Program prog = nullptr;
  if (api.create(&prog, source.c_str(), "mlxr_kernel.cu", 0, nullptr, nullptr) != 0) {
    why = "nvrtcCreateProgram failed";
    return std::nullopt;
  }
  std::vector<const char*> opts;
  for (const auto& o : options) {
    opts.push_back(o.c_str());
  }
  int status = api.compile(prog, static_cast<int>(opts.size()), opts.data());
  std::optional<std::string> cubin;
  if (status == 0) {
    size_t size = 0;
    if (api.cubin_size(prog, &size) == 0 && size > 0) {
      std::string bytes(size, '\0');
      if (api.cubin(prog, bytes.data()) == 0) {
        cubin = std::move(bytes);
      }
    }
    if (!cubin) {
      why = "NVRTC made no cubin";
    }
  } else {
    size_t size = 0;
    std::string log;
    if (api.log_size(prog, &size) == 0 && size > 1) {
      log.assign(size, '\0');
      api.log(prog, log.data());
      log.resize(size - 1);
    }
    why = "NVRTC failed (status " + std::to_string(status) + "): " + log;
  }
  api.destroy(&prog);
  return cubin;
}

}  // namespace

namespace mlxs {

std::string KernelSpec::entry_name() const {
  std::string name = std::string(kernel) + "_" + type_tag(dtype);
  for (const auto& [n, v] : ints) {
    name += "_" + n + std::to_string(v);
  }
  return name;
}

std::string KernelSpec::source(const char* header) const {
  std::string t = cuda_type(dtype);
  std::string s =
      "#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n"
      "typedef unsigned int uint32_t;\ntypedef int int32_t;\n";
  s += header;
  if (inputs.empty()) {
    s += "\nextern \"C\" __global__ void " + entry_name() + "(const " + t +
         "* x, const uint32_t* w, const " + t + "* scales, const " + t + "* biases, " + t +
         "* out, int x_rows, int w_rows) {\n";
  } else {
    std::string params;
    for (const char* n : inputs) {
      params += (params.empty() ? "const " : ", const ") + t + "* " + n;
    }
    for (const char* n : outputs) {
      params += ", " + t + "* " + n;
    }
    for (const char* n : scalars) {
      params += ", " + std::string(n);
    }
    s += "\nextern \"C\" __global__ void " + entry_name() + "(" + params + ") {\n";
  }
  s += "  using T = " + t + ";\n";
  for (const auto& [n, v] : ints) {
    s += "  constexpr int " + n + " = " + std::to_string(v) + ";\n";
  }
  if (inputs.empty()) {
    // The names MLX's wrapper gives the bodies: the first dimension of x and w.
    s += "  const int x_shape[1] = {x_rows};\n  const int w_shape[1] = {w_rows};\n";
  }
  s += body;
  s += "\n}\n";
  return s;
}

KernelCompiler::KernelCompiler(std::string nvrtc_path, std::string include_dir,
                               std::string cache_dir, int arch, bool stage)
    : nvrtc_path_(std::move(nvrtc_path)),
      include_(std::move(include_dir)),
      cache_(std::move(cache_dir)),
      arch_(arch),
      stage_(stage) {}

bool KernelCompiler::ready() {
  if (checked_) {
    return api_ != nullptr;
  }
  checked_ = true;
  std::string why;
  auto api = load_nvrtc(nvrtc_path_, why);
  if (!api) {
    why_ = why;
    return false;
  }
  if (include_.empty()) {
    include_ = cuda_include(api->major).string();
  }
  if (!has_headers(include_)) {
    why_ = "the CUDA headers (cuda_bf16.h) were not found: MLXR_CUDA_INCLUDE names their directory";
    return false;
  }
  if (arch_ <= 0) {
    auto major = gpu_info_size("compute_capability_major");
    auto minor = gpu_info_size("compute_capability_minor");
    if (!major || !minor) {
      why_ = "the GPU's compute capability is unknown";
      return false;
    }
    arch_ = static_cast<int>(*major * 10 + *minor);
  }
  api_ = std::make_unique<Nvrtc>(*api);
  return true;
}

std::shared_ptr<const CompiledKernel> KernelCompiler::compile(const KernelSpec& spec,
                                                              const char* header, bool* from_disk) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto name = spec.entry_name();
  if (auto it = memo_.find(name); it != memo_.end()) {
    return it->second;
  }
  if (!ready()) {
    memo_.emplace(name, nullptr);
    return nullptr;
  }
  auto source = spec.source(header);
  // Machine code for this GPU, as MLX does ("a" for the architecture-specific
  // features of 9.0 and later).
  std::vector<std::string> options = {
      "--gpu-architecture=sm_" + std::to_string(arch_) + (arch_ >= 90 ? "a" : ""),
      "--include-path=" + include_, "--std=c++17"};
  std::string key = source;
  for (const auto& o : options) {
    key += "\n// " + o;
  }
  key += "\n// NVRTC " + std::to_string(api_->major) + "." + std::to_string(api_->minor) + "\n";
  std::string file =
      name + "-" + std::to_string(std::hash<std::string>{}(key) & 0xffffffffffffull) + ".cubin";
  std::optional<std::string> bytes;
  if (!cache_.empty()) {
    bytes = read_cached(fs::path(cache_) / file, key);
  }
  if (from_disk != nullptr) {
    *from_disk = bytes.has_value();
  }
  if (!bytes) {
    std::string why;
    bytes = nvrtc_compile(*api_, source, options, why);
    if (!bytes) {
      why_ = name + ": " + why;
      memo_.emplace(name, nullptr);
      return nullptr;
    }
    if (!cache_.empty()) {
      write_cached(fs::path(cache_) / file, key, *bytes);
    }
  }
  auto handle = stage_ ? stage_for_mlx(name, *bytes, nullptr, nullptr) : std::string();
  auto compiled = std::make_shared<const CompiledKernel>(
      CompiledKernel{name, std::move(*bytes), std::move(handle)});
  memo_.emplace(std::move(name), compiled);
  return compiled;
}

std::optional<size_t> gpu_info_size(const char* key) {
  const auto& info = mx::gpu::device_info(0);
  auto it = info.find(key);
  if (it == info.end() || !std::holds_alternative<size_t>(it->second)) {
    return std::nullopt;
  }
  return std::get<size_t>(it->second);
}

std::string KernelCompiler::why() {
  std::lock_guard<std::mutex> lock(mutex_);
  return why_;
}

KernelCompiler::~KernelCompiler() = default;

std::string stage_for_mlx(const std::string& name, const std::string& cubin, const char* where,
                          std::string* ptx_path) {
  static const bool on = [] {
    const char* v = std::getenv("MLXR_KERNEL_STAGE");
    return v == nullptr || std::string(v) != "0";
  }();
  std::error_code e;
  auto dir = !on || cubin.empty()         ? fs::path()
             : where == nullptr           ? mlx_ptx_cache_dir()
             : fs::is_directory(where, e) ? fs::path(where)
                                          : fs::path();
  if (dir.empty()) {
    return {};
  }
  auto handle = "mlxr cubin " + name + " " + std::to_string(cubin.size()) + " " + hex_hash(cubin);
  auto module = name + "_" + hex_hash(handle);
  // MLX splits longer names into directories; ours stay well under.
  if (module.size() > 245) {
    return {};
  }
  // The entry point's file first: the code's file, once there, is what MLX looks for.
  auto ptx = dir / (module + ".ptx");
  if (!write_whole(dir / (module + ".txt"), name + "\t" + name + "\n") ||
      !write_whole(ptx, cubin)) {
    return {};
  }
  if (ptx_path != nullptr) {
    *ptx_path = ptx.string();
  }
  return handle;
}

bool kernel_cache_on() {
  static const bool on = [] {
    const char* v = std::getenv("MLXR_KERNEL_CACHE");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
}

std::shared_ptr<const CompiledKernel> cached_kernel(const KernelSpec& spec, const char* header) {
  static KernelCompiler* compiler = [] {
    const char* nvrtc = std::getenv("MLXR_NVRTC");
    return new KernelCompiler(nvrtc != nullptr ? nvrtc : "", "", cache_dir().string(), 0, true);
  }();
  static std::once_flag said;
  auto kernel = compiler->compile(spec, header, nullptr);
  if (kernel == nullptr) {
    std::call_once(said, [&] {
      std::fprintf(stderr,
                   "mlxr: our CUDA kernels cannot be compiled and cached here (%s); MLX compiles "
                   "them instead (MLXR_KERNEL_CACHE=0 skips this attempt)\n",
                   compiler->why().c_str());
    });
  }
  return kernel;
}

}  // namespace mlxs

extern "C" int mlxs_kernel_stage_check(const char* dir, const char* name, const char* cubin,
                                       size_t len, char* ptx_path, size_t cap) {
  return mlxs::guard([&] {
    std::string path;
    mlxs::stage_for_mlx(name, std::string(cubin, len), dir, &path);
    if (cap == 0 || path.size() >= cap) {
      throw std::runtime_error("the path does not fit in " + std::to_string(cap) + " bytes");
    }
    std::memcpy(ptx_path, path.c_str(), path.size() + 1);
  });
}
