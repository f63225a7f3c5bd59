// SPDX-License-Identifier: EUPL-1.2
//! Datasets in mlx-lm's JSON Lines formats, tokenised, and batched the way
//! mlx-lm's `iterate_batches` batches them.
//!
//! One record per line, in one of three formats, decided by the first record
//! (as mlx-lm decides it):
//! - `{"prompt": ..., "completion": ...}`: a user turn and an assistant turn,
//!   rendered with the model's chat template;
//! - `{"messages": [{"role": ..., "content": ...}, ...]}`: a chat, rendered
//!   with the chat template;
//! - `{"text": ...}`: plain text, encoded with the tokeniser's special tokens
//!   and ended with the EOS token.
//!
//! A record's `tools` are passed to the chat template, as mlx-lm passes them.
//! With `mask_prompt`, the loss leaves out everything before the last
//! assistant turn (the offset is the length of the rendered prompt with its
//! generation prompt). Every problem names the file and the 1-based line.

use std::path::{Path, PathBuf};

use inference_core::Message;
use mlx::{Array, ops};
use mlx_metal::chat::ChatTemplate;
use mlx_metal::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::error::{Error, TrainResult};

/// The record format of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `{"text": ...}`.
    Text,
    /// `{"prompt": ..., "completion": ...}`.
    Completions,
    /// `{"messages": [...]}`.
    Chat,
}

/// How records become token sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Leave the prompt out of the loss (not for `text` records).
    pub mask_prompt: bool,
    /// The longest sequence allowed, in tokens.
    pub max_seq_length: usize,
    /// Cut longer sequences to `max_seq_length` (as mlx-lm does, with a
    /// warning) instead of rejecting them.
    pub truncate: bool,
    /// The key of `text` records.
    pub text_feature: String,
    /// The keys of prompt/completion records.
    pub prompt_feature: String,
    /// See `prompt_feature`.
    pub completion_feature: String,
    /// The key of chat records.
    pub chat_feature: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            mask_prompt: false,
            max_seq_length: 2048,
            truncate: false,
            text_feature: "text".into(),
            prompt_feature: "prompt".into(),
            completion_feature: "completion".into(),
            chat_feature: "messages".into(),
        }
    }
}

/// One tokenised record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The tokens.
    pub tokens: Vec<u32>,
    /// Tokens before this index are left out of the loss.
    pub offset: usize,
    /// The record's line in its file (1-based).
    pub line: usize,
}

/// A tokenised data file.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// Its records, in file order.
    pub examples: Vec<Example>,
}

/// What a dataset needs from the model: its tokeniser and chat template.
pub struct Encoder<'a> {
    /// The tokeniser.
    pub tokenizer: &'a Tokenizer,
    /// The chat template.
    pub template: &'a ChatTemplate,
}

impl Encoder<'_> {
    fn eos(&self) -> Option<u32> {
        self.tokenizer
            .eos_token()
            .and_then(|t| self.tokenizer.token_to_id(t))
            .or_else(|| self.tokenizer.eos_ids().first().copied())
    }

    fn text(&self, text: &str) -> mlx_metal::Result<Vec<u32>> {
        let mut ids = self.tokenizer.encode(text, true)?;
        if let Some(eos) = self.eos()
            && ids.last() != Some(&eos)
        {
            ids.push(eos);
        }
        Ok(ids)
    }

    fn chat(
        &self,
        messages: &[Message],
        generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> mlx_metal::Result<Vec<u32>> {
        let mut extra = serde_json::Map::new();
        if let Some(t) = tools {
            extra.insert("tools".into(), t.clone());
        }
        let text = self.template.render_with(messages, generation_prompt, &extra)?;
        self.tokenizer.encode(&text, false)
    }
}

fn detect(first: &serde_json::Map<String, serde_json::Value>, cfg: &DataConfig) -> Option<Format> {
    if first.contains_key(&cfg.prompt_feature) && first.contains_key(&cfg.completion_feature) {
        Some(Format::Completions)
    } else if first.contains_key(&cfg.chat_feature) {
        Some(Format::Chat)
    } else if first.contains_key(&cfg.text_feature) {
        Some(Format::Text)
    } else {
        None
    }
}

fn string_field<'v>(
    obj: &'v serde_json::Map<String, serde_json::Value>,
    key: &str,
    bad: &dyn Fn(String) -> Error,
) -> TrainResult<&'v str> {
    match obj.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(bad(format!("{key:?} must be a string, found {}", kind(other)))),
        None => Err(bad(format!("missing key {key:?}"))),
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn messages(v: Option<&serde_json::Value>, key: &str, bad: &dyn Fn(String) -> Error) -> TrainResult<Vec<Message>> {
    let Some(v) = v else { return Err(bad(format!("missing key {key:?}"))) };
    let serde_json::Value::Array(items) = v else {
        return Err(bad(format!("{key:?} must be an array of messages, found {}", kind(v))));
    };
    if items.is_empty() {
        return Err(bad(format!("{key:?} is empty")));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let serde_json::Value::Object(o) = m else {
                return Err(bad(format!("{key}[{i}] must be an object with role and content, found {}", kind(m))));
            };
            let role = string_field(o, "role", &|msg| bad(format!("{key}[{i}]: {msg}")))?;
            let content = string_field(o, "content", &|msg| bad(format!("{key}[{i}]: {msg}")))?;
            Ok(Message::new(role.to_string(), content.to_string()))
        })
        .collect()
}

