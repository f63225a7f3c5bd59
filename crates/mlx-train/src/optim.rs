// SPDX-License-Identifier: EUPL-1.2
//! AdamW exactly as MLX's `optim.AdamW`, mlx-lm's learning-rate schedule
//! (linear warm-up, then cosine decay), and clipping by the global norm.

use mlx_metal::Result;

use mlx::{Array, ops};
use serde::{Deserialize, Serialize};

use crate::error::{Error, TrainResult};

/// AdamW's hyper-parameters (MLX's defaults).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// `β₁`, `β₂`. Default 0.9, 0.999.
    pub betas: (f32, f32),
    /// Added to the denominator. Default 1e-8.
    pub eps: f32,
    /// Decoupled weight decay. Default 0.01.
    pub weight_decay: f32,
    /// Divide the moments by `1 - βᵗ`. Default false, as in MLX.
    pub bias_correction: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01, bias_correction: false }
    }
}

impl AdamWConfig {
    /// Checks the ranges MLX checks.
    pub fn validate(&self) -> TrainResult<()> {
        for (name, b) in [("optimizer.betas.0", self.betas.0), ("optimizer.betas.1", self.betas.1)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::config(name, format!("{b} must be in [0, 1)")));
            }
        }
        if self.eps.is_nan() || self.eps < 0.0 {
            return Err(Error::config("optimizer.eps", format!("{} must be at least 0", self.eps)));
        }
        if !self.weight_decay.is_finite() {
            return Err(Error::config("optimizer.weight_decay", "must be finite"));
        }
        Ok(())
    }
}

/// The learning rate by update count: mlx-lm's `build_schedule` with a
/// linear warm-up from `warmup_init` and, optionally, a cosine decay.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrSchedule {
    /// Updates spent warming up (0: none).
    pub warmup_steps: usize,
    /// The learning rate the warm-up starts from.
    pub warmup_init: f32,
    /// Updates over which the rate decays along a cosine after the warm-up
    /// (`None`: it stays constant).
    pub cosine_decay_steps: Option<usize>,
    /// The rate the decay ends at.
    pub end: f32,
}

impl Default for LrSchedule {
    fn default() -> Self {
        LrSchedule { warmup_steps: 0, warmup_init: 0.0, cosine_decay_steps: None, end: 0.0 }
    }
}

impl LrSchedule {
    /// The learning rate for the update after `step` updates, given the peak
    /// rate `lr` (computed in `f32` as MLX's schedules are).
    pub fn at(&self, lr: f32, step: usize) -> f32 {
        let cosine = |s: usize| -> f32 {
            match self.cosine_decay_steps {
                Some(n) if n > 0 => {
                    let s = s.min(n) as f32;
                    let decay = 0.5 * (1.0 + ((std::f64::consts::PI / n as f64) as f32 * s).cos());
                    self.end + decay * (lr - self.end)
                }
                _ => lr,
            }
        };
        if self.warmup_steps == 0 {
            return cosine(step);
        }
        // mlx-lm joins the schedules at warmup + 1.
        if step < self.warmup_steps + 1 {
            let s = step.min(self.warmup_steps) as f32;
            s * ((f64::from(lr) - f64::from(self.warmup_init)) / self.warmup_steps as f64) as f32 + self.warmup_init
        } else {
            cosine(step - (self.warmup_steps + 1))
        }
    }

    /// Checks the fields.
    pub fn validate(&self) -> TrainResult<()> {
        if self.cosine_decay_steps == Some(0) {
            return Err(Error::config("schedule.cosine_decay_steps", "must be at least 1"));
        }
        if !self.warmup_init.is_finite() || !self.end.is_finite() {
            return Err(Error::config("schedule", "warmup_init and end must be finite"));
        }
        Ok(())
    }
}

/// AdamW over a flat list of parameters, with its state.
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Updates done so far.
    pub step: usize,
    /// First moments, one per parameter (empty until the first update).
    pub m: Vec<Array>,
    /// Second moments.
    pub v: Vec<Array>,
}

impl AdamW {
    /// A fresh optimiser.
    pub fn new(config: AdamWConfig) -> AdamW {
        AdamW { config, step: 0, m: Vec::new(), v: Vec::new() }
    }

