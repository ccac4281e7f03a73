//! How far a quantized export is from the model it was made from: the per-token KL divergence
//! of the exported model's next-token distribution from the reference's, over the full
//! vocabulary, teacher-forced on held-out text; and how often their top token agrees.
//!
//! Accuracy on a benchmark moves in steps of one problem; the KL moves with every logit, so it
//! shows what quantization cost long before a benchmark can.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;

use super::ExportError;
use crate::model::load::BaseModel;
use crate::model::{ForwardOptions, Packing, Student};

/// Per-token divergence of a candidate model from a reference.
#[derive(Debug, Clone, Serialize)]
pub struct Fidelity {
    /// Positions compared.
    pub tokens: usize,
    /// Mean KL(reference ‖ candidate) per token, in nats.
    pub mean_kl: f64,
    /// The largest KL at one position, in nats.
    pub max_kl: f64,
    /// Share of positions where both models rank the same token first.
    pub top1_agreement: f64,
}

/// The model at `path` with `adapter` merged (as `distill merge` merges it), in f32.
fn student(path: &Path, adapter: Option<&Path>) -> Result<(BaseModel, Student), ExportError> {
    let dev = Device::Cpu;
    let mut base = BaseModel::load(path, &dev)?;
    if let Some(dir) = adapter {
        let mut tensors = base.tensors(&dev)?;
        let (cfg, varmap) = crate::model::lora::load_adapter(dir, &dev)?;
        crate::model::lora::merge_into(&mut tensors, &varmap, &cfg)?;
        base.weights = crate::model::load::BaseWeights::Tensors(tensors);
    }
    let s = base.student(None, DType::F32, &dev)?;
    Ok((base, s))
}

fn log_probs(s: &Student, ids: &[u32]) -> Result<Tensor, ExportError> {
    let dev = Device::Cpu;
    let input = Tensor::new(ids, &dev)?.unsqueeze(0)?;
    let packing = Packing::causal(1, ids.len(), &dev)?;
    let out = s.forward(
        &input,
        &packing,
        &ForwardOptions {
            train: false,
            output_layers: vec![],
        },
    )?;
    let logits = s.logits(&out.hidden)?.squeeze(0)?;
    Ok(candle_nn::ops::log_softmax(&logits, D::Minus1)?)
}

/// Compares `candidate` with `reference` (model paths loadable by the model code; the
/// reference with `adapter` merged) on `texts`, tokenized with the reference's tokenizer; the
/// two must share the vocabulary.
pub fn compare(
    reference: &Path,
    adapter: Option<&Path>,
    candidate: &Path,
    texts: &[String],
) -> Result<Fidelity, ExportError> {
    let (rbase, rs) = student(reference, adapter)?;
    let (_, cs) = student(candidate, None)?;
    let (mut tokens, mut sum, mut max, mut agree) = (0usize, 0f64, 0f64, 0usize);
    for text in texts {
        let ids = rbase.tokenizer.encode(text, false)?;
        if ids.len() < 2 {
            continue;
        }
        let p = log_probs(&rs, &ids)?;
        let q = log_probs(&cs, &ids)?;
        if p.dims() != q.dims() {
            return Err(ExportError::Other(format!(
                "the models' vocabularies differ: {:?} vs {:?}",
                p.dims(),
                q.dims()
            )));
        }
        // KL(p ‖ q) = Σ exp(p) (p − q), per position.
        let kl = (p.exp()? * (&p - &q)?)?.sum(D::Minus1)?.to_vec1::<f32>()?;
        let top_p = p.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let top_q = q.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (i, k) in kl.iter().enumerate() {
            let k = f64::from(k.max(0.0));
            sum += k;
            max = max.max(k);
            agree += usize::from(top_p[i] == top_q[i]);
        }
        tokens += kl.len();
    }
    if tokens == 0 {
        return Err(ExportError::Other(
            "no text to compare the models on".into(),
        ));
    }
    Ok(Fidelity {
        tokens,
        mean_kl: sum / tokens as f64,
        max_kl: max,
        top1_agreement: agree as f64 / tokens as f64,
    })
}
