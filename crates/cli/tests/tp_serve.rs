// SPDX-License-Identifier: EUPL-1.2
//! `mlxr serve` and `mlxr generate` with `--tensor-parallel 2` over the ring backend on
//! loopback: the launcher starts two ranks, rank 0 answers and the other mirrors it. On a
//! float32 fixture the answers are exactly the single process's.

mod common;

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use common::{Server, agent, endless_chat, post, post_stream, read_stream, run, text, tiny};
use serde_json::{Value, json};

const MODEL: &str = "qwen3-tiny";
const TP: [&str; 6] = ["--tensor-parallel", "2", "--distributed-backend", "ring", "--distributed-timeout", "30"];

/// One job at a time: the ranks find free loopback ports by binding and releasing them.
fn serial() -> MutexGuard<'static, ()> {
    static JOBS: Mutex<()> = Mutex::new(());
    JOBS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A few greedy requests, whole and streamed, chat and completion: what the server said.
fn answers(server: &Server) -> Value {
    let chat = json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "ignore_eos": true});
    let text = json!({"prompt": "The quick brown fox", "max_tokens": 10, "ignore_eos": true});
    let stop = json!({"prompt": "The quick brown fox", "max_tokens": 20, "stop": ["e"]});
    let mut out = Vec::new();
    for (path, body) in [("/v1/chat/completions", &chat), ("/v1/completions", &text), ("/v1/completions", &stop)] {
        let (status, whole) = post(&server.url(path), body);
        assert_eq!(status, 200, "{whole}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (status, events) = post_stream(&server.url(path), &streamed);
        assert_eq!(status, 200);
        let (streamed_text, _, done) = read_stream(events);
        assert!(done, "the stream ends with [DONE]");
        let choice = &whole["choices"][0];
        // How much of the prompt the prompt cache served depends on what ran before, not on the ranks.
        let mut usage = whole["usage"].clone();
        usage.as_object_mut().map(|u| u.remove("prompt_tokens_details"));
        out.push(json!({
            "text": choice["message"]["content"].as_str().or(choice["text"].as_str()),
            "finish": choice["finish_reason"],
            "usage": usage,
            "streamed": streamed_text,
        }));
    }
    Value::Array(out)
}

#[test]
fn a_sharded_server_answers_like_the_single_process_and_survives_a_disconnect() {
    let _serial = serial();
    let model = tiny(MODEL);
    let single = Server::start(&model, &[]);
    let want = answers(&single);
    let (code, stderr) = single.stop(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");

    let mut args = vec!["--max-tokens-limit", "100000"];
    args.extend(TP);
    let server = Server::start(&model, &args);
    assert_eq!(answers(&server), want, "two ranks answer exactly as one process");

    // A client that goes away mid-stream: rank 0 cancels, and both ranks stop at the same step.
    let events = endless_chat(&server);
    drop(events);
    let stats = server.wait_for("the engine stops after the disconnect", Duration::from_secs(60), |s| {
        s["running"] == 0 && s["cancelled"] == 1
    });
    assert!(stats["cancelled_generation_tokens"].as_u64().is_some_and(|n| n < 100000), "{stats}");
    // Were the ranks out of step, these answers would differ or never come.
    assert_eq!(answers(&server), want, "the ranks stayed in step");

    // SIGTERM to the launcher: rank 0 shuts down, the other rank follows, and all exit cleanly.
    let (code, stderr) = server.stop(Duration::from_secs(60));
    assert_eq!(code, Some(0), "every rank ends successfully; stderr:\n{stderr}");
    assert!(stderr.contains("shutting down"), "rank 0's log is shown: {stderr}");
}

/// What the single process answers (see `answers`).
fn single_answers(model: &str) -> Value {
    let single = Server::start(model, &[]);
    let want = answers(&single);
    let (code, stderr) = single.stop(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{stderr}");
    want
}

#[test]
fn a_generation_that_fails_on_one_rank_fails_on_rank_0_and_every_rank_goes_on() {
    let _serial = serial();
    let model = tiny(MODEL);
    let want = single_answers(&model);
    // Rank 0's engine panics before its first step (it fails what it holds; rank 1, which knew
    // nothing, must drop that request too). Then, on rank 1 alone, a request cannot start (as a
    // failed allocation there would) and the next cannot hand out its first token (as a
    // detokeniser or a constraint could fail): rank 1 tells rank 0, and every rank ends it.
    // Another job: rank 1 panics after its first step; it ends what it holds, and tells rank 0.
    let jobs = [
        (&["engine.step", "mirror.admit", "mirror.emit"][..], "engine.step@0,mirror.admit@1,mirror.emit@1"),
        (&["mirror.panic"][..], "mirror.panic@1"),
    ];
    let chat = json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "ignore_eos": true});
    let mut logs = String::new();
    for (failing, failpoints) in jobs {
        // The fail points count the engines' jobs and steps from the start: no warm-up.
        let args = [&TP[..], &["--no-warmup"]].concat();
        let server = Server::start_with_env(&model, &args, &[("MLXR_FAILPOINTS", failpoints)]);
        for point in failing {
            let (status, body) = post(&server.url("/v1/chat/completions"), &chat);
            assert_eq!(status, 500, "{point}: the failed generation is an error on rank 0: {body}");
        }
        // Both ranks go on in step: the next requests are answered as one process answers them.
        assert_eq!(answers(&server), want, "the ranks stayed in step after {failing:?}");
        let (code, stderr) = server.stop(Duration::from_secs(60));
        assert_eq!(code, Some(0), "every rank ends successfully; stderr:\n{stderr}");
        logs.push_str(&stderr);
    }
    for failing in [
        "scheduler: fail point mirror.admit",
        "scheduler: fail point mirror.emit",
        "the engine failed (a mirrored job: fail point mirror.panic)",
    ] {
        let said = format!("tensor-parallel rank 1 failed this generation, and every rank ended it: {failing}");
        assert!(logs.contains(&said), "rank 0's log names the rank and the cause ({said}): {logs}");
    }
}

