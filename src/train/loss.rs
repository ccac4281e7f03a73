//! The training objective: cross-entropy on supervised positions, computed without ever
//! materialising the full `[rows * seq, vocab]` logits.
//!
//! The output projection and the cross-entropy run over chunks of `chunk` supervised
//! positions, off the autograd graph, so only one chunk of logits is alive at a time; the
//! gradient with respect to the decoder output `hidden` is computed analytically per chunk.
//! It is returned as a *surrogate* scalar `sum(hidden * dL/dhidden)` whose backward pass
//! through the decoder yields exactly the adapter gradients of the loss.
//!
//! Response distillation ([`super::kd`]) rides the same pass: the divergence to the teacher's
//! top-k at each supervised position is computed from the same chunk of logits, and its
//! gradient is added to the cross-entropy's before the one GEMM back to the hidden size, so
//! `ce+kd` costs one extra pass over each row of logits, never a `[tokens, vocab]` tensor.
//! Feature distillation matches decoder-layer outputs to the teacher's through autograd.

use super::data::Batch;
use super::kd::{kd_row, FeatureLoss, KdSpec, SoftRows};
use super::TrainError;
use crate::model::{Kernels, ModelOutput, Student};
use candle_core::{DType, Tensor, D};

/// One term of the objective.
#[derive(Debug, Clone, PartialEq)]
pub enum LossTerm {
    /// Token-level cross-entropy against the trace tokens, weighted.
    CrossEntropy {
        /// Weight of the term in the total.
        weight: f64,
    },
    /// `T² · D(teacher_T ‖ student_T)` against the batch's soft labels ([`Batch::soft`]),
    /// weighted.
    Distill {
        /// Weight of the term in the total.
        weight: f64,
        /// Divergence and temperature.
        spec: KdSpec,
    },
    /// Hidden-state matching against the batch's teacher features ([`Batch::features`]), per
    /// supervised position, summed over the layer pairs, weighted.
    Features {
        /// Weight of the term in the total.
        weight: f64,
        /// MSE or cosine.
        loss: FeatureLoss,
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
    /// Sum of the per-token `T² · D` (when distilling), unnormalised.
    pub kd_sum: f64,
    /// Sum of the per-token feature loss (when matching features), unnormalised.
    pub feature_sum: f64,
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

/// The response-distillation part of [`chunked_objective`]: soft labels aligned with the
/// targets, how to compare, and the gradient scale of the term.
#[derive(Debug, Clone, Copy)]
pub struct KdTerm<'a> {
    /// One row per target.
    pub soft: &'a SoftRows,
    /// Divergence and temperature.
    pub spec: KdSpec,
    /// Gradient scale of `T² · D` (the term's weight over the normaliser).
    pub grad_scale: f64,
}

/// Sums of one [`chunked_objective`] pass.
#[derive(Debug, Clone)]
pub struct ChunkedSums {
    /// Summed per-token cross-entropy.
    pub ce: f64,
    /// Summed per-token `T² · D` (0 without a [`KdTerm`]).
    pub kd: f64,
    /// Gradient with respect to `hidden`, when asked for.
    pub grad: Option<Tensor>,
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
    let kernels = Kernels::for_tensors(&[lm_head, hidden]);
    let r = chunked_objective(
        kernels, lm_head, hidden, rows, targets, chunk, grad_scale, None,
    )?;
    Ok((r.ce, r.grad))
}

/// [`chunked_cross_entropy`] plus, when `kd` is given, the distillation divergence of each
/// row from the same logits, its gradient (scaled by `kd.grad_scale`) added to the
/// cross-entropy's (scaled by `ce_grad_scale`). With `ce_grad_scale = None` no gradient is
/// computed at all. `kernels` is the model's ([`Student::kernels`]).
#[allow(clippy::too_many_arguments)]
pub fn chunked_objective(
    kernels: Kernels,
    lm_head: &Tensor,
    hidden: &Tensor,
    rows: &Tensor,
    targets: &Tensor,
    chunk: usize,
    ce_grad_scale: Option<f64>,
    kd: Option<KdTerm<'_>>,
) -> Result<ChunkedSums, TrainError> {
    let n = rows.dim(0)?;
    if let Some(k) = &kd {
        if k.soft.len() != n || k.soft.log_tail.len() != n {
            return Err(TrainError::Data(format!(
                "{} soft-label rows for {n} targets",
                k.soft.len()
            )));
        }
    }
    let (b, t, h) = hidden.dims3()?;
    if kernels == Kernels::Fused {
        return fused_objective(lm_head, hidden, rows, targets, chunk, ce_grad_scale, kd);
    }
    let flat = hidden.detach().reshape((b * t, h))?;
    let mut grad = match ce_grad_scale {
        Some(_) => Some(Tensor::zeros((b * t, h), DType::F32, hidden.device())?),
        None => None,
    };
    let w = lm_head.detach();
    let (mut sum, mut kd_sum) = (0.0, 0.0);
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
        // The divergence on host rows: this path serves accelerators and half precision,
        // where the logits of one chunk are small next to the step.
        let kd_grad = match &kd {
            Some(k) => {
                let host = logits.to_vec2::<f32>()?;
                let vocab = logits.dim(1)?;
                let mut g = vec![0f32; len * vocab];
                for (i, (row, gr)) in host.iter().zip(g.chunks_mut(vocab)).enumerate() {
                    let (ids, lps) = k.soft.row(start + i);
                    let teacher = (ids, lps, k.soft.log_tail[start + i]);
                    let want = ce_grad_scale.map(|_| (gr, k.grad_scale as f32));
                    kd_sum += kd_row(&k.spec, row, teacher, want);
                }
                Some(Tensor::from_vec(g, (len, vocab), hidden.device())?)
            }
            None => None,
        };
        if let (Some(g), Some(scale)) = (grad.as_mut(), ce_grad_scale) {
            let probs = exp.broadcast_div(&z)?;
            let ones = Tensor::ones((len, 1), DType::F32, hidden.device())?;
            let mut dlogits = (probs.scatter_add(&tg, &ones.neg()?, D::Minus1)? * scale)?;
            if let Some(kg) = kd_grad {
                dlogits = (dlogits + kg)?;
            }
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
    Ok(ChunkedSums {
        ce: sum,
        kd: kd_sum,
        grad,
    })
}

/// [`chunked_objective`] for f32 CPU tensors on raw buffers: per chunk, one GEMM for the
/// logits, one parallel pass per row that computes the max, the normaliser, the losses and the
/// gradient of the logits in place, and one GEMM back to the hidden size.
fn fused_objective(
    lm_head: &Tensor,
    hidden: &Tensor,
    rows: &Tensor,
    targets: &Tensor,
    chunk: usize,
    grad_scale: Option<f64>,
    kd: Option<KdTerm<'_>>,
) -> Result<ChunkedSums, TrainError> {
    use crate::kernels::gemm::{pool_threads, sgemm, Mat};
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
    if let Some(k) = &kd {
        if let Some(bad) = k
            .soft
            .ids
            .iter()
            .find(|&&x| x != SoftRows::PAD && x as usize >= vocab)
        {
            return Err(TrainError::Data(format!(
                "soft-label token {bad} outside the student's {vocab} rows"
            )));
        }
    }
    let chunk = chunk.max(1).min(rows.len().max(1));
    let threads = pool_threads();
    let scale = grad_scale.map(|s| s as f32);
    let mut grad = scale.map(|_| vec![0f32; b * t * h]);
    let mut picked = vec![0f32; chunk * h];
    let mut logits = vec![0f32; chunk * vocab];
    let mut dh = vec![0f32; chunk * h];
    let (mut sum, mut kd_sum) = (0.0f64, 0.0f64);
    // The output projection is used in place: a copy would be vocab x hidden floats per call.
    crate::kernels::ops::with_f32(&lm_head.detach(), |w| {
        for (c, (rows, targets)) in rows.chunks(chunk).zip(targets.chunks(chunk)).enumerate() {
            let len = rows.len();
            let first = c * chunk;
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
            let (ce, kdv) = logits
                .par_chunks_mut(vocab)
                .zip(targets.par_iter())
                .enumerate()
                .map(|(i, (row, &target))| {
                    // The divergence reads the raw logits, before the in-place softmax below.
                    let (kd_value, kd_grad) = match &kd {
                        Some(k) => {
                            let (ids, lps) = k.soft.row(first + i);
                            let teacher = (ids, lps, k.soft.log_tail[first + i]);
                            if scale.is_some() {
                                let mut g = vec![0f32; vocab];
                                let v = kd_row(
                                    &k.spec,
                                    row,
                                    teacher,
                                    Some((&mut g, k.grad_scale as f32)),
                                );
                                (v, Some(g))
                            } else {
                                (kd_row(&k.spec, row, teacher, None), None)
                            }
                        }
                        None => (0.0, None),
                    };
                    let picked = row[target as usize];
                    // d/dlogits of scale * CE = scale * (softmax - onehot).
                    let s = scale.unwrap_or(1.0);
                    let (max, z) = crate::kernels::ops::softmax_scaled(row, s);
                    if scale.is_some() {
                        row[target as usize] -= s;
                        if let Some(g) = kd_grad {
                            row.iter_mut().zip(&g).for_each(|(r, g)| *r += g);
                        }
                    }
                    (f64::from(z.ln() + max - picked), kd_value)
                })
                .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            sum += ce;
            kd_sum += kdv;
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
    Ok(ChunkedSums {
        ce: sum,
        kd: kd_sum,
        grad,
    })
}

/// Per-position feature loss between student states `s` and teacher states `t`
/// (`(n, hidden)`), summed over positions; differentiable in `s`.
pub fn feature_loss(s: &Tensor, t: &Tensor, loss: FeatureLoss) -> Result<Tensor, TrainError> {
    let s = s.to_dtype(DType::F32)?;
    let t = t.to_dtype(DType::F32)?.detach();
    let width = s.dim(1)? as f64;
    Ok(match loss {
        FeatureLoss::Mse => ((&s - &t)?.sqr()?.sum_all()? / width)?,
        FeatureLoss::Cosine => {
            let dot = (&s * &t)?.sum(1)?;
            let ns = s.sqr()?.sum(1)?.sqrt()?;
            let nt = t.sqr()?.sum(1)?.sqrt()?;
            let cos = (dot / ((ns * nt)? + 1e-8)?)?;
            (cos.neg()? + 1.0)?.sum_all()?
        }
    })
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
    let (mut ce_weight, mut kd, mut features) = (0.0, None, None);
    for term in &spec.terms {
        match term {
            LossTerm::CrossEntropy { weight } => ce_weight += weight,
            LossTerm::Distill { weight, spec } => kd = Some((*weight, *spec)),
            LossTerm::Features { weight, loss } => features = Some((*weight, *loss)),
        }
    }
    let kd_term = match (kd, &batch.soft) {
        (Some((weight, spec)), Some(soft)) => Some((
            weight,
            KdTerm {
                soft,
                spec,
                grad_scale: weight / normaliser,
            },
        )),
        (Some(_), None) => {
            return Err(TrainError::Data(
                "the objective distils but the batch carries no soft labels".into(),
            ))
        }
        _ => None,
    };
    let sums = chunked_objective(
        model.kernels(),
        model.lm_head(),
        &out.hidden,
        &batch.target_rows,
        &batch.targets,
        spec.chunk,
        with_grad.then_some(ce_weight / normaliser),
        kd_term.map(|(_, k)| k),
    )?;
    let kd_weight = kd_term.map_or(0.0, |(w, _)| w);
    let mut value = (ce_weight * sums.ce + kd_weight * sums.kd) / normaliser;
    let mut surrogate = match sums.grad {
        Some(g) if with_grad => Some((out.hidden.to_dtype(DType::F32)? * g)?.sum_all()?),
        _ => None,
    };
    let mut feature_sum = 0.0;
    if let Some((weight, loss)) = features {
        if batch.features.is_empty() {
            return Err(TrainError::Data(
                "the objective matches features but the batch carries no teacher states".into(),
            ));
        }
        for target in &batch.features {
            let layer = target.layer;
            let Some((_, states)) = out.layers.iter().find(|(l, _)| *l == layer) else {
                return Err(TrainError::Data(format!(
                    "student layer {layer} was not returned by the forward pass"
                )));
            };
            let (b, t, h) = states.dims3()?;
            let mut picked = states
                .reshape((b * t, h))?
                .index_select(&batch.target_rows, 0)?;
            if let Some(w) = &target.projection {
                picked = picked.to_dtype(w.dtype())?.matmul(&w.t()?)?;
            }
            let l = feature_loss(&picked, &target.teacher, loss)?;
            feature_sum += f64::from(l.to_scalar::<f32>()?);
            if with_grad {
                let term = (l * (weight / normaliser))?;
                surrogate = Some(match surrogate {
                    Some(s) => (s + term)?,
                    None => term,
                });
            }
        }
        value += weight * feature_sum / normaliser;
    }
    Ok(LossOutput {
        surrogate,
        value,
        ce_sum: sums.ce,
        kd_sum: sums.kd,
        feature_sum,
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

    /// CE and distillation in one pass: the analytic gradient with respect to `hidden` of
    /// `a · CE + b · T² · D` matches central finite differences, on the fused f32 path and on
    /// the generic one (f64 hidden states take it).
    #[test]
    fn distillation_gradient_matches_finite_differences() -> Result<(), TrainError> {
        use crate::train::kd::{Divergence, KdSpec, SoftRows};
        let dev = Device::Cpu;
        let hidden = Tensor::randn(0f32, 1.0, (2, 4, 6), &dev)?;
        let lm_head = Tensor::randn(0f32, 1.0, (9, 6), &dev)?;
        let rows = Tensor::new(&[0u32, 2, 5, 7], &dev)?;
        let targets = Tensor::new(&[1u32, 8, 0, 4], &dev)?;
        let mut soft = SoftRows::new(3);
        soft.push([(3, -0.5f32), (1, -1.5), (0, -3.0)], None);
        soft.push([(8, -0.2f32), (2, -2.5)], None);
        soft.push([(0, -0.05f32), (5, -4.0), (6, -5.0)], None);
        soft.push([(4, -1.0f32), (7, -1.1), (1, -2.0)], None);
        let spec = KdSpec {
            divergence: Divergence::Jsd,
            beta: 0.3,
            // At T = 1 the teacher's buckets do not depend on the student's logits (at other
            // temperatures its tail shape does, held constant: see `kd`'s own tests).
            temperature: 1.0,
        };
        let (a, b) = (0.4, 0.6);
        let total = |h: &Tensor| -> Result<f64, TrainError> {
            let kd = KdTerm {
                soft: &soft,
                spec,
                grad_scale: b,
            };
            let r = chunked_objective(
                Kernels::Fused,
                &lm_head,
                h,
                &rows,
                &targets,
                3,
                None,
                Some(kd),
            )?;
            Ok(a * r.ce + b * r.kd)
        };
        for (h0, kernels) in [
            (hidden.clone(), Kernels::Fused),
            (hidden.to_dtype(DType::F64)?, Kernels::Candle),
        ] {
            let kd = KdTerm {
                soft: &soft,
                spec,
                grad_scale: b,
            };
            let lm = lm_head.to_dtype(h0.dtype())?;
            let r = chunked_objective(kernels, &lm, &h0, &rows, &targets, 3, Some(a), Some(kd))?;
            let grad = r
                .grad
                .ok_or(TrainError::Data("no grad".into()))?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let flat = hidden.flatten_all()?.to_vec1::<f32>()?;
            for i in [0usize, 5, 13, 31, 42, 47] {
                let eps = 1e-2f32;
                let mut up = flat.clone();
                up[i] += eps;
                let mut dn = flat.clone();
                dn[i] -= eps;
                let up = Tensor::from_vec(up, (2, 4, 6), &dev)?;
                let dn = Tensor::from_vec(dn, (2, 4, 6), &dev)?;
                let fd = (total(&up)? - total(&dn)?) / (2.0 * f64::from(eps));
                assert!(
                    (f64::from(grad[i]) - fd).abs() < 2e-3 * (1.0 + fd.abs()),
                    "{:?} element {i}: analytic {} vs finite difference {fd}",
                    h0.dtype(),
                    grad[i]
                );
            }
        }
        Ok(())
    }
}
