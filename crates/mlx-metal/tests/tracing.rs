// SPDX-License-Identifier: EUPL-1.2
//! The `tracing` spans of loading, prefill, decode steps and engine jobs
//! (docs/tracing.md). A subscriber that records every span (name, level,
//! fields, parent, thread, how often it was entered) is installed for the
//! whole process, since the engine runs jobs on its own thread; this file is
//! its own test binary, so nothing else shares it. Each test picks out its
//! own spans: those made on its thread, or under a root span of its own.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use inference_core::{AttentionInspector, CancelToken, ChatSession, Device, GenerateSettings, LoadSettings, TextModel};
use mlx_metal::batch;
use mlx_metal::generate::{self, LoopOptions};
use mlx_metal::model;
use mlx_metal::sample::{Sampler, SamplerConfig};
use mlx_metal::{MetalModel, lora};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::{Interest, Subscriber};
use tracing::{Event, Level, Metadata};
use tracing_core::span::Current;

/// One span as the collector saw it.
#[derive(Debug, Clone)]
struct SpanRecord {
    id: u64,
    meta: &'static Metadata<'static>,
    name: &'static str,
    level: Level,
    fields: BTreeMap<String, String>,
    parent: Option<u64>,
    thread: String,
    entered: usize,
}

impl SpanRecord {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    fn int(&self, name: &str) -> u64 {
        self.field(name)
            .unwrap_or_else(|| panic!("span {} has no field {name}: {:?}", self.name, self.fields))
            .parse()
            .unwrap_or_else(|e| panic!("span {} field {name} is not an integer: {e}", self.name))
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

/// Every span made in this process, by id.
static SPANS: Mutex<BTreeMap<u64, SpanRecord>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The spans entered on this thread, innermost last.
    static STACK: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

fn spans() -> std::sync::MutexGuard<'static, BTreeMap<u64, SpanRecord>> {
    SPANS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Records every span of every level, on every thread, into [`SPANS`].
struct Collector;

impl Subscriber for Collector {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::always()
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }

    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let parent = if attrs.is_contextual() {
            STACK.with(|s| s.borrow().last().copied())
        } else {
            attrs.parent().map(Id::into_u64)
        };
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let meta = attrs.metadata();
        let record = SpanRecord {
            id,
            meta,
            name: meta.name(),
            level: *meta.level(),
            fields,
            parent,
            thread: this_thread(),
            entered: 0,
        };
        spans().insert(id, record);
        Id::from_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        if let Some(s) = spans().get_mut(&span.into_u64()) {
            values.record(&mut Fields(&mut s.fields));
        }
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, span: &Id) {
        if let Some(s) = spans().get_mut(&span.into_u64()) {
            s.entered += 1;
        }
        STACK.with(|s| s.borrow_mut().push(span.into_u64()));
    }

    fn exit(&self, span: &Id) {
        STACK.with(|s| {
            let mut s = s.borrow_mut();
            if let Some(i) = s.iter().rposition(|&id| id == span.into_u64()) {
                s.remove(i);
            }
        });
    }

    fn current_span(&self) -> Current {
        let top = STACK.with(|s| s.borrow().last().copied());
        match top.and_then(|id| spans().get(&id).map(|s| s.meta)) {
            Some(meta) => Current::new(Id::from_u64(top.unwrap_or_default()), meta),
            None => Current::none(),
        }
    }
}

/// Installs the collector for the whole process (once).
fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        tracing::subscriber::set_global_default(Collector).expect("no other global subscriber in this binary");
    });
}

/// A root span for one test, and its id.
fn root(name: &'static str) -> (tracing::Span, u64) {
    install();
    let span = tracing::info_span!("test_root", test = name);
    let id = span.id().expect("the collector enables every span").into_u64();
    (span, id)
}

/// Every span recorded so far, in the order they were made.
fn all_spans() -> Vec<SpanRecord> {
    spans().values().cloned().collect()
}

fn this_thread() -> String {
    std::thread::current().name().unwrap_or("").to_string()
}

/// The spans named `name` among `spans`.
fn named<'a>(spans: &'a [SpanRecord], name: &str) -> Vec<&'a SpanRecord> {
    spans.iter().filter(|s| s.name == name).collect()
}

/// `spans` that have `root` among their ancestors.
fn under(spans: &[SpanRecord], root: u64) -> Vec<SpanRecord> {
    let by_id: HashMap<u64, &SpanRecord> = spans.iter().map(|s| (s.id, s)).collect();
    let descends = |s: &SpanRecord| {
        let mut p = s.parent;
        while let Some(id) = p {
            if id == root {
                return true;
            }
            p = by_id.get(&id).and_then(|s| s.parent);
        }
        false
    };
    spans.iter().filter(|s| descends(s)).cloned().collect()
}

