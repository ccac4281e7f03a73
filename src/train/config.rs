//! The training configuration: one TOML file, plus command-line overrides applied on top.
//!
//! Every field has a default suited to LoRA SFT of 135M–7B students, so a minimal file names
//! only the model, the data and the output directory. Unknown keys are rejected
//! (`deny_unknown_fields`) so that a typo never silently falls back to a default.

use super::TrainError;
use crate::model::lora::{LoraConfig, ALL_TARGET_MODULES};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Floating-point type of the frozen base weights and of the adapters.
///
/// f32 is the reference: the optimizer always keeps its moments in f32, but adapters in half
/// precision lose small updates, so half types are only worth it for memory on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit float (default).
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

/// LoRA hyper-parameters as written in the `[lora]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// Rank of the update (default 16).
    pub r: usize,
    /// `lora_alpha` (default 32, i.e. a scale of 2 at r = 16).
    pub alpha: f64,
    /// Dropout on the adapter input (default 0). Masks come from a generator seeded per
    /// (seed, step, micro-batch), so resumed runs stay bit-identical.
    pub dropout: f32,
    /// Rank-stabilised scaling `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// Projections to adapt (default: all seven attention and MLP projections).
    pub target_modules: Vec<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: ALL_TARGET_MODULES.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl LoraSection {
    /// The model-side LoRA configuration; `base` goes into `base_model_name_or_path`.
    pub fn to_lora_config(&self, base: &str) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            use_rslora: self.use_rslora,
            target_modules: self.target_modules.clone(),
            base_model_name_or_path: base.to_string(),
        }
    }
}

/// What the student learns from, as written in the `[loss]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LossKind {
    /// Cross-entropy on the trace tokens (chain-of-thought SFT).
    #[default]
    #[serde(rename = "ce")]
    Ce,
    /// The divergence to the teacher's distribution only.
    #[serde(rename = "kd")]
    Kd,
    /// `alpha · CE + (1 − alpha) · T² · D`.
    #[serde(rename = "ce+kd")]
    CeKd,
}

impl std::str::FromStr for LossKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ce" => Ok(Self::Ce),
            "kd" => Ok(Self::Kd),
            "ce+kd" | "kd+ce" => Ok(Self::CeKd),
            other => Err(format!("unknown loss `{other}` (expected ce, kd or ce+kd)")),
        }
    }
}

/// The objective: cross-entropy, response distillation and feature distillation.
///
/// Soft labels come from `soft_labels` (a `distill label` directory) or, when only `teacher`
/// is set, from the teacher run inside the loop (online). Feature matching needs `teacher`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossSection {
    /// `ce`, `kd` or `ce+kd`.
    pub kind: LossKind,
    /// Weight of the cross-entropy in `ce+kd` (the divergence gets `1 − alpha`).
    pub alpha: f64,
    /// `forward` (KL(teacher ‖ student)), `reverse` or `jsd`.
    pub divergence: super::kd::Divergence,
    /// JSD's mixture weight on the teacher (0 = forward KL, 1 = reverse KL).
    pub beta: f64,
    /// Softmax temperature of both distributions; the divergence is scaled by `T²`.
    pub temperature: f64,
    /// Directory written by `distill label` (offline soft labels).
    pub soft_labels: Option<PathBuf>,
    /// Teacher model for online soft labels and feature matching.
    pub teacher: Option<PathBuf>,
    /// Adapter applied to the online teacher.
    pub teacher_adapter: Option<PathBuf>,
    /// Top entries per position of online soft labels.
    pub top_k: usize,
    /// Feature matching on this many student layers spread evenly over depth, each paired with
    /// the teacher layer at the same relative depth (0: none unless `feature_pairs`).
    pub feature_layers: usize,
    /// Explicit `[student layer, teacher layer]` pairs (0-based), instead of `feature_layers`.
    pub feature_pairs: Vec<[usize; 2]>,
    /// `mse` or `cosine`.
    pub feature_loss: super::kd::FeatureLoss,
    /// Weight of the feature term.
    pub feature_weight: f64,
}

