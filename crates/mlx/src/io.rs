// SPDX-License-Identifier: EUPL-1.2
//! Safetensors files: checked loading and durable saving; [`durable`], the
//! one way the workspace writes a file it keeps.
//!
//! MLX loads tensors lazily, so a truncated file would only fail (or worse)
//! when a tensor is first computed. [`load_safetensors`] therefore reads and
//! checks the header first — every tensor's dtype, shape and byte range
//! against the file's size — and fails with the file and tensor named.
//!
//! Only the 8-byte length and the header JSON are read for that. The header
//! is parsed and validated by the `safetensors` crate (Hugging Face's
//! reference implementation: the JSON layout, the dtype names, every byte
//! range equal to its shape × dtype and the ranges packed one after another
//! from 0, without gaps or overlaps). On top of that we check what the crate
//! can only check with the whole file in memory (the header length against
//! the file's size, the data section ending exactly where the last tensor
//! ends) and what MLX needs (a dtype MLX has, dimensions that fit in `i32`).
//!
//! [`save_safetensors`] writes through [`durable::TempFile`]: MLX writes the
//! temporary file, which is synced and renamed over the target, and the
//! directory synced.

pub mod durable;

pub use durable::{copy_durable, sync_dir, write_durable, write_durable_bytes};

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo as StInfo};

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

/// The largest header we read: the `safetensors` crate's own limit
/// (100,000,000 bytes), which it only applies when given the whole file.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

fn format_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Format { op: "load_safetensors", path: path.to_path_buf(), message: message.into() }
}

/// Reads and checks the header of a safetensors file without loading tensors:
/// only the length field and the header JSON are read.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read; [`Error::Format`], naming the
/// file and, where there is one, the tensor, when the file is shorter than
/// its header says, the header is longer than [`MAX_HEADER_LEN`], not valid
/// JSON or not what the safetensors format allows (unknown dtypes, byte
/// ranges that do not match shape × dtype, overlap, leave gaps or run past
/// the end of the file, data after the last tensor), or holds a tensor MLX
/// cannot represent.
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
    if header_len > MAX_HEADER_LEN {
        return Err(format_err(
            path,
            format!("header claims {header_len} bytes, more than the {MAX_HEADER_LEN} a safetensors header may have"),
        ));
    }
    if header_len > file_len - 8 {
        return Err(format_err(
            path,
            format!("header claims {header_len} bytes but the file has {} after the length field", file_len - 8),
        ));
    }
    // At most MAX_HEADER_LEN, so it fits in usize.
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let data_len = file_len - 8 - header_len;
    let meta = parse_header(&header).map_err(|message| format_err(path, message))?;
    check_header(&meta, 8 + header_len, data_len).map_err(|message| format_err(path, message))
}

/// The header through the `safetensors` crate. Its errors say what is wrong
/// but not always where, so a rejected header is looked at again entry by
/// entry to name the tensor.
fn parse_header(header: &[u8]) -> std::result::Result<Metadata, String> {
    serde_json::from_slice::<Metadata>(header).map_err(|e| explain_rejected_header(header, &e))
}

/// Why the `safetensors` crate rejected `header` (with `error`), naming the
/// entry at fault. Only runs on a header already rejected, so it decides
/// nothing: it finds which entry fails the crate's checks, and falls back to
/// the crate's own message.
fn explain_rejected_header(header: &[u8], error: &serde_json::Error) -> String {
    let value: serde_json::Value = match serde_json::from_slice(header) {
        Ok(v) => v,
        Err(e) => return format!("header is not valid JSON: {e}"),
    };
    let Some(entries) = value.as_object() else {
        return "header is not a JSON object".into();
    };
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, v) in entries {
        if name == "__metadata__" {
            if let Err(e) = serde_json::from_value::<Option<HashMap<String, String>>>(v.clone()) {
                return format!("__metadata__ must map names to strings: {e}");
            }
            continue;
        }
        match serde_json::from_value::<StInfo>(v.clone()) {
            Ok(info) => tensors.push((name, info)),
            Err(e) => {
                return format!(
                    "tensor {name:?}: {e} (a tensor needs a dtype name, a shape of non-negative integers \
                     and data_offsets [start, end])"
                );
            }
        }
    }
    // Every entry reads: the byte ranges are wrong. The crate walks the
    // tensors in the order of their offsets, each starting where the last
    // ended; find the first that does not.
    tensors.sort_by_key(|(_, info)| info.data_offsets);
    let mut end = 0;
    let mut previous: Option<&str> = None;
    for (name, info) in &tensors {
        let (s, e) = info.data_offsets;
        if e < s {
            return format!("tensor {name:?}: data_offsets [{s}, {e}] end before they start");
        }
        if s != end {
            let Some(p) = previous else {
                return format!(
                    "tensor {name:?}: data_offsets [{s}, {e}] leave a gap at the start of the data \
                     (the first tensor starts at byte 0)"
                );
            };
            let how = if s < end { "overlap" } else { "leave a gap after" };
            return format!("tensor {name:?}: data_offsets [{s}, {e}] {how} tensor {p:?}, which ends at byte {end}");
        }
        let bits = info
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_mul(info.dtype.bitsize()));
        let Some(bits) = bits else {
            return format!("tensor {name:?}: {} {:?} is too large", info.dtype, info.shape);
        };
        if bits % 8 != 0 {
            return format!("tensor {name:?}: {} {:?} does not fill a whole number of bytes", info.dtype, info.shape);
        }
        if e - s != bits / 8 {
            return format!(
                "tensor {name:?}: {} {:?} needs {} bytes but data_offsets [{s}, {e}] cover {}",
                info.dtype,
                info.shape,
                bits / 8,
                e - s
            );
        }
        end = e;
        previous = Some(name);
    }
    format!("header rejected: {error}")
}

