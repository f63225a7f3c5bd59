// SPDX-License-Identifier: EUPL-1.2
//! Converting a Hugging Face checkpoint to an MLX model directory, as
//! `mlx_lm.convert` does (`mlxr convert`).
//!
//! The output is what mlx-lm 0.32 writes with the same options, tensor for
//! tensor: the same names (mlx-lm's `sanitize` applied), types, shapes and
//! values (MLX's affine quantisation is deterministic, so quantised weights,
//! scales and biases are bit-identical), the same shards
//! (`model.safetensors`, or `model-0000i-of-0000n.safetensors` past 5 GiB)
//! and `model.safetensors.index.json`, and config.json byte for byte (the
//! `quantization` block and its `quantization_config` copy, per-layer entries
//! of a mixed recipe included). The tokenizer's files, `generation_config.json`
//! and `*.py` are copied as they are (mlx-lm saves the tokenizer again through
//! `transformers`, which rewrites `tokenizer_config.json` and moves the chat
//! template into `chat_template.jinja`; the tokenizer and template are the
//! same), and `README.md` is mlx-lm's model card for a local checkpoint.
//!
//! Steps: the floats are cast to `--dtype` (default: config.json's
//! `torch_dtype`, as mlx-lm), then, with `quantize`, every linear layer and
//! the embedding are quantised (`plan` says which and how). Memory stays at
//! a few tensors: the checkpoint is loaded lazily, and each output tensor is
//! made, evaluated, written and dropped in turn ([`write`]).
//!
//! The model is built in a hidden directory beside the destination, every
//! file durable, and moved into place whole (as `mlxr fuse`); a destination
//! that holds anything is refused unless [`IfExists::Replace`].

mod plan;
pub(crate) mod pyjson;
mod write;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use mlx::io::{self, durable};
use mlx::{Dtype, Error, Result};

pub use self::write::MAX_SHARD_BYTES;
use crate::lora::{IfExists, dir_entries, listing};
use crate::model::SUPPORTED;
use crate::model::weights::safetensors_files;
use plan::{Arch, Quant};

pub(crate) const OP: &str = "convert";

/// The bits [`ConvertOptions::q_bits`] may take.
pub const BITS: &[i32] = &[2, 3, 4, 6, 8];
/// The group sizes [`ConvertOptions::q_group_size`] may take.
pub const GROUP_SIZES: &[i32] = &[32, 64, 128];

/// mlx-lm's mixed-precision recipes (`--quant-predicate`): low bits for most
/// layers, high bits for the output head and for `v_proj` and `down_proj`
/// in the first and last eighth of the layers and every third layer between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// 2 and 6 bits.
    Mixed2_6,
    /// 3 and 4 bits.
    Mixed3_4,
    /// 3 and 6 bits.
    Mixed3_6,
    /// 4 and 6 bits.
    Mixed4_6,
}

impl Recipe {
    /// Every recipe.
    pub const ALL: [Recipe; 4] = [Recipe::Mixed2_6, Recipe::Mixed3_4, Recipe::Mixed3_6, Recipe::Mixed4_6];

    /// mlx-lm's name for it (`mixed_3_6`).
    pub fn name(self) -> &'static str {
        match self {
            Recipe::Mixed2_6 => "mixed_2_6",
            Recipe::Mixed3_4 => "mixed_3_4",
            Recipe::Mixed3_6 => "mixed_3_6",
            Recipe::Mixed4_6 => "mixed_4_6",
        }
    }

    /// The recipe of that name.
    pub fn parse(name: &str) -> Option<Recipe> {
        Recipe::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Its low and high bits.
    pub fn bits(self) -> (i32, i32) {
        match self {
            Recipe::Mixed2_6 => (2, 6),
            Recipe::Mixed3_4 => (3, 4),
            Recipe::Mixed3_6 => (3, 6),
            Recipe::Mixed4_6 => (4, 6),
        }
    }
}

