// SPDX-License-Identifier: EUPL-1.2
//! Typed views of the golden files that `xtask/fixtures/make_goldens.py` writes into
//! `testdata/golden/` (the format is documented field by field in `testdata/README.md`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::FixtureError;

/// The `format` of a model golden this crate reads.
pub const MODEL_FORMAT: &str = "mlxr-golden/1";
/// The `format` of a tokenizer golden this crate reads.
pub const TOKENIZER_FORMAT: &str = "mlxr-tokenizer-golden/1";

/// Whether a golden belongs to a tiny random model (committed) or a real one (in the models cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A tiny random model under `testdata/models`.
    Tiny,
    /// A real model converted into the models cache by `cargo xtask fixtures`.
    Real,
}

/// How a model's weights are quantised (`quantization` in its config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Quantization {
    /// Bits per weight: 4 or 8 here.
    pub bits: u32,
    /// Weights per scale/bias pair.
    pub group_size: u32,
}

/// The package versions that made a golden.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Versions {
    /// MLX (`mlx.core.__version__`).
    pub mlx: String,
    /// mlx-lm.
    pub mlx_lm: String,
    /// Hugging Face `tokenizers` (Python).
    pub tokenizers: String,
    /// Hugging Face `transformers`.
    pub transformers: String,
    /// Everything else recorded (numpy, python, machine, device).
    #[serde(flatten)]
    pub other: BTreeMap<String, String>,
}

/// The golden outputs of one model (`<model>.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelGolden {
    /// Always [`MODEL_FORMAT`].
    pub format: String,
    /// The fixture's name, e.g. `gemma3-tiny` or `smollm2-135m-instruct-4bit`.
    pub model: String,
    /// Tiny (committed) or real (cached).
    pub kind: Kind,
    /// Where the model lives: relative to the workspace root, or `$MLXR_MODELS/<name>` for the
    /// models cache (see [`crate::models_dir`]).
    pub model_dir: String,
    /// `model_type` from config.json (`gemma3_text`, `gemma3`, `qwen3`, `qwen2`, `llama`).
    pub model_type: String,
    /// Rows of the embedding and width of every logits row (may exceed the tokenizer's size).
    pub vocab_size: usize,
    /// The weights' dtype (`torch_dtype`): `bfloat16` or `float32`.
    pub dtype: String,
    /// Present for quantised models.
    pub quantization: Option<Quantization>,
    /// The type mlx-lm computed in when it is not the checkpoint's own: the model was loaded,
    /// then cast with `model.set_dtype(...)` (the `<model>.float32` goldens). `None`: the
    /// checkpoint's own types, as mlx-lm loads them.
    #[serde(default)]
    pub compute_dtype: Option<String>,
    /// The dtype mlx-lm's logits came out in (stored as float32 either way).
    pub logits_dtype: String,
    /// Versions of the reference packages.
    pub versions: Versions,
    /// sha256 of the generator (make_goldens.py, the pins and the tokenizer corpus).
    pub recipe_sha256: String,
    /// sha256 of the model files the golden was made from.
    pub files_sha256: BTreeMap<String, String>,
    /// Fixed token sequences with their logits.
    pub sequences: Vec<Sequence>,
    /// Greedy continuations.
    pub greedy: Vec<GreedyRun>,
    /// Greedy continuations with a quantised KV cache (some models; empty elsewhere).
    #[serde(default)]
    pub kv_quant: Vec<KvQuantRun>,
    /// Seeded sampled continuations (some tiny models; empty elsewhere).
    #[serde(default)]
    pub sampling: Vec<SampledRun>,
    /// Chat templates rendered by the model's tokenizer (empty when it has no template).
    #[serde(default)]
    pub chat: Vec<ChatCase>,
}

