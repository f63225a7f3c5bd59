// SPDX-License-Identifier: EUPL-1.2
//! The prompt cache through the public API: a request that starts like an
//! earlier one prefills only the rest and produces exactly what it produces
//! cold; sliding-window caches that dropped their first positions fall back
//! to a cold prefill; the store keeps to its byte bound, evicting the least
//! recently used; requests sharing a prefix at once each equal cold; an
//! adapter swap empties it; bad bounds are refused.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::{Arc, Barrier};

use inference_core::{CancelToken, Completion, GenerateSettings, LoadSettings, LogitsMode, Registry, TextModel};
use mlx_metal::tokenizer::Tokenizer;

/// `model` with the backend option `prompt_cache_bytes` (the default when `None`).
fn load(path: &Path, bytes: Option<&str>) -> Arc<dyn TextModel> {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    let mut settings = LoadSettings::default().backend("metal").device(inference_core::Device::Cpu);
    if let Some(b) = bytes {
        settings = settings.backend_option("prompt_cache_bytes", b);
    }
    let model = reg.load_model(path, &settings).unwrap_or_else(|e| panic!("{}: {}", path.display(), e.report()));
    Arc::from(model)
}

fn settings() -> GenerateSettings {
    GenerateSettings::default().max_tokens(8).ignore_eos(true).logits(LogitsMode::LogProbs)
}

fn run(model: &dyn TextModel, prompt: &str) -> Completion {
    model.generate(prompt, &settings(), CancelToken::new()).unwrap().complete().unwrap()
}

fn cached(c: &Completion) -> usize {
    c.metrics.expect("metrics").cached_prompt_tokens
}

fn ids(c: &Completion) -> Vec<u32> {
    c.tokens.iter().map(|t| t.id).collect()
}

/// The same tokens and text, and log-probabilities within float tolerance.
fn assert_same(got: &Completion, cold: &Completion, what: &str) {
    assert_eq!(ids(got), ids(cold), "{what}: token ids");
    assert_eq!(got.text, cold.text, "{what}: text");
    for (a, b) in got.tokens.iter().zip(&cold.tokens) {
        let (x, y) = (a.logprob.expect("log-prob"), b.logprob.expect("log-prob"));
        assert!((x - y).abs() < 1e-3, "{what}: log-prob {x} vs {y}");
    }
}

