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

/// Flags of `distill bench engine`.
#[derive(Debug, Args)]
pub struct EngineBenchArgs {
    /// GGUF file or Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter from `distill train`, folded in at load.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// How the engine holds its weights (`f32`, `f16`, `q4_1` or `q8_0`).
    #[arg(long, value_enum, default_value = "f32")]
    pub weights: crate::infer::WeightFormat,
    /// Sequences decoded together, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub seqs: Vec<usize>,
    /// Tokens decoded per sequence (end-of-sequence ignored, so every sequence runs to it).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Tokens per sequence for mistral.rs (slow on CPU: keep it short).
    #[arg(long, default_value_t = 32)]
    pub mistralrs_max_tokens: u32,
    /// Skip mistral.rs (the peer measured in the same run).
    #[arg(long)]
    pub no_mistralrs: bool,
    /// Decode rates only: skip the 512-token prompt, scoring and mistral.rs.
    #[arg(long)]
    pub quick: bool,
    /// Also write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Peak and current resident memory of this process, in MB (`VmHWM`, `VmRSS`).
fn memory_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Chat prompts of a few dozen tokens each, all different.
fn bench_prompts(e: &crate::infer::Engine, n: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    use crate::model::tokenizer::ChatMessage;
    (0..n)
        .map(|i| {
            let q = format!(
                "Mia has {} apples. She buys {} bags with {} apples in each bag and gives {} apples away. How many apples does Mia have now? Think step by step.",
                10 + i % 37,
                2 + i % 5,
                3 + i % 7,
                1 + i % 4
            );
            Ok(e.encode_chat(&[ChatMessage::new("user", q)])?)
        })
        .collect()
}

/// The batched engine: prompt and decode tokens/s at several batch sizes, a long prompt,
/// teacher-forced scoring against the trainer's forward pass, and mistral.rs in the same run.
pub async fn engine(a: EngineBenchArgs) -> anyhow::Result<()> {
    use crate::infer::{BatchConfig, Engine, Request, SamplingParams, ScoreRequest};
    let t = Instant::now();
    let mut e = Engine::load(&a.model, a.adapter.as_deref())?;
    e.set_weight_format(a.weights);
    let load_s = t.elapsed().as_secs_f64();
    let (hwm, _) = memory_mb();
    println!(
        "bench engine: {} ({} layers, hidden {}, vocab {}); load {:.1} s, {} weights {:.0} MB, peak RSS {hwm:.0} MB; {} rayon threads",
        a.model.display(),
        e.weights().dims().layers,
        e.weights().dims().hidden,
        e.weights().dims().vocab,
        load_s,
        a.weights.name(),
        e.weights().bytes() as f64 / 1e6,
        rayon::current_num_threads()
    );
    let kv_mb = |tokens: usize| (tokens * e.kv_bytes_per_token()) as f64 / 1e6;
    let params = |max_tokens: usize| SamplingParams {
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let max_seqs = a.seqs.iter().copied().max().unwrap_or(1).max(1);
    let prompts = bench_prompts(&e, max_seqs)?;
    // Warm-up: page the weights in, size the allocator.
    e.generate(
        vec![Request {
            prompt: prompts[0].clone(),
            params: params(4),
        }],
        BatchConfig::default(),
        |_, _| {},
    );
    println!(
        "  {:>5} | {:>14} | {:>14} | {:>9} | {:>10} | {:>12}",
        "seqs", "prompt tok/s", "decode tok/s", "TTFT s", "KV MB", "peak RSS MB"
    );
    let mut candle_decode = Vec::new();
    let mut rows = Vec::new();
    for &s in &a.seqs {
        let s = s.max(1);
        let reqs = |n: usize| -> Vec<Request> {
            prompts[..s]
                .iter()
                .map(|p| Request {
                    prompt: p.clone(),
                    params: params(n),
                })
                .collect()
        };
        let cfg = BatchConfig {
            max_seqs: s,
            max_step_tokens: 4096,
            ..BatchConfig::default()
        };
        let prompt_tokens: usize = prompts[..s].iter().map(Vec::len).sum();
        let t0 = Instant::now();
        e.generate(reqs(1), cfg, |_, _| {});
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let out = e.generate(reqs(a.max_tokens + 1), cfg, |_, _| {});
        let total = t1.elapsed().as_secs_f64();
        let decoded: usize = out.iter().map(|c| c.tokens.len().saturating_sub(1)).sum();
        let decode = decoded as f64 / (total - prefill).max(1e-9);
        let (hwm, _) = memory_mb();
        let kv = kv_mb(prompt_tokens + s * (a.max_tokens + 1));
        println!(
            "  {s:>5} | {:>14.1} | {decode:>14.1} | {prefill:>9.3} | {kv:>10.1} | {hwm:>12.0}",
            prompt_tokens as f64 / prefill
        );
        candle_decode.push((s, decode));
        rows.push(serde_json::json!({
            "seqs": s, "prompt_tok_s": prompt_tokens as f64 / prefill, "decode_tok_s": decode,
            "ttft_s": prefill, "kv_mb": kv, "peak_rss_mb": hwm,
        }));
    }
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "model": a.model.display().to_string(),
            "load_s": load_s,
            "weights_mb": e.weights().bytes() as f64 / 1e6,
            "threads": rayon::current_num_threads(),
            "max_tokens": a.max_tokens,
            "rows": rows,
        });
        crate::trace::write_atomically(path, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    if a.quick {
        return Ok(());
    }
    // One long prompt (llama.cpp's pp512).
    let long: Vec<u32> = prompts.iter().flatten().copied().take(512).collect();
    let long = if long.len() < 512 {
        long.iter().cycle().take(512).copied().collect()
    } else {
        long
    };
    let t0 = Instant::now();
    e.generate(
        vec![Request {
            prompt: long.clone(),
            params: params(1),
        }],
        BatchConfig {
            max_step_tokens: 512,
            ..BatchConfig::default()
        },
        |_, _| {},
    );
    let pp = 512.0 / t0.elapsed().as_secs_f64();
    println!("  one 512-token prompt: {pp:.1} tok/s");

    // Teacher-forced scoring vs the trainer's forward pass (same 8 x 256 tokens).
    let seqs: Vec<Vec<u32>> = (0..8)
        .map(|i| long.iter().cycle().skip(i * 7).take(256).copied().collect())
        .collect();
    let t0 = Instant::now();
    e.score(
        seqs.iter()
            .map(|s| ScoreRequest {
                tokens: s.clone(),
                top_k: 20,
            })
            .collect(),
        &[],
        BatchConfig {
            max_step_tokens: 1024,
            ..BatchConfig::default()
        },
    )?;
    let score_rate = (8 * 256) as f64 / t0.elapsed().as_secs_f64();
    let trainer_rate = {
        use crate::model::{ForwardOptions, Packing};
        use candle_core::{Device, Tensor};
        let dev = Device::Cpu;
        let base = crate::model::load::BaseModel::load(&a.model, &dev)?;
        let student = base.student(None, candle_core::DType::F32, &dev)?;
        let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
        let input = Tensor::from_vec(flat, (8, 256), &dev)?;
        let packing = Packing::causal(8, 256, &dev)?;
        let t0 = Instant::now();
        let out = student.forward(&input, &packing, &ForwardOptions::default())?;
        let rows = Tensor::arange(0u32, 8 * 256, &dev)?;
        // The trainer computes logits in chunks for its loss; all rows at once here.
        let logits = student.logits_at(&out.hidden, &rows)?;
        let _ = logits.dims();
        (8 * 256) as f64 / t0.elapsed().as_secs_f64()
    };
    println!(
        "  teacher-forced scoring (8 x 256, top-20 + log-sum-exp): {score_rate:.1} tok/s; trainer forward + logits: {trainer_rate:.1} tok/s ({:.2}x)",
        score_rate / trainer_rate
    );

    if a.no_mistralrs {
        return Ok(());
    }
    // The peer in the same run: mistral.rs on the same file, same prompts, greedy.
    let teacher = LocalTeacher::load(&LocalConfig {
        model: a.model.display().to_string(),
        model_file: None,
        revision: None,
        max_num_seqs: max_seqs,
        force_cpu: true,
        chat_template: None,
    })
    .await?;
    let template = PromptTemplate::load("gsm8k")?;
    raw_round(&teacher, &template, &synthetic_problems(1), 4).await?;
    println!(
        "  {:>5} | {:>22} | {:>17} | {:>7}",
        "seqs", "mistral.rs tok/s (e2e)", "candle decode", "ratio"
    );
    for (s, candle) in candle_decode {
        let problems = synthetic_problems(s);
        let rate = raw_round(&teacher, &template, &problems, a.mistralrs_max_tokens).await?;
        println!(
            "  {s:>5} | {rate:>22.1} | {candle:>17.1} | {:>6.1}x",
            candle / rate.max(1e-9)
        );
    }
    Ok(())
}
