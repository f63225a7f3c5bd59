// SPDX-License-Identifier: EUPL-1.2
//! Transforms: eval and async_eval, closures, vjp and jvp against
//! hand-derived derivatives, value_and_grad, checkpoint and compile; errors
//! and panics raised inside closures; the census of a graph.

mod common;

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;

use common::{arr, assert_close, vals, wide};
use mlx::transforms::{self, Closure, ValueAndGrad};
use mlx::{Array, Error, Result, ops};

const X: [f32; 4] = [0.5, -1.0, 2.0, 0.25];
const Y: [f32; 4] = [1.5, 0.5, -2.0, 3.0];

fn x() -> Array {
    arr(&X, &[4])
}

fn y() -> Array {
    arr(&Y, &[4])
}

/// f(x, y) = sum(sin(x) * y + x²), a scalar.
fn f_scalar(xs: &[Array]) -> Result<Vec<Array>> {
    let s = ops::add(&ops::multiply(&ops::sin(&xs[0])?, &xs[1])?, &ops::square(&xs[0])?)?;
    Ok(vec![ops::sum_all(&s, false)?])
}

/// g(x) = exp(x) * x, elementwise.
fn g_elementwise(xs: &[Array]) -> Result<Vec<Array>> {
    Ok(vec![ops::multiply(&ops::exp(&xs[0])?, &xs[0])?])
}

fn df_dx() -> Vec<f64> {
    X.iter().zip(&Y).map(|(&x, &y)| f64::from(x).cos() * f64::from(y) + 2.0 * f64::from(x)).collect()
}

fn df_dy() -> Vec<f64> {
    X.iter().map(|&x| f64::from(x).sin()).collect()
}

fn f_value() -> f64 {
    X.iter().zip(&Y).map(|(&x, &y)| f64::from(x).sin() * f64::from(y) + f64::from(x).powi(2)).sum()
}

#[test]
fn eval_and_async_eval() {
    let a = ops::add_scalar(&x(), 1.0).unwrap();
    let b = ops::multiply(&a, &y()).unwrap();
    transforms::eval(&[&a, &b]).unwrap();
    transforms::eval(&[]).unwrap();
    let c = ops::exp(&b).unwrap();
    transforms::async_eval(&[&c]).unwrap();
    let want: Vec<f64> = X.iter().zip(&Y).map(|(&x, &y)| ((f64::from(x) + 1.0) * f64::from(y)).exp()).collect();
    assert_close(&vals(&c), &want, 1e-6);
}

#[test]
fn closures_are_called_and_dropped() {
    let drops = Rc::new(Cell::new(0));
    struct Tracker(Rc<Cell<i32>>);
    impl Drop for Tracker {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }
    let tracker = Tracker(drops.clone());
    let calls = Rc::new(Cell::new(0));
    let calls2 = calls.clone();
    let f = Closure::new(move |xs: &[Array]| {
        let _keep = &tracker;
        calls2.set(calls2.get() + 1);
        Ok(vec![ops::add(&xs[0], &xs[1])?, ops::multiply(&xs[0], &xs[1])?])
    })
    .unwrap();
    let out = f.call(&[&x(), &y()]).unwrap();
    assert_eq!(out.len(), 2);
    let sum: Vec<f64> = X.iter().zip(&Y).map(|(a, b)| f64::from(a + b)).collect();
    let prod: Vec<f64> = X.iter().zip(&Y).map(|(a, b)| f64::from(a * b)).collect();
    assert_close(&vals(&out[0]), &sum, 1e-6);
    assert_close(&vals(&out[1]), &prod, 1e-6);
    assert_eq!(calls.get(), 1);
    // Outputs stay valid after the closure is gone; the captured state is dropped once.
    assert_eq!(drops.get(), 0);
    drop(f);
    assert_eq!(drops.get(), 1);
    assert_close(&vals(&out[0]), &sum, 1e-6);

    // A closure may return nothing, or its input unchanged.
    let none = Closure::new(|_: &[Array]| Ok(vec![])).unwrap();
    assert!(none.call(&[&x()]).unwrap().is_empty());
    let id = Closure::new(|xs: &[Array]| Ok(xs.to_vec())).unwrap();
    assert_eq!(vals(&id.call(&[&x()]).unwrap()[0]), X.to_vec());
}

