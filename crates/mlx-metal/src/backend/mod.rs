// SPDX-License-Identifier: EUPL-1.2
//! The `"metal"` backend of inference-core: models on their own engine
//! thread, reached through a `Send + Sync` handle.
//!
//! MLX arrays must be evaluated on the thread that made them, so each loaded
//! model lives on one engine thread (an actor) for its whole life. The public
//! [`MetalModel`] sends it jobs over a channel; token streams come back over
//! inference-core's [`TokenStream`](inference_core::TokenStream). Between
//! jobs the thread runs the [`scheduler`]: every generation (`generate`,
//! `chat`) is a row of one continuously batched decode, whoever called it and
//! from whatever thread. Dropping a stream, or cancelling its token, ends its
//! row before the next step (and before any job submitted after the cancel);
//! the engine never waits for a reader, so a stream nobody reads buffers up
//! to its `max_tokens`. Other calls (classification, batches, sessions,
//! attention inspection, adapter swaps) run between steps. Different models
//! run in parallel on their own threads.
//!
//! The module, by job:
//! - this file: registration ([`MetalBackend`], [`register`]) and the job
//!   channel to an engine thread;
//! - [`handle`]: [`MetalModel`], the handle, and its `TextModel` methods;
//! - `engine`: what the engine thread owns and runs (generation,
//!   classification, batches, attention inspection, adapter swaps);
//! - [`scheduler`]: continuous batching of every generation;
//! - `text`: tokens to text (EOS, stop strings, streaming detokenising,
//!   scores);
//! - `session`: [`MetalSession`], chat sessions whose caches live on the
//!   engine thread;
//! - `mirror`: tensor-parallel jobs mirrored from rank 0 to the other ranks
//!   (`follow`: the other ranks' loop);
//! - `adapters`: LoRA adapters served beside the model ([`MetalAdapter`]),
//!   each with its own batch over the model's shared weights;
//! - `supervise`: the engine thread's loop, each job and step under
//!   `catch_unwind`;
//! - `watchdog`: rank 0's deadline on each job and step of a tensor-parallel
//!   job.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use inference_core::{
    Backend, Error as CoreError, GenerateSettings, LoadSettings, PreparedPrompt, PromptInput, Result as CoreResult,
    TextModel,
};
use mlx::Error;

mod adapters;
mod engine;
mod follow;
pub mod handle;
mod mirror;
mod options;
pub mod scheduler;
mod session;
mod supervise;
mod text;
mod watchdog;

pub use self::adapters::MetalAdapter;
use self::engine::Engine;
pub use self::handle::MetalModel;
pub use self::session::MetalSession;

/// The backend's registered name.
pub const NAME: &str = "metal";

/// Most rows run together in one batch; longer batches run in groups of
/// prompts of similar length.
pub const MAX_BATCH: usize = 16;

/// The MLX backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct MetalBackend;

/// The backend as inference-core wants it.
pub fn backend() -> Arc<dyn Backend> {
    Arc::new(MetalBackend)
}

/// Registers `"metal"` in inference-core's process-wide registry (idempotent).
pub fn register() {
    inference_core::register(backend());
}

impl Backend for MetalBackend {
    fn name(&self) -> &str {
        NAME
    }

    /// MLX is linked in, so its CPU device is always there.
    fn available(&self) -> bool {
        true
    }

    fn load_model(&self, path: &Path, settings: &LoadSettings) -> CoreResult<Box<dyn TextModel>> {
        Ok(Box::new(MetalModel::load(path, settings)?))
    }
}

/// Turns a crate error into inference-core's. The message carries the whole
/// story (op, path, cause), so it is not chained again as a source.
pub(crate) fn core_err(e: Error) -> CoreError {
    CoreError::backend(NAME, e.to_string())
}

type Job = Box<dyn FnOnce(&mut Engine) + Send>;

/// The way to a model's engine thread, shared by the model and its sessions.
type Jobs = Arc<Mutex<Option<mpsc::Sender<Job>>>>;

