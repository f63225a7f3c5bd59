// SPDX-License-Identifier: EUPL-1.2
//! Models loaded sharded over two ranks against the single process: greedy tokens, a left-padded
//! batch, the vocabulary-parallel embedding and head (bit for bit), and the memory each rank holds
//! and reads, on the tiny fixtures and on real models.

use std::path::Path;

use mlx_metal::model::tp::{TensorParallel, VocabLayout};
use mlx_metal::model::{self, LanguageModel};
use std::ops::ControlFlow;

use mlx::{Array, memory, ops};
use mlx_metal::batch;
use mlx_metal::sample::{Sampler, SamplerConfig};
use serde_json::{Value, json};

use super::{join_ring, result_of, run_job_with};

/// A text prompt (tokenised by the model's tokenizer) instead of [`PROMPT`].
const TEXT: &str = "MLXR_DIST_TEST_TEXT";
/// Comma-separated prompt ids instead of [`PROMPT`] (no tokenizer to load).
const IDS: &str = "MLXR_DIST_TEST_IDS";
/// How many tokens to decode instead of [`TOKENS`].
const COUNT: &str = "MLXR_DIST_TEST_TOKENS";
/// The ranks' vocabulary layout (`sharded` when absent).
const VOCAB: &str = "MLXR_DIST_TEST_VOCAB";

fn token_count(env: &[(&str, &str)]) -> usize {
    let from_env = std::env::var(COUNT).ok();
    let v = env.iter().find(|(k, _)| *k == COUNT).map(|(_, v)| v.to_string()).or(from_env);
    v.and_then(|v| v.parse().ok()).unwrap_or(TOKENS)
}

/// Prompt ids every fixture's vocabulary holds.
const PROMPT: [i32; 8] = [1, 5, 9, 42, 7, 3, 100, 12];
const TOKENS: usize = 12;

/// Greedy decoding of `n` tokens after `prompt`, one token at a time,
/// with the gap between the two best logits at each step.
fn greedy(model: &dyn LanguageModel, prompt: &[i32], n: usize) -> (Vec<u32>, Vec<f32>) {
    let mut caches = model.make_cache().expect("caches");
    let mut input = Array::from_slice(prompt, &[1, prompt.len() as i32]).expect("prompt");
    let mut out = Vec::with_capacity(n);
    let mut gaps = Vec::with_capacity(n);
    for _ in 0..n {
        let logits = model.forward(&input, &mut caches).expect("forward");
        let l = logits.dim(1).expect("length");
        let last = ops::slice_axis(&logits, 1, l - 1, l).expect("last position");
        let id = ops::argmax(&last, -1, false).expect("argmax").to_vec::<u32>().expect("id")[0];
        let row = last.to_vec_f32().expect("logits");
        let best = row[id as usize];
        let second =
            row.iter().enumerate().filter(|&(i, _)| i != id as usize).map(|(_, &v)| v).fold(f32::MIN, f32::max);
        gaps.push(best - second);
        out.push(id);
        input = Array::from_slice(&[id as i32], &[1, 1]).expect("next input");
    }
    (out, gaps)
}

/// Greedy tokens of a left-padded batch of two rows (`prompt` and its
/// last 3 tokens), prefilled in chunks of 4 columns.
fn batched(model: &dyn LanguageModel, prompt: &[i32]) -> Vec<Vec<u32>> {
    let ids: Vec<u32> = prompt.iter().map(|&i| i as u32).collect();
    let rows: [&[u32]; 2] = [&ids, &ids[ids.len().saturating_sub(3)..]];
    let sampler = Sampler::new(SamplerConfig::default()).expect("a greedy sampler");
    let mut out = vec![Vec::new(); rows.len()];
    batch::generate(model, &rows, &sampler, &[4, 4], 4, &|| false, |row, step| {
        out[row].push(step.id);
        Ok(ControlFlow::Continue(()))
    })
    .expect("a batch");
    out
}

