// SPDX-License-Identifier: EUPL-1.2
//! A request's prompt going in: on a cache of its own, in chunks, under the
//! step's token budget; its last token's logits give its first token.

use mlx::{Array, Result, memory, ops};

use super::rows::{Outputs, Row};
use crate::cache::{BatchKvCache, KvQuant, LayerCache};
use crate::generate;
use crate::model::LanguageModel;

/// A request whose prompt is going in.
pub(super) struct Prefill {
    pub(super) row: Row,
    pub(super) prompt: Array,
    pub(super) caches: Vec<LayerCache>,
    pub(super) done: usize,
}

impl Prefill {
    /// The row, with its caches back in its session's turn (if it has one).
    pub(super) fn into_row(self) -> Row {
        let Prefill { mut row, caches, .. } = self;
        if let Some(t) = row.session.as_mut() {
            t.caches = caches;
        }
        row
    }
}

/// Row `pos` of the batch's caches, as one-row caches.
pub(super) fn row_caches(caches: &[LayerCache], pos: usize) -> Result<Vec<LayerCache>> {
    caches
        .iter()
        .map(|c| match c {
            LayerCache::Batch(b) => {
                let (keys, values, position) = b.row_parts(pos)?;
                Ok(LayerCache::Batch(
                    BatchKvCache::from_row_parts(keys, values, position, b.window())?.with_quant(b.quant()),
                ))
            }
            _ => Err(mlx::Error::invalid("scheduler", "a batch holds batch caches only")),
        })
        .collect()
}

/// A fresh cache for one row, of the batch kind: windowed where the model
/// keeps a window; quantised past its start where `quant` says so.
pub(super) fn single_row_caches(model: &dyn LanguageModel, quant: Option<KvQuant>) -> Result<Vec<LayerCache>> {
    model
        .make_cache()?
        .into_iter()
        .map(|c| {
            Ok(LayerCache::Batch(
                match c {
                    LayerCache::Rotating(r) => BatchKvCache::windowed(vec![0], r.max_size())?,
                    LayerCache::Standard(_) => BatchKvCache::new(vec![0])?,
                    LayerCache::Batch(b) => b,
                }
                .with_quant(quant),
            ))
        })
        .collect()
}

/// Runs `p`'s prompt on: whole chunks of at most `step` tokens while
/// `budget` lasts (a chunk may overdraw it, so that chunks do not depend on
/// what else runs), then the last prompt token alone, as mlx-lm does, whose
/// logits give the first token. Returns that token's outputs once the whole
/// prompt is in.
pub(super) fn prefill_some(
    model: &dyn LanguageModel,
    p: &mut Prefill,
    step: usize,
    budget: &mut usize,
) -> Result<Option<Outputs>> {
    let _job = p.row.span.enter();
    let total = p.row.prompt_tokens;
    while total - p.done > 1 {
        if *budget == 0 {
            return Ok(None);
        }
        let n = step.max(1).min(total - p.done - 1);
        let chunk = ops::slice_axis(&p.prompt, 0, p.done as i32, (p.done + n) as i32)?;
        generate::prefill_chunk(model, &ops::reshape(&chunk, &[1, -1])?, &mut p.caches)?;
        p.done += n;
        *budget = budget.saturating_sub(n);
        memory::clear_cache()?;
    }
    if *budget == 0 {
        return Ok(None);
    }
    let last = ops::slice_axis(&p.prompt, 0, (total - 1) as i32, total as i32)?;
    let logits = model.forward(&ops::reshape(&last, &[1, 1])?, &mut p.caches)?;
    let logits = ops::squeeze(&logits, &[1])?;
    p.done = total;
    *budget = budget.saturating_sub(1);
    let (ids, logprobs, logits) = p.row.draw.sample(&logits, None)?;
    let first = Outputs { ids, logprobs, logits };
    first.queue()?;
    Ok(Some(first))
}
