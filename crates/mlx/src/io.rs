// SPDX-License-Identifier: EUPL-1.2
//! Safetensors files: checked loading and atomic saving.
//!
//! MLX loads tensors lazily, so a truncated file would only fail (or worse)
//! when a tensor is first computed. [`load_safetensors`] therefore reads and
//! checks the header first — every tensor's dtype, shape and byte range
//! against the file's size — and fails with the file and tensor named.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::array::{Array, Dtype};
use crate::error::{Error, Result};
use crate::ffi::{self, check, sys};

/// What a safetensors header says about one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<i64>,
    /// Byte range inside the data section.
    pub data_offsets: (u64, u64),
}

/// A parsed and checked safetensors header.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SafetensorsHeader {
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    /// The `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
    /// Where the data section starts in the file (8 + the header's length).
    pub data_start: u64,
}

/// Tensors and metadata of a safetensors file.
#[derive(Debug, Default)]
pub struct SafeTensors {
    /// Tensors by name (lazy until computed).
    pub tensors: BTreeMap<String, Array>,
    /// The `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
}

const MAX_HEADER: u64 = 100 * 1024 * 1024;

fn format_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Format { op: "load_safetensors", path: path.to_path_buf(), message: message.into() }
}

/// Reads and checks the header of a safetensors file without loading tensors.
pub fn read_safetensors_header(path: impl AsRef<Path>) -> Result<SafetensorsHeader> {
    let path = path.as_ref();
    let io = |source| Error::Io { op: "load_safetensors", path: path.to_path_buf(), source };
    let mut f = File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    if file_len < 8 {
        return Err(format_err(path, format!("file is {file_len} bytes, too short for a safetensors header")));
    }
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes).map_err(io)?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER || header_len > file_len - 8 {
        return Err(format_err(
            path,
            format!("header claims {header_len} bytes but the file has {} after the length field", file_len - 8),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format_err(path, format!("header is not valid JSON: {e}")))?;
    let obj = json.as_object().ok_or_else(|| format_err(path, "header is not a JSON object"))?;
    let data_len = file_len - 8 - header_len;

    let mut out = SafetensorsHeader { data_start: 8 + header_len, ..SafetensorsHeader::default() };
    for (name, v) in obj {
        if name == "__metadata__" {
            // MLX itself writes `"__metadata__": null` when there is no metadata.
            if v.is_null() {
                continue;
            }
            let m = v.as_object().ok_or_else(|| format_err(path, "__metadata__ is not an object"))?;
            for (k, v) in m {
                let s =
                    v.as_str().ok_or_else(|| format_err(path, format!("metadata value of {k:?} is not a string")))?;
                out.metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let bad = |what: &str| format_err(path, format!("tensor {name:?}: {what}"));
        let dtype_s = v.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("missing dtype"))?;
        let dtype = Dtype::parse(dtype_s).ok_or_else(|| bad(&format!("unsupported dtype {dtype_s}")))?;
        let shape: Vec<i64> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("missing shape"))?
            .iter()
            .map(|d| d.as_i64().filter(|&d| d >= 0 && d <= i64::from(i32::MAX)))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape has a negative or non-integer dimension"))?;
        let offs = v
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| bad("data_offsets must be [start, end]"))?;
        let (start, end) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(s), Some(e)) if s <= e => (s, e),
            _ => return Err(bad("data_offsets must be [start, end] with start <= end")),
        };
        let elems = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let want =
            elems.and_then(|n| n.checked_mul(dtype.size_of() as u64)).ok_or_else(|| bad("shape is too large"))?;
        if end - start != want {
            return Err(bad(&format!("{dtype} {shape:?} needs {want} bytes but data_offsets cover {}", end - start)));
        }
        if end > data_len {
            return Err(bad(&format!(
                "data ends at byte {end} but the file holds only {data_len} bytes of data (truncated?)"
            )));
        }
        out.tensors.insert(name.clone(), TensorInfo { dtype, shape, data_offsets: (start, end) });
    }
    Ok(out)
}

