// SPDX-License-Identifier: EUPL-1.2
//! The real models (`cargo xtask fixtures`): SmolLM2 135M Instruct and Gemma 3 270M in bfloat16,
//! converted by mlx-lm and by us with the same options, compared tensor for tensor.
//!
//! SmolLM2: a plain conversion with a cast (float16), mlx-lm's default quantisation (4 bits,
//! groups of 64), 8 bits in groups of 32, and `mixed_3_6`. Gemma 3 (its 262k-row tied embedding,
//! four norms per block, 18 layers): the default quantisation and `mixed_4_6` in groups of 32.
//! Gemma's float16 and 6-bit/128 conversions match too but are left out to bound the time: its
//! four conversions took mlx-lm 37 s here, a third of the whole run (`jobs` takes any set).

use std::path::Path;
use std::sync::Mutex;

use mlx_metal::convert::{ConvertOptions, Recipe};
use mlx_metal::mlx::Dtype;

use super::q;
use super::support::{Job, convert_and_compare, python, real};

/// The real models' tests run one at a time, so that each measures its own peak memory.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The conversions of `src`: a cast to float16 (with `plain`), the default quantisation, `other`
/// bits and group size (when given) and `recipe` (with `recipe_group`).
fn jobs(src: &Path, plain: bool, other: Option<(i32, i32)>, recipe: Recipe, recipe_group: Option<i32>) -> Vec<Job> {
    let mut jobs = Vec::new();
    if plain {
        jobs.push(Job::new(src, "f16", ConvertOptions { dtype: Some(Dtype::Float16), ..Default::default() }));
    }
    jobs.push(Job::new(src, "q4g64", q(None, None, None)));
    if let Some((bits, group)) = other {
        jobs.push(Job::new(src, &format!("q{bits}g{group}"), q(Some(bits), Some(group), None)));
    }
    jobs.push(Job::new(src, recipe.name(), q(None, recipe_group, Some(recipe))));
    jobs
}

#[test]
fn smollm2_converts_as_mlx_lm_converts_it() {
    let (Some(python), Some(src)) = (python(), real("smollm2-135m-instruct")) else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let work = tempfile::tempdir().expect("a temporary directory");
    convert_and_compare(&python, &jobs(&src, true, Some((8, 32)), Recipe::Mixed3_6, None), work.path());
}

#[test]
fn gemma3_270m_converts_as_mlx_lm_converts_it() {
    let (Some(python), Some(src)) = (python(), real("gemma3-270m")) else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let work = tempfile::tempdir().expect("a temporary directory");
    convert_and_compare(&python, &jobs(&src, false, None, Recipe::Mixed4_6, Some(32)), work.path());
}