impl Dataset {
    /// Reads and tokenises a JSON Lines file. Blank lines are skipped.
    ///
    /// # Errors
    ///
    /// [`Error::Data`] naming the file (and the line) for a missing or empty
    /// file, bad JSON, a record that is not an object, missing or mistyped
    /// keys, an unknown format, `mask_prompt` with text records, or a sequence
    /// longer than `max_seq_length` (unless `truncate`).
    pub fn load(path: &Path, enc: &Encoder<'_>, cfg: &DataConfig) -> TrainResult<Dataset> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        Dataset::parse(path, &text, enc, cfg)
    }

    /// [`Dataset::load`] from text already read; `path` names it in errors.
    ///
    /// # Errors
    ///
    /// As [`Dataset::load`].
    pub fn parse(path: &Path, text: &str, enc: &Encoder<'_>, cfg: &DataConfig) -> TrainResult<Dataset> {
        if cfg.max_seq_length < 2 {
            return Err(Error::config("data.max_seq_length", format!("{} must be at least 2", cfg.max_seq_length)));
        }
        let mut format = None;
        let mut examples = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let bad = |msg: String| Error::data(path, Some(line), msg);
            let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| bad(format!("invalid JSON: {e}")))?;
            let serde_json::Value::Object(obj) = value else {
                return Err(bad(format!("a record must be a JSON object, found {}", kind(&value))));
            };
            let fmt = match format {
                Some(f) => f,
                None => {
                    let f = detect(&obj, cfg).ok_or_else(|| {
                        let keys: Vec<&String> = obj.keys().collect();
                        bad(format!(
                            "unknown record format with keys {keys:?}: expected {:?}, {:?} and {:?}, or {:?}",
                            cfg.text_feature, cfg.prompt_feature, cfg.completion_feature, cfg.chat_feature
                        ))
                    })?;
                    if f == Format::Text && cfg.mask_prompt {
                        return Err(bad("mask_prompt needs prompt/completion or chat records, not text".into()));
                    }
                    format = Some(f);
                    f
                }
            };
            let mlx = |e: mlx_metal::Error| bad(e.to_string());
            // mlx-lm passes a record's `tools` to the chat template.
            let tools = obj.get("tools").filter(|t| !t.is_null());
            let (tokens, offset) = match fmt {
                Format::Text => (enc.text(string_field(&obj, &cfg.text_feature, &bad)?).map_err(mlx)?, 0),
                Format::Completions => {
                    let prompt = string_field(&obj, &cfg.prompt_feature, &bad)?;
                    let completion = string_field(&obj, &cfg.completion_feature, &bad)?;
                    let msgs = [Message::new("user", prompt), Message::new("assistant", completion)];
                    let tokens = enc.chat(&msgs, false, tools).map_err(mlx)?;
                    let offset =
                        if cfg.mask_prompt { enc.chat(&msgs[..1], true, tools).map_err(mlx)?.len() } else { 0 };
                    (tokens, offset)
                }
                Format::Chat => {
                    let msgs = messages(obj.get(&cfg.chat_feature), &cfg.chat_feature, &bad)?;
                    let tokens = enc.chat(&msgs, false, tools).map_err(mlx)?;
                    let offset = if cfg.mask_prompt {
                        let last_is_assistant = msgs.last().is_some_and(|m| m.role.as_str() == "assistant");
                        enc.chat(&msgs[..msgs.len() - 1], last_is_assistant, tools).map_err(mlx)?.len()
                    } else {
                        0
                    };
                    (tokens, offset)
                }
            };
            if tokens.is_empty() {
                return Err(bad("the record encodes to no tokens".into()));
            }
            let mut tokens = tokens;
            if tokens.len() > cfg.max_seq_length {
                if !cfg.truncate {
                    return Err(bad(format!(
                        "the record has {} tokens, more than max_seq_length = {} (split it, raise max_seq_length, or \
                         set truncate)",
                        tokens.len(),
                        cfg.max_seq_length
                    )));
                }
                tokens.truncate(cfg.max_seq_length);
            }
            examples.push(Example { tokens, offset, line });
        }
        let format = format
            .ok_or_else(|| Error::data(path, None, "the file holds no records (expected one JSON object per line)"))?;
        Ok(Dataset { path: path.to_path_buf(), format, examples })
    }

    /// The number of records.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// mlx-lm's batches: record indices sorted by length (stable), cut into
    /// runs of `batch_size`; the last short run is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Data`] when there are fewer records than `batch_size`.
    pub fn batch_indices(&self, batch_size: usize) -> TrainResult<Vec<Vec<usize>>> {
        if batch_size == 0 {
            return Err(Error::config("batch_size", "must be at least 1"));
        }
        if self.len() < batch_size {
            return Err(Error::data(
                &self.path,
                None,
                format!("the dataset must have at least batch_size = {batch_size} records but has {}", self.len()),
            ));
        }
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.sort_by_key(|&i| self.examples[i].tokens.len());
        Ok(idx.chunks_exact(batch_size).map(<[usize]>::to_vec).collect())
    }

    /// The padded batch of records `indices` (see [`Batch`]).
    ///
    /// # Errors
    ///
    /// An index out of range, or an MLX failure.
    pub fn batch(&self, indices: &[usize], max_seq_length: usize) -> TrainResult<Batch> {
        let mut rows = Vec::with_capacity(indices.len());
        for &i in indices {
            let ex = self.examples.get(i).ok_or_else(|| {
                Error::data(&self.path, None, format!("record {i} is out of range ({} records)", self.len()))
            })?;
            rows.push(ex);
        }
        let longest = rows.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
        // One plus the next multiple of 32, as mlx-lm pads.
        let width = (1 + 32 * longest.div_ceil(32)).min(max_seq_length).max(2);
        let mut data = vec![0i32; rows.len() * width];
        let mut lengths = Vec::with_capacity(rows.len() * 2);
        let mut ntokens = 0;
        for (r, ex) in rows.iter().enumerate() {
            let n = ex.tokens.len().min(max_seq_length);
            for (c, &t) in ex.tokens[..n].iter().enumerate() {
                data[r * width + c] = i32::try_from(t).unwrap_or(i32::MAX);
            }
            lengths.push(i32::try_from(ex.offset).unwrap_or(i32::MAX));
            lengths.push(i32::try_from(n).unwrap_or(i32::MAX));
            ntokens += n;
        }
        let (b, w) = (i32::try_from(rows.len()).unwrap_or(i32::MAX), i32::try_from(width).unwrap_or(i32::MAX));
        Ok(Batch {
            tokens: Array::from_slice(&data, &[b, w])?,
            lengths: Array::from_slice(&lengths, &[b, 2])?,
            ntokens,
        })
    }
}

