// SPDX-License-Identifier: EUPL-1.2
//! Durable writes: the one way the workspace writes a file it means to keep
//! (safetensors, adapter configs, training state, sessions, prompt-cache
//! entries, fused models).
//!
//! [`write_durable`] writes a file so that, whatever happens, the target is
//! either its old contents or its new contents, never a mixture, and once it
//! returns `Ok` the new contents survive a crash of the machine:
//!
//! 1. a temporary file is created beside the target (same directory, so the
//!    rename below stays on one file system) under a fresh hidden name
//!    (`.NAME.PID-N-T.tmp`), *exclusively*: creation fails when anything is
//!    at that name, including a symbolic link, which is never followed (a
//!    planted link cannot redirect the write), and another name is tried;
//! 2. the contents are written and the file is `fsync`ed;
//! 3. the file is renamed over the target (atomic on POSIX; a symbolic link
//!    at the target is replaced, not written through);
//! 4. the directory is `fsync`ed, so the rename itself is on disk (on Unix;
//!    where the file system cannot sync a directory, this step is skipped).
//!
//! On any error before the rename the temporary file is removed and the
//! target is untouched. Hidden names in a directory are therefore writes in
//! progress (or left by a crash), never finished files.
//!
//! [`TempFile`] is the same steps as parts, for writers that need the
//! temporary *path* rather than a file handle: MLX's safetensors writer opens
//! a path itself ([`crate::io::save_safetensors`] hands it the temporary
//! file's path and checks, before committing, that the path still names the
//! file it created). [`StagedDir`] does the same for a whole directory (a
//! fused or converted model).
//!
//! A crash (of the process or the machine) can leave a hidden temporary file
//! or directory behind. [`sweep_stale`] removes such leftovers, recognised
//! by their exact name pattern, once they are old enough that no writer can
//! still be at work on them; the prompt cache sweeps its directory when it
//! opens it, and [`StagedDir::beside`] the leftovers of earlier attempts at
//! the same target (a crashed conversion leaves a model's worth of bytes).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

mod staged;

pub use staged::{STALE_AFTER, StagedDir, sweep_stale};

const OP: &str = "write_durable";

/// How many fresh names are tried before giving up (each is taken only when
/// something already sits at it).
const ATTEMPTS: u32 = 32;

fn io_err(path: &Path, source: io::Error) -> Error {
    Error::Io { op: OP, path: path.to_path_buf(), source }
}

/// `e` with `op` as its op when it is one of this module's errors, so a
/// caller's errors name the caller.
pub fn relabel(e: Error, op: &'static str) -> Error {
    match e {
        Error::Io { op: OP, path, source } => Error::Io { op, path, source },
        Error::InvalidArgument { op: OP, message } => Error::InvalidArgument { op, message },
        other => other,
    }
}

/// A name no other writer of this process has used, and unlikely to be used
/// by another process: the process id, a counter and the clock.
fn fresh_tag() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{}-{n}-{nanos:08x}", std::process::id())
}

/// The directory a target lives in (`.` for a bare file name) and its file name.
fn split_target(target: &Path) -> Result<(PathBuf, String)> {
    let name = target
        .file_name()
        .ok_or_else(|| Error::invalid(OP, format!("{} does not name a file", target.display())))?
        .to_string_lossy()
        .into_owned();
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// Creates a new file in `dir` under the first name `name(attempt)` gives at
/// which nothing exists yet. Never follows or reuses what is there: a file,
/// directory or symbolic link (even a dangling one) at a name makes it try
/// the next.
fn create_exclusive(dir: &Path, mut name: impl FnMut(u32) -> String) -> Result<(PathBuf, File)> {
    let mut last = None;
    for attempt in 0..ATTEMPTS {
        let path = dir.join(name(attempt));
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(path),
            Err(e) => return Err(io_err(&path, e)),
        }
    }
    let path = last.unwrap_or_else(|| dir.to_path_buf());
    Err(io_err(&path, io::Error::new(io::ErrorKind::AlreadyExists, "no free temporary name after 32 attempts")))
}

