// SPDX-License-Identifier: EUPL-1.2
//! LoRA adapters served beside the base model, each as a model id of its own.
//!
//! `--adapter NAME=DIR` (repeatable) loads them at start; `POST /v1/adapters` with
//! `{"name": ..., "path": ...}` loads one at run time (201 with its model object, 409 when the
//! name is taken) and `DELETE /v1/adapters/{name}` unloads one (200; 404 when there is none). A
//! request names the model it wants in `model`: the base's id or an adapter's. Loading from a
//! path a client sends reads the server's file system, so it is refused (403) unless the server
//! was started with `--adapter-root DIR`, and then only directories under DIR are read (a
//! relative path is taken from DIR; symbolic links are resolved before the check).
//!
//! An adapter is a model of the backend's ([`inference_core::AdapterHost`]) that shares the base
//! model's weights; here it gets an [`Engine`] that shares the base's queue, counters and
//! shutdown. Unloading takes the name away at once (new requests for it get 404); requests
//! already running on it finish, and the adapter's memory goes with the last of them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use inference_core::TextModel;
use serde_json::{Value, json};

use super::engine::Engine;
use super::error::ApiError;
use super::{AppState, body_of};

/// The longest adapter name.
const MAX_NAME: usize = 64;

/// One adapter being served.
struct Served {
    engine: Arc<Engine>,
    model: Arc<dyn TextModel>,
    created: u64,
    /// Requests that named it.
    requests: Arc<AtomicU64>,
}

#[derive(Default)]
struct Table {
    served: BTreeMap<String, Served>,
    /// Names whose adapters are being loaded.
    loading: BTreeSet<String>,
}

/// The adapters beside the base model.
pub(crate) struct Adapters {
    base_id: String,
    base: Arc<Engine>,
    base_model: Arc<dyn TextModel>,
    base_requests: Arc<AtomicU64>,
    /// Where clients may load adapters from; `None`: not at all.
    root: Option<PathBuf>,
    table: Mutex<Table>,
}

/// A model a request chose.
pub(crate) struct Chosen {
    pub(crate) engine: Arc<Engine>,
    pub(crate) id: String,
}

