// SPDX-License-Identifier: EUPL-1.2
//! Text in and out: a Hugging Face tokeniser with the model's special tokens.
//!
//! [`Tokenizer`] wraps the `tokenizers` crate, so tokenisation is the same as Hugging Face
//! `tokenizers` (Python) for the same `tokenizer.json`. Around it sit the facts that live in the
//! other files of a model directory: the BOS and EOS tokens, every EOS id (the union of
//! `tokenizer_config.json`, `generation_config.json` and `config.json`) and the chat template.
//!
//! [`StreamDecoder`] turns a stream of ids into text without splitting a UTF-8 character or
//! losing a SentencePiece space, and [`StopMatcher`] holds back text that could be the start of a
//! stop string.
//!
//! ```no_run
//! use mlx_metal::tokenizer::Tokenizer;
//! let tok = Tokenizer::from_dir("models/gemma-3-1b-it")?;
//! let ids = tok.encode_prompt("<bos>Hello")?; // one BOS, not two
//! let mut stream = tok.stream_decoder(true);
//! let mut text = String::new();
//! for &id in &ids {
//!     text.push_str(&stream.push(id)?);
//! }
//! text.push_str(&stream.finish()?);
//! # Ok::<(), mlx_metal::Error>(())
//! ```

mod config;
mod stop;
mod stream;

use std::collections::HashSet;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use stop::{StopChunk, StopMatcher};
pub use stream::StreamDecoder;

use config::ModelFiles;
use mlx::{Error, Result};

