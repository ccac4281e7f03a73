//! `distill audit` on a fixture filter run: loading, terminal numbers, HTML safety, span
//! conversion, and the page rendered by headless Chromium.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use distill::audit::{
    byte_span_to_utf16, load_run, load_run_with, render_html, terminal_summary, write_html,
    AuditError, LoadOptions, Side, Utf16Span,
};
use serde_json::{json, Value};

const HOSTILE: &str =
    "</script><script>alert(1)</script> and <img src=x onerror=alert(1)> &amp; <!-- \u{2028}";
const UNICODE_PREFIX: &str = "Ünïcödé 日本語 😀 then ";
const PRED_COMPLETION: &str = "Adding up gives 41. The answer is 41";

/// Index of the trace (0..30) in the fixture: problem `i / 5`, sample `i % 5`.
fn trace_id(i: usize) -> String {
    format!("t{i:02}")
}

fn rule_reason(code: &str, field: &str, span: Value) -> Value {
    json!({"stage": "rules", "code": code, "detail": format!("{code} fired"),
           "field": field, "span": span, "evidence": {"note": "fixture"}})
}

fn checker_incorrect() -> Value {
    json!({"stage": "checker", "code": "checker:incorrect", "detail": "pred 41 vs gold 42",
           "evidence": {"gold_normal": "42", "pred_normal": "41", "rule": "rational_equal"}})
}

/// The fixture: 6 problems × 5 samples, 12 kept and 18 rejected, with every reason kind,
/// hostile markup, non-ASCII text with spans after multi-byte characters, a graded-answer span
/// and a failed generation. Completion tokens are `10 * (i + 1)`.
fn fixture_records() -> Vec<(bool, Value)> {
    let mut out = Vec::new();
    for i in 0..30usize {
        let (p, s) = (i / 5, i % 5);
        let mut completion = format!("Solution for problem {p}, sample {s}. The answer is 42");
        let mut reasoning: Option<String> = None;
        let mut prompt = format!("Problem {p}: what is 6 * 7?");
        let mut reasons: Vec<Value> = Vec::new();
        let mut passed: Option<bool> = None;
        let mut usage =
            Some(json!({"prompt_tokens": 20, "completion_tokens": 10 * (i as u64 + 1)}));
        let mut kept = false;
        match (p, s) {
            (0, _) => {
                kept = true;
                passed = Some(true);
            }
            (1, 0..=2) => {
                kept = true;
                passed = Some(true);
            }
            (1, _) | (2, _) | (3, 3..=4) | (5, 2..=4) => {
                reasons.push(checker_incorrect());
                passed = Some(false);
                if i == 10 {
                    completion = PRED_COMPLETION.to_string();
                    let start = PRED_COMPLETION.rfind("41").unwrap_or(0);
                    reasons[0]["evidence"]["pred_span"] =
                        json!({"text": "41", "start": start, "end": start + 2});
                }
            }
            (3, 0) | (4, 0) | (4, 3) | (5, 1) => {
                kept = true;
                passed = Some(true);
                if i == 20 {
                    completion = format!("Careful: {HOSTILE} The answer is 42");
                    prompt = format!("Hostile prompt {HOSTILE}");
                    reasoning = Some(format!("thinking {HOSTILE}"));
                }
            }
            (3, _) => {
                // Repetition found in the reasoning; one span as a Rust-style range object.
                let r = "loop loop loop loop loop loop".to_string();
                let span = if s == 1 {
                    json!([5, 19])
                } else {
                    json!({"start": 0, "end": 9})
                };
                reasons.push(rule_reason("rule:repetition", "reasoning", span));
                reasoning = Some(r);
            }
            (4, 1) => {
                reasons.push(json!({"stage": "dedup", "code": "near_dup",
                    "detail": "similar (0.86) to t00", "evidence": {"of": "t00", "similarity": 0.86}}));
                passed = Some(true);
            }
            (4, 2) => {
                reasons.push(json!({"stage": "decontam", "code": "contaminated",
                    "detail": "13-gram from gsm8k-test/17", "field": "prompt",
                    "evidence": {"eval_id": "gsm8k-test/17", "ngram": "what is 6 * 7"}}));
                passed = Some(true);
            }
            (4, 4) => {
                completion = format!("{UNICODE_PREFIX}BAD SPAN here");
                let start = UNICODE_PREFIX.len();
                reasons.push(rule_reason(
                    "rule:mixed_script",
                    "completion",
                    json!([start, start + "BAD SPAN".len()]),
                ));
                reasons.push(checker_incorrect());
                passed = Some(false);
            }
            (5, 0) => {
                reasons.push(json!({"stage": "input", "code": "generation_failed",
                    "detail": "http_status 500"}));
                usage = None;
            }
            _ => unreachable!("fixture covers every (problem, sample)"),
        }
        let mut rec = json!({
            "id": trace_id(i),
            "problem_id": format!("p{p}"),
            "sample_index": s,
            "messages": [{"role": "user", "content": prompt}],
            "teacher": {"backend": "openai", "model": "fixture"},
            "sampling": {"temperature": 0.7, "top_p": 1.0, "max_tokens": 512},
            "finish_reason": "stop",
            "some_future_field": {"ignored": true},
            "filter": {"kept": kept, "reasons": reasons},
        });
        if i != 25 {
            rec["completion"] = json!(completion);
        }
        if let Some(r) = reasoning {
            rec["reasoning"] = json!(r);
        }
        if let Some(u) = usage {
            rec["usage"] = u;
        }
        if let Some(ok) = passed {
            rec["filter"]["check"] = json!({"kind": "math", "verdict": if ok { "correct" } else { "incorrect" }, "passed": ok});
        }
        out.push((kept, rec));
    }
    out
}

