//! The LoRA SFT recipe, meant to be read top to bottom.
//!
//! ```text
//! Recipe::new(cfg)        validate the configuration (no file touched yet)
//! Recipe::setup()         model → tokenizer → data → optimizer → schedule, then
//!                         load_checkpoint() when resuming, then the preflight check
//! Recipe::train()         the loop: micro-batches → loss → backward → clip → AdamW step,
//!                         metrics.jsonl, validation every `eval_every`, checkpoints every
//!                         `save_every`, final PEFT adapter export
//! Recipe::save_checkpoint()  adapter + optimizer moments + data position + config, written
//!                         to a temporary directory and renamed into place
//! ```
//!
//! Every random choice derives from `seed`: the adapter initialisation, the validation split
//! and the data order of each epoch (a pure function of seed and epoch). The data position is
//! an (epoch, batch) cursor, so a checkpoint holds all the state needed to continue a run
//! exactly as if it had never stopped.

use super::config::{Resume, TrainConfig, TrainOverrides};
use super::data::{self, BatchPlan, DataStats, Dataset, Encoder};
use super::kd::{uniform_layer_pairs, KdSpec};
use super::loss::{compute_loss, LossSpec, LossTerm};
use super::optim::{AdamW, AdamWParams, GradAccumulator, Schedule};
use super::teacher::{OnlineTeacher, TeacherSignals};
use super::TrainError;
use crate::model::load::BaseModel;
use crate::model::lora::{self, LoraConfig};
use crate::model::{ForwardOptions, Student};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Salt mixed into the seed for the adapter initialisation.
const INIT_SALT: u64 = 0x1a17_a5ee_d000_0001;
/// Salt mixed into the seed for the feature projections' initialisation.
const PROJECTION_SALT: u64 = 0x9a0f_ec71_0a5e_ed02;
/// Checkpoint file of the feature projections (not part of the exported adapter).
const PROJECTION_FILE: &str = "feature_projections.safetensors";
/// Checkpoint file of the decoder layers' weights under full-parameter training.
const LAYERS_FILE: &str = "layers.safetensors";

/// Name of feature projection `i` among the trained variables.
fn projection_name(i: usize) -> String {
    format!("feature_projection.{i}.weight")
}
/// Layout version of `trainer_state.json`.
const STATE_VERSION: u32 = 1;
/// Files of a checkpoint directory (besides the PEFT adapter files).
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "trainer_state.json";
const CONFIG_FILE: &str = "config.toml";
/// Metrics file in the output directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer step (1-based).
    pub step: usize,
    /// Epoch the step's last micro-batch came from (0-based).
    pub epoch: usize,
    /// Token-mean cross-entropy over the step's micro-batches.
    pub loss: f64,
    /// Learning rate used for the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real (non-padding) tokens processed in the step.
    pub tokens: usize,
    /// Supervised tokens in the step.
    pub supervised: usize,
    /// Tokens per second over the step.
    pub tokens_per_s: f64,
    /// Validation loss, on steps where it was computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Token-mean cross-entropy of the step, when the objective is not cross-entropy alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ce: Option<f64>,
    /// Token-mean `T² · D` to the teacher, when distilling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kd: Option<f64>,
    /// Token-mean feature loss, when matching features.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<f64>,
    /// Validation `T² · D` to the teacher, when distilling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_kd: Option<f64>,
}

/// Summary of a finished run.
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// Last optimizer step reached.
    pub steps: usize,
    /// Steps the schedule spans.
    pub total_steps: usize,
    /// Step this run resumed from, if any.
    pub resumed_from: Option<usize>,
    /// Configuration fields that differ from the checkpoint's (empty unless resumed).
    pub config_changes: Vec<String>,
    /// Metrics of every step run in this invocation.
    pub history: Vec<StepMetrics>,
    /// Final validation loss, when there is a validation split.
    pub val_loss: Option<f64>,
    /// Final validation `T² · D` to the teacher, when distilling.
    pub val_kd: Option<f64>,
    /// Real tokens processed in this invocation.
    pub tokens: usize,
    /// Wall time of the training loop in seconds.
    pub elapsed_s: f64,
    /// Mean throughput of this invocation.
    pub tokens_per_s: f64,
    /// What happened to the traces.
    pub data: DataStats,
    /// The preflight example (supervised text in `[[...]]`).
    pub preflight_example: String,
    /// Where the PEFT adapter (with `full_finetune`, the whole model) was written: the output
    /// directory, when the run completed.
    pub adapter_dir: Option<PathBuf>,
    /// The newest checkpoint written.
    pub last_checkpoint: Option<PathBuf>,
}

/// Position in the data stream, saved in checkpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Epoch (0-based).
    pub epoch: usize,
    /// Next batch of that epoch's plan.
    pub batch: usize,
}

