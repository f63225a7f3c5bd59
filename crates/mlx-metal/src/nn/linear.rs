// SPDX-License-Identifier: EUPL-1.2
//! Linear layers and embedding tables, dense or affine-quantised, and
//! [`FusedLinear`], several linear layers that read one input run as one
//! matmul.

use mlx::fast::Rotation;
use mlx::ops::{self, Quantized};
use mlx::{Array, Dtype, Error, Result};

use super::lora::LoraLayer;
use super::parallel::{Parallel, VocabShard};

/// The weights of a linear layer.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// A dense `[out, in]` matrix.
    Dense(Array),
    /// An affine-quantised `[out, in]` matrix.
    Quantized(Quantized),
}

impl LinearWeight {
    /// The matrix's `(rows, columns)`: `(out, in)` of a linear layer,
    /// `(vocab, dim)` of an embedding table (a quantised matrix's columns
    /// counted before packing).
    pub fn features(&self) -> Result<(i32, i32)> {
        match self {
            LinearWeight::Dense(w) => Ok((w.dim(0)?, w.dim(1)?)),
            LinearWeight::Quantized(q) => Ok((q.scales.dim(0)?, q.scales.dim(1)? * q.group_size)),
        }
    }
}

/// The most float32 rows a layer's [`Linear::narrow`] twin serves: our
/// kernels read the matrix once per row of the matrix and dot every input row
/// with it, so their arithmetic grows with the rows while BLAS on the float32
/// copy reads twice (16-bit) or more the bytes once; past a few rows BLAS wins
/// (docs/benchmarks.md).
pub const NARROW_ROWS: usize = 4;

/// `y = x Wᵀ + b`, plus a LoRA update when an adapter is attached
/// (see [`crate::lora`]), then — in a tensor-parallel model — the collective
/// that ends the layer ([`Parallel`]).
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weights.
    pub weight: LinearWeight,
    /// The optional bias, `[out]`.
    pub bias: Option<Array>,
    /// The optional low-rank adapter: `y += scale · (dropout(x) A) B`.
    pub lora: Option<LoraLayer>,
    /// What follows the matmul when the layer is split over ranks.
    pub parallel: Parallel,
    /// The same matrix as the checkpoint stores it (16-bit, or quantised with
    /// float32 scales) beside a float32 `weight`, for up to [`NARROW_ROWS`]
    /// float32 rows: a decode step reads it through our kernels, fewer bytes
    /// for the same values. Whoever changes `weight` must clear it.
    pub narrow: Option<LinearWeight>,
}

impl Linear {
    /// A dense layer; `weight` is `[out, in]`.
    pub fn dense(weight: Array, bias: Option<Array>) -> Result<Linear> {
        if weight.ndim() != 2 {
            return Err(Error::invalid(
                "linear",
                format!("weight must be 2-D [out, in], got shape {:?}", weight.shape()),
            ));
        }
        Ok(Linear::new(LinearWeight::Dense(weight), bias))
    }

    /// A quantised layer.
    pub fn quantized(q: Quantized, bias: Option<Array>) -> Linear {
        Linear::new(LinearWeight::Quantized(q), bias)
    }

    /// A layer of `weight` and `bias`, with no adapter, on one device.
    pub fn new(weight: LinearWeight, bias: Option<Array>) -> Linear {
        Linear { weight, bias, lora: None, parallel: Parallel::None, narrow: None }
    }

    /// Applies the layer to `x: [..., in]` (as MLX's `nn.Linear` does: `addmm`
    /// when there is a bias), adding the LoRA update when there is one, and
    /// ending with the layer's collective in a tensor-parallel model.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let y = self.forward_base(x)?;
        let y = match &self.lora {
            Some(lora) => lora.apply(x, &y)?,
            None => y,
        };
        self.parallel.finish(y)
    }

    /// The layer's own matmul: no LoRA update, no collective. Float32 inputs
    /// to a dense 16-bit matrix (a head kept narrow:
    /// [`crate::model::dtype::narrow_tables`]) run [`ops::widen_matmul`], which
    /// reads the matrix as it is and computes in float32; up to 32 float32
    /// rows times a quantised matrix with float32 scales (a quantised head
    /// kept, or `float32` with `quantised = keep`) run
    /// [`ops::widen_quantized_matmul`], our CPU kernel, where it applies.
    pub fn forward_base(&self, x: &Array) -> Result<Array> {
        let weight = match &self.narrow {
            Some(narrow) if x.dtype() == Dtype::Float32 && rows(x) <= NARROW_ROWS => narrow,
            _ => &self.weight,
        };
        match (weight, self.bias.as_ref()) {
            (LinearWeight::Dense(w), bias) if widens(x, w) => plus_bias(ops::widen_matmul(x, w)?, bias),
            (LinearWeight::Quantized(q), bias) if widens_quantised(x, q) => {
                plus_bias(ops::widen_quantized_matmul(x, q)?, bias)
            }
            (LinearWeight::Dense(w), None) => ops::matmul(x, &ops::transpose(w, &[1, 0])?),
            (LinearWeight::Dense(w), Some(b)) => ops::addmm(b, x, &ops::transpose(w, &[1, 0])?, 1.0, 1.0),
            (LinearWeight::Quantized(q), bias) => plus_bias(ops::quantized_matmul(x, q, true)?, bias),
        }
    }

    /// `(out, in)` features.
    pub fn features(&self) -> Result<(i32, i32)> {
        self.weight.features()
    }

    /// The weights as a dense matrix (dequantised if needed).
    pub fn dense_weight(&self, dtype: Option<Dtype>) -> Result<Array> {
        match &self.weight {
            LinearWeight::Dense(w) => match dtype {
                Some(d) if d != w.dtype() => ops::astype(w, d),
                _ => Ok(w.clone()),
            },
            LinearWeight::Quantized(q) => ops::dequantize(q, dtype),
        }
    }
}

