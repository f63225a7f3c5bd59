// SPDX-License-Identifier: EUPL-1.2
//! Tensor-parallel models over MLX's ring backend on loopback: the shards a
//! rank holds (here), models loaded sharded over two ranks against the single
//! process (greedy tokens, batches, the vocabulary-parallel embedding and
//! head, memory: `tensor_parallel/tp.rs`), and `MetalModel` with the
//! `tensor_parallel` option (a rank's chat, jobs mirrored from rank 0 to its
//! followers: `tensor_parallel/metal.rs`).
//!
//! Multi-process tests re-execute this test binary as rank processes (see
//! `crates/mlx/tests/common/ranks.rs`): the ignored test `rank_process` is
//! the rank's entry point, and the environment variable `MLXR_DIST_TEST_ROLE`
//! says what the rank does. Each rank prints `RESULT <json>` lines that the
//! parent reads back.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use common::ranks::{ROLE, join_ring, result_of, run_job, run_job_with, serial, spec};
use mlx::distributed::{self, InitOptions};

// ---------------------------------------------------------------- rank entry

/// A rank of a job started by the other tests. Run on its own it checks the
/// single-process world (rank 0 of 1).
#[test]
#[ignore = "the entry point of the rank processes the other tests start"]
fn rank_process() {
    let role = std::env::var(ROLE).unwrap_or_default();
    match role.as_str() {
        r if r.starts_with("tp:") => tp::rank_generate(&r[3..]),
        r if r.starts_with("metal:") => metal::rank_chat(&r[6..]),
        r if r.starts_with("mirror:") => metal::rank_mirrored(&r[7..]),
        r if r.starts_with("agree:") => metal::rank_agreeing(&r[6..]),
        _ => {
            let g = distributed::init(&InitOptions::default()).expect("a single-process group");
            assert_eq!((g.rank(), g.size()), (0, 1));
        }
    }
}

// ---------------------------------------------------------------- shards

#[test]
fn shard_ranges_and_errors() {
    use mlx_metal::model::tp::Shard;
    let s = Shard::new(1, 2).expect("shard");
    assert_eq!(s.range(8, "heads").expect("even"), (4, 4));
    assert_eq!(s.range(9, "heads").expect("uneven"), (4, 5));
    assert_eq!(Shard::new(0, 2).and_then(|s| s.range(9, "heads")).expect("uneven"), (0, 4));
    let e = Shard::new(0, 4).and_then(|s| s.range(3, "kv heads")).expect_err("too few");
    assert!(e.to_string().contains("kv heads = 3 cannot be split over 4 tensor-parallel ranks"), "{e}");
    assert!(Shard::new(2, 2).is_err() && Shard::new(-1, 2).is_err() && Shard::new(0, 0).is_err());
}

// ---------------------------------------------------------------- tensor parallelism

#[path = "tensor_parallel/tp.rs"]
mod tp;

// ---------------------------------------------------------------- through MetalModel

#[path = "tensor_parallel/metal.rs"]
mod metal;