impl Default for LossSection {
    fn default() -> Self {
        Self {
            kind: LossKind::Ce,
            alpha: 0.5,
            divergence: super::kd::Divergence::Forward,
            beta: 0.5,
            temperature: 1.0,
            soft_labels: None,
            teacher: None,
            teacher_adapter: None,
            top_k: 64,
            feature_layers: 0,
            feature_pairs: Vec::new(),
            feature_loss: super::kd::FeatureLoss::Cosine,
            feature_weight: 1.0,
        }
    }
}

impl LossSection {
    /// Whether a feature term is configured.
    pub fn features(&self) -> bool {
        self.feature_layers > 0 || !self.feature_pairs.is_empty()
    }

    /// Whether the objective uses the teacher's distribution.
    pub fn distils(&self) -> bool {
        self.kind != LossKind::Ce
    }

    fn validate(&self) -> Result<(), TrainError> {
        let bad = |field: &str, msg: String| {
            Err(TrainError::Config {
                field: format!("loss.{field}"),
                msg,
            })
        };
        if !(0.0..=1.0).contains(&self.alpha) {
            return bad("alpha", format!("{} is not in [0, 1]", self.alpha));
        }
        if !(0.0..=1.0).contains(&self.beta) {
            return bad("beta", format!("{} is not in [0, 1]", self.beta));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad("temperature", format!("{} must be > 0", self.temperature));
        }
        if !(self.feature_weight.is_finite() && self.feature_weight >= 0.0) {
            return bad(
                "feature_weight",
                format!("{} must be >= 0", self.feature_weight),
            );
        }
        if self.top_k == 0 {
            return bad("top_k", "must be > 0".into());
        }
        if self.distils() && self.soft_labels.is_none() && self.teacher.is_none() {
            return bad(
                "kind",
                format!(
                    "{:?} needs the teacher's distribution: set `soft_labels` (a `distill label` \
                     directory) or `teacher` (a model run in the loop)",
                    self.kind
                ),
            );
        }
        if self.features() && self.teacher.is_none() {
            return bad(
                "teacher",
                "feature matching needs a live teacher (`teacher`, `--teacher`)".into(),
            );
        }
        if self.feature_layers > 0 && !self.feature_pairs.is_empty() {
            return bad(
                "feature_pairs",
                "give either feature_layers (evenly spread) or feature_pairs, not both".into(),
            );
        }
        Ok(())
    }
}

