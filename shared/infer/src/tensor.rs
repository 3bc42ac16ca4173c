//! Tensors as the engine API sees them: a dense n-dimensional array of one element type.
//!
//! Backends convert to and from their own representation at the edge of `run`. Quantization
//! parameters are not carried here: an int8 model takes and returns plain `i8` arrays, and its
//! [`crate::TensorSpec`] says what they mean.

use std::fmt;
use std::io::Cursor;
use std::path::Path;

use ndarray::ArrayD;
use ndarray_npy::{ReadNpyError, ReadNpyExt, WriteNpyExt};

use crate::error::InferError;

/// Element type of a [`Tensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// Boolean.
    Bool,
}

impl DType {
    /// Lower-case name, as numpy spells it (`float32`, `int8`, ...).
    pub const fn numpy_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::Bool => "bool",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.numpy_name())
    }
}

/// A dense tensor in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub enum Tensor {
    /// `float32` elements.
    F32(ArrayD<f32>),
    /// `int8` elements.
    I8(ArrayD<i8>),
    /// `uint8` elements.
    U8(ArrayD<u8>),
    /// `int16` elements.
    I16(ArrayD<i16>),
    /// `int32` elements.
    I32(ArrayD<i32>),
    /// `int64` elements.
    I64(ArrayD<i64>),
    /// `bool` elements.
    Bool(ArrayD<bool>),
}

/// Applies `$body` to the array inside a tensor, whatever its element type.
macro_rules! with_array {
    ($tensor:expr, $a:ident => $body:expr) => {
        match $tensor {
            Tensor::F32($a) => $body,
            Tensor::I8($a) => $body,
            Tensor::U8($a) => $body,
            Tensor::I16($a) => $body,
            Tensor::I32($a) => $body,
            Tensor::I64($a) => $body,
            Tensor::Bool($a) => $body,
        }
    };
}

impl Tensor {
    /// Element type.
    pub fn dtype(&self) -> DType {
        match self {
            Tensor::F32(_) => DType::F32,
            Tensor::I8(_) => DType::I8,
            Tensor::U8(_) => DType::U8,
            Tensor::I16(_) => DType::I16,
            Tensor::I32(_) => DType::I32,
            Tensor::I64(_) => DType::I64,
            Tensor::Bool(_) => DType::Bool,
        }
    }

    /// Dimensions.
    pub fn shape(&self) -> &[usize] {
        with_array!(self, a => a.shape())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        with_array!(self, a => a.len())
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An `f32` tensor from a shape and values in C order.
    pub fn from_f32(shape: &[usize], values: Vec<f32>) -> Result<Self, InferError> {
        ArrayD::from_shape_vec(shape, values)
            .map(Tensor::F32)
            .map_err(|e| InferError::Tensor(format!("values do not fill shape {shape:?}: {e}")))
    }

    /// The `f32` array, if this is an `f32` tensor.
    pub fn as_f32(&self) -> Option<&ArrayD<f32>> {
        match self {
            Tensor::F32(a) => Some(a),
            _ => None,
        }
    }

    /// The elements converted to `f32` (exact for every integer type here but `i32`/`i64`
    /// beyond 2^24).
    pub fn to_f32(&self) -> ArrayD<f32> {
        match self {
            Tensor::F32(a) => a.clone(),
            Tensor::I8(a) => a.mapv(f32::from),
            Tensor::U8(a) => a.mapv(f32::from),
            Tensor::I16(a) => a.mapv(f32::from),
            Tensor::I32(a) => a.mapv(|v| v as f32),
            Tensor::I64(a) => a.mapv(|v| v as f32),
            Tensor::Bool(a) => a.mapv(|v| f32::from(u8::from(v))),
        }
    }

    /// Reads a `.npy` file of any supported element type.
    pub fn read_npy(path: &Path) -> Result<Self, InferError> {
        let bytes = std::fs::read(path).map_err(|source| InferError::Io {
            path: path.to_owned(),
            error: source,
        })?;
        Self::from_npy_bytes(&bytes).map_err(|detail| InferError::Npy {
            path: path.to_owned(),
            detail,
        })
    }

    /// Parses `.npy` bytes; the element type comes from the header.
    pub fn from_npy_bytes(bytes: &[u8]) -> Result<Self, String> {
        // ndarray-npy reads a known element type; try each in turn. A mismatch is reported as
        // WrongDescriptor before any data is read, so this costs one header parse per type.
        macro_rules! attempt {
            ($variant:ident, $t:ty) => {
                match ArrayD::<$t>::read_npy(Cursor::new(bytes)) {
                    Ok(a) => return Ok(Tensor::$variant(a.as_standard_layout().into_owned())),
                    Err(ReadNpyError::WrongDescriptor(_)) => {}
                    Err(e) => return Err(e.to_string()),
                }
            };
        }
        attempt!(F32, f32);
        attempt!(I8, i8);
        attempt!(U8, u8);
        attempt!(I16, i16);
        attempt!(I32, i32);
        attempt!(I64, i64);
        attempt!(Bool, bool);
        Err(
            "unsupported element type (supported: float32, int8, uint8, int16, int32, int64, bool)"
                .into(),
        )
    }

    /// Writes a `.npy` file in C order.
    pub fn write_npy(&self, path: &Path) -> Result<(), InferError> {
        let file = std::fs::File::create(path).map_err(|source| InferError::Io {
            path: path.to_owned(),
            error: source,
        })?;
        let writer = std::io::BufWriter::new(file);
        with_array!(self, a => a.as_standard_layout().write_npy(writer)).map_err(|e| {
            InferError::Npy {
                path: path.to_owned(),
                detail: e.to_string(),
            }
        })
    }

    /// `.npy` bytes in C order.
    pub fn to_npy_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail for these element types.
        let _ = with_array!(self, a => a.as_standard_layout().write_npy(&mut out));
        out
    }
}

