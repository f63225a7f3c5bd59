// SPDX-License-Identifier: EUPL-1.2
//! Files the CLI writes for the person at the terminal (a chat's conversation, a bench report).

use std::path::Path;

use crate::failure::Failure;

/// Writes `bytes` to `path`: durably, through `mlx::io::write_durable_bytes` (a temporary file
/// beside it, synced and renamed into place), when MLX is built in; a build without the `metal`
/// feature has no MLX and writes the file directly.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    #[cfg(feature = "metal")]
    let result = mlx::io::write_durable_bytes(path, bytes).map_err(|e| match e {
        mlx::Error::Io { path: p, source, .. } if p == path => source.to_string(),
        mlx::Error::Io { path: p, source, .. } => format!("{}: {source}", p.display()),
        other => other.to_string(),
    });
    #[cfg(not(feature = "metal"))]
    let result = std::fs::write(path, bytes).map_err(|e| e.to_string());
    result.map_err(|e| Failure::new(format!("cannot write {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::write_file;

    #[test]
    fn a_file_is_replaced_whole_and_a_failure_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.json");
        write_file(&path, b"one").unwrap();
        write_file(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["chat.json"]);
        let missing = dir.path().join("no/such/dir/chat.json");
        let err = write_file(&missing, b"x").unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("cannot write {}", missing.display())) && err.contains("no/such/dir"),
            "{err}"
        );
    }
}