/// One fixed token sequence and mlx-lm's logits for every position of it, from one forward pass
/// through a fresh cache.
#[derive(Debug, Clone, Deserialize)]
pub struct Sequence {
    /// `short`, `pangram`, `edge_ids` (tiny) or `question`, `chat`, `paragraph` (real).
    pub name: String,
    /// The input ids, specials included.
    pub tokens: Vec<u32>,
    /// Tiny models: the full logits, one row of `vocab_size` per token.
    #[serde(default)]
    pub logits: Option<Vec<Vec<f32>>>,
    /// Real models: the `k` largest logits of every row.
    #[serde(default)]
    pub top_k: Option<TopK>,
    /// Real models: checksums of every full row.
    #[serde(default)]
    pub checksums: Option<Vec<RowChecksums>>,
}

/// The `k` largest logits of every row, largest first (ties in id order).
#[derive(Debug, Clone, Deserialize)]
pub struct TopK {
    /// How many per row.
    pub k: usize,
    /// Vocabulary ids, one list per position.
    pub ids: Vec<Vec<u32>>,
    /// Their logits, one list per position.
    pub values: Vec<Vec<f32>>,
}

/// Checksums of one full logits row, computed in float64 from the float32 values.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct RowChecksums {
    /// Sum of the row.
    pub sum: f64,
    /// Sum of squares.
    pub sum_sq: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Index of the largest value (the first on ties).
    pub argmax: u32,
    /// `log(sum(exp(row)))`.
    pub logsumexp: f64,
}

/// A greedy continuation by mlx-lm's `generate_step` (argmax sampler, EOS not checked).
#[derive(Debug, Clone, Deserialize)]
pub struct GreedyRun {
    /// The sequence the prompt came from.
    pub name: String,
    /// The prompt ids.
    pub prompt: Vec<u32>,
    /// How many tokens were generated.
    pub max_tokens: usize,
    /// The generated ids.
    pub tokens: Vec<u32>,
    /// Log-probability of each generated token.
    pub logprobs: Vec<f32>,
    /// At each step, the log-probability gap between the best and the second-best token: a small
    /// margin is a near tie that another correct implementation may break the other way.
    pub margins: Vec<f32>,
}

/// A greedy continuation by mlx-lm's `generate_step` with a quantised KV cache (`kv_bits`,
/// `kv_group_size`, `quantized_kv_start`, `prefill_step_size`; xtask/fixtures/kv_goldens.py).
#[derive(Debug, Clone, Deserialize)]
pub struct KvQuantRun {
    /// What the run covers, e.g. `bits4_start_in_prompt`.
    pub name: String,
    /// Bits per quantised element (4 or 8).
    pub kv_bits: i32,
    /// Elements per scale and bias.
    pub kv_group_size: i32,
    /// The position from which the cache is quantised.
    pub quantized_kv_start: i32,
    /// Prompt tokens per prefill chunk.
    pub prefill_step_size: usize,
    /// `"full precision"` when the model's sliding-window layers were left unquantised (mlx-lm
    /// cannot quantise them); absent for models without such layers.
    #[serde(default)]
    pub sliding_window_layers: Option<String>,
    /// The prompt ids.
    pub prompt: Vec<u32>,
    /// How many tokens were generated.
    pub max_tokens: usize,
    /// The generated ids.
    pub tokens: Vec<u32>,
    /// The log-probability gap between the best and the second-best token at each step.
    pub margins: Vec<f32>,
}

