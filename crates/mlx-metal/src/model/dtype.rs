// SPDX-License-Identifier: EUPL-1.2
//! The compute type: the floating-point type a model's weights are cast to
//! at load, and whether a quantised checkpoint's layers are dequantised. The
//! activations and the KV cache follow the weights (a cache takes the type
//! of the first keys it stores), so the weights are the whole change.
//!
//! What is cast is what mlx-lm's `model.set_dtype(dtype)` casts: every
//! floating-point tensor of the checkpoint — dense weights, biases, norms,
//! embeddings, and a quantised layer's scales and biases — but never a
//! quantised layer's packed `uint32` weights. Dequantising
//! ([`Compute::dequantise`]) turns every quantised linear layer and the
//! embedding table into a dense matrix of the compute type. Both happen as
//! tensors are looked up ([`super::weights::Weights`]), before the model is
//! built, so fused projections, tied heads and tensor-parallel slices all see
//! the final tensors.
//!
//! `auto` ([`DtypePolicy::Auto`], inference-core's `ComputeDtype::Auto`):
//!
//! - a 16-bit (bfloat16 or float16) checkpoint on an x86_64 CPU computes in
//!   float32 when MLX's float32 matmuls reach an optimised BLAS (OpenBLAS,
//!   Accelerate: [`mlx::blas::info`]); its 16-bit matmuls never reach BLAS.
//!   On the reference BLAS float32 measured slower (0.5–0.7× the prefill
//!   rate), so the checkpoint's own type is kept there;
//! - a quantised checkpoint on a CPU is dequantised to float32 when that
//!   measures faster and fits ([`quant_choice`], measured at load by
//!   [`super::quant_probe`]): MLX's quantised matmul on a CPU is its own
//!   kernel, while a dense float32 matmul reaches BLAS (SmolLM2 and Gemma 3
//!   270M prefilled 5–15× faster dequantised, docs/benchmarks.md); the
//!   decode, which reads every weight from memory, can go either way;
//! - everything else (a GPU, other CPUs, float32 checkpoints) keeps the
//!   checkpoint's own types.
//!
//! An explicit type casts every floating-point tensor to it. `float32` on a
//! quantised checkpoint also dequantises, unless the dense weights would take
//! more than half the available memory (dense float32 is what float32
//! compute means, and what reaches BLAS; before, it only cast the scales and
//! kept MLX's quantised matmul); `bfloat16` and `float16` keep the packed
//! weights and cast their scales, as mlx-lm's `set_dtype` does. The metal
//! backend option `quantised` (`auto`, `keep`, `dequantise`:
//! [`QuantisedPolicy`]) overrides what happens to quantised layers.

use inference_core::ComputeDtype;
use mlx::Dtype;
use mlx::device::Device;

pub use super::quant_choice::{
    DECODE_TOLERANCE, DENSE_MEMORY_SHARE, MIN_DENSE_BYTES, MatmulTimes, QuantChoice, QuantFacts, Timing, fits,
    quant_choice,
};

/// How the compute type is chosen at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypePolicy {
    /// The checkpoint's own types: nothing is cast ([`super::load`]; what
    /// the parity tests against mlx-lm's defaults use).
    #[default]
    Checkpoint,
    /// The load setting `auto` for a model on this device (see the module
    /// documentation).
    Auto(Device),
    /// Every floating-point tensor cast to this type.
    Cast(Dtype),
}

impl DtypePolicy {
    /// The policy for inference-core's load setting, for a model on `device`.
    pub fn from_setting(setting: ComputeDtype, device: Device) -> DtypePolicy {
        match setting {
            ComputeDtype::Auto => DtypePolicy::Auto(device),
            ComputeDtype::Float32 => DtypePolicy::Cast(Dtype::Float32),
            ComputeDtype::Bfloat16 => DtypePolicy::Cast(Dtype::Bfloat16),
            ComputeDtype::Float16 => DtypePolicy::Cast(Dtype::Float16),
        }
    }
}

