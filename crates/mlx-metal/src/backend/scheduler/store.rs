// SPDX-License-Identifier: EUPL-1.2
//! The prompt cache: the KV caches of finished generations, kept by their
//! tokens in a [`RadixTree`] and bounded in bytes, so that a request that
//! starts like an earlier one (a system prompt, the earlier turns of a
//! conversation, few-shot examples) prefills only what is new.
//!
//! An entry holds one-row batch caches with every position of its tokens
//! (full-attention layers) or at least the last window of them
//! (sliding-window layers). A request reuses the entry that shares the
//! longest prefix with its prompt, never the prompt's last token (its logits
//! give the first token): the entry's caches are cut back to the shared
//! prefix. A full-attention cache can be cut anywhere; a sliding-window one
//! that has dropped its first positions only where the window before the cut
//! is still there, and otherwise the next best entry serves (or none: a cold
//! prefill). MLX arrays are immutable values, so a request writing into
//! caches it took from an entry copies them first and the entry stays as it
//! was; entries share no buffers with each other or with the batch, so their
//! byte counts add up.
//!
//! Eviction is least-recently-used, on a counter rather than a clock, so
//! every rank of a tensor-parallel job keeps the same entries. An entry whose
//! tokens are a prefix of a new one's is dropped when the new one can stand
//! for it (mlx-lm's `LRUPromptCache` does the same).
//!
//! With a directory ([`PromptStore::open_dir`]) the store outlives the
//! process: each entry becomes a file in the session file format
//! ([`crate::session::save_rows`]) when the engine next has nothing to do,
//! the file goes when its entry is evicted, and a store opened on the
//! directory takes back every file made for the same model and adapter
//! (checked: fingerprint, layer kinds, shapes, dtypes), oldest first, within
//! its bound. A file that fails the checks is left alone and named in a warning.
//! Quantised entries (`kv_bits`) stay in memory only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mlx::transforms::async_eval;
use mlx::{Array, Result};

use super::prefill::single_row_caches;
use super::radix::RadixTree;
use crate::cache::LayerCache;
use crate::model::LanguageModel;
use crate::session::{Fingerprint, LayerSpec, load_rows, save_rows};

/// A stored generation's caches.
struct Entry {
    tokens: Vec<u32>,
    caches: Vec<LayerCache>,
    bytes: usize,
    /// The counter when it was last stored or used.
    used: u64,
    /// The shortest prefix its caches can be cut back to (0: any).
    floor: usize,
    /// Its file, once written.
    file: Option<PathBuf>,
    /// Whether its caches are full precision (the session file format holds no quantised caches).
    dense: bool,
}

impl Entry {
    /// Whether the caches can stand for the first `k` tokens.
    fn serves(&self, k: usize) -> bool {
        k > 0 && k <= self.tokens.len() && (k == self.tokens.len() || k >= self.floor)
    }
}

/// What the prompt cache holds, for the engine's load report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StoreStats {
    pub(crate) entries: usize,
    pub(crate) bytes: usize,
    pub(crate) capacity: usize,
    /// Requests that reused a prefix, and the prompt tokens they did not prefill.
    pub(crate) hits: u64,
    pub(crate) reused_tokens: u64,
}

/// Where the entries are kept on disk, and what they must have been made with.
struct Disk {
    dir: PathBuf,
    fingerprint: Fingerprint,
    origin: String,
}

/// The prompt cache.
pub(crate) struct PromptStore {
    tree: RadixTree<u64>,
    entries: HashMap<u64, Entry>,
    next_id: u64,
    clock: u64,
    stats: StoreStats,
    disk: Option<Disk>,
}

impl PromptStore {
    /// An empty store that holds at most `capacity` bytes.
    pub(crate) fn new(capacity: usize) -> PromptStore {
        PromptStore {
            tree: RadixTree::new(),
            entries: HashMap::new(),
            next_id: 0,
            clock: 0,
            stats: StoreStats { capacity, ..StoreStats::default() },
            disk: None,
        }
    }

