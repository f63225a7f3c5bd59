// SPDX-License-Identifier: EUPL-1.2
//! What a tensor-parallel model is told: its [`Shard`] of the ranks, the
//! [`TensorParallel`] group its row-parallel layers sum over, how it holds the
//! vocabulary ([`VocabLayout`]), and the load options that ask for it
//! ([`TensorParallelOptions`]).

use std::rc::Rc;
use std::str::FromStr;
use std::time::Duration;

use mlx::distributed::{self, Backend, DEFAULT_INIT_TIMEOUT, Group, InitOptions};
use mlx::{Array, Error, Result};

/// Which slice of a tensor-parallel model this process holds: rank `rank` of
/// `size` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's rank, `0..size`.
    pub rank: i32,
    /// The number of ranks.
    pub size: i32,
}

impl Shard {
    /// A checked shard.
    pub fn new(rank: i32, size: i32) -> Result<Shard> {
        if size < 1 || rank < 0 || rank >= size {
            return Err(Error::invalid("shard", format!("rank {rank} is not in 0..{size}")));
        }
        Ok(Shard { rank, size })
    }

    /// The shard of `group`.
    pub fn of(group: &Group) -> Shard {
        Shard { rank: group.rank(), size: group.size() }
    }

    /// This rank's part `(start, len)` of `n` items: `[rank·n/size,
    /// (rank+1)·n/size)`, so the parts differ by at most one item when `n`
    /// does not divide. `what` names the dimension in the error when `n` is
    /// smaller than the number of ranks (some rank would get nothing).
    pub fn range(&self, n: i32, what: &str) -> Result<(i32, i32)> {
        if n < self.size {
            return Err(Error::invalid(
                "shard",
                format!("{what} = {n} cannot be split over {} tensor-parallel ranks", self.size),
            ));
        }
        let bound = |r: i32| (i64::from(r) * i64::from(n) / i64::from(self.size)) as i32;
        let start = bound(self.rank);
        Ok((start, bound(self.rank + 1) - start))
    }
}

/// How a tensor-parallel model holds its token embedding and output head
/// (the `tp_vocab` backend option; see `docs/distributed.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum VocabLayout {
    /// Vocabulary-parallel: each rank holds a contiguous run of the
    /// vocabulary's rows of the embedding and the head. A lookup costs one
    /// `all_sum` of the embeddings, the head one `all_gather` of the logits;
    /// a rank holds about `1/N` of the tables.
    #[default]
    Sharded,
    /// Every rank holds the whole embedding and head (no extra collectives,
    /// the tables' full memory on every rank).
    Replicated,
}

impl VocabLayout {
    /// The option value: `sharded` or `replicated`.
    pub fn name(self) -> &'static str {
        match self {
            VocabLayout::Sharded => "sharded",
            VocabLayout::Replicated => "replicated",
        }
    }
}

mlx::display_by_name!(VocabLayout);

impl FromStr for VocabLayout {
    type Err = Error;

    fn from_str(s: &str) -> Result<VocabLayout> {
        [VocabLayout::Sharded, VocabLayout::Replicated].into_iter().find(|v| v.name() == s).ok_or_else(|| {
            Error::invalid("tp_vocab", format!("unknown vocabulary layout {s:?}; expected sharded or replicated"))
        })
    }
}

/// What a tensor-parallel model needs at load and run time: its shard, the
/// group its blocks sum over, and how it holds the vocabulary's tables.
/// Cheap to clone (the group is shared); like [`Group`], it stays on the
/// thread that made it.
#[derive(Debug, Clone)]
pub struct TensorParallel {
    shard: Shard,
    group: Rc<Group>,
    vocab: VocabLayout,
}

impl TensorParallel {
    /// Tensor parallelism over every rank of `group`, with the vocabulary
    /// sharded ([`VocabLayout::Sharded`]).
    pub fn new(group: Group) -> TensorParallel {
        TensorParallel { shard: Shard::of(&group), group: Rc::new(group), vocab: VocabLayout::default() }
    }

