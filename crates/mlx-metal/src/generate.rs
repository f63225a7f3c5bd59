// SPDX-License-Identifier: EUPL-1.2
//! The generation loop, following mlx-lm's `generate_step`:
//!
//! - the prompt is prefilled in chunks, evaluating only the caches after
//!   each chunk, until one chunk is left: that one, its last token included,
//!   goes through in one pass with the head on its last position only (mlx-lm
//!   feeds all but the last token, then the last token alone: a second pass
//!   over every weight);
//! - each step runs the model on the newest token(s), applies the logits
//!   processors and the sampler, and queues the work with `async_eval`;
//! - step n+1 is queued before token n is read back, so the device works on
//!   the next token while the host hands out the current one (but for the
//!   first token, read before step 2 is queued: see the loop);
//! - the only host sync per step is reading the sampled id.
//!
//! Runs on the thread that owns the model (the engine thread).

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use crate::cache::LayerCache;
use crate::model::LanguageModel;
use crate::sample::Sampler;
use mlx::memory;
use mlx::ops;
use mlx::transforms::{async_eval, eval};
use mlx::{Array, Dtype};
use mlx::{Error, Result};

/// How many prompt tokens one prefill chunk takes (mlx-lm's default).
pub const PREFILL_STEP: usize = 2048;

/// Runs one prefill chunk `inputs: [B, L]` through the model into `caches`
/// and evaluates the caches; the logits are never computed (a prefill chunk
/// needs only what the caches hold).
///
/// A model that runs block by block ([`LanguageModel::runs_block_by_block`])
/// is evaluated one decoder block at a time: block `i` is queued with
/// `async_eval` and the host then waits for block `i − 1`. The device never
/// idles (one block is always queued behind the running one), and only about
/// two blocks' temporaries are alive at once. Evaluating the whole chunk as one
/// graph instead keeps every block's temporaries (and, for quantised weights
/// at large `L`, every block's dequantised weights) until the whole graph has
/// run: on a GPU that is most of the prefill's peak memory.
pub fn prefill_chunk(model: &dyn LanguageModel, inputs: &Array, caches: &mut [LayerCache]) -> Result<()> {
    let _span = tracing::debug_span!("prefill", rows = inputs.dim(0).unwrap_or(0), tokens = inputs.dim(1).unwrap_or(0))
        .entered();
    if !model.runs_block_by_block() {
        model.forward(inputs, caches)?;
        let state: Vec<&Array> = caches.iter().flat_map(LayerCache::state).collect();
        return eval(&state);
    }
    // The last block's output holds every cache update as an input.
    block_by_block(model, inputs, caches)?.eval()?;
    let state: Vec<&Array> = caches.iter().flat_map(LayerCache::state).collect();
    eval(&state)
}

/// Queues `inputs: [B, L]` through the model's blocks one at a time (see
/// [`prefill_chunk`]) and returns the last block's output, queued but not
/// waited for.
fn block_by_block(model: &dyn LanguageModel, inputs: &Array, caches: &mut [LayerCache]) -> Result<Array> {
    crate::model::check_caches(caches, model.num_layers())?;
    let mut h = model.embed(inputs)?;
    let mut queued: Option<Array> = None;
    for (layer, cache) in caches.iter_mut().enumerate() {
        h = model.forward_layer(layer, &h, cache)?;
        async_eval(&[&h])?;
        if let Some(prev) = queued.replace(h.clone()) {
            prev.eval()?;
        }
    }
    Ok(h)
}

/// Runs a prompt's last chunk `inputs: [B, L]`, its last tokens included,
/// through the model into `caches` in one pass, block by block as
/// [`prefill_chunk`] does, and returns the logits of each row's last
/// position, `[B, V]` (lazy): the head runs on that position alone. One pass
/// instead of the chunk and then its last token reads the weights once
/// instead of twice, which is most of a short prompt's time where a forward
/// pass is bound by reading them (a CPU; a small model on a GPU).
///
/// With a quantised KV cache the chunk goes in without its last tokens and
/// the last tokens then in a pass of their own, as in mlx-lm: the cache
/// converts between the two, and mlx-lm's last tokens attend to quantised keys.
pub fn prefill_last(model: &dyn LanguageModel, inputs: &Array, caches: &mut [LayerCache]) -> Result<Array> {
    let len = inputs.dim(1)?;
    if len > 1 && quantises(caches) {
        prefill_chunk(model, &ops::slice_axis(inputs, 1, 0, len - 1)?, caches)?;
        let logits = model.forward(&ops::slice_axis(inputs, 1, len - 1, len)?, caches)?;
        return ops::squeeze(&logits, &[1]);
    }
    let _span = tracing::debug_span!("prefill", rows = inputs.dim(0).unwrap_or(0), tokens = inputs.dim(1).unwrap_or(0))
        .entered();
    if !model.runs_block_by_block() {
        return last_position(&model.forward(inputs, caches)?);
    }
    let h = block_by_block(model, inputs, caches)?;
    let len = h.dim(1)?;
    ops::squeeze(&model.head(&ops::slice_axis(&h, 1, len - 1, len)?)?, &[1])
}