/// What `mlxr convert` (mlx-lm's `convert`) is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertOptions {
    /// Quantise (`-q`).
    pub quantize: bool,
    /// Bits per weight (default 4); only with `quantize`.
    pub q_bits: Option<i32>,
    /// Group size (default 64); only with `quantize`.
    pub q_group_size: Option<i32>,
    /// The type of the floats (`None`: config.json's `torch_dtype`, else
    /// `text_config.dtype`, else each tensor's own). float16, bfloat16 or
    /// float32.
    pub dtype: Option<Dtype>,
    /// A mixed recipe instead of one size for all; only with `quantize`.
    pub quant_predicate: Option<Recipe>,
    /// Whether a destination that holds anything is replaced.
    pub if_exists: IfExists,
    /// The largest shard in bytes ([`MAX_SHARD_BYTES`], mlx-lm's).
    pub max_shard_bytes: u64,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            quantize: false,
            q_bits: None,
            q_group_size: None,
            dtype: None,
            quant_predicate: None,
            if_exists: IfExists::Refuse,
            max_shard_bytes: MAX_SHARD_BYTES,
        }
    }
}

impl ConvertOptions {
    /// Checks the values, naming the one that is wrong.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for bits, a group size or a dtype that
    /// mlx-lm's affine quantisation or conversion does not take.
    pub fn check(&self) -> Result<()> {
        if let Some(b) = self.q_bits.filter(|b| !BITS.contains(b)) {
            return Err(Error::invalid(OP, format!("{b} bits is not supported: choose 2, 3, 4, 6 or 8")));
        }
        if let Some(g) = self.q_group_size.filter(|g| !GROUP_SIZES.contains(g)) {
            return Err(Error::invalid(OP, format!("group size {g} is not supported: choose 32, 64 or 128")));
        }
        if let Some(d) = self.dtype.filter(|d| !matches!(d, Dtype::Float16 | Dtype::Bfloat16 | Dtype::Float32)) {
            return Err(Error::invalid(OP, format!("dtype {d} is not supported: choose float16, bfloat16 or float32")));
        }
        if self.max_shard_bytes == 0 {
            return Err(Error::invalid(OP, "the largest shard must hold at least one byte"));
        }
        Ok(())
    }
}

/// What a conversion reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// The plan, before anything is written.
    Start {
        /// mlx-lm's architecture (`llama`, `gemma3`, ...).
        architecture: &'a str,
        /// The type the floats are written in (`None`: each keeps its own).
        dtype: Option<Dtype>,
        /// How many layers are quantised.
        quantised_layers: usize,
        /// Tensors to write.
        tensors: usize,
        /// Their bytes.
        bytes: u64,
        /// Shard files.
        shards: usize,
    },
    /// One more tensor written (`done` so far).
    Tensor {
        /// Tensors written so far.
        done: usize,
        /// The tensor's name.
        name: &'a str,
    },
    /// A shard file finished.
    Shard {
        /// Its file name.
        file: &'a str,
        /// Its tensors.
        tensors: usize,
        /// Their bytes.
        bytes: u64,
    },
}

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The converted model's directory.
    pub out: PathBuf,
    /// mlx-lm's architecture.
    pub architecture: String,
    /// The shard files.
    pub shards: Vec<String>,
    /// Tensors written.
    pub tensors: usize,
    /// Their bytes (the index's `total_size`).
    pub bytes: u64,
    /// The model's parameters (the index's `total_parameters`).
    pub parameters: u64,
    /// Layers quantised.
    pub quantised_layers: usize,
}

impl Summary {
    /// Bits per parameter, as mlx-lm reports after quantising.
    pub fn bits_per_weight(&self) -> f64 {
        if self.parameters == 0 { 0.0 } else { self.bytes as f64 * 8.0 / self.parameters as f64 }
    }
}

