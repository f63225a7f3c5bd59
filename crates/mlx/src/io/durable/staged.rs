// SPDX-License-Identifier: EUPL-1.2
//! Whole directories written durably ([`StagedDir`]) and the sweep of what
//! crashed writes leave behind ([`sweep_stale`]); see [`super`].

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{ATTEMPTS, fresh_tag, io_err, split_target, sync_dir};
use crate::error::Result;

/// A directory being built beside its target, then moved into place whole
/// ([`StagedDir::commit`]); dropped uncommitted (an error on the way), it is
/// removed with everything in it.
#[derive(Debug)]
pub struct StagedDir {
    path: PathBuf,
    target: PathBuf,
}

impl StagedDir {
    /// Creates a fresh, empty, hidden directory beside `target`
    /// (`.NAME.TAG.tmp`), exclusively.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) when `target`
    /// has no file name; [`Error::Io`](crate::Error::Io) naming the path when it
    /// cannot be created.
    ///
    /// Leftovers of earlier attempts at the same target older than
    /// [`STALE_AFTER`] are removed first (see [`sweep_stale`]).
    pub fn beside(target: &Path) -> Result<StagedDir> {
        let (dir, name) = split_target(target)?;
        let _ = sweep(&dir, STALE_AFTER, Some(&name));
        for _ in 0..ATTEMPTS {
            let path = dir.join(format!(".{name}.{}.tmp", fresh_tag()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(StagedDir { path, target: target.to_path_buf() }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&path, e)),
            }
        }
        Err(io_err(target, io::Error::new(io::ErrorKind::AlreadyExists, "no free temporary name after 32 attempts")))
    }