/// A seeded continuation by mlx-lm's `generate_step`: `mx.random.seed(seed)`, then
/// `make_sampler(temp, top_p, min_p, min_tokens_to_keep, top_k)` and
/// `make_logits_processors(repetition_penalty, repetition_context_size)` (EOS not checked).
#[derive(Debug, Clone, Deserialize)]
pub struct SampledRun {
    /// The setting's name (`temp`, `top_p`, `top_k`, `min_p`, `combined`, `greedy_penalty`, ...).
    pub name: String,
    /// The sequence the prompt came from.
    pub sequence: String,
    /// The prompt ids.
    pub prompt: Vec<u32>,
    /// The seed of MLX's random state.
    pub seed: u64,
    /// How many tokens were generated.
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// mlx-lm's `top_p`: 0 (its default) or 1 means off.
    pub top_p: f32,
    /// 0 means off.
    pub min_p: f32,
    /// 0 means off.
    pub top_k: usize,
    /// Tokens min-p always keeps.
    pub min_tokens_to_keep: usize,
    /// The multiplicative repetition penalty; `None` when no logits processor ran.
    pub repetition_penalty: Option<f32>,
    /// How many recent tokens (the prompt included) the penalty looks at.
    pub repetition_context_size: usize,
    /// The sampled ids.
    pub tokens: Vec<u32>,
    /// The log-probability of each sampled token (after the processors, before the sampler's
    /// filters and temperature), as `generate_step` yields it.
    pub logprobs: Vec<f32>,
}

