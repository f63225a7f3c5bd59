// SPDX-License-Identifier: EUPL-1.2
//! The script a bridge process runs: the Python files shipped in this crate ([`BRIDGE_FILES`]),
//! written side by side into a temporary directory, or a script file for tests.

use std::path::PathBuf;

use inference_core::{Error, Result};
use tempfile::TempDir;

/// The bridge's entry script shipped in this crate (`bridge.py`), written with the modules it
/// imports ([`BRIDGE_FILES`]) to a temporary directory for each process.
pub const BRIDGE_SOURCE: &str = include_str!("../../bridge/bridge.py");

/// Every file of the shipped bridge by file name: the entry script [`BRIDGE_SOURCE`] and the
/// modules beside it that it imports.
pub const BRIDGE_FILES: &[(&str, &str)] = &[
    ("bridge.py", BRIDGE_SOURCE),
    ("bridge_protocol.py", include_str!("../../bridge/bridge_protocol.py")),
    ("bridge_settings.py", include_str!("../../bridge/bridge_settings.py")),
    ("bridge_text.py", include_str!("../../bridge/bridge_text.py")),
    ("bridge_generate.py", include_str!("../../bridge/bridge_generate.py")),
    ("bridge_batch.py", include_str!("../../bridge/bridge_batch.py")),
    ("bridge_inspect.py", include_str!("../../bridge/bridge_inspect.py")),
];

/// Which script the process runs.
#[derive(Debug, Clone)]
pub(crate) enum Script {
    /// [`BRIDGE_FILES`], written out to a temporary directory.
    Shipped,
    /// A script file, for tests (the mock bridge).
    File(PathBuf),
}

impl Script {
    /// The script to run, with the temporary directory that holds it when it is the shipped
    /// bridge (removed when dropped).
    pub(super) fn materialise(&self) -> Result<(Option<TempDir>, PathBuf)> {
        match self {
            Script::Shipped => {
                let dir = tempfile::Builder::new()
                    .prefix("mlxlm-bridge-")
                    .tempdir()
                    .map_err(|err| Error::io(std::env::temp_dir(), err))?;
                for (name, source) in BRIDGE_FILES {
                    let path = dir.path().join(name);
                    std::fs::write(&path, source).map_err(|err| Error::io(&path, err))?;
                }
                let path = dir.path().join("bridge.py");
                Ok((Some(dir), path))
            }
            Script::File(path) => Ok((None, path.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bridge_file_is_shipped() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bridge");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("the bridge directory")
            .map(|e| e.expect("an entry").file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".py"))
            .collect();
        on_disk.sort();
        let mut shipped: Vec<String> = BRIDGE_FILES.iter().map(|(name, _)| (*name).to_owned()).collect();
        shipped.sort();
        assert_eq!(shipped, on_disk, "BRIDGE_FILES must list every Python file in bridge/");
    }
}
