//! Integration tests for the sandboxed Python code checker (Linux only).
#![cfg(target_os = "linux")]

use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use distill::check::code::{
    check, check_batch, CodeJob, CodeResult, CodeTests, CodeVerdict, Sandbox, SandboxConfig,
    StdioCase,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

#[derive(serde::Deserialize)]
struct HumanEvalProblem {
    task_id: String,
    prompt: String,
    canonical_solution: String,
    test: String,
    entry_point: String,
}

fn human_eval() -> Vec<HumanEvalProblem> {
    let file = std::fs::File::open(fixture("HumanEval.jsonl.gz")).expect("fixture present");
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .expect("valid gzip");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("valid HumanEval record"))
        .collect()
}

fn he_job(p: &HumanEvalProblem, completion: String) -> CodeJob {
    CodeJob {
        prompt: p.prompt.clone(),
        completion,
        tests: CodeTests::Function {
            test_code: p.test.clone(),
            entry_point: Some(p.entry_point.clone()),
        },
    }
}

/// Small limits so hostile programs are stopped quickly.
fn tight() -> SandboxConfig {
    SandboxConfig {
        wall_timeout: Duration::from_secs(2),
        cpu_time_limit: Duration::from_secs(2),
        memory_limit_bytes: 512 << 20,
        max_processes: 16,
        max_file_size_bytes: 1 << 20,
        workdir_size_bytes: 8 << 20,
        ..SandboxConfig::default()
    }
}

/// The same limits with one interpreter started per program instead of a
/// child forked from a warm server: both launch paths must contain the same
/// programs.
fn spawned(cfg: SandboxConfig) -> SandboxConfig {
    SandboxConfig {
        fork_server: false,
        ..cfg
    }
}

fn func_job(completion: &str, test_code: &str, entry: &str) -> CodeJob {
    CodeJob {
        prompt: String::new(),
        completion: completion.into(),
        tests: CodeTests::Function {
            test_code: test_code.into(),
            entry_point: Some(entry.into()),
        },
    }
}

fn marker() -> String {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("urandom");
    format!(
        "distillmark{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// Pids whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                if String::from_utf8_lossy(&cmd).contains(needle) {
                    found.push(pid);
                }
            }
        }
    }
    found
}

/// Why the fork server was given up for this configuration, if it was.
fn fork_server_unusable(cfg: &SandboxConfig) -> Option<String> {
    Sandbox::new(cfg.clone())
        .ok()
        .and_then(|s| s.fork_server_unusable())
}

fn assert_verdict(r: &CodeResult, expected: CodeVerdict) {
    assert_eq!(r.verdict, expected, "unexpected verdict: {r:#?}");
}

#[test]
fn human_eval_canonical_solutions_pass() {
    human_eval_canonical_solutions_pass_in(SandboxConfig::default());
}

#[test]
fn human_eval_canonical_solutions_pass_spawned() {
    human_eval_canonical_solutions_pass_in(spawned(SandboxConfig::default()));
}

