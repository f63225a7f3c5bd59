// SPDX-License-Identifier: EUPL-1.2
//! What a generation's output must match, enforced token by token.
//!
//! A backend that supports constrained decoding masks, at every step, the tokens that cannot
//! continue a match, so the output always matches (unless it is cut off by `max_tokens`); one
//! that does not refuses the setting with [`Error::Unsupported`](crate::Error::Unsupported). The
//! `metal` backend compiles constraints with `llguidance`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// A constraint on a generation's whole output ([`GenerateSettings::constraint`](crate::GenerateSettings::constraint)).
///
/// ```
/// use inference_core::Constraint;
/// let c = Constraint::JsonSchema(serde_json::json!({"type": "object", "required": ["a"]}));
/// assert!(c.validate().is_ok());
/// assert!(Constraint::Regex(String::new()).validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Constraint {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this JSON Schema (OpenAI's `json_schema`, `strict`).
    JsonSchema(Value),
    /// Text that matches this regular expression from start to end.
    Regex(String),
    /// A Lark grammar in llguidance's dialect (`%json{...}` embeds a JSON Schema).
    Lark(String),
}

impl Constraint {
    /// The kind, as named in errors and logs: `json_object`, `json_schema`, `regex` or `lark`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonObject => "json_object",
            Self::JsonSchema(_) => "json_schema",
            Self::Regex(_) => "regex",
            Self::Lark(_) => "lark",
        }
    }

    /// Checks the shape a backend can compile: a schema is an object or a boolean; a pattern
    /// or grammar is not empty. Whether the backend's compiler accepts it is its own check.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] naming `constraint` and what is wrong.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::JsonObject => Ok(()),
            Self::JsonSchema(Value::Object(_) | Value::Bool(_)) => Ok(()),
            Self::JsonSchema(v) => {
                Err(Error::invalid_setting("constraint.json_schema", short(v), "must be a JSON object or a boolean"))
            }
            Self::Regex(s) | Self::Lark(s) if s.trim().is_empty() => {
                Err(Error::invalid_setting(format!("constraint.{}", self.kind()), "\"\"", "must not be empty"))
            }
            Self::Regex(_) | Self::Lark(_) => Ok(()),
        }
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 40 { format!("{}...", &s[..s.floor_char_boundary(40)]) } else { s }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn validates_shapes() {
        assert!(Constraint::JsonObject.validate().is_ok());
        assert!(Constraint::JsonSchema(json!(true)).validate().is_ok());
        let e = Constraint::JsonSchema(json!([1, 2])).validate().unwrap_err().to_string();
        assert!(e.contains("constraint.json_schema") && e.contains("[1,2]"), "{e}");
        let e = Constraint::Lark("  ".into()).validate().unwrap_err().to_string();
        assert!(e.contains("constraint.lark") && e.contains("must not be empty"), "{e}");
        assert!(Constraint::Regex("[a-z]+".into()).validate().is_ok());
    }

    #[test]
    fn round_trips_through_serde() {
        for c in [
            Constraint::JsonObject,
            Constraint::JsonSchema(json!({"type": "string"})),
            Constraint::Regex("a|b".into()),
            Constraint::Lark("start: \"x\"".into()),
        ] {
            let text = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Constraint>(&text).unwrap(), c, "{text}");
        }
        assert_eq!(serde_json::to_value(Constraint::JsonObject).unwrap(), json!({"type": "json_object"}));
    }
}
