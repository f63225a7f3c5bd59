// SPDX-License-Identifier: EUPL-1.2
//! Memory stays flat over 200 training steps: after a warm-up, MLX's active
//! memory does not grow (its own test binary, so that no other test allocates
//! in the same process meanwhile). On the tiny Llama fixture, and on the real
//! SmolLM2 135M when it is there.

mod common;

use mlx_metal::model;

use mlx::{Dtype, memory};
use mlx_train::{DataConfig, StepSettings};

#[test]
fn memory_is_flat_over_200_steps_on_the_tiny_llama() {
    flat(&common::tiny("llama-tiny"), "llama-tiny");
}

#[test]
#[ignore = "about 18 minutes on a 2-core CPU (200 bf16 steps of a 135M model); run with --ignored"]
fn memory_is_flat_over_200_steps_on_smollm2() {
    if let Some(dir) = common::real("smollm2-135m-instruct") {
        flat(&dir, "smollm2-135m-instruct");
    }
}

/// The tests of this binary run one at a time: active memory is per process.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn flat(dir: &std::path::Path, name: &str) {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let m = model::load(dir).unwrap();
    // Short text records and the top two blocks adapted keep the 200 steps quick.
    let ds = common::dataset(&m, &common::texts(4), &DataConfig::default());
    let batches = [ds.batch(&[0, 1], 64).unwrap(), ds.batch(&[2, 3], 64).unwrap()];
    let settings = StepSettings { learning_rate: 1e-3, grad_clip: Some(1.0), ..StepSettings::default() };
    let mut t = common::trainer_top(m, settings, Dtype::Float32, 4, 2);
    let started = std::time::Instant::now();
    let mut after_warmup = 0;
    let mut readings = Vec::new();
    for i in 0..200 {
        t.step(&batches[i % 2]).unwrap();
        if i == 9 {
            after_warmup = memory::active_memory().unwrap();
        }
        if i >= 10 {
            readings.push(memory::active_memory().unwrap());
        }
    }
    let max = *readings.iter().max().unwrap();
    assert!(
        max <= after_warmup + 64 * 1024,
        "{name}: active memory grew from {after_warmup} to {max} bytes over 200 steps"
    );
    eprintln!(
        "{name}: active memory after warm-up {after_warmup} bytes, at most {max} bytes over 190 more steps ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
}
