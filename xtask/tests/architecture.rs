// SPDX-License-Identifier: EUPL-1.2
//! The workspace's structural invariants, checked rather than described (docs/architecture.md):
//!
//! - `unsafe` appears only in `mlx-sys` and `mlx`: every other file of the workspace is scanned
//!   token by token (comments and string literals do not count), and every other crate root
//!   carries `#![forbid(unsafe_code)]`, so the compiler refuses it too.
//! - Dependencies point down the layers: `inference-core` reaches nothing of MLX (nor any crate
//!   that links a native library), and no crate depends on one above it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use proc_macro2::{TokenStream, TokenTree};

/// The crates allowed to hold `unsafe` code: the raw declarations and the safe layer over them.
const UNSAFE_CRATES: &[&str] = &["crates/mlx-sys", "crates/mlx"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Every `.rs` file under `dir`, skipping build output.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && name != ".git" {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The lines on which the keyword `unsafe` appears as a token (not in a comment or a string).
fn unsafe_lines(tokens: TokenStream, out: &mut Vec<usize>) {
    for tree in tokens {
        match tree {
            TokenTree::Ident(ident) if ident == "unsafe" => out.push(ident.span().start().line),
            TokenTree::Group(group) => unsafe_lines(group.stream(), out),
            _ => {}
        }
    }
}

fn tokens_of(path: &Path) -> TokenStream {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.parse().unwrap_or_else(|e| panic!("{} does not tokenise: {e:?}", path.display()))
}

#[test]
fn the_scanner_sees_unsafe_code_and_nothing_else() {
    let mut lines = Vec::new();
    let code = "// unsafe in a comment\nfn f() { let s = \"unsafe\"; }\n/* unsafe */\nfn g() { unsafe { h() } }\n\
                #[forbid(unsafe_code)] mod m {}\nunsafe impl Send for X {}\n";
    unsafe_lines(code.parse().unwrap_or_default(), &mut lines);
    assert_eq!(lines, vec![4, 6]);
}

#[test]
fn unsafe_code_lives_only_in_mlx_sys_and_mlx() {
    let root = workspace();
    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    rust_files(&root.join("xtask"), &mut files);
    let allowed: Vec<PathBuf> = UNSAFE_CRATES.iter().map(|c| root.join(c)).collect();
    let mut scanned = 0;
    let mut found = Vec::new();
    for file in &files {
        if allowed.iter().any(|a| file.starts_with(a)) {
            continue;
        }
        scanned += 1;
        let mut lines = Vec::new();
        unsafe_lines(tokens_of(file), &mut lines);
        found.extend(lines.into_iter().map(|l| format!("{}:{l}", file.strip_prefix(&root).unwrap_or(file).display())));
    }
    assert!(
        scanned > 100,
        "scanned only {scanned} files: is the workspace where this test thinks it is ({})?",
        root.display()
    );
    assert!(
        found.is_empty(),
        "`unsafe` outside {UNSAFE_CRATES:?} (move it behind a safe function in `mlx`):\n  {}",
        found.join("\n  ")
    );
}

/// The package directories of the workspace and their crate roots (lib.rs, main.rs).
fn crate_roots(root: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join("crates"))
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.join("Cargo.toml").is_file()).collect())
        .unwrap_or_default();
    dirs.push(root.join("xtask"));
    let mut out = Vec::new();
    for dir in dirs {
        for name in ["src/lib.rs", "src/main.rs"] {
            if dir.join(name).is_file() {
                out.push((dir.clone(), dir.join(name)));
            }
        }
    }
    out
}

#[test]
fn every_crate_above_mlx_forbids_unsafe_code() {
    let root = workspace();
    let roots = crate_roots(&root);
    assert!(roots.len() >= 9, "found only {} crate roots", roots.len());
    let mut missing = Vec::new();
    for (dir, file) in &roots {
        if UNSAFE_CRATES.iter().any(|c| *dir == root.join(c)) {
            continue;
        }
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if !text.lines().any(|l| l.trim() == "#![forbid(unsafe_code)]") {
            missing.push(file.strip_prefix(&root).unwrap_or(file).display().to_string());
        }
    }
    assert!(missing.is_empty(), "crate roots without #![forbid(unsafe_code)]: {missing:?}");
}

/// The workspace's dependency graph from `cargo metadata`: package name → the names it depends on
/// (normal, build and dev dependencies), and the names of packages that link a native library.
struct Graph {
    deps: BTreeMap<String, BTreeSet<String>>,
    links: BTreeSet<String>,
    members: BTreeSet<String>,
}

/// The host's target triple (`rustc -vV`): the graph is resolved for it, so that no package of
/// another platform has to be downloaded.
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("-vV").output().expect("running rustc -vV");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc -vV names the host")
}

fn graph() -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform"])
        .arg(host_triple())
        .arg("--manifest-path")
        .arg(workspace().join("Cargo.toml"))
        .output()
        .expect("running cargo metadata");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let name_of: BTreeMap<String, String> = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["id"].as_str()?.to_string(), p["name"].as_str()?.to_string())))
        .collect();
    let links = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["links"].is_string())
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    let members = meta["workspace_members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| id.as_str().and_then(|id| name_of.get(id)).cloned())
        .collect();
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().into_iter().flatten() {
        let Some(name) = node["id"].as_str().and_then(|id| name_of.get(id)) else { continue };
        let entry = deps.entry(name.clone()).or_default();
        for dep in node["deps"].as_array().into_iter().flatten() {
            if let Some(d) = dep["pkg"].as_str().and_then(|id| name_of.get(id)) {
                entry.insert(d.clone());
            }
        }
    }
    Graph { deps, links, members }
}

