//! Inputs as they enter the pipeline, and results as they leave it.

use std::collections::BTreeMap;
use std::time::Instant;

use cascade_infer::{DType, Dim, InferError, ModelInfo, Tensor};
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

/// One input on its way to the model.
#[derive(Debug)]
pub struct InputItem {
    /// Local id: file name, JSON `id`, or a generated one.
    pub id: String,
    /// Model inputs, in the model's order.
    pub inputs: Vec<Tensor>,
    /// Metadata travelling with the input (redacted per the privacy settings).
    pub fields: BTreeMap<String, String>,
    /// Where this input's results also go (the local MQTT source's result topic).
    pub reply: Option<mpsc::Sender<ResultEvent>>,
    /// When it arrived.
    pub received: Instant,
    /// Signalled once the input's fate is durable: its edge result published, and its escalation
    /// (if any) written to the spool. A source that must not lose inputs (the watched directory)
    /// keeps the input until then; dropped unsignalled, the input was not settled (shutdown).
    pub settled: Option<Settled>,
}

impl InputItem {
    /// An input arriving now, with no metadata, reply or settlement signal.
    pub fn new(id: impl Into<String>, inputs: Vec<Tensor>) -> Self {
        InputItem {
            id: id.into(),
            inputs,
            fields: BTreeMap::new(),
            reply: None,
            received: Instant::now(),
            settled: None,
        }
    }
}

/// The signal of [`InputItem::settled`].
pub type Settled = tokio::sync::oneshot::Sender<()>;

/// Signals `settled`, if anyone waits for it.
pub fn settle(settled: Option<Settled>) {
    if let Some(s) = settled {
        let _ = s.send(());
    }
}

/// Which answer a result carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The edge model's answer.
    Edge,
    /// The cloud's verdict for an escalated input (an updated result).
    Cloud,
    /// The cloud refused the escalation; the edge answer stands.
    Rejected,
    /// The escalation was dropped (spool full, no verdict in time); the edge answer stands.
    Dropped,
    /// The input could not be processed.
    Error,
}

/// A result published locally (JSONL, local MQTT, the agent handle).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultEvent {
    /// The input's local id.
    pub input: String,
    /// Edge answer, cloud verdict, or failure.
    pub stage: Stage,
    /// Predicted class.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<u32>,
    /// Its label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Its probability.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probability: Option<f32>,
    /// Confidence under the policy's metric (edge results).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f32>,
    /// The escalation, when the input was escalated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub escalation: Option<Uuid>,
    /// Why it was escalated (`low_confidence`, `class_threshold`, `audit`) or why not
    /// (`overflow`, `held`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Edge inference time (edge results) or escalation round trip (cloud results), microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// Whether the cloud agreed with the edge (cloud results).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agrees: Option<bool>,
    /// Error or rejection details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ResultEvent {
    /// An empty result of `stage` for `input`, to fill in.
    pub fn new(input: impl Into<String>, stage: Stage) -> Self {
        ResultEvent {
            input: input.into(),
            stage,
            class: None,
            label: None,
            probability: None,
            confidence: None,
            escalation: None,
            rule: None,
            latency_us: None,
            agrees: None,
            detail: None,
        }
    }
}

/// A JSON input line: `{"id": "...", "input": [...], "fields": {...}}`.
///
/// `input` is the values of a single-input model, nested or flat, or an object of them by input
/// name. Values are shaped to the model input with a batch of one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonInput {
    /// Local id (generated when absent).
    #[serde(default)]
    pub id: Option<String>,
    /// The values.
    pub input: serde_json::Value,
    /// Metadata.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
}

fn flatten(v: &serde_json::Value, out: &mut Vec<f64>) -> Result<(), String> {
    match v {
        serde_json::Value::Array(items) => items.iter().try_for_each(|i| flatten(i, out)),
        serde_json::Value::Number(n) => {
            out.push(n.as_f64().ok_or("number out of range")?);
            Ok(())
        }
        serde_json::Value::Bool(b) => {
            out.push(f64::from(u8::from(*b)));
            Ok(())
        }
        other => Err(format!("expected numbers, found {other}")),
    }
}