/// A padded batch, as mlx-lm's `iterate_batches` yields it.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, W]` int32 tokens, right-padded with 0 to one plus a multiple of
    /// 32 (at most `max_seq_length`).
    pub tokens: Array,
    /// `[B, 2]` int32 `(offset, length)` per row.
    pub lengths: Array,
    /// The number of real tokens in the batch.
    pub ntokens: usize,
}

impl Batch {
    /// The batch with its tokens as `[B, W]` int32 (for tests and checks).
    pub fn tokens_i32(&self) -> mlx_metal::Result<Vec<i32>> {
        ops::astype(&self.tokens, mlx::Dtype::Int32)?.to_vec::<i32>()
    }
}

/// A small deterministic generator (splitmix64) for shuffling batch order.
#[derive(Debug, Clone)]
pub struct Shuffle {
    state: u64,
}

impl Shuffle {
    /// Seeded.
    pub fn new(seed: u64) -> Shuffle {
        Shuffle { state: seed }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A random permutation of `0..n` (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            p.swap(i, j);
        }
        p
    }
}

/// The endless sequence of training batches: every epoch visits every batch
/// of [`Dataset::batch_indices`] once, in a shuffled order.
pub struct BatchStream<'d> {
    dataset: &'d Dataset,
    batches: Vec<Vec<usize>>,
    order: Vec<usize>,
    pos: usize,
    shuffle: Shuffle,
    max_seq_length: usize,
}

impl<'d> BatchStream<'d> {
    /// A stream over `dataset`, shuffled from `seed`.
    ///
    /// # Errors
    ///
    /// As [`Dataset::batch_indices`].
    pub fn new(dataset: &'d Dataset, batch_size: usize, max_seq_length: usize, seed: u64) -> TrainResult<Self> {
        let batches = dataset.batch_indices(batch_size)?;
        let mut shuffle = Shuffle::new(seed);
        let order = shuffle.permutation(batches.len());
        Ok(BatchStream { dataset, batches, order, pos: 0, shuffle, max_seq_length })
    }

    /// The record indices of the next batch, without building it.
    pub fn next_indices(&mut self) -> &[usize] {
        if self.pos == self.order.len() {
            self.order = self.shuffle.permutation(self.batches.len());
            self.pos = 0;
        }
        let b = self.order[self.pos];
        self.pos += 1;
        &self.batches[b]
    }

    /// The next batch.
    ///
    /// # Errors
    ///
    /// As [`Dataset::batch`].
    pub fn next_batch(&mut self) -> TrainResult<Batch> {
        let max = self.max_seq_length;
        let dataset = self.dataset;
        let idx = self.next_indices().to_vec();
        dataset.batch(&idx, max)
    }
}