/// What happens to a quantised checkpoint's packed layers (the metal
/// backend option `quantised`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantisedPolicy {
    /// What the [`DtypePolicy`] implies: `auto` measures on a CPU, an
    /// explicit `float32` dequantises, the rest keep them.
    #[default]
    Auto,
    /// Keep them quantised, whatever the compute type.
    Keep,
    /// Dequantise them to dense matrices of the compute type.
    Dequantise,
}

impl QuantisedPolicy {
    /// The backend option's value: `auto`, `keep` or `dequantise`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuantisedPolicy::Auto => "auto",
            QuantisedPolicy::Keep => "keep",
            QuantisedPolicy::Dequantise => "dequantise",
        }
    }

    /// Parses the backend option's value: `auto`, `keep` or `dequantise`
    /// (also `dequantize`); `None` for anything else.
    pub fn parse(s: &str) -> Option<QuantisedPolicy> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(QuantisedPolicy::Auto),
            "keep" => Some(QuantisedPolicy::Keep),
            "dequantise" | "dequantize" => Some(QuantisedPolicy::Dequantise),
            _ => None,
        }
    }
}

/// What a checkpoint holds, as far as the compute type cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointTypes {
    /// The type of most of its floating-point tensors (float32 when it has none).
    pub float: Dtype,
    /// Whether its linear layers are quantised.
    pub quantised: bool,
}

/// The facts of this machine that `auto` depends on, passed in so that
/// every answer can be tested anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// Whether the CPU is x86_64.
    pub x86_64: bool,
    /// Whether MLX's float32 CPU matmuls reach an optimised BLAS (not the
    /// reference BLAS MLX's Linux wheel carries; [`mlx::blas::info`]).
    pub optimised_blas: bool,
}

impl Host {
    /// This process: its CPU architecture and the BLAS MLX calls.
    pub fn this() -> Host {
        let blas = mlx::blas::info();
        let optimised_blas = blas.openblas.is_some() || (blas.library.is_some() && !blas.is_reference());
        Host { x86_64: cfg!(target_arch = "x86_64"), optimised_blas }
    }
}

/// The compute type a model was loaded with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compute {
    /// The type the model computes in (for a quantised checkpoint kept as
    /// it is: the type of its scales, which its activations take).
    pub dtype: Dtype,
    /// The type every floating-point tensor is cast to; `None` when nothing
    /// is cast.
    pub cast: Option<Dtype>,
    /// Whether quantised layers are dequantised to dense matrices of `dtype`.
    pub dequantise: bool,
    /// Why, in words (`mlxr info`, `/health` and `/metrics` show it).
    pub reason: String,
}

/// The compute type for a checkpoint under the policies, on `host`, with
/// what was measured of a quantised checkpoint (`quant`; see
/// [`super::quant_probe::facts`], which measures only where this needs it:
/// [`needs_timing`]).
pub fn choose_on(
    policy: DtypePolicy,
    quantised: QuantisedPolicy,
    checkpoint: CheckpointTypes,
    host: Host,
    quant: Option<&QuantFacts>,
) -> Compute {
    let own = checkpoint.float;
    let keep = |reason: String| Compute { dtype: own, cast: None, dequantise: false, reason };
    let cast = |to: Dtype, dequantise: bool, reason: String| Compute {
        dtype: to,
        cast: (to != own || dequantise).then_some(to),
        dequantise,
        reason,
    };
    if checkpoint.quantised {
        return choose_quantised(policy, quantised, checkpoint, host, quant);
    }
    match policy {
        DtypePolicy::Checkpoint => keep(format!("the checkpoint's own type ({own})")),
        DtypePolicy::Cast(to) => {
            let reason = if to == own {
                format!("dtype = {to} was asked for (the checkpoint's own type)")
            } else {
                format!("dtype = {to} was asked for (the checkpoint is {own})")
            };
            Compute { dtype: to, cast: Some(to), dequantise: false, reason }
        }
        DtypePolicy::Auto(Device::Cpu) if host.x86_64 && matches!(own, Dtype::Bfloat16 | Dtype::Float16) => {
            if host.optimised_blas {
                cast(
                    Dtype::Float32,
                    false,
                    format!(
                        "auto: a {own} checkpoint on an x86_64 CPU computes in float32 (MLX's CPU matmuls reach the \
                         optimised BLAS only in float32)"
                    ),
                )
            } else {
                keep(format!(
                    "auto: the checkpoint's own type ({own}): MLX's float32 matmuls would run on the reference BLAS, \
                     slower than {own} (run `cargo xtask setup` for OpenBLAS)"
                ))
            }
        }
        DtypePolicy::Auto(Device::Cpu) if own == Dtype::Float32 => keep("auto: the checkpoint is float32".into()),
        DtypePolicy::Auto(Device::Cpu) => keep(format!("auto: the checkpoint's own type ({own}) on this CPU")),
        DtypePolicy::Auto(Device::Gpu) => keep(format!("auto: the checkpoint's own type ({own}) on the GPU")),
    }
}

