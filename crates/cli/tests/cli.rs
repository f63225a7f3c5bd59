// SPDX-License-Identifier: EUPL-1.2
//! `mlxr generate`, `chat`, `models` and `info` end to end: the built binary on the tiny fixture
//! models (deterministic gibberish) and, when it is there, the real SmolLM2.

mod common;

use common::{run, text, tiny};

#[test]
fn generate_streams_a_deterministic_continuation() {
    let model = tiny("qwen3-tiny");
    let args = ["generate", "--model", &model, "--max-tokens", "8", "Hello"];
    let first = run(&args, "");
    let (out, err) = text(&first);
    assert!(first.status.success(), "{err}");
    assert!(out.ends_with('\n') && out.len() > 1, "{out:?}");
    assert_eq!(err, "", "nothing on standard error without --metrics");
    let again = run(&args, "");
    assert_eq!(text(&again).0, out, "greedy generation is deterministic");

    let piped = run(&["generate", "--model", &model, "--max-tokens", "8"], "Hello\n");
    assert_eq!(text(&piped).0, out, "the prompt can come from standard input");
    let dash = run(&["generate", "--model", &model, "--max-tokens", "8", "-"], "Hello");
    assert_eq!(text(&dash).0, out, "`-` reads standard input");
}

#[test]
fn generate_says_when_the_context_is_full() {
    let model = tiny("qwen3-tiny");
    let args =
        ["generate", "--model", &model, "--context-length", "16", "--max-tokens", "40", "--ignore-eos", "--raw", "Hi"];
    let full = run(&args, "");
    let (out, err) = text(&full);
    assert!(full.status.success(), "{err}");
    assert!(out.ends_with('\n'), "what fitted is written: {out:?}");
    let counts = err.strip_prefix("stopped: the context is full (").expect(&err);
    let n: Vec<usize> = counts.split(' ').take(4).filter_map(|w| w.parse().ok()).collect();
    assert_eq!(n.iter().sum::<usize>(), 16, "prompt and generated tokens fill the context: {err}");
    assert!(err.contains("generated tokens) before max_tokens; shorten the prompt or raise --context-length"), "{err}");
    let fits = run(&["generate", "--model", &model, "--max-tokens", "4", "--ignore-eos", "Hi"], "");
    assert_eq!(text(&fits).1, "", "no note when max_tokens ended it");
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, mark) in [("bash", "_mlxr()"), ("zsh", "#compdef mlxr"), ("fish", "complete -c mlxr")] {
        let out = run(&["completions", shell], "");
        assert!(out.status.success(), "{shell}: {}", text(&out).1);
        let script = text(&out).0;
        assert!(
            script.contains(mark) && script.contains("generate") && script.contains("ignore-chat-template"),
            "{shell}"
        );
    }
}

