//! LoRA supervised fine-tuning of a student on teacher traces (`distill train`) and folding the
//! adapter back into the base weights (`distill merge`).
//!
//! * [`config`]: the TOML configuration and command-line overrides.
//! * [`data`]: traces → chat template → token ids with an assistant-only loss mask, batches.
//! * [`loss`]: chunked cross-entropy over supervised positions, with distillation terms.
//! * [`kd`]: divergences to the teacher's top-k with a tail bucket, temperature, feature losses.
//! * [`teacher`]: the teacher's signals for a batch, from stored soft labels or a live teacher.
//! * [`optim`]: AdamW with saveable state, warmup + cosine schedule, gradient clipping.
//! * [`recipe`]: the training loop, read top to bottom: setup, train, checkpoint, resume.
//!
//! [`train`] and [`merge`] are the entry points the CLI calls.

pub mod config;
pub mod data;
pub mod kd;
pub mod loss;
pub mod optim;
pub mod recipe;
pub mod teacher;

pub use config::{Precision, Resume, TrainConfig, TrainOverrides};
pub use recipe::{Recipe, TrainReport};

use crate::model::load::BaseModel;
use crate::model::lora;
use crate::model::ModelError;
use candle_core::{DType, Device};
use std::path::{Path, PathBuf};

/// Errors of training and merging. Each names the file, field or step involved.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration field is invalid.
    #[error("config: `{field}`: {msg}")]
    Config {
        /// The field (or the config file, for parse errors).
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The trace file could not be read.
    #[error(transparent)]
    Traces(#[from] crate::trace::TraceFileError),
    /// Loading, running or exporting the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A candle operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The data cannot be trained on as rendered (template, masking, lengths).
    #[error("data: {0}")]
    Data(String),
    /// The preflight check refused to start (e.g. nothing supervised, EOS never supervised).
    #[error("preflight: {0}")]
    Preflight(String),
    /// The loss or the gradients became NaN/Inf; training stopped.
    #[error(
        "non-finite {what} ({value}) at step {step}: training stopped; last good checkpoint: {}",
        last_checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into())
    )]
    NonFinite {
        /// `loss` or `gradient norm`.
        what: String,
        /// The offending value.
        value: f64,
        /// The optimizer step (1-based) being computed.
        step: usize,
        /// The most recent checkpoint written, left untouched.
        last_checkpoint: Option<PathBuf>,
    },
    /// A checkpoint is missing a file or holds inconsistent state.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint {
        /// The checkpoint directory.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

impl TrainError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Runs LoRA SFT as configured by `cfg` with `overrides` applied; see [`recipe::Recipe`].
pub fn train(cfg: &TrainConfig, overrides: &TrainOverrides) -> Result<TrainReport, TrainError> {
    keep_freed_memory();
    let cfg = overrides.apply(cfg);
    let mut recipe = Recipe::new(cfg, overrides)?;
    recipe.setup()?;
    recipe.train()
}

/// Lets glibc's allocator reuse the activation buffers of one step in the next instead of
/// returning them to the kernel: by default every buffer above its mmap threshold is a fresh
/// mapping whose pages fault in and are zeroed again on every use, a tenth of a training step.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before the training threads
    // allocate their buffers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// What [`merge`] wrote.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// The output directory (a standalone Hugging Face model).
    pub out_dir: PathBuf,
    /// Number of adapter tensors (A and B) folded in.
    pub adapter_tensors: usize,
}

/// Folds the PEFT adapter in `adapter_dir` into the base model at `model_path` (Hugging Face
/// directory or GGUF) and writes a standalone Hugging Face directory to `out_dir`
/// (`config.json`, `model.safetensors`, tokenizer files). `dtype` casts floating-point tensors
/// (e.g. bf16 for a smaller export); `None` keeps them as stored (f32 for GGUF).
pub fn merge(
    model_path: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    dtype: Option<DType>,
) -> Result<MergeReport, TrainError> {
    let device = Device::Cpu;
    let mut base = BaseModel::load(model_path, &device)?;
    // A template the student was trained with (`--chat-template`) travels with the adapter.
    let template = adapter_dir.join("chat_template.jinja");
    if template.is_file() {
        let t = std::fs::read_to_string(&template).map_err(|e| TrainError::io(&template, e))?;
        base.tokenizer.set_chat_template(t);
    }
    let (lora_cfg, varmap) = lora::load_adapter(adapter_dir, &device)?;
    let adapter_tensors = varmap.all_vars().len();
    if adapter_tensors == 0 {
        return Err(TrainError::Checkpoint {
            path: adapter_dir.to_path_buf(),
            msg: "adapter holds no tensors".into(),
        });
    }
    base.save_merged(out_dir, Some((&lora_cfg, &varmap)), dtype)?;
    // The model card (the teachers' licences) travels with the merged weights.
    let card = adapter_dir.join("README.md");
    if card.is_file() {
        let dst = out_dir.join("README.md");
        std::fs::copy(&card, &dst).map_err(|e| TrainError::io(&dst, e))?;
    }
    Ok(MergeReport {
        out_dir: out_dir.to_path_buf(),
        adapter_tensors,
    })
}