    /// One update at learning rate `lr`: returns the new parameters. Follows
    /// MLX's `AdamW.apply_single` operation by operation (the decay first,
    /// then Adam on the decayed parameter), in each gradient's dtype.
    pub fn update(&mut self, params: &[Array], grads: &[Array], lr: f32) -> Result<Vec<Array>> {
        if params.len() != grads.len() {
            return Err(mlx_metal::Error::InvalidArgument {
                op: "adamw",
                message: format!("{} parameters but {} gradients", params.len(), grads.len()),
            });
        }
        if self.m.is_empty() {
            self.m = params.iter().map(ops::zeros_like).collect::<Result<_>>()?;
            self.v = params.iter().map(ops::zeros_like).collect::<Result<_>>()?;
        }
        if self.m.len() != params.len() {
            return Err(mlx_metal::Error::InvalidArgument {
                op: "adamw",
                message: format!("the state holds {} parameters but {} were given", self.m.len(), params.len()),
            });
        }
        self.step += 1;
        let c = self.config;
        let (b1, b2) = (f64::from(c.betas.0), f64::from(c.betas.1));
        let mut out = Vec::with_capacity(params.len());
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let dt = g.dtype();
            let lr_a = Array::scalar_as(f64::from(lr), dt)?;
            // parameter * (1 - lr * weight_decay)
            let decay =
                ops::subtract(&Array::scalar_as(1.0, dt)?, &ops::multiply_scalar(&lr_a, f64::from(c.weight_decay))?)?;
            let p = ops::multiply(p, &decay)?;
            let m = ops::add(&ops::multiply_scalar(&self.m[i], b1)?, &ops::multiply_scalar(g, 1.0 - b1)?)?;
            let v =
                ops::add(&ops::multiply_scalar(&self.v[i], b2)?, &ops::multiply_scalar(&ops::square(g)?, 1.0 - b2)?)?;
            let new = if c.bias_correction {
                let t = self.step as i32;
                let c1 = ops::astype(&ops::divide_scalar(&lr_a, 1.0 - b1.powi(t))?, dt)?;
                let c2 = ops::astype(&ops::rsqrt(&Array::scalar_as(1.0 - b2.powi(t), dt)?)?, dt)?;
                let num = ops::multiply(&c1, &m)?;
                let den = ops::add_scalar(&ops::multiply(&ops::sqrt(&v)?, &c2)?, f64::from(c.eps))?;
                ops::subtract(&p, &ops::divide(&num, &den)?)?
            } else {
                let den = ops::add_scalar(&ops::sqrt(&v)?, f64::from(c.eps))?;
                ops::subtract(&p, &ops::divide(&ops::multiply(&lr_a, &m)?, &den)?)?
            };
            self.m[i] = m;
            self.v[i] = v;
            out.push(new);
        }
        Ok(out)
    }

    /// The arrays of the state (for evaluation and saving).
    pub fn state(&self) -> Vec<&Array> {
        self.m.iter().chain(&self.v).collect()
    }
}

/// Scales the gradients down so that their global L2 norm is at most
/// `max_norm` (MLX's `clip_grad_norm`: unchanged when the norm is below it).
/// Returns the clipped gradients and the norm before clipping (a lazy scalar).
pub fn clip_grad_norm(grads: &[Array], max_norm: f32) -> Result<(Vec<Array>, Array)> {
    let mut total = Array::scalar_as(0.0, mlx::Dtype::Float32)?;
    for g in grads {
        let g32 = ops::astype(g, mlx::Dtype::Float32)?;
        total = ops::add(&total, &ops::sum_all(&ops::square(&g32)?, false)?)?;
    }
    let norm = ops::sqrt(&total)?;
    let max = Array::scalar_as(f64::from(max_norm), mlx::Dtype::Float32)?;
    let normaliser = ops::divide(&max, &ops::add_scalar(&norm, 1e-6)?)?;
    let below = ops::less(&norm, &max)?;
    let clipped = grads
        .iter()
        .map(|g| {
            let scaled = ops::multiply(g, &ops::astype(&normaliser, g.dtype())?)?;
            ops::where_(&below, g, &scaled)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((clipped, norm))
}
