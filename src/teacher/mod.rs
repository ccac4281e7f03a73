//! Teachers: where traces come from.
//!
//! [`Teacher`] is the one seam between the generate stage and a model. Three backends sit
//! behind it and no stage cares which one it talks to:
//! - [`candle::CandleTeacher`]: this project's batched engine ([`crate::infer`]) on the student
//!   model code, for the architectures it implements (Llama, Qwen2); the default local engine.
//! - [`local::LocalTeacher`]: mistral.rs embedded in the process (GGUF or safetensors, local path
//!   or Hugging Face hub id), for what the candle engine does not run. Its batched sampling
//!   mixes up concurrent sequences (0.8.1), so it is sent one request at a time.
//! - [`openai::OpenAiTeacher`]: any OpenAI-compatible `/v1/chat/completions` (vLLM, SGLang,
//!   `mistralrs serve`, hosted APIs), one or several base URLs, with retries, rate limits and
//!   routing around a failing server.
//!
//! A teacher answers one sample per call. Generating `n` samples of a problem is `n` calls with
//! their own ids, so one failed sample never costs its siblings (servers with prefix caching make
//! the repeated prompt nearly free).

pub mod candle;
pub mod licence;
pub mod local;
pub mod openai;

use async_trait::async_trait;

use crate::trace::{FinishReason, Message, Sampling, TeacherInfo, TokenLogprob, TraceError, Usage};

/// One sample to generate.
#[derive(Debug, Clone)]
pub struct GenRequest {
    /// Rendered chat messages.
    pub messages: Vec<Message>,
    /// Sampling parameters, with this sample's own seed.
    pub sampling: Sampling,
}

/// A successful sample.
#[derive(Debug, Clone)]
pub struct GenOutput {
    /// The answer text as returned.
    pub completion: String,
    /// Chain of thought returned apart from the answer (`reasoning_content`), if any.
    pub reasoning_field: Option<String>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Token counts of this one sample.
    pub usage: Usage,
    /// Per-token log-probabilities in nats, when requested.
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Attempts it took.
    pub attempts: u32,
    /// Endpoint that answered (OpenAI backend).
    pub endpoint: Option<String>,
}

/// A sample that could not be produced.
#[derive(Debug, Clone)]
pub struct GenFailure {
    /// What went wrong, as recorded in the trace.
    pub error: TraceError,
    /// Attempts made.
    pub attempts: u32,
    /// Last endpoint tried.
    pub endpoint: Option<String>,
    /// When true, every later request would fail the same way (bad API key, unknown model):
    /// the run stops instead of burning through the whole dataset.
    pub fatal: bool,
}

/// A source of teacher samples.
#[async_trait]
pub trait Teacher: Send + Sync {
    /// The identity written into every trace (and hashed into its id).
    fn info(&self) -> &TeacherInfo;

    /// Whether a per-request seed is honoured: `Some(false)` when known to be ignored,
    /// `None` when the backend cannot tell.
    fn seed_honoured(&self) -> Option<bool>;

    /// Generates one sample. Transient failures are retried inside; the returned failure is final.
    async fn generate(&self, req: &GenRequest) -> Result<GenOutput, GenFailure>;
}
