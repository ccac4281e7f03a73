//! The command line: one struct of flags per subcommand, and the glue that turns flags into a
//! stage run. Parsing only validates; files and models are opened after parsing, in [`run`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::data::dataset::{self, FieldMap, Preset};
use crate::data::prompt::PromptTemplate;
use crate::generate::{self, GenerateConfig, GenerateSummary};
use crate::infer::BatchConfig;
use crate::teacher::candle::{CandleConfig, CandleTeacher};
use crate::teacher::local::{LocalConfig, LocalTeacher};
use crate::teacher::openai::{ApiKey, LogprobBase, OpenAiConfig, OpenAiTeacher};
use crate::teacher::Teacher;
use crate::trace::Sampling;

/// LLM knowledge distillation: generate teacher traces, filter them, train a student.
#[derive(Debug, Parser)]
#[command(name = "distill", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands, one per stage.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate chain-of-thought traces from a teacher for a problem set.
    Generate(GenerateArgs),
    /// Filter traces: rules, answer checkers, dedup, decontamination; kept and rejected out.
    Filter(FilterArgs),
    /// Summarise a filter run in the terminal and write a self-contained HTML report.
    Audit(AuditArgs),
    /// Score a JSONL dataset with the math or code checker, row by row.
    Check(CheckArgs),
    /// Fine-tune a student with LoRA on trace records (chain-of-thought distillation).
    Train(TrainArgs),
    /// Fold a PEFT adapter into its base model and write a Hugging Face directory.
    Merge(MergeArgs),
    /// Store a teacher's top-k log-probabilities at every supervised token of a trace file
    /// (soft labels for `train --loss ce+kd`).
    Label(LabelArgs),
    /// Cut a smaller student from a model by keeping some of its decoder layers.
    Prune(PruneArgs),
    /// Write the student as a GGUF file (f16 or quantized), or the kept traces in the format
    /// of TRL, LLaMA-Factory (ShareGPT) or axolotl.
    Export(ExportArgs),
    /// Run the whole pipeline from a config: generate, filter, train, eval before and after.
    Run(crate::run::RunArgs),
    /// Evaluate a model on a problem set with the filter's checkers (pass@k, maj@k, 95%
    /// intervals), or compare two evaluations (`--compare A B`).
    Eval(EvalArgs),
    /// Measure throughput against a peer in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// The grading function's flags, shared by `filter` and `eval` so that both grade alike.
#[derive(Debug, Args)]
pub struct GradeArgs {
    /// Answer checker.
    #[arg(long, value_enum, default_value = "auto")]
    pub checker: crate::filter::stage::CheckerKind,
    /// Math checker time budget per answer, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub math_budget_ms: u64,
    /// Code checker wall-clock limit per program, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub code_timeout: f64,
    /// A file or directory programs under the code checker may read, for tests that open data
    /// files (repeatable). Nothing else outside a program's working directory and the
    /// interpreter's own files is readable where the kernel has Landlock.
    #[arg(long, value_name = "PATH")]
    pub code_allow_read: Vec<PathBuf>,
}

impl GradeArgs {
    /// The math checker's options.
    fn math(&self) -> crate::check::math::MathOptions {
        crate::check::math::MathOptions {
            budget_ms: self.math_budget_ms,
            ..Default::default()
        }
    }

    /// The code sandbox, when the checker may run code and `needed` says code will be graded.
    #[cfg(target_os = "linux")]
    fn sandbox(&self, needed: bool) -> anyhow::Result<Option<crate::check::code::Sandbox>> {
        use crate::check::code::{Sandbox, SandboxConfig};
        use crate::filter::stage::CheckerKind;
        if !(needed && matches!(self.checker, CheckerKind::Auto | CheckerKind::Code)) {
            return Ok(None);
        }
        if !(self.code_timeout > 0.0 && self.code_timeout <= MAX_SECONDS) {
            bail!(
                "--code-timeout {} must be a number of seconds in (0, {MAX_SECONDS}]",
                self.code_timeout
            );
        }
        Ok(Some(Sandbox::new(SandboxConfig {
            wall_timeout: Duration::from_secs_f64(self.code_timeout),
            cpu_time_limit: Duration::from_secs_f64(self.code_timeout),
            allow_read: self.code_allow_read.clone(),
            ..SandboxConfig::default()
        })?))
    }
}

/// Flags of `distill eval`: the generate flags (model, adapter, engine, sampling), an output
/// directory and the checker.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Output directory: traces.jsonl, results.jsonl, summary.json (rerun to resume).
    #[arg(long, required_unless_present = "compare")]
    pub out_dir: Option<PathBuf>,
    /// Compare two evaluation directories (A the baseline, B the candidate) on their shared
    /// problems instead of evaluating; writes compare.json into --out-dir, else into B.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    pub compare: Vec<PathBuf>,
    /// Checker and its limits (as for `filter`).
    #[command(flatten)]
    pub grade: GradeArgs,
    /// Model, sampling and dataset (as for `generate`; `--out` is unused: traces go to
    /// OUT_DIR/traces.jsonl). Greedy unless --temperature is given.
    #[command(flatten)]
    pub gen: GenerateArgs,
    /// Held-out traces on which to also measure the model's KL divergence from a teacher and
    /// its perplexity (a local model; needs --kl-labels or --kl-teacher); writes
    /// OUT_DIR/distance.json.
    #[arg(long, value_name = "FILE")]
    pub kl_traces: Option<PathBuf>,
    /// Soft labels of the --kl-traces (`distill label`).
    #[arg(long, value_name = "DIR", requires = "kl_traces")]
    pub kl_labels: Option<PathBuf>,
    /// Teacher scoring the --kl-traces (instead of --kl-labels).
    #[arg(
        long,
        value_name = "MODEL",
        requires = "kl_traces",
        conflicts_with = "kl_labels"
    )]
    pub kl_teacher: Option<PathBuf>,
}

