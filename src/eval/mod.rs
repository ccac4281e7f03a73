//! `distill eval`: generation plus grading, and the paired comparison of two evaluations.
//!
//! An evaluation is the generate stage run on a model (a base, a base plus an adapter, a
//! merged directory, or an OpenAI-compatible endpoint) followed by the grading function the
//! filter uses ([`crate::check::grade`]): no third path, so a filter's pass rate and an
//! evaluation's accuracy mean the same thing. Its output directory holds:
//! - `traces.jsonl`: the trace records (resumable, auditable like any other);
//! - `results.jsonl`: one line per problem: samples, correct, verdicts;
//! - `summary.json`: pass@1 with a 95% interval, pass@k, maj@k, the model's identity, the
//!   checker version and the sampling.
//!
//! [`compare`] pairs two evaluations over their shared problems: the change in pass@1 with a
//! 95% interval, a paired permutation test, and the problems won and lost.

pub mod deploy;
pub mod distance;
pub mod stats;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::check::grade::{grade_traces, CheckerKind, CHECKER_VERSION};
use crate::check::math::MathOptions;
use crate::data::dataset::Problem;
use crate::data::prompt::PromptTemplate;
use crate::generate::{self, GenerateConfig, GenerateError};
use crate::teacher::Teacher;
use crate::trace::{self, Sampling, TeacherInfo, Trace, TraceFileError};

/// Errors of an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Generation failed.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// A trace or result file could not be read or written.
    #[error(transparent)]
    TraceFile(#[from] TraceFileError),
    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Grading failed (code traces without a sandbox).
    #[error("trace {id}: {message}")]
    Grade {
        /// The trace.
        id: String,
        /// Why.
        message: String,
    },
    /// Ctrl-C stopped generation; rerunning resumes.
    #[error("interrupted; {0} holds every finished sample, rerun the same command to resume")]
    Interrupted(PathBuf),
}

/// Settings of one evaluation.
pub struct EvalConfig {
    /// Samples per problem.
    pub n: u32,
    /// Sampling (temperature 0: greedy).
    pub sampling: Sampling,
    /// Requests in flight (sequences decoded together on the candle engine).
    pub concurrency: usize,
    /// Output directory.
    pub out_dir: PathBuf,
    /// Which checker grades the samples.
    pub checker: CheckerKind,
    /// Math checker options.
    pub math: MathOptions,
    /// Code sandbox, for code problems.
    #[cfg(target_os = "linux")]
    pub sandbox: Option<crate::check::code::Sandbox>,
    /// Show progress.
    pub progress: bool,
}

/// One problem's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProblemResult {
    /// The problem.
    pub problem_id: String,
    /// Samples graded.
    pub n: usize,
    /// Samples graded correct.
    pub correct: usize,
    /// Each sample's verdict, in sample order (`generation_failed`, `ungraded` where no
    /// checker ran).
    pub verdicts: Vec<String>,
    /// Each sample's normalised final answer, where one was extracted (for maj@k).
    pub answers: Vec<Option<String>>,
}

impl ProblemResult {
    /// The problem's pass@1 estimate: the fraction of its samples graded correct.
    pub fn score(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.correct as f64 / self.n as f64
        }
    }
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalSummary {
    /// Problems evaluated.
    pub n_problems: usize,
    /// Samples graded.
    pub n_samples: usize,
    /// Mean over problems of the fraction of samples correct.
    #[serde(rename = "pass@1")]
    pub pass_at_1: f64,
    /// 95% interval of pass@1 (Wilson for one sample per problem, else normal over problems).
    #[serde(rename = "pass@1_ci95")]
    pub pass_at_1_ci95: (f64, f64),
    /// Unbiased pass@k for every k the samples allow (powers of two and n).
    pub pass_at_k: BTreeMap<String, f64>,
    /// Majority vote over the first k samples' final answers.
    pub maj_at_k: BTreeMap<String, f64>,
    /// Samples that failed to generate (counted as incorrect).
    pub failed_samples: usize,
    /// Samples truncated at `max_tokens`.
    pub truncated_samples: usize,
    /// The model: backend, file hash, adapter hash, engine.
    pub model: TeacherInfo,
    /// Version of the grading rules.
    pub checker_version: String,
    /// The checker choice.
    pub checker: CheckerKind,
    /// Sampling, with the run seed and whether the engine honours it.
    pub sampling: Sampling,
    /// Whether the seed was honoured by the engine.
    pub seed_honoured: Option<bool>,
    /// Samples per problem.
    pub samples_per_problem: u32,
    /// Wall time of generation and of grading, seconds.
    pub generate_seconds: f64,
    /// Wall time of grading, seconds.
    pub grade_seconds: f64,
    /// Completion tokens generated by this run.
    pub completion_tokens: u64,
}

