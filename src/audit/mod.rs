//! `distill audit`: look at what a filter run kept and rejected, and why.
//!
//! A filter run directory holds `kept.jsonl`, `rejected.jsonl` (trace records with a `filter`
//! verdict object) and `summary.json` (the funnel). Numbers alone hide bad rules: a regex that
//! fires on every correct answer looks the same in a count as one that catches real garbage. This
//! module loads a run once ([`load_run`]) and renders it two ways:
//! - [`terminal_summary`]: an aligned text summary for the shell (funnel, top reasons, pass rate
//!   per problem, completion lengths);
//! - [`write_html`]: one self-contained HTML page with charts and a trace browser that highlights
//!   exactly the bytes each rule matched, so a reviewer can judge verdicts by reading them.
//!
//! The loader is deliberately tolerant (unknown fields are ignored, optional fields may be
//! missing) because it must read runs written by older and newer versions of `filter`; a line
//! that is not JSON at all is an error naming the file and line.

mod html;
mod summary;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use html::{render_html, write_html};
pub use summary::terminal_summary;

/// Pipeline order of the filter stages, used to order a funnel rebuilt from the traces and to
/// attribute a trace with reasons from several stages to the earliest one: the filter's own
/// list, so the two cannot drift apart.
pub const STAGE_ORDER: &[&str] = &crate::filter::stage::STAGES;

/// Errors while loading a run or writing a report. Each names the file (and line, for JSONL) so
/// that a broken run can be fixed without guessing.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSONL line is not a JSON object of the expected shape.
    #[error("{path}:{line}: invalid trace record: {source}")]
    Record {
        /// The JSONL file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// `summary.json` is not valid JSON of the expected shape.
    #[error("{path}: invalid run summary: {source}")]
    Summary {
        /// Path of `summary.json`.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The directory holds none of the files a filter run writes.
    #[error("{path}: not a filter run (no kept.jsonl, rejected.jsonl or summary.json)")]
    NotARun {
        /// The directory given.
        path: PathBuf,
    },
}

/// Limits on what is kept in memory for the trace browser. Statistics always cover every trace;
/// only the browsable sample is capped, so a run of millions of traces still gives a page a
/// browser can open.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Most traces kept for browsing per side (kept / rejected); the first ones in file order.
    pub max_traces_per_side: usize,
    /// Longest text (prompt message, reasoning, completion) kept per field, in characters;
    /// longer texts are cut and marked as cut.
    pub max_text_chars: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_traces_per_side: 5_000,
            max_text_chars: 50_000,
        }
    }
}

/// Which output file a trace came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// From `kept.jsonl`.
    Kept,
    /// From `rejected.jsonl`.
    Rejected,
}

impl Side {
    /// The side's name as used in file names and in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Kept => "kept",
            Side::Rejected => "rejected",
        }
    }
}

/// One funnel row: how many traces a stage removed and how many were left after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunnelStage {
    /// Stage name (`input`, `rules`, `checker`, ...).
    pub stage: String,
    /// Traces removed by this stage.
    #[serde(default)]
    pub removed: u64,
    /// Traces left after this stage.
    #[serde(default)]
    pub remaining: u64,
}

/// `summary.json` as written by `filter`; every field optional so partial summaries load.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RunSummary {
    /// Traces read.
    #[serde(default)]
    pub input: Option<u64>,
    /// Traces kept.
    #[serde(default)]
    pub kept: Option<u64>,
    /// Traces rejected.
    #[serde(default)]
    pub rejected: Option<u64>,
    /// Stage-by-stage funnel.
    #[serde(default)]
    pub funnel: Vec<FunnelStage>,
    /// Reason code counts.
    #[serde(default)]
    pub reasons: BTreeMap<String, u64>,
    /// Wall time of the filter run.
    #[serde(default)]
    pub wall_seconds: Option<f64>,
}

/// A range of a text in UTF-16 code units, the unit JavaScript string indices use; byte ranges
/// from the filter are converted in Rust so the page never has to guess at encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Utf16Span {
    /// First code unit.
    pub start: usize,
    /// One past the last code unit.
    pub end: usize,
}