/// The compute type the embedding table and the output head come out in
/// when they keep the checkpoint's 16-bit type while everything else is cast
/// to float32; `None` when they are cast like the rest.
///
/// That is a dense bfloat16 or float16 checkpoint computing in float32 on a
/// CPU (`auto` on x86 with an optimised BLAS, or an explicit `float32`). The
/// head is the biggest matrix of a small model (Gemma 3 270M: 262,144 × 640,
/// 63% of its weights) and a token's head is one row times it, bound by
/// reading it: [`mlx::ops::widen_matmul`] reads it in 16 bits and computes in
/// float32, a quarter of the time of the float32 matmul on OpenBLAS
/// (docs/benchmarks.md). 16-bit values widen to float32 exactly, so the
/// logits are the float32 model's up to the order of the sums; the table's
/// looked-up rows are widened the same way, and it takes half the memory.
/// On a GPU, where the matmuls run in the checkpoint's type anyway, nothing
/// changes.
///
/// A quantised checkpoint dequantised to float32 on a CPU keeps its table and
/// head quantised the same way: their float32 scales make the looked-up rows
/// exactly the dequantised ones, and a token's head runs
/// [`mlx::ops::widen_quantized_matmul`], which reads the packed matrix (an
/// eighth of float32's bytes at 4 bits) instead of a dense float32 copy.
pub fn narrow_tables(compute: &Compute, checkpoint: CheckpointTypes, device: Device) -> Option<Dtype> {
    let float32 = device == Device::Cpu && compute.dtype == Dtype::Float32 && compute.cast == Some(Dtype::Float32);
    let sixteen_bit =
        !checkpoint.quantised && !compute.dequantise && matches!(checkpoint.float, Dtype::Bfloat16 | Dtype::Float16);
    let dequantised = checkpoint.quantised && compute.dequantise;
    (float32 && (sixteen_bit || dequantised)).then_some(Dtype::Float32)
}

/// Whether every linear layer keeps a twin of its matrix as stored beside its
/// float32 copy (`Weights::set_narrow_layers`): where the table and head stay
/// narrow ([`narrow_tables`] is `Some`) and the float32 copies and the twins
/// together (`dense_bytes + stored_bytes`) take at most half the `available`
/// memory ([`DENSE_MEMORY_SHARE`]; unknown memory: no). A decode step is
/// bound by reading the weights, and its few rows read the twin through our
/// kernels (half the bytes at 16 bits, an eighth at 4); prefill keeps BLAS
/// on the float32 copy, so it is no slower.
pub fn narrow_layers(tables: Option<Dtype>, dense_bytes: u64, stored_bytes: u64, available: Option<u64>) -> bool {
    let need = dense_bytes.saturating_add(stored_bytes) as f64;
    tables.is_some() && available.is_some_and(|a| need <= a as f64 * DENSE_MEMORY_SHARE)
}

