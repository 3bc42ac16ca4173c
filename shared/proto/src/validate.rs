//! The semantic checks every decoded message passes, beyond "the bytes parsed".
//!
//! A payload can be well-formed postcard and still be nonsense: a tensor whose byte count does not
//! match its shape, a NaN score, a ten-megabyte label. Decoders run [`crate::Message::validate`]
//! so that code downstream never sees such a value.

use alloc::string::String;

use crate::topic::{MAX_SEGMENT_LEN, is_name_byte};

/// Longest identifier (fleet, device, group, model name): the topic segment limit.
pub const MAX_IDENTIFIER_LEN: usize = MAX_SEGMENT_LEN;
/// Longest free-text field (labels, reasons, details).
pub const MAX_TEXT_LEN: usize = 1024;
/// Most dimensions a tensor may have.
pub const MAX_TENSOR_RANK: usize = 8;
/// Most entries in a top-k list or score vector.
pub const MAX_SCORES: usize = 4096;
/// Most entries in any other list (fields, groups, devices, class thresholds).
pub const MAX_LIST_LEN: usize = 4096;

/// A decoded message that breaks a rule of the protocol. `field` names where, as a dotted path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// An identifier is empty, too long, or has a character outside `A-Z a-z 0-9 . _ -`.
    #[error(
        "{field}: {value:?} is not a valid identifier (1 to 64 characters of A-Z a-z 0-9 . _ -)"
    )]
    Identifier {
        /// Where.
        field: &'static str,
        /// The offending value, truncated to 80 characters.
        value: String,
    },
    /// A string or list is longer than the protocol allows.
    #[error("{field}: length {len} exceeds the limit of {max}")]
    TooLong {
        /// Where.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A float is NaN or infinite.
    #[error("{field}: {value} is not a finite number")]
    NotFinite {
        /// Where.
        field: &'static str,
        /// The value.
        value: f32,
    },
    /// A number is outside its allowed range.
    #[error("{field}: {value} is outside {min}..={max}")]
    OutOfRange {
        /// Where.
        field: &'static str,
        /// The value.
        value: f64,
        /// Smallest allowed.
        min: f64,
        /// Largest allowed.
        max: f64,
    },
    /// A tensor's data does not hold exactly `shape` elements of `dtype`.
    #[error(
        "{field}: {actual} data bytes do not match shape {shape} of {dtype} ({expected} bytes expected)"
    )]
    TensorSize {
        /// Where.
        field: &'static str,
        /// The shape as text, e.g. `[1, 28, 28]`.
        shape: String,
        /// The element type.
        dtype: &'static str,
        /// Bytes the shape needs (`overflow` if it does not fit in 64 bits).
        expected: String,
        /// Bytes present.
        actual: usize,
    },
    /// Two fields of a message contradict each other.
    #[error("{field}: {problem}")]
    Inconsistent {
        /// Where.
        field: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Checks an identifier (fleet, device, group, model name).
pub fn check_identifier(field: &'static str, value: &str) -> Result<(), ValidationError> {
    let ok =
        !value.is_empty() && value.len() <= MAX_IDENTIFIER_LEN && value.bytes().all(is_name_byte);
    if ok {
        Ok(())
    } else {
        Err(ValidationError::Identifier {
            field,
            value: value.chars().take(80).collect(),
        })
    }
}

/// Checks a free-text field's length.
pub(crate) fn check_text(field: &'static str, value: &str) -> Result<(), ValidationError> {
    check_len(field, value.len(), MAX_TEXT_LEN)
}

/// Checks a length against a limit.
pub(crate) fn check_len(
    field: &'static str,
    len: usize,
    max: usize,
) -> Result<(), ValidationError> {
    if len <= max {
        Ok(())
    } else {
        Err(ValidationError::TooLong { field, len, max })
    }
}

/// Checks that a float is finite.
pub(crate) fn check_finite(field: &'static str, value: f32) -> Result<(), ValidationError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(ValidationError::NotFinite { field, value })
    }
}

/// Checks that a float is finite and within `min..=max`.
pub(crate) fn check_range(
    field: &'static str,
    value: f32,
    min: f32,
    max: f32,
) -> Result<(), ValidationError> {
    check_finite(field, value)?;
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::OutOfRange {
            field,
            value: value.into(),
            min: min.into(),
            max: max.into(),
        })
    }
}
