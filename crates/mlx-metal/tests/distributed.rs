// SPDX-License-Identifier: EUPL-1.2
//! MLX's distributed layer through our FFI: groups, collectives, the launcher,
//! and tensor-parallel models over the ring backend on loopback.
//!
//! Multi-process tests re-execute this test binary as rank processes: the
//! ignored test `rank_process` is the rank's entry point, and the environment
//! variable `MLXR_DIST_TEST_ROLE` says what the rank does. Each rank prints
//! `RESULT <json>` lines that the parent reads back.

#[path = "../../mlx/tests/common/mod.rs"]
mod common;

use std::ffi::OsString;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mlx::distributed::launch::{self, LaunchSpec, RankOutput};
use mlx::distributed::{self, Backend, Group, InitOptions};
use mlx::{Array, Dtype, transforms};
use mlx_metal::Error;
use serde_json::{Value, json};

const ROLE: &str = "MLXR_DIST_TEST_ROLE";
const INIT_MS: &str = "MLXR_DIST_TEST_INIT_MS";

// ---------------------------------------------------------------- helpers

fn rank_args() -> Vec<OsString> {
    ["rank_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"].map(OsString::from).to_vec()
}

fn spec(role: &str, ranks: usize) -> LaunchSpec {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut spec = LaunchSpec::ring(exe, rank_args(), ranks);
    spec.env.push((ROLE.into(), role.into()));
    spec.timeout = Some(Duration::from_secs(50));
    spec
}

/// Multi-process tests run one at a time: their ranks find free loopback
/// ports by binding and releasing them, and a lone rank retries its
/// connection, so two jobs at once could meet on the same port.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static JOBS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    JOBS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn run_job(role: &str, ranks: usize) -> Vec<RankOutput> {
    run_job_with(role, ranks, &[])
}

fn run_job_with(role: &str, ranks: usize, env: &[(&str, &str)]) -> Vec<RankOutput> {
    let mut s = spec(role, ranks);
    s.env.extend(env.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))));
    launch::spawn(&s).and_then(launch::Job::wait).unwrap_or_else(|e| panic!("job {role}: {e}"))
}

/// The `RESULT` line of a rank's stdout.
fn result_of(out: &RankOutput) -> Value {
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("rank {} printed no RESULT line; stdout:\n{}", out.rank, out.stdout));
    serde_json::from_str(line).expect("a RESULT line is JSON")
}

fn f32s(a: &Array) -> Vec<f32> {
    a.to_vec_f32().expect("reading back an array")
}

fn init_timeout() -> Duration {
    let ms = std::env::var(INIT_MS).ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    Duration::from_millis(ms)
}

fn join_ring() -> Group {
    distributed::init(&InitOptions::strict(Backend::Ring).timeout(init_timeout())).unwrap_or_else(|e| {
        eprintln!("rank failed to join: {e}");
        std::process::exit(2)
    })
}

// ---------------------------------------------------------------- rank entry

/// A rank of a job started by the other tests. Run on its own it checks the
/// single-process world (rank 0 of 1).
#[test]
#[ignore = "the entry point of the rank processes the other tests start"]
fn rank_process() {
    let role = std::env::var(ROLE).unwrap_or_default();
    match role.as_str() {
        "ops" => rank_ops(),
        "die" => rank_die(),
        "linger" => rank_linger(),
        "join" => {
            let g = join_ring();
            println!("RESULT {}", json!({"rank": g.rank(), "size": g.size()}));
        }
        r if r.starts_with("tp:") => tp::rank_generate(&r[3..]),
        r if r.starts_with("metal:") => metal::rank_chat(&r[6..]),
        r if r.starts_with("mirror:") => metal::rank_mirrored(&r[7..]),
        _ => {
            let g = distributed::init(&InitOptions::default()).expect("a single-process group");
            assert_eq!((g.rank(), g.size()), (0, 1));
        }
    }
}

fn rank_ops() {
    let g = join_ring();
    let (rank, size) = (g.rank(), g.size());
    let x = Array::from_slice(&[rank as f32 + 1.0; 4], &[4]).expect("x");
    let sum = distributed::all_sum(&x, &g).expect("all_sum");
    let max = distributed::all_max(&x, &g).expect("all_max");
    let min = distributed::all_min(&x, &g).expect("all_min");
    let row = Array::from_slice(&[rank as f32, 10.0 * rank as f32], &[1, 2]).expect("row");
    let gathered = distributed::all_gather(&row, &g).expect("all_gather");
    let ints = Array::from_slice(&[rank * 100 + 7], &[1]).expect("ints");
    let isum = distributed::all_sum(&ints, &g).expect("all_sum int");
    // Point to point: rank 0 sends, rank 1 doubles and sends back.
    let echoed = if rank == 0 {
        let msg = Array::from_slice(&[1.5f32, -2.0, 3.25], &[3]).expect("msg");
        let sent = distributed::send(&msg, 1, &g).expect("send");
        transforms::eval(&[&sent]).expect("eval send");
        let back = distributed::recv(&[3], Dtype::Float32, 1, &g).expect("recv");
        f32s(&back)
    } else {
        let like = mlx::ops::zeros(&[3], Dtype::Float32).expect("like");
        let got = distributed::recv_like(&like, 0, &g).expect("recv_like");
        let doubled = mlx::ops::multiply_scalar(&got, 2.0).expect("double");
        let sent = distributed::send(&doubled, 0, &g).expect("send back");
        transforms::eval(&[&sent]).expect("eval send back");
        f32s(&got)
    };
    let request = if rank == 0 { "{\"prompt\": \"héllo\"}".as_bytes() } else { &b"ignored on rank 1"[..] };
    let broadcast = distributed::broadcast_bytes(request, 0, &g).expect("broadcast_bytes");
    let empty = distributed::broadcast_bytes(&[], 1, &g).expect("broadcast nothing");
    let r = json!({
        "rank": rank,
        "size": size,
        "broadcast": String::from_utf8(broadcast).expect("UTF-8"),
        "empty": empty.len(),
        "sum": f32s(&sum),
        "max": f32s(&max),
        "min": f32s(&min),
        "gather": f32s(&gathered),
        "gather_shape": gathered.shape(),
        "isum": isum.to_vec::<i32>().expect("ints"),
        "echo": echoed,
    });
    println!("RESULT {r}");
}

