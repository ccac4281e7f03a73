//! Student models for LoRA fine-tuning.
//!
//! The student is a decoder-only transformer written directly against candle so that the
//! training loop controls every tensor: base weights are plain (frozen) [`Tensor`]s, the LoRA
//! adapters are [`candle_core::Var`]s living in a [`candle_nn::VarMap`] under their PEFT names.
//!
//! * [`decoder`] is the one decoder of every family: Llama 2/3, SmolLM, Mistral, Qwen2/2.5.
//! * [`lora`] holds the LoRA linear layer, adapter naming, PEFT export/import and merging.
//! * [`load`] reads Hugging Face directories and GGUF files into a [`load::BaseModel`].
//! * [`tokenizer`] wraps the tokenizer and renders chat templates.
//! * The fused CPU operations with hand-written backward passes (frozen and LoRA linear
//!   layers, RMSNorm, RoPE, attention, SwiGLU, the whole decoder layer) live in
//!   [`crate::kernels`], shared with the inference engine.
//!
//! All operations used by the forward pass are differentiable in candle (the fused
//! `rms_norm`/`rope` kernels of `candle-nn` have no backward pass, so they are not used).

pub mod decoder;
pub mod load;
pub mod lora;
pub mod prune;
pub mod tokenizer;

pub use decoder::Student;

use crate::kernels::ops;

use candle_core::{DType, Device, IndexOp, Tensor, D};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;

/// Errors raised while loading, running or exporting a student model.
///
/// Every variant names the file, tensor or field involved so that a failing run can be traced
/// back to the checkpoint that caused it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file could not be parsed or written.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The underlying parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A required field is missing or has the wrong type.
    #[error("{file}: field `{field}`: {msg}")]
    Field {
        /// The file (or GGUF metadata) the field was read from.
        file: String,
        /// The missing or invalid field.
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A tensor is missing or has an unexpected shape.
    #[error("{file}: tensor `{tensor}`: {msg}")]
    Tensor {
        /// The checkpoint the tensor was read from.
        file: String,
        /// The tensor name.
        tensor: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The checkpoint uses an architecture or feature this module does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Invalid caller input (shapes, positions, options).
    #[error("invalid input: {0}")]
    Input(String),
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer ({context}): {msg}")]
    Tokenizer {
        /// The file or operation involved.
        context: String,
        /// The tokenizer error message.
        msg: String,
    },
    /// The chat template failed to compile or render.
    #[error("chat template ({context}): {msg}")]
    Template {
        /// Where the template came from.
        context: String,
        /// The template error, with its location.
        msg: String,
    },
    /// A candle operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn field(file: impl ToString, field: impl ToString, msg: impl ToString) -> Self {
        Self::Field {
            file: file.to_string(),
            field: field.to_string(),
            msg: msg.to_string(),
        }
    }

    pub(crate) fn tensor(file: impl ToString, tensor: impl ToString, msg: impl ToString) -> Self {
        Self::Tensor {
            file: file.to_string(),
            tensor: tensor.to_string(),
            msg: msg.to_string(),
        }
    }
}

/// `rope_scaling` as found in a Hugging Face `config.json`.
///
/// Only the fields needed for the supported scaling types are kept; unknown fields are
/// preserved in `extra` so that an exported `config.json` still carries them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// `"llama3"`, `"linear"` or `"default"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// Older spelling of `rope_type`; some configs carry both keys.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
    /// Scaling factor (context extension ratio).
    #[serde(default)]
    pub factor: Option<f64>,
    /// Llama 3: wavelengths longer than `original_max_position_embeddings / low_freq_factor`
    /// are scaled by `factor`.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// Llama 3: wavelengths shorter than `original_max_position_embeddings / high_freq_factor`
    /// are left untouched.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// Llama 3: the context length the model was pre-trained with.
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// Other fields, kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl RopeScaling {
    /// The scaling type, whichever key spells it (`"default"` when neither does).
    pub fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.legacy_type.as_deref())
            .unwrap_or("default")
    }
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_rms_eps() -> f64 {
    1e-6
}

fn default_max_pos() -> usize {
    4096
}