/// The last position of `x: [B, L, ...]`, as `[B, ...]` (lazy): a forward
/// pass's logits for the token that comes next.
pub fn last_position(x: &Array) -> Result<Array> {
    let len = x.dim(1)?;
    ops::squeeze(&ops::slice_axis(x, 1, len - 1, len)?, &[1])
}

/// What the loop hands out per generated token.
#[derive(Debug)]
pub struct Step<'a> {
    /// The token id.
    pub id: u32,
    /// Log-probabilities over the vocabulary, `[V]` (lazy; read only if needed).
    pub logprobs: &'a Array,
    /// The processed logits `[V]` the token was drawn from (lazy).
    pub logits: &'a Array,
}

/// Timings and counts of one generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    /// Prompt tokens processed.
    pub prompt_tokens: usize,
    /// Tokens handed out.
    pub generated_tokens: usize,
    /// From the start until the first token was known.
    pub prefill: Duration,
    /// From the first token until the end.
    pub decode: Duration,
    /// Peak MLX memory during the call.
    pub peak_memory: usize,
    /// MLX memory in use at the end.
    pub active_memory: usize,
    /// The generated ids that went into the caches after the prompt, in
    /// order: the caches end `prompt + fed` positions further on. (The loop
    /// feeds each token before handing it out, so this can include the token
    /// that stopped generation.)
    pub fed: Vec<u32>,
}

/// Options of one generation.
#[derive(Debug, Clone)]
pub struct LoopOptions {
    /// Most tokens to produce.
    pub max_tokens: usize,
    /// Prompt tokens per prefill chunk.
    pub prefill_step: usize,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions { max_tokens: 256, prefill_step: PREFILL_STEP }
    }
}

/// Reads a sampled token id (`uint32` or `int32`, one element).
pub fn token_id(a: &Array) -> Result<u32> {
    if a.size() != 1 {
        return Err(Error::invalid("token_id", format!("one token id expected, but the shape is {:?}", a.shape())));
    }
    Ok(read_ids("token_id", a)?[0])
}

/// Reads sampled ids (`uint32` or `int32`, `[B]`); `op` names the caller in errors.
///
/// Reads `a` itself, never a conversion of it: a new op would be queued behind
/// the forward pass the caller has just queued, so reading this step's ids
/// would wait for the next step and the device would idle while the host
/// builds the one after (2.5 ms a step for an 8B model on an H100).
pub(crate) fn read_ids(op: &'static str, a: &Array) -> Result<Vec<u32>> {
    match a.dtype() {
        Dtype::Uint32 => a.to_vec::<u32>(),
        Dtype::Int32 => a
            .to_vec::<i32>()?
            .into_iter()
            .map(|v| u32::try_from(v).map_err(|_| Error::invalid(op, format!("negative token id {v}"))))
            .collect(),
        d => Err(Error::invalid(op, format!("token ids must be uint32 or int32, got {d}"))),
    }
}

pub(crate) fn tokens_array(tokens: &[u32]) -> Result<Array> {
    let ids: Vec<i32> = tokens
        .iter()
        .map(|&t| i32::try_from(t).map_err(|_| Error::invalid("generate", format!("token id {t} is too large"))))
        .collect::<Result<_>>()?;
    Array::from_vec(&ids)
}

/// The model state a generation step needs.
struct Stepper<'a> {
    model: &'a dyn LanguageModel,
    caches: &'a mut [LayerCache],
    sampler: &'a Sampler,
    /// All tokens fed so far, when the logits processors need them.
    history: Option<Array>,
}