/// Runs `job` on the engine thread, inside the caller's current `tracing`
/// span, so that an application's own span (a request, say) is the parent of
/// the engine's `job` span.
fn submit(jobs: &Jobs, job: Job) -> CoreResult<()> {
    let caller = tracing::Span::current();
    let job: Job = if caller.is_disabled() {
        job
    } else {
        Box::new(move |engine| {
            let _caller = caller.enter();
            job(engine)
        })
    };
    let guard = lock(jobs);
    let tx = guard.as_ref().ok_or(CoreError::Closed)?;
    tx.send(job).map_err(|_| CoreError::backend(NAME, "the engine thread has stopped"))
}

/// Runs `f` on the engine thread and waits for its answer.
fn call<T: Send + 'static>(
    jobs: &Jobs,
    f: impl FnOnce(&mut Engine) -> CoreResult<T> + Send + 'static,
) -> CoreResult<T> {
    let (tx, rx) = mpsc::sync_channel(1);
    submit(
        jobs,
        Box::new(move |e| {
            let _ = tx.send(f(e));
        }),
    )?;
    rx.recv().map_err(|_| CoreError::backend(NAME, "the engine failed during the call (its log says why)"))?
}

/// `TextModel`'s four prompt-taking methods for a handle with `prepare_now(PromptInput,
/// &GenerateSettings) -> CoreResult<PreparedPrompt>` and `stream(ids, &settings, cancel)`: a
/// prompt is prepared (tokenised, checked) and its ids streamed, whichever way it came.
macro_rules! prompt_methods {
    () => {
        fn generate(
            &self,
            prompt: &str,
            settings: &inference_core::GenerateSettings,
            cancel: inference_core::CancelToken,
        ) -> inference_core::Result<inference_core::TokenStream> {
            let prepared = self.prepare_now(inference_core::PromptInput::Text(prompt), settings)?;
            self.stream(prepared.ids, &prepared.settings, cancel)
        }

        fn chat(
            &self,
            messages: &[inference_core::Message],
            settings: &inference_core::GenerateSettings,
            cancel: inference_core::CancelToken,
        ) -> inference_core::Result<inference_core::TokenStream> {
            let prepared = self.prepare_now(inference_core::PromptInput::Chat(messages), settings)?;
            self.stream(prepared.ids, &prepared.settings, cancel)
        }

        fn prepare(
            &self,
            prompt: inference_core::PromptInput<'_>,
            settings: &inference_core::GenerateSettings,
        ) -> inference_core::Result<Option<inference_core::PreparedPrompt>> {
            self.prepare_now(prompt, settings).map(Some)
        }

        fn generate_prepared(
            &self,
            prompt: &inference_core::PreparedPrompt,
            cancel: inference_core::CancelToken,
        ) -> inference_core::Result<inference_core::TokenStream> {
            self.stream(prompt.ids.clone(), &prompt.settings, cancel)
        }
    };
}
use prompt_methods;

/// Tokenises a prompt (a conversation through `template`) and checks it against the settings
/// and the context `limit` (see [`TextModel::prepare`]).
fn prepare(
    tokenizer: &crate::tokenizer::Tokenizer,
    template: &crate::chat::ChatTemplate,
    prompt: PromptInput<'_>,
    settings: &GenerateSettings,
    limit: Option<usize>,
) -> CoreResult<PreparedPrompt> {
    settings.validate()?;
    let (ids, settings) = match prompt {
        PromptInput::Text("") | PromptInput::Chat([]) => return Err(CoreError::EmptyPrompt),
        PromptInput::Text(text) => (tokenizer.encode_prompt(text).map_err(core_err)?, settings.clone()),
        PromptInput::Chat(messages) => template.render_chat(tokenizer, messages, settings).map_err(core_err)?,
    };
    check_prompt(&ids, limit)?;
    Ok(PreparedPrompt { ids, settings })
}

/// Rejects an empty prompt or one longer than the context.
fn check_prompt(ids: &[u32], limit: Option<usize>) -> CoreResult<()> {
    if ids.is_empty() {
        return Err(CoreError::EmptyPrompt);
    }
    if let Some(limit) = limit
        && ids.len() > limit
    {
        return Err(CoreError::invalid_setting(
            "prompt",
            format!("{} tokens", ids.len()),
            format!("longer than the context length of {limit} tokens"),
        ));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
