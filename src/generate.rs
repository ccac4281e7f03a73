//! The generate stage: problems × samples → trace records.
//!
//! Input: a loaded dataset, a prompt template and a [`Teacher`]. Output: `--out`, an append-only
//! JSONL of [`Trace`]s, and, once every sample has a record, `<out>.summary.json` (the marker
//! that the stage is complete).
//!
//! Guarantees:
//! - **Exactly once.** Each sample has a stable id. A rerun of the same command skips ids already
//!   done, retries ids recorded as failed (their old record is dropped atomically), and generates
//!   the rest, so the final file holds every sample exactly once.
//! - **Crash safety.** One writer appends whole lines; `kill -9` loses at most the requests in
//!   flight and at worst tears the last line, which the next run repairs. Ctrl-C stops launching
//!   work, drops what is in flight and exits with a resume hint.
//! - **Nothing silent.** A sample that fails after all retries is written with its `error`;
//!   a length-truncated sample is kept with `finish_reason: length` (not re-bought).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::data::dataset::Problem;
use crate::data::prompt::{PromptError, PromptTemplate};
use crate::teacher::{GenRequest, Teacher};
use crate::trace::{
    self, split_think, FinishReason, ReasoningSource, Sampling, Trace, TraceFile, TraceFileError,
};

/// Settings of one generate run.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// Samples per problem.
    pub n: u32,
    /// Sampling parameters shared by all samples (`seed` is the run seed).
    pub sampling: Sampling,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Output trace file.
    pub out: PathBuf,
    /// Show a progress bar.
    pub progress: bool,
}

/// What a run did, printed at the end and saved as `<out>.summary.json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerateSummary {
    /// problems × n.
    pub samples_total: u64,
    /// Already done before this run (skipped).
    pub samples_skipped: u64,
    /// Written by this run with a completion.
    pub samples_ok: u64,
    /// Of those, truncated at `max_tokens`.
    pub samples_truncated: u64,
    /// Written by this run as failed (will be retried by the next run).
    pub samples_failed: u64,
    /// Failed records from an earlier run that this run retried.
    pub retried_from_previous: u64,
    /// Prompt tokens of this run's samples.
    pub prompt_tokens: u64,
    /// Completion tokens of this run's samples.
    pub completion_tokens: u64,
    /// Wall time of this run.
    pub wall_seconds: f64,
    /// Bytes of a torn last line repaired at start.
    pub repaired_bytes: u64,
    /// Stopped by Ctrl-C before finishing.
    pub interrupted: bool,
    /// The teacher, as recorded in the traces.
    pub teacher: String,
}

impl GenerateSummary {
    /// Completion tokens per second of wall time.
    pub fn tokens_per_second(&self) -> f64 {
        self.completion_tokens as f64 / self.wall_seconds.max(1e-9)
    }
}

impl std::fmt::Display for GenerateSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "generate: {} samples ({} new ok, {} truncated at max_tokens, {} failed, {} already done)",
            self.samples_total,
            self.samples_ok,
            self.samples_truncated,
            self.samples_failed,
            self.samples_skipped
        )?;
        write!(
            f,
            "          {} prompt + {} completion tokens in {:.1}s ({:.1} completion tok/s), teacher {}",
            self.prompt_tokens,
            self.completion_tokens,
            self.wall_seconds,
            self.tokens_per_second(),
            self.teacher
        )?;
        if self.repaired_bytes > 0 {
            write!(
                f,
                "\n          repaired a torn last line ({} bytes) left by an interrupted run",
                self.repaired_bytes
            )?;
        }
        Ok(())
    }
}

