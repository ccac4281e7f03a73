//! The decoder's weights laid out for batched decoding.
//!
//! The engine reads the same [`Student`] that training builds (one model implementation for
//! both), then lays each layer out the way a decode step consumes it: q/k/v stacked into one
//! `(q + 2 kv, hidden)` matrix and gate/up into one `(2 inter, hidden)` matrix, so a step is
//! four products per layer, each matrix packed once into the panels the engine's kernel reads
//! ([`crate::kernels::panel`]). LoRA adapters are folded in here, once, as
//! `W + scale * B A` computed exactly as `distill merge` computes it, so that a base plus an
//! adapter and the merged model `distill merge` writes hold the same bits and decode the same
//! tokens.

use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
use candle_core::{DType, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::kernels::panel::Panels;
use crate::kernels::qpanel::{QPanels, QK};

use crate::model::lora::LoraLinear;
use crate::model::{rope_inv_freq, Config, ModelError, Result, Student};

/// Sizes of one decoder, read once from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Residual stream width.
    pub hidden: usize,
    /// Query heads.
    pub nh: usize,
    /// Key/value heads.
    pub nkv: usize,
    /// Per-head width.
    pub d: usize,
    /// MLP width.
    pub inter: usize,
    /// Vocabulary rows of the output projection.
    pub vocab: usize,
    /// Decoder layers.
    pub layers: usize,
}

impl Dims {
    /// Width of the query projection.
    pub fn q(&self) -> usize {
        self.nh * self.d
    }
    /// Width of one key (or value) row: every kv head of one position.
    pub fn kv(&self) -> usize {
        self.nkv * self.d
    }
    /// Width of the stacked q/k/v projection.
    pub fn qkv(&self) -> usize {
        self.q() + 2 * self.kv()
    }
}

/// One decoder layer, merged and stacked.
#[derive(Debug, Clone)]
pub(crate) struct LayerWeights {
    pub ln1: Vec<f32>,
    pub ln2: Vec<f32>,
    pub eps1: f32,
    pub eps2: f32,
    /// `(qkv, hidden)`.
    pub qkv: Matrix,
    pub qkv_bias: Option<Vec<f32>>,
    /// `(hidden, q)`.
    pub o: Matrix,
    pub o_bias: Option<Vec<f32>>,
    /// `(2 inter, hidden)`: gate rows, then up rows.
    pub gu: Matrix,
    pub gu_bias: Option<Vec<f32>>,
    /// `(hidden, inter)`.
    pub down: Matrix,
    pub down_bias: Option<Vec<f32>>,
}

/// How the engine holds its projection matrices.
///
/// `f32` keeps the trainer's weights unrounded: scoring and soft labels agree with the training
/// forward pass to within float rounding. `f16` halves the memory traffic and runs the same
/// panel kernel, widening each weight in registers, within a thousandth of a nat of f32.
/// `q4_1` holds 4-bit codes per block of 32 with a scale and a minimum (a Q4_1 GGUF's weights
/// exactly) and multiplies them against activations rounded to 8 bits per block in integer
/// instructions: the fastest format here from one sequence to 32, a few hundredths of a nat
/// from f32 ([`crate::kernels::qpanel`]). `q8_0` stores each matrix (and the output
/// projection) in llama.cpp's 8-bit blocks of 32 and quantizes each activation row the same
/// way, as llama.cpp does, through candle's dot products (README, "The inference engine").
/// All keep every row independent of the others, so all are batch-invariant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
pub enum WeightFormat {
    /// f32, as in training.
    #[default]
    #[value(name = "f32")]
    #[serde(rename = "f32")]
    F32,
    /// 8-bit blocks of 32 (llama.cpp's Q8_0) for every projection and the output.
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// f16 for every projection and the output, packed once into the engine's own kernel
    /// layout (activations stay f32).
    #[value(name = "f16")]
    #[serde(rename = "f16")]
    F16,
    /// 4-bit codes with an f16 scale and minimum per block of 32 (llama.cpp's Q4_1: a Q4_1
    /// GGUF's weights exactly) for every projection, multiplied against activations quantized
    /// to 8 bits per block; the output projection in f16.
    #[value(name = "q4_1")]
    #[serde(rename = "q4_1")]
    Q4_1,
}

impl WeightFormat {
    /// The name used in flags and records.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::F16 => "f16",
            WeightFormat::Q4_1 => "q4_1",
        }
    }
}

