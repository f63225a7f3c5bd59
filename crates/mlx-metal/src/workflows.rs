// SPDX-License-Identifier: EUPL-1.2
//! Worked examples of every inference workflow, through the backend-neutral
//! API of `inference-core` with this crate's `"metal"` backend registered.
//!
//! Each example runs in CI on a tiny fixture model from `testdata/models`
//! (random weights, so its text is gibberish; the calls are the same for a
//! real model directory). This module has no items; it is documentation.
//!
//! # Load a model and generate
//!
//! ```
//! use inference_core::{CancelToken, GenerateSettings, LoadSettings};
//!
//! mlx_metal::register();
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/models/qwen3-tiny");
//! // `dir` is a Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
//! let model = inference_core::load_model(dir, &LoadSettings::new().backend("metal"))?;
//! let settings = GenerateSettings::default().max_tokens(16).temperature(0.7).top_p(0.9).seed(42);
//! for token in model.generate("The capital of France is", &settings, CancelToken::new())? {
//!     print!("{}", token?.text); // streamed as it is generated
//! }
//! # Ok::<(), inference_core::Error>(())
//! ```
//!
//! # Chat with the model's own template
//!
//! ```
//! use inference_core::{CancelToken, GenerateSettings, LoadSettings, Message};
//!
//! mlx_metal::register();
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/models/qwen3-tiny");
//! let model = inference_core::load_model(dir, &LoadSettings::new())?;
//! let messages = [Message::system("You are terse."), Message::user("Name a colour.")];
//! let reply = model.chat(&messages, &GenerateSettings::default().max_tokens(8), CancelToken::new())?.complete()?;
//! println!("{} ({} tokens)", reply.text, reply.tokens.len());
//! # Ok::<(), inference_core::Error>(())
//! ```
//!
//! # Many callers at once
//!
//! Every generation is a row of one continuously batched decode: calls from
//! many threads (a server's clients, say) share each forward pass, and each
//! gets exactly the tokens it would get alone. The backend options
//! `max_batch` (rows at once, default 32), `prefill_step` (prompt tokens
//! between two decode steps, default 2048) and `kv_cache_bytes` (the batch's
//! KV-cache budget) bound it; `engine_load` says what it is doing.
//!
//! ```
//! use std::sync::Arc;
//! use inference_core::{CancelToken, GenerateSettings, LoadSettings, TextModel};
//!
//! mlx_metal::register();
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/models/qwen3-tiny");
//! let settings = LoadSettings::new().backend("metal").backend_option("max_batch", "8");
//! let model: Arc<dyn TextModel> = Arc::from(inference_core::load_model(dir, &settings)?);
//! let callers: Vec<_> = ["Once upon a time", "The sea is", "Rust is"]
//!     .into_iter()
//!     .map(|prompt| {
//!         let model = Arc::clone(&model);
//!         std::thread::spawn(move || {
//!             let settings = GenerateSettings::default().max_tokens(8);
//!             model.generate(prompt, &settings, CancelToken::new())?.complete()
//!         })
//!     })
//!     .collect();
//! for caller in callers {
//!     println!("{}", caller.join().expect("a caller thread")?.text);
//! }
//! let load = model.engine_load().expect("the metal backend reports its load");
//! assert_eq!(load.max_batch, 8);
//! println!("at most {} rows decoded together", load.peak_batch_size);
//! # Ok::<(), inference_core::Error>(())
//! ```
//!
//! # Speculative decoding
//!
//! The backend option `prompt_lookup` (`true`, or the longest n-gram to match)
//! guesses the next tokens from the text so far; `draft_model` (a directory)
//! lets a smaller model with the same tokenizer guess; `num_draft_tokens`
//! bounds the guesses per step. The model checks each step's guesses in one
//! forward pass, so the output is that of plain decoding (greedy: token for
//! token; sampled: the same distribution), and the metrics count the guesses.
//!
//! ```
//! use inference_core::{CancelToken, GenerateSettings, LoadSettings};
//!
//! mlx_metal::register();
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/models/qwen3-tiny");
//! let settings = LoadSettings::new().backend("metal").backend_option("prompt_lookup", "true");
//! let model = inference_core::load_model(dir, &settings)?;
//! let greedy = GenerateSettings::default().max_tokens(24).ignore_eos(true);
//! let done = model.generate("a b c a b c a b", &greedy, CancelToken::new())?.complete()?;
//! let m = done.metrics.expect("the metal backend reports metrics");
//! println!("{} of {} guesses accepted", m.accepted_draft_tokens, m.draft_tokens);
//! println!("{:.2} tokens per forward pass", m.tokens_per_forward_pass().unwrap_or(1.0));
//! # Ok::<(), inference_core::Error>(())
//! ```
//!
//! # A chat session that reuses its KV cache
//!
//! Each turn passes the whole conversation; only what is new is prefilled.
//! Sessions save to one safetensors file and load back.
//!
//! ```
//! use inference_core::{CancelToken, GenerateSettings, LoadSettings, Message};
//!
//! mlx_metal::register();
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/models/qwen3-tiny");
//! let model = inference_core::load_model(dir, &LoadSettings::new())?;
//! let mut session = model.new_session()?;
//! let settings = GenerateSettings::default().max_tokens(8);
//! let mut messages = vec![Message::user("Hello!")];
//! let first = session.chat(&messages, &settings, CancelToken::new())?.complete()?;
//! messages.push(Message::assistant(first.text));
//! messages.push(Message::user("And again?"));
//! let second = session.chat(&messages, &settings, CancelToken::new())?.complete()?;
//! let m = second.metrics.expect("metrics at the end of a stream");
//! assert!(m.cached_prompt_tokens > 0); // the first turn came from the cache
//! println!("{} of {} prompt tokens were cached", m.cached_prompt_tokens, m.prompt_tokens);
//!
//! let file = std::env::temp_dir().join(format!("mlxr-doc-session-{}.safetensors", std::process::id()));
//! session.save(&file)?;
//! let mut restored = model.new_session()?;
//! restored.load(&file)?;
//! assert_eq!(restored.cached_tokens()?, session.cached_tokens()?);
//! # std::fs::remove_file(&file).ok();
//! # Ok::<(), inference_core::Error>(())
//! ```
//!
//! # Classify and batch-generate
//!
//! Both run the prompts as left-padded batches; every row gives what its
//! prompt gives alone.
//!
//! ```
//! use inference_core::{CancelToken, GenerateSettings, LoadSettings, LogitsMode};
//!
//! mlx_metal::register();
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/models/qwen3-tiny");
//! let model = inference_core::load_model(dir, &LoadSettings::new())?;
//! let prompts = ["Is this review positive? Great film!", "Is this review positive? Dull."];
//!
//! // One token per prompt, with its log-probability and the whole distribution.
//! let settings = GenerateSettings::default().logits(LogitsMode::LogProbs);
//! for r in model.classify(&prompts, &settings, CancelToken::new())? {
//!     println!("{:?} logprob {:?}, {} scores", r.token.text, r.token.logprob, r.logits.map_or(0, |l| l.len()));
//! }
//!
//! // A continuation per prompt; a failed prompt fails only its own row.
//! let rows = model.batch_generate(&prompts, &GenerateSettings::default().max_tokens(8), CancelToken::new())?;
//! for row in &rows {
//!     assert!(row.is_ok());
//!     println!("{}", row.text());
//! }
//! # Ok::<(), inference_core::Error>(())
//! ```
//!
//! # Metrics and model information
//!
//! ```
//! use inference_core::{CancelToken, GenerateSettings, LoadSettings};
//!
//! mlx_metal::register();
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/models/llama-tiny-8bit");
//! let model = inference_core::load_model(dir, &LoadSettings::new())?;
//! let info = model.info();
//! println!("{} layers, vocabulary {}, quantised: {:?} bits", info.num_layers, info.vocab_size, info.quant_bits);
//! let out = model.generate("Hello", &GenerateSettings::default().max_tokens(4), CancelToken::new())?.complete()?;
//! let m = model.metrics(); // the last call's; also `out.metrics`
//! assert_eq!(Some(m), out.metrics);
//! println!("prefill {:.0} tok/s, decode {:.0} tok/s, peak {} bytes", m.prefill_tokens_per_sec,
//!          m.decode_tokens_per_sec, m.peak_memory_bytes);
//! println!("MLX {} on {:?}", mlx::device::mlx_version(), mlx::device::Device::best());
//! # Ok::<(), inference_core::Error>(())
//! ```
//!
//! # Discover models under a directory
//!
//! ```
//! # let base = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/models");
//! let found = inference_core::discover(base)?.collect::<Vec<_>>();
//! assert!(found.iter().any(|m| m.model_type.as_deref() == Some("gemma3")));
//! for m in &found {
//!     println!("{} {:?} {:?}-bit", m.path.display(), m.model_type, m.quant_bits);
//! }
//! # Ok::<(), inference_core::Error>(())
//! ```
//!
//! # Memory controls
//!
//! ```
//! use mlx::memory;
//!
//! let stats = memory::stats()?;
//! println!("active {} B, cache {} B, peak {} B", stats.active, stats.cache, stats.peak);
//! let previous = memory::set_cache_limit(256 << 20)?; // keep at most 256 MiB of freed buffers
//! memory::clear_cache()?; // hand the cached buffers back now
//! memory::reset_peak_memory()?;
//! memory::set_cache_limit(previous)?;
//! # Ok::<(), mlx_metal::Error>(())
//! ```
//!
//! # Switching backends by name
//!
//! Applications register every backend their features select and choose one
//! per load; the rest of the code does not change. `"mlx_lm"` (the
//! `mlxlm-bridge` crate) runs Python's mlx-lm in a subprocess.
//!
//! ```
//! use inference_core::{CancelToken, GenerateSettings, LoadSettings};
//!
//! mlx_metal::register();
//! // mlxlm_bridge::register(); // with the bridge crate as a dependency
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/models/llama-tiny");
//! let backend = std::env::var("MLXR_BACKEND").unwrap_or_else(|_| "metal".to_owned());
//! let model = match inference_core::load_model(dir, &LoadSettings::new().backend(&backend)) {
//!     Ok(m) => m,
//!     // An unregistered name says what is registered and how to add it.
//!     Err(e) => panic!("{}", e.report()),
//! };
//! println!("{:?}", inference_core::list());
//! let text = model.generate("Hi", &GenerateSettings::default().max_tokens(3), CancelToken::new())?.collect_text()?;
//! println!("{text}");
//! # Ok::<(), inference_core::Error>(())
//! ```
