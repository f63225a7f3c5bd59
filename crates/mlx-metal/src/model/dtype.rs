// SPDX-License-Identifier: EUPL-1.2
//! The compute type: the floating-point type a model's weights are cast to
//! at load. The activations and the KV cache follow the weights (a cache
//! takes the type of the first keys it stores), so casting the weights is
//! the whole change.
//!
//! What is cast is what mlx-lm's `model.set_dtype(dtype)` casts: every
//! floating-point tensor of the checkpoint — dense weights, biases, norms,
//! embeddings, and a quantised layer's scales and biases — but never a
//! quantised layer's packed `uint32` weights. The cast happens as tensors are
//! looked up ([`super::weights::Weights`]), before the model is built, so
//! fused projections, tied heads and tensor-parallel slices all see the
//! cast tensors.
//!
//! `auto` ([`DtypePolicy::Auto`], inference-core's `ComputeDtype::Auto`):
//! float32 for a 16-bit (bfloat16 or float16) checkpoint on an x86_64 CPU,
//! where MLX's float32 matmuls go through BLAS and its 16-bit ones do not;
//! the checkpoint's own type on a GPU, on other CPUs (Apple Silicon) and for
//! float32 checkpoints. Quantised checkpoints are kept as they are for now:
//! choosing between MLX's quantised matmul and dequantising at load by
//! measurement is left for later.

use inference_core::ComputeDtype;
use mlx::Dtype;
use mlx::device::Device;

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

/// What a checkpoint holds, as far as the compute type cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointTypes {
    /// The type of most of its floating-point tensors (float32 when it has none).
    pub float: Dtype,
    /// Whether its linear layers are quantised.
    pub quantised: bool,
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
    /// Why, in words (`mlxr info` shows it).
    pub reason: String,
}

/// The compute type for a checkpoint under a policy, on this machine.
pub fn choose(policy: DtypePolicy, checkpoint: CheckpointTypes) -> Compute {
    choose_on(policy, checkpoint, cfg!(target_arch = "x86_64"))
}

/// [`choose`] with the CPU architecture given (`x86_64` or not), so that
/// both answers can be tested anywhere.
pub fn choose_on(policy: DtypePolicy, checkpoint: CheckpointTypes, x86_64: bool) -> Compute {
    let own = checkpoint.float;
    let keep = |reason: String| Compute { dtype: own, cast: None, reason };
    match policy {
        DtypePolicy::Checkpoint => keep(format!("the checkpoint's own type ({own})")),
        DtypePolicy::Cast(to) => {
            let reason = if to == own && !checkpoint.quantised {
                format!("dtype = {to} was asked for (the checkpoint's own type)")
            } else {
                format!("dtype = {to} was asked for (the checkpoint is {own}{})", quantised_note(checkpoint))
            };
            Compute { dtype: to, cast: Some(to), reason }
        }
        DtypePolicy::Auto(_) if checkpoint.quantised => keep(format!(
            "auto: a quantised checkpoint is kept as it is (scales and norms in {own}); choosing by measurement \
             is not done yet"
        )),
        DtypePolicy::Auto(Device::Cpu) if x86_64 && matches!(own, Dtype::Bfloat16 | Dtype::Float16) => Compute {
            dtype: Dtype::Float32,
            cast: Some(Dtype::Float32),
            reason: format!(
                "auto: a {own} checkpoint on an x86_64 CPU computes in float32 (MLX's CPU matmuls reach BLAS only in \
                 float32)"
            ),
        },
        DtypePolicy::Auto(Device::Cpu) if own == Dtype::Float32 => keep("auto: the checkpoint is float32".into()),
        DtypePolicy::Auto(Device::Cpu) => keep(format!("auto: the checkpoint's own type ({own}) on this CPU")),
        DtypePolicy::Auto(Device::Gpu) => keep(format!("auto: the checkpoint's own type ({own}) on the GPU")),
    }
}

fn quantised_note(checkpoint: CheckpointTypes) -> &'static str {
    if checkpoint.quantised { ", quantised: its packed weights stay as they are" } else { "" }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BF16: CheckpointTypes = CheckpointTypes { float: Dtype::Bfloat16, quantised: false };
    const F16: CheckpointTypes = CheckpointTypes { float: Dtype::Float16, quantised: false };
    const F32: CheckpointTypes = CheckpointTypes { float: Dtype::Float32, quantised: false };
    const Q4: CheckpointTypes = CheckpointTypes { float: Dtype::Bfloat16, quantised: true };

    fn auto(device: Device, ck: CheckpointTypes, x86: bool) -> (Dtype, Option<Dtype>) {
        let c = choose_on(DtypePolicy::Auto(device), ck, x86);
        (c.dtype, c.cast)
    }

    #[test]
    fn auto_takes_float32_for_16_bit_checkpoints_on_an_x86_cpu_only() {
        assert_eq!(auto(Device::Cpu, BF16, true), (Dtype::Float32, Some(Dtype::Float32)));
        assert_eq!(auto(Device::Cpu, F16, true), (Dtype::Float32, Some(Dtype::Float32)));
        assert_eq!(auto(Device::Cpu, F32, true), (Dtype::Float32, None));
        assert_eq!(auto(Device::Cpu, BF16, false), (Dtype::Bfloat16, None));
        assert_eq!(auto(Device::Gpu, BF16, true), (Dtype::Bfloat16, None));
        assert_eq!(auto(Device::Gpu, F16, false), (Dtype::Float16, None));
    }

    #[test]
    fn auto_keeps_quantised_checkpoints() {
        assert_eq!(auto(Device::Cpu, Q4, true), (Dtype::Bfloat16, None));
        assert_eq!(auto(Device::Gpu, Q4, true), (Dtype::Bfloat16, None));
        assert!(choose_on(DtypePolicy::Auto(Device::Cpu), Q4, true).reason.contains("quantised"));
    }

    #[test]
    fn an_explicit_type_is_always_cast_and_the_checkpoint_policy_never() {
        let c = choose_on(DtypePolicy::Cast(Dtype::Float16), Q4, true);
        assert_eq!((c.dtype, c.cast), (Dtype::Float16, Some(Dtype::Float16)));
        assert!(c.reason.contains("dtype = float16 was asked for"), "{}", c.reason);
        let c = choose_on(DtypePolicy::Checkpoint, BF16, true);
        assert_eq!((c.dtype, c.cast), (Dtype::Bfloat16, None));
        assert_eq!(DtypePolicy::from_setting(ComputeDtype::Bfloat16, Device::Cpu), DtypePolicy::Cast(Dtype::Bfloat16));
        assert_eq!(DtypePolicy::from_setting(ComputeDtype::Auto, Device::Gpu), DtypePolicy::Auto(Device::Gpu));
    }
}
