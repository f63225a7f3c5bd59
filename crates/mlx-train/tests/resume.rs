// SPDX-License-Identifier: EUPL-1.2
//! What a run saves and how it is taken up again, on the tiny Llama: a new run refuses a directory
//! that holds anything; a resumed run takes the adapter's shape from what it resumes and refuses
//! settings that contradict it; weights and optimiser state record their iteration, so a save cut
//! short between them resumes from the last pair that belongs together, and a pair that does not
//! is refused.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use inference_core::{LoraConfig, LoraDType};
use mlx::{Dtype, ops};
use mlx_train::{LoraChoices, STATE_FILE, TrainConfig, TrainEvent};

fn max_diff(a: &mlx::Array, b: &mlx::Array) -> f32 {
    let d = ops::abs(&ops::subtract(a, b).unwrap()).unwrap();
    ops::astype(&ops::max_all(&d, false).unwrap(), Dtype::Float32).unwrap().item::<f32>().unwrap()
}

/// The tiny Llama (two blocks) on six completions, rank-4 adapters on q/v/down of the top block, saving every 3.
fn config(data: &Path, adapter: &Path, iters: usize) -> TrainConfig {
    TrainConfig {
        model: common::tiny("llama-tiny"),
        data: data.to_path_buf(),
        adapter_path: adapter.to_path_buf(),
        iters,
        batch_size: 2,
        learning_rate: 1e-2,
        steps_per_eval: 0,
        save_every: 3,
        lora: LoraConfig::default().rank(4).alpha(6.0).target_keys(["q_proj", "v_proj", "down_proj"]).num_layers(1),
        ..TrainConfig::default()
    }
}

fn data_dir() -> tempfile::TempDir {
    let data = tempfile::tempdir().unwrap();
    common::write_lines(data.path(), "train.jsonl", &common::completions(6));
    data
}

fn train(c: &TrainConfig) -> (mlx_train::TrainSummary, Vec<TrainEvent>) {
    let mut events = Vec::new();
    let s = mlx_train::train(c, |e| {
        events.push(e.clone());
        ControlFlow::Continue(())
    })
    .unwrap_or_else(|e| panic!("training into {}: {e}", c.adapter_path.display()));
    (s, events)
}

fn adapter(dir: &Path) -> std::collections::BTreeMap<String, mlx::Array> {
    mlx::io::load_safetensors(dir.join("adapters.safetensors")).unwrap().tensors
}

fn assert_same_adapter(a: &Path, b: &Path) {
    let (x, y) = (adapter(a), adapter(b));
    assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
    for (k, v) in &x {
        assert!(max_diff(v, &y[k]) < 1e-6, "{k} differs by {}", max_diff(v, &y[k]));
    }
}

/// Every file of `dir` with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

fn iteration_of(file: &Path) -> String {
    mlx::io::read_safetensors_header(file).unwrap().metadata[mlx_train::ITERATION_KEY].clone()
}

#[test]
fn a_new_run_refuses_a_directory_that_holds_anything() {
    let data = data_dir();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("adapter");
    train(&config(data.path(), &dir, 3));
    let before = snapshot(&dir);
    // Run again without resume, with another rank: refused, and nothing there is touched.
    let again = TrainConfig { lora: LoraConfig::default().rank(8), ..config(data.path(), &dir, 3) };
    let err = mlx_train::train(&again, |_| ControlFlow::Continue(())).unwrap_err().to_string();
    assert!(err.contains("adapter_path") && err.contains(dir.to_str().unwrap()), "{err}");
    assert!(err.contains("adapter_config.json") && err.contains("--resume"), "{err}");
    assert_eq!(snapshot(&dir), before, "a refused run changed the directory");
    // A stray file is enough; an empty directory is fine.
    let other = out.path().join("other");
    std::fs::create_dir(&other).unwrap();
    train(&config(data.path(), &other, 1));
    let stray = out.path().join("stray");
    std::fs::create_dir(&stray).unwrap();
    std::fs::write(stray.join("notes.txt"), "mine").unwrap();
    let err = mlx_train::train(&config(data.path(), &stray, 1), |_| ControlFlow::Continue(())).unwrap_err();
    assert!(err.to_string().contains("notes.txt"), "{err}");
    // A file where the directory should be.
    let file = out.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let err = mlx_train::train(&config(data.path(), &file, 1), |_| ControlFlow::Continue(())).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
}