/// Whether two matrices can be concatenated into one: both dense in one
/// dtype, or both quantised alike (bits, group size, scale dtype, biases).
fn alike(a: &LinearWeight, b: &LinearWeight) -> bool {
    match (a, b) {
        (LinearWeight::Dense(a), LinearWeight::Dense(b)) => a.dtype() == b.dtype(),
        (LinearWeight::Quantized(a), LinearWeight::Quantized(b)) => {
            a.bits == b.bits
                && a.group_size == b.group_size
                && a.scales.dtype() == b.scales.dtype()
                && a.biases.is_some() == b.biases.is_some()
        }
        _ => false,
    }
}

/// The matrices concatenated along their rows (all [`alike`]; `None` if not).
fn cat_weights(ws: &[&LinearWeight]) -> Result<Option<LinearWeight>> {
    let Some(first) = ws.first() else { return Ok(None) };
    if !ws.iter().all(|w| alike(w, first)) {
        return Ok(None);
    }
    let cat = |get: &dyn Fn(&LinearWeight) -> Option<&Array>| -> Result<Option<Array>> {
        match ws.iter().map(|w| get(w)).collect::<Option<Vec<&Array>>>() {
            Some(arrays) => Ok(Some(ops::concatenate(&arrays, 0)?)),
            None => Ok(None),
        }
    };
    let quant = |get: fn(&Quantized) -> Option<&Array>| {
        cat(&move |w| match w {
            LinearWeight::Quantized(q) => get(q),
            LinearWeight::Dense(_) => None,
        })
    };
    Ok(match first {
        LinearWeight::Dense(_) => cat(&|w| match w {
            LinearWeight::Dense(a) => Some(a),
            LinearWeight::Quantized(_) => None,
        })?
        .map(LinearWeight::Dense),
        LinearWeight::Quantized(q0) => match (quant(|q| Some(&q.weight))?, quant(|q| Some(&q.scales))?) {
            (Some(weight), Some(scales)) => {
                let biases = quant(|q| q.biases.as_ref())?;
                Some(LinearWeight::Quantized(Quantized {
                    weight,
                    scales,
                    biases,
                    group_size: q0.group_size,
                    bits: q0.bits,
                }))
            }
            _ => None,
        },
    })
}

/// Rows `[start, end)` of a matrix (a view).
fn weight_rows(w: &LinearWeight, start: i32, end: i32) -> Result<LinearWeight> {
    let rows = |a: &Array| ops::slice_axis(a, 0, start, end);
    Ok(match w {
        LinearWeight::Dense(a) => LinearWeight::Dense(rows(a)?),
        LinearWeight::Quantized(q) => LinearWeight::Quantized(Quantized {
            weight: rows(&q.weight)?,
            scales: rows(&q.scales)?,
            biases: q.biases.as_ref().map(&rows).transpose()?,
            group_size: q.group_size,
            bits: q.bits,
        }),
    })
}

/// `y + b` when there is a bias.
fn plus_bias(y: Array, bias: Option<&Array>) -> Result<Array> {
    match bias {
        Some(b) => ops::add(&y, b),
        None => Ok(y),
    }
}

/// The rows of `x: [..., in]`.
fn rows(x: &Array) -> usize {
    let shape = x.shape();
    match shape.split_last() {
        Some((&last, lead)) if last > 0 => lead.iter().map(|&d| d.max(0) as usize).product(),
        _ => 0,
    }
}

