//! Grading: `reference + completion -> verdict`, the one function filter, check and eval call.
//!
//! Which checker a trace gets ([`checker_for`]), where its final answer is read from
//! ([`answer_part`]), and the verdict with evidence ([`CheckResult`]): the same for a trace
//! kept for training and for a sample scored by `distill eval`, so a filter's pass rate and an
//! evaluation's accuracy mean the same thing.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::check::math::{self, MathOptions};
use crate::trace::Trace;

/// Version of the grading rules, recorded with every evaluation so that two accuracies are
/// compared only when the same checker produced them.
pub const CHECKER_VERSION: &str = concat!("distill-", env!("CARGO_PKG_VERSION"), "/grade-1");

/// Which answer checker to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CheckerKind {
    /// Code tests when the trace carries them, else math when it has an answer or solution.
    Auto,
    /// Math answer equivalence against `reference.answer` (or the solution).
    Math,
    /// Run the completion against `reference.tests` in the sandbox.
    Code,
    /// No checker: keep traces regardless of correctness.
    None,
}

/// The checker's result for one trace, as cached and as written in the `filter` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// `math` or `code`.
    pub kind: String,
    /// Checker verdict (snake_case).
    pub verdict: String,
    /// Whether it counts as correct.
    pub passed: bool,
    /// Checker evidence.
    #[serde(default)]
    pub evidence: Value,
}

/// The text after the last closed `<think>` block (where the final answer lives): the one rule
/// for where an answer starts, for math and code alike. (The trace record's `reasoning` is the
/// first block's content; a completion with several blocks fails the `think_well_formed` rule.)
pub fn answer_part(completion: &str) -> &str {
    completion
        .rfind("</think>")
        .map_or(completion, |i| &completion[i + "</think>".len()..])
}

/// The checker a trace gets under `kind`: `math`, `code` or none (failed or unchecked).
pub fn checker_for(trace: &Trace, kind: CheckerKind) -> Option<&'static str> {
    let r = &trace.reference;
    match kind {
        CheckerKind::None => None,
        CheckerKind::Math => Some("math"),
        CheckerKind::Code => Some("code"),
        CheckerKind::Auto if r.tests.is_some() => Some("code"),
        CheckerKind::Auto if r.answer.is_some() || r.solution.is_some() => Some("math"),
        CheckerKind::Auto => None,
    }
}

/// Grades a trace's final answer against `reference.answer` (or the solution).
pub fn grade_math(trace: &Trace, opts: &MathOptions) -> CheckResult {
    let gold = trace
        .reference
        .answer
        .as_deref()
        .or(trace.reference.solution.as_deref())
        .unwrap_or_default();
    let pred = answer_part(trace.completion.as_deref().unwrap_or_default());
    let c = math::check(gold, pred, opts);
    let (verdict, evidence) = crate::check::split_verdict(&c);
    CheckResult {
        kind: "math".into(),
        passed: c.is_correct(),
        verdict,
        evidence,
    }
}

#[cfg(target_os = "linux")]
/// Sandbox jobs for code traces: the extracted program and the reference tests, in the
/// style the tests are written in (a `check` function or bare asserts).
pub fn code_jobs(traces: &[&Trace]) -> Vec<crate::check::code::CodeJob> {
    use crate::check::code::{CodeJob, CodeTests};
    traces
        .iter()
        .map(|t| {
            let r = &t.reference;
            let tests = r.tests.clone().unwrap_or_default();
            let completion =
                crate::check::rows::extract_code(t.completion.as_deref().unwrap_or_default());
            let tests = if tests.contains("def check(")
                || r.entry_point.is_some() && !tests.trim_start().starts_with("assert")
            {
                CodeTests::Function {
                    test_code: tests,
                    entry_point: r.entry_point.clone(),
                }
            } else {
                CodeTests::Asserts {
                    asserts: tests
                        .lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(str::to_string)
                        .collect(),
                    setup: None,
                    entry_point: r.entry_point.clone(),
                }
            };
            CodeJob {
                prompt: r.code_prompt.clone().unwrap_or_default(),
                completion,
                tests,
            }
        })
        .collect()
}

/// A trace that could not be graded: code without a sandbox.
#[derive(Debug, Clone)]
pub struct GradeError {
    /// The trace.
    pub id: String,
    /// Why.
    pub message: String,
}

/// Grades `traces` under `kind`: math in parallel, code in the sandbox. `None` for traces no
/// checker applies to (failed samples, references without an answer or tests).
pub fn grade_traces(
    traces: &[&Trace],
    kind: CheckerKind,
    math_opts: &MathOptions,
    #[cfg(target_os = "linux")] sandbox: Option<&crate::check::code::Sandbox>,
    #[cfg(not(target_os = "linux"))] sandbox: Option<&()>,
) -> Result<Vec<Option<CheckResult>>, GradeError> {
    let kinds: Vec<Option<&'static str>> = traces
        .iter()
        .map(|t| {
            if t.is_ok() {
                checker_for(t, kind)
            } else {
                None
            }
        })
        .collect();
    let mut out: Vec<Option<CheckResult>> = traces
        .par_iter()
        .zip(&kinds)
        .map(|(t, k)| (*k == Some("math")).then(|| grade_math(t, math_opts)))
        .collect();
    let code: Vec<usize> = (0..traces.len())
        .filter(|&i| kinds[i] == Some("code"))
        .collect();
    if code.is_empty() {
        return Ok(out);
    }
    let Some(sandbox) = sandbox else {
        return Err(GradeError {
            id: traces[code[0]].id.clone(),
            message: "no sandbox configured".into(),
        });
    };
    #[cfg(target_os = "linux")]
    {
        let refs: Vec<&Trace> = code.iter().map(|&i| traces[i]).collect();
        let results = sandbox.check_batch(&code_jobs(&refs));
        for (i, r) in code.into_iter().zip(results) {
            let (verdict, evidence) = crate::check::split_verdict(&r);
            out[i] = Some(CheckResult {
                kind: "code".into(),
                passed: r.passed(),
                verdict,
                evidence,
            });
        }
        Ok(out)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = sandbox;
        Err(GradeError {
            id: traces[code[0]].id.clone(),
            message: "the code sandbox needs Linux".into(),
        })
    }
}