    /// The directory to write the files into (durably).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the finished directory into place as the target: it is synced
    /// and renamed to the target, and the parent directory is synced. A
    /// missing or empty target is simply replaced. A target that holds
    /// anything is refused unless `replace_non_empty`; then it is first
    /// renamed aside (`.NAME.TAG.old`) and, once the new one is in place,
    /// removed with everything in it.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) naming the path that failed. Until the rename the target
    /// is untouched (an old directory renamed aside is put back when the
    /// second rename fails), and the staged directory is removed.
    pub fn commit(self, replace_non_empty: bool) -> Result<()> {
        replace_dir(&self.path, &self.target, replace_non_empty)
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        // Gone already once committed; otherwise a half-built directory.
        if fs::symlink_metadata(&self.path).is_ok() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// How old a leftover must be before [`StagedDir::beside`] (and the prompt
/// cache) sweep it: far longer than any write of this module takes.
pub const STALE_AFTER: Duration = Duration::from_secs(3600);

/// Removes from `dir` (not below it) the leftovers of this module's writes
/// that a crash left behind — temporary files and directories
/// (`.NAME.PID-N-T.tmp`, `.NAME.PID-N-T.tmpSUFFIX`) and directories renamed
/// aside (`.NAME.PID-N-T.old`) — last modified more than `older_than` ago, and
/// returns what it removed. Nothing else is touched: other hidden files,
/// and anything younger, which may be a write in progress in another process.
/// A leftover that cannot be removed is skipped.
///
/// # Errors
/// [`Error::Io`](crate::Error::Io) naming `dir` when it cannot be read.
pub fn sweep_stale(dir: &Path, older_than: Duration) -> Result<Vec<PathBuf>> {
    sweep(dir, older_than, None)
}

/// [`sweep_stale`], only of leftovers of the target `name` when given.
fn sweep(dir: &Path, older_than: Duration, name: Option<&str>) -> Result<Vec<PathBuf>> {
    let now = SystemTime::now();
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let Ok(entry) = entry else { continue };
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else { continue };
        match leftover_of(file_name) {
            Some(target) if name.is_none_or(|n| n == target) => {}
            _ => continue,
        }
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok());
        if age.is_none_or(|a| a <= older_than) {
            continue;
        }
        let gone = if meta.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    Ok(removed)
}

/// The target name of a leftover's name (`.NAME.PID-N-T.tmp[SUFFIX]` or
/// `.NAME.PID-N-T.old`), or `None` for any other name.
fn leftover_of(file_name: &str) -> Option<&str> {
    let rest = file_name.strip_prefix('.')?;
    // The tag is the last `.`-separated part before `tmp` or `old` that fits.
    let parts: Vec<&str> = rest.split('.').collect();
    for i in (1..parts.len().saturating_sub(1)).rev() {
        let kind = parts[i + 1];
        let tmp = kind == "tmp";
        let old = kind == "old" && i + 2 == parts.len();
        if (tmp || old) && is_tag(parts[i]) {
            let name_len = parts[..i].iter().map(|p| p.len() + 1).sum::<usize>() - 1;
            return Some(&rest[..name_len]);
        }
    }
    None
}

/// Whether `s` is a [`fresh_tag`]: `PID-N-T`, decimal, decimal, eight hex digits.
fn is_tag(s: &str) -> bool {
    let mut it = s.split('-');
    let digits = |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let (pid, n, t) = (it.next(), it.next(), it.next());
    digits(pid)
        && digits(n)
        && t.is_some_and(|t| t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        && it.next().is_none()
}

fn replace_dir(staged: &Path, target: &Path, replace_non_empty: bool) -> Result<()> {
    let (parent, name) = split_target(target)?;
    sync_dir(staged)?;
    let occupied = match fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => fs::read_dir(target).map_err(|e| io_err(target, e))?.next().is_some(),
        Ok(_) => {
            return Err(io_err(target, io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a directory")));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_err(target, e)),
    };
    if !occupied {
        // A missing target, or an empty directory, which rename replaces.
        fs::rename(staged, target).map_err(|e| io_err(target, e))?;
        return sync_dir(&parent);
    }
    if !replace_non_empty {
        return Err(io_err(target, io::Error::new(io::ErrorKind::AlreadyExists, "the directory is not empty")));
    }
    let old = parent.join(format!(".{name}.{}.old", fresh_tag()));
    fs::rename(target, &old).map_err(|e| io_err(target, e))?;
    if let Err(e) = fs::rename(staged, target) {
        let _ = fs::rename(&old, target);
        return Err(io_err(target, e));
    }
    sync_dir(&parent)?;
    fs::remove_dir_all(&old).map_err(|e| io_err(&old, e))
}

#[cfg(test)]
mod tests {
    use super::super::tests::names;
    use super::super::write_durable_bytes;
    use super::*;
    use std::fs::File;

    fn age(path: &Path, secs: u64) {
        let when = SystemTime::now() - Duration::from_secs(secs);
        File::open(path).unwrap().set_times(fs::FileTimes::new().set_modified(when)).unwrap();
    }

    #[test]
    fn leftovers_are_known_by_their_exact_names() {
        let tag = fresh_tag();
        assert_eq!(leftover_of(&format!(".config.json.{tag}.tmp")), Some("config.json"));
        assert_eq!(leftover_of(&format!(".a.b.safetensors.{tag}.tmp.safetensors")), Some("a.b.safetensors"));
        assert_eq!(leftover_of(&format!(".fused.{tag}.old")), Some("fused"));
        for not in [
            ".hidden".to_string(),
            ".config.json.tmp".into(),
            format!(".x.{tag}.old.more"),
            format!("x.{tag}.tmp"),
            ".x.1-2-zzzzzzzz.tmp".into(),
            ".x.1-2-0000000.tmp".into(),
            ".x.a-2-00000000.tmp".into(),
            ".mlxr-stamp.json".into(),
        ] {
            assert_eq!(leftover_of(&not), None, "{not}");
        }
    }

    #[test]
    fn old_leftovers_are_swept_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let tag = fresh_tag();
        let old_file = dir.path().join(format!(".entry.safetensors.{tag}.tmp.safetensors"));
        let old_dir = dir.path().join(format!(".model.{tag}.tmp"));
        let young = dir.path().join(format!(".other.{tag}.tmp"));
        let kept = [dir.path().join(".hidden"), dir.path().join("entry.safetensors")];
        fs::write(&old_file, b"half").unwrap();
        fs::create_dir(&old_dir).unwrap();
        fs::write(old_dir.join("model-00001-of-00002.safetensors"), b"half").unwrap();
        fs::write(&young, b"in progress").unwrap();
        for p in &kept {
            fs::write(p, b"keep").unwrap();
        }
        for p in [&old_file, &old_dir, &kept[0], &kept[1]] {
            age(p, 7200);
        }
        let mut removed = sweep_stale(dir.path(), STALE_AFTER).unwrap();
        removed.sort();
        let mut want = vec![old_file.clone(), old_dir.clone()];
        want.sort();
        assert_eq!(removed, want);
        let mut left = names(dir.path());
        left.sort();
        let mut expect = vec![".hidden".to_string(), "entry.safetensors".into(), format!(".other.{tag}.tmp")];
        expect.sort();
        assert_eq!(left, expect);
        // A staged directory sweeps the old leftovers of its own target only.
        let mine = dir.path().join(format!(".fused.{tag}.old"));
        let theirs = dir.path().join(format!(".other-model.{tag}.tmp"));
        for p in [&mine, &theirs] {
            fs::create_dir(p).unwrap();
            age(p, 7200);
        }
        let staged = StagedDir::beside(&dir.path().join("fused")).unwrap();
        assert!(!mine.exists() && theirs.exists());
        drop(staged);
        assert!(sweep_stale(&dir.path().join("missing"), STALE_AFTER).is_err());
    }

    #[test]
    fn a_staged_directory_replaces_the_old_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("fused");
        // Into a missing target.
        let staged = StagedDir::beside(&target).unwrap();
        write_durable_bytes(&staged.path().join("config.json"), b"one").unwrap();
        staged.commit(false).unwrap();
        assert_eq!(names(&target), ["config.json"]);
        // Not over a directory that holds anything, unless asked: the target
        // is left as it was, and the staged directory is removed.
        let staged = StagedDir::beside(&target).unwrap();
        let err = staged.commit(false).unwrap_err().to_string();
        assert!(err.contains("fused") && err.contains("not empty"), "{err}");
        assert_eq!(names(&target), ["config.json"]);
        assert_eq!(names(dir.path()), ["fused"], "the refused staged directory is gone");
        // Over an old directory with files and a subdirectory of its own: nothing of it is left.
        fs::write(target.join("model.safetensors.index.json"), b"stale").unwrap();
        fs::create_dir(target.join("sub")).unwrap();
        let staged = StagedDir::beside(&target).unwrap();
        write_durable_bytes(&staged.path().join("config.json"), b"two").unwrap();
        staged.commit(true).unwrap();
        assert_eq!(names(&target), ["config.json"]);
        assert_eq!(fs::read(target.join("config.json")).unwrap(), b"two");
        assert_eq!(names(dir.path()), ["fused"], "no staged or old directory is left");
        // Dropped before commit (an error while writing): removed with its files.
        let staged = StagedDir::beside(&target).unwrap();
        write_durable_bytes(&staged.path().join("half.safetensors"), b"...").unwrap();
        drop(staged);
        assert_eq!(names(dir.path()), ["fused"]);
        // A file in the way is refused and left alone.
        let file = dir.path().join("file");
        fs::write(&file, b"x").unwrap();
        let staged = StagedDir::beside(&file).unwrap();
        assert!(staged.commit(true).unwrap_err().to_string().contains("not a directory"));
        assert_eq!(fs::read(&file).unwrap(), b"x");
    }
}
