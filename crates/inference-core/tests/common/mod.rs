// SPDX-License-Identifier: EUPL-1.2
//! Test doubles shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use inference_core::{
    Backend, BatchResult, CancelToken, ClassifyResult, Error, GenerateMetrics, GenerateSettings, LoadSettings, Message,
    ModelInfo, Result, TextModel, TokenStream,
};

/// A model that implements only the required methods, each refusing the work.
pub(crate) struct MinimalModel {
    pub(crate) path: PathBuf,
}

impl TextModel for MinimalModel {
    fn generate(&self, _: &str, _: &GenerateSettings, _: CancelToken) -> Result<TokenStream> {
        Err(Error::unsupported("minimal", "generation"))
    }
    fn chat(&self, _: &[Message], _: &GenerateSettings, _: CancelToken) -> Result<TokenStream> {
        Err(Error::unsupported("minimal", "chat"))
    }
    fn classify(&self, _: &[&str], _: &GenerateSettings, _: CancelToken) -> Result<Vec<ClassifyResult>> {
        Err(Error::unsupported("minimal", "classification"))
    }
    fn batch_generate(&self, _: &[&str], _: &GenerateSettings, _: CancelToken) -> Result<Vec<BatchResult>> {
        Err(Error::unsupported("minimal", "batch generation"))
    }
    fn info(&self) -> ModelInfo {
        ModelInfo::default()
    }
    fn metrics(&self) -> GenerateMetrics {
        GenerateMetrics::default()
    }
    fn model_type(&self) -> &str {
        "minimal"
    }
    fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// What a [`TestBackend`] does when asked to load.
#[derive(Clone)]
pub(crate) enum OnLoad {
    Succeed,
    Fail(&'static str),
}

/// A backend whose name, availability and load outcome are set by the test, and which records
/// every load it was asked for.
pub(crate) struct TestBackend {
    pub(crate) name: &'static str,
    pub(crate) available: bool,
    pub(crate) reason: Option<&'static str>,
    pub(crate) on_load: OnLoad,
    pub(crate) loads: Mutex<Vec<(PathBuf, LoadSettings)>>,
}

impl TestBackend {
    pub(crate) fn available(name: &'static str) -> Self {
        Self { name, available: true, reason: None, on_load: OnLoad::Succeed, loads: Mutex::new(Vec::new()) }
    }

    pub(crate) fn unavailable(name: &'static str, reason: Option<&'static str>) -> Self {
        Self { available: false, reason, ..Self::available(name) }
    }

    pub(crate) fn failing(name: &'static str, message: &'static str) -> Self {
        Self { on_load: OnLoad::Fail(message), ..Self::available(name) }
    }

    pub(crate) fn load_count(&self) -> usize {
        self.loads.lock().unwrap().len()
    }
}

impl Backend for TestBackend {
    fn name(&self) -> &str {
        self.name
    }
    fn available(&self) -> bool {
        self.available
    }
    fn unavailable_reason(&self) -> Option<String> {
        self.reason.map(str::to_owned)
    }
    fn load_model(&self, path: &Path, settings: &LoadSettings) -> Result<Box<dyn TextModel>> {
        self.loads.lock().unwrap().push((path.to_owned(), settings.clone()));
        match self.on_load {
            OnLoad::Succeed => Ok(Box::new(MinimalModel { path: path.to_owned() })),
            OnLoad::Fail(message) => Err(Error::invalid_model(path, message)),
        }
    }
}