/// Whether [`choose_on`] for these policies and checkpoint reads
/// [`QuantFacts::timing`]: `auto` on a CPU for a quantised checkpoint.
pub fn needs_timing(policy: DtypePolicy, quantised: QuantisedPolicy, checkpoint: CheckpointTypes) -> bool {
    checkpoint.quantised && quantised == QuantisedPolicy::Auto && policy == DtypePolicy::Auto(Device::Cpu)
}

fn choose_quantised(
    policy: DtypePolicy,
    quantised: QuantisedPolicy,
    checkpoint: CheckpointTypes,
    host: Host,
    quant: Option<&QuantFacts>,
) -> Compute {
    let own = checkpoint.float;
    let kept = |dtype: Dtype, reason: String| Compute {
        dtype,
        cast: (dtype != own).then_some(dtype),
        dequantise: false,
        reason,
    };
    let dense = |dtype: Dtype, reason: String| Compute { dtype, cast: Some(dtype), dequantise: true, reason };
    let scales = |d: Dtype| format!("quantised layers kept, scales and norms in {d}");
    match (policy, quantised) {
        (DtypePolicy::Checkpoint, _) => kept(own, format!("the checkpoint's own types ({})", scales(own))),
        (DtypePolicy::Cast(to), QuantisedPolicy::Keep) => {
            kept(to, format!("dtype = {to} was asked for, quantised = keep ({})", scales(to)))
        }
        (DtypePolicy::Cast(to), QuantisedPolicy::Dequantise) => {
            dense(to, format!("dtype = {to} was asked for, quantised = dequantise (dense {to})"))
        }
        (DtypePolicy::Cast(Dtype::Float32), QuantisedPolicy::Auto) => match quant.map(fits) {
            Some(Err(why)) => kept(
                Dtype::Float32,
                format!("dtype = float32 was asked for; not dequantised because {why} ({})", scales(Dtype::Float32)),
            ),
            _ => dense(
                Dtype::Float32,
                "dtype = float32 was asked for: quantised layers dequantised to dense float32".into(),
            ),
        },
        (DtypePolicy::Cast(to), QuantisedPolicy::Auto) => {
            kept(to, format!("dtype = {to} was asked for ({}; quantised = dequantise makes them dense)", scales(to)))
        }
        (DtypePolicy::Auto(device), QuantisedPolicy::Keep) => {
            kept(own, format!("auto on the {}, quantised = keep ({})", device_name(device), scales(own)))
        }
        (DtypePolicy::Auto(Device::Cpu), QuantisedPolicy::Dequantise) => {
            let to = if host.optimised_blas || !host.x86_64 { Dtype::Float32 } else { own };
            dense(to, format!("auto on the CPU, quantised = dequantise (dense {to})"))
        }
        (DtypePolicy::Auto(Device::Gpu), QuantisedPolicy::Dequantise) => {
            dense(own, format!("auto on the GPU, quantised = dequantise (dense {own})"))
        }
        (DtypePolicy::Auto(Device::Gpu), QuantisedPolicy::Auto) => {
            kept(own, format!("auto: a quantised checkpoint on the GPU is kept as it is ({})", scales(own)))
        }
        (DtypePolicy::Auto(Device::Cpu), QuantisedPolicy::Auto) => {
            let missing = QuantFacts { dense_bytes: 0, available_bytes: None, timing: None };
            match quant_choice(quant.unwrap_or(&missing)) {
                QuantChoice::Dequantise(why) => {
                    dense(Dtype::Float32, format!("auto: quantised layers dequantised to dense float32: {why}"))
                }
                QuantChoice::Keep(why) => kept(own, format!("auto: kept quantised ({}): {why}", scales(own))),
            }
        }
    }
}