#[test]
fn a_resumed_run_takes_the_saved_shape_and_refuses_a_contradicting_one() {
    let data = data_dir();
    let out = tempfile::tempdir().unwrap();
    let straight = out.path().join("straight");
    train(&config(data.path(), &straight, 6));
    let dir = out.path().join("resumed");
    train(&config(data.path(), &dir, 3));

    // Settings left to the saved adapter: the mlx-lm defaults (rank 8, q/v, every block) are replaced by its own.
    let mut rest = TrainConfig { lora: LoraConfig::default(), resume: true, ..config(data.path(), &dir, 6) };
    rest.adopt_saved_adapter(LoraChoices::default()).unwrap();
    assert_eq!(rest.lora.rank, 4);
    assert_eq!(rest.lora.alpha, 6.0);
    assert_eq!(rest.lora.num_layers, Some(1));
    assert_eq!(rest.lora.target_keys, ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]);
    assert_eq!(rest.lora.dtype, LoraDType::F32);

    // A config file chooses what its `lora` object names.
    let chosen = LoraChoices::in_json(r#"{"model": "m", "lora": {"rank": 16, "dtype": "bf16"}, "iters": 3}"#);
    assert_eq!(chosen, LoraChoices { rank: true, dtype: true, ..Default::default() });
    assert_eq!(LoraChoices::in_json(r#"{"model": "m"}"#), LoraChoices::default());

    // Chosen settings that contradict it are refused, naming the setting and both values; nothing is written.
    let before = snapshot(&dir);
    let cases: [(&str, LoraConfig, LoraChoices, &[&str]); 5] = [
        (
            "lora.rank",
            LoraConfig { rank: 8, ..rest.lora.clone() },
            LoraChoices { rank: true, ..Default::default() },
            &["--rank 8", "rank 4"],
        ),
        (
            "lora.alpha",
            LoraConfig { alpha: 16.0, ..rest.lora.clone() },
            LoraChoices { alpha: true, ..Default::default() },
            &["--alpha 16", "scale 1.5"],
        ),
        (
            "lora.num_layers",
            LoraConfig { num_layers: None, ..rest.lora.clone() },
            LoraChoices { num_layers: true, ..Default::default() },
            &["--num-layers unset (all 2 blocks)", "the top 1 of 2"],
        ),
        (
            "lora.target_keys",
            LoraConfig::default().rank(4).alpha(6.0).num_layers(1),
            LoraChoices { target_keys: true, ..Default::default() },
            &["q_proj", "mlp.down_proj"],
        ),
        (
            "lora.dtype",
            LoraConfig { dtype: LoraDType::Bf16, ..rest.lora.clone() },
            LoraChoices { dtype: true, ..Default::default() },
            &["--lora-dtype bfloat16", "float32 weights"],
        ),
    ];
    for (field, lora, chosen, values) in cases {
        let mut c = TrainConfig { lora, ..rest.clone() };
        c.adopt_saved_adapter(chosen).unwrap();
        let err = mlx_train::train(&c, |_| ControlFlow::Continue(())).unwrap_err().to_string();
        assert!(err.contains(field) && err.contains(dir.to_str().unwrap()), "{field}: {err}");
        for v in values {
            assert!(err.contains(v), "{field}: {v:?} missing from {err}");
        }
    }
    assert_eq!(snapshot(&dir), before, "a refused resume changed the directory");

    // Resumed with what it adopted: the same adapter as six iterations straight.
    let (s, events) = train(&rest);
    assert_eq!(s.iterations, 6);
    assert!(
        matches!(&events[0], TrainEvent::Resumed { iteration: 3, note: None, weights } if weights.ends_with("adapters.safetensors")),
        "{:?}",
        events[0]
    );
    assert!(matches!(events[1], TrainEvent::Start { start: 3, .. }), "{:?}", events[1]);
    assert_same_adapter(&straight, &dir);
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(saved["lora_parameters"]["rank"], 4);

    // Nothing to resume: no directory, or no optimiser state.
    let err = mlx_train::train(&TrainConfig { adapter_path: out.path().join("none"), ..rest.clone() }, |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("nothing to resume"), "{err}");
    std::fs::remove_file(dir.join(STATE_FILE)).unwrap();
    let err = mlx_train::train(&rest, |_| ControlFlow::Continue(())).unwrap_err().to_string();
    assert!(err.contains(STATE_FILE) && err.contains("nothing to resume"), "{err}");
    std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
    let err = mlx_train::train(&rest, |_| ControlFlow::Continue(())).unwrap_err().to_string();
    assert!(err.contains("adapter_config.json") && err.contains("nothing to resume"), "{err}");
}

#[test]
fn a_save_cut_short_resumes_from_the_last_pair_that_belongs_together() {
    let data = data_dir();
    let out = tempfile::tempdir().unwrap();
    let straight = out.path().join("straight");
    train(&config(data.path(), &straight, 9));
    let dir = out.path().join("cut");
    train(&config(data.path(), &dir, 6));
    for f in ["0000003_adapters.safetensors", "0000006_adapters.safetensors", "adapters.safetensors", STATE_FILE] {
        let want = if f.starts_with("0000003") { "3" } else { "6" };
        assert_eq!(iteration_of(&dir.join(f)), want, "{f} records its iteration");
    }
    // A crash after the state of iteration 6 was saved and before adapters.safetensors was: it still holds 3.
    std::fs::copy(dir.join("0000003_adapters.safetensors"), dir.join("adapters.safetensors")).unwrap();
    let rest = TrainConfig { resume: true, ..config(data.path(), &dir, 9) };
    let (s, events) = train(&rest);
    assert_eq!(s.iterations, 9);
    match &events[0] {
        TrainEvent::Resumed { iteration: 6, weights, note: Some(note) } => {
            assert!(weights.ends_with("0000006_adapters.safetensors"), "{}", weights.display());
            assert!(note.contains("iteration 3") && note.contains("iteration 6"), "{note}");
        }
        other => panic!("expected a resume from the checkpoint of iteration 6, got {other:?}"),
    }
    assert_same_adapter(&straight, &dir);

    // An adapters.safetensors that records no iteration (an older mlxr's) is not trusted either.
    let old = out.path().join("old");
    train(&config(data.path(), &old, 6));
    let main = old.join("adapters.safetensors");
    let tensors = mlx::io::load_safetensors(&main).unwrap().tensors;
    mlx::io::save_safetensors(&main, tensors.iter().map(|(k, v)| (k.as_str(), v)), &Default::default()).unwrap();
    let (_, events) = train(&TrainConfig { resume: true, ..config(data.path(), &old, 9) });
    assert!(
        matches!(&events[0], TrainEvent::Resumed { iteration: 6, note: Some(n), weights }
            if n.contains("records no iteration") && weights.ends_with("0000006_adapters.safetensors")),
        "{:?}",
        events[0]
    );
    assert_same_adapter(&straight, &old);
    // An optimiser state that records none cannot be matched with any weights.
    let state = old.join(STATE_FILE);
    let st = mlx::io::load_safetensors(&state).unwrap();
    let meta = st.metadata.into_iter().filter(|(k, _)| k != "iteration").collect();
    mlx::io::save_safetensors(&state, st.tensors.iter().map(|(k, v)| (k.as_str(), v)), &meta).unwrap();
    let err =
        mlx_train::train(&TrainConfig { resume: true, ..config(data.path(), &old, 12) }, |_| ControlFlow::Continue(()))
            .unwrap_err()
            .to_string();
    assert!(err.contains(STATE_FILE) && err.contains("records no iteration"), "{err}");

    // Without that checkpoint the pair cannot be matched: refused with both iterations named.
    let broken = out.path().join("broken");
    train(&config(data.path(), &broken, 6));
    std::fs::copy(broken.join("0000003_adapters.safetensors"), broken.join("adapters.safetensors")).unwrap();
    std::fs::remove_file(broken.join("0000006_adapters.safetensors")).unwrap();
    let err = mlx_train::train(&TrainConfig { resume: true, ..config(data.path(), &broken, 9) }, |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("iteration 3") && err.contains("iteration 6") && err.contains("do not belong together"),
        "{err}"
    );
}

#[test]
fn restore_refuses_weights_and_state_that_do_not_belong_together() {
    let data = data_dir();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("a");
    train(&config(data.path(), &dir, 6));
    let trainer = |lora: &LoraConfig| {
        let m = mlx_metal::model::load(&common::tiny("llama-tiny")).unwrap();
        let cfg = mlx_train::adapter_config(lora, m.model.num_layers());
        mlx_train::Trainer::new(m.model, cfg, Dtype::Float32, Default::default()).unwrap()
    };
    let lora = config(data.path(), &dir, 6).lora;
    let mut t = trainer(&lora);
    // Weights of iteration 3, state of iteration 6.
    let err = t.restore(&dir.join("0000003_adapters.safetensors"), &dir.join(STATE_FILE)).unwrap_err().to_string();
    assert!(err.contains("iteration 6") && err.contains("iteration 3"), "{err}");
    // The state of an adapter of another rank.
    let wide = out.path().join("wide");
    train(&TrainConfig { lora: LoraConfig { rank: 8, ..lora.clone() }, ..config(data.path(), &wide, 6) });
    let err = t.restore(&dir.join("adapters.safetensors"), &wide.join(STATE_FILE)).unwrap_err().to_string();
    assert!(err.contains("has shape") && err.contains(STATE_FILE), "{err}");
    // Weights of another rank.
    let err = t.restore(&wide.join("adapters.safetensors"), &wide.join(STATE_FILE)).unwrap_err().to_string();
    assert!(err.contains("but the adapter's is"), "{err}");
    // The matching pair restores.
    let meta = t.restore(&dir.join("adapters.safetensors"), &dir.join(STATE_FILE)).unwrap();
    assert_eq!(meta[mlx_train::ITERATION_KEY], "6");
}
