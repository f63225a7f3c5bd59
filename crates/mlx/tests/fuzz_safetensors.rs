// SPDX-License-Identifier: EUPL-1.2
//! Fuzzing the safetensors reader (`mlx::io`) with property tests: arbitrary bytes, arbitrary
//! header JSON, and valid files mutated — truncated, bytes flipped or inserted in the header,
//! header members replaced (huge and negative offsets, wrong dtypes and shapes), the length
//! field rewritten, data added or cut. Every file must load or fail with an [`Error::Format`] or
//! [`Error::Io`] naming the file, never panic, abort or allocate what the file does not hold; a
//! file that loads must read back as its header says, and slices of it must read or fail alike.
//!
//! Cases per run: see [`CASES`] (`PROPTEST_CASES` raises them for a long run).

use std::path::Path;

use mlx::io::{self, SafetensorsHeader};
use mlx::{Dtype, Error};
use parity::fuzz;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};

/// Cases of each property per run.
const CASES: u32 = 256;

/// Safetensors dtype names MLX holds, with their sizes.
const DTYPES: &[(&str, usize)] = &[
    ("BOOL", 1),
    ("U8", 1),
    ("I8", 1),
    ("U16", 2),
    ("I16", 2),
    ("F16", 2),
    ("BF16", 2),
    ("U32", 4),
    ("I32", 4),
    ("F32", 4),
    ("U64", 8),
    ("I64", 8),
    ("C64", 8),
];

/// The names a header uses, and values a mutation may put in them.
const WORDS: &[&str] = &[
    "dtype",
    "shape",
    "data_offsets",
    "__metadata__",
    "format",
    "pt",
    "mlx",
    "w",
    "b",
    "layers.0.weight",
    "F32",
    "F64",
    "BF16",
    "U8",
    "BOOL",
    "C64",
    "F8_E4M3",
    "F4",
    "F6_E2M3",
    "E8M0",
    "Q4",
    "",
];

/// One tensor of a generated file.
#[derive(Debug, Clone)]
struct Spec {
    name: String,
    dtype: usize,
    shape: Vec<u64>,
}

/// A valid file: 0 to 4 tensors with distinct names, packed in a random order, optional
/// metadata, and the data bytes.
#[derive(Debug, Clone)]
struct ValidFile {
    header: Value,
    data: Vec<u8>,
}

impl ValidFile {
    fn bytes(&self) -> Vec<u8> {
        assemble(&serde_json::to_vec(&self.header).unwrap_or_default(), &self.data)
    }
}

fn assemble(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(data);
    bytes
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop_oneof!["[a-z]{1,6}(\\.[0-9a-z_]{1,8}){0,3}", "\\PC{0,8}"],
        0..DTYPES.len(),
        prop::collection::vec(0u64..5, 0..=3),
    )
        .prop_map(|(name, dtype, shape)| Spec { name, dtype, shape })
}

fn valid_file() -> impl Strategy<Value = ValidFile> {
    (
        prop::collection::vec(spec(), 0..=4),
        prop::option::of(prop::collection::btree_map("[a-z_]{1,8}", "\\PC{0,12}", 0..3)),
        any::<u64>(),
    )
        .prop_map(|(specs, meta, seed)| {
            let mut seen = std::collections::BTreeSet::new();
            let specs: Vec<Spec> =
                specs.into_iter().filter(|s| s.name != "__metadata__" && seen.insert(s.name.clone())).collect();
            let mut header = serde_json::Map::new();
            let mut offset = 0u64;
            for s in &specs {
                let (dtype, size) = DTYPES[s.dtype];
                let len = s.shape.iter().product::<u64>() * size as u64;
                header.insert(
                    s.name.clone(),
                    json!({"dtype": dtype, "shape": s.shape, "data_offsets": [offset, offset + len]}),
                );
                offset += len;
            }
            if let Some(m) = meta {
                header.insert("__metadata__".into(), json!(m));
            }
            // Data that is not all zeros, so a misplaced read shows.
            let data = (0..offset).map(|i| (i.wrapping_mul(31) ^ seed) as u8).collect();
            ValidFile { header: Value::Object(header), data }
        })
}

