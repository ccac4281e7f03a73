//! Bad input gets a one-line error that says what and where, and exit code 2.

mod common;

use common::{distill, stderr, write_problems};

fn run(args: &[&str]) -> (Option<i32>, String) {
    let o = distill()
        .args(args)
        .env_remove("OPENAI_API_KEY")
        .output()
        .unwrap();
    (o.status.code(), stderr(&o))
}

fn one_line_error(e: &str) -> &str {
    let lines: Vec<&str> = e
        .lines()
        .filter(|l| l.starts_with("distill: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {e}");
    lines[0]
}

#[test]
fn missing_dataset_file() {
    let (code, e) = run(&[
        "generate",
        "--teacher",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--dataset",
        "/nonexistent/problems.jsonl",
    ]);
    assert_eq!(code, Some(2));
    let l = one_line_error(&e);
    assert!(
        l.contains("/nonexistent/problems.jsonl") && l.contains("No such file"),
        "{l}"
    );
}

#[test]
fn malformed_jsonl_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.jsonl");
    std::fs::write(
        &p,
        "{\"question\":\"1+1\",\"answer\":\"#### 2\"}\n{\"question\": \"2+2\", \"answer\": \n",
    )
    .unwrap();
    let (code, e) = run(&[
        "generate",
        "--teacher",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--dataset",
        p.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    let l = one_line_error(&e);
    assert!(
        l.contains("bad.jsonl:2:") && l.contains("malformed JSON"),
        "{l}"
    );
}

#[test]
fn missing_preset_field_names_line_field_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("math.jsonl");
    std::fs::write(&p, "{\"problem\":\"x\",\"solution\":\"\\\\boxed{1}\"}\n").unwrap();
    let (code, e) = run(&[
        "generate",
        "--teacher",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--dataset",
        p.to_str().unwrap(),
        "--preset",
        "gsm8k",
    ]);
    assert_eq!(code, Some(2));
    let l = one_line_error(&e);
    assert!(
        l.contains("math.jsonl:1: field `question` is missing (preset gsm8k)"),
        "{l}"
    );
    assert!(l.contains("--question-field"), "{l}");
}

#[test]
fn unknown_preset_lists_the_valid_ones() {
    let (code, e) = run(&["generate", "--dataset", "x.jsonl", "--preset", "gsm9k"]);
    assert_eq!(code, Some(2));
    assert!(
        e.contains("gsm9k") && e.contains("gsm8k") && e.contains("humaneval"),
        "{e}"
    );
}

#[test]
fn unreachable_endpoint_says_which_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.jsonl");
    write_problems(&p, 2);
    let (code, e) = run(&[
        "generate",
        "--teacher",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--dataset",
        p.to_str().unwrap(),
        "--out",
        dir.path().join("o.jsonl").to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    let l = one_line_error(&e);
    assert!(
        l.contains("cannot reach") && l.contains("http://127.0.0.1:9/v1"),
        "{l}"
    );
    assert!(l.to_lowercase().contains("refused"), "{l}");
    assert!(
        !dir.path().join("o.jsonl").exists(),
        "output created although nothing ran"
    );
}

#[test]
fn missing_api_key_variable_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.jsonl");
    write_problems(&p, 2);
    let (code, e) = run(&[
        "generate",
        "--teacher",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--api-key-env",
        "DISTILL_NO_SUCH_KEY",
        "--dataset",
        p.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    let l = one_line_error(&e);
    assert!(
        l.contains("environment variable DISTILL_NO_SUCH_KEY is not set"),
        "{l}"
    );
}

#[test]
fn missing_local_model_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.jsonl");
    write_problems(&p, 1);
    let (code, e) = run(&[
        "generate",
        "--teacher",
        "local",
        "--model",
        "./no/such/model.gguf",
        "--dataset",
        p.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    let l = one_line_error(&e);
    assert!(
        l.contains("./no/such/model.gguf") && l.contains("no such file"),
        "{l}"
    );
}

#[test]
fn corrupt_output_file_is_named_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.jsonl");
    write_problems(&p, 1);
    let out = dir.path().join("traces.jsonl");
    std::fs::write(&out, "not json at all\n{}\n").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(distill::fake_openai::FakeServer::start(Default::default()))
        .unwrap();
    let (code, e) = run(&[
        "generate",
        "--teacher",
        "openai",
        "--base-url",
        &server.base_url(),
        "--dataset",
        p.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2));
    let l = one_line_error(&e);
    assert!(l.contains("traces.jsonl:1:"), "{l}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "not json at all\n{}\n"
    );
}

#[test]
fn huge_time_limits_are_refused_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("p.jsonl");
    write_problems(&data, 1);
    let (code, e) = run(&[
        "generate",
        "--teacher",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--timeout",
        "1e20",
        "--dataset",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{e}");
    assert!(
        one_line_error(&e).contains("--timeout 100000000000000000000"),
        "{e}"
    );
    let (code, e) = run(&["check", "code", "--timeout", "inf", data.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{e}");
    assert!(one_line_error(&e).contains("--timeout"), "{e}");
}

#[test]
fn zero_concurrency_is_an_error_not_silently_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("p.jsonl");
    write_problems(&data, 1);
    let (code, e) = run(&[
        "generate",
        "--teacher",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--concurrency",
        "0",
        "--dataset",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{e}");
    assert!(
        one_line_error(&e).contains("--concurrency 0 must be at least 1"),
        "{e}"
    );
}