/// `trainer_state.json` of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Layout version.
    pub version: u32,
    /// Optimizer steps completed.
    pub step: usize,
    /// Data position after that step.
    pub cursor: Cursor,
    /// Seed of the run: data order, initialisation and dropout masks (per step and
    /// micro-batch) all derive from it, so it is the whole RNG state.
    pub seed: u64,
    /// Real tokens processed up to this step.
    pub tokens_seen: u64,
    /// Loss of the step.
    pub loss: Option<f64>,
}

/// Everything `setup` builds.
struct Session {
    model: Student,
    varmap: VarMap,
    lora: LoraConfig,
    encoder: Encoder,
    data: Dataset,
    pad_id: u32,
    optimizer: AdamW,
    schedule: Schedule,
    loss: LossSpec,
    teacher: Option<TeacherSignals>,
    output_layers: Vec<usize>,
    cursor: Cursor,
    plan: (usize, BatchPlan),
    step: usize,
    tokens_seen: u64,
    last_loss: Option<f64>,
    resumed_from: Option<usize>,
    config_changes: Vec<String>,
    last_checkpoint: Option<PathBuf>,
    preflight_example: String,
}

/// The LoRA SFT recipe: see the module documentation for the order of calls.
pub struct Recipe {
    cfg: TrainConfig,
    resume: Option<Resume>,
    stop_after: Option<usize>,
    quiet: bool,
    device: Device,
    dtype: DType,
    session: Option<Session>,
}

