// SPDX-License-Identifier: EUPL-1.2
//! `discover` on temporary trees: good, bad and ugly.

use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use inference_core::{DiscoveredModel, Error, discover};
use tempfile::TempDir;

const GEMMA: &str = r#"{"model_type": "gemma3", "quantization": {"bits": 4, "group_size": 64}}"#;
const QWEN: &str = r#"{"model_type": "qwen3"}"#;

/// A temporary tree whose root is canonical, so expected paths compare equal.
fn tree() -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = fs::canonicalize(dir.path()).unwrap();
    (dir, root)
}

/// Writes a model directory: config.json with `config`, and `files` safetensors files.
fn model(dir: &Path, config: &str, files: usize) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("config.json"), config).unwrap();
    for i in 0..files {
        fs::write(dir.join(format!("model-{i:05}.safetensors")), b"").unwrap();
    }
}

/// A [`tree`] holding a model directory for each `(relative path, config, files)` (see [`model`]).
fn tree_with(models: &[(&str, &str, usize)]) -> (TempDir, PathBuf) {
    let (dir, root) = tree();
    for &(rel, config, files) in models {
        model(&root.join(rel), config, files);
    }
    (dir, root)
}

/// Every model `discover` finds below `root`, in walk order.
fn discovered(root: &Path) -> Vec<DiscoveredModel> {
    discover(root).unwrap().collect()
}

fn paths(models: &[DiscoveredModel], root: &Path) -> Vec<String> {
    models
        .iter()
        .map(|m| {
            let rel = m.path.strip_prefix(root).unwrap();
            rel.to_string_lossy().into_owned()
        })
        .collect()
}

fn found(root: &Path) -> Vec<String> {
    paths(&discovered(root), root)
}

// ---- good ----

#[test]
fn finds_nested_models_depth_first_in_lexical_order() {
    let (_dir, root) = tree_with(&[
        ("z-last", QWEN, 1),
        ("b/c/deep", QWEN, 1),
        ("a", GEMMA, 2),
        ("a/adapter", QWEN, 1),
        ("a/0-first-child", QWEN, 1),
    ]);
    fs::create_dir_all(root.join("b/empty")).unwrap();
    assert_eq!(found(&root), ["a", "a/0-first-child", "a/adapter", "b/c/deep", "z-last"]);
}

#[test]
fn base_that_is_a_model_comes_first_and_is_still_searched() {
    let (_dir, root) = tree();
    model(&root, QWEN, 1);
    model(&root.join("inner"), QWEN, 1);
    assert_eq!(found(&root), ["", "inner"]);
}

#[test]
fn order_is_by_bytes_not_case_or_insertion() {
    let (_dir, root) = tree();
    for name in ["b", "B", "_x", "a", "A"] {
        model(&root.join(name), QWEN, 1);
    }
    assert_eq!(found(&root), ["A", "B", "_x", "a", "b"]);
}

#[test]
fn reports_architecture_quantisation_and_file_count() {
    let (_dir, root) = tree_with(&[("gemma", GEMMA, 3)]);
    fs::write(root.join("gemma/model.safetensors.index.json"), "{}").unwrap();
    fs::write(root.join("gemma/tokenizer.json"), "{}").unwrap();
    let models = discovered(&root);
    assert_eq!(
        models,
        [DiscoveredModel {
            path: root.join("gemma"),
            model_type: Some("gemma3".into()),
            quant_bits: Some(4),
            quant_group: Some(64),
            num_files: 3,
        }]
    );
    assert!(models[0].path.is_absolute());
}

