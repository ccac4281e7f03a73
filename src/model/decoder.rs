//! The decoder of every supported family: Llama 2/3, SmolLM/SmolLM2, Mistral (without sliding
//! window) and Qwen2/2.5. One implementation; the families differ only in which attention
//! projections carry a bias ([`super::Family::attention_biases`]).
//!
//! Field names follow the checkpoint (`model.layers.N.self_attn.q_proj` ...) so that loading is a
//! walk down the `VarBuilder` prefixes and every adapted module gets its PEFT name for free.
//!
//! Which kernels run is chosen once, when the model is built ([`Kernels`]): the fused CPU
//! layer node and loss (`crate::kernels`) for f32 weights on the CPU, candle's own
//! operations otherwise.

use super::lora::{LoraLinear, LoraVarBuilder};
use super::{
    apply_rope, attention, repeat_kv, Config, ForwardOptions, Kernels, Mlp, ModelError,
    ModelOutput, Packing, Result, RmsNorm, RotaryEmbedding,
};
use crate::kernels::layer_op::{decoder_layer, LayerContext, LayerRefs};
use candle_core::{Tensor, Var};
use std::collections::BTreeMap;

/// Grouped-query self-attention with rotary embeddings.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    o_proj: LoraLinear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Loads the four projections under `vb` (the `self_attn` prefix). `qkv_bias` / `o_bias`
    /// select the biases (Llama: `attention_bias` for all four; Qwen2: q/k/v only).
    pub fn load(vb: LoraVarBuilder, cfg: &Config, qkv_bias: bool, o_bias: bool) -> Result<Self> {
        let h = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        Ok(Self {
            q_proj: LoraLinear::load(h, nh * hd, qkv_bias, vb.pp("q_proj"))?,
            k_proj: LoraLinear::load(h, nkv * hd, qkv_bias, vb.pp("k_proj"))?,
            v_proj: LoraLinear::load(h, nkv * hd, qkv_bias, vb.pp("v_proj"))?,
            o_proj: LoraLinear::load(nh * hd, h, o_bias, vb.pp("o_proj"))?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        })
    }

    /// `o_proj(softmax(rope(q) rope(k)^T / sqrt(d) + mask) v)` for `(batch, seq, hidden)`.
    pub fn forward(
        &self,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let q = self.q_proj.forward(xs, train)?;
        let k = self.k_proj.forward(xs, train)?;
        let v = self.v_proj.forward(xs, train)?;
        let heads = |x: Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (nh, nkv) = (self.num_heads, self.num_kv_heads);
        let q = apply_rope(&heads(q, nh)?, cos, sin)?;
        let k = apply_rope(&heads(k, nkv)?, cos, sin)?;
        let k = repeat_kv(k, nh / nkv)?;
        let v = repeat_kv(heads(v, nkv)?, nh / nkv)?;
        let y =
            attention(&q, &k, &v, mask)?
                .transpose(1, 2)?
                .reshape((b, t, nh * self.head_dim))?;
        self.o_proj.forward(&y, train)
    }
}

/// What every layer of one forward pass gets besides its input: the rotary tables, the
/// attention mask, the flat tables of the fused layer node (f32 CPU only) and whether this
/// is a training pass.
pub struct LayerInputs<'a> {
    /// `(batch, 1, seq, head_dim / 2)`.
    pub cos: &'a Tensor,
    /// `(batch, 1, seq, head_dim / 2)`.
    pub sin: &'a Tensor,
    /// Positions and the keys each token attends to.
    pub packing: &'a Packing,
    /// The packing's dense `(batch, 1, seq, seq)` mask, built the first time a layer runs on
    /// candle's attention (the fused kernels read the key spans instead).
    pub mask: std::cell::OnceCell<Tensor>,
    pub(crate) fused: Option<LayerContext>,
    /// Adapter dropout is active, and the fused node keeps what its backward pass needs.
    pub train: bool,
}

/// Pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// Loads one layer under `vb` (`model.layers.N`), with the attention biases of the
    /// configuration's family.
    pub fn load(vb: LoraVarBuilder, cfg: &Config) -> Result<Self> {
        let (qkv_bias, o_bias) = cfg.family()?.attention_biases(cfg);
        Self::with_biases(vb, cfg, qkv_bias, o_bias)
    }

    /// Loads one layer with the attention biases chosen per family (`qkv_bias` for q/k/v,
    /// `o_bias` for o; Qwen2 has the first and not the second).
    pub fn with_biases(
        vb: LoraVarBuilder,
        cfg: &Config,
        qkv_bias: bool,
        o_bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), cfg, qkv_bias, o_bias)?,
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

    /// Turns every weight of the layer (projections, biases, both norms) into a trainable
    /// variable, added to `vars` under its checkpoint name below `prefix` (`model.layers.N`).
    pub fn make_trainable(&mut self, prefix: &str, vars: &mut BTreeMap<String, Var>) -> Result<()> {
        let a = &mut self.self_attn;
        for (name, p) in [
            ("q_proj", &mut a.q_proj),
            ("k_proj", &mut a.k_proj),
            ("v_proj", &mut a.v_proj),
            ("o_proj", &mut a.o_proj),
        ] {
            p.make_trainable(&format!("{prefix}.self_attn.{name}"), vars)?;
        }
        for (name, p) in self.mlp.projections_mut() {
            p.make_trainable(&format!("{prefix}.mlp.{name}"), vars)?;
        }
        self.input_layernorm
            .make_trainable(&format!("{prefix}.input_layernorm"), vars)?;
        self.post_attention_layernorm
            .make_trainable(&format!("{prefix}.post_attention_layernorm"), vars)
    }

    /// The parts the fused layer node reads.
    pub(crate) fn refs(&self) -> LayerRefs<'_> {
        let a = &self.self_attn;
        let [gate, up, down] = self.mlp.projections();
        LayerRefs {
            input_norm: &self.input_layernorm,
            post_attention_norm: &self.post_attention_layernorm,
            proj: [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, gate, up, down],
            num_heads: a.num_heads,
            num_kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
        }
    }

    /// Runs the layer on `(batch, seq, hidden)`: as one fused node when it applies (see
    /// `layer_op`), else op by op.
    pub fn forward(&self, xs: &Tensor, inp: &LayerInputs<'_>) -> Result<Tensor> {
        if let Some(ctx) = &inp.fused {
            if let Some(y) = decoder_layer(xs, &self.refs(), ctx, inp.train)? {
                return Ok(y);
            }
        }
        let (cos, sin, train) = (inp.cos, inp.sin, inp.train);
        let mask = match inp.mask.get() {
            Some(m) => m,
            None => {
                let m = inp.packing.mask()?;
                inp.mask.get_or_init(|| m)
            }
        };
        let h = self.input_layernorm.forward(xs)?;
        let xs = (xs + self.self_attn.forward(&h, cos, sin, mask, train)?)?;
        let h = self.post_attention_layernorm.forward(&xs)?;
        Ok((&xs + self.mlp.forward(&h, train)?)?)
    }
}

/// A causal LM of any supported family: embeddings, decoder layers, final norm and
/// `lm_head`, with base weights frozen and LoRA adapters (when the builder carries them) in its
/// `VarMap`.
#[derive(Debug, Clone)]
pub struct Student {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Tensor,
    rotary: RotaryEmbedding,
    cfg: Config,
    kernels: Kernels,
    /// The decoder layers' own weights train ([`Student::train_layers`]): the layers run on
    /// candle's operations, whose autograd gives weight gradients.
    layers_trained: bool,
}

