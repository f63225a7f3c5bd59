// SPDX-License-Identifier: EUPL-1.2
//! The committed FFI bindings must match the C shim's header: `src/bindings.rs` records the
//! FNV-1a hash of `csrc/mlxs.h` it was generated from (`cargo xtask bindgen`).

/// The 64-bit FNV-1a hash, as `cargo xtask bindgen` writes it.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[test]
fn bindings_are_fresh() {
    let header = include_bytes!("../csrc/mlxs.h");
    let bindings = include_str!("../src/bindings.rs");
    let recorded = bindings.lines().find_map(|l| l.strip_prefix("// header-hash: ")).unwrap_or("");
    assert!(!recorded.is_empty(), "crates/mlx-sys/src/bindings.rs records no header hash: run `cargo xtask bindgen`");
    assert_eq!(
        recorded,
        format!("{:016x}", fnv1a64(header)),
        "crates/mlx-sys/src/bindings.rs is stale: run `cargo xtask bindgen`"
    );
}

#[test]
fn every_shim_function_is_declared() {
    // Every `mlxs_*(` function the header declares has a binding (bindgen's allowlist is `mlxs_.*`).
    let header = include_str!("../csrc/mlxs.h");
    let bindings = include_str!("../src/bindings.rs");
    let mut checked = 0;
    for line in header.lines().filter(|l| !l.trim_start().starts_with("//")) {
        let Some(open) = line.find('(') else { continue };
        let Some(name) = line[..open].split(|c: char| !(c.is_alphanumeric() || c == '_')).rfind(|w| !w.is_empty())
        else {
            continue;
        };
        if name.starts_with("mlxs_") && !line.contains("typedef") {
            assert!(bindings.contains(&format!("pub fn {name}(")), "{name} is in mlxs.h but not in the bindings");
            checked += 1;
        }
    }
    assert!(checked > 100, "found only {checked} shim functions in mlxs.h");
}
