// SPDX-License-Identifier: EUPL-1.2
//! `cargo xtask fixtures` (being written).

pub(crate) fn run(_args: &[String]) -> Result<(), String> {
    Err("fixtures: not built yet".into())
}
