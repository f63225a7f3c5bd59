// SPDX-License-Identifier: EUPL-1.2
//! Tensor-parallel models over MLX's ring backend on loopback: the shards a
//! rank holds, models loaded sharded over two ranks against the single
//! process (greedy tokens, batches, the vocabulary-parallel embedding and
//! head, memory), and `MetalModel` with the `tensor_parallel` option (a
//! rank's chat, jobs mirrored from rank 0 to its followers).
//!
//! Multi-process tests re-execute this test binary as rank processes (see
//! `crates/mlx/tests/common/ranks.rs`): the ignored test `rank_process` is
//! the rank's entry point, and the environment variable `MLXR_DIST_TEST_ROLE`
//! says what the rank does. Each rank prints `RESULT <json>` lines that the
//! parent reads back.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use common::ranks::{ROLE, join_ring, result_of, run_job, run_job_with, serial, spec};
use mlx::distributed::{self, InitOptions};

// ---------------------------------------------------------------- rank entry

/// A rank of a job started by the other tests. Run on its own it checks the
/// single-process world (rank 0 of 1).
#[test]
#[ignore = "the entry point of the rank processes the other tests start"]
fn rank_process() {
    let role = std::env::var(ROLE).unwrap_or_default();
    match role.as_str() {
        r if r.starts_with("tp:") => tp::rank_generate(&r[3..]),
        r if r.starts_with("metal:") => metal::rank_chat(&r[6..]),
        r if r.starts_with("mirror:") => metal::rank_mirrored(&r[7..]),
        _ => {
            let g = distributed::init(&InitOptions::default()).expect("a single-process group");
            assert_eq!((g.rank(), g.size()), (0, 1));
        }
    }
}

// ---------------------------------------------------------------- shards

#[test]
fn shard_ranges_and_errors() {
    use mlx_metal::model::tp::Shard;
    let s = Shard::new(1, 2).expect("shard");
    assert_eq!(s.range(8, "heads").expect("even"), (4, 4));
    assert_eq!(s.range(9, "heads").expect("uneven"), (4, 5));
    assert_eq!(Shard::new(0, 2).and_then(|s| s.range(9, "heads")).expect("uneven"), (0, 4));
    let e = Shard::new(0, 4).and_then(|s| s.range(3, "kv heads")).expect_err("too few");
    assert!(e.to_string().contains("kv heads = 3 cannot be split over 4 tensor-parallel ranks"), "{e}");
    assert!(Shard::new(2, 2).is_err() && Shard::new(-1, 2).is_err() && Shard::new(0, 0).is_err());
}

// ---------------------------------------------------------------- tensor parallelism

mod tp {
    use std::path::{Path, PathBuf};

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