/// A chat conversation rendered by the model's template.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCase {
    /// `user_only`, `system_user` or `multi_turn`.
    pub name: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Always true here: the prompt ends with the assistant's header.
    pub add_generation_prompt: bool,
    /// `apply_chat_template(messages, add_generation_prompt, tokenize=False)`.
    pub text: String,
    /// `text` encoded without adding special tokens (as mlx-lm does).
    pub ids: Vec<u32>,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Encode and decode of the tokenizer corpus by the `tokenizers` library (`tokenizer-<name>.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizerGolden {
    /// Always [`TOKENIZER_FORMAT`].
    pub format: String,
    /// `tiny-spm`, `tiny-chatml`, `tiny-llama3`, `gemma3-270m`, `smollm2-135m-instruct`.
    pub tokenizer: String,
    /// The tokenizer.json it was made from, recorded like [`ModelGolden::model_dir`].
    pub tokenizer_file: String,
    /// Tiny (committed) or real (cached).
    pub kind: Kind,
    /// Vocabulary size with added tokens.
    pub vocab_size: usize,
    /// `tokenizers` version.
    pub versions: BTreeMap<String, String>,
    /// sha256 of the generator.
    pub recipe_sha256: String,
    /// sha256 of the tokenizer.json.
    pub tokenizer_sha256: Option<String>,
    /// One case per text of `testdata/tokenizer_corpus.json`.
    pub cases: Vec<TokenizerCase>,
}

/// Encode and decode of one text.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizerCase {
    /// The input text.
    pub text: String,
    /// `encode(text, add_special_tokens=False).ids`.
    pub ids: Vec<u32>,
    /// `encode(text, add_special_tokens=False).tokens`.
    pub tokens: Vec<String>,
    /// `encode(text, add_special_tokens=True).ids`.
    pub ids_with_special: Vec<u32>,
    /// `decode(ids_with_special, skip_special_tokens=False)`.
    pub decoded: String,
    /// `decode(ids_with_special, skip_special_tokens=True)`.
    pub decoded_skip_special: String,
}

/// Either kind of golden file.
#[derive(Debug, Clone)]
pub enum Golden {
    /// `<model>.json`.
    Model(Box<ModelGolden>),
    /// `tokenizer-<name>.json`.
    Tokenizer(Box<TokenizerGolden>),
}

fn read_json(path: &Path) -> Result<(String, serde_json::Value), FixtureError> {
    let text = std::fs::read_to_string(path).map_err(|e| FixtureError::Io { path: path.to_path_buf(), source: e })?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| FixtureError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
    Ok((text, value))
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, FixtureError> {
    serde_json::from_str(text).map_err(|e| FixtureError::Parse { path: path.to_path_buf(), message: e.to_string() })
}

impl Golden {
    /// Reads a golden file of either kind, telling them apart by `format`.
    ///
    /// # Errors
    /// The file cannot be read, is not JSON, has an unknown `format`, or does not fit it.
    pub fn load(path: &Path) -> Result<Self, FixtureError> {
        let (text, value) = read_json(path)?;
        match value.get("format").and_then(|f| f.as_str()) {
            Some(MODEL_FORMAT) => Ok(Golden::Model(Box::new(parse::<ModelGolden>(path, &text)?.validated(path)?))),
            Some(TOKENIZER_FORMAT) => {
                Ok(Golden::Tokenizer(Box::new(parse::<TokenizerGolden>(path, &text)?.validated(path)?)))
            }
            other => Err(FixtureError::Parse {
                path: path.to_path_buf(),
                message: format!("unknown golden format {other:?} (expected {MODEL_FORMAT} or {TOKENIZER_FORMAT})"),
            }),
        }
    }
}

fn invalid(path: &Path, message: String) -> FixtureError {
    FixtureError::Parse { path: path.to_path_buf(), message }
}

impl ModelGolden {
    /// Reads a model golden.
    ///
    /// # Errors
    /// As [`Golden::load`], or the file is a tokenizer golden.
    pub fn load(path: &Path) -> Result<Self, FixtureError> {
        match Golden::load(path)? {
            Golden::Model(g) => Ok(*g),
            Golden::Tokenizer(_) => Err(invalid(path, "a tokenizer golden, not a model golden".into())),
        }
    }

    /// The type a backend must compute in to be compared with this golden: its
    /// [`compute_dtype`](Self::compute_dtype), else the checkpoint's [`dtype`](Self::dtype).
    pub fn run_dtype(&self) -> &str {
        self.compute_dtype.as_deref().unwrap_or(&self.dtype)
    }

    /// Checks the shapes that the comparisons rely on.
    fn validated(self, path: &Path) -> Result<Self, FixtureError> {
        for s in &self.sequences {
            let n = s.tokens.len();
            let what = |m: String| invalid(path, format!("sequence `{}`: {m}", s.name));
            match (&s.logits, &s.top_k, &s.checksums) {
                (Some(rows), _, _) => {
                    if rows.len() != n {
                        return Err(what(format!("{} logits rows for {n} tokens", rows.len())));
                    }
                    if let Some(r) = rows.iter().find(|r| r.len() != self.vocab_size) {
                        return Err(what(format!(
                            "a logits row of {} values, vocab_size is {}",
                            r.len(),
                            self.vocab_size
                        )));
                    }
                }
                (None, Some(t), Some(c)) => {
                    if t.ids.len() != n || t.values.len() != n || c.len() != n {
                        return Err(what(format!("top-k/checksums for {} positions, {n} tokens", t.ids.len())));
                    }
                    if t.ids.iter().any(|r| r.len() != t.k) || t.values.iter().any(|r| r.len() != t.k) {
                        return Err(what(format!("a top-k row without k = {} entries", t.k)));
                    }
                }
                _ => return Err(what("neither full logits nor top-k with checksums".into())),
            }
        }
        for g in &self.greedy {
            let n = g.tokens.len();
            if n != g.max_tokens || g.logprobs.len() != n || g.margins.len() != n {
                return Err(invalid(path, format!("greedy run `{}`: inconsistent lengths", g.name)));
            }
        }
        for r in &self.sampling {
            if r.tokens.len() != r.max_tokens || r.logprobs.len() != r.max_tokens {
                return Err(invalid(path, format!("sampling run `{}`: inconsistent lengths", r.name)));
            }
        }
        Ok(self)
    }
}

impl TokenizerGolden {
    /// Reads a tokenizer golden.
    ///
    /// # Errors
    /// As [`Golden::load`], or the file is a model golden.
    pub fn load(path: &Path) -> Result<Self, FixtureError> {
        match Golden::load(path)? {
            Golden::Tokenizer(g) => Ok(*g),
            Golden::Model(_) => Err(invalid(path, "a model golden, not a tokenizer golden".into())),
        }
    }

    fn validated(self, path: &Path) -> Result<Self, FixtureError> {
        if let Some(c) = self.cases.iter().find(|c| c.ids.len() != c.tokens.len()) {
            return Err(invalid(path, format!("case {:?}: {} ids but {} tokens", c.text, c.ids.len(), c.tokens.len())));
        }
        Ok(self)
    }
}