#[test]
fn generate_with_chat_template_and_metrics() {
    let model = tiny("llama3-tiny");
    let plain = run(&["generate", "-m", &model, "--max-tokens", "6", "--ignore-eos", "--raw", "Hi"], "");
    let chat = run(&["generate", "-m", &model, "--max-tokens", "6", "--ignore-eos", "--chat", "--metrics", "Hi"], "");
    // The model has a template of its own: it is applied by default, as mlx_lm.generate does.
    let default = run(&["generate", "-m", &model, "--max-tokens", "6", "--ignore-eos", "Hi"], "");
    assert_eq!(text(&default).0, text(&chat).0, "the chat template is the default");
    // mlx-lm's names for our flags.
    let mlx_lm_flags = ["generate", "-m", &model, "--max-tokens", "6", "--ignore-eos", "--temp", "0", "-p", "Hi"];
    assert_eq!(text(&run(&mlx_lm_flags, "")).0, text(&chat).0);
    let raw = run(&["generate", "-m", &model, "--max-tokens", "6", "--ignore-eos", "--ignore-chat-template", "Hi"], "");
    assert_eq!(text(&raw).0, text(&plain).0);
    let verbose = run(&["generate", "-m", &model, "--max-tokens", "6", "--ignore-eos", "--verbose", "Hi"], "");
    let stats = text(&verbose).1;
    let names: Vec<&str> = stats.lines().map(|l| l.split(':').next().unwrap_or("")).collect();
    assert!(names.len() >= 2, "{stats:?}");
    assert_eq!(names, ["Prompt", "Generation", "Peak memory"][..names.len().min(3)], "{stats:?}");
    assert!(stats.contains("Generation: 6 tokens, ") && stats.contains(" tokens-per-sec"), "{stats:?}");
    let (chat_out, chat_err) = text(&chat);
    assert!(chat.status.success(), "{chat_err}");
    assert_ne!(text(&plain).0, chat_out, "the chat template changes the prompt");
    assert!(chat_err.contains("generation: 6 tokens"), "{chat_err}");
    assert!(chat_err.starts_with("prompt: ") && chat_err.contains("tokens/s"), "{chat_err}");
    let system = run(&["generate", "-m", &model, "--max-tokens", "6", "--system", "Be terse", "Hi"], "");
    assert!(system.status.success(), "{}", text(&system).1);
}

#[test]
fn generate_follows_a_json_schema_or_a_regex() {
    let model = tiny("qwen3-tiny");
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("schema.json");
    let fields = r#"{"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
                     "required": ["ok", "n"], "additionalProperties": false}"#;
    std::fs::write(&schema, fields).unwrap();
    let schema = schema.to_str().unwrap();
    for seed in ["1", "2", "3"] {
        let args = ["generate", "-m", &model, "--max-tokens", "40", "--temperature", "1", "--seed", seed];
        let out = run(&[&args[..], &["--json-schema", schema, "x"]].concat(), "");
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        let v: serde_json::Value =
            serde_json::from_str(stdout.trim_end()).unwrap_or_else(|e| panic!("{stdout:?}: {e}"));
        assert!(v["ok"].is_boolean() && [1, 2, 3].contains(&v["n"].as_i64().unwrap()), "{v}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
        let out = run(&[&args[..], &["--regex", "[xyz]{4}-[0-9]", "x"]].concat(), "");
        let line = text(&out).0;
        let line = line.trim_end();
        assert!(
            line.len() == 6 && line[..4].bytes().all(|b| b"xyz".contains(&b)) && line.as_bytes()[4] == b'-',
            "{line:?}"
        );
    }
    let out = run(&["generate", "-m", &model, "--json-schema", "/no/such.json", "x"], "");
    let err = text(&out).1;
    assert!(!out.status.success() && err.contains("--json-schema /no/such.json"), "{err}");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"type": "nonsense"}"#).unwrap();
    let out = run(&["generate", "-m", &model, "--json-schema", bad.to_str().unwrap(), "x"], "");
    let err = text(&out).1;
    assert!(!out.status.success() && err.contains("nonsense"), "{err}");
    let out = run(&["generate", "-m", &model, "--regex", "a", "--json-schema", schema, "x"], "");
    assert!(!out.status.success(), "one constraint at most");
}

