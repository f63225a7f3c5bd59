// SPDX-License-Identifier: EUPL-1.2
//! [`MetalSession`]: a chat session whose KV caches live in the engine
//! thread's session table (keyed by id) and are dropped with the session;
//! each turn reuses the longest common prefix of what the caches hold.

use std::path::{Path, PathBuf};

use inference_core::{
    CancelToken, ChatSession, Error as CoreError, GenerateSettings, Message, Result as CoreResult, TokenSink,
    TokenStream,
};
use mlx::Error;

use super::engine::Engine;
use super::mirror::Request;
use super::scheduler::{Request as ScheduledRequest, SessionTurn};
use super::{Job, Jobs, call, check_prompt, core_err, submit};
use crate::cache::{BatchKvCache, KvArray, KvCache, KvQuant, LayerCache, RotatingKvCache};
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
        let (sink, stream) = TokenStream::unbounded_channel(cancel);
        let settings = settings.clone();
        let id = self.id;
        submit(
            &self.jobs,
            Box::new(move |e: &mut Engine| {
                e.when_session_free(
                    id,
                    Box::new(move |e: &mut Engine| {
                        let settings = e.seeded(settings);
                        e.start_session_turn(id, ids, settings, sink)
                    }),
                )
            }),
        )?;
        Ok(stream)
    }
}

/// Runs `f` on the engine thread once session `id` has no turn running
/// (jobs on a session run in the order they were made), and waits for its answer.
fn session_call<T: Send + 'static>(
    jobs: &Jobs,
    id: u64,
    f: impl FnOnce(&mut Engine) -> CoreResult<T> + Send + 'static,
) -> CoreResult<T> {
    call(jobs, move |e| {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        e.when_session_free(
            id,
            Box::new(move |e: &mut Engine| {
                let _ = tx.send(f(e));
            }),
        );
        Ok(rx)
    })?
    .recv()
    .map_err(|_| CoreError::backend(super::NAME, "the engine failed during the call (its log says why)"))?
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
        settings.validate()?;
        let (ids, settings) = self.template.render_chat(&self.tokenizer, messages, settings).map_err(core_err)?;
        self.turn(ids, &settings, cancel)
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
        session_call(&self.jobs, id, move |e| Ok(e.sessions.get(&id).map_or(0, |s| s.tokens().len())))
    }

    fn reset(&mut self) -> CoreResult<()> {
        let id = self.id;
        session_call(&self.jobs, id, move |e| {
            e.announce(|| Request::EndSession { session: id })?;
            e.sessions.remove(&id);
            Ok(())
        })
    }

    fn save(&self, path: &Path) -> CoreResult<()> {
        let id = self.id;
        let path: PathBuf = path.to_path_buf();
        session_call(&self.jobs, id, move |e| {
            e.refuse_session_files()?;
            let fingerprint = e.fingerprint.clone();
            let state = e.session_cache(id).map_err(core_err)?;
            state.save(&path, &fingerprint).map_err(|err| session_file_err(&path, err))
        })
    }

    fn load(&mut self, path: &Path) -> CoreResult<()> {
        let id = self.id;
        let path: PathBuf = path.to_path_buf();
        session_call(&self.jobs, id, move |e| {
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
                e.when_session_free(
                    id,
                    Box::new(move |e: &mut Engine| {
                        // Only a session that ran holds caches on the other ranks.
                        if e.sessions.remove(&id).is_some() {
                            let _ = e.announce(|| Request::EndSession { session: id });
                        }
                    }),
                )
            }),
        );
    }
}

impl Engine {
    /// Runs `job` now, or, while a turn of session `id` runs, once it has ended.
    pub(super) fn when_session_free(&mut self, id: u64, job: Job) {
        match self.turns.get_mut(&id) {
            Some((_, waiting)) => waiting.push(job),
            None => job(self),
        }
    }

    /// Starts a turn of session `id` over the whole conversation `ids`: the
    /// session's caches keep the longest prefix they share with it and go
    /// with the row to the scheduler; the turn prefills only the rest.
    pub(super) fn start_session_turn(&mut self, id: u64, ids: Vec<u32>, settings: GenerateSettings, sink: TokenSink) {
        if let Err(e) = self.check_fits(ids.len(), &settings) {
            return sink.fail(e);
        }
        if let Err(e) =
            self.announce(|| Request::SessionTurn { session: id, ids: ids.clone(), settings: settings.clone() })
        {
            return sink.fail(e);
        }
        self.submit_session_turn(id, ids, settings, sink);
    }