#[test]
fn a_rank_that_hangs_ends_the_job_with_an_error_that_names_it() {
    let _serial = serial();
    let model = tiny(MODEL);
    let mut args = TP.to_vec();
    args.extend(["--step-timeout", "3", "--no-warmup"]);
    // Rank 1 hangs at the first step it receives; rank 0 waits for it in that step's collectives.
    let server = Server::start_with_env(&model, &args, &[("MLXR_FAILPOINTS", "mirror.hang@1")]);
    let chat = json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4});
    let answer = agent()
        .post(&server.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .send(chat.to_string());
    assert!(answer.is_err(), "the request dies with the job, unanswered: {:?}", answer.map(|r| r.status()));
    let (code, stderr) = server.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(1), "the job ends unsuccessfully; stderr:\n{stderr}");
    assert!(
        stderr.contains("tensor-parallel rank 0: a scheduler step did not finish within 3 s: rank 1 did not take part"),
        "{stderr}"
    );
    assert!(stderr.contains("rank 0 of 2 failed (exit status: 1)"), "the launcher says which rank ended it: {stderr}");
}

#[test]
fn generate_over_two_ranks_prints_what_one_process_prints() {
    let _serial = serial();
    let model = tiny(MODEL);
    let base = ["generate", "--model", &model, "--max-tokens", "12", "--ignore-eos", "--raw"];
    let one = run(&[&base[..], &["Hello"]].concat(), "");
    let (want, stderr) = text(&one);
    assert!(one.status.success(), "{stderr}");
    assert!(!want.trim().is_empty());

    let two = run(&[&base[..], &TP, &["--metrics", "Hello"]].concat(), "");
    let (got, stderr) = text(&two);
    assert!(two.status.success(), "{stderr}");
    assert_eq!(got, want, "the same text over two ranks");
    assert!(stderr.contains("generation: 12 tokens"), "rank 0's metrics reach the launcher's stderr: {stderr}");

    // The prompt on standard input reaches the ranks too.
    let piped = run(&[&base[..], &TP].concat(), "Hello\n");
    let (got, stderr) = text(&piped);
    assert!(piped.status.success(), "{stderr}");
    assert_eq!(got, want);
}

#[test]
fn chat_over_two_ranks_answers_what_one_process_answers() {
    let _serial = serial();
    let model = tiny(MODEL);
    let base = ["chat", "--model", &model, "--max-tokens", "6", "--metrics"];
    let script = "Hello\nHow are you?\n/reset\nHello\n/exit\n";
    let one = run(&base, script);
    let (want, stderr) = text(&one);
    assert!(one.status.success(), "{stderr}");
    assert_eq!(stderr.matches("generation: ").count(), 3, "three turns: {stderr}");
    assert!(!want.is_empty());

    // Rank 0 reads the launcher's standard input and writes its output as it goes.
    let two = run(&[&base[..], &TP].concat(), script);
    let (got, stderr) = text(&two);
    assert!(two.status.success(), "{stderr}");
    assert_eq!(got, want, "the same replies over two ranks");
    assert_eq!(stderr.matches("generation: ").count(), 3, "rank 0's metrics for each turn: {stderr}");
    assert!(stderr.contains("(conversation reset)"), "{stderr}");
}

#[test]
fn tensor_parallel_needs_the_metal_backend() {
    let model = tiny(MODEL);
    let out = run(&["generate", "--model", &model, "--backend", "mlx_lm", "--tensor-parallel", "2", "x"], "");
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("--tensor-parallel needs the metal backend; --backend mlx_lm"), "{stderr}");
    let out = run(&["generate", "--model", &model, "--tensor-parallel", "2", "--distributed-timeout", "0", "x"], "");
    let (_, stderr) = text(&out);
    assert!(stderr.contains("--distributed-timeout 0: must be a positive number of seconds"), "{stderr}");
    let out = run(&["generate", "--model", &model, "--tensor-parallel", "2", "--step-timeout", "0", "x"], "");
    let (_, stderr) = text(&out);
    assert!(stderr.contains("--step-timeout 0: must be a positive number of seconds"), "{stderr}");
}
