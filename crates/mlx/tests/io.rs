// SPDX-License-Identifier: EUPL-1.2
//! Safetensors: round trips of every dtype and of views, metadata, checked
//! headers (truncated and corrupt files), missing files and atomic saves.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{arr, iota, vals};
use half::{bf16, f16};
use mlx::io::{self, SafeTensors};
use mlx::{Array, Complex64, Dtype, Error, ops};

fn save(path: &Path, tensors: &[(&str, &Array)], meta: &BTreeMap<String, String>) {
    io::save_safetensors(path, tensors.iter().map(|(k, a)| (*k, *a)), meta).unwrap();
}

fn no_temp_files(dir: &Path) {
    let names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "temporary file left behind: {names:?}");
}

#[test]
fn every_dtype_round_trips_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.safetensors");
    let tensors = vec![
        ("bool", Array::from_slice(&[true, false, true, true], &[2, 2]).unwrap()),
        ("u8", Array::from_vec(&[0u8, 200, 255]).unwrap()),
        ("u16", Array::from_vec(&[1u16, 65535]).unwrap()),
        ("u32", Array::from_vec(&[7u32, u32::MAX]).unwrap()),
        ("u64", Array::from_vec(&[9u64, u64::MAX]).unwrap()),
        ("i8", Array::from_vec(&[-128i8, 127]).unwrap()),
        ("i16", Array::from_vec(&[-300i16, 300]).unwrap()),
        ("i32", Array::from_slice(&[-1i32, 0, 1, 2, 3, 4], &[3, 2]).unwrap()),
        ("i64", Array::from_vec(&[i64::MIN, i64::MAX]).unwrap()),
        ("f16", Array::from_vec(&[f16::from_f32(0.5), f16::from_f32(-65504.0)]).unwrap()),
        ("bf16", Array::from_vec(&[bf16::from_f32(1.5), bf16::from_f32(-3.0e38)]).unwrap()),
        ("f32", Array::from_slice(&[1.25f32, -2.5, 1e-30, 3.0e38], &[1, 4]).unwrap()),
        ("c64", Array::from_vec(&[Complex64 { re: 1.0, im: -1.0 }]).unwrap()),
        ("scalar", Array::scalar(42.0f32)),
        ("empty", Array::from_slice::<f32>(&[], &[0, 3]).unwrap()),
    ];
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "mlx".to_string());
    meta.insert("note".to_string(), "ünïcödé \"quoted\"".to_string());
    io::save_safetensors(&path, tensors.iter().map(|(k, a)| (*k, a)), &meta).unwrap();
    no_temp_files(dir.path());

    let header = io::read_safetensors_header(&path).unwrap();
    assert_eq!(header.metadata, meta);
    assert_eq!(header.tensors.len(), tensors.len());
    assert_eq!(header.tensors["bf16"].dtype, Dtype::Bfloat16);
    assert_eq!(header.tensors["i32"].shape, vec![3, 2]);
    assert_eq!(header.tensors["scalar"].shape, Vec::<i64>::new());

    let SafeTensors { tensors: loaded, metadata } = io::load_safetensors(&path).unwrap();
    assert_eq!(metadata, meta);
    assert_eq!(loaded.len(), tensors.len());
    for (name, a) in &tensors {
        let b = &loaded[*name];
        assert_eq!(b.dtype(), a.dtype(), "{name}");
        assert_eq!(b.shape(), a.shape(), "{name}");
        // Compare the raw bytes through a same-dtype equality.
        let same = ops::all_all(&ops::equal(a, b).unwrap(), false).unwrap().item::<bool>().unwrap();
        assert!(same, "{name} differs after the round trip");
    }
    assert_eq!(loaded["bf16"].to_vec::<bf16>().unwrap(), vec![bf16::from_f32(1.5), bf16::from_f32(-3.0e38)]);
    assert_eq!(loaded["bool"].to_vec::<bool>().unwrap(), vec![true, false, true, true]);
    assert_eq!(loaded["u64"].to_vec::<u64>().unwrap(), vec![9, u64::MAX]);
}

#[test]
fn files_without_metadata_load() {
    // MLX writes `"__metadata__": null` when there is no metadata; the
    // checked header reader must accept that.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.safetensors");
    save(&path, &[("a", &arr(&[1.0, 2.0], &[2]))], &BTreeMap::new());
    let st = io::load_safetensors(&path).unwrap();
    assert!(st.metadata.is_empty());
    assert_eq!(vals(&st.tensors["a"]), vec![1.0, 2.0]);
}

