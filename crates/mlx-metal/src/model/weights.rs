// SPDX-License-Identifier: EUPL-1.2
//! Loading a checkpoint's tensors and looking them up strictly.
//!
//! [`Weights`] holds every tensor of a model directory (one safetensors file,
//! several, or a sharded checkpoint with `model.safetensors.index.json`).
//! Models read them through a [`WeightPath`] that keeps Hugging Face names
//! visible (`w.pp("model").pp("layers").pp(3).pp("self_attn")`). A missing
//! tensor, a wrong shape or a wrong dtype is an error that names the tensor;
//! tensors nobody read are reported by [`Weights::finish`].
//!
//! Tensor parallelism ([`Weights::load_sliceable`], then [`super::tp::shard`]
//! on the built model): a rank asks for the slice of a linear layer it holds
//! ([`WeightPath::linear_split`]): the output rows of a column-parallel layer,
//! the input columns of a row-parallel one. The slice is read straight from
//! the file ([`io::read_tensor_slice`]); the whole tensor the model was built
//! with is a lazy array that is never evaluated, so a rank's memory holds only
//! its shard (plus the replicated norms). The embedding and the head are read
//! by vocabulary rows ([`WeightPath::embedding_rows`]) unless the model keeps
//! them replicated.
//!
//! The compute type ([`super::dtype`]) is applied here too: floating-point
//! tensors are cast as they are looked up ([`Weights::set_cast`]), and
//! quantised matrices (linear layers, embedding tables) become dense ones
//! when [`Weights::set_dequantise`] asks; a tensor-parallel rank slices the
//! packed matrix first and dequantises its part only.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::nn::{Embedding, Linear, LinearWeight};
use mlx::io::{self, SafetensorsHeader};
use mlx::ops::{self, Quantized};
use mlx::{Array, Dtype};
use mlx::{Error, Result};

use super::config::QuantConfig;
use super::dtype::CheckpointTypes;

mod narrow;

const OP: &str = "load_weights";

/// All tensors of a checkpoint.
pub struct Weights {
    tensors: BTreeMap<String, Array>,
    used: RefCell<BTreeSet<String>>,
    dir: PathBuf,
    quant: Option<QuantConfig>,
    /// The files' headers, for reading slices straight from them.
    files: Vec<(PathBuf, SafetensorsHeader)>,
    /// The type floating-point tensors are cast to as they are looked up
    /// (see [`super::dtype`]).
    cast: Option<Dtype>,
    /// Whether quantised matrices are dequantised as they are looked up.
    dequantise: bool,
    /// The compute type of an embedding table and output head kept as
    /// stored (see [`Weights::set_narrow_tables`]).
    narrow_tables: Option<Dtype>,
    /// Whether linear layers carry their stored matrix for decode steps
    /// ([`Weights::set_narrow_layers`]).
    narrow_layers: bool,
}

impl Weights {
    /// Loads every tensor of the model in `dir`: the files named by
    /// `model.safetensors.index.json` when present, otherwise every
    /// `*.safetensors` file.
    pub fn load(dir: &Path, quant: Option<QuantConfig>) -> Result<Weights> {
        let span = tracing::debug_span!("load_weights", files = tracing::field::Empty, tensors = tracing::field::Empty);
        let _enter = span.enter();
        let files = safetensors_files(dir)?;
        span.record("files", files.len());
        let mut tensors = BTreeMap::new();
        for f in &files {
            let loaded = io::load_safetensors(f)?;
            for (name, arr) in loaded.tensors {
                if tensors.insert(name.clone(), arr).is_some() {
                    return Err(model_err(dir, format!("tensor {name} appears in more than one file")));
                }
            }
        }
        if tensors.is_empty() {
            return Err(model_err(dir, "the safetensors files hold no tensors"));
        }
        span.record("tensors", tensors.len());
        Ok(Weights {
            tensors,
            used: RefCell::new(BTreeSet::new()),
            dir: dir.to_path_buf(),
            quant,
            files: Vec::new(),
            cast: None,
            dequantise: false,
            narrow_tables: None,
            narrow_layers: false,
        })
    }