/// Everything a training run needs, as read from `lora-sft.toml`.
///
/// The resolved configuration (file + overrides) is saved in every checkpoint so a resumed
/// run can tell when it is being continued with different settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Student checkpoint: a Hugging Face directory or a GGUF file.
    pub model: PathBuf,
    /// Trace file (JSONL of [`crate::trace::Trace`]); only successful traces are used.
    pub data: PathBuf,
    /// Output directory: adapter, `metrics.jsonl`, `checkpoints/`.
    pub out_dir: PathBuf,
    /// Value written to `base_model_name_or_path` of the adapter (defaults to `model`).
    pub base_model_name: Option<String>,
    /// Jinja chat template file replacing the model's own template.
    pub chat_template: Option<PathBuf>,
    /// Token that ends an assistant turn, when neither the EOS token nor a well-known
    /// end-of-turn token (`<|im_end|>`, `<|eot_id|>`, ...) is what the template emits.
    pub eot_token: Option<String>,
    /// Longest sample (prompt + answer, in tokens). Longer traces are dropped, never truncated.
    pub max_len: usize,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Linear warmup from 0 to `lr` over this many optimizer steps.
    pub warmup_steps: usize,
    /// Optimizer steps to run; when unset, `epochs` passes over the training split.
    pub max_steps: Option<usize>,
    /// Passes over the training split (used when `max_steps` is unset).
    pub epochs: usize,
    /// Decoupled AdamW weight decay.
    pub weight_decay: f64,
    /// AdamW `beta1`.
    pub beta1: f64,
    /// AdamW `beta2`.
    pub beta2: f64,
    /// AdamW `eps`.
    pub eps: f64,
    /// Global gradient-norm clipping threshold (0 disables clipping).
    pub max_grad_norm: f64,
    /// Seed of every random choice: adapter init, validation split, data order.
    pub seed: u64,
    /// Fraction of traces held out for validation (ignored when `val_count` is set).
    pub val_fraction: f64,
    /// Exact number of traces held out for validation.
    pub val_count: Option<usize>,
    /// Validation loss every N optimizer steps (0: only at the end, when there is a split).
    pub eval_every: usize,
    /// Checkpoint every N optimizer steps (0: none besides the final export).
    pub save_every: usize,
    /// How many checkpoints to keep (0 keeps all).
    pub keep_checkpoints: usize,
    /// Pack several samples per row (attention does not cross samples) instead of padding.
    pub packing: bool,
    /// Full-parameter training of the decoder layers (every projection, bias and norm) instead
    /// of LoRA adapters: for a student that adapters cannot recover, such as a depth-pruned
    /// one. Embeddings, final norm and output projection stay frozen. The run exports a whole
    /// Hugging Face model rather than an adapter, and takes more memory (weights, gradients and
    /// two AdamW moments of every layer) and time (candle's operations, not the fused layer).
    pub full_finetune: bool,
    /// Batches sorted by length together: samples are shuffled, then sorted by length within
    /// windows of `bucket_window` batches, so padding stays small while order stays random.
    pub bucket_window: usize,
    /// Positions per chunk of the output projection in the loss (bounds the logits memory to
    /// `loss_chunk x vocab` floats).
    pub loss_chunk: usize,
    /// Base weight / adapter precision.
    pub dtype: Precision,
    /// `cpu`, `cuda`, `cuda:N` or `metal`.
    pub device: String,
    /// LoRA settings.
    pub lora: LoraSection,
    /// The objective (`[loss]`): cross-entropy, distillation, feature matching.
    pub loss: LossSection,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: PathBuf::new(),
            data: PathBuf::new(),
            out_dir: PathBuf::from("runs/lora-sft"),
            base_model_name: None,
            chat_template: None,
            eot_token: None,
            max_len: 2048,
            batch_size: 4,
            grad_accum: 1,
            lr: 2e-4,
            min_lr_ratio: 0.0,
            warmup_steps: 10,
            max_steps: None,
            epochs: 1,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            max_grad_norm: 1.0,
            seed: 42,
            val_fraction: 0.0,
            val_count: None,
            eval_every: 50,
            save_every: 100,
            keep_checkpoints: 3,
            packing: false,
            full_finetune: false,
            bucket_window: 32,
            loss_chunk: 512,
            dtype: Precision::F32,
            device: "cpu".into(),
            lora: LoraSection::default(),
            loss: LossSection::default(),
        }
    }
}

/// Where to resume from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The highest `checkpoints/step-N` under the output directory (a fresh start if none).
    Latest,
    /// A specific checkpoint directory.
    From(PathBuf),
}

/// Command-line flags applied on top of the file: each `Some` replaces the file's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainOverrides {
    /// `--model`.
    pub model: Option<PathBuf>,
    /// `--data`.
    pub data: Option<PathBuf>,
    /// `--out`.
    pub out_dir: Option<PathBuf>,
    /// `--chat-template`.
    pub chat_template: Option<PathBuf>,
    /// `--max-len`.
    pub max_len: Option<usize>,
    /// `--batch-size`.
    pub batch_size: Option<usize>,
    /// `--grad-accum`.
    pub grad_accum: Option<usize>,
    /// `--lr`.
    pub lr: Option<f64>,
    /// `--warmup-steps`.
    pub warmup_steps: Option<usize>,
    /// `--max-steps`.
    pub max_steps: Option<usize>,
    /// `--epochs`.
    pub epochs: Option<usize>,
    /// `--seed`.
    pub seed: Option<u64>,
    /// `--save-every`.
    pub save_every: Option<usize>,
    /// `--eval-every`.
    pub eval_every: Option<usize>,
    /// `--lora-r`.
    pub lora_r: Option<usize>,
    /// `--lora-alpha`.
    pub lora_alpha: Option<f64>,
    /// `--lora-dropout`.
    pub lora_dropout: Option<f32>,
    /// `--packing` / `--no-packing`.
    pub packing: Option<bool>,
    /// `--full-finetune`.
    pub full_finetune: Option<bool>,
    /// `--device`.
    pub device: Option<String>,
    /// `--resume` / `--resume-from DIR`.
    pub resume: Option<Resume>,
    /// `--stop-after N`: stop after optimizer step N with a checkpoint, as if interrupted; the
    /// learning-rate schedule still spans the whole run, so a later `--resume` continues it.
    pub stop_after: Option<usize>,
    /// `--quiet`: no progress bar or preflight print.
    pub quiet: bool,
    /// `--loss`.
    pub loss_kind: Option<LossKind>,
    /// `--kd-alpha`.
    pub kd_alpha: Option<f64>,
    /// `--kd-divergence`.
    pub kd_divergence: Option<super::kd::Divergence>,
    /// `--kd-beta`.
    pub kd_beta: Option<f64>,
    /// `--kd-temperature`.
    pub kd_temperature: Option<f64>,
    /// `--soft-labels`.
    pub soft_labels: Option<PathBuf>,
    /// `--teacher`.
    pub teacher: Option<PathBuf>,
    /// `--kd-top-k`.
    pub kd_top_k: Option<usize>,
    /// `--feature-layers`.
    pub feature_layers: Option<usize>,
    /// `--feature-pairs`.
    pub feature_pairs: Option<Vec<[usize; 2]>>,
    /// `--feature-loss`.
    pub feature_loss: Option<super::kd::FeatureLoss>,
    /// `--feature-weight`.
    pub feature_weight: Option<f64>,
}

