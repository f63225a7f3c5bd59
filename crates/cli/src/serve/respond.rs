// SPDX-License-Identifier: EUPL-1.2
//! Answers: a request's generations (one per choice, `n` of them, all decoding in the engine's
//! batch at once) gathered into one OpenAI response, or streamed as chunks tagged with each
//! choice's index; and Anthropic's messages, whole or as named events.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use inference_core::{GenerateSettings, Token, ToolCallFormat};
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use super::anthropic_tools::BlockStream;
use super::api::{self, Head};
use super::engine::{Engine, Event, Generation, Outcome, Prompt};
use super::error::ApiError;
use super::tools::{self, CallStream};
use super::{anthropic, logprobs};

/// Which endpoint answers.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    /// A chat answer, read for tool calls in the format given (when the request offers tools).
    Chat(Option<ToolCallFormat>),
    Text,
}

/// Starts `n` generations of `prompt`: choice `i` samples with `seed + i` when a seed is given,
/// so that the choices differ yet repeat.
pub(super) async fn start(
    engine: &Arc<Engine>,
    prompt: &Prompt,
    settings: &GenerateSettings,
    n: usize,
) -> Result<Vec<Generation>, ApiError> {
    // Tokenised once for every choice; the choices queue as one.
    let ready = engine.prepare(prompt.clone(), settings.clone()).await?;
    let choices = (0..n).map(|i| ready.clone().with_seed(settings.seed.map(|seed| seed.wrapping_add(i as u64))));
    engine.start_ready(choices.collect()).await
}

/// Reads a generation to the end: its text, its tokens and how it ended.
pub(super) async fn collect(mut generation: Generation) -> Result<(String, Vec<Token>, Outcome), ApiError> {
    let (mut text, mut tokens) = (String::new(), Vec::new());
    loop {
        match generation.next().await {
            Some(Event::Token(t)) => {
                text.push_str(&t.text);
                tokens.push(t);
            }
            Some(Event::Done(outcome)) => return Ok((text, tokens, outcome)),
            Some(Event::Failed(e)) => return Err(e.into()),
            None => return Err(ApiError::unavailable("the generation was cancelled: the server is shutting down")),
        }
    }
}

/// The usage of a request's choices: the prompt once, the completions together.
fn usage_of(outcomes: &[Outcome]) -> Value {
    let first = outcomes.first().copied().unwrap_or(Outcome {
        prompt_tokens: 0,
        cached_tokens: 0,
        completion_tokens: 0,
        finish_reason: "stop",
        stop_string: None,
        draft_tokens: 0,
        accepted_draft_tokens: 0,
    });
    let usage =
        api::usage(first.prompt_tokens, first.cached_tokens, outcomes.iter().map(|o| o.completion_tokens).sum());
    let (drafted, accepted) =
        outcomes.iter().fold((0, 0), |(d, a), o| (d + o.draft_tokens, a + o.accepted_draft_tokens));
    api::with_predictions(usage, drafted, accepted)
}

/// The whole answer of `kind` for `generations`, one choice each.
pub(super) async fn whole(generations: Vec<Generation>, head: &Head, kind: Kind) -> Result<Response, ApiError> {
    let mut choices = Vec::with_capacity(generations.len());
    let mut outcomes = Vec::with_capacity(generations.len());
    for (index, generation) in generations.into_iter().enumerate() {
        let (text, tokens, outcome) = collect(generation).await?;
        let finish = outcome.finish_reason;
        choices.push(match kind {
            Kind::Chat(Some(format)) => {
                let (content, calls) = inference_core::tools::parse_tool_calls(format, &text);
                let finish = tools::finish_reason(finish, calls.len());
                api::chat_choice_with_calls(index, &content, &calls, finish, logprobs::chat(&tokens))
            }
            Kind::Chat(None) => api::chat_choice(index, &text, finish, logprobs::chat(&tokens)),
            Kind::Text => api::text_choice(index, &text, Some(finish), logprobs::text(&tokens, 0)),
        });
        outcomes.push(outcome);
    }
    let usage = usage_of(&outcomes);
    Ok(Json(match kind {
        Kind::Chat(_) => api::chat_completion(head, choices, usage),
        Kind::Text => api::text_completion(head, choices, Some(usage)),
    })
    .into_response())
}

/// One chunk of `kind` with the given choices (none: the usage chunk).
fn chunk(head: &Head, kind: Kind, choices: Vec<Value>, usage: Option<Value>) -> Value {
    match kind {
        Kind::Chat(_) => api::chat_chunk(head, choices, usage),
        Kind::Text => api::text_completion(head, choices, usage),
    }
}

