//! The batched inference engine: the student model code, decoding many sequences at once.
//!
//! Everything after training runs a model forward many times: evaluating a student before and
//! after, generating traces locally, scoring a teacher's soft labels. This engine serves all
//! three on the CPU from the same decoder the trainer uses ([`crate::model::Student`]), laid
//! out for decoding ([`weights`]):
//! - [`forward`]: one step over the new tokens of every scheduled sequence, each attending to
//!   its own KV cache; batch invariant (a sequence's tokens and log-probabilities do not depend
//!   on what else is decoded with it);
//! - [`scheduler`]: continuous batching with chunked prefill, a KV cache bounded by a token
//!   budget, and preemption when it overflows;
//! - [`sampler`]: greedy, temperature, top-k, top-p, a per-request seed that is honoured, and
//!   log-probabilities in nats of both the model's and the sampling distribution;
//! - teacher-forced scoring ([`Engine::score`]): the top-k log-probabilities and the log-sum-exp
//!   at every position of given token sequences, and hidden states of chosen layers.
//!
//! Weights are f32: on this code's GEMM kernels, a decode step of many sequences is
//! compute-bound, and f32 keeps the engine bit-compatible with the trainer's forward pass.
//! LoRA adapters are folded into the weights at load ([`weights`]); a base plus an adapter
//! decodes exactly what the merged model does.

pub mod forward;
pub mod sampler;
pub mod scheduler;
pub mod weights;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::model::load::BaseModel;
use crate::model::lora::{load_adapter, LoraVarBuilder};
use crate::model::tokenizer::{ChatMessage, ChatTokenizer};
use crate::model::{ModelError, Student};

pub use sampler::{SamplingParams, TokenLogprobs};
pub use scheduler::{BatchConfig, Finished, Scheduler};
pub use weights::{Dims, WeightFormat, Weights};

/// Why a sequence ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens`, or the model's last position.
    Length,
    /// The request could not run (empty, too long for the model or the KV budget).
    Error(String),
}

/// One generation request: prompt token ids and how to sample.
#[derive(Debug, Clone)]
pub struct Request {
    /// The rendered prompt's token ids.
    pub prompt: Vec<u32>,
    /// Sampling parameters, with this request's seed.
    pub params: SamplingParams,
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Generated token ids (without the end-of-sequence token).
    pub tokens: Vec<u32>,
    /// Their text, cut before the first stop string.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Per generated token (the end-of-sequence token included), when asked for.
    pub logprobs: Vec<TokenLogprobs>,
}

/// A teacher-forced scoring request.
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    /// The whole sequence (prompt and completion).
    pub tokens: Vec<u32>,
    /// Alternatives to keep per position.
    pub top_k: usize,
}

/// The model's distribution at one position, predicting the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredPosition {
    /// The token that actually follows.
    pub next_token: Option<u32>,
    /// `ln p(next_token)`.
    pub logprob: Option<f32>,
    /// `ln sum exp(logits)` over the whole vocabulary: the logits' normaliser, from which the
    /// mass outside `top` follows.
    pub log_sum_exp: f32,
    /// The most likely tokens with their log-probabilities (nats), most likely first.
    pub top: Vec<(u32, f32)>,
}

impl ScoredPosition {
    /// Probability mass outside `top`.
    pub fn tail_mass(&self) -> f32 {
        let inside: f32 = self.top.iter().map(|(_, lp)| lp.exp()).sum();
        (1.0 - inside).max(0.0)
    }
}

/// A scored sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// Positions `0..len - 1`, each predicting the token after it.
    pub positions: Vec<ScoredPosition>,
    /// Per requested layer, `len x hidden` states after that layer.
    pub hidden: Vec<Vec<f32>>,
    /// Why the request could not run.
    pub error: Option<String>,
}

/// Errors building the engine.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// Loading the model or the adapter failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The adapter does not fit the base model.
    #[error("adapter {path}: {msg}")]
    Adapter {
        /// The adapter directory.
        path: PathBuf,
        /// What does not fit.
        msg: String,
    },
}

