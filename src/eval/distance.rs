//! How close a student came to its teacher, on held-out traces: the mean per-token KL
//! divergence from the teacher's next-token distribution to the student's, and the student's
//! perplexity on the traces' answers.
//!
//! Both are measured at every supervised token (the answer, as `distill train` masks it),
//! teacher-forced, with the trainer's forward pass and loss code. The KL is over the teacher's
//! top-k tokens plus one bucket for the rest (see [`crate::train::kd`]), so it is a lower bound
//! of the full-vocabulary KL, tight when the top-k hold nearly all the mass (`distill label`
//! prints how much they leave). Intervals are 95%, over traces (a trace's tokens are not
//! independent): the ratio estimator's delta-method standard error.

use std::path::PathBuf;

use candle_core::{DType, Device};
use serde::Serialize;

use crate::label::SoftLabels;
use crate::model::load::BaseModel;
use crate::model::lora;
use crate::model::ForwardOptions;
use crate::train::data::{self, ChatRenderer, Encoder};
use crate::train::kd::{Divergence, KdSpec};
use crate::train::loss::{chunked_objective, KdTerm};
use crate::train::teacher::{OnlineTeacher, TeacherSignals};
use crate::train::TrainError;

/// What to measure.
#[derive(Debug, Clone)]
pub struct DistanceConfig {
    /// Student base model (Hugging Face directory or GGUF).
    pub model: PathBuf,
    /// Its adapter.
    pub adapter: Option<PathBuf>,
    /// Held-out traces.
    pub traces: PathBuf,
    /// Soft labels of those traces (`distill label`).
    pub labels: Option<PathBuf>,
    /// Or a teacher to score them.
    pub teacher: Option<PathBuf>,
    /// Top entries per position for a live teacher.
    pub top_k: usize,
    /// Chat template replacing the student's.
    pub chat_template: Option<PathBuf>,
    /// Longest sample; longer traces are skipped.
    pub max_len: usize,
}

/// A mean with its 95% interval.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Estimate {
    /// Token-weighted mean.
    pub mean: f64,
    /// Lower bound.
    pub lo: f64,
    /// Upper bound.
    pub hi: f64,
}

/// The measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Distance {
    /// Traces measured.
    pub traces: usize,
    /// Supervised tokens measured.
    pub tokens: usize,
    /// `KL(teacher ‖ student)` per token, nats (top-k + tail bucket).
    pub kl: Estimate,
    /// Cross-entropy per token, nats.
    pub ce: Estimate,
    /// `exp(ce)`, with the interval's bounds mapped likewise.
    pub perplexity: Estimate,
    /// The teacher's entries per position.
    pub top_k: usize,
}

impl std::fmt::Display for Distance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KL(teacher ‖ student) {:.4} nats/token [{:.4}, {:.4}], perplexity {:.3} [{:.3}, \
             {:.3}] on {} tokens of {} traces (teacher top-{} + tail)",
            self.kl.mean,
            self.kl.lo,
            self.kl.hi,
            self.perplexity.mean,
            self.perplexity.lo,
            self.perplexity.hi,
            self.tokens,
            self.traces,
            self.top_k
        )
    }
}

/// The ratio `Σ x / Σ n` over clusters with its delta-method 95% interval.
pub fn ratio_estimate(sums: &[f64], counts: &[usize]) -> Estimate {
    let m = sums.len();
    let n: f64 = counts.iter().map(|&c| c as f64).sum();
    let mean = sums.iter().sum::<f64>() / n.max(1.0);
    if m < 2 {
        return Estimate {
            mean,
            lo: mean,
            hi: mean,
        };
    }
    let nbar = n / m as f64;
    let ss: f64 = sums
        .iter()
        .zip(counts)
        .map(|(x, &c)| ((x - mean * c as f64) / nbar).powi(2))
        .sum();
    let se = (ss / (m as f64 * (m as f64 - 1.0))).sqrt();
    Estimate {
        mean,
        lo: mean - 1.96 * se,
        hi: mean + 1.96 * se,
    }
}