#[test]
fn generate_reports_errors_with_their_causes() {
    let out = run(&["generate", "--model", "/no/such/model", "x"], "");
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    assert_eq!(stdout, "");
    assert!(stderr.starts_with("mlxr: error: backend \"metal\" failed to load model /no/such/model: "), "{stderr}");

    let model = tiny("qwen3-tiny");
    let out = run(&["generate", "--model", &model, "--temperature", "-1", "x"], "");
    assert!(!out.status.success());
    assert_eq!(text(&out).1, "mlxr: error: --temperature -1: must be a finite number >= 0\n");

    let out = run(&["generate", "--model", &model, "--temperature", "1e30", "x"], "");
    assert!(
        text(&out).1.starts_with("mlxr: error: --temperature 1000000000000000000000000000000: must be at most 100")
    );
    let out = run(&["generate", "--model", &model, "--context-length", "4096", "--max-tokens", "2", "x"], "");
    assert!(out.status.success(), "a longer context is allowed: {:?}", text(&out));
    assert!(text(&out).1.contains("the context length asked for is beyond the model's own"), "{:?}", text(&out));
    let out = run(&["bench", "--model", &model, "--prompts", "99999", "--no-public"], "");
    assert_eq!(
        text(&out).1,
        "mlxr: error: bench: a prompt of 99999 tokens and 256 decoded need 100255 positions; the model's context is 128\n"
    );

    let out = run(&["generate", "--model", &model, "--backend", "nonesuch", "x"], "");
    assert!(
        text(&out).1
            == "mlxr: error: --backend nonesuch: no such backend; this mlxr has metal, mlx_lm (`mlxr info` lists them)\n",
        "{:?}",
        text(&out)
    );

    let out = run(&["generate", "--model", &model], "");
    assert_eq!(text(&out).1, "mlxr: error: the prompt is empty\n");

    let out = run(&["generate", "--model", &model, "--device", "quantum", "x"], "");
    assert_eq!(out.status.code(), Some(2), "clap's usage errors exit with 2");
    assert!(text(&out).1.contains("must be one of auto, gpu, cpu"));
}

#[test]
fn chat_takes_turns_and_commands_from_standard_input() {
    let model = tiny("qwen3-tiny");
    let dir = tempfile::tempdir().unwrap();
    let first = dir.path().join("first.json");
    let last = dir.path().join("last.json");
    let script = format!(
        "Hello\nHow are you?\n/save {first}\n/reset\n/frobnicate\nHello\n/load {first}\n/system Be brief\n\
         And now?\n/save {last}\n/exit\nnever sent\n",
        first = first.display(),
        last = last.display(),
    );
    let out = run(&["chat", "--model", &model, "--max-tokens", "5", "--metrics"], &script);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("error: unknown command /frobnicate"), "{stderr}");
    assert!(stderr.contains("(loaded 4 turns from "), "{stderr}");
    assert!(stderr.contains("(conversation reset)") && stderr.contains("(system message set)"), "{stderr}");
    assert_eq!(stderr.matches("generation: ").count(), 4, "four turns were sent: {stderr}");
    assert_eq!(stderr.matches(" cached, ").count(), 4, "each turn says how much of the prompt was cached: {stderr}");

    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (first, last) = (read(&first), read(&last));
    assert_eq!(first["format"], "mlxr-chat/1");
    assert!(first["system"].is_null());
    assert_eq!(last["system"], "Be brief");
    let said = |v: &serde_json::Value, i: usize| v["messages"][i]["content"].as_str().unwrap().to_owned();
    assert_eq!(first["messages"].as_array().unwrap().len(), 4);
    assert_eq!(last["messages"].as_array().unwrap().len(), 6, "the loaded turns, then one more");
    assert_eq!(
        (said(&last, 0), said(&last, 2), said(&last, 4)),
        ("Hello".into(), "How are you?".into(), "And now?".into())
    );
    assert_eq!(said(&first, 1), said(&last, 1));
    // The replies as printed: after /reset the first turn gets the first answer again.
    let (r1, r2, r4) = (said(&last, 1), said(&last, 3), said(&last, 5));
    assert_eq!(stdout, format!("{r1}\n{r2}\n{r1}\n{r4}\n"));
}

