//! Code checker: runs untrusted Python programs (model completions) against
//! tests in a sandboxed child process and reports a verdict with evidence.
//!
//! Two test styles are supported:
//! - **function style** (HumanEval, MBPP): the program is the problem prompt plus
//!   the completion (or the completion alone when it restates the whole function),
//!   followed by test code that defines `check(candidate)` and/or a list of
//!   `assert` statements;
//! - **stdin/stdout style** (APPS, LiveCodeBench): the program is run once per
//!   case with the case input on stdin, and its stdout is compared tolerantly with
//!   the expected output (see [`outputs_match`]).
//!
//! A function-style program passes only when the harness confirms, with a nonce
//! it reads after the tests returned, that every test ran and succeeded; exiting
//! early with status 0 is a runtime error, not a pass. The nonce guards against
//! early exits and stray output, not against a program that deliberately inspects
//! the harness to forge its report.
//!
//! Isolation (process group, resource limits, namespaces, dedicated uid) is set up
//! by [`Sandbox`]; what was actually in force is recorded in every
//! [`CodeResult::isolation`].
//!
//! ```no_run
//! use distill::check::code::{check_batch, CodeJob, CodeTests, SandboxConfig};
//!
//! let job = CodeJob {
//!     prompt: "def add(a, b):\n".into(),
//!     completion: "    return a + b\n".into(),
//!     tests: CodeTests::Function {
//!         test_code: "def check(f):\n    assert f(1, 2) == 3\n".into(),
//!         entry_point: Some("add".into()),
//!     },
//! };
//! let results = check_batch(&[job], &SandboxConfig::default());
//! assert!(results[0].passed());
//! ```

mod confine;
mod forkserver;
mod runner;
mod sandbox;

use serde::{Deserialize, Serialize};

pub use runner::outputs_match;
pub use sandbox::{Isolation, Sandbox, SandboxConfig};

/// Errors setting up the sandbox (not verdicts about a program).
#[derive(Debug, thiserror::Error)]
pub enum CodeCheckError {
    /// The Python interpreter could not be found or does not run.
    #[error("python interpreter unusable: {0}")]
    Python(String),
    /// No isolation plan works, or a required mechanism is unavailable.
    #[error("sandbox isolation unavailable: {0}")]
    IsolationUnavailable(String),
    /// Creating the working directory, pipes or the child process failed.
    #[error("sandbox failure: {0}")]
    Sandbox(String),
}

/// Outcome of checking one program.
///
/// Serialized in snake_case (`pass`, `wrong_answer`, ...) so filter reports and
/// datasets carry the same names as the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodeVerdict {
    /// Every test ran and succeeded.
    Pass,
    /// A test assertion failed or the output did not match.
    WrongAnswer,
    /// Wall-clock or CPU-time limit exceeded.
    Timeout,
    /// The program ran out of its memory allowance.
    MemoryLimit,
    /// An exception, a crash (signal), or an exit before the tests completed.
    RuntimeError,
    /// The program does not compile.
    SyntaxError,
    /// The checker itself failed (sandbox setup, invalid test code); says nothing
    /// about the program.
    SandboxError,
}

/// One stdin/stdout test case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdioCase {
    /// Text written to the program's stdin.
    pub input: String,
    /// Output the program must print (compared with [`outputs_match`]).
    pub expected_output: String,
}

/// The tests a program is checked against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "style")]
pub enum CodeTests {
    /// HumanEval style: `test_code` defines `check(candidate)`, which is called
    /// with the function named `entry_point` (when given; otherwise the test code
    /// is only executed, e.g. when it calls the function itself).
    Function {
        /// Test source, e.g. HumanEval's `test` field.
        test_code: String,
        /// Name of the function under test.
        entry_point: Option<String>,
    },
    /// MBPP style: each entry is an `assert` statement run after the program;
    /// `setup` (MBPP's `test_setup_code`) runs first.
    Asserts {
        /// Assert statements, each a separate test.
        asserts: Vec<String>,
        /// Code run before the asserts.
        setup: Option<String>,
        /// Name of the function under test, used to recognise a completion that
        /// restates the whole function.
        entry_point: Option<String>,
    },
    /// APPS / LiveCodeBench style: the program reads stdin and writes stdout.
    Stdio {
        /// Cases, run in order; checking stops at the first failure.
        cases: Vec<StdioCase>,
    },
}

