// SPDX-License-Identifier: EUPL-1.2
//! Every registry rule and error message, on private `Registry` instances.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::TestBackend;
use inference_core::{Backend, Device, Error, LoadSettings, Registry, UnavailableBackend};

/// A registry of available test backends with these names, registered in this order.
fn available(names: &[&'static str]) -> Registry {
    names.iter().fold(Registry::new(), |r, name| r.with(Arc::new(TestBackend::available(name))))
}

fn names(backends: &[Arc<dyn Backend>]) -> Vec<&str> {
    backends.iter().map(|b| b.name()).collect()
}

// ---- register, get, list ----

#[test]
fn empty_registry_lists_nothing() {
    let r = Registry::new();
    assert!(r.list().is_empty());
    assert!(r.backends().is_empty());
    assert!(r.get("metal").is_none());
    assert!(Registry::default().list().is_empty());
}

#[test]
fn register_then_get_returns_the_same_backend() {
    let r = Registry::new();
    let b: Arc<dyn Backend> = Arc::new(TestBackend::available("metal"));
    assert!(r.register(Arc::clone(&b)).is_none());
    let got = r.get("metal").unwrap();
    assert!(Arc::ptr_eq(&got, &b));
    assert!(r.get("Metal").is_none(), "names are case-sensitive");
}

#[test]
fn list_is_sorted_whatever_the_registration_order() {
    let r = available(&["zeta", "metal", "alpha"]);
    assert_eq!(r.list(), ["alpha", "metal", "zeta"]);
    assert_eq!(names(&r.backends()), ["alpha", "metal", "zeta"]);
}

#[test]
fn registering_the_same_name_replaces_and_returns_the_old_backend() {
    let r = Registry::new();
    let first: Arc<dyn Backend> = Arc::new(TestBackend::unavailable("metal", None));
    let second: Arc<dyn Backend> = Arc::new(TestBackend::available("metal"));
    r.register(Arc::clone(&first));
    let replaced = r.register(Arc::clone(&second)).unwrap();
    assert!(Arc::ptr_eq(&replaced, &first));
    assert!(Arc::ptr_eq(&r.get("metal").unwrap(), &second));
    assert_eq!(r.list(), ["metal"]);
}

#[test]
fn unregister_removes_the_backend() {
    let r = Registry::new().with(Arc::new(TestBackend::available("metal")));
    assert_eq!(r.unregister("metal").unwrap().name(), "metal");
    assert!(r.unregister("metal").is_none());
    assert!(r.list().is_empty());
}

// ---- default_backend ----

#[test]
fn default_with_nothing_registered_is_no_backends() {
    let err = Registry::new().default_backend().err().unwrap();
    assert!(matches!(err, Error::NoBackends));
    assert_eq!(err.to_string(), "no backends registered; call a backend crate's register() at start-up");
}

#[test]
fn default_prefers_metal_when_available() {
    let r = available(&["aardvark", "metal", "mlx_lm"]);
    assert_eq!(r.default_backend().unwrap().name(), "metal");
}

#[test]
fn default_skips_unavailable_metal_for_the_first_available_by_name() {
    let r = Registry::new()
        .with(Arc::new(TestBackend::unavailable("metal", Some("no GPU"))))
        .with(Arc::new(TestBackend::available("mlx_lm")))
        .with(Arc::new(TestBackend::unavailable("cuda", None)))
        .with(Arc::new(TestBackend::available("zeta")));
    assert_eq!(r.default_backend().unwrap().name(), "mlx_lm");
}

#[test]
fn default_without_metal_is_first_available_by_name() {
    let r =
        Registry::new().with(Arc::new(TestBackend::available("zeta"))).with(Arc::new(TestBackend::available("beta")));
    assert_eq!(r.default_backend().unwrap().name(), "beta");
}

#[test]
fn default_with_none_available_lists_every_reason() {
    let r = Registry::new()
        .with(Arc::new(TestBackend::unavailable("mlx_lm", Some("python3 not found"))))
        .with(Arc::new(TestBackend::unavailable("metal", Some("no Metal device"))))
        .with(Arc::new(TestBackend::unavailable("cuda", None)));
    let err = r.default_backend().err().unwrap();
    assert_eq!(
        err.to_string(),
        "no backend is available on this machine (cuda: the backend gave no reason; \
         metal: no Metal device; mlx_lm: python3 not found)"
    );
    let Error::NoAvailableBackend { unavailable } = err else {
        panic!("wrong variant: {err:?}");
    };
    assert_eq!(unavailable[1], UnavailableBackend { name: "metal".into(), reason: "no Metal device".into() });
}

// ---- select ----

#[test]
fn select_none_is_the_default() {
    let r = Registry::new().with(Arc::new(TestBackend::available("metal")));
    assert_eq!(r.select(None).unwrap().name(), "metal");
}

#[test]
fn select_unregistered_name_lists_the_registered_ones_and_the_fix() {
    let r = available(&["mlx_lm", "cpu_ref"]);
    let err = r.select(Some("metal")).err().unwrap();
    assert_eq!(
        err.to_string(),
        "backend \"metal\" is not registered (registered: cpu_ref, mlx_lm); enable the cargo \
         feature of the crate that provides it and call that crate's register() at start-up"
    );
    assert!(matches!(
        err,
        Error::BackendNotRegistered { ref name, ref registered }
            if name == "metal" && registered == &["cpu_ref", "mlx_lm"]
    ));
}

#[test]
fn select_unregistered_name_in_empty_registry_says_none() {
    let err = Registry::new().select(Some("metal")).err().unwrap();
    assert_eq!(
        err.to_string(),
        "backend \"metal\" is not registered (registered: none); enable the cargo feature of \
         the crate that provides it and call that crate's register() at start-up"
    );
}

#[test]
fn select_unavailable_name_gives_its_reason() {
    let r = Registry::new()
        .with(Arc::new(TestBackend::unavailable("metal", Some("no Metal device"))))
        .with(Arc::new(TestBackend::unavailable("cuda", None)));
    let err = r.select(Some("metal")).err().unwrap();
    assert_eq!(err.to_string(), "backend \"metal\" is not available on this machine: no Metal device");
    let err = r.select(Some("cuda")).err().unwrap();
    assert_eq!(err.to_string(), "backend \"cuda\" is not available on this machine: the backend gave no reason");
}

// ---- load_model ----

#[test]
fn load_model_routes_by_name_and_passes_path_and_settings_untouched() {
    let metal = Arc::new(TestBackend::available("metal"));
    let mlx_lm = Arc::new(TestBackend::available("mlx_lm"));
    let r = Registry::new().with(metal.clone()).with(mlx_lm.clone());
    let settings = LoadSettings::new()
        .backend("mlx_lm")
        .device(Device::Cpu)
        .context_length(4096)
        .backend_option("python", "/usr/bin/python3");
    let model = r.load_model("relative/../model dir", &settings).unwrap();
    assert_eq!(model.model_type(), "minimal");
    assert_eq!(metal.load_count(), 0);
    let loads = mlx_lm.loads.lock().unwrap();
    assert_eq!(loads.len(), 1);
    assert_eq!(loads[0].0, PathBuf::from("relative/../model dir"));
    assert_eq!(loads[0].1, settings);
}

#[test]
fn load_model_without_a_backend_uses_the_default() {
    let metal = Arc::new(TestBackend::unavailable("metal", Some("no GPU")));
    let mlx_lm = Arc::new(TestBackend::available("mlx_lm"));
    let r = Registry::new().with(metal.clone()).with(mlx_lm.clone());
    r.load_model("/m", &LoadSettings::new()).unwrap();
    assert_eq!((metal.load_count(), mlx_lm.load_count()), (0, 1));
}

#[test]
fn load_model_with_nothing_registered_is_no_backends() {
    let err = Registry::new().load_model("/m", &LoadSettings::new()).err().unwrap();
    assert!(matches!(err, Error::NoBackends));
}

#[test]
fn load_model_not_registered_is_distinct() {
    let r = Registry::new().with(Arc::new(TestBackend::available("mlx_lm")));
    let err = r.load_model("/m", &LoadSettings::new().backend("metal")).err().unwrap();
    assert!(matches!(err, Error::BackendNotRegistered { .. }), "{err:?}");
}

#[test]
fn load_model_unavailable_is_distinct_and_never_calls_the_backend() {
    let metal = Arc::new(TestBackend::unavailable("metal", Some("no Metal device")));
    let r = Registry::new().with(metal.clone());
    let err = r.load_model("/m", &LoadSettings::new().backend("metal")).err().unwrap();
    assert!(matches!(err, Error::BackendUnavailable { .. }), "{err:?}");
    assert_eq!(metal.load_count(), 0);
}

#[test]
fn load_model_failure_is_wrapped_with_backend_and_path() {
    let r = Registry::new().with(Arc::new(TestBackend::failing("metal", "config.json has no model_type")));
    let err = r.load_model("/models/broken", &LoadSettings::new()).err().unwrap();
    assert_eq!(err.to_string(), "backend \"metal\" failed to load model /models/broken");
    assert_eq!(
        err.report(),
        "backend \"metal\" failed to load model /models/broken: \
         invalid model at /models/broken: config.json has no model_type"
    );
    let Error::LoadFailed { backend, path, source } = err else {
        panic!("wrong variant");
    };
    assert_eq!(backend, "metal");
    assert_eq!(path, PathBuf::from("/models/broken"));
    assert!(matches!(*source, Error::InvalidModel { .. }));
}

#[test]
fn load_model_rejects_invalid_settings_before_routing() {
    let metal = Arc::new(TestBackend::available("metal"));
    let r = Registry::new().with(metal.clone());
    for settings in
        [LoadSettings::new().backend(""), LoadSettings::new().context_length(0), LoadSettings::new().adapter_path("")]
    {
        let err = r.load_model("/m", &settings).err().unwrap();
        assert!(matches!(err, Error::InvalidSetting { .. }), "{err:?}");
    }
    assert_eq!(metal.load_count(), 0);
}

#[test]
fn registry_is_usable_from_many_threads() {
    let r = Arc::new(Registry::new());
    let handles: Vec<_> = ["a", "b", "c", "d"]
        .into_iter()
        .map(|name| {
            let r = Arc::clone(&r);
            std::thread::spawn(move || {
                r.register(Arc::new(TestBackend::available(name)));
                r.load_model("/m", &LoadSettings::new().backend(name)).map(|m| m.model_type().to_owned())
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().unwrap(), "minimal");
    }
    assert_eq!(r.list(), ["a", "b", "c", "d"]);
}