#[test]
fn vjp_matches_hand_derived_gradients() {
    let f = Closure::new(f_scalar).unwrap();
    let one = Array::scalar(1.0f32);
    let (outs, grads) = transforms::vjp(&f, &[&x(), &y()], &[&one]).unwrap();
    assert_close(&vals(&outs[0]), &[f_value()], 1e-5);
    assert_eq!(grads.len(), 2);
    assert_close(&vals(&grads[0]), &df_dx(), 1e-5);
    assert_close(&vals(&grads[1]), &df_dy(), 1e-5);
    // The cotangent scales the gradient.
    let three = Array::scalar(3.0f32);
    let (_, grads) = transforms::vjp(&f, &[&x(), &y()], &[&three]).unwrap();
    assert_close(&vals(&grads[1]), &df_dy().iter().map(|v| 3.0 * v).collect::<Vec<_>>(), 1e-5);

    // Elementwise: d/dx (x eˣ) = (1 + x) eˣ, times the cotangent.
    let g = Closure::new(g_elementwise).unwrap();
    let ct = arr(&[1.0, 2.0, -1.0, 0.5], &[4]);
    let (_, grads) = transforms::vjp(&g, &[&x()], &[&ct]).unwrap();
    let want: Vec<f64> =
        X.iter().zip([1.0, 2.0, -1.0, 0.5]).map(|(&x, c)| c * (1.0 + f64::from(x)) * f64::from(x).exp()).collect();
    assert_close(&vals(&grads[0]), &want, 1e-5);
}

#[test]
fn jvp_matches_hand_derived_derivatives() {
    let g = Closure::new(g_elementwise).unwrap();
    let t = arr(&[1.0, 0.0, 2.0, -1.0], &[4]);
    let (outs, tans) = transforms::jvp(&g, &[&x()], &[&t]).unwrap();
    let value: Vec<f64> = X.iter().map(|&x| f64::from(x) * f64::from(x).exp()).collect();
    assert_close(&vals(&outs[0]), &value, 1e-6);
    let want: Vec<f64> =
        X.iter().zip([1.0, 0.0, 2.0, -1.0]).map(|(&x, t)| t * (1.0 + f64::from(x)) * f64::from(x).exp()).collect();
    assert_close(&vals(&tans[0]), &want, 1e-5);

    // Directional derivative of the scalar f along (tx, ty).
    let f = Closure::new(f_scalar).unwrap();
    let (tx, ty) = (arr(&[1.0, 1.0, 0.0, 0.0], &[4]), arr(&[0.0, 0.0, 1.0, 1.0], &[4]));
    let (_, tans) = transforms::jvp(&f, &[&x(), &y()], &[&tx, &ty]).unwrap();
    let (gx, gy) = (df_dx(), df_dy());
    assert_close(&vals(&tans[0]), &[gx[0] + gx[1] + gy[2] + gy[3]], 1e-5);
}

#[test]
fn value_and_grad_over_chosen_arguments() {
    let f = Closure::new(f_scalar).unwrap();
    let vg = ValueAndGrad::new(&f, &[0]).unwrap();
    let (values, grads) = vg.call(&[&x(), &y()]).unwrap();
    assert_close(&vals(&values[0]), &[f_value()], 1e-5);
    assert_eq!(grads.len(), 1);
    assert_close(&vals(&grads[0]), &df_dx(), 1e-5);

    let vg = ValueAndGrad::new(&f, &[1, 0]).unwrap();
    let (_, grads) = vg.call(&[&x(), &y()]).unwrap();
    assert_eq!(grads.len(), 2);
    assert_close(&vals(&grads[0]), &df_dy(), 1e-5);
    assert_close(&vals(&grads[1]), &df_dx(), 1e-5);

    // Negative argnums count from the end.
    let vg = ValueAndGrad::new(&f, &[-1]).unwrap();
    assert_close(&vals(&vg.call(&[&x(), &y()]).unwrap().1[0]), &df_dy(), 1e-5);
    // Repeats are refused.
    let e = ValueAndGrad::new(&f, &[0, 0]).unwrap().call(&[&x(), &y()]).unwrap_err();
    assert_eq!(e.op(), "value_and_grad");

    // No argnums means the first argument.
    let vg = ValueAndGrad::new(&f, &[]).unwrap();
    assert_close(&vals(&vg.call(&[&x(), &y()]).unwrap().1[0]), &df_dx(), 1e-5);

    // The gradient needs a scalar first output and valid argnums.
    let g = Closure::new(g_elementwise).unwrap();
    let vg = ValueAndGrad::new(&g, &[0]).unwrap();
    let e = vg.call(&[&x()]).unwrap_err();
    assert_eq!(e.op(), "value_and_grad");
    let bad = ValueAndGrad::new(&f, &[5]).and_then(|vg| vg.call(&[&x(), &y()]));
    assert_eq!(bad.unwrap_err().op(), "value_and_grad");
}

