// SPDX-License-Identifier: EUPL-1.2
//! JSON as mlx-lm writes it, and the config.json it writes.
//!
//! mlx-lm saves `config.json` and `model.safetensors.index.json` with
//! Python's `json.dump(obj, f, indent=4)`: four spaces of indentation,
//! `", "`/`": "` separators that the indentation turns into line ends,
//! non-ASCII characters escaped (`ensure_ascii`), and floats as Python's
//! `repr` prints them (`1e-05`, `10000.0`, `1e+16`). [`dump`] writes a
//! [`Value`] the same way, so the files are byte for byte what mlx-lm
//! writes (maps keep their order: the workspace's `serde_json` preserves it).
//!
//! [`output_config`] turns the checkpoint's config.json into the one mlx-lm
//! saves: `eos_token_id` from `generation_config.json`, Gemma 3's
//! `text_config` filled in as its `ModelArgs` does, the quantisation block
//! under both of its names, `_name_or_path` and `vision_config` dropped, and
//! the top-level keys sorted.

use serde_json::{Map, Value};

use crate::pyrepr;

/// `value` as Python's `json.dump(value, f, indent=4)` writes it (no
/// trailing line end).
pub(crate) fn dump(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth {
        out.push_str("    ");
    }
}

fn write_value(out: &mut String, value: &Value, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (None, Some(u), _) => out.push_str(&u.to_string()),
            (None, None, Some(f)) => out.push_str(&pyrepr::float(f)),
            _ => out.push_str(&n.to_string()),
        },
        Value::String(s) => pyrepr::json_string(out, s, true),
        Value::Array(items) if items.is_empty() => out.push_str("[]"),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                indent(out, depth + 1);
                write_value(out, item, depth + 1);
            }
            out.push('\n');
            indent(out, depth);
            out.push(']');
        }
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                out.push_str(if i == 0 { "\n" } else { ",\n" });
                indent(out, depth + 1);
                pyrepr::json_string(out, k, true);
                out.push_str(": ");
                write_value(out, v, depth + 1);
            }
            out.push('\n');
            indent(out, depth);
            out.push('}');
        }
    }
}

/// Python's truth value of a JSON value (`if x:`).
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// What mlx-lm's `load_config` and the model's `ModelArgs` make of
/// config.json before anything is saved: `eos_token_id` replaced by
/// `generation_config.json`'s when that is set, and for the `gemma3` wrapper
/// its `text_config` given the top level's `vocab_size` (default 262208) and
/// heads (defaults 8 and 4 key/value) when it names none.
pub(crate) fn loaded_config(mut config: Map<String, Value>, generation: Option<&Value>) -> Map<String, Value> {
    if let Some(eos) = generation.and_then(|g| g.get("eos_token_id")).filter(|e| truthy(e)) {
        config.insert("eos_token_id".to_owned(), eos.clone());
    }
    if config.get("model_type").and_then(Value::as_str) == Some("gemma3") {
        let vocab = config.get("vocab_size").cloned().unwrap_or(Value::from(262_208));
        if let Some(Value::Object(text)) = config.get_mut("text_config") {
            text.insert("vocab_size".to_owned(), vocab);
            for (key, default) in [("num_attention_heads", 8), ("num_key_value_heads", 4)] {
                let v = text.get(key).cloned().unwrap_or(Value::from(default));
                text.insert(key.to_owned(), v);
            }
        }
    }
    config
}

/// The config.json mlx-lm saves (`save_config`): `quantization` set (and
/// copied to `quantization_config`) when given, `_name_or_path` and
/// `vision_config` dropped, the top-level keys sorted.
pub(crate) fn output_config(mut config: Map<String, Value>, quantization: Option<Value>) -> Value {
    if let Some(q) = quantization {
        config.insert("quantization".to_owned(), q.clone());
        config.insert("quantization_config".to_owned(), q);
    }
    config.remove("_name_or_path");
    config.remove("vision_config");
    let mut entries: Vec<(String, Value)> = config.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Object(entries.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_are_laid_out_as_json_dump_with_indent_4() {
        let v = json!({"a": [1, 2.0, {"b": null}], "c": {}, "d": [], "e": "x\u{e9}\u{1f600}\"\\\n\u{7f}", "f": true});
        let want = "{\n    \"a\": [\n        1,\n        2.0,\n        {\n            \"b\": null\n        }\n    ],\n    \
                    \"c\": {},\n    \"d\": [],\n    \"e\": \"x\\u00e9\\ud83d\\ude00\\\"\\\\\\n\\u007f\",\n    \
                    \"f\": true\n}";
        assert_eq!(dump(&v), want);
    }

    #[test]
    fn the_saved_config_is_sorted_and_carries_the_quantisation_twice() {
        let config = json!({"z": 1, "_name_or_path": "x", "vision_config": {}, "eos_token_id": 1, "a": 2});
        let Value::Object(config) = config else { unreachable!() };
        let generation = json!({"eos_token_id": [1, 5]});
        let loaded = loaded_config(config, Some(&generation));
        let out = output_config(loaded, Some(json!({"group_size": 64, "bits": 4, "mode": "affine"})));
        let keys: Vec<&String> = out.as_object().map(|o| o.keys().collect()).unwrap_or_default();
        assert_eq!(keys, ["a", "eos_token_id", "quantization", "quantization_config", "z"]);
        assert_eq!(out["eos_token_id"], json!([1, 5]));
        assert_eq!(out["quantization"], out["quantization_config"]);
    }

    #[test]
    fn a_falsy_generation_eos_is_ignored_and_gemma3_text_config_is_filled_in() {
        let Value::Object(config) =
            json!({"model_type": "gemma3", "eos_token_id": 1, "text_config": {"hidden_size": 8, "vocab_size": 3}})
        else {
            unreachable!()
        };
        let loaded = loaded_config(config, Some(&json!({"eos_token_id": []})));
        assert_eq!(loaded["eos_token_id"], json!(1));
        let text = &loaded["text_config"];
        assert_eq!(text["vocab_size"], json!(262_208));
        assert_eq!((&text["num_attention_heads"], &text["num_key_value_heads"]), (&json!(8), &json!(4)));
        let keys: Vec<&String> = text.as_object().map(|o| o.keys().collect()).unwrap_or_default();
        assert_eq!(keys, ["hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads"]);
    }
}