#[test]
fn float64_is_refused_both_ways() {
    // MLX's safetensors support has no float64: saving is an error naming
    // the op and the file, and nothing is left behind.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f64.safetensors");
    let a = Array::from_vec(&[std::f64::consts::PI]).unwrap();
    let e = io::save_safetensors(&path, [("pi", &a)], &BTreeMap::new()).unwrap_err();
    assert_eq!(e.op(), "save_safetensors");
    assert!(e.to_string().contains("f64.safetensors"), "{e}");
    assert!(!path.exists());
    no_temp_files(dir.path());
    // Loading a float64 tensor written by another tool is a format error.
    let header = r#"{"pi": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&std::f64::consts::PI.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    expect_format(&path, "F64");
}

#[test]
fn views_are_saved_in_logical_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("views.safetensors");
    let t = ops::transpose(&iota(&[2, 3]), &[1, 0]).unwrap();
    let b = ops::broadcast_to(&arr(&[1.0, 2.0], &[1, 2]), &[3, 2]).unwrap();
    let s = ops::slice_strided(&iota(&[10]), &[9], &[-11], &[-3]).unwrap();
    save(&path, &[("t", &t), ("b", &b), ("s", &s)], &BTreeMap::new());
    let loaded = io::load_safetensors(&path).unwrap().tensors;
    assert_eq!(vals(&loaded["t"]), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    assert_eq!(vals(&loaded["b"]), vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
    assert_eq!(vals(&loaded["s"]), vec![9.0, 6.0, 3.0, 0.0]);
}

#[test]
fn saving_over_an_existing_file_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    save(&path, &[("a", &arr(&[1.0], &[1]))], &BTreeMap::new());
    save(&path, &[("b", &arr(&[2.0, 3.0], &[2]))], &BTreeMap::new());
    let loaded = io::load_safetensors(&path).unwrap().tensors;
    assert_eq!(loaded.keys().collect::<Vec<_>>(), vec!["b"]);
    no_temp_files(dir.path());
    // A name without the .safetensors suffix is kept as given.
    let plain = dir.path().join("weights.bin");
    save(&plain, &[("x", &arr(&[1.0], &[1]))], &BTreeMap::new());
    assert!(plain.exists());
    assert_eq!(vals(&io::load_safetensors(&plain).unwrap().tensors["x"]), vec![1.0]);
    no_temp_files(dir.path());
}

#[test]
fn a_failed_save_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    // Duplicate names are refused by the shim before anything is written.
    let path = dir.path().join("dup.safetensors");
    let a = arr(&[1.0], &[1]);
    let e = io::save_safetensors(&path, [("x", &a), ("x", &a)], &BTreeMap::new()).unwrap_err();
    assert_eq!(e.op(), "save_safetensors");
    assert!(e.to_string().contains("duplicate"), "{e}");
    assert!(!path.exists());
    no_temp_files(dir.path());
    // A directory that does not exist.
    let missing = dir.path().join("no/such/dir/x.safetensors");
    let e = io::save_safetensors(&missing, [("x", &a)], &BTreeMap::new()).unwrap_err();
    assert_eq!(e.op(), "save_safetensors");
    assert!(!missing.exists());
    // Names with a NUL byte are refused by the safe layer.
    let e = io::save_safetensors(&path, [("a\0b", &a)], &BTreeMap::new()).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }));
    no_temp_files(dir.path());
    // A rename that fails (a non-empty directory in the way) leaves it as it was, and no temporary file.
    let blocked = dir.path().join("blocked.safetensors");
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("keep"), b"x").unwrap();
    let e = io::save_safetensors(&blocked, [("x", &a)], &BTreeMap::new()).unwrap_err();
    assert_eq!(e.op(), "save_safetensors");
    assert!(e.to_string().contains("blocked.safetensors"), "{e}");
    assert_eq!(std::fs::read(blocked.join("keep")).unwrap(), b"x");
    no_temp_files(dir.path());
}