fn write_run(dir: &Path, records: &[(bool, Value)], summary: Option<Value>) {
    let mut kept = String::new();
    let mut rejected = String::new();
    for (k, rec) in records {
        let line = format!("{rec}\n");
        if *k {
            kept.push_str(&line);
        } else {
            rejected.push_str(&line);
        }
    }
    std::fs::write(dir.join("kept.jsonl"), kept).unwrap();
    std::fs::write(dir.join("rejected.jsonl"), rejected).unwrap();
    if let Some(s) = summary {
        std::fs::write(dir.join("summary.json"), s.to_string()).unwrap();
    }
}

fn fixture_summary() -> Value {
    json!({
        "input": 30, "kept": 12, "rejected": 18,
        "funnel": [
            {"stage": "input", "removed": 1, "remaining": 29},
            {"stage": "rules", "removed": 3, "remaining": 26},
            {"stage": "checker", "removed": 12, "remaining": 14},
            {"stage": "dedup", "removed": 1, "remaining": 13},
            {"stage": "decontam", "removed": 1, "remaining": 12},
            {"stage": "pass_rate", "removed": 0, "remaining": 12},
            {"stage": "cap", "removed": 0, "remaining": 12}
        ],
        "reasons": {"checker:incorrect": 13},
        "wall_seconds": 3.25,
        "unknown_field": [1, 2, 3]
    })
}

fn fixture_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path(), &fixture_records(), Some(fixture_summary()));
    dir
}

#[test]
fn loads_counts_reasons_and_pass_rates() {
    let dir = fixture_dir();
    let run = load_run(dir.path()).unwrap();
    assert_eq!(run.input, 30);
    assert_eq!(run.kept.count, 12);
    assert_eq!(run.rejected.count, 18);
    assert_eq!(run.traces.len(), 30);
    assert!(run.warnings.is_empty(), "{:?}", run.warnings);
    assert!(!run.funnel_derived);
    let reasons: Vec<(&str, u64)> = run
        .reason_counts
        .iter()
        .map(|(c, n)| (c.as_str(), *n))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("checker:incorrect", 13),
            ("rule:repetition", 2),
            ("contaminated", 1),
            ("generation_failed", 1),
            ("near_dup", 1),
            ("rule:mixed_script", 1),
        ]
    );
    assert_eq!(
        run.pass_rate_buckets(),
        vec![
            ("0%", 1),
            ("(0,25%]", 1),
            ("(25,50%]", 1),
            ("(50,75%]", 1),
            ("(75,100%)", 1),
            ("100%", 1),
        ]
    );
    assert_eq!(run.kept.completion_tokens.len(), 12);
    assert_eq!(run.rejected.completion_tokens.len(), 17);
    assert_eq!(run.rejected.missing_tokens, 1);
}