/// Whether the engine runs the model at `path` (a local GGUF file or Hugging Face directory
/// of a family the model code implements); `Err` says why not. Reads headers only.
pub fn supports(path: &Path) -> Result<PathBuf, String> {
    let file = if path.is_dir() {
        if path.join("config.json").is_file() {
            let text = std::fs::read_to_string(path.join("config.json"))
                .map_err(|e| format!("{}: {e}", path.join("config.json").display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("{}: {e}", path.join("config.json").display()))?;
            let ty = v.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
            return match ty {
                "llama" | "mistral" | "smollm" | "smollm2" | "qwen2" => Ok(path.to_path_buf()),
                other => Err(format!(
                    "model_type `{other}` is not implemented by the candle engine (llama, mistral, qwen2)"
                )),
            };
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        match ggufs.as_slice() {
            [one] => one.clone(),
            _ => {
                return Err(format!(
                    "{}: no single .gguf and no config.json",
                    path.display()
                ))
            }
        }
    } else if path.is_file() {
        path.to_path_buf()
    } else {
        return Err(format!(
            "{} is not a local file or directory",
            path.display()
        ));
    };
    let mut f = std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f)
        .map_err(|e| format!("{}: not a GGUF file: {e}", file.display()))?;
    let arch = crate::model::load::gguf_architecture(&content);
    if crate::model::load::GGUF_ARCHITECTURES.contains(&arch.as_str()) {
        Ok(file)
    } else {
        Err(format!(
            "general.architecture `{arch}` is not implemented by the candle engine (llama, qwen2)"
        ))
    }
}

/// Chat templates' end-of-turn tokens, which end a completion besides the model's EOS.
const END_OF_TURN: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
];

/// A loaded model ready to decode: laid-out weights, tokenizer, end-of-sequence tokens.
pub struct Engine {
    pub(crate) weights: Weights,
    tokenizer: ChatTokenizer,
    pub(crate) eos: HashSet<u32>,
    source: PathBuf,
}

impl Engine {
    /// Loads a GGUF file or a Hugging Face directory, with a PEFT adapter directory folded in
    /// when given. An adapter made for another base is an error naming the tensor.
    pub fn load(model: &Path, adapter: Option<&Path>) -> Result<Self, InferError> {
        let dev = Device::Cpu;
        let base = BaseModel::load(model, &dev)?;
        Self::from_base(&base, adapter)
    }

    /// Builds the engine from an already loaded base.
    pub fn from_base(base: &BaseModel, adapter: Option<&Path>) -> Result<Self, InferError> {
        let dev = Device::Cpu;
        let student = match adapter {
            Some(dir) => {
                let (cfg, varmap) = load_adapter(dir, &dev)?;
                let known: HashSet<String> = varmap
                    .data()
                    .lock()
                    .map(|d| d.keys().cloned().collect())
                    .unwrap_or_default();
                let vb = base.var_builder(DType::F32, &dev)?;
                let vb = LoraVarBuilder::with_lora(vb, &varmap, cfg)?;
                let student = Student::load(vb, &base.config).map_err(|e| match e {
                    ModelError::Tensor { tensor, msg, .. } => InferError::Adapter {
                        path: dir.to_path_buf(),
                        msg: format!("tensor `{tensor}`: {msg}"),
                    },
                    other => InferError::Model(other),
                })?;
                // Every adapter tensor must have been used: a name the base lacks means the
                // adapter was trained for another architecture.
                let after: HashSet<String> = varmap
                    .data()
                    .lock()
                    .map(|d| d.keys().cloned().collect())
                    .unwrap_or_default();
                if let Some(extra) = after.difference(&known).next() {
                    return Err(InferError::Adapter {
                        path: dir.to_path_buf(),
                        msg: format!(
                            "the base model needs tensor `{extra}`, which the adapter lacks"
                        ),
                    });
                }
                student
            }
            None => base.student(None, DType::F32, &dev)?,
        };
        let weights = Weights::from_student(&student)?;
        drop(student);
        Ok(Self::new(weights, base.tokenizer.clone(), &base.source))
    }