/// The elements' bytes in memory (native byte order), when they lie in C order without gaps.
pub(crate) fn as_ne_bytes(t: &Tensor) -> Option<&[u8]> {
    fn bytes<T: bytemuck::NoUninit>(a: &ArrayD<T>) -> Option<&[u8]> {
        a.as_slice().map(bytemuck::cast_slice)
    }
    match t {
        Tensor::F32(a) => bytes(a),
        Tensor::I8(a) => bytes(a),
        Tensor::U8(a) => bytes(a),
        Tensor::I16(a) => bytes(a),
        Tensor::I32(a) => bytes(a),
        Tensor::I64(a) => bytes(a),
        Tensor::Bool(a) => bytes(a),
    }
}

/// The elements as bytes in C order and native byte order: how a C++ engine holds a tensor.
#[cfg(any(test, feature = "tflite"))]
pub(crate) fn to_ne_bytes(t: &Tensor) -> Vec<u8> {
    macro_rules! bytes {
        ($a:expr) => {
            $a.as_standard_layout()
                .iter()
                .flat_map(|v| v.to_ne_bytes())
                .collect()
        };
    }
    match t {
        Tensor::F32(a) => bytes!(a),
        Tensor::I8(a) => bytes!(a),
        Tensor::U8(a) => bytes!(a),
        Tensor::I16(a) => bytes!(a),
        Tensor::I32(a) => bytes!(a),
        Tensor::I64(a) => bytes!(a),
        Tensor::Bool(a) => a
            .as_standard_layout()
            .iter()
            .map(|&v| u8::from(v))
            .collect(),
    }
}

/// A tensor from bytes laid out as [`to_ne_bytes`] writes them.
#[cfg(any(test, feature = "tflite"))]
pub(crate) fn from_ne_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor, String> {
    let count: usize = shape.iter().product();
    macro_rules! parse {
        ($variant:ident, $t:ty) => {{
            const SIZE: usize = std::mem::size_of::<$t>();
            if bytes.len() != count * SIZE {
                return Err(format!(
                    "{} bytes cannot hold {count} {} elements of shape {shape:?}",
                    bytes.len(),
                    dtype
                ));
            }
            let values = bytes
                .chunks_exact(SIZE)
                .map(|c| <$t>::from_ne_bytes(c.try_into().expect("chunk of SIZE bytes")))
                .collect();
            ArrayD::from_shape_vec(shape, values)
                .map(Tensor::$variant)
                .map_err(|e| e.to_string())
        }};
    }
    match dtype {
        DType::F32 => parse!(F32, f32),
        DType::I8 => parse!(I8, i8),
        DType::U8 => parse!(U8, u8),
        DType::I16 => parse!(I16, i16),
        DType::I32 => parse!(I32, i32),
        DType::I64 => parse!(I64, i64),
        DType::Bool => {
            let as_u8 = parse!(U8, u8)?;
            let Tensor::U8(a) = as_u8 else {
                unreachable!("parse!(U8) builds a U8 tensor")
            };
            Ok(Tensor::Bool(a.mapv(|v| v != 0)))
        }
    }
}

