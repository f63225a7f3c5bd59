// SPDX-License-Identifier: EUPL-1.2
//! What a conversion writes, worked out before anything is read: every
//! tensor of the converted model, in the order of mlx-lm's
//! `tree_flatten(model.parameters())` (which decides the shards), with its
//! name, type, shape and the checkpoint tensor it comes from.
//!
//! The modules are the architecture's, from config.json, as mlx-lm's model
//! classes build them: the embedding, each block's attention (q, k, v, o,
//! then q/k norms), MLP (gate, down, up) and norms, the final norm, and the
//! output head unless it is tied. A checkpoint tensor is found under the
//! model's name or the multimodal wrappers our loader accepts
//! (`language_model.`, `model.language_model.`); what mlx-lm's `sanitize`
//! drops is dropped (`rotary_emb.inv_freq`, a tied `lm_head.weight`, Gemma
//! 3's vision tower and projector); anything else left over, anything
//! missing, misshapen or not a float is an error naming the tensor, as
//! mlx-lm's strict load.
//!
//! Quantisation follows mlx-lm's `quantize_model`: every linear layer and
//! embedding whose input width the group size divides, with the default
//! group size and bits, or what a mixed recipe says per layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::{Map, Value};

use mlx::io::TensorInfo;
use mlx::{Dtype, Result};

use super::{Recipe, err};
use crate::model::config::{ModelConfig, Sizes};
use crate::model::{gemma3, llama, qwen2, qwen3};

/// The architectures, by what their parameters look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    /// `llama`, `mistral`.
    Llama,
    /// `qwen2`: q/k/v biases.
    Qwen2,
    /// `qwen3`: q/k norms.
    Qwen3,
    /// `gemma3_text`, and the `gemma3` wrapper (`wrapped`: the model under
    /// `language_model.`).
    Gemma3 { wrapped: bool },
}

impl Arch {
    /// The architecture of config.json's top-level `model_type`.
    pub(crate) fn of(model_type: &str) -> Option<Arch> {
        Some(match model_type {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3_text" => Arch::Gemma3 { wrapped: false },
            "gemma3" => Arch::Gemma3 { wrapped: true },
            _ => return None,
        })
    }

    /// mlx-lm's module for it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 { wrapped: false } => "gemma3_text",
            Arch::Gemma3 { wrapped: true } => "gemma3",
        }
    }

    fn prefix(self) -> &'static str {
        if self == (Arch::Gemma3 { wrapped: true }) { "language_model." } else { "" }
    }
}

/// The shapes and switches that decide an architecture's parameters.
#[derive(Debug, Clone)]
struct Dims {
    sizes: Sizes,
    kv_heads: i32,
    head_dim: i32,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    qk_norm: bool,
    four_norms: bool,
    /// Whether there is an output head: `None` when it is there if the
    /// checkpoint has one (Gemma 3).
    lm_head: Option<bool>,
}

fn dims(arch: Arch, dir: &Path, config: &Map<String, Value>) -> Result<Dims> {
    let parsed = ModelConfig::parse(&dir.join("config.json"), &Value::Object(config.clone()).to_string())?;
    let d = match arch {
        Arch::Llama => {
            let c: llama::Config = parsed.text_as(dir)?;
            let head_dim = c.head_dim.unwrap_or_else(|| c.sizes.even_head_dim());
            let kv_heads = c.num_key_value_heads.unwrap_or(c.sizes.num_attention_heads);
            let (qkv_bias, mlp_bias, lm_head) = (c.attention_bias, c.mlp_bias, Some(!c.tie_word_embeddings));
            Dims { sizes: c.sizes, kv_heads, head_dim, qkv_bias, o_bias: qkv_bias, mlp_bias, ..base(lm_head) }
        }
        Arch::Qwen2 => {
            let c: qwen2::Config = parsed.text_as(dir)?;
            let head_dim = c.sizes.even_head_dim();
            let lm_head = Some(!c.tie_word_embeddings);
            Dims { sizes: c.sizes, kv_heads: c.num_key_value_heads, head_dim, qkv_bias: true, ..base(lm_head) }
        }
        Arch::Qwen3 => {
            let c: qwen3::Config = parsed.text_as(dir)?;
            let lm_head = Some(!c.tie_word_embeddings);
            Dims {
                sizes: c.sizes,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                qk_norm: true,
                ..base(lm_head)
            }
        }
        Arch::Gemma3 { wrapped } => {
            // mlx-lm builds the wrapped text model from `text_config` alone.
            let c: gemma3::Config = if wrapped {
                let Some(Value::Object(text)) = config.get("text_config") else {
                    return Err(err(dir, "config.json of a gemma3 model has no text_config object"));
                };
                let mut merged = match gemma3::defaults() {
                    Value::Object(d) => d,
                    _ => Map::new(),
                };
                merged.extend(text.iter().map(|(k, v)| (k.clone(), v.clone())));
                serde_json::from_value(Value::Object(merged))
                    .map_err(|e| err(dir, format!("config.json's text_config does not fit gemma3_text: {e}")))?
            } else {
                parsed.text_with_defaults(dir, gemma3::defaults())?
            };
            let (kv_heads, head_dim) = (c.num_key_value_heads, c.head_dim);
            Dims { sizes: c.sizes, kv_heads, head_dim, qk_norm: true, four_norms: true, ..base(None) }
        }
    };
    d.sizes.check(dir, d.kv_heads, d.head_dim, &[])?;
    Ok(d)
}

