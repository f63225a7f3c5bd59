// SPDX-License-Identifier: EUPL-1.2
//! [`MetalSession`]: a chat session whose KV caches live in the engine
//! thread's session table (keyed by id) and are dropped with the session;
//! each turn reuses the longest common prefix of what the caches hold.

use std::path::{Path, PathBuf};

use inference_core::{
    CancelToken, ChatSession, Error as CoreError, GenerateMetrics, GenerateSettings, Message, Result as CoreResult,
    TokenSink, TokenStream,
};
use mlx::Error;

use super::engine::{Engine, metrics_from};
use super::mirror::Request;
use super::{Jobs, STREAM_BUFFER, call, check_prompt, core_err, lock, submit};
use crate::chat::ChatTemplate;
use crate::session::SessionCache;
use crate::tokenizer::Tokenizer;

/// A chat session on a [`MetalModel`](super::MetalModel): its KV cache lives on the model's
/// engine thread and is dropped with the session.
pub struct MetalSession {
    pub(super) id: u64,
    pub(super) jobs: Jobs,
    pub(super) tokenizer: Tokenizer,
    pub(super) template: ChatTemplate,
    pub(super) limit: Option<usize>,
}

impl MetalSession {
    fn turn(&mut self, ids: Vec<u32>, settings: &GenerateSettings, cancel: CancelToken) -> CoreResult<TokenStream> {
        settings.validate()?;
        check_prompt(&ids, self.limit)?;
        let (sink, stream) = TokenStream::channel_with_capacity(cancel, STREAM_BUFFER);
        let settings = settings.clone();
        let id = self.id;
        submit(
            &self.jobs,
            Box::new(move |e: &mut Engine| {
                let settings = e.seeded(settings);
                if let Err(err) =
                    e.announce(|| Request::SessionTurn { session: id, ids: ids.clone(), settings: settings.clone() })
                {
                    return sink.fail(err);
                }
                e.session_turn(id, &ids, &settings, sink)
            }),
        )?;
        Ok(stream)
    }
}

fn session_file_err(path: &Path, e: Error) -> CoreError {
    match e {
        Error::Io { source, .. } => CoreError::Io { path: path.to_path_buf(), source },
        Error::Model { message, .. } | Error::Format { message, .. } => CoreError::invalid_model(path, message),
        other => core_err(other),
    }
}

impl ChatSession for MetalSession {
    fn chat(
        &mut self,
        messages: &[Message],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> CoreResult<TokenStream> {
        if messages.is_empty() {
            return Err(CoreError::EmptyPrompt);
        }
        let ids = self.template.render_and_encode(&self.tokenizer, messages).map_err(core_err)?;
        self.turn(ids, settings, cancel)
    }

    fn generate(&mut self, prompt: &str, settings: &GenerateSettings, cancel: CancelToken) -> CoreResult<TokenStream> {
        if prompt.is_empty() {
            return Err(CoreError::EmptyPrompt);
        }
        let ids = self.tokenizer.encode_prompt(prompt).map_err(core_err)?;
        self.turn(ids, settings, cancel)
    }

    fn cached_tokens(&self) -> CoreResult<usize> {
        let id = self.id;
        call(&self.jobs, move |e| Ok(e.sessions.get(&id).map_or(0, |s| s.tokens().len())))
    }

    fn reset(&mut self) -> CoreResult<()> {
        let id = self.id;
        call(&self.jobs, move |e| {
            e.announce(|| Request::EndSession { session: id })?;
            e.sessions.remove(&id);
            Ok(())
        })
    }

    fn save(&self, path: &Path) -> CoreResult<()> {
        let id = self.id;
        let path: PathBuf = path.to_path_buf();
        call(&self.jobs, move |e| {
            e.refuse_session_files()?;
            let fingerprint = e.fingerprint.clone();
            let state = e.session_cache(id).map_err(core_err)?;
            state.save(&path, &fingerprint).map_err(|err| session_file_err(&path, err))
        })
    }

    fn load(&mut self, path: &Path) -> CoreResult<()> {
        let id = self.id;
        let path: PathBuf = path.to_path_buf();
        call(&self.jobs, move |e| {
            e.refuse_session_files()?;
            let state = SessionCache::load(&path, e.loaded.model.as_ref(), &e.fingerprint)
                .map_err(|err| session_file_err(&path, err))?;
            e.sessions.insert(id, state);
            Ok(())
        })
    }
}

impl Drop for MetalSession {
    fn drop(&mut self) {
        let id = self.id;
        let _ = submit(
            &self.jobs,
            Box::new(move |e: &mut Engine| {
                // Only a session that ran holds caches on the other ranks.
                if e.sessions.remove(&id).is_some() {
                    let _ = e.announce(|| Request::EndSession { session: id });
                }
            }),
        );
    }
}

impl Engine {
    /// One turn of session `id` over the whole token sequence `ids`.
    pub(super) fn session_turn(&mut self, id: u64, ids: &[u32], settings: &GenerateSettings, sink: TokenSink) {
        match self.session_turn_once(id, ids, settings, &sink) {
            Ok(m) => sink.finish(m),
            Err(e) => sink.fail(e),
        }
    }

    pub(super) fn session_turn_once(
        &mut self,
        id: u64,
        ids: &[u32],
        settings: &GenerateSettings,
        sink: &TokenSink,
    ) -> CoreResult<GenerateMetrics> {
        let span = tracing::info_span!(
            "job",
            kind = "session_turn",
            session = id,
            prompt_tokens = ids.len(),
            max_tokens = settings.max_tokens,
            cached_tokens = tracing::field::Empty,
            generated_tokens = tracing::field::Empty,
        );
        let _job = span.enter();
        let mut state = match self.sessions.remove(&id) {
            Some(s) => s,
            None => SessionCache::new(self.loaded.model.as_ref()).map_err(core_err)?,
        };
        let result = (|| {
            let cached = state.prepare(self.loaded.model.as_ref(), ids)?;
            let stats = self.run_generation(&ids[cached..], cached, settings, sink, Some(state.caches_mut()))?;
            state.record(self.loaded.model.as_ref(), ids, &stats.fed)?;
            Ok::<_, Error>((cached, stats))
        })();
        match result {
            Ok((cached, stats)) => {
                span.record("cached_tokens", cached);
                span.record("generated_tokens", stats.generated_tokens);
                self.sessions.insert(id, state);
                let mut m = metrics_from(&stats);
                m.prompt_tokens = ids.len();
                m.cached_prompt_tokens = cached;
                m.compute_rates();
                *lock(&self.metrics) = m;
                Ok(m)
            }
            Err(e) => {
                // The caches may be half-updated: the session starts again.
                if state.reset(self.loaded.model.as_ref()).is_ok() {
                    self.sessions.insert(id, state);
                }
                Err(core_err(e))
            }
        }
    }

    pub(super) fn session_cache(&mut self, id: u64) -> Result<&mut SessionCache, Error> {
        if !self.sessions.contains_key(&id) {
            let fresh = SessionCache::new(self.loaded.model.as_ref())?;
            self.sessions.insert(id, fresh);
        }
        self.sessions.get_mut(&id).ok_or_else(|| Error::invalid("session", "the session vanished"))
    }
}