fn parent_of<'a>(spans: &'a [SpanRecord], s: &SpanRecord) -> Option<&'a SpanRecord> {
    s.parent.and_then(|p| spans.iter().find(|x| x.id == p))
}

#[test]
fn loading_prefill_and_decode_steps_are_spans_on_the_calling_thread() {
    let (root, root_id) = root("calling_thread");
    let entered = root.enter();
    let _cpu = mlx::device::DeviceScope::new(mlx::Device::Cpu).unwrap();
    let loaded = model::load(&common::tiny_model("llama-tiny")).unwrap();
    let m = loaded.model.as_ref();
    let sampler = Sampler::new(SamplerConfig::default()).unwrap();

    // 9 prompt tokens in chunks of 4: prefill chunks of 4 and 4, then the
    // last prompt token runs with the first decode step.
    let prompt: Vec<u32> = vec![5, 17, 99, 3, 42, 8, 11, 250, 31];
    let mut caches = m.make_cache().unwrap();
    let opts = LoopOptions { max_tokens: 5, prefill_step: 4 };
    let mut ids = Vec::new();
    let stats = generate::generate(m, &mut caches, &prompt, &sampler, &opts, &|| false, |s| {
        ids.push(s.id);
        Ok(ControlFlow::Continue(()))
    })
    .unwrap();
    assert_eq!(stats.generated_tokens, 5);

    let rows: Vec<Vec<u32>> = vec![vec![7, 8, 9], vec![1, 2, 3, 4, 5, 6]];
    let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
    let bstats =
        batch::generate(m, &refs, &sampler, &[3, 3], 2048, &|| false, |_, _| Ok(ControlFlow::Continue(()))).unwrap();
    assert_eq!(bstats.generated_tokens, 6);

    drop(entered);
    let spans = under(&all_spans(), root_id);
    let thread = this_thread();
    assert!(spans.iter().all(|s| s.thread == thread && s.meta.target().starts_with("mlx_metal")), "{spans:#?}");

    // Loading: the directory, the architecture, the weights and the build.
    let load = named(&spans, "load");
    assert_eq!(load.len(), 1, "{spans:#?}");
    let load = load[0];
    assert_eq!(load.parent, Some(root_id));
    assert_eq!(load.level, Level::INFO);
    assert!(load.field("dir").unwrap().contains("llama-tiny"), "{:?}", load.fields);
    assert_eq!(load.field("architecture"), Some("llama"));
    assert_eq!(load.entered, 1);
    let weights = named(&spans, "load_weights");
    assert_eq!(weights.len(), 1);
    assert_eq!(weights[0].level, Level::DEBUG);
    assert_eq!(weights[0].parent, Some(load.id));
    assert_eq!(weights[0].int("files"), 1);
    let tensors = mlx::io::read_safetensors_header(common::tiny_model("llama-tiny").join("model.safetensors"))
        .unwrap()
        .tensors
        .len() as u64;
    assert_eq!(weights[0].int("tensors"), tensors);
    let build = named(&spans, "build_model");
    assert_eq!(build.len(), 1);
    assert_eq!(build[0].parent, Some(load.id));

    // One generation: its span holds the prefill chunks and the decode steps.
    let gens = named(&spans, "generate");
    assert_eq!(gens.len(), 1);
    let g = gens[0];
    assert_eq!(g.level, Level::DEBUG);
    assert_eq!((g.int("prompt_tokens"), g.int("max_tokens"), g.int("generated_tokens")), (9, 5, 5));
    let in_gen = |s: &&SpanRecord| s.parent == Some(g.id);
    let prefills: Vec<&SpanRecord> = named(&spans, "prefill").into_iter().filter(in_gen).collect();
    assert_eq!(prefills.iter().map(|p| (p.int("rows"), p.int("tokens"))).collect::<Vec<_>>(), vec![(1, 4), (1, 4)]);
    assert!(prefills.iter().all(|p| p.level == Level::DEBUG && p.entered == 1));
    let steps: Vec<&SpanRecord> = named(&spans, "decode_step").into_iter().filter(in_gen).collect();
    // One step per token handed out, each with its token.
    assert_eq!(steps.iter().map(|s| s.int("step")).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    assert!(steps.iter().all(|s| s.level == Level::TRACE && s.entered == 1));
    let tokens: Vec<u32> = steps.iter().map(|s| s.int("token") as u32).collect();
    assert_eq!(tokens, ids, "each step records the token it handed out");

    // A batch: one prefill of the padded rows (the last column runs with the
    // first sample), then steps with the rows still running.
    let batches = named(&spans, "batch_generate");
    assert_eq!(batches.len(), 1);
    let b = batches[0];
    assert_eq!((b.int("rows"), b.int("prompt_tokens"), b.int("generated_tokens")), (2, 9, 6));
    let in_batch = |s: &&SpanRecord| s.parent == Some(b.id);
    let prefills: Vec<&SpanRecord> = named(&spans, "prefill").into_iter().filter(in_batch).collect();
    assert_eq!(prefills.iter().map(|p| (p.int("rows"), p.int("tokens"))).collect::<Vec<_>>(), vec![(2, 5)]);
    let steps: Vec<&SpanRecord> = named(&spans, "decode_step").into_iter().filter(in_batch).collect();
    assert_eq!(steps.iter().map(|s| (s.int("step"), s.int("rows"))).collect::<Vec<_>>(), vec![(0, 2), (1, 2), (2, 2)]);
}

#[test]
fn engine_jobs_are_spans_under_the_callers_span() {
    let name = "llama-tiny";
    // An adapter to attach at load and to swap in.
    let adapter = tempfile::tempdir().unwrap();
    let adapted;
    {
        let mut m = model::load(&common::tiny_model(name)).unwrap();
        let mut cfg = lora::AdapterConfig::new(
            0,
            lora::LoraParameters {
                rank: 2,
                scale: 1.0,
                dropout: 0.0,
                keys: Some(vec!["q_proj".into(), "v_proj".into()]),
            },
        );
        adapted = lora::apply_lora(m.model.as_mut(), &mut cfg, mlx::Dtype::Float32).unwrap().len() as u64;
        assert!(adapted > 0);
        lora::save_adapter(m.model.as_mut(), adapter.path(), &cfg).unwrap();
    }

    let (root, root_id) = root("engine_jobs");
    {
        let _root = root.enter();
        let settings = LoadSettings::default().device(Device::Cpu).adapter_path(adapter.path());
        let model = MetalModel::load(&common::tiny_model(name), &settings).unwrap();
        let greedy = GenerateSettings::default().max_tokens(4).ignore_eos(true);
        let out = model.generate("hello there", &greedy, CancelToken::new()).unwrap().complete().unwrap();
        assert_eq!(out.tokens.len(), 4);
        let mut session = model.session().unwrap();
        session.generate("hello there", &greedy, CancelToken::new()).unwrap().complete().unwrap();
        session.generate("hello there, again", &greedy, CancelToken::new()).unwrap().complete().unwrap();
        model.classify(&["one", "two words"], &greedy, CancelToken::new()).unwrap();
        let batch = model.batch_generate(&["three", "four more words"], &greedy, CancelToken::new()).unwrap();
        assert!(batch.iter().all(|r| r.error.is_none() && r.tokens.len() == 4));
        model.inspect_attention("hello", CancelToken::new()).unwrap();
        model.set_adapter(None).unwrap();
        model.set_adapter(Some(adapter.path())).unwrap();
        drop(session);
        model.close().unwrap();
    }
    let spans = under(&all_spans(), root_id);
    let engine_thread = format!("mlx-engine-{name}");

    // Loading on the engine thread, with the adapter attached after it.
    let load = named(&spans, "load");
    assert_eq!(load.len(), 1, "{spans:#?}");
    assert_eq!(load[0].thread, engine_thread);
    assert_eq!(load[0].field("architecture"), Some("llama"));
    assert_eq!(load[0].parent, Some(root_id));
    let tok = named(&spans, "load_tokenizer");
    assert_eq!(tok.len(), 1);
    assert_eq!(tok[0].thread, this_thread());
    let adapters = named(&spans, "load_adapter");
    assert_eq!(adapters.len(), 2, "attached at load, then swapped in: {adapters:#?}");
    assert!(adapters.iter().all(|a| a.int("layers") == adapted && a.field("dir").is_some()));

    // Every job, in order, on the engine thread, a child of the caller's span.
    let jobs = named(&spans, "job");
    let kinds: Vec<&str> = jobs.iter().map(|j| j.field("kind").unwrap()).collect();
    assert_eq!(
        kinds,
        ["generate", "session_turn", "session_turn", "classify", "batch", "inspect", "set_adapter", "set_adapter"]
    );
    assert!(jobs.iter().all(|j| j.level == Level::INFO && j.thread == engine_thread), "{jobs:#?}");
    // A job of several rows (classify, batch) holds its rows' spans and is not entered itself;
    // every other job is entered once (a generation, to prefill its prompt).
    for j in &jobs {
        let rows = matches!(j.field("kind"), Some("classify" | "batch"));
        assert_eq!(j.entered, usize::from(!rows), "{j:#?}");
    }
    assert!(jobs.iter().all(|j| j.parent == Some(root_id)), "{jobs:#?}");
    let generate = jobs[0];
    assert!(generate.int("prompt_tokens") > 0);
    assert_eq!((generate.int("max_tokens"), generate.int("generated_tokens")), (4, 4));
    let (turn1, turn2) = (jobs[1], jobs[2]);
    assert_eq!(turn1.field("session"), turn2.field("session"));
    assert_eq!((turn1.int("cached_tokens"), turn1.int("generated_tokens")), (0, 4));
    assert!(turn2.int("cached_tokens") > 0, "the second turn reuses the first one's prompt: {:?}", turn2.fields);
    assert!(turn2.int("prompt_tokens") > turn1.int("prompt_tokens"));
    assert_eq!(jobs[3].int("prompts"), 2);
    assert_eq!((jobs[4].int("prompts"), jobs[4].int("max_tokens"), jobs[4].int("generated_tokens")), (2, 4, 8));
    assert!(jobs[5].int("prompt_tokens") > 0);
    assert_eq!(jobs[6].field("adapter"), Some("none"));
    assert_eq!(jobs[7].field("adapter"), Some(adapter.path().display().to_string().as_str()));
    // The swapped-in adapter loads inside its job.
    assert_eq!(parent_of(&spans, adapters[1]).map(|p| p.id), Some(jobs[7].id));

    // Inside the jobs: the loop's spans.
    let child_of = |job: &SpanRecord, name: &str| -> Vec<SpanRecord> {
        under(&spans, job.id).into_iter().filter(|s| s.name == name).collect()
    };
    // A generation's prompt goes in inside its job; its decode steps are the scheduler's (one
    // forward pass for every row of the batch), on the engine thread, outside any caller's span.
    assert!(!child_of(generate, "prefill").is_empty(), "the prompt is prefilled inside the generation's job");
    let steps: Vec<SpanRecord> = all_spans()
        .into_iter()
        .filter(|s| s.name == "decode_step" && s.thread == engine_thread && !s.fields.contains_key("step"))
        .collect();
    assert!(steps.len() >= 4, "one scheduler step per token of the generation: {steps:#?}");
    assert!(steps.iter().all(|s| s.int("rows") >= 1 && s.level == Level::TRACE), "{steps:#?}");
    for (job, what) in [(jobs[3], "classify"), (jobs[4], "batch")] {
        let rows = child_of(job, "row");
        assert_eq!(rows.len(), 2, "{what}: a row per prompt: {rows:#?}");
        assert!(rows.iter().all(|r| r.parent == Some(job.id) && r.int("prompt_tokens") > 0), "{rows:#?}");
        assert!(!child_of(job, "prefill").is_empty(), "{what} prefills its rows' prompts");
    }
}

#[test]
fn a_long_prompt_goes_in_between_the_running_rows_decode_steps() {
    // The scheduler prefills at most `prefill_step` prompt tokens between two decode steps, so a
    // long prompt that arrives while another row decodes does not hold that row's stream up.
    let name = "qwen2-tiny";
    let (root, root_id) = root("interleave");
    let _root = root.enter();
    let settings = LoadSettings::default().device(Device::Cpu).backend_option("prefill_step", "8");
    let model = MetalModel::load(&common::tiny_model(name), &settings).unwrap();
    let long = GenerateSettings::default().max_tokens(100_000).ignore_eos(true);
    let mut running = model.generate("hello", &long, CancelToken::new()).unwrap();
    running.next().unwrap().unwrap();
    let short = GenerateSettings::default().max_tokens(2).ignore_eos(true);
    let late = model.generate(&"once upon a time ".repeat(12), &short, CancelToken::new()).unwrap();
    assert_eq!(late.complete().unwrap().tokens.len(), 2);
    drop(running);
    model.close().unwrap();

    let spans = all_spans();
    let engine_thread = format!("mlx-engine-{name}");
    let job = under(&spans, root_id)
        .into_iter()
        .filter(|s| s.name == "job" && s.field("kind") == Some("generate"))
        .max_by_key(|s| s.int("prompt_tokens"))
        .expect("the long prompt's job");
    assert!(job.int("prompt_tokens") > 40, "{job:?}");
    let chunks: Vec<u64> = under(&spans, job.id).iter().filter(|s| s.name == "prefill").map(|s| s.id).collect();
    assert!(chunks.len() >= 5, "a chunk per 8 tokens: {chunks:?}");
    assert!(under(&spans, job.id).iter().filter(|s| s.name == "prefill").all(|s| s.int("tokens") <= 8));
    // Between each two chunks of the long prompt, the running row took a decode step.
    let steps: Vec<u64> = spans
        .iter()
        .filter(|s| s.name == "decode_step" && s.thread == engine_thread && !s.fields.contains_key("step"))
        .map(|s| s.id)
        .collect();
    for pair in chunks.windows(2) {
        assert!(
            steps.iter().any(|&s| pair[0] < s && s < pair[1]),
            "no decode step between prefill chunks {} and {}: the long prompt held up the running row",
            pair[0],
            pair[1]
        );
    }
}
