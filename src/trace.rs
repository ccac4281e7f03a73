//! The trace record: one JSON object per line, shared by every stage.
//!
//! A [`Trace`] is one teacher sample for one problem. `generate` writes them, `filter` reads them
//! and writes them back out with verdicts, `train` learns from them. New information arrives as
//! optional fields with serde defaults so that older files keep loading.
//!
//! Files of traces are append-only. A writer appends whole lines; a crash (even `kill -9`) can at
//! worst leave a torn last line, which [`TraceFile::open_for_resume`] detects and cuts off before
//! anything new is appended. Every record carries a stable [`Trace::id`], so a rerun knows exactly
//! which samples are already done.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of the record layout; bumped only on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// One chat message as sent to the teacher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// What the dataset says a correct answer looks like, copied verbatim so that checkers never need
/// the original dataset again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// Final answer (GSM8K's number after `####`, MATH's `answer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Full reference solution when the dataset has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solution: Option<String>,
    /// Test code (HumanEval `test`, MBPP asserts) for code problems.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests: Option<String>,
    /// Function under test for HumanEval-style `check(entry_point)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<String>,
    /// The code prompt (function signature and docstring) the completion continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_prompt: Option<String>,
}

/// Who produced a trace. Part of the id: a different model or model file is a different request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeacherInfo {
    /// `local` (embedded mistral.rs) or `openai` (an OpenAI-compatible endpoint).
    pub backend: String,
    /// Model name, hub id or path as given by the user.
    pub model: String,
    /// SHA-256 of the model file, for local GGUF files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_sha256: Option<String>,
    /// Hub revision, when one was pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The embedded engine that ran the model (`candle` or `mistralrs`), for local teachers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// SHA-256 of the LoRA adapter folded into the model, when one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_sha256: Option<String>,
    /// The model's licence (from its metadata or `--teacher-license`): some licences restrict
    /// training on the model's outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
}

/// Sampling parameters of the request. Part of the id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Softmax temperature; always sent explicitly (some servers treat a missing one as 1.0).
    pub temperature: f64,
    /// Nucleus sampling mass.
    pub top_p: f64,
    /// Completion token budget.
    pub max_tokens: u32,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Seed for this sample (the run seed mixed with the sample index), if a seed was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Whether the backend is known to honour the seed: `false` for the embedded engine (it has
    /// no per-request seed), `null` when the server does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_honoured: Option<bool>,
    /// Number of top log-probabilities requested per token (0 = none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub top_logprobs: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Why the teacher stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// Natural end (EOS or a stop sequence).
    Stop,
    /// Hit `max_tokens`: the trace is truncated. Kept and labelled, never silently retried.
    Length,
    /// Anything else the backend reported (`content_filter`, `tool_calls`, ...).
    #[serde(untagged)]
    Other(String),
}

impl FinishReason {
    /// Maps a backend's finish reason string onto the closed set, keeping unknown values.
    pub fn parse(s: &str) -> Self {
        match s {
            "stop" | "eos" | "eos_token" | "stop_sequence" => FinishReason::Stop,
            "length" | "max_tokens" => FinishReason::Length,
            other => FinishReason::Other(other.to_string()),
        }
    }
}

/// Token counts for one sample.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the rendered prompt.
    pub prompt_tokens: u64,
    /// Tokens in this sample's completion.
    pub completion_tokens: u64,
}

/// Where the separate chain of thought came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasoningSource {
    /// The server returned it apart from the answer (`reasoning_content` / `reasoning`); the
    /// completion then holds only the answer.
    Field,
    /// Parsed from a `<think>…</think>` block inside the completion, which is left intact.
    ThinkTags,
}

/// A log-probability entry for one generated token, in natural log (nats) whatever the backend
/// reported (mistral.rs reports base 10; it is converted on the way in).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// Token text.
    pub token: String,
    /// ln p(token) under the teacher's sampling distribution (after temperature and top-p).
    pub logprob: f32,
    /// The top alternatives, same units. The candle engine reports them from the model's own
    /// distribution (before temperature), the soft labels distillation wants.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(String, f32)>,
    /// ln p(token) under the model's own distribution (before temperature, top-k, top-p),
    /// where the backend reports it (the candle engine does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_logprob: Option<f32>,
}