/// Rank 1 leaves right after joining; rank 0 waits for a message that never
/// comes (its receive fails or hangs: either way the launcher must end the job).
fn rank_die() {
    let g = join_ring();
    if g.rank() == 1 {
        std::process::exit(3);
    }
    let got = distributed::recv(&[1 << 16], Dtype::Float32, 1, &g).expect("recv");
    let _ = transforms::eval(&[&got]);
    eprintln!("rank 0: the receive from a dead peer ended");
    std::process::exit(4);
}

/// Rank 0 ends successfully without a word to rank 1, which waits for it
/// (as a follower whose leader never closed its model would).
fn rank_linger() {
    let g = join_ring();
    if g.rank() == 0 {
        std::process::exit(0);
    }
    let got = distributed::recv(&[1], Dtype::Float32, 0, &g).expect("recv");
    let _ = transforms::eval(&[&got]);
    loop {
        std::thread::park();
    }
}

// ---------------------------------------------------------------- single process

#[test]
fn single_process_group_is_rank_0_of_1_and_collectives_are_identity() {
    let g = distributed::init(&InitOptions::default()).expect("a non-strict init without a launcher");
    assert_eq!((g.rank(), g.size()), (0, 1));
    let x = Array::from_slice(&[1.0f32, 2.0, 3.0], &[3]).expect("x");
    assert_eq!(f32s(&distributed::all_sum(&x, &g).expect("all_sum")), vec![1.0, 2.0, 3.0]);
    assert_eq!(f32s(&distributed::all_gather(&x, &g).expect("all_gather")), vec![1.0, 2.0, 3.0]);
    assert_eq!(f32s(&distributed::all_max(&x, &g).expect("all_max")), vec![1.0, 2.0, 3.0]);
    assert_eq!(f32s(&distributed::all_min(&x, &g).expect("all_min")), vec![1.0, 2.0, 3.0]);
    assert!(format!("{g:?}").contains("size: 1"));
}

#[test]
fn point_to_point_needs_another_rank() {
    let g = distributed::init(&InitOptions::default()).expect("group");
    let x = Array::from_slice(&[1.0f32], &[1]).expect("x");
    for e in [
        distributed::send(&x, 0, &g).err(),
        distributed::send(&x, 5, &g).err(),
        distributed::recv(&[1], Dtype::Float32, -1, &g).err(),
        distributed::recv_like(&x, 1, &g).err(),
    ] {
        let e = e.expect("an error");
        assert!(matches!(e, Error::InvalidArgument { .. }), "{e}");
        assert!(e.to_string().contains("is not another rank of this group"), "{e}");
    }
}

#[test]
fn broadcast_checks_its_root_and_dtype() {
    let g = distributed::init(&InitOptions::default()).expect("group");
    let x = Array::from_slice(&[7i32, 8], &[2]).expect("x");
    assert_eq!(distributed::broadcast(&x, 0, &g).expect("root 0").to_vec::<i32>().expect("ints"), vec![7, 8]);
    assert_eq!(distributed::broadcast_bytes(b"abc", 0, &g).expect("bytes"), b"abc".to_vec());
    let e = distributed::broadcast(&x, 1, &g).expect_err("no rank 1");
    assert!(e.to_string().contains("root 1 is not a rank of a group of 1"), "{e}");
    let flags = Array::from_slice(&[true], &[1]).expect("bool");
    let e = distributed::broadcast(&flags, 0, &g).expect_err("bool");
    assert!(e.to_string().contains("cast them to uint8"), "{e}");
}

#[test]
fn a_single_process_group_cannot_split() {
    let g = distributed::init(&InitOptions::default()).expect("group");
    let e = g.split(0, -1).expect_err("MLX's empty group cannot split");
    assert!(e.to_string().starts_with("group_split:"), "{e}");
}

#[test]
fn strict_ring_without_a_launcher_names_the_variables() {
    let _serial = serial();
    if launch::is_rank_process() {
        eprintln!("note: MLX_RANK is set in this environment; skipped");
        return;
    }
    let e = distributed::init(&InitOptions::strict(Backend::Ring).timeout(Duration::from_secs(20)))
        .expect_err("no MLX_RANK / MLX_HOSTFILE");
    let msg = e.to_string();
    assert!(msg.contains("MLX_RANK") && msg.contains("MLX_HOSTFILE"), "{msg}");
}

#[test]
fn backends_parse_and_report_availability() {
    for b in Backend::ALL {
        assert_eq!(b.to_string().parse::<Backend>().expect("round trip"), b);
    }
    let e = "tcp".parse::<Backend>().expect_err("unknown backend");
    assert!(e.to_string().contains("expected one of any, ring, mpi, nccl, jaccl"), "{e}");
    assert!(distributed::is_available(Backend::Ring).expect("is_available"), "MLX always builds the ring backend");
    assert!(distributed::is_available(Backend::Any).expect("is_available"));
}

#[test]
fn shard_ranges_and_errors() {
    use mlx_metal::model::tp::Shard;
    let s = Shard::new(1, 2).expect("shard");
    assert_eq!(s.range(8, "heads").expect("even"), (4, 4));
    assert_eq!(s.range(9, "heads").expect("uneven"), (4, 5));
    assert_eq!(Shard::new(0, 2).and_then(|s| s.range(9, "heads")).expect("uneven"), (0, 4));
    let e = Shard::new(0, 4).and_then(|s| s.range(3, "kv heads")).expect_err("too few");
    assert!(e.to_string().contains("kv heads = 3 cannot be split over 4 tensor-parallel ranks"), "{e}");
    assert!(Shard::new(2, 2).is_err() && Shard::new(-1, 2).is_err() && Shard::new(0, 0).is_err());
}