fn file_err(path: &Path, e: impl ToString) -> EvalError {
    EvalError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The ks reported for `n` samples: powers of two up to `n`, and `n`.
fn ks(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = std::iter::successors(Some(1usize), |k| Some(k * 2))
        .take_while(|&k| k <= n)
        .collect();
    if n > 0 && v.last() != Some(&n) {
        v.push(n);
    }
    v
}

/// The final answer a grader extracted, for majority voting.
fn extracted_answer(evidence: &serde_json::Value) -> Option<String> {
    evidence
        .get("pred_normal")
        .and_then(|v| v.as_str())
        .map(str::to_string)
}

/// A sample with its index, trace and grade.
type Graded<'a> = (u32, &'a Trace, Option<&'a crate::check::grade::CheckResult>);

/// Runs an evaluation: generates (resuming), grades, writes results and summary.
pub async fn run(
    problems: &[Problem],
    template: &PromptTemplate,
    teacher: Arc<dyn Teacher>,
    cfg: &EvalConfig,
) -> Result<(EvalSummary, Vec<ProblemResult>), EvalError> {
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| file_err(&cfg.out_dir, e))?;
    let traces_path = cfg.out_dir.join("traces.jsonl");
    let gcfg = GenerateConfig {
        n: cfg.n,
        sampling: cfg.sampling.clone(),
        concurrency: cfg.concurrency,
        out: traces_path.clone(),
        progress: cfg.progress,
    };
    let ids = generate::planned_ids(problems, template, teacher.as_ref(), &gcfg)?;
    let t0 = Instant::now();
    let gen = generate::run(problems, template, teacher.clone(), &gcfg).await?;
    let generate_seconds = t0.elapsed().as_secs_f64();
    if gen.interrupted {
        return Err(EvalError::Interrupted(traces_path));
    }
    // This run's records only: the directory may hold earlier runs with other settings.
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut by_id: HashMap<String, Trace> = HashMap::new();
    for t in trace::read_traces(&traces_path)? {
        if wanted.contains(t.id.as_str()) {
            by_id.insert(t.id.clone(), t);
        }
    }
    let traces: Vec<&Trace> = ids.iter().filter_map(|id| by_id.get(id)).collect();
    let t1 = Instant::now();
    #[cfg(target_os = "linux")]
    let sandbox = cfg.sandbox.as_ref();
    #[cfg(not(target_os = "linux"))]
    let sandbox = None;
    let grades =
        grade_traces(&traces, cfg.checker, &cfg.math, sandbox).map_err(|e| EvalError::Grade {
            id: e.id,
            message: e.message,
        })?;
    let grade_seconds = t1.elapsed().as_secs_f64();

    // Group by problem, in dataset order, samples in index order.
    let mut per: HashMap<&str, Vec<Graded<'_>>> = HashMap::new();
    for (t, g) in traces.iter().zip(&grades) {
        per.entry(t.problem_id.as_str())
            .or_default()
            .push((t.sample_index, t, g.as_ref()));
    }
    let mut results = Vec::with_capacity(problems.len());
    let (mut failed, mut truncated) = (0, 0);
    for p in problems {
        let Some(samples) = per.get_mut(p.id.as_str()) else {
            continue;
        };
        samples.sort_by_key(|s| s.0);
        let mut r = ProblemResult {
            problem_id: p.id.clone(),
            n: samples.len(),
            correct: 0,
            verdicts: Vec::new(),
            answers: Vec::new(),
        };
        for (_, t, g) in samples.iter() {
            if !t.is_ok() {
                failed += 1;
            }
            if t.finish_reason == Some(crate::trace::FinishReason::Length) {
                truncated += 1;
            }
            match g {
                Some(g) => {
                    r.correct += usize::from(g.passed);
                    r.verdicts.push(g.verdict.clone());
                    r.answers.push(extracted_answer(&g.evidence));
                }
                None => {
                    r.verdicts.push(if t.is_ok() {
                        "ungraded".into()
                    } else {
                        "generation_failed".into()
                    });
                    r.answers.push(None);
                }
            }
        }
        results.push(r);
    }
    let scores: Vec<f64> = results.iter().map(ProblemResult::score).collect();
    let (pass1, ci) = stats::mean_ci95(&scores);
    let n_min = results.iter().map(|r| r.n).min().unwrap_or(0);
    let mut pass_at_k = BTreeMap::new();
    let mut maj_at_k = BTreeMap::new();
    for k in ks(n_min) {
        let vals: Vec<f64> = results
            .iter()
            .filter_map(|r| stats::pass_at_k(r.n, r.correct, k))
            .collect();
        if !vals.is_empty() {
            pass_at_k.insert(
                format!("pass@{k}"),
                vals.iter().sum::<f64>() / vals.len() as f64,
            );
        }
        let votes: Vec<f64> = results
            .iter()
            .filter_map(|r| {
                let pairs: Vec<(Option<String>, bool)> = r
                    .answers
                    .iter()
                    .zip(&r.verdicts)
                    .map(|(a, v)| (a.clone(), v == "correct"))
                    .collect();
                stats::maj_at_k(&pairs, k).map(|b| f64::from(u8::from(b)))
            })
            .collect();
        if !votes.is_empty() {
            maj_at_k.insert(
                format!("maj@{k}"),
                votes.iter().sum::<f64>() / votes.len() as f64,
            );
        }
    }
    let mut sampling = cfg.sampling.clone();
    sampling.seed_honoured = sampling.seed.and(teacher.seed_honoured());
    let summary = EvalSummary {
        n_problems: results.len(),
        n_samples: results.iter().map(|r| r.n).sum(),
        pass_at_1: pass1,
        pass_at_1_ci95: ci,
        pass_at_k,
        maj_at_k,
        failed_samples: failed,
        truncated_samples: truncated,
        model: teacher.info().clone(),
        checker_version: CHECKER_VERSION.to_string(),
        checker: cfg.checker,
        seed_honoured: sampling.seed_honoured,
        sampling,
        samples_per_problem: cfg.n,
        generate_seconds,
        grade_seconds,
        completion_tokens: gen.completion_tokens,
    };
    let mut lines = String::new();
    for r in &results {
        lines.push_str(&serde_json::to_string(r).map_err(|e| file_err(&cfg.out_dir, e))?);
        lines.push('\n');
    }
    trace::write_atomically(&cfg.out_dir.join("results.jsonl"), lines.as_bytes())?;
    let json = serde_json::to_vec_pretty(&summary).map_err(|e| file_err(&cfg.out_dir, e))?;
    trace::write_atomically(&cfg.out_dir.join("summary.json"), &json)?;
    Ok((summary, results))
}