/// Flags of `distill filter`.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Trace file written by `distill generate`.
    #[arg(long)]
    pub traces: PathBuf,
    /// Output directory: kept.jsonl, rejected.jsonl, summary.json, check_cache.jsonl.
    #[arg(long)]
    pub out_dir: PathBuf,
    /// Rule file or directory of *.toml rule files; repeatable. Default: the shipped rules.
    #[arg(long)]
    pub rules: Vec<PathBuf>,
    /// Do not load the shipped default rules (only --rules).
    #[arg(long)]
    pub no_default_rules: bool,
    /// Drop a rule by id (e.g. final_answer for code traces); repeatable.
    #[arg(long)]
    pub disable_rule: Vec<String>,
    /// Checker and its limits.
    #[command(flatten)]
    pub grade: GradeArgs,
    /// Near-duplicate Jaccard threshold (MinHash + LSH).
    #[arg(long, default_value_t = 0.8)]
    pub near_dup: f64,
    /// Turn off near-duplicate detection.
    #[arg(long)]
    pub no_near_dup: bool,
    /// Turn off exact duplicate detection.
    #[arg(long)]
    pub no_exact_dup: bool,
    /// Evaluation set (JSONL, any preset) to decontaminate against; repeatable.
    #[arg(long)]
    pub eval_set: Vec<PathBuf>,
    /// n-gram length for decontamination.
    #[arg(long, default_value_t = 13)]
    pub ngram: usize,
    /// Also look for evaluation n-grams in completions.
    #[arg(long)]
    pub decontam_completions: bool,
    /// Keep problems whose pass rate is in MIN:MAX (e.g. 0.1:0.9).
    #[arg(long)]
    pub pass_rate: Option<String>,
    /// Keep at most K traces per problem.
    #[arg(long)]
    pub max_per_problem: Option<usize>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Flags of `distill audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Filter run directory (holding kept.jsonl, rejected.jsonl, summary.json).
    pub run_dir: PathBuf,
    /// Where to write the HTML report (default: RUN_DIR/report.html).
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Only print the terminal summary.
    #[arg(long)]
    pub no_html: bool,
}

/// Flags of `distill train`: a TOML config (see configs/lora-sft.toml) with flag overrides.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Run config (TOML); flags below override its values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Student: Hugging Face directory (config.json + safetensors) or GGUF file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Trace JSONL (`distill generate` output or `distill filter`'s kept.jsonl).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory: adapter, metrics.jsonl, checkpoints/.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Jinja chat template replacing the model's own.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Longest sample in tokens; longer traces are dropped and counted.
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Rows per micro-batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Optimizer steps (overrides epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Passes over the data.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Seed for LoRA init, data order and the validation split.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every N steps.
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Validation loss every N steps.
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// LoRA rank.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout probability on the adapters' input, in [0, 1).
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Pack several samples per row (no attention across them).
    #[arg(long)]
    pub packing: bool,
    /// Train every weight of the decoder layers instead of LoRA adapters (for a depth-pruned
    /// student); exports a whole model to the output directory.
    #[arg(long)]
    pub full_finetune: bool,
    /// Resume from the latest checkpoint in the output directory.
    #[arg(long)]
    pub resume: bool,
    /// Resume from this checkpoint directory.
    #[arg(long, conflicts_with = "resume")]
    pub resume_from: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Objective: `ce` (SFT on the trace tokens), `kd` (divergence to the teacher only) or
    /// `ce+kd` (alpha · CE + (1 − alpha) · T² · D).
    #[arg(long, value_name = "ce|kd|ce+kd")]
    pub loss: Option<crate::train::config::LossKind>,
    /// Weight of the cross-entropy in `ce+kd`.
    #[arg(long)]
    pub kd_alpha: Option<f64>,
    /// `forward` (KL(teacher ‖ student)), `reverse` or `jsd`.
    #[arg(long)]
    pub kd_divergence: Option<crate::train::kd::Divergence>,
    /// JSD mixture weight on the teacher (0 = forward KL, 1 = reverse KL).
    #[arg(long)]
    pub kd_beta: Option<f64>,
    /// Temperature of both distributions (the divergence is scaled by T²).
    #[arg(long)]
    pub kd_temperature: Option<f64>,
    /// Soft labels written by `distill label` (offline distillation).
    #[arg(long, value_name = "DIR")]
    pub soft_labels: Option<PathBuf>,
    /// Teacher run inside the loop (online soft labels, feature matching).
    #[arg(long, value_name = "MODEL")]
    pub teacher: Option<PathBuf>,
    /// Top entries per position of online soft labels.
    #[arg(long)]
    pub kd_top_k: Option<usize>,
    /// Match the hidden states of this many student layers (spread over depth) to the
    /// teacher's at the same relative depth.
    #[arg(long)]
    pub feature_layers: Option<usize>,
    /// Explicit student:teacher layer pairs, e.g. `9:14,19:29`.
    #[arg(long, value_name = "S:T,...")]
    pub feature_pairs: Option<String>,
    /// `cosine` or `mse`.
    #[arg(long)]
    pub feature_loss: Option<crate::train::kd::FeatureLoss>,
    /// Weight of the feature term.
    #[arg(long)]
    pub feature_weight: Option<f64>,
}

/// Flags of `distill label`.
#[derive(Debug, Args)]
pub struct LabelArgs {
    /// Teacher: Hugging Face directory or GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA adapter applied to the teacher.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Trace file to label (e.g. a filter run's kept.jsonl).
    #[arg(long)]
    pub traces: PathBuf,
    /// Output directory: labels.json and labels.bin (rerun to resume).
    #[arg(long)]
    pub out: PathBuf,
    /// Top entries kept per position (plus the mass outside them).
    #[arg(long, default_value_t = 64)]
    pub top_k: usize,
    /// Chat template replacing the teacher's: use the one the student trains with.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// End-of-turn token, as for `distill train`.
    #[arg(long)]
    pub eot_token: Option<String>,
    /// Longest sample in tokens (as `distill train --max-len`); longer traces are skipped.
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    /// Sequences scored together.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Take the labels from the log-probabilities stored in the traces (`distill generate
    /// --logprobs K`, e.g. from a hosted teacher) instead of running --model: generated tokens
    /// only. --model then names the student, whose tokenizer maps the token texts to ids.
    #[arg(long)]
    pub from_trace_logprobs: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Flags of `distill prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Model to cut: Hugging Face directory or GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Layers to keep, e.g. `0-9,20-29`.
    #[arg(long, conflicts_with = "layers", required_unless_present = "layers")]
    pub keep_layers: Option<String>,
    /// Number of layers to keep, spread evenly from the first to the last.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Output directory (a Hugging Face model).
    #[arg(long)]
    pub out: PathBuf,
}

/// Flags of `distill merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Base model: Hugging Face directory or GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory (adapter_model.safetensors + adapter_config.json).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory for the merged Hugging Face model.
    #[arg(long)]
    pub out: PathBuf,
    /// Store weights as bf16 (half the size) instead of as loaded.
    #[arg(long)]
    pub bf16: bool,
}

/// What `distill export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// The model (with `--adapter` merged) as one GGUF file, quantized per `--quant`.
    Gguf,
    /// Traces for TRL's SFTTrainer (`messages`).
    Trl,
    /// Traces for LLaMA-Factory (ShareGPT `conversations`, plus `dataset_info.json`).
    Sharegpt,
    /// Traces for axolotl (`type: chat_template`, plus the YAML lines).
    Axolotl,
}

