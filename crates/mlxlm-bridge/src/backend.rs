// SPDX-License-Identifier: EUPL-1.2
//! [`MlxLmBackend`]: the `"mlx_lm"` backend, its options and model loading.

use std::path::{Path, PathBuf};
use std::time::Duration;

use inference_core::{Backend, Error, LoadSettings, ModelInfo, Result, TextModel};

use crate::BACKEND_NAME;
use crate::model::BridgeModel;
use crate::process::{Control, Process, Script, Spawn};
use crate::protocol::{Command, Event};
use crate::python::{interpreter, probe, resolve_python};

/// Backend option: the Python interpreter (an executable, a virtualenv directory or a command).
pub const OPTION_PYTHON: &str = "python";

/// Backend option: seconds allowed for start-up, load and info, and for a cancelled request to
/// end, before the process is killed (a positive number; default [`DEFAULT_TIMEOUT`]).
pub const OPTION_TIMEOUT: &str = "timeout_secs";

/// Backend option, for tests: a script to run instead of the shipped bridge (the crate's tests
/// use a mock bridge that speaks the protocol without mlx-lm).
pub const OPTION_BRIDGE_SCRIPT: &str = "bridge_script";

/// The backend options this backend reads; any other key is rejected.
pub const OPTIONS: &[&str] = &[OPTION_PYTHON, OPTION_TIMEOUT, OPTION_BRIDGE_SCRIPT];

/// The default of [`OPTION_TIMEOUT`]: five minutes, for a large model loading from a slow disk.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The `"mlx_lm"` backend: each loaded model runs in its own Python process.
///
/// The interpreter is, in order: the load settings' `python` option, the one given to
/// [`with_python`](Self::with_python), the environment variable [`PYTHON_ENV`](crate::PYTHON_ENV),
/// `python3`. [`available`](Backend::available) checks the interpreter chosen without load
/// settings, since the registry asks before it sees them: to use a virtualenv through the
/// registry, set the environment variable or register a backend built with `with_python`.
#[derive(Debug, Clone, Default)]
pub struct MlxLmBackend {
    python: Option<PathBuf>,
}

/// The options of one load, parsed and checked.
#[derive(Debug, Clone)]
struct Options {
    python: PathBuf,
    timeout: Duration,
    script: Script,
}

impl MlxLmBackend {
    /// The backend with the interpreter from the environment (see the type's documentation).
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend with `python` as its interpreter: an executable, a virtualenv directory, or
    /// a command name.
    pub fn with_python(python: impl AsRef<str>) -> Self {
        Self { python: Some(interpreter(python.as_ref())) }
    }

    /// The interpreter used when the load settings name none.
    pub fn python(&self) -> PathBuf {
        self.python.clone().unwrap_or_else(|| resolve_python(None))
    }

