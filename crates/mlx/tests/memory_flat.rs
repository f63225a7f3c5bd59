// SPDX-License-Identifier: EUPL-1.2
//! Active memory is back at its baseline after 10,000 create-compute-drop
//! iterations. MLX's active-memory figure is process-wide, so this binary
//! holds this one test only.

mod common;

use mlx::transforms::{self, Closure};
use mlx::{Array, memory, ops};

fn iteration(i: usize) -> f32 {
    let base = i as f32;
    let a = Array::from_slice(&[base, 1.0, 2.0, 3.0, 4.0, 5.0], &[2, 3]).unwrap();
    let b = ops::transpose(&a, &[1, 0]).unwrap();
    let c = ops::matmul(&a, &b).unwrap();
    let d = ops::softmax(&ops::add_scalar(&c, 1.0).unwrap(), &[-1], false).unwrap();
    let s = ops::sum_all(&ops::multiply(&d, &c).unwrap(), false).unwrap();
    s.eval().unwrap();
    s.item::<f32>().unwrap()
}

#[test]
fn active_memory_returns_to_baseline() {
    // Warm up: let MLX create its per-thread stream, scheduler and any
    // lazily made constants before the baseline is taken.
    for i in 0..10 {
        iteration(i);
    }
    common::settle();
    let baseline = memory::active_memory().unwrap();

    let mut checksum = 0.0f64;
    for i in 0..10_000 {
        checksum += f64::from(iteration(i % 7));
    }
    assert!(checksum.is_finite());
    common::settle();
    let after = memory::active_memory().unwrap();
    assert_eq!(
        after,
        baseline,
        "active memory grew by {} bytes over 10,000 iterations",
        after as i64 - baseline as i64
    );

    // Closures and transforms must release what they trace, too.
    let f = Closure::new(|xs: &[Array]| Ok(vec![ops::sum_all(&ops::square(&xs[0])?, false)?])).unwrap();
    for i in 0..1_000 {
        let x = Array::from_slice(&[i as f32, 1.0, 2.0], &[3]).unwrap();
        let one = Array::scalar(1.0f32);
        let (out, grads) = transforms::vjp(&f, &[&x], &[&one]).unwrap();
        transforms::eval(&[&out[0], &grads[0]]).unwrap();
    }
    drop(f);
    common::settle();
    let after = memory::active_memory().unwrap();
    assert_eq!(after, baseline, "active memory grew by {} bytes over 1,000 vjp calls", after as i64 - baseline as i64);

    // Everything freed sits in the cache until it is cleared.
    memory::clear_cache().unwrap();
    assert_eq!(memory::cache_memory().unwrap(), 0);
}
