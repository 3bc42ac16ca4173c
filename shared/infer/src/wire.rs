//! Tensors to and from the protocol's wire form: dtype, shape and little-endian bytes.

use cascade_proto::escalation::{DType as WireType, Quantization, Tensor as WireTensor};
use ndarray::ArrayD;

use crate::error::InferError;
use crate::tensor::Tensor;

/// Our tensor in wire form. Booleans travel as `u8` 0/1.
pub fn to_wire(t: &Tensor) -> WireTensor {
    let shape = t.shape().iter().map(|&d| d as u32).collect();
    let (dtype, data): (WireType, Vec<u8>) = match t {
        Tensor::F32(a) => (
            WireType::F32,
            a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        Tensor::I8(a) => (WireType::I8, a.iter().map(|&v| v as u8).collect()),
        Tensor::U8(a) => (WireType::U8, a.iter().copied().collect()),
        Tensor::I16(a) => (
            WireType::I16,
            a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        Tensor::I32(a) => (
            WireType::I32,
            a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        Tensor::I64(a) => (
            WireType::I64,
            a.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        Tensor::Bool(a) => (WireType::U8, a.iter().map(|&v| u8::from(v)).collect()),
    };
    WireTensor {
        dtype,
        shape,
        quantization: None,
        data,
    }
}

/// A wire tensor as ours. Quantized integer tensors are decoded to `f32` real values
/// (`scale * (q - zero_point)`), since that is what a model that did not produce them expects.
pub fn from_wire(t: &WireTensor) -> Result<Tensor, InferError> {
    t.validate("tensor")
        .map_err(|e| InferError::Tensor(e.to_string()))?;
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let bad = |e: ndarray::ShapeError| InferError::Tensor(e.to_string());
    let tensor = match t.dtype {
        WireType::F32 => Tensor::F32(
            ArrayD::from_shape_vec(
                shape,
                t.data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            )
            .map_err(bad)?,
        ),
        WireType::F16 => {
            return Err(InferError::Tensor(
                "float16 wire tensors are not supported; send float32".into(),
            ));
        }
        WireType::I8 => Tensor::I8(
            ArrayD::from_shape_vec(shape, t.data.iter().map(|&b| b as i8).collect())
                .map_err(bad)?,
        ),
        WireType::U8 => Tensor::U8(ArrayD::from_shape_vec(shape, t.data.clone()).map_err(bad)?),
        WireType::I16 => Tensor::I16(
            ArrayD::from_shape_vec(
                shape,
                t.data
                    .chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            )
            .map_err(bad)?,
        ),
        WireType::I32 => Tensor::I32(
            ArrayD::from_shape_vec(
                shape,
                t.data
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            )
            .map_err(bad)?,
        ),
        WireType::I64 => Tensor::I64(
            ArrayD::from_shape_vec(
                shape,
                t.data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                    .collect(),
            )
            .map_err(bad)?,
        ),
    };
    Ok(match t.quantization {
        Some(Quantization { scale, zero_point }) => {
            let z = zero_point as f32;
            Tensor::F32(tensor.to_f32().mapv(|q| (q - z) * scale))
        }
        None => tensor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_type() {
        let cases = [
            Tensor::F32(ArrayD::from_shape_vec(vec![2, 2], vec![1.0, -2.5, 3.25, 0.0]).unwrap()),
            Tensor::I8(ArrayD::from_shape_vec(vec![3], vec![-128, 0, 127]).unwrap()),
            Tensor::U8(ArrayD::from_shape_vec(vec![1], vec![255]).unwrap()),
            Tensor::I64(ArrayD::from_shape_vec(vec![], vec![16000]).unwrap()),
        ];
        for t in cases {
            assert_eq!(from_wire(&to_wire(&t)).unwrap(), t);
        }
    }

    #[test]
    fn quantized_wire_tensors_decode_to_reals() {
        let mut w = to_wire(&Tensor::U8(
            ArrayD::from_shape_vec(vec![2], vec![0, 255]).unwrap(),
        ));
        w.quantization = Some(Quantization {
            scale: 1.0 / 255.0,
            zero_point: 0,
        });
        let t = from_wire(&w).unwrap();
        let v = t.as_f32().unwrap();
        assert!((v[0] - 0.0).abs() < 1e-6 && (v[1] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn inconsistent_wire_tensors_are_errors() {
        let mut w = to_wire(&Tensor::F32(ArrayD::zeros(vec![4])));
        w.shape = vec![5];
        assert!(from_wire(&w).is_err());
    }
}
