//! Qwen2 / Qwen2.5 decoder.
//!
//! Same block structure as Llama but with a bias on the q/k/v projections (none on `o_proj`);
//! Qwen2 checkpoints do not set `attention_bias`, so the biases are fixed here.

use super::llama::{load_decoder, run_decoder, Attention};
use super::lora::LoraVarBuilder;
use super::{Config, ForwardOptions, Mlp, ModelOutput, Packing, Result, RmsNorm, RotaryEmbedding};
use candle_core::Tensor;

/// Pre-norm decoder layer with biased q/k/v.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// Loads one layer under `vb` (`model.layers.N`).
    pub fn load(vb: LoraVarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), cfg, true, false)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            input_layernorm: RmsNorm::load(
                &vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            post_attention_layernorm: RmsNorm::load(
                &vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
        })
    }

    /// Runs the layer on `(batch, seq, hidden)`.
    pub fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(xs)?;
        let xs = (xs + self.self_attn.forward(&h, cos, sin, mask, train)?)?;
        let h = self.post_attention_layernorm.forward(&xs)?;
        Ok((&xs + self.mlp.forward(&h, train)?)?)
    }
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
        load_decoder(vb, cfg, DecoderLayer::load).map(
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
            |l, x, c, s, m, tr| l.forward(x, c, s, m, tr),
        )
    }

    /// The output projection `(vocab, hidden)`.
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
}