#[test]
fn terminal_summary_numbers() {
    let dir = fixture_dir();
    let run = load_run(dir.path()).unwrap();
    let text = terminal_summary(&run);
    println!("{text}");
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    let has = |want: &str| {
        assert!(
            lines
                .iter()
                .any(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") == want),
            "no line {want:?} in\n{text}"
        )
    };
    has("input 30 kept 12 (40.0%) rejected 18 (60.0%)");
    has("stage removed remaining % of input");
    has("input 1 29 96.7%");
    has("checker 12 14 46.7%");
    has("cap 0 12 40.0%");
    has("checker:incorrect 13");
    has("rule:repetition 2");
    has("0% 1");
    has("(75,100%) 1");
    has("100% 1");
    has("n min median p90 max no usage");
    has("kept 12 10 60 240 270 0");
    has("rejected 17 90 180 290 300 1");
    assert!(!text.contains("hint:"));
    // Columns line up: every funnel row has `remaining` ending at the same column.
    let funnel: Vec<&str> = lines
        .iter()
        .skip_while(|l| !l.starts_with("Funnel"))
        .skip(1)
        .take(8)
        .copied()
        .collect();
    let ends: Vec<usize> = funnel.iter().map(|l| l.len()).collect();
    assert!(ends.windows(2).all(|w| w[0] == w[1]), "{funnel:#?}");
}

#[test]
fn hint_when_nothing_is_kept_and_funnel_rebuilt_without_summary() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<(bool, Value)> = fixture_records().into_iter().filter(|(k, _)| !k).collect();
    write_run(dir.path(), &records, None);
    let run = load_run(dir.path()).unwrap();
    assert!(run.funnel_derived);
    assert_eq!(run.input, 18);
    let removed: Vec<(&str, u64, u64)> = run
        .funnel
        .iter()
        .map(|f| (f.stage.as_str(), f.removed, f.remaining))
        .collect();
    assert_eq!(
        removed,
        vec![
            ("input", 1, 17),
            ("rules", 3, 14),
            ("checker", 12, 2),
            ("decontam", 1, 1),
            ("dedup", 1, 0),
            ("pass_rate", 0, 0),
            ("cap", 0, 0),
        ]
    );
    let text = terminal_summary(&run);
    assert!(
        text.contains("hint: nothing was kept; the most frequent reason is checker:incorrect (13 of 18 rejected traces)"),
        "{text}"
    );
    let page = render_html(&run).unwrap();
    assert!(page.contains("Nothing was kept."));
}

#[test]
fn spans_become_utf16_offsets() {
    let dir = fixture_dir();
    let run = load_run(dir.path()).unwrap();
    let t = run.traces.iter().find(|t| t.id == trace_id(24)).unwrap();
    let r = t
        .reasons
        .iter()
        .find(|r| r.code == "rule:mixed_script")
        .unwrap();
    // "Ünïcödé 日本語 😀 then " is 19 characters but 20 UTF-16 units (the emoji is two).
    let start = UNICODE_PREFIX.encode_utf16().count();
    assert_eq!(start, 20);
    assert_eq!(
        r.span,
        Some((UNICODE_PREFIX.len(), UNICODE_PREFIX.len() + 8))
    );
    assert_eq!(
        r.span_utf16,
        Some(Utf16Span {
            start,
            end: start + 8
        })
    );
    let completion: Vec<u16> = t.completion.as_deref().unwrap().encode_utf16().collect();
    assert_eq!(
        String::from_utf16(&completion[start..start + 8]).unwrap(),
        "BAD SPAN"
    );
    // Range-object spans and reasoning spans.
    let t = run.traces.iter().find(|t| t.id == trace_id(17)).unwrap();
    assert_eq!(t.reasons[0].span, Some((0, 9)));
    assert_eq!(
        t.reasons[0].span_utf16,
        Some(Utf16Span { start: 0, end: 9 })
    );
    // A span into the prompt is kept but not highlighted.
    let t = run.traces.iter().find(|t| t.id == trace_id(22)).unwrap();
    assert_eq!(t.reasons[0].span_utf16, None);
    // The checker's graded answer.
    let t = run.traces.iter().find(|t| t.id == trace_id(10)).unwrap();
    let s = PRED_COMPLETION.rfind("41").unwrap();
    assert_eq!(
        t.answer_span_utf16,
        Some(Utf16Span {
            start: s,
            end: s + 2
        })
    );
    assert_eq!(
        byte_span_to_utf16("😀x", 4, 5),
        Some(Utf16Span { start: 2, end: 3 })
    );
}

