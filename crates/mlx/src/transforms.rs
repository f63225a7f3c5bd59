// SPDX-License-Identifier: EUPL-1.2
//! Evaluation and function transforms: `eval`, `async_eval`, closures over
//! Rust functions, `vjp`, `jvp`, `value_and_grad`, `checkpoint` and `compile`;
//! and [`graph_census`], what evaluating a graph would run.
//!
//! A [`Closure`] wraps a Rust function so MLX can call it while tracing.
//! Calls come back through an `extern "C"` trampoline that runs the function
//! under `catch_unwind`: a returned error becomes the transform's
//! [`Error::Callback`], and a panic is carried across the C++ frames and
//! resumed on the Rust side once the C call returns, never unwound through C++.

use std::os::raw::{c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::NonNull;

use crate::array::Array;
use crate::error::{Error, Result};
use crate::ffi::{self, VecHandle, check, handles, sys};

/// Computes the arrays (and everything they depend on) now.
pub fn eval(arrays: &[&Array]) -> Result<()> {
    let hs = handles(arrays);
    // SAFETY: hs holds live handles.
    check("eval", unsafe { sys::mlxs_eval(hs.as_ptr(), hs.len()) })
}

/// Queues the computation of the arrays and returns at once; a later
/// [`eval`] or read waits for it.
pub fn async_eval(arrays: &[&Array]) -> Result<()> {
    let hs = handles(arrays);
    // SAFETY: hs holds live handles.
    check("async_eval", unsafe { sys::mlxs_async_eval(hs.as_ptr(), hs.len()) })
}

/// The primitives that change only an array's layout (shape, strides, offset), which a
/// backend runs without a kernel unless the input's layout forces a copy (a reshape or
/// flatten of strided data).
pub const LAYOUT_PRIMITIVES: [&str; 12] = [
    "AsStrided",
    "Broadcast",
    "BroadcastAxes",
    "Depends",
    "ExpandDims",
    "Flatten",
    "Reshape",
    "Slice",
    "Squeeze",
    "StopGradient",
    "Transpose",
    "Unflatten",
];

/// What evaluating some arrays would run ([`graph_census`]): each primitive's name with the
/// number of nodes of it in the graph.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraphCensus {
    /// Nodes per primitive name (MLX's class names: `Add`, `QuantizedMatmul`, `Compiled`, ...).
    pub counts: std::collections::BTreeMap<String, usize>,
}

impl GraphCensus {
    /// Every node of the graph.
    pub fn nodes(&self) -> usize {
        self.counts.values().sum()
    }

    /// The nodes that only change a layout ([`LAYOUT_PRIMITIVES`]).
    pub fn layout_only(&self) -> usize {
        self.counts.iter().filter(|(k, _)| LAYOUT_PRIMITIVES.contains(&k.as_str())).map(|(_, v)| v).sum()
    }

    /// The nodes that compute: on a GPU, about one kernel each.
    pub fn computing(&self) -> usize {
        self.nodes() - self.layout_only()
    }

    /// The primitives by count, most first (ties by name).
    pub fn by_count(&self) -> Vec<(&str, usize)> {
        let mut v: Vec<(&str, usize)> = self.counts.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }
}

/// The graph that evaluating `arrays` would run now: every array they depend on that is not
/// yet evaluated or queued, counted once per primitive node (the outputs of one node, such as
/// a split's parts, count once). Nothing is evaluated. A diagnostic of a step's host work:
/// MLX's backends encode a kernel per computing node, at a host cost each.
pub fn graph_census(arrays: &[&Array]) -> Result<GraphCensus> {
    let hs = handles(arrays);
    // SAFETY: hs holds live handles and `out` is a valid out pointer.
    let text = ffi::string_out("graph_census", |out| unsafe { sys::mlxs_graph_census(out, hs.as_ptr(), hs.len()) })?;
    let mut census = GraphCensus::default();
    for line in text.lines() {
        let parsed = line.split_once('\t').and_then(|(name, n)| Some((name, n.parse::<usize>().ok()?)));
        let (name, n) = parsed.ok_or_else(|| Error::invalid("graph_census", format!("unreadable line {line:?}")))?;
        census.counts.insert(name.to_owned(), n);
    }
    Ok(census)
}

type BoxedFn = Box<dyn Fn(&[Array]) -> Result<Vec<Array>>>;

