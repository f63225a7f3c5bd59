// SPDX-License-Identifier: EUPL-1.2
//! Prompts going in. A long prompt goes in alone, a chunk of `prefill_step`
//! tokens at a time, until what is left fits one chunk; then prompts go in
//! together: the rows whose rest fits are prefilled as one left-padded batch
//! in one forward pass, their last tokens included, with the head on the last
//! column only, whose logits give the first tokens (`generate::prefill_last`;
//! mlx-lm's batch generator feeds all but the last tokens, then the last ones
//! in a second pass over every weight; with a quantised KV cache
//! `prefill_last` does the same, since the cache converts between the two and
//! the last tokens attend to quantised keys). Their caches stay together and join the running batch
//! as one.
//!
//! The rows of a group end on the same column, so each feeds as many tokens
//! as the one with the most left: a row with fewer takes back the last few
//! positions its cache holds (from the prompt cache, or an earlier chunk)
//! and feeds those tokens again, or, with none left, is padded on the left.
//! A row is grouped only where that costs little (a quarter of the chunk or
//! 16 tokens) and its caches can be cut (a sliding-window cache that has
//! dropped positions cannot).

use mlx::{Array, Error, Result, memory, ops};

use super::rows::{Outputs, Row, sample_rows, tokens};
use crate::cache::{BatchKvCache, KvQuant, LayerCache};
use crate::generate;
use crate::model::LanguageModel;

/// A request whose prompt is going in.
pub(super) struct Prefill {
    pub(super) row: Row,
    /// The whole sequence: what the caches held at admission and the prompt.
    pub(super) full: Vec<u32>,
    /// Positions the caches hold.
    pub(super) held: usize,
    pub(super) caches: Vec<LayerCache>,
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

    /// Tokens left to feed before the last one.
    fn rest(&self) -> usize {
        self.full.len().saturating_sub(self.held + 1)
    }

    /// Whether the caches can give back their last `n` positions.
    fn can_cut(&self, n: usize) -> bool {
        n == 0
            || self.caches.iter().all(|c| match c {
                LayerCache::Batch(b) => b.left_padding().iter().all(|&p| p >= 0),
                _ => false,
            })
    }
}

/// Rows whose prompts are in, with their caches (one row each, in order)
/// and their first tokens, sampled lazily.
pub(super) struct Ready {
    pub(super) rows: Vec<Row>,
    pub(super) caches: Vec<LayerCache>,
    pub(super) first: Outputs,
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
            _ => Err(Error::invalid("scheduler", "a batch holds batch caches only")),
        })
        .collect()
}

/// A fresh cache for one row, of the batch kind: windowed where the model
/// keeps a window, quantised past its start where `quant` says so;
/// `padding` positions before its first token.
pub(super) fn padded_row_caches(
    model: &dyn LanguageModel,
    quant: Option<KvQuant>,
    padding: i32,
) -> Result<Vec<LayerCache>> {
    model
        .make_cache()?
        .into_iter()
        .map(|c| {
            Ok(LayerCache::Batch(
                match c {
                    LayerCache::Rotating(r) => BatchKvCache::windowed(vec![padding], r.max_size())?,
                    LayerCache::Standard(_) => BatchKvCache::new(vec![padding])?,
                    LayerCache::Batch(b) => b,
                }
                .with_quant(quant),
            ))
        })
        .collect()
}

/// A fresh cache for one row (see [`padded_row_caches`]).
pub(super) fn single_row_caches(model: &dyn LanguageModel, quant: Option<KvQuant>) -> Result<Vec<LayerCache>> {
    padded_row_caches(model, quant, 0)
}

/// Feeds `p` alone, a chunk of `step` tokens at a time while `budget` lasts
/// (a chunk may overdraw it, so that chunks do not depend on what else
/// runs), until what is left, its last token included, fits one chunk.
pub(super) fn chunk_alone(model: &dyn LanguageModel, p: &mut Prefill, step: usize, budget: &mut usize) -> Result<()> {
    let step = step.max(1);
    if p.rest() < step || *budget == 0 {
        return Ok(());
    }
    let _job = p.row.span.enter();
    while p.rest() >= step && *budget > 0 {
        let chunk = tokens(&p.full[p.held..p.held + step])?;
        generate::prefill_chunk(model, &ops::reshape(&chunk, &[1, -1])?, &mut p.caches)?;
        p.held += step;
        *budget = budget.saturating_sub(step);
        memory::clear_cache()?;
    }
    Ok(())
}

