// SPDX-License-Identifier: EUPL-1.2
//! Models: loading a Hugging Face model directory and running it.
//!
//! One file per architecture, each reading like mlx-lm's: a `Config` (serde
//! from config.json, unknown keys ignored, mlx-lm's defaults), the block and
//! the model. The pieces every block is built from are written once in
//! [`layers`] (RMS norm, attention, the gated MLP); [`config`] reads
//! config.json, [`weights`] looks tensors up strictly, [`rope`] is the rope
//! factory. What is not the architecture's business stays out of the model
//! files: a model lends its blocks' attention and MLP, its embedding and its
//! head ([`LanguageModel::parts_mut`]), and LoRA ([`crate::lora`]), decode
//! fusion ([`LanguageModel::fuse_projections`]) and tensor parallelism
//! ([`tp::shard`]) work on those, once for every architecture.
//!
//! | `model_type` | file |
//! |---|---|
//! | `gemma3`, `gemma3_text` | [`gemma3`] |
//! | `qwen3` | [`qwen3`] (the [`llama`] decoder with q/k norms) |
//! | `qwen2` | [`qwen2`] (the [`llama`] decoder with q/k/v biases) |
//! | `llama`, `mistral` | [`llama`] |

pub mod config;
pub mod dtype;
pub mod gemma3;
pub mod layers;
pub mod llama;
pub mod norm;
pub mod quant_choice;
pub mod quant_probe;
pub mod qwen2;
pub mod qwen3;
pub mod rope;
pub mod tp;
pub mod transformer;
pub mod weights;

use std::path::{Path, PathBuf};

use inference_core::ModelInfo;

use mlx::{Array, Error, Result};

use self::config::ModelConfig;
use self::dtype::{Compute, DtypePolicy, Host, QuantisedPolicy};
pub use self::layers::AttentionTaps;
use self::layers::{Attention, Mlp};
use self::tp::TensorParallel;
use self::weights::{Weights, model_err};
use crate::cache::LayerCache;
use crate::nn::{Embedding, FusedLinear, Linear};

/// The architectures this crate runs, by `model_type`.
pub const SUPPORTED: &[&str] = &["gemma3", "gemma3_text", "llama", "mistral", "qwen2", "qwen3"];

/// What a loaded model is: inference-core's [`ModelInfo`], with
/// `context_length` set to the trained context (`max_position_embeddings`).
pub type Description = ModelInfo;

pub(crate) fn describe(
    config: &ModelConfig,
    dims: &(i32, i32, i32, Option<i32>),
    embed_quant: Option<(i32, i32)>,
) -> Description {
    let quant = config.quant.as_ref().map(|q| (q.group_size, q.bits)).or(embed_quant);
    let u = |v: i32| usize::try_from(v).unwrap_or(0);
    ModelInfo {
        architecture: config.model_type.clone(),
        vocab_size: u(dims.0),
        num_layers: u(dims.1),
        hidden_size: u(dims.2),
        quant_bits: quant.map(|q| q.1 as u32),
        quant_group: quant.map(|q| q.0 as u32),
        context_length: dims.3.map(u),
        compute_dtype: None,
        compute_dtype_reason: None,
        tool_call_format: Default::default(),
        has_chat_template: false,
    }
}

/// A causal language model: token ids in, logits out, with per-layer caches
/// the caller owns.
pub trait LanguageModel {
    /// Runs `inputs: [B, L]` (int32 token ids) through the model, appending to
    /// `caches` (one per layer, from [`LanguageModel::make_cache`]), and returns
    /// logits `[B, L, vocab]`. [`AttentionTaps::capture`] records each
    /// layer's post-rope queries and keys on the way.
    fn forward(&self, inputs: &Array, caches: &mut [LayerCache]) -> Result<Array>;

    /// Fresh caches, one per layer (rotating ones for sliding-window layers).
    fn make_cache(&self) -> Result<Vec<LayerCache>>;

