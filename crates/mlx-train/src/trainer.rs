// SPDX-License-Identifier: EUPL-1.2
//! The LoRA trainer: value-and-grad over the adapter weights, AdamW with a
//! schedule, clipping, accumulation, per-block gradient checkpointing,
//! evaluation, saving and resuming.
//!
//! The model is shared between the trainer and the closure MLX
//! differentiates: the closure sets each adapter's `A` and `B` to the traced
//! inputs, runs the model and returns `(loss, ntoks)`. After each step the
//! adapters are set back to the (evaluated) parameters, so no graph outlives
//! its step and memory stays flat.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::rc::{Rc, Weak};

use mlx::transforms::{self, Closure, ValueAndGrad};
use mlx::{Array, Dtype, io, memory, ops};
use mlx_metal::lora::{self, AdapterConfig};
use mlx_metal::model::LanguageModel;
use mlx_metal::nn::Linear;

use crate::data::{Batch, Dataset};
use crate::error::{Error, TrainResult};
use crate::loss;
use crate::optim::{AdamW, AdamWConfig, LrSchedule, clip_grad_norm};
use crate::resume::ITERATION_KEY;

/// The file the optimiser state is saved to, beside the adapter.
pub const STATE_FILE: &str = "training_state.safetensors";

/// How each step updates the adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSettings {
    /// The peak learning rate.
    pub learning_rate: f32,
    /// Warm-up and decay.
    pub schedule: LrSchedule,
    /// AdamW's hyper-parameters.
    pub optimizer: AdamWConfig,
    /// Clip the gradients to this global norm.
    pub grad_clip: Option<f32>,
    /// Micro-batches whose gradients are averaged into one update.
    pub grad_accumulation_steps: usize,
    /// Recompute each block's activations in the backward pass.
    pub grad_checkpoint: bool,
    /// Clear MLX's buffer cache after a step when it holds more than this many bytes.
    pub clear_cache_threshold: usize,
}

impl Default for StepSettings {
    fn default() -> Self {
        StepSettings {
            learning_rate: 1e-5,
            schedule: LrSchedule::default(),
            optimizer: AdamWConfig::default(),
            grad_clip: None,
            grad_accumulation_steps: 1,
            grad_checkpoint: false,
            clear_cache_threshold: 0,
        }
    }
}