impl Student {
    /// Builds the model of `cfg` from a root builder (prefixes `model.*` and `lm_head`),
    /// creating or reusing adapters when `vb` carries a LoRA config. The output projection is
    /// `lm_head.weight` when the checkpoint has it, else the embedding matrix (tied).
    pub fn load(vb: LoraVarBuilder, cfg: &Config) -> Result<Self> {
        cfg.validate()?;
        cfg.family()?;
        let m = vb.pp("model");
        let embed_tokens = m
            .pp("embed_tokens")
            .base_get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(m.pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&m.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let head = vb.pp("lm_head");
        let tied = !head.base_contains("weight");
        let lm_head = if tied {
            embed_tokens.clone()
        } else {
            head.base_get((cfg.vocab_size, cfg.hidden_size), "weight")?
        };
        let mut cfg = cfg.clone();
        cfg.tie_word_embeddings = tied;
        let rotary = RotaryEmbedding::new(&cfg, vb.device())?;
        let kernels = Kernels::for_tensors(&[&embed_tokens]);
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            cfg,
            kernels,
            layers_trained: false,
        })
    }

    /// Full-parameter training of the decoder layers: every projection, bias and norm of every
    /// layer becomes a trainable variable (embeddings, final norm and output projection stay
    /// frozen). The layers then run on candle's operations rather than the fused layer node,
    /// which computes adapter gradients only. Returns the variables by checkpoint name
    /// (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn train_layers(&mut self) -> Result<BTreeMap<String, Var>> {
        let mut vars = BTreeMap::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.make_trainable(&format!("model.layers.{i}"), &mut vars)?;
        }
        self.layers_trained = true;
        Ok(vars)
    }

    /// Runs the decoder on `input_ids` (`(batch, seq)` u32): embed, run the layers
    /// (collecting the requested outputs), final norm.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        packing: &Packing,
        opts: &ForwardOptions,
    ) -> Result<ModelOutput> {
        let (b, t) = input_ids.dims2()?;
        if packing.position_ids.dims() != [b, t] || packing.dims() != (b, t) {
            return Err(ModelError::Input(format!(
                "packing {:?} does not match input_ids {:?}",
                packing.dims(),
                input_ids.dims()
            )));
        }
        let (embed_tokens, layers, norm, rotary) =
            (&self.embed_tokens, &self.layers, &self.norm, &self.rotary);
        if let Some(bad) = opts.output_layers.iter().find(|&&l| l >= layers.len()) {
            return Err(ModelError::Input(format!(
                "output layer {bad} >= num_hidden_layers {}",
                layers.len()
            )));
        }
        let vocab = embed_tokens.dim(0)?;
        let top = input_ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
        if top >= vocab {
            return Err(ModelError::Input(format!(
                "token id {top} >= vocab_size {vocab}"
            )));
        }
        let (cos, sin) = rotary.tables(&packing.position_ids, embed_tokens.dtype())?;
        let mut xs = embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, ()))?;
        let fused = match self.kernels {
            Kernels::Fused if !self.layers_trained => Some(LayerContext::new(packing, &cos, &sin)?),
            Kernels::Fused | Kernels::Candle => None,
        };
        let inputs = LayerInputs {
            cos: &cos,
            sin: &sin,
            packing,
            mask: std::cell::OnceCell::new(),
            fused,
            train: opts.train,
        };
        let mut collected = Vec::with_capacity(opts.output_layers.len());
        for (i, layer) in layers.iter().enumerate() {
            xs = layer.forward(&xs, &inputs)?;
            if opts.output_layers.contains(&i) {
                collected.push((i, xs.clone()));
            }
        }
        let layers_out = opts
            .output_layers
            .iter()
            .filter_map(|l| collected.iter().find(|(i, _)| i == l).cloned())
            .collect();
        Ok(ModelOutput {
            hidden: norm.forward(&xs)?,
            layers: layers_out,
        })
    }

    /// The output projection (`lm_head.weight`, or the embedding matrix when tied).
    pub fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The kernels chosen when the model was built; the loss uses the same.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// The embedding matrix, decoder layers and final norm, for the inference engine, which
    /// lays the same weights out for decoding.
    pub(crate) fn parts(&self) -> (&Tensor, &[DecoderLayer], &RmsNorm) {
        (&self.embed_tokens, &self.layers, &self.norm)
    }
}
