// SPDX-License-Identifier: EUPL-1.2
//! `mlxr convert` end to end: the converted model generates here what mlx-lm generates on it
//! (the `mlx_lm` backend, through `MLXR_PYTHON`), on a tiny fixture and on the real SmolLM2;
//! progress lines when standard error is not a terminal; bad input refused by name. The tensors
//! themselves are compared with mlx_lm.convert's in `crates/mlx-metal/tests/convert.rs`.

mod common;

use std::path::Path;

use common::{run, skip, smollm2, text, tiny};

fn convert(args: &[&str]) -> (bool, String) {
    let out = run(&[&["convert"], args].concat(), "");
    let (stdout, stderr) = text(&out);
    assert_eq!(stdout, "", "convert prints nothing on standard output");
    (out.status.success(), stderr)
}

/// Greedy output of `model` through the metal backend and through mlx-lm, both computing in
/// float32 on the quantised layers as they are (bfloat16 quantised matmuls are slow on a CPU).
/// mlx-lm's detokeniser drops the leading space of the first token, so that is not compared.
fn assert_generates_as_mlx_lm(test: &str, model: &Path, prompt: &str, tokens: &str) {
    let Some(python) = std::env::var("MLXR_PYTHON").ok().filter(|p| !p.is_empty()) else {
        return skip(test, "MLXR_PYTHON is not set (cargo xtask test sets it to the fixtures virtualenv)");
    };
    let model = model.to_str().expect("a UTF-8 path");
    let base = ["generate", "-m", model, "--max-tokens", tokens, "--ignore-eos", "--raw", "--dtype", "float32", prompt];
    let metal = run(&[&base[..], &["--quantised", "keep"]].concat(), "");
    let mlx_lm = run(&[&base[..], &["--backend", "mlx_lm", "--python", &python]].concat(), "");
    assert!(metal.status.success() && mlx_lm.status.success(), "{:?} {:?}", text(&metal), text(&mlx_lm));
    let (ours, theirs) = (text(&metal).0, text(&mlx_lm).0);
    assert!(ours.trim().len() > 1, "{ours:?}");
    assert_eq!(ours.trim_start(), theirs.trim_start(), "greedy output on the converted model through metal and mlx_lm");
}

#[test]
fn a_converted_tiny_model_generates_as_mlx_lm_does_on_it() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("qwen3-4bit");
    let model = tiny("qwen3-tiny");
    let (ok, err) = convert(&["--model", &model, "--mlx-path", out.to_str().expect("UTF-8"), "-q", "--q-bits", "4"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].starts_with("converting a qwen3 model: ") && lines[0].contains("floats as bfloat16"), "{err}");
    assert!(lines[0].ends_with("15 layers quantised"), "{err}");
    assert!(lines[1].starts_with("wrote model.safetensors ("), "{err}");
    assert!(lines[2].starts_with(&format!("converted {model} to {}", out.display())), "{err}");
    assert!(lines[2].contains("bits per weight"), "{err}");
    assert_generates_as_mlx_lm("a_converted_tiny_model_generates_as_mlx_lm_does_on_it", &out, "Hello", "12");
}

#[test]
fn a_converted_smollm2_generates_as_mlx_lm_does_on_it() {
    let test = "a_converted_smollm2_generates_as_mlx_lm_does_on_it";
    let Some(model) = smollm2(test) else { return };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("smollm2-mixed");
    let args =
        ["--hf-path", &model, "--mlx-path", out.to_str().expect("UTF-8"), "-q", "--quant-predicate", "mixed_4_6"];
    let (ok, err) = convert(&args);
    assert!(ok, "{err}");
    assert_generates_as_mlx_lm(test, &out, "The capital of France is", "16");
}

#[test]
fn bad_input_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("out");
    let out_s = out.to_str().expect("UTF-8").to_owned();
    let model = tiny("llama-tiny");

    let nowhere = dir.path().join("nowhere");
    let (ok, err) = convert(&["--hf-path", nowhere.to_str().expect("UTF-8"), "--mlx-path", &out_s]);
    assert!(!ok && err.starts_with("mlxr: error: convert: ") && err.contains("nowhere: no such directory"), "{err}");

    let empty = dir.path().join("weightless");
    std::fs::create_dir(&empty).expect("a directory");
    std::fs::copy(Path::new(&model).join("config.json"), empty.join("config.json")).expect("copy");
    let (ok, err) = convert(&["--hf-path", empty.to_str().expect("UTF-8"), "--mlx-path", &out_s]);
    assert!(!ok && err.contains("weightless") && err.contains("no model*.safetensors files"), "{err}");

    let bert = dir.path().join("bert");
    std::fs::create_dir(&bert).expect("a directory");
    std::fs::write(bert.join("config.json"), r#"{"model_type": "bert"}"#).expect("config");
    let (ok, err) = convert(&["--hf-path", bert.to_str().expect("UTF-8"), "--mlx-path", &out_s]);
    assert!(!ok && err.contains("unsupported architecture \"bert\"") && err.contains("qwen3"), "{err}");

    for (flag, value, want) in [
        ("--q-bits", "5", "invalid value '5' for '--q-bits <BITS>': choose 2, 3, 4, 6 or 8 bits"),
        ("--q-group-size", "16", "invalid value '16' for '--q-group-size <SIZE>': choose 32, 64 or 128"),
        ("--dtype", "float64", "invalid value 'float64' for '--dtype <TYPE>': choose float16, bfloat16 or float32"),
        ("--quant-predicate", "mixed_5_6", "invalid value 'mixed_5_6' for '--quant-predicate <RECIPE>'"),
    ] {
        let o = run(&["convert", "--hf-path", &model, "--mlx-path", &out_s, "-q", flag, value], "");
        assert_eq!(o.status.code(), Some(2), "a usage error");
        assert!(text(&o).1.contains(want), "{}", text(&o).1);
    }
    assert!(!out.exists(), "nothing was written");

    std::fs::create_dir(&out).expect("a directory");
    std::fs::write(out.join("notes.txt"), "mine").expect("a file");
    let (ok, err) = convert(&["--hf-path", &model, "--mlx-path", &out_s]);
    assert!(!ok && err.contains("already holds 1 entry (notes.txt)") && err.contains("--force"), "{err}");
    let (ok, err) = convert(&["--hf-path", &model, "--mlx-path", &out_s, "--force", "--q-bits", "8"]);
    assert!(ok, "{err}");
    assert!(err.starts_with("note: --q-bits only take effect with -q/--quantize"), "{err}");
    assert!(!out.join("notes.txt").exists() && out.join("config.json").is_file());
}
