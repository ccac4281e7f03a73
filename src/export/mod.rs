//! `distill export`: the student as a deployable GGUF file ([`gguf`]), and the kept traces in
//! the formats of the trainers users scale out to ([`traces`]).

pub mod fidelity;
pub mod gguf;
pub mod traces;

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::model::load::BaseModel;
use crate::model::lora;

pub use fidelity::Fidelity;
pub use gguf::{GgufQuant, GgufReport};
pub use traces::{TraceExport, TraceFormat, Verification};

/// Errors of the export stage.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A JSONL record could not be read.
    #[error("{path}:{line}: {msg}")]
    Record {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// The model has something the GGUF format (or its loaders) cannot carry.
    #[error("cannot export to GGUF: {0}")]
    Unsupported(String),
    /// Quantizing or writing one tensor failed.
    #[error("tensor {0}: {1}")]
    Tensor(String, String),
    /// The tokenizer could not be serialized.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Loading the model or the adapter failed.
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    /// Rendering a chat template failed.
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Anything else, with its message.
    #[error("{0}")]
    Other(String),
}

impl ExportError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        ExportError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// A temporary file in the directory of `out` (created if needed), to be moved into place
/// with [`publish`] once complete, so a failed export leaves nothing behind.
fn temp_beside(out: &Path) -> Result<tempfile::NamedTempFile, ExportError> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| ExportError::io(parent, e))?;
    tempfile::NamedTempFile::new_in(parent).map_err(|e| ExportError::io(parent, e))
}

/// Moves a finished temporary file into place, readable by others as a normal file would be
/// (temporary files are created private).
fn publish(tmp: tempfile::NamedTempFile, out: &Path) -> Result<(), ExportError> {
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(|e| ExportError::io(out, e))?;
    tmp.persist(out)
        .map_err(|e| ExportError::io(out, e.error))?;
    Ok(())
}

/// Writes the model at `model` (Hugging Face directory or GGUF), with the adapter in `adapter`
/// merged as `distill merge` merges it, as a GGUF file at `out`.
///
/// The adapter's chat template (when the student was trained with an override) replaces the
/// base's, and its model card (the teachers and their licences) becomes the file's
/// description; the base model's licence is the file's `general.license`.
pub fn export_model(
    model: &Path,
    adapter: Option<&Path>,
    quant: GgufQuant,
    out: &Path,
) -> Result<GgufReport, ExportError> {
    let device = Device::Cpu;
    let mut base = BaseModel::load(model, &device)?;
    let mut tensors = base.tensors(&device)?;
    let mut source = vec![
        ("base".to_string(), model.display().to_string()),
        ("quantization".to_string(), quant.name().to_string()),
        ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
    ];
    let mut description = format!(
        "Exported by distill {} from `{}`",
        env!("CARGO_PKG_VERSION"),
        model.display()
    );
    if let Some(dir) = adapter {
        let template = dir.join("chat_template.jinja");
        if template.is_file() {
            let t =
                std::fs::read_to_string(&template).map_err(|e| ExportError::io(&template, e))?;
            base.tokenizer.set_chat_template(t);
        }
        let (cfg, varmap) = lora::load_adapter(dir, &device)?;
        let merged = lora::merge_into(&mut tensors, &varmap, &cfg)?;
        if merged == 0 {
            return Err(ExportError::Other(format!(
                "{}: the adapter changes no tensor of {}",
                dir.display(),
                model.display()
            )));
        }
        source.push(("adapter".to_string(), dir.display().to_string()));
        description.push_str(&format!(
            " with the LoRA adapter `{}` merged",
            dir.display()
        ));
    }
    description.push_str(&format!(", quantized as {}.", quant.name()));
    if let Some(card) = adapter.map(|d| d.join("README.md")) {
        if let Ok(text) = std::fs::read_to_string(&card) {
            description.push_str("\n\n");
            description.push_str(text.trim());
        }
    }
    let name = adapter
        .or(Some(model))
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "student".into());
    let provenance = gguf::Provenance {
        name,
        license: crate::teacher::licence::detect(model),
        description,
        source,
    };
    gguf::write_gguf(&base, &tensors, quant, &provenance, out)
}
