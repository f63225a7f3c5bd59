// SPDX-License-Identifier: EUPL-1.2
//! Chat prompts: the model's own Jinja chat template, rendered with minijinja as `transformers`
//! renders it, with built-in formats for models that ship none.
//!
//! The environment matches `transformers`' `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks` on, loop controls (`break`, `continue`), the globals `raise_exception` and
//! `strftime_now`, a `tojson` filter that writes what Python's `json.dumps` writes, and the
//! Python string, list and dict methods templates call (`.strip()`, `.startswith()`,
//! `.items()`, `.get()`; from `minijinja-contrib`'s `pycompat`). The render context holds
//! `messages`, `add_generation_prompt`, `tools` and `documents` (both none), the special tokens
//! (`bos_token`, `eos_token`, `unk_token`, `pad_token`) and any extra variables the caller gives
//! (such as `enable_thinking`).
//!
//! ```
//! use inference_core::Message;
//! use mlx_metal::chat::{BuiltinTemplate, ChatTemplate};
//! let chat = ChatTemplate::builtin(BuiltinTemplate::ChatMl);
//! let text = chat.render(&[Message::system("Be brief."), Message::user("Hi")], true)?;
//! assert_eq!(text, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
//! # Ok::<(), mlx_metal::Error>(())
//! ```

mod builtin;
mod globals;
mod tools;

use std::borrow::Cow;
use std::fmt;

use inference_core::Message;
use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, Value};

pub use builtin::BuiltinTemplate;

use crate::tokenizer::Tokenizer;
use mlx::{Error, Result};

const NAME: &str = "chat_template";

/// Where a [`ChatTemplate`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TemplateOrigin {
    /// The model's own template (or one the caller gave).
    Model,
    /// A format built into the crate, for a model with no template.
    Builtin(BuiltinTemplate),
}

/// A compiled chat template with the special-token texts it is rendered with.
///
/// Rendering never panics: a template that fails (a syntax error found late, an undefined
/// variable used as an object, `raise_exception("Conversation roles must alternate…")`) returns
/// an error that carries the template's message.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    origin: TemplateOrigin,
    tokens: Vec<(String, String)>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a Jinja chat template (the text of `chat_template` in `tokenizer_config.json`).
    /// It has no special-token texts yet; see [`ChatTemplate::with_tokens`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] with minijinja's message (and the line) when the template does
    /// not compile.
    pub fn new(source: &str) -> Result<Self> {
        Self::compile(source, TemplateOrigin::Model)
    }

    /// One of the built-in formats.
    pub fn builtin(kind: BuiltinTemplate) -> Self {
        match Self::compile(kind.source(), TemplateOrigin::Builtin(kind)) {
            Ok(template) => template,
            // Unreachable: the built-in sources compile (a test checks each).
            Err(_) => Self {
                env: Environment::new(),
                source: String::new(),
                origin: TemplateOrigin::Builtin(kind),
                tokens: Vec::new(),
            },
        }
    }

    /// The template for a model: its own chat template when the tokeniser has one, otherwise
    /// the built-in format that [`BuiltinTemplate::for_model`] picks for `model_type`; with the
    /// tokeniser's special-token texts.
    ///
    /// # Errors
    /// As [`ChatTemplate::new`], when the model's own template does not compile (a broken
    /// template is reported, not replaced by a built-in one).
    pub fn for_model(tokenizer: &Tokenizer, model_type: &str) -> Result<Self> {
        let template = match tokenizer.chat_template() {
            Some(source) => Self::new(source)?,
            None => Self::builtin(BuiltinTemplate::for_model(tokenizer, model_type)),
        };
        Ok(template.with_tokens(tokenizer))
    }

    /// This template with the tokeniser's `bos_token`, `eos_token`, `unk_token` and `pad_token`
    /// texts.
    #[must_use]
    pub fn with_tokens(mut self, tokenizer: &Tokenizer) -> Self {
        let tokens = [
            ("bos_token", tokenizer.bos_token()),
            ("eos_token", tokenizer.eos_token()),
            ("unk_token", tokenizer.unk_token()),
            ("pad_token", tokenizer.pad_token()),
        ];
        for (name, text) in tokens {
            if let Some(text) = text {
                self = self.with_token(name, text);
            }
        }
        self
    }

    /// This template with one special-token variable set, such as `("bos_token", "<s>")`.
    #[must_use]
    pub fn with_token(mut self, name: &str, text: &str) -> Self {
        match self.tokens.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = text.to_string(),
            None => self.tokens.push((name.to_string(), text.to_string())),
        }
        self
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether this is the model's template or a built-in one.
    pub fn origin(&self) -> TemplateOrigin {
        self.origin
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends with the opening of the
    /// assistant's turn.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] with the template's message when rendering fails.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// [`render`](Self::render) with extra template variables (`enable_thinking`, `tools`,
    /// `date_string`); they override the standard ones of the same name.
    ///
    /// # Errors
    /// As [`render`](Self::render).
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        // Built as minijinja values, not through a JSON map, so that dicts keep their order
        // (`message.items()` gives role, then content, as in Python).
        let mut ctx: Vec<(String, Value)> = vec![
            ("messages".into(), Value::from(Serde(messages))),
            ("add_generation_prompt".into(), Value::from(add_generation_prompt)),
            ("tools".into(), Value::from(())),
            ("documents".into(), Value::from(())),
        ];
        for (name, text) in &self.tokens {
            ctx.push((name.clone(), Value::from(text.as_str())));
        }
        for (name, value) in extra {
            ctx.push((name.clone(), Value::from(Serde(value))));
        }
        let template = self.env.get_template(NAME).map_err(|e| render_error(&e))?;
        template.render(Value::from_pairs(ctx)).map_err(|e| render_error(&e))
    }

    /// Renders `messages` with the generation prompt and encodes the text with one BOS (see
    /// [`Tokenizer::encode_prompt`]): a template that writes the BOS itself does not get a second.
    ///
    /// # Errors
    /// As [`render`](Self::render) and [`Tokenizer::encode`].
    pub fn render_and_encode(&self, tokenizer: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>> {
        let text = self.render(messages, true)?;
        tokenizer.encode_prompt(&text)
    }

    fn compile(source: &str, origin: TemplateOrigin) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| Error::invalid("ChatTemplate::new", e.to_string()))?,
        );
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", globals::raise_exception);
        env.add_function("strftime_now", globals::strftime_now);
        env.add_filter("tojson", globals::tojson);
        let source = source.to_string();
        env.add_template_owned(NAME, without_generation_tags(&source).into_owned()).map_err(|e| {
            Error::InvalidArgument {
                op: "ChatTemplate::new",
                message: format!("the chat template does not compile: {}", describe(&e)),
            }
        })?;
        Ok(Self { env, source, origin, tokens: Vec::new() })
    }
}