    /// [`Weights::load`] for one rank of a tensor-parallel model: slices of
    /// the sharded layers ([`WeightPath::linear_split`]) are read straight
    /// from the files, never the whole tensor.
    pub fn load_sliceable(dir: &Path, quant: Option<QuantConfig>) -> Result<Weights> {
        let mut w = Weights::load(dir, quant)?;
        w.files = safetensors_files(dir)?
            .into_iter()
            .map(|f| io::read_safetensors_header(&f).map(|h| (f, h)))
            .collect::<Result<_>>()?;
        Ok(w)
    }

    /// `[start, start + len)` along `axis` of tensor `name` (already resolved
    /// and marked used): read from its file when it came from one.
    fn slice(&self, name: &str, axis: usize, start: i32, len: i32) -> Result<Array> {
        let (key, arr) = self.resolve(name).ok_or_else(|| model_err(&self.dir, format!("missing tensor {name}")))?;
        if let Some((path, header)) = self.files.iter().find(|(_, h)| h.tensors.contains_key(key)) {
            return self.cast(io::read_tensor_slice(path, header, key, axis, i64::from(start), i64::from(len))?);
        }
        let shape = arr.shape();
        let mut lo = vec![0; shape.len()];
        let mut hi = shape.clone();
        if axis >= shape.len() {
            return Err(model_err(&self.dir, format!("{key} {shape:?} has no axis {axis} to shard")));
        }
        lo[axis] = start;
        hi[axis] = start + len;
        self.cast(ops::copy(&ops::slice(arr, &lo, &hi)?)?)
    }

    /// Weights from tensors in memory (tests, converted models).
    pub fn from_tensors(dir: &Path, tensors: BTreeMap<String, Array>, quant: Option<QuantConfig>) -> Weights {
        Weights {
            tensors,
            used: RefCell::new(BTreeSet::new()),
            dir: dir.to_path_buf(),
            quant,
            files: Vec::new(),
            cast: None,
            dequantise: false,
            narrow_tables: None,
            narrow_layers: false,
        }
    }

    /// What the checkpoint holds: the type of most of its floating-point
    /// tensors, and whether it is quantised (a `quantization` entry in
    /// config.json, or any `scales` tensor).
    pub fn checkpoint_types(&self) -> CheckpointTypes {
        let mut counts: BTreeMap<&'static str, (usize, Dtype)> = BTreeMap::new();
        for a in self.tensors.values().filter(|a| a.dtype().is_float()) {
            counts.entry(a.dtype().name()).or_insert((0, a.dtype())).0 += 1;
        }
        let float = counts.values().max_by_key(|(n, _)| *n).map_or(Dtype::Float32, |(_, d)| *d);
        let quantised = self.quant.is_some() || self.tensors.keys().any(|k| k.ends_with(".scales"));
        CheckpointTypes { float, quantised }
    }

    /// Casts every floating-point tensor to `dtype` as it is looked up
    /// (`None`: none); quantised layers' packed weights are never cast.
    pub fn set_cast(&mut self, dtype: Option<Dtype>) {
        self.cast = dtype;
    }

    /// Dequantises every quantised matrix (linear layers, embedding tables)
    /// as it is looked up, into a dense matrix of the cast type (else of its
    /// scales' type).
    pub fn set_dequantise(&mut self, on: bool) {
        self.dequantise = on;
    }

    /// `weight` as the model holds it: dense after dequantising when
    /// [`Weights::set_dequantise`] asked for it.
    fn finish_matrix(&self, weight: LinearWeight) -> Result<LinearWeight> {
        match weight {
            LinearWeight::Quantized(q) if self.dequantise => {
                Ok(LinearWeight::Dense(ops::dequantize(&q, Some(self.cast.unwrap_or(q.scales.dtype())))?))
            }
            w => Ok(w),
        }
    }

    /// Every tensor of the checkpoint, by name, as stored (for measuring:
    /// [`super::quant_probe`]).
    pub(crate) fn tensors(&self) -> &BTreeMap<String, Array> {
        &self.tensors
    }

    /// config.json's quantisation entry.
    pub(crate) fn quant(&self) -> Option<&QuantConfig> {
        self.quant.as_ref()
    }

    fn cast(&self, a: Array) -> Result<Array> {
        match self.cast {
            Some(to) if a.dtype().is_float() && a.dtype() != to => ops::astype(&a, to),
            _ => Ok(a),
        }
    }