/// Architecture hyper-parameters shared by the supported families, read from `config.json`
/// (or synthesised from GGUF metadata).
///
/// Field names are the Hugging Face ones so the struct (de)serialises as `config.json`;
/// fields this code does not use are kept in `extra` and written back on export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Family selector: `llama`, `mistral`, `qwen2`, ...
    pub model_type: String,
    /// Residual stream width.
    pub hidden_size: usize,
    /// Width of the gated MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width when it is not `hidden_size / num_attention_heads` (Mistral-style).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Epsilon of every RMSNorm.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Optional RoPE scaling.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Longest position the rotary tables are built for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: usize,
    /// Whether `lm_head` shares the embedding matrix. The loader overrides this from the
    /// actual presence of `lm_head.weight`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama: bias on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama: bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// MLP activation; only `silu` is supported.
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Every other field of `config.json`, preserved for export.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Config {
    /// Number of key/value heads, falling back to the query head count.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The model family implied by `model_type`.
    pub fn family(&self) -> Result<Family> {
        match self.model_type.as_str() {
            "llama" | "mistral" | "smollm" | "smollm2" => Ok(Family::Llama),
            "qwen2" => Ok(Family::Qwen2),
            other => Err(ModelError::Unsupported(format!(
                "config.json: model_type `{other}` (supported: llama, mistral, qwen2)"
            ))),
        }
    }

    /// Checks the head arithmetic so that shape errors surface at load time with a clear
    /// message rather than as a reshape failure deep inside the forward pass.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(ModelError::field("config", field, msg));
        if self.num_attention_heads == 0 {
            return bad("num_attention_heads", "must be > 0".into());
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(
                "num_key_value_heads",
                format!(
                    "{kv} does not divide num_attention_heads {}",
                    self.num_attention_heads
                ),
            );
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return bad(
                "head_dim",
                format!("{} must be even and > 0 for RoPE", self.head_dim()),
            );
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" && act != "swish" {
                return bad(
                    "hidden_act",
                    format!("`{act}` is not supported (silu only)"),
                );
            }
        }
        Ok(())
    }

    /// The Hugging Face `architectures` entry for this family, used when writing `config.json`.
    pub fn architecture(&self) -> &'static str {
        match self.model_type.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "mistral" => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        }
    }
}

/// Supported model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3, SmolLM, Mistral.
    Llama,
    /// Qwen2 / Qwen2.5 (bias on q/k/v).
    Qwen2,
}

impl Family {
    /// Whether the q/k/v and the o projections carry a bias: Llama as `attention_bias` says
    /// (all four or none); Qwen2 always on q/k/v and never on o (its checkpoints do not set
    /// `attention_bias`).
    pub fn attention_biases(self, cfg: &Config) -> (bool, bool) {
        match self {
            Self::Llama => (cfg.attention_bias, cfg.attention_bias),
            Self::Qwen2 => (true, false),
        }
    }
}

/// Which kernels a model runs on, chosen once when it is built: the fused CPU kernels of
/// [`crate::kernels`] (decoder layer as one autograd node, chunked loss on raw buffers) for
/// f32 weights on the CPU, candle's own operations for every other dtype and device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// `crate::kernels`: f32 on the CPU.
    Fused,
    /// candle's operations (any device, any dtype).
    Candle,
}

impl Kernels {
    /// The kernels that can run on `tensors`: `Fused` when all are f32 on the CPU.
    pub fn for_tensors(tensors: &[&Tensor]) -> Self {
        if tensors
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
        {
            Self::Fused
        } else {
            Self::Candle
        }
    }
}

/// Positions and attention of a (possibly packed) batch.
///
/// Packing several samples in one row saves padding; `Packing` makes the model treat each
/// sample as if it were alone: positions restart at every sample boundary and each token
/// attends only to the earlier tokens of its own sample. What a token sees is one run of keys,
/// kept as a `(lo, hi)` pair per token: `8 * batch * seq` bytes, where a dense additive mask
/// takes `4 * batch * seq * seq` (64 MB at 4 × 2048). The dense mask is built only for
/// candle's own attention ([`Packing::mask`]).
#[derive(Debug, Clone)]
pub struct Packing {
    /// `(batch, seq)` u32 rotary positions.
    pub position_ids: Tensor,
    /// Per (batch, token), row-major: the keys `lo..hi` the token attends to.
    spans: Arc<Vec<(u32, u32)>>,
    batch: usize,
    seq: usize,
}

