// SPDX-License-Identifier: EUPL-1.2
//! Writing the converted tensors: shards as mlx-lm's `make_shards` cuts
//! them, each a safetensors file written one tensor at a time, and the index.
//!
//! A shard's header is known before any tensor is computed (the plan has
//! every name, type and shape), so it is written first; then each tensor is
//! made from its source (read from the checkpoint when it is needed, cast,
//! quantised), evaluated, written and dropped. At most one source matrix and
//! what it becomes are in memory at a time, whatever the size of the model
//! or of a shard. Each file goes through [`durable::TempFile`] (synced and
//! renamed into place).

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde_json::{Map, Value, json};

use mlx::io::durable::TempFile;
use mlx::ops::{self, Quantized};
use mlx::{Array, Dtype, Error, Result};

use super::plan::{Make, OutTensor, Part};
use super::{Event, OP, pyjson};

/// mlx-lm's largest shard (`MAX_FILE_SIZE_GB`): 5 GiB.
pub const MAX_SHARD_BYTES: u64 = 5 << 30;

/// The tensors of each shard, cut as mlx-lm's `make_shards` cuts them: in
/// order, a new shard when the next tensor would take the current one past
/// `max_bytes` (a tensor larger than that gets a shard of its own).
pub(crate) fn make_shards(tensors: &[OutTensor], max_bytes: u64) -> Vec<std::ops::Range<usize>> {
    let mut shards: Vec<std::ops::Range<usize>> = Vec::new();
    let mut size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        match shards.last_mut() {
            Some(last) if size + t.nbytes() <= max_bytes => last.end = i + 1,
            _ => {
                shards.push(i..i + 1);
                size = 0;
            }
        }
        size += t.nbytes();
    }
    shards
}

/// mlx-lm's shard file names: `model.safetensors` alone, else
/// `model-00001-of-00003.safetensors`, ...
pub(crate) fn shard_name(i: usize, count: usize) -> String {
    if count == 1 { "model.safetensors".to_owned() } else { format!("model-{:05}-of-{count:05}.safetensors", i + 1) }
}

/// The safetensors name of a dtype.
fn st_dtype(d: Dtype) -> &'static str {
    match d {
        Dtype::Bool => "BOOL",
        Dtype::Uint8 => "U8",
        Dtype::Uint16 => "U16",
        Dtype::Uint32 => "U32",
        Dtype::Uint64 => "U64",
        Dtype::Int8 => "I8",
        Dtype::Int16 => "I16",
        Dtype::Int32 => "I32",
        Dtype::Int64 => "I64",
        Dtype::Float16 => "F16",
        Dtype::Float32 => "F32",
        Dtype::Float64 => "F64",
        Dtype::Bfloat16 => "BF16",
        Dtype::Complex64 => "C64",
    }
}

/// The header of a safetensors file holding `tensors` in this order, with
/// MLX's metadata (`format: mlx`), padded with spaces to a multiple of 8
/// bytes as the format recommends.
fn header(tensors: &[&OutTensor]) -> Vec<u8> {
    let mut map = Map::new();
    map.insert("__metadata__".to_owned(), json!({"format": "mlx"}));
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + t.nbytes();
        map.insert(
            t.name.clone(),
            json!({"dtype": st_dtype(t.dtype), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut bytes = Value::Object(map).to_string().into_bytes();
    while !bytes.len().is_multiple_of(8) {
        bytes.push(b' ');
    }
    bytes
}

/// Makes the converted tensors from the checkpoint's, one at a time.
pub(crate) struct Maker {
    /// The checkpoint's tensors, lazily loaded; each is taken out when it is
    /// used, so nothing keeps it once its output is written.
    sources: BTreeMap<String, Array>,
    /// The other parts of the matrix quantised last, until they are written.
    pending: BTreeMap<String, Array>,
}

impl Maker {
    pub(crate) fn new(sources: BTreeMap<String, Array>) -> Maker {
        Maker { sources, pending: BTreeMap::new() }
    }

    /// `t`, evaluated.
    fn make(&mut self, t: &OutTensor) -> Result<Array> {
        if let Some(a) = self.pending.remove(&t.name) {
            return Ok(a);
        }
        let missing = || Error::invalid(OP, format!("{} was already used", t.source));
        let source = self.sources.remove(&t.source).ok_or_else(missing)?;
        let out = match &t.make {
            Make::Cast => {
                let a = if source.dtype() == t.dtype { source } else { ops::astype(&source, t.dtype)? };
                a.eval()?;
                a
            }
            Make::Quantised { group_size, bits, float, part } => {
                if *part != Part::Weight {
                    return Err(Error::invalid(OP, format!("{} is planned before its weight", t.name)));
                }
                let w = if source.dtype() == *float { source } else { ops::astype(&source, *float)? };
                let Quantized { weight, scales, biases, .. } = ops::quantize(&w, *group_size, *bits)?;
                let biases = biases.ok_or_else(|| Error::invalid(OP, "MLX returned no biases for affine mode"))?;
                mlx::transforms::eval(&[&weight, &scales, &biases])?;
                let stem = t.name.strip_suffix(".weight").unwrap_or(&t.name).to_owned();
                self.pending.insert(format!("{stem}.scales"), scales);
                self.pending.insert(format!("{stem}.biases"), biases);
                weight
            }
        };
        Ok(out)
    }
}

/// Writes one shard, `tensors` in this order, to `path`; `done` counts the
/// tensors written so far (for the progress events).
pub(crate) fn write_shard(
    path: &Path,
    tensors: &[&OutTensor],
    maker: &mut Maker,
    done: &mut usize,
    progress: &mut dyn FnMut(Event<'_>),
) -> Result<()> {
    let mut tmp = TempFile::beside(path, "")?;
    let io = |e: std::io::Error| Error::Io { op: OP, path: path.to_path_buf(), source: e };
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.file());
        let head = header(tensors);
        w.write_all(&(head.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&head).map_err(io)?;
        for t in tensors {
            let a = maker.make(t)?;
            let shape: Vec<i64> = a.shape().iter().map(|&d| i64::from(d)).collect();
            if a.dtype() != t.dtype || shape != t.shape {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "{} came out as {} {shape:?}, not the planned {} {:?}",
                        t.name,
                        a.dtype(),
                        t.dtype,
                        t.shape
                    ),
                ));
            }
            write_array(&mut w, &a).map_err(|e| match e {
                WriteError::Io(e) => io(e),
                WriteError::Mlx(e) => e,
            })?;
            drop(a);
            *done += 1;
            progress(Event::Tensor { done: *done, name: &t.name });
        }
        w.flush().map_err(io)?;
    }
    tmp.commit()
}

