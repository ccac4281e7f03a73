//! `distill bench`: throughput figures printed as ratios against a peer measured in the same run,
//! so the numbers mean something on any machine.
//!
//! - `openai`: the OpenAI client and generate stage against the loopback [`crate::fake_openai`]
//!   server with a fixed latency. With `c` requests in flight and latency `L`, the ideal is
//!   `c / L` requests per second; the bench reports the fraction reached and checks that no
//!   sample was lost or duplicated.
//! - `local`: the embedded mistral.rs engine driven directly (the peer) and through distill's
//!   generate stage, one stream and several concurrent streams, same prompts, greedy.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::data::dataset::Problem;
use crate::data::prompt::PromptTemplate;
use crate::fake_openai::{FakeConfig, FakeServer};
use crate::generate::{self, GenerateConfig};
use crate::teacher::local::{LocalConfig, LocalTeacher};
use crate::teacher::openai::{OpenAiConfig, OpenAiTeacher};
use crate::teacher::Teacher;
use crate::trace::{Reference, Sampling};

/// Flags of `distill bench openai`.
#[derive(Debug, Args)]
pub struct OpenAiBenchArgs {
    /// Requests to send.
    #[arg(long, default_value_t = 1920)]
    pub requests: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Server latency per request, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub latency_ms: u64,
}

/// Flags of `distill bench local`.
#[derive(Debug, Args)]
pub struct LocalBenchArgs {
    /// GGUF file or model directory.
    #[arg(long)]
    pub model: String,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 96)]
    pub max_tokens: u32,
    /// Concurrent streams for the aggregate figure.
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Rounds (each measures the peer and distill once, interleaved).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
}

fn synthetic_problems(n: usize) -> Vec<Problem> {
    (0..n)
        .map(|i| Problem {
            id: format!("bench-{i}"),
            line: i + 1,
            question: format!("What is {} + {}?", i % 97, (i * 7) % 89),
            reference: Reference::default(),
            fields: Default::default(),
        })
        .collect()
}

fn sampling(max_tokens: u32) -> Sampling {
    Sampling {
        temperature: 0.0,
        top_p: 1.0,
        max_tokens,
        stop: vec![],
        seed: None,
        seed_honoured: None,
        top_logprobs: 0,
    }
}

/// Runs the OpenAI client benchmark and prints its figures.
pub async fn openai(a: OpenAiBenchArgs) -> anyhow::Result<()> {
    let latency = Duration::from_millis(a.latency_ms.max(1));
    let server = FakeServer::start(FakeConfig {
        latency,
        ..Default::default()
    })
    .await
    .context("starting the loopback server")?;
    let teacher = Arc::new(
        OpenAiTeacher::connect(OpenAiConfig {
            base_urls: vec![server.base_url()],
            model: Some("fake-teacher".into()),
            timeout: Duration::from_secs(30),
            ..Default::default()
        })
        .await?,
    );
    let dir = tempfile::tempdir().context("temporary directory")?;
    let out: PathBuf = dir.path().join("bench.jsonl");
    let problems = synthetic_problems(a.requests);
    let template = PromptTemplate::load("math")?;
    let cfg = GenerateConfig {
        n: 1,
        sampling: sampling(64),
        concurrency: a.concurrency,
        out: out.clone(),
        progress: false,
    };
    let t = Instant::now();
    let summary = generate::run(&problems, &template, teacher, &cfg).await?;
    let wall = t.elapsed().as_secs_f64();
    let traces = crate::trace::read_traces(&out)?;
    let ids: HashSet<&str> = traces.iter().map(|t| t.id.as_str()).collect();
    let ideal = a.concurrency as f64 / latency.as_secs_f64();
    let rate = a.requests as f64 / wall;
    println!(
        "bench openai: {} requests, {} in flight, {} ms server latency",
        a.requests, a.concurrency, a.latency_ms
    );
    println!("  ideal (in flight / latency): {ideal:.1} req/s");
    println!(
        "  distill generate:            {rate:.1} req/s  = {:.1}% of ideal",
        100.0 * rate / ideal
    );
    println!(
        "  records {} (unique ids {}), failed {}, lost {}",
        traces.len(),
        ids.len(),
        summary.samples_failed,
        a.requests.saturating_sub(ids.len())
    );
    Ok(())
}