impl Packing {
    /// Plain causal attention with positions `0..seq` for every row.
    pub fn causal(batch: usize, seq: usize, device: &Device) -> Result<Self> {
        Self::from_segments(&vec![vec![0u32; seq]; batch], None, device)
    }

    /// Packed rows: `segment_ids[b][t]` identifies the sample token `t` of row `b` belongs to;
    /// a sample is a run of equal ids, and a change of id starts the next one. Tokens attend
    /// only to earlier tokens of their sample. Positions restart at 0 with every sample unless
    /// `position_ids` are given explicitly.
    pub fn from_segments(
        segment_ids: &[Vec<u32>],
        position_ids: Option<&[Vec<u32>]>,
        device: &Device,
    ) -> Result<Self> {
        let batch = segment_ids.len();
        let seq = segment_ids.first().map(|r| r.len()).unwrap_or(0);
        if segment_ids.iter().any(|r| r.len() != seq) {
            return Err(ModelError::Input(
                "segment_ids rows have different lengths".into(),
            ));
        }
        let mut spans = Vec::with_capacity(batch * seq);
        for row in segment_ids {
            let mut start = 0usize;
            for t in 0..seq {
                if t > 0 && row[t - 1] != row[t] {
                    start = t;
                }
                spans.push((start as u32, t as u32 + 1));
            }
        }
        let positions: Vec<u32> = match position_ids {
            Some(p) => {
                if p.len() != batch || p.iter().any(|r| r.len() != seq) {
                    return Err(ModelError::Input(format!(
                        "position_ids must be {batch}x{seq} like segment_ids"
                    )));
                }
                p.iter().flatten().copied().collect()
            }
            None => spans
                .iter()
                .enumerate()
                .map(|(i, (lo, _))| (i % seq.max(1)) as u32 - lo)
                .collect(),
        };
        Ok(Self {
            position_ids: Tensor::from_vec(positions, (batch, seq), device)?,
            spans: Arc::new(spans),
            batch,
            seq,
        })
    }

    /// `(batch, seq)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.batch, self.seq)
    }

    /// Per (batch, token), row-major: the keys `lo..hi` the token attends to.
    pub fn spans(&self) -> &Arc<Vec<(u32, u32)>> {
        &self.spans
    }

    /// The `(batch, 1, seq, seq)` f32 additive mask (0 or -inf) of the same attention, on the
    /// device of the positions, for candle's own attention.
    pub fn mask(&self) -> Result<Tensor> {
        let (b, t) = (self.batch, self.seq);
        let mut mask = vec![f32::NEG_INFINITY; b * t * t];
        for (i, (lo, hi)) in self.spans.iter().enumerate() {
            mask[i * t + *lo as usize..i * t + *hi as usize].fill(0.0);
        }
        Ok(Tensor::from_vec(
            mask,
            (b, 1, t, t),
            self.position_ids.device(),
        )?)
    }
}

/// What a forward pass should compute besides the final hidden states.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// Enables LoRA dropout.
    pub train: bool,
    /// Decoder layers (0-based) whose output hidden states should be returned, for feature
    /// distillation.
    pub output_layers: Vec<usize>,
}

/// Result of a forward pass.
///
/// Logits are deliberately not included: with vocabularies of 50k-150k entries they dominate
/// memory, so the caller computes them with `logits_at` only for supervised positions.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// `(batch, seq, hidden)` after the final RMSNorm, i.e. the input of `lm_head`.
    pub hidden: Tensor,
    /// `(layer, (batch, seq, hidden))` outputs of the requested decoder layers (before the
    /// final norm), in the order requested.
    pub layers: Vec<(usize, Tensor)>,
}

impl Student {
    /// Logits for selected rows of `hidden` (`(batch, seq, hidden)`): `rows` are u32 indices
    /// into the flattened `batch * seq` positions. Returns `(rows.len(), vocab)`.
    pub fn logits_at(&self, hidden: &Tensor, rows: &Tensor) -> Result<Tensor> {
        logits_at(self.lm_head(), hidden, rows)
    }

