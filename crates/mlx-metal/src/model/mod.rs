// SPDX-License-Identifier: EUPL-1.2
//! Models: loading a Hugging Face model directory and running it.
//!
//! One file per architecture, each reading like mlx-lm's: a `Config` (serde
//! from config.json, unknown keys ignored), attention, MLP, block, model.
//! Shared pieces are small: [`config`] (config.json), [`weights`] (strict
//! tensor lookup), [`rope`] (the rope factory) and the free functions here.
//!
//! | `model_type` | file |
//! |---|---|
//! | `gemma3`, `gemma3_text` | [`gemma3`] |
//! | `qwen3` | [`qwen3`] (the [`llama`] decoder with q/k norms) |
//! | `qwen2` | [`qwen2`] (the [`llama`] decoder with q/k/v biases) |
//! | `llama`, `mistral` | [`llama`] |

pub mod config;
pub mod gemma3;
pub mod llama;
pub mod qwen2;
pub mod qwen3;
pub mod rope;
pub mod tp;
pub mod weights;

use std::path::{Path, PathBuf};

use inference_core::ModelInfo;

use crate::cache::{LayerCache, Mask};
use crate::model::tp::TensorParallel;
use crate::nn::{FusedLinear, Linear};
use mlx::Array;
use mlx::fast;
use mlx::ops;
use mlx::{Error, Result};

use self::config::ModelConfig;
use self::weights::{Weights, model_err};

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
    }
}

/// The post-rope queries and keys of every attention layer of one forward
/// pass, in layer order: `(queries [B, H, L, D], keys [B, H_kv, L, D])`.
#[derive(Debug, Default)]
pub struct AttentionTaps {
    /// One entry per layer.
    pub layers: Vec<(Array, Array)>,
}

impl AttentionTaps {
    pub(crate) fn record(taps: &mut Option<&mut AttentionTaps>, q: &Array, k: &Array) {
        if let Some(t) = taps.as_deref_mut() {
            t.layers.push((q.clone(), k.clone()));
        }
    }
}

/// A causal language model: token ids in, logits out, with per-layer caches
/// the caller owns.
pub trait LanguageModel {
    /// Runs `inputs: [B, L]` (int32 token ids) through the model, appending to
    /// `caches` (one per layer, from [`LanguageModel::make_cache`]), and returns
    /// logits `[B, L, vocab]`.
    fn forward(&self, inputs: &Array, caches: &mut [LayerCache]) -> Result<Array> {
        self.forward_tapped(inputs, caches, None)
    }

    /// [`LanguageModel::forward`], also recording each layer's post-rope
    /// queries and keys into `taps` when given.
    fn forward_tapped(
        &self,
        inputs: &Array,
        caches: &mut [LayerCache],
        taps: Option<&mut AttentionTaps>,
    ) -> Result<Array>;

    /// Fresh caches, one per layer (rotating ones for sliding-window layers).
    fn make_cache(&self) -> Result<Vec<LayerCache>>;

    /// What the model is.
    fn description(&self) -> &Description;

    /// Every linear layer inside the decoder blocks, with its module path as
    /// mlx-lm names it (`model.layers.3.self_attn.q_proj`), in layer order.
    /// LoRA adapters ([`crate::lora`]) are attached through these.
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        Vec::new()
    }

    /// The number of decoder blocks ([`LanguageModel::forward_layer`] takes
    /// `0..num_layers()`).
    fn num_layers(&self) -> usize {
        self.description().num_layers
    }

    /// Fuses the projections that read the same input (q/k/v, gate/up) so
    /// that a decode step of one sequence runs one matmul for each group
    /// ([`crate::nn::FusedLinear`]); layers with a LoRA adapter stay apart.
    /// [`load`] calls it, and so does [`crate::backend::MetalModel::set_adapter`];
    /// taking the layers through [`LanguageModel::linears_mut`] undoes it.
    fn fuse_projections(&mut self) -> Result<()> {
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

/// A decoder block's linear layers and fused projections, borrowed: what
/// LoRA (through [`LanguageModel::linears_mut`]) and
/// [`LanguageModel::fuse_projections`] work on. Each model lends its blocks
/// this way, so the two operations are written once.
pub(crate) struct BlockLinears<'a> {
    /// q, k, v and o.
    pub attn: [&'a mut Linear; 4],
    /// gate, up and down.
    pub mlp: [&'a mut Linear; 3],
    /// q/k/v as one matmul, when fused.
    pub qkv: &'a mut Option<FusedLinear>,
    /// gate/up as one matmul, when fused.
    pub gate_up: &'a mut Option<FusedLinear>,
}

/// Fuses every block's q/k/v and gate/up (layers with LoRA stay apart).
pub(crate) fn fuse_blocks<'a>(blocks: impl Iterator<Item = BlockLinears<'a>>) -> Result<()> {
    for b in blocks {
        let ([q, k, v, _], [gate, up, _]) = (b.attn, b.mlp);
        *b.qkv = FusedLinear::fuse(&mut [q, k, v])?;
        *b.gate_up = FusedLinear::fuse(&mut [gate, up])?;
    }
    Ok(())
}

/// Every block's linear layers with their mlx-lm module paths
/// (`model.layers.3.self_attn.q_proj`), in layer order. The fused copies are
/// dropped first: the caller may change the layers, and they would go stale.
pub(crate) fn block_linears<'a>(blocks: impl Iterator<Item = BlockLinears<'a>>) -> Vec<(String, &'a mut Linear)> {
    let mut out = Vec::new();
    for (layer, b) in blocks.enumerate() {
        *b.qkv = None;
        *b.gate_up = None;
        let p = format!("model.layers.{layer}");
        for (name, lin) in ["q_proj", "k_proj", "v_proj", "o_proj"].into_iter().zip(b.attn) {
            out.push((format!("{p}.self_attn.{name}"), lin));
        }
        for (name, lin) in ["gate_proj", "up_proj", "down_proj"].into_iter().zip(b.mlp) {
            out.push((format!("{p}.mlp.{name}"), lin));
        }
    }
    out
}