#[test]
fn launcher_rejects_what_it_cannot_start() {
    let _serial = serial();
    let mut s = LaunchSpec::ring("/nonexistent/mlxr-rank", Vec::new(), 2);
    let e = launch::spawn(&s).err().expect("a missing program");
    assert!(e.to_string().contains("cannot start rank 0"), "{e}");
    s.ranks = 0;
    assert!(launch::spawn(&s).err().expect("no ranks").to_string().contains("at least one rank"));
    s.ranks = 2;
    s.backend = Backend::Mpi;
    assert!(launch::spawn(&s).err().expect("mpi").to_string().contains("mpirun"));
}

#[test]
fn loopback_hostfile_is_mlx_launch_json() {
    let _serial = serial();
    let hosts = launch::loopback_hosts(3).expect("ports");
    assert_eq!(hosts.len(), 3);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hosts.json");
    launch::write_hostfile(&path, &hosts).expect("write");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    let ranks = v.as_array().expect("a list of ranks");
    for r in ranks {
        let addr = r.as_array().and_then(|a| a.first()).and_then(Value::as_str).expect("an address");
        assert!(addr.starts_with("127.0.0.1:") && addr[10..].parse::<u16>().is_ok_and(|p| p > 0), "{addr}");
    }
}

// ---------------------------------------------------------------- two processes

#[test]
fn two_ranks_over_the_ring_sum_gather_and_exchange() {
    let _serial = serial();
    let outs = run_job("ops", 2);
    assert_eq!(outs.len(), 2);
    for out in &outs {
        let r = result_of(out);
        assert_eq!(r["rank"], json!(out.rank));
        assert_eq!(r["size"], json!(2));
        assert_eq!(r["sum"], json!([3.0, 3.0, 3.0, 3.0]));
        assert_eq!(r["max"], json!([2.0, 2.0, 2.0, 2.0]));
        assert_eq!(r["min"], json!([1.0, 1.0, 1.0, 1.0]));
        assert_eq!(r["gather"], json!([0.0, 0.0, 1.0, 10.0]));
        assert_eq!(r["gather_shape"], json!([2, 2]));
        assert_eq!(r["isum"], json!([114]));
        assert_eq!(r["broadcast"], json!("{\"prompt\": \"héllo\"}"));
        assert_eq!(r["empty"], json!(0));
        let echo = if out.rank == 0 { json!([3.0, -4.0, 6.5]) } else { json!([1.5, -2.0, 3.25]) };
        assert_eq!(r["echo"], echo, "rank {}", out.rank);
    }
}

#[test]
fn a_rank_that_never_joins_is_a_clear_error_within_the_timeout() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let hostfile = dir.path().join("hosts.json");
    launch::write_hostfile(&hostfile, &launch::loopback_hosts(2).expect("ports")).expect("hostfile");
    // Rank 0 waits in accept, rank 1 retries its connection: each alone.
    for rank in ["0", "1"] {
        let start = Instant::now();
        let out = Command::new(std::env::current_exe().expect("exe"))
            .args(rank_args())
            .env(ROLE, "join")
            .env(INIT_MS, "1500")
            .env(launch::RANK_ENV, rank)
            .env(launch::HOSTFILE_ENV, &hostfile)
            .stdin(Stdio::null())
            .output()
            .expect("run a lone rank");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "rank {rank}: {stderr}");
        assert!(
            stderr.contains(&format!("rank {rank}: not every rank joined the ring group within 1.5 s")),
            "rank {rank}: {stderr}"
        );
        assert!(start.elapsed() < Duration::from_secs(30), "rank {rank} took {:?}", start.elapsed());
    }
}