/// A projection matrix `(n, k)`: f32 or f16 packed into the engine's panels, 4-bit codes in
/// the same panels, or Q8_0 blocks along `k` (row-major).
#[derive(Debug, Clone)]
pub enum Matrix {
    /// f32, packed for [`Panels::matmul`].
    F32(Panels<f32>),
    /// `n * k / 32` blocks.
    Q8_0(Vec<BlockQ8_0>),
    /// f16, packed for [`Panels::matmul`].
    F16(Panels<f16>),
    /// 4-bit codes, packed for [`QPanels::matmul`].
    Q4(QPanels),
}

impl Matrix {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::F32(p) => p.bytes(),
            Matrix::Q8_0(b) => std::mem::size_of::<BlockQ8_0>() * b.len(),
            Matrix::F16(p) => p.bytes(),
            Matrix::Q4(p) => p.bytes(),
        }
    }

    /// This matrix (rows of `k`) in `format`, from f32; other formats, and Q8_0 or Q4_1 where
    /// `k` is not a multiple of 32, are returned unchanged.
    fn to_format(&self, format: WeightFormat, k: usize) -> Matrix {
        match (format, self) {
            (WeightFormat::Q8_0, Matrix::F32(p)) if k.is_multiple_of(32) && p.n() > 0 => {
                Matrix::Q8_0(quantize_rows(&p.unpack(), k))
            }
            (WeightFormat::F16, Matrix::F32(p)) => Matrix::F16(Panels::pack(&p.unpack(), k)),
            (WeightFormat::Q4_1, Matrix::F32(p)) if k.is_multiple_of(QK) => {
                Matrix::Q4(QPanels::quantize(&p.unpack(), k))
            }
            (_, other) => other.clone(),
        }
    }
}

/// Rows of `k` floats as Q8_0 blocks, each row on its own.
pub(crate) fn quantize_rows(v: &[f32], k: usize) -> Vec<BlockQ8_0> {
    let kb = k / 32;
    let mut out = vec![BlockQ8_0::zeros(); v.len() / 32];
    out.par_chunks_mut(kb)
        .zip(v.par_chunks(k))
        .for_each(|(q, row)| BlockQ8_0::from_float(row, q));
    out
}

