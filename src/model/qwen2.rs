//! Qwen2 / Qwen2.5 decoder.
//!
//! Same block structure as Llama but with a bias on the q/k/v projections (none on `o_proj`);
//! Qwen2 checkpoints do not set `attention_bias`, so the biases are fixed here.

use super::llama::{load_decoder, run_decoder};
use super::lora::LoraVarBuilder;
use super::{Config, ForwardOptions, ModelOutput, Packing, Result, RmsNorm, RotaryEmbedding};
use candle_core::Tensor;

/// The Llama layer with biased q/k/v and an unbiased o.
pub type DecoderLayer = super::llama::DecoderLayer;

/// Loads one layer under `vb` (`model.layers.N`).
fn load_layer(vb: LoraVarBuilder, cfg: &Config) -> Result<DecoderLayer> {
    DecoderLayer::with_biases(vb, cfg, true, false)
}

/// Qwen2 causal LM.
#[derive(Debug, Clone)]
pub struct Model {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    rotary: RotaryEmbedding,
    cfg: Config,
}

impl Model {
    /// Loads from a root builder; `lm_head` is tied when the checkpoint lacks `lm_head.weight`
    /// (Qwen2.5 0.5B/1.5B are tied).
    pub fn load(vb: LoraVarBuilder, cfg: &Config) -> Result<Self> {
        load_decoder(vb, cfg, load_layer).map(
            |(embed_tokens, layers, norm, lm_head, rotary, cfg)| Self {
                embed_tokens,
                layers,
                norm,
                lm_head,
                rotary,
                cfg,
            },
        )
    }

    /// Runs the decoder; see [`super::Student::forward`].
    pub fn forward(
        &self,
        input_ids: &Tensor,
        packing: &Packing,
        opts: &ForwardOptions,
    ) -> Result<ModelOutput> {
        run_decoder(
            &self.embed_tokens,
            &self.layers,
            &self.norm,
            &self.rotary,
            input_ids,
            packing,
            opts,
            DecoderLayer::forward,
        )
    }

    /// The output projection `(vocab, hidden)`.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The embedding matrix, decoder layers and final norm, for the inference engine, which
    /// lays the same weights out for decoding.
    pub(crate) fn parts(&self) -> (&Tensor, &[DecoderLayer], &RmsNorm) {
        (&self.embed_tokens, &self.layers, &self.norm)
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
}
