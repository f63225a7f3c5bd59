// SPDX-License-Identifier: EUPL-1.2
//! The `"mlx_lm"` backend: runs models with Python's [mlx-lm] (the reference implementation of
//! LLM inference on MLX) in a subprocess, and speaks to it over a versioned JSON Lines protocol.
//!
//! [mlx-lm]: https://pypi.org/project/mlx-lm/
//!
//! ```no_run
//! use std::sync::Arc;
//! use inference_core::{CancelToken, GenerateSettings, LoadSettings};
//!
//! // With MLXR_PYTHON set to the interpreter (or virtualenv) that has mlx-lm, this is
//! // `mlxlm_bridge::register()`; here the virtualenv is named in code.
//! inference_core::register(Arc::new(mlxlm_bridge::MlxLmBackend::with_python("/opt/venvs/mlx")));
//! let model = inference_core::load_model("/models/gemma-3-1b-it", &LoadSettings::new().backend("mlx_lm"))?;
//! let text = model.generate("The capital of France is", &GenerateSettings::new().max_tokens(8), CancelToken::new())?
//!     .collect_text()?;
//! model.close()?;
//! # Ok::<(), inference_core::Error>(())
//! ```
//!
//! # The process
//!
//! Each loaded model has its own Python process running the bridge script shipped in this crate
//! ([`BRIDGE_SOURCE`] and the modules it imports, [`BRIDGE_FILES`], written at each start to a
//! fresh private directory in the temporary directory, which the bridge removes itself as soon
//! as it has imported them, before it imports mlx-lm: nothing is left there however the parent
//! ends later, a signal or `kill -9` included; a start sweeps away, after an hour, directories of
//! processes killed before their bridge got that far).
//! Requests to one model are serialised; different models run in parallel.
//!
//! * **Interpreter**: the load settings' backend option `python`, else
//!   [`MlxLmBackend::with_python`], else the environment variable [`PYTHON_ENV`] (`MLXR_PYTHON`),
//!   else `python3`. Each may be a Python executable, a virtualenv directory (its `bin/python`) or
//!   a command name. [`available`](inference_core::Backend::available) is true when that
//!   interpreter (chosen without load settings) can `import mlx_lm`, checked once per
//!   interpreter with a [30 s limit](PROBE_TIMEOUT) (a timeout is not cached); the reason
//!   otherwise names the interpreter.
//! * **Backend options** ([`OPTIONS`]; others are rejected): `python`; `timeout_secs` (the limit
//!   for start-up, load and info, and for a cancelled request to end; default 300); and, for
//!   tests only, `bridge_script` (a script to run instead of the shipped bridge).
//! * **Load settings**: `context_length` becomes mlx-lm's `max_kv_size` (a rotating KV cache that
//!   keeps the most recent tokens); `device` `cpu`/`gpu` sets MLX's default device and the stream
//!   used for generation (`auto` keeps mlx-lm's own); `adapter_path` goes to `mlx_lm.load`;
//!   `dtype` `float32`/`bfloat16`/`float16` casts the loaded model with mlx-lm's
//!   `model.set_dtype(...)` (every floating-point parameter, quantised layers' scales and biases
//!   included, never their packed weights), and `auto` keeps mlx-lm's own (the checkpoint's
//!   types): this backend is the reference, so it never chooses a type of its own. The
//!   model path is a local directory: the bridge runs with `HF_HUB_OFFLINE=1` and never downloads.
//! * **Crash boundary**: the bridge's stderr is drained on its own thread and the last
//!   [64 KiB](STDERR_TAIL_BYTES) kept ([`BridgeModel::stderr_tail`]); errors about the process
//!   quote its end. A process that exits, writes a malformed line or one longer than
//!   [16 MiB](MAX_LINE_BYTES), answers another request, or misses a time limit is killed and the
//!   model reports why on every later call; nothing of this panics or hangs. The process is
//!   killed when the model handle and all its streams are dropped;
//!   [`close`](inference_core::TextModel::close) sends `quit`, waits five seconds at most (or
//!   `timeout_secs` if shorter), kills it if needed, is idempotent and returns the outcome.
//! * **Cancellation** takes effect mid-stream: the bridge reads requests on a thread of its own
//!   and checks for `cancel` between tokens and between prefill chunks. Cancelling the call's
//!   token, or dropping the stream, sends `cancel` and waits for the request to end (at most
//!   `timeout_secs`, then the process is killed). Generation, classification, batch generation
//!   and inspection have no time limit of their own (a long prompt may take minutes on a CPU):
//!   give the call's token a deadline
//!   ([`CancelToken::with_timeout`](inference_core::CancelToken::with_timeout)) to bound them. Standard output carries protocol lines only: the bridge moves library prints
//!   to stderr.
//!
//! # What the operations do in mlx-lm
//!
//! * **generate / chat**: mlx-lm's `generate_step` (the loop under `stream_generate`) with
//!   `make_sampler(temp, top_p, min_p, top_k)` and `make_logits_processors(repetition_penalty,
//!   repetition_context_size)`; `mx.random.seed(seed)` when a seed is set. The prompt is encoded
//!   as `stream_generate` does (special tokens unless it starts with BOS); chat renders the
//!   tokenizer's chat template with `add_generation_prompt=True` (a model without one gives
//!   [`Error::Unsupported`](inference_core::Error::Unsupported)). Generation stops at the model's
//!   EOS tokens (the tokenizer's `eos_token_ids`; not yielded), at a `stop_tokens` id (not
//!   yielded) or when a `stop_strings` entry appears (the output ends just before it: the token
//!   in which it starts is yielded with its text cut there, later tokens are dropped).
//!   `ignore_eos` skips the EOS check, which the bridge's loop makes (mlx-lm has no flag for it:
//!   `generate_step` itself never stops at EOS, `stream_generate` always does). Token texts come
//!   from mlx-lm's streaming detokeniser and concatenate to the output; a token whose text the
//!   detokeniser still holds back (a split UTF-8 character, say) is sent once its text is known.
//!   [`LogitsMode::LogProbs`](inference_core::LogitsMode::LogProbs) gives every token its
//!   log-probability and the full log-softmax (after the logits processors, as mlx-lm samples
//!   from it); [`LogitsMode::Logits`](inference_core::LogitsMode::Logits) the raw logits.
//! * **classify**: mlx-lm has no such call; each prompt gets one prefill with a fresh cache and
//!   one sample at the last position, with the same sampler and processors as generation (the
//!   result equals the first generated token).
//! * **batch_generate**: mlx-lm's `BatchGenerator`, the engine of its `batch_generate`, with the
//!   same stop rules per prompt. An empty prompt fails in its own result. Raw logits are not
//!   available there (log-probabilities are).
//! * **attention inspection** ([`BridgeModel`] implements
//!   [`AttentionInspector`](inference_core::AttentionInspector)): one prefill with the rotary
//!   embedding of every attention module wrapped, capturing the queries and keys it returns, so
//!   both are post-norm and post-RoPE; models whose attention does not call `rope` for the
//!   queries and then the keys give `Unsupported`.
//! * **metrics**: as mlx-lm reports them: `prompt_tps` = prompt tokens / time to the first token,
//!   `generation_tps` = sampled tokens / time after it; peak and active memory from MLX.
//!
//! # Protocol, version 1
//!
//! One JSON object per line, UTF-8, `\n`-terminated (a `\r` before it is ignored), at most
//! [`MAX_LINE_BYTES`] per line, in both directions. Non-finite floats are sent as the strings
//! `"inf"`, `"-inf"` and `"nan"`. Unknown fields are ignored; unknown events are a protocol error.
//!
//! ## Start-up
//!
//! The bridge writes one `ready` event before reading anything; the client checks `protocol`
//! and stops the process when it differs from [`PROTOCOL_VERSION`]. If mlx-lm cannot be
//! imported the bridge writes an `error` event (no `id`) instead and exits with status 1.
//!
//! | `ready` field | type | meaning |
//! |---|---|---|
//! | `event` | `"ready"` | |
//! | `protocol` | integer | the protocol version the bridge speaks (1) |
//! | `mlx_lm` | string | `mlx_lm.__version__` |
//! | `mlx` | string | `mlx.core.__version__` |
//! | `python` | string | the Python version |
//!
//! ## Requests (client to bridge)
//!
//! Every request has an `id` (an integer, unique and increasing per process) and a `cmd`. Replies
//! echo the `id`. One request is in flight at a time, apart from `cancel` (and `quit`), which may
//! arrive while another runs.
//!
//! | `cmd` | further fields | reply |
//! |---|---|---|
//! | `load` | `path` (string, a local model directory), `adapter_path` (string or null), `context_length` (integer ≥ 1 or null), `device` (`"auto"`, `"gpu"` or `"cpu"`), `dtype` (optional: `"float32"`, `"bfloat16"` or `"float16"`; absent keeps the checkpoint's types) | `loaded` |
//! | `info` | | `info` |
//! | `generate` | `prompt` (string, not empty), `settings` | `token`… then `done` |
//! | `chat` | `messages` (array of `{"role": string, "content": string}`, not empty), `settings` | `token`… then `done` |
//! | `classify` | `prompts` (array of strings), `settings` | `classified` |
//! | `batch_generate` | `prompts` (array of strings), `settings` | `batch` |
//! | `inspect` | `prompt` (string), `dir` (an existing directory for the result files) | `inspected` |
//! | `cancel` | `target` (the `id` to cancel) | none; the target ends with `cancelled` (or its normal reply if it had finished) |
//! | `quit` | | `bye`; then the bridge exits with status 0 (closing stdin has the same effect, without `bye`) |
//!
//! Any request may instead be answered by `error`; `cancelled` ends any cancelled request.
//! Requests before `load` succeed fail with "`<cmd>`: no model loaded"; one process loads one
//! model.
//!
//! | `settings` field | type | meaning ([`GenerateSettings`](inference_core::GenerateSettings)) |
//! |---|---|---|
//! | `max_tokens` | integer ≥ 1 | most tokens to sample |
//! | `temperature` | number ≥ 0 | 0 is greedy (arg-max) |
//! | `top_k` | integer ≥ 0 | 0 is off |
//! | `top_p` | number in (0, 1] | 1 is off |
//! | `min_p` | number in [0, 1] | 0 is off |
//! | `repetition_penalty` | number > 0 | 1 is off |
//! | `repetition_context_size` | integer ≥ 1 | tokens the penalty looks back over |
//! | `stop_tokens` | array of integers | extra ids that end generation |
//! | `stop_strings` | array of strings | texts that end generation |
//! | `seed` | integer ≥ 0 or null | `mx.random.seed` before sampling |
//! | `logits` | `"none"`, `"logits"` or `"logprobs"` | whether tokens carry `logprob` and `logits` |
//! | `ignore_eos` | boolean | keep going past the model's EOS tokens |
//!
//! ## Events (bridge to client)
//!
//! | `event` | fields |
//! |---|---|
//! | `loaded` | `id`; `model_type` (string, config.json's) |
//! | `info` | `id`; `model_type` (string); `vocab_size`, `num_layers`, `hidden_size` (integers); `quant_bits`, `quant_group` (integer or null: not quantised); `context_length` (integer or null: the requested one, else `max_position_embeddings`); `compute_dtype` (string: the type of most of the model's floating-point parameters) |
//! | `token` | `id`; `token` (string, this token's text); `token_id` (integer); `logprob` (number, only when asked for); `logits` (array of numbers, vocabulary-sized, only when asked for) |
//! | `done` | `id`; `finish_reason` (`"length"`, `"stop"`: an EOS token, `"stop_token"`, `"stop_string"`); the statistics below; `sampled_tokens` (integer: tokens sampled, including a final stop token) |
//! | `classified` | `id`; `results` (one per prompt, in order: `token`, `token_id`, and `logprob` and `logits` when asked for); the statistics |
//! | `batch` | `id`; `results` (one per prompt, in order: `tokens`, an array of `{token, token_id, logprob?, logits?}`, and `error`, null or `{kind, message}`); the statistics |
//! | `inspected` | `id`; `num_layers`, `num_q_heads`, `num_kv_heads`, `seq_len`, `head_dim` (integers); `architecture` (string). Files in `dir`: `keys_<layer>.bin` and `queries_<layer>.bin` (layer from 0, no padding), little-endian float32 in `[heads, seq_len, head_dim]` order |
//! | `cancelled` | `id` |
//! | `error` | `id` (null when the request could not be read); `kind`: `"failed"`, `"invalid"` (a malformed request), `"unsupported"`, `"empty_prompt"`; `message` (string, starting with the command); `operation` (string, for `unsupported`: what is not supported, as a noun phrase); `cause` (string or null: the Python traceback) |
//! | `bye` | `id` |
//!
//! | statistic | type | meaning |
//! |---|---|---|
//! | `prompt_tokens` | integer | prompt tokens processed |
//! | `generation_tokens` | integer | tokens sent (`done`), results (`classified`), tokens in all results (`batch`) |
//! | `prompt_time`, `generation_time` | number | seconds of prefill (to the first token) and of decoding after it |
//! | `prompt_tps`, `generation_tps` | number | tokens per second, as mlx-lm computes them |
//! | `peak_memory` | integer | `mx.get_peak_memory()` in bytes over the request (mlx-lm reports it in GB) |
//! | `active_memory` | integer | `mx.get_active_memory()` in bytes at the end |
//!
//! The client maps the statistics to [`GenerateMetrics`](inference_core::GenerateMetrics)
//! (`total_duration` is measured on the client) and errors to
//! [`Error`](inference_core::Error): `empty_prompt` to `EmptyPrompt`, `unsupported` to
//! `Unsupported`, others to `Backend` with the traceback as a [`PythonTraceback`] source.
//!
//! # Registration
//!
//! Registration is explicit ([`register`], idempotent); see inference-core's documentation.

#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::sync::Arc;

use inference_core::Backend;

mod backend;
mod lines;
mod model;
mod process;
mod protocol;
mod python;

pub use backend::{DEFAULT_TIMEOUT, MlxLmBackend, OPTION_BRIDGE_SCRIPT, OPTION_PYTHON, OPTION_TIMEOUT, OPTIONS};
pub use model::BridgeModel;
pub use process::{BRIDGE_FILES, BRIDGE_SOURCE, BridgeVersions, MAX_LINE_BYTES, PythonTraceback, STDERR_TAIL_BYTES};
pub use protocol::PROTOCOL_VERSION;
pub use python::{DEFAULT_PYTHON, PROBE_TIMEOUT, PYTHON_ENV, interpreter, probe, resolve_python};

/// The name this backend registers under.
pub const BACKEND_NAME: &str = "mlx_lm";

/// The backend, with the interpreter from the environment ([`MlxLmBackend::new`]).
pub fn backend() -> Arc<dyn Backend> {
    Arc::new(MlxLmBackend::new())
}

/// Registers the `"mlx_lm"` backend ([`backend()`]) in inference-core's process-wide registry.
/// Idempotent: a second call replaces the first registration with an equal backend.
pub fn register() {
    inference_core::register(backend());
}
