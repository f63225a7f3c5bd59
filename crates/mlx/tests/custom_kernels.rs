// SPDX-License-Identifier: EUPL-1.2
//! Our own GPU kernels against MLX's (`csrc/mlxs_kernels.cpp`). The switch is
//! process-wide, so everything runs in one test of its own binary.
//!
//! On a CUDA device the 4-bit kernels (one row of x, and 2 to 32 rows on the
//! tensor cores) must be as close to an f32 reference as MLX's own kernel is
//! (all round the weights or products in bf16 or fp16), the fused norm and
//! residual sum and the q/k norm and rope within a rounding of MLX's ops, the
//! norm with the 4-bit product after it bit for bit the two kernels it joins, and
//! decode attention as close to an f32 reference as MLX's; everywhere else (the CPU,
//! Metal, more than 32 rows, other bit widths) the switch must change nothing,
//! bit for bit.

use mlx::fast::{CustomKernels, custom_kernels, set_custom_kernels};
use mlx::ops;
use mlx::{Array, Device, Dtype, random};

fn cuda() -> bool {
    Device::Gpu.is_available()
        && Device::Gpu.info().is_ok_and(|i| i.properties.contains_key("compute_capability_major"))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Normal values of standard deviation `std` drawn in f32 from the key of `seed`, as `dtype`.
fn normal_as(shape: &[i32], seed: u64, std: f32, dtype: Dtype) -> mlx::Array {
    let key = random::key(seed).unwrap();
    ops::astype(&random::normal(shape, Dtype::Float32, 0.0, std, Some(&key)).unwrap(), dtype).unwrap()
}

/// `ours` is within two roundings of a bf16 (8 bits) or fp16 (11 bits) value at the scale of
/// `theirs`' largest value from `theirs` (MLX's ops).
fn assert_within_a_rounding(ours: &[f32], theirs: &[f32], dtype: Dtype, what: &str) {
    let scale = theirs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let ulp = if dtype == Dtype::Bfloat16 { 2f32.powi(-7) } else { 2f32.powi(-10) };
    let err = max_abs_diff(ours, theirs);
    assert!(err <= 2.0 * ulp * scale, "{what}: ours is {err} from MLX's ops (scale {scale})");
}

/// How many values of `ours` are not bit for bit `theirs`, and the most units in the last place
/// (of the 16-bit type, at the larger of the two) that any one of them is from it.
fn values_apart(ours: &[f32], theirs: &[f32], dtype: Dtype) -> (usize, f32) {
    let bits = if dtype == Dtype::Bfloat16 { 7 } else { 10 };
    ours.iter().zip(theirs).filter(|(a, b)| a.to_bits() != b.to_bits()).fold((0, 0.0), |(n, most), (a, b)| {
        let at = a.abs().max(b.abs()).max(f32::MIN_POSITIVE);
        let ulp = 2f32.powi(at.log2().floor() as i32 - bits);
        (n + 1, most.max((a - b).abs() / ulp))
    })
}

struct Case {
    n: i32,
    k: i32,
    group: i32,
    bits: i32,
    dtype: Dtype,
    /// Leading shape of x: its product is the number of rows.
    lead: &'static [i32],
    /// Take x as a view starting this many elements into a larger array.
    x_offset: i32,
}

fn run(case: &Case, seed: u64, on_cuda: bool) -> (Vec<f32>, Option<Vec<f32>>, Vec<f32>) {
    let Case { n, k, group, bits, dtype, lead, x_offset } = *case;
    let wkey = random::key(seed).unwrap();
    let xkey = random::key(seed + 1000).unwrap();
    let w = random::normal(&[n, k], Dtype::Float32, 0.0, 0.02, Some(&wkey)).unwrap();
    let w = ops::astype(&w, dtype).unwrap();
    let q = ops::quantize(&w, group, bits).unwrap();
    let rows: i32 = lead.iter().product();
    let wide = random::normal(&[rows * k + x_offset], Dtype::Float32, 0.0, 1.0, Some(&xkey)).unwrap();
    let wide = ops::astype(&wide, dtype).unwrap();
    wide.eval().unwrap();
    let flat = ops::slice(&wide, &[x_offset], &[x_offset + rows * k]).unwrap();
    let mut shape = lead.to_vec();
    shape.push(k);
    let x = ops::reshape(&flat, &shape).unwrap();

    let reference = {
        let deq = ops::dequantize(&q, Some(Dtype::Float32)).unwrap();
        let xf = ops::astype(&x, Dtype::Float32).unwrap();
        let wt = ops::transpose(&deq, &[1, 0]).unwrap();
        ops::matmul(&xf, &wt).unwrap().to_vec_f32().unwrap()
    };
    // MLX 0.32.4's own CUDA kernel faults ("misaligned address") on an x
    // that is not 16-byte aligned, so there only ours runs.
    let theirs = (!on_cuda || x_offset % 8 == 0).then(|| {
        set_custom_kernels(CustomKernels::Off);
        ops::quantized_matmul(&x, &q, true).unwrap().to_vec_f32().unwrap()
    });
    set_custom_kernels(CustomKernels::Always);
    let ours = ops::quantized_matmul(&x, &q, true).unwrap().to_vec_f32().unwrap();
    assert_eq!(ours.len(), (rows * n) as usize);
    (reference, theirs, ours)
}

#[test]
fn quantized_matvec_kernel_matches_mlx() {
    let device = Device::best();
    let on_cuda = device == Device::Gpu && cuda();
    let before = custom_kernels();
    let _scope = mlx::device::DeviceScope::new(device).unwrap();

    // The kernels' cases: one row of x or several, 4-bit, every group size,
    // bf16 and fp16, K a multiple of 1,024 or not (Gemma 3 1B's 1,152 and
    // 6,912), x a view that is not 16-byte aligned.
    let applies = [
        Case { n: 300, k: 4096, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[1], x_offset: 0 },
        Case { n: 257, k: 1152, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[1, 1], x_offset: 0 },
        Case { n: 64, k: 6912, group: 32, bits: 4, dtype: Dtype::Float16, lead: &[1, 1, 1], x_offset: 0 },
        Case { n: 129, k: 2048, group: 128, bits: 4, dtype: Dtype::Bfloat16, lead: &[1], x_offset: 3 },
        Case { n: 96, k: 14336, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[1], x_offset: 8 },
        // rows longer than any model's (x has no shared memory to fit)
        Case { n: 16, k: 25600, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[1], x_offset: 0 },
        // one row of an output head's size: the tensor-core kernel
        Case { n: 65_600, k: 1152, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[1], x_offset: 0 },
        Case { n: 65_540, k: 1024, group: 32, bits: 4, dtype: Dtype::Float16, lead: &[1], x_offset: 5 },
        // Several rows (a batch's decode step): one 8-row tile of x or four,
        // output rows not a multiple of 32, every group size, unaligned x.
        Case { n: 300, k: 4096, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[2], x_offset: 0 },
        Case { n: 257, k: 1152, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[8], x_offset: 0 },
        Case { n: 64, k: 6912, group: 32, bits: 4, dtype: Dtype::Float16, lead: &[3, 3], x_offset: 0 },
        Case { n: 129, k: 2048, group: 128, bits: 4, dtype: Dtype::Bfloat16, lead: &[32], x_offset: 3 },
        Case { n: 96, k: 14336, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[16], x_offset: 8 },
        Case { n: 200, k: 1024, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[2], x_offset: 0 },
        Case { n: 70, k: 1024, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[1, 3], x_offset: 0 },
    ];
    for (i, case) in applies.iter().enumerate() {
        eprintln!(
            "case {i}: n {} k {} group {} {:?} rows {:?} x offset {}",
            case.n, case.k, case.group, case.dtype, case.lead, case.x_offset
        );
        let (reference, theirs, ours) = run(case, 10 + i as u64, on_cuda);
        let err_ours = max_abs_diff(&ours, &reference);
        if on_cuda {
            // Both kernels round products to 8 (bf16) or 11 (fp16) bits; ours
            // sums in f32, MLX's partly in the input dtype.
            let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err_theirs = theirs.as_ref().map_or(0.0, |t| max_abs_diff(t, &reference));
            assert!(
                err_ours <= err_theirs.max(0.01 * scale) * 1.5,
                "case {i} (n {} k {} group {}): ours is {err_ours} from the f32 reference, MLX's {err_theirs}",
                case.n,
                case.k,
                case.group
            );
        } else {
            assert_eq!(Some(ours), theirs, "case {i}: the switch changed a result off CUDA");
        }
    }

    // Where the kernel does not apply, the switch changes nothing anywhere.
    let not_applied = [
        Case { n: 200, k: 1024, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[33], x_offset: 0 },
        Case { n: 200, k: 1024, group: 64, bits: 8, dtype: Dtype::Bfloat16, lead: &[1], x_offset: 0 },
        Case { n: 200, k: 1024, group: 64, bits: 4, dtype: Dtype::Float32, lead: &[1], x_offset: 0 },
        // several rows of a K that is not a multiple of 128 (SmolLM2's 576)
        Case { n: 70, k: 576, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[1, 3], x_offset: 0 },
        // no rows at all
        Case { n: 200, k: 1024, group: 64, bits: 4, dtype: Dtype::Bfloat16, lead: &[0], x_offset: 0 },
    ];
    for (i, case) in not_applied.iter().enumerate() {
        let (_, theirs, ours) = run(case, 40 + i as u64, on_cuda);
        assert_eq!(Some(ours), theirs, "case {i}: the kernel ran where it should not");
    }
    fused_norms(on_cuda);
    norm_and_product(on_cuda);
    decode_attention(on_cuda);
    few_query_attention(on_cuda);
    qk_norm_rope(on_cuda);
    set_custom_kernels(before);
    eprintln!("custom kernels checked on {device}{}", if on_cuda { " (CUDA)" } else { "" });
}

/// `fast::fused_norm_add` with our kernels on against MLX's ops (the switch off): on CUDA within a
/// rounding of 16 bits of the largest value (its norms sum their squares in another order), a plain
/// sum (no norm of r) exactly; elsewhere bit for bit. Every variant, both 16-bit types, widths of
/// Gemma 3 1B, Llama 3 8B, Gemma 3 270M, one not a multiple of 8, one odd and one wider than a
/// block's 1,024 vectors, one row to 32, and an x that starts 2 bytes into its buffer (so the
/// kernel loads one value at a time).
fn fused_norms(on_cuda: bool) {
    let mut checked = 0;
    let cases = [
        (Dtype::Bfloat16, 1152, 1, false),
        (Dtype::Bfloat16, 4096, 3, false),
        (Dtype::Float16, 640, 32, false),
        (Dtype::Bfloat16, 100, 5, false),
        (Dtype::Bfloat16, 4099, 2, false),
        (Dtype::Float16, 10000, 2, false),
        (Dtype::Bfloat16, 1152, 2, true),
        // the tiny parity fixtures' width, a prompt's rows
        (Dtype::Bfloat16, 64, 10, false),
    ];
    for (i, &(dtype, d, rows, offset)) in cases.iter().enumerate() {
        let normal = |shape: &[i32], seed: u64, std: f32| normal_as(shape, seed, std, dtype);
        let x = if offset {
            let flat = normal(&[rows * d + 1], 100 + i as u64, 4.0);
            ops::reshape(&ops::slice(&flat, &[1], &[rows * d + 1]).unwrap(), &[rows, 1, d]).unwrap()
        } else {
            normal(&[rows, 1, d], 100 + i as u64, 4.0)
        };
        let r = normal(&[rows, 1, d], 200 + i as u64, 1.0);
        let (wr, wh) = (normal(&[d], 300 + i as u64, 1.0), normal(&[d], 400 + i as u64, 1.0));
        for (r_norm, h_norm) in [(true, true), (true, false), (false, true), (false, false)] {
            let (wr, wh) = (r_norm.then_some(&wr), h_norm.then_some(&wh));
            let run = |mode| {
                set_custom_kernels(mode);
                let (h, y) = mlx::fast::fused_norm_add(&x, &r, wr, wh, 1e-6).unwrap();
                (h.to_vec_f32().unwrap(), y.map(|y| y.to_vec_f32().unwrap()))
            };
            let (ours, theirs) = (run(CustomKernels::Always), run(CustomKernels::Off));
            assert_eq!(ours.1.is_some(), h_norm);
            let what = format!("{dtype:?} width {d} rows {rows}, norm of r {r_norm}, of h {h_norm}");
            if !on_cuda || !r_norm {
                assert_eq!(ours.0, theirs.0, "{what}: the sum");
            }
            if on_cuda {
                assert_within_a_rounding(&ours.0, &theirs.0, dtype, &format!("{what}: the sum"));
                if let (Some(a), Some(b)) = (&ours.1, &theirs.1) {
                    assert_within_a_rounding(a, b, dtype, &format!("{what}: the norm"));
                }
                // Another order of the sum of squares moves rsqrt by a float's last bit, which
                // rounds a 16-bit value otherwise only where it lies within that of a tie: a
                // value in a hundred differing means other roundings, not another order.
                for (name, a, b) in
                    [("sum", Some(&ours.0), Some(&theirs.0)), ("norm", ours.1.as_ref(), theirs.1.as_ref())]
                {
                    if let (Some(a), Some(b)) = (a, b) {
                        let (apart, ulps) = values_apart(a, b, dtype);
                        eprintln!("{what}: the {name}: {apart} of {} values differ, at most {ulps} units", a.len());
                        assert!(
                            apart * 100 <= a.len(),
                            "{what}: the {name}: {apart} of {} values differ from MLX's ops",
                            a.len()
                        );
                    }
                }
            } else {
                assert_eq!(ours.1, theirs.1, "{what}: the norm");
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * cases.len());
}

/// `fast::fused_norm_add_quantized_matmul`: on CUDA with our kernels on, for one row of x, bit for bit
/// the fused norm and the one-row product it joins (the same code, the same thread counts), h and the
/// product; `None` where it does not apply (several rows, 8 bits, the switch off) and everywhere off
/// CUDA. Llama 3 8B's width, Gemma 3 1B's with its post-norm, fp16 with group 128, an x that starts 2
/// bytes into its buffer, output rows not a multiple of a block's warps.
fn norm_and_product(on_cuda: bool) {
    let cases = [
        (Dtype::Bfloat16, 4096, 300, 64, false, false),
        (Dtype::Bfloat16, 1152, 257, 64, true, false),
        (Dtype::Float16, 2048, 129, 128, false, false),
        (Dtype::Bfloat16, 4096, 70, 32, true, true),
    ];
    let mut fused = 0;
    for (i, &(dtype, d, n, group, r_norm, offset)) in cases.iter().enumerate() {
        let normal = |shape: &[i32], seed: u64, std: f32| normal_as(shape, seed, std, dtype);
        let x = if offset {
            let flat = normal(&[d + 1], 500 + i as u64, 4.0);
            ops::reshape(&ops::slice(&flat, &[1], &[d + 1]).unwrap(), &[1, 1, d]).unwrap()
        } else {
            normal(&[1, 1, d], 500 + i as u64, 4.0)
        };
        let r = normal(&[1, 1, d], 600 + i as u64, 1.0);
        let (wr, wh) = (normal(&[d], 700 + i as u64, 1.0), normal(&[d], 800 + i as u64, 1.0));
        let wr = r_norm.then_some(&wr);
        let q = ops::quantize(&normal(&[n, d], 900 + i as u64, 0.02), group, 4).unwrap();
        let what = format!("{dtype:?} width {d}, {n} rows of w, group {group}, norm of r {r_norm}");
        set_custom_kernels(CustomKernels::Always);
        let joined = mlx::fast::fused_norm_add_quantized_matmul(&x, &r, wr, &wh, 1e-6, &q, None).unwrap();
        let (h, y) = mlx::fast::fused_norm_add(&x, &r, wr, Some(&wh), 1e-6).unwrap();
        let product = ops::quantized_matmul(&y.unwrap(), &q, true).unwrap();
        match joined {
            Some((jh, jp)) => {
                assert!(on_cuda, "{what}: joined off CUDA");
                assert_eq!(jh.shape(), h.shape(), "{what}: h's shape");
                assert_eq!(jp.shape(), vec![1, 1, n], "{what}: the product's shape");
                assert_eq!(jh.to_vec_f32().unwrap(), h.to_vec_f32().unwrap(), "{what}: h");
                assert_eq!(jp.to_vec_f32().unwrap(), product.to_vec_f32().unwrap(), "{what}: the product");
                fused += 1;
            }
            None => assert!(!on_cuda, "{what}: not joined on CUDA"),
        }
        // Where it does not apply: two rows of x, 8 bits, the switch off.
        let two = ops::concatenate(&[&x, &x], 0).unwrap();
        let two_r = ops::concatenate(&[&r, &r], 0).unwrap();
        let q8 = ops::quantize(&normal(&[n, d], 950 + i as u64, 0.02), group, 8).unwrap();
        for (xx, rr, qq, mode, why) in [
            (&two, &two_r, &q, CustomKernels::Always, "two rows"),
            (&x, &r, &q8, CustomKernels::Always, "8 bits"),
            (&x, &r, &q, CustomKernels::Off, "the switch off"),
        ] {
            set_custom_kernels(mode);
            let out = mlx::fast::fused_norm_add_quantized_matmul(xx, rr, wr, &wh, 1e-6, qq, None).unwrap();
            assert!(out.is_none(), "{what}: joined with {why}");
        }
    }
    assert_eq!(fused, if on_cuda { cases.len() } else { 0 });
    norm_product_and_rope(on_cuda);
}

/// The same with the rope after the product (a fused q/k/v projection of a model without q/k norms):
/// on CUDA with our kernels `Always` or `Auto`, the first heads bit for bit the joined product then
/// `fast::qk_norm_rope` without a norm, the rest the joined product's; `None` off CUDA, for a
/// traditional rope and for a rope of fewer features.
/// Llama 3 8B's q/k/v (40 heads of 128 rotated, 8 not, its own frequencies) and 32 heads of 64 in
/// fp16 with a base, a position scale and group 128.
fn norm_product_and_rope(on_cuda: bool) {
    use mlx::fast::{RopeFreqs, RopeOffset, Rotation};
    let llama_freqs = {
        let i = ops::arange(0.0, 64.0, 1.0, Dtype::Float32).unwrap();
        let e = ops::multiply_scalar(&i, 2.0 / 128.0).unwrap();
        ops::power(&Array::scalar_as(500_000.0, Dtype::Float32).unwrap(), &e).unwrap()
    };
    let cases = [
        (Dtype::Bfloat16, 4096, 64, 128, 40, 48, RopeFreqs::Custom(&llama_freqs), 1.0, 37),
        (Dtype::Float16, 2048, 128, 64, 24, 32, RopeFreqs::Base(10_000.0), 0.5, 5),
    ];
    let mut rotated = 0;
    for (i, &(dtype, d, group, hd, qk_heads, all_heads, freqs, scale, offset)) in cases.iter().enumerate() {
        let normal = |shape: &[i32], seed: u64, std: f32| normal_as(shape, seed, std, dtype);
        let (x, r) = (normal(&[1, 1, d], 1100 + i as u64, 4.0), normal(&[1, 1, d], 1200 + i as u64, 1.0));
        let wh = normal(&[d], 1300 + i as u64, 1.0);
        let q = ops::quantize(&normal(&[all_heads * hd, d], 1400 + i as u64, 0.02), group, 4).unwrap();
        let rotation = Rotation { dims: hd, traditional: false, freqs, scale, offset: RopeOffset::Fixed(offset) };
        let what = format!("{dtype:?} width {d}, {qk_heads} of {all_heads} heads of {hd} rotated");
        let rope = Some((qk_heads, hd, &rotation));
        for mode in [CustomKernels::Always, CustomKernels::Auto] {
            set_custom_kernels(mode);
            let what = format!("{what}, {mode:?}");
            let joined = mlx::fast::fused_norm_add_quantized_matmul(&x, &r, None, &wh, 1e-6, &q, rope).unwrap();
            let plain = mlx::fast::fused_norm_add_quantized_matmul(&x, &r, None, &wh, 1e-6, &q, None).unwrap();
            match (joined, plain) {
                (Some((jh, jy)), Some((ph, py))) => {
                    assert!(on_cuda, "{what}: joined off CUDA");
                    assert_eq!(jh.to_vec_f32().unwrap(), ph.to_vec_f32().unwrap(), "{what}: h");
                    let theirs = mlx::fast::qk_norm_rope(&py, qk_heads, hd, None, &rotation).unwrap();
                    let (ours, plain) = (jy.to_vec_f32().unwrap(), py.to_vec_f32().unwrap());
                    let split = (qk_heads * hd) as usize;
                    assert_eq!(ours[..split], theirs.to_vec_f32().unwrap()[..], "{what}: the rotated heads");
                    assert_eq!(ours[split..], plain[split..], "{what}: the heads not rotated");
                    rotated += 1;
                }
                (None, None) => assert!(!on_cuda, "{what}: not joined on CUDA"),
                (joined, plain) => {
                    panic!("{what}: with the rope {:?}, without {:?}", joined.is_some(), plain.is_some())
                }
            }
        }
        // Not joined with the rope: traditional, fewer features.
        set_custom_kernels(CustomKernels::Always);
        let traditional = Rotation { traditional: true, ..rotation };
        let partial = Rotation { dims: hd / 2, ..rotation };
        for (rot, why) in [(&traditional, "a traditional rope"), (&partial, "a rope of half the features")] {
            let out =
                mlx::fast::fused_norm_add_quantized_matmul(&x, &r, None, &wh, 1e-6, &q, Some((qk_heads, hd, rot)))
                    .unwrap();
            assert!(out.is_none(), "{what}: joined with {why}");
        }
    }
    assert_eq!(rotated, if on_cuda { 2 * cases.len() } else { 0 });
}

/// Attention for one query (`fast::scaled_dot_product_attention`, our decode kernel where MLX has no
/// fused one) with our kernels on against MLX's (the switch off) and an f32 reference: on CUDA no
/// further from the reference than MLX's own, or 1% of the largest value (the same roundings, sums
/// in another order); elsewhere bit for bit. Gemma 3's head size with and without masks, Llama's
/// with a mask per batch row, SmolLM2's with an additive mask, keys and values as the first
/// positions of a longer cache buffer, and cases it leaves to MLX (several queries; too many keys).
fn decode_attention(on_cuda: bool) {
    use mlx::fast::AttentionMask;
    // (batch, query heads, key/value heads, head size, keys, buffer positions, mask: 0 none,
    // 1 boolean shared, 2 boolean per row, 3 additive, queries)
    let cases = [
        (1, 4, 1, 256, 37, 37, 0, 1),
        (1, 4, 1, 256, 300, 512, 1, 1),
        (2, 4, 1, 256, 70, 256, 2, 1),
        (3, 32, 8, 128, 100, 256, 2, 1),
        (1, 9, 3, 64, 45, 45, 3, 1),
        (2, 8, 2, 128, 33, 64, 3, 1),
        (1, 4, 1, 256, 20, 20, 0, 2),
        (1, 4, 1, 256, 3000, 3000, 0, 1),
    ];
    for (i, &(b, h, hkv, d, len, cap, mask_kind, ql)) in cases.iter().enumerate() {
        let seed = 500 + 10 * i as u64;
        let normal = |shape: &[i32], seed: u64| normal_as(shape, seed, 1.0, Dtype::Float32);
        let q = normal(&[b, h, ql, d], seed);
        let k_buf = normal(&[b, hkv, cap, d], seed + 1);
        let v_buf = normal(&[b, hkv, cap, d], seed + 2);
        let mask = match mask_kind {
            1 => Some(ops::greater(&normal(&[len], seed + 3), &ops::scalar_like(&q, -0.8).unwrap()).unwrap()),
            2 => Some(ops::greater(&normal(&[b, 1, 1, len], seed + 3), &ops::scalar_like(&q, -0.8).unwrap()).unwrap()),
            3 => Some(normal(&[1, 1, 1, len], seed + 3)),
            _ => None,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let run = |dtype: Dtype, mode| {
            set_custom_kernels(mode);
            let cast = |a: &mlx::Array| ops::astype(a, dtype).unwrap();
            let prefix = |a: &mlx::Array| ops::slice(&cast(a), &[0, 0, 0, 0], &[b, hkv, len, d]).unwrap();
            let (q, k, v) = (cast(&q), prefix(&k_buf), prefix(&v_buf));
            let m = mask.as_ref().map(|m| if m.dtype() == Dtype::Bool { m.clone() } else { cast(m) });
            let m = m.as_ref().map_or(AttentionMask::None, AttentionMask::Array);
            let out = mlx::fast::scaled_dot_product_attention(&q, &k, &v, scale, m, None).unwrap();
            out.to_vec_f32().unwrap()
        };
        let reference = run(Dtype::Float32, CustomKernels::Off);
        for dtype in [Dtype::Bfloat16, Dtype::Float16] {
            let what = format!(
                "case {i} ({b} x {h}/{hkv} heads of {d}, {len} keys, mask {mask_kind}, {ql} queries) {dtype:?}"
            );
            let (ours, theirs) = (run(dtype, CustomKernels::Always), run(dtype, CustomKernels::Off));
            if on_cuda {
                let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let (err_ours, err_theirs) = (max_abs_diff(&ours, &reference), max_abs_diff(&theirs, &reference));
                assert!(
                    err_ours <= err_theirs.max(0.01 * scale) * 1.5,
                    "{what}: ours is {err_ours} from the f32 reference, MLX's {err_theirs}"
                );
            } else {
                assert_eq!(ours, theirs, "{what}: the switch changed a result off CUDA");
            }
        }
    }
}

/// Attention for a few queries after cached keys (speculative decoding's check: causal, or
/// unmasked) with our kernels `Always` and `Auto` (alike) against `fast::grouped_attention` (the
/// composed steps with cuDNN's roundings, what ran there before) and an f32 reference: on CUDA within two roundings of
/// the composed steps (sums in another order) and no further from the reference than they are;
/// elsewhere bit for bit MLX's. SmolLM2's, Llama 3's and Gemma 3's heads, keys as the first
/// positions of a longer buffer.
fn few_query_attention(on_cuda: bool) {
    use mlx::fast::AttentionMask;
    // (batch, query heads, key/value heads, head size, keys, buffer positions, queries, causal)
    let cases = [
        (1, 9, 3, 64, 45, 64, 4, true),
        (1, 32, 8, 128, 300, 512, 4, true),
        (2, 4, 1, 256, 70, 128, 2, true),
        (1, 32, 8, 128, 100, 100, 2, false),
    ];
    for (i, &(b, h, hkv, d, len, cap, ql, causal)) in cases.iter().enumerate() {
        let seed = 900 + 10 * i as u64;
        let normal = |shape: &[i32], seed: u64| normal_as(shape, seed, 1.0, Dtype::Float32);
        let (q, k_buf, v_buf) =
            (normal(&[b, h, ql, d], seed), normal(&[b, hkv, cap, d], seed + 1), normal(&[b, hkv, cap, d], seed + 2));
        let scale = 1.0 / (d as f32).sqrt();
        let mask = if causal { AttentionMask::Causal } else { AttentionMask::None };
        let run = |dtype: Dtype, mode, grouped: bool| {
            set_custom_kernels(mode);
            let cast = |a: &mlx::Array| ops::astype(a, dtype).unwrap();
            let prefix = |a: &mlx::Array| ops::slice(&cast(a), &[0, 0, 0, 0], &[b, hkv, len, d]).unwrap();
            let (q, k, v) = (cast(&q), prefix(&k_buf), prefix(&v_buf));
            let out = if grouped {
                mlx::fast::grouped_attention(&q, &k, &v, scale, mask).unwrap()
            } else {
                mlx::fast::scaled_dot_product_attention(&q, &k, &v, scale, mask, None).unwrap()
            };
            out.to_vec_f32().unwrap()
        };
        let reference = run(Dtype::Float32, CustomKernels::Off, false);
        for dtype in [Dtype::Bfloat16, Dtype::Float16] {
            let what =
                format!("case {i} ({b} x {h}/{hkv} heads of {d}, {len} keys, {ql} queries, causal {causal}) {dtype:?}");
            let ours = run(dtype, CustomKernels::Always, false);
            // `Auto` takes the kernel too.
            assert_eq!(ours, run(dtype, CustomKernels::Auto, false), "{what}: Auto against Always");
            if on_cuda {
                let composed = run(dtype, CustomKernels::Always, true);
                assert_within_a_rounding(&ours, &composed, dtype, &what);
                let (apart, most) = values_apart(&ours, &composed, dtype);
                eprintln!(
                    "{what}: {apart} of {} values differ from the composed steps, at most {most} units",
                    ours.len()
                );
                let top = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let (err_ours, err_composed) = (max_abs_diff(&ours, &reference), max_abs_diff(&composed, &reference));
                assert!(
                    err_ours <= err_composed.max(0.01 * top) * 1.5,
                    "{what}: ours is {err_ours} from the f32 reference, the composed steps {err_composed}"
                );
            } else {
                assert_eq!(ours, run(dtype, CustomKernels::Off, false), "{what}: the switch changed a result off CUDA");
            }
        }
    }
}

/// `fast::qk_norm_rope` (the q and k heads of a fused projection's output, normed and rotated) with
/// our kernels on and off against MLX's ops composed here (slice, heads, `rms_norm` without a
/// weight, the product with the weight, `rope`): with the switch off exactly those ops everywhere;
/// with it on, on CUDA within a rounding of 16 bits of the largest value (the norm sums its squares
/// in another order), elsewhere bit for bit. Gemma 3's heads (a norm; one offset, one a batch row),
/// Llama 3's (its frequencies, no norm), SmolLM2's rotated traditionally over two positions, and
/// cases the kernel leaves to MLX (a partial rotation, a head size not a multiple of 64).
fn qk_norm_rope(on_cuda: bool) {
    use mlx::Array;
    use mlx::fast::{RopeFreqs, RopeOffset, Rotation};
    // (batch, positions, heads, head size, rotated dims, norm, traditional, frequencies, offsets)
    let cases = [
        (1, 1, 5, 256, 256, true, false, false, &[37][..]),
        (3, 1, 5, 256, 256, true, false, false, &[3, 100, 7][..]),
        (1, 1, 40, 128, 128, false, false, true, &[1000][..]),
        (2, 1, 40, 128, 128, false, false, true, &[12, 5][..]),
        (1, 2, 12, 64, 64, false, true, false, &[5][..]),
        (2, 3, 6, 128, 128, true, false, false, &[0, 9][..]),
        (1, 1, 5, 256, 128, true, false, false, &[4][..]),
        (1, 1, 6, 96, 96, true, false, false, &[4][..]),
    ];
    for (i, &(b, l, heads, d, dims, norm, traditional, custom, offsets)) in cases.iter().enumerate() {
        let seed = 700 + 10 * i as u64;
        let normal = |shape: &[i32], seed: u64, dtype: Dtype| normal_as(shape, seed, 2.0, dtype);
        // Half again as many features as the heads take (v's, left alone).
        let n = heads * d + heads * d / 2;
        let freqs: Vec<f32> = (0..dims / 2).map(|j| 10_000f32.powf(2.0 * j as f32 / dims as f32) * 1.5).collect();
        let freqs = Array::from_slice(&freqs, &[dims / 2]).unwrap();
        let offset_arr = Array::from_slice(offsets, &[offsets.len() as i32]).unwrap();
        for dtype in [Dtype::Bfloat16, Dtype::Float16] {
            let y = normal(&[b, l, n], seed, dtype);
            let w = normal(&[heads, 1, d], seed + 1, dtype);
            let rotation = Rotation {
                dims,
                traditional,
                freqs: if custom { RopeFreqs::Custom(&freqs) } else { RopeFreqs::Base(10_000.0) },
                scale: 1.0,
                offset: if offsets.len() == 1 { RopeOffset::Fixed(offsets[0]) } else { RopeOffset::Array(&offset_arr) },
            };
            let norm = norm.then_some((&w, 1e-6f32));
            let run = |mode| {
                set_custom_kernels(mode);
                mlx::fast::qk_norm_rope(&y, heads, d, norm, &rotation).unwrap().to_vec_f32().unwrap()
            };
            let (ours, off) = (run(CustomKernels::Always), run(CustomKernels::Off));
            let heads_of_y = ops::slice(&y, &[0, 0, 0], &[b, l, heads * d]).unwrap();
            let qk = ops::transpose(&ops::reshape(&heads_of_y, &[b, l, heads, d]).unwrap(), &[0, 2, 1, 3]).unwrap();
            let qk = match norm {
                Some((w, eps)) => ops::multiply(&mlx::fast::rms_norm(&qk, None, eps).unwrap(), w).unwrap(),
                None => qk,
            };
            let r = rotation;
            let theirs = mlx::fast::rope(&qk, r.dims, r.traditional, r.freqs, r.scale, r.offset).unwrap();
            assert_eq!(theirs.shape(), vec![b, heads, l, d]);
            let theirs = theirs.to_vec_f32().unwrap();
            let what = format!("case {i} ({b} x {l} positions, {heads} heads of {d}, dims {dims}) {dtype:?}");
            assert_eq!(off, theirs, "{what}: with the switch off, MLX's ops exactly");
            if on_cuda {
                assert_within_a_rounding(&ours, &theirs, dtype, &what);
            } else {
                assert_eq!(ours, theirs, "{what}: the switch changed a result off CUDA");
            }
        }
    }
}
