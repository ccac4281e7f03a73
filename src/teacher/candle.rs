//! Embedded teacher on this project's own batched engine ([`crate::infer`]).
//!
//! The engine runs on a thread of its own; the generate stage's concurrent requests are queued
//! to it and decoded together by continuous batching, so `--concurrency` is the number of
//! sequences decoded at once. Unlike the mistral.rs engine, a request's seed is honoured (the
//! same seed gives the same text whatever else is in the batch), log-probabilities are natural
//! logs of both the model's and the sampling distribution, and a LoRA adapter is applied.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::{GenFailure, GenOutput, GenRequest, Teacher};
use crate::infer::{
    BatchConfig, Completion, Engine, FinishReason as EngineFinish, Finished, InferError, Request,
    SamplingParams, Scheduler,
};
use crate::model::tokenizer::ChatMessage;
use crate::trace::{FinishReason, TeacherInfo, TokenLogprob, TraceError, Usage};

/// How to load the candle teacher.
#[derive(Debug, Clone)]
pub struct CandleConfig {
    /// A GGUF file or a Hugging Face model directory.
    pub model: PathBuf,
    /// A PEFT adapter directory (as `distill train` writes) folded into the weights.
    pub adapter: Option<PathBuf>,
    /// Chat template (a Jinja file, or the template itself) replacing the model's own.
    pub chat_template: Option<String>,
    /// How the engine holds its weights.
    pub weights: crate::infer::WeightFormat,
    /// Batching limits: sequences decoded together and the KV cache budget.
    pub batch: BatchConfig,
}

/// Errors starting the candle teacher.
#[derive(Debug, thiserror::Error)]
pub enum CandleError {
    /// The engine could not be built.
    #[error("{model}: {source}")]
    Engine {
        /// The model path.
        model: PathBuf,
        /// What failed.
        #[source]
        source: InferError,
    },
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

type Job = (Request, oneshot::Sender<Completion>);

/// The embedded teacher on the candle engine.
pub struct CandleTeacher {
    tx: mpsc::Sender<Job>,
    info: TeacherInfo,
    tokenizer: crate::model::tokenizer::ChatTokenizer,
    /// Sizes and memory of the loaded model, for the start-up line.
    pub description: String,
}

/// SHA-256 of an adapter: its config and weights files, the two files PEFT reads (a training
/// directory also holds metrics and checkpoints, which do not change what the adapter does).
pub fn adapter_sha256(dir: &Path) -> Result<String, CandleError> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let p = dir.join(name);
        let bytes = std::fs::read(&p).map_err(|source| CandleError::Io {
            path: p.clone(),
            source,
        })?;
        h.update(name.as_bytes());
        h.update(Sha256::digest(&bytes));
    }
    Ok(hex::encode(h.finalize()))
}

