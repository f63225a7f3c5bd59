// SPDX-License-Identifier: EUPL-1.2
//! Finding model directories on disk.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::iter::FusedIterator;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{DiscoveredModel, Error, Result};

/// Walks `base` for model directories: those holding a readable `config.json` file and at least
/// one `*.safetensors` file.
///
/// The walk is lazy and deterministic: depth first, entries in lexical (byte) order, a
/// qualifying directory yielded before its subdirectories, which are still searched. Symbolic
/// links are followed; a directory reached twice (a link loop, or two links to one place) is
/// visited once, at its first path in walk order. Directories that cannot be read are skipped and
/// listed by [`Discover::skipped`]; nothing in the tree can make the walk panic or loop.
///
/// For each model, the architecture comes from config.json's `model_type`, else
/// `text_config.model_type`, else `architectures[0]`; the quantisation from
/// `quantization.{bits, group_size}`, else `quantization_config.{bits, group_size}`. A
/// config.json that is not valid JSON still yields the model, with those fields `None`.
///
/// Paths are absolute: `base` is made canonical (so a relative base is resolved against the
/// current directory), and each model's path is that joined with the names walked.
///
/// ```no_run
/// for model in inference_core::discover("/models")? {
///     println!("{} {:?} {} files", model.path.display(), model.model_type, model.num_files);
/// }
/// # Ok::<(), inference_core::Error>(())
/// ```
///
/// # Errors
///
/// [`Error::Io`] when `base` does not exist, cannot be resolved, or is not a directory.
pub fn discover(base: impl AsRef<Path>) -> Result<Discover> {
    let base = base.as_ref();
    let canonical = fs::canonicalize(base).map_err(|e| Error::io(base, e))?;
    let meta = fs::metadata(&canonical).map_err(|e| Error::io(base, e))?;
    if !meta.is_dir() {
        return Err(Error::io(base, io::Error::new(io::ErrorKind::NotADirectory, "not a directory")));
    }
    Ok(Discover { stack: vec![canonical], visited: HashSet::new(), skipped: Vec::new() })
}

/// The iterator returned by [`discover`](discover()).
#[derive(Debug)]
pub struct Discover {
    /// Directories still to visit; the next one is last.
    stack: Vec<PathBuf>,
    /// Canonical paths of the directories visited so far.
    visited: HashSet<PathBuf>,
    skipped: Vec<SkippedPath>,
}

/// A path that [`Discover`] could not read, and why.
#[derive(Debug)]
pub struct SkippedPath {
    /// The directory or file.
    pub path: PathBuf,
    /// The error reading it.
    pub error: io::Error,
}

impl Discover {
    /// The paths skipped so far because they could not be read (directories, their entries, or a
    /// model's config.json), in walk order.
    pub fn skipped(&self) -> &[SkippedPath] {
        &self.skipped
    }

    fn skip(&mut self, path: PathBuf, error: io::Error) {
        self.skipped.push(SkippedPath { path, error });
    }

    /// Visits one directory: queues its subdirectories and returns the model it holds, if any.
    fn visit(&mut self, dir: PathBuf) -> Option<DiscoveredModel> {
        let canonical = match fs::canonicalize(&dir) {
            Ok(c) => c,
            Err(e) => {
                self.skip(dir, e);
                return None;
            }
        };
        if !self.visited.insert(canonical) {
            return None;
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                self.skip(dir, e);
                return None;
            }
        };

