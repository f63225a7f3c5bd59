// SPDX-License-Identifier: EUPL-1.2
//! What `cargo xtask bench` and `cargo xtask bench-serve` share: the options they take
//! themselves (`--model`, `--python`, `--no-build`) and the checking of the driver options they
//! pass on to their Python drivers.

use std::path::{Path, PathBuf};

use crate::bench::absolute;

/// What a driver option's value must be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    /// A whole number >= 1.
    Count,
    /// A whole number >= 0.
    Count0,
    /// A whole number >= this.
    AtLeast(u64),
    /// Comma-separated whole numbers >= 1, of what is named.
    List(&'static str),
    /// A number > 0, in the unit named.
    Positive(&'static str),
    /// Passed on as it is.
    Text,
    /// A path (made absolute, since the driver runs in the workspace root).
    Path,
}

/// A command's driver options.
pub(crate) struct Spec {
    /// The command's name, for error messages.
    pub(crate) tool: &'static str,
    /// Options that take a value, and what the value must be.
    pub(crate) valued: &'static [(&'static str, Kind)],
    /// Flags without a value, passed on.
    pub(crate) flags: &'static [&'static str],
}

/// What every driver command takes.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Common {
    pub(crate) model: Option<PathBuf>,
    pub(crate) python: Option<String>,
    pub(crate) build: bool,
    /// Options passed on to the driver unchanged (already checked).
    pub(crate) driver: Vec<String>,
}

/// Parses `args` by `spec`; `own(flag)` takes the command's own flags (and says whether it did).
pub(crate) fn parse(spec: &Spec, args: &[String], mut own: impl FnMut(&str) -> bool) -> Result<Common, String> {
    let tool = spec.tool;
    let mut o = Common { build: true, ..Common::default() };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next().cloned()).ok_or(format!("{tool}: {name} needs a value"));
        match name {
            "--model" => o.model = Some(absolute(Path::new(&value()?))),
            "--python" => o.python = Some(value()?),
            "--no-build" => o.build = false,
            f if spec.flags.contains(&f) => o.driver.push(f.to_string()),
            f if own(f) => {}
            _ => match spec.valued.iter().find(|(n, _)| *n == name) {
                Some(&(n, kind)) => {
                    let v = check_value(tool, n, kind, &value()?)?;
                    o.driver.extend([n.to_string(), v]);
                }
                None => return Err(format!("{tool}: unknown option `{a}`")),
            },
        }
    }
    if o.model.is_none() {
        return Err(format!("{tool}: --model DIR is required"));
    }
    Ok(o)
}

fn check_value(tool: &str, name: &str, kind: Kind, v: &str) -> Result<String, String> {
    let bad = |what: &str| format!("{tool}: {name} {v:?}: {what}");
    let whole = |min: u64| -> Result<String, String> {
        let n: u64 = v.trim().parse().map_err(|_| bad("not a whole number"))?;
        if n < min {
            return Err(bad(&format!("must be at least {min}")));
        }
        Ok(n.to_string())
    };
    match kind {
        Kind::Count => whole(1),
        Kind::Count0 => whole(0),
        Kind::AtLeast(min) => whole(min),
        Kind::List(what) => {
            let items: Vec<u64> = v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| s.trim().parse::<u64>().ok().filter(|&n| n > 0))
                .collect::<Option<_>>()
                .ok_or_else(|| bad(&format!("not a comma-separated list of {what} >= 1")))?;
            if items.is_empty() {
                return Err(bad(&format!("no {what}")));
            }
            Ok(items.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
        }
        Kind::Positive(unit) => match v.parse::<f64>() {
            Ok(x) if x.is_finite() && x > 0.0 => Ok(v.to_string()),
            _ => Err(bad(&format!("must be a number above 0 ({unit})"))),
        },
        Kind::Text => Ok(v.to_string()),
        Kind::Path => Ok(absolute(Path::new(v)).display().to_string()),
    }
}

/// The model directory the options name, which must hold a config.json (`hint` says where to get one).
pub(crate) fn model_dir(spec: &Spec, model: Option<&Path>, hint: &str) -> Result<PathBuf, String> {
    let model = model.map(Path::to_path_buf).unwrap_or_default();
    if !model.join("config.json").is_file() {
        return Err(format!("{}: {} has no config.json ({hint})", spec.tool, model.display()));
    }
    Ok(model)
}
