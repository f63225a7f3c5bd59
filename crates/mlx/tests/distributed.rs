// SPDX-License-Identifier: EUPL-1.2
//! MLX's distributed layer through our FFI: groups, collectives (sums,
//! gathers, point to point, broadcasts) and the launcher, over the ring
//! backend on loopback.
//!
//! Multi-process tests re-execute this test binary as rank processes (see
//! `common/ranks.rs`): the ignored test `rank_process` is the rank's entry
//! point, and the environment variable `MLXR_DIST_TEST_ROLE` says what the
//! rank does. Each rank prints `RESULT <json>` lines that the parent reads
//! back.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ranks::{INIT_MS, ROLE, join_ring, rank_args, result_of, run_job, serial, spec};
use mlx::distributed::launch::{self, LaunchSpec};
use mlx::distributed::{self, Backend, InitOptions};
use mlx::{Array, Dtype, Error, transforms};
use serde_json::{Value, json};

// ---------------------------------------------------------------- helpers

fn f32s(a: &Array) -> Vec<f32> {
    a.to_vec_f32().expect("reading back an array")
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
        "chatty" => rank_chatty(),
        "hostfile" => rank_hostfile(),
        "join" => {
            let g = join_ring();
            println!("RESULT {}", json!({"rank": g.rank(), "size": g.size()}));
        }
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

/// How many MiB a chatty rank writes to stdout (and half as many to stderr).
const CHATTY_MIB: &str = "MLXR_DIST_TEST_MIB";
/// The rank that fails after its output, if any.
const CHATTY_FAILS: &str = "MLXR_DIST_TEST_FAILS";

/// Writes many MiB to stdout in lines and half as many to stderr as one
/// line, then says it is done on both; the rank in `CHATTY_FAILS` exits 3.
fn rank_chatty() {
    use std::io::Write;
    let rank: usize = std::env::var(launch::RANK_ENV).expect("MLX_RANK").parse().expect("a rank");
    let mib: usize = std::env::var(CHATTY_MIB).expect(CHATTY_MIB).parse().expect("MiB");
    let mut line = vec![b'o'; 1023];
    line.push(b'\n');
    let mut out = std::io::stdout().lock();
    for _ in 0..mib * 1024 {
        out.write_all(&line).expect("stdout");
    }
    writeln!(out, "RESULT {}", json!({"rank": rank})).expect("stdout");
    out.flush().expect("stdout");
    let mut err = std::io::stderr().lock();
    let endless = vec![b'e'; 1 << 20];
    for _ in 0..mib / 2 {
        err.write_all(&endless).expect("stderr");
    }
    writeln!(err, "\nEND-OF-STDERR rank {rank}").expect("stderr");
    if std::env::var(CHATTY_FAILS).is_ok_and(|r| r == rank.to_string()) {
        std::process::exit(3);
    }
}

/// Reports the ring hostfile it was given and its directory's permissions.
fn rank_hostfile() {
    let path = std::path::PathBuf::from(std::env::var_os(launch::HOSTFILE_ENV).expect("MLX_HOSTFILE"));
    let hosts: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("the hostfile")).expect("JSON");
    #[cfg(unix)]
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        let dir = path.parent().expect("a directory");
        std::fs::metadata(dir).expect("the hostfile's directory").permissions().mode() & 0o777
    };
    #[cfg(not(unix))]
    let mode = 0o700;
    println!("RESULT {}", json!({"hostfile": path, "ranks": hosts.as_array().map(Vec::len), "mode": mode}));
}

/// This process's peak resident memory in bytes (Linux's `VmHWM`).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
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

#[test]
fn ranks_that_write_many_mib_are_kept_to_their_last_bytes() {
    let _serial = serial();
    let before = peak_rss();
    let mut s = spec("chatty", 2);
    s.env.push((CHATTY_MIB.into(), "128".into()));
    let outs = launch::spawn(&s).and_then(launch::Job::wait).expect("the chatty job");
    for out in &outs {
        assert!(out.stdout.len() <= launch::DEFAULT_OUTPUT_TAIL, "rank {}: {} bytes kept", out.rank, out.stdout.len());
        assert!(out.stderr.len() <= launch::DEFAULT_OUTPUT_TAIL, "rank {}: {} bytes kept", out.rank, out.stderr.len());
        assert_eq!(result_of(out)["rank"], json!(out.rank), "the last lines are kept");
        assert!(out.stdout.len() > 60 * 1024, "rank {}: the tail is full", out.rank);
        assert!(out.stderr.ends_with(&format!("END-OF-STDERR rank {}\n", out.rank)), "rank {}", out.rank);
    }
    // 2 ranks × 192 MiB went through; what the launcher held at once is bounded.
    if let (Some(before), Some(after)) = (before, peak_rss()) {
        let grew = after.saturating_sub(before);
        assert!(grew < 48 << 20, "the launcher's peak memory grew by {} MiB", grew >> 20);
    }

    let mut s = spec("chatty", 2);
    s.env.push((CHATTY_MIB.into(), "16".into()));
    s.env.push((CHATTY_FAILS.into(), "1".into()));
    s.output_tail = 4096;
    let e = launch::spawn(&s).and_then(launch::Job::wait).expect_err("rank 1 fails").to_string();
    assert!(e.contains("rank 1 of 2 failed") && e.ends_with("eeee\nEND-OF-STDERR rank 1\n"), "{}", &e[..200]);
    assert!(e.len() < 4096, "the error quotes the tail: {} bytes", e.len());
}

#[test]
fn the_ring_hostfile_is_private_unpredictable_and_removed() {
    let _serial = serial();
    let mut names = Vec::new();
    for _ in 0..2 {
        let job = launch::spawn(&spec("hostfile", 2)).expect("spawn");
        let path = job.hostfile().expect("a ring job has a hostfile");
        let dir = path.parent().expect("a directory").to_owned();
        assert!(path.is_file(), "{} exists while the job runs", path.display());
        let outs = job.wait().expect("the job");
        for out in &outs {
            let r = result_of(out);
            assert_eq!(r["hostfile"], json!(path), "rank {}", out.rank);
            assert_eq!(r["ranks"], json!(2));
            assert_eq!(r["mode"], json!(0o700), "rank {}: the directory is the user's alone", out.rank);
        }
        assert_eq!(dir.parent(), Some(std::env::temp_dir().as_path()));
        let name = dir.file_name().and_then(|n| n.to_str()).expect("a UTF-8 name").to_owned();
        assert!(name.starts_with("mlxr-ring-") && !name.contains(&std::process::id().to_string()), "{name}");
        assert!(!path.exists() && !dir.exists(), "{} is removed after the job", dir.display());
        names.push(name);
    }
    assert_ne!(names[0], names[1], "every job gets a fresh name");
}
