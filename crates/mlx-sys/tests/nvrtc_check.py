# SPDX-License-Identifier: EUPL-1.2
"""Compiles the CUDA kernels of csrc/mlxs_kernels.cpp, mlxs_norm_kernel.cpp, mlxs_attn_kernel.cpp and mlxs_rope_kernel.cpp with NVRTC, as MLX does on a GPU machine, on a
machine without a GPU: every kernel source, every instantiation our dispatch code makes (dtypes, group
sizes, tiles), for compute capability 8.0 and 9.0. A kernel that does not compile here would fail on
the GPU at its first call; this finds it in CI. NVRTC and the CUDA headers come from PyPI's
nvidia-cuda-nvrtc-cu12 and nvidia-cuda-runtime-cu12 (pinned in xtask/fixtures/requirements.txt).

    python nvrtc_check.py PATH/mlxs_kernels.cpp PATH/mlxs_norm_kernel.cpp PATH/mlxs_attn_kernel.cpp PATH/mlxs_rope_kernel.cpp

Exit status 0: all compiled; 1: a kernel failed (NVRTC's log is printed); 3: NVRTC is not installed
in this Python (the caller decides whether that is an error).

The wrapper stands in for MLX's (`fast::cuda_kernel` makes a `__global__` template whose parameters
are the inputs, the outputs and, for the names the source uses, their shapes); the kernel bodies are
compiled exactly as written.
"""

import ctypes
import re
import sys
from pathlib import Path