fn device_name(device: Device) -> &'static str {
    match device {
        Device::Cpu => "CPU",
        Device::Gpu => "GPU",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const BF16: CheckpointTypes = CheckpointTypes { float: Dtype::Bfloat16, quantised: false };
    const F16: CheckpointTypes = CheckpointTypes { float: Dtype::Float16, quantised: false };
    const F32: CheckpointTypes = CheckpointTypes { float: Dtype::Float32, quantised: false };
    const Q4: CheckpointTypes = CheckpointTypes { float: Dtype::Bfloat16, quantised: true };
    const Q4F32: CheckpointTypes = CheckpointTypes { float: Dtype::Float32, quantised: true };
    const FAST: Host = Host { x86_64: true, optimised_blas: true };
    const REFERENCE: Host = Host { x86_64: true, optimised_blas: false };
    const ARM: Host = Host { x86_64: false, optimised_blas: true };
    const GB: u64 = 1_000_000_000;

    fn choose(policy: DtypePolicy, ck: CheckpointTypes, host: Host, quant: Option<&QuantFacts>) -> Compute {
        choose_on(policy, QuantisedPolicy::Auto, ck, host, quant)
    }

    fn auto(device: Device, ck: CheckpointTypes, host: Host) -> (Dtype, Option<Dtype>) {
        let c = choose(DtypePolicy::Auto(device), ck, host, None);
        (c.dtype, c.cast)
    }

    #[test]
    fn tables_stay_narrow_only_for_a_16_bit_checkpoint_computing_in_float32_on_a_cpu() {
        let f32_cast = |ck| choose(DtypePolicy::Cast(Dtype::Float32), ck, FAST, None);
        let auto_cpu = choose(DtypePolicy::Auto(Device::Cpu), BF16, FAST, None);
        assert_eq!(narrow_tables(&auto_cpu, BF16, Device::Cpu), Some(Dtype::Float32));
        assert_eq!(narrow_tables(&f32_cast(F16), F16, Device::Cpu), Some(Dtype::Float32));
        // Not on a GPU, not for float32 checkpoints, not when
        // nothing is cast or the cast is to a 16-bit type.
        assert_eq!(narrow_tables(&f32_cast(BF16), BF16, Device::Gpu), None);
        assert_eq!(narrow_tables(&f32_cast(F32), F32, Device::Cpu), None);
        // A quantised checkpoint: when it is dequantised to float32 (its table
        // and head stay quantised), not when its layers are kept.
        let dense_q4 = choose_on(DtypePolicy::Cast(Dtype::Float32), QuantisedPolicy::Dequantise, Q4, FAST, None);
        assert_eq!(narrow_tables(&dense_q4, Q4, Device::Cpu), Some(Dtype::Float32));
        assert_eq!(narrow_tables(&dense_q4, Q4, Device::Gpu), None);
        let kept_q4 = choose_on(DtypePolicy::Cast(Dtype::Float32), QuantisedPolicy::Keep, Q4, FAST, None);
        assert_eq!(narrow_tables(&kept_q4, Q4, Device::Cpu), None);
        let own = choose(DtypePolicy::Checkpoint, BF16, FAST, None);
        assert_eq!(narrow_tables(&own, BF16, Device::Cpu), None);
        let reference = choose(DtypePolicy::Auto(Device::Cpu), BF16, REFERENCE, None);
        assert_eq!(narrow_tables(&reference, BF16, Device::Cpu), None);
        let half = choose(DtypePolicy::Cast(Dtype::Float16), BF16, FAST, None);
        assert_eq!(narrow_tables(&half, BF16, Device::Cpu), None);
    }

    #[test]
    fn layers_keep_twins_only_with_narrow_tables_and_room() {
        let f32 = Some(Dtype::Float32);
        assert!(narrow_layers(f32, 4 * GB, 2 * GB, Some(12 * GB)));
        assert!(!narrow_layers(f32, 4 * GB, 2 * GB, Some(11 * GB)), "more than half the memory");
        assert!(!narrow_layers(f32, 4 * GB, 2 * GB, None), "unknown memory");
        assert!(!narrow_layers(None, 4 * GB, 2 * GB, Some(100 * GB)), "tables cast");
    }

    fn ms(n: f64) -> Duration {
        Duration::from_secs_f64(n / 1e3)
    }

    /// Facts with the quantised and dense times for 1 and 32 rows, and the memory.
    fn facts(decode: (f64, f64), prefill: (f64, f64), dense_gb: f64, avail_gb: Option<f64>) -> QuantFacts {
        let times = |rows, (q, d): (f64, f64)| MatmulTimes { rows, quantised: ms(q), dense: ms(d) };
        QuantFacts {
            dense_bytes: (dense_gb * GB as f64) as u64,
            available_bytes: avail_gb.map(|g| (g * GB as f64) as u64),
            timing: Some(Ok(Timing {
                decode: times(1, decode),
                decode_layers: 37,
                decode_bytes: 134_217_728,
                prefill: times(32, prefill),
                shape: (1536, 576),
                bits: 4,
            })),
        }
    }

    #[test]
    fn auto_takes_float32_for_16_bit_checkpoints_on_an_x86_cpu_with_an_optimised_blas_only() {
        assert_eq!(auto(Device::Cpu, BF16, FAST), (Dtype::Float32, Some(Dtype::Float32)));
        assert_eq!(auto(Device::Cpu, F16, FAST), (Dtype::Float32, Some(Dtype::Float32)));
        assert_eq!(auto(Device::Cpu, F32, FAST), (Dtype::Float32, None));
        assert_eq!(auto(Device::Cpu, BF16, ARM), (Dtype::Bfloat16, None));
        assert_eq!(auto(Device::Gpu, BF16, FAST), (Dtype::Bfloat16, None));
        assert_eq!(auto(Device::Gpu, F16, ARM), (Dtype::Float16, None));
        // On the reference BLAS float32 is slower: the checkpoint's type, and why.
        assert_eq!(auto(Device::Cpu, BF16, REFERENCE), (Dtype::Bfloat16, None));
        let c = choose(DtypePolicy::Auto(Device::Cpu), BF16, REFERENCE, None);
        assert!(c.reason.contains("reference BLAS"), "{}", c.reason);
        let c = choose(DtypePolicy::Auto(Device::Cpu), BF16, FAST, None);
        assert!(c.reason.contains("optimised BLAS") && !c.dequantise, "{}", c.reason);
    }

    #[test]
    fn auto_dequantises_on_a_cpu_when_dense_measures_faster_and_fits() {
        let f = facts((2.0, 0.2), (40.0, 1.0), 0.6, Some(20.0));
        assert!(matches!(quant_choice(&f), QuantChoice::Dequantise(_)));
        let c = choose(DtypePolicy::Auto(Device::Cpu), Q4F32, FAST, Some(&f));
        assert_eq!((c.dtype, c.cast, c.dequantise), (Dtype::Float32, Some(Dtype::Float32), true));
        assert!(c.reason.starts_with("auto: quantised layers dequantised to dense float32"), "{}", c.reason);
        // The figures are in the reason.
        for part in [
            "1 row: 2.000 ms quantised, 0.200 ms dense through 37 layers (0.13 GB dense)",
            "32 rows: 40.000 ms quantised, 1.000 ms dense through a [1536, 576] 4-bit layer",
            "0.60 GB",
        ] {
            assert!(c.reason.contains(part), "{part}: {}", c.reason);
        }
        // A bfloat16-scaled checkpoint becomes dense float32 too.
        let c = choose(DtypePolicy::Auto(Device::Cpu), Q4, REFERENCE, Some(&f));
        assert_eq!((c.dtype, c.dequantise), (Dtype::Float32, true));
    }

    #[test]
    fn a_decode_up_to_10_percent_slower_is_worth_a_faster_prefill() {
        for decode in [(10.0, 10.0), (10.0, 10.9), (10.0, 5.0)] {
            let f = facts(decode, (40.0, 1.0), 0.6, Some(20.0));
            assert!(matches!(quant_choice(&f), QuantChoice::Dequantise(_)), "{decode:?}");
        }
    }

    #[test]
    fn auto_keeps_quantised_when_dense_prefills_slower_or_decodes_much_slower() {
        for (f, says) in [
            (facts((10.0, 11.2), (40.0, 1.0), 0.6, Some(20.0)), "more than 10% slower to decode"),
            (facts((2.0, 0.2), (1.0, 3.0), 0.6, Some(20.0)), "not faster to prefill"),
            (facts((1.0, 1.0), (1.0, 1.0), 0.6, Some(20.0)), "not faster to prefill"),
        ] {
            let QuantChoice::Keep(why) = quant_choice(&f) else { panic!("dequantised: {f:?}") };
            assert!(why.contains(says), "{why}");
            let c = choose(DtypePolicy::Auto(Device::Cpu), Q4, FAST, Some(&f));
            assert_eq!((c.dtype, c.cast, c.dequantise), (Dtype::Bfloat16, None, false));
            assert!(c.reason.starts_with("auto: kept quantised"), "{}", c.reason);
        }
    }

    #[test]
    fn auto_keeps_quantised_when_the_dense_weights_would_not_fit() {
        // Faster, but 6 GB dense against 10 GB available is more than half.
        let f = facts((2.0, 0.2), (40.0, 1.0), 6.0, Some(10.0));
        let QuantChoice::Keep(why) = quant_choice(&f) else { panic!("dequantised") };
        assert!(why.contains("6.00 GB, more than half of the 10.00 GB available"), "{why}");
        // Exactly half fits.
        assert!(matches!(quant_choice(&facts((2.0, 0.2), (40.0, 1.0), 5.0, Some(10.0))), QuantChoice::Dequantise(_)));
        // Unknown memory, a failed or a missing measurement: kept.
        let f = facts((2.0, 0.2), (40.0, 1.0), 0.1, None);
        assert!(matches!(quant_choice(&f), QuantChoice::Keep(w) if w.contains("unknown")));
        let f = facts((2.0, 0.2), (40.0, 1.0), 0.1, Some(10.0));
        let failed = QuantFacts { timing: Some(Err("boom".into())), ..f.clone() };
        assert!(matches!(quant_choice(&failed), QuantChoice::Keep(w) if w.contains("boom")));
        let c = choose(DtypePolicy::Auto(Device::Cpu), Q4, FAST, None);
        assert_eq!((c.dtype, c.dequantise), (Dtype::Bfloat16, false));
        // A model too small to matter is kept whatever the times.
        let tiny = facts((2.0, 0.2), (40.0, 1.0), 0.03, Some(10.0));
        assert!(matches!(quant_choice(&tiny), QuantChoice::Keep(w) if w.contains("too small")));
    }

    #[test]
    fn auto_keeps_quantised_checkpoints_on_the_gpu_without_measuring() {
        let f = facts((2.0, 0.2), (40.0, 1.0), 0.6, Some(20.0));
        let c = choose(DtypePolicy::Auto(Device::Gpu), Q4, FAST, Some(&f));
        assert_eq!((c.dtype, c.cast, c.dequantise), (Dtype::Bfloat16, None, false));
        assert!(needs_timing(DtypePolicy::Auto(Device::Cpu), QuantisedPolicy::Auto, Q4));
        assert!(!needs_timing(DtypePolicy::Auto(Device::Gpu), QuantisedPolicy::Auto, Q4));
        assert!(!needs_timing(DtypePolicy::Auto(Device::Cpu), QuantisedPolicy::Keep, Q4));
        assert!(!needs_timing(DtypePolicy::Cast(Dtype::Float32), QuantisedPolicy::Auto, Q4));
        assert!(!needs_timing(DtypePolicy::Auto(Device::Cpu), QuantisedPolicy::Auto, BF16));
    }

    #[test]
    fn an_explicit_float32_dequantises_and_16_bit_types_keep_the_packing() {
        let c = choose(DtypePolicy::Cast(Dtype::Float32), Q4, FAST, None);
        assert_eq!((c.dtype, c.cast, c.dequantise), (Dtype::Float32, Some(Dtype::Float32), true));
        assert!(c.reason.contains("dtype = float32 was asked for"), "{}", c.reason);
        // ...unless it cannot fit at all.
        let huge = facts((2.0, 0.2), (40.0, 1.0), 60.0, Some(20.0));
        let c = choose(DtypePolicy::Cast(Dtype::Float32), Q4, FAST, Some(&huge));
        assert_eq!((c.dtype, c.dequantise), (Dtype::Float32, false));
        assert!(c.reason.contains("not dequantised"), "{}", c.reason);
        let c = choose(DtypePolicy::Cast(Dtype::Float16), Q4, FAST, None);
        assert_eq!((c.dtype, c.cast, c.dequantise), (Dtype::Float16, Some(Dtype::Float16), false));
        assert!(c.reason.contains("dtype = float16 was asked for"), "{}", c.reason);
        // The backend option overrides both ways.
        let keep = choose_on(DtypePolicy::Cast(Dtype::Float32), QuantisedPolicy::Keep, Q4F32, FAST, None);
        assert_eq!((keep.dtype, keep.cast, keep.dequantise), (Dtype::Float32, None, false));
        let dense = choose_on(DtypePolicy::Cast(Dtype::Bfloat16), QuantisedPolicy::Dequantise, Q4, FAST, None);
        assert_eq!((dense.dtype, dense.cast, dense.dequantise), (Dtype::Bfloat16, Some(Dtype::Bfloat16), true));
        let keep = choose_on(DtypePolicy::Auto(Device::Cpu), QuantisedPolicy::Keep, Q4, FAST, None);
        assert_eq!((keep.dtype, keep.cast, keep.dequantise), (Dtype::Bfloat16, None, false));
        let dense = choose_on(DtypePolicy::Auto(Device::Cpu), QuantisedPolicy::Dequantise, Q4, FAST, None);
        assert_eq!((dense.dtype, dense.dequantise), (Dtype::Float32, true));
    }

    #[test]
    fn the_checkpoint_policy_never_casts_and_settings_map_to_policies() {
        let c = choose(DtypePolicy::Checkpoint, BF16, FAST, None);
        assert_eq!((c.dtype, c.cast, c.dequantise), (Dtype::Bfloat16, None, false));
        let c = choose(DtypePolicy::Checkpoint, Q4, FAST, Some(&facts((2.0, 0.2), (40.0, 1.0), 0.6, Some(20.0))));
        assert_eq!((c.dtype, c.cast, c.dequantise), (Dtype::Bfloat16, None, false));
        let c = choose(DtypePolicy::Cast(Dtype::Bfloat16), BF16, FAST, None);
        assert_eq!((c.dtype, c.cast), (Dtype::Bfloat16, Some(Dtype::Bfloat16)));
        assert_eq!(DtypePolicy::from_setting(ComputeDtype::Bfloat16, Device::Cpu), DtypePolicy::Cast(Dtype::Bfloat16));
        assert_eq!(DtypePolicy::from_setting(ComputeDtype::Auto, Device::Gpu), DtypePolicy::Auto(Device::Gpu));
        assert_eq!(QuantisedPolicy::parse(" Dequantize "), Some(QuantisedPolicy::Dequantise));
        assert_eq!(QuantisedPolicy::parse("keep"), Some(QuantisedPolicy::Keep));
        assert_eq!(QuantisedPolicy::parse("no"), None);
    }
}