impl TrainOverrides {
    /// The configuration with every given flag applied.
    pub fn apply(&self, cfg: &TrainConfig) -> TrainConfig {
        let mut c = cfg.clone();
        macro_rules! set {
            ($($field:ident => $target:expr),* $(,)?) => {
                $(if let Some(v) = &self.$field { $target = v.clone(); })*
            };
        }
        set!(model => c.model, data => c.data, out_dir => c.out_dir,
             max_len => c.max_len, batch_size => c.batch_size, grad_accum => c.grad_accum,
             lr => c.lr, warmup_steps => c.warmup_steps, epochs => c.epochs, seed => c.seed,
             save_every => c.save_every, eval_every => c.eval_every, lora_r => c.lora.r,
             lora_alpha => c.lora.alpha, lora_dropout => c.lora.dropout, packing => c.packing,
             full_finetune => c.full_finetune, device => c.device);
        if let Some(t) = &self.chat_template {
            c.chat_template = Some(t.clone());
        }
        if let Some(s) = self.max_steps {
            c.max_steps = Some(s);
        }
        set!(loss_kind => c.loss.kind, kd_alpha => c.loss.alpha,
             kd_divergence => c.loss.divergence, kd_beta => c.loss.beta,
             kd_temperature => c.loss.temperature, kd_top_k => c.loss.top_k,
             feature_layers => c.loss.feature_layers, feature_pairs => c.loss.feature_pairs,
             feature_loss => c.loss.feature_loss, feature_weight => c.loss.feature_weight);
        if let Some(p) = &self.soft_labels {
            c.loss.soft_labels = Some(p.clone());
        }
        if let Some(p) = &self.teacher {
            c.loss.teacher = Some(p.clone());
        }
        c
    }
}

