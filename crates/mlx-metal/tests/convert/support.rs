// SPDX-License-Identifier: EUPL-1.2
//! What the conversion tests share: the mlx-lm interpreter (`MLXR_PYTHON`), running mlx-lm's
//! `convert` on a list of jobs (`mlxlm_convert.py`), our conversion of the same jobs, and the
//! comparison of two converted models tensor for tensor.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::{Value, json};

use mlx_metal::convert::{self, ConvertOptions};
use mlx_metal::mlx::io::read_safetensors_header;
use mlx_metal::mlx::{Dtype, memory};
use mlx_metal::tokenizer::Tokenizer;

/// A tiny fixture model under `testdata/models`.
pub(crate) fn tiny(name: &str) -> PathBuf {
    parity::testdata_dir().join("models").join(name)
}

/// Prints why a test is skipped, or fails it when `MLXR_REQUIRE_REAL_MODELS=1`.
pub(crate) fn skip(what: &str) {
    assert!(!parity::real_models_required(), "{what} (MLXR_REQUIRE_REAL_MODELS=1 makes this an error)");
    eprintln!("note: skipping: {what} (set MLXR_REQUIRE_REAL_MODELS=1 to make this an error)");
}

/// The mlx-lm interpreter: `MLXR_PYTHON` (an interpreter, or a virtualenv's directory).
pub(crate) fn python() -> Option<PathBuf> {
    let Some(p) = std::env::var_os("MLXR_PYTHON").filter(|v| !v.is_empty()).map(PathBuf::from) else {
        skip("MLXR_PYTHON is not set, so mlx_lm.convert cannot give the reference");
        return None;
    };
    if p.is_dir() {
        return ["bin/python", "bin/python3"].iter().map(|b| p.join(b)).find(|b| b.is_file());
    }
    Some(p)
}

/// A real model from the models cache (`cargo xtask fixtures`), or `None` with a note.
pub(crate) fn real(name: &str) -> Option<PathBuf> {
    let Some(dir) = parity::models_dir().map(|d| d.join(name)) else {
        skip("no models cache directory");
        return None;
    };
    if dir.join("config.json").is_file() {
        Some(dir)
    } else {
        skip(&format!("the real model {} is not there", dir.display()));
        None
    }
}

/// One conversion, run by both.
pub(crate) struct Job {
    pub(crate) src: PathBuf,
    pub(crate) name: String,
    pub(crate) options: ConvertOptions,
}

impl Job {
    pub(crate) fn new(src: &Path, name: &str, options: ConvertOptions) -> Job {
        Job { src: src.to_path_buf(), name: name.to_owned(), options }
    }

    fn json(&self, out: &Path) -> Value {
        let o = &self.options;
        let mut job = json!({
            "hf_path": self.src,
            "mlx_path": out,
            "quantize": o.quantize,
            "q_bits": o.q_bits,
            "q_group_size": o.q_group_size,
            "dtype": o.dtype.map(Dtype::name),
            "quant_predicate": o.quant_predicate.map(convert::Recipe::name),
        });
        if o.max_shard_bytes != convert::MAX_SHARD_BYTES {
            job["max_shard_bytes"] = json!(o.max_shard_bytes);
        }
        job
    }
}

/// Runs every job through mlx-lm (one Python process, into `work/mlx_lm/<name>`) and through
/// ours (into `work/ours/<name>`), then compares each pair. Prints both sides' times.
pub(crate) fn convert_and_compare(python: &Path, jobs: &[Job], work: &Path) {
    let (theirs, ours) = (work.join("mlx_lm"), work.join("ours"));
    std::fs::create_dir_all(&theirs).expect("a work directory");
    let list: Vec<Value> = jobs.iter().map(|j| j.json(&theirs.join(&j.name))).collect();
    let list_file = work.join("jobs.json");
    std::fs::write(&list_file, serde_json::to_vec(&list).expect("JSON")).expect("writing the job list");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/convert/mlxlm_convert.py");
    let start = Instant::now();
    let out = Command::new(python).arg(&script).arg(&list_file).output().expect("running mlxlm_convert.py");
    assert!(out.status.success(), "mlx_lm.convert failed: {}", String::from_utf8_lossy(&out.stderr));
    let python_time = start.elapsed();
    let start = Instant::now();
    let mut peaks = Vec::new();
    for job in jobs {
        memory::reset_peak_memory().expect("resetting the peak");
        let summary = convert::convert(&job.src, &ours.join(&job.name), &job.options, &mut |_| {})
            .unwrap_or_else(|e| panic!("converting {}: {e}", job.name));
        let peak = memory::peak_memory().expect("the peak");
        assert_eq!(summary.tensors, tensor_count(&ours.join(&job.name)), "{}", job.name);
        // A few tensors at a time: the largest source, what it becomes, and slack.
        let bound = 3 * largest_tensor(&job.src) + (64 << 20);
        assert!(peak <= bound, "{}: MLX's peak memory {peak} B is over {bound} B", job.name);
        peaks.push(peak);
    }
    let our_time = start.elapsed();
    eprintln!(
        "{} conversions: mlx_lm.convert {:.2} s (one process, start-up included), ours {:.2} s; our peak MLX \
         memory {:.1} MB at most",
        jobs.len(),
        python_time.as_secs_f64(),
        our_time.as_secs_f64(),
        peaks.iter().max().copied().unwrap_or(0) as f64 / 1e6
    );
    for (i, job) in jobs.iter().enumerate() {
        // The tokenizer is the checkpoint's: compared once per checkpoint.
        let first = jobs.iter().position(|j| j.src == job.src) == Some(i);
        assert_same_model(&ours.join(&job.name), &theirs.join(&job.name), &job.name, first);
    }
}

