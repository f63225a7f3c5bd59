// SPDX-License-Identifier: EUPL-1.2
//! Backends and the registry that routes model loads to them by name.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::UnavailableBackend;
use crate::{Error, LoadSettings, Result, TextModel};

/// A way of running models (for example `metal` for native MLX, `mlx_lm` for the Python
/// subprocess).
///
/// Backend crates implement it and expose a `register()` function that adds the backend to the
/// process-wide registry (see the [crate documentation](crate#registering-backends)).
pub trait Backend: Send + Sync {
    /// The registered name: short, lower case, stable (`metal`, `mlx_lm`).
    fn name(&self) -> &str;

    /// Whether the backend can run on this machine (its device, library or interpreter is there).
    fn available(&self) -> bool;

    /// Why [`available`](Self::available) is false, for error messages; consulted only then.
    fn unavailable_reason(&self) -> Option<String> {
        None
    }

    /// Whether the backend can load a model with `settings` (which may choose its device or
    /// interpreter); `Err` says why not. The [`Registry`] asks this before loading with a backend
    /// named in the settings. The default is [`available`](Self::available).
    ///
    /// # Errors
    ///
    /// The reason the backend cannot run with these settings.
    fn check_available(&self, settings: &LoadSettings) -> std::result::Result<(), String> {
        let _ = settings;
        if self.available() { Ok(()) } else { Err(self.unavailable_reason().unwrap_or_else(|| NO_REASON.to_owned())) }
    }

    /// Loads the model at `path` (each backend resolves the path its own way).
    ///
    /// The [`Registry`] validates `settings` before calling this and wraps an error in
    /// [`Error::LoadFailed`]; a backend called directly should validate them too.
    ///
    /// # Errors
    ///
    /// Whatever stops the model from loading.
    fn load_model(&self, path: &Path, settings: &LoadSettings) -> Result<Box<dyn TextModel>>;
}

/// The backend tried first by [`Registry::default_backend`], before the others in name order.
pub const PREFERRED_BACKENDS: &[&str] = &["metal"];

const NO_REASON: &str = "the backend gave no reason";

/// A set of backends by name.
///
/// The process-wide one is reached through the free functions [`register`], [`get`], [`list`],
/// [`default_backend`] and [`load_model`]; separate instances are useful in tests and in
/// programs that want their own routing. All methods take `&self` and are safe to call from any
/// thread; a backend's own methods are never called while the registry's lock is held.
pub struct Registry {
    backends: RwLock<BTreeMap<String, Arc<dyn Backend>>>,
}

impl Registry {
    /// An empty registry.
    pub const fn new() -> Self {
        Self { backends: RwLock::new(BTreeMap::new()) }
    }