#[test]
fn a_rank_that_dies_ends_the_job_with_a_clear_error() {
    let _serial = serial();
    let start = Instant::now();
    let e = launch::spawn(&spec("die", 2)).and_then(launch::Job::wait).expect_err("rank 1 exits with status 3");
    let msg = e.to_string();
    assert!(msg.contains("of 2 failed") && msg.contains("stopped the other ranks"), "{msg}");
    assert!(msg.contains("rank 1 of 2 failed") || msg.contains("rank 0 of 2 failed"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(40), "took {:?}", start.elapsed());
}

#[test]
fn ranks_left_running_after_rank_0_finished_are_stopped_after_the_grace_period() {
    let _serial = serial();
    let mut s = spec("linger", 2);
    s.follower_grace = Some(Duration::from_secs(2));
    let start = Instant::now();
    let e = launch::spawn(&s).and_then(launch::Job::wait).expect_err("rank 1 never ends");
    let msg = e.to_string();
    assert!(msg.contains("rank 0 finished but rank(s) 1 were still running 2 s later"), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(40), "took {:?}", start.elapsed());
}

#[test]
fn a_job_past_its_deadline_is_killed() {
    let _serial = serial();
    // Rank 0 of a job of one waits for a rank 1 nobody starts; the job's
    // deadline is shorter than the rank's own init timeout.
    let mut s = spec("join", 1);
    s.env.push((INIT_MS.into(), "60000".into()));
    let dir = tempfile::tempdir().expect("tempdir");
    let hostfile = dir.path().join("hosts.json");
    launch::write_hostfile(&hostfile, &launch::loopback_hosts(2).expect("ports")).expect("hostfile");
    s.env.push((launch::HOSTFILE_ENV.into(), hostfile.into()));
    s.timeout = Some(Duration::from_millis(1500));
    let start = Instant::now();
    let e = launch::spawn(&s).and_then(launch::Job::wait).expect_err("the deadline passes");
    assert!(e.to_string().contains("did not finish in time; killed the ranks still running (0)"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(20));
}

// ---------------------------------------------------------------- tensor parallelism

mod tp {
    use std::path::{Path, PathBuf};

    use mlx_metal::model::tp::{TensorParallel, VocabLayout};
    use mlx_metal::model::{self, LanguageModel};
    use std::ops::ControlFlow;

    use mlx::{Array, memory, ops};
    use mlx_metal::batch;
    use mlx_metal::sample::{Sampler, SamplerConfig};
    use serde_json::{Value, json};

    use super::{join_ring, result_of, run_job_with};

    /// A text prompt (tokenised by the model's tokenizer) instead of [`PROMPT`].
    const TEXT: &str = "MLXR_DIST_TEST_TEXT";
    /// Comma-separated prompt ids instead of [`PROMPT`] (no tokenizer to load).
    const IDS: &str = "MLXR_DIST_TEST_IDS";
    /// How many tokens to decode instead of [`TOKENS`].
    const COUNT: &str = "MLXR_DIST_TEST_TOKENS";
    /// The ranks' vocabulary layout (`sharded` when absent).
    const VOCAB: &str = "MLXR_DIST_TEST_VOCAB";

    fn token_count(env: &[(&str, &str)]) -> usize {
        let from_env = std::env::var(COUNT).ok();
        let v = env.iter().find(|(k, _)| *k == COUNT).map(|(_, v)| v.to_string()).or(from_env);
        v.and_then(|v| v.parse().ok()).unwrap_or(TOKENS)
    }

    /// Prompt ids every fixture's vocabulary holds.
    const PROMPT: [i32; 8] = [1, 5, 9, 42, 7, 3, 100, 12];
    const TOKENS: usize = 12;

    /// Greedy decoding of `n` tokens after `prompt`, one token at a time,
    /// with the gap between the two best logits at each step.
    fn greedy(model: &dyn LanguageModel, prompt: &[i32], n: usize) -> (Vec<u32>, Vec<f32>) {
        let mut caches = model.make_cache().expect("caches");
        let mut input = Array::from_slice(prompt, &[1, prompt.len() as i32]).expect("prompt");
        let mut out = Vec::with_capacity(n);
        let mut gaps = Vec::with_capacity(n);
        for _ in 0..n {
            let logits = model.forward(&input, &mut caches).expect("forward");
            let l = logits.dim(1).expect("length");
            let last = ops::slice_axis(&logits, 1, l - 1, l).expect("last position");
            let id = ops::argmax(&last, -1, false).expect("argmax").to_vec::<u32>().expect("id")[0];
            let row = last.to_vec_f32().expect("logits");
            let best = row[id as usize];
            let second =
                row.iter().enumerate().filter(|&(i, _)| i != id as usize).map(|(_, &v)| v).fold(f32::MIN, f32::max);
            gaps.push(best - second);
            out.push(id);
            input = Array::from_slice(&[id as i32], &[1, 1]).expect("next input");
        }
        (out, gaps)
    }

    /// Greedy tokens of a left-padded batch of two rows (`prompt` and its
    /// last 3 tokens), prefilled in chunks of 4 columns.
    fn batched(model: &dyn LanguageModel, prompt: &[i32]) -> Vec<Vec<u32>> {
        let ids: Vec<u32> = prompt.iter().map(|&i| i as u32).collect();
        let rows: [&[u32]; 2] = [&ids, &ids[ids.len().saturating_sub(3)..]];
        let sampler = Sampler::new(SamplerConfig::default()).expect("a greedy sampler");
        let mut out = vec![Vec::new(); rows.len()];
        batch::generate(model, &rows, &sampler, &[4, 4], 4, &|| false, |row, step| {
            out[row].push(step.id);
            Ok(ControlFlow::Continue(()))
        })
        .expect("a batch");
        out
    }

    /// Fingerprints of the bits of `embed(prompt)` and of `head` applied to
    /// those embeddings (the vocabulary-parallel parts alone, no blocks).
    fn embed_and_head_bits(model: &dyn LanguageModel, prompt: &[i32]) -> (String, String) {
        let ids = Array::from_slice(prompt, &[1, prompt.len() as i32]).expect("ids");
        let h = model.embed(&ids).expect("embed");
        let logits = model.head(&h).expect("head");
        let bits = |a: &Array| {
            let v = ops::astype(a, mlx::Dtype::Float32).expect("float32").to_vec_f32().expect("values");
            let h = v
                .iter()
                .fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ u64::from(x.to_bits())).wrapping_mul(0x100_0000_01b3));
            format!("{h:016x} ({} values)", v.len())
        };
        (bits(&h), bits(&logits))
    }

    /// Bytes this process has read through `read(2)`-like calls (Linux's
    /// `/proc/self/io` `rchar`), when the system says.
    fn bytes_read() -> Option<u64> {
        let io = std::fs::read_to_string("/proc/self/io").ok()?;
        io.lines().find_map(|l| l.strip_prefix("rchar: ")).and_then(|v| v.trim().parse().ok())
    }

    /// A rank (or the single process, `single:` roles) loads and decodes.
    pub(super) fn rank_generate(arg: &str) {
        let read_before = bytes_read();
        let (single, dir) = match arg.strip_prefix("single:") {
            Some(d) => (true, d),
            None => (false, arg),
        };
        let (rank, loaded) = if single {
            (0, model::load(Path::new(dir)))
        } else {
            let g = join_ring();
            let rank = g.rank();
            let layout: VocabLayout =
                std::env::var(VOCAB).map_or(Ok(VocabLayout::default()), |v| v.parse()).expect("a layout");
            (rank, model::load_sharded(Path::new(dir), TensorParallel::new(g).with_vocab_layout(layout)))
        };
        let loaded = loaded.unwrap_or_else(|e| {
            eprintln!("rank {rank}: loading failed: {e}");
            std::process::exit(5)
        });
        let ids = std::env::var(IDS).ok().map(|v| v.split(',').map(|i| i.trim().parse().expect("an id")).collect());
        let prompt: Vec<i32> = match (ids, std::env::var(TEXT)) {
            (Some(ids), _) => ids,
            (None, Ok(text)) => mlx_metal::tokenizer::Tokenizer::from_dir(dir)
                .and_then(|t| t.encode_prompt(&text))
                .expect("tokenising the prompt")
                .into_iter()
                .map(|id| id as i32)
                .collect(),
            (None, Err(_)) => PROMPT.to_vec(),
        };
        let started = std::time::Instant::now();
        let (tokens, gaps) = greedy(loaded.model.as_ref(), &prompt, token_count(&[]));
        let generate_ms = started.elapsed().as_millis() as u64;
        // What stays allocated is the weights (caches and temporaries are gone).
        let _ = memory::clear_cache();
        let active = memory::active_memory().expect("active memory");
        let peak = memory::peak_memory().expect("peak memory");
        let read = read_before.zip(bytes_read()).map(|(a, b)| b - a);
        // After the figures: a batch resets MLX's peak.
        let batch = batched(loaded.model.as_ref(), &prompt);
        let (embed_bits, head_bits) = embed_and_head_bits(loaded.model.as_ref(), &prompt);
        println!(
            "RESULT {}",
            json!({"rank": rank, "tokens": tokens, "gaps": gaps, "batch": batch, "embed_bits": embed_bits, "head_bits": head_bits, "generate_ms": generate_ms, "active_bytes": active, "peak_bytes": peak, "read_bytes": read})
        );
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models").join(name)
    }

    /// The single process's and the 2 ranks' results on `dir`.
    fn run_pair(dir: &Path, env: &[(&str, &str)]) -> (Value, Vec<Value>) {
        let d = dir.to_str().expect("a UTF-8 path");
        let single = result_of(&run_job_with(&format!("tp:single:{d}"), 1, env)[0]);
        let ranks: Vec<Value> = run_job_with(&format!("tp:{d}"), 2, env).iter().map(result_of).collect();
        assert_eq!(single["tokens"].as_array().map(Vec::len), Some(token_count(env)), "{single}");
        (single, ranks)
    }

    /// Each rank must hold less than the single process; returns the figures.
    fn memory(dir: &Path, single: &Value, ranks: &[Value]) -> (u64, Vec<u64>) {
        let single_bytes = single["active_bytes"].as_u64().expect("bytes");
        let per_rank: Vec<u64> = ranks.iter().map(|r| r["active_bytes"].as_u64().expect("bytes")).collect();
        for b in &per_rank {
            assert!(*b < single_bytes, "a rank holds {b} bytes, the single process {single_bytes}");
        }
        let ms: Vec<&Value> = std::iter::once(single).chain(ranks).map(|r| &r["generate_ms"]).collect();
        eprintln!(
            "{}: single process {single_bytes} bytes; per rank {per_rank:?}; generation ms {ms:?}",
            dir.display()
        );
        (single_bytes, per_rank)
    }

    /// The first `n` greedy tokens of every rank equal the single process's.
    fn assert_same_tokens(dir: &Path, single: &Value, ranks: &[Value], n: usize) {
        let want: Vec<Value> = single["tokens"].as_array().expect("tokens").iter().take(n).cloned().collect();
        for r in ranks {
            let got: Vec<Value> = r["tokens"].as_array().expect("tokens").iter().take(n).cloned().collect();
            assert_eq!(
                got,
                want,
                "rank {} diverged from the single process on {}; top-2 logit gaps: single {}, rank {}",
                r["rank"],
                dir.display(),
                single["gaps"],
                r["gaps"]
            );
        }
    }

    /// Greedy tokens of the single process and of 2 tensor-parallel ranks
    /// must be identical; each rank must hold less than the whole model.
    fn check_identical(dir: &Path) -> (u64, Vec<u64>) {
        let (single, ranks) = run_pair(dir, &[]);
        assert_same_tokens(dir, &single, &ranks, TOKENS);
        assert_same_batch(dir, &single, &ranks);
        assert_same_vocabulary_bits(dir, &single, &ranks);
        memory(dir, &single, &ranks)
    }

    /// A left-padded batch of two prompts decodes the same on every rank as
    /// in the single process.
    fn assert_same_batch(dir: &Path, single: &Value, ranks: &[Value]) {
        assert_eq!(single["batch"].as_array().map(Vec::len), Some(2), "{single}");
        for r in ranks {
            assert_eq!(r["batch"], single["batch"], "rank {}'s batch on {}", r["rank"], dir.display());
        }
    }

    /// The embedding's sum and the head's gather are exact: embeddings and
    /// the head's logits (without the blocks) have the single process's bits.
    fn assert_same_vocabulary_bits(dir: &Path, single: &Value, ranks: &[Value]) {
        for r in ranks {
            assert_eq!(r["embed_bits"], single["embed_bits"], "rank {}'s embeddings on {}", r["rank"], dir.display());
            assert_eq!(r["head_bits"], single["head_bits"], "rank {}'s head logits on {}", r["rank"], dir.display());
        }
    }

    /// A float32 copy of the model in `dir` (weights cast, other files copied).
    fn float32_copy(dir: &Path) -> tempfile::TempDir {
        let out = tempfile::tempdir().expect("tempdir");
        for entry in std::fs::read_dir(dir).expect("model dir").flatten() {
            let p = entry.path();
            let name = entry.file_name();
            if p.extension().is_some_and(|x| x == "safetensors") {
                let st = mlx::io::load_safetensors(&p).expect("weights");
                let cast: Vec<(String, Array)> = st
                    .tensors
                    .iter()
                    .map(|(k, a)| (k.clone(), ops::astype(a, mlx::Dtype::Float32).expect("cast")))
                    .collect();
                mlx::io::save_safetensors(out.path().join(&name), cast.iter().map(|(k, a)| (k, a)), &st.metadata)
                    .expect("save");
            } else if p.is_file() {
                std::fs::copy(&p, out.path().join(&name)).expect("copy");
            }
        }
        out
    }

    #[test]
    fn llama_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        check_identical(&fixture("llama-tiny"));
    }

    #[test]
    fn qwen3_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        check_identical(&fixture("qwen3-tiny"));
    }

    #[test]
    fn qwen2_with_qkv_biases_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        check_identical(&fixture("qwen2-tiny"));
    }

    #[test]
    fn quantised_llama_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        check_identical(&fixture("llama-tiny-8bit"));
    }

    #[test]
    fn gemma3_with_one_kv_head_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        check_identical(&fixture("gemma3-tiny"));
    }

    #[test]
    fn llama3_with_a_vocabulary_that_does_not_divide_matches_the_single_process() {
        let _serial = super::serial();
        // 389 rows over 2 ranks: 194 and 195; rank 0 pads its logits by one
        // for the gather, and the padding is sliced away.
        check_identical(&fixture("llama3-tiny"));
    }

    #[test]
    fn gemma3_multimodal_checkpoint_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        // The language model under `language_model.`, vision tower ignored.
        check_identical(&fixture("gemma3-tiny-mm"));
    }

    #[test]
    fn the_replicated_vocabulary_gives_the_same_tokens_and_holds_more() {
        let _serial = super::serial();
        let dir = fixture("gemma3-tiny");
        let (single, sharded) = run_pair(&dir, &[]);
        let d = dir.to_str().expect("a UTF-8 path");
        let replicated: Vec<Value> =
            run_job_with(&format!("tp:{d}"), 2, &[(VOCAB, "replicated")]).iter().map(result_of).collect();
        assert_same_tokens(&dir, &single, &sharded, TOKENS);
        assert_same_tokens(&dir, &single, &replicated, TOKENS);
        // The tied 512 × 64 bfloat16 table: each sharded rank holds 256 rows.
        let table = 512 * 64 * 2;
        for (s, r) in sharded.iter().zip(&replicated) {
            let (s, r) = (s["active_bytes"].as_i64().expect("bytes"), r["active_bytes"].as_i64().expect("bytes"));
            let saved = (r - s) as f64 / f64::from(table / 2);
            assert!((0.9..1.1).contains(&saved), "a rank holds {s} bytes sharded, {r} replicated");
        }
    }

    #[test]
    fn a_quantised_shard_off_the_group_boundary_is_a_clear_error() {
        let _serial = super::serial();
        // qwen3-tiny-4bit: o_proj has 64 inputs in groups of 64; 32 per rank.
        let d = fixture("qwen3-tiny-4bit");
        let spec = super::spec(&format!("tp:{}", d.display()), 2);
        let e = mlx::distributed::launch::spawn(&spec)
            .and_then(mlx::distributed::launch::Job::wait)
            .expect_err("the shard cannot be quantised");
        let msg = e.to_string();
        assert!(msg.contains("does not fall on quantisation groups of 64"), "{msg}");
    }

    const SMOLLM2_PROMPT: &str = "The capital of France is Paris. The capital of Italy is";

    #[test]
    fn smollm2_over_two_ranks_matches_the_single_process() {
        let _serial = super::serial();
        let Some(dir) = crate::common::real_model("smollm2-135m-instruct") else { return };
        // In bfloat16 the ranks' partial sums round differently from one
        // matmul, so logits move by an ulp (0.125 near 20): tokens agree up
        // to the first near tie of the single process (gap below 0.5).
        let (single, ranks) = run_pair(&dir, &[(TEXT, SMOLLM2_PROMPT)]);
        assert_same_until_near_tie(&dir, &single, &ranks);
        assert_same_vocabulary_bits(&dir, &single, &ranks);
        // 9 heads over 3 kv groups split 1:2, the MLP 768:768, the tied
        // embedding (28.3M of 134.5M parameters) 24576:24576 rows.
        let (single_bytes, per_rank) = memory(&dir, &single, &ranks);
        for b in per_rank {
            assert!((b as f64) < 0.6 * single_bytes as f64, "a rank holds {b} of {single_bytes} bytes");
        }
        // No rank ever held the whole model, and none read it all from disk.
        let single_read = single["read_bytes"].as_u64();
        for r in &ranks {
            let peak = r["peak_bytes"].as_u64().expect("peak");
            assert!((peak as f64) < 0.8 * single_bytes as f64, "rank {} peaked at {peak} bytes", r["rank"]);
            if let (Some(all), Some(read)) = (single_read, r["read_bytes"].as_u64()) {
                assert!(
                    (read as f64) < 0.75 * all as f64,
                    "rank {} read {read} bytes, the single process {all}",
                    r["rank"]
                );
            }
            eprintln!(
                "rank {}: peak {peak} bytes, read {} bytes (single process: {single_read:?})",
                r["rank"], r["read_bytes"]
            );
        }
    }

    /// Tokens agree up to the first near tie of the single process (top-2
    /// gap below 0.5, a few bfloat16 ulps); returns how many were compared.
    fn assert_same_until_near_tie(dir: &Path, single: &Value, ranks: &[Value]) -> usize {
        let gaps: Vec<f64> = single["gaps"].as_array().expect("gaps").iter().filter_map(Value::as_f64).collect();
        let decisive = gaps.iter().position(|&g| g < 0.5).unwrap_or(gaps.len());
        assert!(decisive >= 2, "the prompt gives near ties at once: {gaps:?}");
        assert_same_tokens(dir, single, ranks, decisive);
        decisive
    }

    #[test]
    fn quantised_gemma3_270m_over_two_ranks_agrees_with_the_single_process() {
        let _serial = super::serial();
        let Some(dir) = crate::common::real_model("gemma3-270m-4bit") else { return };
        // 4 query heads, 1 key/value head: each rank holds the kv head and 2
        // query heads; o_proj's 1024 inputs split 512:512 on groups of 64.
        // SMOLLM2_PROMPT in Gemma 3's tokenizer (with BOS): its 33 MB
        // tokenizer.json takes seconds to load in every rank.
        let ids = "2,818,5279,529,7001,563,9079,236761,669,5279,529,11702,563";
        let (single, ranks) = run_pair(&dir, &[(IDS, ids), (COUNT, "6")]);
        let n = assert_same_until_near_tie(&dir, &single, &ranks);
        eprintln!("gemma3-270m-4bit: {n} tokens compared");
        assert_same_vocabulary_bits(&dir, &single, &ranks);
        // The 262144 × 640 embedding (tied head) is most of the model; each
        // rank holds half its rows.
        let (single_bytes, per_rank) = memory(&dir, &single, &ranks);
        for b in per_rank {
            assert!((b as f64) < 0.6 * single_bytes as f64, "a rank holds {b} of {single_bytes} bytes");
        }
    }

    #[test]
    fn gemma3_270m_over_two_ranks_agrees_with_the_single_process() {
        let _serial = super::serial();
        let Some(dir) = crate::common::real_model("gemma3-270m") else { return };
        let ids = "2,818,5279,529,7001,563,9079,236761,669,5279,529,11702,563";
        let (single, ranks) = run_pair(&dir, &[(IDS, ids), (COUNT, "6")]);
        let n = assert_same_until_near_tie(&dir, &single, &ranks);
        eprintln!("gemma3-270m: {n} tokens compared");
        assert_same_vocabulary_bits(&dir, &single, &ranks);
        let (single_bytes, per_rank) = memory(&dir, &single, &ranks);
        for b in per_rank {
            assert!((b as f64) < 0.6 * single_bytes as f64, "a rank holds {b} of {single_bytes} bytes");
        }
    }

    #[test]
    fn quantised_smollm2_over_two_ranks_agrees_with_the_single_process() {
        let _serial = super::serial();
        let Some(dir) = crate::common::real_model("smollm2-135m-instruct-4bit") else { return };
        // o_proj's 576 inputs split 192:384, both on groups of 64.
        let (single, ranks) = run_pair(&dir, &[(TEXT, SMOLLM2_PROMPT)]);
        let n = assert_same_until_near_tie(&dir, &single, &ranks);
        eprintln!("smollm2-135m-instruct-4bit: {n} tokens compared");
        assert_same_vocabulary_bits(&dir, &single, &ranks);
        memory(&dir, &single, &ranks);
    }

    #[test]
    fn smollm2_in_float32_over_two_ranks_gives_identical_greedy_tokens() {
        let _serial = super::serial();
        let Some(dir) = crate::common::real_model("smollm2-135m-instruct") else { return };
        let f32_dir = float32_copy(&dir);
        let (single, ranks) = run_pair(f32_dir.path(), &[(TEXT, SMOLLM2_PROMPT)]);
        assert_same_tokens(f32_dir.path(), &single, &ranks, TOKENS);
        assert_same_batch(f32_dir.path(), &single, &ranks);
        assert_same_vocabulary_bits(f32_dir.path(), &single, &ranks);
    }
}