/// A fingerprint of the bits of `embed(prompt)`, and of the logits of `head`
/// applied to those embeddings (the vocabulary-parallel parts alone, no
/// blocks): their count, 256 of them evenly spaced, their sum and the sum of
/// their magnitudes (a rank's stdout keeps only its tail, so not all of them).
fn embed_bits_and_head(model: &dyn LanguageModel, prompt: &[i32]) -> (String, Value) {
    let ids = Array::from_slice(prompt, &[1, prompt.len() as i32]).expect("ids");
    let h = model.embed(&ids).expect("embed");
    let logits = model.head(&h).expect("head");
    let values = |a: &Array| ops::astype(a, mlx::Dtype::Float32).expect("float32").to_vec_f32().expect("values");
    let v = values(&h);
    let bits =
        v.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ u64::from(x.to_bits())).wrapping_mul(0x100_0000_01b3));
    let l = values(&logits);
    let sample: Vec<f32> = l.iter().step_by(l.len().div_ceil(256).max(1)).copied().collect();
    let sum: f64 = l.iter().map(|&x| f64::from(x)).sum();
    let abs_sum: f64 = l.iter().map(|&x| f64::from(x).abs()).sum();
    let head = json!({"count": l.len(), "sample": sample, "sum": sum, "abs_sum": abs_sum});
    (format!("{bits:016x} ({} values)", v.len()), head)
}

/// Bytes this process has read through `read(2)`-like calls (Linux's
/// `/proc/self/io` `rchar`), when the system says.
fn bytes_read() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find_map(|l| l.strip_prefix("rchar: ")).and_then(|v| v.trim().parse().ok())
}

/// A rank (or the single process, `single:` roles) loads and decodes.
pub(super) fn rank_generate(arg: &str) {
    let read_before = bytes_read();
    let (single, dir) = match arg.strip_prefix("single:") {
        Some(d) => (true, d),
        None => (false, arg),
    };
    let (rank, loaded) = if single {
        (0, model::load(Path::new(dir)))
    } else {
        let g = join_ring();
        let rank = g.rank();
        let layout: VocabLayout =
            std::env::var(VOCAB).map_or(Ok(VocabLayout::default()), |v| v.parse()).expect("a layout");
        (rank, model::load_sharded(Path::new(dir), TensorParallel::new(g).with_vocab_layout(layout)))
    };
    let loaded = loaded.unwrap_or_else(|e| {
        eprintln!("rank {rank}: loading failed: {e}");
        std::process::exit(5)
    });
    let ids = std::env::var(IDS).ok().map(|v| v.split(',').map(|i| i.trim().parse().expect("an id")).collect());
    let prompt: Vec<i32> = match (ids, std::env::var(TEXT)) {
        (Some(ids), _) => ids,
        (None, Ok(text)) => mlx_metal::tokenizer::Tokenizer::from_dir(dir)
            .and_then(|t| t.encode_prompt(&text))
            .expect("tokenising the prompt")
            .into_iter()
            .map(|id| id as i32)
            .collect(),
        (None, Err(_)) => PROMPT.to_vec(),
    };
    let started = std::time::Instant::now();
    let (tokens, gaps) = greedy(loaded.model.as_ref(), &prompt, token_count(&[]));
    let generate_ms = started.elapsed().as_millis() as u64;
    // What stays allocated is the weights (caches and temporaries are gone).
    let _ = memory::clear_cache();
    let active = memory::active_memory().expect("active memory");
    let peak = memory::peak_memory().expect("peak memory");
    let read = read_before.zip(bytes_read()).map(|(a, b)| b - a);
    // After the figures: a batch resets MLX's peak.
    let batch = batched(loaded.model.as_ref(), &prompt);
    let (embed_bits, head) = embed_bits_and_head(loaded.model.as_ref(), &prompt);
    println!(
        "RESULT {}",
        json!({"rank": rank, "tokens": tokens, "gaps": gaps, "batch": batch, "embed_bits": embed_bits, "head": head, "generate_ms": generate_ms, "active_bytes": active, "peak_bytes": peak, "read_bytes": read})
    );
}

/// The single process's and the 2 ranks' results on `dir`.
fn run_pair(dir: &Path, env: &[(&str, &str)]) -> (Value, Vec<Value>) {
    let d = dir.to_str().expect("a UTF-8 path");
    let single = result_of(&run_job_with(&format!("tp:single:{d}"), 1, env)[0]);
    let ranks: Vec<Value> = run_job_with(&format!("tp:{d}"), 2, env).iter().map(result_of).collect();
    assert_eq!(single["tokens"].as_array().map(Vec::len), Some(token_count(env)), "{single}");
    (single, ranks)
}