    /// The root path for lookups.
    pub fn root(&self) -> WeightPath<'_> {
        WeightPath { weights: self, path: String::new() }
    }

    /// The model directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The names a lookup of `name` tries, in order: the name itself, then the
    /// wrappers multimodal checkpoints put around the language model.
    fn candidates(name: &str) -> Vec<String> {
        let mut c = vec![name.to_string()];
        if let Some(rest) = name.strip_prefix("model.") {
            c.push(format!("language_model.{name}"));
            c.push(format!("language_model.model.{rest}"));
            c.push(format!("model.language_model.{rest}"));
            c.push(format!("model.language_model.model.{rest}"));
        } else {
            c.push(format!("language_model.{name}"));
            c.push(format!("model.language_model.{name}"));
        }
        c
    }

    fn resolve(&self, name: &str) -> Option<(&String, &Array)> {
        Self::candidates(name).into_iter().find_map(|c| self.tensors.get_key_value(&c))
    }

    /// Whether a tensor exists (under any accepted name).
    pub fn contains(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }

    /// A tensor by name; an error names it when it is missing.
    pub fn get(&self, name: &str) -> Result<Array> {
        self.cast(self.get_as_stored(name)?)
    }

    /// [`Weights::get`] without the cast.
    fn get_as_stored(&self, name: &str) -> Result<Array> {
        match self.resolve(name) {
            Some((key, arr)) => {
                self.used.borrow_mut().insert(key.clone());
                Ok(arr.clone())
            }
            None => Err(model_err(&self.dir, format!("missing tensor {name}"))),
        }
    }

    /// Marks tensors as deliberately unused (e.g. rotary caches, a tied head).
    pub fn ignore(&self, pred: impl Fn(&str) -> bool) {
        let mut used = self.used.borrow_mut();
        for k in self.tensors.keys().filter(|k| pred(k)) {
            used.insert(k.clone());
        }
    }

    /// Fails if a tensor was never read (an architecture mismatch or a
    /// checkpoint with parts this loader does not understand).
    pub fn finish(self) -> Result<()> {
        let used = self.used.into_inner();
        let unused: Vec<&String> = self.tensors.keys().filter(|k| !used.contains(*k)).collect();
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = unused.iter().take(8).map(|s| s.as_str()).collect();
        Err(model_err(
            &self.dir,
            format!(
                "{} tensor(s) are not used by this architecture: {}{}",
                unused.len(),
                shown.join(", "),
                if unused.len() > shown.len() { ", ..." } else { "" }
            ),
        ))
    }

    fn quant_layer(&self, prefix: &str) -> Option<(i32, i32)> {
        self.quant.as_ref().and_then(|q| q.layer_override(prefix))
    }
}

/// A path prefix into [`Weights`].
#[derive(Clone)]
pub struct WeightPath<'a> {
    weights: &'a Weights,
    path: String,
}