// ---------------------------------------------------------------- through MetalModel

mod metal {
    use std::path::Path;

    use inference_core::{
        CancelToken, ChatSession, Error as CoreError, GenerateSettings, LoadSettings, Message, TextModel,
    };
    use mlx_metal::MetalModel;
    use serde_json::{Value, json};

    use super::{result_of, run_job, run_job_with};

    /// The `tp_vocab` option the ranks load with.
    const TP_VOCAB: &str = "MLXR_DIST_TEST_TP_VOCAB";

    fn tp_settings() -> LoadSettings {
        LoadSettings::default()
            .backend_option("tensor_parallel", "2")
            .backend_option("distributed_backend", "ring")
            .backend_option("distributed_timeout_s", "20")
    }

    fn chat(model: &MetalModel) -> (Vec<u32>, String) {
        let settings = GenerateSettings::default().max_tokens(10).temperature(0.0).ignore_eos(true);
        let stream = model.chat(&[Message::user("Hello there")], &settings, CancelToken::new()).expect("chat");
        let tokens: Vec<_> = stream.map(|t| t.expect("a token")).collect();
        (tokens.iter().map(|t| t.id).collect(), tokens.iter().map(|t| t.text.as_str()).collect())
    }

    /// A rank: the model loaded through `MetalModel` with the
    /// `tensor_parallel` backend option (the engine thread joins the group).
    pub(super) fn rank_chat(dir: &str) {
        let rank = mlx::distributed::launch::rank_from_env().expect("MLX_RANK").expect("a rank");
        let mut settings = tp_settings();
        if let Ok(layout) = std::env::var(TP_VOCAB) {
            settings = settings.backend_option("tp_vocab", layout);
        }
        let model = MetalModel::load(Path::new(dir), &settings).unwrap_or_else(|e| {
            eprintln!("rank {rank}: {e}");
            std::process::exit(6)
        });
        if rank == 0 {
            let (ids, text) = chat(&model);
            println!("RESULT {}", json!({"rank": rank, "ids": ids, "text": text}));
        } else {
            // The other ranks run rank 0's calls (see rank_mirrored).
            model.follow().expect("follow rank 0");
            println!("RESULT {}", json!({"rank": rank}));
        }
        model.close().expect("close");
    }

