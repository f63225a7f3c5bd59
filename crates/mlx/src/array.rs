// SPDX-License-Identifier: EUPL-1.2
//! [`Array`]: an owned, reference-counted handle to an MLX array, and its dtypes.
//!
//! # Threads
//!
//! Since MLX 0.31.2 the default streams are thread-local: an array must be
//! evaluated on the thread that made it (evaluating elsewhere fails with
//! "There is no Stream(cpu, 0) in current thread"). `Array` is therefore
//! neither `Send` nor `Sync`, checked at compile time below. Code that serves
//! several threads keeps its arrays on one engine thread and talks to it over
//! channels.

use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::ffi::{self, check, sys};

/// The element types of MLX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// `bool`, one byte per element.
    Bool,
    /// `u8`.
    Uint8,
    /// `u16`.
    Uint16,
    /// `u32`.
    Uint32,
    /// `u64`.
    Uint64,
    /// `i8`.
    Int8,
    /// `i16`.
    Int16,
    /// `i32`.
    Int32,
    /// `i64`.
    Int64,
    /// IEEE half precision.
    Float16,
    /// IEEE single precision.
    Float32,
    /// IEEE double precision (CPU only in MLX).
    Float64,
    /// Brain float 16.
    Bfloat16,
    /// Complex with two `f32` parts.
    Complex64,
}

impl Dtype {
    /// Every dtype, in MLX's order.
    pub const ALL: [Dtype; 14] = [
        Dtype::Bool,
        Dtype::Uint8,
        Dtype::Uint16,
        Dtype::Uint32,
        Dtype::Uint64,
        Dtype::Int8,
        Dtype::Int16,
        Dtype::Int32,
        Dtype::Int64,
        Dtype::Float16,
        Dtype::Float32,
        Dtype::Float64,
        Dtype::Bfloat16,
        Dtype::Complex64,
    ];

    pub(crate) fn code(self) -> i32 {
        self as i32
    }

    pub(crate) fn from_code(code: i32) -> Option<Dtype> {
        usize::try_from(code).ok().and_then(|i| Dtype::ALL.get(i).copied())
    }

    /// Bytes per element.
    pub fn size_of(self) -> usize {
        match self {
            Dtype::Bool | Dtype::Uint8 | Dtype::Int8 => 1,
            Dtype::Uint16 | Dtype::Int16 | Dtype::Float16 | Dtype::Bfloat16 => 2,
            Dtype::Uint32 | Dtype::Int32 | Dtype::Float32 => 4,
            Dtype::Uint64 | Dtype::Int64 | Dtype::Float64 | Dtype::Complex64 => 8,
        }
    }

    /// Whether the dtype is a real floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::Float16 | Dtype::Float32 | Dtype::Float64 | Dtype::Bfloat16)
    }

    /// Whether the dtype is an integer type (signed or unsigned).
    pub fn is_integer(self) -> bool {
        matches!(
            self,
            Dtype::Uint8
                | Dtype::Uint16
                | Dtype::Uint32
                | Dtype::Uint64
                | Dtype::Int8
                | Dtype::Int16
                | Dtype::Int32
                | Dtype::Int64
        )
    }

    /// MLX's name for the dtype ("float32", "bfloat16", ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "bool",
            Dtype::Uint8 => "uint8",
            Dtype::Uint16 => "uint16",
            Dtype::Uint32 => "uint32",
            Dtype::Uint64 => "uint64",
            Dtype::Int8 => "int8",
            Dtype::Int16 => "int16",
            Dtype::Int32 => "int32",
            Dtype::Int64 => "int64",
            Dtype::Float16 => "float16",
            Dtype::Float32 => "float32",
            Dtype::Float64 => "float64",
            Dtype::Bfloat16 => "bfloat16",
            Dtype::Complex64 => "complex64",
        }
    }

    /// Parses MLX names ("float32") and safetensors names ("F32", "BF16").
    pub fn parse(s: &str) -> Option<Dtype> {
        let d = match s {
            "bool" | "BOOL" => Dtype::Bool,
            "uint8" | "U8" => Dtype::Uint8,
            "uint16" | "U16" => Dtype::Uint16,
            "uint32" | "U32" => Dtype::Uint32,
            "uint64" | "U64" => Dtype::Uint64,
            "int8" | "I8" => Dtype::Int8,
            "int16" | "I16" => Dtype::Int16,
            "int32" | "I32" => Dtype::Int32,
            "int64" | "I64" => Dtype::Int64,
            "float16" | "F16" => Dtype::Float16,
            "float32" | "F32" => Dtype::Float32,
            "float64" | "F64" => Dtype::Float64,
            "bfloat16" | "BF16" => Dtype::Bfloat16,
            "complex64" | "C64" => Dtype::Complex64,
            _ => return None,
        };
        Some(d)
    }
}

crate::display_by_name!(Dtype);