#[test]
fn models_lists_the_fixtures_as_a_table() {
    let dir = std::path::Path::new(&tiny("qwen3-tiny")).parent().unwrap().to_path_buf();
    let out = run(&["models", dir.to_str().unwrap()], "");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("PATH") && lines[0].contains("QUANTISATION"), "{stdout}");
    let row = lines.iter().find(|l| l.contains("/qwen3-tiny-4bit ")).expect("the 4-bit fixture");
    assert!(row.contains("qwen3") && row.contains("4-bit/"), "{row}");
    let plain = lines.iter().find(|l| l.contains("/llama3-tiny ")).expect("the llama fixture");
    assert!(plain.contains(" - "), "not quantised: {plain}");

    let json = run(&["models", "--json", dir.to_str().unwrap()], "");
    let first: serde_json::Value = serde_json::from_str(text(&json).0.lines().next().unwrap()).unwrap();
    assert!(first["path"].is_string() && first["num_files"].as_u64() >= Some(1), "{first}");

    let missing = run(&["models", "/no/such/dir"], "");
    assert!(!missing.status.success());
    assert!(text(&missing).1.starts_with("mlxr: error: cannot access /no/such/dir"), "{:?}", text(&missing));
}

#[test]
fn info_prints_device_version_and_model() {
    let out = run(&["info"], "");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("MLX 0.32."), "{stdout}");
    assert!(stdout.contains("device cpu: "), "{stdout}");
    assert!(stdout.contains("backend metal: available"), "{stdout}");
    // The BLAS line names the library; the binary resolves the one the build linked.
    assert!(stdout.contains("\nBLAS: "), "{stdout}");
    #[cfg(feature = "metal")]
    if let Some(linked) = mlx::blas::linked() {
        let name = linked.file_name().and_then(|n| n.to_str()).unwrap_or("libopenblas");
        assert!(
            stdout.lines().any(|l| l.starts_with("BLAS: ") && l.contains(name) && l.contains(" threads)")),
            "{stdout}"
        );
        assert!(!stdout.contains("warning: "), "{stdout}");
    }

    let model = tiny("qwen3-tiny-4bit");
    let out = run(&["info", "--model", &model], "");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("architecture: qwen3\n"), "{stdout}");
    assert!(stdout.contains("quantisation: 4-bit"), "{stdout}");
    assert!(stdout.contains("context length: 128\n"), "{stdout}");
    assert!(stdout.contains("compute dtype: bfloat16 (auto: kept quantised"), "{stdout}");

    // A bfloat16 checkpoint: auto says what it chose and why; an explicit type is taken as asked.
    let model = tiny("qwen3-tiny");
    let out = run(&["info", "--model", &model, "--device", "cpu"], "");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let auto = if cfg!(target_arch = "x86_64") {
        "compute dtype: float32 (auto: a bfloat16 checkpoint on an x86_64 CPU computes in float32"
    } else {
        "compute dtype: bfloat16 (auto: the checkpoint's own type (bfloat16) on this CPU)"
    };
    assert!(stdout.contains(auto), "{stdout}");
    if cfg!(target_arch = "x86_64") {
        // Its table and head stay in bfloat16, multiplied by our kernel.
        assert!(stdout.contains("the embedding table and the output head stay bfloat16"), "{stdout}");
    }
    let out = run(&["info", "--model", &model, "--dtype", "f16"], "");
    assert!(text(&out).0.contains("compute dtype: float16 (dtype = float16 was asked for"), "{:?}", text(&out));
    let out = run(&["info", "--model", &model, "--dtype", "double"], "");
    assert_eq!(out.status.code(), Some(2), "a bad --dtype is a usage error");
    assert!(
        text(&out).1.contains("invalid setting dtype = \"double\": must be one of auto, float32"),
        "{:?}",
        text(&out)
    );
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let Some(model) = common::smollm2("smollm2_knows_the_capital_of_france") else { return };
    let out =
        run(&["generate", "--model", &model, "--chat", "--max-tokens", "40", "What is the capital of France?"], "");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Paris"), "{stdout}");
}

