// SPDX-License-Identifier: EUPL-1.2
//! Log-probabilities in OpenAI's shapes: chat's `logprobs.content` (each token with its text,
//! bytes and most likely alternatives) and the completions endpoint's older columns (`tokens`,
//! `token_logprobs`, `top_logprobs`, `text_offset`). Tokens that carry no log-probability (the
//! request did not ask) give `null`.

use inference_core::Token;
use serde_json::{Map, Value, json};

fn entry(text: &str, logprob: f32) -> Value {
    json!({ "token": text, "logprob": logprob, "bytes": text.as_bytes() })
}

/// `choices[].logprobs` of a chat completion (or of one chunk) for `tokens`.
pub(crate) fn chat(tokens: &[Token]) -> Value {
    let mut content = Vec::with_capacity(tokens.len());
    for t in tokens {
        let (Some(logprob), Some(top)) = (t.logprob, &t.top_logprobs) else { return Value::Null };
        let mut e = entry(&top.text, logprob);
        e["top_logprobs"] = top.top.iter().map(|a| entry(&a.text, a.logprob)).collect();
        content.push(e);
    }
    json!({ "content": content, "refusal": null })
}

/// `choices[].logprobs` of a text completion (or of one chunk) for `tokens`, whose text starts at
/// character `offset` of the completion.
pub(crate) fn text(tokens: &[Token], mut offset: usize) -> Value {
    let (mut texts, mut logprobs, mut tops, mut offsets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for t in tokens {
        let (Some(logprob), Some(top)) = (t.logprob, &t.top_logprobs) else { return Value::Null };
        texts.push(Value::from(top.text.clone()));
        logprobs.push(Value::from(logprob));
        let alternatives: Map<String, Value> =
            top.top.iter().map(|a| (a.text.clone(), Value::from(a.logprob))).collect();
        tops.push(Value::Object(alternatives));
        offsets.push(Value::from(offset));
        offset += t.text.chars().count();
    }
    json!({ "tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets })
}

#[cfg(test)]
mod tests {
    use super::*;
    use inference_core::{TopLogprob, TopLogprobs};

    fn token(id: u32, text: &str, logprob: f32) -> Token {
        let mut t = Token::new(id, text).with_logprob(logprob);
        t.top_logprobs = Some(TopLogprobs {
            text: text.to_owned(),
            top: vec![
                TopLogprob { id, text: text.to_owned(), logprob },
                TopLogprob { id: 9, text: "é".to_owned(), logprob: -2.5 },
            ],
        });
        t
    }

    #[test]
    fn both_shapes_carry_each_token_and_its_alternatives() {
        let tokens = [token(1, "Hi", -0.25), token(2, " there", -0.5)];
        let c = chat(&tokens);
        assert_eq!(c["content"][1]["token"], " there");
        assert_eq!(c["content"][1]["logprob"], -0.5);
        assert_eq!(c["content"][0]["bytes"], json!([72, 105]));
        assert_eq!(c["content"][0]["top_logprobs"][1], json!({"token": "é", "logprob": -2.5, "bytes": [195, 169]}));
        let t = text(&tokens, 3);
        assert_eq!(t["tokens"], json!(["Hi", " there"]));
        assert_eq!(t["token_logprobs"], json!([-0.25, -0.5]));
        assert_eq!(t["top_logprobs"][0], json!({"Hi": -0.25, "é": -2.5}));
        assert_eq!(t["text_offset"], json!([3, 5]));
        assert_eq!(chat(&[Token::new(1, "x")]), Value::Null, "not asked for");
        assert_eq!(text(&[Token::new(1, "x")], 0), Value::Null);
    }
}