    /// What the model is.
    fn description(&self) -> &Description;

    /// The parts every architecture shares, borrowed: each block's attention
    /// and MLP, the embedding and the head. LoRA, decode fusion and tensor
    /// parallelism work on these.
    fn parts_mut(&mut self) -> Parts<'_>;

    /// Every linear layer inside the decoder blocks, with its module path as
    /// mlx-lm names it (`model.layers.3.self_attn.q_proj`), in layer order.
    /// LoRA adapters ([`crate::lora`]) are attached through these. The fused
    /// copies ([`LanguageModel::fuse_projections`]) are dropped first: the
    /// caller may change the layers, and they would go stale.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        for b in self.parts_mut().layers {
            (b.self_attn.qkv, b.mlp.gate_up) = (None, None);
        }
        self.linears_in_place()
    }

    /// The layers of [`LanguageModel::linears_mut`], in the same order, with the
    /// fused decode projections left in place: only for callers that change no
    /// weight but the parts' `lora` (a fused layer whose parts carry an adapter
    /// is not used, see `layers.rs`), such as the adapters served beside a model
    /// (`backend/adapters.rs`), which swap theirs in and out around each step.
    fn linears_in_place(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (layer, b) in self.parts_mut().layers.into_iter().enumerate() {
            let (a, m) = (b.self_attn, b.mlp);
            let p = format!("model.layers.{layer}");
            let attn = [("q_proj", &mut a.q_proj), ("k_proj", &mut a.k_proj), ("v_proj", &mut a.v_proj)];
            for (name, lin) in attn.into_iter().chain([("o_proj", &mut a.o_proj)]) {
                out.push((format!("{p}.self_attn.{name}"), lin));
            }
            for (name, lin) in
                [("gate_proj", &mut m.gate_proj), ("up_proj", &mut m.up_proj), ("down_proj", &mut m.down_proj)]
            {
                out.push((format!("{p}.mlp.{name}"), lin));
            }
        }
        out
    }

    /// The number of decoder blocks ([`LanguageModel::forward_layer`] takes
    /// `0..num_layers()`).
    fn num_layers(&self) -> usize {
        self.description().num_layers
    }

    /// Fuses the projections that read the same input (q/k/v, gate/up) so
    /// that a decode step (at most 32 rows) runs one matmul for each group
    /// ([`crate::nn::FusedLinear`]); layers with a LoRA adapter stay apart.
    /// [`load`] calls it, and so does [`crate::backend::MetalModel::set_adapter`];
    /// taking the layers through [`LanguageModel::linears_mut`] undoes it.
    fn fuse_projections(&mut self) -> Result<()> {
        for b in self.parts_mut().layers {
            let (a, m) = (b.self_attn, b.mlp);
            a.fuse()?;
            m.gate_up = FusedLinear::fuse(&mut [&mut m.gate_proj, &mut m.up_proj])?;
        }
        Ok(())
    }

    /// Whether [`LanguageModel::embed`], [`LanguageModel::forward_layer`] and
    /// [`LanguageModel::head`] are implemented, so that the model can run one
    /// decoder block at a time (the prefill does, to bound its memory; see
    /// [`crate::generate::prefill_chunk`]).
    fn runs_block_by_block(&self) -> bool {
        false
    }

    /// The first part of [`LanguageModel::forward`]: token ids `[B, L]` to
    /// hidden states `[B, L, hidden]`.
    fn embed(&self, _inputs: &Array) -> Result<Array> {
        Err(Error::invalid("embed", "this model does not run block by block"))
    }

    /// Runs decoder block `layer` on hidden states `h` with its cache (the
    /// mask comes from the cache, as in [`LanguageModel::forward`]). Calling
    /// [`LanguageModel::embed`], every block in order and
    /// [`LanguageModel::head`] gives the same logits as `forward`; training
    /// uses this to checkpoint one block at a time.
    fn forward_layer(&self, _layer: usize, _h: &Array, _cache: &mut LayerCache) -> Result<Array> {
        Err(Error::invalid("forward_layer", "this model does not run block by block"))
    }

    /// The last part of [`LanguageModel::forward`]: the final norm and the
    /// output projection, hidden states to logits.
    fn head(&self, _h: &Array) -> Result<Array> {
        Err(Error::invalid("head", "this model does not run block by block"))
    }
}

