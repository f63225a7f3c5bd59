// SPDX-License-Identifier: EUPL-1.2
//! Backend-neutral inference API: the traits, types, settings, registry and model discovery that
//! applications depend on, whichever backend runs the model.
//!
//! This crate knows nothing of MLX, FFI or Python. Backend crates (`mlx-metal` registers
//! `"metal"`, `mlxlm-bridge` registers `"mlx_lm"`) implement its traits; applications use only
//! this crate's API and pick a backend by name at run time.
//!
//! # The model
//!
//! * A [`Backend`] has a [`name`](Backend::name), says whether it is
//!   [`available`](Backend::available) on this machine, and [loads](Backend::load_model) models.
//! * A loaded model is a [`TextModel`]: a `Send + Sync` handle, shared as `Arc<dyn TextModel>`.
//!   It [generates](TextModel::generate), [chats](TextModel::chat) with the model's own template,
//!   [classifies](TextModel::classify), [batch-generates](TextModel::batch_generate), reports its
//!   [`info`](TextModel::info) and the [`metrics`](TextModel::metrics) of its last call, and
//!   [closes](TextModel::close) idempotently.
//! * Optional capabilities are discovered without downcasting:
//!   [`attention_inspector`](TextModel::attention_inspector) and
//!   [`trainer`](TextModel::trainer) return `Some` when the model has them.
//! * Settings are plain structs with defaults and chainable setters: [`GenerateSettings`]
//!   (256 tokens, greedy) and [`LoadSettings`]. Out-of-range values are rejected by `validate()`
//!   with an error naming the field, the value and the allowed range.
//!
//! # Streams and cancellation
//!
//! Generation returns a [`TokenStream`], an `Iterator<Item = Result<Token>>`. A backend produces
//! it with [`TokenStream::channel`] and feeds the [`TokenSink`] from its own thread. An error is
//! always the stream's last item, so a failure after some tokens is never mistaken for a normal
//! end, and a backend that vanishes without finishing yields [`Error::StreamAborted`]. After a
//! normal end, [`TokenStream::metrics`] holds the call's [`GenerateMetrics`].
//!
//! Every call takes a [`CancelToken`]: cancel it from any thread, or give it a deadline, and the
//! backend stops at its next token. Dropping a stream stops generation the same way, without
//! touching the caller's token (the stream cancels only its own child token).
//!
//! # Registering backends
//!
//! Registration is **explicit**. Each backend crate exposes `pub fn register()`, which adds its
//! backend to the process-wide registry; the application calls it once at start-up, usually
//! behind the cargo feature that pulls the crate in:
//!
//! ```ignore
//! #[cfg(feature = "metal")]
//! mlx_metal::register();
//! #[cfg(feature = "mlx_lm")]
//! mlxlm_bridge::register();
//! let model = inference_core::load_model("/models/gemma-3-1b-it", &LoadSettings::new())?;
//! ```
//!
//! Registration by side effect (Go's `init()`, or Rust's life-before-`main` crates) is not used
//! because it can fail silently: the linker keeps an rlib's code only when something refers to
//! it, so a backend crate that is a dependency but never named in the application's code
//! contributes nothing, and its self-registration disappears with it; the first symptom would be
//! "backend not registered" at run time, far from the cause. Such mechanisms also depend on
//! platform linker sections or `unsafe` start-up code. An explicit call is a real reference:
//! when the feature is on, the backend is there; when the crate is missing, the build fails. A
//! request for a name nobody registered returns [`Error::BackendNotRegistered`], whose message
//! lists what is registered and says to enable the crate's feature and call its `register()`.
//!
//! A backend crate's side is one function:
//!
//! ```
//! # use std::path::Path;
//! # use inference_core::{Backend, LoadSettings, Result, TextModel};
//! # struct MetalBackend;
//! # impl MetalBackend { fn new() -> Self { MetalBackend } }
//! # impl Backend for MetalBackend {
//! #     fn name(&self) -> &str { "metal" }
//! #     fn available(&self) -> bool { false }
//! #     fn unavailable_reason(&self) -> Option<String> {
//! #         Some("built without the metal feature".into())
//! #     }
//! #     fn load_model(&self, _: &Path, _: &LoadSettings) -> Result<Box<dyn TextModel>> {
//! #         unreachable!("never available")
//! #     }
//! # }
//! /// Registers the `"metal"` backend in the process-wide registry. Idempotent.
//! pub fn register() {
//!     inference_core::register(std::sync::Arc::new(MetalBackend::new()));
//! }
//! # register();
//! # let err = inference_core::load_model("/m", &LoadSettings::new().backend("metal")).err();
//! # assert_eq!(
//! #     err.map(|e| e.to_string()).as_deref(),
//! #     Some("backend \"metal\" is not available on this machine: built without the metal feature")
//! # );
//! ```
//!
//! A backend crate built without its native support (wrong platform, feature off) should still
//! export `register()` and register a backend whose [`available`](Backend::available) is false
//! with a [reason](Backend::unavailable_reason) such as "built without the metal feature", so
//! that applications call it unconditionally and users get [`Error::BackendUnavailable`] with
//! that reason rather than a missing name.
//!
//! The process-wide registry sits behind the free functions [`register`], [`get`], [`list`],
//! [`default_backend`] and [`load_model`]. [`Registry`] instances (built with
//! [`Registry::with`]) serve tests and programs that want their own routing. The default backend
//! is the first *available* of [`PREFERRED_BACKENDS`] (`"metal"`), then the rest by name; the
//! errors for a backend that is not registered, not available here, or failed to load are
//! distinct variants of the one [`Error`] enum.
//!
//! # Discovery
//!
//! [`discover()`] walks a directory tree for model directories (a `config.json` and at least one
//! `*.safetensors`), in a deterministic order, surviving link loops and unreadable directories.
//!
//! # Example
//!
//! A toy backend that echoes the prompt word by word, registered, loaded by name and streamed:
//!
//! ```
//! use std::{path::Path, sync::Arc, thread};
//! use inference_core::*;
//!
//! struct Echo;
//!
//! impl Backend for Echo {
//!     fn name(&self) -> &str { "echo" }
//!     fn available(&self) -> bool { true }
//!     fn load_model(&self, _path: &Path, _settings: &LoadSettings) -> Result<Box<dyn TextModel>> {
//!         Ok(Box::new(EchoModel))
//!     }
//! }
//!
//! struct EchoModel;
//!
//! impl TextModel for EchoModel {
//!     fn generate(&self, prompt: &str, settings: &GenerateSettings, cancel: CancelToken)
//!         -> Result<TokenStream>
//!     {
//!         settings.validate()?;
//!         if prompt.is_empty() {
//!             return Err(Error::EmptyPrompt);
//!         }
//!         let words: Vec<String> = prompt
//!             .split_inclusive(' ')
//!             .take(settings.max_tokens)
//!             .map(str::to_owned)
//!             .collect();
//!         let (sink, stream) = TokenStream::channel(cancel);
//!         thread::spawn(move || sink.run(|sink| {
//!             for (id, word) in words.into_iter().enumerate() {
//!                 sink.send(Token::new(id as u32, word))?; // stops if the caller has gone
//!             }
//!             Ok(GenerateMetrics::default())
//!         }));
//!         Ok(stream)
//!     }
//!     fn chat(&self, messages: &[Message], settings: &GenerateSettings, cancel: CancelToken)
//!         -> Result<TokenStream>
//!     {
//!         let last = messages.last().ok_or(Error::EmptyPrompt)?;
//!         self.generate(&last.content, settings, cancel)
//!     }
//!     fn classify(&self, _: &[&str], _: &GenerateSettings, _: CancelToken)
//!         -> Result<Vec<ClassifyResult>>
//!     {
//!         Err(Error::unsupported("echo", "classification"))
//!     }
//!     fn batch_generate(&self, prompts: &[&str], settings: &GenerateSettings, cancel: CancelToken)
//!         -> Result<Vec<BatchResult>>
//!     {
//!         prompts.iter()
//!             .map(|p| Ok(self.generate(p, settings, cancel.clone())?.into_batch_result()))
//!             .collect()
//!     }
//!     fn info(&self) -> ModelInfo { ModelInfo { architecture: "echo".into(), ..Default::default() } }
//!     fn metrics(&self) -> GenerateMetrics { GenerateMetrics::default() }
//!     fn model_type(&self) -> &str { "echo" }
//!     fn close(&self) -> Result<()> { Ok(()) }
//! }
//!
//! // At start-up: an explicit registration (a backend crate's register() does this).
//! inference_core::register(Arc::new(Echo));
//!
//! // Anywhere later: select by name, stream, cancel.
//! let model = inference_core::load_model("/models/echo", &LoadSettings::new().backend("echo"))?;
//! let settings = GenerateSettings::new().max_tokens(3);
//! let text = model.generate("the quick brown fox", &settings, CancelToken::new())?.collect_text()?;
//! assert_eq!(text, "the quick brown ");
//!
//! let cancel = CancelToken::new();
//! let mut stream = model.generate("one two three", &GenerateSettings::new(), cancel.clone())?;
//! assert_eq!(stream.next().transpose()?.map(|t| t.text), Some("one ".to_owned()));
//! cancel.cancel();
//! assert!(matches!(stream.next(), Some(Err(Error::Cancelled))));
//!
//! let err = inference_core::load_model("/models/x", &LoadSettings::new().backend("metal"))
//!     .err()
//!     .unwrap();
//! assert_eq!(
//!     err.to_string(),
//!     "backend \"metal\" is not registered (registered: echo); enable the cargo feature of \
//!      the crate that provides it and call that crate's register() at start-up"
//! );
//! # Ok::<(), Error>(())
//! ```