/// Loads the file at `path` every way this crate reads safetensors and checks what comes back:
/// an error of the right kind naming the file, or tensors exactly as the header says.
fn check_file(path: &Path, bytes: &[u8]) -> Result<(), TestCaseError> {
    std::fs::write(path, bytes).map_err(|e| TestCaseError::fail(format!("cannot write the case: {e}")))?;
    let header = io::read_safetensors_header(path);
    let loaded = io::load_safetensors(path);
    match (&header, &loaded) {
        (Err(e), _) | (_, Err(e)) => expect_named_error(path, e)?,
        _ => {}
    }
    let Ok(header) = header else {
        prop_assert!(loaded.is_err(), "the header was refused but the file loaded");
        return Ok(());
    };
    check_header(&header, bytes)?;
    let Ok(loaded) = loaded else { return Ok(()) };
    prop_assert_eq!(loaded.tensors.len(), header.tensors.len());
    prop_assert_eq!(&loaded.metadata, &header.metadata);
    for (name, info) in &header.tensors {
        let a = loaded.tensors.get(name).ok_or_else(|| TestCaseError::fail(format!("{name:?} not loaded")))?;
        prop_assert_eq!(a.dtype(), info.dtype, "{:?}", name);
        let shape: Vec<i64> = a.shape().into_iter().map(i64::from).collect();
        prop_assert_eq!(&shape, &info.shape, "{:?}", name);
        a.eval().map_err(|e| TestCaseError::fail(format!("{name:?} loaded but does not evaluate: {e}")))?;
        let (start, end) = info.data_offsets;
        prop_assert_eq!(a.nbytes() as u64, end - start, "{:?}", name);
        if info.dtype == Dtype::Uint8 {
            let at = (header.data_start + start) as usize..(header.data_start + end) as usize;
            prop_assert_eq!(a.to_vec::<u8>().ok(), Some(bytes[at].to_vec()), "{:?}", name);
        }
    }
    Ok(())
}

/// A refused file is a format or I/O error of `load_safetensors` that names the file and says
/// something.
fn expect_named_error(path: &Path, e: &Error) -> Result<(), TestCaseError> {
    match e {
        Error::Format { op, path: p, message } => {
            prop_assert_eq!(*op, "load_safetensors");
            prop_assert_eq!(p.as_path(), path);
            prop_assert!(!message.trim().is_empty(), "an empty message");
        }
        Error::Io { path: p, .. } => prop_assert_eq!(p.as_path(), path),
        other => prop_assert!(false, "not a format or I/O error: {other:?}"),
    }
    prop_assert!(e.to_string().contains(&path.display().to_string()), "the error does not name the file: {e}");
    Ok(())
}

/// What an accepted header promises: the data section right after it, every tensor inside the
/// file and as long as its shape and dtype say.
fn check_header(h: &SafetensorsHeader, bytes: &[u8]) -> Result<(), TestCaseError> {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap_or_default());
    prop_assert_eq!(h.data_start, 8 + len);
    let data_len = bytes.len() as u64 - h.data_start;
    for (name, t) in &h.tensors {
        let (s, e) = t.data_offsets;
        prop_assert!(s <= e && e <= data_len, "{:?}: [{}, {}) outside {} bytes of data", name, s, e, data_len);
        let count = t.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?));
        prop_assert!(t.shape.iter().all(|&d| (0..=i64::from(i32::MAX)).contains(&d)), "{:?}: {:?}", name, t.shape);
        prop_assert_eq!(count.map(|c| c * t.dtype.size_of() as u64), Some(e - s), "{:?}", name);
    }
    Ok(())
}

/// Slices of every 1-D and 2-D tensor of an accepted file, in and out of range.
fn check_slices(path: &Path, picks: &[(usize, usize, i64, i64)]) -> Result<(), TestCaseError> {
    let Ok(header) = io::read_safetensors_header(path) else { return Ok(()) };
    let names: Vec<&String> = header.tensors.keys().collect();
    if names.is_empty() {
        return Ok(());
    }
    for &(which, axis, start, len) in picks {
        let name = names[which % names.len()];
        let info = &header.tensors[name];
        match io::read_tensor_slice(path, &header, name, axis, start, len) {
            Ok(a) => {
                prop_assert!(matches!(info.shape.len(), 1 | 2) && axis < info.shape.len());
                prop_assert_eq!(a.shape()[axis], len as i32);
                a.eval().map_err(|e| TestCaseError::fail(format!("a slice does not evaluate: {e}")))?;
            }
            Err(Error::Format { message, .. }) => prop_assert!(!message.is_empty()),
            Err(other) => prop_assert!(false, "slice of {:?}: {}", name, other),
        }
    }
    Ok(())
}

fn slice_picks() -> impl Strategy<Value = Vec<(usize, usize, i64, i64)>> {
    let edge = prop_oneof![4 => -2i64..8, 1 => any::<i64>()];
    prop::collection::vec((any::<usize>(), 0usize..3, edge.clone(), edge), 0..4)
}

fn case_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.safetensors");
    (dir, path)
}

#[test]
fn generated_files_load_as_their_headers_say() {
    let (_dir, path) = case_file();
    fuzz::check(CASES, &(valid_file(), slice_picks()), |(file, picks)| {
        let bytes = file.bytes();
        check_file(&path, &bytes)?;
        prop_assert!(io::load_safetensors(&path).is_ok(), "a valid file was refused: {:?}", file.header);
        check_slices(&path, &picks)
    });
}