    /// Hands a turn of session `id` to the scheduler (see [`Engine::start_session_turn`]).
    pub(super) fn submit_session_turn(&mut self, id: u64, ids: Vec<u32>, settings: GenerateSettings, sink: TokenSink) {
        let model = self.loaded.model.as_ref();
        let kv_quant = self.scheduler.kv_quant();
        let mut state = match self.sessions.remove(&id) {
            Some(s) => s,
            None => match SessionCache::new(model) {
                Ok(s) => s,
                Err(e) => return sink.fail(core_err(e)),
            },
        };
        let prepared =
            state.prepare(model, &ids).and_then(|cached| Ok((cached, to_rows(state.caches_mut(), kv_quant)?)));
        let (cached, caches) = match prepared {
            Ok(p) => p,
            Err(e) => {
                if state.reset(model).is_ok() {
                    self.sessions.insert(id, state);
                }
                return sink.fail(core_err(e));
            }
        };
        let span = tracing::info_span!(
            "job",
            kind = "session_turn",
            session = id,
            prompt_tokens = ids.len(),
            max_tokens = settings.max_tokens,
            cached_tokens = cached,
            generated_tokens = tracing::field::Empty,
        );
        let max_tokens = self.max_tokens(ids.len(), &settings);
        let prompt = ids[cached..].to_vec();
        self.turns.insert(id, (state, Vec::new()));
        let session = Some(SessionTurn { id, ids, cached, caches });
        let request =
            ScheduledRequest { ids: prompt, settings, max_tokens, sink, span, classify: false, group: None, session };
        self.scheduler.submit(request);
    }

    /// Puts back the caches of sessions whose turns ended, then runs the
    /// jobs that waited for them.
    pub(super) fn take_back_sessions(&mut self) {
        for back in self.scheduler.take_returned() {
            let Some((mut state, waiting)) = self.turns.remove(&back.id) else { continue };
            let model = self.loaded.model.as_ref();
            let restored = back.caches.ok_or(()).and_then(|rows| {
                let caches = from_rows(&rows).map_err(|_| ())?;
                *state.caches_mut() = caches;
                state.record(model, &back.ids, &back.emitted).map_err(|_| ())
            });
            // A turn that failed part-way may have half-written caches: the session starts again.
            if restored.is_err() && state.reset(model).is_err() {
                continue;
            }
            self.sessions.insert(back.id, state);
            for job in waiting {
                self.when_session_free(back.id, job);
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

/// A session's caches as one-row batch caches (what the scheduler runs on),
/// quantised past their start where the engine's `quant` says so.
fn to_rows(caches: &[LayerCache], quant: Option<KvQuant>) -> Result<Vec<LayerCache>, Error> {
    caches
        .iter()
        .map(|c| {
            let row = match c {
                LayerCache::Standard(k) if k.offset() == 0 => BatchKvCache::new(vec![0])?,
                LayerCache::Standard(k) => {
                    let (keys, values) = k.parts()?;
                    BatchKvCache::from_row_parts(keys, values, k.offset(), None)?
                }
                LayerCache::Rotating(r) if r.offset() == 0 => BatchKvCache::windowed(vec![0], r.max_size())?,
                LayerCache::Rotating(r) if r.keep() > 0 && r.offset() > r.len() => {
                    return Err(Error::invalid("session", "a rotated cache that keeps its first positions"));
                }
                LayerCache::Rotating(r) => {
                    let (keys, values) = r.ordered()?;
                    BatchKvCache::from_row(keys, values, r.offset(), Some(r.max_size()))?
                }
                LayerCache::Batch(b) => b.clone(),
            };
            Ok(LayerCache::Batch(row.with_quant(quant)))
        })
        .collect()
}

/// One-row batch caches back in a session's own kinds: full ones, and
/// rotating ones that keep their window's positions.
fn from_rows(rows: &[LayerCache]) -> Result<Vec<LayerCache>, Error> {
    rows.iter()
        .map(|c| {
            let LayerCache::Batch(b) = c else { return Ok(c.clone()) };
            let (keys, values, position) = b.row_parts(0)?;
            match b.window() {
                None if position == 0 => Ok(LayerCache::Standard(KvCache::new())),
                None => Ok(LayerCache::Standard(KvCache::from_parts(keys, values)?)),
                Some(w) if position == 0 => Ok(LayerCache::Rotating(RotatingKvCache::new(w)?)),
                Some(w) => {
                    let held = keys.dim(2)?;
                    let from = held - held.min(w);
                    let last = |a: &KvArray| mlx::ops::slice_axis(a.dense("session")?, 2, from, held);
                    Ok(LayerCache::Rotating(RotatingKvCache::from_state(last(&keys)?, last(&values)?, position, w, 0)?))
                }
            }
        })
        .collect()
}