fn base(lm_head: Option<bool>) -> Dims {
    let sizes = Sizes {
        hidden_size: 0,
        num_hidden_layers: 0,
        intermediate_size: 0,
        num_attention_heads: 0,
        rms_norm_eps: 0.0,
        vocab_size: 0,
    };
    Dims {
        sizes,
        kv_heads: 0,
        head_dim: 0,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        four_norms: false,
        lm_head,
    }
}

/// What a module of the model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `[out, inp]`, with a bias `[out]` or not.
    Linear { out: i64, inp: i64, bias: bool },
    /// `[vocab, dim]`.
    Embedding { vocab: i64, dim: i64 },
    /// `[dim]`.
    Norm { dim: i64 },
}

/// One module, by its mlx-lm path without the wrapper prefix.
struct Module {
    path: String,
    kind: Kind,
}

fn modules(d: &Dims, lm_head: bool) -> Vec<Module> {
    let s = &d.sizes;
    let (hidden, inter, vocab) = (i64::from(s.hidden_size), i64::from(s.intermediate_size), i64::from(s.vocab_size));
    let q = i64::from(s.num_attention_heads) * i64::from(d.head_dim);
    let kv = i64::from(d.kv_heads) * i64::from(d.head_dim);
    let m = |path: String, kind| Module { path, kind };
    let linear = |out, inp, bias| Kind::Linear { out, inp, bias };
    let mut out = vec![m("model.embed_tokens".into(), Kind::Embedding { vocab, dim: hidden })];
    for i in 0..s.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push(m(format!("{p}.self_attn.q_proj"), linear(q, hidden, d.qkv_bias)));
        out.push(m(format!("{p}.self_attn.k_proj"), linear(kv, hidden, d.qkv_bias)));
        out.push(m(format!("{p}.self_attn.v_proj"), linear(kv, hidden, d.qkv_bias)));
        out.push(m(format!("{p}.self_attn.o_proj"), linear(hidden, q, d.o_bias)));
        if d.qk_norm {
            for n in ["q_norm", "k_norm"] {
                out.push(m(format!("{p}.self_attn.{n}"), Kind::Norm { dim: i64::from(d.head_dim) }));
            }
        }
        out.push(m(format!("{p}.mlp.gate_proj"), linear(inter, hidden, d.mlp_bias)));
        out.push(m(format!("{p}.mlp.down_proj"), linear(hidden, inter, d.mlp_bias)));
        out.push(m(format!("{p}.mlp.up_proj"), linear(inter, hidden, d.mlp_bias)));
        let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
        if d.four_norms {
            norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
        }
        for n in norms {
            out.push(m(format!("{p}.{n}"), Kind::Norm { dim: hidden }));
        }
    }
    out.push(m("model.norm".into(), Kind::Norm { dim: hidden }));
    if lm_head {
        out.push(m("lm_head".into(), linear(vocab, hidden, false)));
    }
    out
}

/// The names under which a checkpoint may hold the model's tensor `name`
/// (as our loader looks them up: `model/weights.rs`).
fn candidates(name: &str) -> Vec<String> {
    let mut c = vec![name.to_owned(), format!("language_model.{name}")];
    match name.strip_prefix("model.") {
        Some(rest) => {
            c.push(format!("language_model.model.{rest}"));
            c.push(format!("model.language_model.{rest}"));
            c.push(format!("model.language_model.model.{rest}"));
        }
        None => c.push(format!("model.language_model.{name}")),
    }
    c
}

