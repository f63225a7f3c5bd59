// SPDX-License-Identifier: EUPL-1.2
//! Fusing adapters into the base weights, and writing the fused model as a
//! standalone model directory.
//!
//! The directory is built beside its destination under a hidden name, every
//! file written durably ([`mlx::io::durable`]), and moved into place whole
//! ([`mlx::io::durable::StagedDir`]): a failure leaves the destination as it
//! was, and what ends up there is exactly the fused model — no weights, index
//! or stamp of whatever the directory held before, and none of the base's
//! hidden files (its `.mlxr-stamp.json` describes the base's files, not
//! these).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mlx::io::{self, durable};
use mlx::ops;
use mlx::{Array, Error, Result};

use crate::model::{LanguageModel, LoadedModel};
use crate::nn::LinearWeight;

const OP: &str = "fuse";

/// What to do when the directory a fused model goes to already holds files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IfExists {
    /// Refuse, naming the directory and what it holds (the default).
    #[default]
    Refuse,
    /// Replace the directory with everything in it (`mlxr fuse --force`).
    Replace,
}

/// Fuses every attached adapter into its base weight and detaches it: a dense
/// weight becomes `W + scale·(AB)ᵀ` in its own dtype; a quantised one is
/// dequantised, updated and quantised again with the same group size and
/// bits (mlx-lm's `fuse`). Returns the fused paths.
pub fn fuse(model: &mut dyn LanguageModel) -> Result<Vec<String>> {
    let mut fused = Vec::new();
    for (path, linear) in model.linears_mut() {
        let Some(lora) = linear.lora.take() else { continue };
        let new_weight = match &linear.weight {
            LinearWeight::Dense(w) => LinearWeight::Dense(ops::add(w, &lora.delta(w.dtype())?)?),
            LinearWeight::Quantized(q) => {
                let w = ops::dequantize(q, None)?;
                let w = ops::add(&w, &lora.delta(w.dtype())?)?;
                LinearWeight::Quantized(ops::quantize(&w, q.group_size, q.bits)?)
            }
        };
        linear.weight = new_weight;
        // A decode twin of the old matrix would be stale.
        linear.narrow = None;
        fused.push(path);
    }
    Ok(fused)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { op: OP, path: path.to_path_buf(), source }
}

/// The names of what the directory `dir` holds, sorted; `None` when nothing
/// is at `dir`.
///
/// # Errors
/// When `dir` cannot be read, or is not a directory
/// ([`std::io::ErrorKind::NotADirectory`]).
pub fn dir_entries(dir: &Path) -> std::io::Result<Option<Vec<String>>> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
        Ok(m) if !m.is_dir() => {
            return Err(std::io::Error::new(std::io::ErrorKind::NotADirectory, "exists and is not a directory"));
        }
        Ok(_) => {}
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(Some(names))
}

