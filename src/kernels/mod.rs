//! The CPU kernels that training and inference share: f32 products on the `gemm` crate's
//! kernels ([`gemm`]), fused operations with hand-written backward passes ([`ops`]: frozen and
//! LoRA linear layers, RMSNorm, RoPE, attention, SwiGLU, softmax), the whole decoder layer
//! as one autograd node ([`layer_op`]), and the inference engine's products against weights
//! packed once at load, in f32 or f16 ([`panel`]) or as 4-bit codes against 8-bit
//! activations ([`qpanel`]).
//!
//! They run when a model's [`crate::model::Kernels`] is `Fused` (f32 weights on the CPU); a
//! model on another device or dtype runs candle's own operations instead.

pub mod gemm;
pub(crate) mod layer_op;
pub mod ops;
pub mod panel;
pub mod qpanel;