/// Flags of `distill export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// What to write.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// GGUF: the base model (Hugging Face directory or GGUF). Traces: optional, its chat
    /// template renders each exported record to check it matches what `distill train` trains on.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// GGUF: the LoRA adapter from `distill train`, merged before quantizing.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// GGUF: the tensor types (llama.cpp's names).
    #[arg(long, value_enum, default_value = "q8_0")]
    pub quant: crate::export::GgufQuant,
    /// GGUF: held-out text (paragraphs separated by blank lines) on which to report the
    /// per-token KL of the exported model to the model it was made from, and how often their
    /// top tokens agree.
    #[arg(long, value_name = "FILE")]
    pub kl_text: Option<PathBuf>,
    /// Traces: the kept traces (`kept.jsonl` of a filter run).
    #[arg(long)]
    pub traces: Option<PathBuf>,
    /// The file to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// Which checker `distill check` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckKind {
    /// Rows with `gold` and `pred` (pred may be a whole completion).
    Math,
    /// Rows with `prompt`, `completion`, `test`, `entry_point` (HumanEval schema).
    Code,
}

/// Flags of `distill check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Checker to run.
    #[arg(value_enum)]
    pub kind: CheckKind,
    /// Input JSONL, or `-` for stdin.
    #[arg(default_value = "-")]
    pub input: String,
    /// Output JSONL (default: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Math: time budget per row in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub budget_ms: u64,
    /// Code: wall-clock limit per program in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Code: memory limit per program in MiB.
    #[arg(long, default_value_t = 2048)]
    pub memory_mb: u64,
    /// Parallel workers (default: all cores for math, twice the cores for code, whose
    /// workers partly wait on their sandboxes being set up and torn down).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Code: start a fresh interpreter for every program instead of forking it from a
    /// warm one (the same isolation steps, slower).
    #[arg(long)]
    pub no_fork_server: bool,
    /// Code: a file or directory programs may read, for tests that open data files
    /// (repeatable). Nothing else outside a program's working directory and the interpreter's
    /// own files is readable where the kernel has Landlock.
    #[arg(long, value_name = "PATH")]
    pub allow_read: Vec<PathBuf>,
}

/// Which teacher backend serves the samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TeacherKind {
    /// mistral.rs embedded in this process (GGUF or safetensors; no server, no API key).
    Local,
    /// An OpenAI-compatible endpoint (vLLM, SGLang, mistral.rs server, hosted APIs).
    Openai,
}

/// Which embedded engine runs a local teacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineKind {
    /// candle where the model code implements the architecture (Llama, Qwen2 from a local GGUF
    /// or Hugging Face directory), mistral.rs otherwise.
    Auto,
    /// This project's batched engine: continuous batching, honoured seeds, LoRA adapters.
    Candle,
    /// mistral.rs, one sequence at a time (its batched sampling mixes sequences up).
    Mistralrs,
}

/// Flags of `distill generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Problem set: JSONL (one object per line) or a JSON array. Required.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Shape of the dataset rows (auto detects from the first row).
    #[arg(long, value_enum, default_value = "auto")]
    pub preset: Preset,
    /// Prompt template: a builtin name (math, gsm8k, code) or a path to a .toml file.
    ///
    /// Defaults to the preset's template (gsm8k for GSM8K, code for HumanEval/MBPP, math
    /// otherwise).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Teacher backend.
    #[arg(long, value_enum, default_value = "local")]
    pub teacher: TeacherKind,
    /// Model: a GGUF file, model directory or hub id (local); the served model name (openai).
    #[arg(long)]
    pub model: Option<String>,
    /// GGUF file name inside a directory or hub repository (local teacher).
    #[arg(long)]
    pub model_file: Option<String>,
    /// Hub revision to pin (local teacher, hub ids).
    #[arg(long)]
    pub revision: Option<String>,
    /// Chat template (Jinja file) replacing the model's own (local teacher).
    #[arg(long)]
    pub chat_template: Option<String>,
    /// Run the local teacher on the CPU even in an accelerator build.
    #[arg(long)]
    pub cpu: bool,
    /// Engine of the local teacher.
    #[arg(long, value_enum, default_value = "auto")]
    pub engine: EngineKind,
    /// The teacher's licence, recorded in every trace (default: read from the model's
    /// metadata: GGUF `general.license`, config.json or the model card).
    #[arg(long)]
    pub teacher_license: Option<String>,
    /// LoRA adapter directory (as `distill train` writes) applied to the local model
    /// (candle engine).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// KV cache budget of the candle engine, in cached tokens over all sequences decoded
    /// together (memory: layers x 2 x kv_width x 4 bytes per token).
    #[arg(long, default_value_t = 32_768)]
    pub max_batch_tokens: usize,
    /// How the candle engine holds its weights: `f32` (the trainer's weights, unrounded), `f16`
    /// (half the memory traffic, within a thousandth of a nat of f32), `q4_1` (4-bit blocks
    /// against 8-bit activations: the fastest here at every batch size, a Q4_1 GGUF's weights
    /// exactly, within a few hundredths of a nat) or `q8_0` (8-bit blocks). A format other
    /// than f32 is recorded in `teacher.engine`.
    #[arg(long, value_enum, default_value = "f32")]
    pub engine_weights: crate::infer::WeightFormat,
    /// Base URL of an OpenAI-compatible server; repeat for a fleet.
    #[arg(long = "base-url")]
    pub base_urls: Vec<String>,
    /// Environment variable holding the API key (openai teacher). Default: OPENAI_API_KEY if set.
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// Samples per problem.
    #[arg(long, default_value_t = 1)]
    pub n: u32,
    /// Sampling temperature (0 = greedy). Default: 0.6 for generate, 0 for eval.
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass. Default: 0.95 for generate, 1 for eval.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Completion token budget per sample; longer traces are kept with finish_reason=length.
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: u32,
    /// Stop sequence; repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Run seed; each sample gets its own seed derived from it.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Top log-probabilities to record per token (0 = none), stored in nats.
    #[arg(long, default_value_t = 0)]
    pub logprobs: u32,
    /// Unit of the server's logprobs (auto recognises mistral.rs's base 10).
    #[arg(long, value_enum, default_value = "auto")]
    pub logprob_base: LogprobBase,
    /// Requests in flight at once; on the candle engine, the sequences decoded together.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Per-request timeout in seconds (openai teacher).
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
    /// Attempts per sample before it is recorded as failed (openai teacher).
    #[arg(long, default_value_t = 8)]
    pub max_attempts: u32,
    /// Requests-per-minute budget across all base URLs.
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Tokens-per-minute budget across all base URLs (prompt estimate + max_tokens).
    #[arg(long)]
    pub tpm: Option<u32>,
    /// Output trace file (JSONL, appended; rerun the same command to resume).
    #[arg(long, default_value = "traces.jsonl")]
    pub out: PathBuf,
    /// Only the first N problems.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Skip and count malformed dataset rows instead of stopping at the first.
    #[arg(long)]
    pub skip_invalid: bool,
    /// Dataset field holding the problem id.
    #[arg(long)]
    pub id_field: Option<String>,
    /// Dataset field holding the question.
    #[arg(long)]
    pub question_field: Option<String>,
    /// Dataset field holding the final answer.
    #[arg(long)]
    pub answer_field: Option<String>,
    /// Dataset field holding a reference solution.
    #[arg(long)]
    pub solution_field: Option<String>,
    /// Dataset field holding test code.
    #[arg(long)]
    pub tests_field: Option<String>,
    /// Dataset field holding the entry point function name.
    #[arg(long)]
    pub entry_point_field: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// OpenAI client against a loopback server with fixed latency: requests/s vs the ideal.
    Openai(crate::bench::OpenAiBenchArgs),
    /// Embedded engine tokens/s through distill vs mistral.rs driven directly.
    Local(crate::bench::LocalBenchArgs),
    /// The batched candle engine: prompt/decode tokens/s at 1, 8, 32 sequences, scoring, and
    /// mistral.rs in the same run.
    Engine(crate::bench::EngineBenchArgs),
    /// The deployment table: teacher, student f32 and quantized student exports side by side
    /// (held-out accuracy, decode tokens/s at 1 and 32 sequences, time to first token, size,
    /// peak memory).
    Deploy(crate::eval::deploy::DeployArgs),
}