fn error(status: StatusCode, code: &'static str, param: Option<&str>, message: String) -> ApiError {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    ApiError { status, message, kind, param: param.map(str::to_owned), code: Some(code) }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Escapes a Prometheus label value.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Adapters {
    pub(crate) fn new(
        base_id: String,
        base: Arc<Engine>,
        base_model: Arc<dyn TextModel>,
        root: Option<PathBuf>,
    ) -> Self {
        let base_requests = Arc::default();
        Adapters { base_id, base, base_model, base_requests, root, table: Mutex::default() }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The engine and id of the model a request names (`None`: the base).
    pub(crate) fn choose(&self, requested: Option<&str>) -> Result<Chosen, ApiError> {
        let base = || Chosen { engine: Arc::clone(&self.base), id: self.base_id.clone() };
        let Some(name) = requested else {
            self.base_requests.fetch_add(1, Ordering::Relaxed);
            return Ok(base());
        };
        if name == self.base_id {
            self.base_requests.fetch_add(1, Ordering::Relaxed);
            return Ok(base());
        }
        let table = self.table();
        match table.served.get(name) {
            Some(s) => {
                s.requests.fetch_add(1, Ordering::Relaxed);
                Ok(Chosen { engine: Arc::clone(&s.engine), id: name.to_owned() })
            }
            None => {
                let mut e = ApiError::model_not_found(name, &self.base_id);
                let ids: Vec<String> =
                    std::iter::once(&self.base_id).chain(table.served.keys()).map(|i| format!("{i:?}")).collect();
                e.message = format!("the model {name:?} does not exist; this server serves {}", ids.join(", "));
                Err(e)
            }
        }
    }

    /// The base's model object, then every adapter's.
    pub(crate) fn model_objects(&self, base: Value) -> Vec<Value> {
        let table = self.table();
        std::iter::once(base).chain(table.served.iter().map(|(id, s)| self.object(id, s.created))).collect()
    }

    /// An adapter's model object (`parent`: the base model's id, as vLLM says it).
    pub(crate) fn model_object(&self, id: &str) -> Option<Value> {
        self.table().served.get(id).map(|s| self.object(id, s.created))
    }

    fn object(&self, id: &str, created: u64) -> Value {
        json!({ "id": id, "object": "model", "created": created, "owned_by": "mlxr", "parent": self.base_id })
    }

    /// Why `name` cannot name a new adapter, if it cannot.
    fn check_name(&self, name: &str, table: &Table) -> Result<(), ApiError> {
        check_name(name, &self.base_id)?;
        if table.served.contains_key(name) || table.loading.contains(name) {
            return Err(error(
                StatusCode::CONFLICT,
                "adapter_exists",
                Some("name"),
                format!("an adapter named {name:?} is already served; unload it first"),
            ));
        }
        Ok(())
    }

    /// Loads the adapter in `dir` as model `name` (blocking: start-up, or a blocking task);
    /// errors name the directory as `shown` (what the client or the command line gave).
    pub(crate) fn load(&self, name: &str, dir: &Path, shown: &str) -> Result<Value, ApiError> {
        {
            let mut table = self.table();
            self.check_name(name, &table)?;
            table.loading.insert(name.to_owned());
        }
        let loaded = self.load_model(dir, shown);
        let mut table = self.table();
        table.loading.remove(name);
        let model = loaded?;
        let engine = Arc::new(self.base.for_model(Arc::clone(&model)));
        let created = now();
        table.served.insert(name.to_owned(), Served { engine, model, created, requests: Arc::default() });
        tracing::info!(adapter = name, dir = %dir.display(), "adapter loaded");
        Ok(self.object(name, created))
    }

    fn load_model(&self, dir: &Path, shown: &str) -> Result<Arc<dyn TextModel>, ApiError> {
        let invalid = |why: String| error(StatusCode::BAD_REQUEST, "invalid_adapter", Some("path"), why);
        if !dir.is_dir() {
            return Err(invalid(format!("the adapter directory {shown} does not exist")));
        }
        for file in ["adapter_config.json", "adapters.safetensors"] {
            if !dir.join(file).is_file() {
                return Err(invalid(format!("{shown} is not an adapter directory: it has no {file}")));
            }
        }
        let Some(host) = self.base_model.adapter_host() else {
            return Err(invalid("this model's backend cannot serve adapters beside it".into()));
        };
        match host.load_adapter(dir) {
            Ok(model) => Ok(Arc::from(model)),
            Err(inference_core::Error::InvalidSetting { reason, .. }) => Err(invalid(reason)),
            Err(e @ inference_core::Error::Unsupported { .. }) => Err(invalid(e.report())),
            Err(e) => Err(e.into()),
        }
    }

    /// Unloads adapter `name`: gone from the table at once; its running requests finish.
    pub(crate) fn unload(&self, name: &str) -> Result<Value, ApiError> {
        if name == self.base_id {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "not_an_adapter",
                Some("name"),
                format!("{name:?} is the base model, which cannot be unloaded"),
            ));
        }
        let served = self.table().served.remove(name).ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                "adapter_not_found",
                Some("name"),
                format!("no adapter named {name:?} is served"),
            )
        })?;
        if let Err(e) = served.model.close() {
            tracing::warn!(adapter = name, error = %e.report(), "the adapter did not close cleanly");
        }
        tracing::info!(adapter = name, "adapter unloaded");
        Ok(json!({ "id": name, "object": "model", "deleted": true }))
    }

    /// Closes every adapter (at shutdown, before the base model).
    pub(crate) fn close_all(&self) {
        let served = std::mem::take(&mut self.table().served);
        for (name, s) in served {
            if let Err(e) = s.model.close() {
                tracing::warn!(adapter = name, error = %e.report(), "the adapter did not close cleanly");
            }
        }
    }

    /// The directory a client's `path` names, when runtime loading is on and it lies under the root.
    fn client_dir(&self, path: &str) -> Result<PathBuf, ApiError> {
        let Some(root) = &self.root else {
            return Err(error(
                StatusCode::FORBIDDEN,
                "adapter_loading_disabled",
                None,
                "loading adapters at run time is off: start the server with --adapter-root DIR to allow it".into(),
            ));
        };
        let invalid = |why: String| error(StatusCode::BAD_REQUEST, "invalid_adapter", Some("path"), why);
        if path.is_empty() {
            return Err(invalid("the adapter path must not be empty".into()));
        }
        let root = std::fs::canonicalize(root).map_err(|e| {
            tracing::error!(root = %root.display(), error = %e, "the adapter root cannot be read");
            error(StatusCode::INTERNAL_SERVER_ERROR, "adapter_root", None, "the adapter root cannot be read".into())
        })?;
        let dir = std::fs::canonicalize(root.join(path))
            .map_err(|_| invalid(format!("the adapter directory {path:?} does not exist under the adapter root")))?;
        if !dir.starts_with(&root) {
            return Err(invalid(format!("the adapter directory {path:?} is not under the adapter root")));
        }
        Ok(dir)
    }

    /// `/health`'s entry: each adapter and its engine's load.
    pub(crate) fn health(&self) -> Value {
        let table = self.table();
        Value::Object(
            table
                .served
                .iter()
                .map(|(id, s)| (id.clone(), json!({ "batch": s.model.engine_load() })))
                .collect::<serde_json::Map<_, _>>(),
        )
    }

    /// `/metrics`' lines: requests by the model they named, and the adapters served.
    pub(crate) fn metrics(&self) -> String {
        let table = self.table();
        let mut out = String::from(
            "# HELP mlxr_model_requests_total Generation requests by the model they named (the base or an adapter).\n\
             # TYPE mlxr_model_requests_total counter\n",
        );
        let base = self.base_requests.load(Ordering::Relaxed);
        out.push_str(&format!("mlxr_model_requests_total{{model=\"{}\"}} {base}\n", label(&self.base_id)));
        for (id, s) in &table.served {
            let n = s.requests.load(Ordering::Relaxed);
            out.push_str(&format!("mlxr_model_requests_total{{model=\"{}\"}} {n}\n", label(id)));
        }
        out.push_str(&format!(
            "# HELP mlxr_adapters_loaded LoRA adapters served beside the base model.\n\
             # TYPE mlxr_adapters_loaded gauge\nmlxr_adapters_loaded {}\n",
            table.served.len()
        ));
        out
    }
}