/// A sample that finally failed after all retries. Its presence marks the record for retry on the
/// next run of the same command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceError {
    /// Machine-readable class: `http_status`, `timeout`, `connect`, `bad_response`, `engine`, ...
    pub kind: String,
    /// Human-readable detail (never contains the API key).
    pub message: String,
}

/// One teacher sample for one problem: the record shared by every stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Stable content hash of (problem id, rendered messages, teacher identity, sampling, sample
    /// index): the same request always gets the same id. See [`trace_id`].
    pub id: String,
    /// The problem's id in the dataset.
    pub problem_id: String,
    /// Which of the `n` samples of this problem this is (0-based).
    pub sample_index: u32,
    /// Reference answer / tests as given by the dataset.
    #[serde(default)]
    pub reference: Reference,
    /// The messages sent to the teacher.
    pub messages: Vec<Message>,
    /// The teacher's answer text exactly as returned (absent when the sample failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion: Option<String>,
    /// The chain of thought, when the teacher returned it separately or inside `<think>` tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// Where [`Trace::reasoning`] came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_source: Option<ReasoningSource>,
    /// Why generation stopped; `length` marks a truncated trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// Token counts for this sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Per-token log-probabilities in nats, when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Who produced the sample.
    pub teacher: TeacherInfo,
    /// How it was sampled.
    pub sampling: Sampling,
    /// Wall time of the successful attempt (or of all attempts for a failure), in milliseconds.
    #[serde(default)]
    pub latency_ms: u64,
    /// Number of attempts made (1 = no retry).
    #[serde(default)]
    pub attempts: u32,
    /// Which endpoint answered (OpenAI backend with several base URLs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// RFC 3339 time the record was written.
    pub created_at: String,
    /// Set when the sample finally failed; such records are retried by the next run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TraceError>,
    /// Record layout version.
    #[serde(default = "default_schema")]
    pub schema_version: u32,
}

fn default_schema() -> u32 {
    SCHEMA_VERSION
}

impl Trace {
    /// A trace is done when it holds a completion; failed ones are redone on resume.
    pub fn is_ok(&self) -> bool {
        self.error.is_none() && self.completion.is_some()
    }

    /// The full assistant text to learn from: the separate reasoning (if the server split it
    /// off) wrapped in `<think>` tags, followed by the completion. When the reasoning came from
    /// tags inside the completion, the completion already holds it.
    pub fn assistant_text(&self) -> Option<String> {
        let completion = self.completion.as_deref()?;
        match (self.reasoning_source, self.reasoning.as_deref()) {
            (Some(ReasoningSource::Field), Some(r)) => Some(format!(
                "<think>\n{}\n</think>\n\n{}",
                r.trim(),
                completion.trim_start()
            )),
            _ => Some(completion.to_string()),
        }
    }
}

/// The stable id of a request: SHA-256 over a canonical JSON of everything that makes two
/// requests different, truncated to 128 bits (32 hex characters). The endpoint URL is left out
/// on purpose: a fleet of servers running the same model is one teacher.
pub fn trace_id(
    problem_id: &str,
    messages: &[Message],
    teacher: &TeacherInfo,
    sampling: &Sampling,
    sample_index: u32,
) -> String {
    let canonical = serde_json::json!({
        "problem_id": problem_id,
        "messages": messages,
        "teacher": {
            "backend": teacher.backend,
            "model": teacher.model,
            "file_sha256": teacher.file_sha256,
            "revision": teacher.revision,
        },
        "sampling": {
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "stop": sampling.stop,
            "seed": sampling.seed,
            "top_logprobs": sampling.top_logprobs,
        },
        "sample_index": sample_index,
    });
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    hex::encode(&digest[..16])
}

/// Splits a `<think>…</think>` block off a completion. Returns the reasoning (trimmed) when the
/// block is well formed; an unterminated block yields `None` (the filter stage flags it).
pub fn split_think(completion: &str) -> Option<String> {
    let start = completion.find("<think>")?;
    let rest = &completion[start + "<think>".len()..];
    let end = rest.find("</think>")?;
    Some(rest[..end].trim().to_string())
}