/// A program to check: prompt and completion plus its tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeJob {
    /// Problem prompt the completion continues (HumanEval: the signature and
    /// docstring). May be empty. Ignored for stdin/stdout tests.
    pub prompt: String,
    /// Model completion: either the continuation of the prompt (the function
    /// body) or a full program that defines the entry point itself.
    pub completion: String,
    /// Tests to run.
    pub tests: CodeTests,
}

/// Expected versus actual output of a failed stdin/stdout case (truncated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputMismatch {
    /// Start of the case input.
    pub input: String,
    /// Start of the expected output.
    pub expected: String,
    /// Start of what the program printed.
    pub actual: String,
}

/// Verdict plus the evidence behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeResult {
    /// The verdict.
    pub verdict: CodeVerdict,
    /// Short human-readable reason.
    pub detail: String,
    /// Zero-based index of the failing test (assert, `check` call or stdio case).
    pub failed_test: Option<usize>,
    /// Tests that ran and succeeded.
    pub tests_passed: usize,
    /// Tests the job has.
    pub tests_total: usize,
    /// Exception type and message, when the harness caught one.
    pub exception: Option<String>,
    /// End of the traceback of that exception.
    pub traceback_tail: Option<String>,
    /// Exit status of the (last) process, if it exited normally.
    pub exit_code: Option<i32>,
    /// Signal that killed the (last) process, if any.
    pub signal: Option<i32>,
    /// End of the captured stderr of the (last) process.
    pub stderr_tail: String,
    /// Output mismatch of a failed stdin/stdout case.
    pub mismatch: Option<OutputMismatch>,
    /// Wall-clock time of all processes of the job, in milliseconds.
    pub duration_ms: u64,
    /// Isolation mechanisms that were in force.
    pub isolation: Isolation,
}

impl CodeResult {
    /// Whether the verdict is [`CodeVerdict::Pass`].
    pub fn passed(&self) -> bool {
        self.verdict == CodeVerdict::Pass
    }
}

impl Sandbox {
    /// Check one job in this sandbox.
    pub fn check(&self, job: &CodeJob) -> CodeResult {
        match &job.tests {
            CodeTests::Function {
                test_code,
                entry_point,
            } => runner::run_function(
                self,
                job,
                Some(test_code),
                entry_point.as_deref(),
                &[],
                None,
            ),
            CodeTests::Asserts {
                asserts,
                setup,
                entry_point,
            } => runner::run_function(
                self,
                job,
                None,
                entry_point.as_deref(),
                asserts,
                setup.as_deref(),
            ),
            CodeTests::Stdio { cases } => runner::run_stdio(self, job, cases),
        }
    }

    /// Check many jobs on [`SandboxConfig::effective_workers`] threads, each
    /// running one sandboxed process at a time; results keep the input order.
    pub fn check_batch(&self, jobs: &[CodeJob]) -> Vec<CodeResult> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Mutex;

        let workers = self
            .config()
            .effective_workers()
            .clamp(1, jobs.len().max(1));
        let next = AtomicUsize::new(0);
        let slots: Vec<Mutex<Option<CodeResult>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let result = self.check(job);
                    if let Ok(mut slot) = slots[i].lock() {
                        *slot = Some(result);
                    }
                });
            }
        });
        slots
            .into_iter()
            .map(|slot| {
                slot.into_inner().ok().flatten().unwrap_or_else(|| {
                    runner::sandbox_failure("worker panicked".into(), self.isolation())
                })
            })
            .collect()
    }
}

/// Check one job with a sandbox built from `config`.
///
/// Setup failures become a [`CodeVerdict::SandboxError`] result; use
/// [`Sandbox::new`] to handle them as errors instead.
pub fn check(job: &CodeJob, config: &SandboxConfig) -> CodeResult {
    match Sandbox::new(config.clone()) {
        Ok(sandbox) => sandbox.check(job),
        Err(e) => runner::sandbox_failure(e.to_string(), Isolation::default()),
    }
}

/// Check `jobs` in parallel (`config.workers` threads, default: twice the
/// cores), returning one result per job in input order.
///
/// Setup failures become a [`CodeVerdict::SandboxError`] result for every job.
pub fn check_batch(jobs: &[CodeJob], config: &SandboxConfig) -> Vec<CodeResult> {
    match Sandbox::new(config.clone()) {
        Ok(sandbox) => sandbox.check_batch(jobs),
        Err(e) => {
            let msg = e.to_string();
            jobs.iter()
                .map(|_| runner::sandbox_failure(msg.clone(), Isolation::default()))
                .collect()
        }
    }
}