    #[test]
    fn metal_model_with_the_tensor_parallel_option_matches_the_single_process() {
        let _serial = super::serial();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen3-tiny");
        let single = MetalModel::load(&dir, &LoadSettings::default()).expect("single process");
        let (ids, text) = chat(&single);
        single.close().expect("close");
        assert_eq!(ids.len(), 10);
        // The vocabulary sharded (the default) and replicated; rank 0 answers,
        // the other rank follows it.
        for layout in ["sharded", "replicated"] {
            for out in run_job_with(&format!("metal:{}", dir.display()), 2, &[(TP_VOCAB, layout)]).iter().take(1) {
                let r = result_of(out);
                assert_eq!(r["ids"], json!(ids), "rank {} ({layout})", out.rank);
                assert_eq!(r["text"], json!(text), "rank {} ({layout})", out.rank);
            }
        }
    }

    fn greedy(n: usize) -> GenerateSettings {
        GenerateSettings::default().max_tokens(n).temperature(0.0).ignore_eos(true)
    }

    fn ids_of(stream: inference_core::TokenStream) -> Vec<u32> {
        stream.map(|t| t.expect("a token").id).collect()
    }

    /// Every kind of mirrored call on `model`, greedy: their token ids.
    fn scenario(model: &MetalModel) -> Value {
        let generated =
            ids_of(model.generate("The quick brown fox", &greedy(8), CancelToken::new()).expect("generate"));
        // Refused on rank 0 before anything reaches the other ranks.
        assert!(matches!(model.generate("", &greedy(8), CancelToken::new()), Err(CoreError::EmptyPrompt)));
        let stopped = model
            .generate(
                "The quick brown fox",
                &greedy(8).ignore_eos(false).stop_strings(["e".to_owned()]),
                CancelToken::new(),
            )
            .expect("generate with a stop string")
            .collect_text()
            .expect("text");
        let mut session = model.session().expect("a session");
        let mut messages = vec![Message::user("Hello there")];
        let mut turns = Vec::new();
        for next in ["And again?", "Once more."] {
            let tokens: Vec<_> = session
                .chat(&messages, &greedy(5), CancelToken::new())
                .expect("a turn")
                .map(|t| t.expect("a token"))
                .collect();
            let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
            turns.push(json!({"ids": tokens.iter().map(|t| t.id).collect::<Vec<_>>(), "cached": session.cached_tokens().expect("cached")}));
            messages.push(Message::assistant(text));
            messages.push(Message::user(next));
        }
        session.reset().expect("reset");
        let after_reset =
            ids_of(session.chat(&messages[..1], &greedy(5), CancelToken::new()).expect("a turn after reset"));
        drop(session);
        let batch: Vec<Vec<u32>> = model
            .batch_generate(&["Hello", "The quick brown fox jumps"], &greedy(6), CancelToken::new())
            .expect("batch")
            .into_iter()
            .map(|r| {
                assert!(r.error.is_none(), "{:?}", r.error);
                r.tokens.iter().map(|t| t.id).collect()
            })
            .collect();
        let classified: Vec<u32> = model
            .classify(&["Hello", "Is this a question"], &greedy(1), CancelToken::new())
            .expect("classify")
            .iter()
            .map(|c| c.token.id)
            .collect();
        let again =
            ids_of(model.generate("The quick brown fox", &greedy(8), CancelToken::new()).expect("generate again"));
        assert_eq!(again, generated, "the same request gives the same tokens");
        json!({"generate": generated, "stopped": stopped, "turns": turns, "after_reset": after_reset,
               "batch": batch, "classify": classified})
    }