/// Each rank must hold less than the single process; returns the figures.
fn memory(dir: &Path, single: &Value, ranks: &[Value]) -> (u64, Vec<u64>) {
    let single_bytes = single["active_bytes"].as_u64().expect("bytes");
    let per_rank: Vec<u64> = ranks.iter().map(|r| r["active_bytes"].as_u64().expect("bytes")).collect();
    for b in &per_rank {
        assert!(*b < single_bytes, "a rank holds {b} bytes, the single process {single_bytes}");
    }
    let ms: Vec<&Value> = std::iter::once(single).chain(ranks).map(|r| &r["generate_ms"]).collect();
    eprintln!("{}: single process {single_bytes} bytes; per rank {per_rank:?}; generation ms {ms:?}", dir.display());
    (single_bytes, per_rank)
}

/// The first `n` greedy tokens of every rank equal the single process's.
fn assert_same_tokens(dir: &Path, single: &Value, ranks: &[Value], n: usize) {
    let want: Vec<Value> = single["tokens"].as_array().expect("tokens").iter().take(n).cloned().collect();
    for r in ranks {
        let got: Vec<Value> = r["tokens"].as_array().expect("tokens").iter().take(n).cloned().collect();
        assert_eq!(
            got,
            want,
            "rank {} diverged from the single process on {}; top-2 logit gaps: single {}, rank {}",
            r["rank"],
            dir.display(),
            single["gaps"],
            r["gaps"]
        );
    }
}

/// Greedy tokens of the single process and of 2 tensor-parallel ranks
/// must be identical; each rank must hold less than the whole model.
fn check_identical(dir: &Path) -> (u64, Vec<u64>) {
    let (single, ranks) = run_pair(dir, &[]);
    assert_same_tokens(dir, &single, &ranks, TOKENS);
    assert_same_batch(dir, &single, &ranks);
    assert_same_vocabulary_bits(dir, &single, &ranks);
    memory(dir, &single, &ranks)
}

/// A left-padded batch of two prompts decodes the same on every rank as
/// in the single process.
fn assert_same_batch(dir: &Path, single: &Value, ranks: &[Value]) {
    assert_eq!(single["batch"].as_array().map(Vec::len), Some(2), "{single}");
    for r in ranks {
        assert_eq!(r["batch"], single["batch"], "rank {}'s batch on {}", r["rank"], dir.display());
    }
}

/// The embedding's sum is exact: embeddings have the single process's bits.
/// The head's gather is exact too, but each rank's shard of the head is a
/// matmul of its own, which a BLAS may round differently from the whole
/// matrix's (OpenBLAS's Zen kernels do at the edges of their tiles; the
/// reference BLAS and OpenBLAS's SkylakeX kernels do not): its logits are
/// within float32 rounding of the single process's, bit for bit where the
/// products round alike.
fn assert_same_vocabulary_bits(dir: &Path, single: &Value, ranks: &[Value]) {
    let theirs = &single["head"];
    let sample = |v: &Value| -> Vec<f64> {
        v["sample"].as_array().expect("head logits").iter().map(|x| x.as_f64().expect("a logit")).collect()
    };
    let number = |v: &Value, key: &str| v[key].as_f64().unwrap_or_else(|| panic!("the head's {key}: {v}"));
    let largest = sample(theirs).iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for r in ranks {
        let what = format!("rank {}'s head logits on {}", r["rank"], dir.display());
        assert_eq!(r["embed_bits"], single["embed_bits"], "rank {}'s embeddings on {}", r["rank"], dir.display());
        let ours = &r["head"];
        assert_eq!(ours["count"], theirs["count"], "{what}");
        let worst = sample(ours).iter().zip(sample(theirs)).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst <= 1e-5 * largest, "{what} are up to {worst} from the single process's (largest {largest})");
        let (sum, abs_sum) = (number(theirs, "sum"), number(theirs, "abs_sum"));
        assert!((number(ours, "sum") - sum).abs() <= 1e-5 * abs_sum, "{what}: sum {ours} against {theirs}");
        assert!((number(ours, "abs_sum") - abs_sum).abs() <= 1e-5 * abs_sum, "{what}: {ours} against {theirs}");
    }
}

/// A float32 copy of the model in `dir` (weights cast, other files copied).
fn float32_copy(dir: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().expect("tempdir");
    for entry in std::fs::read_dir(dir).expect("model dir").flatten() {
        let p = entry.path();
        let name = entry.file_name();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let st = mlx::io::load_safetensors(&p).expect("weights");
            let cast: Vec<(String, Array)> = st
                .tensors
                .iter()
                .map(|(k, a)| (k.clone(), ops::astype(a, mlx::Dtype::Float32).expect("cast")))
                .collect();
            mlx::io::save_safetensors(out.path().join(&name), cast.iter().map(|(k, a)| (k, a)), &st.metadata)
                .expect("save");
        } else if p.is_file() {
            std::fs::copy(&p, out.path().join(&name)).expect("copy");
        }
    }
    out
}

