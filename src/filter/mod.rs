//! Dataset quality filters for teacher traces.
//!
//! Each submodule is independent of the trace record and works over plain text, so the filter
//! stage can decide which field feeds which check:
//! - [`rules`]: TOML rule files (regex rules and built-in checks) validated against their own
//!   inline examples at load time, evaluated per trace with evidence for every verdict.
//! - [`checks`]: the built-in checks that cannot be written as a regex (repetition loops,
//!   mixed-script garbage, `<think>` structure, length, truncation).
//! - [`dedup`]: exact duplicates by normalised-text hash and near-duplicates by MinHash + LSH.
//! - [`decontam`]: n-gram overlap against evaluation sets, so test questions never leak into
//!   training data.
//! - [`text`]: the shared word normalisation and fixed, platform-independent hashing.
//! - [`stage`]: the `distill filter` stage that runs all of the above plus the answer checkers
//!   over a trace file and writes kept, rejected (with reasons) and the funnel summary.

pub mod checks;
pub mod decontam;
pub mod dedup;
pub mod rules;
pub mod stage;
pub mod text;
