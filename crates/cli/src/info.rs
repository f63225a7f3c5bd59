// SPDX-License-Identifier: EUPL-1.2
//! `mlxr info`: the MLX version, the devices, the BLAS in use, the registered backends, and a model's
//! shape.

use inference_core::{LoadSettings, ModelInfo};

use crate::args::InfoArgs;
use crate::failure::Failure;

pub(crate) fn run(args: &InfoArgs) -> Result<(), Failure> {
    println!("mlxr {}", env!("CARGO_PKG_VERSION"));
    print!("{}", platform());
    for backend in inference_core::global().backends() {
        let state = if backend.available() {
            "available".to_owned()
        } else {
            format!("unavailable: {}", backend.unavailable_reason().unwrap_or_else(|| "no reason given".to_owned()))
        };
        println!("backend {}: {state}", backend.name());
    }
    if let Some(path) = &args.model {
        let mut settings = LoadSettings::new().device(args.device).dtype(args.dtype);
        settings.backend = args.backend.clone();
        if let Some(python) = &args.python {
            settings = settings.backend_option("python", python.to_string_lossy());
        }
        let model = crate::args::load_model(path, &settings)?;
        print!("{}", describe(&path.display().to_string(), model.model_type(), &model.info()));
        model.close()?;
    }
    Ok(())
}

/// The MLX version and what MLX says about each device it has.
#[cfg(feature = "metal")]
fn platform() -> String {
    use mlx::Device;
    let mut out = format!("MLX {}\n", mlx::mlx_version());
    let default = Device::mlx_default().map(|d| d.to_string()).unwrap_or_else(|e| format!("unknown ({e})"));
    out.push_str(&format!("default device: {default}\n"));
    for device in [Device::Gpu, Device::Cpu] {
        if !device.is_available() {
            out.push_str(&format!("device {device}: not available\n"));
            continue;
        }
        match device.info() {
            Ok(info) => {
                let memory = info.memory_bytes().map(|b| format!(", {:.1} GB", b as f64 / 1e9)).unwrap_or_default();
                out.push_str(&format!("device {device}: {}{memory}\n", info.name()));
            }
            Err(e) => out.push_str(&format!("device {device}: available ({e})\n")),
        }
    }
    out.push_str(&blas_lines(&mlx::blas::info()));
    out
}

/// The BLAS MLX's CPU matmuls call in this process (with OpenBLAS's thread
/// count), and a warning with the fix when it is the reference BLAS.
#[cfg(feature = "metal")]
fn blas_lines(info: &mlx::blas::BlasInfo) -> String {
    let mut out = format!("BLAS: {}\n", info.describe());
    if let Some(warning) = info.warning() {
        out.push_str(&format!("warning: {warning}\n"));
    }
    out
}

#[cfg(not(feature = "metal"))]
fn platform() -> String {
    "MLX: not linked (built without the metal feature)\n".to_owned()
}

/// A loaded model's shape, one `key: value` per line.
pub(crate) fn describe(path: &str, model_type: &str, info: &ModelInfo) -> String {
    let quant = match (info.quant_bits, info.quant_group) {
        (Some(bits), Some(group)) => format!("{bits}-bit, group size {group}"),
        (Some(bits), None) => format!("{bits}-bit"),
        _ => "none".to_owned(),
    };
    let context = info.context_length.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
    let compute = match (&info.compute_dtype, &info.compute_dtype_reason) {
        (Some(dtype), Some(reason)) => format!("{dtype} ({reason})"),
        (Some(dtype), None) => dtype.clone(),
        (None, _) => "not reported by the backend".to_owned(),
    };
    format!(
        "model: {path}\narchitecture: {model_type}\nlayers: {}\nhidden size: {}\nvocabulary: {}\n\
         quantisation: {quant}\ncontext length: {context}\ncompute dtype: {compute}\n",
        info.num_layers, info.hidden_size, info.vocab_size
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_lists_the_shape() {
        let info = ModelInfo {
            architecture: "qwen3".into(),
            vocab_size: 100,
            num_layers: 2,
            hidden_size: 64,
            quant_bits: Some(4),
            quant_group: Some(64),
            context_length: None,
            ..ModelInfo::default()
        };
        let text = describe("/m", "qwen3", &info);
        assert!(text.contains("layers: 2\n"), "{text}");
        assert!(text.contains("quantisation: 4-bit, group size 64\n"), "{text}");
        assert!(text.contains("context length: unknown\n"), "{text}");
        assert!(text.contains("compute dtype: not reported by the backend\n"), "{text}");
        let info =
            ModelInfo { compute_dtype: Some("float32".into()), compute_dtype_reason: Some("auto: why".into()), ..info };
        assert!(describe("/m", "qwen3", &info).contains("compute dtype: float32 (auto: why)\n"));
    }

    #[cfg(feature = "metal")]
    #[test]
    fn blas_lines_warn_about_the_reference_blas() {
        use mlx::blas::{BlasInfo, OpenBlas};
        let reference = BlasInfo { library: Some("/m/mlx_cpu.libs/libblas-1.so.3".into()), openblas: None };
        let text = blas_lines(&reference);
        assert!(text.starts_with("BLAS: /m/mlx_cpu.libs/libblas-1.so.3 (the reference BLAS)\n"), "{text}");
        assert!(text.contains("warning: ") && text.contains("cargo xtask setup"), "{text}");
        let openblas = BlasInfo {
            library: Some("/t/libopenblas.so.0".into()),
            openblas: Some(OpenBlas { config: "OpenBLAS 0.3.31".into(), threads: 2 }),
        };
        assert_eq!(blas_lines(&openblas), "BLAS: /t/libopenblas.so.0 (OpenBLAS 0.3.31, 2 threads)\n");
    }
}
