// SPDX-License-Identifier: EUPL-1.2
//! The wire format: requests written to the bridge and the events read back (see the crate
//! documentation for the field-by-field description).

use std::fmt;
use std::time::Duration;

use inference_core::{FinishReason, GenerateMetrics, GenerateSettings, LogitsMode, Message, ModelInfo, Token, tools};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks; the bridge announces its own in the `ready` event.
pub const PROTOCOL_VERSION: u32 = 1;

/// One request line: an id and a command.
#[derive(Debug, Serialize)]
pub(crate) struct Request<'a> {
    pub(crate) id: u64,
    #[serde(flatten)]
    pub(crate) command: &'a Command,
}

/// The commands, tagged by `cmd`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub(crate) enum Command {
    Load {
        path: String,
        adapter_path: Option<String>,
        context_length: Option<usize>,
        device: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        dtype: Option<&'static str>,
    },
    Info,
    Generate {
        prompt: String,
        settings: WireSettings,
    },
    Chat {
        messages: Vec<Message>,
        /// The tools for a template that renders them (omitted when none).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        tools: Vec<serde_json::Value>,
        settings: WireSettings,
    },
    Classify {
        prompts: Vec<String>,
        settings: WireSettings,
    },
    BatchGenerate {
        prompts: Vec<String>,
        settings: WireSettings,
    },
    Inspect {
        prompt: String,
        dir: String,
    },
    Cancel {
        target: u64,
    },
    Quit,
}

impl Command {
    /// The command's name, as used in error messages.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Load { .. } => "load",
            Self::Info => "info",
            Self::Generate { .. } => "generate",
            Self::Chat { .. } => "chat",
            Self::Classify { .. } => "classify",
            Self::BatchGenerate { .. } => "batch_generate",
            Self::Inspect { .. } => "inspect",
            Self::Cancel { .. } => "cancel",
            Self::Quit => "quit",
        }
    }

    /// The event that ends a successful exchange for this command.
    pub(crate) fn reply(&self) -> &'static str {
        match self {
            Self::Load { .. } => "loaded",
            Self::Info => "info",
            Self::Generate { .. } | Self::Chat { .. } => "done",
            Self::Classify { .. } => "classified",
            Self::BatchGenerate { .. } => "batch",
            Self::Inspect { .. } => "inspected",
            Self::Cancel { .. } | Self::Quit => "bye",
        }
    }
}

/// [`GenerateSettings`] as the bridge reads them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct WireSettings {
    max_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    repetition_context_size: usize,
    stop_tokens: Vec<u32>,
    stop_strings: Vec<String>,
    seed: Option<u64>,
    logits: &'static str,
    ignore_eos: bool,
}

impl From<&GenerateSettings> for WireSettings {
    fn from(s: &GenerateSettings) -> Self {
        Self {
            max_tokens: s.max_tokens,
            temperature: s.temperature,
            top_k: s.effective_top_k().unwrap_or(0),
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            repetition_context_size: s.repetition_context_size,
            stop_tokens: s.stop_tokens.clone(),
            stop_strings: s.stop_strings.clone(),
            seed: s.seed,
            logits: match s.logits {
                LogitsMode::None => "none",
                LogitsMode::Logits => "logits",
                LogitsMode::LogProbs => "logprobs",
            },
            ignore_eos: s.ignore_eos,
        }
    }
}

/// One event line from the bridge, tagged by `event`.
#[derive(Debug, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum Event {
    Ready {
        protocol: u32,
        #[serde(default)]
        mlx_lm: String,
        #[serde(default)]
        mlx: String,
        #[serde(default)]
        python: String,
    },
    Loaded {
        id: u64,
        #[serde(default)]
        model_type: String,
    },
    Info {
        id: u64,
        #[serde(flatten)]
        info: Box<WireInfo>,
    },
    Token {
        id: u64,
        #[serde(flatten)]
        token: WireToken,
    },
    Done {
        id: u64,
        #[serde(flatten)]
        stats: WireStats,
    },
    Cancelled {
        id: u64,
    },
    Classified {
        id: u64,
        results: Vec<WireToken>,
        #[serde(flatten)]
        stats: WireStats,
    },
    Batch {
        id: u64,
        results: Vec<WireBatchResult>,
        #[serde(flatten)]
        stats: WireStats,
    },
    Inspected {
        id: u64,
        num_layers: usize,
        num_q_heads: usize,
        num_kv_heads: usize,
        seq_len: usize,
        head_dim: usize,
        #[serde(default)]
        architecture: String,
    },
    Error {
        #[serde(default)]
        id: Option<u64>,
        #[serde(flatten)]
        error: WireError,
    },
    Bye {
        #[serde(default)]
        id: Option<u64>,
    },
}

impl Event {
    /// The request this event answers (`None` for `ready` and for errors not tied to a request).
    pub(crate) fn id(&self) -> Option<u64> {
        match self {
            Self::Ready { .. } => None,
            Self::Loaded { id, .. }
            | Self::Info { id, .. }
            | Self::Token { id, .. }
            | Self::Done { id, .. }
            | Self::Cancelled { id }
            | Self::Classified { id, .. }
            | Self::Batch { id, .. }
            | Self::Inspected { id, .. } => Some(*id),
            Self::Error { id, .. } | Self::Bye { id } => *id,
        }
    }