/// Whether mlx-lm's `sanitize` drops the checkpoint tensor `name`.
fn dropped(arch: Arch, name: &str, tied_head: bool) -> bool {
    if name.contains("rotary_emb.inv_freq") {
        return true;
    }
    match arch {
        Arch::Gemma3 { .. } => ["vision_tower", "multi_modal_projector"]
            .iter()
            .any(|p| name.starts_with(p) || name.starts_with(&format!("model.{p}"))),
        _ => tied_head && candidates("lm_head.weight").iter().any(|c| c == name),
    }
}

/// What one output tensor is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Make {
    /// The source tensor, cast to the output type.
    Cast,
    /// One part of the source matrix, cast to `float` (the scales' and
    /// biases' type) and quantised with this group size and bits.
    Quantised { group_size: i32, bits: i32, float: Dtype, part: Part },
}

/// The three tensors a quantised matrix becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    /// The packed `uint32` weights.
    Weight,
    /// One scale per group.
    Scales,
    /// One bias per group.
    Biases,
}

/// One tensor of the converted model.
#[derive(Debug, Clone)]
pub(crate) struct OutTensor {
    /// Its name in the converted model.
    pub(crate) name: String,
    /// The checkpoint tensor it comes from.
    pub(crate) source: String,
    /// Its type.
    pub(crate) dtype: Dtype,
    /// Its shape.
    pub(crate) shape: Vec<i64>,
    /// How it is made.
    pub(crate) make: Make,
}

impl OutTensor {
    /// Its size in bytes.
    pub(crate) fn nbytes(&self) -> u64 {
        self.shape.iter().map(|&d| d.max(0) as u64).product::<u64>() * self.dtype.size_of() as u64
    }
}

/// A quantised module as config.json's `quantization` block records it: the
/// path, the recipe's group size (`None`: mlx-lm's `null`, the default) and
/// bits.
pub(crate) type LayerQuant = (String, Option<i32>, i32);

/// Everything a conversion writes, in mlx-lm's order.
pub(crate) struct Plan {
    /// The tensors.
    pub(crate) tensors: Vec<OutTensor>,
    /// The quantisation entries a mixed recipe adds, in module order.
    pub(crate) layers: Vec<LayerQuant>,
    /// The parameters of the model before quantisation (the index's
    /// `total_parameters`).
    pub(crate) parameters: u64,
    /// How many modules are quantised.
    pub(crate) quantised: usize,
}

/// How a conversion quantises: the default group size and bits, and the
/// recipe's group size and recipe when there is one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Quant {
    pub(crate) group_size: i32,
    pub(crate) bits: i32,
    pub(crate) recipe: Option<(Recipe, Option<i32>)>,
}