/// Reads `[start, start + len)` along `axis` of the 1-D or 2-D tensor `name`
/// straight from the file, and nothing else of it: one contiguous range for
/// `axis` 0, one range per row for `axis` 1. `header` is the file's
/// [`read_safetensors_header`]. This is how a tensor-parallel rank reads only
/// its shard of a weight.
pub fn read_tensor_slice(
    path: &Path,
    header: &SafetensorsHeader,
    name: &str,
    axis: usize,
    start: i64,
    len: i64,
) -> Result<Array> {
    const OP: &str = "read_tensor_slice";
    let info = header.tensors.get(name).ok_or_else(|| Error::Format {
        op: OP,
        path: path.to_path_buf(),
        message: format!("no tensor {name:?}"),
    })?;
    let shape = &info.shape;
    let bad = |message: String| Error::Format { op: OP, path: path.to_path_buf(), message };
    if shape.is_empty() || shape.len() > 2 || axis >= shape.len() {
        return Err(bad(format!("{name} {shape:?} cannot be sliced along axis {axis} (1-D or 2-D tensors only)")));
    }
    let dim = shape[axis];
    if start < 0 || len < 0 || start.checked_add(len).is_none_or(|end| end > dim) {
        return Err(bad(format!("{name} {shape:?}: [{start}, {start} + {len}) is outside axis {axis}")));
    }
    let elem = info.dtype.size_of() as u64;
    let base = header.data_start + info.data_offsets.0;
    let (rows, cols) = if shape.len() == 2 { (shape[0] as u64, shape[1] as u64) } else { (shape[0] as u64, 1) };
    let io = |source| Error::Io { op: OP, path: path.to_path_buf(), source };
    let mut f = File::open(path).map_err(io)?;
    let (start, len) = (start as u64, len as u64);
    let (bytes, out_shape) = if axis == 0 {
        let row = cols * elem;
        let mut buf = vec![0u8; (len * row) as usize];
        f.seek(SeekFrom::Start(base + start * row)).map_err(io)?;
        f.read_exact(&mut buf).map_err(io)?;
        let mut s: Vec<i64> = shape.clone();
        s[0] = len as i64;
        (buf, s)
    } else {
        let seg = (len * elem) as usize;
        let mut buf = vec![0u8; seg * rows as usize];
        for (r, chunk) in buf.chunks_exact_mut(seg.max(1)).enumerate().take(rows as usize) {
            f.seek(SeekFrom::Start(base + (r as u64 * cols + start) * elem)).map_err(io)?;
            f.read_exact(chunk).map_err(io)?;
        }
        (buf, vec![rows as i64, len as i64])
    };
    let dims: Vec<i32> = out_shape.iter().map(|&d| d as i32).collect();
    Array::from_bytes(&bytes, &dims, info.dtype)
}

fn c_path(op: &'static str, path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::invalid(op, format!("path {} contains a NUL byte", path.display())))
}

/// Loads a safetensors file after checking its header (see the module docs).
pub fn load_safetensors(path: impl AsRef<Path>) -> Result<SafeTensors> {
    let path = path.as_ref();
    let header = read_safetensors_header(path)?;
    let cpath = c_path("load_safetensors", path)?;
    let mut raw: sys::mlxs_named = std::ptr::null_mut();
    // SAFETY: cpath is NUL-terminated; the shim writes an owned map.
    let status = unsafe { sys::mlxs_load_safetensors(&mut raw, cpath.as_ptr()) };
    check("load_safetensors", status).map_err(|e| match e {
        Error::Mlx { message, .. } => format_err(path, message),
        other => other,
    })?;
    let named = Named::from_raw(raw)?;
    let loaded = named.into_parts()?;
    if loaded.tensors.len() != header.tensors.len() {
        return Err(format_err(
            path,
            format!("MLX read {} tensors but the header lists {}", loaded.tensors.len(), header.tensors.len()),
        ));
    }
    Ok(loaded)
}