pub(crate) fn err(path: &Path, message: impl Into<String>) -> Error {
    Error::Model { op: OP, path: path.to_path_buf(), message: message.into() }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { op: OP, path: path.to_path_buf(), source }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| err(path, format!("not valid JSON: {e}")))
}

/// Converts the Hugging Face checkpoint in `src` to an MLX model in `out`
/// (see the module docs), reporting to `progress` as it goes.
///
/// # Errors
/// Errors name what is wrong: bad options; `src` missing, not a directory,
/// without config.json or safetensors, of an architecture this crate does
/// not run, already quantised, or with tensors missing, misshapen, not
/// floats or not parameters of the model; `out` a file, the checkpoint's
/// own directory (or holding it), or, unless [`IfExists::Replace`], holding
/// anything; and failures to read or write. A failure leaves `out` as it
/// was.
pub fn convert(
    src: &Path,
    out: &Path,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(Event<'_>),
) -> Result<Summary> {
    options.check()?;
    check_source(src)?;
    let raw = match read_json(&src.join("config.json"))? {
        Value::Object(o) => o,
        _ => return Err(err(&src.join("config.json"), "config.json is not a JSON object")),
    };
    let arch = architecture(src, &raw)?;
    refuse_quantised(src, &raw)?;
    check_output(src, out, options.if_exists)?;
    let generation = src.join("generation_config.json");
    let generation = generation.is_file().then(|| read_json(&generation).ok()).flatten();
    let config = pyjson::loaded_config(raw, generation.as_ref());

    let files = safetensors_files(src).map_err(|e| match e {
        Error::Model { path, message, .. } => Error::Model { op: OP, path, message },
        e => e,
    })?;
    let mut infos = BTreeMap::new();
    for f in &files {
        for (name, info) in io::read_safetensors_header(f)?.tensors {
            if infos.insert(name.clone(), info).is_some() {
                return Err(err(src, format!("tensor {name} appears in more than one file")));
            }
        }
    }
    let dtype = options.dtype.or_else(|| config_dtype(&config));
    let quant = options.quantize.then(|| Quant {
        group_size: options.q_group_size.unwrap_or(64),
        bits: options.q_bits.unwrap_or(4),
        recipe: options.quant_predicate.map(|r| (r, options.q_group_size)),
    });
    let plan = plan::plan(src, arch, &config, &infos, dtype, quant)?;
    let shards = write::make_shards(&plan.tensors, options.max_shard_bytes);
    let bytes: u64 = plan.tensors.iter().map(plan::OutTensor::nbytes).sum();
    progress(Event::Start {
        architecture: arch.name(),
        dtype,
        quantised_layers: plan.quantised,
        tensors: plan.tensors.len(),
        bytes,
        shards: shards.len(),
    });

    let quantization = quant.map(|q| {
        let mut block = Map::new();
        block.insert("group_size".into(), json!(q.group_size));
        block.insert("bits".into(), json!(q.bits));
        block.insert("mode".into(), json!("affine"));
        for (path, group, bits) in &plan.layers {
            block.insert(path.clone(), json!({"group_size": group, "bits": bits, "mode": "affine"}));
        }
        Value::Object(block)
    });
    let config_text = pyjson::dump(&pyjson::output_config(config, quantization));
    let index_text = write::index(&plan.tensors, &shards, plan.parameters);

    let mut sources = BTreeMap::new();
    for f in &files {
        sources.extend(io::load_safetensors(f)?.tensors);
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let staged = durable::StagedDir::beside(out).map_err(relabel)?;
    let mut maker = write::Maker::new(sources);
    let mut done = 0;
    let mut names = Vec::new();
    for (i, range) in shards.iter().enumerate() {
        let file = write::shard_name(i, shards.len());
        let tensors: Vec<&plan::OutTensor> = plan.tensors[range.clone()].iter().collect();
        write::write_shard(&staged.path().join(&file), &tensors, &mut maker, &mut done, progress)?;
        let shard_bytes = tensors.iter().map(|t| t.nbytes()).sum();
        progress(Event::Shard { file: &file, tensors: tensors.len(), bytes: shard_bytes });
        names.push(file);
        mlx::memory::clear_cache()?;
    }
    drop(maker);
    durable::write_durable_bytes(&staged.path().join("model.safetensors.index.json"), index_text.as_bytes())
        .map_err(relabel)?;
    durable::write_durable_bytes(&staged.path().join("config.json"), config_text.as_bytes()).map_err(relabel)?;
    copy_files(src, staged.path())?;
    durable::write_durable_bytes(&staged.path().join("README.md"), MODEL_CARD.as_bytes()).map_err(relabel)?;
    staged.commit(options.if_exists == IfExists::Replace).map_err(relabel)?;
    Ok(Summary {
        out: out.to_path_buf(),
        architecture: arch.name().to_owned(),
        shards: names,
        tensors: plan.tensors.len(),
        bytes,
        parameters: plan.parameters,
        quantised_layers: plan.quantised,
    })
}

/// mlx-lm's model card for a model converted from a local directory
/// (`create_model_card` with no Hub repository).
const MODEL_CARD: &str = "---\nlanguage: en\nlibrary_name: mlx\npipeline_tag: text-generation\ntags:\n- mlx\n---\n";

fn check_source(src: &Path) -> Result<()> {
    match std::fs::metadata(src) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(err(
            src,
            "no such directory (mlxr convert reads a local Hugging Face model directory; download it first, \
             e.g. with `hf download`)",
        )),
        Err(e) => Err(io_err(src)(e)),
        Ok(m) if !m.is_dir() => Err(err(src, "is a file, not a model directory")),
        Ok(_) if !src.join("config.json").is_file() => {
            Err(err(src, "no config.json (is this a Hugging Face model directory?)"))
        }
        Ok(_) => Ok(()),
    }
}

fn architecture(src: &Path, config: &Map<String, Value>) -> Result<Arch> {
    let Some(model_type) = config.get("model_type").and_then(Value::as_str) else {
        return Err(err(src, "config.json has no model_type"));
    };
    Arch::of(model_type).ok_or_else(|| {
        err(src, format!("unsupported architecture {model_type:?} (model_type); supported: {}", SUPPORTED.join(", ")))
    })
}

fn refuse_quantised(src: &Path, config: &Map<String, Value>) -> Result<()> {
    let text = config.get("text_config").and_then(Value::as_object);
    for key in ["quantization", "quantization_config"] {
        if config.contains_key(key) || text.is_some_and(|t| t.contains_key(key)) {
            return Err(err(
                src,
                format!(
                    "the checkpoint is already quantised (config.json has {key:?}); convert reads float32, \
                     float16 or bfloat16 checkpoints"
                ),
            ));
        }
    }
    Ok(())
}

/// The type mlx-lm casts to when not told: config.json's `torch_dtype`, else
/// `text_config.dtype`, when it is float16, bfloat16 or float32.
fn config_dtype(config: &Map<String, Value>) -> Option<Dtype> {
    let named = match config.get("torch_dtype").filter(|v| !v.is_null()) {
        Some(v) => v.as_str(),
        None => config.get("text_config").and_then(|t| t.get("dtype")).and_then(Value::as_str),
    };
    match named? {
        "float16" => Some(Dtype::Float16),
        "bfloat16" => Some(Dtype::Bfloat16),
        "float32" => Some(Dtype::Float32),
        _ => None,
    }
}

/// Refuses a destination that is a file, is or holds the checkpoint's
/// directory, or (unless `if_exists` allows it) holds anything.
fn check_output(src: &Path, out: &Path, if_exists: IfExists) -> Result<()> {
    let entries = match dir_entries(out) {
        Ok(Some(entries)) => entries,
        Ok(None) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(Error::invalid(OP, format!("{} exists and is not a directory", out.display())));
        }
        Err(e) => return Err(io_err(out)(e)),
    };
    let resolved = out.canonicalize().map_err(io_err(out))?;
    if let Ok(src) = src.canonicalize() {
        if src == resolved {
            return Err(Error::invalid(OP, format!("{} is the model being converted; write elsewhere", out.display())));
        }
        if src.starts_with(&resolved) {
            return Err(Error::invalid(
                OP,
                format!("{} holds the model being converted; write elsewhere", out.display()),
            ));
        }
    }
    if !entries.is_empty() && if_exists == IfExists::Refuse {
        return Err(Error::invalid(
            OP,
            format!(
                "{} already holds {} ({}); write the converted model to a new or empty directory, or replace \
                 it and everything in it (--force)",
                out.display(),
                if entries.len() == 1 { "1 entry".to_owned() } else { format!("{} entries", entries.len()) },
                listing(&entries)
            ),
        ));
    }
    Ok(())
}