impl std::fmt::Display for EvalSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "eval: {} problems, {} samples; pass@1 {:.1}% [{:.1}, {:.1}]",
            self.n_problems,
            self.n_samples,
            100.0 * self.pass_at_1,
            100.0 * self.pass_at_1_ci95.0,
            100.0 * self.pass_at_1_ci95.1
        )?;
        for (k, v) in self.pass_at_k.iter().chain(&self.maj_at_k) {
            if k != "pass@1" {
                write!(f, "  {k} {:.1}%", 100.0 * v)?;
            }
        }
        if self.pass_at_k.len() > 1 {
            writeln!(f)?;
        }
        write!(
            f,
            "  {} failed, {} truncated; generation {:.1} s ({} tokens), grading {:.2} s; checker {}",
            self.failed_samples,
            self.truncated_samples,
            self.generate_seconds,
            self.completion_tokens,
            self.grade_seconds,
            self.checker_version
        )
    }
}

/// Reads an evaluation directory's `results.jsonl`.
pub fn read_results(dir: &Path) -> Result<Vec<ProblemResult>, EvalError> {
    let path = dir.join("results.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| file_err(&path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| EvalError::File {
                path: path.clone(),
                message: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// `compare.json`: evaluation `b` against `a` on their shared problems.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// The baseline directory.
    pub a: PathBuf,
    /// The compared directory.
    pub b: PathBuf,
    /// The paired statistics (`delta` = b - a in pass@1).
    #[serde(flatten)]
    pub paired: stats::Paired,
    /// pass@1 of each on the shared problems.
    pub pass_at_1_a: f64,
    /// pass@1 of `b` on the shared problems.
    pub pass_at_1_b: f64,
    /// Problems `b` got right more often.
    pub won: Vec<String>,
    /// Problems `b` got right less often.
    pub lost: Vec<String>,
    /// Problems present in only one of the two.
    pub unshared: usize,
}

/// Compares two evaluation directories on the problems they share.
pub fn compare(a: &Path, b: &Path) -> Result<Comparison, EvalError> {
    let ra = read_results(a)?;
    let rb = read_results(b)?;
    let mb: HashMap<&str, &ProblemResult> = rb.iter().map(|r| (r.problem_id.as_str(), r)).collect();
    let mut sa = Vec::new();
    let mut sb = Vec::new();
    let mut won = Vec::new();
    let mut lost = Vec::new();
    for r in &ra {
        if let Some(o) = mb.get(r.problem_id.as_str()) {
            sa.push(r.score());
            sb.push(o.score());
            if o.score() > r.score() {
                won.push(r.problem_id.clone());
            } else if o.score() < r.score() {
                lost.push(r.problem_id.clone());
            }
        }
    }
    let shared = sa.len();
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    Ok(Comparison {
        a: a.to_path_buf(),
        b: b.to_path_buf(),
        paired: stats::paired(&sa, &sb),
        pass_at_1_a: mean(&sa),
        pass_at_1_b: mean(&sb),
        won,
        lost,
        unshared: ra.len() + rb.len() - 2 * shared,
    })
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = &self.paired;
        write!(
            f,
            "compare: {} shared problems; pass@1 {:.1}% -> {:.1}%, delta {:+.1} points [{:+.1}, {:+.1}], p = {:.4}; {} won, {} lost",
            p.n,
            100.0 * self.pass_at_1_a,
            100.0 * self.pass_at_1_b,
            100.0 * p.delta,
            100.0 * p.ci95.0,
            100.0 * p.ci95.1,
            p.p_value,
            p.wins,
            p.losses
        )
    }
}