#[test]
fn arbitrary_bytes_are_refused_cleanly() {
    let (_dir, path) = case_file();
    fuzz::check(CASES, &prop::collection::vec(any::<u8>(), 0..256), |bytes| check_file(&path, &bytes));
}

#[test]
fn arbitrary_header_json_is_refused_or_read() {
    let (_dir, path) = case_file();
    let header = prop_oneof![fuzz::json_object(WORDS), fuzz::json_value(WORDS)];
    fuzz::check(CASES, &(header, prop::collection::vec(any::<u8>(), 0..64)), |(header, data)| {
        let text = serde_json::to_vec(&header).unwrap_or_default();
        check_file(&path, &assemble(&text, &data))
    });
}

#[test]
fn mutated_header_members_are_refused_or_read() {
    let (_dir, path) = case_file();
    let case = valid_file().prop_flat_map(|f| {
        let data = Just(f.data.clone());
        (fuzz::mutated_json(f.header, WORDS, 3), data, slice_picks())
    });
    fuzz::check(CASES, &case, |(header, data, picks)| {
        let text = serde_json::to_vec(&header).unwrap_or_default();
        check_file(&path, &assemble(&text, &data))?;
        check_slices(&path, &picks)
    });
}

#[test]
fn offsets_shapes_and_dtypes_out_of_range_are_refused_or_read() {
    // Aimed mutations: one tensor's offsets, shape or dtype replaced with edge values.
    let (_dir, path) = case_file();
    let edge = prop_oneof![
        3 => 0i64..64,
        1 => Just(-1i64),
        1 => Just(i64::from(i32::MAX)),
        1 => Just(i64::from(i32::MAX) + 1),
        1 => Just(i64::MAX),
        1 => any::<i64>(),
    ];
    let value = prop_oneof![
        edge.clone().prop_map(|x| json!(x)),
        Just(json!(u64::MAX)),
        Just(json!(1.5)),
        Just(json!("8")),
        Just(json!(null)),
    ];
    let field = prop_oneof![
        prop::collection::vec(value.clone(), 0..4).prop_map(|v| ("data_offsets", Value::Array(v))),
        prop::collection::vec(value, 0..5).prop_map(|v| ("shape", Value::Array(v))),
        fuzz::json_string(WORDS).prop_map(|s| ("dtype", Value::String(s))),
    ];
    let case = (valid_file(), any::<usize>(), field, prop::collection::vec(any::<u8>(), 0..16), slice_picks());
    fuzz::check(CASES, &case, |(file, which, (key, value), extra, picks)| {
        let mut header = file.header.clone();
        let names: Vec<String> = header.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        if let Some(name) = names.iter().filter(|n| *n != "__metadata__").nth(which % names.len().max(1)) {
            header[name][key] = value;
        }
        let mut data = file.data.clone();
        data.extend_from_slice(&extra);
        check_file(&path, &assemble(&serde_json::to_vec(&header).unwrap_or_default(), &data))?;
        check_slices(&path, &picks)
    });
}

#[test]
fn mutated_bytes_and_length_fields_are_refused_or_read() {
    let (_dir, path) = case_file();
    let length = prop_oneof![
        Just(None),
        any::<u64>().prop_map(Some),
        (0u64..512).prop_map(Some),
        Just(Some(io::MAX_HEADER_LEN)),
        Just(Some(io::MAX_HEADER_LEN + 1)),
    ];
    let case = (valid_file(), fuzz::byte_edits(4), any::<bool>(), length);
    fuzz::check(CASES, &case, |(file, edits, header_only, length)| {
        let mut bytes = file.bytes();
        let header_end = bytes.len() - file.data.len();
        let range = if header_only { 8..header_end } else { 0..bytes.len() };
        bytes = fuzz::apply_bytes(&bytes, &edits, range);
        if let (Some(len), true) = (length, bytes.len() >= 8) {
            bytes[..8].copy_from_slice(&len.to_le_bytes());
        }
        check_file(&path, &bytes)
    });
}

#[test]
fn every_truncation_of_a_valid_file_is_refused() {
    // Not random: every prefix of one file with two tensors and metadata.
    let (_dir, path) = case_file();
    let file = ValidFile {
        header: json!({
            "__metadata__": {"format": "mlx"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "U8", "shape": [5], "data_offsets": [24, 29]},
        }),
        data: (0..29).collect(),
    };
    let bytes = file.bytes();
    check_file(&path, &bytes).unwrap();
    assert!(io::load_safetensors(&path).is_ok());
    for cut in 0..bytes.len() {
        check_file(&path, &bytes[..cut]).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert!(io::load_safetensors(&path).is_err(), "a file cut at {cut} of {} loaded", bytes.len());
    }
}
