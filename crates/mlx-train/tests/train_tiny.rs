// SPDX-License-Identifier: EUPL-1.2
//! The trainer on the tiny fixtures (fast): checkpointed and plain gradients
//! match, accumulation equals one big step, bf16 adapters train, resuming
//! continues exactly, and `train` writes mlx-lm's files and reports its
//! events.

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use mlx::{Dtype, ops};
use mlx_metal::lora::IfExists;
use mlx_metal::model;
use mlx_train::{DataConfig, StepSettings, TrainConfig, TrainEvent};

fn max_diff(a: &mlx::Array, b: &mlx::Array) -> f32 {
    let d = ops::abs(&ops::subtract(a, b).unwrap()).unwrap();
    ops::astype(&ops::max_all(&d, false).unwrap(), Dtype::Float32).unwrap().item::<f32>().unwrap()
}

#[test]
fn checkpointed_and_plain_gradients_match() {
    for name in ["llama-tiny", "gemma3-tiny", "qwen3-tiny-4bit"] {
        let path = common::tiny(name);
        let m = model::load(&path).unwrap();
        let ds = common::dataset(&m, &common::completions(4), &DataConfig::default());
        let batch = ds.batch(&[0, 1, 2, 3], 2048).unwrap();
        let mut plain = common::trainer(m, StepSettings::default(), Dtype::Float32, 1);
        let settings = StepSettings { grad_checkpoint: true, ..StepSettings::default() };
        let mut ck = common::trainer(model::load(&path).unwrap(), settings, Dtype::Float32, 1);
        // Non-zero B so that every gradient is non-trivial.
        for t in [&mut plain, &mut ck] {
            t.step(&batch).unwrap();
        }
        let (l1, n1, g1) = plain.gradients(&batch).unwrap();
        let (l2, n2, g2) = ck.gradients(&batch).unwrap();
        assert_eq!(n1, n2);
        assert!((l1 - l2).abs() <= 1e-5 * l1.abs().max(1.0), "{name}: loss {l1} vs {l2}");
        assert_eq!(g1.len(), g2.len());
        for (a, b) in g1.iter().zip(&g2) {
            let scale = ops::astype(&ops::max_all(&ops::abs(a).unwrap(), false).unwrap(), Dtype::Float32)
                .unwrap()
                .item::<f32>()
                .unwrap();
            assert!(scale > 0.0, "{name}: a zero gradient");
            assert!(max_diff(a, b) <= 1e-4 * scale.max(1e-3), "{name}: gradients differ by {}", max_diff(a, b));
        }
    }
}

#[test]
fn accumulating_the_same_batch_twice_equals_one_step() {
    let path = common::tiny("llama-tiny");
    let m = model::load(&path).unwrap();
    let ds = common::dataset(&m, &common::completions(2), &DataConfig::default());
    let batch = ds.batch(&[0, 1], 2048).unwrap();
    let lr = StepSettings { learning_rate: 1e-2, grad_clip: Some(1.0), ..StepSettings::default() };
    let mut one = common::trainer(m, lr.clone(), Dtype::Float32, 2);
    let acc = StepSettings { grad_accumulation_steps: 2, ..lr };
    let mut two = common::trainer(model::load(&path).unwrap(), acc, Dtype::Float32, 2);
    assert!(one.step(&batch).unwrap().updated);
    assert!(!two.step(&batch).unwrap().updated, "the first micro-batch only accumulates");
    assert_eq!(two.updates(), 0);
    assert!(two.step(&batch).unwrap().updated);
    for (a, b) in one.params().iter().zip(two.params()) {
        assert!(max_diff(a, b) < 1e-6, "accumulated update differs by {}", max_diff(a, b));
    }
}

#[test]
fn bf16_adapters_train_and_stay_bf16() {
    let m = model::load(&common::tiny("gemma3-tiny")).unwrap();
    let ds = common::dataset(&m, &common::completions(2), &DataConfig::default());
    let batch = ds.batch(&[0, 1], 2048).unwrap();
    let settings = StepSettings { learning_rate: 5e-2, ..StepSettings::default() };
    let mut t = common::trainer(m, settings, Dtype::Bfloat16, 3);
    let first = t.step(&batch).unwrap().loss;
    let mut last = first;
    for _ in 0..15 {
        last = t.step(&batch).unwrap().loss;
        assert!(last.is_finite());
    }
    assert!(t.params().iter().all(|p| p.dtype() == Dtype::Bfloat16));
    assert!(last < first, "bf16 loss did not fall: {first} -> {last}");
}