/// The bytes of the checkpoint's largest tensor.
fn largest_tensor(dir: &Path) -> usize {
    let files = std::fs::read_dir(dir).expect("the checkpoint").map(|e| e.expect("an entry").path());
    files
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .flat_map(|p| read_safetensors_header(&p).expect("a header").tensors.into_values())
        .map(|t| (t.data_offsets.1 - t.data_offsets.0) as usize)
        .max()
        .unwrap_or(0)
}

fn tensor_count(dir: &Path) -> usize {
    let index: Value = read_json(&dir.join("model.safetensors.index.json"));
    index["weight_map"].as_object().map_or(0, |m| m.len())
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// Asserts that both directories hold the same tokenizer: the same vocabulary, special tokens,
/// encodings of a few texts and chat template (mlx-lm saves the tokenizer again through
/// transformers, which writes tokenizer.json with other spellings of the same settings, and the
/// template to chat_template.jinja instead of tokenizer_config.json).
fn assert_same_tokenizer(ours: &Path, theirs: &Path, what: &str) {
    let load =
        |d: &Path| Tokenizer::from_dir(d).unwrap_or_else(|e| panic!("{what}: the tokenizer of {}: {e}", d.display()));
    let (a, b) = (load(ours), load(theirs));
    assert_eq!(a.hf().get_vocab_size(true), b.hf().get_vocab_size(true), "{what}: vocabulary");
    assert_eq!((a.bos_id(), a.eos_ids()), (b.bos_id(), b.eos_ids()), "{what}: special tokens");
    for text in ["Hello, world! The café's naïve ümlaut: 東京 🙂", "  two  spaces\n\tand a tab", ""] {
        for special in [false, true] {
            let (x, y) = (a.encode(text, special).expect("encode"), b.encode(text, special).expect("encode"));
            assert_eq!(x, y, "{what}: encoding {text:?}");
        }
    }
    assert_eq!(a.chat_template(), b.chat_template(), "{what}: chat template");
}

/// Asserts that `ours` is the model mlx-lm wrote to `theirs`: config.json, the index, the
/// generation config and the model card byte for byte; the same shard files holding the same
/// tensors (names, dtypes, shapes and bytes); with `tokenizer`, the same tokenizer and chat
/// template.
pub(crate) fn assert_same_model(ours: &Path, theirs: &Path, what: &str, tokenizer: bool) {
    let (our_files, their_files) = (files(ours), files(theirs));
    let shards: Vec<&String> = their_files.iter().filter(|f| f.ends_with(".safetensors")).collect();
    assert_eq!(
        our_files.iter().filter(|f| f.ends_with(".safetensors")).collect::<Vec<_>>(),
        shards,
        "{what}: shard files"
    );
    for f in ["config.json", "model.safetensors.index.json", "generation_config.json", "README.md"] {
        if !their_files.contains(f) {
            assert!(!our_files.contains(f), "{what}: {f} is ours only");
            continue;
        }
        let (a, b) = (std::fs::read(ours.join(f)), std::fs::read(theirs.join(f)));
        let (a, b) = (a.unwrap_or_else(|e| panic!("{what}: our {f}: {e}")), b.expect("their file"));
        if a != b && f == "config.json" {
            let (a, b) = (read_json(&ours.join(f)), read_json(&theirs.join(f)));
            assert_eq!(a["quantization"], b["quantization"], "{what}: quantization blocks");
        }
        assert!(a == b, "{what}: {f} differs:\n{}\n---\n{}", String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
    }
    if tokenizer {
        assert_same_tokenizer(ours, theirs, what);
    }
    let mut count = 0;
    for shard in shards {
        count += assert_same_tensors(&ours.join(shard), &theirs.join(shard), what);
    }
    assert_eq!(count, tensor_count(theirs), "{what}: every tensor of the index compared");
}

/// Asserts that two safetensors files hold the same tensors, byte for byte; returns how many.
fn assert_same_tensors(a: &Path, b: &Path, what: &str) -> usize {
    let (ha, hb) = (read_safetensors_header(a).expect("our shard"), read_safetensors_header(b).expect("their shard"));
    assert_eq!(ha.tensors.keys().collect::<Vec<_>>(), hb.tensors.keys().collect::<Vec<_>>(), "{what}: names");
    assert_eq!(ha.metadata, hb.metadata, "{what}: metadata");
    let (mut fa, mut fb) = (File::open(a).expect("our shard"), File::open(b).expect("their shard"));
    for (name, ta) in &ha.tensors {
        let tb = &hb.tensors[name];
        assert_eq!((ta.dtype, &ta.shape), (tb.dtype, &tb.shape), "{what}: {name}");
        let read = |f: &mut File, start: u64, range: (u64, u64)| {
            let mut buf = vec![0u8; (range.1 - range.0) as usize];
            f.seek(SeekFrom::Start(start + range.0)).expect("seek");
            f.read_exact(&mut buf).expect("read");
            buf
        };
        let (da, db) = (read(&mut fa, ha.data_start, ta.data_offsets), read(&mut fb, hb.data_start, tb.data_offsets));
        if da != db {
            let first = da.iter().zip(&db).position(|(x, y)| x != y).unwrap_or(0);
            panic!("{what}: {name} ({:?} {:?}) differs from byte {first} of {}", ta.dtype, ta.shape, da.len());
        }
    }
    ha.tensors.len()
}