fn human_eval_canonical_solutions_pass_in(cfg: SandboxConfig) {
    let problems = human_eval();
    assert_eq!(problems.len(), 164);
    let jobs: Vec<CodeJob> = problems
        .iter()
        .map(|p| he_job(p, p.canonical_solution.clone()))
        .collect();
    let start = Instant::now();
    let results = check_batch(&jobs, &cfg);
    let elapsed = start.elapsed();
    eprintln!(
        "checked {} canonical solutions with {} workers in {:.2?} ({:.1}/s); isolation: {:?}",
        jobs.len(),
        cfg.effective_workers(),
        elapsed,
        jobs.len() as f64 / elapsed.as_secs_f64(),
        results[0].isolation
    );
    assert!(
        results
            .iter()
            .all(|r| r.isolation.fork_server == cfg.fork_server),
        "launch path not as configured: {:?}; fork server given up: {:?}",
        results[0],
        fork_server_unusable(&cfg)
    );
    // The interpreter finds everything it needs under read confinement.
    if landlock_available() {
        assert!(
            results.iter().all(|r| r.isolation.read_confined),
            "{:?}",
            results[0].isolation
        );
    }
    let failures: Vec<_> = problems
        .iter()
        .zip(&results)
        .filter(|(_, r)| !r.passed())
        .map(|(p, r)| {
            format!(
                "{}: {:?} {} {}",
                p.task_id, r.verdict, r.detail, r.stderr_tail
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "canonical solutions failed: {failures:#?}"
    );
    for r in &results {
        assert_eq!(r.tests_passed, 1);
        assert_eq!(r.tests_total, 1);
    }
}

#[test]
fn human_eval_broken_solutions_fail() {
    let problems = human_eval();
    let mut jobs: Vec<CodeJob> = problems
        .iter()
        .map(|p| he_job(p, "    return None\n".into()))
        .collect();
    let flippable: Vec<&HumanEvalProblem> = problems
        .iter()
        .filter(|p| p.canonical_solution.contains(" + "))
        .collect();
    jobs.extend(
        flippable
            .iter()
            .map(|p| he_job(p, p.canonical_solution.replacen(" + ", " - ", 1))),
    );
    let results = check_batch(&jobs, &SandboxConfig::default());
    let (none_results, flipped) = results.split_at(problems.len());
    for (p, r) in problems.iter().zip(none_results) {
        assert!(
            matches!(
                r.verdict,
                CodeVerdict::WrongAnswer | CodeVerdict::RuntimeError
            ),
            "{} `return None` gave {r:#?}",
            p.task_id
        );
    }
    let failed = flipped.iter().filter(|r| !r.passed()).count();
    eprintln!("flipped + to -: {failed}/{} fail", flipped.len());
    assert!(
        failed * 10 >= flipped.len() * 8,
        "only {failed}/{} flipped solutions fail",
        flipped.len()
    );
}

#[test]
fn completion_restating_the_whole_function_passes() {
    let problems = human_eval();
    let jobs: Vec<CodeJob> = problems
        .iter()
        .step_by(8)
        .map(|p| he_job(p, format!("{}{}", p.prompt, p.canonical_solution)))
        .collect();
    let results = check_batch(&jobs, &SandboxConfig::default());
    for r in &results {
        assert_verdict(r, CodeVerdict::Pass);
    }
    // A complete program without the prompt's stub also works.
    let r = check(
        &CodeJob {
            prompt: "def add(a, b):\n    \"\"\"Add.\"\"\"\n".into(),
            completion: "def add(a, b):\n    return a + b\n".into(),
            tests: CodeTests::Function {
                test_code: "def check(f):\n    assert f(2, 3) == 5\n".into(),
                entry_point: Some("add".into()),
            },
        },
        &tight(),
    );
    assert_verdict(&r, CodeVerdict::Pass);
}

#[test]
fn mbpp_asserts_report_failing_test() {
    let job = |completion: &str| CodeJob {
        prompt: String::new(),
        completion: completion.into(),
        tests: CodeTests::Asserts {
            asserts: vec![
                "assert square(2) == 4".into(),
                "assert square(3) == 9".into(),
                "assert square(-1) == 1".into(),
            ],
            setup: Some("import math".into()),
            entry_point: Some("square".into()),
        },
    };
    let ok = check(&job("def square(x):\n    return x * x\n"), &tight());
    assert_verdict(&ok, CodeVerdict::Pass);
    assert_eq!((ok.tests_passed, ok.tests_total), (3, 3));
    let bad = check(
        &job("def square(x):\n    return x * x if x != 3 else 0\n"),
        &tight(),
    );
    assert_verdict(&bad, CodeVerdict::WrongAnswer);
    assert_eq!(bad.failed_test, Some(1));
    assert_eq!(bad.tests_passed, 1);
    assert!(bad
        .exception
        .as_deref()
        .unwrap_or("")
        .starts_with("AssertionError"));
}

#[test]
fn syntax_and_runtime_errors_are_distinguished() {
    let test = "def check(f):\n    assert f() == 1\n";
    let syntax = check(&func_job("def f(:\n    return 1\n", test, "f"), &tight());
    assert_verdict(&syntax, CodeVerdict::SyntaxError);
    let runtime = check(
        &func_job("def f():\n    return 1 / 0\n", test, "f"),
        &tight(),
    );
    assert_verdict(&runtime, CodeVerdict::RuntimeError);
    assert!(runtime
        .exception
        .as_deref()
        .unwrap_or("")
        .contains("ZeroDivisionError"));
    let import_time = check(
        &func_job(
            "import no_such_module_xyz\ndef f():\n    return 1\n",
            test,
            "f",
        ),
        &tight(),
    );
    assert_verdict(&import_time, CodeVerdict::RuntimeError);
    let missing = check(&func_job("def g():\n    return 1\n", test, "f"), &tight());
    assert_verdict(&missing, CodeVerdict::RuntimeError);
}

fn early_exits_never_pass_in(base: SandboxConfig) {
    let test = "def check(f):\n    assert f() == 1\n";
    let programs = [
        "import os\nos._exit(0)\ndef f():\n    return 1\n",
        "import sys\nsys.exit(0)\ndef f():\n    return 1\n",
        "raise SystemExit\ndef f():\n    return 1\n",
        "exit(0)\n",
        "import os\ndef f():\n    os._exit(0)\n",
        "import sys\ndef f():\n    sys.exit(0)\n",
        // Forged report on stdout and on the result descriptor, then a clean exit.
        "import os\nos.write(1, b'{\"status\": \"pass\", \"nonce\": \"\"}\\n')\ntry:\n    os.write(5, b'{\"status\": \"pass\", \"nonce\": \"x\"}\\n')\nexcept OSError:\n    pass\nos._exit(0)\n",
    ];
    for program in programs {
        let r = check(&func_job(program, test, "f"), &base);
        assert_verdict(&r, CodeVerdict::RuntimeError);
        assert_eq!(
            r.isolation.fork_server,
            base.fork_server,
            "{r:#?}; fork server given up: {:?}",
            fork_server_unusable(&base)
        );
    }
}

fn infinite_loop_times_out_in(base: SandboxConfig) {
    let cfg = SandboxConfig {
        wall_timeout: Duration::from_millis(800),
        ..base
    };
    let start = Instant::now();
    let r = check(
        &func_job(
            "def f():\n    while True:\n        pass\n",
            "def check(f):\n    f()\n",
            "f",
        ),
        &cfg,
    );
    assert_verdict(&r, CodeVerdict::Timeout);
    assert!(start.elapsed() < Duration::from_secs(5));
    // A sleeping program uses no CPU: only the wall clock stops it.
    let r = check(&func_job("import time\ntime.sleep(60)\n", "", "f"), &cfg);
    assert_verdict(&r, CodeVerdict::Timeout);
}

fn cpu_limit_times_out_in(base: SandboxConfig) {
    let cfg = SandboxConfig {
        wall_timeout: Duration::from_secs(5),
        cpu_time_limit: Duration::from_secs(1),
        ..base
    };
    let r = check(&func_job("while True:\n    pass\n", "", "f"), &cfg);
    assert_verdict(&r, CodeVerdict::Timeout);
    assert!(r.duration_ms < 4000, "stopped by the CPU limit: {r:?}");
}

fn memory_bombs_hit_the_memory_limit_in(base: SandboxConfig) {
    let cfg = SandboxConfig {
        memory_limit_bytes: 256 << 20,
        ..base
    };
    let big = check(&func_job("x = bytearray(8 * 1024 ** 3)\n", "", "f"), &cfg);
    assert_verdict(&big, CodeVerdict::MemoryLimit);
    let gradual = check(
        &func_job(
            "def f():\n    xs = []\n    while True:\n        xs.append(bytearray(10 ** 7))\n",
            "def check(f):\n    f()\n",
            "f",
        ),
        &cfg,
    );
    assert_verdict(&gradual, CodeVerdict::MemoryLimit);
}

fn fork_bomb_is_contained_and_leaves_no_processes_in(base: SandboxConfig) {
    let mark = marker();
    let program = format!(
        r#"import os, sys
MARK = "{mark}"
for i in range(64):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        try:
            os.setsid()
            os.execv(sys.executable, [sys.executable, "-c", "import time\nwhile True: time.sleep(1)", MARK])
        finally:
            os._exit(0)
while True:
    try:
        os.fork()
    except OSError:
        pass
"#
    );
    let start = Instant::now();
    let r = check(&func_job(&program, "", "f"), &base);
    assert!(
        matches!(r.verdict, CodeVerdict::Timeout | CodeVerdict::RuntimeError),
        "{r:#?}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    let mut survivors = processes_with(&mark);
    for _ in 0..20 {
        if survivors.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        survivors = processes_with(&mark);
    }
    if !survivors.is_empty() {
        for pid in &survivors {
            // SAFETY: cleaning up after a failed containment.
            unsafe {
                libc::kill(*pid as i32, libc::SIGKILL);
            }
        }
    }
    assert!(
        survivors.is_empty() || !r.isolation.dropped_uid,
        "processes survived: {survivors:?} under {:?}",
        r.isolation
    );
    assert!(survivors.is_empty(), "processes survived: {survivors:?}");
}

fn process_count_limit_is_reported_and_enforced_in(base: SandboxConfig) {
    let program = r#"import subprocess, sys
def f():
    procs = []
    try:
        for _ in range(40):
            procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"]))
    except OSError:
        pass
    n = len(procs)
    for p in procs:
        p.kill()
        p.wait()
    return n
"#;
    let sandbox = Sandbox::new(base).expect("sandbox");
    let isolation = sandbox.isolation();
    let r = sandbox.check(&func_job(
        program,
        "def check(f):\n    assert f() < 16\n",
        "f",
    ));
    if isolation.nproc_enforced {
        assert_verdict(&r, CodeVerdict::Pass);
    } else {
        eprintln!("RLIMIT_NPROC not enforced here: {isolation:?}");
    }
}

fn writes_outside_the_workdir_do_not_persist_in(base: SandboxConfig) {
    let mark = marker();
    let escape = PathBuf::from(format!("/tmp/distill-escape-{mark}"));
    let temp_root = tempfile::tempdir().expect("tempdir");
    let cfg = SandboxConfig {
        temp_root: Some(temp_root.path().to_path_buf()),
        ..base
    };
    let program = format!(
        "def f():\n    with open('local.txt', 'w') as fh:\n        fh.write('ok')\n    with open('{}', 'w') as fh:\n        fh.write('escaped')\n",
        escape.display()
    );
    let r = check(&func_job(&program, "def check(f):\n    f()\n", "f"), &cfg);
    let escaped = escape.exists();
    let _ = std::fs::remove_file(&escape);
    if r.isolation.read_only_root {
        assert!(!escaped, "file escaped the read-only sandbox");
        assert_verdict(&r, CodeVerdict::RuntimeError);
        assert!(
            r.exception.as_deref().unwrap_or("").contains("OSError"),
            "{r:#?}"
        );
    } else {
        eprintln!(
            "no read-only root here ({:?}); escape file existed: {escaped}",
            r.isolation
        );
    }
    // The working directory is removed after the run.
    let left: Vec<_> = std::fs::read_dir(temp_root.path())
        .expect("read temp root")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn network_is_unreachable_in(base: SandboxConfig) {
    let program = r#"import socket
def f():
    results = []
    for addr in [("1.1.1.1", 80), ("127.0.0.1", 22)]:
        try:
            s = socket.create_connection(addr, timeout=1)
            s.close()
            results.append("connected")
        except OSError:
            results.append("failed")
    try:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.sendto(b"x", ("8.8.8.8", 53))
        results.append("sent")
    except OSError:
        results.append("failed")
    return results
"#;
    let r = check(
        &func_job(
            program,
            "def check(f):\n    assert f() == ['failed'] * 3, f()\n",
            "f",
        ),
        &base,
    );
    if r.isolation.net_namespace {
        assert_verdict(&r, CodeVerdict::Pass);
    } else {
        eprintln!("no network namespace here: {r:#?}");
    }
}

fn segfault_is_a_runtime_error_in(base: SandboxConfig) {
    let r = check(
        &func_job(
            "import ctypes\ndef f():\n    return ctypes.string_at(0)\n",
            "def check(f):\n    f()\n",
            "f",
        ),
        &base,
    );
    assert_verdict(&r, CodeVerdict::RuntimeError);
    assert_eq!(r.signal, Some(libc::SIGSEGV), "{r:#?}");
}

fn output_flood_is_capped_in(base: SandboxConfig) {
    let cfg = SandboxConfig {
        wall_timeout: Duration::from_secs(1),
        max_output_bytes: 4096,
        ..base
    };
    let r = check(
        &func_job("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n    sys.stderr.write('y' * 65536)\n", "", "f"),
        &cfg,
    );
    assert_verdict(&r, CodeVerdict::Timeout);
    assert!(r.stderr_tail.len() <= 4096 + 16);
}

fn stdio_job(program: &str, cases: &[(&str, &str)]) -> CodeJob {
    CodeJob {
        prompt: "Read numbers and print things.".into(),
        completion: program.into(),
        tests: CodeTests::Stdio {
            cases: cases
                .iter()
                .map(|(i, o)| StdioCase {
                    input: (*i).into(),
                    expected_output: (*o).into(),
                })
                .collect(),
        },
    }
}

#[test]
fn stdio_programs_with_tolerant_comparison() {
    let cases = [("1 2\n", "3\n"), ("10 -4\n", "6"), ("5 5\n", "10\n\n")];
    let sum = "a, b = map(int, input().split())\nprint(a + b, ' ')\n";
    let jobs = vec![
        stdio_job(sum, &cases),
        // Reads fd 0 directly and exits explicitly after printing: fine here.
        stdio_job("import sys\na, b = map(int, open(0).read().split())\nprint(a + b)\nsys.exit(0)\n", &cases),
        // Solution run in a thread with a bigger stack.
        stdio_job("import threading\ndef main():\n    a, b = map(int, input().split())\n    print(a + b)\nthreading.stack_size(1 << 26)\nt = threading.Thread(target=main)\nt.start()\n", &cases),
        // Floats within tolerance.
        stdio_job("a, b = map(int, input().split())\nprint(f'{a / 3:.9f} {b}')\n", &[("1 7\n", "0.333333333333 7\n")]),
        // Wrong answer on the second case.
        stdio_job("a, b = map(int, input().split())\nprint(a + b if a < 10 else 0)\n", &cases),
        // Runtime error.
        stdio_job("a, b = map(int, input().split())\nprint(a // (b - b))\n", &cases),
        // Syntax error.
        stdio_job("print(\n", &cases),
        // Nonzero exit status.
        stdio_job("import sys\nprint(3)\nsys.exit(2)\n", &cases),
        // Timeout.
        stdio_job("while True:\n    pass\n", &cases),
    ];
    let cfg = SandboxConfig {
        wall_timeout: Duration::from_secs(1),
        ..tight()
    };
    let r = check_batch(&jobs, &cfg);
    assert_verdict(&r[0], CodeVerdict::Pass);
    assert_eq!((r[0].tests_passed, r[0].tests_total), (3, 3));
    assert_verdict(&r[1], CodeVerdict::Pass);
    assert_verdict(&r[2], CodeVerdict::Pass);
    assert_verdict(&r[3], CodeVerdict::Pass);
    assert_verdict(&r[4], CodeVerdict::WrongAnswer);
    assert_eq!(r[4].failed_test, Some(1));
    let mismatch = r[4].mismatch.as_ref().expect("mismatch recorded");
    assert_eq!(mismatch.actual.trim(), "0");
    assert_eq!(mismatch.expected.trim(), "6");
    assert_verdict(&r[5], CodeVerdict::RuntimeError);
    assert!(r[5]
        .exception
        .as_deref()
        .unwrap_or("")
        .contains("ZeroDivisionError"));
    assert_verdict(&r[6], CodeVerdict::SyntaxError);
    assert_verdict(&r[7], CodeVerdict::RuntimeError);
    assert_eq!(r[7].exit_code, Some(2));
    assert_verdict(&r[8], CodeVerdict::Timeout);
}

#[test]
fn results_serialize_with_snake_case_verdicts() {
    let r = check(
        &func_job(
            "def f():\n    return 2\n",
            "def check(f):\n    assert f() == 1\n",
            "f",
        ),
        &tight(),
    );
    let json = serde_json::to_value(&r).expect("serializable");
    assert_eq!(json["verdict"], "wrong_answer");
    assert!(json["isolation"]["rlimits"].as_bool().unwrap_or(false));
}

#[test]
fn programs_see_what_the_site_module_provides() {
    // The module search path of the interpreter with `site` enabled, and the
    // exit()/quit() builtins.
    let python = Sandbox::new(tight())
        .expect("sandbox")
        .python()
        .to_path_buf();
    let out = std::process::Command::new(&python)
        .args(["-I", "-c", "import sys; print(repr(sys.path))"])
        .output()
        .expect("python runs");
    let site_path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let program = format!("import sys\ndef f():\n    return sys.path == {site_path}\n");
    let r = check(
        &func_job(&program, "def check(f):\n    assert f()\n", "f"),
        &tight(),
    );
    assert_verdict(&r, CodeVerdict::Pass);
    let jobs = vec![
        stdio_job(
            "print(int(input()) * 2)\nexit()\nprint('unreachable')\n",
            &[("2\n", "4\n")],
        ),
        stdio_job("print(1)\nquit(3)\n", &[("", "1\n")]),
    ];
    let r = check_batch(&jobs, &tight());
    assert_verdict(&r[0], CodeVerdict::Pass);
    assert_verdict(&r[1], CodeVerdict::RuntimeError);
    assert_eq!(r[1].exit_code, Some(3));
}

#[test]
fn failure_reports_carry_exception_text_and_source_lines() {
    let r = check(
        &func_job(
            "def f():\n    raise ValueError('tab\\t \"quoted\" \\\\ caf\\u00e9 \\x01 \\ud800 end')\n",
            "def check(f):\n    assert f() == 1\n",
            "f",
        ),
        &tight(),
    );
    assert_verdict(&r, CodeVerdict::RuntimeError);
    assert_eq!(
        r.exception.as_deref(),
        Some("ValueError: tab\t \"quoted\" \\ caf\u{e9} \u{1} ? end")
    );
    let tb = r.traceback_tail.as_deref().unwrap_or("");
    assert!(tb.contains("raise ValueError("), "{tb}");
    assert!(tb.contains("assert f() == 1"), "{tb}");
}

#[test]
fn early_exits_never_pass() {
    early_exits_never_pass_in(tight());
}

#[test]
fn early_exits_never_pass_spawned() {
    early_exits_never_pass_in(spawned(tight()));
}

#[test]
fn infinite_loop_times_out() {
    infinite_loop_times_out_in(tight());
}

#[test]
fn infinite_loop_times_out_spawned() {
    infinite_loop_times_out_in(spawned(tight()));
}

#[test]
fn cpu_limit_times_out() {
    cpu_limit_times_out_in(tight());
}

#[test]
fn cpu_limit_times_out_spawned() {
    cpu_limit_times_out_in(spawned(tight()));
}

#[test]
fn memory_bombs_hit_the_memory_limit() {
    memory_bombs_hit_the_memory_limit_in(tight());
}

#[test]
fn memory_bombs_hit_the_memory_limit_spawned() {
    memory_bombs_hit_the_memory_limit_in(spawned(tight()));
}

#[test]
fn fork_bomb_is_contained_and_leaves_no_processes() {
    fork_bomb_is_contained_and_leaves_no_processes_in(tight());
}

#[test]
fn fork_bomb_is_contained_and_leaves_no_processes_spawned() {
    fork_bomb_is_contained_and_leaves_no_processes_in(spawned(tight()));
}

#[test]
fn writes_outside_the_workdir_do_not_persist() {
    writes_outside_the_workdir_do_not_persist_in(tight());
}

#[test]
fn writes_outside_the_workdir_do_not_persist_spawned() {
    writes_outside_the_workdir_do_not_persist_in(spawned(tight()));
}

#[test]
fn network_is_unreachable() {
    network_is_unreachable_in(tight());
}

#[test]
fn network_is_unreachable_spawned() {
    network_is_unreachable_in(spawned(tight()));
}

#[test]
fn segfault_is_a_runtime_error() {
    segfault_is_a_runtime_error_in(tight());
}

#[test]
fn segfault_is_a_runtime_error_spawned() {
    segfault_is_a_runtime_error_in(spawned(tight()));
}

#[test]
fn output_flood_is_capped() {
    output_flood_is_capped_in(tight());
}

#[test]
fn output_flood_is_capped_spawned() {
    output_flood_is_capped_in(spawned(tight()));
}

#[test]
fn process_count_limit_is_reported_and_enforced() {
    process_count_limit_is_reported_and_enforced_in(tight());
}

#[test]
fn process_count_limit_is_reported_and_enforced_spawned() {
    process_count_limit_is_reported_and_enforced_in(spawned(tight()));
}

#[test]
fn a_program_cannot_take_down_the_fork_server() {
    // In a PID namespace the parent (the fork server) has no pid the program
    // could name; without one, signalling it is refused under a dedicated uid;
    // where it succeeds the run is lost, never passed, and later jobs still get
    // a working server.
    let program = "import os, signal\ndef f():\n    ppid = os.getppid()\n    if ppid == 0:\n        raise ProcessLookupError('no parent pid')\n    os.kill(ppid, signal.SIGKILL)\n    return 1\n";
    let test = "def check(f):\n    assert f() == 1\n";
    let sandbox = Sandbox::new(tight()).expect("sandbox");
    let jobs: Vec<CodeJob> = (0..6).map(|_| func_job(program, test, "f")).collect();
    for r in sandbox.check_batch(&jobs) {
        if r.isolation.pid_namespace {
            assert_verdict(&r, CodeVerdict::RuntimeError);
            assert!(
                r.exception
                    .as_deref()
                    .unwrap_or("")
                    .contains("ProcessLookupError"),
                "{r:#?}"
            );
        } else if r.isolation.dropped_uid {
            assert_verdict(&r, CodeVerdict::RuntimeError);
            assert!(
                r.exception
                    .as_deref()
                    .unwrap_or("")
                    .contains("PermissionError"),
                "{r:#?}"
            );
        } else {
            assert_ne!(r.verdict, CodeVerdict::Pass, "{r:#?}");
        }
    }
    let good: Vec<CodeJob> = (0..6)
        .map(|i| {
            func_job(
                &format!("def f():\n    return {i}\n"),
                &format!("def check(f):\n    assert f() == {i}\n"),
                "f",
            )
        })
        .collect();
    for r in sandbox.check_batch(&good) {
        assert_verdict(&r, CodeVerdict::Pass);
    }
}

/// Tests that the unprivileged run repeats (as `nobody`, through a user
/// namespace instead of a dedicated uid).
const UNPRIVILEGED_TESTS: [&str; 16] = [
    "human_eval_canonical_solutions_pass",
    "human_eval_canonical_solutions_pass_spawned",
    "reads_outside_the_workdir_are_refused",
    "reads_outside_the_workdir_are_refused_spawned",
    "listing_directories_outside_the_workdir_is_refused",
    "listing_directories_outside_the_workdir_is_refused_spawned",
    "other_processes_are_invisible_and_unreachable",
    "other_processes_are_invisible_and_unreachable_spawned",
    "proc_shows_only_the_programs_own_processes",
    "proc_shows_only_the_programs_own_processes_spawned",
    "early_exits_never_pass",
    "fork_bomb_is_contained_and_leaves_no_processes",
    "writes_outside_the_workdir_do_not_persist",
    "network_is_unreachable",
    "memory_bombs_hit_the_memory_limit",
    "a_program_cannot_take_down_the_fork_server",
];

#[test]
fn unprivileged_users_get_the_same_containment() {
    if std::env::var_os("DISTILL_TEST_UNPRIVILEGED").is_some() {
        // This is the unprivileged run itself.
        let sandbox = Sandbox::new(tight()).expect("sandbox");
        let iso = sandbox.isolation();
        assert!(
            iso.user_namespace && iso.net_namespace && iso.read_only_root,
            "{iso:?}"
        );
        assert!(iso.pid_namespace, "{iso:?}");
        assert_eq!(iso.read_confined, landlock_available(), "{iso:?}");
        return;
    }
    // SAFETY: trivial getter.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: this run already is the unprivileged path");
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let drop_to_nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"];
    let usable = Command::new("setpriv")
        .args(drop_to_nobody)
        .args(["test", "-x"])
        .arg(&exe)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !usable {
        eprintln!(
            "skipped: setpriv missing or {} not executable by nobody",
            exe.display()
        );
        return;
    }
    let out = Command::new("setpriv")
        .args(drop_to_nobody)
        .arg("env")
        .arg("HOME=/tmp")
        .arg("DISTILL_TEST_UNPRIVILEGED=1")
        .arg(&exe)
        .args(UNPRIVILEGED_TESTS)
        .arg("unprivileged_users_get_the_same_containment")
        .args(["--exact", "--test-threads", "2"])
        .output()
        .expect("run the tests as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "unprivileged run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = format!("{} passed", UNPRIVILEGED_TESTS.len() + 1);
    assert!(stdout.contains(&expected), "{stdout}");
}

/// Whether the kernel has Landlock: read confinement must then be in force.
fn landlock_available() -> bool {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only
    // returns the ABI version.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        ) >= 1
    }
}

/// Whether `r` ran read-confined; fails the test where Landlock exists but was not used.
fn read_confined(r: &CodeResult) -> bool {
    if landlock_available() {
        assert!(r.isolation.read_confined, "Landlock unused: {r:#?}");
    } else {
        eprintln!("no Landlock in this kernel: {:?}", r.isolation);
    }
    r.isolation.read_confined
}

/// A world-readable file (0644, in a 0755 directory) outside any working directory, with a
/// random name and content.
struct Secret {
    dir: tempfile::TempDir,
    file: PathBuf,
    name: String,
    text: String,
}

fn secret() -> Secret {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("distill-secret-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let name = format!("{}.txt", marker());
    let text = marker();
    let file = dir.path().join(&name);
    std::fs::write(&file, &text).expect("write secret");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    Secret {
        dir,
        file,
        name,
        text,
    }
}

/// Everything a result carries (verdict, output tails, exception, traceback), as published.
fn evidence(r: &CodeResult) -> String {
    serde_json::to_string(r).expect("result serializes")
}

fn reads_outside_the_workdir_are_refused_in(base: SandboxConfig) {
    let s = secret();
    // Read as a program would, then print the content and raise it, so that any leak would
    // reach stdout, the exception and the traceback.
    let program = format!(
        r#"def f():
    try:
        with open({path:?}) as fh:
            data = fh.read()
    except OSError as e:
        return type(e).__name__
    print(data)
    raise RuntimeError("read " + data)
"#,
        path = s.file.display().to_string()
    );
    let r = check(
        &func_job(
            &program,
            "def check(f):\n    assert f() == 'PermissionError'\n",
            "f",
        ),
        &base,
    );
    if read_confined(&r) {
        assert_verdict(&r, CodeVerdict::Pass);
        assert!(!evidence(&r).contains(&s.text), "secret leaked: {r:#?}");
    }
    // A stdin/stdout program reading it gets nowhere either.
    let stdio = stdio_job(
        &format!("print(open({:?}).read())\n", s.file.display().to_string()),
        &[("", &s.text)],
    );
    let r = check(&stdio, &base);
    if read_confined(&r) {
        assert_verdict(&r, CodeVerdict::RuntimeError);
        assert!(
            r.exception
                .as_deref()
                .unwrap_or("")
                .contains("PermissionError"),
            "{r:#?}"
        );
        assert!(!evidence(&r).contains(&s.text), "secret leaked: {r:#?}");
    }
    drop(s.dir);
}

#[test]
fn reads_outside_the_workdir_are_refused() {
    reads_outside_the_workdir_are_refused_in(tight());
}

#[test]
fn reads_outside_the_workdir_are_refused_spawned() {
    reads_outside_the_workdir_are_refused_in(spawned(tight()));
}

fn listing_directories_outside_the_workdir_is_refused_in(base: SandboxConfig) {
    let s = secret();
    let program = format!(
        r#"import os
def f():
    seen = {{}}
    for d in ({dir:?}, "/", "/tmp", "/etc", "/usr", "/home", "/root", "/proc", ".."):
        try:
            seen[d] = sorted(os.listdir(d))
        except OSError as e:
            seen[d] = type(e).__name__
    seen["."] = os.listdir(".")
    return seen
"#,
        dir = s.dir.path().display().to_string()
    );
    let test = "def check(f):\n    seen = f()\n    assert isinstance(seen.pop('.'), list), seen\n    assert all(v in ('PermissionError', 'FileNotFoundError') for v in seen.values()), seen\n";
    let r = check(&func_job(&program, test, "f"), &base);
    if read_confined(&r) {
        assert_verdict(&r, CodeVerdict::Pass);
        assert!(!evidence(&r).contains(&s.name), "listing leaked: {r:#?}");
    }
}

#[test]
fn listing_directories_outside_the_workdir_is_refused() {
    listing_directories_outside_the_workdir_is_refused_in(tight());
}

#[test]
fn listing_directories_outside_the_workdir_is_refused_spawned() {
    listing_directories_outside_the_workdir_is_refused_in(spawned(tight()));
}

/// A process outside the sandbox with a secret in its command line and environment.
fn sibling(mark: &str) -> std::process::Child {
    Command::new("/bin/sh")
        .args(["-c", "sleep 60", mark])
        .env("DISTILL_TEST_SECRET", mark)
        .spawn()
        .expect("start a sibling process")
}

fn other_processes_are_invisible_and_unreachable_in(base: SandboxConfig) {
    let mark = marker();
    let mut other = sibling(&mark);
    let program = format!(
        r#"import os
def f():
    out = {{}}
    for what in ("cmdline", "environ", "status"):
        try:
            with open("/proc/{pid}/" + what, "rb") as fh:
                out[what] = fh.read().decode("latin-1")
        except OSError as e:
            out[what] = type(e).__name__
    for name, pid in (("sibling", {pid}), ("distill", {me}), ("parent", os.getppid())):
        if pid == 0:
            out[name] = "no pid"
            continue
        try:
            os.kill(pid, 0)
            out[name] = "signalable"
        except OSError as e:
            out[name] = type(e).__name__
    return out
"#,
        pid = other.id(),
        me = std::process::id()
    );
    let test = "def check(f):\n    r = f()\n    assert all(v in ('PermissionError', 'FileNotFoundError', 'ProcessLookupError', 'no pid') for v in r.values()), r\n";
    let r = check(&func_job(&program, test, "f"), &base);
    let alive = other.try_wait().expect("query sibling").is_none();
    let _ = other.kill();
    let _ = other.wait();
    assert!(alive, "the sibling process was killed");
    if landlock_available() || r.isolation.mount_namespace {
        assert!(
            r.isolation.read_confined || r.isolation.pid_namespace,
            "{r:#?}"
        );
        assert_verdict(&r, CodeVerdict::Pass);
        assert!(!evidence(&r).contains(&mark), "secret leaked: {r:#?}");
    }
}

#[test]
fn other_processes_are_invisible_and_unreachable() {
    other_processes_are_invisible_and_unreachable_in(tight());
}

#[test]
fn other_processes_are_invisible_and_unreachable_spawned() {
    other_processes_are_invisible_and_unreachable_in(spawned(tight()));
}

fn proc_shows_only_the_programs_own_processes_in(base: SandboxConfig) {
    // `/proc` readable on purpose: the PID namespace alone must hide the rest of the machine.
    let cfg = SandboxConfig {
        allow_read: vec![PathBuf::from("/proc")],
        ..base
    };
    let mark = marker();
    let mut other = sibling(&mark);
    let program = format!(
        r#"import os
def f():
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    try:
        with open("/proc/{pid}/cmdline", "rb") as fh:
            return pids, fh.read().decode("latin-1")
    except OSError as e:
        return pids, type(e).__name__
"#,
        pid = other.id()
    );
    let test = "def check(f):\n    pids, sibling = f()\n    assert pids == [1], pids\n    assert sibling == 'FileNotFoundError', sibling\n";
    let r = check(&func_job(&program, test, "f"), &cfg);
    let _ = other.kill();
    let _ = other.wait();
    if r.isolation.mount_namespace {
        assert!(r.isolation.pid_namespace, "{r:#?}");
        assert_verdict(&r, CodeVerdict::Pass);
        assert!(!evidence(&r).contains(&mark), "secret leaked: {r:#?}");
    } else {
        eprintln!("no mount namespace, so no PID namespace here: {r:#?}");
    }
}

#[test]
fn proc_shows_only_the_programs_own_processes() {
    proc_shows_only_the_programs_own_processes_in(tight());
}

#[test]
fn proc_shows_only_the_programs_own_processes_spawned() {
    proc_shows_only_the_programs_own_processes_in(spawned(tight()));
}

#[test]
fn allowing_reads_of_the_root_is_refused() {
    let cfg = SandboxConfig {
        allow_read: vec![PathBuf::from("/")],
        ..tight()
    };
    let err = Sandbox::new(cfg).expect_err("the root is refused");
    assert!(err.to_string().contains("undo read confinement"), "{err}");
}
