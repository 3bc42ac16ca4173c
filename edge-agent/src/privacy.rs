//! What leaves the device: the escalation payload for each privacy mode. Pure.
//!
//! - `raw`: the model input as it is.
//! - `redacted`: configured metadata fields dropped; identifier fields and the device id replaced
//!   by a keyed hash (HMAC-SHA256 with a per-fleet key, so the cloud can correlate a device's
//!   escalations without learning who it is, and nobody without the key can reverse it); the tensor
//!   optionally downscaled (image inputs) and quantized to 8 bits.
//! - `embedding`: only the edge model's embedding output; the cloud classifies it with its tail
//!   model.

use std::collections::BTreeMap;

use cascade_infer::Tensor;
use cascade_infer::wire::to_wire;
use cascade_proto::escalation::{
    Field, Payload, PrivacyMode, Quantization, RedactedRecord, Redaction, Tensor as WireTensor,
};
use hmac::{Hmac, KeyInit, Mac};
use ndarray::{ArrayD, Dimension, IxDyn};
use sha2::Sha256;

/// How to redact, from the agent's config.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RedactionSettings {
    /// Key of the keyed hash for pseudonyms.
    pub key: Vec<u8>,
    /// Metadata fields removed entirely.
    pub drop_fields: Vec<String>,
    /// Metadata fields replaced by their pseudonym.
    pub pseudonymize_fields: Vec<String>,
    /// Average-pool image inputs by this factor (NHWC or NCHW inputs only).
    pub downscale: Option<u16>,
    /// Quantize the tensor to 8 bits.
    pub quantize: bool,
    /// Layout of the model input (`NHWC`, `NCHW`, `flat`), from its sidecar.
    pub layout: Option<String>,
}

/// What could not be prepared.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PrivacyError {
    /// Embedding mode with a model that exposes no embedding.
    #[error("privacy mode \"embedding\" needs a model whose sidecar names an embedding output")]
    NoEmbedding,
    /// Downscaling asked of an input that is not an image.
    #[error("downscale needs an NHWC or NCHW image input of rank 4, got layout {0:?}")]
    NotAnImage(Option<String>),
}

/// The keyed-hash pseudonym of an identifier: 32 hex characters (a valid topic segment).
pub fn pseudonym(key: &[u8], value: &str) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(value.as_bytes());
    let digest = mac.finalize().into_bytes();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// An escalation's device field and payload under `mode`.
pub fn prepare(
    mode: PrivacyMode,
    settings: &RedactionSettings,
    device: &str,
    input: &Tensor,
    embedding: Option<&Tensor>,
    fields: &BTreeMap<String, String>,
) -> Result<(String, Payload), PrivacyError> {
    match mode {
        PrivacyMode::Raw => Ok((device.to_string(), Payload::Tensor(to_wire(input)))),
        PrivacyMode::Embedding => {
            let e = embedding.ok_or(PrivacyError::NoEmbedding)?;
            Ok((
                device.to_string(),
                Payload::Embedding(to_wire(&Tensor::F32(e.to_f32()))),
            ))
        }
        PrivacyMode::Redacted => {
            let mut redactions = Vec::new();
            let mut kept = Vec::new();
            let mut dropped = 0u32;
            for (name, value) in fields {
                if settings.drop_fields.contains(name) {
                    dropped += 1;
                } else if settings.pseudonymize_fields.contains(name) {
                    kept.push(Field {
                        name: name.clone(),
                        value: pseudonym(&settings.key, value),
                    });
                } else {
                    kept.push(Field {
                        name: name.clone(),
                        value: value.clone(),
                    });
                }
            }
            if dropped > 0 {
                redactions.push(Redaction::FieldsDropped { count: dropped });
            }
            redactions.push(Redaction::IdentifiersPseudonymized);
            let mut values = input.to_f32();
            if let Some(factor) = settings.downscale.filter(|f| *f > 1) {
                values = downscale(&values, usize::from(factor), settings.layout.as_deref())?;
                redactions.push(Redaction::Downscaled { factor });
            }
            let tensor = if settings.quantize {
                redactions.push(Redaction::Quantized { bits: 8 });
                quantize_u8(&values)
            } else {
                to_wire(&Tensor::F32(values))
            };
            Ok((
                pseudonym(&settings.key, device),
                Payload::Redacted(RedactedRecord {
                    tensor: Some(tensor),
                    fields: kept,
                    redactions,
                }),
            ))
        }
    }
}

/// Average-pools the spatial axes of a rank-4 image by `factor` (edges that do not fill a block
/// are averaged over what they have).
fn downscale(
    values: &ArrayD<f32>,
    factor: usize,
    layout: Option<&str>,
) -> Result<ArrayD<f32>, PrivacyError> {
    let (h_axis, w_axis) = match (layout, values.ndim()) {
        (Some("NHWC"), 4) => (1, 2),
        (Some("NCHW"), 4) => (2, 3),
        _ => return Err(PrivacyError::NotAnImage(layout.map(str::to_string))),
    };
    let shape = values.shape().to_vec();
    let mut out_shape = shape.clone();
    out_shape[h_axis] = shape[h_axis].div_ceil(factor);
    out_shape[w_axis] = shape[w_axis].div_ceil(factor);
    let mut sums = ArrayD::<f32>::zeros(IxDyn(&out_shape));
    let mut counts = ArrayD::<f32>::zeros(IxDyn(&out_shape));
    for (index, &v) in values.indexed_iter() {
        let mut target = index.as_array_view().to_vec();
        target[h_axis] /= factor;
        target[w_axis] /= factor;
        sums[IxDyn(&target)] += v;
        counts[IxDyn(&target)] += 1.0;
    }
    Ok(sums / counts)
}