unsafe extern "C" fn trampoline(
    payload: *mut c_void,
    inputs: *const sys::mlxs_array,
    n_inputs: usize,
    outputs: sys::mlxs_vec,
) -> c_int {
    let run = || -> Result<c_int> {
        // SAFETY: payload is the Box<BoxedFn> leaked by Closure::new, alive
        // until the shim calls `drop_payload`.
        let f = unsafe { &*(payload as *const BoxedFn) };
        let mut args = Vec::with_capacity(n_inputs);
        for i in 0..n_inputs {
            // SAFETY: the shim passes n_inputs live handles; we take shared
            // references of our own (clone) so their lifetime is ours.
            let h = unsafe { *inputs.add(i) };
            let arr = ffi::array_out("closure_input", |o| unsafe { sys::mlxs_array_clone(o, h) })?;
            args.push(arr);
        }
        let outs = f(&args)?;
        for a in &outs {
            // SAFETY: outputs is a live vector owned by the caller.
            check("closure_output", unsafe { sys::mlxs_vec_push(outputs, a.as_raw()) })?;
        }
        Ok(0)
    };
    match catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            ffi::stash_callback_error(e);
            1
        }
        Err(panic) => {
            ffi::stash_panic(panic);
            1
        }
    }
}

unsafe extern "C" fn drop_payload(payload: *mut c_void) {
    // A panic in a destructor must not unwind into C++.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: called exactly once by the shim with the pointer from Closure::new.
        drop(unsafe { Box::from_raw(payload as *mut BoxedFn) });
    }));
}