    /// Logits for every position: `(batch, seq, vocab)`. Use only for short sequences.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let w = self.lm_head();
        Ok(hidden
            .reshape((b * t, h))?
            .matmul(&w.t()?)?
            .reshape((b, t, ()))?)
    }

    /// Greedy next token after `ids` (a convenience for smoke tests and evaluation).
    pub fn greedy_next(&self, ids: &[u32], device: &Device) -> Result<u32> {
        if ids.is_empty() {
            return Err(ModelError::Input("greedy_next: empty prompt".into()));
        }
        let input = Tensor::new(ids, device)?.unsqueeze(0)?;
        let packing = Packing::causal(1, ids.len(), device)?;
        let out = self.forward(&input, &packing, &ForwardOptions::default())?;
        let last = Tensor::new(&[(ids.len() - 1) as u32], device)?;
        let logits = self.logits_at(&out.hidden, &last)?;
        Ok(logits.i(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?)
    }
}

/// Shared implementation of [`Student::logits_at`].
pub(crate) fn logits_at(lm_head: &Tensor, hidden: &Tensor, rows: &Tensor) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let flat = hidden.reshape((b * t, h))?;
    let picked = flat.index_select(rows, 0)?;
    Ok(picked.matmul(&lm_head.t()?)?)
}

// ---------------------------------------------------------------------------------------------
// Building blocks shared by the families.
// ---------------------------------------------------------------------------------------------

/// RMSNorm written with differentiable primitives (the fused `candle_nn` kernel has no
/// backward pass, and gradients must flow through it to reach the adapters below).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `weight` of shape `(size,)`.
    pub fn load(vb: &lora::LoraVarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.base_get(size, "weight")?,
            eps,
        })
    }

    /// The scale `(size,)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The epsilon added to the mean square.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Turns the scale into a trainable variable (full-parameter training), added to `vars`
    /// as `{module}.weight`.
    pub fn make_trainable(
        &mut self,
        module: &str,
        vars: &mut std::collections::BTreeMap<String, candle_core::Var>,
    ) -> Result<()> {
        lora::make_var(&mut self.weight, format!("{module}.weight"), vars)
    }

    /// `x / sqrt(mean(x^2) + eps) * weight`, computed in f32.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // The fused kernel gives the input's gradient only: a trained scale takes candle's ops.
        if !self.weight.is_variable() {
            if let Some(y) = ops::rms_norm(xs, &self.weight, self.eps)? {
                return Ok(y);
            }
        }
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let var = xs.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xs.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }
}

/// Rotary position embedding tables (HF `rotate_half` layout), with optional scaling.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `(max_positions, head_dim / 2)`.
    cos: Tensor,
    /// `(max_positions, head_dim / 2)`.
    sin: Tensor,
}