/// `fsync`s the directory `dir`, so that a rename or a new entry in it is on
/// disk. On Unix only; elsewhere, and on file systems that cannot sync a
/// directory (`EINVAL`, `ENOTSUP`), it does nothing.
///
/// # Errors
/// [`Error::Io`] naming `dir` when it cannot be opened or synced.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = File::open(dir).map_err(|e| io_err(dir, e))?;
        if let Err(e) = d.sync_all() {
            let unsupported = matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP))
                || e.kind() == io::ErrorKind::Unsupported;
            if !unsupported {
                return Err(io_err(dir, e));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// A temporary file beside a target, created exclusively; removed when
/// dropped unless [`TempFile::commit`] moved it into place.
#[derive(Debug)]
pub struct TempFile {
    target: PathBuf,
    dir: PathBuf,
    path: PathBuf,
    file: File,
    committed: bool,
}

impl TempFile {
    /// Creates `.NAME.TAG.tmpSUFFIX` beside `target` (see the module docs).
    /// `suffix` keeps an extension a writer insists on (`.safetensors` for
    /// MLX, which appends it to a name without it); usually `""`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `target` has no file name;
    /// [`Error::Io`] naming the temporary path when it cannot be created.
    pub fn beside(target: &Path, suffix: &str) -> Result<TempFile> {
        let (dir, name) = split_target(target)?;
        TempFile::create(target, dir, |_| format!(".{name}.{}.tmp{suffix}", fresh_tag()))
    }

    fn create(target: &Path, dir: PathBuf, name: impl FnMut(u32) -> String) -> Result<TempFile> {
        let (path, file) = create_exclusive(&dir, name)?;
        Ok(TempFile { target: target.to_path_buf(), dir, path, file, committed: false })
    }

    /// The temporary file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file it will replace.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The open temporary file, for writing.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Syncs the temporary file, renames it over the target and syncs the
    /// directory. Before that it checks that the temporary path still names
    /// the file it created (a writer that opened the path itself, as MLX
    /// does, must have written into that file, not into something put in
    /// its place).
    ///
    /// # Errors
    /// [`Error::Io`] naming the path that failed; the temporary file is
    /// removed when the rename did not happen, and the target is untouched.
    pub fn commit(mut self) -> Result<()> {
        self.check_still_ours()?;
        self.file.flush().map_err(|e| io_err(&self.path, e))?;
        self.file.sync_all().map_err(|e| io_err(&self.path, e))?;
        fs::rename(&self.path, &self.target).map_err(|e| io_err(&self.target, e))?;
        self.committed = true;
        sync_dir(&self.dir)
    }

    #[cfg(unix)]
    fn check_still_ours(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let ours = self.file.metadata().map_err(|e| io_err(&self.path, e))?;
        let now = fs::symlink_metadata(&self.path).map_err(|e| io_err(&self.path, e))?;
        if !now.file_type().is_file() || now.dev() != ours.dev() || now.ino() != ours.ino() {
            return Err(io_err(
                &self.path,
                io::Error::other("the temporary file was replaced while it was being written"),
            ));
        }
        Ok(())
    }

    #[cfg(not(unix))]
    fn check_still_ours(&self) -> Result<()> {
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes `path` durably (see the module docs): `write` fills a fresh
/// temporary file beside it, which is synced and renamed over `path`, and
/// the directory is synced.
///
/// # Errors
/// [`Error::Io`] naming the path that failed (the target for `write`'s own
/// errors); on any error before the rename the temporary file is removed and
/// `path` is untouched.
pub fn write_durable(path: &Path, write: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
    let mut tmp = TempFile::beside(path, "")?;
    write(tmp.file()).map_err(|e| io_err(path, e))?;
    tmp.commit()
}

/// [`write_durable`] with the whole contents at hand.
///
/// # Errors
/// As [`write_durable`].
pub fn write_durable_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_durable(path, |f| f.write_all(bytes))
}

/// Copies `from` to `to` durably (a [`write_durable`] of `from`'s bytes).
///
/// # Errors
/// [`Error::Io`] naming `from` when it cannot be opened, else as
/// [`write_durable`].
pub fn copy_durable(from: &Path, to: &Path) -> Result<()> {
    let mut src = File::open(from).map_err(|e| io_err(from, e))?;
    write_durable(to, |f| io::copy(&mut src, f).map(|_| ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in `dir`, sorted (staged.rs's tests use it too).
    pub(super) fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_target_is_replaced_whole_and_nothing_else_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("config.json");
        write_durable_bytes(&target, b"first").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"first");
        write_durable(&target, |f| {
            f.write_all(b"sec")?;
            f.write_all(b"ond")
        })
        .unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"second");
        assert_eq!(names(dir.path()), ["config.json"], "no temporary file is left");
        let copy = dir.path().join("copy.json");
        copy_durable(&target, &copy).unwrap();
        assert_eq!(fs::read(&copy).unwrap(), b"second");
        assert_eq!(names(dir.path()), ["config.json", "copy.json"]);
    }

    #[test]
    fn a_failed_write_leaves_the_target_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state.bin");
        fs::write(&target, b"old").unwrap();
        let err = write_durable(&target, |f| {
            f.write_all(b"half of the new")?;
            Err(io::Error::other("disk on fire"))
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("state.bin") && msg.contains("disk on fire"), "{msg}");
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["state.bin"]);

        // A failing rename (the target is a non-empty directory) also cleans up.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("inside"), b"x").unwrap();
        let err = write_durable_bytes(&blocked, b"new").unwrap_err().to_string();
        assert!(err.contains("blocked"), "{err}");
        assert_eq!(names(dir.path()), ["blocked", "state.bin"]);
        assert_eq!(names(&blocked), ["inside"]);

        // A missing directory is named.
        let err = write_durable_bytes(&dir.path().join("nope/file"), b"x").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
        // A path without a file name is refused.
        assert!(write_durable_bytes(Path::new("/"), b"x").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_at_a_temporary_name_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let planted = dir.path().join(".out.planted.tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let dangling = dir.path().join(".out.dangling.tmp");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        let target = dir.path().join("out");
        // The first two names tried are the planted links; the third is free.
        let tries = [".out.planted.tmp", ".out.dangling.tmp", ".out.free.tmp"];
        let mut tmp = TempFile::create(&target, dir.path().to_path_buf(), |i| tries[i as usize].into()).unwrap();
        assert_eq!(tmp.path(), dir.path().join(".out.free.tmp"));
        tmp.file().write_all(b"new").unwrap();
        tmp.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(fs::read(&victim).unwrap(), b"precious", "the link's target was not written");
        assert!(!dir.path().join("nowhere").exists(), "the dangling link was not followed");
        // Only links at every name: an error naming the last, nothing written.
        let err = TempFile::create(&target, dir.path().to_path_buf(), |_| ".out.planted.tmp".into()).unwrap_err();
        assert!(err.to_string().contains(".out.planted.tmp"), "{err}");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }

    #[cfg(unix)]
    #[test]
    fn a_temporary_file_swapped_for_a_link_is_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let target = dir.path().join("model.safetensors");
        fs::write(&target, b"old").unwrap();
        let tmp = TempFile::beside(&target, ".safetensors").unwrap();
        let name = tmp.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".model.safetensors.") && name.ends_with(".tmp.safetensors"), "{name}");
        fs::remove_file(tmp.path()).unwrap();
        std::os::unix::fs::symlink(&victim, tmp.path()).unwrap();
        let err = tmp.commit().unwrap_err().to_string();
        assert!(err.contains("replaced"), "{err}");
        assert_eq!(fs::read(&target).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["model.safetensors", "victim"], "the planted link was removed");
    }

    #[test]
    fn directories_sync_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        sync_dir(dir.path()).unwrap();
        #[cfg(unix)]
        {
            let err = sync_dir(&dir.path().join("missing")).unwrap_err().to_string();
            assert!(err.contains("missing"), "{err}");
        }
    }
}