/// Whether `x Wᵀ` is float32 rows times a 16-bit matrix.
fn widens(x: &Array, w: &Array) -> bool {
    x.dtype() == Dtype::Float32 && matches!(w.dtype(), Dtype::Bfloat16 | Dtype::Float16)
}

/// Whether `x Wᵀ` for a quantised `W` runs our CPU kernel: float32 rows and
/// scales (the model computes in float32), and the kernel takes the shapes.
fn widens_quantised(x: &Array, q: &Quantized) -> bool {
    x.dtype() == Dtype::Float32
        && q.scales.dtype() == Dtype::Float32
        && ops::widen_quantized_matmul_applies(x, q).unwrap_or(false)
}

/// Several linear layers that read the same input, run as one matmul: the
/// attention's q, k and v projections, or an MLP's gate and up projections.
///
/// A decode step (of one sequence or a batch's few) is a chain of small
/// kernels whose launch cost exceeds their work; one matmul instead of three
/// (or two) removes those launches. The weights are stored once: [`FusedLinear::fuse`]
/// concatenates the parts' weights and then makes each part's weights a view
/// of its rows of the fused matrix, so the parts keep working on their own
/// (training, adapters, batches) with no extra memory.
#[derive(Debug, Clone)]
pub struct FusedLinear {
    fused: Linear,
    /// Where each part's outputs end along the fused output axis.
    ends: Vec<i32>,
}

impl FusedLinear {
    /// Fuses `parts` when they can run as one matmul: same input width, all
    /// dense in one dtype or all quantised alike (bits, group size, scale
    /// dtype), biases on all or none, no LoRA adapter and no collective after
    /// them (column-parallel parts have none). Returns `None`
    /// otherwise, leaving the parts as they were.
    ///
    /// Nothing is computed here: the concatenation runs (once) when the fused
    /// layer or one of the parts is first used, so loading stays lazy.
    ///
    /// # Errors
    ///
    /// When MLX rejects the concatenation (shapes that do not fit).
    pub fn fuse(parts: &mut [&mut Linear]) -> Result<Option<FusedLinear>> {
        if parts.len() < 2 || !Self::compatible(parts)? {
            return Ok(None);
        }
        let mut ends = Vec::with_capacity(parts.len());
        let mut end = 0;
        for p in parts.iter() {
            end += p.features()?.0;
            ends.push(end);
        }
        let bias = match parts.iter().map(|p| p.bias.as_ref()).collect::<Option<Vec<&Array>>>() {
            Some(biases) => Some(ops::concatenate(&biases, 0)?),
            None => None,
        };
        let weights: Vec<&LinearWeight> = parts.iter().map(|p| &p.weight).collect();
        let Some(weight) = cat_weights(&weights)? else { return Ok(None) };
        let narrows: Option<Vec<&LinearWeight>> = parts.iter().map(|p| p.narrow.as_ref()).collect();
        let narrow = match narrows {
            Some(n) => cat_weights(&n)?,
            None => None,
        };
        let mut fused = Linear::new(weight, bias);
        fused.narrow = narrow;
        // Each part now views its rows of the fused weights.
        let mut start = 0;
        for (p, &end) in parts.iter_mut().zip(&ends) {
            p.weight = weight_rows(&fused.weight, start, end)?;
            p.narrow = fused.narrow.as_ref().map(|n| weight_rows(n, start, end)).transpose()?;
            if let Some(b) = &fused.bias {
                p.bias = Some(ops::slice_axis(b, 0, start, end)?);
            }
            start = end;
        }
        Ok(Some(FusedLinear { fused, ends }))
    }