    /// The same, holding the embedding and head as `layout` says.
    pub fn with_vocab_layout(mut self, layout: VocabLayout) -> TensorParallel {
        self.vocab = layout;
        self
    }

    /// How the embedding and head are held.
    pub fn vocab_layout(&self) -> VocabLayout {
        self.vocab
    }

    /// This process's shard.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The group.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// The group, shared (what a sharded layer's collective holds).
    pub fn group_rc(&self) -> Rc<Group> {
        Rc::clone(&self.group)
    }

    /// `x` summed over the ranks (the end of a row-parallel layer).
    pub fn all_sum(&self, x: &Array) -> Result<Array> {
        if self.shard.size == 1 { Ok(x.clone()) } else { distributed::all_sum(x, &self.group) }
    }

    /// Every rank's `x` concatenated along axis 0, in rank order.
    pub fn all_gather(&self, x: &Array) -> Result<Array> {
        if self.shard.size == 1 { Ok(x.clone()) } else { distributed::all_gather(x, &self.group) }
    }
}

/// Tensor parallelism asked for through [`inference_core::LoadSettings`]'s
/// backend options, read by [`crate::MetalModel::load`]:
///
/// - `tensor_parallel`: the number of ranks (the job must have exactly that many);
/// - `distributed_backend`: `any` (default), `ring`, `mpi`, `nccl` or `jaccl`;
/// - `distributed_timeout_s`: how long to wait for every rank to join (default 60);
/// - `tp_vocab`: `sharded` (default) or `replicated` embedding and head ([`VocabLayout`]);
/// - `tp_step_timeout_s`: how long rank 0 lets one job or scheduler step take before it ends
///   the job (a rank that hangs; default [`DEFAULT_STEP_TIMEOUT`], 300 s).
///
/// Every rank loads the same model with the same options and must then make
/// the same calls in the same order (each block sums over the ranks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorParallelOptions {
    /// The number of ranks.
    pub ranks: i32,
    /// How to join the group.
    pub init: InitOptions,
    /// How the embedding and head are held.
    pub vocab: VocabLayout,
    /// How long rank 0 lets one job or step take (its collectives wait on every rank) before
    /// it ends the job, naming the ranks that did not take part.
    pub step_timeout: Duration,
}

/// The default of [`TensorParallelOptions::step_timeout`].
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// A positive number of seconds, from the backend option `name`.
fn seconds(name: &str, value: &str) -> Result<Duration> {
    value
        .parse::<f64>()
        .ok()
        .filter(|t| t.is_finite() && *t > 0.0 && *t < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| Error::invalid("load_settings", format!("{name} = {value:?} is not a positive number")))
}