/// Why `name` cannot name an adapter beside the model `base_id`, if it cannot.
fn check_name(name: &str, base_id: &str) -> Result<(), ApiError> {
    let bad = |why: String| error(StatusCode::BAD_REQUEST, "invalid_adapter_name", Some("name"), why);
    if name.is_empty() {
        return Err(bad("the adapter name must not be empty".into()));
    }
    if name.len() > MAX_NAME || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
        return Err(bad(format!(
            "the adapter name {name:?} must be 1 to {MAX_NAME} ASCII letters, digits, '-', '_', '.' or ':'"
        )));
    }
    if name == base_id {
        return Err(error(
            StatusCode::CONFLICT,
            "adapter_exists",
            Some("name"),
            format!("{name:?} is the base model's id; choose another name for the adapter"),
        ));
    }
    Ok(())
}

/// Checks the `--adapter NAME=DIR` names before anything loads: each valid, none twice.
pub(crate) fn check_start_names(named: &[crate::adapter_arg::AdapterArg], base_id: &str) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for a in named {
        let name = a.name.as_deref().unwrap_or_default();
        let flag = format!("--adapter {name}={}", a.dir.display());
        check_name(name, base_id).map_err(|e| format!("{flag}: {}", e.message))?;
        if !seen.insert(name) {
            return Err(format!("{flag}: the name {name:?} is given to two adapters"));
        }
    }
    Ok(())
}

/// `POST /v1/adapters`'s body (vLLM's `lora_name` and `lora_path` are understood too).
#[derive(serde::Deserialize)]
struct LoadRequest {
    #[serde(alias = "lora_name")]
    name: String,
    #[serde(alias = "lora_path")]
    path: String,
}

/// `POST /v1/adapters`.
pub(crate) async fn load_route(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_of(&state, body)?;
    let request: LoadRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid(None, "invalid_body", format!("the body must be {{\"name\": ..., \"path\": ...}}: {e}"))
    })?;
    let dir = state.adapters.client_dir(&request.path)?;
    let loading = Arc::clone(&state);
    let object = tokio::task::spawn_blocking(move || loading.adapters.load(&request.name, &dir, &request.path))
        .await
        .map_err(|_| ApiError::internal("loading the adapter stopped part-way"))??;
    Ok((StatusCode::CREATED, Json(object)).into_response())
}

/// `DELETE /v1/adapters/{name}`.
pub(crate) async fn unload_route(
    State(state): State<Arc<AppState>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    state.adapters.unload(&name).map(Json)
}

/// `GET /v1/adapters`: the adapters' model objects.
pub(crate) async fn list_route(State(state): State<Arc<AppState>>) -> Json<Value> {
    let table = state.adapters.table();
    let data: Vec<Value> = table.served.iter().map(|(id, s)| state.adapters.object(id, s.created)).collect();
    Json(json!({ "object": "list", "data": data }))
}

/// Loads the `--adapter NAME=DIR` adapters at start; an error names the one that failed.
pub(crate) fn load_at_start(adapters: &Adapters, named: &[crate::adapter_arg::AdapterArg]) -> Result<(), String> {
    for a in named {
        let name = a.name.as_deref().unwrap_or_default();
        let shown = a.dir.display().to_string();
        adapters.load(name, &a.dir, &shown).map_err(|e| format!("--adapter {name}={shown}: {}", e.message))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