impl Stepper<'_> {
    fn feed_history(&mut self, input: &Array) -> Result<()> {
        if let Some(h) = &self.history {
            let flat = ops::reshape(input, &[-1])?;
            self.history = Some(ops::concatenate(&[h, &flat], 0)?);
        }
        Ok(())
    }

    /// One model call on `input: [L]` int32 (or a lazy `[1]` sampled token):
    /// returns the sampled token `[1]`, log-probabilities and logits `[1, V]`.
    fn step(&mut self, input: &Array) -> Result<(Array, Array, Array)> {
        let x = ops::reshape(input, &[1, -1])?;
        let logits = last_position(&self.model.forward(&x, self.caches)?)?;
        self.draw(logits, input)
    }

    /// The prompt's last chunk `input: [L]` in one pass ([`prefill_last`]),
    /// then as [`Self::step`].
    fn first(&mut self, input: &Array) -> Result<(Array, Array, Array)> {
        let logits = prefill_last(self.model, &ops::reshape(input, &[1, -1])?, self.caches)?;
        self.draw(logits, input)
    }

    /// Samples the logits `[1, V]` that followed `input`.
    fn draw(&mut self, mut logits: Array, input: &Array) -> Result<(Array, Array, Array)> {
        if self.sampler.needs_history() {
            self.feed_history(input)?;
            if let Some(h) = &self.history {
                logits = self.sampler.process_history(&logits, h)?;
            }
        }
        let logprobs = Sampler::logprobs(&logits)?;
        let y = self.sampler.sample(&logprobs)?;
        Ok((y, logprobs, logits))
    }
}