#[test]
fn a_missing_file_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.safetensors");
    match io::load_safetensors(&path) {
        Err(Error::Io { op, path: p, source }) => {
            assert_eq!(op, "load_safetensors");
            assert_eq!(p, path);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert!(matches!(io::read_safetensors_header(&path), Err(Error::Io { .. })));
}

fn expect_format(path: &Path, needle: &str) {
    match io::load_safetensors(path) {
        Err(e @ Error::Format { .. }) => {
            let Error::Format { op, path: p, message } = &e else { unreachable!() };
            assert_eq!(*op, "load_safetensors");
            assert_eq!(p, path);
            assert!(message.contains(needle), "message {message:?} does not mention {needle:?}");
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        }
        other => panic!("expected a format error mentioning {needle:?}, got {other:?}"),
    }
}

#[test]
fn a_truncated_file_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    save(&path, &[("first", &iota(&[4])), ("second_tensor", &iota(&[64]))], &BTreeMap::new());
    let bytes = std::fs::read(&path).unwrap();
    // The tensor whose data ends last is the one cut short.
    let header = io::read_safetensors_header(&path).unwrap();
    let last = header.tensors.iter().max_by_key(|(_, t)| t.data_offsets.1).map(|(n, _)| n.clone()).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    expect_format(&path, &format!("{last:?}"));
    expect_format(&path, "truncated");
    // Cut into the header itself.
    std::fs::write(&path, &bytes[..20]).unwrap();
    expect_format(&path, "header");
    // Shorter than the length field.
    std::fs::write(&path, &bytes[..5]).unwrap();
    expect_format(&path, "too short");
    std::fs::write(&path, b"").unwrap();
    expect_format(&path, "too short");
}

fn write_raw(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, bytes).unwrap();
}

/// Writes each `(header, data_len, needle)` case to `path` in turn and checks
/// that loading it is a format error whose message mentions `needle`.
fn expect_refused(path: &Path, cases: &[(&str, usize, &str)]) {
    for &(header, data_len, needle) in cases {
        write_raw(path, header, data_len);
        expect_format(path, needle);
    }
}