/// One reason a trace was rejected (or a note on a kept trace).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reason {
    /// Filter stage (`rules`, `checker`, `dedup`, ...).
    pub stage: String,
    /// Machine-readable code (`rule:repetition`, `checker:incorrect`, ...).
    pub code: String,
    /// Human-readable detail.
    pub detail: String,
    /// Trace field the span points into (`completion`, `reasoning`, `prompt`), if any.
    pub field: Option<String>,
    /// Byte range into `field` as written by the filter.
    pub span: Option<(usize, usize)>,
    /// `span` converted to UTF-16 indices into the (possibly cut) field text kept for
    /// browsing; `None` when there is no span, it is invalid, or it lies in a cut-off part.
    pub span_utf16: Option<Utf16Span>,
    /// Free-form evidence object.
    pub evidence: Value,
}

/// A chat message of the prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PromptMessage {
    /// `system`, `user`, `assistant`.
    pub role: String,
    /// Message text (possibly cut, see [`LoadOptions::max_text_chars`]).
    pub content: String,
}

/// One trace as the report needs it: texts, verdict and spans ready for highlighting.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceView {
    /// Which file it came from.
    pub side: Side,
    /// Trace id (or `file:line` when the record has none).
    pub id: String,
    /// Problem id.
    pub problem_id: String,
    /// Sample index within the problem.
    pub sample_index: Option<u64>,
    /// The prompt messages.
    pub messages: Vec<PromptMessage>,
    /// Chain of thought, when present.
    pub reasoning: Option<String>,
    /// Answer text, when present.
    pub completion: Option<String>,
    /// Why generation stopped.
    pub finish_reason: Option<String>,
    /// `usage.completion_tokens`.
    pub completion_tokens: Option<u64>,
    /// Filter reasons.
    pub reasons: Vec<Reason>,
    /// The checker's result object (`kind`, `verdict`, `passed`, ...), shown verbatim.
    pub check: Value,
    /// UTF-16 range of the graded answer in `completion` (from checker `pred_span`).
    pub answer_span_utf16: Option<Utf16Span>,
    /// Names of fields whose text was cut to [`LoadOptions::max_text_chars`].
    pub cut_fields: Vec<String>,
}

/// Per-side statistics computed over every trace, not only the browsable sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SideStats {
    /// Number of records in the file.
    pub count: u64,
    /// `usage.completion_tokens` of each record that has it, sorted ascending.
    pub completion_tokens: Vec<u64>,
    /// Records without `usage.completion_tokens`.
    pub missing_tokens: u64,
}

/// Pass counts for one problem from `filter.check.passed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProblemPass {
    /// Traces of the problem with a check result.
    pub checked: u64,
    /// Of those, how many passed.
    pub passed: u64,
}

/// Everything the summary and the report show about one filter run.
#[derive(Debug, Clone)]
pub struct AuditRun {
    /// The run directory.
    pub dir: PathBuf,
    /// `summary.json`, when present.
    pub summary: Option<RunSummary>,
    /// Funnel from `summary.json`, or rebuilt from the traces' reasons when it has none.
    pub funnel: Vec<FunnelStage>,
    /// Whether [`AuditRun::funnel`] was rebuilt from traces rather than read.
    pub funnel_derived: bool,
    /// Traces read (summary's `input`, else kept + rejected).
    pub input: u64,
    /// Statistics over `kept.jsonl`.
    pub kept: SideStats,
    /// Statistics over `rejected.jsonl`.
    pub rejected: SideStats,
    /// Occurrences of each reason code over all traces, most frequent first (ties by code).
    pub reason_counts: Vec<(String, u64)>,
    /// Pass counts per problem id, for problems with at least one checked trace.
    pub problems: BTreeMap<String, ProblemPass>,
    /// Traces kept for browsing (at most [`LoadOptions::max_traces_per_side`] per side).
    pub traces: Vec<TraceView>,
    /// Inconsistencies worth a reader's attention (count mismatches, missing files, ...).
    pub warnings: Vec<String>,
    /// What the kept traces led to, when `distill run` recorded it in `outcome.json`: the
    /// student's training loss and the base and student accuracies with their comparison.
    pub outcome: Option<Value>,
}