# Per kernel: its body (the raw strings it is made of, in order; its own name when not given), the
# inputs' element types, the outputs', and the template instantiations our dispatch code
# (try_fast_qmv, try_fused_norm_add, try_fused_norm_add_qmv, ...) can make. T is the activation dtype.
TYPES = ("__nv_bfloat16", "__half")
KERNELS = {
    "kQmvSource": {
        "inputs": [("x", "T"), ("w", "uint32_t"), ("scales", "T"), ("biases", "T")],
        "outputs": [("out", "T")],
        "template": ["typename T", "int K", "int GROUP", "int KSPLIT"],
        # Rows of 8,192 or more take two warps each (qmv_ksplit).
        "args": [(t, k, g, 2 if k >= 8192 else 1) for t in TYPES
                 for k, g in ((4096, 64), (1152, 32), (14336, 128), (25600, 64))],
    },
    "kQmmRowsSource": {
        "inputs": [("x", "T"), ("w", "uint32_t"), ("scales", "T"), ("biases", "T")],
        "outputs": [("out", "T")],
        "template": ["typename T", "int K", "int GROUP", "int MT", "int KSPLIT"],
        "args": [(t, k, g, mt, min(8, k // 128)) for t in TYPES for k, g in ((4096, 64), (640, 32), (14336, 128))
                 for mt in (1, 4)],
    },
    "kNormAddSource": {
        "body": ["kNormAddRow", "kNormAddCore"],
        "inputs": [("x", "T"), ("r", "T"), ("wr", "T"), ("wh", "T")],
        "outputs": [("h", "T"), ("y", "T")],
        "template": ["typename T", "int D", "int NORM_R", "int NORM_H", "int EPS", "int THREADS"],
        # EPS is eps's float bits (1e-6 here), THREADS norm_add_threads(D), as try_fused_norm_add passes them.
        "args": [(t, d, nr, nh, 0x358637BD, threads) for t in TYPES
                 for d, nr, nh, threads in ((1152, 1, 1, 160), (1152, 1, 0, 160), (4096, 0, 1, 512), (4099, 1, 1, 1024))],
    },
    "kNormQmvSource": {
        "body": ["kNormQmvRow", "kNormAddCore", "kNormQmvTail"],
        # Declared as our compile path declares them: every input a T pointer.
        "inputs": [("x", "T"), ("r", "T"), ("wr", "T"), ("wh", "T"), ("w", "T"), ("scales", "T"),
                   ("biases", "T"), ("offset", "T"), ("freqs", "T")],
        "outputs": [("h", "T"), ("out", "T")],
        "scalars": ["int n", "float scale", "float base"],
        "template": ["typename T", "int D", "int GROUP", "int NORM_R", "int NORM_H", "int EPS", "int THREADS",
                     "int ROPE", "int HD", "int QK_HEADS", "int FREQS"],
        # Llama 3 8B (4,096, group 64), Gemma 3 1B (1,152, its post-norm too), 2,048 wide with group 128;
        # with the rope: Llama 3 8B's q/k/v (40 heads of 128, its frequencies), 48 heads of 64 with a base.
        "args": [(t, d, g, nr, 1, 0x358637BD, threads, rope, hd, qk, fr) for t in TYPES
                 for d, g, nr, threads, rope, hd, qk, fr in ((4096, 64, 0, 512, 0, 0, 0, 0),
                                                             (1152, 64, 1, 160, 0, 0, 0, 0),
                                                             (2048, 128, 0, 256, 0, 0, 0, 0),
                                                             (4096, 64, 0, 512, 1, 128, 40, 1),
                                                             (2048, 128, 0, 256, 1, 64, 48, 0))],
    },
    "kSdpaDecodeSource": {
        "inputs": [("q", "T"), ("k", "T"), ("v", "T"), ("mask", "T")],
        "outputs": [("out", "T")],
        "scalars": ["int len", "int cap", "int hkv", "float scale", "float lowest"],
        "template": ["typename T", "int D", "int REP", "int MASK", "int MASK_ROWS", "int WARPS"],
        # Gemma 3 (256, 4 query heads a key/value head), Llama 3 (128, 4) and SmolLM2 (64, 3), every mask kind.
        "args": [(t, d, rep, mask, rows, 8) for t in TYPES
                 for d, rep, mask, rows in ((256, 4, 0, 0), (256, 4, 1, 0), (256, 1, 2, 1), (128, 4, 1, 1), (64, 3, 2, 0))],
    },
    "kSdpaFewSource": {
        "inputs": [("q", "T"), ("k", "T"), ("v", "T")],
        "outputs": [("out", "T")],
        "scalars": ["int len", "int cap", "int hkv", "float scale"],
        "template": ["typename T", "int D", "int REP", "int L", "int CAUSAL", "int WARPS"],
        # SmolLM2 (64, 3 query heads a key/value head), Llama 3 (128, 4) and Gemma 3 (256, 4) checking guesses.
        "args": [(t, d, rep, l, causal, 8) for t in TYPES
                 for d, rep, l, causal in ((64, 3, 4, 1), (128, 4, 4, 1), (256, 4, 2, 1), (128, 4, 2, 0))],
    },
    "kQkNormRopeSource": {
        "inputs": [("y", "T"), ("w", "T"), ("offset", "T"), ("freqs", "T")],
        "outputs": [("out", "T")],
        "scalars": ["int len", "int row", "float scale", "float base"],
        "template": ["typename T", "int D", "int HEADS", "int NORM", "int TRAD", "int FREQS", "int OFFSETS", "int EPS"],
        # Gemma 3 (a scalar offset, one a batch row), Llama 3 (its frequencies), SmolLM2 (traditional here).
        "args": [(t, d, heads, norm, trad, freqs, rows, 0x358637BD) for t in TYPES
                 for d, heads, norm, trad, freqs, rows in ((256, 5, 1, 0, 0, 0), (256, 5, 1, 0, 0, 1),
                                                          (128, 40, 0, 0, 1, 1), (64, 12, 0, 1, 0, 0))],
    },
}


def raw_strings(source):
    """The `constexpr const char* NAME = R"(...)";` strings of the file, by name."""
    return dict(re.findall(r'constexpr const char\* (\w+) =\s*R"\((.*?)\)";', source, re.S))


def program(strings):
    parts = ["#include <cuda_bf16.h>", "#include <cuda_fp16.h>", "typedef unsigned int uint32_t;",
             "typedef int int32_t;", strings["kQmvHeader"], strings["kRopeHeader"]]
    for name, k in KERNELS.items():
        params = [f"const {t}* {n}" for n, t in k["inputs"]] + [f"{t}* {n}" for n, t in k["outputs"]]
        params += [f"const int32_t* {n}_shape" for n, _ in k["inputs"]] + k.get("scalars", [])
        body = "".join(strings[part] for part in k.get("body", [name]))
        parts.append(f"template <{', '.join(k['template'])}>\n__global__ void {name}_kernel({', '.join(params)}) {{"
                     f"{body}}}")
        for args in k["args"]:
            targs = ", ".join(str(a) for a in args)
            parts.append(f"template __global__ void {name}_kernel<{targs}>("
                         + ", ".join(p.rsplit(" ", 1)[0].replace("T*", f"{args[0]}*") for p in params) + ");")
    return "\n".join(parts)


def nvrtc():
    try:
        import nvidia.cuda_nvrtc
        import nvidia.cuda_runtime
    except ImportError:
        return None
    lib_dir = Path(list(nvidia.cuda_nvrtc.__path__)[0]) / "lib"
    libs = sorted(lib_dir.glob("libnvrtc.so*")) or sorted(lib_dir.glob("nvrtc64*.dll"))
    libs = [p for p in libs if "builtins" not in p.name and ".alt." not in p.name]
    if not libs:
        return None
    return ctypes.CDLL(str(libs[0])), Path(list(nvidia.cuda_runtime.__path__)[0]) / "include"


def compile_for(lib, include, text, arch):
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), b"mlxs_kernels.cu", 0, None, None) != 0:
        raise SystemExit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture=compute_{arch}".encode(), b"-I" + str(include).encode(), b"--std=c++20",
            b"-default-device"]
    status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = b""
    if status == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return status, log.value.decode(errors="replace"), ptx.decode(errors="replace")


def main():
    strings = {}
    for path in sys.argv[1:]:
        strings.update(raw_strings(Path(path).read_text(encoding="utf-8")))
    # Every raw string but the headers is a kernel's body or a part of one.
    sources = {n for n in strings if not n.endswith("Header")}
    known = {part for name, k in KERNELS.items() for part in k.get("body", [name])}
    if sources != known:
        print(f"kernel sources {sorted(sources)} against the bodies known here {sorted(known)}: "
              "add the new kernel's instantiations to nvrtc_check.py")
        return 1
    found = nvrtc()
    if found is None:
        print("NVRTC is not installed in this Python (nvidia-cuda-nvrtc-cu12, nvidia-cuda-runtime-cu12)")
        return 3
    lib, include = found
    text = program(strings)
    for arch in (80, 90):
        status, log, ptx = compile_for(lib, include, text, arch)
        if status != 0:
            print(f"compute_{arch}: NVRTC failed (status {status}):\n{log}")
            return 1
        entries = len(re.findall(r"^\.(?:visible|weak) \.entry", ptx, re.M))
        want = sum(len(k["args"]) for k in KERNELS.values())
        if entries != want:
            print(f"compute_{arch}: {entries} kernels in the PTX, {want} instantiated")
            return 1
        print(f"compute_{arch}: {entries} kernel instantiations compiled, {ptx.count('mma.sync')} mma.sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
