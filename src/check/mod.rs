//! Answer checkers, shared by the filter and eval stages and by `distill check`.
//!
//! - [`math`]: final-answer extraction, normalisation and equivalence for math problems, with a
//!   verdict and evidence instead of a bool; deadline-based and thread-safe.
//! - [`code`]: runs Python completions against tests in a sandboxed child process (Linux).

#[cfg(target_os = "linux")]
pub mod code;
pub mod math;
pub mod rows;