impl CandleTeacher {
    /// Loads the model (and adapter) and starts the engine thread.
    pub fn load(cfg: &CandleConfig) -> Result<Self, CandleError> {
        let err = |source| CandleError::Engine {
            model: cfg.model.clone(),
            source,
        };
        let mut engine = Engine::load(&cfg.model, cfg.adapter.as_deref()).map_err(err)?;
        engine.set_weight_format(cfg.weights);
        if let Some(t) = &cfg.chat_template {
            let path = Path::new(t);
            let text = if path.is_file() {
                std::fs::read_to_string(path).map_err(|source| CandleError::Io {
                    path: path.to_path_buf(),
                    source,
                })?
            } else {
                t.clone()
            };
            engine.set_chat_template(text);
        }
        let file_sha256 = if cfg.model.is_file() {
            Some(
                super::local::sha256_file(&cfg.model).map_err(|e| CandleError::Io {
                    path: cfg.model.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?,
            )
        } else {
            None
        };
        let adapter_sha256 = cfg.adapter.as_deref().map(adapter_sha256).transpose()?;
        let d = engine.weights().dims();
        let description = format!(
            "{} layers, hidden {}, vocab {}, {:.0} MB {} weights; up to {} sequences, KV budget {} tokens ({:.0} MB)",
            d.layers,
            d.hidden,
            d.vocab,
            engine.weights().bytes() as f64 / 1e6,
            cfg.weights.name(),
            cfg.batch.max_seqs,
            cfg.batch.max_batch_tokens,
            (cfg.batch.max_batch_tokens * engine.kv_bytes_per_token()) as f64 / 1e6
        );
        let tokenizer = engine.tokenizer().clone();
        let (tx, rx) = mpsc::channel::<Job>();
        let batch = cfg.batch;
        std::thread::Builder::new()
            .name("distill-engine".into())
            .spawn(move || serve(engine, batch, rx))
            .map_err(|source| CandleError::Io {
                path: cfg.model.clone(),
                source,
            })?;
        Ok(Self {
            tx,
            info: TeacherInfo {
                backend: "local".into(),
                model: cfg.model.display().to_string(),
                file_sha256,
                revision: None,
                // The weight format changes the samples, so it is part of the teacher's identity.
                engine: Some(match cfg.weights {
                    crate::infer::WeightFormat::F32 => "candle".into(),
                    other => format!("candle-{}", other.name()),
                }),
                adapter_sha256,
                license: None,
            },
            tokenizer,
            description,
        })
    }
}

/// The engine thread: takes requests as they come and decodes them by continuous batching
/// until every sender is gone.
fn serve(engine: Engine, batch: BatchConfig, rx: mpsc::Receiver<Job>) {
    let mut sched = Scheduler::new(&engine, batch, Vec::new());
    let mut waiting: HashMap<u64, oneshot::Sender<Completion>> = HashMap::new();
    let mut next_id = 0u64;
    let mut open = true;
    loop {
        if sched.is_idle() {
            if !open {
                return;
            }
            match rx.recv() {
                Ok((req, reply)) => {
                    sched.push(next_id, req);
                    waiting.insert(next_id, reply);
                    next_id += 1;
                }
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok((req, reply)) => {
                    sched.push(next_id, req);
                    waiting.insert(next_id, reply);
                    next_id += 1;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        for f in sched.step() {
            if let Finished::Generated(id, c) = f {
                if let Some(reply) = waiting.remove(&id) {
                    // The requester may have gone (Ctrl-C): nothing to do then.
                    let _ = reply.send(c);
                }
            }
        }
    }
}

fn failure(message: String) -> GenFailure {
    GenFailure {
        error: TraceError {
            kind: "engine".into(),
            message,
        },
        attempts: 1,
        endpoint: None,
        fatal: false,
    }
}

#[async_trait]
impl Teacher for CandleTeacher {
    fn info(&self) -> &TeacherInfo {
        &self.info
    }

    fn seed_honoured(&self) -> Option<bool> {
        Some(true)
    }

    async fn generate(&self, req: &GenRequest) -> Result<GenOutput, GenFailure> {
        let msgs: Vec<ChatMessage> = req
            .messages
            .iter()
            .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
            .collect();
        let text = self
            .tokenizer
            .apply_chat_template(&msgs, true)
            .map_err(|e| failure(e.to_string()))?;
        let prompt = self
            .tokenizer
            .encode(&text, false)
            .map_err(|e| failure(e.to_string()))?;
        let s = &req.sampling;
        let params = SamplingParams {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: 0,
            max_tokens: s.max_tokens as usize,
            stop: s.stop.clone(),
            seed: s.seed,
            top_logprobs: s.top_logprobs as usize,
            logprobs: s.top_logprobs > 0,
            ignore_eos: false,
        };
        let (reply, done) = oneshot::channel();
        self.tx
            .send((Request { prompt, params }, reply))
            .map_err(|_| failure("the engine thread has stopped".into()))?;
        let c = done
            .await
            .map_err(|_| failure("the engine thread has stopped".into()))?;
        let finish_reason = match c.finish_reason {
            EngineFinish::Stop => FinishReason::Stop,
            EngineFinish::Length => FinishReason::Length,
            EngineFinish::Error(msg) => return Err(failure(msg)),
        };
        let tok = |id: u32| self.tokenizer.decode(&[id], false).unwrap_or_default();
        let logprobs = (s.top_logprobs > 0).then(|| {
            c.logprobs
                .iter()
                .map(|l| TokenLogprob {
                    token: tok(l.token),
                    logprob: l.sampling_logprob,
                    top: l.top.iter().map(|&(id, lp)| (tok(id), lp)).collect(),
                    model_logprob: Some(l.logprob),
                })
                .collect()
        });
        Ok(GenOutput {
            completion: c.text,
            reasoning_field: None,
            finish_reason,
            usage: Usage {
                prompt_tokens: c.prompt_tokens as u64,
                completion_tokens: c.tokens.len() as u64,
            },
            logprobs,
            attempts: 1,
            endpoint: None,
        })
    }
}