/// Inverse frequencies `theta^(-2i/d)`, adjusted by the configured RoPE scaling.
pub fn rope_inv_freq(cfg: &Config) -> Result<Vec<f64>> {
    let dim = cfg.head_dim();
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / dim as f64))
        .collect();
    let Some(sc) = &cfg.rope_scaling else {
        return Ok(base);
    };
    let need = |v: Option<f64>, name: &str| {
        v.ok_or_else(|| ModelError::field("config", format!("rope_scaling.{name}"), "missing"))
    };
    match sc.kind() {
        "default" => Ok(base),
        "linear" => {
            let factor = need(sc.factor, "factor")?;
            Ok(base.into_iter().map(|f| f / factor).collect())
        }
        "llama3" => {
            let factor = need(sc.factor, "factor")?;
            let low = need(sc.low_freq_factor, "low_freq_factor")?;
            let high = need(sc.high_freq_factor, "high_freq_factor")?;
            let orig = sc.original_max_position_embeddings.ok_or_else(|| {
                ModelError::field(
                    "config",
                    "rope_scaling.original_max_position_embeddings",
                    "missing",
                )
            })? as f64;
            let low_wavelen = orig / low;
            let high_wavelen = orig / high;
            Ok(base
                .into_iter()
                .map(|freq| {
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_wavelen {
                        freq
                    } else if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        let smooth = (orig / wavelen - low) / (high - low);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect())
        }
        other => Err(ModelError::Unsupported(format!(
            "config: rope_scaling type `{other}` (supported: default, linear, llama3)"
        ))),
    }
}

/// Appends the cos and sin of position `pos` at every frequency: one row of the rotary
/// tables, computed in f64 and rounded once, the same for training and decoding.
pub(crate) fn push_rope_row(inv_freq: &[f64], pos: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
    for f in inv_freq {
        let a = pos as f64 * f;
        cos.push(a.cos() as f32);
        sin.push(a.sin() as f32);
    }
}

impl RotaryEmbedding {
    /// Precomputes cos/sin for positions `0..max_position_embeddings`.
    pub fn new(cfg: &Config, device: &Device) -> Result<Self> {
        let inv_freq = rope_inv_freq(cfg)?;
        let half = inv_freq.len();
        let n = cfg.max_position_embeddings.max(1);
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            push_rope_row(&inv_freq, p, &mut cos, &mut sin);
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, half), device)?,
            sin: Tensor::from_vec(sin, (n, half), device)?,
        })
    }

    /// Gathers `(batch, 1, seq, head_dim/2)` cos/sin for the given `(batch, seq)` positions,
    /// in `dtype` (the activation dtype).
    pub fn tables(&self, position_ids: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, t) = position_ids.dims2()?;
        let max = self.cos.dim(0)?;
        let flat = position_ids.flatten_all()?;
        let top = flat.max(0)?.to_scalar::<u32>()? as usize;
        if top >= max {
            return Err(ModelError::Input(format!(
                "position {top} exceeds max_position_embeddings {max}"
            )));
        }
        let gather = |table: &Tensor| -> Result<Tensor> {
            Ok(table
                .index_select(&flat, 0)?
                .reshape((b, 1, t, ()))?
                .to_dtype(dtype)?)
        };
        Ok((gather(&self.cos)?, gather(&self.sin)?))
    }
}

/// Applies RoPE (`x * cos + rotate_half(x) * sin`) to `(batch, heads, seq, head_dim)`.
pub fn apply_rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = xs.dim(D::Minus1)?;
    let x1 = xs.narrow(D::Minus1, 0, d / 2)?;
    let x2 = xs.narrow(D::Minus1, d / 2, d / 2)?;
    let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
}

/// Repeats key/value heads for grouped-query attention.
pub fn repeat_kv(xs: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(xs);
    }
    let (b, n_kv, t, d) = xs.dims4()?;
    Ok(xs
        .unsqueeze(2)?
        .broadcast_as((b, n_kv, n_rep, t, d))?
        .reshape((b, n_kv * n_rep, t, d))?)
}

/// Softmax over the last dimension with the max shift detached, so that the backward pass
/// does not route gradients through the (mathematically irrelevant) shift.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let e = xs.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// `softmax(q k^T / sqrt(d) + mask) v` for `(batch, heads, seq, head_dim)` inputs.
///
/// The mask and softmax are computed in f32 whatever the activation dtype, so that half
/// precision weights do not saturate the `-inf` mask or lose the softmax normalisation.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?
        .to_dtype(DType::F32)?
        .broadcast_add(&mask.to_dtype(DType::F32)?)?;
    let probs = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    Ok(probs.matmul(v)?)
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    gate_proj: lora::LoraLinear,
    up_proj: lora::LoraLinear,
    down_proj: lora::LoraLinear,
}

impl Mlp {
    /// `gate_proj`, `up_proj`, `down_proj`.
    pub(crate) fn projections(&self) -> [&lora::LoraLinear; 3] {
        [&self.gate_proj, &self.up_proj, &self.down_proj]
    }