/// A function from arrays to arrays that MLX can call and transform.
///
/// Not `Send`: the function runs on the thread that owns its arrays.
pub struct Closure {
    raw: NonNull<sys::mlxs_closure_s>,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Closure {
    /// Wraps `f`. MLX may call it several times (tracing, recomputation).
    pub fn new<F>(f: F) -> Result<Closure>
    where
        F: Fn(&[Array]) -> Result<Vec<Array>> + 'static,
    {
        let boxed: Box<BoxedFn> = Box::new(Box::new(f));
        let payload = Box::into_raw(boxed) as *mut c_void;
        let mut out: sys::mlxs_closure = std::ptr::null_mut();
        // SAFETY: the shim takes ownership of payload and calls drop_payload
        // exactly once, also when this call fails.
        let status = unsafe { sys::mlxs_closure_new(&mut out, Some(trampoline), payload, Some(drop_payload)) };
        check("closure_new", status)?;
        Closure::from_raw("closure_new", out)
    }

    fn from_raw(op: &'static str, raw: sys::mlxs_closure) -> Result<Closure> {
        let raw = NonNull::new(raw).ok_or(Error::Mlx { op, message: "the shim returned a null closure".into() })?;
        Ok(Closure { raw, _not_send: std::marker::PhantomData })
    }

    fn as_raw(&self) -> sys::mlxs_closure {
        self.raw.as_ptr()
    }

    /// Calls the function through MLX.
    pub fn call(&self, inputs: &[&Array]) -> Result<Vec<Array>> {
        let hs = handles(inputs);
        ffi::vec_out("closure_apply", |o| {
            // SAFETY: live closure and handles.
            unsafe { sys::mlxs_closure_apply(o, self.as_raw(), hs.as_ptr(), hs.len()) }
        })
    }
}

impl Drop for Closure {
    fn drop(&mut self) {
        // SAFETY: we own the handle and free it once.
        unsafe { sys::mlxs_closure_free(self.raw.as_ptr()) }
    }
}

fn two_vecs(
    op: &'static str,
    f: impl FnOnce(*mut sys::mlxs_vec, *mut sys::mlxs_vec) -> c_int,
) -> Result<(Vec<Array>, Vec<Array>)> {
    let mut a: sys::mlxs_vec = std::ptr::null_mut();
    let mut b: sys::mlxs_vec = std::ptr::null_mut();
    let status = f(&mut a, &mut b);
    // Take ownership first so nothing leaks whatever the status says.
    let va = (!a.is_null()).then(|| VecHandle::from_raw(op, a)).transpose()?;
    let vb = (!b.is_null()).then(|| VecHandle::from_raw(op, b)).transpose()?;
    check(op, status)?;
    match (va, vb) {
        (Some(va), Some(vb)) => Ok((va.to_arrays(op)?, vb.to_arrays(op)?)),
        _ => Err(Error::Mlx { op, message: "the shim returned no outputs".into() }),
    }
}

/// Vector-Jacobian product: the outputs of `f(primals)` and the gradients of
/// `sum(outputs · cotangents)` with respect to each primal.
pub fn vjp(f: &Closure, primals: &[&Array], cotangents: &[&Array]) -> Result<(Vec<Array>, Vec<Array>)> {
    let p = handles(primals);
    let c = handles(cotangents);
    two_vecs("vjp", |a, b| {
        // SAFETY: live closure and handles.
        unsafe { sys::mlxs_vjp(a, b, f.as_raw(), p.as_ptr(), p.len(), c.as_ptr(), c.len()) }
    })
}

/// Jacobian-vector product: the outputs of `f(primals)` and their directional
/// derivatives along `tangents`.
pub fn jvp(f: &Closure, primals: &[&Array], tangents: &[&Array]) -> Result<(Vec<Array>, Vec<Array>)> {
    let p = handles(primals);
    let t = handles(tangents);
    two_vecs("jvp", |a, b| {
        // SAFETY: live closure and handles.
        unsafe { sys::mlxs_jvp(a, b, f.as_raw(), p.as_ptr(), p.len(), t.as_ptr(), t.len()) }
    })
}

/// A function that returns `f`'s outputs and the gradient of its first output
/// (a scalar) with respect to the inputs named by `argnums`.
pub struct ValueAndGrad {
    raw: NonNull<sys::mlxs_vag_s>,
    argnums: Vec<i32>,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl ValueAndGrad {
    /// Differentiates `f` with respect to its inputs at `argnums` (default
    /// `[0]`; negative numbers count from the end; no repeats).
    pub fn new(f: &Closure, argnums: &[i32]) -> Result<ValueAndGrad> {
        let mut out: sys::mlxs_vag = std::ptr::null_mut();
        // SAFETY: live closure; argnums valid for its length.
        check("value_and_grad", unsafe {
            sys::mlxs_value_and_grad(&mut out, f.as_raw(), argnums.as_ptr(), argnums.len())
        })?;
        let raw = NonNull::new(out).ok_or(Error::Mlx { op: "value_and_grad", message: "null handle".into() })?;
        let argnums = if argnums.is_empty() { vec![0] } else { argnums.to_vec() };
        Ok(ValueAndGrad { raw, argnums, _not_send: std::marker::PhantomData })
    }

    /// Returns `(values, gradients)` at `inputs`, one gradient per argnum in
    /// the order the argnums were given.
    pub fn call(&self, inputs: &[&Array]) -> Result<(Vec<Array>, Vec<Array>)> {
        let hs = handles(inputs);
        let (values, grads) = two_vecs("value_and_grad", |a, b| {
            // SAFETY: live handles.
            unsafe { sys::mlxs_vag_apply(a, b, self.raw.as_ptr(), hs.as_ptr(), hs.len()) }
        })?;
        // MLX returns the gradients in ascending argnum order; put them back
        // in the caller's order.
        let n = inputs.len() as i64;
        let given: Vec<i64> =
            self.argnums.iter().map(|&a| if a < 0 { i64::from(a) + n } else { i64::from(a) }).collect();
        let mut sorted = given.clone();
        sorted.sort_unstable();
        if grads.len() != sorted.len() {
            return Err(Error::Mlx {
                op: "value_and_grad",
                message: format!("MLX returned {} gradients for {} argnums", grads.len(), sorted.len()),
            });
        }
        let mut slots: Vec<Option<Array>> = grads.into_iter().map(Some).collect();
        let grads = given
            .iter()
            .map(|a| sorted.binary_search(a).ok().and_then(|i| slots[i].take()))
            .collect::<Option<Vec<Array>>>()
            .ok_or_else(|| Error::Mlx { op: "value_and_grad", message: "gradients do not match the argnums".into() })?;
        Ok((values, grads))
    }
}

impl Drop for ValueAndGrad {
    fn drop(&mut self) {
        // SAFETY: we own the handle and free it once.
        unsafe { sys::mlxs_vag_free(self.raw.as_ptr()) }
    }
}

/// A version of `f` that does not keep its intermediate arrays for the
/// backward pass but recomputes them (gradient checkpointing).
pub fn checkpoint(f: &Closure) -> Result<Closure> {
    let mut out: sys::mlxs_closure = std::ptr::null_mut();
    // SAFETY: live closure.
    check("checkpoint", unsafe { sys::mlxs_checkpoint(&mut out, f.as_raw()) })?;
    Closure::from_raw("checkpoint", out)
}

/// A compiled version of `f`: MLX traces it once per input shape (or once,
/// when `shapeless`) and fuses its graph.
pub fn compile(f: &Closure, shapeless: bool) -> Result<Closure> {
    let mut out: sys::mlxs_closure = std::ptr::null_mut();
    // SAFETY: live closure.
    check("compile", unsafe { sys::mlxs_compile(&mut out, f.as_raw(), shapeless) })?;
    Closure::from_raw("compile", out)
}

/// Turns MLX's compiler on or off for the whole process.
pub fn set_compile_enabled(enabled: bool) -> Result<()> {
    // SAFETY: plain call.
    check("set_compile_enabled", unsafe { sys::mlxs_set_compile_enabled(enabled) })
}