    /// Fingerprints of the bits of `embed(prompt)` and of `head` applied to
    /// those embeddings (the vocabulary-parallel parts alone, no blocks).
    fn embed_and_head_bits(model: &dyn LanguageModel, prompt: &[i32]) -> (String, String) {
        let ids = Array::from_slice(prompt, &[1, prompt.len() as i32]).expect("ids");
        let h = model.embed(&ids).expect("embed");
        let logits = model.head(&h).expect("head");
        let bits = |a: &Array| {
            let v = ops::astype(a, mlx::Dtype::Float32).expect("float32").to_vec_f32().expect("values");
            let h = v
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ u64::from(x.to_bits())).wrapping_mul(0x100_0000_01b3));
            format!("{h:016x} ({} values)", v.len())
        };
        (bits(&h), bits(&logits))
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
        let (embed_bits, head_bits) = embed_and_head_bits(loaded.model.as_ref(), &prompt);
        println!(
            "RESULT {}",
            json!({"rank": rank, "tokens": tokens, "gaps": gaps, "batch": batch, "embed_bits": embed_bits, "head_bits": head_bits, "generate_ms": generate_ms, "active_bytes": active, "peak_bytes": peak, "read_bytes": read})
        );
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models").join(name)
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
        eprintln!(
            "{}: single process {single_bytes} bytes; per rank {per_rank:?}; generation ms {ms:?}",
            dir.display()
        );
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

    /// The embedding's sum and the head's gather are exact: embeddings and
    /// the head's logits (without the blocks) have the single process's bits.
    fn assert_same_vocabulary_bits(dir: &Path, single: &Value, ranks: &[Value]) {
        for r in ranks {
            assert_eq!(r["embed_bits"], single["embed_bits"], "rank {}'s embeddings on {}", r["rank"], dir.display());
            assert_eq!(r["head_bits"], single["head_bits"], "rank {}'s head logits on {}", r["rank"], dir.display());
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

    #[test]
    fn llama_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        check_identical(&fixture("llama-tiny"));
    }

    #[test]
    fn qwen3_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        check_identical(&fixture("qwen3-tiny"));
    }

    #[test]
    fn qwen2_with_qkv_biases_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        check_identical(&fixture("qwen2-tiny"));
    }

    #[test]
    fn quantised_llama_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        check_identical(&fixture("llama-tiny-8bit"));
    }

    #[test]
    fn gemma3_with_one_kv_head_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        check_identical(&fixture("gemma3-tiny"));
    }

    #[test]
    fn llama3_with_a_vocabulary_that_does_not_divide_matches_the_single_process() {
        let _serial = super::serial();
        // 389 rows over 2 ranks: 194 and 195; rank 0 pads its logits by one
        // for the gather, and the padding is sliced away.
        check_identical(&fixture("llama3-tiny"));
    }

    #[test]
    fn gemma3_multimodal_checkpoint_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        // The language model under `language_model.`, vision tower ignored.
        check_identical(&fixture("gemma3-tiny-mm"));
    }

    #[test]
    fn the_replicated_vocabulary_gives_the_same_tokens_and_holds_more() {
        let _serial = super::serial();
        let dir = fixture("gemma3-tiny");
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
        let d = fixture("qwen3-tiny-4bit");
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

    #[test]
    fn quantised_gemma3_270m_over_two_ranks_agrees_with_the_single_process() {
        let _serial = super::serial();
        let Some(dir) = crate::common::real_model("gemma3-270m-4bit") else { return };
        // 4 query heads, 1 key/value head: each rank holds the kv head and 2
        // query heads; o_proj's 1024 inputs split 512:512 on groups of 64.
        // SMOLLM2_PROMPT in Gemma 3's tokenizer (with BOS): its 33 MB
        // tokenizer.json takes seconds to load in every rank.
        let ids = "2,818,5279,529,7001,563,9079,236761,669,5279,529,11702,563";
        let (single, ranks) = run_pair(&dir, &[(IDS, ids), (COUNT, "6")]);
        let n = assert_same_until_near_tie(&dir, &single, &ranks);
        eprintln!("gemma3-270m-4bit: {n} tokens compared");
        assert_same_vocabulary_bits(&dir, &single, &ranks);
        // The 262144 × 640 embedding (tied head) is most of the model; each
        // rank holds half its rows.
        let (single_bytes, per_rank) = memory(&dir, &single, &ranks);
        for b in per_rank {
            assert!((b as f64) < 0.6 * single_bytes as f64, "a rank holds {b} of {single_bytes} bytes");
        }
    }

    #[test]
    fn gemma3_270m_over_two_ranks_agrees_with_the_single_process() {
        let _serial = super::serial();
        let Some(dir) = crate::common::real_model("gemma3-270m") else { return };
        let ids = "2,818,5279,529,7001,563,9079,236761,669,5279,529,11702,563";
        let (single, ranks) = run_pair(&dir, &[(IDS, ids), (COUNT, "6")]);
        let n = assert_same_until_near_tie(&dir, &single, &ranks);
        eprintln!("gemma3-270m: {n} tokens compared");
        assert_same_vocabulary_bits(&dir, &single, &ranks);
        let (single_bytes, per_rank) = memory(&dir, &single, &ranks);
        for b in per_rank {
            assert!((b as f64) < 0.6 * single_bytes as f64, "a rank holds {b} of {single_bytes} bytes");
        }
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
}

// ---------------------------------------------------------------- through MetalModel

mod metal {
    use std::path::Path;

    use inference_core::{
        CancelToken, ChatSession, Error as CoreError, GenerateSettings, LoadSettings, Message, TextModel,
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
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen3-tiny");
        let single = MetalModel::load(&dir, &LoadSettings::default()).expect("single process");
        let (ids, text) = chat(&single);
        single.close().expect("close");
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
        let generated =
            ids_of(model.generate("The quick brown fox", &greedy(8), CancelToken::new()).expect("generate"));
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
        let after_reset =
            ids_of(session.chat(&messages[..1], &greedy(5), CancelToken::new()).expect("a turn after reset"));
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
        let again =
            ids_of(model.generate("The quick brown fox", &greedy(8), CancelToken::new()).expect("generate again"));
        assert_eq!(again, generated, "the same request gives the same tokens");
        json!({"generate": generated, "stopped": stopped, "turns": turns, "after_reset": after_reset,
               "batch": batch, "classify": classified})
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
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen3-tiny");
        let single = MetalModel::load(&dir, &LoadSettings::default()).expect("single process");
        let want = scenario(&single);
        single.close().expect("close");
        let outs = run_job(&format!("mirror:{}", dir.display()), 2);
        let results: Vec<Value> = outs.iter().map(result_of).collect();
        assert_eq!(results[0]["calls"], want, "rank 0's answers equal the single process's");
        assert_eq!(results[1]["last"], results[0]["last"], "both ranks stopped at the same step");
        assert!(results[0]["first_cancel"].as_u64().is_some_and(|n| n < 400), "{}", results[0]);
    }

    #[test]
    fn follow_needs_a_tensor_parallel_follower() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen3-tiny");
        let model = MetalModel::load(&dir, &LoadSettings::default()).expect("load");
        let e = model.follow().expect_err("a single process has nothing to follow");
        assert!(e.to_string().contains("tensor-parallel rank"), "{e}");
        assert_eq!(model.tensor_parallel_rank().expect("rank"), None);
        model.close().expect("close");
    }

    #[test]
    fn tensor_parallel_options_are_checked() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen3-tiny");
        for (key, value, want) in [
            ("tensor_parallel", "two", "tensor_parallel = \"two\" is not a positive number of ranks"),
            ("tensor_parallel", "0", "is not a positive number of ranks"),
            ("distributed_backend", "tcp", "unknown backend \"tcp\""),
            ("distributed_timeout_s", "-1", "distributed_timeout_s = \"-1\" is not a positive number"),
            ("tp_vocab", "rows", "unknown vocabulary layout \"rows\"; expected sharded or replicated"),
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
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen3-tiny");
        let e = MetalModel::load(&dir, &tp_settings()).err().expect("no launcher environment");
        assert!(e.to_string().contains("MLX_RANK"), "{e}");
    }
}