#[test]
fn bench_reports_json_for_a_tiny_model() {
    let model = tiny("llama3-tiny");
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("bench.json");
    let out = run(
        &["bench", "-m", &model, "--prompts", "8,16", "--decode", "4", "--runs", "1", "--warmup", "0", "--json"],
        "",
    );
    assert!(!out.status.success(), "--json needs a value");
    let args = ["bench", "-m", &model, "--prompts", "8,16", "--decode", "4", "--runs", "1", "--warmup", "0"];
    let out = run(&[&args[..], &["--json", report.to_str().unwrap()]].concat(), "");
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ours         prompt     8:"), "a summary line per prompt length: {stderr}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(doc["schema"], "mlxr-bench/1");
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["prompt_tokens"], 8);
    assert_eq!(results[1]["runs"][0]["generated_tokens"], 4);
    assert!(doc["public"].is_object(), "the public API's side ran or says why not: {}", doc["public"]);

    let bad = run(&["bench", "-m", &model, "--decode", "1"], "");
    assert!(!bad.status.success());
    assert_eq!(text(&bad).1, "mlxr: error: bench: decode must be at least 2 (the decode rate needs two tokens)\n");
}

/// The fixtures virtualenv's interpreter (with mlx-lm), or a printed reason to skip.
fn python(test: &str) -> Option<String> {
    match std::env::var("MLXR_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            common::skip(test, "MLXR_PYTHON is not set (cargo xtask test sets it to the fixtures virtualenv)");
            None
        }
    }
}

#[test]
fn both_backends_generate_the_same_text() {
    let Some(python) = python("both_backends_generate_the_same_text") else { return };
    let model = tiny("qwen3-tiny");
    for extra in [&["--raw", "The quick brown fox"][..], &["Hi"][..]] {
        // The same compute type through both (mlx_lm's `auto` is mlx-lm's own, metal's may cast):
        // float32, so the bridge's cast is checked too.
        let base = ["generate", "--model", &model, "--max-tokens", "10", "--dtype", "float32"];
        let metal = run(&[&base[..], &["--backend", "metal"], extra].concat(), "");
        let mlx_lm = run(&[&base[..], &["--backend", "mlx_lm", "--python", &python], extra].concat(), "");
        assert!(metal.status.success() && mlx_lm.status.success(), "{:?} {:?}", text(&metal), text(&mlx_lm));
        assert_eq!(text(&metal).0, text(&mlx_lm).0, "greedy output of {extra:?} through metal and mlx_lm");
    }
    let out = run(&["generate", "--model", &model, "--backend", "mlx_lm", "--python", "/no/python", "x"], "");
    assert!(!out.status.success());
    let err = text(&out).1;
    assert!(err.contains("\"mlx_lm\" is not available") && err.contains("Python interpreter /no/python"), "{err:?}");
}

/// Ctrl-C during a reply stops it and the chat goes on; Ctrl-C between turns ends the chat.
#[cfg(unix)]
#[test]
fn ctrl_c_interrupts_a_reply_and_then_ends_the_chat() {
    use std::io::{Read, Write};
    use std::process::Stdio;

    let model = tiny("qwen3-tiny");
    let mut child = common::mlxr()
        .args(["chat", "--model", &model, "--max-tokens", "1000000", "--ignore-eos"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mlxr chat");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"talk for ever\n").and_then(|()| stdin.flush()).unwrap();
    let mut first = [0u8; 64];
    let n = stdout.read(&mut first).expect("the reply starts");
    assert!(n > 0, "the reply starts streaming");
    let pid = child.id().to_string();
    let interrupt = || assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    interrupt();
    // The chat goes on: a second, short turn is answered. Standard output stays open (drained
    // here), so that the tokens printed before the interrupt lands do not meet a closed pipe.
    stdin.write_all(b"/reset\n").unwrap();
    let drain = std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("(conversation reset)") {
        let n = stderr.read(&mut buf).expect("reading stderr");
        assert!(n > 0, "the chat ended early; stderr: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("(interrupted)"), "{seen}");
    assert!(seen.contains("(the reply was interrupted and is not kept)"), "{seen}");
    // Between turns, Ctrl-C ends the chat with 130.
    interrupt();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    drop(stdin);
    drain.join().expect("the stdout reader").expect("reading stdout");
}
