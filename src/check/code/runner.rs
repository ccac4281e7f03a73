//! Builds the harness invocation for each test style and turns what the
//! sandboxed process did into a [`CodeResult`].
//!
//! The Python harness (`harness.py`) receives the job on fd 3 (a `marshal`
//! dict, see [`marshal_spec`]), compiles the program before running anything
//! (so syntax errors are told apart from runtime errors), runs program and
//! tests, and reports one JSON line on fd 5. That line is trusted only if it
//! carries the per-run nonce, which the harness reads from
//! fd 4 only after the tests have returned: a program that exits early
//! (`sys.exit(0)`, `os._exit(0)`) never produces it and therefore never passes.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Deserialize;

use super::sandbox::{RunOutcome, RunRequest, Sandbox};
use super::{CodeJob, CodeResult, CodeVerdict, Isolation, OutputMismatch, StdioCase};

const HARNESS: &str = include_str!("harness.py");
/// Start-up code run with `-c`: reads fd 3 (the length of the compiled harness
/// as 4 little-endian bytes, the harness code object in `marshal` format, then
/// the job description) and runs the harness on the job description. Compiling
/// the harness once per interpreter instead of in every run saves start-up time.
pub(crate) const BOOTSTRAP: &str = "import marshal, posix
b = []
while True:
    c = posix.read(3, 65536)
    if not c:
        break
    b.append(c)
posix.close(3)
b = b''.join(b)
n = int.from_bytes(b[:4], 'little')
exec(marshal.loads(b[4:4 + n]), {'__name__': '__distill__', '_distill_spec': b[4 + n:]})
";

/// Compiled harness (`marshal` data) per interpreter.
static COMPILED_HARNESS: OnceLock<Mutex<HashMap<PathBuf, Arc<Vec<u8>>>>> = OnceLock::new();
/// Bytes of stderr / traceback kept in results.
const TAIL_BYTES: usize = 2000;
/// Bytes of expected / actual output kept in a mismatch record.
const MISMATCH_BYTES: usize = 500;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Report {
    status: String,
    nonce: String,
    phase: Option<String>,
    test_index: Option<usize>,
    tests_run: Option<usize>,
    exc_type: Option<String>,
    message: Option<String>,
    traceback: Option<String>,
    code: Option<serde_json::Value>,
}

fn new_nonce() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom fills the given buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Extremely unlikely; fall back to time and address entropy.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let addr = &bytes as *const _ as usize as u128;
        bytes = (t ^ (addr << 64) ^ u128::from(std::process::id())).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The harness compiled by `python` (cached), as `marshal` data.