impl<'a> WeightPath<'a> {
    /// Extends the path: `pp("layers").pp(3)` → `layers.3`.
    pub fn pp(&self, part: impl std::fmt::Display) -> WeightPath<'a> {
        let path = if self.path.is_empty() { part.to_string() } else { format!("{}.{part}", self.path) };
        WeightPath { weights: self.weights, path }
    }

    /// The full name of `leaf` under this path.
    pub fn name(&self, leaf: &str) -> String {
        if self.path.is_empty() { leaf.to_string() } else { format!("{}.{leaf}", self.path) }
    }

    /// Whether `leaf` exists under this path.
    pub fn contains(&self, leaf: &str) -> bool {
        self.weights.contains(&self.name(leaf))
    }

    /// A float tensor with the given shape.
    pub fn tensor(&self, leaf: &str, shape: &[i32]) -> Result<Array> {
        let name = self.name(leaf);
        let a = self.weights.get(&name)?;
        check_float(self.weights.dir(), &name, &a)?;
        check_shape(self.weights.dir(), &name, &a, shape)?;
        Ok(a)
    }

    /// A linear layer `[out, in]`, dense or quantised (when `scales` exist),
    /// with a bias `[out]` when `bias` is true.
    pub fn linear(&self, out: i32, inp: i32, bias: bool) -> Result<Linear> {
        let l = self.linear_as_stored(out, inp, bias)?;
        let narrow = self.narrow_twin(&l.weight)?;
        let mut linear = Linear::new(self.weights.finish_matrix(l.weight)?, l.bias);
        linear.narrow = narrow;
        Ok(linear)
    }

    /// [`WeightPath::linear`] before dequantising.
    fn linear_as_stored(&self, out: i32, inp: i32, bias: bool) -> Result<Linear> {
        let weight = self.matrix(out, inp)?;
        let bias = if bias { Some(self.tensor("bias", &[out])?) } else { None };
        Ok(Linear::new(weight, bias))
    }

    /// The model directory (for messages).
    pub fn dir(&self) -> &'a Path {
        self.weights.dir()
    }

    /// A linear layer `[out, in]` of which this rank holds the part `split`
    /// says (the whole layer when it covers everything): column-parallel
    /// layers keep output rows (and their bias), row-parallel ones input
    /// columns (a quantised layer only at group boundaries). Only the part
    /// is read from the checkpoint.
    pub fn linear_split(&self, out: i32, inp: i32, bias: bool, split: Split) -> Result<Linear> {
        let full = self.linear_as_stored(out, inp, bias)?;
        let (axis, start, len) = match split {
            Split::Output { start, len } => (0, start, len),
            Split::Input { start, len, .. } => (1, start, len),
        };
        let dim = if axis == 0 { out } else { inp };
        if start == 0 && len == dim {
            return Ok(Linear::new(self.weights.finish_matrix(full.weight)?, full.bias));
        }
        if start < 0 || len <= 0 || start + len > dim {
            return Err(model_err(
                self.weights.dir(),
                format!("{}: shard [{start}, {start} + {len}) is outside [0, {dim})", self.name("weight")),
            ));
        }
        let weight = match full.weight {
            LinearWeight::Dense(_) => LinearWeight::Dense(self.slice("weight", axis, start, len)?),
            LinearWeight::Quantized(q) => {
                let gs = q.group_size;
                let (packed, groups) = if axis == 0 {
                    ((start, len), (start, len))
                } else {
                    if start % gs != 0 || len % gs != 0 {
                        return Err(model_err(
                            self.weights.dir(),
                            format!(
                                "{}: the input shard [{start}, {start} + {len}) does not fall on quantisation groups \
                                 of {gs}; use fewer tensor-parallel ranks",
                                self.name("weight")
                            ),
                        ));
                    }
                    ((start * q.bits / 32, len * q.bits / 32), (start / gs, len / gs))
                };
                LinearWeight::Quantized(Quantized {
                    weight: self.slice("weight", axis, packed.0, packed.1)?,
                    scales: self.slice("scales", axis, groups.0, groups.1)?,
                    biases: match q.biases {
                        Some(_) => Some(self.slice("biases", axis, groups.0, groups.1)?),
                        None => None,
                    },
                    group_size: q.group_size,
                    bits: q.bits,
                })
            }
        };
        let bias = match (full.bias, split) {
            (Some(_), Split::Output { start, len }) => Some(self.slice("bias", 0, start, len)?),
            (Some(b), Split::Input { keep_bias: true, .. }) => Some(b),
            _ => None,
        };
        Ok(Linear::new(self.weights.finish_matrix(weight)?, bias))
    }

    fn slice(&self, leaf: &str, axis: usize, start: i32, len: i32) -> Result<Array> {
        self.weights.slice(&self.name(leaf), axis, start, len)
    }

    /// The rows `[start, start + len)` of an embedding table `[vocab, dim]`
    /// (a vocabulary-parallel rank's part; see [`crate::nn::VocabShard`]): only
    /// those rows are read from the checkpoint. A quantised table packs
    /// along `dim`, so whole rows never cut a quantisation group.
    pub fn embedding_rows(&self, vocab: i32, dim: i32, start: i32, len: i32) -> Result<Embedding> {
        let rows = self.linear_split(vocab, dim, false, Split::Output { start, len })?;
        Ok(Embedding::new(rows.weight))
    }

    fn matrix(&self, out: i32, inp: i32) -> Result<LinearWeight> {
        let dir = self.weights.dir();
        if !self.contains("scales") {
            return Ok(LinearWeight::Dense(self.tensor("weight", &[out, inp])?));
        }
        let wname = self.name("weight");
        let sname = self.name("scales");
        let weight = self.weights.get(&wname)?;
        let scales = self.weights.get(&sname)?;
        if weight.dtype() != Dtype::Uint32 {
            return Err(model_err(dir, format!("{wname} is {} but quantised weights are uint32", weight.dtype())));
        }
        check_float(dir, &sname, &scales)?;
        let (ws, ss) = (weight.shape(), scales.shape());
        if ws.len() != 2 || ss.len() != 2 || ws[0] != out || ss[0] != out || ss[1] == 0 {
            return Err(model_err(
                dir,
                format!("{wname} {ws:?} and {sname} {ss:?} do not fit a quantised [{out}, {inp}] matrix"),
            ));
        }
        // Like mlx-lm: a per-layer entry in config.json wins, otherwise the
        // group size and bits follow from the packed shapes.
        // Checked: config.json's entry and the shapes may hold anything.
        let packed_bits = ws[1].checked_mul(32);
        let (group_size, bits) = match self.weights.quant_layer(&self.path) {
            Some(gb) => gb,
            None => (inp.checked_div(ss[1]).unwrap_or(0), packed_bits.and_then(|b| b.checked_div(inp)).unwrap_or(0)),
        };
        if group_size.checked_mul(ss[1]) != Some(inp) || bits.checked_mul(inp) != packed_bits {
            return Err(model_err(
                dir,
                format!(
                    "{wname} {ws:?} with {sname} {ss:?} is not a {bits}-bit, group-{group_size} packing of [{out}, {inp}]"
                ),
            ));
        }
        let biases = if self.contains("biases") {
            let bname = self.name("biases");
            let b = self.weights.get(&bname)?;
            check_float(dir, &bname, &b)?;
            check_shape(dir, &bname, &b, &ss)?;
            Some(b)
        } else {
            None
        };
        if ![32, 64, 128].contains(&group_size) || ![2, 3, 4, 5, 6, 8].contains(&bits) {
            return Err(model_err(dir, format!("{wname}: {bits} bits with group size {group_size} is not supported")));
        }
        Ok(LinearWeight::Quantized(Quantized { weight, scales, biases, group_size, bits }))
    }
}

