// SPDX-License-Identifier: EUPL-1.2
//! What constrained decoding costs per token: builds a model's constraint
//! compiler, compiles a JSON Schema, then walks a valid answer token by token,
//! timing each mask (llguidance's mask and the `[1, V]` array the sampler adds).
//!
//!     cargo run --release -p mlx-metal --example constraint_cost -- MODEL_DIR [ROUNDS]
//!
//! Prints the trie build and compile times and the mask time per token
//! (median, 90th percentile, max) over every token of every round.

use std::time::Instant;

use inference_core::Constraint;
use mlx::Dtype;
use mlx_metal::constrain::Grammars;
use mlx_metal::tokenizer::Tokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or("usage: constraint_cost MODEL_DIR [ROUNDS]")?;
    let rounds: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(20);
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let vocab = tokenizer.vocab_size();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"}, "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                        "required": ["city", "zip"]}
        },
        "required": ["name", "age", "tags", "address"], "additionalProperties": false
    });
    let answer = r#"{"name": "Ada Lovelace", "age": 36, "tags": ["mathematics", "engines", "poetry"], "address": {"city": "London", "zip": "W1"}}"#;
    let ids = tokenizer.encode(answer, false)?;
    let grammars = Grammars::new(tokenizer);
    let constraint = Constraint::JsonSchema(schema);
    let started = Instant::now();
    drop(grammars.compile(&constraint)?);
    let first = started.elapsed();
    let started = Instant::now();
    drop(grammars.compile(&constraint)?);
    let compile = started.elapsed();
    let mut times = Vec::with_capacity(rounds * ids.len());
    for _ in 0..rounds {
        let mut row = grammars.compile(&constraint)?;
        for &id in &ids {
            let t = Instant::now();
            let mask = row.mask(vocab, Dtype::Float32)?;
            mlx::transforms::eval(&[&mask])?;
            times.push(t.elapsed().as_secs_f64() * 1e6);
            row.commit(id);
        }
        if let Some(e) = row.error() {
            return Err(format!("the answer did not match: {e}").into());
        }
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    println!("model {dir}: vocabulary {vocab}, answer {} tokens, {rounds} rounds", ids.len());
    println!(
        "trie build + first compile {:.1} ms; compile {:.2} ms",
        first.as_secs_f64() * 1e3,
        compile.as_secs_f64() * 1e3
    );
    println!("mask per token: median {:.0} us, p90 {:.0} us, max {:.0} us", at(0.5), at(0.9), at(1.0));
    Ok(())
}