impl TrainConfig {
    /// Reads a TOML file; relative paths inside it stay relative to the working directory.
    pub fn from_file(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names the source in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, TrainError> {
        toml::from_str(text).map_err(|e| TrainError::Config {
            field: origin.to_string(),
            msg: e.to_string(),
        })
    }

    /// The configuration as TOML (saved with every checkpoint).
    pub fn to_toml(&self) -> Result<String, TrainError> {
        toml::to_string(self).map_err(|e| TrainError::Config {
            field: "config".into(),
            msg: e.to_string(),
        })
    }

    /// Checks every field before anything is loaded, so a bad value fails in milliseconds
    /// with the field's name rather than after the model has been read.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |field: &str, msg: String| {
            Err(TrainError::Config {
                field: field.into(),
                msg,
            })
        };
        if self.model.as_os_str().is_empty() {
            return bad(
                "model",
                "required (a Hugging Face directory or GGUF file)".into(),
            );
        }
        if self.data.as_os_str().is_empty() {
            return bad("data", "required (a JSONL trace file)".into());
        }
        if self.out_dir.as_os_str().is_empty() {
            return bad("out_dir", "required".into());
        }
        for (field, v) in [
            ("max_len", self.max_len),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("loss_chunk", self.loss_chunk),
            ("bucket_window", self.bucket_window),
        ] {
            if v == 0 {
                return bad(field, "must be > 0".into());
            }
        }
        if self.max_len < 2 {
            return bad("max_len", "must be at least 2 tokens".into());
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs == 0) {
            return bad("max_steps/epochs", "nothing to train (0 steps)".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("{} must be a positive number", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(
                "min_lr_ratio",
                format!("{} is not in [0, 1]", self.min_lr_ratio),
            );
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                format!("{} must be >= 0", self.weight_decay),
            );
        }
        for (field, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(field, format!("{v} is not in [0, 1)"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", format!("{} must be > 0", self.eps));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return bad(
                "max_grad_norm",
                format!("{} must be >= 0", self.max_grad_norm),
            );
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return bad(
                "val_fraction",
                format!("{} is not in [0, 1)", self.val_fraction),
            );
        }
        self.lora
            .to_lora_config("")
            .validate()
            .map_err(|e| TrainError::Config {
                field: "lora".into(),
                msg: e.to_string(),
            })?;
        self.loss.validate()?;
        self.device()?;
        Ok(())
    }

    /// The device named by `device`.
    pub fn device(&self) -> Result<Device, TrainError> {
        let err = |e: candle_core::Error| TrainError::Config {
            field: "device".into(),
            msg: e.to_string(),
        };
        match self.device.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Device::new_cuda(0).map_err(err),
            "metal" => Device::new_metal(0).map_err(err),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Device::new_cuda(n).map_err(err),
                _ => Err(TrainError::Config {
                    field: "device".into(),
                    msg: format!("`{other}` is not cpu, cuda, cuda:N or metal"),
                }),
            },
        }
    }

    /// Names of the top-level fields whose values differ between `self` and `other` (used to
    /// warn when a run is resumed with a different configuration).
    pub fn diff(&self, other: &TrainConfig) -> Vec<String> {
        let a = serde_json::to_value(self).unwrap_or_default();
        let b = serde_json::to_value(other).unwrap_or_default();
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return vec![];
        };
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| k.to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file_gets_defaults_and_unknown_keys_fail() -> Result<(), TrainError> {
        let c = TrainConfig::from_toml(
            "model = \"m.gguf\"\ndata = \"t.jsonl\"\nout_dir = \"o\"\n[lora]\nr = 8\n",
            "test",
        )?;
        assert_eq!(c.lora.r, 8);
        assert_eq!(c.lora.alpha, 32.0);
        assert_eq!(c.lora.target_modules.len(), 7);
        assert_eq!(c.lr, 2e-4);
        c.validate()?;
        assert!(TrainConfig::from_toml("modle = \"x\"", "test").is_err());
        assert!(TrainConfig::from_toml("[lora]\nrank = 3", "test").is_err());
        let back = TrainConfig::from_toml(&c.to_toml()?, "roundtrip")?;
        assert_eq!(back, c);
        Ok(())
    }

    #[test]
    fn example_config_parses() -> Result<(), TrainError> {
        let c = TrainConfig::from_toml(include_str!("../../configs/lora-sft.toml"), "example")?;
        c.validate()?;
        assert_eq!(c.lora, LoraSection::default());
        Ok(())
    }

    #[test]
    fn overrides_apply_and_validation_names_fields() {
        let c = TrainConfig {
            model: "m".into(),
            data: "d".into(),
            ..Default::default()
        };
        let o = TrainOverrides {
            lr: Some(1e-3),
            lora_r: Some(4),
            lora_dropout: Some(0.05),
            max_steps: Some(7),
            ..Default::default()
        };
        let c2 = o.apply(&c);
        assert_eq!((c2.lr, c2.lora.r, c2.max_steps), (1e-3, 4, Some(7)));
        assert_eq!(c2.lora.dropout, 0.05);
        assert_eq!(c.diff(&c2), vec!["lora", "lr", "max_steps"]);
        let mut bad = c2.clone();
        bad.batch_size = 0;
        let msg = bad
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("batch_size"), "{msg}");
        bad = c2.clone();
        bad.lora.target_modules = vec!["lm_head".into()];
        assert!(bad.validate().is_err());
        bad = c2;
        bad.lora.dropout = 1.0;
        let msg = bad
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("dropout"), "{msg}");
    }
}