    /// An engine over laid-out weights and a tokenizer.
    pub fn new(weights: Weights, tokenizer: ChatTokenizer, source: &Path) -> Self {
        let mut eos = HashSet::new();
        let vocab = weights.dims().vocab as u32;
        for t in tokenizer
            .eos_token()
            .into_iter()
            .chain(END_OF_TURN.iter().copied())
        {
            if let Some(id) = tokenizer.token_id(t) {
                if id < vocab {
                    eos.insert(id);
                }
            }
        }
        Self {
            weights,
            tokenizer,
            eos,
            source: source.to_path_buf(),
        }
    }

    /// Converts the projection matrices to `format` (see [`WeightFormat`]).
    pub fn set_weight_format(&mut self, format: WeightFormat) {
        self.weights.set_format(format);
    }

    /// Replaces the chat template (the prompt format of every later request).
    pub fn set_chat_template(&mut self, template: String) {
        self.tokenizer.set_chat_template(template);
    }

    /// The laid-out weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The tokenizer and chat template.
    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }

    /// Where the model was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Token ids that end a completion.
    pub fn eos_tokens(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.eos.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// KV cache bytes per cached position.
    pub fn kv_bytes_per_token(&self) -> usize {
        let d = self.weights.dims();
        d.layers * 2 * d.kv() * 4
    }

    /// Token ids of a chat rendered with the generation prompt appended.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ModelError> {
        let text = self.tokenizer.apply_chat_template(messages, true)?;
        self.tokenizer.encode(&text, false)
    }

    /// Text of generated ids, special tokens dropped. Invalid ids decode to nothing.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Generates every request with continuous batching; results in request order.
    /// `on_done` sees each completion as it finishes (for progress).
    pub fn generate(
        &self,
        requests: Vec<Request>,
        cfg: BatchConfig,
        mut on_done: impl FnMut(usize, &Completion),
    ) -> Vec<Completion> {
        let n = requests.len();
        let mut sched = Scheduler::new(self, cfg, Vec::new());
        for (i, r) in requests.into_iter().enumerate() {
            sched.push(i as u64, r);
        }
        let mut out: Vec<Option<Completion>> = vec![None; n];
        while !sched.is_idle() {
            for f in sched.step() {
                if let Finished::Generated(id, c) = f {
                    on_done(id as usize, &c);
                    out[id as usize] = Some(c);
                }
            }
        }
        out.into_iter()
            .map(|c| {
                c.unwrap_or_else(|| Completion {
                    tokens: Vec::new(),
                    text: String::new(),
                    finish_reason: FinishReason::Error("not scheduled".into()),
                    prompt_tokens: 0,
                    logprobs: Vec::new(),
                })
            })
            .collect()
    }

    /// Teacher-forced scoring of whole sequences: at every position, the top-k
    /// log-probabilities of the next token and the log-sum-exp over the vocabulary, and the
    /// hidden states after each of `layers` (0-based decoder layers). Results in input order.
    pub fn score(
        &self,
        requests: Vec<ScoreRequest>,
        layers: &[usize],
        cfg: BatchConfig,
    ) -> Result<Vec<Scored>, ModelError> {
        let n_layers = self.weights.dims().layers;
        if let Some(bad) = layers.iter().find(|&&l| l >= n_layers) {
            return Err(ModelError::Input(format!(
                "hidden layer {bad} >= num_hidden_layers {n_layers}"
            )));
        }
        let n = requests.len();
        let mut sched = Scheduler::new(self, cfg, layers.to_vec());
        for (i, r) in requests.into_iter().enumerate() {
            sched.push_score(i as u64, r);
        }
        let mut out: Vec<Option<Scored>> = vec![None; n];
        while !sched.is_idle() {
            for f in sched.step() {
                if let Finished::Scored(id, s) = f {
                    out[id as usize] = Some(s);
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|s| {
                s.unwrap_or(Scored {
                    positions: Vec::new(),
                    hidden: Vec::new(),
                    error: Some("not scheduled".into()),
                })
            })
            .collect())
    }
}