impl TensorParallelOptions {
    /// The options, or `None` when `tensor_parallel` is absent or 1.
    ///
    /// # Errors
    /// A value that is not a positive number or not a known backend.
    pub fn from_backend_options(
        options: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<TensorParallelOptions>> {
        const OP: &str = "load_settings";
        let Some(n) = options.get("tensor_parallel") else { return Ok(None) };
        let ranks: i32 =
            n.parse().ok().filter(|&r| r >= 1).ok_or_else(|| {
                Error::invalid(OP, format!("tensor_parallel = {n:?} is not a positive number of ranks"))
            })?;
        if ranks == 1 {
            return Ok(None);
        }
        let backend = match options.get("distributed_backend") {
            Some(b) => b.parse()?,
            None => Backend::Any,
        };
        let timeout = match options.get("distributed_timeout_s") {
            Some(t) => seconds("distributed_timeout_s", t)?,
            None => DEFAULT_INIT_TIMEOUT,
        };
        let step_timeout = match options.get("tp_step_timeout_s") {
            Some(t) => seconds("tp_step_timeout_s", t)?,
            None => DEFAULT_STEP_TIMEOUT,
        };
        let vocab = match options.get("tp_vocab") {
            Some(v) => v.parse()?,
            None => VocabLayout::default(),
        };
        let init = InitOptions { backend, strict: true, timeout };
        Ok(Some(TensorParallelOptions { ranks, init, vocab, step_timeout }))
    }

    /// Joins the group (on the calling thread, which then owns it) and loads
    /// this rank's shard of the model in `dir`.
    ///
    /// # Errors
    /// The group did not form, its size is not [`TensorParallelOptions::ranks`],
    /// or the model cannot be split that way.
    pub fn load(&self, dir: &std::path::Path) -> Result<crate::model::LoadedModel> {
        crate::model::load_sharded(dir, self.join()?)
    }

    /// Joins the group (on the calling thread, which then owns it).
    ///
    /// # Errors
    /// The group did not form, or its size is not [`TensorParallelOptions::ranks`].
    pub fn join(&self) -> Result<TensorParallel> {
        let group = distributed::init(&self.init)?;
        if group.size() != self.ranks {
            return Err(Error::invalid(
                "distributed_init",
                format!("tensor_parallel asks for {} ranks but the job has {}", self.ranks, group.size()),
            ));
        }
        Ok(TensorParallel::new(group).with_vocab_layout(self.vocab))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocab_layouts_parse_from_the_backend_options() {
        for v in [VocabLayout::Sharded, VocabLayout::Replicated] {
            assert_eq!(v.to_string().parse::<VocabLayout>().ok(), Some(v));
        }
        let e = "rows".parse::<VocabLayout>().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("unknown vocabulary layout \"rows\"; expected sharded or replicated"), "{e}");
        let mut options = std::collections::BTreeMap::new();
        options.insert("tensor_parallel".to_string(), "2".to_string());
        let vocab = |o: &std::collections::BTreeMap<String, String>| {
            TensorParallelOptions::from_backend_options(o).ok().flatten().map(|t| t.vocab)
        };
        assert_eq!(vocab(&options), Some(VocabLayout::Sharded));
        options.insert("tp_vocab".to_string(), "replicated".to_string());
        assert_eq!(vocab(&options), Some(VocabLayout::Replicated));
        options.insert("tp_vocab".to_string(), "half".to_string());
        assert!(TensorParallelOptions::from_backend_options(&options).is_err());
    }

    #[test]
    fn the_step_timeout_is_a_positive_number_of_seconds() {
        let mut options = std::collections::BTreeMap::new();
        options.insert("tensor_parallel".to_string(), "2".to_string());
        let read = |o: &std::collections::BTreeMap<String, String>| {
            TensorParallelOptions::from_backend_options(o).map(|t| t.map(|t| t.step_timeout))
        };
        assert_eq!(read(&options).ok().flatten(), Some(DEFAULT_STEP_TIMEOUT));
        options.insert("tp_step_timeout_s".to_string(), "2.5".to_string());
        assert_eq!(read(&options).ok().flatten(), Some(Duration::from_millis(2500)));
        for bad in ["0", "-1", "soon", "inf"] {
            options.insert("tp_step_timeout_s".to_string(), bad.to_string());
            let e = read(&options).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(&format!("tp_step_timeout_s = {bad:?} is not a positive number")), "{e}");
        }
    }

    #[test]
    fn shard_ranges_cover_every_item_once() {
        for size in 1..5 {
            for n in size..20 {
                let mut next = 0;
                for rank in 0..size {
                    let (start, len) = Shard::new(rank, size).and_then(|s| s.range(n, "n")).unwrap_or((-1, 0));
                    assert_eq!(start, next);
                    assert!(len == n / size || len == n / size + 1);
                    next += len;
                }
                assert_eq!(next, n);
            }
        }
        assert!(Shard::new(0, 2).and_then(|s| s.range(1, "heads")).is_err());
        assert!(Shard::new(2, 2).is_err());
        assert!(Shard::new(0, 0).is_err());
    }
}
