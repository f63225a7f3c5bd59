// SPDX-License-Identifier: EUPL-1.2
//! The committed FFI bindings must match the C shim's headers: `src/bindings.rs` records the
//! FNV-1a hash of `csrc/mlxs.h` and of the headers it includes, in the order of its includes,
//! that it was generated from (`cargo xtask bindgen`).

use std::path::{Path, PathBuf};

/// The 64-bit FNV-1a hash, as `cargo xtask bindgen` writes it.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

fn csrc() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("csrc")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("could not read {}: {e}", path.display()))
}

/// The names in the `#include "..."` lines of `mlxs.h`, in order.
fn included_headers() -> Vec<String> {
    read(&csrc().join("mlxs.h"))
        .lines()
        .filter_map(|l| Some(l.trim_start().strip_prefix("#include \"")?.split('"').next()?.to_string()))
        .collect()
}

/// `mlxs.h` and the headers it includes, in the order `cargo xtask bindgen` hashes them.
fn headers() -> Vec<(PathBuf, String)> {
    let dir = csrc();
    std::iter::once("mlxs.h".to_string())
        .chain(included_headers())
        .map(|name| {
            let path = dir.join(name);
            let text = read(&path);
            (path, text)
        })
        .collect()
}

#[test]
fn bindings_are_fresh() {
    let bytes: Vec<u8> = headers().into_iter().flat_map(|(_, text)| text.into_bytes()).collect();
    let bindings = include_str!("../src/bindings.rs");
    let recorded = bindings.lines().find_map(|l| l.strip_prefix("// header-hash: ")).unwrap_or("");
    assert!(!recorded.is_empty(), "crates/mlx-sys/src/bindings.rs records no header hash: run `cargo xtask bindgen`");
    assert_eq!(
        recorded,
        format!("{:016x}", fnv1a64(&bytes)),
        "crates/mlx-sys/src/bindings.rs is stale: run `cargo xtask bindgen`"
    );
}

#[test]
fn every_header_is_included_by_mlxs_h() {
    // A header of the C ABI that `mlxs.h` does not include would be neither bound nor hashed.
    let included = included_headers();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(csrc()).expect("csrc is readable") {
        let name = entry.expect("csrc entry").file_name().to_string_lossy().into_owned();
        // `*_internal.h`: helpers shared by translation units, not part of the C ABI.
        let abi = name.starts_with("mlxs_") && name.ends_with(".h") && !name.ends_with("_internal.h");
        if abi && !included.contains(&name) {
            missing.push(name);
        }
    }
    assert!(missing.is_empty(), "csrc/mlxs.h does not include {missing:?}");
}

#[test]
fn every_shim_function_is_declared() {
    // Every `mlxs_*(` function the headers declare has a binding (bindgen's allowlist is `mlxs_.*`).
    let bindings = include_str!("../src/bindings.rs");
    let mut checked = 0;
    for (path, header) in headers() {
        for line in header.lines().filter(|l| !l.trim_start().starts_with("//")) {
            let Some(open) = line.find('(') else { continue };
            let Some(name) = line[..open].split(|c: char| !(c.is_alphanumeric() || c == '_')).rfind(|w| !w.is_empty())
            else {
                continue;
            };
            if name.starts_with("mlxs_") && !line.contains("typedef") {
                assert!(
                    bindings.contains(&format!("pub fn {name}(")),
                    "{name} is in {} but not in the bindings",
                    path.display()
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "found only {checked} shim functions in the headers");
}