/// What a finished command reports to `main` for the exit code.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Records that finally failed (exit code 1 when non-zero).
    pub failed_records: u64,
    /// Stopped by Ctrl-C (exit code 130).
    pub interrupted: bool,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Generate(args) => rt.block_on(generate_cmd(args)),
        Command::Check(a) => check_cmd(a),
        Command::Filter(a) => filter_cmd(a),
        Command::Train(a) => train_cmd(a),
        Command::Merge(a) => {
            let dtype = a.bf16.then_some(candle_core::DType::BF16);
            let r = crate::train::merge(&a.model, &a.adapter, &a.out, dtype)?;
            eprintln!(
                "merge: folded {} adapter tensors into {}; wrote {}",
                r.adapter_tensors,
                a.model.display(),
                r.out_dir.display()
            );
            Ok(Outcome::default())
        }
        Command::Export(a) => export_cmd(a),
        Command::Label(a) => label_cmd(a),
        Command::Prune(a) => prune_cmd(a),
        Command::Audit(a) => {
            let run = crate::audit::load_run(&a.run_dir)?;
            let text = crate::audit::terminal_summary(&run);
            println!("{}", text.trim_end());
            if !a.no_html {
                let path = a
                    .html
                    .clone()
                    .unwrap_or_else(|| a.run_dir.join("report.html"));
                crate::audit::write_html(&run, &path)?;
                eprintln!("distill: report written to {}", path.display());
            }
            Ok(Outcome::default())
        }
        Command::Bench(BenchCommand::Openai(a)) => {
            rt.block_on(crate::bench::openai(a))?;
            Ok(Outcome::default())
        }
        Command::Eval(a) => rt.block_on(eval_cmd(a)),
        Command::Run(a) => {
            drop(rt);
            crate::run::run(a)
        }
        Command::Bench(BenchCommand::Engine(a)) => {
            rt.block_on(crate::bench::engine(a))?;
            Ok(Outcome::default())
        }
        Command::Bench(BenchCommand::Deploy(a)) => {
            let rows = crate::eval::deploy::deploy(&a)?;
            println!("{}", crate::eval::deploy::markdown(&rows).trim_end());
            eprintln!(
                "deploy: wrote {} and {}",
                a.out_dir.join("deploy.json").display(),
                a.out_dir.join("deploy.md").display()
            );
            Ok(Outcome::default())
        }
        Command::Bench(BenchCommand::Local(a)) => {
            rt.block_on(crate::bench::local(a))?;
            Ok(Outcome::default())
        }
    }
}

fn export_cmd(a: ExportArgs) -> anyhow::Result<Outcome> {
    use crate::export::{self, TraceFormat};
    let format = match a.format {
        ExportFormat::Gguf => {
            let Some(model) = a.model.as_deref() else {
                bail!("--format gguf needs --model (the base model)");
            };
            let started = std::time::Instant::now();
            let r = export::export_model(model, a.adapter.as_deref(), a.quant, &a.out)?;
            let types: Vec<String> = r.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
            eprintln!(
                "export: wrote {} ({}, {:.1} MB, {} tensors: {}; {:.2} bits per parameter) in {:.1}s",
                r.path.display(),
                a.quant.name(),
                r.file_bytes as f64 / 1e6,
                r.tensors,
                types.join(", "),
                r.file_bytes as f64 * 8.0 / r.parameters.max(1) as f64,
                started.elapsed().as_secs_f64()
            );
            if let Some(file) = &a.kl_text {
                let text =
                    std::fs::read_to_string(file).with_context(|| file.display().to_string())?;
                let texts: Vec<String> = text
                    .split("\n\n")
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect();
                let f = export::fidelity::compare(model, a.adapter.as_deref(), &r.path, &texts)?;
                eprintln!(
                    "export: against the f32 model on {} tokens of {}: mean KL {:.5} nats/token, max {:.4}, top-1 agreement {:.1}%",
                    f.tokens,
                    file.display(),
                    f.mean_kl,
                    f.max_kl,
                    100.0 * f.top1_agreement
                );
            }
            return Ok(Outcome::default());
        }
        ExportFormat::Trl => TraceFormat::Trl,
        ExportFormat::Sharegpt => TraceFormat::Sharegpt,
        ExportFormat::Axolotl => TraceFormat::Axolotl,
    };
    let Some(traces) = a.traces.as_deref() else {
        bail!("--format {} needs --traces (kept.jsonl)", format.name());
    };
    let r = export::traces::export_traces(traces, format, &a.out)?;
    let renderer = match a.model.as_deref() {
        Some(m) => {
            let base = crate::model::load::BaseModel::load(m, &candle_core::Device::Cpu)?;
            Some(crate::train::data::ChatRenderer::new(base.tokenizer, None)?)
        }
        None => None,
    };
    let v = export::traces::verify(traces, &a.out, format, renderer.as_ref())?;
    eprintln!(
        "export: wrote {} records to {} ({} failed samples skipped) and {}",
        r.records,
        r.path.display(),
        r.skipped,
        r.config.display()
    );
    if !v.mismatches.is_empty() {
        bail!(
            "the export does not read back as the traces: {}",
            v.mismatches.join("; ")
        );
    }
    eprintln!(
        "export: read back as {} would, all {} records hold the conversation distill trains on{}",
        format.name(),
        v.records,
        if v.rendered {
            " and render to the same training text"
        } else {
            " (give --model to compare the rendered text too)"
        }
    );
    Ok(Outcome::default())
}

