//! Answer checkers, shared by the filter and eval stages and by `distill check`.
//!
//! - [`math`]: final-answer extraction, normalisation and equivalence for math problems, with a
//!   verdict and evidence instead of a bool; deadline-based and thread-safe.
//! - [`code`]: runs Python completions against tests in a sandboxed child process (Linux).
//! - [`grade`]: the one grading function (which checker, where the answer is, the verdict)
//!   that filter, check and eval call.

#[cfg(target_os = "linux")]
pub mod code;
pub mod grade;
pub mod math;
pub mod rows;

/// Splits a serialised checker result into its `verdict` (snake_case string) and the rest,
/// which is the evidence stored beside it. Serialising once keeps the verdict names in the
/// output identical to the enums' serde names.
pub fn split_verdict<R: serde::Serialize>(result: &R) -> (String, serde_json::Value) {
    let mut evidence = serde_json::to_value(result).unwrap_or(serde_json::Value::Null);
    let verdict = match &mut evidence {
        serde_json::Value::Object(m) => m.remove("verdict"),
        _ => None,
    };
    let verdict = verdict
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    (verdict, evidence)
}