/// The block `layer` of a model, or an error naming the count.
pub(crate) fn layer_index(op: &'static str, layer: usize, count: usize) -> Result<()> {
    if layer >= count {
        return Err(Error::invalid(op, format!("layer {layer} is out of range: the model has {count} layers")));
    }
    Ok(())
}

/// One decoder block's shared pieces, borrowed (see [`LanguageModel::parts_mut`]).
pub struct BlockParts<'a> {
    /// The attention layer.
    pub self_attn: &'a mut Attention,
    /// The MLP.
    pub mlp: &'a mut Mlp,
}

/// A model's shared pieces, borrowed (see [`LanguageModel::parts_mut`]).
pub struct Parts<'a> {
    /// Every decoder block, in order.
    pub layers: Vec<BlockParts<'a>>,
    /// The token embedding.
    pub embed_tokens: &'a mut Embedding,
    /// The output head, when it is not the embedding (tied).
    pub lm_head: Option<&'a mut Linear>,
}

/// A loaded model with its directory and config.
pub struct LoadedModel {
    /// The model.
    pub model: Box<dyn LanguageModel>,
    /// The parsed config.json.
    pub config: ModelConfig,
    /// The model directory.
    pub dir: PathBuf,
    /// The type the model computes in, and why ([`dtype`]).
    pub compute: Compute,
}

/// The model directory of `path`: the path itself, or the directory of a file in it.
pub fn model_dir(path: &Path) -> Result<PathBuf> {
    let meta =
        std::fs::metadata(path).map_err(|source| Error::Io { op: "load_model", path: path.to_path_buf(), source })?;
    let dir = if meta.is_dir() { path.to_path_buf() } else { path.parent().map(Path::to_path_buf).unwrap_or_default() };
    if !dir.join("config.json").is_file() {
        return Err(model_err(&dir, "no config.json (is this a Hugging Face model directory?)"));
    }
    Ok(dir)
}

/// Loads the model at `path` (a directory, or a file inside one) with the
/// checkpoint's own types ([`DtypePolicy::Checkpoint`]).
pub fn load(path: &Path) -> Result<LoadedModel> {
    load_with(path, None, DtypePolicy::Checkpoint)
}

/// Loads this rank's shard of a tensor-parallel model (see [`tp`]): every
/// rank of `tp`'s group loads the same directory and must then run the same
/// forward passes, since each block ends in a sum over the ranks.
pub fn load_sharded(path: &Path, tp: TensorParallel) -> Result<LoadedModel> {
    load_with(path, Some(tp), DtypePolicy::Checkpoint)
}

/// Loads the model at `path`, whole or (with `tp`) this rank's shard, with
/// its floating-point weights in the type `policy` chooses ([`dtype`]) and
/// quantised layers as `policy` implies ([`QuantisedPolicy::Auto`]).
pub fn load_with(path: &Path, tp: Option<TensorParallel>, policy: DtypePolicy) -> Result<LoadedModel> {
    load_with_quantised(path, tp, policy, QuantisedPolicy::Auto)
}