impl Graph {
    /// Everything `name` reaches through its dependencies (not itself).
    fn reach(&self, name: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&str> = vec![name];
        while let Some(n) = todo.pop() {
            for d in self.deps.get(n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d);
                }
            }
        }
        seen
    }
}

#[test]
fn inference_core_depends_on_nothing_of_mlx() {
    let g = graph();
    let reach = g.reach("inference-core");
    let ours: Vec<&String> = reach.iter().filter(|d| g.members.contains(*d)).collect();
    assert!(ours.is_empty(), "inference-core depends on workspace crates {ours:?}; it must stay backend-neutral");
    let native: Vec<&String> = reach.iter().filter(|d| g.links.contains(*d)).collect();
    assert!(native.is_empty(), "inference-core reaches crates that link native libraries: {native:?}");
    assert!(g.links.contains("mlx-sys"), "mlx-sys should be the crate that links MLX (links = \"mlx\")");
}

#[test]
fn dependencies_point_down_the_layers() {
    // Lower numbers are lower layers; a crate may depend only on crates of lower layers.
    let layer: BTreeMap<&str, u32> = [
        ("mlx-build", 0),
        ("inference-core", 0),
        ("mlx-sys", 1),
        ("mlx", 2),
        ("parity", 0),
        ("mlx-metal", 3),
        ("mlxlm-bridge", 4),
        ("mlx-train", 4),
        ("mlxr", 5),
        ("xtask", 5),
    ]
    .into_iter()
    .collect();
    let g = graph();
    for member in &g.members {
        assert!(layer.contains_key(member.as_str()), "workspace crate {member} has no layer in this test: add it");
    }
    let mut wrong = Vec::new();
    for (name, l) in &layer {
        for dep in g.deps.get(*name).into_iter().flatten() {
            if let Some(dl) = layer.get(dep.as_str())
                && dl >= l
            {
                wrong.push(format!("{name} (layer {l}) -> {dep} (layer {dl})"));
            }
        }
    }
    assert!(wrong.is_empty(), "dependencies that do not point down: {wrong:?}");
}

/// The modules of `mlx-metal`'s `src/` (a file `name.rs` or a folder `name/`) and the other modules each may
/// use (`crate::other` outside comments): the layers inside the backend crate, bottom to top. A module missing
/// from the table, or a use the table does not allow, fails: a new dependency is a decision to write down here.
const METAL_MODULES: &[(&str, &[&str])] = &[
    ("nn", &[]),
    ("cache", &[]),
    ("sample", &[]),
    ("tokenizer", &[]),
    ("chat", &["tokenizer"]),
    ("model", &["nn", "cache"]),
    ("lora", &["model", "nn"]),
    ("generate", &["model", "cache", "sample"]),
    ("batch", &["model", "cache", "sample", "generate"]),
    ("session", &["model", "cache", "fnv1a64"]),
    ("backend", &["nn", "cache", "sample", "tokenizer", "chat", "model", "lora", "generate", "batch", "session"]),
    ("bench", &["cache", "sample", "model", "generate", "fnv1a64", "MetalModel", "register"]),
    ("workflows", &[]),
];

/// The `crate::name` paths in `text` outside comments.
fn crate_uses(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let tail = &rest[i + "crate::".len()..];
            let name: String = tail.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
            rest = tail;
        }
    }
    out
}

#[test]
fn modules_of_mlx_metal_depend_only_downwards() {
    let src = workspace().join("crates/mlx-metal/src");
    let entries: Vec<PathBuf> =
        std::fs::read_dir(&src).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for path in entries {
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        if name == "lib" {
            continue;
        }
        let Some((_, allowed)) = METAL_MODULES.iter().find(|(m, _)| *m == name) else {
            wrong.push(format!("module {name} is not in METAL_MODULES"));
            continue;
        };
        let mut files = Vec::new();
        if path.is_dir() {
            rust_files(&path, &mut files);
        } else {
            files.push(path.clone());
        }
        for file in files {
            checked += 1;
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            for used in crate_uses(&text) {
                if used != name && !allowed.contains(&used.as_str()) {
                    wrong.push(format!("{} uses crate::{used}", file.strip_prefix(&src).unwrap_or(&file).display()));
                }
            }
        }
    }
    assert!(checked > 30, "read only {checked} files of {}", src.display());
    assert!(
        wrong.is_empty(),
        "mlx-metal modules that reach up or sideways (see METAL_MODULES):\n  {}",
        wrong.join("\n  ")
    );
}

#[test]
fn model_files_stay_short() {
    // One file per architecture, reading like mlx-lm's: at most 300 lines each.
    let dir = workspace().join("crates/mlx-metal/src/model");
    let mut long = Vec::new();
    for arch in ["gemma3.rs", "llama.rs", "qwen2.rs", "qwen3.rs"] {
        let lines = std::fs::read_to_string(dir.join(arch)).map(|t| t.lines().count()).unwrap_or(usize::MAX);
        if lines > 300 {
            long.push(format!("{arch}: {lines} lines"));
        }
    }
    assert!(long.is_empty(), "model files over 300 lines: {long:?}");
}