/// The file every model directory must hold.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A Hugging Face tokeniser plus the special tokens and chat template of its model.
///
/// Cloning is cheap (the tables are shared), and a `Tokenizer` may be sent to and shared
/// between threads.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    hf: tokenizers::Tokenizer,
    path: PathBuf,
    special_ids: HashSet<u32>,
    bos_id: Option<u32>,
    bos_token: Option<String>,
    eos_ids: Vec<u32>,
    eos_token: Option<String>,
    unk_token: Option<String>,
    pad_token: Option<String>,
    add_bos_token: Option<bool>,
    chat_template: Option<String>,
    named_chat_templates: Vec<(String, String)>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.inner.path)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.inner.bos_id)
            .field("eos_ids", &self.inner.eos_ids)
            .field("has_chat_template", &self.inner.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads the tokeniser of the model directory `dir`.
    ///
    /// Reads `tokenizer.json` (required) and, where present, `tokenizer_config.json` (BOS/EOS
    /// strings, `add_bos_token`, `chat_template`), `chat_template.jinja` or `chat_template.json`
    /// (a chat template that takes precedence over the one in `tokenizer_config.json`, as in
    /// `transformers`), `generation_config.json` and `config.json` (`bos_token_id`,
    /// `eos_token_id`, also under `text_config`).
    ///
    /// # Errors
    /// [`Error::Io`] naming `tokenizer.json` when it cannot be read, and [`Error::Format`] naming
    /// the file when any of these files is not valid JSON or holds a field of the wrong type.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        const OP: &str = "Tokenizer::from_dir";
        let dir = dir.as_ref();
        let path = dir.join(TOKENIZER_FILE);
        let hf = load_hf(OP, &path)?;
        let files = ModelFiles::read(OP, dir)?;
        Ok(Self::assemble(hf, path, files))
    }

    /// Loads a bare `tokenizer.json`, with no BOS, EOS or chat template (those live in the other
    /// files of a model directory: use [`Tokenizer::from_dir`] for a model).
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read, [`Error::Format`] when it is not a valid
    /// `tokenizer.json`; both name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let hf = load_hf("Tokenizer::from_file", path)?;
        Ok(Self::assemble(hf, path.to_path_buf(), ModelFiles::default()))
    }

    fn assemble(hf: tokenizers::Tokenizer, path: PathBuf, files: ModelFiles) -> Self {
        let special_ids: HashSet<u32> =
            hf.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
        let lookup = |token: &Option<String>| token.as_deref().and_then(|t| hf.token_to_id(t));

        let bos_id = lookup(&files.bos_token).or(files.bos_ids.first().copied());
        let bos_token = files.bos_token.clone().or_else(|| bos_id.and_then(|id| hf.id_to_token(id)));

        let mut eos_ids = Vec::new();
        for id in lookup(&files.eos_token).into_iter().chain(files.eos_ids.iter().copied()) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let eos_token = files.eos_token.clone().or_else(|| eos_ids.first().and_then(|&id| hf.id_to_token(id)));

        Self {
            inner: Arc::new(Inner {
                hf,
                path,
                special_ids,
                bos_id,
                bos_token,
                eos_ids,
                eos_token,
                unk_token: files.unk_token,
                pad_token: files.pad_token,
                add_bos_token: files.add_bos_token,
                chat_template: files.chat_template,
                named_chat_templates: files.named_chat_templates,
            }),
        }
    }

    /// The `tokenizer.json` this tokeniser was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The underlying `tokenizers` tokeniser, for anything this wrapper does not cover.
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner.hf
    }

    /// Encodes `text` exactly as Hugging Face `tokenizers` does: with `add_special_tokens` the
    /// post-processor's tokens (such as a BOS) are added.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the tokeniser fails (for example its pre-tokeniser's
    /// regular expression gives up).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        guarded("Tokenizer::encode", || {
            self.inner.hf.encode_char_offsets(text, add_special_tokens).map(|e| e.get_ids().to_vec())
        })
    }

    /// Encodes a prompt with exactly one BOS, as mlx-lm does.
    ///
    /// When `text` already starts with the BOS token's text (a chat template that writes
    /// `<bos>` or `<|begin_of_text|>`), it is encoded without special tokens; otherwise with
    /// them. `tokenizer_config.json`'s `add_bos_token` is followed as `transformers` follows it
    /// for Llama-style tokenisers: `true` prepends the BOS when the post-processor did not add
    /// it, `false` removes the one the post-processor added. A BOS that the post-processor added
    /// in front of one already there is dropped.
    ///
    /// # Errors
    /// As [`Tokenizer::encode`].
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let starts_with_bos = self.bos_token().is_some_and(|bos| !bos.is_empty() && text.starts_with(bos));
        if starts_with_bos {
            return self.encode(text, false);
        }
        let mut ids = self.encode(text, true)?;
        let Some(bos) = self.inner.bos_id else { return Ok(ids) };
        if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
            ids.remove(0);
        } else if self.inner.add_bos_token == Some(true) && ids.first() != Some(&bos) {
            ids.insert(0, bos);
        } else if self.inner.add_bos_token == Some(false) && ids.first() == Some(&bos) {
            let plain = self.encode(text, false)?;
            if ids[1..] == plain[..] {
                return Ok(plain);
            }
        }
        Ok(ids)
    }

    /// Decodes `ids` exactly as Hugging Face `tokenizers` does. Ids outside the vocabulary are
    /// skipped.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the tokeniser's decoder fails.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        guarded("Tokenizer::decode", || self.inner.hf.decode(ids, skip_special_tokens))
    }

    /// A streaming decoder over this tokeniser; see [`StreamDecoder`].
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder {
        StreamDecoder::new(self, skip_special_tokens)
    }

    /// The BOS id: from `tokenizer_config.json`'s `bos_token`, else `bos_token_id` of
    /// `generation_config.json`, else of `config.json`.
    pub fn bos_id(&self) -> Option<u32> {
        self.inner.bos_id
    }

    /// Every EOS id, deduplicated, in this order: `tokenizer_config.json`'s `eos_token`, then
    /// `eos_token_id` of `generation_config.json`, of `config.json` and of its `text_config`.
    pub fn eos_ids(&self) -> &[u32] {
        &self.inner.eos_ids
    }

    /// Whether `id` is one of [`Tokenizer::eos_ids`].
    pub fn is_eos(&self, id: u32) -> bool {
        self.inner.eos_ids.contains(&id)
    }

    /// The BOS token's text (for templates and [`Tokenizer::encode_prompt`]).
    pub fn bos_token(&self) -> Option<&str> {
        self.inner.bos_token.as_deref()
    }

    /// The EOS token's text (for templates): `tokenizer_config.json`'s `eos_token`, else the
    /// token of the first EOS id.
    pub fn eos_token(&self) -> Option<&str> {
        self.inner.eos_token.as_deref()
    }

    /// `tokenizer_config.json`'s `unk_token`, if any.
    pub fn unk_token(&self) -> Option<&str> {
        self.inner.unk_token.as_deref()
    }

    /// `tokenizer_config.json`'s `pad_token`, if any.
    pub fn pad_token(&self) -> Option<&str> {
        self.inner.pad_token.as_deref()
    }

    /// `tokenizer_config.json`'s `add_bos_token`, if set.
    pub fn add_bos_token(&self) -> Option<bool> {
        self.inner.add_bos_token
    }

    /// The model's chat template (the `default` one when the model names several).
    pub fn chat_template(&self) -> Option<&str> {
        self.inner.chat_template.as_deref()
    }

    /// A chat template by name, when `tokenizer_config.json` holds a list of named templates
    /// (such as `tool_use`).
    pub fn named_chat_template(&self, name: &str) -> Option<&str> {
        self.inner.named_chat_templates.iter().find(|(n, _)| n == name).map(|(_, t)| t.as_str())
    }

    /// The id of a token's text (added tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.hf.token_to_id(token)
    }

    /// The text of a token as the vocabulary spells it (`Ġthe`, `▁the`, `<0x0A>`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.hf.id_to_token(id)
    }

    /// The number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.hf.get_vocab_size(true)
    }

    /// Whether `id` is an added token marked special (`<bos>`, `<|im_end|>`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.special_ids.contains(&id)
    }

    /// Whether `id` is a SentencePiece byte-fallback token (`<0x0A>`).
    pub(crate) fn is_byte_token(&self, id: u32) -> bool {
        self.inner.hf.id_to_token(id).is_some_and(|t| {
            let b = t.as_bytes();
            b.len() == 6 && b.starts_with(b"<0x") && b[5] == b'>' && b[3..5].iter().all(u8::is_ascii_hexdigit)
        })
    }
}

