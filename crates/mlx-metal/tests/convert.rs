// SPDX-License-Identifier: EUPL-1.2
//! `convert`: Hugging Face checkpoints to MLX models, tensor for tensor what `mlx_lm.convert`
//! writes with the same options (run through `MLXR_PYTHON`; skipped with a note when it is not
//! set, unless `MLXR_REQUIRE_REAL_MODELS=1`), on every tiny fixture and (`convert/real.rs`) on
//! SmolLM2 and Gemma 3 270M; what is written loads here; bad input is refused by name.

#[path = "convert/real.rs"]
mod real;
#[path = "convert/support.rs"]
mod support;

use std::path::Path;

use mlx_metal::convert::{self, ConvertOptions, Event, Recipe};
use mlx_metal::lora::IfExists;
use mlx_metal::mlx::io;
use mlx_metal::mlx::{Array, Dtype};
use support::{Job, convert_and_compare, python, tiny};

fn q(bits: Option<i32>, group: Option<i32>, recipe: Option<Recipe>) -> ConvertOptions {
    ConvertOptions { quantize: true, q_bits: bits, q_group_size: group, quant_predicate: recipe, ..Default::default() }
}

#[test]
fn tiny_fixtures_convert_as_mlx_lm_converts_them() {
    let Some(python) = python() else { return };
    let work = tempfile::tempdir().expect("a temporary directory");
    let mut jobs = Vec::new();
    let fixtures = ["llama-tiny", "llama3-tiny", "qwen2-tiny", "qwen3-tiny", "gemma3-tiny", "gemma3-tiny-mm"];
    for (i, name) in fixtures.into_iter().enumerate() {
        let src = tiny(name);
        let sets = [
            ("plain", ConvertOptions::default()),
            ("f16", ConvertOptions { dtype: Some(Dtype::Float16), ..Default::default() }),
            ("q4g64", q(None, None, None)),
            ("q3g32", q(Some(3), Some(32), None)),
            ("q8g128", ConvertOptions { dtype: Some(Dtype::Bfloat16), ..q(Some(8), Some(128), None) }),
            // The recipes without a group size write mlx-lm's `"group_size": null` per layer.
            ("mixed", q(None, None, Some(Recipe::ALL[i % 4]))),
            ("mixed_g32", q(Some(2), Some(32), Some(Recipe::ALL[(i + 1) % 4]))),
            // Shards of at most 40 kB, cut where mlx-lm's make_shards cuts them.
            ("shards", ConvertOptions { max_shard_bytes: 40_000, ..q(Some(6), None, None) }),
        ];
        for (set, options) in sets {
            jobs.push(Job::new(&src, &format!("{name}-{set}"), options));
        }
    }
    // Inputs of other shapes: sharded with an index, float16, and with the tensors mlx-lm's
    // sanitize drops (a tied lm_head.weight, rotary_emb.inv_freq).
    let inputs = work.path().join("inputs");
    let sharded = inputs.join("llama-sharded");
    let shards = ConvertOptions { max_shard_bytes: 100_000, ..Default::default() };
    convert::convert(&tiny("llama-tiny"), &sharded, &shards, &mut |_| {}).expect("a sharded checkpoint");
    assert!(sharded.join("model-00002-of-00006.safetensors").is_file());
    let half = inputs.join("gemma3-f16");
    let f16 = ConvertOptions { dtype: Some(Dtype::Float16), ..Default::default() };
    convert::convert(&tiny("gemma3-tiny"), &half, &f16, &mut |_| {}).expect("a float16 checkpoint");
    let extras = inputs.join("qwen2-extras");
    with_dropped_tensors(&tiny("qwen2-tiny"), &extras);
    for (src, set, options) in [
        (&sharded, "plain", ConvertOptions::default()),
        (&sharded, "q4g64", q(None, None, None)),
        (&half, "f32", ConvertOptions { dtype: Some(Dtype::Float32), ..Default::default() }),
        (&half, "q4g32", ConvertOptions { dtype: Some(Dtype::Float16), ..q(None, Some(32), None) }),
        (&extras, "plain", ConvertOptions::default()),
        (&extras, "mixed", q(None, None, Some(Recipe::Mixed3_4))),
    ] {
        let name = src.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        jobs.push(Job::new(src, &format!("{name}-{set}"), options));
    }
    convert_and_compare(&python, &jobs, work.path());
    for job in &jobs {
        let out = work.path().join("ours").join(&job.name);
        let loaded = mlx_metal::model::load(&out).unwrap_or_else(|e| panic!("loading {}: {e}", job.name));
        assert!(loaded.model.num_layers() > 0);
    }
}

/// A copy of the tied `src` with a `lm_head.weight` and a `rotary_emb.inv_freq` added, which
/// mlx-lm's sanitize drops (as Hugging Face checkpoints sometimes carry them).
fn with_dropped_tensors(src: &Path, out: &Path) {
    std::fs::create_dir_all(out).expect("a directory");
    for f in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), out.join(f)).expect("copying the fixture");
    }
    let mut tensors = io::load_safetensors(src.join("model.safetensors")).expect("the fixture").tensors;
    let embed = tensors["model.embed_tokens.weight"].clone();
    tensors.insert("lm_head.weight".into(), embed);
    let freqs = Array::from_slice(&[1.0f32, 0.5, 0.25, 0.125], &[4]).expect("an array");
    tensors.insert("model.layers.0.self_attn.rotary_emb.inv_freq".into(), freqs);
    let meta = [("format".to_owned(), "pt".to_owned())].into_iter().collect();
    io::save_safetensors(out.join("model.safetensors"), tensors.iter().map(|(k, v)| (k.as_str(), v)), &meta)
        .expect("saving the checkpoint");
}