    pub(crate) fn stats(&self) -> StoreStats {
        self.stats
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The caches of the longest stored prefix of `prompt` that leaves at
    /// least its last token to prefill: `(k, caches holding prompt[..k])`.
    pub(crate) fn lookup(&mut self, prompt: &[u32]) -> Result<Option<(usize, Vec<LayerCache>)>> {
        let Some(probe) = prompt.len().checked_sub(1).map(|n| &prompt[..n]) else { return Ok(None) };
        let mut best: Option<(usize, u64, u64)> = None;
        for (k, &id) in self.tree.by_shared_prefix(probe) {
            if best.is_some_and(|(b, _, _)| k < b) {
                break;
            }
            let Some(e) = self.entries.get(&id) else { continue };
            if e.serves(k) && best.is_none_or(|(_, _, used)| e.used > used) {
                best = Some((k, id, e.used));
            }
        }
        let Some((k, id, _)) = best else { return Ok(None) };
        let now = self.tick();
        let Some(entry) = self.entries.get_mut(&id) else { return Ok(None) };
        entry.used = now;
        let cut = (entry.tokens.len() - k) as i32;
        let mut caches = entry.caches.clone();
        for c in &mut caches {
            if c.trim(cut) != cut {
                return Ok(None);
            }
        }
        self.stats.hits += 1;
        self.stats.reused_tokens += k as u64;
        Ok(Some((k, caches)))
    }

    /// Keeps `caches` (one-row batch caches holding `tokens`, in buffers of
    /// their own), evicting the least recently used entries to stay within
    /// the capacity. Caches bigger than the whole capacity are not kept.
    pub(crate) fn insert(&mut self, tokens: Vec<u32>, caches: Vec<LayerCache>) -> Result<()> {
        self.insert_entry(tokens, caches, None)
    }

    fn insert_entry(&mut self, tokens: Vec<u32>, caches: Vec<LayerCache>, file: Option<PathBuf>) -> Result<()> {
        let state: Vec<&Array> = caches.iter().flat_map(LayerCache::state).collect();
        let bytes: usize = state.iter().map(|a| a.nbytes()).sum();
        if tokens.is_empty() || bytes > self.stats.capacity {
            remove_file(file.as_deref());
            return Ok(());
        }
        async_eval(&state)?;
        let floor = cut_floor(&caches, tokens.len());
        let dense = caches.iter().all(|c| match c {
            LayerCache::Batch(b) => b.row_parts(0).is_ok_and(|(k, _, _)| !k.is_quantised()),
            _ => false,
        });
        let entry = Entry { tokens, caches, bytes, used: self.tick(), floor, file, dense };
        // Stored prefixes the new entry can stand for only take space.
        let redundant: Vec<u64> = self
            .tree
            .prefixes_of(&entry.tokens)
            .into_iter()
            .filter(|(k, _)| entry.serves(*k))
            .map(|(_, &id)| id)
            .collect();
        for id in redundant {
            self.drop_entry(id);
        }
        let id = self.next_id;
        self.next_id += 1;
        if let Some(old) = self.tree.insert(&entry.tokens, id) {
            self.forget(old);
        }
        self.stats.bytes += entry.bytes;
        self.entries.insert(id, entry);
        while self.stats.bytes > self.stats.capacity {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.used).map(|(&id, _)| id) else { break };
            self.drop_entry(oldest);
        }
        self.stats.entries = self.entries.len();
        Ok(())
    }

    /// Forgets every entry and removes its file (the model changed, say);
    /// entries made from now on are tagged with `origin`.
    pub(crate) fn clear(&mut self, origin: &str) {
        for e in self.entries.values() {
            remove_file(e.file.as_deref());
        }
        self.tree = RadixTree::new();
        self.entries.clear();
        self.stats.bytes = 0;
        self.stats.entries = 0;
        if let Some(d) = &mut self.disk {
            d.origin = origin.to_owned();
        }
    }