/// Builds a model input tensor from flat values, filling free dimensions with a batch of one.
pub fn tensor_for(spec: &cascade_infer::TensorSpec, values: &[f64]) -> Result<Tensor, InferError> {
    let shape: Vec<usize> = spec
        .shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n,
            Dim::Symbolic(_) => 1,
        })
        .collect();
    let n: usize = shape.iter().product();
    if values.len() != n {
        return Err(InferError::InputShape {
            input: spec.name.clone(),
            expected: format!("{} ({n} values)", spec.shape_text()),
            got: vec![values.len()],
        });
    }
    let bad = |e: ndarray::ShapeError| InferError::Tensor(e.to_string());
    Ok(match spec.dtype {
        DType::F32 => Tensor::F32(
            ArrayD::from_shape_vec(shape, values.iter().map(|&v| v as f32).collect())
                .map_err(bad)?,
        ),
        DType::I8 => Tensor::I8(
            ArrayD::from_shape_vec(
                shape,
                values
                    .iter()
                    .map(|&v| v.clamp(-128.0, 127.0) as i8)
                    .collect(),
            )
            .map_err(bad)?,
        ),
        DType::U8 => Tensor::U8(
            ArrayD::from_shape_vec(
                shape,
                values.iter().map(|&v| v.clamp(0.0, 255.0) as u8).collect(),
            )
            .map_err(bad)?,
        ),
        DType::I16 => Tensor::I16(
            ArrayD::from_shape_vec(shape, values.iter().map(|&v| v as i16).collect())
                .map_err(bad)?,
        ),
        DType::I32 => Tensor::I32(
            ArrayD::from_shape_vec(shape, values.iter().map(|&v| v as i32).collect())
                .map_err(bad)?,
        ),
        DType::I64 => Tensor::I64(
            ArrayD::from_shape_vec(shape, values.iter().map(|&v| v as i64).collect())
                .map_err(bad)?,
        ),
        DType::Bool => Tensor::Bool(
            ArrayD::from_shape_vec(shape, values.iter().map(|&v| v != 0.0).collect())
                .map_err(bad)?,
        ),
    })
}

/// Parses one JSON input for `model`.
pub fn parse_json(
    line: &[u8],
    model: &ModelInfo,
    fallback_id: impl FnOnce() -> String,
) -> Result<InputItem, String> {
    let parsed: JsonInput =
        serde_json::from_slice(line).map_err(|e| format!("not a JSON input: {e}"))?;
    let inputs = match &parsed.input {
        serde_json::Value::Object(by_name) => model
            .inputs
            .iter()
            .map(|spec| {
                let v = by_name
                    .get(&spec.name)
                    .ok_or_else(|| format!("input {:?} missing", spec.name))?;
                let mut flat = Vec::new();
                flatten(v, &mut flat)?;
                tensor_for(spec, &flat).map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?,
        other => {
            if model.inputs.len() != 1 {
                return Err(format!(
                    "the model takes {} inputs: give \"input\" as an object by input name",
                    model.inputs.len()
                ));
            }
            let mut flat = Vec::new();
            flatten(other, &mut flat)?;
            vec![tensor_for(&model.inputs[0], &flat).map_err(|e| e.to_string())?]
        }
    };
    let mut item = InputItem::new(parsed.id.unwrap_or_else(fallback_id), inputs);
    item.fields = parsed.fields;
    Ok(item)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cascade_infer::{ModelFormat, TensorSpec};

    fn model(inputs: Vec<TensorSpec>) -> ModelInfo {
        ModelInfo {
            source: "m".into(),
            format: ModelFormat::Onnx,
            backend: "test",
            inputs,
            outputs: vec![],
        }
    }

    fn spec(name: &str, shape: Vec<Dim>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DType::F32,
            shape,
            quantization: None,
        }
    }

    #[test]
    fn nested_or_flat_values_fill_the_model_shape() {
        let m = model(vec![spec(
            "x",
            vec![Dim::Symbolic("N".into()), Dim::Fixed(2), Dim::Fixed(2)],
        )]);
        for line in [
            r#"{"input": [1, 2, 3, 4]}"#,
            r#"{"input": [[1, 2], [3, 4]]}"#,
        ] {
            let item = parse_json(line.as_bytes(), &m, || "gen".into()).unwrap();
            assert_eq!(item.id, "gen");
            assert_eq!(item.inputs[0].shape(), &[1, 2, 2]);
        }
    }

    #[test]
    fn named_inputs_and_fields() {
        let m = model(vec![
            spec("a", vec![Dim::Fixed(1)]),
            spec("b", vec![Dim::Fixed(2)]),
        ]);
        let item = parse_json(
            br#"{"id": "x1", "input": {"b": [1, 2], "a": [5]}, "fields": {"user": "u"}}"#,
            &m,
            || unreachable!(),
        )
        .unwrap();
        assert_eq!(item.id, "x1");
        assert_eq!(item.inputs[0].shape(), &[1]);
        assert_eq!(item.fields["user"], "u");
    }

    #[test]
    fn bad_inputs_say_what_is_wrong() {
        let m = model(vec![spec("x", vec![Dim::Fixed(4)])]);
        assert!(
            parse_json(b"not json", &m, String::new)
                .unwrap_err()
                .contains("not a JSON input")
        );
        assert!(
            parse_json(br#"{"input": [1, 2, 3]}"#, &m, String::new)
                .unwrap_err()
                .contains("4 values")
        );
        assert!(
            parse_json(br#"{"input": ["a", 2, 3, 4]}"#, &m, String::new)
                .unwrap_err()
                .contains("expected numbers")
        );
        assert!(
            parse_json(br#"{"input": [1, 2, 3, 4], "extra": 1}"#, &m, String::new)
                .unwrap_err()
                .contains("extra")
        );
    }
}