/// Whether the checkpoint's file `name` is copied beside the converted
/// weights: the tokenizer's files, `generation_config.json` and `*.py` (what
/// mlx-lm's `save` and the tokenizer's `save_pretrained` leave there).
fn copied(name: &str) -> bool {
    const TOKENIZER: &[&str] = &[
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.json",
        "chat_template.jinja",
        "tokenizer.model",
        "tiktoken.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "generation_config.json",
    ];
    !name.starts_with('.') && (TOKENIZER.contains(&name) || name.ends_with(".py") || name.ends_with(".tiktoken"))
}

fn copy_files(src: &Path, out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(src).map_err(io_err(src))? {
        let entry = entry.map_err(io_err(src))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_file() && copied(&name) {
            durable::copy_durable(&entry.path(), &out.join(&name)).map_err(relabel)?;
        }
    }
    Ok(())
}

fn relabel(e: Error) -> Error {
    durable::relabel(e, OP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tokenizer_and_generation_files_are_copied_and_nothing_else() {
        for name in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "modeling_x.py", "a.tiktoken"]
        {
            assert!(copied(name), "{name}");
        }
        for name in ["config.json", "model.safetensors", "README.md", ".mlxr-stamp.json", ".x.py", "model.bin"] {
            assert!(!copied(name), "{name}");
        }
    }

    #[test]
    fn recipes_are_named_as_in_mlx_lm() {
        for r in Recipe::ALL {
            assert_eq!(Recipe::parse(r.name()), Some(r));
        }
        assert_eq!(Recipe::parse("mixed_5_6"), None);
    }

    #[test]
    fn options_name_the_bad_value() {
        let bad = |o: ConvertOptions| o.check().map_err(|e| e.to_string()).err().unwrap_or_default();
        assert!(bad(ConvertOptions { q_bits: Some(5), ..Default::default() }).contains("5 bits is not supported"));
        let e = bad(ConvertOptions { q_group_size: Some(16), ..Default::default() });
        assert!(e.contains("group size 16 is not supported"), "{e}");
        let e = bad(ConvertOptions { dtype: Some(Dtype::Int8), ..Default::default() });
        assert!(e.contains("dtype int8"), "{e}");
    }

    #[test]
    fn the_cast_type_comes_from_torch_dtype_then_text_config() {
        let obj = |v: Value| v.as_object().cloned().unwrap_or_default();
        assert_eq!(config_dtype(&obj(json!({"torch_dtype": "bfloat16"}))), Some(Dtype::Bfloat16));
        assert_eq!(config_dtype(&obj(json!({"text_config": {"dtype": "float16"}}))), Some(Dtype::Float16));
        assert_eq!(config_dtype(&obj(json!({"dtype": "float16"}))), None, "mlx-lm reads torch_dtype only");
        assert_eq!(config_dtype(&obj(json!({"torch_dtype": "float64"}))), None);
    }
}
