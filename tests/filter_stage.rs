//! `distill filter` end to end: every rejected trace carries a reason, the funnel adds up, output
//! order is the input order, checker results are cached across runs; then `distill audit`.

mod common;

use common::{distill, read_lines, stderr};
use serde_json::{json, Value};

fn trace(
    id: &str,
    problem: &str,
    k: u32,
    question: &str,
    answer: &str,
    completion: Value,
    extra: Value,
) -> Value {
    let mut t = json!({
        "id": id, "problem_id": problem, "sample_index": k,
        "reference": {"answer": answer},
        "messages": [{"role": "user", "content": question}],
        "completion": completion,
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 20, "completion_tokens": 60},
        "teacher": {"backend": "openai", "model": "m"},
        "sampling": {"temperature": 0.6, "top_p": 0.95, "max_tokens": 512},
        "latency_ms": 5, "attempts": 1, "created_at": "2026-01-01T00:00:00Z", "schema_version": 1
    });
    if let (Value::Object(t), Value::Object(e)) = (&mut t, extra) {
        t.extend(e);
    }
    t
}

fn write_traces(path: &std::path::Path) -> Vec<Value> {
    let q1 = "Janet has 3 apples and buys 4 more. How many apples does she have now?";
    let q2 = "A train travels 60 miles per hour for 3 hours. How far does it go in total?";
    let eval_q = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her friends in May. How many clips did Natalia sell altogether in April and May?";
    let good = |n: &str| {
        json!(format!("<think>\nShe starts with 3 and adds 4, so 3 + 4 = 7 in total here.\n</think>\nJanet has 3 + 4 = 7 apples. The answer is \\boxed{{{n}}}."))
    };
    let long = "The train moves at sixty miles in every hour of the trip. It keeps moving for three full hours without stopping at any station on the way. Distance equals speed multiplied by time, so we multiply sixty by three to get one hundred and eighty miles, which is 60 * 3 = 180 miles, all at a";
    let loop_text = "Let me add the numbers again and check the total once more. ".repeat(30);
    let traces = vec![
        trace("t01", "p1", 0, q1, "7", good("7"), json!({})),
        trace("t02", "p1", 1, q1, "7", good("8"), json!({})), // wrong answer
        trace(
            "t03",
            "p1",
            2,
            q1,
            "7",
            json!("<think>\n3 + 4 is"),
            json!({"finish_reason": "length"}),
        ), // truncated
        trace(
            "t04",
            "p1",
            3,
            q1,
            "7",
            json!(format!("{loop_text} The answer is \\boxed{{7}}.")),
            json!({}),
        ), // repetition
        trace("t05", "p1", 4, q1, "7", good("7"), json!({})), // exact duplicate of t01
        trace(
            "t06",
            "p2",
            0,
            q2,
            "180",
            json!(format!("{long} steady pace. The answer is \\boxed{{180}}.")),
            json!({}),
        ),
        trace(
            "t07",
            "p2",
            1,
            q2,
            "180",
            json!(format!(
                "{long} steady speed. The answer is \\boxed{{180}}."
            )),
            json!({}),
        ), // near dup of t06
        trace(
            "t08",
            "p2",
            2,
            q2,
            "180",
            Value::Null,
            json!({"error": {"kind": "timeout", "message": "gave up"}, "finish_reason": null}),
        ),
        trace(
            "t09",
            "p3",
            0,
            eval_q,
            "72",
            json!("48 + 24 = 72. The answer is \\boxed{72}."),
            json!({}),
        ), // contaminated
        trace(
            "t10",
            "p2",
            3,
            q2,
            "180",
            json!("I'm sorry, but I can't help with that request."),
            json!({}),
        ), // refusal
        trace(
            "t11",
            "p4",
            0,
            "Write add(a, b).",
            "",
            json!("```python\ndef add(a, b):\n    return a + b\n```"),
            json!({"reference": {"tests": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": "add", "code_prompt": "def add(a, b):\n"}}),
        ),
        trace(
            "t12",
            "p4",
            1,
            "Write add(a, b).",
            "",
            json!("```python\ndef add(a, b):\n    return a - b\n```"),
            json!({"reference": {"tests": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": "add", "code_prompt": "def add(a, b):\n"}}),
        ),
    ];
    let body: String = traces.iter().map(|t| format!("{t}\n")).collect();
    std::fs::write(path, body).unwrap();
    traces
}

#[test]
fn filter_records_a_reason_for_every_rejection_and_caches_checks() {
    let dir = tempfile::tempdir().unwrap();
    let traces = dir.path().join("traces.jsonl");
    write_traces(&traces);
    let eval = dir.path().join("gsm8k_test.jsonl");
    std::fs::write(&eval, format!("{}\n", json!({"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her friends in May. How many clips did Natalia sell altogether in April and May?", "answer": "#### 72"}))).unwrap();
    let out = dir.path().join("run");
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "filter",
            "--traces",
            traces.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
            "--eval-set",
            eval.to_str().unwrap(),
            "--near-dup",
            "0.7",
            "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let o = distill().args(args(&[])).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let kept = read_lines(&out.join("kept.jsonl"));
    let rejected = read_lines(&out.join("rejected.jsonl"));
    let ids = |v: &[Value]| {
        v.iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&kept), ["t01", "t06", "t11"], "{}", stderr(&o));
    let code_of = |id: &str| -> Vec<String> {
        let t = rejected
            .iter()
            .find(|t| t["id"] == id)
            .unwrap_or_else(|| panic!("{id} not rejected"));
        t["filter"]["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["code"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(code_of("t02").contains(&"checker:incorrect".to_string()));
    assert!(code_of("t03").contains(&"rule:truncated".to_string()));
    assert!(code_of("t04").contains(&"rule:repetition".to_string()));
    assert_eq!(code_of("t05"), ["exact_dup"]);
    assert_eq!(code_of("t07"), ["near_dup"]);
    assert_eq!(code_of("t08"), ["generation_failed"]);
    assert!(code_of("t09").contains(&"contaminated".to_string()));
    assert!(code_of("t10").contains(&"rule:refusal".to_string()));
    assert!(code_of("t12").contains(&"checker:wrong_answer".to_string()));
    // Evidence: the checker says what it compared; the rule says where it matched.
    let t02 = rejected.iter().find(|t| t["id"] == "t02").unwrap();
    let r = &t02["filter"]["reasons"][0];
    assert_eq!(r["evidence"]["pred_normal"], "8");
    assert_eq!(r["evidence"]["gold_normal"], "7");
    let t10 = rejected.iter().find(|t| t["id"] == "t10").unwrap();
    let span = t10["filter"]["reasons"][0]["span"].as_array().unwrap();
    assert_eq!(span[0], 0);
    assert_eq!(
        ids(&rejected),
        ["t02", "t03", "t04", "t05", "t07", "t08", "t09", "t10", "t12"],
        "input order"
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["input"], 12);
    assert_eq!(summary["kept"], 3);
    let funnel = summary["funnel"].as_array().unwrap();
    let removed: u64 = funnel.iter().map(|r| r["removed"].as_u64().unwrap()).sum();
    assert_eq!(removed, 9);
    assert_eq!(funnel.last().unwrap()["remaining"], 3);
    assert_eq!(summary["checker_ran"], 11);

    // Change the rules: the checker results come from the cache.
    let o = distill()
        .args(args(&["--disable-rule", "refusal"]))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["checker_ran"], 0);
    assert_eq!(summary["checker_cached"], 11);
    let rejected = read_lines(&out.join("rejected.jsonl"));
    let t10 = rejected.iter().find(|t| t["id"] == "t10").unwrap();
    let codes: Vec<&str> = t10["filter"]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert!(
        !codes.contains(&"rule:refusal") && codes.contains(&"rule:final_answer"),
        "{codes:?}"
    );

    // Per-problem cap and pass-rate window.
    let o = distill()
        .args(args(&[
            "--max-per-problem",
            "1",
            "--no-near-dup",
            "--no-exact-dup",
            "--pass-rate",
            "0.0:0.5",
        ]))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let kept = read_lines(&out.join("kept.jsonl"));
    // p1 is solved 2/4 of checked samples (t01, t05 correct; t02, t04 checked incorrect or not): stays;
    // p2 solved 2/3 -> outside 0..0.5; p4 solved 1/2 -> in.
    assert!(kept.iter().all(|t| t["problem_id"] != "p2"), "{kept:?}");

    // The audit reads the run.
    let o = distill()
        .args(["audit", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("checker"), "{text}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("<svg"));
}

#[test]
fn check_math_and_code_rows_from_stdin() {
    use std::io::Write;
    let mut child = distill()
        .args(["check", "math", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rows = "{\"gold\":\"\\\\frac{1}{2}\",\"pred\":\"so the answer is 0.5\",\"id\":1}\n{\"gold\":\"3\",\"pred\":\"\\\\boxed{4}\",\"id\":2}\n";
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rows.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(out.len(), 2);
    assert_eq!(
        (out[0]["id"].clone(), out[0]["passed"].clone()),
        (json!(1), json!(true))
    );
    assert_eq!(out[1]["verdict"], "incorrect");
    assert!(stderr(&o).contains("2 rows, 1 passed"), "{}", stderr(&o));

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("code.jsonl");
    let rows = [
        json!({"prompt": "def add(a, b):\n", "completion": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}),
        json!({"prompt": "def add(a, b):\n", "completion": "    import sys; sys.exit(0)\n", "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"}),
    ];
    std::fs::write(
        &input,
        rows.iter().map(|r| format!("{r}\n")).collect::<String>(),
    )
    .unwrap();
    let outp = dir.path().join("scored.jsonl");
    let o = distill()
        .args([
            "check",
            "code",
            input.to_str().unwrap(),
            "--out",
            outp.to_str().unwrap(),
            "--timeout",
            "5",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = read_lines(&outp);
    assert_eq!(out[0]["verdict"], "pass");
    assert_eq!(out[1]["passed"], false);
    assert_eq!(out[1]["verdict"], "runtime_error");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"gold\": \"1\"}\n").unwrap();
    let o = distill()
        .args(["check", "math", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("bad.jsonl:1: field `pred` is missing"),
        "{}",
        stderr(&o)
    );
}
