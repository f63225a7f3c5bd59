// SPDX-License-Identifier: EUPL-1.2
//! Which BLAS MLX's CPU matmuls run on in this process.
//!
//! MLX's CPU backend calls `cblas_sgemm` for float32 matmuls. On Linux the
//! `mlx-cpu` wheel's `libmlx.so` carries the netlib reference BLAS, which is
//! tens of times slower than an optimised one; the build links the OpenBLAS
//! that `cargo xtask setup` fetched ahead of it (`mlx_build::blas`). [`info`]
//! says which library the symbol resolves to (the dynamic linker's global
//! search order, which is what `libmlx.so` binds to) and, for OpenBLAS, its
//! configuration and thread count; [`linked`] says what the build linked.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};

/// The BLAS in use, as the process resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlasInfo {
    /// The file that defines `cblas_sgemm` in the process's global search
    /// order (symbolic links resolved), when the symbol is there.
    pub library: Option<PathBuf>,
    /// OpenBLAS's own report, when the library in use is OpenBLAS.
    pub openblas: Option<OpenBlas>,
}

/// What OpenBLAS says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBlas {
    /// `openblas_get_config()`: version, build options, the kernel core.
    pub config: String,
    /// `openblas_get_num_threads()`.
    pub threads: usize,
}

impl BlasInfo {
    /// Whether the library in use is a reference (unoptimised) BLAS: the
    /// netlib `libblas` the Linux wheel carries.
    pub fn is_reference(&self) -> bool {
        self.openblas.is_none() && self.library.as_deref().is_some_and(is_reference_blas)
    }

    /// One line for people: the library, and for OpenBLAS its thread count
    /// and configuration.
    pub fn describe(&self) -> String {
        let path = self.library.as_ref().map_or_else(|| "not found".to_owned(), |p| p.display().to_string());
        match &self.openblas {
            Some(o) => format!("{path} ({}, {} threads)", o.config.trim(), o.threads),
            None if self.is_reference() => format!("{path} (the reference BLAS)"),
            None => path,
        }
    }

    /// A warning with the fix when float32 matmuls run on the reference
    /// BLAS; `None` otherwise.
    pub fn warning(&self) -> Option<String> {
        self.is_reference().then(|| {
            "float32 matmuls run on the reference BLAS MLX's wheel carries (tens of times slower than an \
             optimised one); fix: run `cargo xtask setup` (it fetches OpenBLAS into target/mlx/blas; on Debian \
             or Ubuntu `apt-get install libopenblas0-pthread` first makes it use the system's) and rebuild"
                .to_owned()
        })
    }
}

/// The netlib reference BLAS: `libblas.so*`, or the wheel's
/// `libblas-<hash>.so*` (auditwheel's renaming).
fn is_reference_blas(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libblas.") || n.starts_with("libblas-"))
}

/// The optimised BLAS the build linked ahead of libmlx's own, if any: the
/// path `mlx-sys`'s build script chose (`mlx_build::linked_blas`).
pub fn linked() -> Option<&'static Path> {
    let path = env!("MLXR_LINKED_BLAS");
    (!path.is_empty()).then(|| Path::new(path))
}

/// The BLAS this process's MLX calls: where `cblas_sgemm` resolves, and what
/// OpenBLAS says about itself when it is OpenBLAS.
pub fn info() -> BlasInfo {
    let sgemm = symbol("cblas_sgemm");
    let library = sgemm.and_then(library_of);
    let openblas = match (symbol("openblas_get_config"), symbol("openblas_get_num_threads")) {
        (Some(config), Some(threads)) if library.as_ref().is_some_and(|l| Some(l) == library_of(threads).as_ref()) => {
            // SAFETY: OpenBLAS defines both with these signatures:
            // `char *openblas_get_config(void)` returns a static string and
            // `int openblas_get_num_threads(void)` reads a global.
            let (config, threads) = unsafe {
                let config = std::mem::transmute::<*mut c_void, extern "C" fn() -> *const c_char>(config);
                let threads = std::mem::transmute::<*mut c_void, extern "C" fn() -> c_int>(threads);
                (config(), threads())
            };
            let config = if config.is_null() {
                String::new()
            } else {
                // SAFETY: a NUL-terminated static string.
                unsafe { CStr::from_ptr(config) }.to_string_lossy().into_owned()
            };
            Some(OpenBlas { config, threads: usize::try_from(threads).unwrap_or(0) })
        }
        _ => None,
    };
    BlasInfo { library, openblas }
}

/// The address `name` resolves to in the process's global search order.
fn symbol(name: &str) -> Option<*mut c_void> {
    let name = CString::new(name).ok()?;
    // SAFETY: `name` is NUL-terminated; RTLD_DEFAULT searches the global
    // scope and returns null when the symbol is absent.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

/// The file of the loaded object that holds `address`.
fn library_of(address: *mut c_void) -> Option<PathBuf> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr only reads the address and fills `info`; it returns
    // zero when the address is in no loaded object.
    if unsafe { libc::dladdr(address, info.as_mut_ptr()) } == 0 {
        return None;
    }
    // SAFETY: dladdr succeeded, so `info` is filled.
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: `dli_fname` is a NUL-terminated string owned by the loader.
    let name = PathBuf::from(unsafe { CStr::from_ptr(info.dli_fname) }.to_string_lossy().into_owned());
    // The file itself, not the link the loader found it through.
    Some(name.canonicalize().unwrap_or(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_reference_blas() {
        let reference = BlasInfo { library: Some("/x/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0".into()), openblas: None };
        assert!(reference.is_reference());
        assert!(reference.warning().is_some_and(|w| w.contains("cargo xtask setup")));
        assert!(reference.describe().ends_with("(the reference BLAS)"));
        let openblas = BlasInfo {
            library: Some("/x/blas/lib/libopenblas.so.0".into()),
            openblas: Some(OpenBlas { config: "OpenBLAS 0.3.31 SKYLAKEX".into(), threads: 2 }),
        };
        assert!(!openblas.is_reference());
        assert_eq!(openblas.warning(), None);
        assert_eq!(openblas.describe(), "/x/blas/lib/libopenblas.so.0 (OpenBLAS 0.3.31 SKYLAKEX, 2 threads)");
        let accelerate = BlasInfo { library: Some("/System/Library/Frameworks/Accelerate".into()), openblas: None };
        assert!(!accelerate.is_reference());
        assert_eq!(BlasInfo { library: None, openblas: None }.describe(), "not found");
    }
}