/// Measures the student of `cfg` against the teacher's labels (or a live teacher).
pub fn distance(cfg: &DistanceConfig) -> Result<Distance, TrainError> {
    let device = Device::Cpu;
    let mut base = BaseModel::load(&cfg.model, &device)?;
    let adapter = match &cfg.adapter {
        Some(dir) => {
            let t = dir.join("chat_template.jinja");
            if t.is_file() && cfg.chat_template.is_none() {
                let text = std::fs::read_to_string(&t).map_err(|e| TrainError::io(&t, e))?;
                base.tokenizer.set_chat_template(text);
            }
            Some(lora::load_adapter(dir, &device)?)
        }
        None => None,
    };
    let model = base.student(
        adapter.as_ref().map(|(c, v)| (v, c.clone())),
        DType::F32,
        &device,
    )?;
    let renderer = ChatRenderer::new(base.tokenizer.clone(), cfg.chat_template.as_deref())?;
    let encoder = Encoder::new(renderer, None)?;
    let traces = crate::trace::read_traces(&cfg.traces)?;
    let mut samples = Vec::new();
    for t in &traces {
        samples.extend(crate::label::encode_supervised(&encoder, t, cfg.max_len)?);
    }
    if samples.is_empty() {
        return Err(TrainError::Data(format!(
            "{}: no trace with an answer to measure",
            cfg.traces.display()
        )));
    }
    let student_vocab = base.tokenizer.fingerprint();
    let rows = model.lm_head().dim(0)?;
    let (labels, online, top_k) = match (&cfg.labels, &cfg.teacher) {
        (Some(dir), _) => {
            let l = SoftLabels::open(dir).map_err(|e| TrainError::Data(e.to_string()))?;
            l.check_vocabulary(&student_vocab, rows)
                .map_err(|e| TrainError::Data(e.to_string()))?;
            let k = l.meta().k;
            (Some(l), None, k)
        }
        (None, Some(t)) => {
            let teacher = OnlineTeacher::load(t, None, cfg.top_k)?;
            teacher.check_vocabulary(&base.tokenizer, "teacher")?;
            (None, Some(teacher), cfg.top_k)
        }
        (None, None) => {
            return Err(TrainError::Config {
                field: "teacher".into(),
                msg: "measuring the KL needs soft labels or a teacher".into(),
            })
        }
    };
    let signals = TeacherSignals {
        labels,
        online,
        want_soft: true,
        pairs: Vec::new(),
        projections: Vec::new(),
    };
    let spec = KdSpec {
        divergence: Divergence::Forward,
        beta: 0.0,
        temperature: 1.0,
    };
    let pad_id = base
        .tokenizer
        .eos_token()
        .and_then(|t| base.tokenizer.token_id(t))
        .unwrap_or(0);
    let (mut kl, mut ce, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples.len() {
        let plan = vec![vec![i]];
        let mut batch = data::collate(&samples, &plan, pad_id, &device)?;
        signals.attach(&samples, &plan, &mut batch, rows, &device)?;
        let out = model.forward(&batch.input_ids, &batch.packing, &ForwardOptions::default())?;
        let soft = batch
            .soft
            .as_ref()
            .ok_or_else(|| TrainError::Data("no soft labels attached".into()))?;
        let sums = chunked_objective(
            model.kernels(),
            model.lm_head(),
            &out.hidden,
            &batch.target_rows,
            &batch.targets,
            512,
            None,
            Some(KdTerm {
                soft,
                spec,
                grad_scale: 0.0,
            }),
        )?;
        kl.push(sums.kd);
        ce.push(sums.ce);
        counts.push(batch.n_supervised);
    }
    let ce_est = ratio_estimate(&ce, &counts);
    Ok(Distance {
        traces: samples.len(),
        tokens: counts.iter().sum(),
        kl: ratio_estimate(&kl, &counts),
        ce: ce_est,
        perplexity: Estimate {
            mean: ce_est.mean.exp(),
            lo: ce_est.lo.exp(),
            hi: ce_est.hi.exp(),
        },
        top_k,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_estimate_weights_by_tokens() {
        let e = ratio_estimate(&[2.0, 6.0], &[2, 2]);
        assert!((e.mean - 2.0).abs() < 1e-12);
        assert!(e.lo < 2.0 && e.hi > 2.0);
        let same = ratio_estimate(&[1.0, 3.0], &[1, 3]);
        assert!((same.mean - 1.0).abs() < 1e-12 && (same.hi - same.lo).abs() < 1e-12);
    }
}
