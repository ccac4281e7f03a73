//! The training objective: cross-entropy on supervised positions, computed without ever
//! materialising the full `[rows * seq, vocab]` logits.
//!
//! The output projection and the cross-entropy run over chunks of `chunk` supervised
//! positions, off the autograd graph, so only one chunk of logits is alive at a time; the
//! gradient with respect to the decoder output `hidden` is computed analytically per chunk.
//! It is returned as a *surrogate* scalar `sum(hidden * dL/dhidden)` whose backward pass
//! through the decoder yields exactly the adapter gradients of the loss.
//!
//! Other objectives (KL to teacher soft labels, hidden-state matching) are further
//! [`LossTerm`]s: each contributes a value for logging and a surrogate for the backward pass.

use super::data::Batch;
use super::TrainError;
use crate::model::{ModelOutput, Student};
use candle_core::{DType, Tensor, D};

/// One term of the objective. Only cross-entropy exists today; distillation terms (KL to the
/// teacher's top-k log-probabilities, hidden-state matching on `output_layers`) slot in here.
#[derive(Debug, Clone, PartialEq)]
pub enum LossTerm {
    /// Token-level cross-entropy against the trace tokens, weighted.
    CrossEntropy {
        /// Weight of the term in the total.
        weight: f64,
    },
}

/// The weighted terms of the objective and how the output projection is chunked.
#[derive(Debug, Clone, PartialEq)]
pub struct LossSpec {
    /// Terms summed into the objective.
    pub terms: Vec<LossTerm>,
    /// Supervised positions per chunk of logits.
    pub chunk: usize,
}

impl LossSpec {
    /// Plain SFT: cross-entropy only.
    pub fn cross_entropy(chunk: usize) -> Self {
        Self {
            terms: vec![LossTerm::CrossEntropy { weight: 1.0 }],
            chunk: chunk.max(1),
        }
    }
}

/// Result of [`compute_loss`] for one micro-batch.
#[derive(Debug)]
pub struct LossOutput {
    /// Scalar whose backward gives the gradients of `value` (None when `with_grad` is false).
    pub surrogate: Option<Tensor>,
    /// The objective of this micro-batch: weighted per-token losses summed and divided by the
    /// `normaliser` passed in.
    pub value: f64,
    /// Sum of the per-token cross-entropy (nats), unnormalised, for logging.
    pub ce_sum: f64,
    /// Supervised tokens in the micro-batch.
    pub n_tokens: usize,
}

/// Per-row `logsumexp(logits) - logits[target]`, in f32; shape `(rows,)`.
pub fn token_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor, TrainError> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let lse = logits
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .add(&max)?;
    let picked = logits.gather(&targets.unsqueeze(1)?, D::Minus1)?;
    Ok((lse - picked)?.squeeze(1)?)
}

/// Cross-entropy of the supervised positions of `hidden` (`(batch, seq, hidden)`) under the
/// output projection `lm_head` (`(vocab, hidden)`), computed `chunk` positions at a time.
///
/// Returns the summed per-token loss and, when `grad_scale` is given, the gradient of
/// `grad_scale * sum` with respect to `hidden`, written analytically
/// (`(softmax - onehot) @ lm_head`, scattered back to the rows): autograd would also compute
/// the gradient of the frozen `lm_head` (a `vocab x hidden` matrix per chunk) and keep the
/// softmax graph alive.
pub fn chunked_cross_entropy(
    lm_head: &Tensor,
    hidden: &Tensor,
    rows: &Tensor,
    targets: &Tensor,
    chunk: usize,
    grad_scale: Option<f64>,
) -> Result<(f64, Option<Tensor>), TrainError> {
    let (b, t, h) = hidden.dims3()?;
    if hidden.device().is_cpu() && hidden.dtype() == DType::F32 && lm_head.dtype() == DType::F32 {
        return fused_cross_entropy(lm_head, hidden, rows, targets, chunk, grad_scale);
    }
    let flat = hidden.detach().reshape((b * t, h))?;
    let n = rows.dim(0)?;
    let mut grad = match grad_scale {
        Some(_) => Some(Tensor::zeros((b * t, h), DType::F32, hidden.device())?),
        None => None,
    };
    let w = lm_head.detach();
    let mut sum = 0.0;
    let mut start = 0;
    while start < n {
        let len = chunk.max(1).min(n - start);
        let r = rows.narrow(0, start, len)?;
        let tg = targets.narrow(0, start, len)?.unsqueeze(1)?;
        let picked = flat.index_select(&r, 0)?;
        let logits = picked.matmul(&w.t()?)?.to_dtype(DType::F32)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let exp = logits.broadcast_sub(&max)?.exp()?;
        let z = exp.sum_keepdim(D::Minus1)?;
        let lse = (z.log()? + max)?;
        let ce = (lse - logits.gather(&tg, D::Minus1)?)?;
        sum += f64::from(ce.sum_all()?.to_scalar::<f32>()?);
        if let (Some(g), Some(scale)) = (grad.as_mut(), grad_scale) {
            let probs = exp.broadcast_div(&z)?;
            let ones = Tensor::ones((len, 1), DType::F32, hidden.device())?;
            let dlogits = (probs.scatter_add(&tg, &ones.neg()?, D::Minus1)? * scale)?;
            let dh = dlogits
                .to_dtype(w.dtype())?
                .matmul(&w)?
                .to_dtype(DType::F32)?;
            *g = g.index_add(&r, &dh, 0)?;
        }
        start += len;
    }
    let grad = match grad {
        Some(g) => Some(g.reshape((b, t, h))?),
        None => None,
    };
    Ok((sum, grad))
}