async fn eval_cmd(a: EvalArgs) -> anyhow::Result<Outcome> {
    use crate::eval::{self, EvalConfig};
    if let [ea, eb] = a.compare.as_slice() {
        let c = eval::compare(ea, eb)?;
        let dir = a.out_dir.clone().unwrap_or_else(|| eb.clone());
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        let json = serde_json::to_vec_pretty(&c)?;
        crate::trace::write_atomically(&dir.join("compare.json"), &json)?;
        println!("{c}");
        println!("distill: wrote {}", dir.join("compare.json").display());
        return Ok(Outcome::default());
    }
    let Some(out_dir) = a.out_dir.clone() else {
        bail!("--out-dir is required (or --compare A B)");
    };
    let p = prepare(&a.gen, (0.0, 1.0)).await?;
    #[cfg(target_os = "linux")]
    let sandbox = a
        .grade
        .sandbox(p.problems.iter().any(|q| q.reference.tests.is_some()))?;
    let cfg = EvalConfig {
        n: a.gen.n,
        sampling: p.sampling,
        concurrency: p.concurrency,
        out_dir: out_dir.clone(),
        checker: a.grade.checker,
        math: a.grade.math(),
        #[cfg(target_os = "linux")]
        sandbox,
        progress: !a.gen.quiet,
    };
    eprintln!(
        "distill: eval of {} on {} problems × {} samples ({} preset, prompt {}) → {}",
        p.teacher.info().model,
        p.problems.len(),
        a.gen.n,
        p.preset,
        p.prompt_name,
        out_dir.display()
    );
    let (summary, _) = eval::run(&p.problems, &p.template, p.teacher, &cfg).await?;
    println!("{summary}");
    if let Some(traces) = &a.kl_traces {
        let Some(model) = &a.gen.model else {
            bail!("--kl-traces needs --model (a local model)");
        };
        let model = match &a.gen.model_file {
            Some(f) => PathBuf::from(model).join(f),
            None => PathBuf::from(model),
        };
        let d = crate::eval::distance::distance(&crate::eval::distance::DistanceConfig {
            model,
            adapter: a.gen.adapter.clone(),
            traces: traces.clone(),
            labels: a.kl_labels.clone(),
            teacher: a.kl_teacher.clone(),
            top_k: 64,
            chat_template: a.gen.chat_template.as_ref().map(PathBuf::from),
            max_len: 4096,
        })?;
        println!("{d}");
        crate::trace::write_atomically(
            &out_dir.join("distance.json"),
            &serde_json::to_vec_pretty(&d)?,
        )?;
    }
    eprintln!(
        "distill: wrote {} and {}",
        out_dir.join("results.jsonl").display(),
        out_dir.join("summary.json").display()
    );
    // Failed samples count as incorrect and are reported in the summary; rerunning retries them.
    Ok(Outcome::default())
}

/// Longest time limit a flag accepts (one day): larger values would overflow a `Duration`
/// (`--timeout 1e20` panicked) and mean no limit anyway.
const MAX_SECONDS: f64 = 86_400.0;

/// Picks the local engine: candle where its model code runs the model, mistral.rs otherwise
/// (`auto`), or what the user asked for, refusing candle on a model it cannot run.
fn choose_engine(
    asked: EngineKind,
    model: &str,
    model_file: Option<&str>,
) -> anyhow::Result<EngineKind> {
    let path = match model_file {
        Some(f) => std::path::Path::new(model).join(f),
        None => PathBuf::from(model),
    };
    match asked {
        EngineKind::Mistralrs => Ok(EngineKind::Mistralrs),
        EngineKind::Candle => match crate::infer::supports(&path) {
            Ok(_) => Ok(EngineKind::Candle),
            Err(why) => bail!("--engine candle: {why}; use --engine mistralrs for this model"),
        },
        EngineKind::Auto => match crate::infer::supports(&path) {
            Ok(_) => Ok(EngineKind::Candle),
            Err(why) => {
                eprintln!(
                    "distill: the candle engine cannot run {model} ({why}); using mistral.rs"
                );
                Ok(EngineKind::Mistralrs)
            }
        },
    }
}

/// What `generate` and `eval` share: the problems, the prompt, the teacher and the sampling.
struct Prepared {
    problems: Vec<crate::data::dataset::Problem>,
    template: PromptTemplate,
    prompt_name: String,
    preset: String,
    teacher: Arc<dyn Teacher>,
    concurrency: usize,
    sampling: Sampling,
}

