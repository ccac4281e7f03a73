//! `distill`: LLM knowledge distillation in one binary.
//!
//! The pipeline is a chain of stages that talk only through JSONL records on disk, so each stage
//! can be run, cached, resumed and audited on its own:
//!
//! ```text
//! problems.jsonl ──generate──▶ traces.jsonl ──filter──▶ kept.jsonl ──train──▶ adapter/ ──merge──▶ model/
//!                                                             └─label──▶ soft labels ─┘ (response distillation)
//! ```
//!
//! Map of the crate:
//! - [`trace`]: the one record every stage reads and writes ([`trace::Trace`]), its stable id,
//!   and crash-safe JSONL appending with torn-line repair and resume.
//! - [`data`]: problem sets ([`data::dataset`]) with presets for GSM8K, MATH, HumanEval and
//!   MBPP, and prompt templates ([`data::prompt`]) rendered with minijinja.
//! - [`teacher`]: the [`teacher::Teacher`] seam with two backends: the embedded mistral.rs engine
//!   ([`teacher::local`]) and any OpenAI-compatible endpoint or fleet of them ([`teacher::openai`]).
//! - [`generate`]: fans problems × samples out to a teacher with bounded concurrency and writes
//!   trace records, resuming exactly where a previous run stopped.
//! - [`check`]: answer checkers (math equivalence, sandboxed code tests) and `distill check`.
//! - [`filter`]: rule files, dedup, decontamination and the filter stage (kept / rejected with
//!   reasons, funnel summary); [`audit`] turns a filter run into a terminal summary and an
//!   HTML report.
//! - [`eval`]: generation plus grading on a problem set (pass@k, maj@k, intervals) and the
//!   paired comparison of two evaluations.
//! - [`export`]: the student as a GGUF file (f16, q8_0, q4_0, q4_k_m) and the kept traces in
//!   TRL, ShareGPT and axolotl formats.
//! - [`label`]: the teacher's top-k log-probabilities at every supervised token of a trace
//!   file, stored compactly for response distillation (`distill label`).
//! - [`kernels`]: the CPU kernels training and inference share (GEMM, fused operations with
//!   hand-written backward passes, the decoder layer as one autograd node).
//! - [`model`]: the candle student (Llama, Qwen2) with LoRA, loaded from HF dirs or GGUF.
//! - [`infer`]: the batched inference engine on the same model code (continuous batching, KV
//!   cache, seeded sampling, teacher-forced scoring); the default local teacher.
//! - [`fake_openai`]: a loopback OpenAI-compatible server with fault injection, used by the test
//!   suite and by `distill bench` to exercise the client without a real endpoint.
//! - [`bench`](mod@bench): throughput measurements printed as ratios against a peer measured in the same run.
//! - [`run`](mod@run): `distill run CONFIG.toml`, every stage chained, skipped when unchanged,
//!   resumed when interrupted, with a manifest of what produced the result.
//! - [`cli`]: the subcommands and their flags; `main.rs` only maps results to exit codes.

pub mod audit;
pub mod bench;
pub mod check;
pub mod cli;
pub mod data;
pub mod eval;
pub mod export;
pub mod fake_openai;
pub mod filter;
pub mod generate;
pub mod infer;
pub mod kernels;
pub mod label;
pub mod model;
pub mod progress;
pub mod run;
pub mod teacher;
pub mod trace;
pub mod train;