    fn options(&self, settings: &LoadSettings) -> Result<Options> {
        let mut options = Options { python: self.python(), timeout: DEFAULT_TIMEOUT, script: Script::Shipped };
        for (key, value) in &settings.backend_options {
            let name = format!("backend_options.{key}");
            match key.as_str() {
                OPTION_PYTHON => {
                    if value.trim().is_empty() {
                        return Err(Error::invalid_setting(name, "\"\"", "must name a Python interpreter"));
                    }
                    options.python = resolve_python(Some(value));
                }
                OPTION_TIMEOUT => {
                    let secs = value.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s > 0.0);
                    options.timeout = secs
                        .and_then(|s| Duration::try_from_secs_f64(s).ok())
                        .ok_or_else(|| Error::invalid_setting(&name, value, "must be a number of seconds > 0"))?;
                }
                OPTION_BRIDGE_SCRIPT => {
                    let path = PathBuf::from(value);
                    if !path.is_file() {
                        return Err(Error::invalid_setting(name, value, "must be an existing script file"));
                    }
                    options.script = Script::File(path);
                }
                _ => {
                    return Err(Error::invalid_setting(
                        name,
                        value,
                        format!("is not an option of the {BACKEND_NAME} backend (known: {})", OPTIONS.join(", ")),
                    ));
                }
            }
        }
        Ok(options)
    }

    /// Loads the model at `path` in a new bridge process: the concrete type, with
    /// [`BridgeModel::pid`] and [`BridgeModel::stderr_tail`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for invalid settings or an unknown backend option; an error
    /// naming the interpreter when it cannot be started; the bridge's error (with the Python
    /// traceback as its source) when mlx-lm cannot load the model; an error with the exit status
    /// and stderr when the process dies, and after the timeout when it hangs (it is then killed).
    pub fn load(&self, path: &Path, settings: &LoadSettings) -> Result<BridgeModel> {
        settings.validate()?;
        let options = self.options(settings)?;
        let path_text = path.to_str().ok_or_else(|| Error::invalid_model(path, "the path is not valid UTF-8"))?;
        let adapter_path = match &settings.adapter_path {
            Some(adapter) => Some(
                adapter
                    .to_str()
                    .ok_or_else(|| Error::invalid_setting("adapter_path", adapter.display(), "must be valid UTF-8"))?
                    .to_owned(),
            ),
            None => None,
        };
        let spawn = Spawn { python: options.python, script: options.script, timeout: options.timeout };
        let mut process = Process::start(&spawn)?;
        let load = Command::Load {
            path: path_text.to_owned(),
            adapter_path,
            context_length: settings.context_length,
            device: settings.device.as_str(),
            // `auto` keeps mlx-lm's own types (the reference chooses nothing).
            dtype: (!settings.dtype.is_auto()).then(|| settings.dtype.as_str()),
        };
        let model_type = match process.exchange(&load, Control::timeout(options.timeout))? {
            Event::Loaded { model_type, .. } => model_type,
            other => return Err(Error::backend(BACKEND_NAME, format!("unexpected {} reply to load", other.name()))),
        };
        let (mut info, tools_native): (ModelInfo, bool) = match process
            .exchange(&Command::Info, Control::timeout(options.timeout))?
        {
            Event::Info { info, .. } => {
                let native = info.chat_template.as_deref().is_some_and(inference_core::tools::template_supports_tools);
                ((*info).into(), native)
            }
            other => return Err(Error::backend(BACKEND_NAME, format!("unexpected {} reply to info", other.name()))),
        };
        if !settings.dtype.is_auto() && info.compute_dtype.is_some() {
            info.compute_dtype_reason =
                Some(format!("dtype = {} was asked for (mlx-lm's model.set_dtype)", settings.dtype));
        }
        Ok(BridgeModel::new(process, model_type, info, tools_native))
    }
}

impl Backend for MlxLmBackend {
    fn name(&self) -> &str {
        BACKEND_NAME
    }

    /// Whether the interpreter (chosen without load settings) can import mlx-lm; checked once
    /// per interpreter per process, with a time limit.
    fn available(&self) -> bool {
        probe(&self.python()).is_ok()
    }

    fn unavailable_reason(&self) -> Option<String> {
        probe(&self.python()).err()
    }

    /// Probes the interpreter the settings choose (their `python` option), not only the default.
    fn check_available(&self, settings: &LoadSettings) -> std::result::Result<(), String> {
        let options = self.options(settings).map_err(|e| e.to_string())?;
        probe(&options.python)
    }

    fn load_model(&self, path: &Path, settings: &LoadSettings) -> Result<Box<dyn TextModel>> {
        Ok(Box::new(self.load(path, settings)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        let backend = MlxLmBackend::with_python("/opt/py/bin/python");
        let o = backend.options(&LoadSettings::new()).unwrap();
        assert_eq!(o.python, Path::new("/opt/py/bin/python"));
        assert_eq!(o.timeout, DEFAULT_TIMEOUT);
        let o = backend
            .options(&LoadSettings::new().backend_option("python", "/x/python").backend_option("timeout_secs", "2.5"))
            .unwrap();
        assert_eq!((o.python.as_path(), o.timeout), (Path::new("/x/python"), Duration::from_millis(2500)));
        for (key, value, message) in [
            ("timeout_secs", "0", "invalid setting backend_options.timeout_secs = 0: must be a number of seconds > 0"),
            (
                "timeout_secs",
                "inf",
                "invalid setting backend_options.timeout_secs = inf: must be a number of seconds > 0",
            ),
            ("python", " ", "invalid setting backend_options.python = \"\": must name a Python interpreter"),
            (
                "bridge_script",
                "/nonexistent.py",
                "invalid setting backend_options.bridge_script = /nonexistent.py: must be an existing script file",
            ),
            (
                "pyhton",
                "x",
                "invalid setting backend_options.pyhton = x: is not an option of the mlx_lm backend (known: python, \
                 timeout_secs, bridge_script)",
            ),
        ] {
            let err = backend.options(&LoadSettings::new().backend_option(key, value)).unwrap_err();
            assert_eq!(err.to_string(), message);
        }
    }
}