    /// `gate_proj`, `up_proj`, `down_proj`, with their checkpoint names.
    pub(crate) fn projections_mut(&mut self) -> [(&'static str, &mut lora::LoraLinear); 3] {
        [
            ("gate_proj", &mut self.gate_proj),
            ("up_proj", &mut self.up_proj),
            ("down_proj", &mut self.down_proj),
        ]
    }

    /// Loads `gate_proj`, `up_proj`, `down_proj` under `vb` (the `mlp` prefix).
    pub fn load(vb: lora::LoraVarBuilder, cfg: &Config) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: lora::LoraLinear::load(h, i, bias, vb.pp("gate_proj"))?,
            up_proj: lora::LoraLinear::load(h, i, bias, vb.pp("up_proj"))?,
            down_proj: lora::LoraLinear::load(i, h, bias, vb.pp("down_proj"))?,
        })
    }

    /// Applies the MLP to `(batch, seq, hidden)`.
    pub fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let gate = self.gate_proj.forward(xs, train)?;
        let up = self.up_proj.forward(xs, train)?;
        let h = (candle_nn::ops::silu(&gate)? * up)?;
        self.down_proj.forward(&h, train)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA32: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 64,
      "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
      "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": false,
      "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
      "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
      "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "use_cache": true, "vocab_size": 128256
    }"#;

    const QWEN25: &str = r#"{
      "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
      "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896,
      "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
      "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
      "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "sliding_window": 32768, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
      "use_cache": true, "use_sliding_window": false, "vocab_size": 151936,
      "rope_scaling": null
    }"#;

    #[test]
    fn parses_real_configs_and_keeps_extra_fields() -> Result<()> {
        let l: Config = serde_json::from_str(LLAMA32).map_err(|e| ModelError::Json {
            path: "llama32".into(),
            source: e,
        })?;
        l.validate()?;
        assert_eq!(l.family()?, Family::Llama);
        assert_eq!((l.num_kv_heads(), l.head_dim()), (8, 64));
        assert_eq!(l.rope_scaling.as_ref().map(|r| r.kind()), Some("llama3"));
        assert_eq!(
            l.extra["eos_token_id"],
            serde_json::json!([128001, 128008, 128009])
        );
        let back = serde_json::to_value(&l).map_err(|e| ModelError::Json {
            path: "llama32".into(),
            source: e,
        })?;
        assert_eq!(back["rope_scaling"]["rope_type"], "llama3");
        assert_eq!(back["pretraining_tp"], 1);

        let q: Config = serde_json::from_str(QWEN25).map_err(|e| ModelError::Json {
            path: "qwen25".into(),
            source: e,
        })?;
        q.validate()?;
        assert_eq!(q.family()?, Family::Qwen2);
        assert_eq!(q.head_dim(), 64);
        assert!(q.rope_scaling.is_none());

        let both: RopeScaling =
            serde_json::from_str(r#"{"type": "linear", "rope_type": "linear", "factor": 2.0}"#)
                .map_err(|e| ModelError::Json {
                    path: "rope".into(),
                    source: e,
                })?;
        assert_eq!(both.kind(), "linear");
        Ok(())
    }

    #[test]
    fn llama3_rope_scaling_bands() -> Result<()> {
        let mut cfg: Config = serde_json::from_str(LLAMA32).map_err(|e| ModelError::Json {
            path: "llama32".into(),
            source: e,
        })?;
        let scaled = rope_inv_freq(&cfg)?;
        cfg.rope_scaling = None;
        let plain = rope_inv_freq(&cfg)?;
        // Highest frequency (short wavelength) untouched, lowest divided by `factor`.
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 32.0).abs() < 1e-12);
        // Middle band lies between the two.
        assert!(scaled
            .iter()
            .zip(&plain)
            .all(|(s, p)| *s <= *p && *s >= p / 32.0 - 1e-15));
        Ok(())
    }

    #[test]
    fn packing_positions_and_mask() -> Result<()> {
        let p = Packing::from_segments(&[vec![7, 7, 3, 3, 3]], None, &Device::Cpu)?;
        assert_eq!(p.position_ids.to_vec2::<u32>()?, vec![vec![0, 1, 0, 1, 2]]);
        assert_eq!(
            p.spans().as_slice(),
            &[(0, 1), (0, 2), (2, 3), (2, 4), (2, 5)]
        );
        let m = p.mask()?.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        assert_eq!(m[1][0], 0.0);
        assert_eq!(m[0][1], f32::NEG_INFINITY);
        assert_eq!(m[2][1], f32::NEG_INFINITY);
        assert_eq!(m[4][2], 0.0);
        // An id seen before, after another sample, starts a new sample.
        let p = Packing::from_segments(&[vec![7, 7, 3, 7]], None, &Device::Cpu)?;
        assert_eq!(p.position_ids.to_vec2::<u32>()?, vec![vec![0, 1, 0, 0]]);
        assert_eq!(p.spans()[3], (3, 4));
        assert!(Packing::from_segments(&[vec![0, 0], vec![0]], None, &Device::Cpu).is_err());
        Ok(())
    }
}
