//! The generate stage against a loopback OpenAI-compatible server that misbehaves like real ones.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{distill, read_lines, stderr, write_problems};
use distill::fake_openai::{FakeConfig, FakeServer, Fault};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn generate_args(base: &str, dataset: &std::path::Path, out: &std::path::Path) -> Vec<String> {
    [
        "generate",
        "--teacher",
        "openai",
        "--base-url",
        base,
        "--model",
        "fake-teacher",
        "--dataset",
        dataset.to_str().unwrap(),
        "--preset",
        "gsm8k",
        "--n",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--quiet",
        "--timeout",
        "1",
        "--concurrency",
        "16",
        "--max-tokens",
        "64",
        "--seed",
        "7",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn faults_are_recovered_or_recorded_with_exactly_one_record_per_sample() {
    let rt = rt();
    let server = rt
        .block_on(FakeServer::start(FakeConfig {
            fault_rate: 0.3,
            slow: Duration::from_secs(3),
            ..Default::default()
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("p.jsonl");
    let out = dir.path().join("traces.jsonl");
    write_problems(&data, 40);
    let mut args = generate_args(&server.base_url(), &data, &out);
    args.extend(["--max-attempts".into(), "10".into()]);
    let t = Instant::now();
    let o = distill().args(&args).output().unwrap();
    let elapsed = t.elapsed();
    let records = read_lines(&out);
    assert_eq!(records.len(), 80, "stderr: {}", stderr(&o));
    let ids: HashSet<_> = records
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 80, "duplicate ids");
    let failed = records.iter().filter(|r| r.get("error").is_some()).count();
    let retried = records
        .iter()
        .filter(|r| r["attempts"].as_u64().unwrap() > 1)
        .count();
    // Every record is either a recovered completion or a recorded failure.
    for r in &records {
        let ok = r["completion"].is_string() && r["finish_reason"] == "stop";
        let recorded = r["error"]["kind"].is_string() && r["completion"].is_null();
        assert!(ok ^ recorded, "neither ok nor recorded: {r}");
    }
    let faults = server.stats.faults();
    for kind in Fault::ALL {
        assert!(
            faults.contains_key(&format!("{kind:?}")),
            "fault {kind:?} never injected: {faults:?}"
        );
    }
    let injected: u64 = faults.values().sum();
    assert!(injected >= 20, "{faults:?}");
    assert!(retried >= 15, "only {retried} records needed a retry");
    // Exit code tells whether anything failed.
    assert_eq!(
        o.status.code(),
        Some(if failed > 0 { 1 } else { 0 }),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("generate: 80 samples"),
        "{}",
        stderr(&o)
    );
    // Same ids on a rerun: nothing new is requested.
    let before = server
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    let o2 = distill().args(&args).output().unwrap();
    assert_eq!(read_lines(&out).len(), 80);
    let after = server
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    // Only the failed samples are requested again (each at least once).
    assert!(after - before >= failed as u64, "{}", stderr(&o2));
    if failed == 0 {
        assert_eq!(
            after,
            before,
            "rerun re-requested finished samples: {}",
            stderr(&o2)
        );
    }
    eprintln!("80 samples with {injected} injected faults in {elapsed:?}, {retried} retried, {failed} failed");
}

#[test]
fn failed_samples_are_recorded_then_retried_by_the_next_run() {
    let rt = rt();
    let broken = rt
        .block_on(FakeServer::start(FakeConfig {
            fault_rate: 1.0,
            faults: vec![Fault::Internal, Fault::Unavailable, Fault::WrongSchema],
            ..Default::default()
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("p.jsonl");
    let out = dir.path().join("traces.jsonl");
    write_problems(&data, 10);
    let mut args = generate_args(&broken.base_url(), &data, &out);
    args.extend(["--max-attempts".into(), "2".into()]);
    let o = distill().args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let records = read_lines(&out);
    assert_eq!(records.len(), 20);
    assert!(records.iter().all(|r| r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gave up after 2 attempts")));
    assert!(
        !distill::generate::summary_path(&out).exists(),
        "summary written for an incomplete run"
    );

    let healthy = rt
        .block_on(FakeServer::start(FakeConfig::default()))
        .unwrap();
    let args = generate_args(&healthy.base_url(), &data, &out);
    let o = distill().args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let records = read_lines(&out);
    assert_eq!(
        records.len(),
        20,
        "failed records must be replaced, not duplicated"
    );
    assert!(records.iter().all(|r| r.get("error").is_none()));
    let ids: HashSet<_> = records
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 20);
    assert!(distill::generate::summary_path(&out).exists());
}

#[test]
fn sigkill_mid_run_then_rerun_gives_every_sample_exactly_once() {
    let rt = rt();
    let server = rt
        .block_on(FakeServer::start(FakeConfig {
            latency: Duration::from_millis(60),
            ..Default::default()
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("p.jsonl");
    let out = dir.path().join("traces.jsonl");
    write_problems(&data, 40);
    let mut args = generate_args(&server.base_url(), &data, &out);
    for a in args.iter_mut() {
        if a == "16" {
            *a = "4".into(); // concurrency: slow enough to kill mid-run
        }
    }
    let mut child = distill().args(&args).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while read_lines(&out).len() < 12 {
        assert!(Instant::now() < deadline, "no progress before kill");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = read_lines(&out);
    assert!(partial.len() < 80, "run finished before the kill");
    // A crash can tear the last line; make sure the next run repairs one.
    let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
    std::io::Write::write_all(&mut f, b"{\"id\":\"torn").unwrap();
    drop(f);

    let o = distill().args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("repaired a torn last line"),
        "{}",
        stderr(&o)
    );
    let records = read_lines(&out);
    assert_eq!(records.len(), 80);
    let ids: HashSet<_> = records
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 80);
    for p in &partial {
        assert!(ids.contains(p["id"].as_str().unwrap()));
    }
    // Each (problem, sample) pair appears once.
    let pairs: HashSet<_> = records
        .iter()
        .map(|r| {
            (
                r["problem_id"].as_str().unwrap().to_string(),
                r["sample_index"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(pairs.len(), 80);
}

#[test]
fn truncated_traces_are_kept_and_labelled_and_think_blocks_split() {
    let rt = rt();
    let server = rt
        .block_on(FakeServer::start(FakeConfig::default()))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("p.jsonl");
    write_problems(&data, 3);
    let out = dir.path().join("short.jsonl");
    let mut args = generate_args(&server.base_url(), &data, &out);
    let i = args.iter().position(|a| a == "--max-tokens").unwrap();
    args[i + 1] = "4".into();
    let o = distill().args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r = read_lines(&out);
    assert_eq!(r.len(), 6);
    assert!(r
        .iter()
        .all(|t| t["finish_reason"] == "length" && t["attempts"] == 1));
    assert!(stderr(&o).contains("6 truncated"), "{}", stderr(&o));

    let out = dir.path().join("full.jsonl");
    let o = distill()
        .args(generate_args(&server.base_url(), &data, &out))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r = read_lines(&out);
    let t = &r[0];
    assert_eq!(t["reasoning_source"], "think_tags");
    assert_eq!(t["reasoning"], "Add the numbers in the question.");
    assert!(t["completion"].as_str().unwrap().contains("\\boxed{"));
    assert_eq!(t["teacher"]["backend"], "openai");
    assert_eq!(t["sampling"]["temperature"], 0.6);
    assert!(t["sampling"]["seed"].is_u64());
    assert!(t["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(t["reference"]["answer"].is_string());
    assert_eq!(
        t["messages"].as_array().unwrap().last().unwrap()["role"],
        "user"
    );
}

#[test]
fn mistralrs_style_log10_logprobs_are_converted_to_nats() {
    let rt = rt();
    for (style, base) in [(true, "auto"), (false, "auto"), (true, "ten")] {
        let server = rt
            .block_on(FakeServer::start(FakeConfig {
                mistralrs_style: style,
                ..Default::default()
            }))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("p.jsonl");
        write_problems(&data, 1);
        let out = dir.path().join("t.jsonl");
        let mut args = generate_args(&server.base_url(), &data, &out);
        args.extend(["--logprobs", "3", "--logprob-base", base].map(String::from));
        let o = distill().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let r = read_lines(&out);
        let lp = &r[0]["logprobs"][0];
        // The server's chosen token has p = 0.5 whatever unit it reported in.
        let got = lp["logprob"].as_f64().unwrap();
        assert!((got - 0.5f64.ln()).abs() < 1e-4, "style {style}: {got}");
        let top: Vec<f64> = lp["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t[1].as_f64().unwrap())
            .collect();
        assert_eq!(top.len(), 3);
        assert!((top[1] - 0.25f64.ln()).abs() < 1e-4);
        assert_eq!(r[0]["sampling"]["top_logprobs"], 3);
    }
}

#[test]
fn fleet_routes_around_a_dead_endpoint_and_spreads_load() {
    let rt = rt();
    let a = rt
        .block_on(FakeServer::start(FakeConfig {
            latency: Duration::from_millis(20),
            ..Default::default()
        }))
        .unwrap();
    let b = rt
        .block_on(FakeServer::start(FakeConfig {
            latency: Duration::from_millis(20),
            ..Default::default()
        }))
        .unwrap();
    // A third endpoint that accepts connections and then always fails.
    let c = rt
        .block_on(FakeServer::start(FakeConfig {
            fault_rate: 1.0,
            faults: vec![Fault::Unavailable],
            ..Default::default()
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("p.jsonl");
    let out = dir.path().join("t.jsonl");
    write_problems(&data, 30);
    let mut args = generate_args(&a.base_url(), &data, &out);
    args.extend([
        "--base-url".into(),
        b.base_url(),
        "--base-url".into(),
        c.base_url(),
    ]);
    let o = distill().args(&args).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r = read_lines(&out);
    assert_eq!(r.len(), 60);
    let served_a = a.stats.ok.load(std::sync::atomic::Ordering::Relaxed);
    let served_b = b.stats.ok.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(served_a + served_b, 60);
    assert!(
        served_a >= 10 && served_b >= 10,
        "load not spread: {served_a} / {served_b}"
    );
    let tried_c = c.stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        tried_c < 20,
        "kept sending to the failing endpoint: {tried_c}"
    );
    assert!(r.iter().all(|t| t["endpoint"] != c.base_url()));
}

#[test]
fn api_key_is_sent_and_a_wrong_one_stops_the_run() {
    let rt = rt();
    let server = rt
        .block_on(FakeServer::start(FakeConfig {
            api_key: Some("sk-test-123".into()),
            ..Default::default()
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("p.jsonl");
    write_problems(&data, 2);
    let out = dir.path().join("t.jsonl");
    let mut args = generate_args(&server.base_url(), &data, &out);
    args.extend(["--api-key-env".into(), "DISTILL_TEST_KEY".into()]);
    let o = distill()
        .args(&args)
        .env("DISTILL_TEST_KEY", "sk-test-123")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(read_lines(&out).len(), 4);

    let out2 = dir.path().join("t2.jsonl");
    let args = generate_args(&server.base_url(), &data, &out2)
        .into_iter()
        .chain(["--api-key-env".into(), "DISTILL_TEST_KEY".into()])
        .collect::<Vec<_>>();
    let o = distill()
        .args(&args)
        .env("DISTILL_TEST_KEY", "sk-wrong-999")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("authentication failed (HTTP 401)"), "{e}");
    assert!(
        !e.contains("sk-wrong-999"),
        "key leaked into the error: {e}"
    );
}
