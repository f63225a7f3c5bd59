// SPDX-License-Identifier: EUPL-1.2
//! What goes into the scheduler and what comes out besides tokens: its
//! limits, the requests, a step's plan, and sessions' caches on their way
//! out and back.

use std::sync::Arc;

use inference_core::{GenerateSettings, TokenSink};
use mlx::{Error, Result};

use super::Group;
use crate::cache::{KvQuant, LayerCache};
use crate::generate;

/// How much the scheduler takes on at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most rows decoding at once (requests being prefilled count too).
    pub max_batch: usize,
    /// Most prompt tokens prefilled per step, all requests together; also
    /// the size of one prefill chunk.
    pub prefill_step: usize,
    /// Bytes the batch's KV caches may take; `None` for a share of what MLX's
    /// memory limit leaves (see `admission.rs`).
    pub kv_cache_bytes: Option<usize>,
    /// Bytes the prompt cache (finished requests' caches, reused by the
    /// requests that start the same way) may take; `Some(0)` turns it off,
    /// `None` takes an eighth of the device's memory (see `admission.rs`).
    pub prompt_cache_bytes: Option<usize>,
    /// The quantised KV cache (`kv_bits`, `kv_group_size`,
    /// `quantized_kv_start`; see [`KvQuant::from_backend_options`]).
    pub kv_quant: Option<KvQuant>,
}

/// The most rows decoding at once unless the load settings say otherwise
/// (mlx-lm's server decodes up to 32 too).
pub const DEFAULT_MAX_BATCH: usize = 32;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch: DEFAULT_MAX_BATCH,
            prefill_step: generate::PREFILL_STEP,
            kv_cache_bytes: None,
            prompt_cache_bytes: None,
            kv_quant: None,
        }
    }
}

impl Limits {
    /// The limits that the load settings' backend options `max_batch`,
    /// `prefill_step` and `kv_cache_bytes` (whole numbers >= 1) and
    /// `prompt_cache_bytes` (>= 0; 0 turns the prompt cache off) set; the
    /// defaults for those absent.
    ///
    /// # Errors
    ///
    /// An option that is not a whole number in its range, named with its value.
    pub fn from_backend_options(options: &std::collections::BTreeMap<String, String>) -> Result<Limits> {
        let read = |key: &str, least: usize| -> Result<Option<usize>> {
            let Some(v) = options.get(key) else { return Ok(None) };
            let n = v.trim().parse::<usize>().ok().filter(|&n| n >= least);
            n.map(Some).ok_or_else(|| {
                Error::invalid("load_settings", format!("{key} = {v:?} must be a whole number of at least {least}"))
            })
        };
        let d = Limits::default();
        Ok(Limits {
            max_batch: read("max_batch", 1)?.unwrap_or(d.max_batch),
            prefill_step: read("prefill_step", 1)?.unwrap_or(d.prefill_step),
            kv_cache_bytes: read("kv_cache_bytes", 1)?,
            prompt_cache_bytes: read("prompt_cache_bytes", 0)?,
            kv_quant: KvQuant::from_backend_options(options)?,
        })
    }
}

/// What one step does that cannot be worked out from the requests alone:
/// how many waiting requests it admits, and which generations (by the order
/// they came in) it ends because their callers cancelled or went away. A
/// process decides it from its streams ([`Scheduler::plan`]); in a
/// tensor-parallel job rank 0 decides and every rank runs the same plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Plan {
    /// Waiting requests to admit, in order (the cancelled ones left out).
    pub(crate) admit: usize,
    /// Generations to end as cancelled.
    pub(crate) cancel: Vec<u64>,
}

/// A generation handed to the scheduler.
pub(crate) struct Request {
    /// The prompt's token ids (non-empty).
    pub(crate) ids: Vec<u32>,
    /// The settings, validated, with the seed the row draws from.
    pub(crate) settings: GenerateSettings,
    /// Most tokens to generate (the settings' limit, cut to the context).
    pub(crate) max_tokens: usize,
    /// Where the tokens go.
    pub(crate) sink: TokenSink,
    /// The generation's `job` span (a child of the caller's), open until it ends.
    pub(crate) span: tracing::Span,
    /// Classification: one token as drawn (no EOS or stop rules), with its scores.
    pub(crate) classify: bool,
    /// The call this request is one of, if it is one of several.
    pub(crate) group: Option<Arc<Group>>,
    /// A chat session's turn: its caches, which come back when it ends.
    pub(crate) session: Option<SessionTurn>,
}

impl Request {
    /// Every position the generation may hold: its conversation, prompt and `max_tokens`.
    pub(super) fn footprint(&self) -> usize {
        self.session.as_ref().map_or(0, |t| t.cached) + self.ids.len() + self.max_tokens
    }
}

/// A chat session's turn: the session's caches go in with the request
/// (holding `ids[..cached]`; the request's prompt is the rest) and come back
/// ([`Returned`]) when the row ends.
pub(crate) struct SessionTurn {
    /// The session.
    pub(crate) id: u64,
    /// The whole conversation so far.
    pub(crate) ids: Vec<u32>,
    /// How many of `ids` the caches hold.
    pub(crate) cached: usize,
    /// One-row batch caches ([`LayerCache::Batch`]).
    pub(crate) caches: Vec<LayerCache>,
}

/// A session's caches back from its turn.
pub(crate) struct Returned {
    /// The session.
    pub(crate) id: u64,
    /// The conversation the turn ran over.
    pub(crate) ids: Vec<u32>,
    /// The tokens the turn handed out, in order.
    pub(crate) emitted: Vec<u32>,
    /// The caches, or `None` when the turn failed and they may be half-written.
    pub(crate) caches: Option<Vec<LayerCache>>,
}
