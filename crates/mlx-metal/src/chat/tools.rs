// SPDX-License-Identifier: EUPL-1.2
//! A chat with tools: what the template sees, and the settings the
//! generation runs with (see inference-core's `tools` module for the formats).
//!
//! A template that knows tools (its source mentions `tools`) gets them as the
//! `tools` variable and renders the history's `tool_calls` and `tool`
//! messages itself. One that does not, when tools are offered, gets the
//! fallback (without tools the messages go as they are): the tool
//! definitions and the Hermes form in a system message, earlier calls written
//! into their assistant messages in that form, and tool results as user
//! messages in `<tool_response>` tags (templates such as Gemma's refuse roles
//! other than user and assistant). `tool_choice` `required` or a named
//! function becomes the constraint of [`tools::call_grammar`] in the
//! template's format.

use inference_core::tools::{self, ToolCallFormat};
use inference_core::{GenerateSettings, Message, ToolChoice};
use serde_json::{Map, Value};

use super::ChatTemplate;
use crate::tokenizer::Tokenizer;
use mlx::{Error, Result};

impl ChatTemplate {
    /// Whether the template renders tools itself (its source uses `tools`).
    pub fn supports_tools(&self) -> bool {
        tools::template_supports_tools(self.source())
    }

    /// How the model writes tool calls, by the markers its template writes
    /// ([`ToolCallFormat::Json`] for a template that knows no tools).
    pub fn tool_call_format(&self) -> ToolCallFormat {
        tools::template_format(self.source())
    }

    /// The prompt's ids for `messages` with `settings`' tools, and the
    /// settings to generate with (with the call constraint when the tool
    /// choice forces a call).
    ///
    /// # Errors
    /// Invalid settings (tools, tool choice), or the template's own errors.
    pub fn render_chat(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        settings: &GenerateSettings,
    ) -> Result<(Vec<u32>, GenerateSettings)> {
        settings.validate().map_err(|e| Error::invalid("chat", e.to_string()))?;
        let offered = if settings.tool_choice == ToolChoice::None { &[][..] } else { &settings.tools[..] };
        let mut settings = settings.clone();
        let only = match &settings.tool_choice {
            ToolChoice::Required => Some(None),
            ToolChoice::Function(name) => Some(Some(name.clone())),
            ToolChoice::Auto | ToolChoice::None => None,
        };
        if let Some(only) = only {
            let grammar =
                tools::call_grammar(self.tool_call_format(), offered, only.as_deref(), settings.parallel_tool_calls)
                    .map_err(|e| Error::invalid("chat", e.to_string()))?;
            // The forced choice is carried out as this constraint.
            settings.constraint = Some(grammar);
            settings.tool_choice = ToolChoice::Auto;
        }
        let text = if self.supports_tools() {
            let mut extra = Map::new();
            if !offered.is_empty() {
                extra.insert("tools".into(), Value::Array(offered.to_vec()));
            }
            self.render_with(messages, true, &extra)?
        } else if offered.is_empty() {
            // No tools offered: the messages go to the template as they are (as mlx-lm's do).
            self.render(messages, true)?
        } else {
            self.render(&tools::fallback_messages(messages, offered), true)?
        };
        Ok((tokenizer.encode_prompt(&text)?, settings))
    }
}