/// A complex number with `f32` parts, laid out as MLX's `complex64`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[repr(C)]
pub struct Complex64 {
    /// Real part.
    pub re: f32,
    /// Imaginary part.
    pub im: f32,
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type that is the element type of an MLX dtype. Sealed.
pub trait Element: sealed::Sealed + Copy + Default + 'static {
    /// The matching dtype.
    const DTYPE: Dtype;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: Dtype = Dtype::$d;
        }
    )*};
}

element!(
    bool => Bool,
    u8 => Uint8,
    u16 => Uint16,
    u32 => Uint32,
    u64 => Uint64,
    i8 => Int8,
    i16 => Int16,
    i32 => Int32,
    i64 => Int64,
    f16 => Float16,
    f32 => Float32,
    f64 => Float64,
    bf16 => Bfloat16,
    Complex64 => Complex64,
);

/// An owned handle to an MLX array.
///
/// `Drop` releases the handle; `Clone` shares the same buffer (MLX counts
/// references). Arrays are lazy: ops build a graph, and [`Array::eval`] (or
/// reading the data) computes it. Not `Send`/`Sync`: see the module docs.
pub struct Array {
    raw: NonNull<sys::mlxs_array_s>,
    _not_send: PhantomData<*const ()>,
}

// Compile-time proof that Array is neither Send nor Sync: if it were, the
// trait below would have two candidate impls and this would not compile.
const _: () = {
    trait AmbiguousIfSend<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfSend<()> for T {}
    impl<T: ?Sized + Send> AmbiguousIfSend<u8> for T {}
    trait AmbiguousIfSync<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfSync<()> for T {}
    impl<T: ?Sized + Sync> AmbiguousIfSync<u8> for T {}
    let _ = <Array as AmbiguousIfSend<_>>::check;
    let _ = <Array as AmbiguousIfSync<_>>::check;
};

impl Array {
    /// Takes ownership of a raw handle.
    ///
    /// # Safety
    /// `raw` must be a live handle returned by the shim and owned by nobody else.
    pub(crate) unsafe fn from_raw(raw: NonNull<sys::mlxs_array_s>) -> Self {
        Array { raw, _not_send: PhantomData }
    }

    pub(crate) fn as_raw(&self) -> sys::mlxs_array {
        self.raw.as_ptr()
    }