        let mut subdirs: Vec<(OsString, PathBuf)> = Vec::new();
        let mut has_config = false;
        let mut num_files = 0;
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    self.skip(dir.clone(), e);
                    continue;
                }
            };
            let path = entry.path();
            let name = entry.file_name();
            // Follow symbolic links; a broken link or one that loops is neither file nor directory.
            let (is_dir, is_file) = match entry.file_type() {
                Ok(t) if !t.is_symlink() => (t.is_dir(), t.is_file()),
                _ => fs::metadata(&path).map_or((false, false), |m| (m.is_dir(), m.is_file())),
            };
            if is_dir {
                subdirs.push((name, path));
            } else if is_file {
                if name == "config.json" {
                    has_config = true;
                } else if Path::new(&name).extension().is_some_and(|e| e == "safetensors") {
                    num_files += 1;
                }
            }
        }
        subdirs.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        self.stack.extend(subdirs.into_iter().rev().map(|(_, path)| path));

        if !has_config || num_files == 0 {
            return None;
        }
        let config_path = dir.join("config.json");
        let config = match fs::read(&config_path) {
            Ok(bytes) => bytes,
            Err(e) => {
                self.skip(config_path, e);
                return None;
            }
        };
        let (model_type, quant_bits, quant_group) = read_config(&config);
        Some(DiscoveredModel { path: dir, model_type, quant_bits, quant_group, num_files })
    }
}

impl Iterator for Discover {
    type Item = DiscoveredModel;

    fn next(&mut self) -> Option<DiscoveredModel> {
        while let Some(dir) = self.stack.pop() {
            if let Some(model) = self.visit(dir) {
                return Some(model);
            }
        }
        None
    }
}

impl FusedIterator for Discover {}

/// Architecture, quantisation bits and group size from config.json's bytes.
fn read_config(bytes: &[u8]) -> (Option<String>, Option<u32>, Option<u32>) {
    let Ok(config) = serde_json::from_slice::<Value>(bytes) else {
        return (None, None, None);
    };
    let non_empty = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
    let model_type = non_empty(config.get("model_type"))
        .or_else(|| non_empty(config.pointer("/text_config/model_type")))
        .or_else(|| non_empty(config.pointer("/architectures/0")));

    let quant = ["quantization", "quantization_config"]
        .iter()
        .filter_map(|key| config.get(key))
        .find(|q| q.get("bits").is_some());
    let number = |key: &str| {
        quant.and_then(|q| q.get(key)).and_then(Value::as_u64).and_then(|n| u32::try_from(n).ok()).filter(|&n| n > 0)
    };
    (model_type, number("bits"), number("group_size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_config_rules() {
        let r = |s: &str| read_config(s.as_bytes());
        assert_eq!(r("{"), (None, None, None));
        assert_eq!(r("[1]"), (None, None, None));
        assert_eq!(r(r#"{"model_type":"qwen3"}"#), (Some("qwen3".into()), None, None));
        assert_eq!(r(r#"{"model_type":"","text_config":{"model_type":"gemma3_text"}}"#).0, Some("gemma3_text".into()));
        assert_eq!(r(r#"{"architectures":["LlamaForCausalLM"]}"#).0, Some("LlamaForCausalLM".into()));
        assert_eq!(r(r#"{"architectures":[]}"#).0, None);
        assert_eq!(
            r(r#"{"quantization":{"bits":4,"group_size":64},
                  "quantization_config":{"bits":8,"group_size":32}}"#),
            (None, Some(4), Some(64))
        );
        assert_eq!(r(r#"{"quantization_config":{"bits":8,"group_size":32}}"#), (None, Some(8), Some(32)));
        assert_eq!(r(r#"{"quantization":{"group_size":64},"quantization_config":{"bits":8}}"#), (None, Some(8), None));
        assert_eq!(r(r#"{"quantization":{"bits":-4,"group_size":"x"}}"#), (None, None, None));
        assert_eq!(r(r#"{"quantization":{"bits":0}}"#).1, None);
        assert_eq!(r(r#"{"quantization":{"bits":99999999999}}"#).1, None);
    }

    #[test]
    fn vanished_directory_is_skipped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let mut walk = Discover { stack: vec![gone.clone()], visited: HashSet::new(), skipped: Vec::new() };
        assert_eq!(walk.next(), None);
        assert_eq!(walk.skipped().len(), 1);
        assert_eq!(walk.skipped()[0].path, gone);
        assert_eq!(walk.skipped()[0].error.kind(), io::ErrorKind::NotFound);
        assert_eq!(walk.next(), None);
    }
}