impl AuditRun {
    /// Browsable traces of one side, to say in the report when the sample is partial.
    pub fn shown(&self, side: Side) -> usize {
        self.traces.iter().filter(|t| t.side == side).count()
    }

    /// Statistics of one side.
    pub fn side(&self, side: Side) -> &SideStats {
        match side {
            Side::Kept => &self.kept,
            Side::Rejected => &self.rejected,
        }
    }

    /// Problems per pass-rate bucket, labelled, in order: `0%`, `(0,25%]`, `(25,50%]`,
    /// `(50,75%]`, `(75,100%)`, `100%`. The extremes get their own buckets because they are the
    /// ones pass-rate filtering acts on (all solved: too easy; none solved: too hard or broken).
    pub fn pass_rate_buckets(&self) -> Vec<(&'static str, u64)> {
        let mut buckets = [
            ("0%", 0u64),
            ("(0,25%]", 0),
            ("(25,50%]", 0),
            ("(50,75%]", 0),
            ("(75,100%)", 0),
            ("100%", 0),
        ];
        for p in self.problems.values() {
            if p.checked == 0 {
                continue;
            }
            // Integer comparisons: passed/checked <= k/4  <=>  4*passed <= k*checked.
            let (a, n) = (p.passed * 4, p.checked);
            let i = if p.passed == 0 {
                0
            } else if p.passed >= n {
                5
            } else if a <= n {
                1
            } else if a <= 2 * n {
                2
            } else if a <= 3 * n {
                3
            } else {
                4
            };
            buckets[i].1 += 1;
        }
        buckets.to_vec()
    }

    /// The reason code removing the most traces, with its count; used to hint at the cause when
    /// nothing was kept.
    pub fn top_reason(&self) -> Option<(&str, u64)> {
        self.reason_counts.first().map(|(c, n)| (c.as_str(), *n))
    }
}

/// Nearest-rank percentile of a sorted slice (`q` in `0..=1`); `None` when empty. Nearest-rank
/// always returns an observed value, which reads better for token counts than interpolation.
pub fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = (q.clamp(0.0, 1.0) * n as f64).ceil() as usize;
    sorted.get(rank.clamp(1, n) - 1).copied()
}

/// Converts a byte range into `text` to UTF-16 code unit indices, the unit of JavaScript
/// string indices. Offsets inside a multi-byte character widen the range to whole characters;
/// offsets past the end are clamped. Returns `None` for an empty or inverted range, or one that
/// starts past the end of `text`.
pub fn byte_span_to_utf16(text: &str, start: usize, end: usize) -> Option<Utf16Span> {
    if start >= end || start >= text.len() {
        return None;
    }
    let end = end.min(text.len());
    let mut start_b = start;
    while !text.is_char_boundary(start_b) {
        start_b -= 1;
    }
    let mut end_b = end;
    while !text.is_char_boundary(end_b) {
        end_b += 1;
    }
    let u16_start: usize = text[..start_b].chars().map(char::len_utf16).sum();
    let u16_len: usize = text[start_b..end_b].chars().map(char::len_utf16).sum();
    Some(Utf16Span {
        start: u16_start,
        end: u16_start + u16_len,
    })
}

/// Loads a filter run with the default [`LoadOptions`].
pub fn load_run(dir: &Path) -> Result<AuditRun, AuditError> {
    load_run_with(dir, &LoadOptions::default())
}

