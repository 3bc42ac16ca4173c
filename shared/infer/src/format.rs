//! Telling model formats apart by their bytes, never by the file name.

use std::fmt;

/// A model file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFormat {
    /// ONNX: a protobuf `ModelProto`.
    Onnx,
    /// TensorFlow Lite: a flatbuffer with file identifier `TFL3`.
    Tflite,
}

impl fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelFormat::Onnx => "ONNX",
            ModelFormat::Tflite => "TFLite",
        })
    }
}

/// Identifies the format of a model file from its first bytes.
///
/// TFLite flatbuffers carry the identifier `TFL3` at offset 4. ONNX has no magic number; a
/// `ModelProto` starts with field 1 (`ir_version`, a varint: byte `0x08`) in every exporter we
/// know of, and the ONNX loader then checks the whole file. `Err` says what the bytes look like.
pub fn detect(bytes: &[u8]) -> Result<ModelFormat, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    if bytes.get(4..8) == Some(b"TFL3") {
        return Ok(ModelFormat::Tflite);
    }
    if bytes[0] == 0x08 && bytes.len() > 2 {
        return Ok(ModelFormat::Onnx);
    }
    Err(describe(bytes))
}

fn describe(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(8)];
    let kind = if bytes.starts_with(b"PK\x03\x04") {
        "a zip archive (a .mltk.zip or .task bundle? extract the model from it)"
    } else if bytes.starts_with(b"\x93NUMPY") {
        "a .npy array"
    } else if bytes.starts_with(b"\x89PNG") || bytes.starts_with(b"\xff\xd8\xff") {
        "an image"
    } else if bytes.starts_with(b"\x89HDF") {
        "a Keras .h5 file (convert it to TFLite or ONNX first)"
    } else if bytes.starts_with(b"\x80") {
        "a Python pickle (PyTorch? export it to ONNX first)"
    } else if head
        .iter()
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        "text"
    } else {
        "unrecognised binary"
    };
    let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
    format!("{kind}; first bytes {}", hex.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_by_content() {
        let mut tflite = vec![0x1c, 0, 0, 0];
        tflite.extend_from_slice(b"TFL3");
        tflite.extend_from_slice(&[0; 16]);
        assert_eq!(detect(&tflite), Ok(ModelFormat::Tflite));
        assert_eq!(detect(&[0x08, 0x07, 0x12, 0x04]), Ok(ModelFormat::Onnx));
    }

    #[test]
    fn explains_what_other_files_are() {
        assert_eq!(detect(b"").unwrap_err(), "the file is empty");
        assert!(detect(b"\x93NUMPY\x01\x00").unwrap_err().contains(".npy"));
        assert!(detect(b"PK\x03\x04rest").unwrap_err().contains("zip"));
        assert!(detect(b"hello world").unwrap_err().starts_with("text"));
    }
}