/// The generations as server-sent events, ending with `data: [DONE]`: each token a chunk of its
/// choice's index, each choice's end a chunk with its finish reason, then (when asked for) the
/// usage. One task per generation forwards its events; when the client goes away, axum drops the
/// receiving end, the tasks' sends fail, and dropping the generations cancels the engine's work.
pub(super) fn stream(generations: Vec<Generation>, head: Head, kind: Kind, include_usage: bool) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(16);
    let (events_tx, mut events) = tokio::sync::mpsc::channel::<(usize, Option<Event>)>(16);
    let n = generations.len();
    for (index, mut generation) in generations.into_iter().enumerate() {
        let events_tx = events_tx.clone();
        tokio::spawn(async move {
            loop {
                let event = generation.next().await;
                let last = !matches!(event, Some(Event::Token(_)));
                if events_tx.send((index, event)).await.is_err() || last {
                    return;
                }
            }
        });
    }
    drop(events_tx);
    tokio::spawn(async move {
        let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
        if let Kind::Chat(_) = kind {
            let opening: Vec<Value> = (0..n)
                .map(|i| api::chat_delta(i, json!({"role": "assistant", "content": ""}), None, Value::Null))
                .collect();
            if tx.send(data(chunk(&head, kind, opening, None))).await.is_err() {
                return;
            }
        }
        // Characters of each choice sent so far (the completions endpoint's `text_offset`).
        let mut offsets = vec![0usize; n];
        // Each chat choice's reading of its text for tool calls.
        let format = if let Kind::Chat(f) = kind { f } else { None };
        let mut calls: Vec<CallStream> = (0..n).map(|_| CallStream::new(format)).collect();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; n];
        loop {
            let next = tokio::select! {
                next = events.recv() => next,
                () = tx.closed() => return,
            };
            let Some((index, event)) = next else { return };
            let values = match event {
                Some(Event::Token(token)) => {
                    let tokens = std::slice::from_ref(&token);
                    let values = match kind {
                        Kind::Chat(_) => {
                            let mut lp = logprobs::chat(tokens);
                            let mut deltas = calls[index].push(&token.text);
                            if deltas.is_empty() && !lp.is_null() {
                                // Held back (it may be a call): the token's scores still go out.
                                deltas.push(json!({ "content": "" }));
                            }
                            let choices = deltas.into_iter().map(|d| api::chat_delta(index, d, None, lp.take()));
                            choices.map(|c| chunk(&head, kind, vec![c], None)).collect()
                        }
                        Kind::Text => {
                            let lp = logprobs::text(tokens, offsets[index]);
                            vec![chunk(&head, kind, vec![api::text_choice(index, &token.text, None, lp)], None)]
                        }
                    };
                    offsets[index] += token.text.chars().count();
                    values
                }
                Some(Event::Done(outcome)) => {
                    let (held, made) = calls[index].finish();
                    let finish = Some(tools::finish_reason(outcome.finish_reason, made));
                    outcomes[index] = Some(outcome);
                    let mut values: Vec<Value> = held
                        .into_iter()
                        .map(|d| chunk(&head, kind, vec![api::chat_delta(index, d, None, Value::Null)], None))
                        .collect();
                    let choice = match kind {
                        Kind::Chat(_) => api::chat_delta(index, json!({}), finish, Value::Null),
                        Kind::Text => api::text_choice(index, "", finish, Value::Null),
                    };
                    values.push(chunk(&head, kind, vec![choice], None));
                    values
                }
                Some(Event::Failed(e)) => {
                    let _ = tx.send(data(ApiError::from(e).body())).await;
                    return;
                }
                None => {
                    let _ = tx.send(data(ApiError::unavailable("the server is shutting down").body())).await;
                    return;
                }
            };
            for value in values {
                if tx.send(data(value)).await.is_err() {
                    return;
                }
            }
            if outcomes.iter().all(Option::is_some) {
                break;
            }
        }
        if include_usage {
            let outcomes: Vec<Outcome> = outcomes.into_iter().flatten().collect();
            if tx.send(data(chunk(&head, kind, Vec::new(), Some(usage_of(&outcomes))))).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}

/// A message as Anthropic's named server-sent events; `format` reads tool calls, `stops` are the
/// request's stop sequences.
pub(super) fn anthropic_stream(
    mut generation: Generation,
    head: Head,
    format: Option<ToolCallFormat>,
    stops: Vec<String>,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(16);
    tokio::spawn(async move {
        let event = |(name, data): (&'static str, Value)| Ok(SseEvent::default().event(name).data(data.to_string()));
        for e in anthropic::opening(&head) {
            if tx.send(event(e)).await.is_err() {
                return;
            }
        }
        let mut blocks = BlockStream::new(format);
        loop {
            let next = tokio::select! {
                next = generation.next() => next,
                () = tx.closed() => return,
            };
            let events: Vec<(&'static str, Value)> = match next {
                Some(Event::Token(token)) if token.text.is_empty() => continue,
                Some(Event::Token(token)) => blocks.push(&token.text),
                Some(Event::Done(o)) => {
                    let (mut events, tool_use) = blocks.finish();
                    let stop_sequence = o.stop_string.and_then(|i| stops.get(i)).map(String::as_str);
                    let end = anthropic::Ending { finish: o.finish_reason, tool_use, stop_sequence };
                    events.extend(anthropic::closing(end, (o.prompt_tokens, o.completion_tokens, o.cached_tokens)));
                    events
                }
                Some(Event::Failed(e)) => vec![("error", anthropic::AnthropicError(ApiError::from(e)).body())],
                None => {
                    let e = ApiError::unavailable("the server is shutting down");
                    vec![("error", anthropic::AnthropicError(e).body())]
                }
            };
            let last = events.iter().any(|(name, _)| matches!(*name, "message_stop" | "error"));
            for e in events {
                if tx.send(event(e)).await.is_err() {
                    return;
                }
            }
            if last {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}
