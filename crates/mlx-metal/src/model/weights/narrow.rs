// SPDX-License-Identifier: EUPL-1.2
//! Matrices kept as the checkpoint stores them while the model computes in
//! float32 on a CPU (see [`crate::model::dtype::narrow_tables`]): the
//! embedding table and the output head in place of their float32 copies,
//! and beside each linear layer's float32 copy a twin for decode steps.

use mlx::{Dtype, Result};

use super::{LinearWeight, WeightPath, Weights, check_shape};
use crate::nn::{Embedding, Linear};

impl Weights {
    /// Keeps a dense 16-bit or a quantised embedding table and output head
    /// ([`WeightPath::embedding`], [`WeightPath::head`]) as stored while the
    /// rest is cast (or dequantised), their rows and products coming out in
    /// `compute` (`None`: they are cast like every other tensor). See
    /// [`crate::model::dtype::narrow_tables`].
    pub fn set_narrow_tables(&mut self, compute: Option<Dtype>) {
        self.narrow_tables = compute;
    }

    /// Gives every linear layer built from now on ([`WeightPath::linear`]) a
    /// twin of its matrix as stored — 16-bit, or quantised with float32
    /// scales — beside the float32 copy it computes with: up to
    /// [`crate::nn::NARROW_ROWS`] float32 rows (a decode step) read the twin
    /// through our kernels, reading half (16-bit) to an eighth (4-bit) of
    /// the bytes, while prefill keeps BLAS on the float32 copy. The twins
    /// take that much memory more. See [`crate::model::dtype::narrow_layers`].
    pub fn set_narrow_layers(&mut self, on: bool) {
        self.narrow_layers = on;
    }
}

impl WeightPath<'_> {
    /// An embedding table `[vocab, dim]`, dense or quantised (a dense 16-bit
    /// or a quantised one kept as stored when [`Weights::set_narrow_tables`]
    /// asks).
    pub fn embedding(&self, vocab: i32, dim: i32) -> Result<Embedding> {
        match self.narrow_table(vocab, dim)? {
            Some((table, compute)) => Ok(Embedding::new(table).computing_in(compute)),
            None => Ok(Embedding::new(self.weights.finish_matrix(self.matrix(vocab, dim)?)?)),
        }
    }

    /// A model's output head `[vocab, dim]` (no bias): [`WeightPath::linear`],
    /// but a dense 16-bit or a quantised head stays as stored when
    /// [`Weights::set_narrow_tables`] asks (its products come out in the
    /// compute type, [`Linear::forward`]).
    pub fn head(&self, vocab: i32, dim: i32) -> Result<Linear> {
        match self.narrow_table(vocab, dim)? {
            Some((head, _)) => Ok(Linear::new(head, None)),
            None => self.linear(vocab, dim, false),
        }
    }

    /// The matrix `[out, inp]` as stored (a quantised one with its scales
    /// cast, never dequantised; a dense one only when 16-bit), and the compute
    /// type, when the weights keep tables narrow and this one qualifies.
    fn narrow_table(&self, out: i32, inp: i32) -> Result<Option<(LinearWeight, Dtype)>> {
        let Some(compute) = self.weights.narrow_tables else { return Ok(None) };
        if self.contains("scales") {
            return Ok(Some((self.matrix(out, inp)?, compute)));
        }
        let name = self.name("weight");
        let Some((_, stored)) = self.weights.resolve(&name) else { return Ok(None) };
        if !matches!(stored.dtype(), Dtype::Bfloat16 | Dtype::Float16) {
            return Ok(None);
        }
        let a = self.weights.get_as_stored(&name)?;
        check_shape(self.weights.dir(), &name, &a, &[out, inp])?;
        Ok(Some((LinearWeight::Dense(a), compute)))
    }

    /// The twin of a linear layer's matrix `stored` (as looked up: scales
    /// cast, not dequantised) when [`Weights::set_narrow_layers`] asked and
    /// the layer's float32 copy is not it already.
    pub(super) fn narrow_twin(&self, stored: &LinearWeight) -> Result<Option<LinearWeight>> {
        if !self.weights.narrow_layers {
            return Ok(None);
        }
        match stored {
            LinearWeight::Quantized(q) if self.weights.dequantise => Ok(Some(LinearWeight::Quantized(q.clone()))),
            LinearWeight::Quantized(_) => Ok(None),
            LinearWeight::Dense(_) => {
                let name = self.name("weight");
                let raw = self.weights.get_as_stored(&name)?;
                let narrow = matches!(raw.dtype(), Dtype::Bfloat16 | Dtype::Float16);
                Ok(narrow.then_some(LinearWeight::Dense(raw)))
            }
        }
    }
}
