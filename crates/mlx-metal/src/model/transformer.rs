// SPDX-License-Identifier: EUPL-1.2
//! The model around the blocks, written once for every architecture here:
//! the token embedding, the decoder blocks, the final norm and the output
//! head (the embedding table itself when the weights are tied), as the
//! `Model`/`…Model` pair of each of mlx-lm's model files has it. An
//! architecture supplies its block ([`DecoderBlock`]) and its load function.

use mlx::{Array, Result, ops};

use super::layers::{Attention, Hidden, Mlp, RmsNorm};
use super::{BlockParts, Description, LanguageModel, Parts, check_caches, layer_index};
use crate::cache::{KvCache, LayerCache, Mask, RotatingKvCache};
use crate::nn::{Embedding, Linear};

/// One decoder block of an architecture.
pub trait DecoderBlock {
    /// Runs the block on hidden states `x: [B, L, hidden]` with its cache.
    fn forward(&self, x: &Array, mask: &Mask, cache: &mut LayerCache) -> Result<Array> {
        self.forward_chained(Hidden::Ready(x.clone()), mask, cache)?.into_sum()
    }

    /// [`DecoderBlock::forward`] as one link of the stack: takes the states
    /// as the block before left them and leaves its own output the same way
    /// (the last residual sum pending, for the next block or the model's final
    /// norm to make with its norm in one kernel). The same values as
    /// [`DecoderBlock::forward`] once summed.
    fn forward_chained<'a>(&'a self, x: Hidden<'a>, mask: &Mask, cache: &mut LayerCache) -> Result<Hidden<'a>>;

    /// The norm the block applies to its input.
    fn input_norm(&self) -> &RmsNorm;

    /// The keys the block's attention sees: `Some(window)` for a sliding
    /// window, `None` for all of them.
    fn window(&self) -> Option<i32>;

    /// The block's attention and MLP.
    fn attention_and_mlp(&mut self) -> (&mut Attention, &mut Mlp);
}

/// A decoder-only language model of blocks `B`.
pub struct Transformer<B> {
    /// The token embedding.
    pub embed_tokens: Embedding,
    /// Multiplies the embeddings (Gemma's √hidden), when set.
    pub embed_scale: Option<f64>,
    /// The blocks.
    pub layers: Vec<B>,
    /// The final norm.
    pub norm: RmsNorm,
    /// The output head; the embedding table when `None` (tied weights).
    pub lm_head: Option<Linear>,
    /// What the model is.
    pub desc: Description,
}

impl<B: DecoderBlock> LanguageModel for Transformer<B> {
    fn forward(&self, inputs: &Array, caches: &mut [LayerCache]) -> Result<Array> {
        check_caches(caches, self.layers.len())?;
        let h = self.embed(inputs)?;
        let n = h.dim(1)?;
        // One mask per kind of attention, made from the first cache of its kind.
        let mut masks: Vec<(Option<i32>, Mask)> = Vec::new();
        for (layer, cache) in self.layers.iter().zip(caches.iter()) {
            if !masks.iter().any(|(w, _)| *w == layer.window()) {
                masks.push((layer.window(), cache.make_mask(n, layer.window())?));
            }
        }
        // Each block leaves its last residual sum to the next block (or the final norm), which
        // makes it with its norm (and, on CUDA, its first projection) in one kernel.
        let mut hidden = Hidden::Ready(h);
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            let mask = masks.iter().find(|(w, _)| *w == layer.window()).map_or(&Mask::None, |(_, m)| m);
            hidden = layer.forward_chained(hidden, mask, cache)?;
        }
        self.logits(&hidden.sum_and_norm(&self.norm)?.1)
    }

    fn make_cache(&self) -> Result<Vec<LayerCache>> {
        self.layers
            .iter()
            .map(|l| match l.window() {
                Some(w) => Ok(LayerCache::Rotating(RotatingKvCache::new(w)?)),
                None => Ok(LayerCache::Standard(KvCache::new())),
            })
            .collect()
    }

    fn description(&self) -> &Description {
        &self.desc
    }

    fn parts_mut(&mut self) -> Parts<'_> {
        let layers = self.layers.iter_mut().map(|b| {
            let (self_attn, mlp) = b.attention_and_mlp();
            BlockParts { self_attn, mlp }
        });
        Parts { layers: layers.collect(), embed_tokens: &mut self.embed_tokens, lm_head: self.lm_head.as_mut() }
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn embed(&self, inputs: &Array) -> Result<Array> {
        let h = self.embed_tokens.forward(inputs)?;
        match self.embed_scale {
            Some(scale) => ops::multiply(&h, &Array::scalar_as(scale, h.dtype())?),
            None => Ok(h),
        }
    }

    fn runs_block_by_block(&self) -> bool {
        true
    }

    fn forward_layer(&self, layer: usize, h: &Array, cache: &mut LayerCache) -> Result<Array> {
        layer_index("forward_layer", layer, self.layers.len())?;
        let block = &self.layers[layer];
        let mask = cache.make_mask(h.dim(1)?, block.window())?;
        block.forward(h, &mask, cache)
    }

    fn head(&self, h: &Array) -> Result<Array> {
        self.logits(&self.norm.forward(h)?)
    }
}

impl<B> Transformer<B> {
    /// The output head on final-normed hidden states.
    fn logits(&self, normed: &Array) -> Result<Array> {
        match &self.lm_head {
            Some(head) => head.forward(normed),
            None => self.embed_tokens.as_linear(normed),
        }
    }
}
