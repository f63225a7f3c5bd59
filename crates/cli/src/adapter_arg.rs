// SPDX-License-Identifier: EUPL-1.2
//! `--adapter [NAME=]DIR`: a LoRA adapter applied to the model at load (`DIR`), or, for
//! `mlxr serve` only, an adapter served as model `NAME` beside the base (`NAME=DIR`, repeatable).

use std::path::PathBuf;

use crate::failure::Failure;

/// One `--adapter` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AdapterArg {
    /// The model id it is served as (`NAME=DIR`); `None` for an adapter applied at load.
    pub(crate) name: Option<String>,
    pub(crate) dir: PathBuf,
}

/// `NAME=DIR` when the part before the first `=` has no path separator (write `./a=b` for a
/// directory named `a=b`), else a directory.
pub(crate) fn parse(value: &str) -> Result<AdapterArg, String> {
    match value.split_once('=') {
        Some((name, dir)) if !name.contains(['/', '\\']) => {
            if dir.is_empty() {
                return Err(format!("{value:?}: NAME=DIR needs a directory after '='"));
            }
            Ok(AdapterArg { name: Some(name.to_owned()), dir: PathBuf::from(dir) })
        }
        _ => Ok(AdapterArg { name: None, dir: PathBuf::from(value) }),
    }
}

/// The adapter to apply at load: at most one `--adapter DIR`; `NAME=DIR` is refused unless
/// `serving` (the server takes those itself).
pub(crate) fn at_load(adapters: &[AdapterArg], serving: bool) -> Result<Option<PathBuf>, Failure> {
    if !serving && let Some(named) = adapters.iter().find(|a| a.name.is_some()) {
        return Err(Failure::new(format!(
            "--adapter {}={}: serving an adapter under a name is for `mlxr serve`; give the directory alone",
            named.name.as_deref().unwrap_or_default(),
            named.dir.display()
        )));
    }
    let mut plain = adapters.iter().filter(|a| a.name.is_none());
    let first = plain.next().map(|a| a.dir.clone());
    if plain.next().is_some() {
        return Err(Failure::new("--adapter DIR: only one adapter can be applied to the model at load"));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_directories_are_told_apart() {
        assert_eq!(parse("fr=/a/b").unwrap(), AdapterArg { name: Some("fr".into()), dir: "/a/b".into() });
        assert_eq!(parse("/a/b=c").unwrap(), AdapterArg { name: None, dir: "/a/b=c".into() });
        assert_eq!(parse("adapters").unwrap(), AdapterArg { name: None, dir: "adapters".into() });
        assert_eq!(parse("=x").unwrap().name.as_deref(), Some(""));
        assert!(parse("fr=").is_err());
        let named = [parse("fr=/a").unwrap()];
        assert!(at_load(&named, false).is_err());
        assert_eq!(at_load(&named, true).unwrap(), None);
        assert!(at_load(&[parse("/a").unwrap(), parse("/b").unwrap()], true).is_err());
    }
}