/// Loads a filter run: streams both JSONL files once, computing statistics over every record
/// and keeping a capped sample for the browser.
pub fn load_run_with(dir: &Path, opts: &LoadOptions) -> Result<AuditRun, AuditError> {
    let kept_path = dir.join("kept.jsonl");
    let rejected_path = dir.join("rejected.jsonl");
    let summary_path = dir.join("summary.json");
    if !kept_path.exists() && !rejected_path.exists() && !summary_path.exists() {
        return Err(AuditError::NotARun {
            path: dir.to_path_buf(),
        });
    }
    let mut warnings = Vec::new();

    let summary = if summary_path.exists() {
        let text = std::fs::read_to_string(&summary_path).map_err(|source| AuditError::Io {
            path: summary_path.clone(),
            source,
        })?;
        Some(
            serde_json::from_str::<RunSummary>(&text).map_err(|source| AuditError::Summary {
                path: summary_path.clone(),
                source,
            })?,
        )
    } else {
        warnings.push("summary.json is missing; the funnel is rebuilt from the traces".into());
        None
    };

    let mut acc = Accumulator::default();
    for (side, path) in [(Side::Kept, &kept_path), (Side::Rejected, &rejected_path)] {
        if path.exists() {
            read_side(side, path, opts, &mut acc)?;
        } else {
            warnings.push(format!("{} is missing; treated as empty", path.display()));
        }
    }
    for side in [&mut acc.kept, &mut acc.rejected] {
        side.completion_tokens.sort_unstable();
    }
    if acc.verdict_mismatch > 0 {
        warnings.push(format!(
            "{} record(s) have a filter.kept flag that disagrees with the file they are in",
            acc.verdict_mismatch
        ));
    }

    let mut reason_counts: Vec<(String, u64)> = acc.reason_counts.into_iter().collect();
    reason_counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));

    let traced_total = acc.kept.count + acc.rejected.count;
    let input = summary
        .as_ref()
        .and_then(|s| s.input)
        .unwrap_or(traced_total);
    if let Some(s) = &summary {
        for (name, claimed, actual) in [
            ("kept", s.kept, acc.kept.count),
            ("rejected", s.rejected, acc.rejected.count),
        ] {
            if let Some(claimed) = claimed {
                if claimed != actual {
                    warnings.push(format!(
                        "summary.json says {claimed} {name} but {name}.jsonl has {actual} records"
                    ));
                }
            }
        }
    }

    let (funnel, funnel_derived) = match &summary {
        Some(s) if !s.funnel.is_empty() => (s.funnel.clone(), false),
        _ => (derive_funnel(input, &acc.removed_by_stage), true),
    };

    for (side, stats) in [(Side::Kept, &acc.kept), (Side::Rejected, &acc.rejected)] {
        let shown = acc.traces.iter().filter(|t| t.side == side).count() as u64;
        if shown < stats.count {
            warnings.push(format!(
                "the trace browser holds the first {shown} of {} {} traces; statistics cover all",
                stats.count,
                side.as_str()
            ));
        }
    }

    Ok(AuditRun {
        dir: dir.to_path_buf(),
        summary,
        funnel,
        funnel_derived,
        input,
        kept: acc.kept,
        rejected: acc.rejected,
        reason_counts,
        problems: acc.problems,
        traces: acc.traces,
        warnings,
        outcome: std::fs::read_to_string(dir.join(OUTCOME_FILE))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok()),
    })
}

/// The file in a filter run's directory where `distill run` records training and evaluation.
pub const OUTCOME_FILE: &str = "outcome.json";

/// Rebuilds a funnel from per-stage removal counts: stages in pipeline order, unknown stages
/// after the known ones in name order.
fn derive_funnel(input: u64, removed: &HashMap<String, u64>) -> Vec<FunnelStage> {
    let mut stages: Vec<&str> = STAGE_ORDER.to_vec();
    let mut extra: Vec<&str> = removed
        .keys()
        .map(String::as_str)
        .filter(|s| !STAGE_ORDER.contains(s))
        .collect();
    extra.sort_unstable();
    stages.extend(extra);
    let mut remaining = input;
    stages
        .into_iter()
        .map(|stage| {
            let r = removed.get(stage).copied().unwrap_or(0);
            remaining = remaining.saturating_sub(r);
            FunnelStage {
                stage: stage.to_string(),
                removed: r,
                remaining,
            }
        })
        .collect()
}

#[derive(Default)]
struct Accumulator {
    kept: SideStats,
    rejected: SideStats,
    reason_counts: HashMap<String, u64>,
    removed_by_stage: HashMap<String, u64>,
    problems: BTreeMap<String, ProblemPass>,
    traces: Vec<TraceView>,
    shown_kept: usize,
    shown_rejected: usize,
    verdict_mismatch: u64,
}