/// Quantizes to `u8` over the tensor's own range: `real = scale * (q - zero_point)`.
fn quantize_u8(values: &ArrayD<f32>) -> WireTensor {
    let (lo, hi) = values
        .iter()
        .fold((0.0f32, 0.0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let zero_point = (-lo / scale).round().clamp(0.0, 255.0) as i32;
    let data: Vec<u8> = values
        .iter()
        .map(|&v| ((v / scale).round() + zero_point as f32).clamp(0.0, 255.0) as u8)
        .collect();
    let mut wire = to_wire(&Tensor::U8(
        ArrayD::from_shape_vec(values.raw_dim(), data).expect("same shape"),
    ));
    wire.quantization = Some(Quantization { scale, zero_point });
    wire
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> Tensor {
        Tensor::F32(ArrayD::from_shape_vec(vec![1, 4], vec![0.0, 0.25, 0.5, 1.0]).unwrap())
    }

    fn fields() -> BTreeMap<String, String> {
        [
            ("user", "alice@example.com"),
            ("gps", "48.85,2.35"),
            ("shift", "night"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn settings() -> RedactionSettings {
        RedactionSettings {
            key: b"fleet secret".to_vec(),
            drop_fields: vec!["gps".into()],
            pseudonymize_fields: vec!["user".into()],
            quantize: true,
            ..RedactionSettings::default()
        }
    }

    #[test]
    fn raw_sends_the_input_and_the_device_id() {
        let (device, payload) = prepare(
            PrivacyMode::Raw,
            &settings(),
            "cam-01",
            &input(),
            None,
            &fields(),
        )
        .unwrap();
        assert_eq!(device, "cam-01");
        assert!(matches!(payload, Payload::Tensor(t) if t.shape == [1, 4]));
    }

    #[test]
    fn redacted_drops_pseudonymizes_and_quantizes() {
        let (device, payload) = prepare(
            PrivacyMode::Redacted,
            &settings(),
            "cam-01",
            &input(),
            None,
            &fields(),
        )
        .unwrap();
        assert_eq!(device.len(), 32);
        assert_ne!(device, "cam-01");
        let Payload::Redacted(record) = payload else {
            panic!("redacted payload")
        };
        let names: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["shift", "user"], "gps dropped");
        let user = &record.fields[1].value;
        assert!(!user.contains("alice"));
        assert_eq!(
            user,
            &pseudonym(b"fleet secret", "alice@example.com"),
            "stable pseudonyms"
        );
        assert_ne!(user, &pseudonym(b"other key", "alice@example.com"), "keyed");
        let t = record.tensor.unwrap();
        assert_eq!(t.data.len(), 4, "one byte per value");
        let q = t.quantization.unwrap();
        // Decoding recovers the values within half a step.
        for (&code, &want) in t.data.iter().zip(&[0.0f32, 0.25, 0.5, 1.0]) {
            let got = q.scale * (f32::from(code) - q.zero_point as f32);
            assert!(
                (got - want).abs() <= q.scale / 2.0 + 1e-6,
                "{got} vs {want}"
            );
        }
        assert!(
            record
                .redactions
                .contains(&Redaction::FieldsDropped { count: 1 })
        );
    }

    #[test]
    fn embedding_mode_needs_an_embedding() {
        assert_eq!(
            prepare(
                PrivacyMode::Embedding,
                &settings(),
                "d",
                &input(),
                None,
                &fields()
            )
            .unwrap_err(),
            PrivacyError::NoEmbedding
        );
        let e = Tensor::F32(ArrayD::from_elem(vec![1, 16], 0.5));
        let (_, payload) = prepare(
            PrivacyMode::Embedding,
            &settings(),
            "d",
            &input(),
            Some(&e),
            &fields(),
        )
        .unwrap();
        assert!(matches!(payload, Payload::Embedding(t) if t.shape == [1, 16]));
    }

    #[test]
    fn downscale_averages_image_blocks() {
        let img = Tensor::F32(
            ArrayD::from_shape_vec(vec![1, 4, 4, 1], (0..16).map(|v| v as f32).collect()).unwrap(),
        );
        let s = RedactionSettings {
            downscale: Some(2),
            layout: Some("NHWC".into()),
            ..settings()
        };
        let s = RedactionSettings {
            quantize: false,
            ..s
        };
        let (_, payload) =
            prepare(PrivacyMode::Redacted, &s, "d", &img, None, &BTreeMap::new()).unwrap();
        let Payload::Redacted(r) = payload else {
            panic!()
        };
        let t = cascade_infer::wire::from_wire(&r.tensor.unwrap()).unwrap();
        assert_eq!(t.shape(), &[1, 2, 2, 1]);
        // Top-left block: 0, 1, 4, 5 -> 2.5.
        assert_eq!(t.as_f32().unwrap()[[0, 0, 0, 0]], 2.5);
        let flat = RedactionSettings {
            layout: Some("flat".into()),
            ..s
        };
        assert!(matches!(
            prepare(
                PrivacyMode::Redacted,
                &flat,
                "d",
                &input(),
                None,
                &BTreeMap::new()
            ),
            Err(PrivacyError::NotAnImage(_))
        ));
    }
}