/// Training the tiny Llama on `data` into `adapter`: two records a batch, rank-4 adapters.
fn tiny_llama_config(data: &Path, adapter: &Path) -> TrainConfig {
    TrainConfig {
        model: common::tiny("llama-tiny"),
        data: data.to_path_buf(),
        adapter_path: adapter.to_path_buf(),
        batch_size: 2,
        lora: inference_core::LoraConfig::default().rank(4),
        ..TrainConfig::default()
    }
}

/// A data directory holding, for each `(file, n)`, `n` completion examples in `file`.
fn completions_dir(files: &[(&str, usize)]) -> tempfile::TempDir {
    let data = tempfile::tempdir().unwrap();
    for &(file, n) in files {
        common::write_lines(data.path(), file, &common::completions(n));
    }
    data
}

#[test]
fn train_writes_mlx_lm_files_reports_events_and_resumes_exactly() {
    let data = completions_dir(&[("train.jsonl", 6), ("valid.jsonl", 4)]);
    let out = tempfile::tempdir().unwrap();
    let straight = out.path().join("straight");
    let config = TrainConfig {
        iters: 6,
        learning_rate: 1e-2,
        steps_per_eval: 3,
        val_batches: Some(2),
        save_every: 3,
        ..tiny_llama_config(data.path(), &straight)
    };
    let mut lines = Vec::new();
    let mut jsonl = mlx_train::JsonLinesWriter::new(&mut lines);
    let mut events = Vec::new();
    let summary = mlx_train::train(&config, |e| {
        events.push(e.clone());
        jsonl.event(e)
    })
    .unwrap();
    assert_eq!(summary.iterations, 6);
    let trains: Vec<_> =
        events.iter().filter_map(|e| if let TrainEvent::Train(r) = e { Some(r) } else { None }).collect();
    assert_eq!(trains.len(), 6, "a report every step");
    assert!(trains.iter().all(|r| r.loss.is_finite() && r.tokens_per_second > 0.0 && r.peak_memory > 0));
    assert_eq!(trains[0].learning_rate, 1e-2);
    let evals = events.iter().filter(|e| matches!(e, TrainEvent::Eval { .. })).count();
    assert_eq!(evals, 3, "at the start, at 3 and at 6");
    let text = String::from_utf8(lines).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["event"], "start");
    assert!(text.lines().any(|l| l.contains("\"event\":\"train\"") && l.contains("\"learning_rate\"")));
    for f in [
        "adapters.safetensors",
        "adapter_config.json",
        "0000003_adapters.safetensors",
        "0000006_adapters.safetensors",
        mlx_train::STATE_FILE,
    ] {
        assert!(straight.join(f).is_file(), "{f} was not written");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["lora_parameters"]["keys"], serde_json::json!(["self_attn.q_proj", "self_attn.v_proj"]));

    // Three steps, stop, resume for three more: the same adapter as six straight.
    let resumed = out.path().join("resumed");
    let half = TrainConfig { adapter_path: resumed.clone(), iters: 3, ..config.clone() };
    mlx_train::train(&half, |_| ControlFlow::Continue(())).unwrap();
    let rest = TrainConfig { adapter_path: resumed.clone(), resume: true, ..config.clone() };
    let s = mlx_train::train(&rest, |_| ControlFlow::Continue(())).unwrap();
    assert_eq!(s.iterations, 6);
    let a = mlx::io::load_safetensors(straight.join("adapters.safetensors")).unwrap().tensors;
    let b = mlx::io::load_safetensors(resumed.join("adapters.safetensors")).unwrap().tensors;
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, x) in &a {
        assert!(max_diff(x, &b[k]) < 1e-6, "{k} differs after resuming by {}", max_diff(x, &b[k]));
    }

    // The callback can stop a run; the adapter is still saved.
    let stopped = out.path().join("stopped");
    let cfg2 = TrainConfig { adapter_path: stopped.clone(), ..config.clone() };
    let s = mlx_train::train(&cfg2, |e| {
        if matches!(e, TrainEvent::Train(_)) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    })
    .unwrap();
    assert!(s.stopped);
    assert_eq!(s.iterations, 1);
    assert!(stopped.join("adapters.safetensors").is_file());

    // Bad settings and missing files are named.
    let bad = TrainConfig { iters: 0, ..config.clone() };
    assert!(mlx_train::train(&bad, |_| ControlFlow::Continue(())).unwrap_err().to_string().contains("iters"));
    let nodata = TrainConfig { data: out.path().join("nowhere"), ..config.clone() };
    let e = mlx_train::train(&nodata, |_| ControlFlow::Continue(())).unwrap_err().to_string();
    assert!(e.contains("train.jsonl"), "{e}");
    let noresume = TrainConfig { adapter_path: out.path().join("fresh"), resume: true, ..config };
    assert!(mlx_train::train(&noresume, |_| ControlFlow::Continue(())).is_err());
}