/// Reads and parses a `tokenizer.json`.
fn load_hf(op: &'static str, path: &Path) -> Result<tokenizers::Tokenizer> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { op, path: path.to_path_buf(), source })?;
    let format = |message: String| Error::Format { op, path: path.to_path_buf(), message };
    match catch_unwind(AssertUnwindSafe(|| tokenizers::Tokenizer::from_bytes(&bytes))) {
        Ok(Ok(hf)) => Ok(hf),
        Ok(Err(e)) => Err(format(format!("not a valid tokenizer.json: {e}"))),
        Err(panic) => {
            Err(format(format!("not a valid tokenizer.json: the tokeniser panicked: {}", panic_text(&panic))))
        }
    }
}

/// Runs a `tokenizers` call, turning its errors and panics into [`Error::InvalidArgument`].
fn guarded<T>(op: &'static str, f: impl FnOnce() -> tokenizers::Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::InvalidArgument { op, message: e.to_string() }),
        Err(panic) => {
            Err(Error::InvalidArgument { op, message: format!("the tokeniser panicked: {}", panic_text(&panic)) })
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn tokenizer_and_decoders_are_send_and_sync() {
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<StreamDecoder>();
        assert_send_sync::<StopMatcher>();
    }

    #[test]
    fn panic_text_reads_both_payload_kinds() {
        let a: Box<dyn std::any::Any + Send> = Box::new("static");
        let b: Box<dyn std::any::Any + Send> = Box::new(String::from("owned"));
        let c: Box<dyn std::any::Any + Send> = Box::new(7_u8);
        assert_eq!(panic_text(&a), "static");
        assert_eq!(panic_text(&b), "owned");
        assert_eq!(panic_text(&c), "unknown panic");
    }

    #[test]
    fn guarded_turns_a_panic_into_an_error() {
        let err = guarded::<()>("op", || panic!("boom")).unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
    }
}