#[test]
fn html_has_no_unescaped_hostile_markup() {
    let dir = fixture_dir();
    let run = load_run(dir.path()).unwrap();
    let out = dir.path().join("report.html");
    write_html(&run, &out).unwrap();
    let page = std::fs::read_to_string(&out).unwrap();
    assert!(!page.contains("alert(1)</script>"));
    assert!(!page.contains("<script>alert"));
    assert!(!page.contains("<img"));
    assert!(!page.contains('\u{2028}'));
    // Exactly the two script elements of the page itself.
    assert_eq!(page.matches("<script").count(), 2);
    assert_eq!(page.matches("</script>").count(), 2);
    // The embedded JSON decodes back to the original hostile text.
    let start = page
        .find(r#"<script type="application/json" id="data">"#)
        .unwrap();
    let body = &page[start..];
    let body = &body[body.find('>').unwrap() + 1..body.find("</script>").unwrap()];
    // No external resources in the page outside the trace data.
    let markup = page.replace(body, "");
    for bad in ["http://", "https://", "src=", "href=", "@import", "url("] {
        assert!(!markup.contains(bad), "page references {bad}");
    }
    let data: Value = serde_json::from_str(body).unwrap();
    let traces = data["traces"].as_array().unwrap();
    assert_eq!(traces.len(), 30);
    let hostile = traces.iter().find(|t| t["id"] == "t20").unwrap();
    assert!(hostile["completion"].as_str().unwrap().contains(HOSTILE));
    assert!(hostile["messages"][0]["content"]
        .as_str()
        .unwrap()
        .contains(HOSTILE));
    // Counts as text.
    assert!(page.contains(r#"<dd id="count-kept">12</dd>"#));
    assert!(page.contains(r#"<dd id="count-rejected">18</dd>"#));
    assert!(page.contains("<svg"));
}

#[test]
fn browser_sample_is_capped_but_statistics_are_not() {
    let dir = fixture_dir();
    let opts = LoadOptions {
        max_traces_per_side: 4,
        max_text_chars: 10,
    };
    let run = load_run_with(dir.path(), &opts).unwrap();
    assert_eq!(run.shown(Side::Kept), 4);
    assert_eq!(run.shown(Side::Rejected), 4);
    assert_eq!(run.kept.count, 12);
    assert_eq!(run.reason_counts[0], ("checker:incorrect".to_string(), 13));
    assert!(run
        .warnings
        .iter()
        .any(|w| w.contains("first 4 of 18 rejected")));
    let t = &run.traces[0];
    assert_eq!(t.completion.as_deref().map(|c| c.chars().count()), Some(10));
    assert!(t.cut_fields.contains(&"completion".to_string()));
    let text = terminal_summary(&run);
    assert!(text.contains("first 4 of 12 kept"), "{text}");
}

#[test]
fn malformed_line_names_file_and_line() {
    let dir = fixture_dir();
    let path = dir.path().join("rejected.jsonl");
    let mut text = std::fs::read_to_string(&path).unwrap();
    let second_nl = text.match_indices('\n').nth(1).unwrap().0;
    text.insert_str(second_nl + 1, "{not json\n");
    std::fs::write(&path, text).unwrap();
    let err = load_run(dir.path()).unwrap_err();
    assert!(matches!(err, AuditError::Record { line: 3, .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("rejected.jsonl:3"), "{msg}");

    let empty = tempfile::tempdir().unwrap();
    let err = load_run(empty.path()).unwrap_err();
    assert!(matches!(err, AuditError::NotARun { .. }), "{err}");

    std::fs::write(dir.path().join("summary.json"), "[1,").unwrap();
    let err = load_run(dir.path()).unwrap_err();
    assert!(err.to_string().contains("summary.json"), "{err}");
}

#[test]
fn minimal_records_load() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kept.jsonl"),
        "{\"id\":\"a\"}\n\n{\"id\":\"b\",\"filter\":{\"kept\":false}}\n",
    )
    .unwrap();
    let run = load_run(dir.path()).unwrap();
    assert_eq!(run.kept.count, 2);
    assert_eq!(run.kept.missing_tokens, 2);
    assert!(run.warnings.iter().any(|w| w.contains("rejected.jsonl")));
    assert!(run.warnings.iter().any(|w| w.contains("disagrees")));
    let _ = terminal_summary(&run);
    let _ = render_html(&run).unwrap();
}

// ---- headless Chromium ----

fn chromium() -> PathBuf {
    let path = PathBuf::from(
        std::env::var("DISTILL_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_string()),
    );
    assert!(
        path.exists(),
        "{} not found: the HTML report test needs headless Chromium; install it with \
         `apt-get install -y chromium` (or set DISTILL_CHROMIUM)",
        path.display()
    );
    path
}

/// Loads `url` in headless Chromium and returns the DOM after the page's scripts ran.
fn dump_dom(chromium: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--virtual-time-budget=5000")
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(dom.contains(r#"data-ready="1""#), "page not ready:\n{dom}");
    assert!(
        dom.contains(r#"<div id="errors" role="alert"></div>"#),
        "script errors:\n{}",
        &dom[dom.find("id=\"errors\"").unwrap_or(0)..][..400.min(dom.len())]
    );
    assert!(!dom.contains("<img"), "hostile markup became an element");
    dom
}

fn rows(dom: &str) -> usize {
    dom.matches(r#"class="trace-row""#).count()
}

#[test]
fn report_renders_in_headless_chromium() {
    let chromium = chromium();
    let dir = fixture_dir();
    let run = load_run(dir.path()).unwrap();
    let report = dir.path().join("report.html");
    write_html(&run, &report).unwrap();
    if let Ok(keep) = std::env::var("DISTILL_AUDIT_KEEP_REPORT") {
        // Lets a failing CI run keep the page for inspection.
        std::fs::copy(&report, keep).unwrap();
    }
    let url = format!("file://{}", report.display());
    let t0 = Instant::now();

    let dom = dump_dom(&chromium, &url);
    assert!(dom.contains(r#"<dd id="count-kept">12</dd>"#));
    assert!(dom.contains(r#"<dd id="count-rejected">18</dd>"#));
    assert_eq!(rows(&dom), 30);
    assert!(dom.contains(r#"<span id="shown-count">30</span>"#));
    // The reason dropdown was filled from the data.
    assert!(dom.contains(r#"<option value="rule:mixed_script">rule:mixed_script</option>"#));

    // Filters pre-applied from the URL hash.
    let dom = dump_dom(&chromium, &format!("{url}#reason=rule:repetition"));
    assert_eq!(rows(&dom), 2);
    assert!(dom.contains(r#"<span id="shown-count">2</span>"#));
    let dom = dump_dom(&chromium, &format!("{url}#side=kept"));
    assert_eq!(rows(&dom), 12);
    let dom = dump_dom(
        &chromium,
        &format!("{url}#side=rejected&reason=checker:incorrect&q=p2"),
    );
    assert_eq!(rows(&dom), 5);
    let dom = dump_dom(&chromium, &format!("{url}#q=%C3%BCn%C3%AFc"));
    assert_eq!(rows(&dom), 1);

    // Opening a trace highlights the rule span after multi-byte characters.
    let dom = dump_dom(&chromium, &format!("{url}#trace=t24"));
    assert!(
        dom.contains(r#"<mark class="rule" title="rule:mixed_script">BAD SPAN</mark>"#),
        "{}",
        &dom[dom.find("id=\"detail\"").unwrap_or(0)..]
    );
    // The graded answer is marked too.
    let dom = dump_dom(&chromium, &format!("{url}#trace=t10"));
    assert!(dom.contains(r#"<mark class="answer" title="graded answer">41</mark>"#));
    // Reasoning spans, and hostile text shown as text.
    let dom = dump_dom(&chromium, &format!("{url}#trace=t16"));
    assert!(dom
        .contains(r#"loop <mark class="rule" title="rule:repetition">loop loop loop</mark> loop"#));
    let dom = dump_dom(&chromium, &format!("{url}#trace=t20"));
    assert!(dom.contains("&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt; and &lt;img src=x onerror=alert(1)&gt;"));
    eprintln!(
        "chromium: 8 page loads in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
