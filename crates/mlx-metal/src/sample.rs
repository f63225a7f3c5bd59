// SPDX-License-Identifier: EUPL-1.2
//! Sampling, with mlx-lm's semantics so that seeded runs compare.
//!
//! The pipeline per step is mlx-lm's `generate_step`:
//! 1. logits processors on the raw logits (repetition penalty over the last
//!    `repetition_context_size` tokens, prompt included);
//! 2. log-probabilities `logits - logsumexp(logits)`;
//! 3. the sampler: greedy (`argmax`) when the temperature is 0, otherwise the
//!    filters top-p, min-p, top-k in that order, then a categorical draw from
//!    `logprobs / temperature` using MLX's random state.
//!
//! Randomness: each generation draws from its own [`KeySequence`], which
//! steps exactly as MLX's global sequence does after `mx.random.seed(seed)`
//! (split the key, keep the first half, draw with the second), so a seeded
//! generation draws the same tokens as mlx-lm's, alone or among other rows
//! of a batch. [`Sampler::seed`] seeds the thread's global sequence, which
//! [`Sampler::sample`] draws from without a key.

use mlx::{Array, Dtype};
use mlx::{Error, Result};
use mlx::{ops, random};

/// Sampling settings (the subset of generation settings that shapes a draw).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling; 1 (or 0) disables it.
    pub top_p: f32,
    /// Minimum probability relative to the best token; 0 disables it.
    pub min_p: f32,
    /// Keep only the `k` most likely tokens; 0 disables it.
    pub top_k: usize,
    /// Tokens that min-p always keeps.
    pub min_tokens_to_keep: usize,
    /// Multiplicative repetition penalty; 1 disables it.
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repetition_context_size: usize,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_p: 1.0,
            min_p: 0.0,
            top_k: 0,
            min_tokens_to_keep: 1,
            repetition_penalty: 1.0,
            repetition_context_size: 20,
        }
    }
}

/// Turns logits into the next token.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
}

impl Sampler {
    /// A sampler for `cfg`; fails on settings mlx-lm would reject.
    pub fn new(cfg: SamplerConfig) -> Result<Sampler> {
        const OP: &str = "sampler";
        if !cfg.temperature.is_finite() || cfg.temperature < 0.0 {
            return Err(Error::invalid(OP, format!("temperature {} must be a finite number >= 0", cfg.temperature)));
        }
        if !(0.0..=1.0).contains(&cfg.min_p) {
            return Err(Error::invalid(OP, format!("min_p {} must be in [0, 1]", cfg.min_p)));
        }
        if !(0.0..=1.0).contains(&cfg.top_p) {
            return Err(Error::invalid(OP, format!("top_p {} must be in [0, 1]", cfg.top_p)));
        }
        if cfg.min_tokens_to_keep < 1 {
            return Err(Error::invalid(OP, "min_tokens_to_keep 0 must be at least 1"));
        }
        if !cfg.repetition_penalty.is_finite() || cfg.repetition_penalty < 0.0 {
            return Err(Error::invalid(
                OP,
                format!("repetition_penalty {} must be a finite number >= 0", cfg.repetition_penalty),
            ));
        }
        if cfg.repetition_context_size < 1 {
            // mlx-lm would slice `tokens[-0:]` and penalise the whole history.
            return Err(Error::invalid(OP, "repetition_context_size 0 must be at least 1"));
        }
        Ok(Sampler { cfg })
    }

    /// The settings.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Seeds this thread's MLX random state (like `mx.random.seed`).
    pub fn seed(seed: u64) -> Result<()> {
        random::seed(seed)
    }

    /// Whether a step needs the token history (a repetition penalty is on).
    pub fn needs_history(&self) -> bool {
        self.cfg.repetition_penalty != 1.0 && self.cfg.repetition_penalty != 0.0
    }

    /// Applies the logits processors to `logits: [B, V]` given `recent`, the
    /// last `repetition_context_size` tokens (int32 `[T]`).
    pub fn process(&self, logits: &Array, recent: &Array) -> Result<Array> {
        if !self.needs_history() || recent.size() == 0 {
            return Ok(logits.clone());
        }
        let selected = ops::take(logits, recent, 1)?;
        let penalty = ops::scalar_like(&selected, f64::from(self.cfg.repetition_penalty))?;
        let zero = ops::scalar_like(&selected, 0.0)?;
        let penalised = ops::where_(
            &ops::less(&selected, &zero)?,
            &ops::multiply(&selected, &penalty)?,
            &ops::divide(&selected, &penalty)?,
        )?;
        // logits[:, tokens] = penalised (duplicates carry equal values).
        let idx = ops::broadcast_to(&ops::expand_dims(recent, &[0])?, &[logits.dim(0)?, recent.dim(0)?])?;
        ops::put_along_axis(logits, &idx, &penalised, 1)
    }

    /// [`Sampler::process`] with the last `repetition_context_size` tokens of
    /// `history` (int32 `[T]`, every token fed so far).
    pub fn process_history(&self, logits: &Array, history: &Array) -> Result<Array> {
        let len = history.dim(0)?;
        let ctx = i32::try_from(self.cfg.repetition_context_size).unwrap_or(i32::MAX);
        let recent = ops::slice_axis(history, 0, (len - ctx).max(0), len)?;
        self.process(logits, &recent)
    }

    /// `logits - logsumexp(logits)` over the last axis.
    pub fn logprobs(logits: &Array) -> Result<Array> {
        ops::subtract(logits, &ops::logsumexp(logits, &[-1], true)?)
    }

    /// Draws token ids `[B]` from `logprobs: [B, V]` with MLX's global key
    /// sequence (see [`Sampler::seed`]).
    pub fn sample(&self, logprobs: &Array) -> Result<Array> {
        self.sample_with(logprobs, None)
    }