    /// The event's name, as on the wire.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Ready { .. } => "ready",
            Self::Loaded { .. } => "loaded",
            Self::Info { .. } => "info",
            Self::Token { .. } => "token",
            Self::Done { .. } => "done",
            Self::Cancelled { .. } => "cancelled",
            Self::Classified { .. } => "classified",
            Self::Batch { .. } => "batch",
            Self::Inspected { .. } => "inspected",
            Self::Error { .. } => "error",
            Self::Bye { .. } => "bye",
        }
    }
}

/// The fields of an `info` event.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct WireInfo {
    pub(crate) model_type: String,
    pub(crate) vocab_size: usize,
    pub(crate) num_layers: usize,
    pub(crate) hidden_size: usize,
    pub(crate) quant_bits: Option<u32>,
    pub(crate) quant_group: Option<u32>,
    pub(crate) context_length: Option<usize>,
    pub(crate) compute_dtype: Option<String>,
    /// The tokenizer's chat template, when it has one.
    pub(crate) chat_template: Option<String>,
}

impl From<WireInfo> for ModelInfo {
    fn from(w: WireInfo) -> Self {
        ModelInfo {
            architecture: w.model_type,
            vocab_size: w.vocab_size,
            num_layers: w.num_layers,
            hidden_size: w.hidden_size,
            quant_bits: w.quant_bits,
            quant_group: w.quant_group,
            context_length: w.context_length,
            compute_dtype_reason: w
                .compute_dtype
                .as_ref()
                .map(|_| "auto: mlx-lm's own (the checkpoint's types)".to_owned()),
            compute_dtype: w.compute_dtype,
            tool_call_format: w.chat_template.as_deref().map(tools::template_format).unwrap_or_default(),
            has_chat_template: w.chat_template.is_some(),
        }
    }
}

/// One token: in a `token` event, a `classified` result or a `batch` result.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct WireToken {
    pub(crate) token: String,
    pub(crate) token_id: u32,
    #[serde(default)]
    pub(crate) logprob: Option<WireF32>,
    #[serde(default)]
    pub(crate) logits: Option<Vec<WireF32>>,
}

impl WireToken {
    /// The token, with its log-probability; the distribution stays with the caller's choice.
    pub(crate) fn into_parts(self) -> (Token, Option<Vec<f32>>) {
        let mut token = Token::new(self.token_id, self.token);
        token.logprob = self.logprob.map(|p| p.0);
        (token, self.logits.map(|v| v.into_iter().map(|x| x.0).collect()))
    }

    /// The token with its log-probability and distribution attached.
    pub(crate) fn into_token(self) -> Token {
        let (mut token, logits) = self.into_parts();
        token.logits = logits;
        token
    }
}

/// One prompt's outcome in a `batch` event.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct WireBatchResult {
    pub(crate) tokens: Vec<WireToken>,
    pub(crate) error: Option<WireError>,
}

/// The fields of an `error` event (and of a failed prompt in a `batch` event).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct WireError {
    pub(crate) kind: String,
    pub(crate) message: String,
    pub(crate) operation: Option<String>,
    pub(crate) cause: Option<String>,
}

/// The measurements that `done`, `classified` and `batch` carry.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(crate) struct WireStats {
    prompt_tokens: usize,
    generation_tokens: usize,
    prompt_time: f64,
    generation_time: f64,
    prompt_tps: f64,
    generation_tps: f64,
    peak_memory: u64,
    active_memory: u64,
    /// `done`'s: `"length"`, or `"stop"`, `"stop_token"`, `"stop_string"`.
    finish_reason: Option<String>,
}

impl WireStats {
    /// The metrics of a call whose wall time, measured here, was `total`.
    pub(crate) fn metrics(&self, total: Duration) -> GenerateMetrics {
        GenerateMetrics {
            prompt_tokens: self.prompt_tokens,
            generated_tokens: self.generation_tokens,
            cached_prompt_tokens: 0,
            prefill_duration: seconds(self.prompt_time),
            decode_duration: seconds(self.generation_time),
            total_duration: total,
            prefill_tokens_per_sec: finite(self.prompt_tps),
            decode_tokens_per_sec: finite(self.generation_tps),
            peak_memory_bytes: self.peak_memory,
            active_memory_bytes: self.active_memory,
            // The bridge's events do not say which stop string ended a generation.
            stop_string: None,
            // Nor does it speculate.
            draft_tokens: 0,
            accepted_draft_tokens: 0,
            // mlx-lm keeps generating past its context (a rotating cache), so it never ends for that.
            finish_reason: match self.finish_reason.as_deref() {
                Some("length") => Some(FinishReason::MaxTokens),
                Some("stop" | "stop_token" | "stop_string") => Some(FinishReason::Stop),
                _ => None,
            },
        }
    }
}

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or_default()
}

fn finite(x: f64) -> f64 {
    if x.is_finite() && x >= 0.0 { x } else { 0.0 }
}