/// [`load_with`], with what happens to a quantised checkpoint's layers
/// chosen by `quantised` (the metal backend option `quantised`). For `auto`
/// on a CPU this times one quantised layer against its dense copy first
/// ([`quant_probe`]), on the calling thread's device.
pub fn load_with_quantised(
    path: &Path,
    tp: Option<TensorParallel>,
    policy: DtypePolicy,
    quantised: QuantisedPolicy,
) -> Result<LoadedModel> {
    let span = tracing::info_span!(
        "load",
        dir = %path.display(),
        architecture = tracing::field::Empty,
        rank = tracing::field::Empty,
        ranks = tracing::field::Empty,
        dtype = tracing::field::Empty,
    );
    let _load = span.enter();
    let dir = model_dir(path)?;
    let config = ModelConfig::load(&dir)?;
    let arch = config.model_type.as_str();
    span.record("architecture", arch);
    if !SUPPORTED.contains(&arch) {
        return Err(model_err(&dir, format!("unsupported architecture {arch:?}; supported: {}", SUPPORTED.join(", "))));
    }
    if let Some(tp) = &tp {
        span.record("rank", tp.shard().rank);
        span.record("ranks", tp.shard().size);
    }
    let mut weights = match tp {
        // A rank reads its slices of the sharded layers straight from the files.
        Some(_) => Weights::load_sliceable(&dir, config.quant.clone())?,
        None => Weights::load(&dir, config.quant.clone())?,
    };
    let checkpoint = weights.checkpoint_types();
    let facts = checkpoint.quantised.then(|| {
        let time = dtype::needs_timing(policy, quantised, checkpoint);
        // The ranks of a tensor-parallel model must choose alike, and timings differ between them.
        if time && tp.is_some() {
            let why = "not measured: the ranks of a tensor-parallel model must choose alike".to_owned();
            return dtype::QuantFacts { timing: Some(Err(why)), ..quant_probe::facts(&weights, false) };
        }
        quant_probe::facts(&weights, time)
    });
    let mut compute = dtype::choose_on(policy, quantised, checkpoint, Host::this(), facts.as_ref());
    let narrow = dtype::narrow_tables(&compute, checkpoint, mlx::device::current()?);
    if narrow.is_some() {
        let kept = if checkpoint.quantised { "quantised".to_owned() } else { checkpoint.float.to_string() };
        compute.reason.push_str(&format!(
            "; the embedding table and the output head stay {kept}, their products computed in float32"
        ));
    }
    let stored: u64 = weights.tensors().values().map(|a| a.nbytes() as u64).sum();
    // The sizes and /proc/meminfo only where twins are possible at all.
    let twins = narrow.is_some()
        && dtype::narrow_layers(narrow, quant_probe::dense_bytes(&weights, 4), stored, quant_probe::available_memory());
    if twins {
        compute.reason.push_str(&format!(
            "; decode steps read every layer as stored, prefill their float32 copies ({:.2} GB more)",
            stored as f64 / 1e9
        ));
    }
    span.record("dtype", compute.dtype.name());
    tracing::debug!(dtype = compute.dtype.name(), dequantise = compute.dequantise, reason = %compute.reason, "compute type");
    weights.set_cast(compute.cast);
    weights.set_dequantise(compute.dequantise);
    weights.set_narrow_tables(narrow);
    weights.set_narrow_layers(twins);
    let _build = tracing::debug_span!("build_model").entered();
    let mut model: Box<dyn LanguageModel> = match arch {
        "gemma3" | "gemma3_text" => Box::new(gemma3::Gemma3::load(&config, &weights)?),
        "qwen3" => Box::new(qwen3::load(&config, &weights)?),
        "qwen2" => Box::new(qwen2::load(&config, &weights)?),
        _ => Box::new(llama::Llama::load(&config, &weights)?),
    };
    // As mlx-lm's `shard()`: the built model is split over the ranks.
    if let Some(tp) = &tp {
        tp::shard(model.as_mut(), &weights, tp)?;
    }
    weights.finish()?;
    model.fuse_projections()?;
    Ok(LoadedModel { model, config, dir, compute })
}

pub(crate) fn check_caches(caches: &[LayerCache], layers: usize) -> Result<()> {
    if caches.len() != layers {
        return Err(Error::invalid(
            "forward",
            format!("the model has {layers} layers but {} caches were given", caches.len()),
        ));
    }
    Ok(())
}
