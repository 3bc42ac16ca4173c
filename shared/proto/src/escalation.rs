//! Escalations (device → cloud) and their answers (cloud → device).
//!
//! An agent that is unsure of an input sends an [`EscalationRequest`]: what it saw (in the form its
//! privacy mode allows), what it thought, and which policy rule sent it. The escalator answers with
//! a [`Verdict`], or a [`Rejection`] saying why it will not.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::{Deserialize, Serialize};
use serde_with::serde_as;

use crate::bytes::Blob;
use crate::model::ModelRef;
use crate::validate::{
    MAX_LIST_LEN, MAX_SCORES, MAX_TENSOR_RANK, ValidationError, check_finite, check_identifier,
    check_len, check_range, check_text,
};

/// Identifies one escalation end to end; the verdict carries it back. A random (v4) UUID.
pub type EscalationId = uuid::Uuid;

/// Element type of a [`Tensor`]. Append-only: new types go at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// Signed 8-bit, usually quantized.
    I8,
    /// Unsigned 8-bit, usually quantized or raw pixels.
    U8,
    /// Signed 16-bit.
    I16,
    /// Signed 32-bit.
    I32,
    /// Signed 64-bit.
    I64,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::F16 | DType::I16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
        }
    }

    /// The name used in JSON and in messages, e.g. `f32`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }

    const fn is_integer(self) -> bool {
        !matches!(self, DType::F32 | DType::F16)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Affine quantization of an integer tensor: `real = scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantization {
    /// Step between adjacent integer values; finite and positive.
    pub scale: f32,
    /// The integer that represents 0.0.
    pub zero_point: i32,
}

/// A dense tensor: element type, shape, and little-endian row-major bytes.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, outermost first. At most 8.
    pub shape: Vec<u32>,
    /// Present when integer data stands for real numbers.
    pub quantization: Option<Quantization>,
    /// `product(shape) * dtype.size()` bytes, little-endian, row-major. Base64 in JSON.
    #[serde_as(as = "Blob")]
    pub data: Vec<u8>,
}

impl Tensor {
    /// An `f32` tensor from values.
    ///
    /// The caller keeps `values.len()` equal to the product of `shape`; [`Tensor::validate`]
    /// reports it if not.
    pub fn from_f32(shape: Vec<u32>, values: &[f32]) -> Self {
        Tensor {
            dtype: DType::F32,
            shape,
            quantization: None,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The elements as `f32`, when the tensor is `f32` (`None` for other types).
    pub fn f32_values(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
    }

    /// Number of elements the shape describes, `None` if it overflows `u64`.
    pub fn element_count(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)))
    }

    /// Checks rank, quantization and that the data length matches the shape.
    pub fn validate(&self, field: &'static str) -> Result<(), ValidationError> {
        check_len(field, self.shape.len(), MAX_TENSOR_RANK)?;
        if let Some(q) = &self.quantization {
            if !self.dtype.is_integer() {
                return Err(ValidationError::Inconsistent {
                    field,
                    problem: "quantization is only meaningful on integer tensors",
                });
            }
            check_range(field, q.scale, f32::MIN_POSITIVE, f32::MAX)?;
        }
        let expected = self
            .element_count()
            .and_then(|n| n.checked_mul(self.dtype.size() as u64));
        if expected != Some(self.data.len() as u64) {
            return Err(ValidationError::TensorSize {
                field,
                shape: format!("{:?}", self.shape),
                dtype: self.dtype.name(),
                expected: expected.map_or_else(|| "overflow".into(), |n| format!("{n}")),
                actual: self.data.len(),
            });
        }
        Ok(())
    }
}

/// What an agent may send off the device. Stated in every escalation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// The input as the model saw it.
    Raw,
    /// Configured fields dropped, identifiers pseudonymized, tensors optionally reduced.
    Redacted,
    /// Only the edge model's embedding; the cloud classifies it with its tail model.
    Embedding,
}

impl PrivacyMode {
    /// The name used in JSON and config, e.g. `redacted`.
    pub const fn name(self) -> &'static str {
        match self {
            PrivacyMode::Raw => "raw",
            PrivacyMode::Redacted => "redacted",
            PrivacyMode::Embedding => "embedding",
        }
    }
}

/// What an escalation carries, one kind per privacy mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// The model input ([`PrivacyMode::Raw`]).
    Tensor(Tensor),
    /// The edge model's embedding ([`PrivacyMode::Embedding`]).
    Embedding(Tensor),
    /// A redacted record ([`PrivacyMode::Redacted`]).
    Redacted(RedactedRecord),
}

impl Payload {
    /// The privacy mode this payload kind belongs to.
    pub const fn privacy_mode(&self) -> PrivacyMode {
        match self {
            Payload::Tensor(_) => PrivacyMode::Raw,
            Payload::Embedding(_) => PrivacyMode::Embedding,
            Payload::Redacted(_) => PrivacyMode::Redacted,
        }
    }
}

/// An input after redaction: what is left of its tensor and metadata, and what was done to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedactedRecord {
    /// The (possibly downscaled or quantized) input tensor, if any is kept.
    pub tensor: Option<Tensor>,
    /// Metadata fields that survived redaction; identifiers among them are pseudonyms.
    pub fields: Vec<Field>,
    /// What the agent did, so the cloud can interpret the record.
    pub redactions: Vec<Redaction>,
}

/// One metadata field of a redacted record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// Field name.
    pub name: String,
    /// Field value (a keyed-hash pseudonym for identifiers).
    pub value: String,
}

/// One redaction step applied to a record. Append-only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Redaction {
    /// This many configured fields were removed.
    FieldsDropped {
        /// How many.
        count: u32,
    },
    /// Device and user identifiers were replaced by a keyed hash.
    IdentifiersPseudonymized,
    /// Spatial dimensions were divided by `factor`.
    Downscaled {
        /// Downscale factor, at least 2.
        factor: u16,
    },
    /// Values were quantized to `bits` bits.
    Quantized {
        /// Bits per value.
        bits: u8,
    },
}

/// A class index and its score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassScore {
    /// Class index in the model's label list.
    pub class: u32,
    /// Score (a probability when the model's output is one).
    pub score: f32,
}

/// How confidence is computed from a score vector. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfidenceMetric {
    /// The top-1 probability.
    MaxProb,
    /// Top-1 minus top-2 probability.
    Margin,
    /// `1 - H(p) / ln(K)`: 1 for a one-hot distribution, 0 for a uniform one.
    Entropy,
}

/// A confidence value in `0..=1` and the metric that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Confidence {
    /// The metric.
    pub metric: ConfidenceMetric,
    /// Its value in `0..=1`; higher is more confident for every metric.
    pub value: f32,
}

/// The policy rule that sent an input to the cloud. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyRule {
    /// Confidence was under the policy's threshold.
    LowConfidence {
        /// The threshold in force.
        threshold: f32,
    },
    /// Confidence was under the threshold set for the predicted class.
    ClassThreshold {
        /// The predicted class.
        class: u32,
        /// Its threshold.
        threshold: f32,
    },
    /// A confident input picked by the random audit sample (drift monitoring).
    Audit,
    /// Sent on request (an operator or a local program asked for a second opinion).
    Manual,
}

/// What the edge model concluded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeResult {
    /// Best classes, best first.
    pub top_k: Vec<ClassScore>,
    /// The confidence the policy judged.
    pub confidence: Confidence,
    /// The rule that fired.
    pub rule: PolicyRule,
    /// Edge inference time, microseconds.
    pub inference_us: u32,
}

/// An input the agent is unsure about, sent for a second opinion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationRequest {
    /// Unique id; the verdict carries it back.
    pub id: EscalationId,
    /// The device id, or its keyed pseudonym in redacted mode.
    pub device: String,
    /// The edge model that produced `edge`.
    pub model: ModelRef,
    /// What the payload is allowed to contain; must match the payload kind.
    pub privacy: PrivacyMode,
    /// The input, in the form `privacy` allows.
    pub payload: Payload,
    /// The edge model's answer and why it was escalated.
    pub edge: EdgeResult,
    /// Device wall clock when sent, milliseconds since the Unix epoch.
    pub sent_at_ms: u64,
}

impl EscalationRequest {
    pub(crate) fn validate(&self) -> Result<(), ValidationError> {
        check_identifier("escalation.device", &self.device)?;
        self.model.validate("escalation.model.name")?;
        if self.payload.privacy_mode() != self.privacy {
            return Err(ValidationError::Inconsistent {
                field: "escalation.payload",
                problem: "the payload kind does not match the stated privacy mode",
            });
        }
        match &self.payload {
            Payload::Tensor(t) => t.validate("escalation.payload.tensor")?,
            Payload::Embedding(t) => t.validate("escalation.payload.embedding")?,
            Payload::Redacted(r) => {
                if let Some(t) = &r.tensor {
                    t.validate("escalation.payload.redacted.tensor")?;
                }
                check_len(
                    "escalation.payload.redacted.fields",
                    r.fields.len(),
                    MAX_LIST_LEN,
                )?;
                for f in &r.fields {
                    check_text("escalation.payload.redacted.fields.name", &f.name)?;
                    check_text("escalation.payload.redacted.fields.value", &f.value)?;
                }
                check_len(
                    "escalation.payload.redacted.redactions",
                    r.redactions.len(),
                    MAX_LIST_LEN,
                )?;
            }
        }
        validate_scores("escalation.edge.top_k", &self.edge.top_k)?;
        check_range(
            "escalation.edge.confidence.value",
            self.edge.confidence.value,
            0.0,
            1.0,
        )?;
        match self.edge.rule {
            PolicyRule::LowConfidence { threshold }
            | PolicyRule::ClassThreshold { threshold, .. } => {
                check_finite("escalation.edge.rule.threshold", threshold)
            }
            PolicyRule::Audit | PolicyRule::Manual => Ok(()),
        }
    }
}

fn validate_scores(field: &'static str, scores: &[ClassScore]) -> Result<(), ValidationError> {
    check_len(field, scores.len(), MAX_SCORES)?;
    scores.iter().try_for_each(|s| check_finite(field, s.score))
}

/// Where the time went between the escalator receiving a request and answering it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// Waiting in the batcher, microseconds.
    pub queue_us: u32,
    /// Running the batch, microseconds.
    pub inference_us: u32,
    /// Receipt to publish, microseconds.
    pub total_us: u32,
}

/// The cloud's answer to an escalation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    /// The escalation answered.
    pub id: EscalationId,
    /// The winning class.
    pub class: u32,
    /// Its label, when the cloud model has labels.
    pub label: Option<String>,
    /// Best classes with scores, best first.
    pub scores: Vec<ClassScore>,
    /// The cloud model that answered.
    pub model: ModelRef,
    /// Server-side timings.
    pub timings: Timings,
    /// Size of the batch this request ran in.
    pub batch_size: u16,
}

impl Verdict {
    pub(crate) fn validate(&self) -> Result<(), ValidationError> {
        if let Some(label) = &self.label {
            check_text("verdict.label", label)?;
        }
        validate_scores("verdict.scores", &self.scores)?;
        self.model.validate("verdict.model.name")
    }
}

/// Why the escalator refused an escalation. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The payload did not decode or failed validation.
    Malformed,
    /// No cloud model serves this edge model.
    UnknownModel,
    /// Over the size limit.
    TooLarge,
    /// The device exceeded its escalation rate.
    RateLimited,
    /// The message expired before it could be answered.
    Expired,
    /// The escalator's queues are full; retry later.
    Overloaded,
    /// This escalator does not accept the stated privacy mode.
    PrivacyModeNotAccepted,
}

impl RejectReason {
    /// Stable snake_case name, used in metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::UnknownModel => "unknown_model",
            RejectReason::TooLarge => "too_large",
            RejectReason::RateLimited => "rate_limited",
            RejectReason::Expired => "expired",
            RejectReason::Overloaded => "overloaded",
            RejectReason::PrivacyModeNotAccepted => "privacy_mode_not_accepted",
        }
    }

    /// Whether sending the same escalation later may succeed.
    pub const fn retryable(self) -> bool {
        matches!(self, RejectReason::RateLimited | RejectReason::Overloaded)
    }
}

/// The escalator's refusal, sent so that a device stops waiting for a verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rejection {
    /// The escalation refused, when its id could be read.
    pub id: Option<EscalationId>,
    /// Why.
    pub reason: RejectReason,
    /// Details for a person reading logs.
    pub detail: String,
}

impl Rejection {
    pub(crate) fn validate(&self) -> Result<(), ValidationError> {
        check_text("rejection.detail", &self.detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn tensor_size_must_match_shape() {
        let mut t = Tensor::from_f32(vec![2, 3], &[0.0; 6]);
        assert_eq!(t.validate("t"), Ok(()));
        t.data.pop();
        let err = t.validate("t").unwrap_err();
        assert!(
            matches!(err, ValidationError::TensorSize { actual: 23, .. }),
            "{err}"
        );
    }

    #[test]
    fn tensor_shape_overflow_is_an_error_not_a_panic() {
        let t = Tensor {
            dtype: DType::I64,
            shape: vec![u32::MAX, u32::MAX, u32::MAX],
            quantization: None,
            data: vec![],
        };
        let err = t.validate("t").unwrap_err();
        assert!(err.to_string().contains("overflow"), "{err}");
    }

    #[test]
    fn quantization_needs_integer_dtype_and_positive_scale() {
        let mut t = Tensor::from_f32(vec![1], &[1.0]);
        t.quantization = Some(Quantization {
            scale: 0.1,
            zero_point: 0,
        });
        assert!(t.validate("t").is_err());
        let q = Tensor {
            dtype: DType::I8,
            shape: vec![1],
            quantization: Some(Quantization {
                scale: 0.0,
                zero_point: 0,
            }),
            data: vec![3],
        };
        assert!(q.validate("t").is_err());
    }

    #[test]
    fn f32_values_round_trip() {
        let values = [1.5, -2.0, f32::MIN_POSITIVE];
        let t = Tensor::from_f32(vec![3], &values);
        assert_eq!(t.f32_values().unwrap(), values);
    }
}
