//! The teacher's signals for a training batch: soft labels at every supervised token, read from
//! a label directory (offline, `distill label`) or computed by a live teacher in the loop
//! (online), and the teacher's hidden states at mapped layers (online only: stored states would
//! take `hidden × 4` bytes per token and layer).
//!
//! Both sources fill the same [`SoftRows`], in the order of the batch's targets, so the loss
//! cannot tell them apart beyond the stored labels' quantisation (1/2048 nat).

use std::path::Path;

use candle_core::{Device, Tensor};

use super::data::{Batch, FeatureTarget, Sample};
use super::kd::SoftRows;
use super::TrainError;
use crate::infer::{BatchConfig, Engine, ScoreRequest};
use crate::label::SoftLabels;
use crate::model::tokenizer::ChatTokenizer;

/// A teacher loaded in the training process.
pub struct OnlineTeacher {
    engine: Engine,
    top_k: usize,
    batch: BatchConfig,
}

impl std::fmt::Debug for OnlineTeacher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnlineTeacher")
            .field("source", &self.engine.source())
            .field("top_k", &self.top_k)
            .finish()
    }
}

impl OnlineTeacher {
    /// Loads the teacher (plus an optional adapter) into the batched engine.
    pub fn load(model: &Path, adapter: Option<&Path>, top_k: usize) -> Result<Self, TrainError> {
        let engine = Engine::load(model, adapter).map_err(|e| TrainError::Config {
            field: "loss.teacher".into(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            engine,
            top_k: top_k.max(1),
            batch: BatchConfig {
                max_step_tokens: 2048,
                ..BatchConfig::default()
            },
        })
    }

    /// The teacher's tokenizer.
    pub fn tokenizer(&self) -> &ChatTokenizer {
        self.engine.tokenizer()
    }

    /// Decoder layers of the teacher.
    pub fn layers(&self) -> usize {
        self.engine.weights().dims().layers
    }

    /// Hidden size of the teacher.
    pub fn hidden(&self) -> usize {
        self.engine.weights().dims().hidden
    }

    /// Refuses a student whose vocabulary is not the teacher's, saying what differs (down to
    /// the first id whose string differs). `field` names the setting in the error.
    pub fn check_vocabulary(&self, student: &ChatTokenizer, field: &str) -> Result<(), TrainError> {
        let teacher = self.tokenizer();
        let (tv, sv) = (teacher.vocabulary(), student.vocabulary());
        match teacher
            .fingerprint()
            .difference(&student.fingerprint(), Some((&tv, &sv)))
        {
            None => Ok(()),
            Some(d) => Err(TrainError::Config {
                field: field.into(),
                msg: format!(
                    "{}: the teacher's vocabulary is not the student's: {d}; distillation \
                     needs one tokenizer",
                    self.engine.source().display()
                ),
            }),
        }
    }
}

/// Where the teacher's signals come from, and which are wanted.
#[derive(Debug)]
pub struct TeacherSignals {
    /// Stored soft labels (take precedence over the online teacher for the soft labels).
    pub labels: Option<SoftLabels>,
    /// A live teacher.
    pub online: Option<OnlineTeacher>,
    /// Whether the objective distils the response (soft labels needed).
    pub want_soft: bool,
    /// `(student layer, teacher layer)` pairs for feature matching.
    pub pairs: Vec<(usize, usize)>,
    /// Per pair, a learned `(teacher hidden, student hidden)` map of the student's states to
    /// the teacher's width, when the widths differ (empty otherwise).
    pub projections: Vec<candle_core::Var>,
}

impl TeacherSignals {
    /// Fills `batch.soft` and `batch.features` for the batch planned as `plan` over `samples`.
    /// `vocab` is the student's number of output rows.
    pub fn attach(
        &self,
        samples: &[Sample],
        plan: &[Vec<usize>],
        batch: &mut Batch,
        vocab: usize,
        device: &Device,
    ) -> Result<(), TrainError> {
        let order: Vec<&Sample> = plan
            .iter()
            .flatten()
            .map(|&i| {
                samples
                    .get(i)
                    .ok_or_else(|| TrainError::Data(format!("batch refers to sample {i}")))
            })
            .collect::<Result<_, _>>()?;
        let soft_from_labels = self.want_soft && self.labels.is_some();
        let need_online = (self.want_soft && !soft_from_labels) || !self.pairs.is_empty();
        if let (true, Some(labels)) = (soft_from_labels, &self.labels) {
            let mut rows = SoftRows::new(labels.meta().k);
            for s in &order {
                labels
                    .append_rows(s, &mut rows, vocab)
                    .map_err(|e| TrainError::Data(e.to_string()))?;
            }
            batch.soft = Some(rows);
        }
        if !need_online {
            return Ok(());
        }
        let Some(online) = &self.online else {
            return Err(TrainError::Config {
                field: "loss.teacher".into(),
                msg: "the objective needs a live teacher (feature matching or online soft \
                      labels) but none is configured"
                    .into(),
            });
        };
        let teacher_layers: Vec<usize> = self.pairs.iter().map(|p| p.1).collect();
        let requests = order
            .iter()
            .map(|s| ScoreRequest {
                tokens: s.ids.clone(),
                top_k: online.top_k,
            })
            .collect();
        let scored = online
            .engine
            .score(requests, &teacher_layers, online.batch)?;
        let h = online.hidden();
        let mut rows = SoftRows::new(online.top_k);
        let mut feats: Vec<Vec<f32>> = vec![Vec::new(); self.pairs.len()];
        for (s, sc) in order.iter().zip(&scored) {
            if let Some(e) = &sc.error {
                return Err(TrainError::Data(format!(
                    "teacher could not score trace `{}`: {e}",
                    s.trace_id
                )));
            }
            for p in 1..s.len() {
                if !s.mask[p] {
                    continue;
                }
                if self.want_soft && !soft_from_labels {
                    let sp = &sc.positions[p - 1];
                    rows.push(sp.top.iter().copied(), Some(sp.tail_mass().ln()));
                }
                for (f, states) in feats.iter_mut().zip(&sc.hidden) {
                    f.extend_from_slice(&states[(p - 1) * h..p * h]);
                }
            }
        }
        if self.want_soft && !soft_from_labels {
            if let Some(bad) = rows.ids.iter().find(|&&x| x as usize >= vocab) {
                return Err(TrainError::Data(format!(
                    "teacher token {bad} is outside the student's {vocab} rows"
                )));
            }
            batch.soft = Some(rows);
        }
        let n = batch.n_supervised;
        batch.features = self
            .pairs
            .iter()
            .zip(feats)
            .enumerate()
            .map(|(i, (&(layer, _), f))| {
                Ok(FeatureTarget {
                    layer,
                    teacher: Tensor::from_vec(f, (n, h), device)?,
                    projection: self.projections.get(i).map(|v| v.as_tensor().clone()),
                })
            })
            .collect::<Result<_, TrainError>>()?;
        Ok(())
    }
}
