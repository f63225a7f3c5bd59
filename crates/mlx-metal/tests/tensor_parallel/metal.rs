// SPDX-License-Identifier: EUPL-1.2
//! `MetalModel` with the `tensor_parallel` backend option: a rank's chat, jobs mirrored from rank 0
//! to the ranks that follow it (every kind of call, cancellation), and the options' checks.

use std::path::{Path, PathBuf};

use inference_core::{
    AttentionInspector, CancelToken, ChatSession, Error as CoreError, GenerateSettings, LoadSettings, Message,
    TextModel,
};
use mlx_metal::MetalModel;
use serde_json::{Value, json};

use super::{result_of, run_job, run_job_with};

/// The `tp_vocab` option the ranks load with.
const TP_VOCAB: &str = "MLXR_DIST_TEST_TP_VOCAB";

fn tp_settings() -> LoadSettings {
    LoadSettings::default()
        .backend_option("tensor_parallel", "2")
        .backend_option("distributed_backend", "ring")
        .backend_option("distributed_timeout_s", "20")
}

fn chat(model: &MetalModel) -> (Vec<u32>, String) {
    let settings = GenerateSettings::default().max_tokens(10).temperature(0.0).ignore_eos(true);
    let stream = model.chat(&[Message::user("Hello there")], &settings, CancelToken::new()).expect("chat");
    let tokens: Vec<_> = stream.map(|t| t.expect("a token")).collect();
    (tokens.iter().map(|t| t.id).collect(), tokens.iter().map(|t| t.text.as_str()).collect())
}

/// qwen3-tiny's directory, and what `run` gives on the model loaded in this one process (the
/// reference the ranks must match).
fn single_process<T>(run: impl FnOnce(&MetalModel) -> T) -> (PathBuf, T) {
    let dir = crate::common::tiny_model("qwen3-tiny");
    let single = MetalModel::load(&dir, &LoadSettings::default()).expect("single process");
    let out = run(&single);
    single.close().expect("close");
    (dir, out)
}

/// A rank: the model loaded through `MetalModel` with the
/// `tensor_parallel` backend option (the engine thread joins the group).
pub(super) fn rank_chat(dir: &str) {
    let rank = mlx::distributed::launch::rank_from_env().expect("MLX_RANK").expect("a rank");
    let mut settings = tp_settings();
    if let Ok(layout) = std::env::var(TP_VOCAB) {
        settings = settings.backend_option("tp_vocab", layout);
    }
    let model = MetalModel::load(Path::new(dir), &settings).unwrap_or_else(|e| {
        eprintln!("rank {rank}: {e}");
        std::process::exit(6)
    });
    if rank == 0 {
        let (ids, text) = chat(&model);
        println!("RESULT {}", json!({"rank": rank, "ids": ids, "text": text}));
    } else {
        // The other ranks run rank 0's calls (see rank_mirrored).
        model.follow().expect("follow rank 0");
        println!("RESULT {}", json!({"rank": rank}));
    }
    model.close().expect("close");
}

#[test]
fn metal_model_with_the_tensor_parallel_option_matches_the_single_process() {
    let _serial = super::serial();
    let (dir, (ids, text)) = single_process(chat);
    assert_eq!(ids.len(), 10);
    // The vocabulary sharded (the default) and replicated; rank 0 answers,
    // the other rank follows it.
    for layout in ["sharded", "replicated"] {
        for out in run_job_with(&format!("metal:{}", dir.display()), 2, &[(TP_VOCAB, layout)]).iter().take(1) {
            let r = result_of(out);
            assert_eq!(r["ids"], json!(ids), "rank {} ({layout})", out.rank);
            assert_eq!(r["text"], json!(text), "rank {} ({layout})", out.rank);
        }
    }
}

fn greedy(n: usize) -> GenerateSettings {
    GenerateSettings::default().max_tokens(n).temperature(0.0).ignore_eos(true)
}

fn ids_of(stream: inference_core::TokenStream) -> Vec<u32> {
    stream.map(|t| t.expect("a token").id).collect()
}