/// [`chunked_cross_entropy`] for f32 CPU tensors on raw buffers: per chunk, one GEMM for the
/// logits, one parallel pass per row that computes the max, the normaliser, the loss and the
/// gradient of the logits in place, and one GEMM back to the hidden size.
fn fused_cross_entropy(
    lm_head: &Tensor,
    hidden: &Tensor,
    rows: &Tensor,
    targets: &Tensor,
    chunk: usize,
    grad_scale: Option<f64>,
) -> Result<(f64, Option<Tensor>), TrainError> {
    use crate::model::gemm::{pool_threads, sgemm, Mat};
    use rayon::prelude::*;

    let (b, t, h) = hidden.dims3()?;
    let vocab = lm_head.dim(0)?;
    let flat = hidden.detach().flatten_all()?.to_vec1::<f32>()?;
    let rows = rows.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let targets = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if rows.len() != targets.len() {
        return Err(TrainError::Data(format!(
            "{} target rows but {} targets",
            rows.len(),
            targets.len()
        )));
    }
    if let Some(bad) = rows.iter().find(|&&r| r as usize >= b * t) {
        return Err(TrainError::Data(format!("target row {bad} out of range")));
    }
    if let Some(bad) = targets.iter().find(|&&x| x as usize >= vocab) {
        return Err(TrainError::Data(format!(
            "target token {bad} outside the vocabulary"
        )));
    }
    let chunk = chunk.max(1).min(rows.len().max(1));
    let threads = pool_threads();
    let scale = grad_scale.map(|s| s as f32);
    let mut grad = scale.map(|_| vec![0f32; b * t * h]);
    let mut picked = vec![0f32; chunk * h];
    let mut logits = vec![0f32; chunk * vocab];
    let mut dh = vec![0f32; chunk * h];
    let mut sum = 0.0f64;
    // The output projection is used in place: a copy would be vocab x hidden floats per call.
    crate::model::ops::with_f32(&lm_head.detach(), |w| {
        for (rows, targets) in rows.chunks(chunk).zip(targets.chunks(chunk)) {
            let len = rows.len();
            for (dst, &r) in picked.chunks_mut(h).zip(rows) {
                let r = r as usize;
                dst.copy_from_slice(&flat[r * h..(r + 1) * h]);
            }
            let logits = &mut logits[..len * vocab];
            sgemm(
                len,
                vocab,
                h,
                1.0,
                Mat::new(&picked[..len * h], h),
                Mat::new(w, h).t(),
                0.0,
                logits,
                vocab,
                threads,
            );
            sum += logits
                .par_chunks_mut(vocab)
                .zip(targets.par_iter())
                .map(|(row, &target)| {
                    let picked = row[target as usize];
                    // d/dlogits of scale * CE = scale * (softmax - onehot).
                    let s = scale.unwrap_or(1.0);
                    let (max, z) = crate::model::ops::softmax_scaled(row, s);
                    if scale.is_some() {
                        row[target as usize] -= s;
                    }
                    f64::from(z.ln() + max - picked)
                })
                .sum::<f64>();
            if let Some(grad) = grad.as_mut() {
                let dh = &mut dh[..len * h];
                sgemm(
                    len,
                    h,
                    vocab,
                    1.0,
                    Mat::new(logits, vocab),
                    Mat::new(w, h),
                    0.0,
                    dh,
                    h,
                    threads,
                );
                for (src, &r) in dh.chunks(h).zip(rows) {
                    let r = r as usize;
                    for (g, v) in grad[r * h..(r + 1) * h].iter_mut().zip(src) {
                        *g += v;
                    }
                }
            }
        }
    })?;
    let grad = match grad {
        Some(g) => Some(Tensor::from_vec(g, (b, t, h), hidden.device())?),
        None => None,
    };
    Ok((sum, grad))
}

