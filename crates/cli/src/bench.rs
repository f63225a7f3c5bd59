// SPDX-License-Identifier: EUPL-1.2
//! `mlxr bench`: prefill and decode speed of the engine on a model, as `cargo xtask bench`'s
//! measuring side does it ([`mlx_metal::bench`]); `cargo xtask bench` adds mlx-lm alongside.

use mlx_metal::bench::{self, BenchOptions};

use crate::args::BenchArgs;
use crate::failure::{self, Failure};

pub(crate) fn run(args: &BenchArgs) -> Result<(), Failure> {
    let options = options(args);
    options.validate().map_err(|e| Failure::new(format!("bench: {e}")))?;
    let doc = bench::run(&options, &mut |line| eprintln!("{line}")).map_err(|e| Failure::new(format!("bench: {e}")))?;
    let text = serde_json::to_string_pretty(&doc).map_err(|e| Failure::new(format!("bench: {e}")))?;
    match &args.json {
        Some(path) => crate::output::write_file(path, (text + "\n").as_bytes())?,
        None => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}").map_err(|e| failure::io("writing to standard output", e))?;
        }
    }
    Ok(())
}

fn options(args: &BenchArgs) -> BenchOptions {
    BenchOptions {
        model: args.model.clone(),
        prompts: args.prompts.clone(),
        decode: args.decode,
        runs: args.runs,
        warmup: args.warmup,
        seed: args.seed,
        public: !args.no_public,
        dtype: args.dtype,
        quantised: mlx_metal::model::dtype::QuantisedPolicy::parse(&args.quantised).unwrap_or_default(),
        ..BenchOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_become_options() {
        let cli = crate::args::Cli::try_parse_from([
            "mlxr",
            "bench",
            "-m",
            "/m",
            "--prompts",
            "16,32",
            "--decode",
            "4",
            "--runs",
            "2",
            "--no-public",
        ])
        .unwrap();
        let crate::args::Command::Bench(b) = cli.command else { panic!("not bench") };
        let o = options(&b);
        assert_eq!((o.prompts.as_slice(), o.decode, o.runs, o.public), (&[16, 32][..], 4, 2, false));
        assert!(o.validate().is_ok());
        let o = BenchOptions { decode: 1, ..o };
        assert!(o.validate().is_err());
    }
}
