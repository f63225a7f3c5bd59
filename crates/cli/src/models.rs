// SPDX-License-Identifier: EUPL-1.2
//! `mlxr models`: model directories under a directory, as a table.

use std::fmt::Write as _;
use std::path::PathBuf;

use inference_core::DiscoveredModel;

use crate::args::ModelsArgs;
use crate::failure::Failure;

pub(crate) fn run(args: &ModelsArgs) -> Result<(), Failure> {
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => default_dir().ok_or_else(|| {
            Failure::new("no directory given, and neither MLXR_MODELS_DIR nor HOME is set to find the default")
        })?,
    };
    let mut walk = inference_core::discover(&dir)?;
    let found: Vec<DiscoveredModel> = walk.by_ref().collect();
    for skipped in walk.skipped() {
        tracing::warn!(path = %skipped.path.display(), error = %skipped.error, "skipped: cannot read");
    }
    if args.json {
        for m in &found {
            println!("{}", json_line(m));
        }
    } else if found.is_empty() {
        eprintln!("no models under {} (a model directory holds config.json and *.safetensors)", dir.display());
    } else {
        print!("{}", table(&found));
    }
    Ok(())
}

/// `$MLXR_MODELS_DIR`, else `~/.cache/mlxr/models` (where `cargo xtask fixtures` puts models).
fn default_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("MLXR_MODELS_DIR")
        .or_else(|| var("MLXR_CACHE_DIR").map(|c| c.join("models")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("mlxr").join("models")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("mlxr").join("models")))
}

fn quantisation(m: &DiscoveredModel) -> String {
    match (m.quant_bits, m.quant_group) {
        (Some(bits), Some(group)) => format!("{bits}-bit/{group}"),
        (Some(bits), None) => format!("{bits}-bit"),
        _ => "-".to_owned(),
    }
}

/// The models as an aligned table with a header row.
pub(crate) fn table(models: &[DiscoveredModel]) -> String {
    let header = ["PATH", "TYPE", "QUANTISATION", "FILES"];
    let rows: Vec<[String; 4]> = models
        .iter()
        .map(|m| {
            [
                m.path.display().to_string(),
                m.model_type.clone().unwrap_or_else(|| "?".to_owned()),
                quantisation(m),
                m.num_files.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 4]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                let _ = write!(text, "{cell:>w$}");
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3]]);
    }
    out
}

fn json_line(m: &DiscoveredModel) -> String {
    serde_json::json!({
        "path": m.path,
        "model_type": m.model_type,
        "quant_bits": m.quant_bits,
        "quant_group": m.quant_group,
        "num_files": m.num_files,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(path: &str, ty: Option<&str>, bits: Option<u32>, files: usize) -> DiscoveredModel {
        DiscoveredModel {
            path: PathBuf::from(path),
            model_type: ty.map(str::to_owned),
            quant_bits: bits,
            quant_group: bits.map(|_| 64),
            num_files: files,
        }
    }

    #[test]
    fn the_table_is_aligned() {
        let t = table(&[model("/m/a", Some("qwen3"), Some(4), 1), model("/m/longer-name", None, None, 12)]);
        let expected = [
            "PATH            TYPE   QUANTISATION  FILES",
            "/m/a            qwen3  4-bit/64          1",
            "/m/longer-name  ?      -                12",
        ];
        assert_eq!(t, expected.join("\n") + "\n");
    }

    #[test]
    fn json_lines_carry_every_field() {
        let v: serde_json::Value = serde_json::from_str(&json_line(&model("/x", Some("llama"), None, 2))).unwrap();
        assert_eq!(v["path"], "/x");
        assert_eq!(v["model_type"], "llama");
        assert!(v["quant_bits"].is_null());
        assert_eq!(v["num_files"], 2);
    }
}