#[test]
fn checkpoint_gives_the_same_gradients() {
    let f = Closure::new(f_scalar).unwrap();
    let cf = transforms::checkpoint(&f).unwrap();
    let one = Array::scalar(1.0f32);
    let (o1, g1) = transforms::vjp(&f, &[&x(), &y()], &[&one]).unwrap();
    let (o2, g2) = transforms::vjp(&cf, &[&x(), &y()], &[&one]).unwrap();
    assert_eq!(vals(&o1[0]), vals(&o2[0]));
    assert_close(&vals(&g2[0]), &wide(&vals(&g1[0])), 1e-6);
    assert_close(&vals(&g2[1]), &wide(&vals(&g1[1])), 1e-6);
    // Called directly it is the same function.
    assert_eq!(vals(&cf.call(&[&x(), &y()]).unwrap()[0]), vals(&o1[0]));
}

#[test]
fn compile_gives_the_same_results() {
    let calls = Rc::new(Cell::new(0));
    let c2 = calls.clone();
    let f = Closure::new(move |xs: &[Array]| {
        c2.set(c2.get() + 1);
        let s = ops::add(&ops::multiply(&ops::sin(&xs[0])?, &xs[1])?, &ops::square(&xs[0])?)?;
        Ok(vec![ops::sum(&s, &[-1], false)?, ops::tanh(&s)?])
    })
    .unwrap();
    let plain = f.call(&[&x(), &y()]).unwrap();
    let cf = transforms::compile(&f, false).unwrap();
    for _ in 0..3 {
        let out = cf.call(&[&x(), &y()]).unwrap();
        assert_close(&vals(&out[0]), &wide(&vals(&plain[0])), 1e-6);
        assert_close(&vals(&out[1]), &wide(&vals(&plain[1])), 1e-6);
    }
    // Traced once for the shape, not once per call.
    let traced = calls.get();
    assert!(traced <= 3, "traced {traced} times");
    // A new shape is traced again and still right.
    let x2 = arr(&[0.1, 0.2], &[2]);
    let y2 = arr(&[1.0, -1.0], &[2]);
    let out = cf.call(&[&x2, &y2]).unwrap();
    assert_close(&vals(&out[0]), &wide(&vals(&f.call(&[&x2, &y2]).unwrap()[0])), 1e-6);

    // Shapeless compilation serves both shapes from one trace.
    let sf = transforms::compile(&Closure::new(g_elementwise).unwrap(), true).unwrap();
    let g = Closure::new(g_elementwise).unwrap();
    for a in [x(), arr(&[1.0, 2.0], &[2]), arr(&[0.0; 6], &[2, 3])] {
        assert_close(&vals(&sf.call(&[&a]).unwrap()[0]), &wide(&vals(&g.call(&[&a]).unwrap()[0])), 1e-6);
    }
    // Gradients through a compiled function match the plain ones.
    let cs = transforms::compile(&Closure::new(f_scalar).unwrap(), false).unwrap();
    let one = Array::scalar(1.0f32);
    let (_, grads) = transforms::vjp(&cs, &[&x(), &y()], &[&one]).unwrap();
    assert_close(&vals(&grads[0]), &df_dx(), 1e-5);
}

#[test]
fn compile_can_be_disabled() {
    transforms::set_compile_enabled(false).unwrap();
    let cf = transforms::compile(&Closure::new(g_elementwise).unwrap(), false);
    transforms::set_compile_enabled(true).unwrap();
    let cf = cf.unwrap();
    let want: Vec<f64> = X.iter().map(|&x| f64::from(x) * f64::from(x).exp()).collect();
    assert_close(&vals(&cf.call(&[&x()]).unwrap()[0]), &want, 1e-6);
}

fn failing(_: &[Array]) -> Result<Vec<Array>> {
    // A genuine error from an op inside the closure.
    let a = ops::reshape(&arr(&[1.0, 2.0, 3.0], &[3]), &[2, 2])?;
    Ok(vec![a])
}

fn expect_callback(r: Result<impl std::fmt::Debug>, op: &str) {
    match r {
        Err(Error::Callback { op: got, source }) => {
            assert_eq!(got, op);
            assert_eq!(source.op(), "reshape", "the callback's own error is kept: {source}");
        }
        other => panic!("expected a callback error from {op}, got {other:?}"),
    }
}