fn shared(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// What a request for `prompt` reuses after one generation of `earlier` that
/// produced `emitted` alone (its caches then hold every token but the last):
/// the shared prefix, short of the prompt's last token; nothing where the
/// model's sliding-window caches dropped positions and the prompt leaves the
/// stored tokens before their end.
fn expected_reuse(tok: &Tokenizer, earlier: &str, emitted: &[u32], prompt: &str, dropped: bool) -> usize {
    let mut stored = tok.encode_prompt(earlier).unwrap();
    stored.extend_from_slice(&emitted[..emitted.len() - 1]);
    let ids = tok.encode_prompt(prompt).unwrap();
    let k = shared(&stored, &ids).min(ids.len() - 1);
    if dropped && k < stored.len() { 0 } else { k }
}

fn check_reuse(path: &Path, name: &str, prefix: &str, dropped: bool) {
    let tok = Tokenizer::from_dir(path).unwrap();
    let (a, b) = (format!("{prefix} Question one: what is a river?"), format!("{prefix} Question two: why?"));
    let cold_model = load(path, Some("0"));
    let cold_a = run(cold_model.as_ref(), &a);
    let cold_b = run(cold_model.as_ref(), &b);
    let extended = format!("{a}{} And then?", cold_a.text);
    let cold_c = run(cold_model.as_ref(), &extended);
    assert_eq!((cached(&cold_a), cached(&cold_b), cached(&cold_c)), (0, 0, 0), "{name}: no prompt cache");
    assert_eq!(cold_model.engine_load().unwrap().prompt_cache_capacity_bytes, 0);

    // B shares A's prefix.
    let model = load(path, None);
    let first = run(model.as_ref(), &a);
    assert_same(&first, &cold_a, &format!("{name}: the first request"));
    assert_eq!(cached(&first), 0, "{name}: nothing cached before the first request");
    let warm_b = run(model.as_ref(), &b);
    assert_same(&warm_b, &cold_b, &format!("{name}: a request sharing the prefix"));
    let want = expected_reuse(&tok, &a, &ids(&cold_a), &b, dropped);
    assert_eq!(cached(&warm_b), want, "{name}: tokens reused for B");
    if !dropped {
        assert!(want >= tok.encode_prompt(prefix).unwrap().len() - 1, "{name}: {want} tokens reused");
    }
    let m = warm_b.metrics.unwrap();
    assert_eq!(m.prompt_tokens, tok.encode_prompt(&b).unwrap().len(), "{name}: prompt tokens count the cached ones");

    // C continues A's conversation: it reuses A's prompt and answer.
    let model = load(path, None);
    run(model.as_ref(), &a);
    let warm_c = run(model.as_ref(), &extended);
    assert_same(&warm_c, &cold_c, &format!("{name}: a request continuing an earlier one"));
    let want = expected_reuse(&tok, &a, &ids(&cold_a), &extended, dropped);
    assert_eq!(cached(&warm_c), want, "{name}: tokens reused for C");
    let state = model.engine_load().unwrap();
    assert!(state.prompt_cache_hits >= u64::from(want > 0), "{state:?}");
    assert!(state.prompt_cache_entries >= 1 && state.prompt_cache_bytes > 0, "{state:?}");
}

#[test]
fn a_request_sharing_a_prefix_prefills_only_the_rest_and_equals_cold() {
    let prefix = "You are a careful assistant. Answer briefly, in plain words, and never make things up.";
    for name in ["qwen3-tiny", "llama3-tiny", "llama-tiny", "llama-tiny-8bit", "qwen3-tiny-4bit", "qwen2-tiny"] {
        check_reuse(&common::tiny_model(name), name, prefix, false);
    }
    // Gemma's tiny window (8 positions) has slid past the start of every stored generation:
    // only a request that runs on from its very end can use it.
    check_reuse(&common::tiny_model("gemma3-tiny"), "gemma3-tiny", prefix, true);
}

#[test]
fn a_long_shared_prefix_on_real_models() {
    let prefix = "You are a helpful assistant who answers questions about geography and history. ".repeat(8);
    for name in ["smollm2-135m-instruct", "gemma3-270m"] {
        let Some(dir) = common::real_model(name) else { continue };
        // Gemma 3 270M's window (512) holds all of these prompts.
        check_reuse(&dir, name, &prefix, false);
    }
}

#[test]
fn eviction_keeps_the_byte_bound_and_drops_the_least_recently_used() {
    let path = common::tiny_model("llama3-tiny");
    let probe = load(&path, None);
    let per_token = probe.engine_load().unwrap().kv_bytes_per_token;
    let prompts = ["alpha beta gamma delta", "one two three four five", "red green blue yellow"];
    let held: Vec<usize> = prompts
        .iter()
        .map(|p| {
            let c = run(probe.as_ref(), p);
            c.metrics.unwrap().prompt_tokens + c.tokens.len() - 1
        })
        .collect();
    // Room for the two largest entries, not all three.
    let mut sorted = held.clone();
    sorted.sort_unstable();
    let capacity = (sorted[1] + sorted[2]) * per_token + per_token / 2;
    assert!(capacity < held.iter().sum::<usize>() * per_token);
    let model = load(&path, Some(&capacity.to_string()));
    for p in prompts {
        run(model.as_ref(), p);
        let state = model.engine_load().unwrap();
        assert!(state.prompt_cache_bytes <= capacity, "{state:?}");
        assert_eq!(state.prompt_cache_capacity_bytes, capacity);
    }
    let state = model.engine_load().unwrap();
    assert_eq!(state.prompt_cache_entries, 2, "{state:?}");
    assert_eq!(state.prompt_cache_bytes, (held[1] + held[2]) * per_token, "the two latest entries");
    // The last is there; the first is gone (only a BOS token it shared with the others is left).
    let again_last = run(model.as_ref(), &format!("{} purple", prompts[2]));
    assert!(cached(&again_last) >= 4, "{:?}", again_last.metrics);
    let again_first = run(model.as_ref(), &format!("{} epsilon", prompts[0]));
    assert!(cached(&again_first) <= 1, "{:?}", again_first.metrics);
    // An entry bigger than the whole store is not kept.
    let tiny = load(&path, Some(&per_token.to_string()));
    run(tiny.as_ref(), prompts[0]);
    assert_eq!(tiny.engine_load().unwrap().prompt_cache_entries, 0);
}

#[test]
fn requests_sharing_a_prefix_at_once_each_equal_cold() {
    let path = common::tiny_model("qwen3-tiny");
    let tok = Tokenizer::from_dir(&path).unwrap();
    let prefix = "System: you answer in one word. Examples: sky -> blue, grass -> green, snow -> white.";
    let prompts: Vec<String> = (0..6).map(|i| format!("{prefix} item {i} ->")).collect();
    let cold_model = load(&path, Some("0"));
    let cold: Vec<Completion> = prompts.iter().map(|p| run(cold_model.as_ref(), p)).collect();
    let model = load(&path, None);
    let warm_up = format!("{prefix} sun ->");
    run(model.as_ref(), &warm_up);
    let start = Arc::new(Barrier::new(prompts.len()));
    let threads: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (model, start, p) = (Arc::clone(&model), Arc::clone(&start), p.clone());
            std::thread::spawn(move || {
                start.wait();
                run(model.as_ref(), &p)
            })
        })
        .collect();
    let base = tok.encode_prompt(&warm_up).unwrap();
    for ((t, c), p) in threads.into_iter().zip(&cold).zip(&prompts) {
        let got = t.join().expect("a caller panicked");
        assert_same(&got, c, p);
        let floor = shared(&base, &tok.encode_prompt(p).unwrap());
        assert!(cached(&got) >= floor, "{p}: {} cached, {floor} shared with the warm-up", cached(&got));
    }
    assert!(model.engine_load().unwrap().peak_batch_size >= 2);
}