/// Errors reading or writing trace files. Each names the file and, for bad records, the line.
#[derive(Debug, thiserror::Error)]
pub enum TraceFileError {
    /// The file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// File at fault.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A complete line is not a valid trace record.
    #[error("{path}:{line}: not a valid trace record: {message}")]
    BadRecord {
        /// File at fault.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What serde said (names the field).
        message: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TraceFileError + '_ {
    move |source| TraceFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What was found in an existing output file when a run resumes.
#[derive(Debug, Default)]
pub struct ResumeState {
    /// Ids of samples already completed; they are skipped.
    pub done: HashSet<String>,
    /// Ids of samples recorded as failed; they are retried (and their old record dropped).
    pub failed: HashSet<String>,
    /// Bytes cut off the end because the last line was torn by a crash.
    pub repaired_bytes: u64,
    /// Duplicate or superseded records removed while compacting.
    pub dropped_records: usize,
}

/// An append-only JSONL file of traces.
pub struct TraceFile {
    path: PathBuf,
    file: File,
}

impl TraceFile {
    /// Opens `path` for appending after making it safe to resume:
    /// 1. a torn last line (no trailing newline: the process died mid-write) is cut off;
    /// 2. every remaining line must parse as a [`Trace`], or the error names the line;
    /// 3. if failed or duplicate records exist they are dropped by rewriting the file to a
    ///    temporary sibling and renaming it over the original (atomic: a crash leaves either the
    ///    old or the new file, never a mix), so the final file holds each sample exactly once.
    pub fn open_for_resume(path: &Path) -> Result<(TraceFile, ResumeState), TraceFileError> {
        let mut state = ResumeState::default();
        if path.exists() {
            state.repaired_bytes = repair_torn_tail(path)?;
            let records = read_traces(path)?;
            let mut keep: Vec<usize> = Vec::with_capacity(records.len());
            let mut seen: HashMap<String, usize> = HashMap::new();
            for (i, t) in records.iter().enumerate() {
                if t.is_ok() {
                    if state.done.insert(t.id.clone()) {
                        seen.insert(t.id.clone(), i);
                        keep.push(i);
                    } else {
                        state.dropped_records += 1;
                    }
                } else {
                    state.failed.insert(t.id.clone());
                    state.dropped_records += 1;
                }
            }
            // A failed attempt superseded by a later success is not a failure any more.
            state.failed.retain(|id| !state.done.contains(id));
            if state.dropped_records > 0 {
                rewrite_atomically(path, keep.iter().map(|&i| &records[i]))?;
            }
        } else if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        Ok((
            TraceFile {
                path: path.to_path_buf(),
                file,
            },
            state,
        ))
    }

    /// Appends one record as a single `write` of the whole line, so a crash cannot interleave
    /// two records; at worst the last line is torn and repaired on the next open.
    pub fn append(&mut self, trace: &Trace) -> Result<(), TraceFileError> {
        let mut line = serde_json::to_vec(trace).map_err(|e| TraceFileError::Io {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(io_err(&self.path))
    }

    /// Flushes written records to stable storage.
    pub fn sync(&mut self) -> Result<(), TraceFileError> {
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

/// Cuts a torn last line (bytes after the final `\n`). Returns how many bytes were removed.
fn repair_torn_tail(path: &Path) -> Result<u64, TraceFileError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if len == 0 {
        return Ok(0);
    }
    // Scan backwards in blocks for the last newline.
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_nl: Option<u64> = None;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start)).map_err(io_err(path))?;
        f.read_exact(&mut buf[..n]).map_err(io_err(path))?;
        if let Some(pos) = buf[..n].iter().rposition(|&b| b == b'\n') {
            last_nl = Some(start + pos as u64);
            break;
        }
        end = start;
    }
    let keep = last_nl.map_or(0, |p| p + 1);
    if keep < len {
        f.set_len(keep).map_err(io_err(path))?;
        f.sync_data().map_err(io_err(path))?;
        tracing::warn!(
            path = %path.display(),
            bytes = len - keep,
            "removed a torn last line left by an interrupted run"
        );
    }
    Ok(len - keep)
}

/// Reads every record of a trace file. Blank lines are skipped; a bad line is an error naming it.
pub fn read_traces(path: &Path) -> Result<Vec<Trace>, TraceFileError> {
    let f = File::open(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let t: Trace = serde_json::from_str(&line).map_err(|e| TraceFileError::BadRecord {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.push(t);
    }
    Ok(out)
}

/// Writes records to `<path>.tmp`, fsyncs, and renames it over `path`.
pub fn rewrite_atomically<'a>(
    path: &Path,
    records: impl Iterator<Item = &'a Trace>,
) -> Result<(), TraceFileError> {
    let tmp = tmp_sibling(path);
    {
        let mut w = std::io::BufWriter::new(File::create(&tmp).map_err(io_err(&tmp))?);
        for t in records {
            serde_json::to_writer(&mut w, t).map_err(|e| TraceFileError::Io {
                path: tmp.clone(),
                source: std::io::Error::other(e),
            })?;
            w.write_all(b"\n").map_err(io_err(&tmp))?;
        }
        let f = w.into_inner().map_err(|e| TraceFileError::Io {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Writes `bytes` to `path` atomically (temporary sibling, fsync, rename).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), TraceFileError> {
    let tmp = tmp_sibling(path);
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn tmp_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str, ok: bool) -> Trace {
        Trace {
            id: id.to_string(),
            problem_id: "p".into(),
            sample_index: 0,
            reference: Reference::default(),
            messages: vec![Message {
                role: "user".into(),
                content: "q".into(),
            }],
            completion: ok.then(|| "a".to_string()),
            reasoning: None,
            reasoning_source: None,
            finish_reason: ok.then_some(FinishReason::Stop),
            usage: None,
            logprobs: None,
            teacher: TeacherInfo {
                backend: "openai".into(),
                model: "m".into(),
                file_sha256: None,
                revision: None,
                engine: None,
                adapter_sha256: None,
                license: None,
            },
            sampling: Sampling {
                temperature: 0.6,
                top_p: 0.95,
                max_tokens: 16,
                stop: vec![],
                seed: None,
                seed_honoured: None,
                top_logprobs: 0,
            },
            latency_ms: 1,
            attempts: 1,
            endpoint: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            error: (!ok).then(|| TraceError {
                kind: "timeout".into(),
                message: "x".into(),
            }),
            schema_version: SCHEMA_VERSION,
        }
    }

    #[test]
    fn id_changes_with_every_part_of_the_request() {
        let t = sample("x", true);
        let base = trace_id("p", &t.messages, &t.teacher, &t.sampling, 0);
        assert_eq!(base.len(), 32);
        assert_eq!(base, trace_id("p", &t.messages, &t.teacher, &t.sampling, 0));
        assert_ne!(base, trace_id("p", &t.messages, &t.teacher, &t.sampling, 1));
        assert_ne!(base, trace_id("q", &t.messages, &t.teacher, &t.sampling, 0));
        let mut s = t.sampling.clone();
        s.temperature = 0.7;
        assert_ne!(base, trace_id("p", &t.messages, &t.teacher, &s, 0));
        let mut te = t.teacher.clone();
        te.file_sha256 = Some("ab".into());
        assert_ne!(base, trace_id("p", &t.messages, &te, &t.sampling, 0));
    }

    #[test]
    fn torn_line_is_repaired_and_failures_are_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let mut body = String::new();
        for t in [sample("a", true), sample("b", false), sample("a", true)] {
            body.push_str(&serde_json::to_string(&t).unwrap());
            body.push('\n');
        }
        body.push_str("{\"id\":\"c\",\"probl"); // torn by a crash
        std::fs::write(&path, &body).unwrap();
        let (mut f, state) = TraceFile::open_for_resume(&path).unwrap();
        assert!(state.repaired_bytes > 0);
        assert_eq!(state.done.len(), 1);
        assert!(state.failed.contains("b"));
        assert_eq!(state.dropped_records, 2);
        f.append(&sample("b", true)).unwrap();
        let all = read_traces(&path).unwrap();
        let ids: Vec<_> = all.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b"]);
    }

    #[test]
    fn bad_middle_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let good = serde_json::to_string(&sample("a", true)).unwrap();
        std::fs::write(&path, format!("{good}\n{{\"id\": 3}}\n{good}\n")).unwrap();
        let err = TraceFile::open_for_resume(&path).err().unwrap().to_string();
        assert!(err.contains("t.jsonl:2:"), "{err}");
    }

    #[test]
    fn think_block_is_split_and_reasoning_field_is_rejoined() {
        assert_eq!(
            split_think("<think> a\nb </think>\nans").as_deref(),
            Some("a\nb")
        );
        assert_eq!(split_think("<think> never closed"), None);
        let mut t = sample("a", true);
        t.reasoning = Some("why".into());
        t.reasoning_source = Some(ReasoningSource::Field);
        assert_eq!(t.assistant_text().unwrap(), "<think>\nwhy\n</think>\n\na");
    }
}
