//! The filter stage: traces in, `kept.jsonl` and `rejected.jsonl` out, every rejected trace with
//! machine-readable reasons and evidence, and `summary.json` with the funnel.
//!
//! Stages, in funnel order (a trace is counted against the first stage that rejects it):
//! 1. `input`: samples that failed generation;
//! 2. `rules`: rule files ([`super::rules`]), all rules evaluated, every finding recorded;
//! 3. `checker`: math answer equivalence or code run against tests, per trace;
//! 4. `decontam`: prompt (and optionally completion) n-gram overlap with evaluation sets;
//! 5. `dedup`: exact and near-duplicate completions among the traces still kept;
//! 6. `pass_rate`: keep problems the teacher solves sometimes but not always (optional window);
//! 7. `cap`: at most k kept traces per problem (optional).
//!
//! The input is streamed twice: the first pass decides (in parallel chunks, with sequential
//! dedup so results do not depend on thread count), the second writes each trace with its
//! verdict in input order. Checker results are cached per trace id and checker settings in
//! `check_cache.jsonl`, so changing a rule never re-runs the code checker on 100k traces.
//! Outputs are written to `.partial` files and renamed at the end; `summary.json` is written
//! last and marks the run complete.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::decontam::EvalIndex;
use super::dedup::{DedupConfig, DedupVerdict, Deduplicator};
use super::rules::{RuleInput, RuleSet};
use crate::check::grade::{checker_for, grade_traces};
pub use crate::check::grade::{CheckResult, CheckerKind};
use crate::check::math::MathOptions;
use crate::trace::{FinishReason, Trace};

/// Traces decided per parallel chunk.
const CHUNK: usize = 1024;

/// The funnel's stages, in order.
pub const STAGES: [&str; 7] = [
    "input",
    "rules",
    "checker",
    "decontam",
    "dedup",
    "pass_rate",
    "cap",
];

/// Settings of one filter run.
pub struct FilterConfig {
    /// Rules to apply.
    pub rules: RuleSet,
    /// Checker choice.
    pub checker: CheckerKind,
    /// Math checker options.
    pub math: MathOptions,
    /// Code sandbox (needed when code traces are checked).
    #[cfg(target_os = "linux")]
    pub sandbox: Option<crate::check::code::Sandbox>,
    /// Duplicate detection over the assistant text.
    pub dedup: Option<DedupConfig>,
    /// Evaluation sets to decontaminate against.
    pub eval_index: Option<EvalIndex>,
    /// Also look for evaluation n-grams in completions, not only prompts.
    pub decontam_completions: bool,
    /// Keep only problems whose pass rate is within `[min, max]`.
    pub pass_rate: Option<(f64, f64)>,
    /// Keep at most this many traces per problem.
    pub max_per_problem: Option<usize>,
    /// Output directory.
    pub out_dir: PathBuf,
    /// Show a progress bar.
    pub progress: bool,
}

/// One reason a trace was rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    /// Funnel stage that found it.
    pub stage: String,
    /// Machine-readable code: `rule:<id>`, `checker:<verdict>`, `exact_dup`, `near_dup`,
    /// `contaminated`, `pass_rate`, `cap`, `generation_failed`.
    pub code: String,
    /// One line for humans.
    pub detail: String,
    /// Field a span points into (`completion`, `reasoning`, `prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Byte range in that field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span: Option<(usize, usize)>,
    /// Stage-specific details (checker evidence, dedup partner, matched n-gram).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub evidence: Value,
}

/// What the filter decided for one trace; written as the trace's `filter` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Kept for training.
    pub kept: bool,
    /// Why not (all findings of the evaluated stages).
    pub reasons: Vec<Reason>,
    /// Checker result, when a checker ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckResult>,
}

/// One row of the funnel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunnelRow {
    /// Stage name.
    pub stage: String,
    /// Traces this stage removed first.
    pub removed: u64,
    /// Traces left after it.
    pub remaining: u64,
}

/// `summary.json`: the funnel and reason counts of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FilterSummary {
    /// Traces read.
    pub input: u64,
    /// Traces kept.
    pub kept: u64,
    /// Traces rejected.
    pub rejected: u64,
    /// Funnel, in stage order.
    pub funnel: Vec<FunnelRow>,
    /// Count of every reason code (a trace may have several).
    pub reasons: BTreeMap<String, u64>,
    /// Checker results reused from the cache.
    pub checker_cached: u64,
    /// Checker runs this time.
    pub checker_ran: u64,
    /// Wall time.
    pub wall_seconds: f64,
}