#[test]
fn bad_bounds_are_refused_and_zero_turns_it_off() {
    let path = common::tiny_model("llama3-tiny");
    let reg = Registry::new().with(mlx_metal::backend::backend());
    for bad in ["-1", "lots", "1.5"] {
        let settings = LoadSettings::default().backend("metal").backend_option("prompt_cache_bytes", bad);
        let e = reg.load_model(&path, &settings).err().unwrap_or_else(|| panic!("{bad} was accepted"));
        let report = e.report().to_string();
        assert!(report.contains("prompt_cache_bytes") && report.contains(bad), "{report}");
    }
    let off = load(&path, Some("0"));
    run(off.as_ref(), "the same prompt twice");
    let again = run(off.as_ref(), "the same prompt twice");
    assert_eq!(cached(&again), 0);
    let state = off.engine_load().unwrap();
    assert_eq!((state.prompt_cache_entries, state.prompt_cache_hits), (0, 0), "{state:?}");
    let on = load(&path, None);
    assert!(on.engine_load().unwrap().prompt_cache_capacity_bytes > 0, "on by default");
}

/// `model` keeping its prompt cache in `dir`.
fn load_in(path: &Path, dir: &Path) -> Arc<dyn TextModel> {
    let reg = Registry::new().with(mlx_metal::backend::backend());
    let settings = LoadSettings::default()
        .backend("metal")
        .device(inference_core::Device::Cpu)
        .backend_option("prompt_cache_dir", dir.display().to_string());
    Arc::from(reg.load_model(path, &settings).unwrap_or_else(|e| panic!("{}", e.report())))
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    out.sort();
    out
}

