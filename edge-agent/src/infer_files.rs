//! `edge-agent infer`: run a model once on tensors (or images) from files, write the outputs.

use std::path::{Path, PathBuf};

use cascade_infer::image::{is_image_path, load_image};
use cascade_infer::metadata::Metadata;
use cascade_infer::{InferError, LoadOptions, Model, Tensor, load_path};

/// Why an `infer` run failed.
#[derive(Debug, thiserror::Error)]
pub enum InferFilesError {
    /// The engine refused the model or the inputs.
    #[error(transparent)]
    Engine(#[from] InferError),
    /// The command line does not fit the model.
    #[error("{0}")]
    Usage(String),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct InferRequest {
    /// Model file.
    pub model: PathBuf,
    /// `FILE` or `NAME=FILE` per input (`.npy`, or `.png`/`.jpg` for image models).
    pub inputs: Vec<String>,
    /// Where the single output goes.
    pub output: Option<PathBuf>,
    /// Where each output goes, as `DIR/<output name>.npy`.
    pub output_dir: Option<PathBuf>,
    /// Engine options.
    pub options: LoadOptions,
}

/// An output name made safe as a file name: characters outside `[A-Za-z0-9._-]` become `_`.
pub fn output_file_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}.npy")
}

fn read_input(
    model: &dyn Model,
    model_path: &Path,
    name: Option<&str>,
    file: &Path,
) -> Result<Tensor, InferFilesError> {
    if !is_image_path(file) {
        return Ok(Tensor::read_npy(file)?);
    }
    let meta = Metadata::for_model(model_path).map_err(|e| {
        InferFilesError::Usage(format!(
            "{}: image inputs need the model's metadata sidecar to know how to preprocess them ({e})",
            file.display()
        ))
    })?;
    let input_name = match name {
        Some(n) => n.to_string(),
        None => model.info().inputs[0].name.clone(),
    };
    let input = meta
        .inputs
        .iter()
        .find(|i| i.name == input_name)
        .ok_or_else(|| {
            InferFilesError::Usage(format!(
                "the sidecar does not describe input {input_name:?}"
            ))
        })?;
    Ok(load_image(file, input)?)
}

/// Reads `FILE` / `NAME=FILE` arguments into the model's inputs, in its order.
///
/// `NAME=FILE` names one of the model's inputs; a value whose part before `=` is not an input
/// name is taken whole as a path (file names may contain `=`), unless no such file exists.
pub fn read_inputs(
    model: &dyn Model,
    model_path: &Path,
    raw: &[String],
) -> Result<Vec<Tensor>, InferFilesError> {
    let info = model.info();
    let mut named = Vec::new();
    for raw in raw {
        // NAME=FILE when NAME is one of the model's inputs; otherwise the whole value is a path.
        let (name, file) = match raw.split_once('=') {
            Some((n, f)) if info.inputs.iter().any(|i| i.name == n) => (Some(n.to_string()), f),
            Some((n, _)) if !Path::new(raw).exists() => {
                let known: Vec<&str> = info.inputs.iter().map(|i| i.name.as_str()).collect();
                return Err(InferFilesError::Usage(format!(
                    "the model has no input named {n:?}; its inputs are {known:?}"
                )));
            }
            _ => (None, raw.as_str()),
        };
        let tensor = read_input(model, model_path, name.as_deref(), Path::new(file))?;
        named.push((name, tensor));
    }
    Ok(info.order_inputs(named)?)
}

/// Runs the model and writes its outputs; returns the files written.
pub fn infer(request: &InferRequest) -> Result<Vec<PathBuf>, InferFilesError> {
    if request.inputs.is_empty() {
        return Err(InferFilesError::Usage("give at least one --input".into()));
    }
    let model = load_path(&request.model, &request.options)?;
    let info = model.info().clone();
    if request.output.is_some() == request.output_dir.is_some() {
        return Err(InferFilesError::Usage(
            "give exactly one of --output FILE (single-output models) or --output-dir DIR".into(),
        ));
    }
    if request.output.is_some() && info.outputs.len() != 1 {
        let names: Vec<&str> = info.outputs.iter().map(|o| o.name.as_str()).collect();
        return Err(InferFilesError::Usage(format!(
            "the model has {} outputs ({names:?}); use --output-dir DIR",
            info.outputs.len()
        )));
    }
    let inputs = read_inputs(model.as_ref(), &request.model, &request.inputs)?;
    let outputs = model.run(inputs)?;
    let mut written = Vec::new();
    match (&request.output, &request.output_dir) {
        (Some(path), _) => {
            outputs[0].write_npy(path)?;
            written.push(path.clone());
        }
        (None, Some(dir)) => {
            std::fs::create_dir_all(dir).map_err(|source| InferError::Io {
                path: dir.clone(),
                error: source,
            })?;
            for (spec, tensor) in info.outputs.iter().zip(&outputs) {
                let path = dir.join(output_file_name(&spec.name));
                tensor.write_npy(&path)?;
                written.push(path);
            }
        }
        (None, None) => unreachable!("checked above"),
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_become_safe_file_names() {
        assert_eq!(
            output_file_name("StatefulPartitionedCall_1:0"),
            "StatefulPartitionedCall_1_0.npy"
        );
        assert_eq!(
            output_file_name("save_infer_model/scale_0.tmp_1"),
            "save_infer_model_scale_0.tmp_1.npy"
        );
        assert_eq!(output_file_name("probabilities"), "probabilities.npy");
    }
}