/// One test per fixture: the model over two ranks answers exactly as the single process.
macro_rules! identical_over_two_ranks {
    ($($test:ident: $fixture:literal;)+) => {$(
        #[test]
        fn $test() {
            let _serial = super::serial();
            check_identical(&crate::common::tiny_model($fixture));
        }
    )+};
}

identical_over_two_ranks! {
    llama_over_two_ranks_matches_the_single_process: "llama-tiny";
    qwen3_over_two_ranks_matches_the_single_process: "qwen3-tiny";
    qwen2_with_qkv_biases_over_two_ranks_matches_the_single_process: "qwen2-tiny";
    quantised_llama_over_two_ranks_matches_the_single_process: "llama-tiny-8bit";
    gemma3_with_one_kv_head_over_two_ranks_matches_the_single_process: "gemma3-tiny";
    // 389 rows over 2 ranks: 194 and 195; rank 0 pads its logits by one
    // for the gather, and the padding is sliced away.
    llama3_with_a_vocabulary_that_does_not_divide_matches_the_single_process: "llama3-tiny";
    // The language model under `language_model.`, vision tower ignored.
    gemma3_multimodal_checkpoint_over_two_ranks_matches_the_single_process: "gemma3-tiny-mm";
}

#[test]
fn the_replicated_vocabulary_gives_the_same_tokens_and_holds_more() {
    let _serial = super::serial();
    let dir = crate::common::tiny_model("gemma3-tiny");
    let (single, sharded) = run_pair(&dir, &[]);
    let d = dir.to_str().expect("a UTF-8 path");
    let replicated: Vec<Value> =
        run_job_with(&format!("tp:{d}"), 2, &[(VOCAB, "replicated")]).iter().map(result_of).collect();
    assert_same_tokens(&dir, &single, &sharded, TOKENS);
    assert_same_tokens(&dir, &single, &replicated, TOKENS);
    // The tied 512 × 64 bfloat16 table: each sharded rank holds 256 rows.
    let table = 512 * 64 * 2;
    for (s, r) in sharded.iter().zip(&replicated) {
        let (s, r) = (s["active_bytes"].as_i64().expect("bytes"), r["active_bytes"].as_i64().expect("bytes"));
        let saved = (r - s) as f64 / f64::from(table / 2);
        assert!((0.9..1.1).contains(&saved), "a rank holds {s} bytes sharded, {r} replicated");
    }
}

#[test]
fn a_quantised_shard_off_the_group_boundary_is_a_clear_error() {
    let _serial = super::serial();
    // qwen3-tiny-4bit: o_proj has 64 inputs in groups of 64; 32 per rank.
    let d = crate::common::tiny_model("qwen3-tiny-4bit");
    let spec = super::spec(&format!("tp:{}", d.display()), 2);
    let e = mlx::distributed::launch::spawn(&spec)
        .and_then(mlx::distributed::launch::Job::wait)
        .expect_err("the shard cannot be quantised");
    let msg = e.to_string();
    assert!(msg.contains("does not fall on quantisation groups of 64"), "{msg}");
}

const SMOLLM2_PROMPT: &str = "The capital of France is Paris. The capital of Italy is";

#[test]
fn smollm2_over_two_ranks_matches_the_single_process() {
    let _serial = super::serial();
    let Some(dir) = crate::common::real_model("smollm2-135m-instruct") else { return };
    // In bfloat16 the ranks' partial sums round differently from one
    // matmul, so logits move by an ulp (0.125 near 20): tokens agree up
    // to the first near tie of the single process (gap below 0.5).
    let (single, ranks) = run_pair(&dir, &[(TEXT, SMOLLM2_PROMPT)]);
    assert_same_until_near_tie(&dir, &single, &ranks);
    assert_same_vocabulary_bits(&dir, &single, &ranks);
    // 9 heads over 3 kv groups split 1:2, the MLP 768:768, the tied
    // embedding (28.3M of 134.5M parameters) 24576:24576 rows.
    let (single_bytes, per_rank) = memory(&dir, &single, &ranks);
    for b in per_rank {
        assert!((b as f64) < 0.6 * single_bytes as f64, "a rank holds {b} of {single_bytes} bytes");
    }
    // No rank ever held the whole model, and none read it all from disk.
    let single_read = single["read_bytes"].as_u64();
    for r in &ranks {
        let peak = r["peak_bytes"].as_u64().expect("peak");
        assert!((peak as f64) < 0.8 * single_bytes as f64, "rank {} peaked at {peak} bytes", r["rank"]);
        if let (Some(all), Some(read)) = (single_read, r["read_bytes"].as_u64()) {
            assert!(
                (read as f64) < 0.75 * all as f64,
                "rank {} read {read} bytes, the single process {all}",
                r["rank"]
            );
        }
        eprintln!(
            "rank {}: peak {peak} bytes, read {} bytes (single process: {single_read:?})",
            r["rank"], r["read_bytes"]
        );
    }
}