/// Every kind of mirrored call on `model`, greedy: their token ids.
fn scenario(model: &MetalModel) -> Value {
    let generated = ids_of(model.generate("The quick brown fox", &greedy(8), CancelToken::new()).expect("generate"));
    // Refused on rank 0 before anything reaches the other ranks.
    assert!(matches!(model.generate("", &greedy(8), CancelToken::new()), Err(CoreError::EmptyPrompt)));
    let stopped = model
        .generate(
            "The quick brown fox",
            &greedy(8).ignore_eos(false).stop_strings(["e".to_owned()]),
            CancelToken::new(),
        )
        .expect("generate with a stop string")
        .collect_text()
        .expect("text");
    let mut session = model.session().expect("a session");
    let mut messages = vec![Message::user("Hello there")];
    let mut turns = Vec::new();
    for next in ["And again?", "Once more."] {
        let tokens: Vec<_> = session
            .chat(&messages, &greedy(5), CancelToken::new())
            .expect("a turn")
            .map(|t| t.expect("a token"))
            .collect();
        let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
        turns.push(json!({"ids": tokens.iter().map(|t| t.id).collect::<Vec<_>>(), "cached": session.cached_tokens().expect("cached")}));
        messages.push(Message::assistant(text));
        messages.push(Message::user(next));
    }
    session.reset().expect("reset");
    let after_reset = ids_of(session.chat(&messages[..1], &greedy(5), CancelToken::new()).expect("a turn after reset"));
    drop(session);
    let batch: Vec<Vec<u32>> = model
        .batch_generate(&["Hello", "The quick brown fox jumps"], &greedy(6), CancelToken::new())
        .expect("batch")
        .into_iter()
        .map(|r| {
            assert!(r.error.is_none(), "{:?}", r.error);
            r.tokens.iter().map(|t| t.id).collect()
        })
        .collect();
    let classified: Vec<u32> = model
        .classify(&["Hello", "Is this a question"], &greedy(1), CancelToken::new())
        .expect("classify")
        .iter()
        .map(|c| c.token.id)
        .collect();
    // Several generations at once, each joining the others' batch: every rank runs the same steps.
    let streams: Vec<_> = ["Once upon a time", "Hi", "The capital of France is"]
        .iter()
        .zip([7, 4, 9])
        .map(|(p, n)| {
            let mut s = model.generate(p, &greedy(n), CancelToken::new()).expect("a concurrent generation");
            let first = s.next().expect("a first token").expect("a token");
            (first.id, s)
        })
        .collect();
    let concurrent: Vec<Vec<u32>> =
        streams.into_iter().map(|(first, s)| std::iter::once(first).chain(ids_of(s)).collect()).collect();
    let again = ids_of(model.generate("The quick brown fox", &greedy(8), CancelToken::new()).expect("generate again"));
    assert_eq!(again, generated, "the same request gives the same tokens");
    json!({"generate": generated, "stopped": stopped, "turns": turns, "after_reset": after_reset,
           "batch": batch, "classify": classified, "concurrent": concurrent})
}

/// Cancels a long generation after its third token; returns how many
/// tokens the engine generated (the same on every rank).
fn cancelled_generation(model: &MetalModel) -> usize {
    let mut stream = model.generate("Once upon a time", &greedy(400), CancelToken::new()).expect("generate");
    for _ in 0..3 {
        stream.next().expect("a token").expect("a token, not an error");
    }
    stream.cancel();
    assert!(stream.any(|t| matches!(t, Err(CoreError::Cancelled))), "the stream ends cancelled");
    // A call on the engine thread: the generation's job has ended.
    model.tensor_parallel_rank().expect("a call after the cancelled generation");
    let n = model.metrics().generated_tokens;
    assert!((3..400).contains(&n), "{n} tokens: the cancel stopped the generation");
    n
}

/// A rank of a mirrored job: rank 0 makes the calls, the others follow.
pub(super) fn rank_mirrored(dir: &str) {
    let rank = mlx::distributed::launch::rank_from_env().expect("MLX_RANK").expect("a rank");
    let model = MetalModel::load(Path::new(dir), &tp_settings()).unwrap_or_else(|e| {
        eprintln!("rank {rank}: {e}");
        std::process::exit(6)
    });
    assert_eq!(model.tensor_parallel_rank().expect("rank"), Some(rank));
    if rank == 0 {
        assert!(model.follow().is_err(), "rank 0 does not follow");
        let first_cancel = cancelled_generation(&model);
        let result = scenario(&model);
        let last_cancel = cancelled_generation(&model);
        println!(
            "RESULT {}",
            json!({"rank": rank, "calls": result, "first_cancel": first_cancel, "last": last_cancel})
        );
        model.close().expect("close");
    } else {
        let e = model
            .generate("x", &greedy(2), CancelToken::new())
            .and_then(|s| s.collect_text())
            .expect_err("a follower takes no calls");
        assert!(e.to_string().contains("runs what rank 0 runs"), "{e}");
        model.follow().unwrap_or_else(|e| {
            eprintln!("rank {rank}: {e}");
            std::process::exit(7)
        });
        // The last job was rank 0's last cancelled generation.
        println!("RESULT {}", json!({"rank": rank, "last": model.metrics().generated_tokens}));
        model.close().expect("close");
    }
}

#[test]
fn a_mirrored_model_answers_like_the_single_process_and_stops_every_rank_together() {
    let _serial = super::serial();
    let (dir, want) = single_process(scenario);
    let outs = run_job(&format!("mirror:{}", dir.display()), 2);
    let results: Vec<Value> = outs.iter().map(result_of).collect();
    assert_eq!(results[0]["calls"], want, "rank 0's answers equal the single process's");
    assert_eq!(results[1]["last"], results[0]["last"], "both ranks stopped at the same step");
    assert!(results[0]["first_cancel"].as_u64().is_some_and(|n| n < 400), "{}", results[0]);
}