#[test]
fn a_closure_error_is_a_callback_error() {
    let f = Closure::new(failing).unwrap();
    expect_callback(f.call(&[&x()]), "closure_apply");
    let one = Array::scalar(1.0f32);
    expect_callback(transforms::vjp(&f, &[&x()], &[&one]), "vjp");
    expect_callback(transforms::jvp(&f, &[&x()], &[&x()]), "jvp");
    expect_callback(ValueAndGrad::new(&f, &[0]).unwrap().call(&[&x()]), "value_and_grad");
    expect_callback(transforms::checkpoint(&f).unwrap().call(&[&x()]), "closure_apply");
    expect_callback(transforms::compile(&f, false).unwrap().call(&[&x()]), "closure_apply");
    // Nothing is left over: the next calls succeed.
    let g = Closure::new(g_elementwise).unwrap();
    assert_eq!(g.call(&[&x()]).unwrap().len(), 1);
    assert!(ops::reshape(&x(), &[2, 2]).is_ok());
    // A failure outside any callback is an ordinary MLX error again.
    assert!(matches!(ops::reshape(&x(), &[3]), Err(Error::Mlx { .. })));
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

#[test]
fn a_closure_panic_is_resumed_on_the_rust_side() {
    let f = Closure::new(|xs: &[Array]| -> Result<Vec<Array>> {
        if xs.len() == 1 {
            panic!("boom from inside the closure");
        }
        Ok(xs.to_vec())
    })
    .unwrap();
    let one = Array::scalar(1.0f32);
    type Case<'a> = (&'static str, Box<dyn Fn() + 'a>);
    let cases: Vec<Case<'_>> = vec![
        ("call", Box::new(|| drop(f.call(&[&x()])))),
        ("vjp", Box::new(|| drop(transforms::vjp(&f, &[&x()], &[&one])))),
        ("jvp", Box::new(|| drop(transforms::jvp(&f, &[&x()], &[&x()])))),
        ("value_and_grad", Box::new(|| drop(ValueAndGrad::new(&f, &[0]).unwrap().call(&[&x()])))),
        ("compile", Box::new(|| drop(transforms::compile(&f, false).unwrap().call(&[&x()])))),
        ("checkpoint", Box::new(|| drop(transforms::checkpoint(&f).unwrap().call(&[&x()])))),
    ];
    for (name, run) in cases {
        let p = catch_unwind(AssertUnwindSafe(run)).expect_err(name);
        assert_eq!(panic_message(p), "boom from inside the closure", "{name}");
        // The process goes on, the same closure still works and no stale
        // panic or error surfaces in the next call.
        assert_eq!(f.call(&[&x(), &y()]).unwrap().len(), 2, "{name}");
        assert!(ops::add(&x(), &y()).is_ok());
    }
    // A panic from indexing past the inputs is resumed the same way.
    let g = Closure::new(|xs: &[Array]| Ok(vec![xs[3].clone()])).unwrap();
    let p = catch_unwind(AssertUnwindSafe(|| g.call(&[&x()]))).expect_err("index panic");
    assert!(panic_message(p).contains("index out of bounds"));
}

#[test]
fn a_graph_census_counts_each_pending_node_once_and_stops_at_evaluated_arrays() {
    let (a, b) = (x(), y());
    transforms::eval(&[&a, &b]).unwrap();
    // sum(reshape(sin(a) · b + sin(a)) + reshape(concat(split(a)))): sin counted once though used
    // twice, the split's two parts one node, and the sum over all axes a reduction and a squeeze.
    let s = ops::sin(&a).unwrap();
    let m = ops::add(&ops::multiply(&s, &b).unwrap(), &s).unwrap();
    let parts = ops::split(&a, 2, 0).unwrap();
    let r = ops::reshape(&m, &[2, 2]).unwrap();
    let out = ops::add(&r, &ops::reshape(&ops::concatenate(&[&parts[0], &parts[1]], 0).unwrap(), &[2, 2]).unwrap());
    let out = ops::sum_all(&out.unwrap(), false).unwrap();
    let census = transforms::graph_census(&[&out]).unwrap();
    let expected: Vec<(&str, usize)> = vec![
        ("Add", 2),
        ("Reshape", 2),
        ("Concatenate", 1),
        ("Multiply", 1),
        ("Sin", 1),
        ("Split", 1),
        ("Squeeze", 1),
        ("Sum", 1),
    ];
    let seen = census.by_count();
    assert_eq!(seen, expected, "{census:?}");
    assert_eq!((census.nodes(), census.layout_only(), census.computing()), (10, 3, 7));
    // Part of the graph evaluated: only what is still pending counts.
    transforms::eval(&[&m]).unwrap();
    let rest = transforms::graph_census(&[&out]).unwrap();
    assert_eq!(rest.counts.get("Sin"), None, "{rest:?}");
    assert_eq!(rest.counts.get("Multiply"), None, "{rest:?}");
    assert_eq!(rest.nodes(), 7, "{rest:?}");
    out.eval().unwrap();
    assert_eq!(transforms::graph_census(&[&out]).unwrap().nodes(), 0);
    assert_eq!(transforms::graph_census(&[]).unwrap(), transforms::GraphCensus::default());
}