impl StepSettings {
    /// Checks every field.
    pub fn validate(&self) -> TrainResult<()> {
        if !self.learning_rate.is_finite() || self.learning_rate < 0.0 {
            return Err(Error::config(
                "learning_rate",
                format!("{} must be finite and at least 0", self.learning_rate),
            ));
        }
        if self.grad_accumulation_steps == 0 {
            return Err(Error::config("grad_accumulation_steps", "must be at least 1"));
        }
        if let Some(c) = self.grad_clip
            && !(c.is_finite() && c > 0.0)
        {
            return Err(Error::config("grad_clip", format!("{c} must be finite and above 0")));
        }
        self.schedule.validate()?;
        self.optimizer.validate()
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    /// The batch's loss (before the update).
    pub loss: f32,
    /// Target tokens the loss counted.
    pub ntoks: usize,
    /// Whether the optimiser updated the adapter (the last micro-batch of an
    /// accumulation).
    pub updated: bool,
    /// The learning rate of the last update.
    pub learning_rate: f32,
}

fn mlx_err(message: impl Into<String>) -> mlx_metal::Error {
    mlx_metal::Error::InvalidArgument { op: "train", message: message.into() }
}

/// The model and where each adapter weight lives.
struct Shared {
    model: RefCell<Box<dyn LanguageModel>>,
    /// Adapted linear paths; parameter `2k` is path `k`'s `A`, `2k + 1` its `B`.
    paths: Vec<String>,
    /// The parameter indices of each block.
    layer_params: Vec<Vec<usize>>,
    /// One checkpointed closure per block (only with gradient checkpointing).
    blocks: RefCell<Vec<Closure>>,
}

impl Shared {
    /// Sets adapter weights: `(parameter index, array)` pairs.
    fn set<'a>(&self, pairs: impl IntoIterator<Item = (usize, &'a Array)>) -> mlx_metal::Result<()> {
        let mut model = self.model.try_borrow_mut().map_err(|_| mlx_err("the model is in use"))?;
        let mut by_path: HashMap<String, &mut Linear> = model.linears_mut().into_iter().collect();
        for (i, a) in pairs {
            let path = self.paths.get(i / 2).ok_or_else(|| mlx_err(format!("no parameter {i}")))?;
            let lora = by_path
                .get_mut(path)
                .and_then(|l| l.lora.as_mut())
                .ok_or_else(|| mlx_err(format!("{path} has no adapter")))?;
            if i % 2 == 0 {
                lora.a = a.clone();
            } else {
                lora.b = a.clone();
            }
        }
        Ok(())
    }

    fn set_all(&self, params: &[Array]) -> mlx_metal::Result<()> {
        self.set(params.iter().enumerate())
    }

    /// `(loss, ntoks)` of a batch with the adapter weights `params`.
    fn loss(
        &self,
        params: &[Array],
        batch: &Array,
        lengths: &Array,
        checkpoint: bool,
    ) -> mlx_metal::Result<Vec<Array>> {
        self.set_all(params)?;
        let (inputs, targets) = loss::shift(batch)?;
        let logits = if checkpoint {
            let mut h = {
                let m = self.model.try_borrow().map_err(|_| mlx_err("the model is in use"))?;
                m.embed(&inputs)?
            };
            let blocks = self.blocks.try_borrow().map_err(|_| mlx_err("the blocks are in use"))?;
            for (l, block) in blocks.iter().enumerate() {
                let mut args: Vec<&Array> = vec![&h];
                args.extend(self.layer_params[l].iter().map(|&i| &params[i]));
                let out = block.call(&args)?;
                h = out.into_iter().next().ok_or_else(|| mlx_err("a block returned nothing"))?;
            }
            let m = self.model.try_borrow().map_err(|_| mlx_err("the model is in use"))?;
            m.head(&h)?
        } else {
            let m = self.model.try_borrow().map_err(|_| mlx_err("the model is in use"))?;
            let mut caches = m.make_cache()?;
            m.forward(&inputs, &mut caches)?
        };
        let (l, n) = loss::masked_loss(&logits, &targets, lengths)?;
        Ok(vec![l, n])
    }

    /// Block `layer` as a checkpointed closure of `(h, its adapter weights...)`.
    fn block_closure(this: &Rc<Shared>, layer: usize) -> mlx_metal::Result<Closure> {
        let weak: Weak<Shared> = Rc::downgrade(this);
        let f = Closure::new(move |args: &[Array]| {
            let s = weak.upgrade().ok_or_else(|| mlx_err("the trainer is gone"))?;
            let (h, weights) = args.split_first().ok_or_else(|| mlx_err("a block needs its input"))?;
            let idx = &s.layer_params[layer];
            if weights.len() != idx.len() {
                return Err(mlx_err(format!("block {layer} takes {} weights, got {}", idx.len(), weights.len())));
            }
            s.set(idx.iter().copied().zip(weights))?;
            let m = s.model.try_borrow().map_err(|_| mlx_err("the model is in use"))?;
            let mut caches = m.make_cache()?;
            let cache = caches.get_mut(layer).ok_or_else(|| mlx_err(format!("no cache for block {layer}")))?;
            Ok(vec![m.forward_layer(layer, h, cache)?])
        })?;
        transforms::checkpoint(&f)
    }
}

/// Trains the adapter attached to a model, one batch at a time. The
/// model's adapter always holds the current weights between steps.
pub struct Trainer {
    shared: Rc<Shared>,
    vag: ValueAndGrad,
    params: Vec<Array>,
    optimizer: AdamW,
    settings: StepSettings,
    accumulated: Option<Vec<Array>>,
    micro: usize,
    last_lr: f32,
    config: AdapterConfig,
    training: std::cell::Cell<bool>,
}

