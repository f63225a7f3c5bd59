// SPDX-License-Identifier: EUPL-1.2
//! The committed FFI bindings must match the C shim's header.

#[test]
fn bindings_are_fresh() {
    let (recorded, computed) = mlx_metal::__bindings_freshness();
    assert_eq!(recorded, computed, "crates/mlx-metal/src/ffi/bindings.rs is stale: run `cargo xtask bindgen`");
}