#[test]
fn corrupt_headers_are_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    expect_refused(
        &path,
        &[
            ("{not json", 0, "JSON"),
            ("[1, 2]", 0, "not a JSON object"),
            (r#"{"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}"#, 4, "\"w\""),
            (r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}"#, 4, "needs 8 bytes"),
            (r#"{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#, 4, "negative"),
            (r#"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}"#, 4, "data_offsets"),
            (r#"{"w": {"dtype": "F32", "shape": [1]}}"#, 4, "data_offsets"),
            (r#"{"w": {"shape": [1], "data_offsets": [0, 4]}}"#, 4, "\"w\": missing field `dtype`"),
            (r#"{"__metadata__": {"k": 1}}"#, 0, "metadata"),
        ],
    );
    // A length field far larger than the file.
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&path, bytes).unwrap();
    expect_format(&path, "header claims");
    // A hand-written valid file loads.
    write_raw(&path, r#"{"__metadata__": {"a": "b"}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#, 8);
    let st = io::load_safetensors(&path).unwrap();
    assert_eq!(vals(&st.tensors["w"]), vec![0.0, 0.0]);
    assert_eq!(st.metadata["a"], "b");
}

#[test]
fn byte_ranges_must_be_packed_without_gaps_or_overlaps() {
    // The safetensors crate requires the ranges to follow one another from
    // byte 0; our messages name the tensor at fault and the one before it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.safetensors");
    expect_refused(
        &path,
        &[
            (
                r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#,
                12,
                "tensor \"b\": data_offsets [4, 12] overlap tensor \"a\", which ends at byte 8",
            ),
            (
                r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}"#,
                16,
                "tensor \"b\": data_offsets [12, 16] leave a gap after tensor \"a\"",
            ),
            (
                r#"{"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}"#,
                4,
                "tensor \"a\": data_offsets [2, 4] leave a gap at the start of the data (the first tensor starts at byte 0)",
            ),
            // Two tensors sharing one range (aliasing) overlap too.
            (
                r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#,
                4,
                "overlap",
            ),
        ],
    );
    // Empty tensors take no bytes and may sit anywhere in the sequence.
    write_raw(
        &path,
        r#"{"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "s": {"dtype": "I32", "shape": [], "data_offsets": [4, 8]}}"#,
        8,
    );
    let header = io::read_safetensors_header(&path).unwrap();
    assert_eq!(header.tensors["e"].shape, vec![0, 3]);
    assert_eq!(header.tensors["s"].data_offsets, (4, 8));
    assert_eq!(io::load_safetensors(&path).unwrap().tensors.len(), 3);
}

#[test]
fn data_after_the_last_tensor_is_refused() {
    // The safetensors format ends with the last tensor's data (the crate's
    // `SafeTensors::read_metadata` refuses anything else); we check the same
    // from the file's size without reading the data.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trailing.safetensors");
    write_raw(&path, r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#, 11);
    expect_format(&path, "the file holds 11 bytes of data but its tensors cover 8: 3 bytes after the last tensor");
    // A header with no tensors and no data is a valid, empty file.
    write_raw(&path, r#"{"__metadata__": {"k": "v"}}"#, 0);
    let header = io::read_safetensors_header(&path).unwrap();
    assert!(header.tensors.is_empty());
    assert_eq!(header.metadata["k"], "v");
}

#[test]
fn dtypes_and_shapes_mlx_cannot_hold_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.safetensors");
    expect_refused(
        &path,
        &[
            // A dtype the format has but MLX does not.
            (
                r#"{"f8": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}"#,
                4,
                "tensor \"f8\": unsupported dtype F8_E4M3",
            ),
            // Sub-byte types must fill whole bytes (the crate's check).
            (
                r#"{"f4": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}"#,
                2,
                "tensor \"f4\": F4 [3] does not fill a whole number of bytes",
            ),
            // A dimension past MLX's i32 limit, refused before the data is looked at.
            (
                r#"{"big": {"dtype": "U8", "shape": [2147483648], "data_offsets": [0, 2147483648]}}"#,
                0,
                "tensor \"big\": shape [2147483648] has a dimension larger than MLX's limit of 2147483647",
            ),
            // A shape whose size overflows.
            (
                r#"{"huge": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296], "data_offsets": [0, 4]}}"#,
                4,
                "tensor \"huge\": F32 [4294967296, 4294967296, 4294967296] is too large",
            ),
            // Metadata that is not a map of strings.
            (r#"{"__metadata__": ["a"]}"#, 0, "__metadata__ must map names to strings"),
        ],
    );
}

#[test]
fn an_absurd_header_length_is_refused_before_reading_it() {
    // Past the safetensors crate's limit of 100,000,000 bytes, even when the
    // file is that long (a sparse file: nothing is written or read).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.safetensors");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(8 + io::MAX_HEADER_LEN + 16).unwrap();
    drop(f);
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, &(io::MAX_HEADER_LEN + 1).to_le_bytes()).unwrap();
    drop(f);
    expect_format(&path, "header claims 100000001 bytes, more than the 100000000 a safetensors header may have");
}

#[test]
fn a_slice_is_read_straight_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    save(&path, &[("pad", &iota(&[3])), ("m", &iota(&[4, 5])), ("v", &iota(&[6]))], &BTreeMap::new());
    let header = io::read_safetensors_header(&path).unwrap();
    let rows = io::read_tensor_slice(&path, &header, "m", 0, 1, 2).unwrap();
    assert_eq!(rows.shape(), vec![2, 5]);
    assert_eq!(vals(&rows), (5..15).map(|x| x as f32).collect::<Vec<_>>());
    let cols = io::read_tensor_slice(&path, &header, "m", 1, 3, 2).unwrap();
    assert_eq!(cols.shape(), vec![4, 2]);
    assert_eq!(vals(&cols), vec![3.0, 4.0, 8.0, 9.0, 13.0, 14.0, 18.0, 19.0]);
    let v = io::read_tensor_slice(&path, &header, "v", 0, 4, 2).unwrap();
    assert_eq!(vals(&v), vec![4.0, 5.0]);
    let e = io::read_tensor_slice(&path, &header, "m", 1, 4, 2).unwrap_err();
    assert_eq!(e.op(), "read_tensor_slice");
    assert!(e.to_string().contains("outside axis 1"), "{e}");
    let e = io::read_tensor_slice(&path, &header, "nope", 0, 0, 1).unwrap_err();
    assert!(e.to_string().contains("no tensor \"nope\""), "{e}");
}

#[test]
fn every_fixture_checkpoint_passes_the_header_checks() {
    // The checks are at least as strict as the safetensors crate; files
    // written by Hugging Face's tools, mlx-lm and MLX must all pass them.
    let mut roots = vec![parity::testdata_dir().join("models")];
    roots.extend(parity::models_dir().filter(|d| d.is_dir()));
    let mut checked = 0;
    let mut stack = roots;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "safetensors") {
                let header = io::read_safetensors_header(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(!header.tensors.is_empty(), "{} holds no tensors", p.display());
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "only {checked} fixture files found under testdata/models");
}
