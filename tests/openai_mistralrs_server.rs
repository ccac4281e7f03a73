//! The `openai` teacher against a real OpenAI-compatible server: `mistralrs serve` (crate
//! `mistralrs-cli` 0.8.1) serving the SmolLM2 GGUF on 127.0.0.1.
//!
//! Needs the `mistralrs` binary: `scripts/test-mistralrs-server.sh` installs it and runs this
//! test; `DISTILL_MISTRALRS_BIN` points at it. Without that variable the test is ignored.

mod common;

use std::collections::HashSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{distill, read_lines, stderr, test_model};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
#[ignore = "needs the mistralrs binary: run scripts/test-mistralrs-server.sh"]
fn generate_against_mistralrs_serve() {
    let bin = std::env::var("DISTILL_MISTRALRS_BIN").expect("DISTILL_MISTRALRS_BIN");
    let model = test_model();
    let port = free_port();
    let server = Server(
        Command::new(&bin)
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "--cpu",
                "--token-source",
                "none",
                "-m",
            ])
            .arg(model.parent().unwrap())
            .args(["--format", "gguf", "-f"])
            .arg(model.file_name().unwrap())
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting mistralrs serve"),
    );
    let base = format!("http://127.0.0.1:{port}/v1");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mistralrs serve did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.jsonl");
    let dataset = concat!(env!("CARGO_MANIFEST_DIR"), "/datasets/arith_tiny.jsonl");
    // No --model: the client takes the first model the server lists.
    let o = distill()
        .args([
            "generate",
            "--teacher",
            "openai",
            "--base-url",
            &base,
            "--dataset",
            dataset,
            "--limit",
            "2",
            "--n",
            "3",
            "--temperature",
            "1.0",
            "--top-p",
            "1.0",
            "--max-tokens",
            "24",
            "--logprobs",
            "3",
            "--seed",
            "5",
            "--concurrency",
            "4",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let r = read_lines(&out);
    assert_eq!(r.len(), 6);
    let ids: HashSet<_> = r
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 6);
    for t in &r {
        assert!(t.get("error").is_none(), "{t}");
        assert!(!t["completion"].as_str().unwrap().is_empty());
        let n_tokens = t["logprobs"].as_array().unwrap().len() as u64;
        // usage is per sample (one choice per request), matching the tokens we got logprobs for.
        assert_eq!(
            t["usage"]["completion_tokens"].as_u64().unwrap(),
            n_tokens,
            "{t}"
        );
        // Server reports log10; the client recognised mistral.rs and stored nats.
        for lp in t["logprobs"].as_array().unwrap() {
            let mass: f64 = lp["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x[1].as_f64().unwrap().exp())
                .sum();
            assert!(mass <= 1.0 + 1e-3, "top mass {mass}: {lp}");
            // Alternatives carry token text, not ids.
            assert!(lp["top"][0][0].is_string());
        }
        assert!(t["sampling"]["seed"].is_u64());
        assert!(t["sampling"].get("seed_honoured").is_none());
    }
    drop(server);
}