/// MLX's dtype for a safetensors dtype, when MLX has it.
fn mlx_dtype(d: safetensors::Dtype) -> Option<Dtype> {
    use safetensors::Dtype as St;
    Some(match d {
        St::BOOL => Dtype::Bool,
        St::U8 => Dtype::Uint8,
        St::U16 => Dtype::Uint16,
        St::U32 => Dtype::Uint32,
        St::U64 => Dtype::Uint64,
        St::I8 => Dtype::Int8,
        St::I16 => Dtype::Int16,
        St::I32 => Dtype::Int32,
        St::I64 => Dtype::Int64,
        St::F16 => Dtype::Float16,
        St::BF16 => Dtype::Bfloat16,
        St::F32 => Dtype::Float32,
        St::F64 => Dtype::Float64,
        St::C64 => Dtype::Complex64,
        _ => return None,
    })
}

/// Our checks on a header the crate accepted: the tensors against the
/// `data_len` bytes the file holds after the header, and against MLX.
fn check_header(meta: &Metadata, data_start: u64, data_len: u64) -> std::result::Result<SafetensorsHeader, String> {
    let mut out = SafetensorsHeader { data_start, ..SafetensorsHeader::default() };
    // In the order of their data, so a truncated file names the first tensor
    // cut short.
    for name in meta.offset_keys() {
        let Some(info) = meta.info(&name) else { continue };
        let bad = |what: String| format!("tensor {name:?}: {what}");
        let dtype = mlx_dtype(info.dtype)
            .ok_or_else(|| bad(format!("unsupported dtype {} (MLX has no such type)", info.dtype)))?;
        let shape = info
            .shape
            .iter()
            .map(|&d| i64::try_from(d).ok().filter(|&d| d <= i64::from(i32::MAX)))
            .collect::<Option<Vec<i64>>>()
            .ok_or_else(|| {
                bad(format!("shape {:?} has a dimension larger than MLX's limit of {}", info.shape, i32::MAX))
            })?;
        let (start, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        if end > data_len {
            return Err(bad(format!(
                "data ends at byte {end} but the file holds only {data_len} bytes of data (truncated?)"
            )));
        }
        out.tensors.insert(name, TensorInfo { dtype, shape, data_offsets: (start, end) });
    }
    let used = meta.data_len() as u64;
    if used != data_len {
        return Err(format!(
            "the file holds {data_len} bytes of data but its tensors cover {used}: {} bytes after the last tensor",
            data_len - used
        ));
    }
    if let Some(m) = meta.metadata() {
        out.metadata = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
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

/// Saves tensors (and string metadata) as a safetensors file, durably: MLX
/// writes a temporary file beside the target ([`durable::TempFile`], created
/// exclusively), which is synced and renamed over `path`, and the directory
/// is synced. A failure never leaves a half-written file at `path`, nor a
/// temporary file.
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
    // MLX appends ".safetensors" to names without it; keep that suffix. The
    // temporary file is removed when `tmp` drops without a commit.
    let tmp = durable::TempFile::beside(path, ".safetensors").map_err(|e| durable::relabel(e, OP))?;
    let ctmp = c_path(OP, tmp.path())?;
    // SAFETY: live map; NUL-terminated path.
    let status = unsafe { sys::mlxs_save_safetensors(ctmp.as_ptr(), named.0) };
    check(OP, status).map_err(|e| match e {
        Error::Mlx { message, .. } => Error::Format { op: OP, path: path.to_path_buf(), message },
        other => other,
    })?;
    tmp.commit().map_err(|e| durable::relabel(e, OP))
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