    fn compatible(parts: &[&mut Linear]) -> Result<bool> {
        let first = &parts[0];
        let input = first.features()?.1;
        for p in parts.iter() {
            if p.lora.is_some()
                || !p.parallel.is_none()
                || p.features()?.1 != input
                || p.bias.is_some() != first.bias.is_some()
            {
                return Ok(false);
            }
            if let (Some(a), Some(b)) = (&p.bias, &first.bias)
                && a.dtype() != b.dtype()
            {
                return Ok(false);
            }
            let narrow_alike = match (&p.narrow, &first.narrow) {
                (Some(a), Some(b)) => alike(a, b),
                (None, None) => true,
                _ => false,
            };
            if !(alike(&p.weight, &first.weight) && narrow_alike) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Runs the fused matmul on `x: [..., in]` and returns each part's
    /// output `[..., out_i]`, in the order the parts were given.
    pub fn forward(&self, x: &Array) -> Result<Vec<Array>> {
        self.split(&self.forward_joined(x)?)
    }

    /// Runs the fused matmul on `x: [..., in]` and returns its output
    /// `[..., Σ out_i]` whole, the parts' outputs side by side in their order.
    pub fn forward_joined(&self, x: &Array) -> Result<Array> {
        self.fused.forward_base(x)
    }

    /// `h = x + rms_norm(r, r_weight)` (`x + r` without `r_weight`) and the
    /// fused matmul of `rms_norm(h, h_weight)` (both norms with `eps`), with
    /// the norm and the matmul in one kernel where that applies
    /// ([`mlx::fast::fused_norm_add_quantized_matmul`]: CUDA, one row, a 4-bit
    /// matrix without bias), and `rope`'s rotation of the output's first heads
    /// in it too when given and it applies: `Some((h, joined output))`;
    /// `None` elsewhere, for the caller to norm and then call
    /// [`FusedLinear::forward_joined`].
    pub fn forward_joined_after_norm(
        &self,
        x: &Array,
        r: &Array,
        (r_weight, h_weight, eps): (Option<&Array>, &Array, f32),
        rope: Option<(i32, i32, &Rotation<'_>)>,
    ) -> Result<Option<(Array, Array)>> {
        match (&self.fused.weight, &self.fused.bias, &self.fused.lora, &self.fused.parallel) {
            (LinearWeight::Quantized(q), None, None, Parallel::None) => {
                mlx::fast::fused_norm_add_quantized_matmul(x, r, r_weight, h_weight, eps, q, rope)
            }
            _ => Ok(None),
        }
    }

    /// Where each part's outputs end along the last axis of
    /// [`FusedLinear::forward_joined`]'s output.
    pub fn ends(&self) -> &[i32] {
        &self.ends
    }

    /// Splits [`FusedLinear::forward_joined`]'s output `y` into the parts' outputs.
    pub fn split(&self, y: &Array) -> Result<Vec<Array>> {
        let last = y.ndim() as i32 - 1;
        let mut out = Vec::with_capacity(self.ends.len());
        let mut start = 0;
        for &end in &self.ends {
            out.push(ops::slice_axis(y, last, start, end)?);
            start = end;
        }
        Ok(out)
    }
}

/// A token embedding table `[vocab, dim]`, dense or quantised; in a
/// tensor-parallel model, this rank's rows of it ([`VocabShard`]).
#[derive(Debug, Clone)]
pub struct Embedding {
    /// The table (this rank's rows when `vocab` is set).
    pub weight: LinearWeight,
    /// The rows this rank holds of a vocabulary-parallel table.
    pub vocab: Option<VocabShard>,
    /// The type looked-up rows come out in when it is not the table's (a
    /// 16-bit table kept narrow in a float32 model).
    pub compute: Option<Dtype>,
}

impl Embedding {
    /// A whole table.
    pub fn new(weight: LinearWeight) -> Embedding {
        Embedding { weight, vocab: None, compute: None }
    }

    /// The table, its rows coming out in `dtype` (widened from its own type).
    pub fn computing_in(self, dtype: Dtype) -> Embedding {
        Embedding { compute: Some(dtype), ..self }
    }

    /// Looks up `ids` (any int shape) and returns `[..., dim]`. A quantised
    /// table dequantises only the rows it gathers. A vocabulary-parallel table
    /// looks up its own rows and sums over the ranks.
    pub fn forward(&self, ids: &Array) -> Result<Array> {
        let rows = match &self.vocab {
            Some(shard) => shard.embed(ids, |local| self.lookup(local))?,
            None => self.lookup(ids)?,
        };
        match self.compute {
            Some(d) if d != rows.dtype() => ops::astype(&rows, d),
            _ => Ok(rows),
        }
    }

    fn lookup(&self, ids: &Array) -> Result<Array> {
        match &self.weight {
            LinearWeight::Dense(w) => ops::take(w, ids, 0),
            LinearWeight::Quantized(q) => {
                let rows = Quantized {
                    weight: ops::take(&q.weight, ids, 0)?,
                    scales: ops::take(&q.scales, ids, 0)?,
                    biases: q.biases.as_ref().map(|b| ops::take(b, ids, 0)).transpose()?,
                    group_size: q.group_size,
                    bits: q.bits,
                };
                ops::dequantize(&rows, self.compute)
            }
        }
    }

    /// `(group_size, bits)` when the table is quantised.
    pub fn quantisation(&self) -> Option<(i32, i32)> {
        match &self.weight {
            LinearWeight::Dense(_) => None,
            LinearWeight::Quantized(q) => Some((q.group_size, q.bits)),
        }
    }

    /// Uses the table as the output projection (tied embeddings): `x Eᵀ`
    /// (gathered over the ranks when the table is vocabulary-parallel).
    pub fn as_linear(&self, x: &Array) -> Result<Array> {
        let logits = Linear::new(self.weight.clone(), None).forward(x)?;
        match &self.vocab {
            Some(shard) => shard.gather(&logits),
            None => Ok(logits),
        }
    }
}
