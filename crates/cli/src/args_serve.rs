// SPDX-License-Identifier: EUPL-1.2
//! `mlxr serve`'s flags.

use super::*;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// The address to listen on; the default serves this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: IpAddr,
    /// The port; 0 picks a free one (the address is printed on standard output).
    #[arg(long, default_value_t = 8080)]
    pub(crate) port: u16,
    /// Requires `Authorization: Bearer KEY` on every request but `GET /health` (also read from
    /// MLXR_API_KEY; a server listening beyond this machine without one is warned about).
    #[arg(long, value_name = "KEY", env = "MLXR_API_KEY", hide_env_values = true)]
    pub(crate) api_key: Option<String>,
    /// The model's id in the API (default: the model directory's name).
    #[arg(long, value_name = "ID")]
    pub(crate) model_id: Option<String>,
    /// The most rows the engine decodes together in one batch (metal backend).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) max_batch: u32,
    /// The most prompt tokens the engine prefills between two decode steps, so that a long prompt
    /// holds up the others' streams by one chunk at most (metal backend).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) prefill_step: u32,
    /// Bytes the batch's KV caches may take; a request joins the batch only while they fit (metal
    /// backend; default: three quarters of what MLX's memory limit leaves beside the weights).
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) kv_cache_bytes: Option<u64>,
    /// Bytes the prompt cache may take: the caches of finished requests, kept by their tokens, so
    /// that a request starting the same way (a system prompt, a conversation's earlier turns)
    /// prefills only the rest; 0 turns it off (metal backend; default: an eighth of the device's
    /// memory beside the weights).
    #[arg(long, value_name = "BYTES")]
    pub(crate) prompt_cache_bytes: Option<u64>,
    /// Keep the prompt cache in this directory too, so that a restarted server starts warm: each
    /// entry is written as a session file when the engine is idle and read back at start when it
    /// was made by the same model and adapter (metal backend).
    #[arg(long, value_name = "DIR")]
    pub(crate) prompt_cache_dir: Option<PathBuf>,
    /// How many requests the engine holds at once (default: --max-batch); more wait in the queue.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) max_concurrent: Option<u32>,
    /// How many requests may wait for their turn; more are refused with 429.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_queue: u32,
    /// How long a request may wait for its turn, in seconds, before 503.
    #[arg(long, allow_negative_numbers = true, default_value_t = 300.0)]
    pub(crate) queue_timeout: f64,
    /// Let clients load adapters at run time (POST /v1/adapters) from the directories under DIR
    /// (a file read on a client's word, so off by default).
    #[arg(long, value_name = "DIR")]
    pub(crate) adapter_root: Option<PathBuf>,
    /// The largest request body, in bytes (larger ones get 413).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub(crate) max_body_bytes: usize,
    /// The most connections open at once; one more is answered 503 and closed.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub(crate) max_connections: u32,
    /// Seconds a client has to send a request's head (method, path, headers); also how long a
    /// kept-alive connection may sit idle between requests. Then the connection is closed.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = seconds)]
    pub(crate) header_timeout: Duration,
    /// Seconds a client has to send a request's body once its head is in (then 408).
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = seconds)]
    pub(crate) body_timeout: Duration,
    /// Seconds an answer may wait for a client that stopped reading it; then its generation is
    /// cancelled and the connection closed.
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = seconds)]
    pub(crate) write_timeout: Duration,
    /// The largest max_tokens a request may ask for (larger ones get 400).
    #[arg(long, default_value_t = 4096)]
    pub(crate) max_tokens_limit: usize,
    /// max_tokens for requests that do not give one (capped by --max-tokens-limit).
    #[arg(long, default_value_t = 512)]
    pub(crate) default_max_tokens: usize,
    /// Start serving without the warm-up: by default the model generates a few tokens in nine chat
    /// sessions of its own at once after loading and before the server listens, from prompts of
    /// several lengths, so that the kernels compiled on first use (MLX's and ours: NVRTC on CUDA,
    /// seconds each; every prefill size class, one row and a batch's) are ready before the first
    /// request.
    #[arg(long)]
    pub(crate) no_warmup: bool,
    #[command(flatten)]
    pub(crate) tensor_parallel: TensorParallelArgs,
}

/// A number of seconds above 0 (fractions allowed), at most a day.
fn seconds(text: &str) -> Result<Duration, String> {
    let s: f64 = text.trim().parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(s > 0.0 && s <= 86_400.0) {
        return Err(format!("{text} seconds: must be more than 0 and at most 86400 (a day)"));
    }
    Ok(Duration::from_secs_f64(s))
}

impl ServeArgs {
    /// How many requests the engine holds at once.
    pub(crate) fn requests_at_once(&self) -> usize {
        self.max_concurrent.unwrap_or(self.max_batch) as usize
    }

    /// `settings` with the engine's batch limits, for the metal backend (the others take no
    /// such options and would refuse them).
    pub(crate) fn engine_settings(&self, settings: LoadSettings) -> LoadSettings {
        let backend =
            settings.backend.clone().or_else(|| inference_core::default_backend().ok().map(|b| b.name().to_owned()));
        if backend.as_deref() != Some("metal") {
            return settings;
        }
        let mut settings = settings
            .backend_option("max_batch", self.max_batch.to_string())
            .backend_option("prefill_step", self.prefill_step.to_string());
        for (key, value) in [("kv_cache_bytes", self.kv_cache_bytes), ("prompt_cache_bytes", self.prompt_cache_bytes)] {
            if let Some(bytes) = value {
                settings = settings.backend_option(key, bytes.to_string());
            }
        }
        match &self.prompt_cache_dir {
            Some(dir) => settings.backend_option("prompt_cache_dir", dir.display().to_string()),
            None => settings,
        }
    }
}