#[test]
fn architecture_and_quantisation_fallbacks() {
    let (_dir, root) = tree_with(&[
        ("a-text-config", r#"{"text_config": {"model_type": "gemma3_text"}}"#, 1),
        (
            "b-architectures",
            r#"{"architectures": ["LlamaForCausalLM"], "quantization_config": {"bits": 8, "group_size": 32}}"#,
            1,
        ),
        ("c-nothing", "{}", 1),
    ]);
    let models = discovered(&root);
    assert_eq!(models[0].model_type.as_deref(), Some("gemma3_text"));
    assert_eq!(models[1].model_type.as_deref(), Some("LlamaForCausalLM"));
    assert_eq!((models[1].quant_bits, models[1].quant_group), (Some(8), Some(32)));
    assert_eq!(models[2].model_type, None);
    assert_eq!((models[2].quant_bits, models[2].quant_group), (None, None));
}

#[test]
fn walk_is_lazy_and_can_stop_early() {
    let (_dir, root) = tree_with(&[("a", QWEN, 1), ("b", QWEN, 1)]);
    let mut walk = discover(&root).unwrap();
    assert_eq!(walk.next().unwrap().path, root.join("a"));
    drop(walk);
    let mut walk = discover(&root).unwrap();
    assert_eq!(walk.by_ref().count(), 2);
    assert!(walk.next().is_none(), "the iterator is fused");
}

#[test]
fn hugging_face_cache_layout_with_symlinked_files_is_found() {
    let (_dir, root) = tree();
    let blobs = root.join("blobs");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(blobs.join("aaa"), QWEN).unwrap();
    fs::write(blobs.join("bbb"), b"").unwrap();
    let snap = root.join("models--org--m/snapshots/0123");
    fs::create_dir_all(&snap).unwrap();
    symlink("../../../blobs/aaa", snap.join("config.json")).unwrap();
    symlink("../../../blobs/bbb", snap.join("model.safetensors")).unwrap();
    let models = discovered(&root);
    assert_eq!(paths(&models, &root), ["models--org--m/snapshots/0123"]);
    assert_eq!(models[0].model_type.as_deref(), Some("qwen3"));
}

// ---- bad ----

#[test]
fn invalid_json_still_yields_the_model() {
    let (_dir, root) = tree_with(&[("truncated", r#"{"model_type": "gem"#, 1)]);
    fs::create_dir_all(root.join("binary")).unwrap();
    fs::write(root.join("binary/config.json"), [0xff, 0xfe, 0x00]).unwrap();
    fs::write(root.join("binary/w.safetensors"), b"").unwrap();
    let models = discovered(&root);
    assert_eq!(paths(&models, &root), ["binary", "truncated"]);
    for m in &models {
        assert_eq!((&m.model_type, m.quant_bits, m.quant_group, m.num_files), (&None, None, None, 1));
    }
}

#[test]
fn config_without_safetensors_is_not_a_model() {
    let (_dir, root) = tree_with(&[("no-weights", QWEN, 0)]);
    fs::write(root.join("no-weights/model.gguf"), b"").unwrap();
    assert!(found(&root).is_empty());
}

#[test]
fn safetensors_without_config_is_not_a_model() {
    let (_dir, root) = tree();
    let dir = root.join("no-config");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("model.safetensors"), b"").unwrap();
    fs::write(dir.join("generation_config.json"), QWEN).unwrap();
    assert!(found(&root).is_empty());
}

#[test]
fn base_that_does_not_exist_is_an_error_naming_it() {
    let (_dir, root) = tree();
    let missing = root.join("missing");
    let err = discover(&missing).unwrap_err();
    assert_eq!(err.to_string(), format!("cannot access {}", missing.display()));
    let Error::Io { path, source } = err else {
        panic!("wrong variant");
    };
    assert_eq!(path, missing);
    assert_eq!(source.kind(), io::ErrorKind::NotFound);
}

#[test]
fn base_that_is_a_file_is_an_error() {
    let (_dir, root) = tree();
    let file = root.join("file");
    fs::write(&file, b"").unwrap();
    let err = discover(&file).unwrap_err();
    assert!(matches!(&err, Error::Io { source, .. } if source.kind() == io::ErrorKind::NotADirectory), "{err:?}");
    assert_eq!(err.report(), format!("cannot access {}: not a directory", file.display()));
}

// ---- ugly ----

#[test]
fn empty_tree_yields_nothing() {
    let (_dir, root) = tree();
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    assert!(found(&root).is_empty());
}

#[test]
fn config_json_that_is_a_directory_does_not_count_but_is_searched() {
    let (_dir, root) = tree();
    let odd = root.join("odd");
    fs::create_dir_all(odd.join("config.json")).unwrap();
    fs::write(odd.join("model.safetensors"), b"").unwrap();
    model(&odd.join("config.json"), QWEN, 1);
    assert_eq!(found(&root), ["odd/config.json"]);
}

#[test]
fn safetensors_directory_is_not_a_weights_file() {
    let (_dir, root) = tree();
    let dir = root.join("m");
    fs::create_dir_all(dir.join("weights.safetensors")).unwrap();
    fs::write(dir.join("config.json"), QWEN).unwrap();
    assert!(found(&root).is_empty());
}

#[test]
fn symlink_loops_terminate_and_report_each_model_once() {
    let (_dir, root) = tree_with(&[("a", QWEN, 1)]);
    symlink(&root, root.join("a/back-to-root")).unwrap();
    symlink("..", root.join("a/parent")).unwrap();
    symlink(".", root.join("self")).unwrap();
    // A chain of links that loops on itself is neither file nor directory.
    symlink(root.join("loop2"), root.join("loop1")).unwrap();
    symlink(root.join("loop1"), root.join("loop2")).unwrap();
    assert_eq!(found(&root), ["a"]);
}

#[test]
fn symlinked_model_directory_is_followed_once() {
    let (_dir, root) = tree();
    let elsewhere = tempfile::tempdir().unwrap();
    model(elsewhere.path(), GEMMA, 1);
    symlink(elsewhere.path(), root.join("linked")).unwrap();
    symlink(elsewhere.path(), root.join("linked-again")).unwrap();
    let models = discovered(&root);
    assert_eq!(paths(&models, &root), ["linked"]);
    assert_eq!(models[0].model_type.as_deref(), Some("gemma3"));
}

#[test]
fn broken_symlinks_are_ignored() {
    let (_dir, root) = tree();
    let m = root.join("m");
    fs::create_dir_all(&m).unwrap();
    symlink(root.join("nowhere.json"), m.join("config.json")).unwrap();
    fs::write(m.join("model.safetensors"), b"").unwrap();
    symlink(root.join("nowhere"), root.join("dangling-dir")).unwrap();
    let mut walk = discover(&root).unwrap();
    assert_eq!(walk.next(), None);
    assert!(walk.skipped().is_empty());
}

#[test]
fn relative_base_gives_absolute_paths() {
    let (_dir, root) = tree_with(&[("m", QWEN, 1)]);
    // Build a relative path from the current directory to the tree without changing the
    // process-wide current directory (tests run in parallel).
    let cwd = fs::canonicalize(std::env::current_dir().unwrap()).unwrap();
    let ups = cwd.components().filter(|c| matches!(c, Component::Normal(_))).count();
    let mut relative = PathBuf::new();
    for _ in 0..ups {
        relative.push("..");
    }
    relative.push(root.strip_prefix("/").unwrap());
    assert!(relative.is_relative());
    let models: Vec<_> = discover(&relative).unwrap().collect();
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].path, root.join("m"));
}

#[test]
fn deep_tree_does_not_overflow_the_stack() {
    let (_dir, root) = tree();
    let mut deep = root.clone();
    for _ in 0..300 {
        deep.push("d");
    }
    model(&deep, QWEN, 1);
    let models = discovered(&root);
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].path, deep);
}

#[test]
fn unreadable_directory_is_skipped_without_panicking() {
    let (_dir, root) = tree_with(&[("a", QWEN, 1), ("locked/inner", QWEN, 1), ("z", QWEN, 1)]);
    let locked = root.join("locked");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();

    // A privileged user (root, as in CI containers) reads a mode-000 directory anyway, so what
    // "unreadable" means depends on who runs the test; probe it rather than assume.
    let readable = fs::read_dir(&locked).is_ok();
    let mut walk = discover(&root).unwrap();
    let models: Vec<_> = walk.by_ref().collect();
    let skipped: Vec<_> = walk.skipped().iter().map(|s| s.path.clone()).collect();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();

    if readable {
        assert_eq!(paths(&models, &root), ["a", "locked/inner", "z"]);
        assert!(skipped.is_empty());
    } else {
        assert_eq!(paths(&models, &root), ["a", "z"]);
        assert_eq!(skipped, [locked]);
    }
}