/// Every weight of a decoder: the projections and the output projection packed for the
/// engine's kernels, the embeddings (looked up, never multiplied) and norms as flat f32.
#[derive(Debug, Clone)]
pub struct Weights {
    pub(crate) dims: Dims,
    /// `(vocab, hidden)`.
    pub(crate) embed: Vec<f32>,
    pub(crate) layers: Vec<LayerWeights>,
    pub(crate) norm: Vec<f32>,
    pub(crate) norm_eps: f32,
    /// The output projection `(vocab, hidden)` (a copy of the embeddings when tied), in the
    /// weights' format.
    pub(crate) head: Matrix,
    /// RoPE inverse frequencies, `head_dim / 2` of them.
    pub(crate) inv_freq: Vec<f64>,
    /// Positions the rotary tables were defined for.
    pub(crate) max_positions: usize,
    pub(crate) format: WeightFormat,
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The weight of `p` with its adapter folded in, computed as [`crate::model::lora::merge_into`]
/// does (`W + (B A) * scale` in f32) so that the two agree to the bit.
fn merged(p: &LoraLinear) -> Result<Vec<f32>> {
    let w = p.weight().to_dtype(DType::F32)?;
    let w = match p.adapter() {
        Some(a) => {
            let delta = (a
                .lora_b
                .to_dtype(DType::F32)?
                .matmul(&a.lora_a.to_dtype(DType::F32)?)?
                * a.scale)?;
            (w + delta)?
        }
        None => w,
    };
    flat(&w)
}

/// Biases of the projections `ps` side by side, or `None` when none has one. A projection
/// without a bias in a group where another has one contributes zeros.
fn stacked_bias(ps: &[&LoraLinear], widths: &[usize]) -> Result<Option<Vec<f32>>> {
    if ps.iter().all(|p| p.bias().is_none()) {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(widths.iter().sum());
    for (p, &w) in ps.iter().zip(widths) {
        match p.bias() {
            Some(b) => out.extend(flat(b)?),
            None => out.extend(std::iter::repeat_n(0.0, w)),
        }
    }
    Ok(Some(out))
}

impl Weights {
    /// Lays out `model`'s weights (adapters folded in). The model must hold its weights on
    /// the CPU; any float dtype is converted to f32.
    pub fn from_student(model: &Student) -> Result<Self> {
        let cfg: &Config = model.config();
        let (embed, layers, norm) = model.parts();
        let dims = Dims {
            hidden: cfg.hidden_size,
            nh: cfg.num_attention_heads,
            nkv: cfg.num_kv_heads(),
            d: cfg.head_dim(),
            inter: cfg.intermediate_size,
            vocab: model.lm_head().dim(0)?,
            layers: cfg.num_hidden_layers,
        };
        if embed.dim(1)? != dims.hidden {
            return Err(ModelError::Input(format!(
                "embedding width {} != hidden_size {}",
                embed.dim(1)?,
                dims.hidden
            )));
        }
        let mut out_layers = Vec::with_capacity(layers.len());
        for layer in layers {
            let r = layer.refs();
            let [q, k, v, o, gate, up, down] = r.proj;
            let mut qkv = merged(q)?;
            qkv.extend(merged(k)?);
            qkv.extend(merged(v)?);
            let mut gu = merged(gate)?;
            gu.extend(merged(up)?);
            let h = dims.hidden;
            let (qkv, gu) = (
                Matrix::F32(Panels::pack(&qkv, h)),
                Matrix::F32(Panels::pack(&gu, h)),
            );
            out_layers.push(LayerWeights {
                ln1: flat(r.input_norm.weight())?,
                ln2: flat(r.post_attention_norm.weight())?,
                eps1: r.input_norm.eps() as f32,
                eps2: r.post_attention_norm.eps() as f32,
                qkv,
                qkv_bias: stacked_bias(&[q, k, v], &[dims.q(), dims.kv(), dims.kv()])?,
                o: Matrix::F32(Panels::pack(&merged(o)?, dims.q())),
                o_bias: stacked_bias(&[o], &[dims.hidden])?,
                gu,
                gu_bias: stacked_bias(&[gate, up], &[dims.inter, dims.inter])?,
                down: Matrix::F32(Panels::pack(&merged(down)?, dims.inter)),
                down_bias: stacked_bias(&[down], &[dims.hidden])?,
            });
        }
        let embed = flat(embed)?;
        let head = if cfg.tie_word_embeddings {
            Panels::pack(&embed, dims.hidden)
        } else {
            Panels::pack(&flat(model.lm_head())?, dims.hidden)
        };
        Ok(Self {
            dims,
            embed,
            layers: out_layers,
            norm: flat(norm.weight())?,
            norm_eps: norm.eps() as f32,
            head: Matrix::F32(head),
            inv_freq: rope_inv_freq(cfg)?,
            max_positions: cfg.max_position_embeddings.max(1),
            format: WeightFormat::F32,
        })
    }

    /// Converts these weights to `format` (from f32; the current format changes nothing).
    pub fn set_format(&mut self, format: WeightFormat) {
        if format == self.format {
            return;
        }
        assert_eq!(
            self.format,
            WeightFormat::F32,
            "weights are laid out in f32 first and converted once"
        );
        let d = self.dims;
        for l in &mut self.layers {
            l.qkv = l.qkv.to_format(format, d.hidden);
            l.o = l.o.to_format(format, d.q());
            l.gu = l.gu.to_format(format, d.hidden);
            l.down = l.down.to_format(format, d.inter);
        }
        // The output projection sets every log-probability directly, and a GGUF usually
        // holds it in more bits than the layers (llama.cpp keeps Q8_0 or Q6_K there): 4 bits
        // would round it further, so q4_1 keeps it in f16.
        let head = match format {
            WeightFormat::Q4_1 => WeightFormat::F16,
            other => other,
        };
        self.head = self.head.to_format(head, d.hidden);
        self.format = format;
    }

    /// The format of the projection matrices.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// The decoder's sizes.
    pub fn dims(&self) -> Dims {
        self.dims
    }

    /// Bytes held by the weights (a tied output projection counted as the copy it is).
    pub fn bytes(&self) -> usize {
        let layer: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.bytes()
                    + l.o.bytes()
                    + l.gu.bytes()
                    + l.down.bytes()
                    + 4 * (l.ln1.len()
                        + l.ln2.len()
                        + [&l.qkv_bias, &l.o_bias, &l.gu_bias, &l.down_bias]
                            .iter()
                            .map(|b| b.as_ref().map_or(0, Vec::len))
                            .sum::<usize>())
            })
            .sum();
        layer + self.head.bytes() + 4 * (self.embed.len() + self.norm.len())
    }
}