    /// Keeps the entries in `dir` from now on (created if missing), and
    /// takes back those a store for this model (`fingerprint`) and `origin`
    /// left there.
    pub(crate) fn open_dir(
        &mut self,
        dir: &Path,
        model: &dyn LanguageModel,
        fingerprint: &Fingerprint,
        origin: &str,
    ) -> Result<()> {
        let io = |source| mlx::Error::Io { op: "prompt_cache_dir", path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        // Writes a crash cut short (this process's or another's, long ago).
        match mlx::io::durable::sweep_stale(dir, mlx::io::durable::STALE_AFTER) {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(dir = %dir.display(), files = removed.len(), "removed leftovers of interrupted writes");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "the prompt-cache directory was not swept"),
        }
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            // Hidden names are writes in progress (see `mlx::io::save_safetensors`), never entries.
            let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if !hidden && path.extension().is_some_and(|e| e == "safetensors") {
                let modified = std::fs::metadata(&path).and_then(|m| m.modified()).map_err(io)?;
                files.push((modified, path));
            }
        }
        files.sort();
        let specs = layer_specs(model)?;
        for (_, path) in files {
            match load_rows(&path, fingerprint, origin, &specs) {
                Ok((tokens, caches)) => self.insert_entry(tokens, caches, Some(path))?,
                Err(e) => tracing::warn!(file = %path.display(), error = %e, "a prompt-cache file was left out"),
            }
        }
        self.disk = Some(Disk { dir: dir.to_path_buf(), fingerprint: fingerprint.clone(), origin: origin.to_owned() });
        Ok(())
    }

    /// Writes the entries that have no file yet (with a directory).
    pub(crate) fn persist(&mut self) -> Result<()> {
        let Some(disk) = &self.disk else { return Ok(()) };
        for e in self.entries.values_mut().filter(|e| e.file.is_none() && e.dense) {
            let name = {
                use std::hash::{Hash, Hasher};
                let mut h = std::hash::DefaultHasher::new();
                e.tokens.hash(&mut h);
                h.finish()
            };
            let path = disk.dir.join(format!("{name:016x}-{}.safetensors", e.tokens.len()));
            save_rows(&path, &disk.fingerprint, &disk.origin, &e.tokens, &e.caches)?;
            e.file = Some(path);
        }
        Ok(())
    }

    fn drop_entry(&mut self, id: u64) {
        if let Some(tokens) = self.entries.get(&id).map(|e| e.tokens.clone()) {
            self.tree.remove(&tokens);
        }
        self.forget(id);
    }

    fn forget(&mut self, id: u64) {
        if let Some(e) = self.entries.remove(&id) {
            self.stats.bytes -= e.bytes;
            remove_file(e.file.as_deref());
        }
        self.stats.entries = self.entries.len();
    }
}

/// The shortest prefix of `len` tokens that `caches` can be cut back to: 0
/// when every layer holds all its positions; else, for a sliding-window layer
/// that dropped its first `d` positions, `d` + its window (the window before
/// the cut must still be there).
fn cut_floor(caches: &[LayerCache], len: usize) -> usize {
    let mut floor = 0;
    for c in caches {
        if let LayerCache::Batch(b) = c {
            let dropped = (-b.left_padding().first().copied().unwrap_or(0)).max(0) as usize;
            if let (Some(w), true) = (b.window(), dropped > 0) {
                floor = floor.max(dropped + w as usize);
            }
        }
    }
    floor.min(len)
}

/// Keeps a row's caches at its end under the tokens they hold: its prompt
/// and what it generated, as far as the caches got (the last token handed
/// out may not have gone through the model).
pub(super) fn keep(store: &mut PromptStore, ids: &[u32], emitted: &[u32], caches: Vec<LayerCache>) -> Result<()> {
    let Some(LayerCache::Batch(first)) = caches.first() else { return Ok(()) };
    let held = first.positions().first().map_or(0, |&p| p.max(0) as usize);
    let tokens: Vec<u32> = ids.iter().chain(emitted).copied().take(held).collect();
    if tokens.len() < held {
        return Err(mlx::Error::invalid(
            "prompt_cache",
            format!("caches of {held} positions for {} tokens", tokens.len()),
        ));
    }
    store.insert(tokens, caches)
}

/// Removes an entry's file; one that cannot be removed is named in a warning.
fn remove_file(file: Option<&Path>) {
    if let Some(f) = file
        && let Err(e) = std::fs::remove_file(f)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(file = %f.display(), error = %e, "a prompt-cache file could not be removed");
    }
}

/// What each layer's cache looks like for `model`: read off the caches after
/// one token, a graph that is built but never run.
fn layer_specs(model: &dyn LanguageModel) -> Result<Vec<LayerSpec>> {
    let mut caches = single_row_caches(model, None)?;
    model.forward(&mlx::ops::zeros(&[1, 1], mlx::Dtype::Int32)?, &mut caches)?;
    caches
        .iter()
        .map(|c| match c {
            LayerCache::Batch(b) => {
                let (k, _, _) = b.row(0)?;
                let s = k.shape();
                Ok(LayerSpec { heads: s[1], dim: s[3], dtype: k.dtype(), window: b.window() })
            }
            _ => Err(mlx::Error::invalid("prompt_cache", "a batch holds batch caches only")),
        })
        .collect()
}