/// A loaded model with its directory and config.
pub struct LoadedModel {
    /// The model.
    pub model: Box<dyn LanguageModel>,
    /// The parsed config.json.
    pub config: ModelConfig,
    /// The model directory.
    pub dir: PathBuf,
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

/// Loads the model at `path` (a directory, or a file inside one).
pub fn load(path: &Path) -> Result<LoadedModel> {
    load_with(path, None)
}

/// Loads this rank's shard of a tensor-parallel model (see [`tp`]): every
/// rank of `tp`'s group loads the same directory and must then run the same
/// forward passes, since each block ends in a sum over the ranks.
pub fn load_sharded(path: &Path, tp: TensorParallel) -> Result<LoadedModel> {
    load_with(path, Some(tp))
}

fn load_with(path: &Path, tp: Option<TensorParallel>) -> Result<LoadedModel> {
    let dir = model_dir(path)?;
    let config = ModelConfig::load(&dir)?;
    let arch = config.model_type.as_str();
    if !SUPPORTED.contains(&arch) {
        return Err(model_err(&dir, format!("unsupported architecture {arch:?}; supported: {}", SUPPORTED.join(", "))));
    }
    let weights = match tp {
        Some(tp) => Weights::load_sharded(&dir, config.quant.clone(), tp)?,
        None => Weights::load(&dir, config.quant.clone())?,
    };
    let mut model: Box<dyn LanguageModel> = match arch {
        "gemma3" | "gemma3_text" => Box::new(gemma3::Gemma3::load(&config, &weights)?),
        "qwen3" => Box::new(qwen3::load(&config, &weights)?),
        "qwen2" => Box::new(qwen2::load(&config, &weights)?),
        _ => {
            let cfg = llama::DecoderConfig::llama(&config, &dir)?;
            Box::new(llama::Decoder::load(&config, cfg, &weights)?)
        }
    };
    weights.finish()?;
    model.fuse_projections()?;
    Ok(LoadedModel { model, config, dir })
}

/// `[B, L, H·D]` → `[B, H, L, D]`.
pub(crate) fn split_heads(x: &Array, b: i32, l: i32, heads: i32) -> Result<Array> {
    ops::transpose(&ops::reshape(x, &[b, l, heads, -1])?, &[0, 2, 1, 3])
}

/// `[B, H, L, D]` → `[B, L, H·D]`.
pub(crate) fn merge_heads(x: &Array, b: i32, l: i32) -> Result<Array> {
    ops::reshape(&ops::transpose(x, &[0, 2, 1, 3])?, &[b, l, -1])
}

/// Scaled dot-product attention with the fused kernel.
pub(crate) fn attention(q: &Array, k: &Array, v: &Array, scale: f32, mask: &Mask) -> Result<Array> {
    fast::scaled_dot_product_attention(q, k, v, scale, mask.as_attention(), None)
}

/// Runs `parts` on `x`, through `fused` (one matmul) when `x` is a single
/// position of a single sequence — a decode step, where kernel launches cost
/// more than the work — and one by one otherwise.
pub(crate) fn project<const N: usize>(
    fused: Option<&FusedLinear>,
    parts: [&Linear; N],
    x: &Array,
) -> Result<[Array; N]> {
    let out = match fused {
        Some(f) if x.size() == x.dim(-1)? as usize => f.forward(x)?,
        _ => parts.iter().map(|p| p.forward(x)).collect::<Result<Vec<_>>>()?,
    };
    // A fused layer built from other parts than these is a bug: say so rather than recompute.
    <[Array; N]>::try_from(out)
        .map_err(|o| Error::invalid("project", format!("{} outputs for {N} projections", o.len())))
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
