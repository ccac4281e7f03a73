//! `distill`: LLM knowledge distillation in one binary.
//!
//! The pipeline is a chain of stages that talk only through JSONL records on disk, so each stage
//! can be run, cached, resumed and audited on its own:
//!
//! ```text
//! problems.jsonl ──generate──▶ traces.jsonl ──filter──▶ kept.jsonl ──train──▶ adapter/ ──merge──▶ model/
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
//! - [`model`]: the candle student (Llama, Qwen2) with LoRA, loaded from HF dirs or GGUF.
//! - [`fake_openai`]: a loopback OpenAI-compatible server with fault injection, used by the test
//!   suite and by `distill bench` to exercise the client without a real endpoint.
//! - [`bench`](mod@bench): throughput measurements printed as ratios against a peer measured in the same run.
//! - [`cli`]: the subcommands and their flags; `main.rs` only maps results to exit codes.

pub mod audit;
pub mod bench;
pub mod check;
pub mod cli;
pub mod data;
pub mod fake_openai;
pub mod filter;
pub mod generate;
pub mod model;
pub mod progress;
pub mod teacher;
pub mod trace;
pub mod train;