fn compiled_harness(python: &Path) -> Result<Arc<Vec<u8>>, String> {
    let cache = COMPILED_HARNESS.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(code) = cache.lock().ok().and_then(|m| m.get(python).cloned()) {
        return Ok(code);
    }
    let fail = |e: String| format!("compiling the harness with {}: {e}", python.display());
    let mut child = Command::new(python)
        .args([
            "-I",
            "-S",
            "-B",
            "-c",
            "import marshal, sys; sys.stdout.buffer.write(marshal.dumps(compile(\
             sys.stdin.buffer.read(), '<distill-harness>', 'exec', dont_inherit=True)))",
        ])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(HARNESS.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    let code = Arc::new(out.stdout);
    if let Ok(mut m) = cache.lock() {
        m.insert(python.to_path_buf(), code.clone());
    }
    Ok(code)
}

/// What the harness reads on fd 3: the compiled harness, then the job.
fn harness_input(sandbox: &Sandbox, spec: &[u8]) -> Result<Vec<u8>, String> {
    let code = compiled_harness(sandbox.python())?;
    let mut input = Vec::with_capacity(4 + code.len() + spec.len());
    input.extend_from_slice(&(code.len() as u32).to_le_bytes());
    input.extend_from_slice(&code);
    input.extend_from_slice(spec);
    Ok(input)
}

/// Interpreter flags of every sandboxed run, spawned or forked from a server.
/// -I: ignore PYTHON* variables, user site-packages and the script directory.
/// -S: skip the site module, a large part of the start-up time; the harness
/// restores what programs rely on from it (`sys.path` with the installed
/// packages, passed in the job description, and exit()/quit()).
/// -B: write no bytecode. -X utf8: UTF-8 I/O regardless of locale.
pub(crate) const INTERPRETER_FLAGS: [&str; 5] = ["-I", "-S", "-B", "-X", "utf8"];

fn harness_args() -> Vec<std::ffi::OsString> {
    INTERPRETER_FLAGS
        .into_iter()
        .chain(["-c", BOOTSTRAP, "distill-sandbox"])
        .map(Into::into)
        .collect()
}

/// A value of the job description handed to the harness.
pub(crate) enum SpecValue<'a> {
    None,
    Str(&'a str),
    List(&'a [String]),
}

/// Serialize the job description as a Python `marshal` dict of strings, lists
/// of strings and `None`, which the harness reads without importing any module.
pub(crate) fn marshal_spec(fields: &[(&str, SpecValue<'_>)]) -> Vec<u8> {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.push(b'u');
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = vec![b'{'];
    for (key, value) in fields {
        put_str(&mut out, key);
        match value {
            SpecValue::None => out.push(b'N'),
            SpecValue::Str(s) => put_str(&mut out, s),
            SpecValue::List(items) => {
                out.push(b'[');
                out.extend_from_slice(&(items.len() as u32).to_le_bytes());
                for item in *items {
                    put_str(&mut out, item);
                }
            }
        }
    }
    out.push(b'0');
    out
}

fn parse_report(raw: &[u8], nonce: &str) -> Option<Report> {
    String::from_utf8_lossy(raw)
        .lines()
        .filter_map(|l| serde_json::from_str::<Report>(l).ok())
        .find(|r| r.nonce == nonce)
}

fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    tail_str(&text, max)
}

fn tail_str(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

fn head_str(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

fn looks_out_of_memory(stderr: &[u8]) -> bool {
    let text = String::from_utf8_lossy(stderr);
    [
        "MemoryError",
        "Cannot allocate memory",
        "out of memory",
        "bad_alloc",
    ]
    .iter()
    .any(|needle| text.contains(needle))
}

/// Whether the process died from exhausting its CPU-time limit (SIGXCPU at the
/// soft limit, SIGKILL at the hard limit).
fn hit_cpu_limit(out: &RunOutcome, limit: Duration) -> bool {
    match out.signal {
        Some(libc::SIGXCPU) => true,
        Some(libc::SIGKILL) => out.cpu_time + Duration::from_millis(50) >= limit,
        _ => false,
    }
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGABRT => "SIGABRT",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGKILL => "SIGKILL",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

fn base_result(out: &RunOutcome, verdict: CodeVerdict, detail: String) -> CodeResult {
    CodeResult {
        verdict,
        detail,
        failed_test: None,
        tests_passed: 0,
        tests_total: 0,
        exception: None,
        traceback_tail: None,
        exit_code: out.exit_code,
        signal: out.signal,
        stderr_tail: tail(&out.stderr, TAIL_BYTES),
        mismatch: None,
        duration_ms: out.duration.as_millis() as u64,
        isolation: out.isolation,
    }
}

/// Verdict for a process that produced no trustworthy report, from how it ended.
fn verdict_without_report(out: &RunOutcome, cpu_limit: Duration) -> (CodeVerdict, String) {
    if out.timed_out || hit_cpu_limit(out, cpu_limit) {
        return (CodeVerdict::Timeout, "time limit exceeded".into());
    }
    if looks_out_of_memory(&out.stderr) {
        return (CodeVerdict::MemoryLimit, "memory limit exceeded".into());
    }
    match (out.signal, out.exit_code) {
        (Some(sig), _) => (
            CodeVerdict::RuntimeError,
            format!("killed by {}", signal_name(sig)),
        ),
        (None, Some(0)) => (
            CodeVerdict::RuntimeError,
            "exited with status 0 before the tests completed (no completion sentinel)".into(),
        ),
        (None, Some(code)) => (
            CodeVerdict::RuntimeError,
            format!("exited with status {code}"),
        ),
        (None, None) => (CodeVerdict::SandboxError, "no exit status".into()),
    }
}

/// Result for a job whose sandbox could not be started at all.
pub(crate) fn sandbox_failure(message: String, isolation: Isolation) -> CodeResult {
    CodeResult {
        verdict: CodeVerdict::SandboxError,
        detail: message,
        failed_test: None,
        tests_passed: 0,
        tests_total: 0,
        exception: None,
        traceback_tail: None,
        exit_code: None,
        signal: None,
        stderr_tail: String::new(),
        mismatch: None,
        duration_ms: 0,
        isolation,
    }
}

fn apply_exception(result: &mut CodeResult, report: &Report) {
    if let Some(t) = &report.exc_type {
        let msg = report.message.as_deref().unwrap_or("");
        result.exception = Some(if msg.is_empty() {
            t.clone()
        } else {
            format!("{t}: {}", head_str(msg, 300))
        });
    }
    result.traceback_tail = report.traceback.as_deref().map(|t| tail_str(t, TAIL_BYTES));
}

/// Function-style job: program plus test code / asserts run in one process.
pub(crate) fn run_function<'a>(
    sandbox: &Sandbox,
    job: &CodeJob,
    test_code: Option<&'a str>,
    entry_point: Option<&'a str>,
    asserts: &[String],
    setup: Option<&'a str>,
) -> CodeResult {
    let tests_total = usize::from(test_code.is_some()) + asserts.len();
    let opt = |v: Option<&'a str>| v.map_or(SpecValue::None, SpecValue::Str);
    let spec = marshal_spec(&[
        ("mode", SpecValue::Str("function")),
        ("sys_path", SpecValue::List(sandbox.site_path())),
        ("prompt", SpecValue::Str(&job.prompt)),
        ("completion", SpecValue::Str(&job.completion)),
        ("entry_point", opt(entry_point)),
        ("test_code", opt(test_code)),
        ("asserts", SpecValue::List(asserts)),
        ("setup", opt(setup)),
    ]);
    let spec = match harness_input(sandbox, &spec) {
        Ok(input) => input,
        Err(e) => return sandbox_failure(e, sandbox.isolation()),
    };
    let nonce = new_nonce();
    let req = RunRequest {
        args: harness_args(),
        stdin: b"",
        spec: &spec,
        nonce: nonce.as_bytes(),
        stdout_cap: sandbox.config().max_output_bytes,
    };
    let out = match sandbox.run(&req) {
        Ok(out) => out,
        Err(e) => return sandbox_failure(e.to_string(), sandbox.isolation()),
    };
    let cpu_limit = sandbox.config().cpu_time_limit;
    let report = parse_report(&out.result, &nonce);
    let mut result = match &report {
        _ if out.timed_out || hit_cpu_limit(&out, cpu_limit) => {
            base_result(&out, CodeVerdict::Timeout, "time limit exceeded".into())
        }
        Some(r) => {
            let (verdict, detail) = match r.status.as_str() {
                "pass" if out.exit_code == Some(0) => {
                    (CodeVerdict::Pass, "all tests passed".into())
                }
                "pass" => (
                    CodeVerdict::RuntimeError,
                    "tests passed but the process did not exit cleanly".into(),
                ),
                "syntax_error" => (CodeVerdict::SyntaxError, "program does not compile".into()),
                "wrong_answer" => (CodeVerdict::WrongAnswer, "a test assertion failed".into()),
                "memory_error" => (CodeVerdict::MemoryLimit, "MemoryError raised".into()),
                "runtime_error" => (
                    CodeVerdict::RuntimeError,
                    format!(
                        "exception while running the {}",
                        r.phase.as_deref().unwrap_or("program")
                    ),
                ),
                "early_exit" => (
                    CodeVerdict::RuntimeError,
                    format!(
                        "SystemExit({}) during the {} before the tests completed",
                        r.code.as_ref().map(|c| c.to_string()).unwrap_or_default(),
                        r.phase.as_deref().unwrap_or("program")
                    ),
                ),
                "harness_error" => (
                    CodeVerdict::SandboxError,
                    "test code does not compile".into(),
                ),
                other => (
                    CodeVerdict::SandboxError,
                    format!("unknown harness status {other:?}"),
                ),
            };
            base_result(&out, verdict, detail)
        }
        None => {
            let (verdict, detail) = verdict_without_report(&out, cpu_limit);
            base_result(&out, verdict, detail)
        }
    };
    if let Some(r) = &report {
        apply_exception(&mut result, r);
        if result.verdict != CodeVerdict::Pass && r.phase.as_deref() == Some("tests") {
            result.failed_test = r.test_index;
        }
    }
    result.tests_total = tests_total;
    result.tests_passed = match result.verdict {
        CodeVerdict::Pass => report
            .as_ref()
            .and_then(|r| r.tests_run)
            .unwrap_or(tests_total),
        _ => result.failed_test.unwrap_or(0),
    };
    result
}

/// Stdin/stdout job: one sandboxed process per case, stopping at the first
/// failing case.
pub(crate) fn run_stdio(sandbox: &Sandbox, job: &CodeJob, cases: &[StdioCase]) -> CodeResult {
    let spec = marshal_spec(&[
        ("mode", SpecValue::Str("stdio")),
        ("sys_path", SpecValue::List(sandbox.site_path())),
        ("completion", SpecValue::Str(&job.completion)),
    ]);
    let spec = match harness_input(sandbox, &spec) {
        Ok(input) => input,
        Err(e) => return sandbox_failure(e, sandbox.isolation()),
    };
    let cpu_limit = sandbox.config().cpu_time_limit;
    let mut total_ms = 0u64;
    let mut last: Option<CodeResult> = None;
    for (index, case) in cases.iter().enumerate() {
        let nonce = new_nonce();
        let req = RunRequest {
            args: harness_args(),
            stdin: case.input.as_bytes(),
            spec: &spec,
            nonce: nonce.as_bytes(),
            stdout_cap: sandbox
                .config()
                .max_output_bytes
                .max(case.expected_output.len().saturating_mul(2) + 4096),
        };
        let out = match sandbox.run(&req) {
            Ok(out) => out,
            Err(e) => return sandbox_failure(e.to_string(), sandbox.isolation()),
        };
        total_ms += out.duration.as_millis() as u64;
        let report = parse_report(&out.result, &nonce);
        let failure: Option<(CodeVerdict, String)> =
            if out.timed_out || hit_cpu_limit(&out, cpu_limit) {
                Some((CodeVerdict::Timeout, "time limit exceeded".into()))
            } else {
                match report.as_ref().map(|r| r.status.as_str()) {
                    Some("syntax_error") => {
                        Some((CodeVerdict::SyntaxError, "program does not compile".into()))
                    }
                    Some("memory_error") => {
                        Some((CodeVerdict::MemoryLimit, "MemoryError raised".into()))
                    }
                    Some("runtime_error") => Some((
                        CodeVerdict::RuntimeError,
                        "exception while running the program".into(),
                    )),
                    Some("harness_error") => {
                        Some((CodeVerdict::SandboxError, "harness failure".into()))
                    }
                    _ if out.exit_code == Some(0) => None,
                    _ => Some(verdict_without_report(&out, cpu_limit)),
                }
            };
        let mut result = match failure {
            Some((verdict, detail)) => base_result(&out, verdict, detail),
            None => {
                let actual = String::from_utf8_lossy(&out.stdout);
                if outputs_match(&case.expected_output, &actual) {
                    let mut r = base_result(&out, CodeVerdict::Pass, "all tests passed".into());
                    r.tests_passed = index + 1;
                    last = Some(r);
                    continue;
                }
                let mut r = base_result(
                    &out,
                    CodeVerdict::WrongAnswer,
                    if out.stdout_truncated {
                        "output does not match (output was truncated)".into()
                    } else {
                        "output does not match".into()
                    },
                );
                r.mismatch = Some(OutputMismatch {
                    input: head_str(&case.input, MISMATCH_BYTES),
                    expected: head_str(&case.expected_output, MISMATCH_BYTES),
                    actual: head_str(&actual, MISMATCH_BYTES),
                });
                r
            }
        };
        if let Some(r) = &report {
            apply_exception(&mut result, r);
        }
        result.failed_test = Some(index);
        result.tests_passed = index;
        result.tests_total = cases.len();
        result.duration_ms = total_ms;
        return result;
    }
    match last {
        Some(mut r) => {
            r.tests_total = cases.len();
            r.duration_ms = total_ms;
            r
        }
        None => sandbox_failure("no test cases given".into(), sandbox.isolation()),
    }
}

/// Tolerant comparison of program output with the expected output.
///
/// Accepts, in order: equality after trimming trailing whitespace on every line
/// and trailing blank lines; otherwise equality of the whitespace-separated token
/// sequences where two tokens match if they are identical or, when at least one
/// of them is written as a non-integer number, both parse as floats within 1e-6
/// absolute or relative difference. Integers are compared exactly, so large
/// integers are never rounded into equality.
pub fn outputs_match(expected: &str, actual: &str) -> bool {
    fn normalize(s: &str) -> Vec<&str> {
        let mut lines: Vec<&str> = s.lines().map(str::trim_end).collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
    }
    if normalize(expected) == normalize(actual) {
        return true;
    }
    let e: Vec<&str> = expected.split_whitespace().collect();
    let a: Vec<&str> = actual.split_whitespace().collect();
    e.len() == a.len() && e.iter().zip(&a).all(|(x, y)| tokens_match(x, y))
}

fn tokens_match(expected: &str, actual: &str) -> bool {
    if expected == actual {
        return true;
    }
    let is_int = |t: &str| {
        let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
    };
    let is_number = |t: &str| {
        t.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
            && t.bytes().any(|b| b.is_ascii_digit())
    };
    if !is_number(expected) || !is_number(actual) || (is_int(expected) && is_int(actual)) {
        return false;
    }
    match (expected.parse::<f64>(), actual.parse::<f64>()) {
        (Ok(x), Ok(y)) if x.is_finite() && y.is_finite() => {
            let diff = (x - y).abs();
            diff <= 1e-6 || diff <= 1e-6 * x.abs().max(y.abs())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerant_comparison() {
        assert!(outputs_match("1 2\n3\n", "1 2   \n3"));
        assert!(outputs_match("1 2\n3\n\n\n", "1 2\n3"));
        assert!(outputs_match("1 2 3", "1\n2\n3\n"));
        assert!(outputs_match("0.333333333", "0.3333333334"));
        assert!(outputs_match("1.5", "1.500000"));
        assert!(outputs_match("1000000.0", "1000000.5e0"));
        assert!(!outputs_match("1000.0", "1000.5"));
        assert!(outputs_match("2", "2.0000000001"));
        assert!(!outputs_match("YES", "NO"));
        assert!(!outputs_match("1 2", "1 2 3"));
        assert!(!outputs_match(
            "123456789012345678901",
            "123456789012345678902"
        ));
        assert!(!outputs_match("0.5", "0.51"));
        assert!(!outputs_match("yes", "YES"));
        assert!(outputs_match("", "\n\n"));
    }

    #[test]
    fn report_needs_matching_nonce() {
        let raw = b"{\"status\":\"pass\",\"nonce\":\"abc\"}\n";
        assert!(parse_report(raw, "abc").is_some());
        assert!(parse_report(raw, "abd").is_none());
        assert!(parse_report(b"garbage", "abc").is_none());
    }
}