/// Rows `rows` of a batch, as a batch of their own.
pub(crate) fn slice_rows(t: &Tensor, rows: std::ops::Range<usize>) -> Tensor {
    use ndarray::{Axis, Slice};
    macro_rules! one {
        ($variant:ident, $a:expr) => {
            Tensor::$variant($a.slice_axis(Axis(0), Slice::from(rows.clone())).to_owned())
        };
    }
    match t {
        Tensor::F32(a) => one!(F32, a),
        Tensor::I8(a) => one!(I8, a),
        Tensor::U8(a) => one!(U8, a),
        Tensor::I16(a) => one!(I16, a),
        Tensor::I32(a) => one!(I32, a),
        Tensor::I64(a) => one!(I64, a),
        Tensor::Bool(a) => one!(Bool, a),
    }
}

/// Stacks tensors of one element type along axis 0.
pub(crate) fn concat_batch(items: &[Tensor]) -> Result<Tensor, InferError> {
    use ndarray::{Axis, concatenate};
    macro_rules! cat {
        ($variant:ident) => {{
            let views = items
                .iter()
                .map(|t| match t {
                    Tensor::$variant(a) => Ok(a.view()),
                    other => Err(InferError::Tensor(format!(
                        "cannot stack {} with {}",
                        other.dtype(),
                        items[0].dtype()
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            concatenate(Axis(0), &views)
                .map(Tensor::$variant)
                .map_err(|e| InferError::Tensor(format!("cannot stack outputs: {e}")))
        }};
    }
    match items.first() {
        None => Err(InferError::Tensor("empty batch".into())),
        Some(Tensor::F32(_)) => cat!(F32),
        Some(Tensor::I8(_)) => cat!(I8),
        Some(Tensor::U8(_)) => cat!(U8),
        Some(Tensor::I16(_)) => cat!(I16),
        Some(Tensor::I32(_)) => cat!(I32),
        Some(Tensor::I64(_)) => cat!(I64),
        Some(Tensor::Bool(_)) => cat!(Bool),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_keeps_dtype_and_shape() {
        let cases = [
            Tensor::F32(
                ArrayD::from_shape_vec(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]).unwrap(),
            ),
            Tensor::I8(ArrayD::from_shape_vec(vec![3], vec![-128, 0, 127]).unwrap()),
            Tensor::U8(ArrayD::from_shape_vec(vec![1, 1], vec![200]).unwrap()),
            Tensor::I64(ArrayD::from_shape_vec(vec![], vec![16000]).unwrap()),
            Tensor::Bool(ArrayD::from_shape_vec(vec![2], vec![true, false]).unwrap()),
        ];
        for t in cases {
            let back = Tensor::from_npy_bytes(&t.to_npy_bytes()).unwrap();
            assert_eq!(back, t);
        }
    }

    #[test]
    fn garbage_is_not_npy() {
        assert!(Tensor::from_npy_bytes(b"not an npy file").is_err());
        assert!(Tensor::from_npy_bytes(b"").is_err());
    }

    #[test]
    fn truncated_npy_is_an_error() {
        let t = Tensor::F32(ArrayD::from_shape_vec(vec![4], vec![1.0; 4]).unwrap());
        let bytes = t.to_npy_bytes();
        let err = Tensor::from_npy_bytes(&bytes[..bytes.len() - 2]).unwrap_err();
        assert!(err.contains("EOF") || err.contains("data"), "{err}");
    }

    #[test]
    fn native_bytes_round_trip_and_wrong_lengths_are_named() {
        let cases = [
            Tensor::F32(ArrayD::from_shape_vec(vec![1, 2], vec![-1.5, 3.25]).unwrap()),
            Tensor::I8(ArrayD::from_shape_vec(vec![3], vec![-128, 0, 127]).unwrap()),
            Tensor::I16(ArrayD::from_shape_vec(vec![2], vec![-300, 300]).unwrap()),
            Tensor::I64(ArrayD::from_shape_vec(vec![], vec![1 << 40]).unwrap()),
            Tensor::Bool(ArrayD::from_shape_vec(vec![2], vec![true, false]).unwrap()),
        ];
        for t in cases {
            let bytes = to_ne_bytes(&t);
            assert_eq!(from_ne_bytes(t.dtype(), t.shape(), &bytes).unwrap(), t);
            let err = from_ne_bytes(t.dtype(), t.shape(), &bytes[1..]).unwrap_err();
            assert!(err.contains("cannot hold"), "{err}");
        }
        // Non-standard layouts are written in C order.
        let transposed = ArrayD::from_shape_vec(vec![2, 2], vec![1i8, 2, 3, 4])
            .unwrap()
            .reversed_axes();
        assert_eq!(to_ne_bytes(&Tensor::I8(transposed)), vec![1, 3, 2, 4]);
    }
}