/// A float on the wire: a JSON number, or the string `"inf"`, `"-inf"` or `"nan"` (JSON has no
/// literal for them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct WireF32(pub(crate) f32);

impl<'de> Deserialize<'de> for WireF32 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = WireF32;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number or one of \"inf\", \"-inf\", \"nan\"")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<WireF32, E> {
                Ok(WireF32(v as f32))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<WireF32, E> {
                Ok(WireF32(v as f32))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<WireF32, E> {
                Ok(WireF32(v as f32))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WireF32, E> {
                match v {
                    "inf" => Ok(WireF32(f32::INFINITY)),
                    "-inf" => Ok(WireF32(f32::NEG_INFINITY)),
                    "nan" => Ok(WireF32(f32::NAN)),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_serialise_with_id_and_cmd() {
        let cmd = Command::Generate {
            prompt: "hi".into(),
            settings: WireSettings::from(&GenerateSettings::new().max_tokens(3).top_k(0).seed(7)),
        };
        let line = serde_json::to_string(&Request { id: 4, command: &cmd }).unwrap();
        assert_eq!(
            line,
            r#"{"id":4,"cmd":"generate","prompt":"hi","settings":{"max_tokens":3,"temperature":0.0,"top_k":0,"top_p":1.0,"min_p":0.0,"repetition_penalty":1.0,"repetition_context_size":20,"stop_tokens":[],"stop_strings":[],"seed":7,"logits":"none","ignore_eos":false}}"#
        );
        let line = serde_json::to_string(&Request { id: 5, command: &Command::Cancel { target: 4 } }).unwrap();
        assert_eq!(line, r#"{"id":5,"cmd":"cancel","target":4}"#);
        let line = serde_json::to_string(&Request { id: 6, command: &Command::Quit }).unwrap();
        assert_eq!(line, r#"{"id":6,"cmd":"quit"}"#);
        let cmd = Command::Chat {
            messages: vec![Message::user("x")],
            tools: Vec::new(),
            settings: (&GenerateSettings::new()).into(),
        };
        assert!(
            serde_json::to_string(&Request { id: 1, command: &cmd })
                .unwrap()
                .contains(r#""messages":[{"role":"user","content":"x"}]"#)
        );
        let s = WireSettings::from(&GenerateSettings::new().logits(LogitsMode::LogProbs).top_k(5));
        assert_eq!((s.logits, s.top_k), ("logprobs", 5));
    }

    #[test]
    fn events_parse_with_special_floats_and_unknown_fields() {
        let ev: Event = serde_json::from_str(
            r#"{"id":3,"event":"token","token":"a","token_id":9,"logprob":"-inf","logits":[1.5,"nan","inf",2],"new":1}"#,
        )
        .unwrap();
        let Event::Token { id: 3, token } = ev else { panic!("not a token event") };
        let t = token.into_token();
        assert_eq!(t.logprob, Some(f32::NEG_INFINITY));
        let logits = t.logits.unwrap();
        assert_eq!(logits[0], 1.5);
        assert!(logits[1].is_nan());
        assert_eq!(logits[2], f32::INFINITY);
        assert_eq!(logits[3], 2.0);
        assert!(
            serde_json::from_str::<Event>(r#"{"id":3,"event":"token","token":"a","token_id":9,"logprob":"x"}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Event>(r#"{"event":"nonsense"}"#).is_err());
        let ev: Event = serde_json::from_str(r#"{"event":"error","id":null,"message":"m"}"#).unwrap();
        assert_eq!((ev.id(), ev.name()), (None, "error"));
    }

    #[test]
    fn stats_become_metrics() {
        let ev: Event = serde_json::from_str(
            r#"{"id":1,"event":"done","finish_reason":"length","prompt_tokens":7,"generation_tokens":3,"prompt_time":0.5,"generation_time":-1,"prompt_tps":14.0,"generation_tps":-2,"peak_memory":10}"#,
        )
        .unwrap();
        let Event::Done { stats, .. } = ev else { panic!("not a done event") };
        let m = stats.metrics(Duration::from_secs(1));
        assert_eq!((m.prompt_tokens, m.generated_tokens), (7, 3));
        assert_eq!(m.prefill_duration, Duration::from_millis(500));
        assert_eq!(m.decode_duration, Duration::ZERO);
        assert_eq!((m.prefill_tokens_per_sec, m.decode_tokens_per_sec), (14.0, 0.0));
        assert_eq!((m.total_duration, m.peak_memory_bytes), (Duration::from_secs(1), 10));
        assert_eq!(m.finish_reason, Some(FinishReason::MaxTokens));
        for (wire, reason) in
            [("stop", Some(FinishReason::Stop)), ("stop_string", Some(FinishReason::Stop)), ("x", None)]
        {
            let line = format!(r#"{{"id":1,"event":"done","finish_reason":"{wire}"}}"#);
            let Ok(Event::Done { stats, .. }) = serde_json::from_str(&line) else { panic!("not a done event") };
            assert_eq!(stats.metrics(Duration::ZERO).finish_reason, reason, "{wire}");
        }
    }
}