impl std::fmt::Display for FilterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "filter: {} traces in, {} kept, {} rejected ({:.1}s; checker ran {}, cached {})",
            self.input,
            self.kept,
            self.rejected,
            self.wall_seconds,
            self.checker_ran,
            self.checker_cached
        )?;
        for row in &self.funnel {
            writeln!(
                f,
                "  {:<10} -{:<7} {:>8} left",
                row.stage, row.removed, row.remaining
            )?;
        }
        if self.kept == 0 && self.input > 0 {
            if let Some((code, n)) = self.reasons.iter().max_by_key(|(_, n)| **n) {
                writeln!(f, "  nothing kept: the most frequent reason is `{code}` ({n}); see rejected.jsonl or `distill audit`")?;
            }
        }
        Ok(())
    }
}

/// Errors of the filter stage, naming files and lines.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// File at fault.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A trace line is not a valid record.
    #[error("{path}:{line}: not a valid trace record: {message}")]
    BadRecord {
        /// File at fault.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What serde said.
        message: String,
    },
    /// Code traces need the sandbox, which could not be set up.
    #[error("trace {id} needs the code checker: {message}")]
    NoSandbox {
        /// Trace id.
        id: String,
        /// Why.
        message: String,
    },
    /// Duplicate detection settings are invalid.
    #[error("dedup settings: {0}")]
    Dedup(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FilterError + '_ {
    move |source| FilterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads traces in chunks with their line numbers.
struct TraceReader {
    path: PathBuf,
    lines: std::io::Lines<BufReader<File>>,
    line: usize,
}

impl TraceReader {
    fn open(path: &Path) -> Result<Self, FilterError> {
        let f = File::open(path).map_err(io(path))?;
        Ok(TraceReader {
            path: path.to_path_buf(),
            lines: BufReader::new(f).lines(),
            line: 0,
        })
    }

    fn chunk(&mut self) -> Result<Vec<Trace>, FilterError> {
        let mut out = Vec::with_capacity(CHUNK);
        while out.len() < CHUNK {
            let Some(line) = self.lines.next() else { break };
            let line = line.map_err(io(&self.path))?;
            self.line += 1;
            if line.trim().is_empty() {
                continue;
            }
            let t = serde_json::from_str(&line).map_err(|e| FilterError::BadRecord {
                path: self.path.clone(),
                line: self.line,
                message: e.to_string(),
            })?;
            out.push(t);
        }
        Ok(out)
    }
}

/// Key of a checker result in the cache: trace id + what the checker was asked.
fn cache_key(trace: &Trace, kind: &str, settings: &str) -> String {
    let mut h = Sha256::new();
    h.update(trace.id.as_bytes());
    h.update(kind.as_bytes());
    h.update(settings.as_bytes());
    h.update(trace.completion.as_deref().unwrap_or_default().as_bytes());
    hex::encode(&h.finalize()[..16])
}

/// Runs the stage. Returns the summary (also written to `summary.json`).
pub fn run(traces_path: &Path, cfg: &FilterConfig) -> Result<FilterSummary, FilterError> {
    let started = Instant::now();
    std::fs::create_dir_all(&cfg.out_dir).map_err(io(&cfg.out_dir))?;
    let cache_path = cfg.out_dir.join("check_cache.jsonl");
    let mut cache = load_cache(&cache_path)?;
    let mut cache_out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cache_path)
        .map_err(io(&cache_path))?;
    let math_settings = serde_json::to_string(&cfg.math).unwrap_or_default();
    #[cfg(target_os = "linux")]
    let code_settings = cfg
        .sandbox
        .as_ref()
        // The isolation in force is part of the key: a verdict (and its evidence) obtained
        // under weaker isolation is not reused.
        .map(|s| format!("{:?} {:?}", s.config(), s.isolation()))
        .unwrap_or_default();
    #[cfg(not(target_os = "linux"))]
    let code_settings = String::new();

    let total_lines = count_lines(traces_path)?;
    let pb = if cfg.progress {
        crate::progress::bar(total_lines, "traces")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut dedup = match &cfg.dedup {
        Some(d) => Some(Deduplicator::new(d).map_err(|e| FilterError::Dedup(e.to_string()))?),
        None => None,
    };
    let mut summary = FilterSummary::default();

    // Pass 1: decide.
    let mut decisions: Vec<(String, String, Decision)> = Vec::new(); // (id, problem_id, decision)
    let mut reader = TraceReader::open(traces_path)?;
    loop {
        let chunk = reader.chunk()?;
        if chunk.is_empty() {
            break;
        }
        // Checker: cached results first, then math in parallel and code in the sandbox.
        let kinds: Vec<Option<&'static str>> = chunk
            .iter()
            .map(|t| {
                if t.is_ok() {
                    checker_for(t, cfg.checker)
                } else {
                    None
                }
            })
            .collect();
        let keys: Vec<Option<String>> = chunk
            .iter()
            .zip(&kinds)
            .map(|(t, k)| {
                k.map(|k| {
                    let settings = if k == "math" {
                        &math_settings
                    } else {
                        &code_settings
                    };
                    cache_key(t, k, settings)
                })
            })
            .collect();
        let mut checks: Vec<Option<CheckResult>> = keys
            .iter()
            .map(|k| k.as_ref().and_then(|k| cache.get(k).cloned()))
            .collect();
        summary.checker_cached += checks.iter().filter(|c| c.is_some()).count() as u64;
        let todo: Vec<usize> = (0..chunk.len())
            .filter(|&i| checks[i].is_none() && kinds[i].is_some())
            .collect();
        let refs: Vec<&Trace> = todo.iter().map(|&i| &chunk[i]).collect();
        #[cfg(target_os = "linux")]
        let sandbox = cfg.sandbox.as_ref();
        #[cfg(not(target_os = "linux"))]
        let sandbox = None;
        let results = grade_traces(&refs, cfg.checker, &cfg.math, sandbox).map_err(|e| {
            FilterError::NoSandbox {
                id: e.id,
                message: e.message,
            }
        })?;
        for (i, r) in todo.into_iter().zip(results) {
            if r.is_some() {
                summary.checker_ran += 1;
            }
            checks[i] = r;
        }
        // Persist new checker results.
        for (k, c) in keys.iter().zip(&checks) {
            if let (Some(k), Some(c)) = (k, c) {
                if !cache.contains_key(k) {
                    let line = json!({"key": k, "result": c}).to_string();
                    writeln!(cache_out, "{line}").map_err(io(&cache_path))?;
                    cache.insert(k.clone(), c.clone());
                }
            }
        }

        // Rules and decontamination, in parallel.
        let per_trace: Vec<Vec<Reason>> = chunk
            .par_iter()
            .map(|t| rule_and_decontam_reasons(t, cfg))
            .collect();

        // Sequential part: assemble decisions and dedup among survivors, in input order.
        for ((t, mut reasons), check) in chunk.iter().zip(per_trace).zip(checks) {
            if let Some(c) = &check {
                if !c.passed {
                    reasons.push(Reason {
                        stage: "checker".into(),
                        code: format!("checker:{}", c.verdict),
                        detail: checker_detail(c),
                        field: Some("completion".into()),
                        span: c.evidence.pointer("/pred_span").and_then(|s| {
                            Some((
                                s.get("start")?.as_u64()? as usize,
                                s.get("end")?.as_u64()? as usize,
                            ))
                        }),
                        evidence: c.evidence.clone(),
                    });
                }
            }
            if reasons.is_empty() {
                if let (Some(d), Some(text)) = (&mut dedup, t.assistant_text()) {
                    match d.check(&t.id, &text) {
                        DedupVerdict::Unique => {}
                        DedupVerdict::Exact { of } => reasons.push(Reason {
                            stage: "dedup".into(),
                            code: "exact_dup".into(),
                            detail: format!("same normalised text as {of}"),
                            field: None,
                            span: None,
                            evidence: json!({ "of": of }),
                        }),
                        DedupVerdict::Near { of, similarity } => reasons.push(Reason {
                            stage: "dedup".into(),
                            code: "near_dup".into(),
                            detail: format!(
                                "near-duplicate (estimated Jaccard {similarity:.2}) of {of}"
                            ),
                            field: None,
                            span: None,
                            evidence: json!({ "of": of, "similarity": similarity }),
                        }),
                    }
                }
            }
            decisions.push((
                t.id.clone(),
                t.problem_id.clone(),
                Decision {
                    kept: reasons.is_empty(),
                    reasons,
                    check,
                },
            ));
            pb.inc(1);
        }
    }
    cache_out.flush().map_err(io(&cache_path))?;

    apply_problem_level(&mut decisions, cfg);

    // Pass 2: write every trace with its decision, in input order.
    let kept_path = cfg.out_dir.join("kept.jsonl");
    let rejected_path = cfg.out_dir.join("rejected.jsonl");
    let partial = |p: &Path| p.with_extension("jsonl.partial");
    let mut kept_w = BufWriter::new(File::create(partial(&kept_path)).map_err(io(&kept_path))?);
    let mut rej_w =
        BufWriter::new(File::create(partial(&rejected_path)).map_err(io(&rejected_path))?);
    let mut reader = TraceReader::open(traces_path)?;
    let mut i = 0;
    loop {
        let chunk = reader.chunk()?;
        if chunk.is_empty() {
            break;
        }
        for t in chunk {
            let Some((id, _, d)) = decisions.get(i) else {
                break;
            };
            debug_assert_eq!(id, &t.id);
            i += 1;
            let mut v = serde_json::to_value(&t).unwrap_or(Value::Null);
            v["filter"] = serde_json::to_value(d).unwrap_or(Value::Null);
            let (w, p) = if d.kept {
                (&mut kept_w, &kept_path)
            } else {
                (&mut rej_w, &rejected_path)
            };
            serde_json::to_writer(&mut *w, &v).map_err(|e| FilterError::Io {
                path: p.clone(),
                source: std::io::Error::other(e),
            })?;
            w.write_all(b"\n").map_err(io(p))?;
        }
    }
    for (w, p) in [(kept_w, &kept_path), (rej_w, &rejected_path)] {
        let f = w.into_inner().map_err(|e| FilterError::Io {
            path: p.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(io(p))?;
        std::fs::rename(partial(p), p).map_err(io(p))?;
    }
    pb.finish_and_clear();

    // Funnel and reason counts.
    summary.input = decisions.len() as u64;
    let mut removed: HashMap<&str, u64> = HashMap::new();
    for (_, _, d) in &decisions {
        if d.kept {
            summary.kept += 1;
        } else {
            summary.rejected += 1;
            let first = STAGES
                .iter()
                .find(|s| d.reasons.iter().any(|r| r.stage == **s))
                .copied()
                .unwrap_or("rules");
            *removed.entry(first).or_default() += 1;
        }
        for r in &d.reasons {
            *summary.reasons.entry(r.code.clone()).or_default() += 1;
        }
    }
    let mut remaining = summary.input;
    for s in STAGES {
        let n = removed.get(s).copied().unwrap_or(0);
        remaining -= n;
        summary.funnel.push(FunnelRow {
            stage: s.to_string(),
            removed: n,
            remaining,
        });
    }
    summary.wall_seconds = started.elapsed().as_secs_f64();
    let json = serde_json::to_vec_pretty(&summary).unwrap_or_default();
    let sp = cfg.out_dir.join("summary.json");
    crate::trace::write_atomically(&sp, &json).map_err(|e| FilterError::Io {
        path: sp.clone(),
        source: std::io::Error::other(e),
    })?;
    Ok(summary)
}

fn checker_detail(c: &CheckResult) -> String {
    let e = &c.evidence;
    match c.kind.as_str() {
        "math" => format!(
            "{}: predicted {} vs gold {} ({})",
            c.verdict,
            e.get("pred_normal")
                .and_then(Value::as_str)
                .unwrap_or("none"),
            e.get("gold_normal")
                .and_then(Value::as_str)
                .unwrap_or("none"),
            e.get("rule").and_then(Value::as_str).unwrap_or("")
        ),
        _ => format!(
            "{}: {}",
            c.verdict,
            e.get("detail").and_then(Value::as_str).unwrap_or("")
        ),
    }
}

fn rule_and_decontam_reasons(t: &Trace, cfg: &FilterConfig) -> Vec<Reason> {
    let mut reasons = Vec::new();
    if let Some(err) = &t.error {
        reasons.push(Reason {
            stage: "input".into(),
            code: "generation_failed".into(),
            detail: format!("{}: {}", err.kind, err.message),
            field: None,
            span: None,
            evidence: Value::Null,
        });
        return reasons;
    }
    let completion = t.completion.as_deref().unwrap_or_default();
    let finish = t.finish_reason.as_ref().map(|f| match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Other(s) => s.as_str(),
    });
    let input = RuleInput {
        completion,
        reasoning: t.reasoning.as_deref(),
        answer: None,
        finish_reason: finish,
        completion_tokens: t.usage.as_ref().map(|u| u.completion_tokens),
    };
    for f in cfg.rules.evaluate(&input) {
        reasons.push(Reason {
            stage: "rules".into(),
            code: format!("rule:{}", f.rule_id),
            detail: f.evidence.note.clone(),
            field: Some(f.field.as_str().to_string()),
            span: f.evidence.span.as_ref().map(|r| (r.start, r.end)),
            evidence: json!({ "text": f.evidence.text }),
        });
    }
    if let Some(index) = &cfg.eval_index {
        let prompt = t
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.as_str())
            .unwrap_or_default();
        let comp = cfg.decontam_completions.then_some(completion);
        if let Some(c) = index.check_trace(prompt, comp) {
            let field = match c.source {
                super::decontam::TextSource::Prompt => "prompt",
                super::decontam::TextSource::Completion => "completion",
            };
            reasons.push(Reason {
                stage: "decontam".into(),
                code: "contaminated".into(),
                detail: format!(
                    "{}-gram shared with eval item {}",
                    index.params().n,
                    c.eval_id
                ),
                field: Some(field.into()),
                span: Some((c.span.start, c.span.end)),
                evidence: json!({ "eval_id": c.eval_id, "ngram": c.ngram, "text": c.text }),
            });
        }
    }
    reasons
}

/// Pass-rate window and per-problem cap, over the decisions of pass 1 (input order).
fn apply_problem_level(decisions: &mut [(String, String, Decision)], cfg: &FilterConfig) {
    if let Some((lo, hi)) = cfg.pass_rate {
        let mut stats: HashMap<&str, (u64, u64)> = HashMap::new();
        for (_, p, d) in decisions.iter() {
            if let Some(c) = &d.check {
                let e = stats.entry(p.as_str()).or_default();
                e.0 += u64::from(c.passed);
                e.1 += 1;
            }
        }
        let rates: HashMap<String, (u64, u64)> =
            stats.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        for (_, p, d) in decisions.iter_mut() {
            if !d.kept {
                continue;
            }
            let Some(&(ok, n)) = rates.get(p) else {
                continue;
            };
            let rate = ok as f64 / n.max(1) as f64;
            if rate < lo || rate > hi {
                d.kept = false;
                d.reasons.push(Reason {
                    stage: "pass_rate".into(),
                    code: "pass_rate".into(),
                    detail: format!("problem solved {ok}/{n} ({rate:.2}), outside the window {lo}..{hi}"),
                    field: None,
                    span: None,
                    evidence: json!({ "solved": ok, "samples": n, "rate": rate, "window": [lo, hi] }),
                });
            }
        }
    }
    if let Some(k) = cfg.max_per_problem {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for (_, p, d) in decisions.iter_mut() {
            if !d.kept {
                continue;
            }
            let c = counts.entry(p.clone()).or_default();
            *c += 1;
            if *c > k {
                d.kept = false;
                d.reasons.push(Reason {
                    stage: "cap".into(),
                    code: "cap".into(),
                    detail: format!("problem already has {k} kept traces"),
                    field: None,
                    span: None,
                    evidence: json!({ "k": k }),
                });
            }
        }
    }
}

fn load_cache(path: &Path) -> Result<HashMap<String, CheckResult>, FilterError> {
    let mut cache = HashMap::new();
    let Ok(f) = File::open(path) else {
        return Ok(cache);
    };
    for line in BufReader::new(f).lines() {
        let line = line.map_err(io(path))?;
        // A torn last line (crash mid-write) or an old format is simply recomputed.
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let (Some(k), Some(r)) = (v.get("key").and_then(Value::as_str), v.get("result")) else {
            continue;
        };
        if let Ok(r) = serde_json::from_value::<CheckResult>(r.clone()) {
            cache.insert(k.to_string(), r);
        }
    }
    Ok(cache)
}

fn count_lines(path: &Path) -> Result<u64, FilterError> {
    let f = File::open(path).map_err(io(path))?;
    let mut n = 0;
    for line in BufReader::new(f).split(b'\n') {
        let line = line.map_err(io(path))?;
        if !line.iter().all(u8::is_ascii_whitespace) {
            n += 1;
        }
    }
    Ok(n)
}