/// Whether what is left of `p`, its last token included, fits one chunk now.
pub(super) fn fits_a_chunk(p: &Prefill, step: usize) -> bool {
    p.rest() < step.max(1)
}

/// Which of `candidates` (indices into `all`, in order, each fitting a
/// chunk) go in together: the first, and each later one that costs little
/// beside it and keeps the group within `budget` tokens. Returns the
/// members and the tokens each feeds before its last. With `exact`, only
/// rows holding as many positions and with as much to feed go together (no
/// padding, nothing fed again):
/// a quantised cache converts when it first holds positions, so padding
/// would change when a row's own keys are quantised.
pub(super) fn choose_group(all: &[&Prefill], candidates: &[usize], budget: usize, exact: bool) -> (Vec<usize>, usize) {
    let Some((&first, rest)) = candidates.split_first() else { return (Vec::new(), 0) };
    let (mut members, mut width) = (vec![first], all[first].rest());
    for &j in rest {
        let w = width.max(all[j].rest());
        let slack = if exact { 0 } else { (w / 4).max(16) };
        let fine = members.iter().chain([&j]).all(|&i| w - all[i].rest() <= slack && all[i].can_cut(w - all[i].rest()));
        // Exact: the same positions held too, so that no row's cache is padded when they merge.
        let fine = fine && (!exact || all[j].held == all[first].held);
        if fine && (members.len() + 1) * (w + 1) <= budget.max(width + 1) {
            members.push(j);
            width = w;
        }
    }
    (members, width)
}

/// Feeds `group` together, `width` tokens each before its last and the last
/// in the same pass (see the module's docs). On failure the rows come back
/// with the error.
pub(super) fn prefill_group(
    model: &dyn LanguageModel,
    group: Vec<Prefill>,
    width: usize,
    quant: Option<KvQuant>,
) -> std::result::Result<Ready, (Error, Vec<Row>)> {
    let mut rows = Vec::with_capacity(group.len());
    let mut parts = Vec::with_capacity(group.len());
    for p in group {
        let Prefill { row, full, held, caches } = p;
        rows.push(row);
        parts.push((full, held, caches));
    }
    match run_group(model, &mut rows, parts, width, quant) {
        Ok((caches, first)) => Ok(Ready { rows, caches, first }),
        Err(e) => Err((e, rows)),
    }
}

fn run_group(
    model: &dyn LanguageModel,
    rows: &mut [Row],
    parts: Vec<(Vec<u32>, usize, Vec<LayerCache>)>,
    width: usize,
    quant: Option<KvQuant>,
) -> Result<(Vec<LayerCache>, Outputs)> {
    let _job = rows.first().map(|r| r.span.clone()).unwrap_or_else(tracing::Span::none).entered();
    let mut inputs: Vec<i32> = Vec::with_capacity(parts.len() * width);
    let mut last: Vec<u32> = Vec::with_capacity(parts.len());
    let mut merged: Option<Vec<LayerCache>> = None;
    for (full, held, mut caches) in parts {
        let end = full.len() - 1;
        // Take back positions, or pad, so that `width` tokens end on the last column.
        let start = end.saturating_sub(width);
        let cut = held - start.min(held);
        let padding = width - (end - start);
        if cut > 0 {
            for c in &mut caches {
                c.trim(cut as i32);
            }
        }
        if padding > 0 {
            caches = padded_row_caches(model, quant, padding as i32)?;
        }
        inputs.extend(std::iter::repeat_n(0, padding));
        for &t in &full[start..=end] {
            inputs
                .push(i32::try_from(t).map_err(|_| Error::invalid("scheduler", format!("token id {t} is too large")))?);
        }
        last.push(full[end]);
        merged = Some(match merged {
            None => caches,
            Some(mut m) => {
                for (mine, theirs) in m.iter_mut().zip(&caches) {
                    match (mine, theirs) {
                        (LayerCache::Batch(a), LayerCache::Batch(b)) => a.extend(b)?,
                        _ => return Err(Error::invalid("scheduler", "a batch holds batch caches only")),
                    }
                }
                m
            }
        });
    }
    let mut caches = merged.ok_or_else(|| Error::invalid("scheduler", "an empty group"))?;
    let b = last.len() as i32;
    let x = Array::from_slice(&inputs, &[b, width as i32 + 1])?;
    let logits = generate::prefill_last(model, &x, &mut caches)?;
    let first = sample_rows(rows, &logits, None)?;
    first.queue()?;
    Ok((caches, first))
}