impl Trainer {
    /// Attaches fresh adapters to `model` as `config` says (mlx-lm's
    /// initialisation from MLX's random state: seed it first) in `dtype`, and
    /// prepares to train them.
    ///
    /// # Errors
    ///
    /// Invalid settings, no layer matching the keys, or an MLX failure.
    pub fn new(
        mut model: Box<dyn LanguageModel>,
        mut config: AdapterConfig,
        dtype: Dtype,
        settings: StepSettings,
    ) -> TrainResult<Trainer> {
        lora::apply_lora(model.as_mut(), &mut config, dtype)?;
        Trainer::with_attached(model, config, settings)
    }

    /// Trains the adapters already attached to `model` (loaded with
    /// [`lora::load_adapter`], for example); `config` describes them.
    ///
    /// # Errors
    ///
    /// Invalid settings, a model with no adapter, or an MLX failure.
    pub fn with_attached(
        mut model: Box<dyn LanguageModel>,
        config: AdapterConfig,
        settings: StepSettings,
    ) -> TrainResult<Trainer> {
        settings.validate()?;
        lora::set_training(model.as_mut(), false);
        let mut paths = Vec::new();
        let mut params = Vec::new();
        let layers = model.num_layers();
        let mut layer_params = vec![Vec::new(); layers];
        for (path, linear) in model.linears_mut() {
            let Some(l) = &linear.lora else { continue };
            let k = paths.len();
            if let Some((layer, _)) = lora::split_layer_path(&path)
                && let Some(slot) = layer_params.get_mut(layer)
            {
                slot.extend([2 * k, 2 * k + 1]);
            }
            params.push(l.a.clone());
            params.push(l.b.clone());
            paths.push(path);
        }
        if paths.is_empty() {
            return Err(Error::config("lora", "the model has no adapter to train"));
        }
        let shared =
            Rc::new(Shared { model: RefCell::new(model), paths, layer_params, blocks: RefCell::new(Vec::new()) });
        if settings.grad_checkpoint {
            let blocks =
                (0..layers).map(|l| Shared::block_closure(&shared, l)).collect::<mlx_metal::Result<Vec<_>>>()?;
            *shared.blocks.borrow_mut() = blocks;
        }
        let n = params.len();
        let inner = Rc::clone(&shared);
        let checkpoint = settings.grad_checkpoint;
        let f = Closure::new(move |args: &[Array]| {
            if args.len() != n + 2 {
                return Err(mlx_err(format!("the loss takes {} inputs, got {}", n + 2, args.len())));
            }
            inner.loss(&args[..n], &args[n], &args[n + 1], checkpoint)
        })?;
        let argnums: Vec<i32> =
            (0..i32::try_from(n).map_err(|_| Error::config("lora", "too many adapters"))?).collect();
        let vag = ValueAndGrad::new(&f, &argnums)?;
        let optimizer = AdamW::new(settings.optimizer);
        let lr = settings.schedule.at(settings.learning_rate, 0);
        Ok(Trainer {
            shared,
            vag,
            params,
            optimizer,
            settings,
            accumulated: None,
            micro: 0,
            last_lr: lr,
            config,
            training: std::cell::Cell::new(false),
        })
    }

    /// The adapter's config (what [`Trainer::save_adapter`] writes).
    pub fn adapter_config(&self) -> &AdapterConfig {
        &self.config
    }

    /// The adapter weights by mlx-lm's names.
    pub fn weights(&self) -> TrainResult<BTreeMap<String, Array>> {
        let mut m = self.shared.model.try_borrow_mut().map_err(|_| mlx_err("the model is in use"))?;
        Ok(lora::lora_weights(m.as_mut()))
    }

