// SPDX-License-Identifier: EUPL-1.2
//! Our CPU primitives for MLX's fast RMS norm and rope (`csrc/mlxs_cpu_fast.cpp`) against MLX's
//! own compositions of the same steps (custom kernels off). The switch is process-wide, so
//! everything runs in one test of its own binary.
//!
//! Where MLX's CPU reductions run one lane wide (x86) ours must equal the compositions bit for
//! bit; elsewhere within a float32 rounding. Each case also checks which graph ran: ours as one
//! node (`CpuRMSNorm`, `CpuRoPE`) with the switch on, MLX's ops with it off, and MLX's ops
//! where ours does not apply (16-bit inputs, 3-D rope input). Derivatives through ours are the
//! compositions' (vjp and jvp).

use mlx::fast::{self, CustomKernels, RopeFreqs, RopeOffset, Rotation, custom_kernels, set_custom_kernels};
use mlx::transforms::{Closure, graph_census, jvp, vjp};
use mlx::{Array, Device, Dtype, Result, ops, random};

fn normal(shape: &[i32], seed: u64, dtype: Dtype) -> Array {
    let key = random::key(seed).unwrap();
    let a = ops::astype(&random::normal(shape, Dtype::Float32, 0.0, 2.0, Some(&key)).unwrap(), dtype).unwrap();
    a.eval().unwrap();
    a
}

/// `f` with the switch `mode`: its values, and the names of the primitives its graph runs.
fn run(mode: CustomKernels, f: &dyn Fn() -> Result<Array>) -> (Vec<f32>, Vec<String>) {
    set_custom_kernels(mode);
    let y = f().unwrap();
    let census = graph_census(&[&y]).unwrap();
    let names = census.by_count().iter().map(|(n, _)| n.to_string()).collect();
    (ops::astype(&y, Dtype::Float32).unwrap().to_vec_f32().unwrap(), names)
}

fn assert_same(ours: &[f32], theirs: &[f32], what: &str) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    if cfg!(target_arch = "x86_64") {
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            assert!(a.to_bits() == b.to_bits(), "{what}: value {i} is {a}, MLX's ops give {b}");
        }
    } else {
        let scale = theirs.iter().fold(1e-30f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            assert!((a - b).abs() <= 4.0 * f32::EPSILON * scale, "{what}: value {i} is {a}, MLX's ops give {b}");
        }
    }
}

/// Runs `f` both ways: ours must run as the node `node` (and MLX's ops must not), and agree.
fn check(node: &str, what: &str, f: &dyn Fn() -> Result<Array>) -> usize {
    let (ours, ours_graph) = run(CustomKernels::Auto, f);
    let (theirs, their_graph) = run(CustomKernels::Off, f);
    assert!(ours_graph.iter().any(|n| n == node), "{what}: {node} did not run: {ours_graph:?}");
    assert!(!their_graph.iter().any(|n| n == node), "{what}: {node} ran with the switch off");
    assert!(!ours.is_empty(), "{what}: no values");
    assert_same(&ours, &theirs, what);
    ours.len()
}

/// Runs `f` both ways where ours must not apply: the same graph and values.
fn check_not_applied(what: &str, f: &dyn Fn() -> Result<Array>) {
    let (ours, ours_graph) = run(CustomKernels::Auto, f);
    let (theirs, their_graph) = run(CustomKernels::Off, f);
    assert!(!ours_graph.iter().any(|n| n.starts_with("Cpu")), "{what}: ours ran: {ours_graph:?}");
    assert_eq!(ours_graph, their_graph, "{what}: the graphs differ");
    assert_eq!(ours, theirs, "{what}: the values differ");
}

fn rms_norms() -> usize {
    let mut values = 0;
    let w576 = normal(&[576], 2, Dtype::Float32);
    let x = normal(&[1, 1, 576], 1, Dtype::Float32);
    values += check("CpuRMSNorm", "rms [1,1,576] with a weight", &|| fast::rms_norm(&x, Some(&w576), 1e-5));
    let x = normal(&[3, 5, 64], 3, Dtype::Float32);
    values += check("CpuRMSNorm", "rms [3,5,64] without a weight", &|| fast::rms_norm(&x, None, 1e-6));
    // A transposed input (attention's [B, L, H, D] → [B, H, L, D]) and a single feature.
    let x = normal(&[2, 4, 3, 64], 4, Dtype::Float32);
    let w64 = normal(&[64], 5, Dtype::Float32);
    values += check("CpuRMSNorm", "rms of a transposed input", &|| {
        fast::rms_norm(&ops::transpose(&x, &[0, 2, 1, 3])?, Some(&w64), 1e-6)
    });
    let x = normal(&[7, 1], 6, Dtype::Float32);
    values += check("CpuRMSNorm", "rms of one feature", &|| fast::rms_norm(&x, None, 1e-6));
    // Values whose squares overflow a float32 in sum: both give the same infinities and zeros.
    let big = ops::multiply_scalar(&normal(&[2, 32], 7, Dtype::Float32), 1e19).unwrap();
    values += check("CpuRMSNorm", "rms of huge values", &|| fast::rms_norm(&big, None, 1e-6));
    // 16-bit inputs and a 16-bit weight stay MLX's.
    let xb = normal(&[2, 64], 8, Dtype::Bfloat16);
    let wb = normal(&[64], 9, Dtype::Bfloat16);
    check_not_applied("rms in bfloat16", &|| fast::rms_norm(&xb, Some(&wb), 1e-6));
    let xf = normal(&[2, 64], 8, Dtype::Float32);
    check_not_applied("rms with a bfloat16 weight", &|| fast::rms_norm(&xf, Some(&wb), 1e-6));
    values
}

