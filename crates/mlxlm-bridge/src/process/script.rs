// SPDX-License-Identifier: EUPL-1.2
//! The script a bridge process runs: the Python files shipped in this crate ([`BRIDGE_FILES`]),
//! written side by side into a temporary directory, or a script file for tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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

/// The start of the name of each temporary directory the shipped bridge is written to.
const DIR_PREFIX: &str = "mlxlm-bridge-";

/// The variable that asks the shipped bridge to remove its own directory once it has imported
/// its modules (`bridge.py`'s `remove_own_directory`); it holds that directory's path.
const REMOVE_DIR_ENV: &str = "MLXR_BRIDGE_REMOVE_DIR";

/// A script directory of ours this much older than its last change is a leftover: the bridge
/// removes its own within moments of starting, so only a process killed in those moments (or a
/// version of mlxr before it did) leaves one behind.
const STALE_AFTER: Duration = Duration::from_secs(60 * 60);

/// Which script the process runs.
#[derive(Debug, Clone)]
pub(crate) enum Script {
    /// [`BRIDGE_FILES`], written out to a temporary directory.
    Shipped,
    /// A script file, for tests (the mock bridge).
    File(PathBuf),
}

/// A script ready to run: its path, and the temporary directory that holds it when it is the
/// shipped bridge.
///
/// The directory must not outlive the start, whatever ends `mlxr` later: the bridge removes it
/// itself as soon as it has imported its modules (asked through [`Materialised::env`]), before it
/// imports mlx-lm, so a signal to `mlxr` or `kill -9` while the model loads or generates leaves
/// nothing. Dropping this removes it too, if it is still there (a bridge that never started).
/// Leftovers of processes killed before the bridge got that far are swept at the next start
/// ([`sweep_stale`]).
#[derive(Debug)]
pub(crate) struct Materialised {
    pub(super) path: PathBuf,
    dir: Option<TempDir>,
}

impl Materialised {
    /// The variables the child needs: the directory for the bridge to remove, if any.
    pub(super) fn env(&self) -> Option<(&'static str, &Path)> {
        self.dir.as_ref().map(|dir| (REMOVE_DIR_ENV, dir.path()))
    }

    /// The directory that holds the shipped bridge.
    #[cfg(test)]
    pub(super) fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(TempDir::path)
    }
}

impl Script {
    /// The script to run; the shipped bridge is written to a fresh private directory (mode
    /// 0700, an unpredictable name) in the temporary directory, after stale ones are swept.
    pub(super) fn materialise(&self) -> Result<Materialised> {
        match self {
            Script::Shipped => {
                let mut builder = tempfile::Builder::new();
                builder.prefix(DIR_PREFIX);
                // tempfile's directories are 0777 less the umask unless told otherwise.
                #[cfg(unix)]
                builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700));
                let dir = builder.tempdir().map_err(|err| Error::io(std::env::temp_dir(), err))?;
                sweep_stale(&std::env::temp_dir(), dir.path(), SystemTime::now());
                for (name, source) in BRIDGE_FILES {
                    let path = dir.path().join(name);
                    std::fs::write(&path, source).map_err(|err| Error::io(&path, err))?;
                }
                let path = dir.path().join("bridge.py");
                Ok(Materialised { path, dir: Some(dir) })
            }
            Script::File(path) => Ok(Materialised { path: path.clone(), dir: None }),
        }
    }
}

/// Removes the bridge directories in `tmp` left by processes killed before their bridge removed
/// its own: directories (never symbolic links) named with [`DIR_PREFIX`], owned by whoever owns
/// `fresh` (the directory just made, so this user), unchanged for [`STALE_AFTER`] before `now`,
/// that hold nothing but files of [`BRIDGE_FILES`]. Best effort: anything unreadable is left.
fn sweep_stale(tmp: &Path, fresh: &Path, now: SystemTime) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    #[cfg(unix)]
    let Ok(owner) = std::fs::symlink_metadata(fresh).map(|m| std::os::unix::fs::MetadataExt::uid(&m)) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = entry.file_name().to_str().is_some_and(|name| name.starts_with(DIR_PREFIX));
        if !ours || path == fresh || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        #[cfg(unix)]
        if std::os::unix::fs::MetadataExt::uid(&meta) != owner {
            continue;
        }
        let stale = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).is_some_and(|age| age >= STALE_AFTER);
        if stale && holds_only_bridge_files(&path) {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Whether `dir` holds nothing but plain files named as in [`BRIDGE_FILES`].
fn holds_only_bridge_files(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.into_iter().all(|entry| {
        entry.is_ok_and(|e| {
            let name = e.file_name();
            e.file_type().is_ok_and(|t| t.is_file()) && BRIDGE_FILES.iter().any(|(file, _)| name == *file)
        })
    })
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

    /// Makes `tmp/name` holding `files` (name, contents).
    fn dir_with(tmp: &Path, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = tmp.join(name);
        std::fs::create_dir(&dir).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    #[test]
    fn stale_bridge_directories_are_swept_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = dir_with(tmp.path(), "mlxlm-bridge-fresh", &[]);
        let stale = dir_with(tmp.path(), "mlxlm-bridge-stale", &BRIDGE_FILES[..2]);
        let empty = dir_with(tmp.path(), "mlxlm-bridge-empty", &[]);
        let foreign = dir_with(tmp.path(), "mlxlm-bridge-foreign", &[("bridge.py", ""), ("notes.txt", "mine")]);
        let other = dir_with(tmp.path(), "other-dir", &BRIDGE_FILES[..1]);
        std::fs::write(tmp.path().join("mlxlm-bridge-file"), "a file").unwrap();
        #[cfg(unix)]
        let target = dir_with(tmp.path(), "target", &BRIDGE_FILES[..1]);
        #[cfg(unix)]
        std::os::unix::fs::symlink(&target, tmp.path().join("mlxlm-bridge-link")).unwrap();

        // Just made: nothing is old enough.
        sweep_stale(tmp.path(), &fresh, SystemTime::now());
        assert!(stale.exists() && empty.exists());

        sweep_stale(tmp.path(), &fresh, SystemTime::now() + STALE_AFTER + Duration::from_secs(1));
        assert!(!stale.exists() && !empty.exists(), "stale bridge directories are removed");
        assert!(fresh.exists(), "the directory just made stays");
        assert!(foreign.join("notes.txt").exists(), "a directory with files of others stays");
        assert!(other.exists() && tmp.path().join("mlxlm-bridge-file").exists());
        #[cfg(unix)]
        assert!(tmp.path().join("mlxlm-bridge-link").exists() && target.join("bridge.py").exists());
    }

    #[test]
    fn the_shipped_bridge_is_written_to_a_private_directory_that_drop_removes() {
        let script = Script::Shipped.materialise().unwrap();
        let dir = script.dir().expect("a directory").to_owned();
        assert_eq!(script.path, dir.join("bridge.py"));
        assert_eq!(script.env(), Some((REMOVE_DIR_ENV, dir.as_path())));
        for (name, source) in BRIDGE_FILES {
            assert_eq!(std::fs::read_to_string(dir.join(name)).unwrap(), *source);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        }
        drop(script);
        assert!(!dir.exists());
        let file = Script::File(PathBuf::from("mock.py")).materialise().unwrap();
        assert_eq!((file.path.as_path(), file.env()), (Path::new("mock.py"), None));
    }
}
