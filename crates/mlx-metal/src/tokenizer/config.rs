// SPDX-License-Identifier: EUPL-1.2
//! Reads the optional files of a model directory that say which tokens are special and which
//! chat template the model uses.

use std::path::Path;

use serde_json::Value;

use mlx::{Error, Result};

/// What the optional files of a model directory say about tokens and templates.
#[derive(Debug, Default)]
pub(super) struct ModelFiles {
    pub(super) bos_token: Option<String>,
    pub(super) eos_token: Option<String>,
    pub(super) unk_token: Option<String>,
    pub(super) pad_token: Option<String>,
    pub(super) add_bos_token: Option<bool>,
    pub(super) chat_template: Option<String>,
    pub(super) named_chat_templates: Vec<(String, String)>,
    /// `bos_token_id`s in priority order: generation_config.json, config.json, text_config.
    pub(super) bos_ids: Vec<u32>,
    /// `eos_token_id`s in order: generation_config.json, config.json, text_config.
    pub(super) eos_ids: Vec<u32>,
}

impl ModelFiles {
    pub(super) fn read(op: &'static str, dir: &Path) -> Result<Self> {
        let mut files = ModelFiles::default();

        let path = dir.join("tokenizer_config.json");
        if let Some(cfg) = read_json(op, &path)? {
            let file = Field { op, path: &path };
            files.bos_token = file.token_text(&cfg, "bos_token")?;
            files.eos_token = file.token_text(&cfg, "eos_token")?;
            files.unk_token = file.token_text(&cfg, "unk_token")?;
            files.pad_token = file.token_text(&cfg, "pad_token")?;
            files.add_bos_token = file.bool(&cfg, "add_bos_token")?;
            (files.chat_template, files.named_chat_templates) = file.chat_template(&cfg)?;
        }

        // transformers reads these over the template in tokenizer_config.json.
        let path = dir.join("chat_template.json");
        if let Some(cfg) = read_json(op, &path)? {
            let (default, named) = Field { op, path: &path }.chat_template(&cfg)?;
            if default.is_some() {
                files.chat_template = default;
            }
            if !named.is_empty() {
                files.named_chat_templates = named;
            }
        }
        let path = dir.join("chat_template.jinja");
        if let Some(source) = read_text(op, &path)? {
            files.chat_template = Some(source);
        }

        let path = dir.join("generation_config.json");
        if let Some(cfg) = read_json(op, &path)? {
            let file = Field { op, path: &path };
            files.bos_ids.extend(file.ids(&cfg, "bos_token_id")?);
            files.eos_ids.extend(file.ids(&cfg, "eos_token_id")?);
        }

        let path = dir.join("config.json");
        if let Some(cfg) = read_json(op, &path)? {
            let file = Field { op, path: &path };
            files.bos_ids.extend(file.ids(&cfg, "bos_token_id")?);
            files.eos_ids.extend(file.ids(&cfg, "eos_token_id")?);
            if let Some(text) = cfg.get("text_config").filter(|v| v.is_object()) {
                files.bos_ids.extend(file.ids(text, "bos_token_id")?);
                files.eos_ids.extend(file.ids(text, "eos_token_id")?);
            }
        }
        Ok(files)
    }
}

/// Reads a file that may be absent.
fn read_text(op: &'static str, path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io { op, path: path.to_path_buf(), source }),
    }
}

/// Reads and parses a JSON file that may be absent; it must hold an object.
fn read_json(op: &'static str, path: &Path) -> Result<Option<Value>> {
    let Some(text) = read_text(op, path)? else { return Ok(None) };
    let value: Value = serde_json::from_str(&text).map_err(|e| Error::Format {
        op,
        path: path.to_path_buf(),
        message: format!("not valid JSON: {e}"),
    })?;
    if !value.is_object() {
        return Err(Error::Format { op, path: path.to_path_buf(), message: "expected a JSON object".into() });
    }
    Ok(Some(value))
}

/// The default chat template and every named one.
type Templates = (Option<String>, Vec<(String, String)>);

/// Reads typed fields of one file, naming the file and the key in errors.
struct Field<'a> {
    op: &'static str,
    path: &'a Path,
}

impl Field<'_> {
    fn error(&self, key: &str, expected: &str, got: &Value) -> Error {
        let got = match got {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Number(_) => "a number",
            Value::String(_) => "a string",
            Value::Array(_) => "a list",
            Value::Object(_) => "an object",
        };
        Error::Format {
            op: self.op,
            path: self.path.to_path_buf(),
            message: format!("`{key}`: expected {expected}, found {got}"),
        }
    }

    /// A special token written as a string or as an `AddedToken` object `{"content": ...}`.
    fn token_text(&self, cfg: &Value, key: &str) -> Result<Option<String>> {
        match cfg.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(obj @ Value::Object(map)) => match map.get("content") {
                Some(Value::String(s)) => Ok(Some(s.clone())),
                _ => Err(self.error(key, "a string or an object with a string `content`", obj)),
            },
            Some(other) => Err(self.error(key, "a string or an object with a string `content`", other)),
        }
    }

    fn bool(&self, cfg: &Value, key: &str) -> Result<Option<bool>> {
        match cfg.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.error(key, "a boolean", other)),
        }
    }

    /// A token id field: absent, null, one id or a list of ids.
    fn ids(&self, cfg: &Value, key: &str) -> Result<Vec<u32>> {
        const EXPECTED: &str = "a token id (a non-negative integer) or a list of them";
        let one =
            |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| self.error(key, EXPECTED, v));
        match cfg.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }

    /// `chat_template`: a string, or a list of `{name, template}` whose `default` entry is the
    /// default. Returns the default and every named template.
    fn chat_template(&self, cfg: &Value) -> Result<Templates> {
        const KEY: &str = "chat_template";
        const EXPECTED: &str = "a string or a list of {\"name\", \"template\"} objects";
        match cfg.get(KEY) {
            None | Some(Value::Null) => Ok((None, Vec::new())),
            Some(Value::String(s)) => Ok((Some(s.clone()), Vec::new())),
            Some(Value::Array(items)) => {
                let mut named = Vec::with_capacity(items.len());
                for item in items {
                    match (item.get("name"), item.get("template")) {
                        (Some(Value::String(name)), Some(Value::String(template))) => {
                            named.push((name.clone(), template.clone()));
                        }
                        _ => return Err(self.error(KEY, EXPECTED, item)),
                    }
                }
                let default = named.iter().find(|(n, _)| n == "default").map(|(_, t)| t.clone());
                Ok((default, named))
            }
            Some(other) => Err(self.error(KEY, EXPECTED, other)),
        }
    }
}