fn render_error(e: &minijinja::Error) -> Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cause {
        if let Some(raised) = err.downcast_ref::<globals::Raised>() {
            return Error::invalid("ChatTemplate::render", format!("the chat template raised an error: {raised}"));
        }
        cause = err.source();
    }
    Error::invalid("ChatTemplate::render", format!("the chat template failed: {}", describe(e)))
}

/// minijinja's message with the template line, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(err) = cause {
        text.push_str(": ");
        text.push_str(&err.to_string());
        cause = err.source();
    }
    text
}

/// `transformers` marks assistant text with `{% generation %}…{% endgeneration %}` (for
/// assistant masks); minijinja knows no such tag, so they become an `if true` block, which keeps
/// their whitespace control.
fn without_generation_tags(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let after = &rest[start + 2..];
        if let Some((replacement, tail)) = generation_tag(after) {
            out.push_str(&rest[..start]);
            out.push_str(&replacement);
            rest = tail;
        } else {
            out.push_str(&rest[..start + 2]);
            rest = after;
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Parses `[-+]? generation|endgeneration [-+]? %}` after a `{%`; returns the replacement tag
/// and the text after the tag.
fn generation_tag(after: &str) -> Option<(String, &str)> {
    let (lead, body) = match after.chars().next() {
        Some(c @ ('-' | '+')) => (Some(c), &after[1..]),
        _ => (None, after),
    };
    let body = body.trim_start();
    let end = body.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(body.len());
    let statement = match &body[..end] {
        "generation" => " if true ",
        "endgeneration" => " endif ",
        _ => return None,
    };
    let tail = body[end..].trim_start();
    let (trail, tail) = match tail.chars().next() {
        Some(c @ ('-' | '+')) => (Some(c), &tail[1..]),
        _ => (None, tail),
    };
    let tail = tail.strip_prefix("%}")?;
    let mut tag = String::from("{%");
    tag.extend(lead);
    tag.push_str(statement);
    tag.extend(trail);
    tag.push_str("%}");
    Some((tag, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_if_blocks() {
        let src = "a{% generation %}b{%- endgeneration -%}c{% if x %}{% endif %}";
        assert_eq!(without_generation_tags(src), "a{% if true %}b{%- endif -%}c{% if x %}{% endif %}");
        assert_eq!(without_generation_tags("{% generationx %}"), "{% generationx %}");
        assert_eq!(without_generation_tags("{% generation"), "{% generation");
    }

    #[test]
    fn every_builtin_compiles() {
        for kind in [BuiltinTemplate::Gemma3, BuiltinTemplate::ChatMl, BuiltinTemplate::Llama3, BuiltinTemplate::Plain]
        {
            ChatTemplate::compile(kind.source(), TemplateOrigin::Builtin(kind)).unwrap();
        }
    }

    #[test]
    fn chat_templates_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }
}
