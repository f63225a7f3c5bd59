// SPDX-License-Identifier: EUPL-1.2
//! A fake backend that implements the whole contract with a producer thread per call: streaming,
//! cancellation, errors after tokens, metrics and the optional capabilities.
//!
//! The producer reports how it ended on a channel ([`Ending`]), so the tests observe the producer
//! itself and never sleep.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use inference_core::{
    Adapter, AttentionInspector, AttentionSnapshot, Backend, BatchResult, CancelToken, ClassifyResult, Error,
    GenerateMetrics, GenerateSettings, LoadSettings, LogitsMode, LoraConfig, Message, ModelInfo, Result, TextModel,
    Token, TokenStream, TrainableModel,
};

/// The fake's vocabulary size.
pub(crate) const VOCAB: usize = 4;

/// How a producer thread ended.
#[derive(Debug, PartialEq)]
pub(crate) enum Ending {
    Finished { sent: usize },
    Stopped { sent: usize, cancelled: bool },
    Failed { sent: usize },
    Vanished { sent: usize },
}

/// What a prompt asks the fake to do.
enum Script {
    /// Echo the words of the prompt, up to `max_tokens`, then finish.
    Echo(Vec<String>),
    /// Produce tokens until stopped.
    Forever,
    /// Produce `n` tokens, then fail.
    FailAfter(usize),
    /// Produce `n` tokens, then drop the sink without finishing.
    VanishAfter(usize),
}

impl Script {
    fn parse(prompt: &str) -> Self {
        let words: Vec<&str> = prompt.split_whitespace().collect();
        match words.as_slice() {
            ["forever"] => Self::Forever,
            ["fail", "after", n] => Self::FailAfter(n.parse().unwrap()),
            ["vanish", "after", n] => Self::VanishAfter(n.parse().unwrap()),
            _ => Self::Echo(words.iter().map(|w| (*w).to_owned()).collect()),
        }
    }
}

/// A model whose output the prompt scripts (see `Script`).
pub(crate) struct FakeModel {
    closed: AtomicBool,
    last_metrics: Arc<Mutex<GenerateMetrics>>,
    endings: Sender<Ending>,
    /// Channel capacity: 0 makes every send wait for the consumer, so counts are exact.
    capacity: usize,
}

/// A fake model, and the channel on which its producers report how they ended.
pub(crate) fn fake_model() -> (FakeModel, Receiver<Ending>) {
    let (endings, rx) = mpsc::channel();
    let model = FakeModel { closed: AtomicBool::new(false), last_metrics: Arc::default(), endings, capacity: 0 };
    (model, rx)
}

/// The producer's report; a generous bound turns a bug into a failure instead of a hang.
pub(crate) fn ending(rx: &Receiver<Ending>) -> Ending {
    rx.recv_timeout(Duration::from_secs(60)).expect("the producer thread should report how it ended")
}

impl FakeModel {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) { Err(Error::Closed) } else { Ok(()) }
    }

    fn start(&self, prompt: &str, settings: &GenerateSettings, cancel: CancelToken) -> Result<TokenStream> {
        self.check_open()?;
        settings.validate()?;
        if prompt.trim().is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let script = Script::parse(prompt);
        let prompt_tokens = prompt.split_whitespace().count();
        let max_tokens = settings.max_tokens;
        let logits = settings.logits;
        let (sink, stream) = TokenStream::channel_with_capacity(cancel, self.capacity);
        let endings = self.endings.clone();
        let last_metrics = Arc::clone(&self.last_metrics);

        thread::spawn(move || {
            let mut sent = 0;
            let ending = loop {
                match script {
                    Script::FailAfter(n) if sent == n => {
                        sink.fail(Error::backend("fake", "device lost"));
                        break Ending::Failed { sent };
                    }
                    Script::VanishAfter(n) if sent == n => {
                        drop(sink);
                        break Ending::Vanished { sent };
                    }
                    _ => {}
                }
                let text = match &script {
                    Script::Echo(words) => words.get(sent).cloned(),
                    _ => Some(format!("t{sent}")),
                };
                let Some(text) = text.filter(|_| sent < max_tokens) else {
                    let mut metrics = GenerateMetrics {
                        prompt_tokens,
                        generated_tokens: sent,
                        prefill_duration: Duration::from_millis(10),
                        decode_duration: Duration::from_millis(100),
                        total_duration: Duration::from_millis(110),
                        peak_memory_bytes: 1 << 20,
                        ..GenerateMetrics::default()
                    };
                    metrics.compute_rates();
                    // Recorded before finishing, so the model's metrics are current once the
                    // consumer sees the end of the stream.
                    *last_metrics.lock().unwrap() = metrics;
                    sink.finish(metrics);
                    break Ending::Finished { sent };
                };
                let mut token = Token::new(sent as u32, text);
                if logits != LogitsMode::None {
                    token = token.with_logprob(-0.25).with_logits(vec![-1.0; VOCAB]);
                }
                if sink.send(token).is_err() {
                    break Ending::Stopped { sent, cancelled: sink.is_cancelled() };
                }
                sent += 1;
            };
            let _ = endings.send(ending);
        });
        Ok(stream)
    }
}

impl TextModel for FakeModel {
    fn generate(&self, prompt: &str, settings: &GenerateSettings, cancel: CancelToken) -> Result<TokenStream> {
        self.start(prompt, settings, cancel)
    }