    /// Cancels a long generation after its third token; returns how many
    /// tokens the engine generated (the same on every rank).
    fn cancelled_generation(model: &MetalModel) -> usize {
        let mut stream = model.generate("Once upon a time", &greedy(400), CancelToken::new()).expect("generate");
        for _ in 0..3 {
            stream.next().expect("a token").expect("a token, not an error");
        }
        stream.cancel();
        assert!(stream.any(|t| matches!(t, Err(CoreError::Cancelled))), "the stream ends cancelled");
        // A call on the engine thread: the generation's job has ended.
        model.tensor_parallel_rank().expect("a call after the cancelled generation");
        let n = model.metrics().generated_tokens;
        assert!((3..400).contains(&n), "{n} tokens: the cancel stopped the generation");
        n
    }

    /// A rank of a mirrored job: rank 0 makes the calls, the others follow.
    pub(super) fn rank_mirrored(dir: &str) {
        let rank = mlx::distributed::launch::rank_from_env().expect("MLX_RANK").expect("a rank");
        let model = MetalModel::load(Path::new(dir), &tp_settings()).unwrap_or_else(|e| {
            eprintln!("rank {rank}: {e}");
            std::process::exit(6)
        });
        assert_eq!(model.tensor_parallel_rank().expect("rank"), Some(rank));
        if rank == 0 {
            assert!(model.follow().is_err(), "rank 0 does not follow");
            let first_cancel = cancelled_generation(&model);
            let result = scenario(&model);
            let last_cancel = cancelled_generation(&model);
            println!(
                "RESULT {}",
                json!({"rank": rank, "calls": result, "first_cancel": first_cancel, "last": last_cancel})
            );
            model.close().expect("close");
        } else {
            let e = model
                .generate("x", &greedy(2), CancelToken::new())
                .and_then(|s| s.collect_text())
                .expect_err("a follower takes no calls");
            assert!(e.to_string().contains("runs what rank 0 runs"), "{e}");
            model.follow().unwrap_or_else(|e| {
                eprintln!("rank {rank}: {e}");
                std::process::exit(7)
            });
            // The last job was rank 0's last cancelled generation.
            println!("RESULT {}", json!({"rank": rank, "last": model.metrics().generated_tokens}));
            model.close().expect("close");
        }
    }