/// Loads the dataset and the prompt, starts the teacher and checks the sampling flags;
/// `(temperature, top_p)` are the command's defaults.
async fn prepare(a: &GenerateArgs, defaults: (f64, f64)) -> anyhow::Result<Prepared> {
    let Some(dataset) = a.dataset.clone() else {
        bail!("--dataset is required (a JSONL problem set)");
    };
    let temperature = a.temperature.unwrap_or(defaults.0);
    let top_p = a.top_p.unwrap_or(defaults.1);
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    if !(0.0..=2.0).contains(&temperature) {
        bail!("--temperature {temperature} is outside 0..=2");
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        bail!("--top-p {top_p} is outside (0, 1]");
    }
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let fields = FieldMap {
        id: a.id_field.clone(),
        question: a.question_field.clone(),
        answer: a.answer_field.clone(),
        solution: a.solution_field.clone(),
        tests: a.tests_field.clone(),
        entry_point: a.entry_point_field.clone(),
    };
    let mut ds = dataset::load(&dataset, a.preset, &fields, a.skip_invalid)?;
    if !ds.skipped.is_empty() {
        eprintln!(
            "distill: skipped {} invalid rows of {} (first: {})",
            ds.skipped.len(),
            dataset.display(),
            ds.skipped[0]
        );
    }
    if ds.duplicates > 0 {
        eprintln!(
            "distill: {} rows repeat an earlier question and were dropped",
            ds.duplicates
        );
    }
    if let Some(limit) = a.limit {
        ds.problems.truncate(limit);
    }
    let prompt_name = a
        .prompt
        .clone()
        .unwrap_or_else(|| ds.preset.default_prompt().to_string());
    let template = PromptTemplate::load(&prompt_name)?;

    let at_least = |flag: &str, v: u64, min: u64| -> anyhow::Result<()> {
        if v < min {
            bail!("{flag} {v} must be at least {min}");
        }
        Ok(())
    };
    at_least("--concurrency", a.concurrency as u64, 1)?;
    at_least("--max-batch-tokens", a.max_batch_tokens as u64, 16)?;
    at_least("--max-attempts", u64::from(a.max_attempts), 1)?;
    if let Some(r) = a.rpm {
        at_least("--rpm", u64::from(r), 1)?;
    }
    if let Some(t) = a.tpm {
        at_least("--tpm", u64::from(t), 1)?;
    }
    let mut concurrency = a.concurrency;
    let teacher: Arc<dyn Teacher> = match a.teacher {
        TeacherKind::Local => {
            let Some(model) = a.model.clone() else {
                bail!("--model is required for --teacher local (a GGUF file, model directory or hub id; scripts/fetch-test-model.sh fetches a small one)");
            };
            let engine = choose_engine(a.engine, &model, a.model_file.as_deref())?;
            if engine == EngineKind::Candle {
                let path = match &a.model_file {
                    Some(f) => std::path::Path::new(&model).join(f),
                    None => PathBuf::from(&model),
                };
                let path = crate::infer::supports(&path).unwrap_or(path);
                let sp = crate::progress::spinner(&format!("loading {model} (candle engine)"));
                let cfg = CandleConfig {
                    model: path,
                    adapter: a.adapter.clone(),
                    chat_template: a.chat_template.clone(),
                    weights: a.engine_weights,
                    batch: BatchConfig {
                        max_seqs: concurrency,
                        max_batch_tokens: a.max_batch_tokens,
                        ..BatchConfig::default()
                    },
                };
                let t = tokio::task::spawn_blocking(move || CandleTeacher::load(&cfg)).await?;
                sp.finish_and_clear();
                let t = t?;
                eprintln!(
                    "distill: engine candle, {} sequences decoded together; {}",
                    concurrency, t.description
                );
                Arc::new(t)
            } else {
                if a.adapter.is_some() {
                    bail!("--adapter needs the candle engine (mistral.rs 0.8.1 ignores LoRA adapters on GGUF models)");
                }
                if concurrency > 1 {
                    eprintln!(
                        "distill: engine mistralrs, one sequence at a time (--concurrency {concurrency} ignored: its batched sampling mixes sequences up)"
                    );
                    concurrency = 1;
                } else {
                    eprintln!("distill: engine mistralrs");
                }
                let sp = crate::progress::spinner(&format!("loading {model} with mistral.rs"));
                let t = LocalTeacher::load(&LocalConfig {
                    model,
                    model_file: a.model_file.clone(),
                    revision: a.revision.clone(),
                    max_num_seqs: 1,
                    force_cpu: a.cpu,
                    chat_template: a.chat_template.clone(),
                })
                .await;
                sp.finish_and_clear();
                Arc::new(t?)
            }
        }
        TeacherKind::Openai => {
            if a.base_urls.is_empty() {
                bail!("--teacher openai needs at least one --base-url (e.g. http://127.0.0.1:8000/v1)");
            }
            let api_key = match &a.api_key_env {
                Some(var) => match std::env::var(var) {
                    Ok(k) if !k.is_empty() => Some(ApiKey::new(k)),
                    _ => bail!("--api-key-env {var}: environment variable {var} is not set"),
                },
                None => std::env::var("OPENAI_API_KEY")
                    .ok()
                    .filter(|k| !k.is_empty())
                    .map(ApiKey::new),
            };
            if !(a.timeout > 0.0 && a.timeout <= MAX_SECONDS) {
                bail!(
                    "--timeout {} must be a number of seconds in (0, {MAX_SECONDS}]",
                    a.timeout
                );
            }
            let t = OpenAiTeacher::connect(OpenAiConfig {
                base_urls: a.base_urls.clone(),
                model: a.model.clone(),
                api_key,
                timeout: Duration::from_secs_f64(a.timeout),
                max_attempts: a.max_attempts,
                rpm: a.rpm,
                tpm: a.tpm,
                logprob_base: a.logprob_base,
                ..OpenAiConfig::default()
            })
            .await?;
            Arc::new(t)
        }
    };

    let licence = a.teacher_license.clone().or_else(|| match a.teacher {
        TeacherKind::Local => a.model.as_deref().and_then(|m| {
            let path = match &a.model_file {
                Some(f) => std::path::Path::new(m).join(f),
                None => PathBuf::from(m),
            };
            crate::teacher::licence::detect(&path)
        }),
        TeacherKind::Openai => None,
    });
    crate::teacher::licence::announce(licence.as_deref());
    let teacher: Arc<dyn Teacher> =
        Arc::new(crate::teacher::licence::Licensed::new(teacher, licence));
    Ok(Prepared {
        problems: ds.problems,
        template,
        prompt_name,
        preset: format!("{:?}", ds.preset).to_lowercase(),
        teacher,
        concurrency,
        sampling: Sampling {
            temperature,
            top_p,
            max_tokens: a.max_tokens,
            stop: a.stop.clone(),
            seed: a.seed,
            seed_honoured: None,
            top_logprobs: a.logprobs,
        },
    })
}

async fn generate_cmd(a: GenerateArgs) -> anyhow::Result<Outcome> {
    let p = prepare(&a, (0.6, 0.95)).await?;
    let dataset = a.dataset.clone().unwrap_or_default();
    let cfg = GenerateConfig {
        n: a.n,
        sampling: p.sampling,
        concurrency: p.concurrency,
        out: a.out.clone(),
        progress: !a.quiet,
    };
    eprintln!(
        "distill: {} problems × {} samples from {} ({} preset, prompt {}) → {}",
        p.problems.len(),
        a.n,
        dataset.display(),
        p.preset,
        p.prompt_name,
        a.out.display()
    );
    let summary: GenerateSummary = generate::run(&p.problems, &p.template, p.teacher, &cfg).await?;
    eprintln!("{summary}");
    if summary.interrupted {
        eprintln!(
            "distill: interrupted; {} holds every finished sample. Rerun the same command to resume.",
            a.out.display()
        );
    } else if summary.samples_failed > 0 {
        eprintln!(
            "distill: {} samples failed (their records carry `error`); rerun the same command to retry them",
            summary.samples_failed
        );
    }
    Ok(Outcome {
        failed_records: summary.samples_failed,
        interrupted: summary.interrupted,
    })
}