    /// Draws token ids `[B]` from `logprobs: [B, V]`; a random draw takes
    /// the next key of `keys` (greedy sampling takes none).
    pub fn sample_keyed(&self, logprobs: &Array, keys: &mut KeySequence) -> Result<Array> {
        if self.is_greedy() {
            return self.sample_with(logprobs, None);
        }
        let key = keys.next_key()?;
        self.sample_with(logprobs, Some(&key))
    }

    /// Whether sampling is the argmax (temperature 0): no randomness.
    pub fn is_greedy(&self) -> bool {
        self.cfg.temperature == 0.0
    }

    fn sample_with(&self, logprobs: &Array, key: Option<&Array>) -> Result<Array> {
        let c = &self.cfg;
        if c.temperature == 0.0 {
            return ops::argmax(logprobs, -1, false);
        }
        let mut lp = logprobs.clone();
        if c.top_p > 0.0 && c.top_p < 1.0 {
            lp = apply_top_p(&lp, c.top_p)?;
        }
        if c.min_p != 0.0 {
            lp = apply_min_p(&lp, c.min_p, c.min_tokens_to_keep)?;
        }
        if c.top_k > 0 {
            lp = apply_top_k(&lp, c.top_k)?;
        }
        let scaled = ops::multiply(&lp, &ops::scalar_like(&lp, f64::from(1.0 / c.temperature))?)?;
        random::categorical(&scaled, -1, key)
    }
}

/// A generation's own random keys: MLX's key sequence, one per generation
/// instead of one per thread. From a seed it yields the keys that
/// `mx.random.seed(seed)` makes the global sequence yield.
#[derive(Debug, Clone)]
pub struct KeySequence {
    key: Array,
}

impl KeySequence {
    /// The sequence that `mx.random.seed(seed)` starts.
    pub fn new(seed: u64) -> Result<KeySequence> {
        Ok(KeySequence { key: random::key(seed)? })
    }

    /// The next key: the key is split in two, the first half is kept for
    /// later and the second is returned (as MLX's `KeySequence::next`).
    pub fn next_key(&mut self) -> Result<Array> {
        let halves = random::split(&self.key, 2)?;
        let rest = ops::squeeze(&ops::slice_axis(&halves, 0, 0, 1)?, &[0])?;
        let drawn = ops::squeeze(&ops::slice_axis(&halves, 0, 1, 2)?, &[0])?;
        self.key = rest;
        Ok(drawn)
    }
}

fn neg_inf_like(a: &Array) -> Result<Array> {
    Array::scalar_as(f64::NEG_INFINITY, a.dtype())
}

/// Keeps the `k` most likely tokens.
pub fn apply_top_k(logprobs: &Array, k: usize) -> Result<Array> {
    let vocab = logprobs.dim(-1)?;
    let k = i32::try_from(k).unwrap_or(i32::MAX);
    if !(0 < k && k < vocab) {
        // mlx-lm rejects these; keeping everything is the same distribution.
        return Ok(logprobs.clone());
    }
    let neg = ops::negative(logprobs)?;
    let part = ops::argpartition(&neg, k - 1, -1)?;
    let shape = part.shape();
    let mut start = vec![0; shape.len()];
    let last = shape.len() - 1;
    start[last] = k;
    let mask_idx = ops::slice(&part, &start, &shape)?;
    ops::put_along_axis(logprobs, &mask_idx, &neg_inf_like(logprobs)?, -1)
}

/// Drops tokens whose probability is below `min_p` times the best one's.
pub fn apply_min_p(logprobs: &Array, min_p: f32, min_tokens_to_keep: usize) -> Result<Array> {
    let top = ops::max(logprobs, &[-1], true)?;
    let scaled = ops::add(&top, &ops::scalar_like(&top, f64::from(min_p).ln())?)?;
    let mut remove = ops::less(logprobs, &scaled)?;
    if min_tokens_to_keep > 1 {
        let keep = i32::try_from(min_tokens_to_keep).unwrap_or(i32::MAX);
        let part = ops::argpartition(logprobs, -keep, -1)?;
        let shape = part.shape();
        let last = shape.len() - 1;
        let mut start = vec![0; shape.len()];
        start[last] = shape[last] - keep;
        let top_idx = ops::slice(&part, &start, &shape)?;
        remove = ops::put_along_axis(&remove, &top_idx, &Array::scalar(false), -1)?;
    }
    ops::where_(&remove, &neg_inf_like(logprobs)?, logprobs)
}

/// Nucleus filtering: keeps the smallest set of tokens whose mass reaches `top_p`.
pub fn apply_top_p(logprobs: &Array, top_p: f32) -> Result<Array> {
    let sorted = ops::sort(logprobs, -1)?;
    let probs = ops::exp(&ops::astype(&sorted, Dtype::Float32)?)?;
    let mass_above = ops::cumsum(&probs, -1, true, false)?;
    let first = |a: &Array| -> Result<Array> { ops::slice_axis(a, -1, 0, 1) };
    let total = ops::add(&first(&mass_above)?, &first(&probs)?)?;
    let threshold_mass = ops::multiply(&total, &Array::scalar_as(f64::from(top_p), Dtype::Float32)?)?;
    let dropped = ops::sum(&ops::greater_equal(&mass_above, &threshold_mass)?, &[-1], true)?;
    let threshold = ops::take_along_axis(&sorted, &ops::astype(&dropped, Dtype::Int32)?, -1)?;
    ops::where_(&ops::less(logprobs, &threshold)?, &neg_inf_like(logprobs)?, logprobs)
}