    /// This registry with `backend` registered (builder style).
    ///
    /// ```
    /// # use std::{path::Path, sync::Arc};
    /// # use inference_core::{Backend, LoadSettings, Registry, Result, TextModel};
    /// # struct Cpu;
    /// # impl Backend for Cpu {
    /// #     fn name(&self) -> &str { "cpu_ref" }
    /// #     fn available(&self) -> bool { true }
    /// #     fn load_model(&self, _: &Path, _: &LoadSettings) -> Result<Box<dyn TextModel>> {
    /// #         Err(inference_core::Error::unsupported("cpu_ref", "loading"))
    /// #     }
    /// # }
    /// let registry = Registry::new().with(Arc::new(Cpu));
    /// assert_eq!(registry.list(), ["cpu_ref"]);
    /// ```
    #[must_use]
    pub fn with(self, backend: Arc<dyn Backend>) -> Self {
        self.register(backend);
        self
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Arc<dyn Backend>>> {
        // No backend code runs under the lock, so a poisoned lock still holds a consistent map.
        self.backends.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Arc<dyn Backend>>> {
        self.backends.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `backend` under its [`name`](Backend::name), replacing (and returning) any
    /// backend of the same name.
    pub fn register(&self, backend: Arc<dyn Backend>) -> Option<Arc<dyn Backend>> {
        let name = backend.name().to_owned();
        self.write().insert(name, backend)
    }

    /// Removes and returns the backend called `name`.
    pub fn unregister(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.write().remove(name)
    }

    /// The backend called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.read().get(name).cloned()
    }

    /// The registered names, sorted.
    pub fn list(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// The registered backends, sorted by name (a snapshot).
    pub fn backends(&self) -> Vec<Arc<dyn Backend>> {
        self.read().values().cloned().collect()
    }

    /// The backend used when [`LoadSettings::backend`] is unset: the first *available* of
    /// [`PREFERRED_BACKENDS`], else the first available of the rest in name order.
    ///
    /// # Errors
    ///
    /// [`Error::NoBackends`] when nothing is registered; [`Error::NoAvailableBackend`], listing
    /// every backend with its reason, when none is available.
    pub fn default_backend(&self) -> Result<Arc<dyn Backend>> {
        let snapshot: Vec<(String, Arc<dyn Backend>)> =
            self.read().iter().map(|(name, b)| (name.clone(), Arc::clone(b))).collect();
        if snapshot.is_empty() {
            return Err(Error::NoBackends);
        }
        let preferred = PREFERRED_BACKENDS.iter().filter_map(|p| snapshot.iter().find(|(name, _)| name == p));
        let rest = snapshot.iter().filter(|(name, _)| !PREFERRED_BACKENDS.contains(&name.as_str()));
        if let Some((_, backend)) = preferred.chain(rest).find(|(_, b)| b.available()) {
            return Ok(Arc::clone(backend));
        }
        let unavailable = snapshot
            .iter()
            .map(|(name, b)| UnavailableBackend {
                name: name.clone(),
                reason: b.unavailable_reason().unwrap_or_else(|| NO_REASON.to_owned()),
            })
            .collect();
        Err(Error::NoAvailableBackend { unavailable })
    }

    /// The backend called `name` if it is available, or the [default](Self::default_backend)
    /// when `name` is `None`.
    ///
    /// # Errors
    ///
    /// [`Error::BackendNotRegistered`], [`Error::BackendUnavailable`], or the errors of
    /// [`default_backend`](Self::default_backend).
    pub fn select(&self, name: Option<&str>) -> Result<Arc<dyn Backend>> {
        let Some(name) = name else {
            return self.default_backend();
        };
        let backend = self
            .get(name)
            .ok_or_else(|| Error::BackendNotRegistered { name: name.to_owned(), registered: self.list() })?;
        if !backend.available() {
            return Err(Error::BackendUnavailable {
                name: name.to_owned(),
                reason: backend.unavailable_reason().unwrap_or_else(|| NO_REASON.to_owned()),
            });
        }
        Ok(backend)
    }

    /// Loads the model at `path` with the backend that `settings` names (or the default).
    ///
    /// The path goes to the backend untouched.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] from [`LoadSettings::validate`]; the errors of
    /// [`select`](Self::select); [`Error::LoadFailed`] wrapping the backend's error.
    pub fn load_model(&self, path: impl AsRef<Path>, settings: &LoadSettings) -> Result<Box<dyn TextModel>> {
        let path = path.as_ref();
        settings.validate()?;
        let backend = match settings.backend.as_deref() {
            Some(name) => {
                let backend = self
                    .get(name)
                    .ok_or_else(|| Error::BackendNotRegistered { name: name.to_owned(), registered: self.list() })?;
                backend
                    .check_available(settings)
                    .map_err(|reason| Error::BackendUnavailable { name: name.to_owned(), reason })?;
                backend
            }
            None => self.default_backend()?,
        };
        backend.load_model(path, settings).map_err(|source| Error::LoadFailed {
            backend: backend.name().to_owned(),
            path: path.to_owned(),
            source: Box::new(source),
        })
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("backends", &self.list()).finish()
    }
}

static GLOBAL: Registry = Registry::new();

/// The process-wide registry.
pub fn global() -> &'static Registry {
    &GLOBAL
}

/// Registers `backend` in the process-wide registry; see [`Registry::register`].
///
/// Applications normally call a backend crate's own `register()`, which calls this.
pub fn register(backend: Arc<dyn Backend>) -> Option<Arc<dyn Backend>> {
    GLOBAL.register(backend)
}

/// The process-wide backend called `name`; see [`Registry::get`].
pub fn get(name: &str) -> Option<Arc<dyn Backend>> {
    GLOBAL.get(name)
}

/// The process-wide registered names, sorted; see [`Registry::list`].
pub fn list() -> Vec<String> {
    GLOBAL.list()
}

/// The process-wide default backend; see [`Registry::default_backend`].
///
/// # Errors
///
/// [`Error::NoBackends`] or [`Error::NoAvailableBackend`].
pub fn default_backend() -> Result<Arc<dyn Backend>> {
    GLOBAL.default_backend()
}

/// Loads a model through the process-wide registry; see [`Registry::load_model`].
///
/// # Errors
///
/// As [`Registry::load_model`].
pub fn load_model(path: impl AsRef<Path>, settings: &LoadSettings) -> Result<Box<dyn TextModel>> {
    GLOBAL.load_model(path, settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named(&'static str);

    impl Backend for Named {
        fn name(&self) -> &str {
            self.0
        }
        fn available(&self) -> bool {
            true
        }
        fn load_model(&self, _: &Path, _: &LoadSettings) -> Result<Box<dyn TextModel>> {
            Err(Error::unsupported(self.0, "loading"))
        }
    }

    /// Available only when the settings carry `ok = yes`.
    struct Picky;

    impl Backend for Picky {
        fn name(&self) -> &str {
            "picky"
        }
        fn available(&self) -> bool {
            false
        }
        fn check_available(&self, settings: &LoadSettings) -> std::result::Result<(), String> {
            match settings.backend_options.get("ok").map(String::as_str) {
                Some("yes") => Ok(()),
                _ => Err("needs ok = yes".to_owned()),
            }
        }
        fn load_model(&self, _: &Path, _: &LoadSettings) -> Result<Box<dyn TextModel>> {
            Err(Error::unsupported("picky", "loading"))
        }
    }

    #[test]
    fn a_named_backend_is_checked_with_the_load_settings() {
        let registry = Registry::new().with(Arc::new(Picky));
        let e = registry.load_model("/m", &LoadSettings::new().backend("picky")).err().unwrap();
        assert!(matches!(&e, Error::BackendUnavailable { reason, .. } if reason == "needs ok = yes"), "{e}");
        let e = registry.load_model("/m", &LoadSettings::new().backend("picky").backend_option("ok", "yes")).err();
        assert!(matches!(e, Some(Error::LoadFailed { .. })), "{e:?}");
    }

    #[test]
    fn poisoned_lock_does_not_panic() {
        let registry = Arc::new(Registry::new().with(Arc::new(Named("a"))));
        let r = Arc::clone(&registry);
        let joined = std::thread::spawn(move || {
            let _guard = r.backends.write().unwrap();
            panic!("poison the registry lock on purpose");
        })
        .join();
        assert!(joined.is_err());
        assert!(registry.backends.is_poisoned());
        assert_eq!(registry.list(), ["a"]);
        registry.register(Arc::new(Named("b")));
        assert_eq!(registry.list(), ["a", "b"]);
        assert!(registry.get("b").is_some());
        assert_eq!(registry.default_backend().unwrap().name(), "a");
        assert!(registry.unregister("a").is_some());
    }

    #[test]
    fn debug_lists_names() {
        let registry = Registry::new().with(Arc::new(Named("b"))).with(Arc::new(Named("a")));
        assert_eq!(format!("{registry:?}"), r#"Registry { backends: ["a", "b"] }"#);
    }
}