fn check_cmd(a: CheckArgs) -> anyhow::Result<Outcome> {
    use std::io::{BufRead, BufReader, BufWriter, Write};
    let (mut input, name): (Box<dyn BufRead>, String) = if a.input == "-" {
        (Box::new(BufReader::new(std::io::stdin())), "<stdin>".into())
    } else {
        let f =
            std::fs::File::open(&a.input).with_context(|| format!("{}: cannot open", a.input))?;
        (Box::new(BufReader::new(f)), a.input.clone())
    };
    // Write to a temporary sibling and rename at the end: a failed run never leaves half a file.
    let tmp = a.out.as_ref().map(|p| {
        let mut n = p.file_name().unwrap_or_default().to_os_string();
        n.push(".partial");
        p.with_file_name(n)
    });
    let mut out: Box<dyn Write> = match &tmp {
        Some(t) => Box::new(BufWriter::new(
            std::fs::File::create(t).with_context(|| format!("{}: cannot create", t.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let started = std::time::Instant::now();
    if let Some(w) = a.workers {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(w.max(1))
            .build_global();
    }
    let summary = match a.kind {
        CheckKind::Math => {
            let opts = crate::check::math::MathOptions {
                budget_ms: a.budget_ms,
                ..Default::default()
            };
            crate::check::rows::check_math_rows(&mut input, &name, &mut out, &opts)?
        }
        CheckKind::Code => check_code(&a, &mut input, &name, &mut out)?,
    };
    out.flush().context("writing output")?;
    drop(out);
    if let (Some(t), Some(p)) = (&tmp, &a.out) {
        std::fs::rename(t, p).with_context(|| format!("{}: cannot write", p.display()))?;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "check {}: {} rows, {} passed ({:.1}%), {:.2}s ({:.0} rows/s)",
        format!("{:?}", a.kind).to_lowercase(),
        summary.rows,
        summary.passed,
        100.0 * summary.passed as f64 / summary.rows.max(1) as f64,
        secs,
        summary.rows as f64 / secs.max(1e-9)
    );
    Ok(Outcome::default())
}

#[cfg(target_os = "linux")]
fn check_code(
    a: &CheckArgs,
    input: &mut dyn std::io::BufRead,
    name: &str,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<crate::check::rows::RowsSummary> {
    use crate::check::code::{Sandbox, SandboxConfig};
    if !(a.timeout > 0.0 && a.timeout <= MAX_SECONDS) {
        bail!(
            "--timeout {} must be a number of seconds in (0, {MAX_SECONDS}]",
            a.timeout
        );
    }
    let cfg = SandboxConfig {
        wall_timeout: Duration::from_secs_f64(a.timeout),
        cpu_time_limit: Duration::from_secs_f64(a.timeout),
        memory_limit_bytes: a.memory_mb.saturating_mul(1 << 20),
        workers: a.workers.unwrap_or(0),
        fork_server: !a.no_fork_server,
        allow_read: a.allow_read.clone(),
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::new(cfg)?;
    tracing::info!(isolation = ?sandbox.isolation(), "code sandbox ready");
    Ok(crate::check::rows::check_code_rows(
        input, name, out, &sandbox,
    )?)
}

#[cfg(not(target_os = "linux"))]
fn check_code(
    _a: &CheckArgs,
    _input: &mut dyn std::io::BufRead,
    _name: &str,
    _out: &mut dyn std::io::Write,
) -> anyhow::Result<crate::check::rows::RowsSummary> {
    bail!("the code checker's sandbox needs Linux (namespaces and rlimits)")
}

fn filter_cmd(a: FilterArgs) -> anyhow::Result<Outcome> {
    use crate::filter::decontam::{DecontamParams, EvalIndex};
    use crate::filter::dedup::{DedupConfig, MinHashParams};
    use crate::filter::rules::RuleSet;
    use crate::filter::stage::{self, FilterConfig};

    let mut rules = if a.no_default_rules {
        RuleSet::default()
    } else {
        RuleSet::builtin_default()?
    };
    for p in &a.rules {
        let more = if p.is_dir() {
            RuleSet::load_dir(p)?
        } else {
            RuleSet::load_file(p)?
        };
        rules.extend(more)?;
    }
    for id in &a.disable_rule {
        if rules.get(id).is_none() {
            bail!(
                "--disable-rule {id}: no rule with that id (loaded: {})",
                rules
                    .rules()
                    .iter()
                    .map(|r| r.id())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    rules.retain(|r| !a.disable_rule.iter().any(|d| d == r.id()));
    let pass_rate = match &a.pass_rate {
        None => None,
        Some(s) => {
            let parsed = s.split_once(':').and_then(|(lo, hi)| {
                Some((
                    lo.trim().parse::<f64>().ok()?,
                    hi.trim().parse::<f64>().ok()?,
                ))
            });
            match parsed {
                Some((lo, hi))
                    if (0.0..=1.0).contains(&lo) && (0.0..=1.0).contains(&hi) && lo <= hi =>
                {
                    Some((lo, hi))
                }
                _ => bail!(
                    "--pass-rate {s}: expected MIN:MAX with 0 <= MIN <= MAX <= 1, e.g. 0.1:0.9"
                ),
            }
        }
    };
    let eval_index = if a.eval_set.is_empty() {
        None
    } else {
        let mut index = EvalIndex::new(DecontamParams {
            n: a.ngram,
            ..DecontamParams::default()
        })?;
        for p in &a.eval_set {
            let ds = dataset::load(p, Preset::Auto, &FieldMap::default(), false)?;
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            for prob in &ds.problems {
                index.add(format!("{stem}/{}", prob.id), &prob.question);
            }
        }
        eprintln!(
            "distill: decontaminating against {} eval items ({} {}-grams)",
            index.num_items(),
            index.num_ngrams(),
            a.ngram
        );
        Some(index)
    };
    let dedup = if a.no_exact_dup && a.no_near_dup {
        None
    } else {
        Some(DedupConfig {
            exact: !a.no_exact_dup,
            near: if a.no_near_dup {
                None
            } else {
                Some(MinHashParams::with_threshold(a.near_dup)?)
            },
        })
    };
    #[cfg(target_os = "linux")]
    let sandbox = a.grade.sandbox(true)?;
    let cfg = FilterConfig {
        rules,
        checker: a.grade.checker,
        math: a.grade.math(),
        #[cfg(target_os = "linux")]
        sandbox,
        dedup,
        eval_index,
        decontam_completions: a.decontam_completions,
        pass_rate,
        max_per_problem: a.max_per_problem,
        out_dir: a.out_dir.clone(),
        progress: !a.quiet,
    };
    let summary = stage::run(&a.traces, &cfg)?;
    eprint!("{summary}");
    eprintln!("  outputs in {}", a.out_dir.display());
    Ok(Outcome::default())
}

/// `9:14,19:29` → `[[9, 14], [19, 29]]`.
fn parse_pairs(spec: &str) -> anyhow::Result<Vec<[usize; 2]>> {
    spec.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (s, t) = p
                .split_once(':')
                .with_context(|| format!("--feature-pairs: `{p}` is not STUDENT:TEACHER"))?;
            Ok([
                s.trim()
                    .parse()
                    .with_context(|| format!("--feature-pairs: `{p}`: bad student layer"))?,
                t.trim()
                    .parse()
                    .with_context(|| format!("--feature-pairs: `{p}`: bad teacher layer"))?,
            ])
        })
        .collect()
}

fn label_cmd(a: LabelArgs) -> anyhow::Result<Outcome> {
    let cfg = crate::label::LabelConfig {
        model: a.model.clone(),
        adapter: a.adapter.clone(),
        traces: a.traces.clone(),
        out_dir: a.out.clone(),
        top_k: a.top_k,
        chat_template: a.chat_template.clone(),
        eot_token: a.eot_token.clone(),
        max_len: a.max_len,
        batch: BatchConfig {
            max_seqs: a.concurrency.max(1),
            max_step_tokens: 2048,
            ..BatchConfig::default()
        },
        quiet: a.quiet,
    };
    let s = if a.from_trace_logprobs {
        eprintln!(
            "label: from the log-probabilities stored in {}, token texts mapped by {}'s tokenizer",
            a.traces.display(),
            a.model.display()
        );
        crate::label::label_from_trace_logprobs(&cfg)?
    } else {
        eprintln!(
            "label: teacher {} on the candle engine, top-{} per supervised token",
            a.model.display(),
            a.top_k
        );
        crate::label::label(&cfg)?
    };
    eprintln!(
        "label: {} traces: {} labelled now, {} already, {} skipped (failed, without \
         log-probabilities or longer than --max-len){}; {} positions, {:.0} bytes/token{}; \
         the top entries leave {:.2}% of the mass on average; in {}",
        s.traces,
        s.labelled,
        s.resumed,
        s.skipped,
        if s.unaligned > 0 {
            format!(", {} whose tokens do not match their encoding", s.unaligned)
        } else {
            String::new()
        },
        s.positions,
        s.bytes_per_token,
        if s.tokens_per_s > 0.0 {
            format!(", {:.0} teacher tokens/s", s.tokens_per_s)
        } else {
            String::new()
        },
        100.0 * s.mean_tail_mass,
        a.out.display()
    );
    Ok(Outcome::default())
}

fn prune_cmd(a: PruneArgs) -> anyhow::Result<Outcome> {
    use crate::model::prune;
    let base_cfg = crate::model::load::BaseModel::load(&a.model, &candle_core::Device::Cpu)?.config;
    let total = base_cfg.num_hidden_layers;
    let keep = match (&a.keep_layers, a.layers) {
        (Some(spec), _) => {
            prune::parse_layers(spec, total).map_err(|e| anyhow::anyhow!("--keep-layers: {e}"))?
        }
        (None, Some(n)) => {
            if n == 0 || n > total {
                bail!("--layers {n}: the model has {total} layers");
            }
            prune::uniform_keep(total, n)
        }
        (None, None) => bail!("give --keep-layers or --layers"),
    };
    let cut = prune::prune_to_dir(&a.model, &keep, &a.out)?;
    eprintln!(
        "prune: kept {} of {total} layers {keep:?}; wrote {} ({} hidden, vocabulary unchanged)",
        keep.len(),
        a.out.display(),
        cut.config.hidden_size
    );
    Ok(Outcome::default())
}

fn train_cmd(a: TrainArgs) -> anyhow::Result<Outcome> {
    use crate::train::config::{Resume, TrainConfig, TrainOverrides};
    let base = match &a.config {
        Some(p) => TrainConfig::from_file(p)?,
        None => TrainConfig::default(),
    };
    let overrides = TrainOverrides {
        model: a.model.clone(),
        data: a.data.clone(),
        out_dir: a.out.clone(),
        chat_template: a.chat_template.clone(),
        max_len: a.max_len,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        lr: a.lr,
        warmup_steps: a.warmup_steps,
        max_steps: a.max_steps,
        epochs: a.epochs,
        seed: a.seed,
        save_every: a.save_every,
        eval_every: a.eval_every,
        lora_r: a.lora_r,
        lora_alpha: a.lora_alpha,
        lora_dropout: a.lora_dropout,
        packing: a.packing.then_some(true),
        full_finetune: a.full_finetune.then_some(true),
        device: None,
        resume: match (&a.resume_from, a.resume) {
            (Some(p), _) => Some(Resume::From(p.clone())),
            (None, true) => Some(Resume::Latest),
            (None, false) => None,
        },
        stop_after: None,
        quiet: a.quiet,
        loss_kind: a.loss,
        kd_alpha: a.kd_alpha,
        kd_divergence: a.kd_divergence,
        kd_beta: a.kd_beta,
        kd_temperature: a.kd_temperature,
        soft_labels: a.soft_labels.clone(),
        teacher: a.teacher.clone(),
        kd_top_k: a.kd_top_k,
        feature_layers: a.feature_layers,
        feature_pairs: match &a.feature_pairs {
            Some(p) => Some(parse_pairs(p)?),
            None => None,
        },
        feature_loss: a.feature_loss,
        feature_weight: a.feature_weight,
    };
    let cfg = overrides.apply(&base);
    if cfg.model.as_os_str().is_empty() {
        bail!(
            "--model is required (or `model` in --config): a Hugging Face directory or GGUF file"
        );
    }
    if cfg.data.as_os_str().is_empty() {
        bail!("--data is required (or `data` in --config): a trace JSONL file");
    }
    let report = crate::train::train(&cfg, &overrides)?;
    eprintln!(
        "train: {} steps, {} tokens in {:.1}s ({:.1} tokens/s), final loss {}, val loss {}",
        report.steps,
        report.tokens,
        report.elapsed_s,
        report.tokens_per_s,
        report
            .history
            .last()
            .map_or("n/a".to_string(), |m| format!("{:.4}", m.loss)),
        report
            .val_loss
            .map_or("n/a".to_string(), |v| format!("{v:.4}"))
    );
    if let Some(dir) = &report.adapter_dir {
        crate::teacher::licence::write_model_card(dir, &cfg.data)
            .with_context(|| format!("writing the model card in {}", dir.display()))?;
        // The teacher of response / feature distillation: the label directory's or the live one.
        let kd_teacher = if cfg.loss.distils() || cfg.loss.features() {
            match (&cfg.loss.soft_labels, &cfg.loss.teacher) {
                (Some(dir), _) if cfg.loss.distils() => {
                    crate::label::read_meta(dir).ok().map(|m| {
                        (
                            PathBuf::from(m.teacher.split(" + ").next().unwrap_or("")),
                            "soft labels",
                        )
                    })
                }
                (_, Some(t)) => Some((t.clone(), "soft labels and hidden states, online")),
                _ => None,
            }
        } else {
            None
        };
        if let Some((t, how)) = kd_teacher {
            crate::teacher::licence::add_distillation_teacher(dir, &t, how)
                .with_context(|| format!("writing the model card in {}", dir.display()))?;
        }
        eprintln!(
            "train: {} in {} (model card README.md with the teachers' licences)",
            if cfg.full_finetune {
                "model (every decoder layer trained)"
            } else {
                "PEFT adapter"
            },
            dir.display()
        );
    }
    Ok(Outcome::default())
}