enum WriteError {
    Io(std::io::Error),
    Mlx(Error),
}

/// The bytes read back from an array at a time: a larger matrix is written a
/// block of rows at a time, so that its copy in our memory stays small.
const BLOCK_BYTES: usize = 8 << 20;

/// The elements of `a` in row-major order as little-endian bytes.
fn write_array(w: &mut impl Write, a: &Array) -> std::result::Result<(), WriteError> {
    let shape = a.shape();
    if shape.len() < 2 || a.nbytes() <= BLOCK_BYTES || shape[0] <= 1 {
        return write_block(w, a);
    }
    let row_bytes = (a.nbytes() / shape[0] as usize).max(1);
    let rows = i32::try_from((BLOCK_BYTES / row_bytes).max(1)).unwrap_or(i32::MAX);
    let mut start = 0;
    while start < shape[0] {
        let end = start.saturating_add(rows).min(shape[0]);
        let (mut lo, mut hi) = (vec![0; shape.len()], shape.clone());
        (lo[0], hi[0]) = (start, end);
        write_block(w, &ops::slice(a, &lo, &hi).map_err(WriteError::Mlx)?)?;
        start = end;
    }
    Ok(())
}

/// The elements of `a` in row-major order as little-endian bytes: MLX's own
/// on a little-endian machine (every machine MLX runs on), byte-swapped
/// otherwise.
fn write_block(w: &mut impl Write, a: &Array) -> std::result::Result<(), WriteError> {
    fn put<T: bytemuck::Pod, const N: usize>(
        w: &mut impl Write,
        v: &[T],
        le: impl Fn(T) -> [u8; N],
    ) -> std::result::Result<(), WriteError> {
        if cfg!(target_endian = "little") {
            return w.write_all(bytemuck::cast_slice(v)).map_err(WriteError::Io);
        }
        let bytes: Vec<u8> = v.iter().flat_map(|&x| le(x)).collect();
        w.write_all(&bytes).map_err(WriteError::Io)
    }
    let mlx = WriteError::Mlx;
    match a.dtype() {
        Dtype::Float32 => put(w, &a.to_vec::<f32>().map_err(mlx)?, f32::to_le_bytes),
        Dtype::Uint32 => put(w, &a.to_vec::<u32>().map_err(mlx)?, u32::to_le_bytes),
        Dtype::Float16 => put(w, a.to_vec::<f16>().map_err(mlx)?.reinterpret_cast(), u16::to_le_bytes),
        Dtype::Bfloat16 => put(w, a.to_vec::<bf16>().map_err(mlx)?.reinterpret_cast(), u16::to_le_bytes),
        d => Err(WriteError::Mlx(Error::invalid(OP, format!("cannot write a {d} tensor")))),
    }
}

/// `model.safetensors.index.json` as mlx-lm's `save_model` writes it: the
/// total size and parameter count, and every tensor's file, sorted by name.
pub(crate) fn index(tensors: &[OutTensor], shards: &[std::ops::Range<usize>], parameters: u64) -> String {
    let mut map: Vec<(&str, String)> = Vec::new();
    for (i, r) in shards.iter().enumerate() {
        let file = shard_name(i, shards.len());
        map.extend(tensors[r.clone()].iter().map(|t| (t.name.as_str(), file.clone())));
    }
    map.sort();
    let weight_map: Map<String, Value> = map.into_iter().map(|(k, v)| (k.to_owned(), Value::String(v))).collect();
    let total: u64 = tensors.iter().map(OutTensor::nbytes).sum();
    let doc = json!({
        "metadata": {"total_size": total, "total_parameters": parameters},
        "weight_map": weight_map,
    });
    pyjson::dump(&doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, bytes: i64) -> OutTensor {
        OutTensor { name: name.into(), source: name.into(), dtype: Dtype::Uint8, shape: vec![bytes], make: Make::Cast }
    }

    #[test]
    fn shards_are_cut_as_make_shards_cuts_them() {
        let ts = [t("a", 4), t("b", 4), t("c", 3), t("d", 20), t("e", 1)];
        assert_eq!(make_shards(&ts, 10), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(make_shards(&ts, 100), vec![0..5]);
        assert_eq!(make_shards(&ts[..0], 10), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(shard_name(0, 1), "model.safetensors");
        assert_eq!(shard_name(1, 12), "model-00002-of-00012.safetensors");
    }

    #[test]
    fn headers_are_padded_to_eight_bytes() {
        let (a, b) = (t("a", 4), t("bb", 3));
        let h = header(&[&a, &b]);
        assert_eq!(h.len() % 8, 0);
        let v: Value = serde_json::from_slice(&h).unwrap_or_default();
        assert_eq!(v["bb"]["data_offsets"], json!([4, 7]));
        assert_eq!(v["__metadata__"]["format"], "mlx");
    }
}
