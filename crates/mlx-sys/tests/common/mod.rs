// SPDX-License-Identifier: EUPL-1.2
//! What the tests that use the fixtures' virtualenv share: finding its Python (`MLXR_PYTHON`, set by
//! `cargo xtask test`), and skipping when it is not there unless `MLXR_REQUIRE_REAL_MODELS=1`.

use std::path::PathBuf;

/// The fixtures' Python.
pub(crate) fn fixtures_python() -> Result<PathBuf, String> {
    std::env::var_os("MLXR_PYTHON").map(PathBuf::from).ok_or_else(|| "MLXR_PYTHON is not set".to_owned())
}

/// Says why `what` is skipped, or fails when `MLXR_REQUIRE_REAL_MODELS=1` and `required_here`.
pub(crate) fn skip_or_fail(what: &str, why: &str, required_here: bool) {
    let required = std::env::var("MLXR_REQUIRE_REAL_MODELS").is_ok_and(|v| v == "1") && required_here;
    assert!(!required, "MLXR_REQUIRE_REAL_MODELS=1 but {why}");
    eprintln!("skipping {what}: {why}");
}