/// Errors that stop the stage.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A prompt could not be rendered.
    #[error(transparent)]
    Prompt(#[from] PromptError),
    /// The output file is unreadable or unwritable.
    #[error(transparent)]
    TraceFile(#[from] TraceFileError),
    /// The teacher failed in a way every request would (bad key, unknown model).
    #[error("teacher failed fatally: {message} (problem {problem_id}); {written} samples were written, rerun to resume")]
    Fatal {
        /// The failure.
        message: String,
        /// Problem being generated.
        problem_id: String,
        /// Records written before stopping.
        written: u64,
    },
}

/// Counts of the records this run appended, kept by the writer as it writes.
#[derive(Debug, Default)]
struct Written {
    ok: u64,
    truncated: u64,
    failed: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Written {
    fn count(&mut self, t: &Trace) {
        match (&t.error, &t.finish_reason) {
            (Some(_), _) => self.failed += 1,
            (None, Some(FinishReason::Length)) => {
                self.ok += 1;
                self.truncated += 1;
            }
            (None, _) => self.ok += 1,
        }
        if let Some(u) = &t.usage {
            self.prompt_tokens += u.prompt_tokens;
            self.completion_tokens += u.completion_tokens;
        }
    }
}

/// One planned sample.
struct Job {
    id: String,
    problem: Arc<Problem>,
    sample_index: u32,
    request: GenRequest,
}

/// Mixes the run seed with the problem and sample so every sample gets its own seed, stable
/// across runs. Kept below 2^31: some servers take 32-bit seeds.
fn sample_seed(seed: u64, problem_id: &str, index: u32) -> u64 {
    let mut h = seed ^ 0x9E37_79B9_7F4A_7C15;
    for b in problem_id.bytes().chain(index.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
    }
    // splitmix64 finaliser
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (h ^ (h >> 31)) & 0x7FFF_FFFF
}

/// The ids of the traces a run with these settings writes, problem by problem and sample by
/// sample: what an evaluation reads back from a trace file that may hold other runs too.
pub fn planned_ids(
    problems: &[Problem],
    template: &PromptTemplate,
    teacher: &dyn Teacher,
    cfg: &GenerateConfig,
) -> Result<Vec<String>, GenerateError> {
    Ok(plan(problems, template, teacher, cfg)?
        .into_iter()
        .map(|j| j.id)
        .collect())
}

/// Plans every sample: renders prompts (failing early on template errors) and computes ids.
fn plan(
    problems: &[Problem],
    template: &PromptTemplate,
    teacher: &dyn Teacher,
    cfg: &GenerateConfig,
) -> Result<Vec<Job>, GenerateError> {
    let mut jobs = Vec::with_capacity(problems.len() * cfg.n as usize);
    for p in problems {
        let messages = template.render(p)?;
        let problem = Arc::new(p.clone());
        for k in 0..cfg.n {
            let mut sampling = cfg.sampling.clone();
            sampling.seed = cfg.sampling.seed.map(|s| sample_seed(s, &p.id, k));
            sampling.seed_honoured = sampling.seed.and(teacher.seed_honoured());
            let id = trace::trace_id(&p.id, &messages, teacher.info(), &sampling, k);
            jobs.push(Job {
                id,
                problem: problem.clone(),
                sample_index: k,
                request: GenRequest {
                    messages: messages.clone(),
                    sampling,
                },
            });
        }
    }
    Ok(jobs)
}

/// Runs the stage. Returns the summary; `interrupted` is set when Ctrl-C stopped it.
pub async fn run(
    problems: &[Problem],
    template: &PromptTemplate,
    teacher: Arc<dyn Teacher>,
    cfg: &GenerateConfig,
) -> Result<GenerateSummary, GenerateError> {
    run_until(problems, template, teacher, cfg, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

/// [`run`] with an explicit stop signal (tests and embedders pass their own).
pub async fn run_until(
    problems: &[Problem],
    template: &PromptTemplate,
    teacher: Arc<dyn Teacher>,
    cfg: &GenerateConfig,
    stop: impl std::future::Future<Output = ()>,
) -> Result<GenerateSummary, GenerateError> {
    let started = Instant::now();
    let jobs = plan(problems, template, teacher.as_ref(), cfg)?;
    let (mut file, resume) = TraceFile::open_for_resume(&cfg.out)?;
    let mut summary = GenerateSummary {
        samples_total: jobs.len() as u64,
        repaired_bytes: resume.repaired_bytes,
        teacher: format!("{}:{}", teacher.info().backend, teacher.info().model),
        ..Default::default()
    };
    let todo: Vec<Job> = jobs
        .into_iter()
        .filter(|j| {
            if resume.done.contains(&j.id) {
                summary.samples_skipped += 1;
                false
            } else {
                if resume.failed.contains(&j.id) {
                    summary.retried_from_previous += 1;
                }
                true
            }
        })
        .collect();
    if summary.samples_skipped > 0 || summary.retried_from_previous > 0 {
        tracing::info!(
            done = summary.samples_skipped,
            retrying_failed = summary.retried_from_previous,
            remaining = todo.len(),
            "resuming {}",
            cfg.out.display()
        );
    }

    let pb = if cfg.progress {
        crate::progress::bar(todo.len() as u64, "samples")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let completion_tokens = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));

    // The single writer: records arrive over a channel and are appended in arrival order.
    let (tx, mut rx) = mpsc::channel::<Trace>(256);
    let writer_pb = pb.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<Written, TraceFileError> {
        let mut written = Written::default();
        let mut last_sync = Instant::now();
        while let Some(t) = rx.blocking_recv() {
            file.append(&t)?;
            if last_sync.elapsed() > Duration::from_secs(5) {
                file.sync()?;
                last_sync = Instant::now();
            }
            writer_pb.inc(1);
            written.count(&t);
        }
        file.sync()?;
        Ok(written)
    });

    let sem = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let mut tasks: JoinSet<Option<(String, String)>> = JoinSet::new();
    let rate_start = Instant::now();
    let mut fatal: Option<(String, String)> = None;
    let mut interrupted = false;
    tokio::pin!(stop);

    let mut queue = todo.into_iter();
    'outer: loop {
        // Launch while permits are free; otherwise wait for a task, a permit or the stop signal.
        tokio::select! {
            biased;
            _ = &mut stop => { interrupted = true; break 'outer; }
            Some(res) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(Some(f)) = res { fatal = Some(f); break 'outer; }
            }
            permit = sem.clone().acquire_owned() => {
                let Ok(permit) = permit else { break 'outer };
                let Some(job) = queue.next() else { drop(permit); break 'outer };
                let teacher = teacher.clone();
                let tx = tx.clone();
                let ct = completion_tokens.clone();
                let errs = errors.clone();
                let pb = pb.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    let t0 = Instant::now();
                    let result = teacher.generate(&job.request).await;
                    let latency_ms = t0.elapsed().as_millis() as u64;
                    let mut fatal = None;
                    let record = match result {
                        Ok(out) => {
                            let tokens = ct.fetch_add(out.usage.completion_tokens, Ordering::Relaxed)
                                + out.usage.completion_tokens;
                            let rate = tokens as f64 / rate_start.elapsed().as_secs_f64().max(1e-3);
                            pb.set_message(format!("{rate:.1} tok/s | errors {}", errs.load(Ordering::Relaxed)));
                            build_trace(&job, teacher.as_ref(), Ok(out), latency_ms)
                        }
                        Err(fail) => {
                            let n = errs.fetch_add(1, Ordering::Relaxed) + 1;
                            pb.set_message(format!("errors {n}"));
                            if fail.fatal {
                                fatal = Some((fail.error.message.clone(), job.problem.id.clone()));
                            }
                            build_trace(&job, teacher.as_ref(), Err(fail), latency_ms)
                        }
                    };
                    // A closed channel means the run is stopping; the record is simply lost
                    // (it was in flight) and will be generated on the next run.
                    let _ = tx.send(record).await;
                    fatal
                });
            }
        }
    }
    // Drain what is in flight, still listening for Ctrl-C.
    while !tasks.is_empty() {
        if interrupted || fatal.is_some() {
            tasks.abort_all();
        }
        tokio::select! {
            biased;
            _ = &mut stop, if !interrupted => { interrupted = true; }
            res = tasks.join_next() => {
                if let Some(Ok(Some(f))) = res {
                    fatal.get_or_insert(f);
                }
            }
        }
    }
    drop(tx);
    let written = writer.await.map_err(|e| TraceFileError::Io {
        path: cfg.out.clone(),
        source: std::io::Error::other(e),
    })??;
    pb.finish_and_clear();
    summary.samples_ok = written.ok;
    summary.samples_truncated = written.truncated;
    summary.samples_failed = written.failed;
    summary.prompt_tokens = written.prompt_tokens;
    summary.completion_tokens = written.completion_tokens;
    summary.wall_seconds = started.elapsed().as_secs_f64();
    summary.interrupted = interrupted;
    if let Some((message, problem_id)) = fatal {
        return Err(GenerateError::Fatal {
            message,
            problem_id,
            written: written.ok + written.failed,
        });
    }
    if !interrupted && summary.samples_failed == 0 {
        let json = serde_json::to_vec_pretty(&summary).unwrap_or_default();
        trace::write_atomically(&summary_path(&cfg.out), &json)?;
    }
    Ok(summary)
}

/// `<out>.summary.json`: written only when every sample of the run has a good record.
pub fn summary_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".summary.json");
    out.with_file_name(name)
}