impl Recipe {
    /// Validates the configuration; nothing is loaded yet.
    pub fn new(cfg: TrainConfig, overrides: &TrainOverrides) -> Result<Self, TrainError> {
        cfg.validate()?;
        Ok(Self {
            device: cfg.device()?,
            dtype: cfg.dtype.dtype(),
            resume: overrides.resume.clone(),
            stop_after: overrides.stop_after,
            quiet: overrides.quiet,
            cfg,
            session: None,
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    fn say(&self, msg: &str) {
        tracing::info!("{msg}");
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    fn warn(&self, msg: &str) {
        tracing::warn!("{msg}");
        if !self.quiet {
            eprintln!("warning: {msg}");
        }
    }

    /// Loads model, tokenizer and data, builds the optimizer and schedule, restores a
    /// checkpoint when resuming, and runs the preflight check.
    pub fn setup(&mut self) -> Result<(), TrainError> {
        let cfg = self.cfg.clone();

        // Model: frozen base weights + adapters, initialised from the seed (PEFT's init:
        // A Kaiming-uniform, B zero).
        let base = BaseModel::load(&cfg.model, &self.device)?;
        let base_name = cfg
            .base_model_name
            .clone()
            .unwrap_or_else(|| cfg.model.display().to_string());
        let lora = cfg.lora.to_lora_config(&base_name);
        let varmap = VarMap::new();
        let (model, vars) = if cfg.full_finetune {
            // Full-parameter training: the layers' own weights are the variables.
            let mut model = base.student(None, self.dtype, &self.device)?;
            let vars = model.train_layers()?;
            let params: usize = vars.values().map(|v| v.elem_count()).sum();
            self.say(&format!(
                "full-parameter training of {} decoder layers: {} tensors, {:.1}M parameters \
                 (embeddings, final norm and output projection frozen)",
                base.config.num_hidden_layers,
                vars.len(),
                params as f64 / 1e6
            ));
            (model, vars)
        } else {
            let model = base.student(Some((&varmap, lora.clone())), self.dtype, &self.device)?;
            let vars = named_vars(&varmap)?;
            init_adapters(&vars, cfg.seed)?;
            (model, vars)
        };

        // Tokenizer and data.
        let renderer =
            data::ChatRenderer::new(base.tokenizer.clone(), cfg.chat_template.as_deref())?;
        let encoder = Encoder::new(renderer, cfg.eot_token.as_deref())?;
        let traces = crate::trace::read_traces(&cfg.data)?;
        let dataset = data::build_dataset(
            &traces,
            &encoder,
            cfg.max_len,
            cfg.val_fraction,
            cfg.val_count,
            cfg.seed,
        )?;
        let tok = base.tokenizer.clone();
        let pad_id = tok.eos_token().and_then(|t| tok.token_id(t)).unwrap_or(0);

        // The objective, and the teacher's signals it needs; projections of student states to
        // the teacher's width train with the adapter.
        let (loss, teacher, output_layers) = self.objective(&base, &dataset)?;
        let mut vars = vars;
        if let Some(t) = &teacher {
            for (i, p) in t.projections.iter().enumerate() {
                vars.insert(projection_name(i), p.clone());
            }
        }

        // Optimizer and schedule.
        let optimizer = AdamW::new(
            vars,
            AdamWParams {
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
            },
        )?;
        let lengths: Vec<usize> = dataset.train.iter().map(data::Sample::len).collect();
        let plan_of = |epoch| {
            data::plan_epoch(
                &lengths,
                cfg.batch_size,
                cfg.max_len,
                cfg.packing,
                cfg.bucket_window,
                cfg.seed,
                epoch,
            )
        };
        let total_steps = match cfg.max_steps {
            Some(s) => s,
            None => {
                let micro: usize = (0..cfg.epochs).map(|e| plan_of(e).len()).sum();
                micro.div_ceil(cfg.grad_accum)
            }
        };
        let schedule = Schedule {
            peak: cfg.lr,
            warmup: cfg.warmup_steps,
            total: total_steps,
            min_ratio: cfg.min_lr_ratio,
        };
        let first_plan = plan_of(0);
        let preflight = data::preflight(&encoder, &dataset.train, &first_plan)?;

        self.session = Some(Session {
            model,
            varmap,
            lora,
            encoder,
            data: dataset,
            pad_id,
            optimizer,
            schedule,
            loss,
            teacher,
            output_layers,
            cursor: Cursor::default(),
            plan: (0, first_plan),
            step: 0,
            tokens_seen: 0,
            last_loss: None,
            resumed_from: None,
            config_changes: vec![],
            last_checkpoint: None,
            preflight_example: preflight.example.clone(),
        });

        // Resume.
        let ckpt = match &self.resume {
            None => None,
            Some(Resume::From(dir)) => Some(dir.clone()),
            Some(Resume::Latest) => latest_checkpoint(&cfg.out_dir)?,
        };
        if let Some(dir) = ckpt {
            self.load_checkpoint(&dir)?;
        } else {
            if self.resume == Some(Resume::Latest) {
                self.say("no checkpoint to resume from; starting fresh");
            } else if !list_checkpoints(&cfg.out_dir)?.is_empty() {
                self.warn(&format!(
                    "{} holds checkpoints of an earlier run; starting fresh (they are \
                     overwritten as this run reaches their steps; pass --resume to continue)",
                    cfg.out_dir.display()
                ));
            }
            truncate_metrics(&cfg.out_dir.join(METRICS_FILE), 0)?;
        }

        let s = self.session()?;
        let st = &s.data.stats;
        let mut example = preflight.example;
        if example.chars().count() > 4000 {
            example = example.chars().take(4000).collect::<String>() + " …";
        }
        self.say(&format!(
            "preflight: {} traces → {} train / {} val samples ({} failed skipped, {} longer than \
             max_len {} dropped, {} with EOS appended, {} with a merged prompt/answer \
             token); {} train tokens, {} supervised; \
             {} batches per epoch, {} optimizer steps; end-of-turn supervised in {}/{} samples\n\
             --- example (supervised tokens in [[...]]) ---\n{example}\n---",
            st.traces,
            st.train,
            st.val,
            st.skipped_failed,
            st.dropped_too_long,
            cfg.max_len,
            st.eos_appended,
            st.boundary_merged,
            st.train_tokens,
            st.train_supervised,
            preflight.batches,
            total_steps,
            preflight.eos_supervised,
            st.train,
        ));
        Ok(())
    }

    /// The loss terms of `[loss]`, the teacher's signals they need (soft labels checked against
    /// the student's vocabulary and every training trace; a live teacher loaded), and the
    /// student layers whose outputs the forward pass must return.
    #[allow(clippy::type_complexity)]
    fn objective(
        &self,
        base: &BaseModel,
        dataset: &Dataset,
    ) -> Result<(LossSpec, Option<TeacherSignals>, Vec<usize>), TrainError> {
        let cfg = &self.cfg;
        let l = &cfg.loss;
        let spec = KdSpec {
            divergence: l.divergence,
            beta: l.beta,
            temperature: l.temperature,
        };
        let mut terms = Vec::new();
        match l.kind {
            super::config::LossKind::Ce => {
                terms.push(LossTerm::CrossEntropy { weight: 1.0 });
            }
            super::config::LossKind::Kd => terms.push(LossTerm::Distill { weight: 1.0, spec }),
            super::config::LossKind::CeKd => {
                terms.push(LossTerm::CrossEntropy { weight: l.alpha });
                terms.push(LossTerm::Distill {
                    weight: 1.0 - l.alpha,
                    spec,
                });
            }
        }
        if l.features() {
            terms.push(LossTerm::Features {
                weight: l.feature_weight,
                loss: l.feature_loss,
            });
        }
        let loss = LossSpec {
            terms,
            chunk: cfg.loss_chunk.max(1),
        };
        if !l.distils() && !l.features() {
            return Ok((loss, None, Vec::new()));
        }
        let student_vocab = base.tokenizer.fingerprint();
        let student_rows = base.config.vocab_size;
        let labels = match (&l.soft_labels, l.distils()) {
            (Some(dir), true) => {
                let labels = crate::label::SoftLabels::open(dir)
                    .map_err(|e| TrainError::Data(e.to_string()))?;
                labels
                    .check_vocabulary(&student_vocab, student_rows)
                    .map_err(|e| TrainError::Data(e.to_string()))?;
                // Every trace must have its labels, for exactly its tokens: fail now, not at
                // the step that meets the first one missing.
                let mut probe = super::kd::SoftRows::new(labels.meta().k);
                for s in dataset.train.iter().chain(&dataset.val) {
                    labels
                        .append_rows(s, &mut probe, student_rows)
                        .map_err(|e| TrainError::Data(e.to_string()))?;
                    probe = super::kd::SoftRows::new(labels.meta().k);
                }
                self.say(&format!(
                    "soft labels: {} (teacher {}, top-{}, {} traces, {:.0} bytes/token)",
                    dir.display(),
                    labels.meta().teacher,
                    labels.meta().k,
                    labels.len(),
                    labels.meta().bytes_per_token
                ));
                Some(labels)
            }
            _ => None,
        };
        let online = match &l.teacher {
            Some(path) if l.features() || labels.is_none() => {
                let t = OnlineTeacher::load(path, l.teacher_adapter.as_deref(), l.top_k)?;
                t.check_vocabulary(&base.tokenizer, "loss.teacher")?;
                self.say(&format!(
                    "online teacher: {} ({} layers, hidden {})",
                    path.display(),
                    t.layers(),
                    t.hidden()
                ));
                Some(t)
            }
            _ => None,
        };
        let n_student = base.config.num_hidden_layers;
        let pairs: Vec<(usize, usize)> = match &online {
            Some(t) if l.features() => {
                let pairs: Vec<(usize, usize)> = if l.feature_pairs.is_empty() {
                    uniform_layer_pairs(n_student, t.layers(), l.feature_layers)
                } else {
                    l.feature_pairs.iter().map(|p| (p[0], p[1])).collect()
                };
                for &(sl, tl) in &pairs {
                    if sl >= n_student || tl >= t.layers() {
                        return Err(TrainError::Config {
                            field: "loss.feature_pairs".into(),
                            msg: format!(
                                "pair [{sl}, {tl}]: the student has {n_student} layers, the \
                                 teacher {}",
                                t.layers()
                            ),
                        });
                    }
                }
                self.say(&format!(
                    "feature matching ({:?}) on student→teacher layers {pairs:?}{}",
                    l.feature_loss,
                    if t.hidden() != base.config.hidden_size {
                        format!(
                            ", through learned {}→{} projections (dropped at export)",
                            base.config.hidden_size,
                            t.hidden()
                        )
                    } else {
                        String::new()
                    }
                ));
                pairs
            }
            _ => Vec::new(),
        };
        let output_layers = pairs.iter().map(|p| p.0).collect();
        // A student narrower or wider than the teacher maps its states to the teacher's width
        // with one learned matrix per pair (initialised like LoRA's A, from the seed).
        let (hs, ht) = (
            base.config.hidden_size,
            online
                .as_ref()
                .map_or(base.config.hidden_size, |t| t.hidden()),
        );
        let mut projections = Vec::new();
        if hs != ht {
            let mut rng = StdRng::seed_from_u64(cfg.seed ^ PROJECTION_SALT);
            let bound = 1.0 / (hs as f32).sqrt();
            for _ in &pairs {
                let values: Vec<f32> = (0..ht * hs)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                projections.push(Var::from_tensor(&Tensor::from_vec(
                    values,
                    (ht, hs),
                    &self.device,
                )?)?);
            }
        }
        let signals = TeacherSignals {
            labels,
            online,
            want_soft: l.distils(),
            pairs,
            projections,
        };
        Ok((loss, Some(signals), output_layers))
    }

    fn session(&self) -> Result<&Session, TrainError> {
        self.session.as_ref().ok_or_else(|| TrainError::Config {
            field: "recipe".into(),
            msg: "setup() must run before train()".into(),
        })
    }

    /// Restores adapter, optimizer moments and data position from a checkpoint directory, and
    /// warns about configuration fields that differ from the checkpoint's.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<(), TrainError> {
        let ck_err = |msg: String| TrainError::Checkpoint {
            path: dir.to_path_buf(),
            msg,
        };
        let state_path = dir.join(STATE_FILE);
        let text =
            std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| ck_err(format!("{STATE_FILE}: {e}")))?;
        if state.version != STATE_VERSION {
            return Err(ck_err(format!(
                "{STATE_FILE} version {} (expected {STATE_VERSION})",
                state.version
            )));
        }
        let saved_cfg = TrainConfig::from_file(&dir.join(CONFIG_FILE))?;
        let changes = saved_cfg.diff(&self.cfg);
        if !changes.is_empty() {
            self.warn(&format!(
                "resuming from {} with a different configuration: {} changed",
                dir.display(),
                changes.join(", ")
            ));
        }
        let device = self.device.clone();
        let s = self
            .session
            .as_mut()
            .ok_or_else(|| ck_err("setup() not run".into()))?;
        let weights_file = if self.cfg.full_finetune {
            LAYERS_FILE
        } else {
            lora::ADAPTER_WEIGHTS_FILE
        };
        let mut tensors = candle_core::safetensors::load(dir.join(weights_file), &device)
            .map_err(|e| ck_err(format!("{weights_file}: {e}")))?;
        let p_path = dir.join(PROJECTION_FILE);
        if p_path.is_file() {
            tensors.extend(
                candle_core::safetensors::load(&p_path, &device)
                    .map_err(|e| ck_err(format!("{PROJECTION_FILE}: {e}")))?,
            );
        }
        for (name, var) in s.optimizer.vars() {
            let t = tensors
                .get(name)
                .ok_or_else(|| ck_err(format!("{weights_file}: tensor `{name}` missing")))?;
            if t.dims() != var.dims() {
                return Err(ck_err(format!(
                    "{weights_file}: tensor `{name}` has shape {:?}, the model {:?} \
                     (different lora.r or model?)",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        s.optimizer.load(&dir.join(OPTIMIZER_FILE), &device)?;
        if s.optimizer.step_count() != state.step {
            return Err(ck_err(format!(
                "optimizer step {} != trainer step {}",
                s.optimizer.step_count(),
                state.step
            )));
        }
        s.step = state.step;
        s.cursor = state.cursor;
        s.tokens_seen = state.tokens_seen;
        s.last_loss = state.loss;
        s.resumed_from = Some(state.step);
        s.config_changes = changes;
        s.last_checkpoint = Some(dir.to_path_buf());
        truncate_metrics(&self.cfg.out_dir.join(METRICS_FILE), state.step)?;
        self.say(&format!(
            "resumed from {} (step {}, epoch {}, batch {})",
            dir.display(),
            state.step,
            state.cursor.epoch,
            state.cursor.batch
        ));
        Ok(())
    }

    /// Runs the remaining optimizer steps, then writes the PEFT adapter to the output
    /// directory. Stops with [`TrainError::NonFinite`] (checkpoints untouched) when the loss or
    /// the gradient norm stops being finite.
    pub fn train(&mut self) -> Result<TrainReport, TrainError> {
        let cfg = self.cfg.clone();
        std::fs::create_dir_all(&cfg.out_dir).map_err(|e| TrainError::io(&cfg.out_dir, e))?;
        let metrics_path = cfg.out_dir.join(METRICS_FILE);
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| TrainError::io(&metrics_path, e))?;
        let (total, start_step) = {
            let s = self.session()?;
            (s.schedule.total, s.step)
        };
        let end = self.stop_after.map_or(total, |k| k.min(total));
        let bar = if self.quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let b = crate::progress::bar(total as u64, "steps");
            b.set_position(start_step as u64);
            b.reset_eta();
            b
        };
        let t0 = Instant::now();
        let mut history = Vec::new();
        let mut tokens_run = 0usize;
        let (mut val_loss, mut val_kd) = (None, None);
        let opts = ForwardOptions {
            train: true,
            output_layers: self.session()?.output_layers.clone(),
        };

        for step in start_step + 1..=end {
            let t_step = Instant::now();
            let s = self
                .session
                .as_mut()
                .ok_or_else(|| TrainError::Data("setup() not run".into()))?;
            let lr = s.schedule.lr(step);

            // The step's micro-batches, and their supervised-token count as the normaliser so
            // the accumulated gradient is that of the token-mean loss over the whole step.
            let mut plans = Vec::with_capacity(cfg.grad_accum);
            for _ in 0..cfg.grad_accum {
                plans.push(next_batch(s, &cfg)?);
            }
            let normaliser: usize = plans
                .iter()
                .map(|p| data::plan_supervised(&s.data.train, p))
                .sum();

            let mut accum = GradAccumulator::default();
            let (mut loss, mut tokens) = (0.0, 0usize);
            let (mut ce_sum, mut kd_sum, mut feature_sum) = (0.0, 0.0, 0.0);
            for (micro, plan) in plans.iter().enumerate() {
                // Dropout masks depend only on (seed, step, micro-batch): resume stays exact.
                crate::model::lora::seed_dropout(Some(
                    cfg.seed ^ ((step as u64) << 20) ^ (micro as u64) ^ 0x5EED_D80F,
                ));
                let mut batch = data::collate(&s.data.train, plan, s.pad_id, &self.device)?;
                if let Some(t) = &s.teacher {
                    let vocab = s.model.lm_head().dim(0)?;
                    t.attach(&s.data.train, plan, &mut batch, vocab, &self.device)?;
                }
                let out = s.model.forward(&batch.input_ids, &batch.packing, &opts)?;
                let l = compute_loss(&s.model, &out, &batch, &s.loss, normaliser as f64, true)?;
                if !l.value.is_finite() {
                    bar.abandon();
                    return Err(TrainError::NonFinite {
                        what: "loss".into(),
                        value: l.value,
                        step,
                        last_checkpoint: s.last_checkpoint.clone(),
                    });
                }
                loss += l.value;
                ce_sum += l.ce_sum;
                kd_sum += l.kd_sum;
                feature_sum += l.feature_sum;
                tokens += batch.n_tokens;
                if let Some(sur) = l.surrogate {
                    accum.add(s.optimizer.vars(), &sur.backward()?)?;
                }
            }
            let grad_norm = accum.clip(cfg.max_grad_norm)?;
            if !grad_norm.is_finite() {
                bar.abandon();
                return Err(TrainError::NonFinite {
                    what: "gradient norm".into(),
                    value: grad_norm,
                    step,
                    last_checkpoint: s.last_checkpoint.clone(),
                });
            }
            s.optimizer.step(&accum.take(), lr)?;
            s.step = step;
            s.tokens_seen += tokens as u64;
            s.last_loss = Some(loss);
            tokens_run += tokens;

            let dt = t_step.elapsed().as_secs_f64();
            let mut m = StepMetrics {
                step,
                epoch: s.cursor.epoch,
                loss,
                lr,
                grad_norm,
                tokens,
                supervised: normaliser,
                tokens_per_s: tokens as f64 / dt.max(1e-9),
                val_loss: None,
                ce: None,
                kd: None,
                feature: None,
                val_kd: None,
            };
            let per_token = |x: f64| Some(x / normaliser.max(1) as f64);
            if s.teacher.is_some() {
                m.ce = per_token(ce_sum);
                m.kd = per_token(kd_sum).filter(|_| cfg.loss.distils());
                m.feature = per_token(feature_sum).filter(|_| cfg.loss.features());
            }
            let eval_now = (cfg.eval_every > 0 && step % cfg.eval_every == 0) || step == total;
            if eval_now && !s.data.val.is_empty() {
                let (v, kd) = evaluate(s, &cfg, &self.device)?;
                m.val_loss = Some(v);
                val_loss = Some(v);
                if cfg.loss.distils() {
                    m.val_kd = Some(kd);
                    val_kd = Some(kd);
                }
            }
            let line = serde_json::to_string(&m).map_err(|e| TrainError::Data(e.to_string()))?;
            writeln!(metrics, "{line}").map_err(|e| TrainError::io(&metrics_path, e))?;
            bar.set_position(step as u64);
            bar.set_message(format!(
                "loss {loss:.4}{}{} | lr {lr:.2e} | {:.0} tok/s",
                m.kd.map(|v| format!(" (kd {v:.4})")).unwrap_or_default(),
                m.val_loss
                    .map(|v| format!(" val {v:.4}"))
                    .unwrap_or_default(),
                m.tokens_per_s
            ));
            history.push(m);

            if (cfg.save_every > 0 && step % cfg.save_every == 0) || Some(step) == self.stop_after {
                self.save_checkpoint()?;
            }
        }
        bar.finish();
        metrics
            .flush()
            .map_err(|e| TrainError::io(&metrics_path, e))?;

        let s = self.session()?;
        let finished = s.step >= total;
        let adapter_dir = if finished {
            if cfg.full_finetune {
                save_full_model(&cfg, &trained_layers(s), &cfg.out_dir)?;
            } else {
                lora::save_adapter(&cfg.out_dir, &s.varmap, &s.lora)?;
            }
            if let Some(t) = s.encoder.renderer().override_template() {
                let p = cfg.out_dir.join("chat_template.jinja");
                std::fs::write(&p, t).map_err(|e| TrainError::io(&p, e))?;
            }
            Some(cfg.out_dir.clone())
        } else {
            None
        };
        let elapsed_s = t0.elapsed().as_secs_f64();
        let report = TrainReport {
            steps: s.step,
            total_steps: total,
            resumed_from: s.resumed_from,
            config_changes: s.config_changes.clone(),
            val_loss,
            val_kd,
            tokens: tokens_run,
            elapsed_s,
            tokens_per_s: tokens_run as f64 / elapsed_s.max(1e-9),
            data: s.data.stats.clone(),
            preflight_example: s.preflight_example.clone(),
            adapter_dir,
            last_checkpoint: s.last_checkpoint.clone(),
            history,
        };
        let losses = match (report.history.first(), report.history.last()) {
            (Some(a), Some(b)) => format!("loss {:.4} → {:.4}", a.loss, b.loss),
            _ => "no step left to run".into(),
        };
        self.say(&format!(
            "{} step {}/{}: {losses}{}; {} tokens in {:.1}s ({:.0} tok/s){}",
            if finished { "done:" } else { "stopped at" },
            report.steps,
            total,
            report
                .val_loss
                .map(|v| format!(", val loss {v:.4}"))
                .unwrap_or_default()
                + &report
                    .val_kd
                    .map(|v| format!(" (val T²·D to the teacher {v:.4})"))
                    .unwrap_or_default(),
            report.tokens,
            report.elapsed_s,
            report.tokens_per_s,
            match &report.adapter_dir {
                Some(d) if cfg.full_finetune => format!("; model in {}", d.display()),
                Some(d) => format!("; adapter in {}", d.display()),
                None => String::new(),
            }
        ));
        Ok(report)
    }

    /// Writes `out/checkpoints/step-N/` (PEFT adapter, optimizer moments, trainer state,
    /// resolved config) through a temporary directory renamed into place, so a crash never
    /// leaves a half-written checkpoint; then prunes old checkpoints beyond
    /// `keep_checkpoints`.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let cfg_toml = self.cfg.to_toml()?;
        let root = self.cfg.out_dir.join("checkpoints");
        let keep = self.cfg.keep_checkpoints;
        let seed = self.cfg.seed;
        let full = self.cfg.full_finetune;
        let s = self
            .session
            .as_mut()
            .ok_or_else(|| TrainError::Data("setup() not run".into()))?;
        let final_dir = root.join(format!("step-{}", s.step));
        let tmp = root.join(format!(".tmp-step-{}-{}", s.step, std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        if full {
            lora::save_safetensors(&trained_layers(s), &tmp.join(LAYERS_FILE))?;
        } else {
            lora::save_adapter(&tmp, &s.varmap, &s.lora)?;
        }
        if let Some(t) = s.teacher.as_ref().filter(|t| !t.projections.is_empty()) {
            let tensors: std::collections::HashMap<String, Tensor> = t
                .projections
                .iter()
                .enumerate()
                .map(|(i, v)| (projection_name(i), v.as_tensor().clone()))
                .collect();
            lora::save_safetensors(&tensors, &tmp.join(PROJECTION_FILE))?;
        }
        s.optimizer.save(&tmp.join(OPTIMIZER_FILE))?;
        let state = TrainerState {
            version: STATE_VERSION,
            step: s.step,
            cursor: s.cursor,
            seed,
            tokens_seen: s.tokens_seen,
            loss: s.last_loss,
        };
        let state_json =
            serde_json::to_string_pretty(&state).map_err(|e| TrainError::Data(e.to_string()))?;
        write_synced(&tmp.join(STATE_FILE), state_json.as_bytes())?;
        write_synced(&tmp.join(CONFIG_FILE), cfg_toml.as_bytes())?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| TrainError::io(&final_dir, e))?;
        s.last_checkpoint = Some(final_dir.clone());
        if keep > 0 {
            let mut all = list_checkpoints(&self.cfg.out_dir)?;
            all.sort();
            let n = all.len();
            for (_, dir) in all.into_iter().take(n.saturating_sub(keep)) {
                std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
            }
        }
        Ok(final_dir)
    }

    /// The adapter variables by PEFT name (after `setup`).
    pub fn adapter_tensors(&self) -> Result<BTreeMap<String, Tensor>, TrainError> {
        let s = self.session()?;
        s.optimizer
            .vars()
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect()
    }
}

/// Next planned micro-batch, advancing the cursor (and the epoch when the plan is exhausted).
fn next_batch(s: &mut Session, cfg: &TrainConfig) -> Result<Vec<Vec<usize>>, TrainError> {
    loop {
        if s.plan.0 != s.cursor.epoch {
            let lengths: Vec<usize> = s.data.train.iter().map(data::Sample::len).collect();
            let plan = data::plan_epoch(
                &lengths,
                cfg.batch_size,
                cfg.max_len,
                cfg.packing,
                cfg.bucket_window,
                cfg.seed,
                s.cursor.epoch,
            );
            s.plan = (s.cursor.epoch, plan);
        }
        if let Some(b) = s.plan.1.get(s.cursor.batch) {
            s.cursor.batch += 1;
            return Ok(b.clone());
        }
        if s.cursor.batch == 0 {
            return Err(TrainError::Data(
                "the training split yields no batches".into(),
            ));
        }
        s.cursor = Cursor {
            epoch: s.cursor.epoch + 1,
            batch: 0,
        };
    }
}

/// Token-mean cross-entropy over the validation split (no dropout, no gradients).
/// The validation objective and its token-mean `T² · D` to the teacher (0 when not
/// distilling).
fn evaluate(s: &Session, cfg: &TrainConfig, device: &Device) -> Result<(f64, f64), TrainError> {
    let lengths: Vec<usize> = s.data.val.iter().map(data::Sample::len).collect();
    let plan = data::plan_eval(&lengths, cfg.batch_size);
    let total: usize = s.data.val.iter().map(data::Sample::n_supervised).sum();
    let (mut loss, mut kd) = (0.0, 0.0);
    let opts = ForwardOptions {
        train: false,
        output_layers: s.output_layers.clone(),
    };
    for batch in &plan {
        let mut b = data::collate(&s.data.val, batch, s.pad_id, device)?;
        if b.n_supervised == 0 {
            continue;
        }
        if let Some(t) = &s.teacher {
            let vocab = s.model.lm_head().dim(0)?;
            t.attach(&s.data.val, batch, &mut b, vocab, device)?;
        }
        let out = s.model.forward(&b.input_ids, &b.packing, &opts)?;
        let l = compute_loss(&s.model, &out, &b, &s.loss, total.max(1) as f64, false)?;
        loss += l.value;
        kd += l.kd_sum / total.max(1) as f64;
    }
    Ok((loss, kd))
}

/// The decoder layers' trained weights by checkpoint name (full-parameter training): every
/// optimizer variable but the feature projections.
fn trained_layers(s: &Session) -> std::collections::HashMap<String, Tensor> {
    s.optimizer
        .vars()
        .iter()
        .filter(|(name, _)| name.starts_with("model.layers."))
        .map(|(name, v)| (name.clone(), v.as_tensor().clone()))
        .collect()
}

/// Writes the student of `cfg.model` with its decoder layers replaced by `layers` as a
/// Hugging Face directory (`config.json`, `model.safetensors`, tokenizer) in `dir`, each
/// tensor in the dtype of the checkpoint it came from.
fn save_full_model(
    cfg: &TrainConfig,
    layers: &std::collections::HashMap<String, Tensor>,
    dir: &Path,
) -> Result<(), TrainError> {
    use crate::model::load::BaseWeights;
    let base = BaseModel::load(&cfg.model, &Device::Cpu)?;
    let mut tensors = base.tensors(&Device::Cpu)?;
    for (name, t) in layers {
        let old = tensors.get(name).ok_or_else(|| {
            TrainError::Data(format!(
                "{}: no tensor `{name}` to replace with the trained one",
                cfg.model.display()
            ))
        })?;
        let t = t.to_device(&Device::Cpu)?.to_dtype(old.dtype())?;
        tensors.insert(name.clone(), t);
    }
    let model = BaseModel {
        weights: BaseWeights::Tensors(tensors),
        ..base
    };
    model.save_merged(dir, None, None)?;
    Ok(())
}

/// The adapter `Var`s by PEFT name, in a fixed order.
fn named_vars(varmap: &VarMap) -> Result<BTreeMap<String, Var>, TrainError> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| TrainError::Data("adapter VarMap lock poisoned".into()))?;
    Ok(data.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// PEFT's initialisation from the run seed: `lora_A` uniform in `±1/sqrt(in)`, `lora_B` zero.
/// (The model creates A from candle's unseedable generator; this makes runs reproducible.)
fn init_adapters(vars: &BTreeMap<String, Var>, seed: u64) -> Result<(), TrainError> {
    let mut rng = StdRng::seed_from_u64(seed ^ INIT_SALT);
    for (name, var) in vars {
        let (rows, cols) = var.as_tensor().dims2()?;
        let values: Vec<f32> = if name.contains(".lora_A.") {
            let bound = 1.0 / (cols as f32).sqrt();
            (0..rows * cols)
                .map(|_| rng.random_range(-bound..bound))
                .collect()
        } else {
            vec![0.0; rows * cols]
        };
        let t = Tensor::from_vec(values, (rows, cols), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

/// `(step, dir)` of every `checkpoints/step-N` under `out_dir`.
pub fn list_checkpoints(out_dir: &Path) -> Result<Vec<(usize, PathBuf)>, TrainError> {
    let root = out_dir.join("checkpoints");
    if !root.exists() {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).map_err(|e| TrainError::io(&root, e))? {
        let entry = entry.map_err(|e| TrainError::io(&root, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("step-").and_then(|n| n.parse().ok()) {
            out.push((n, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint under `out_dir`, if any.
pub fn latest_checkpoint(out_dir: &Path) -> Result<Option<PathBuf>, TrainError> {
    Ok(list_checkpoints(out_dir)?.pop().map(|(_, p)| p))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let mut f = std::fs::File::create(path).map_err(|e| TrainError::io(path, e))?;
    f.write_all(bytes).map_err(|e| TrainError::io(path, e))?;
    f.sync_all().map_err(|e| TrainError::io(path, e))
}

/// Drops metric lines of steps after `step` (written by a run that went on past the checkpoint
/// being resumed), so `metrics.jsonl` reads as one uninterrupted run.
fn truncate_metrics(path: &Path, step: usize) -> Result<(), TrainError> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<StepMetrics>(l)
                .map(|m| m.step <= step)
                .unwrap_or(false)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_synced(path, kept.as_bytes())
}