    /// An array of `shape` holding a copy of `data` (row-major).
    ///
    /// Fails if a dimension is negative or the shape's element count is not `data.len()`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[i32]) -> Result<Array> {
        const OP: &str = "array_from_slice";
        let mut count: usize = 1;
        for &d in shape {
            let d =
                usize::try_from(d).map_err(|_| Error::invalid(OP, format!("negative dimension in shape {shape:?}")))?;
            count = count.checked_mul(d).ok_or_else(|| Error::invalid(OP, format!("shape {shape:?} is too large")))?;
        }
        if count != data.len() {
            return Err(Error::invalid(
                OP,
                format!("shape {shape:?} holds {count} elements but {} were given", data.len()),
            ));
        }
        let nbytes = std::mem::size_of_val(data);
        ffi::array_out(OP, |out| {
            // SAFETY: data is valid for nbytes; the shim copies it.
            unsafe {
                sys::mlxs_array_from_data(
                    out,
                    data.as_ptr().cast(),
                    nbytes,
                    shape.as_ptr(),
                    shape.len(),
                    T::DTYPE.code(),
                )
            }
        })
    }

    /// An array of `shape` and `dtype` holding a copy of the raw row-major
    /// `bytes` (little-endian, as safetensors stores them).
    pub(crate) fn from_bytes(bytes: &[u8], shape: &[i32], dtype: Dtype) -> Result<Array> {
        ffi::array_out("array_from_bytes", |out| {
            // SAFETY: bytes is valid for its length; the shim copies it and
            // checks the length against the shape and dtype.
            unsafe {
                sys::mlxs_array_from_data(
                    out,
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    shape.as_ptr(),
                    shape.len(),
                    dtype.code(),
                )
            }
        })
    }

    /// A one-dimensional array holding a copy of `data`.
    pub fn from_vec<T: Element>(data: &[T]) -> Result<Array> {
        let n = ffi::to_c_int("array_from_slice", "length", data.len())?;
        Array::from_slice(data, &[n])
    }

    /// A zero-dimensional array holding `value`.
    pub fn scalar<T: Element>(value: T) -> Array {
        Array::from_slice(&[value], &[]).expect("a scalar always matches the empty shape")
    }

    /// A zero-dimensional array of `dtype` holding `value` (converted).
    pub fn scalar_as(value: f64, dtype: Dtype) -> Result<Array> {
        // SAFETY: plain constructor.
        ffi::array_out("scalar_as", |out| unsafe { sys::mlxs_array_from_f64(out, value, dtype.code()) })
    }

    /// The number of dimensions.
    pub fn ndim(&self) -> usize {
        // SAFETY: live handle.
        unsafe { sys::mlxs_array_ndim(self.as_raw()) }
    }

    /// The shape.
    pub fn shape(&self) -> Vec<i32> {
        let mut dims = vec![0i32; self.ndim()];
        // SAFETY: dims has room for ndim entries.
        unsafe { sys::mlxs_array_shape(self.as_raw(), dims.as_mut_ptr(), dims.len()) };
        dims
    }

    /// The size of one dimension; negative `axis` counts from the end.
    pub fn dim(&self, axis: i32) -> Result<i32> {
        let shape = self.shape();
        let n = shape.len() as i64;
        let i = if axis < 0 { n + i64::from(axis) } else { i64::from(axis) };
        if i < 0 || i >= n {
            return Err(Error::invalid("dim", format!("axis {axis} is out of range for an array with {n} dimensions")));
        }
        Ok(shape[i as usize])
    }

    /// The number of elements.
    pub fn size(&self) -> usize {
        // SAFETY: live handle.
        unsafe { sys::mlxs_array_size(self.as_raw()) }
    }

    /// The number of bytes of the elements (size × itemsize).
    pub fn nbytes(&self) -> usize {
        // SAFETY: live handle.
        unsafe { sys::mlxs_array_nbytes(self.as_raw()) }
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        // SAFETY: live handle.
        let code = unsafe { sys::mlxs_array_dtype(self.as_raw()) };
        Dtype::from_code(code).expect("MLX reported a dtype this crate does not know")
    }

    /// Computes the array (and what it depends on) now.
    pub fn eval(&self) -> Result<()> {
        crate::transforms::eval(&[self])
    }

    /// The elements in row-major order, whatever the layout of the view
    /// (transposes, broadcasts and strided slices are read correctly).
    ///
    /// Fails if `T` is not the array's element type; see [`Array::to_vec_f32`].
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        const OP: &str = "array_to_vec";
        let got = self.dtype();
        if got != T::DTYPE {
            return Err(Error::DtypeMismatch { op: OP, expected: T::DTYPE, got });
        }
        let n = self.size();
        let mut out = vec![T::default(); n];
        let nbytes = std::mem::size_of_val(out.as_slice());
        // SAFETY: out has exactly nbytes of writable storage for T values and
        // the shim writes elements of T::DTYPE in row-major order.
        check(OP, unsafe { sys::mlxs_array_read(self.as_raw(), out.as_mut_ptr().cast(), nbytes) })?;
        Ok(out)
    }

    /// The elements converted to `f32` (any real or integer dtype).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        if self.dtype() == Dtype::Float32 { self.to_vec() } else { crate::ops::astype(self, Dtype::Float32)?.to_vec() }
    }

    /// The single element of a one-element array.
    pub fn item<T: Element>(&self) -> Result<T> {
        if self.size() != 1 {
            return Err(Error::invalid(
                "item",
                format!("item needs an array of one element but the shape is {:?}", self.shape()),
            ));
        }
        Ok(self.to_vec::<T>()?[0])
    }

    /// Whether the evaluated array is laid out row-contiguously in memory.
    pub fn is_row_contiguous(&self) -> bool {
        // SAFETY: live handle.
        unsafe { sys::mlxs_array_row_contiguous(self.as_raw()) }
    }

    /// Strides (in elements) of the evaluated array's memory view.
    pub fn strides(&self) -> Result<Vec<i64>> {
        let mut st = vec![0i64; self.ndim()];
        // SAFETY: st has room for ndim entries.
        check("strides", unsafe { sys::mlxs_array_strides(self.as_raw(), st.as_mut_ptr(), st.len()) })?;
        Ok(st)
    }
}

impl Clone for Array {
    fn clone(&self) -> Self {
        // Sharing a handle only allocates a small C++ object; failure means the
        // process is out of memory, which Rust treats as fatal too.
        ffi::array_out("array_clone", |out| {
            // SAFETY: live handle; the shim writes a new owned handle.
            unsafe { sys::mlxs_array_clone(out, self.as_raw()) }
        })
        .expect("out of memory while sharing an array handle")
    }
}

impl Drop for Array {
    fn drop(&mut self) {
        // SAFETY: we own this handle and free it exactly once.
        unsafe { sys::mlxs_array_free(self.raw.as_ptr()) }
    }
}

impl fmt::Debug for Array {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Array").field("shape", &self.shape()).field("dtype", &self.dtype()).finish()
    }
}

impl From<f32> for Array {
    fn from(v: f32) -> Self {
        Array::scalar(v)
    }
}

impl From<i32> for Array {
    fn from(v: i32) -> Self {
        Array::scalar(v)
    }
}

impl From<bool> for Array {
    fn from(v: bool) -> Self {
        Array::scalar(v)
    }
}