/// Generates from `prompt` (non-empty token ids), appending to `caches`.
///
/// `emit` gets each token as soon as it is known and says whether to go on;
/// `cancelled` is polled between prefill chunks and before each token. The
/// loop stops after `max_tokens` tokens, when `emit` breaks, or when
/// cancelled; it then returns `Ok` with what was produced, and the caller
/// (who owns the cancel flag) reports the cancellation.
pub fn generate(
    model: &dyn LanguageModel,
    caches: &mut [LayerCache],
    prompt: &[u32],
    sampler: &Sampler,
    opts: &LoopOptions,
    cancelled: &dyn Fn() -> bool,
    mut emit: impl FnMut(Step<'_>) -> Result<ControlFlow<()>>,
) -> Result<GenerationStats> {
    if prompt.is_empty() {
        return Err(Error::invalid("generate", "the prompt has no tokens"));
    }
    let span = tracing::debug_span!(
        "generate",
        prompt_tokens = prompt.len(),
        max_tokens = opts.max_tokens,
        generated_tokens = tracing::field::Empty,
    );
    let _generate = span.enter();
    let start = Instant::now();
    memory::reset_peak_memory()?;
    let prompt_arr = tokens_array(prompt)?;
    let mut st = Stepper {
        model,
        caches,
        sampler,
        history: if sampler.needs_history() { Some(ops::zeros(&[0], Dtype::Int32)?) } else { None },
    };

    // Prefill in chunks until one chunk is left; that one goes in with the
    // first step (`prefill_last`).
    let total = prompt.len();
    let mut done = 0usize;
    let step_size = opts.prefill_step.max(1);
    while total - done > step_size {
        if cancelled() {
            return Ok(stats(start, None, total, Vec::new()));
        }
        let n = step_size;
        let chunk = ops::slice_axis(&prompt_arr, 0, done as i32, (done + n) as i32)?;
        let x = ops::reshape(&chunk, &[1, -1])?;
        prefill_chunk(st.model, &x, st.caches)?;
        st.feed_history(&chunk)?;
        done += n;
        memory::clear_cache()?;
    }
    let rest = ops::slice_axis(&prompt_arr, 0, done as i32, total as i32)?;
    let (mut y, mut logprobs, mut logits) = if total - done > 1 { st.first(&rest)? } else { st.step(&rest)? };
    async_eval(&[&y, &logprobs])?;

    let mut first_token_at: Option<Instant> = None;
    let mut n = 0usize;
    // Ids read back, and how many sampled tokens were fed to the model.
    let mut read: Vec<u32> = Vec::new();
    let mut fed = 0usize;
    loop {
        // Plain integers only, and nothing built unless a subscriber wants
        // TRACE: this runs once per token. The pass that only ends the loop
        // at the token limit is no step.
        let step_span = if n < opts.max_tokens {
            tracing::trace_span!("decode_step", step = n, token = tracing::field::Empty)
        } else {
            tracing::Span::none()
        };
        let _step = step_span.enter();
        // The first token is handed out before the next step is queued:
        // queuing a forward pass waits while too many of MLX's tasks are in
        // flight (on the CPU, for most of the pass before), which would hold
        // the first token back by most of a step. Every later step is queued
        // before its token is read.
        let queue_now = n != opts.max_tokens && n > 0;
        let mut next = if queue_now {
            let next = st.step(&y)?;
            fed += 1;
            async_eval(&[&next.0, &next.1])?;
            Some(next)
        } else {
            None
        };
        if n == 0 {
            y.eval()?;
            first_token_at = Some(Instant::now());
        }
        if n == opts.max_tokens || cancelled() {
            if fed > read.len() {
                read.push(token_id(&y)?);
            }
            break;
        }
        let id = token_id(&y)?;
        if !step_span.is_disabled() {
            step_span.record("token", id);
        }
        read.push(id);
        let lp_row = ops::squeeze(&logprobs, &[0])?;
        let logits_row = ops::squeeze(&logits, &[0])?;
        let flow = emit(Step { id, logprobs: &lp_row, logits: &logits_row })?;
        n += 1;
        if flow.is_break() {
            break;
        }
        if n == 1 && n <= opts.max_tokens {
            // The step after the first token, queued once it is out.
            let first_next = st.step(&y)?;
            fed += 1;
            async_eval(&[&first_next.0, &first_next.1])?;
            next = Some(first_next);
        }
        if n.is_multiple_of(256) {
            memory::clear_cache()?;
        }
        match next {
            Some((ny, nlp, nl)) => {
                y = ny;
                logprobs = nlp;
                logits = nl;
            }
            None => break,
        }
    }
    read.truncate(fed);
    let mut out = stats(start, first_token_at, total, read);
    out.generated_tokens = n;
    span.record("generated_tokens", n);
    Ok(out)
}

/// Whether any of `caches` quantises its keys and values ([`crate::cache::KvQuant`]).
pub fn quantises(caches: &[LayerCache]) -> bool {
    caches.iter().any(|c| match c {
        LayerCache::Standard(k) => k.quant().is_some(),
        LayerCache::Batch(b) => b.quant().is_some(),
        LayerCache::Rotating(_) => false,
    })
}

fn stats(start: Instant, first: Option<Instant>, prompt: usize, fed: Vec<u32>) -> GenerationStats {
    let end = Instant::now();
    let first = first.unwrap_or(end);
    GenerationStats {
        prompt_tokens: prompt,
        generated_tokens: 0,
        prefill: first - start,
        decode: end - first,
        peak_memory: memory::peak_memory().unwrap_or(0),
        active_memory: memory::active_memory().unwrap_or(0),
        fed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ids_reads_either_integer_type_and_refuses_the_rest() {
        let lazy = ops::add(&Array::from_slice(&[3u32, 0, 7], &[3]).unwrap(), &Array::scalar(1u32)).unwrap();
        assert_eq!(read_ids("t", &lazy).unwrap(), vec![4, 1, 8]);
        let strided =
            ops::slice_strided(&Array::from_slice(&[5i32, 6, 7, 8], &[4]).unwrap(), &[0], &[4], &[2]).unwrap();
        assert_eq!(read_ids("t", &strided).unwrap(), vec![5, 7]);
        let e = read_ids("t", &Array::from_slice(&[1i32, -2], &[2]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("negative token id -2"), "{e}");
        let e = read_ids("t", &Array::from_slice(&[1.0f32], &[1]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("uint32 or int32"), "{e}");
    }

    #[test]
    fn token_id_reads_one_id_of_either_integer_type() {
        assert_eq!(token_id(&Array::from_slice(&[9u32], &[1, 1]).unwrap()).unwrap(), 9);
        assert_eq!(token_id(&Array::from_slice(&[4i32], &[1]).unwrap()).unwrap(), 4);
        let e = token_id(&Array::from_slice(&[1u32, 2], &[2]).unwrap()).unwrap_err();
        assert!(e.to_string().contains("one token id expected"), "{e}");
        assert!(token_id(&Array::from_slice(&[-1i32], &[1]).unwrap()).is_err());
    }
}