#[test]
fn the_config_round_trips_through_json() {
    let c = TrainConfig { model: "m".into(), iters: 5, grad_clip: Some(1.0), ..TrainConfig::default() };
    let text = serde_json::to_string(&c).unwrap();
    let back: TrainConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(back, c);
    let partial: TrainConfig = serde_json::from_str(r#"{"model": "m", "lora": {"rank": 16}}"#).unwrap();
    assert_eq!(partial.lora.rank, 16);
    assert_eq!(partial.learning_rate, 1e-5);
    assert!(serde_json::from_str::<TrainConfig>(r#"{"modle": "m"}"#).is_err(), "unknown keys are rejected");
    // The example in docs/training.md is a valid config.
    let doc = include_str!("../../../docs/training.md");
    let start = doc.find("```json\n").expect("a JSON example") + "```json\n".len();
    let end = start + doc[start..].find("```").expect("the end of the example");
    let example: TrainConfig = serde_json::from_str(&doc[start..end]).expect("the documented config parses");
    example.validate().expect("the documented config is valid");
    assert_eq!(example.lora.num_layers, Some(16));
}

#[test]
fn a_trained_adapter_fuses_into_a_model_equal_to_base_plus_adapter() {
    let data = completions_dir(&[("train.jsonl", 4)]);
    let out = tempfile::tempdir().unwrap();
    let adapter = out.path().join("adapter");
    let config = TrainConfig {
        iters: 4,
        learning_rate: 5e-2,
        lora: inference_core::LoraConfig::default().rank(4).target_keys(["q_proj", "v_proj", "down_proj"]),
        ..tiny_llama_config(data.path(), &adapter)
    };
    mlx_train::train(&config, |_| ControlFlow::Continue(())).unwrap();
    let fused_dir = out.path().join("fused");
    let fused = mlx_train::fuse(&config.model, &adapter, &fused_dir, IfExists::Refuse).unwrap();
    assert!(!fused.is_empty());
    let logits = |m: &dyn model::LanguageModel| {
        let x = mlx::Array::from_slice(&[1i32, 4, 9, 16, 25], &[1, 5]).unwrap();
        let mut c = m.make_cache().unwrap();
        m.forward(&x, &mut c).unwrap()
    };
    let mut with = model::load(&config.model).unwrap();
    let base = logits(with.model.as_ref());
    mlx_metal::lora::load_adapter(with.model.as_mut(), &adapter).unwrap();
    let expected = logits(with.model.as_ref());
    let got = logits(model::load(&fused_dir).unwrap().model.as_ref());
    let moved = max_diff(&base, &expected);
    let err = max_diff(&expected, &got);
    eprintln!("fused model: the adapter moved the logits by {moved}, the fused model differs by {err}");
    assert!(moved > 1e-3, "training changed nothing");
    assert!(err <= 1e-4 * moved.max(1.0), "the fused model differs by {err} (adapter effect {moved})");
    let none = out.path().join("none");
    let err = mlx_train::fuse(&config.model, &none, &fused_dir, IfExists::Replace).unwrap_err().to_string();
    assert!(err.contains(none.to_str().unwrap()), "{err}");
    let err = mlx_train::fuse(&config.model, &adapter, &fused_dir, IfExists::Refuse).unwrap_err().to_string();
    assert!(err.contains("already holds"), "{err}");
}

#[test]
fn dropout_acts_only_while_training() {
    let m = model::load(&common::tiny("llama-tiny")).unwrap();
    let ds = common::dataset(&m, &common::completions(2), &DataConfig::default());
    let batch = ds.batch(&[0, 1], 2048).unwrap();
    mlx::random::seed(8).unwrap();
    let lora = inference_core::LoraConfig::default().rank(4).dropout(0.5);
    let cfg = mlx_train::adapter_config(&lora, m.model.num_layers());
    assert_eq!(cfg.lora_parameters.dropout, 0.5);
    let settings = StepSettings { learning_rate: 1e-2, ..StepSettings::default() };
    let mut t = mlx_train::Trainer::new(m.model, cfg, Dtype::Float32, settings).unwrap();
    // B is zero at first, so take a step to make the adapter matter.
    t.set_training(true).unwrap();
    t.step(&batch).unwrap();
    let (a, _, _) = t.gradients(&batch).unwrap();
    let (b, _, _) = t.gradients(&batch).unwrap();
    assert_ne!(a, b, "two training passes draw different dropout masks");
    t.set_training(false).unwrap();
    let (c, _) = t.loss(&batch).unwrap();
    let (d, _) = t.loss(&batch).unwrap();
    assert_eq!(c, d, "no dropout in evaluation");
}