/// Works out the plan for the checkpoint in `dir` (config.json as mlx-lm
/// loads it: `config`; the checkpoint's tensors: `inputs`), casting floats
/// to `dtype` (`None`: each keeps its type).
pub(crate) fn plan(
    dir: &Path,
    arch: Arch,
    config: &Map<String, Value>,
    inputs: &BTreeMap<String, TensorInfo>,
    dtype: Option<Dtype>,
    quant: Option<Quant>,
) -> Result<Plan> {
    let d = dims(arch, dir, config)?;
    // Every block has several tensors: a config that names more blocks than the checkpoint has
    // tensors is wrong, and is not worth building a plan for.
    if usize::try_from(d.sizes.num_hidden_layers).unwrap_or(usize::MAX) > inputs.len() {
        return Err(err(
            dir,
            format!(
                "config.json says num_hidden_layers = {} but the checkpoint has only {} tensors",
                d.sizes.num_hidden_layers,
                inputs.len()
            ),
        ));
    }
    let resolve = |name: &str| candidates(name).into_iter().find(|c| inputs.contains_key(c));
    let lm_head = d.lm_head.unwrap_or_else(|| resolve("lm_head.weight").is_some());
    let modules = modules(&d, lm_head);
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    let mut tensors = Vec::new();
    let mut layers = Vec::new();
    let (mut parameters, mut quantised) = (0u64, 0usize);
    let layer_location = recipe_layer_location(arch.prefix(), &modules);
    for m in &modules {
        let leaves: &[(&str, Vec<i64>)] = &match m.kind {
            Kind::Linear { out, inp, bias } => {
                let mut l = vec![("weight", vec![out, inp])];
                if bias {
                    l.push(("bias", vec![out]));
                }
                l
            }
            Kind::Embedding { vocab, dim } => vec![("weight", vec![vocab, dim])],
            Kind::Norm { dim } => vec![("weight", vec![dim])],
        };
        let (in_dims, matrix) = match m.kind {
            Kind::Linear { inp, .. } => (inp, true),
            Kind::Embedding { dim, .. } => (dim, true),
            Kind::Norm { .. } => (0, false),
        };
        // mlx-lm's `quantize_model`: layers whose input width the default group size divides.
        let q = quant.filter(|q| matrix && in_dims % i64::from(q.group_size) == 0).map(|q| match q.recipe {
            Some((recipe, group)) => {
                let path = format!("{}{}", arch.prefix(), m.path);
                let bits = recipe.bits_for(&path, layer_location, d.sizes.num_hidden_layers);
                layers.push((path, group, bits));
                (group.unwrap_or(64), bits)
            }
            None => (q.group_size, q.bits),
        });
        quantised += usize::from(q.is_some());
        for (leaf, shape) in leaves {
            let text_name = format!("{}.{leaf}", m.path);
            let Some(source) = resolve(&text_name) else {
                missing.push(text_name);
                continue;
            };
            let info = &inputs[&source];
            check_source(dir, &source, info, shape)?;
            used.insert(source.clone());
            parameters += shape.iter().product::<i64>().max(0) as u64;
            let name = format!("{}{text_name}", arch.prefix());
            let out_dtype = dtype.unwrap_or(info.dtype);
            match q {
                Some((group_size, bits)) if *leaf == "weight" => {
                    let groups = shape[1] / i64::from(group_size);
                    for (part, suffix, dt, s) in [
                        (Part::Weight, "weight", Dtype::Uint32, vec![shape[0], shape[1] * i64::from(bits) / 32]),
                        (Part::Scales, "scales", out_dtype, vec![shape[0], groups]),
                        (Part::Biases, "biases", out_dtype, vec![shape[0], groups]),
                    ] {
                        tensors.push(OutTensor {
                            name: format!("{}{}.{suffix}", arch.prefix(), m.path),
                            source: source.clone(),
                            dtype: dt,
                            shape: s,
                            make: Make::Quantised { group_size, bits, float: out_dtype, part },
                        });
                    }
                }
                _ => tensors.push(OutTensor { name, source, dtype: out_dtype, shape: shape.clone(), make: Make::Cast }),
            }
        }
    }
    if !missing.is_empty() {
        return Err(err(dir, format!("the checkpoint has no tensor {}", shown(&missing))));
    }
    let unused: Vec<String> =
        inputs.keys().filter(|k| !used.contains(*k) && !dropped(arch, k, !lm_head)).cloned().collect();
    if !unused.is_empty() {
        return Err(err(
            dir,
            format!("{} tensor(s) are not parameters of a {} model: {}", unused.len(), arch.name(), shown(&unused)),
        ));
    }
    Ok(Plan { tensors, layers, parameters, quantised })
}

fn shown(names: &[String]) -> String {
    let mut s = names.iter().take(8).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 8 {
        s.push_str(&format!(" and {} more", names.len() - 8));
    }
    s
}

fn check_source(dir: &Path, name: &str, info: &TensorInfo, shape: &[i64]) -> Result<()> {
    if !matches!(info.dtype, Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16) {
        let what = if info.dtype == Dtype::Uint32 { " (a quantised checkpoint?)" } else { "" };
        return Err(err(dir, format!("{name} is {}{what}; expected float32, float16 or bfloat16", info.dtype)));
    }
    if info.shape != shape {
        return Err(err(dir, format!("{name} has shape {:?}; the config says {shape:?}", info.shape)));
    }
    Ok(())
}

/// Where the layer number sits in a module path (mlx-lm: the first digit
/// component of the first `down_proj` path, the wrapper's prefix included).
fn recipe_layer_location(prefix: &str, modules: &[Module]) -> usize {
    let Some(m) = modules.iter().find(|m| m.path.contains("down_proj")) else { return 0 };
    let path = format!("{prefix}{}", m.path);
    path.split('.').position(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())).unwrap_or(0)
}

impl Recipe {
    /// The bits mlx-lm's `mixed_quant_predicate` gives the module at `path`
    /// (its layer number at component `location`; 0 for a path without one)
    /// in a model of `layers` blocks: more bits for `v_proj` and `down_proj`
    /// of the first and last eighth of the layers and every third layer
    /// between, and for the output head.
    pub(crate) fn bits_for(self, path: &str, location: usize, layers: i32) -> i32 {
        let (low, high) = self.bits();
        let index: i64 = path.split('.').nth(location).and_then(|p| p.parse().ok()).unwrap_or(0);
        let n = i64::from(layers);
        let more = index < n / 8 || index >= 7 * n / 8 || (index - n / 8).rem_euclid(3) == 2;
        let high_here = ((path.contains("v_proj") || path.contains("down_proj")) && more) || path.contains("lm_head");
        if high_here { high } else { low }
    }
}