/// The loss of one micro-batch. `normaliser` is the number of supervised tokens of the whole
/// optimizer step (all accumulated micro-batches), so that summing the gradients of the
/// micro-batches gives the gradient of the token-mean loss over the step.
pub fn compute_loss(
    model: &Student,
    out: &ModelOutput,
    batch: &Batch,
    spec: &LossSpec,
    normaliser: f64,
    with_grad: bool,
) -> Result<LossOutput, TrainError> {
    let n = batch.n_supervised;
    if n == 0 || normaliser <= 0.0 {
        return Err(TrainError::Preflight(
            "a micro-batch has zero supervised tokens".into(),
        ));
    }
    let mut grad_hidden: Option<Tensor> = None;
    let (mut value, mut ce_sum) = (0.0, 0.0);
    for term in &spec.terms {
        match term {
            LossTerm::CrossEntropy { weight } => {
                let (sum, grad) = chunked_cross_entropy(
                    model.lm_head(),
                    &out.hidden,
                    &batch.target_rows,
                    &batch.targets,
                    spec.chunk,
                    with_grad.then_some(weight / normaliser),
                )?;
                ce_sum += sum;
                value += weight * sum / normaliser;
                if let Some(g) = grad {
                    grad_hidden = Some(match grad_hidden {
                        Some(acc) => (acc + g)?,
                        None => g,
                    });
                }
            }
        }
    }
    let surrogate = match grad_hidden {
        Some(g) => Some((out.hidden.to_dtype(DType::F32)? * g)?.sum_all()?),
        None => None,
    };
    Ok(LossOutput {
        surrogate,
        value,
        ce_sum,
        n_tokens: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_candle() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let logits = Tensor::randn(0f32, 3.0, (5, 11), &dev)?;
        let targets = Tensor::new(&[0u32, 3, 10, 7, 7], &dev)?;
        let ours = token_cross_entropy(&logits, &targets)?
            .mean_all()?
            .to_scalar::<f32>()?;
        let theirs = candle_nn::loss::cross_entropy(&logits, &targets)?.to_scalar::<f32>()?;
        assert!((ours - theirs).abs() < 1e-5, "{ours} vs {theirs}");
        Ok(())
    }

    /// The analytic, chunked gradient equals autograd's through the full logits.
    #[test]
    fn chunked_gradient_matches_autograd() -> Result<(), TrainError> {
        let dev = Device::Cpu;
        let hidden = candle_core::Var::randn(0f32, 1.0, (2, 5, 8), &dev)?;
        let lm_head = Tensor::randn(0f32, 1.0, (13, 8), &dev)?;
        let rows = Tensor::new(&[0u32, 3, 4, 6, 9], &dev)?;
        let targets = Tensor::new(&[1u32, 12, 0, 5, 5], &dev)?;
        let (sum, grad) =
            chunked_cross_entropy(&lm_head, hidden.as_tensor(), &rows, &targets, 2, Some(0.5))?;
        let logits = crate::model::logits_at(&lm_head, hidden.as_tensor(), &rows)?;
        let full = token_cross_entropy(&logits, &targets)?.sum_all()?;
        let want = (&full * 0.5)?.backward()?;
        let want = want
            .get(hidden.as_tensor())
            .ok_or(TrainError::Data("no grad".into()))?;
        assert!((sum - f64::from(full.to_scalar::<f32>()?)).abs() < 1e-4);
        let got = grad.ok_or(TrainError::Data("no grad".into()))?;
        let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "gradient differs by {d}");
        Ok(())
    }
}