/// Tokens agree up to the first near tie of the single process (top-2
/// gap below 0.5, a few bfloat16 ulps); returns how many were compared.
fn assert_same_until_near_tie(dir: &Path, single: &Value, ranks: &[Value]) -> usize {
    let gaps: Vec<f64> = single["gaps"].as_array().expect("gaps").iter().filter_map(Value::as_f64).collect();
    let decisive = gaps.iter().position(|&g| g < 0.5).unwrap_or(gaps.len());
    assert!(decisive >= 2, "the prompt gives near ties at once: {gaps:?}");
    assert_same_tokens(dir, single, ranks, decisive);
    decisive
}

/// Gemma 3 270M (`name`: a checkpoint of it) over two ranks agrees with the
/// single process up to the first near tie, and each rank holds well under
/// what the single process holds.
fn gemma3_270m_agrees_with_the_single_process(name: &str) {
    let _serial = super::serial();
    let Some(dir) = crate::common::real_model(name) else { return };
    // SMOLLM2_PROMPT in Gemma 3's tokenizer (with BOS): its 33 MB
    // tokenizer.json takes seconds to load in every rank.
    let ids = "2,818,5279,529,7001,563,9079,236761,669,5279,529,11702,563";
    let (single, ranks) = run_pair(&dir, &[(IDS, ids), (COUNT, "6")]);
    let n = assert_same_until_near_tie(&dir, &single, &ranks);
    eprintln!("{name}: {n} tokens compared");
    assert_same_vocabulary_bits(&dir, &single, &ranks);
    // The 262144 × 640 embedding (tied head) is most of the model; each
    // rank holds half its rows.
    let (single_bytes, per_rank) = memory(&dir, &single, &ranks);
    for b in per_rank {
        assert!((b as f64) < 0.6 * single_bytes as f64, "a rank holds {b} of {single_bytes} bytes");
    }
}

#[test]
fn quantised_gemma3_270m_over_two_ranks_agrees_with_the_single_process() {
    // 4 query heads, 1 key/value head: each rank holds the kv head and 2
    // query heads; o_proj's 1024 inputs split 512:512 on groups of 64.
    gemma3_270m_agrees_with_the_single_process("gemma3-270m-4bit");
}

#[test]
fn gemma3_270m_over_two_ranks_agrees_with_the_single_process() {
    gemma3_270m_agrees_with_the_single_process("gemma3-270m");
}

#[test]
fn quantised_smollm2_over_two_ranks_agrees_with_the_single_process() {
    let _serial = super::serial();
    let Some(dir) = crate::common::real_model("smollm2-135m-instruct-4bit") else { return };
    // o_proj's 576 inputs split 192:384, both on groups of 64.
    let (single, ranks) = run_pair(&dir, &[(TEXT, SMOLLM2_PROMPT)]);
    let n = assert_same_until_near_tie(&dir, &single, &ranks);
    eprintln!("smollm2-135m-instruct-4bit: {n} tokens compared");
    assert_same_vocabulary_bits(&dir, &single, &ranks);
    memory(&dir, &single, &ranks);
}

#[test]
fn smollm2_in_float32_over_two_ranks_gives_identical_greedy_tokens() {
    let _serial = super::serial();
    let Some(dir) = crate::common::real_model("smollm2-135m-instruct") else { return };
    let f32_dir = float32_copy(&dir);
    let (single, ranks) = run_pair(f32_dir.path(), &[(TEXT, SMOLLM2_PROMPT)]);
    assert_same_tokens(f32_dir.path(), &single, &ranks, TOKENS);
    assert_same_batch(f32_dir.path(), &single, &ranks);
    assert_same_vocabulary_bits(f32_dir.path(), &single, &ranks);
}
