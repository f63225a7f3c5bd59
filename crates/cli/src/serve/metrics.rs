// SPDX-License-Identifier: EUPL-1.2
//! `GET /metrics`: the server's counters in Prometheus's text format (version 0.0.4) — requests
//! by outcome, answers by status, tokens in and out, the queue, the engine's batch and prompt
//! cache, histograms of the time to the first token and between tokens, and the model served
//! (`mlxr_model_info`: its id, compute type and why, as labels of a sample that is always 1).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use inference_core::EngineLoad;

/// Seconds: from 5 ms to 2 minutes, roughly doubling.
const TTFT_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Seconds between two tokens of one stream: from 1 ms to 10 s.
const TOKEN_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// The statuses counted one by one; others count as `other`.
const STATUSES: &[u16] = &[200, 400, 401, 403, 404, 405, 413, 415, 429, 500, 503];

/// A histogram with fixed bucket bounds (seconds).
pub(crate) struct Histogram {
    bounds: &'static [f64],
    /// One count per bound (observations at most that bound, not cumulative), then the rest.
    counts: Vec<AtomicU64>,
    /// The sum in nanoseconds.
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_ns: AtomicU64::new(0) }
    }

    /// Counts one observation of `seconds`.
    pub(crate) fn observe(&self, seconds: f64) {
        let i = self.bounds.iter().position(|&b| seconds <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// What `/metrics` adds to the engine's counters.
pub(crate) struct Metrics {
    pub(crate) time_to_first_token: Histogram,
    pub(crate) inter_token: Histogram,
    pub(crate) prompt_tokens: AtomicU64,
    pub(crate) cached_prompt_tokens: AtomicU64,
    /// Answers by status: one per entry of `STATUSES`, then the others.
    responses: Vec<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            time_to_first_token: Histogram::new(TTFT_BOUNDS),
            inter_token: Histogram::new(TOKEN_BOUNDS),
            prompt_tokens: AtomicU64::new(0),
            cached_prompt_tokens: AtomicU64::new(0),
            responses: (0..=STATUSES.len()).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Metrics {
    /// Counts an answer with `status`.
    pub(crate) fn responded(&self, status: u16) {
        let i = STATUSES.iter().position(|&s| s == status).unwrap_or(STATUSES.len());
        self.responses[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// The server's own counters, as `/health` shows them.
pub(crate) struct Counters {
    pub(crate) queued: usize,
    pub(crate) running: usize,
    pub(crate) completed: u64,
    pub(crate) cancelled: u64,
    pub(crate) failed: u64,
    pub(crate) generated_tokens: u64,
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// The model served, as `/metrics` shows it.
pub(crate) struct ModelLabels<'a> {
    pub(crate) id: &'a str,
    pub(crate) compute_dtype: Option<&'a str>,
    pub(crate) compute_dtype_reason: Option<&'a str>,
}

/// A label value in Prometheus's text format: backslash, double quote and new line escaped.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The text of `/metrics`.
pub(crate) fn render(
    metrics: &Metrics,
    counters: &Counters,
    load: Option<&EngineLoad>,
    model: &ModelLabels<'_>,
) -> String {
    let mut out = String::new();
    let info = format!(
        "{{model=\"{}\",compute_dtype=\"{}\",compute_dtype_reason=\"{}\"}}",
        label(model.id),
        label(model.compute_dtype.unwrap_or("")),
        label(model.compute_dtype_reason.unwrap_or(""))
    );
    metric(&mut out, "mlxr_model_info", "gauge", "The model served: its id, compute type and why.", &[(&info, 1.0)]);
    let c = counters;
    let outcomes = [
        ("{outcome=\"completed\"}", c.completed as f64),
        ("{outcome=\"cancelled\"}", c.cancelled as f64),
        ("{outcome=\"failed\"}", c.failed as f64),
    ];
    metric(&mut out, "mlxr_requests_total", "counter", "Generations by how they ended.", &outcomes);
    let labels: Vec<String> =
        STATUSES.iter().map(|s| format!("{{code=\"{s}\"}}")).chain(["{code=\"other\"}".to_owned()]).collect();
    let responses: Vec<(&str, f64)> =
        labels.iter().zip(&metrics.responses).map(|(l, n)| (l.as_str(), n.load(Ordering::Relaxed) as f64)).collect();
    metric(&mut out, "mlxr_http_responses_total", "counter", "HTTP answers by status code.", &responses);
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    let counters: [(&str, &str, f64); 3] = [
        ("mlxr_prompt_tokens_total", "Prompt tokens of finished generations.", get(&metrics.prompt_tokens)),
        (
            "mlxr_cached_prompt_tokens_total",
            "Prompt tokens served from the prompt cache.",
            get(&metrics.cached_prompt_tokens),
        ),
        ("mlxr_generated_tokens_total", "Tokens generated.", c.generated_tokens as f64),
    ];
    for (name, help, value) in counters {
        metric(&mut out, name, "counter", help, &[("", value)]);
    }
    metric(&mut out, "mlxr_queued_requests", "gauge", "Requests waiting for their turn.", &[("", c.queued as f64)]);
    metric(&mut out, "mlxr_running_requests", "gauge", "Requests the engine holds.", &[("", c.running as f64)]);
    if let Some(l) = load {
        let gauges: [(&str, &str, f64); 8] = [
            ("mlxr_engine_queued", "Requests waiting for room in the batch.", l.queued as f64),
            ("mlxr_engine_running", "Generations being prefilled or decoded.", l.running as f64),
            ("mlxr_engine_batch_size", "Rows in the latest decode step.", l.batch_size as f64),
            ("mlxr_engine_max_batch", "The most rows decoded at once.", l.max_batch as f64),
            ("mlxr_engine_kv_bytes_per_token", "KV-cache bytes per position of one row.", l.kv_bytes_per_token as f64),
            ("mlxr_prompt_cache_entries", "Entries in the prompt cache.", l.prompt_cache_entries as f64),
            ("mlxr_prompt_cache_bytes", "Bytes the prompt cache holds.", l.prompt_cache_bytes as f64),
            ("mlxr_prompt_cache_capacity_bytes", "The prompt cache's bound.", l.prompt_cache_capacity_bytes as f64),
        ];
        for (name, help, value) in gauges {
            metric(&mut out, name, "gauge", help, &[("", value)]);
        }
        let counters: [(&str, &str, f64); 7] = [
            (
                "mlxr_engine_caught_panics_total",
                "Panics the engine caught; each ended the generations it held with an error.",
                l.caught_panics as f64,
            ),
            ("mlxr_engine_decode_steps_total", "Batched decode steps.", l.decode_steps as f64),
            (
                "mlxr_speculative_steps_total",
                "Forward passes that checked speculative decoding's guesses.",
                l.speculative_steps as f64,
            ),
            ("mlxr_draft_tokens_total", "Tokens guessed and checked (speculative decoding).", l.draft_tokens as f64),
            (
                "mlxr_accepted_draft_tokens_total",
                "Guessed tokens the model accepted (speculative decoding).",
                l.accepted_draft_tokens as f64,
            ),
            ("mlxr_prompt_cache_hits_total", "Requests that started from a cached prefix.", l.prompt_cache_hits as f64),
            (
                "mlxr_prompt_cache_reused_tokens_total",
                "Prompt tokens not prefilled thanks to the prompt cache.",
                l.prompt_cache_reused_tokens as f64,
            ),
        ];
        for (name, help, value) in counters {
            metric(&mut out, name, "counter", help, &[("", value)]);
        }
    }
    metrics.time_to_first_token.render(
        &mut out,
        "mlxr_time_to_first_token_seconds",
        "From the request's admission to its first token.",
    );
    metrics.inter_token.render(&mut out, "mlxr_inter_token_latency_seconds", "Between two tokens of one stream.");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_their_sum_and_count() {
        let h = Histogram::new(&[0.1, 1.0]);
        for s in [0.05, 0.1, 0.5, 3.0] {
            h.observe(s);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        for line in
            ["x_bucket{le=\"0.1\"} 2", "x_bucket{le=\"1\"} 3", "x_bucket{le=\"+Inf\"} 4", "x_count 4", "x_sum 3.65"]
        {
            assert!(out.lines().any(|l| l == line), "{line} not in\n{out}");
        }
    }

    #[test]
    fn the_model_info_line_escapes_its_labels() {
        let counters = Counters { queued: 0, running: 0, completed: 0, cancelled: 0, failed: 0, generated_tokens: 0 };
        let model =
            ModelLabels { id: "m\"1", compute_dtype: Some("float32"), compute_dtype_reason: Some("auto: a\\b\nc") };
        let out = render(&Metrics::default(), &counters, None, &model);
        let want =
            "mlxr_model_info{model=\"m\\\"1\",compute_dtype=\"float32\",compute_dtype_reason=\"auto: a\\\\b\\nc\"} 1";
        assert!(out.lines().any(|l| l == want), "{want} not in\n{out}");
    }
}