#[test]
fn the_prompt_cache_outlives_a_restart() {
    let path = common::tiny_model("qwen3-tiny");
    let tok = Tokenizer::from_dir(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prefix = "You are a careful assistant. Answer briefly, in plain words, and never make things up.";
    let (a, b) = (format!("{prefix} What is a river?"), format!("{prefix} Why is the sea salty?"));
    let cold_b = run(load(&path, Some("0")).as_ref(), &b);

    let first = load_in(&path, dir.path());
    run(first.as_ref(), &a);
    first.close().unwrap();
    let written = files(dir.path());
    assert_eq!(written.len(), 1, "one entry, one file: {written:?}");

    // A restarted engine starts warm: the first request reuses the prefix.
    let second = load_in(&path, dir.path());
    let state = second.engine_load().unwrap();
    assert_eq!(state.prompt_cache_entries, 1, "{state:?}");
    let warm_b = run(second.as_ref(), &b);
    assert_same(&warm_b, &cold_b, "the first request after a restart");
    assert!(cached(&warm_b) >= tok.encode_prompt(prefix).unwrap().len() - 1, "{:?}", warm_b.metrics);
    second.close().unwrap();
    assert_eq!(files(dir.path()).len(), 2, "B's entry was written too");

    // Another model's engine, a broken file and a stranger's file: left alone, and the rest loads.
    std::fs::write(dir.path().join("broken.safetensors"), b"not a safetensors file").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"not ours").unwrap();
    let other = load_in(&common::tiny_model("llama3-tiny"), dir.path());
    assert_eq!(other.engine_load().unwrap().prompt_cache_entries, 0);
    run(other.as_ref(), "something else entirely");
    other.close().unwrap();
    assert_eq!(files(dir.path()).len(), 5, "the qwen3 files stay beside llama3's");
    // A write a crash cut short, long ago, is swept at load; a young one may
    // be another engine's write in progress and stays.
    let stale = dir.path().join(".0123456789abcdef-40.safetensors.4242-0-00c0ffee.tmp.safetensors");
    let young = dir.path().join(".fedcba9876543210-40.safetensors.4242-1-00c0ffee.tmp.safetensors");
    for p in [&stale, &young] {
        std::fs::write(p, b"half an entry").unwrap();
    }
    let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_modified(long_ago))
        .unwrap();
    let again = load_in(&path, dir.path());
    assert_eq!(again.engine_load().unwrap().prompt_cache_entries, 2);
    assert!(!stale.exists() && young.exists(), "{:?}", files(dir.path()));

    // Where no directory can be made, loading fails and says where.
    let blocked = dir.path().join("notes.txt").join("cache");
    let reg = Registry::new().with(mlx_metal::backend::backend());
    let settings =
        LoadSettings::default().backend("metal").backend_option("prompt_cache_dir", blocked.display().to_string());
    let e = reg.load_model(&path, &settings).err().expect("an impossible directory is refused");
    assert!(e.report().to_string().contains("notes.txt"), "{}", e.report());
    let settings = LoadSettings::default().backend("metal").backend_option("prompt_cache_dir", " ");
    let e = reg.load_model(&path, &settings).err().expect("an empty directory name is refused");
    assert!(e.report().to_string().contains("prompt_cache_dir"), "{}", e.report());
}

#[test]
fn an_adapter_swap_empties_the_prompt_cache() {
    let settings = LoadSettings::default().backend("metal").device(inference_core::Device::Cpu);
    let model = mlx_metal::backend::MetalModel::load(&common::tiny_model("llama3-tiny"), &settings).unwrap();
    run(&model, "the caches of this generation are kept");
    assert_eq!(model.engine_load().unwrap().prompt_cache_entries, 1);
    model.set_adapter(None).unwrap();
    let state = model.engine_load().unwrap();
    assert_eq!((state.prompt_cache_entries, state.prompt_cache_bytes), (0, 0), "{state:?}");
}

#[test]
fn a_quantised_cache_is_reused_like_a_full_one() {
    let Some(path) = common::real_model("smollm2-135m-instruct") else { return };
    let reg = Registry::new().with(mlx_metal::backend::backend());
    let with = |cache: &str| -> Arc<dyn TextModel> {
        let settings = LoadSettings::default()
            .backend("metal")
            .device(inference_core::Device::Cpu)
            .backend_option("kv_bits", "8")
            .backend_option("quantized_kv_start", "0")
            .backend_option("prompt_cache_bytes", cache);
        Arc::from(reg.load_model(&path, &settings).unwrap_or_else(|e| panic!("{}", e.report())))
    };
    let prefix = "You are a helpful assistant who answers questions about geography and history. ".repeat(3);
    let (a, b) = (format!("{prefix}Where is Lima?"), format!("{prefix}Where is Quito?"));
    let cold = run(with("0").as_ref(), &b);
    let model = with("100000000");
    run(model.as_ref(), &a);
    let warm = run(model.as_ref(), &b);
    // Cold, the prompt's first forward pass attends to full-precision keys (the cache quantises
    // from its first update on, as mlx-lm's does); warm, its rest attends to the cached 8-bit
    // keys. The tokens are the same; the scores agree to bfloat16's rounding.
    assert_eq!(ids(&warm), ids(&cold), "8-bit keys and values from the prompt cache");
    assert_eq!(warm.text, cold.text);
    for (x, y) in warm.tokens.iter().zip(&cold.tokens) {
        let (x, y) = (x.logprob.unwrap(), y.logprob.unwrap());
        assert!((x - y).abs() <= 0.25, "log-prob {x} vs {y}");
    }
    let tok = Tokenizer::from_dir(&path).unwrap();
    assert!(cached(&warm) >= tok.encode_prompt(&prefix).unwrap().len() - 1, "{:?}", warm.metrics);
}