    #[test]
    fn a_mirrored_model_answers_like_the_single_process_and_stops_every_rank_together() {
        let _serial = super::serial();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen3-tiny");
        let single = MetalModel::load(&dir, &LoadSettings::default()).expect("single process");
        let want = scenario(&single);
        single.close().expect("close");
        let outs = run_job(&format!("mirror:{}", dir.display()), 2);
        let results: Vec<Value> = outs.iter().map(result_of).collect();
        assert_eq!(results[0]["calls"], want, "rank 0's answers equal the single process's");
        assert_eq!(results[1]["last"], results[0]["last"], "both ranks stopped at the same step");
        assert!(results[0]["first_cancel"].as_u64().is_some_and(|n| n < 400), "{}", results[0]);
    }

    #[test]
    fn follow_needs_a_tensor_parallel_follower() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen3-tiny");
        let model = MetalModel::load(&dir, &LoadSettings::default()).expect("load");
        let e = model.follow().expect_err("a single process has nothing to follow");
        assert!(e.to_string().contains("tensor-parallel rank"), "{e}");
        assert_eq!(model.tensor_parallel_rank().expect("rank"), None);
        model.close().expect("close");
    }

    #[test]
    fn tensor_parallel_options_are_checked() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen3-tiny");
        for (key, value, want) in [
            ("tensor_parallel", "two", "tensor_parallel = \"two\" is not a positive number of ranks"),
            ("tensor_parallel", "0", "is not a positive number of ranks"),
            ("distributed_backend", "tcp", "unknown backend \"tcp\""),
            ("distributed_timeout_s", "-1", "distributed_timeout_s = \"-1\" is not a positive number"),
            ("tp_vocab", "rows", "unknown vocabulary layout \"rows\"; expected sharded or replicated"),
        ] {
            let settings = tp_settings().backend_option(key, value);
            let e = MetalModel::load(&dir, &settings).err().expect("a bad option");
            assert!(e.to_string().contains(want), "{key}={value}: {e}");
        }
        // One rank is no tensor parallelism at all.
        let one = LoadSettings::default().backend_option("tensor_parallel", "1");
        MetalModel::load(&dir, &one).expect("tensor_parallel = 1").close().expect("close");
    }

    #[test]
    fn tensor_parallel_without_a_launcher_says_what_is_missing() {
        let _serial = super::serial();
        if mlx::distributed::launch::is_rank_process() {
            eprintln!("note: MLX_RANK is set in this environment; skipped");
            return;
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/models/qwen3-tiny");
        let e = MetalModel::load(&dir, &tp_settings()).err().expect("no launcher environment");
        assert!(e.to_string().contains("MLX_RANK"), "{e}");
    }
}