    /// The number of trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.params.iter().map(Array::size).sum()
    }

    /// Updates done so far.
    pub fn updates(&self) -> usize {
        self.optimizer.step
    }

    /// Runs `f` with the model (with its adapter attached).
    pub fn with_model<T>(&self, f: impl FnOnce(&mut dyn LanguageModel) -> T) -> TrainResult<T> {
        let mut m = self.shared.model.try_borrow_mut().map_err(|_| mlx_err("the model is in use"))?;
        Ok(f(m.as_mut()))
    }

    /// Gives the model back, adapter attached, dropout off.
    ///
    /// # Errors
    ///
    /// When MLX still holds one of the trainer's closures (it should not).
    pub fn into_model(self) -> TrainResult<Box<dyn LanguageModel>> {
        let Trainer { shared, vag, .. } = self;
        drop(vag);
        shared.blocks.borrow_mut().clear();
        let s = Rc::try_unwrap(shared).map_err(|_| mlx_err("the model is still shared with a training closure"))?;
        let mut m = s.model.into_inner();
        lora::set_training(m.as_mut(), false);
        Ok(m)
    }

    /// Turns adapter dropout on (training) or off (evaluation, the default).
    pub fn set_training(&self, training: bool) -> TrainResult<()> {
        self.with_model(|m| lora::set_training(m, training))?;
        self.training.set(training);
        Ok(())
    }

    /// The loss and the gradients of the adapter weights on `batch`, without
    /// updating anything: `(loss, ntoks, gradients)` in parameter order
    /// (`A`, `B` per adapted layer, in layer order).
    pub fn gradients(&mut self, batch: &Batch) -> TrainResult<(f32, usize, Vec<Array>)> {
        let mut inputs: Vec<&Array> = self.params.iter().collect();
        inputs.push(&batch.tokens);
        inputs.push(&batch.lengths);
        let (values, grads) = self.vag.call(&inputs)?;
        self.shared.set_all(&self.params)?;
        let (loss, ntoks) = read_loss(&values)?;
        Ok((loss, ntoks, grads))
    }

    /// One training step on `batch`: gradients, accumulation, clipping and
    /// (on the last micro-batch) an AdamW update at the scheduled rate.
    pub fn step(&mut self, batch: &Batch) -> TrainResult<StepOutput> {
        let mut inputs: Vec<&Array> = self.params.iter().collect();
        inputs.push(&batch.tokens);
        inputs.push(&batch.lengths);
        let (values, grads) = self.vag.call(&inputs)?;
        let acc = match self.accumulated.take() {
            None => grads,
            Some(prev) => prev.iter().zip(&grads).map(|(a, b)| ops::add(a, b)).collect::<mlx_metal::Result<_>>()?,
        };
        self.micro += 1;
        let k = self.settings.grad_accumulation_steps;
        let updated = self.micro.is_multiple_of(k);
        if updated {
            let mut g = acc;
            if k > 1 {
                g = g.iter().map(|x| ops::divide_scalar(x, k as f64)).collect::<mlx_metal::Result<_>>()?;
            }
            if let Some(max) = self.settings.grad_clip {
                g = clip_grad_norm(&g, max)?.0;
            }
            let lr = self.settings.schedule.at(self.settings.learning_rate, self.optimizer.step);
            self.params = self.optimizer.update(&self.params, &g, lr)?;
            self.last_lr = lr;
        } else {
            self.accumulated = Some(acc);
        }
        self.shared.set_all(&self.params)?;
        let mut live: Vec<&Array> = self.params.iter().collect();
        live.extend(self.optimizer.state());
        live.extend(values.iter());
        if let Some(acc) = &self.accumulated {
            live.extend(acc.iter());
        }
        transforms::eval(&live)?;
        let (loss, ntoks) = read_loss(&values)?;
        if memory::cache_memory()? > self.settings.clear_cache_threshold {
            memory::clear_cache()?;
        }
        Ok(StepOutput { loss, ntoks, updated, learning_rate: self.last_lr })
    }

    /// The loss on `batch` with the current weights (no gradients).
    pub fn loss(&self, batch: &Batch) -> TrainResult<(f32, usize)> {
        let values = self.shared.loss(&self.params, &batch.tokens, &batch.lengths, false)?;
        self.shared.set_all(&self.params)?;
        let refs: Vec<&Array> = values.iter().collect();
        transforms::eval(&refs)?;
        read_loss(&values)
    }

    /// The token-weighted mean loss over the first `num_batches` batches of
    /// `dataset` (all of them when `None`), in length order, with dropout off
    /// (and back as it was afterwards).
    pub fn evaluate(
        &self,
        dataset: &Dataset,
        batch_size: usize,
        num_batches: Option<usize>,
        max_seq_length: usize,
    ) -> TrainResult<f32> {
        let was_training = self.training.get();
        self.set_training(false)?;
        let batches = dataset.batch_indices(batch_size)?;
        let take = num_batches.unwrap_or(batches.len()).min(batches.len());
        let (mut total, mut tokens) = (0f64, 0usize);
        for idx in &batches[..take] {
            let batch = dataset.batch(idx, max_seq_length)?;
            let (l, n) = self.loss(&batch)?;
            total += f64::from(l) * n as f64;
            tokens += n;
            if memory::cache_memory()? > self.settings.clear_cache_threshold {
                memory::clear_cache()?;
            }
        }
        self.set_training(was_training)?;
        if tokens == 0 {
            return Err(Error::data(&dataset.path, None, "the validation batches hold no target tokens"));
        }
        Ok((total / tokens as f64) as f32)
    }

    /// Writes `adapters.safetensors` and `adapter_config.json` into `dir`.
    pub fn save_adapter(&self, dir: &Path) -> TrainResult<()> {
        let config = self.config.clone();
        self.with_model(|m| lora::save_adapter(m, dir, &config))??;
        Ok(())
    }

    /// Writes the adapter weights alone to `file`, durably, recording
    /// `iteration` in its metadata ([`ITERATION_KEY`]).
    pub fn save_weights(&self, file: &Path, iteration: usize) -> TrainResult<()> {
        let meta = BTreeMap::from([(ITERATION_KEY.to_string(), iteration.to_string())]);
        self.with_model(|m| lora::save_adapter_weights(m, file, &meta))??;
        Ok(())
    }

    /// Writes the optimiser state to `file`, durably, recording `iteration`
    /// ([`ITERATION_KEY`]), the optimiser's step and `extra` metadata in it.
    pub fn save_state(&self, file: &Path, iteration: usize, extra: &BTreeMap<String, String>) -> TrainResult<()> {
        let names = self.param_names();
        let mut tensors: Vec<(String, &Array)> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            if let (Some(m), Some(v)) = (self.optimizer.m.get(i), self.optimizer.v.get(i)) {
                tensors.push((format!("m.{name}"), m));
                tensors.push((format!("v.{name}"), v));
            }
        }
        let mut meta = extra.clone();
        meta.insert(ITERATION_KEY.into(), iteration.to_string());
        meta.insert("optimizer_step".into(), self.optimizer.step.to_string());
        io::save_safetensors(file, tensors.iter().map(|(k, v)| (k.as_str(), *v)), &meta)?;
        Ok(())
    }

    /// Restores the adapter weights from `weights_file` and the optimiser
    /// state from `state_file`; returns the state's metadata. Both must come
    /// from the same save (the same [`ITERATION_KEY`]) and fit this trainer
    /// exactly: every adapter weight with its shape and element type and no
    /// other tensor, and the moments of every weight (once the optimiser has
    /// stepped) with the weight's shape. Nothing is changed on error.
    pub fn restore(&mut self, weights_file: &Path, state_file: &Path) -> TrainResult<BTreeMap<String, String>> {
        let weights = io::load_safetensors(weights_file)?;
        let state = io::load_safetensors(state_file)?;
        let iteration = |meta: &BTreeMap<String, String>, file: &Path| {
            meta.get(ITERATION_KEY).cloned().ok_or_else(|| {
                Error::data(file, None, format!("records no {ITERATION_KEY}, so it cannot be matched with its pair"))
            })
        };
        let (wi, si) = (iteration(&weights.metadata, weights_file)?, iteration(&state.metadata, state_file)?);
        if wi != si {
            return Err(Error::data(
                state_file,
                None,
                format!(
                    "is the optimiser state of iteration {si} but {} holds the weights of iteration {wi}: they do                      not belong together",
                    weights_file.display()
                ),
            ));
        }
        let names = self.param_names();
        let bad_weights = |m: String| Error::data(weights_file, None, m);
        let bad_state = |m: String| Error::data(state_file, None, m);
        let unknown: Vec<&String> = weights.tensors.keys().filter(|k| !names.contains(k)).collect();
        if !unknown.is_empty() {
            return Err(bad_weights(format!("holds tensors this adapter does not have: {unknown:?}")));
        }
        let step: usize = state
            .metadata
            .get("optimizer_step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad_state("no optimizer_step in the metadata".into()))?;
        let mut params = Vec::with_capacity(names.len());
        let (mut ms, mut vs) = (Vec::new(), Vec::new());
        for (name, current) in names.iter().zip(&self.params) {
            let p = weights.tensors.get(name).ok_or_else(|| bad_weights(format!("missing {name}")))?;
            if p.shape() != current.shape() || p.dtype() != current.dtype() {
                return Err(bad_weights(format!(
                    "{name} is {} {:?} but the adapter's is {} {:?}",
                    p.dtype().name(),
                    p.shape(),
                    current.dtype().name(),
                    current.shape()
                )));
            }
            params.push(p.clone());
            let (m, v) = (state.tensors.get(&format!("m.{name}")), state.tensors.get(&format!("v.{name}")));
            if let (Some(m), Some(v)) = (m, v) {
                for (which, a) in [("m", m), ("v", v)] {
                    if a.shape() != current.shape() {
                        return Err(bad_state(format!(
                            "{which}.{name} has shape {:?} but the weight's is {:?}",
                            a.shape(),
                            current.shape()
                        )));
                    }
                }
                ms.push(m.clone());
                vs.push(v.clone());
            }
        }
        if step > 0 && ms.len() != names.len() {
            return Err(bad_state(format!("the state holds moments for {} of {} weights", ms.len(), names.len())));
        }
        let known: BTreeSet<String> = names.iter().flat_map(|n| [format!("m.{n}"), format!("v.{n}")]).collect();
        let extra: Vec<&String> = state.tensors.keys().filter(|k| !known.contains(*k)).collect();
        if !extra.is_empty() {
            return Err(bad_state(format!("holds tensors this adapter does not have: {extra:?}")));
        }
        self.params = params;
        self.optimizer.m = ms;
        self.optimizer.v = vs;
        self.optimizer.step = step;
        self.accumulated = None;
        self.micro = 0;
        self.last_lr = self.settings.schedule.at(self.settings.learning_rate, step.saturating_sub(1));
        self.shared.set_all(&self.params)?;
        Ok(state.metadata)
    }

    /// Parameter names in parameter order (`path.lora_a`, `path.lora_b`).
    pub fn param_names(&self) -> Vec<String> {
        self.shared.paths.iter().flat_map(|p| [format!("{p}.lora_a"), format!("{p}.lora_b")]).collect()
    }

    /// The current adapter weights, in parameter order.
    pub fn params(&self) -> &[Array] {
        &self.params
    }
}

fn read_loss(values: &[Array]) -> TrainResult<(f32, usize)> {
    let [l, n, ..] = values else { return Err(mlx_err("the loss returned too few values").into()) };
    let loss = ops::astype(l, Dtype::Float32)?.item::<f32>()?;
    let ntoks = ops::astype(n, Dtype::Int64)?.item::<i64>()?;
    Ok((loss, usize::try_from(ntoks).unwrap_or(0)))
}