/// Saves tensors (and string metadata) as a safetensors file. The file is
/// written beside the target and renamed into place, so a failure never
/// leaves a half-written file at `path`.
pub fn save_safetensors<'a, I, K>(path: impl AsRef<Path>, tensors: I, metadata: &BTreeMap<String, String>) -> Result<()>
where
    I: IntoIterator<Item = (K, &'a Array)>,
    K: AsRef<str>,
{
    const OP: &str = "save_safetensors";
    let path = path.as_ref();
    let named = Named::new()?;
    for (k, a) in tensors {
        let key = CString::new(k.as_ref())
            .map_err(|_| Error::invalid(OP, format!("tensor name {:?} contains a NUL byte", k.as_ref())))?;
        // SAFETY: live map and array; key is NUL-terminated.
        check(OP, unsafe { sys::mlxs_named_push(named.0, key.as_ptr(), a.as_raw()) })?;
    }
    for (k, v) in metadata {
        let kc = CString::new(k.as_str()).map_err(|_| Error::invalid(OP, "metadata key contains a NUL byte"))?;
        let vc = CString::new(v.as_str()).map_err(|_| Error::invalid(OP, "metadata value contains a NUL byte"))?;
        // SAFETY: live map; NUL-terminated strings.
        check(OP, unsafe { sys::mlxs_named_push_meta(named.0, kc.as_ptr(), vc.as_ptr()) })?;
    }
    let file_name =
        path.file_name().ok_or_else(|| Error::invalid(OP, format!("{} has no file name", path.display())))?;
    // MLX appends ".safetensors" to names without it; keep that suffix.
    let tmp: PathBuf =
        path.with_file_name(format!(".{}.{}.tmp.safetensors", file_name.to_string_lossy(), std::process::id()));
    let ctmp = c_path(OP, &tmp)?;
    // SAFETY: live map; NUL-terminated path.
    let status = unsafe { sys::mlxs_save_safetensors(ctmp.as_ptr(), named.0) };
    if let Err(e) = check(OP, status) {
        let _ = std::fs::remove_file(&tmp);
        return Err(match e {
            Error::Mlx { message, .. } => Error::Format { op: OP, path: path.to_path_buf(), message },
            other => other,
        });
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::Io { op: OP, path: path.to_path_buf(), source }
    })
}

/// Owns an `mlxs_named`.
struct Named(sys::mlxs_named);

impl Named {
    fn new() -> Result<Named> {
        let mut raw: sys::mlxs_named = std::ptr::null_mut();
        // SAFETY: writes a new owned map.
        check("named_new", unsafe { sys::mlxs_named_new(&mut raw) })?;
        Named::from_raw(raw)
    }

    fn from_raw(raw: sys::mlxs_named) -> Result<Named> {
        if raw.is_null() {
            return Err(Error::Mlx { op: "load_safetensors", message: "the shim returned a null map".into() });
        }
        Ok(Named(raw))
    }

    fn into_parts(self) -> Result<SafeTensors> {
        let mut out = SafeTensors::default();
        // SAFETY: live map for the whole block; strings are copied at once.
        unsafe {
            for i in 0..sys::mlxs_named_len(self.0) {
                let key = CStr::from_ptr(sys::mlxs_named_key(self.0, i)).to_string_lossy().into_owned();
                let arr = ffi::array_out("load_safetensors", |o| sys::mlxs_named_get(o, self.0, i))?;
                out.tensors.insert(key, arr);
            }
            for i in 0..sys::mlxs_named_meta_len(self.0) {
                let k = CStr::from_ptr(sys::mlxs_named_meta_key(self.0, i)).to_string_lossy().into_owned();
                let v = CStr::from_ptr(sys::mlxs_named_meta_value(self.0, i)).to_string_lossy().into_owned();
                out.metadata.insert(k, v);
            }
        }
        Ok(out)
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        // SAFETY: we own the map and free it once.
        unsafe { sys::mlxs_named_free(self.0) }
    }
}