/// A rank of a job in which rank 1's adapter swap and attention inspection fail (its fail
/// points): rank 0's calls fail naming rank 1, and both ranks go on in step.
pub(super) fn rank_agreeing(dir: &str) {
    let rank = mlx::distributed::launch::rank_from_env().expect("MLX_RANK").expect("a rank");
    let model = MetalModel::load(Path::new(dir), &tp_settings()).unwrap_or_else(|e| {
        eprintln!("rank {rank}: {e}");
        std::process::exit(6)
    });
    if rank == 0 {
        let adapter = model.set_adapter(None).expect_err("rank 1's swap fails").to_string();
        let inspect =
            model.inspect_attention("Hello", CancelToken::new()).expect_err("rank 1's part fails").to_string();
        let generated =
            ids_of(model.generate("The quick brown fox", &greedy(8), CancelToken::new()).expect("generate"));
        println!("RESULT {}", json!({"rank": rank, "adapter": adapter, "inspect": inspect, "generate": generated}));
        model.close().expect("close");
    } else {
        model.follow().unwrap_or_else(|e| {
            eprintln!("rank {rank}: {e}");
            std::process::exit(7)
        });
        println!("RESULT {}", json!({"rank": rank}));
        model.close().expect("close");
    }
}

#[test]
fn a_job_that_fails_on_one_rank_fails_on_rank_0_and_every_rank_goes_on() {
    let _serial = super::serial();
    let (dir, want) = single_process(|m| {
        ids_of(m.generate("The quick brown fox", &greedy(8), CancelToken::new()).expect("generate"))
    });
    let failpoints = [("MLXR_FAILPOINTS", "mirror.adapter@1,mirror.inspect@1")];
    let outs = run_job_with(&format!("agree:{}", dir.display()), 2, &failpoints);
    let r = result_of(&outs[0]);
    let adapter = r["adapter"].as_str().unwrap_or_default();
    assert!(
        adapter.contains("the adapter swap failed on tensor-parallel rank 1, so every rank is left without one")
            && adapter.contains("fail point mirror.adapter"),
        "{adapter}"
    );
    let inspect = r["inspect"].as_str().unwrap_or_default();
    assert!(inspect.contains("the attention inspection failed on tensor-parallel rank 1: "), "{inspect}");
    assert_eq!(r["generate"], json!(want), "the ranks stayed in step");
    assert_eq!(result_of(&outs[1])["rank"], json!(1), "rank 1 followed to the end");
}

#[test]
fn follow_needs_a_tensor_parallel_follower() {
    let dir = crate::common::tiny_model("qwen3-tiny");
    let model = MetalModel::load(&dir, &LoadSettings::default()).expect("load");
    let e = model.follow().expect_err("a single process has nothing to follow");
    assert!(e.to_string().contains("tensor-parallel rank"), "{e}");
    assert_eq!(model.tensor_parallel_rank().expect("rank"), None);
    model.close().expect("close");
}

#[test]
fn tensor_parallel_options_are_checked() {
    let dir = crate::common::tiny_model("qwen3-tiny");
    for (key, value, want) in [
        ("tensor_parallel", "two", "tensor_parallel = \"two\" is not a positive number of ranks"),
        ("tensor_parallel", "0", "is not a positive number of ranks"),
        ("distributed_backend", "tcp", "unknown backend \"tcp\""),
        ("distributed_timeout_s", "-1", "distributed_timeout_s = \"-1\" is not a positive number"),
        ("tp_vocab", "rows", "unknown vocabulary layout \"rows\"; expected sharded or replicated"),
        ("tp_step_timeout_s", "0", "tp_step_timeout_s = \"0\" is not a positive number"),
    ] {
        let settings = tp_settings().backend_option(key, value);
        let e = MetalModel::load(&dir, &settings).err().expect("a bad option");
        assert!(e.to_string().contains(want), "{key}={value}: {e}");
    }
    // One rank is no tensor parallelism at all.
    let one = LoadSettings::default().backend_option("tensor_parallel", "1");
    MetalModel::load(&dir, &one).expect("tensor_parallel = 1").close().expect("close");
}

#[test]
fn tensor_parallel_without_a_launcher_says_what_is_missing() {
    let _serial = super::serial();
    if mlx::distributed::launch::is_rank_process() {
        eprintln!("note: MLX_RANK is set in this environment; skipped");
        return;
    }
    let dir = crate::common::tiny_model("qwen3-tiny");
    let e = MetalModel::load(&dir, &tp_settings()).err().expect("no launcher environment");
    assert!(e.to_string().contains("MLX_RANK"), "{e}");
}
