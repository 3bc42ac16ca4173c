//! PNG and JPEG files as model inputs, preprocessed as the model's sidecar says.

use std::path::Path;

use image::imageops::FilterType;
use ndarray::ArrayD;

use crate::error::InferError;
use crate::metadata::InputMeta;
use crate::tensor::Tensor;

/// Whether a path names an image by its extension (used only to decide how to read an input).
pub fn is_image_path(path: &Path) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg"))
}

/// Decodes an image and turns it into a batch-of-one tensor for `input`.
pub fn load_image(path: &Path, input: &InputMeta) -> Result<Tensor, InferError> {
    let err = |detail: String| InferError::Image {
        path: path.to_owned(),
        detail,
    };
    let prep = input.image.as_ref().ok_or_else(|| {
        err(format!(
            "the model's input {:?} does not take images (its sidecar has no [inputs.image] section); give a .npy file",
            input.name
        ))
    })?;
    let decoded = image::open(path).map_err(|e| err(format!("cannot decode image: {e}")))?;
    let resized = decoded.resize_exact(prep.width, prep.height, FilterType::Triangle);
    let (w, h, c) = (
        prep.width as usize,
        prep.height as usize,
        usize::from(prep.channels),
    );
    let pixels: Vec<u8> = if c == 1 {
        resized.to_luma8().into_raw()
    } else {
        resized.to_rgb8().into_raw()
    };
    let values: Vec<f32> = pixels
        .iter()
        .map(|&p| {
            let p = if prep.invert { 255 - p } else { p };
            f32::from(p) * prep.scale + prep.offset
        })
        .collect();
    // Pixels arrive as H x W x C; lay them out as the model wants.
    let hwc = ArrayD::from_shape_vec(vec![h, w, c], values).map_err(|e| err(e.to_string()))?;
    let layout = input.layout.as_deref().unwrap_or("NHWC");
    let array = match layout {
        "NHWC" => hwc.insert_axis(ndarray::Axis(0)),
        "NCHW" => hwc
            .permuted_axes(vec![2, 0, 1])
            .insert_axis(ndarray::Axis(0)),
        "flat" => hwc
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order(vec![1, h * w * c])
            .map_err(|e| err(e.to_string()))?,
        other => {
            return Err(err(format!(
                "unknown layout {other:?} in the sidecar (expected flat, NHWC or NCHW)"
            )));
        }
    };
    let array = array.as_standard_layout().into_owned();
    let expected: Vec<i64> = input
        .shape
        .iter()
        .map(|&d| if d < 0 { 1 } else { d })
        .collect();
    let got: Vec<i64> = array.shape().iter().map(|&d| d as i64).collect();
    if expected != got {
        return Err(err(format!(
            "preprocessed image has shape {got:?} but input {:?} takes {:?}; check the sidecar's image size and layout",
            input.name, input.shape
        )));
    }
    match (input.dtype.as_str(), input.quantization) {
        ("float32", _) => Ok(Tensor::F32(array)),
        ("int8", Some(q)) => Ok(Tensor::I8(array.mapv(|x| {
            ((x / q.scale).round() + q.zero_point as f32).clamp(-128.0, 127.0) as i8
        }))),
        ("uint8", Some(q)) => {
            Ok(Tensor::U8(array.mapv(|x| {
                ((x / q.scale).round() + q.zero_point as f32).clamp(0.0, 255.0) as u8
            })))
        }
        ("uint8", None) => Ok(Tensor::U8(
            array.mapv(|x| x.round().clamp(0.0, 255.0) as u8),
        )),
        (dtype, _) => Err(err(format!(
            "cannot feed an image to a {dtype} input without quantization parameters in the sidecar"
        ))),
    }
}