/// The first few of `names`, for a message.
pub fn listing(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// Checks that a fused model of the model in `model_dir` may be written to
/// `out`, and returns `out` resolved (symbolic links followed) when it
/// exists. Refused: `out` being a file, the model directory or a directory
/// that contains it, any directory of `keep` (what it is and where:
/// `("the adapter directory", dir)`) or a directory that contains one; and,
/// unless `if_exists` is [`IfExists::Replace`], a directory that holds
/// anything.
///
/// # Errors
/// [`Error::InvalidArgument`] naming `out` and what is wrong (for a
/// directory that holds files, the first few of them); [`Error::Io`] when it
/// cannot be read.
pub fn check_fuse_output(model_dir: &Path, out: &Path, keep: &[(&str, &Path)], if_exists: IfExists) -> Result<PathBuf> {
    let Some(entries) = dir_entries(out).map_err(io_err(out))? else { return Ok(out.to_path_buf()) };
    let resolved = out.canonicalize().map_err(io_err(out))?;
    let shown = out.display();
    for &(what, dir) in std::iter::once(&("the model directory", model_dir)).chain(keep) {
        let Ok(dir) = dir.canonicalize() else { continue };
        if dir == resolved {
            return Err(Error::invalid(OP, format!("{shown} is {what}; write the fused model elsewhere")));
        }
        if dir.starts_with(&resolved) {
            return Err(Error::invalid(OP, format!("{shown} contains {what}; write the fused model elsewhere")));
        }
    }
    if !entries.is_empty() && if_exists == IfExists::Refuse {
        return Err(Error::invalid(
            OP,
            format!(
                "{shown} already holds {} ({}); write the fused model to a new or empty directory, or replace \
                 it and everything in it (--force)",
                if entries.len() == 1 { "1 entry".to_owned() } else { format!("{} entries", entries.len()) },
                listing(&entries)
            ),
        ));
    }
    Ok(resolved)
}

/// The tensor names a linear layer's weights have in the checkpoint: the
/// exact path, or the path under a prefix (`language_model.`).
fn checkpoint_name(names: &BTreeSet<String>, path: &str, leaf: &str) -> Option<String> {
    let exact = format!("{path}.{leaf}");
    if names.contains(&exact) {
        return Some(exact);
    }
    let suffix = format!(".{exact}");
    names.iter().find(|n| n.ends_with(&suffix)).cloned()
}

/// Fuses the attached adapters (see [`fuse`]) and writes a standalone model
/// to `out`: `model.safetensors` with the checkpoint's own tensor names (the
/// fused layers replaced, everything else as loaded), and the model
/// directory's other files (`config.json`, the tokenizer's) copied; its
/// weights, their index and its hidden files are not. `out` is checked by
/// [`check_fuse_output`] (`keep` as there) and written as the module docs say,
/// so it ends up holding the fused model and nothing else.
pub fn fuse_and_save(
    loaded: &mut LoadedModel,
    out: &Path,
    keep: &[(&str, &Path)],
    if_exists: IfExists,
) -> Result<Vec<String>> {
    let src = loaded.dir.clone();
    let out = check_fuse_output(&src, out, keep, if_exists)?;
    let mut tensors: BTreeMap<String, Array> = BTreeMap::new();
    for file in crate::model::weights::safetensors_files(&src)? {
        tensors.extend(io::load_safetensors(&file)?.tensors);
    }
    let names: BTreeSet<String> = tensors.keys().cloned().collect();
    let paths = fuse(loaded.model.as_mut())?;
    if paths.is_empty() {
        return Err(Error::invalid(OP, "the model has no adapter to fuse"));
    }
    for (path, linear) in loaded.model.linears_mut() {
        if !paths.contains(&path) {
            continue;
        }
        let name = checkpoint_name(&names, &path, "weight").ok_or_else(|| Error::Model {
            op: OP,
            path: src.clone(),
            message: format!("no tensor {path}.weight"),
        })?;
        let prefix = name.trim_end_matches("weight").to_string();
        match &linear.weight {
            LinearWeight::Dense(w) => {
                tensors.insert(name, w.clone());
            }
            LinearWeight::Quantized(q) => {
                tensors.insert(name, q.weight.clone());
                tensors.insert(format!("{prefix}scales"), q.scales.clone());
                if let Some(b) = &q.biases {
                    tensors.insert(format!("{prefix}biases"), b.clone());
                }
            }
        }
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let staged = durable::StagedDir::beside(&out).map_err(relabel)?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "mlx".to_string());
    io::save_safetensors(staged.path().join("model.safetensors"), tensors.iter().map(|(k, v)| (k.as_str(), v)), &meta)?;
    copy_model_files(&src, staged.path())?;
    staged.commit(if_exists == IfExists::Replace).map_err(relabel)?;
    Ok(paths)
}

fn relabel(e: Error) -> Error {
    durable::relabel(e, OP)
}

/// Whether the model directory's file `name` is copied beside the fused
/// weights: not weights, not an index of weights, not a hidden file (the
/// base's `.mlxr-stamp.json`, a write in progress).
fn copied(name: &str) -> bool {
    !(name.starts_with('.') || name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json"))
}

/// Copies the model directory's files that [`copied`] keeps, durably.
fn copy_model_files(src: &Path, out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(src).map_err(io_err(src))? {
        let entry = entry.map_err(io_err(src))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !path.is_file() || !copied(&name) {
            continue;
        }
        durable::copy_durable(&path, &out.join(&name)).map_err(relabel)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::copied;

    #[test]
    fn only_the_model_s_own_visible_files_are_copied() {
        for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"] {
            assert!(copied(name), "{name}");
        }
        for name in [
            ".mlxr-stamp.json",
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            ".config.json.1-2-3.tmp",
        ] {
            assert!(!copied(name), "{name}");
        }
    }
}
