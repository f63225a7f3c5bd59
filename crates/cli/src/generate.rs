// SPDX-License-Identifier: EUPL-1.2
//! `mlxr generate`: one prompt, the continuation streamed to standard output.

use std::io::{self, IsTerminal, Read, Write};

use inference_core::{CancelToken, FinishReason, GenerateMetrics, GenerateSettings, Message, TextModel, TokenStream};

use crate::args::GenerateArgs;
use crate::failure::{self, Failure};
use crate::tensor_parallel;

/// The prompt, passed from a tensor-parallel launcher to its ranks (whose standard input is
/// empty).
const PROMPT_ENV: &str = "MLXR_TENSOR_PARALLEL_PROMPT";

pub(crate) fn run(args: &GenerateArgs) -> Result<(), Failure> {
    let settings = args.sampling.settings()?;
    let prompt = match std::env::var(PROMPT_ENV) {
        Ok(p) if args.tensor_parallel.tensor_parallel > 1 => p,
        _ => read_prompt(
            args.prompt_flag.as_deref().or(args.prompt.as_deref()),
            &mut io::stdin().lock(),
            io::stdin().is_terminal(),
        )?,
    };
    let env = vec![(PROMPT_ENV.into(), prompt.clone().into())];
    tensor_parallel::run(&args.tensor_parallel, &args.model, env, tensor_parallel::Terminal::Batch, || {
        generate(args, settings, prompt)
    })
}

fn generate(args: &GenerateArgs, settings: GenerateSettings, prompt: String) -> Result<(), Failure> {
    let model = args.model.load_with(args.tensor_parallel.load_settings(args.model.load_settings()))?;
    let result = (|| -> Result<(), Failure> {
        // The chat template by default when the model has its own, as mlx_lm.generate does.
        let chat = !args.ignore_chat_template && (args.chat || args.system.is_some() || model.info().has_chat_template);
        let stream = if chat {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(Message::system(system.as_str()));
            }
            messages.push(Message::user(prompt));
            model.chat(&messages, &settings, CancelToken::new())?
        } else {
            model.generate(&prompt, &settings, CancelToken::new())?
        };
        let mut out = io::stdout().lock();
        let metrics = stream_to(stream, &mut out, model.as_ref())?;
        writeln!(out).map_err(|e| failure::io("writing to standard output", e))?;
        if let Some(note) = context_full(&metrics, "shorten the prompt or raise --context-length") {
            eprintln!("{note}");
        }
        if args.metrics {
            eprintln!("{}", metrics_line(&metrics, false));
        }
        if args.verbose {
            eprintln!("{}", mlx_lm_statistics(&metrics));
        }
        Ok(())
    })();
    let closed = model.close();
    result?;
    closed.map_err(Failure::from)
}

/// The statistics `mlx_lm.generate --verbose` prints at the end, in its shape.
pub(crate) fn mlx_lm_statistics(m: &GenerateMetrics) -> String {
    let mut text = format!(
        "Prompt: {} tokens, {:.3} tokens-per-sec\nGeneration: {} tokens, {:.3} tokens-per-sec",
        m.prompt_tokens, m.prefill_tokens_per_sec, m.generated_tokens, m.decode_tokens_per_sec
    );
    if m.peak_memory_bytes > 0 {
        text.push_str(&format!("\nPeak memory: {:.3} GB", m.peak_memory_bytes as f64 / 1e9));
    }
    text
}

/// The note that says a generation stopped because the model's context was full (not because
/// it was done), with what to do about it; `None` when it ended otherwise.
pub(crate) fn context_full(m: &GenerateMetrics, fix: &str) -> Option<String> {
    (m.finish_reason == Some(FinishReason::ContextLength)).then(|| {
        format!(
            "stopped: the context is full ({} prompt and {} generated tokens) before max_tokens; {fix}",
            m.prompt_tokens, m.generated_tokens
        )
    })
}

/// The prompt: the argument, or standard input for `-` or when there is no argument and input
/// is piped. A trailing newline from standard input is dropped.
pub(crate) fn read_prompt(
    arg: Option<&str>,
    stdin: &mut impl Read,
    stdin_is_terminal: bool,
) -> Result<String, Failure> {
    let prompt = match arg {
        Some("-") => read_all(stdin)?,
        Some(text) => text.to_owned(),
        None if !stdin_is_terminal => read_all(stdin)?,
        None => return Err(Failure::new("no prompt: give one as an argument, or `-` to read standard input")),
    };
    if prompt.trim().is_empty() {
        return Err(Failure::new("the prompt is empty"));
    }
    Ok(prompt)
}