fn build_trace(
    job: &Job,
    teacher: &dyn Teacher,
    result: Result<crate::teacher::GenOutput, crate::teacher::GenFailure>,
    latency_ms: u64,
) -> Trace {
    let mut t = Trace {
        id: job.id.clone(),
        problem_id: job.problem.id.clone(),
        sample_index: job.sample_index,
        reference: job.problem.reference.clone(),
        messages: job.request.messages.clone(),
        completion: None,
        reasoning: None,
        reasoning_source: None,
        finish_reason: None,
        usage: None,
        logprobs: None,
        teacher: teacher.info().clone(),
        sampling: job.request.sampling.clone(),
        latency_ms,
        attempts: 0,
        endpoint: None,
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        error: None,
        schema_version: trace::SCHEMA_VERSION,
    };
    match result {
        Ok(out) => {
            if let Some(r) = out.reasoning_field {
                t.reasoning = Some(r);
                t.reasoning_source = Some(ReasoningSource::Field);
            } else if let Some(r) = split_think(&out.completion) {
                t.reasoning = Some(r);
                t.reasoning_source = Some(ReasoningSource::ThinkTags);
            }
            t.completion = Some(out.completion);
            t.finish_reason = Some(out.finish_reason);
            t.usage = Some(out.usage);
            t.logprobs = out.logprobs;
            t.attempts = out.attempts;
            t.endpoint = out.endpoint;
        }
        Err(fail) => {
            t.error = Some(fail.error);
            t.attempts = fail.attempts;
            t.endpoint = fail.endpoint;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_seeds_differ_and_are_stable() {
        let a = sample_seed(42, "p1", 0);
        assert_eq!(a, sample_seed(42, "p1", 0));
        assert_ne!(a, sample_seed(42, "p1", 1));
        assert_ne!(a, sample_seed(42, "p2", 0));
        assert_ne!(a, sample_seed(43, "p1", 0));
        assert!(a < (1 << 31));
    }
}
