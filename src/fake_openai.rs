//! A loopback OpenAI-compatible server with fault injection.
//!
//! Hosted APIs and serving fleets cannot run in a test suite, so this stands in for them: it
//! speaks enough HTTP/1.1 (keep-alive, `Content-Length` bodies) to answer `GET /v1/models` and
//! `POST /v1/chat/completions` like an OpenAI endpoint, and on a chosen schedule it misbehaves
//! the way real ones do: 429 with `Retry-After`, 500/503, a response slower than the client's
//! timeout, a connection reset, malformed JSON, and a body with the wrong schema.
//!
//! The schedule is deterministic (a hash of the request's sequence number), so a failing test
//! replays the same way. The benchmark uses it with a fixed latency and no faults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One way a request can go wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// HTTP 429 with `Retry-After: 1`.
    RateLimited,
    /// HTTP 500.
    Internal,
    /// HTTP 503.
    Unavailable,
    /// Answers only after [`FakeConfig::slow`] (set it above the client's timeout).
    Slow,
    /// Closes the connection with a TCP reset instead of answering.
    Reset,
    /// HTTP 200 with a body that is not JSON.
    MalformedJson,
    /// HTTP 200 with JSON of the wrong shape (no `choices`).
    WrongSchema,
}

impl Fault {
    /// Every fault kind, for building schedules.
    pub const ALL: [Fault; 7] = [
        Fault::RateLimited,
        Fault::Internal,
        Fault::Unavailable,
        Fault::Slow,
        Fault::Reset,
        Fault::MalformedJson,
        Fault::WrongSchema,
    ];
}

/// Behaviour of the fake server.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Model id listed by `/v1/models` and echoed in responses.
    pub model: String,
    /// Latency added to every successful response.
    pub latency: Duration,
    /// Delay of a [`Fault::Slow`] response.
    pub slow: Duration,
    /// Fraction of chat requests (0..=1) that get a fault.
    pub fault_rate: f64,
    /// Faults drawn from (uniformly, deterministically) when a request is faulted.
    pub faults: Vec<Fault>,
    /// Required bearer key; requests without it get 401.
    pub api_key: Option<String>,
    /// Report log10 logprobs and mistral.rs-style usage, like `mistralrs serve`.
    pub mistralrs_style: bool,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            model: "fake-teacher".into(),
            latency: Duration::ZERO,
            slow: Duration::from_secs(5),
            fault_rate: 0.0,
            faults: Fault::ALL.to_vec(),
            api_key: None,
            mistralrs_style: false,
        }
    }
}

/// What the server saw, for assertions.
#[derive(Debug, Default)]
pub struct FakeStats {
    /// Chat requests received.
    pub requests: AtomicU64,
    /// Chat requests answered with a completion.
    pub ok: AtomicU64,
    /// Faults injected, by kind.
    pub faults: Mutex<BTreeMap<String, u64>>,
}

impl FakeStats {
    /// Faults injected, by kind name.
    pub fn faults(&self) -> BTreeMap<String, u64> {
        self.faults.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// A running fake server; it stops when dropped.
pub struct FakeServer {
    /// Address it listens on (127.0.0.1, ephemeral port).
    pub addr: SocketAddr,
    /// Counters.
    pub stats: Arc<FakeStats>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    /// Binds 127.0.0.1 on a free port and starts serving.
    pub async fn start(cfg: FakeConfig) -> std::io::Result<FakeServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(FakeStats::default());
        let cfg = Arc::new(cfg);
        let seq = Arc::new(AtomicU64::new(0));
        let st = stats.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let _ = sock.set_nodelay(true);
                let (cfg, st, seq) = (cfg.clone(), st.clone(), seq.clone());
                tokio::spawn(async move {
                    let _ = serve_connection(sock, &cfg, &st, &seq).await;
                });
            }
        });
        Ok(FakeServer { addr, stats, task })
    }

    /// Base URL to give the client (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Deterministic fault choice for request number `n`.
fn fault_for(n: u64, cfg: &FakeConfig) -> Option<Fault> {
    if cfg.faults.is_empty() || cfg.fault_rate <= 0.0 {
        return None;
    }
    let mut h = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 31;
    let u = (h >> 11) as f64 / (1u64 << 53) as f64;
    if u >= cfg.fault_rate {
        return None;
    }
    let k = ((u / cfg.fault_rate) * cfg.faults.len() as f64) as usize;
    cfg.faults.get(k.min(cfg.faults.len() - 1)).copied()
}