/// Runs the embedded-engine benchmark and prints its figures.
pub async fn local(a: LocalBenchArgs) -> anyhow::Result<()> {
    let teacher = Arc::new(
        LocalTeacher::load(&LocalConfig {
            model: a.model.clone(),
            model_file: None,
            revision: None,
            max_num_seqs: a.streams.max(1),
            force_cpu: true,
            chat_template: None,
        })
        .await?,
    );
    let template = PromptTemplate::load("gsm8k")?;
    let problems = synthetic_problems(a.streams.max(1));
    println!(
        "bench local: {} , greedy, max_tokens {}, {} rounds",
        a.model, a.max_tokens, a.rounds
    );
    // Warm-up (first requests pay one-off allocation costs).
    raw_round(&teacher, &template, &problems[..1], a.max_tokens).await?;
    let mut rows: Vec<(&str, usize, f64, f64)> = Vec::new();
    for &streams in &[1usize, a.streams.max(1)] {
        let (mut best_raw, mut best_distill) = (0.0f64, 0.0f64);
        for _ in 0..a.rounds.max(1) {
            best_raw = best_raw
                .max(raw_round(&teacher, &template, &problems[..streams], a.max_tokens).await?);
            best_distill = best_distill
                .max(distill_round(&teacher, &template, &problems[..streams], a.max_tokens).await?);
        }
        rows.push(("tok/s", streams, best_raw, best_distill));
    }
    println!(
        "  {:>8} | {:>16} | {:>16} | {:>7}",
        "streams", "mistral.rs tok/s", "distill tok/s", "ratio"
    );
    for (_, streams, raw, dist) in rows {
        println!(
            "  {streams:>8} | {raw:>16.1} | {dist:>16.1} | {:>6.1}%",
            100.0 * dist / raw.max(1e-9)
        );
    }
    Ok(())
}

/// The peer: the same requests sent straight to the mistral.rs engine.
async fn raw_round(
    teacher: &LocalTeacher,
    template: &PromptTemplate,
    problems: &[Problem],
    max_tokens: u32,
) -> anyhow::Result<f64> {
    let s = sampling(max_tokens);
    let t = Instant::now();
    let futs = problems.iter().map(|p| {
        let msgs = template.render(p);
        let params = crate::teacher::local::sampling_params(&s);
        async move {
            let mut rb = mistralrs::RequestBuilder::new();
            for m in msgs? {
                let role = if m.role == "system" {
                    mistralrs::TextMessageRole::System
                } else {
                    mistralrs::TextMessageRole::User
                };
                rb = rb.add_message(role, m.content);
            }
            let r = teacher
                .engine()
                .send_chat_request(rb.set_sampling(params))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            anyhow::Ok(r.usage.completion_tokens as u64)
        }
    });
    let tokens: u64 = futures::future::try_join_all(futs).await?.into_iter().sum();
    Ok(tokens as f64 / t.elapsed().as_secs_f64())
}

/// distill's path: the generate stage (ids, records, file appends) over the same teacher.
async fn distill_round(
    teacher: &Arc<LocalTeacher>,
    template: &PromptTemplate,
    problems: &[Problem],
    max_tokens: u32,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let cfg = GenerateConfig {
        n: 1,
        sampling: sampling(max_tokens),
        concurrency: problems.len(),
        out: dir.path().join("t.jsonl"),
        progress: false,
    };
    let t = Instant::now();
    let s = generate::run(
        problems,
        template,
        teacher.clone() as Arc<dyn Teacher>,
        &cfg,
    )
    .await?;
    Ok(s.completion_tokens as f64 / t.elapsed().as_secs_f64())
}
