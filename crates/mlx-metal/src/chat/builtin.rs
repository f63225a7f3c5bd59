// SPDX-License-Identifier: EUPL-1.2
//! Chat templates for models that ship none, and the choice between them.

use crate::tokenizer::Tokenizer;

/// A chat format built into the crate, used only when a model has no chat template of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuiltinTemplate {
    /// Gemma 3: `<bos><start_of_turn>user\n…<end_of_turn>\n<start_of_turn>model\n`; a system
    /// message is merged into the first user turn; roles must alternate user/assistant.
    Gemma3,
    /// ChatML (Qwen): `<|im_start|>role\n…<|im_end|>\n`, then `<|im_start|>assistant\n`.
    ChatMl,
    /// Llama 3: `<|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>`,
    /// then `<|start_header_id|>assistant<|end_header_id|>\n\n`.
    Llama3,
    /// `role: content` lines, then `assistant: `.
    Plain,
}

impl BuiltinTemplate {
    /// The format for a model of `model_type` (as `config.json` spells it) with this vocabulary:
    /// `gemma*` → [`Gemma3`](Self::Gemma3); `qwen*` → [`ChatMl`](Self::ChatMl); any other type
    /// (`llama` included) → [`Llama3`](Self::Llama3) when the vocabulary has
    /// `<|start_header_id|>`, else [`ChatMl`](Self::ChatMl) when it has `<|im_start|>`, else
    /// [`Plain`](Self::Plain).
    pub fn for_model(tokenizer: &Tokenizer, model_type: &str) -> Self {
        let model_type = model_type.to_ascii_lowercase();
        if model_type.starts_with("gemma") {
            Self::Gemma3
        } else if model_type.starts_with("qwen") {
            Self::ChatMl
        } else if tokenizer.token_to_id("<|start_header_id|>").is_some() {
            Self::Llama3
        } else if tokenizer.token_to_id("<|im_start|>").is_some() {
            Self::ChatMl
        } else {
            Self::Plain
        }
    }

    /// The template's Jinja source.
    pub fn source(self) -> &'static str {
        match self {
            Self::Gemma3 => GEMMA3,
            Self::ChatMl => CHATML,
            Self::Llama3 => LLAMA3,
            Self::Plain => PLAIN,
        }
    }

    /// A short name: `gemma3`, `chatml`, `llama3` or `plain`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gemma3 => "gemma3",
            Self::ChatMl => "chatml",
            Self::Llama3 => "llama3",
            Self::Plain => "plain",
        }
    }
}

mlx::display_by_name!(BuiltinTemplate);

const GEMMA3: &str = r#"{{- '<bos>' -}}
{%- set ns = namespace(prefix='', start=0) -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set ns.prefix = messages[0]['content'] + '\n\n' -%}
    {%- set ns.start = 1 -%}
{%- endif -%}
{%- for message in messages[ns.start:] -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
    {%- endif -%}
    {{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' -}}
    {%- if loop.first -%}{{- ns.prefix -}}{%- endif -%}
    {{- (message['content'] | trim) + '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"#;

const CHATML: &str = r#"{%- for message in messages -%}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"#;

const LLAMA3: &str = r#"{{- '<|begin_of_text|>' -}}
{%- for message in messages -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] | trim) + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"#;

const PLAIN: &str = r#"{%- for message in messages -%}
    {{- message['role'] + ': ' + message['content'] + '\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'assistant: ' -}}{%- endif -%}"#;
