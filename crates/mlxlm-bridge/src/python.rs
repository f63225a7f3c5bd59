// SPDX-License-Identifier: EUPL-1.2
//! Choosing the Python interpreter and checking that it can import mlx-lm.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// The environment variable that names the interpreter when the load settings do not.
pub const PYTHON_ENV: &str = "MLXR_PYTHON";

/// The interpreter used when neither the load settings nor [`PYTHON_ENV`] name one.
pub const DEFAULT_PYTHON: &str = "python3";

/// How long [`probe`] lets `python -c "import mlx_lm"` run before it gives up. The import pulls
/// in transformers and takes a few seconds on an idle machine, many more on a loaded one.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Environment for every interpreter this crate starts: no downloads from model hubs (a model is
/// a local directory), unbuffered UTF-8 output, no tokenizer thread-pool warnings.
pub(crate) const CHILD_ENV: &[(&str, &str)] = &[
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("PYTHONUNBUFFERED", "1"),
    ("PYTHONIOENCODING", "utf-8"),
    ("TOKENIZERS_PARALLELISM", "false"),
];

/// The interpreter for `value`: a path to a Python executable, a virtualenv directory (its
/// `bin/python`, or `Scripts/python.exe` on Windows), or a command name looked up in `PATH`.
///
/// ```
/// # use std::path::Path;
/// let venv = tempfile::tempdir()?;
/// assert_eq!(mlxlm_bridge::interpreter(venv.path().to_str().unwrap()), venv.path().join("bin/python"));
/// assert_eq!(mlxlm_bridge::interpreter("python3.12"), Path::new("python3.12"));
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn interpreter(value: &str) -> PathBuf {
    let path = PathBuf::from(value);
    if path.is_dir() {
        for candidate in ["bin/python", "bin/python3", "Scripts/python.exe"] {
            let exe = path.join(candidate);
            if exe.is_file() {
                return exe;
            }
        }
        return path.join("bin/python");
    }
    path
}

/// The interpreter chosen by `option` (the `python` backend option), else by [`PYTHON_ENV`],
/// else [`DEFAULT_PYTHON`]; each in the forms [`interpreter`] accepts. Empty values are skipped.
pub fn resolve_python(option: Option<&str>) -> PathBuf {
    if let Some(value) = option.filter(|v| !v.trim().is_empty()) {
        return interpreter(value.trim());
    }
    match std::env::var(PYTHON_ENV) {
        Ok(value) if !value.trim().is_empty() => interpreter(value.trim()),
        _ => PathBuf::from(DEFAULT_PYTHON),
    }
}

type ProbeCache = BTreeMap<PathBuf, Result<(), String>>;
static PROBES: Mutex<ProbeCache> = Mutex::new(BTreeMap::new());

/// Whether `python` can import mlx-lm, checked by running `python -c "import mlx_lm"` for at most
/// [`PROBE_TIMEOUT`]. The answer is cached per interpreter for the life of the process, except a
/// timeout (a busy machine), which is tried again next time.
///
/// # Errors
///
/// Why not, naming the interpreter: it could not be started, it timed out (it is then killed),
/// or the import failed (with the last line of its error output).
pub fn probe(python: &Path) -> Result<(), String> {
    if let Some(known) = PROBES.lock().unwrap_or_else(PoisonError::into_inner).get(python) {
        return known.clone();
    }
    let answer = probe_uncached(python, PROBE_TIMEOUT);
    if !matches!(&answer, Err(Probe::TimedOut(_))) {
        PROBES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(python.to_owned(), answer.clone().map_err(String::from));
    }
    answer.map_err(String::from)
}

/// Why a probe failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The interpreter did not finish in time.
    TimedOut(String),
    /// A definite answer: it cannot be run, or cannot import mlx-lm.
    Failed(String),
}

impl From<Probe> for String {
    fn from(p: Probe) -> String {
        match p {
            Probe::TimedOut(s) | Probe::Failed(s) => s,
        }
    }
}

pub(crate) fn probe_uncached(python: &Path, timeout: Duration) -> Result<(), Probe> {
    let shown = python.display();
    let mut child = Command::new(python)
        .args(["-c", "import mlx_lm"])
        .envs(CHILD_ENV.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| Probe::Failed(format!("cannot run the Python interpreter {shown}: {err}")))?;
    let (tx, rx) = mpsc::channel();
    if let Some(mut stderr) = child.stderr.take() {
        thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.by_ref().take(64 * 1024).read_to_end(&mut text);
            let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
        });
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Probe::TimedOut(format!(
                    "{shown} -c \"import mlx_lm\" did not finish within {} s (killed)",
                    timeout.as_secs_f64()
                )));
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(err) => {
                let _ = child.kill();
                return Err(Probe::Failed(format!("cannot wait for the Python interpreter {shown}: {err}")));
            }
        }
    };
    if status.success() {
        return Ok(());
    }
    let stderr = rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no error output").trim();
    Err(Probe::Failed(format!("the Python interpreter {shown} cannot import mlx_lm ({status}): {last}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtualenv_directory_means_its_python() {
        let venv = tempfile::tempdir().unwrap();
        std::fs::create_dir(venv.path().join("bin")).unwrap();
        std::fs::write(venv.path().join("bin/python3"), "").unwrap();
        assert_eq!(interpreter(venv.path().to_str().unwrap()), venv.path().join("bin/python3"));
        std::fs::write(venv.path().join("bin/python"), "").unwrap();
        assert_eq!(interpreter(venv.path().to_str().unwrap()), venv.path().join("bin/python"));
        assert_eq!(interpreter("/usr/bin/python3"), Path::new("/usr/bin/python3"));
        assert_eq!(resolve_python(Some("  /x/python ")), Path::new("/x/python"));
    }

    #[test]
    fn missing_interpreter_is_reported_and_cached() {
        let bogus = Path::new("/nonexistent/mlxlm-bridge/python");
        let err = probe(bogus).unwrap_err();
        assert!(err.starts_with("cannot run the Python interpreter /nonexistent/mlxlm-bridge/python"), "{err}");
        assert_eq!(probe(bogus).unwrap_err(), err);
    }

    #[cfg(unix)]
    #[test]
    fn failing_and_hanging_interpreters_are_reported() {
        // `sh` stands in for an interpreter: `sh -c "import mlx_lm"` fails like a missing module.
        let Err(Probe::Failed(err)) = probe_uncached(Path::new("sh"), Duration::from_secs(30)) else {
            panic!("sh imported mlx_lm")
        };
        assert!(err.starts_with("the Python interpreter sh cannot import mlx_lm (exit status: "), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let hang = dir.path().join("hang");
        std::fs::write(&hang, "#!/bin/sh\nexec sleep 600\n").unwrap();
        make_executable(&hang);
        let Err(Probe::TimedOut(err)) = probe_uncached(&hang, Duration::from_millis(200)) else {
            panic!("the hanging interpreter did not time out")
        };
        assert!(err.ends_with("-c \"import mlx_lm\" did not finish within 0.2 s (killed)"), "{err}");
    }

    #[cfg(unix)]
    fn make_executable(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}
