// SPDX-License-Identifier: EUPL-1.2
//! Where the memory of a generation goes: MLX's active and peak memory after
//! each stage of a prefill and a few decode steps, as JSON lines.
//!
//! ```sh
//! cargo run --release -p mlx-metal --example memprobe -- DIR [PROMPT_TOKENS...]
//! ```
//!
//! `xtask/bench/memprobe.py` does the same stages with mlx-lm, so the two
//! outputs compare line by line (docs/benchmarks.md). Prompt ids are
//! `i * 7919 % vocab`.

use std::path::PathBuf;

use mlx::array::Array;
use mlx::{memory, ops};
use mlx_metal::model;

type BoxError = Box<dyn std::error::Error>;

fn report(stage: &str, n: usize) -> Result<(), BoxError> {
    let s = memory::stats()?;
    println!(r#"{{"engine": "ours", "prompt": {n}, "stage": "{stage}", "active": {}, "peak": {}}}"#, s.active, s.peak);
    Ok(())
}

fn run() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: memprobe DIR [PROMPT_TOKENS...]")?);
    let lengths: Vec<usize> = args.map(|a| a.parse()).collect::<Result<_, _>>()?;
    let lengths = if lengths.is_empty() { vec![128, 2048] } else { lengths };
    let loaded = model::load(&dir)?;
    let m = loaded.model.as_ref();
    let vocab = m.description().vocab_size;
    // Load and one token, like mlx-lm's load (which evaluates the weights).
    let mut caches = m.make_cache()?;
    m.forward(&Array::from_slice(&[0i32], &[1, 1])?, &mut caches)?.eval()?;
    drop(caches);
    memory::clear_cache()?;
    report("weights", 0)?;
    for n in lengths {
        let ids: Vec<i32> = (0..n).map(|i| (i * 7919 % vocab) as i32).collect();
        memory::clear_cache()?;
        memory::reset_peak_memory()?;
        let mut caches = m.make_cache()?;
        let prompt = Array::from_slice(&ids, &[1, n as i32])?;
        if n > 1 {
            let chunk = ops::slice_axis(&prompt, 1, 0, n as i32 - 1)?;
            mlx_metal::generate::prefill_chunk(m, &chunk, &mut caches)?;
            report("prefill", n)?;
            memory::clear_cache()?;
        }
        let last = ops::slice_axis(&prompt, 1, n as i32 - 1, n as i32)?;
        let logits = m.forward(&last, &mut caches)?;
        let mut y = ops::argmax(&logits, -1, false)?;
        y.eval()?;
        report("first_token", n)?;
        for _ in 0..8 {
            let logits = m.forward(&ops::reshape(&y, &[1, 1])?, &mut caches)?;
            y = ops::argmax(&logits, -1, false)?;
            y.eval()?;
        }
        report("decode_8", n)?;
    }
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("memprobe: {e}");
        std::process::exit(1);
    }
}