    fn chat(&self, messages: &[Message], settings: &GenerateSettings, cancel: CancelToken) -> Result<TokenStream> {
        let last = messages.last().ok_or(Error::EmptyPrompt)?;
        self.start(&last.content, settings, cancel)
    }

    fn classify(
        &self,
        prompts: &[&str],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> Result<Vec<ClassifyResult>> {
        self.check_open()?;
        settings.validate()?;
        let mut results = Vec::with_capacity(prompts.len());
        for prompt in prompts {
            cancel.check()?;
            let first = prompt.split_whitespace().next().ok_or(Error::EmptyPrompt)?;
            let logits = (settings.logits != LogitsMode::None).then(|| vec![0.5; VOCAB]);
            results.push(ClassifyResult { token: Token::new(prompt.len() as u32 % VOCAB as u32, first), logits });
        }
        Ok(results)
    }

    fn batch_generate(
        &self,
        prompts: &[&str],
        settings: &GenerateSettings,
        cancel: CancelToken,
    ) -> Result<Vec<BatchResult>> {
        self.check_open()?;
        settings.validate()?;
        Ok(prompts
            .iter()
            .map(|p| match self.start(p, settings, cancel.clone()) {
                Ok(stream) => stream.into_batch_result(),
                Err(error) => BatchResult { tokens: Vec::new(), error: Some(error) },
            })
            .collect())
    }

    fn info(&self) -> ModelInfo {
        ModelInfo {
            architecture: "fake".into(),
            vocab_size: VOCAB,
            num_layers: 2,
            hidden_size: 8,
            quant_bits: Some(4),
            quant_group: Some(64),
            context_length: Some(128),
            ..ModelInfo::default()
        }
    }

    fn metrics(&self) -> GenerateMetrics {
        *self.last_metrics.lock().unwrap()
    }

    fn model_type(&self) -> &str {
        "fake"
    }

    fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }

    fn attention_inspector(&self) -> Option<&dyn AttentionInspector> {
        Some(self)
    }

    fn trainer(&self) -> Option<&dyn TrainableModel> {
        Some(self)
    }
}

impl AttentionInspector for FakeModel {
    fn inspect_attention(&self, prompt: &str, cancel: CancelToken) -> Result<AttentionSnapshot> {
        self.check_open()?;
        cancel.check()?;
        let seq_len = prompt.split_whitespace().count();
        if seq_len == 0 {
            return Err(Error::EmptyPrompt);
        }
        let head_dim = 2;
        let heads = |n: usize, scale: f32| -> Vec<Vec<Vec<f32>>> {
            (0..2)
                .map(|layer| {
                    (0..n)
                        .map(|h| (0..seq_len * head_dim).map(|i| scale * (100 * layer + 10 * h + i) as f32).collect())
                        .collect()
                })
                .collect()
        };
        Ok(AttentionSnapshot {
            num_layers: 2,
            num_heads: 1,
            seq_len,
            head_dim,
            num_query_heads: 2,
            keys: heads(1, 1.0),
            queries: heads(2, -1.0),
            architecture: "fake".into(),
        })
    }
}

struct FakeAdapter {
    config: LoraConfig,
    params: usize,
}

impl Adapter for FakeAdapter {
    fn total_params(&self) -> usize {
        self.params
    }

    fn save(&self, path: &Path) -> Result<()> {
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let file = path.join("adapter_config.json");
        let json = serde_json::to_vec(&self.config)
            .map_err(|e| Error::backend_with_source("fake", "cannot encode config", e))?;
        std::fs::write(&file, json).map_err(|e| Error::io(file, e))
    }
}

impl TrainableModel for FakeModel {
    fn apply_lora(&self, config: &LoraConfig) -> Result<Box<dyn Adapter>> {
        self.check_open()?;
        config.validate()?;
        let layers = config.num_layers.unwrap_or(2).min(2);
        // A [rank, 8] and B [8, rank] per target per layer.
        let params = layers * config.target_keys.len() * 2 * 8 * config.rank;
        Ok(Box::new(FakeAdapter { config: config.clone(), params }))
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.check_open()?;
        Ok(text.bytes().map(u32::from).collect())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.check_open()?;
        ids.iter()
            .map(|&id| {
                u8::try_from(id)
                    .map(char::from)
                    .map_err(|_| Error::backend("fake", format!("token id {id} is outside the vocabulary")))
            })
            .collect()
    }

    fn num_layers(&self) -> usize {
        2
    }
}

/// A backend that loads fake models, handing their producer reports to the test.
pub(crate) struct FakeBackend {
    pub(crate) endings: Mutex<Vec<Receiver<Ending>>>,
}

impl Backend for FakeBackend {
    fn name(&self) -> &str {
        "fake"
    }

    fn available(&self) -> bool {
        true
    }

    fn load_model(&self, path: &Path, settings: &LoadSettings) -> Result<Box<dyn TextModel>> {
        settings.validate()?;
        if path.as_os_str().is_empty() {
            return Err(Error::invalid_model(path, "empty path"));
        }
        let (mut model, rx) = fake_model();
        model.capacity = TokenStream::DEFAULT_CAPACITY;
        self.endings.lock().unwrap().push(rx);
        Ok(Box::new(model))
    }
}