#[test]
fn progress_is_reported_tensor_by_tensor_and_shard_by_shard() {
    let out = tempfile::tempdir().expect("a temporary directory");
    let dest = out.path().join("m");
    let mut events = Vec::new();
    let options = ConvertOptions { max_shard_bytes: 40_000, ..q(None, None, None) };
    let summary = convert::convert(&tiny("qwen3-tiny"), &dest, &options, &mut |e| events.push(format!("{e:?}")))
        .expect("converting qwen3-tiny");
    assert!(events[0].starts_with("Start { architecture: \"qwen3\", dtype: Some(Bfloat16)"), "{}", events[0]);
    let tensors = events.iter().filter(|e| e.starts_with("Tensor")).count();
    let shards = events.iter().filter(|e| e.starts_with("Shard")).count();
    assert_eq!((tensors, shards), (summary.tensors, summary.shards.len()));
    assert!(summary.shards.len() > 1, "{:?}", summary.shards);
    assert!((summary.bits_per_weight() - 4.5).abs() < 1.0, "{}", summary.bits_per_weight());
    assert_eq!(summary.quantised_layers, 1 + 2 * 7, "the embedding (tied) and seven linear layers per block");
}

fn err(src: &Path, out: &Path, options: &ConvertOptions) -> String {
    match convert::convert(src, out, options, &mut |_: Event<'_>| {}) {
        Ok(_) => panic!("converting {} should fail", src.display()),
        Err(e) => e.to_string(),
    }
}

/// A copy of a tiny fixture with config.json edited by `edit`.
fn edited(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let copy = dir.join(name);
    std::fs::create_dir_all(&copy).expect("a directory");
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny("llama-tiny").join(f), copy.join(f)).expect("copying the fixture");
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(copy.join("config.json")).expect("config")).expect("JSON");
    edit(&mut config);
    std::fs::write(copy.join("config.json"), config.to_string()).expect("writing config.json");
    copy
}

#[test]
fn bad_input_is_refused_by_name_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("out");
    let plain = ConvertOptions::default();
    let e = err(&dir.path().join("nowhere"), &out, &plain);
    assert!(e.contains("nowhere") && e.contains("no such directory"), "{e}");

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("a directory");
    assert!(err(&empty, &out, &plain).contains("no config.json"));
    std::fs::copy(tiny("llama-tiny").join("config.json"), empty.join("config.json")).expect("copy");
    let e = err(&empty, &out, &plain);
    assert!(e.contains("no model*.safetensors files"), "{e}");

    let bert = edited(dir.path(), "bert", |c| c["model_type"] = "bert".into());
    let e = err(&bert, &out, &plain);
    assert!(e.contains("unsupported architecture \"bert\"") && e.contains("llama"), "{e}");

    let e = err(&tiny("llama-tiny-8bit"), &out, &plain);
    assert!(e.contains("already quantised"), "{e}");

    let wide = edited(dir.path(), "wide", |c| c["hidden_size"] = 128.into());
    let e = err(&wide, &out, &plain);
    assert!(e.contains("model.embed_tokens.weight has shape [512, 64]; the config says [512, 128]"), "{e}");

    let tied = edited(dir.path(), "deep", |c| c["num_hidden_layers"] = 3.into());
    let e = err(&tied, &out, &plain);
    assert!(e.contains("no tensor model.layers.2.self_attn.q_proj.weight"), "{e}");

    let huge = edited(dir.path(), "huge", |c| c["num_hidden_layers"] = 2_000_000_000.into());
    let e = err(&huge, &out, &plain);
    assert!(e.contains("num_hidden_layers = 2000000000 but the checkpoint has only 21 tensors"), "{e}");

    let shallow = edited(dir.path(), "shallow", |c| c["num_hidden_layers"] = 1.into());
    let e = err(&shallow, &out, &plain);
    assert!(e.contains("are not parameters of a llama model: model.layers.1."), "{e}");

    for (options, want) in [
        (q(Some(5), None, None), "5 bits is not supported: choose 2, 3, 4, 6 or 8"),
        (q(None, Some(48), None), "group size 48 is not supported: choose 32, 64 or 128"),
    ] {
        let e = err(&tiny("llama-tiny"), &out, &options);
        assert!(e.contains(want), "{e}");
    }
    assert!(!out.exists(), "no failed conversion leaves a directory");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "no hidden work directory is left: {names:?}");
}

#[test]
fn a_used_destination_is_refused_unless_forced_and_then_replaced_whole() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("a directory");
    std::fs::write(out.join("old.safetensors"), b"stale").expect("a file");
    let src = tiny("qwen2-tiny");
    let e = err(&src, &out, &ConvertOptions::default());
    assert!(e.contains("already holds 1 entry (old.safetensors)") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(out.join("old.safetensors")).expect("untouched"), b"stale");

    let e = err(&src, &src, &ConvertOptions { if_exists: IfExists::Replace, ..Default::default() });
    assert!(e.contains("is the model being converted"), "{e}");
    let e = err(
        &src,
        src.parent().expect("parent"),
        &ConvertOptions { if_exists: IfExists::Replace, ..Default::default() },
    );
    assert!(e.contains("holds the model being converted"), "{e}");
    let file = out.join("old.safetensors");
    assert!(err(&src, &file, &ConvertOptions::default()).contains("exists and is not a directory"));

    let forced = ConvertOptions { if_exists: IfExists::Replace, ..Default::default() };
    convert::convert(&src, &out, &forced, &mut |_| {}).expect("a forced conversion");
    assert!(!out.join("old.safetensors").exists(), "the old contents are gone");
    assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());

    // An empty directory is as good as none.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("a directory");
    convert::convert(&src, &empty, &ConvertOptions::default(), &mut |_| {}).expect("into an empty directory");
}