async fn serve_connection(
    sock: TcpStream,
    cfg: &FakeConfig,
    stats: &FakeStats,
    seq: &AtomicU64,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(sock);
    loop {
        // Request line and headers.
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut content_length = 0usize;
        let mut auth: Option<String> = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => content_length = v.trim().parse().unwrap_or(0),
                    "authorization" => auth = Some(v.trim().to_string()),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body).await?;

        if let Some(key) = &cfg.api_key {
            if auth.as_deref() != Some(&format!("Bearer {key}")) {
                let b = json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}});
                respond(reader.get_mut(), 401, &[], &b.to_string()).await?;
                continue;
            }
        }
        match (method.as_str(), path.as_str()) {
            ("GET", "/v1/models") => {
                let b = json!({"object": "list", "data": [{"id": cfg.model, "object": "model"}]});
                respond(reader.get_mut(), 200, &[], &b.to_string()).await?;
            }
            ("POST", "/v1/chat/completions") => {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                stats.requests.fetch_add(1, Ordering::Relaxed);
                let fault = fault_for(n, cfg);
                if let Some(f) = fault {
                    if let Ok(mut m) = stats.faults.lock() {
                        *m.entry(format!("{f:?}")).or_default() += 1;
                    }
                }
                let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                match fault {
                    Some(Fault::Reset) => {
                        let sock = reader.into_inner();
                        let _ = sock.set_zero_linger();
                        drop(sock); // RST instead of FIN
                        return Ok(());
                    }
                    Some(Fault::RateLimited) => {
                        let b = json!({"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}});
                        respond(
                            reader.get_mut(),
                            429,
                            &[("Retry-After", "1")],
                            &b.to_string(),
                        )
                        .await?;
                    }
                    Some(Fault::Internal) => {
                        respond(
                            reader.get_mut(),
                            500,
                            &[],
                            "{\"error\":{\"message\":\"internal error\"}}",
                        )
                        .await?;
                    }
                    Some(Fault::Unavailable) => {
                        respond(
                            reader.get_mut(),
                            503,
                            &[],
                            "<html>503 Service Unavailable</html>",
                        )
                        .await?;
                    }
                    Some(Fault::MalformedJson) => {
                        respond(
                            reader.get_mut(),
                            200,
                            &[],
                            "{\"id\": \"chatcmpl-1\", \"choices\": [{\"mess",
                        )
                        .await?;
                    }
                    Some(Fault::WrongSchema) => {
                        respond(
                            reader.get_mut(),
                            200,
                            &[],
                            "{\"id\": \"chatcmpl-1\", \"result\": \"ok\"}",
                        )
                        .await?;
                    }
                    Some(Fault::Slow) => {
                        tokio::time::sleep(cfg.slow).await;
                        let b = completion(&req, cfg, n);
                        respond(reader.get_mut(), 200, &[], &b.to_string()).await?;
                        stats.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {
                        if !cfg.latency.is_zero() {
                            tokio::time::sleep(cfg.latency).await;
                        }
                        let b = completion(&req, cfg, n);
                        respond(reader.get_mut(), 200, &[], &b.to_string()).await?;
                        stats.ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {
                respond(
                    reader.get_mut(),
                    404,
                    &[],
                    "{\"error\":{\"message\":\"not found\"}}",
                )
                .await?;
            }
        }
    }
}

/// A deterministic chat completion: a `<think>` block, then `\boxed{}` with the sum of the
/// numbers in the last user message. With `max_tokens` below 16 the answer is cut off and
/// `finish_reason` is `length`.
fn completion(req: &Value, cfg: &FakeConfig, n: u64) -> Value {
    let question = req
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let sum: i64 = question
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse::<i64>().ok())
        .sum();
    let max_tokens = req.get("max_tokens").and_then(Value::as_u64).unwrap_or(256);
    let full = format!(
        "<think>\nAdd the numbers in the question.\n</think>\nThe answer is \\boxed{{{sum}}}."
    );
    let words: Vec<&str> = full.split_inclusive(' ').collect();
    let (text, finish) = if (words.len() as u64) > max_tokens {
        (words[..max_tokens as usize].concat(), "length")
    } else {
        (full.clone(), "stop")
    };
    let completion_tokens = text.split_inclusive(' ').count();
    let mut choice = json!({
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish,
    });
    if req.get("logprobs").and_then(Value::as_bool) == Some(true) {
        let k = req.get("top_logprobs").and_then(Value::as_u64).unwrap_or(0) as usize;
        // p = 0.5 for the chosen token, 0.25 and 0.125 for alternatives.
        let lp = |p: f64| {
            if cfg.mistralrs_style {
                p.log10()
            } else {
                p.ln()
            }
        };
        let content: Vec<Value> = text
            .split_inclusive(' ')
            .map(|w| {
                let top: Vec<Value> = [0.5, 0.25, 0.125]
                    .iter()
                    .take(k)
                    .enumerate()
                    .map(|(i, &p)| {
                        if cfg.mistralrs_style {
                            json!({"token": i, "logprob": lp(p), "bytes": w})
                        } else {
                            json!({"token": w, "logprob": lp(p), "bytes": w.as_bytes()})
                        }
                    })
                    .collect();
                json!({"token": w, "logprob": lp(0.5), "top_logprobs": top})
            })
            .collect();
        choice["logprobs"] = json!({ "content": content });
    }
    let mut usage = json!({
        "prompt_tokens": question.split_whitespace().count(),
        "completion_tokens": completion_tokens,
        "total_tokens": question.split_whitespace().count() + completion_tokens,
    });
    if cfg.mistralrs_style {
        usage["avg_tok_per_sec"] = json!(50.0);
    }
    json!({
        "id": format!("chatcmpl-{n}"),
        "object": "chat.completion",
        "created": 0,
        "model": cfg.model,
        "choices": [choice],
        "usage": usage,
    })
}

async fn respond(
    sock: &mut TcpStream,
    status: u16,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: keep-alive\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    // One write per response: a separate small write for the body would meet Nagle's algorithm
    // and the peer's delayed ACK (a 40 ms stall per request).
    head.push_str(body);
    sock.write_all(head.as_bytes()).await?;
    sock.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_schedule_hits_the_rate_and_every_kind() {
        let cfg = FakeConfig {
            fault_rate: 0.3,
            ..Default::default()
        };
        let mut kinds = std::collections::HashSet::new();
        let faulted = (0..10_000u64)
            .filter_map(|n| fault_for(n, &cfg))
            .inspect(|f| {
                kinds.insert(*f);
            })
            .count();
        assert!((2700..3300).contains(&faulted), "{faulted}");
        assert_eq!(kinds.len(), Fault::ALL.len());
    }
}