#[derive(Deserialize)]
struct RawTrace {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    problem_id: Option<String>,
    #[serde(default)]
    sample_index: Option<u64>,
    #[serde(default)]
    messages: Vec<RawMessage>,
    #[serde(default)]
    completion: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    filter: Option<RawFilter>,
}

#[derive(Deserialize)]
struct RawMessage {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Value,
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct RawFilter {
    #[serde(default)]
    kept: Option<bool>,
    #[serde(default)]
    reasons: Vec<RawReason>,
    #[serde(default)]
    check: Value,
}

#[derive(Deserialize)]
struct RawReason {
    #[serde(default)]
    stage: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    detail: String,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    span: Value,
    #[serde(default)]
    evidence: Value,
}

/// Reads a byte range written either as `[start, end]` or as `{"start": .., "end": ..}` (the
/// latter is how a Rust `Range` serialises).
fn parse_span(v: &Value) -> Option<(usize, usize)> {
    let (s, e) = match v {
        Value::Array(a) if a.len() == 2 => (a[0].as_u64()?, a[1].as_u64()?),
        Value::Object(o) => (o.get("start")?.as_u64()?, o.get("end")?.as_u64()?),
        _ => return None,
    };
    Some((usize::try_from(s).ok()?, usize::try_from(e).ok()?))
}

/// Cuts `text` to at most `max` characters; returns whether it was cut.
fn cut(text: String, max: usize) -> (String, bool) {
    match text.char_indices().nth(max) {
        Some((i, _)) => (text[..i].to_string(), true),
        None => (text, false),
    }
}

fn read_side(
    side: Side,
    path: &Path,
    opts: &LoadOptions,
    acc: &mut Accumulator,
) -> Result<(), AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let reader = BufReader::new(file);
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let raw: RawTrace = serde_json::from_str(&line).map_err(|source| AuditError::Record {
            path: path.to_path_buf(),
            line: line_no,
            source,
        })?;
        add_trace(side, raw, format!("{file_name}:{line_no}"), opts, acc);
    }
    Ok(())
}