fn read_all(stdin: &mut impl Read) -> Result<String, Failure> {
    let mut text = String::new();
    stdin.read_to_string(&mut text).map_err(|e| failure::io("reading the prompt from standard input", e))?;
    let trimmed = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t));
    Ok(trimmed.map(str::to_owned).unwrap_or(text))
}

/// Writes each token as it arrives, flushing after each, and returns the call's metrics (from
/// the stream, else the model's last).
pub(crate) fn stream_to(
    mut stream: TokenStream,
    out: &mut impl Write,
    model: &dyn TextModel,
) -> Result<GenerateMetrics, Failure> {
    for token in &mut stream {
        let token = token?;
        out.write_all(token.text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| failure::io("writing to standard output", e))?;
    }
    Ok(stream.metrics().copied().unwrap_or_else(|| model.metrics()))
}

/// One line of measurements for standard error; the prompt's split into cached and new tokens
/// is shown when some were cached, or always with `split`.
pub(crate) fn metrics_line(m: &GenerateMetrics, split: bool) -> String {
    let cached = if split || m.cached_prompt_tokens > 0 {
        format!(" ({} cached, {} new)", m.cached_prompt_tokens, m.prompt_tokens.saturating_sub(m.cached_prompt_tokens))
    } else {
        String::new()
    };
    let peak = if m.peak_memory_bytes > 0 {
        format!(", peak memory {:.3} GB", m.peak_memory_bytes as f64 / 1e9)
    } else {
        String::new()
    };
    let drafted = match (m.acceptance_rate(), m.tokens_per_forward_pass()) {
        (Some(rate), Some(per_pass)) => format!(
            "; speculative: {} of {} guesses accepted ({:.0}%), {per_pass:.2} tokens per forward pass",
            m.accepted_draft_tokens,
            m.draft_tokens,
            rate * 100.0
        ),
        _ => String::new(),
    };
    format!(
        "prompt: {} tokens{cached}, {:.1} tokens/s; generation: {} tokens, {:.1} tokens/s{peak}{drafted}",
        m.prompt_tokens, m.prefill_tokens_per_sec, m.generated_tokens, m.decode_tokens_per_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_comes_from_the_argument_or_standard_input() {
        let mut none = io::empty();
        assert_eq!(read_prompt(Some("hello"), &mut none, true).unwrap(), "hello");
        let mut piped = "from a pipe\n".as_bytes();
        assert_eq!(read_prompt(None, &mut piped, false).unwrap(), "from a pipe");
        let mut piped = "dash\r\n".as_bytes();
        assert_eq!(read_prompt(Some("-"), &mut piped, true).unwrap(), "dash");
        let mut piped = "two\nlines\n\n".as_bytes();
        assert_eq!(read_prompt(None, &mut piped, false).unwrap(), "two\nlines\n");
    }

    #[test]
    fn a_missing_or_empty_prompt_is_refused() {
        let mut none = io::empty();
        assert!(read_prompt(None, &mut none, true).unwrap_err().message().starts_with("no prompt"));
        let mut blank = " \n".as_bytes();
        assert_eq!(read_prompt(None, &mut blank, false).unwrap_err().message(), "the prompt is empty");
        let mut invalid: &[u8] = &[0xff, 0xfe];
        let err = read_prompt(Some("-"), &mut invalid, false).unwrap_err();
        assert!(err.message().starts_with("reading the prompt from standard input"), "{err}");
    }

    #[test]
    fn metrics_line_says_what_was_cached() {
        let m = GenerateMetrics {
            prompt_tokens: 10,
            cached_prompt_tokens: 4,
            generated_tokens: 5,
            prefill_tokens_per_sec: 100.0,
            decode_tokens_per_sec: 50.0,
            peak_memory_bytes: 2_000_000_000,
            ..Default::default()
        };
        assert_eq!(
            metrics_line(&m, false),
            "prompt: 10 tokens (4 cached, 6 new), 100.0 tokens/s; generation: 5 tokens, 50.0 tokens/s, \
             peak memory 2.000 GB"
        );
        let spec = GenerateMetrics { draft_tokens: 12, accepted_draft_tokens: 3, ..m };
        assert!(
            metrics_line(&spec, false)
                .ends_with("; speculative: 3 of 12 guesses accepted (25%), 2.50 tokens per forward pass"),
            "{}",
            metrics_line(&spec, false)
        );
        assert_eq!(
            metrics_line(&GenerateMetrics::default(), false),
            "prompt: 0 tokens, 0.0 tokens/s; generation: 0 tokens, 0.0 tokens/s"
        );
        let fresh = GenerateMetrics { prompt_tokens: 3, ..Default::default() };
        assert!(metrics_line(&fresh, true).starts_with("prompt: 3 tokens (0 cached, 3 new), "));
    }
}