fn ropes() -> usize {
    let mut values = 0;
    let x = normal(&[2, 3, 5, 64], 10, Dtype::Float32);
    let offsets = Array::from_slice(&[3i32, 11], &[2]).unwrap();
    let freqs = ops::exp(&normal(&[16], 11, Dtype::Float32)).unwrap();
    let cases: [(&str, i32, bool, RopeFreqs<'_>, f32, RopeOffset<'_>); 6] = [
        ("rope, base 10000, offset 0", 64, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Fixed(0)),
        ("rope, traditional, offset 7", 64, true, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Fixed(7)),
        ("rope of 32 of 64 features, scale 0.5", 32, false, RopeFreqs::Base(500000.0), 0.5, RopeOffset::Fixed(40)),
        (
            "rope, traditional, 32 of 64, offsets by row",
            32,
            true,
            RopeFreqs::Base(10000.0),
            1.0,
            RopeOffset::Array(&offsets),
        ),
        ("rope with its own frequencies", 32, false, RopeFreqs::Custom(&freqs), 1.0, RopeOffset::Fixed(2)),
        ("rope at a large offset", 64, false, RopeFreqs::Base(1e6), 1.0, RopeOffset::Fixed(100_000)),
    ];
    for (what, dims, traditional, f, scale, offset) in cases {
        values += check("CpuRoPE", what, &|| fast::rope(&x, dims, traditional, f, scale, offset));
    }
    // As attention calls it: a projection's [B, L, H, D] transposed to [B, H, L, D].
    let proj = normal(&[2, 5, 3, 64], 12, Dtype::Float32);
    values += check("CpuRoPE", "rope of a transposed input", &|| {
        let q = ops::transpose(&proj, &[0, 2, 1, 3])?;
        fast::rope(&q, 64, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Fixed(9))
    });
    // The q/k norm and rope of a projection, as the models call it on a CPU.
    let y = normal(&[1, 4, 6 * 64], 13, Dtype::Float32);
    let wn = normal(&[4, 1, 64], 14, Dtype::Float32);
    let rot = Rotation {
        dims: 64,
        traditional: false,
        freqs: RopeFreqs::Base(10000.0),
        scale: 1.0,
        offset: RopeOffset::Fixed(5),
    };
    values += check("CpuRoPE", "q/k norm and rope", &|| fast::qk_norm_rope(&y, 4, 64, Some((&wn, 1e-6)), &rot));
    values +=
        check("CpuRMSNorm", "q/k norm and rope's norm", &|| fast::qk_norm_rope(&y, 4, 64, Some((&wn, 1e-6)), &rot));
    // 16-bit and 3-D inputs stay MLX's.
    let xb = normal(&[1, 2, 3, 64], 15, Dtype::Bfloat16);
    check_not_applied("rope in bfloat16", &|| {
        fast::rope(&xb, 64, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Fixed(1))
    });
    let x3 = normal(&[2, 3, 64], 16, Dtype::Float32);
    check_not_applied("rope of a 3-D input", &|| {
        fast::rope(&x3, 64, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Fixed(1))
    });
    values
}

/// The derivatives through ours are those through MLX's ops: a norm then a rope, by vjp and jvp.
fn derivatives() {
    let x = normal(&[2, 3, 4, 64], 20, Dtype::Float32);
    let w = normal(&[64], 21, Dtype::Float32);
    let cot = normal(&[2, 3, 4, 64], 22, Dtype::Float32);
    let f = Closure::new(|xs: &[Array]| {
        let n = fast::rms_norm(&xs[0], Some(&xs[1]), 1e-6)?;
        Ok(vec![fast::rope(&n, 64, false, RopeFreqs::Base(10000.0), 1.0, RopeOffset::Fixed(3))?])
    })
    .unwrap();
    let grads = |mode| {
        set_custom_kernels(mode);
        let (out, g) = vjp(&f, &[&x, &w], &[&cot]).unwrap();
        let (_, t) = jvp(&f, &[&x, &w], &[&cot, &w]).unwrap();
        let census = graph_census(&[&out[0]]).unwrap();
        let ran_ours = census.by_count().iter().any(|(n, _)| *n == "CpuRoPE");
        let v = |a: &Array| a.to_vec_f32().unwrap();
        (ran_ours, v(&out[0]), v(&g[0]), v(&g[1]), v(&t[0]))
    };
    let ours = grads(CustomKernels::Auto);
    let theirs = grads(CustomKernels::Off);
    assert!(ours.0 && !theirs.0, "the forward pass ran ours only with the switch on");
    assert_same(&ours.1, &theirs.1, "vjp's forward values");
    assert_same(&ours.2, &theirs.2, "d/dx");
    assert_same(&ours.3, &theirs.3, "d/dweight");
    assert_same(&ours.4, &theirs.4, "jvp");
}

#[test]
fn cpu_norm_and_rope_are_one_node_each_and_equal_mlx_ops() {
    // A CPU stream whatever the default device is.
    let _cpu = mlx::device::DeviceScope::new(Device::Cpu).unwrap();
    let before = custom_kernels();
    let values = rms_norms() + ropes();
    derivatives();
    set_custom_kernels(before);
    assert!(values > 10_000, "only {values} values compared");
    eprintln!("{values} values compared");
}