fn add_trace(
    side: Side,
    raw: RawTrace,
    fallback_id: String,
    opts: &LoadOptions,
    acc: &mut Accumulator,
) {
    let filter = raw.filter.unwrap_or(RawFilter {
        kept: None,
        reasons: Vec::new(),
        check: Value::Null,
    });
    let problem_id = raw.problem_id.unwrap_or_default();
    let tokens = raw.usage.and_then(|u| u.completion_tokens);

    // Statistics over every record.
    let stats = match side {
        Side::Kept => &mut acc.kept,
        Side::Rejected => &mut acc.rejected,
    };
    stats.count += 1;
    match tokens {
        Some(t) => stats.completion_tokens.push(t),
        None => stats.missing_tokens += 1,
    }
    if let Some(k) = filter.kept {
        if k != (side == Side::Kept) {
            acc.verdict_mismatch += 1;
        }
    }
    for r in &filter.reasons {
        *acc.reason_counts.entry(r.code.clone()).or_insert(0) += 1;
    }
    if side == Side::Rejected {
        // Attribute the trace to the earliest pipeline stage among its reasons.
        let stage = filter
            .reasons
            .iter()
            .map(|r| r.stage.as_str())
            .min_by_key(|s| {
                STAGE_ORDER
                    .iter()
                    .position(|k| k == s)
                    .unwrap_or(usize::MAX)
            });
        if let Some(stage) = stage {
            *acc.removed_by_stage.entry(stage.to_string()).or_insert(0) += 1;
        }
    }
    if let Some(passed) = filter.check.get("passed").and_then(Value::as_bool) {
        let p = acc.problems.entry(problem_id.clone()).or_default();
        p.checked += 1;
        if passed {
            p.passed += 1;
        }
    }

    // Browsable sample.
    let shown = match side {
        Side::Kept => &mut acc.shown_kept,
        Side::Rejected => &mut acc.shown_rejected,
    };
    if *shown >= opts.max_traces_per_side {
        return;
    }
    *shown += 1;

    let mut cut_fields = Vec::new();
    let mut cut_opt = |name: &str, text: Option<String>| {
        text.map(|t| {
            let (t, was_cut) = cut(t, opts.max_text_chars);
            if was_cut {
                cut_fields.push(name.to_string());
            }
            t
        })
    };
    let completion = cut_opt("completion", raw.completion);
    let reasoning = cut_opt("reasoning", raw.reasoning);
    let messages: Vec<PromptMessage> = raw
        .messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                Value::String(s) => s,
                Value::Null => String::new(),
                other => other.to_string(),
            };
            let (content, was_cut) = cut(content, opts.max_text_chars);
            if was_cut {
                cut_fields.push(format!("prompt ({})", m.role));
            }
            PromptMessage {
                role: m.role,
                content,
            }
        })
        .collect();

    let field_text = |field: &str| -> Option<&str> {
        match field {
            "completion" => completion.as_deref(),
            "reasoning" => reasoning.as_deref(),
            _ => None,
        }
    };
    let reasons = filter
        .reasons
        .into_iter()
        .map(|r| {
            let span = parse_span(&r.span).or_else(|| r.evidence.get("span").and_then(parse_span));
            let span_utf16 = match (&r.field, span) {
                (Some(f), Some((s, e))) => field_text(f).and_then(|t| byte_span_to_utf16(t, s, e)),
                _ => None,
            };
            Reason {
                stage: r.stage,
                code: r.code,
                detail: r.detail,
                field: r.field,
                span,
                span_utf16,
                evidence: r.evidence,
            }
        })
        .collect::<Vec<_>>();
    let answer_span_utf16 = reasons
        .iter()
        .filter_map(|r| r.evidence.get("pred_span"))
        .chain(filter.check.get("pred_span"))
        .find_map(|v| {
            let (s, e) = parse_span(v)?;
            byte_span_to_utf16(completion.as_deref()?, s, e)
        });

    acc.traces.push(TraceView {
        side,
        id: raw.id.unwrap_or(fallback_id),
        problem_id,
        sample_index: raw.sample_index,
        messages,
        reasoning,
        completion,
        finish_reason: raw.finish_reason,
        completion_tokens: tokens,
        reasons,
        check: filter.check,
        answer_span_utf16,
        cut_fields,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf16_spans_follow_multibyte_text() {
        // "é" is 2 bytes / 1 unit, "日" 3 bytes / 1 unit, "😀" 4 bytes / 2 units.
        let t = "é日😀abc";
        let abc = t.find("abc").unwrap();
        assert_eq!(abc, 9);
        assert_eq!(
            byte_span_to_utf16(t, abc, abc + 3),
            Some(Utf16Span { start: 4, end: 7 })
        );
        // The emoji alone.
        assert_eq!(
            byte_span_to_utf16(t, 5, 9),
            Some(Utf16Span { start: 2, end: 4 })
        );
        // Offsets inside a character widen to the whole character.
        assert_eq!(
            byte_span_to_utf16(t, 3, 4),
            Some(Utf16Span { start: 1, end: 2 })
        );
        // Past the end is clamped; empty / inverted / out of range is None.
        assert_eq!(
            byte_span_to_utf16(t, abc, 1000),
            Some(Utf16Span { start: 4, end: 7 })
        );
        assert_eq!(byte_span_to_utf16(t, 4, 4), None);
        assert_eq!(byte_span_to_utf16(t, 5, 2), None);
        assert_eq!(byte_span_to_utf16(t, 100, 200), None);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&v, 0.5), Some(5));
        assert_eq!(percentile(&v, 0.9), Some(9));
        assert_eq!(percentile(&v, 1.0), Some(10));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn spans_parse_in_both_shapes() {
        assert_eq!(parse_span(&serde_json::json!([1, 5])), Some((1, 5)));
        assert_eq!(
            parse_span(&serde_json::json!({"start": 2, "end": 3})),
            Some((2, 3))
        );
        assert_eq!(parse_span(&serde_json::json!([1])), None);
        assert_eq!(parse_span(&serde_json::json!([-1, 2])), None);
    }
}