#![deny(missing_docs)]
#![forbid(unsafe_code)]

#[macro_use]
mod macros;

mod cancel;
mod constraint;
mod discover;
mod error;
mod model;
mod registry;
mod settings;
mod stream;
pub mod tools;
mod types;

pub use cancel::CancelToken;
pub use constraint::Constraint;
pub use discover::{Discover, SkippedPath, discover};
pub use error::{BoxError, Error, Result, UnavailableBackend};
pub use model::{
    Adapter, AdapterHost, AttentionInspector, ChatSession, LoraConfig, LoraDType, PreparedPrompt, PromptInput,
    TextModel, TrainableModel,
};
pub use registry::{Backend, PREFERRED_BACKENDS, Registry, default_backend, get, global, list, load_model, register};
pub use settings::{
    ComputeDtype, Device, GenerateSettings, LoadSettings, LogitsMode, MAX_STOP_STRING_BYTES, MAX_STOP_STRINGS,
    MAX_TEMPERATURE, MAX_TOP_LOGPROBS,
};
pub use stream::{Completion, Stopped, TokenSink, TokenStream};
pub use tools::{ToolCall, ToolCallFormat, ToolChoice};
pub use types::{
    AttentionSnapshot, BatchResult, ClassifyResult, DiscoveredModel, EngineLoad, FinishReason, GenerateMetrics,
    Message, ModelInfo, Role, Token, TopLogprob, TopLogprobs,
};