/// Which part of a linear layer a tensor-parallel rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Column-parallel: output features `[start, start + len)` (and their bias).
    Output {
        /// First output feature.
        start: i32,
        /// How many.
        len: i32,
    },
    /// Row-parallel: input features `[start, start + len)`; the partial
    /// outputs are summed over the ranks, so only one rank keeps the bias.
    Input {
        /// First input feature.
        start: i32,
        /// How many.
        len: i32,
        /// Whether this rank adds the bias.
        keep_bias: bool,
    },
}

fn check_float(dir: &Path, name: &str, a: &Array) -> Result<()> {
    match a.dtype() {
        Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32 => Ok(()),
        d => Err(model_err(dir, format!("{name} is {d}; expected float16, bfloat16 or float32"))),
    }
}

fn check_shape(dir: &Path, name: &str, a: &Array, shape: &[i32]) -> Result<()> {
    let got = a.shape();
    if got != shape {
        return Err(model_err(dir, format!("{name} has shape {got:?}; expected {shape:?}")));
    }
    Ok(())
}

pub(crate) fn model_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Model { op: OP, path: path.to_path_buf(), message: message.into() }
}

/// The safetensors files of a model directory.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text =
            std::fs::read_to_string(&index).map_err(|source| Error::Io { op: OP, path: index.clone(), source })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| model_err(&index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| model_err(&index, "no weight_map object"))?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let f = file
                .as_str()
                .ok_or_else(|| model_err(&index, format!("weight_map entry for {tensor} is not a file name")))?;
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(model_err(
                    &index,
                    format!("weight_map names {f:?}, which is not a file in the model directory"),
                ));
            }
            files.insert(dir.join(f));
        }
        for f in &files {
            if !f.is_file() {
                return Err(model_err(dir, format!("shard {} named by the index is missing", f.display())));
            }
        }
        return Ok(files.into_iter().collect());
    }
    // Like mlx-lm: `model*.safetensors` (so adapters or other files beside
    // the model are not mistaken for weights).
    let rd = std::fs::read_dir(dir).map_err(|source| Error::Io { op: OP, path: dir.to_path_buf(), source })?;
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|x| x == "safetensors")
                && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("model"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(model_err(dir, "no model*.safetensors files"));
    }
    Ok(files)
}
