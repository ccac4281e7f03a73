//! OpenAI-compatible teacher: `/v1/chat/completions` on one or several servers.
//!
//! The layers, from the inside out (each testable on its own):
//! - `OpenAiTeacher::attempt` builds one request and parses one response, absorbing the ways
//!   servers differ from OpenAI (mistral.rs: base-10 logprobs, token ids in `top_logprobs`,
//!   unordered choices, `usage` counting one choice, a missing temperature meaning 1.0 — we
//!   always send one).
//! - [`classify`] decides whether a failure is transient (429, 408, 5xx, timeouts, connection
//!   errors, a malformed or wrong-shaped body) or final (other 4xx, `insufficient_quota`), and
//!   whether it is fatal for the whole run (401/403, unknown model).
//! - [`backoff`] decides how long to wait: exponential with full jitter, capped, and never less
//!   than the server's `Retry-After`.
//! - [`Fleet`] spreads requests over the base URLs (fewest in flight first) and puts a failing
//!   server on a cooldown so retries go to the others.
//! - [`RateLimiter`]s enforce optional requests-per-minute and tokens-per-minute budgets shared
//!   by every request of the run.
//!
//! The API key is read from an environment variable, held in [`ApiKey`] (whose `Debug` is
//! redacted) and never logged.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::Rng;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{GenFailure, GenOutput, GenRequest, Teacher};
use crate::trace::{FinishReason, TeacherInfo, TokenLogprob, TraceError, Usage};

/// An API key that never shows up in `Debug` output or logs.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: String) -> Self {
        ApiKey(key)
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// How to read logprobs the server returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogprobBase {
    /// Natural log unless the server is recognised as mistral.rs (which reports log10).
    Auto,
    /// Natural log, as OpenAI, vLLM and SGLang report.
    E,
    /// Base 10, as mistral.rs reports.
    Ten,
}

/// Settings of the OpenAI-compatible client.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Base URLs, e.g. `http://10.0.0.5:8000/v1`. A URL with an empty path gets `/v1`.
    pub base_urls: Vec<String>,
    /// Model name sent in each request; `None` = the first model the first server lists.
    pub model: Option<String>,
    /// Bearer key, if the servers need one.
    pub api_key: Option<ApiKey>,
    /// Per-request timeout (whole request, including the body).
    pub timeout: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Attempts per sample, the first included.
    pub max_attempts: u32,
    /// First backoff step.
    pub backoff_base: Duration,
    /// Largest backoff step.
    pub backoff_max: Duration,
    /// Requests-per-minute budget across the fleet.
    pub rpm: Option<u32>,
    /// Tokens-per-minute budget across the fleet (prompt estimate + max_tokens per request).
    pub tpm: Option<u32>,
    /// Unit of returned logprobs.
    pub logprob_base: LogprobBase,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            base_urls: vec!["http://127.0.0.1:8000/v1".into()],
            model: None,
            api_key: None,
            timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(10),
            max_attempts: 8,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            rpm: None,
            tpm: None,
            logprob_base: LogprobBase::Auto,
        }
    }
}

/// Errors setting up the client (before any sample is generated).
#[derive(Debug, thiserror::Error)]
pub enum OpenAiSetupError {
    /// A base URL does not parse.
    #[error("--base-url `{url}`: {message}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// No endpoint answered `GET /models`.
    #[error("cannot reach any OpenAI-compatible endpoint: {details}")]
    Unreachable {
        /// One `url: reason` per endpoint.
        details: String,
    },
    /// The server rejected the key.
    #[error("{url}: authentication failed (HTTP {status}): {body}; check the key variable given by --api-key-env")]
    Auth {
        /// Endpoint.
        url: String,
        /// HTTP status.
        status: u16,
        /// Server message.
        body: String,
    },
    /// The server lists no model and none was given.
    #[error("{url}: no --model given and the server lists no models")]
    NoModel {
        /// Endpoint.
        url: String,
    },
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Client(String),
}

/// Normalises a base URL: trims a trailing `/`, adds `/v1` to a bare host.
pub fn normalize_base_url(raw: &str) -> Result<String, OpenAiSetupError> {
    let parsed = url::Url::parse(raw).map_err(|e| OpenAiSetupError::BadUrl {
        url: raw.to_string(),
        message: format!("{e} (expected e.g. http://127.0.0.1:8000/v1)"),
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(OpenAiSetupError::BadUrl {
            url: raw.to_string(),
            message: "scheme must be http or https".into(),
        });
    }
    let mut s = raw.trim_end_matches('/').to_string();
    if parsed.path() == "/" || parsed.path().is_empty() {
        s.push_str("/v1");
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------------
// Classification and backoff

/// What to do after a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Retry {
    /// Worth another attempt, not before `after` if the server said so.
    Transient {
        /// Server-requested wait (`Retry-After`).
        after: Option<Duration>,
    },
    /// Retrying this sample cannot help.
    Final,
    /// Retrying anything cannot help: stop the run.
    Fatal,
}

/// Classifies an HTTP status (and OpenAI error code, if the body had one).
pub fn classify(status: StatusCode, retry_after: Option<Duration>, code: Option<&str>) -> Retry {
    match status.as_u16() {
        429 if code == Some("insufficient_quota") => Retry::Fatal, // billing, not load
        401 | 403 => Retry::Fatal,
        404 if code == Some("model_not_found") => Retry::Fatal,
        408 | 409 | 425 | 429 | 500..=599 => Retry::Transient { after: retry_after },
        _ => Retry::Final,
    }
}

/// Backoff before attempt `attempt` (1 = first retry): full jitter over an exponentially growing
/// window, capped at `max`, and at least the server's `Retry-After`.
pub fn backoff(
    attempt: u32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(max);
    let jittered = exp.mul_f64(rand::rng().random_range(0.5..=1.0));
    match retry_after {
        Some(ra) => ra.max(jittered.min(ra + base)),
        None => jittered,
    }
}

/// Parses `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(3600.0)));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(3600)),
    )
}

// ---------------------------------------------------------------------------------------------
// Rate limits

/// A token bucket shared by all requests: `capacity` tokens refilled evenly over a minute.
#[derive(Debug)]
pub struct RateLimiter {
    capacity: f64,
    state: tokio::sync::Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A bucket allowing `per_minute` units per minute, starting full.
    pub fn per_minute(per_minute: u32) -> Self {
        let capacity = f64::from(per_minute.max(1));
        RateLimiter {
            capacity,
            state: tokio::sync::Mutex::new((capacity, Instant::now())),
        }
    }

    /// Waits until `units` are available and takes them. Requests larger than the whole bucket
    /// take the whole bucket (they would otherwise never run).
    pub async fn acquire(&self, units: f64) {
        let units = units.min(self.capacity);
        loop {
            let wait = {
                let mut st = self.state.lock().await;
                let now = Instant::now();
                let refill = now.duration_since(st.1).as_secs_f64() * self.capacity / 60.0;
                st.0 = (st.0 + refill).min(self.capacity);
                st.1 = now;
                if st.0 >= units {
                    st.0 -= units;
                    return;
                }
                Duration::from_secs_f64((units - st.0) * 60.0 / self.capacity)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fleet of endpoints

/// One server of the fleet and what we know of its health.
#[derive(Debug)]
struct Endpoint {
    base: String,
    in_flight: AtomicU32,
    /// Consecutive failures; reset by a success.
    failures: AtomicU32,
    /// Not used before this instant (ms since fleet start) after a failure.
    cooldown_until_ms: AtomicU64,
    served: AtomicU64,
}

/// Several base URLs serving the same model. Picks the healthy one with the fewest requests in
/// flight; a failing one cools down (growing with its consecutive failures) while the others
/// take its load.
#[derive(Debug)]
pub struct Fleet {
    endpoints: Vec<Endpoint>,
    start: Instant,
    rr: AtomicU32,
}

impl Fleet {
    /// A fleet over already-normalised base URLs.
    pub fn new(bases: Vec<String>) -> Self {
        Fleet {
            endpoints: bases
                .into_iter()
                .map(|base| Endpoint {
                    base,
                    in_flight: AtomicU32::new(0),
                    failures: AtomicU32::new(0),
                    cooldown_until_ms: AtomicU64::new(0),
                    served: AtomicU64::new(0),
                })
                .collect(),
            start: Instant::now(),
            rr: AtomicU32::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Chooses an endpoint, or says how long until one is out of cooldown.
    fn pick(&self) -> Result<usize, Duration> {
        let now = self.now_ms();
        let offset = self.rr.fetch_add(1, Ordering::Relaxed) as usize;
        let n = self.endpoints.len();
        let mut best: Option<(usize, u32)> = None;
        let mut soonest = u64::MAX;
        for k in 0..n {
            let i = (k + offset) % n;
            let e = &self.endpoints[i];
            let until = e.cooldown_until_ms.load(Ordering::Relaxed);
            if until > now {
                soonest = soonest.min(until);
                continue;
            }
            let load = e.in_flight.load(Ordering::Relaxed);
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((i, load));
            }
        }
        match best {
            Some((i, _)) => Ok(i),
            None => Err(Duration::from_millis(soonest.saturating_sub(now))),
        }
    }

    fn mark_failure(&self, i: usize, retry_after: Option<Duration>) {
        let e = &self.endpoints[i];
        let k = e.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if self.endpoints.len() == 1 {
            // Nowhere else to go: each request backs off on its own (honouring Retry-After).
            return;
        }
        // 250 ms, 500 ms, 1 s, ... up to 30 s, or the server's own Retry-After.
        let cool = retry_after
            .unwrap_or_else(|| Duration::from_millis(250u64 << (k - 1).min(7)))
            .min(Duration::from_secs(30));
        let until = self.now_ms() + cool.as_millis() as u64;
        e.cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
        if k == 3 {
            tracing::warn!(endpoint = %e.base, "endpoint failing repeatedly; routing around it");
        }
    }

    fn mark_success(&self, i: usize) {
        let e = &self.endpoints[i];
        e.failures.store(0, Ordering::Relaxed);
        e.served.fetch_add(1, Ordering::Relaxed);
    }

    /// Samples served per endpoint, for the run summary.
    pub fn served(&self) -> Vec<(String, u64)> {
        self.endpoints
            .iter()
            .map(|e| (e.base.clone(), e.served.load(Ordering::Relaxed)))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Wire format (only the fields we read; unknown ones are ignored)

#[derive(Debug, Deserialize)]
struct ChatResponse {
    choices: Vec<ChoiceResp>,
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChoiceResp {
    #[serde(default)]
    index: usize,
    message: MessageResp,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<LogprobsResp>,
}

#[derive(Debug, Deserialize)]
struct MessageResp {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LogprobsResp {
    #[serde(default)]
    content: Option<Vec<LpEntry>>,
}

#[derive(Debug, Deserialize)]
struct LpEntry {
    token: Value,
    logprob: f64,
    #[serde(default)]
    bytes: Option<Value>,
    #[serde(default)]
    top_logprobs: Vec<LpEntry>,
}

impl LpEntry {
    /// Token text: OpenAI sends the string; mistral.rs sends the id in `token` and the text in
    /// `bytes` for alternatives.
    fn text(&self) -> String {
        match (&self.token, &self.bytes) {
            (Value::String(s), _) => s.clone(),
            (_, Some(Value::String(s))) => s.clone(),
            (other, _) => other.to_string(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Debug, Deserialize)]
struct ModelEntry {
    id: String,
}

/// One failed attempt.
struct AttemptError {
    kind: &'static str,
    message: String,
    retry: Retry,
}

impl AttemptError {
    fn transient(kind: &'static str, message: String) -> Self {
        AttemptError {
            kind,
            message,
            retry: Retry::Transient { after: None },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The teacher

/// Counters for the run summary and the progress bar.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Attempts that failed and were retried.
    pub retries: AtomicU64,
}

/// The OpenAI-compatible teacher.
#[derive(Debug)]
pub struct OpenAiTeacher {
    cfg: OpenAiConfig,
    info: TeacherInfo,
    model: String,
    http: reqwest::Client,
    fleet: Fleet,
    rpm: Option<RateLimiter>,
    tpm: Option<RateLimiter>,
    /// Counters shared with the progress display.
    pub stats: ClientStats,
}

impl OpenAiTeacher {
    /// Builds the client and checks every endpoint with `GET /models`: unreachable ones are
    /// reported (all unreachable is an error), a rejected key is an error, and a missing
    /// `--model` is taken from the first server's list.
    pub async fn connect(mut cfg: OpenAiConfig) -> Result<Self, OpenAiSetupError> {
        let bases = cfg
            .base_urls
            .iter()
            .map(|u| normalize_base_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        cfg.base_urls = bases.clone();
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.connect_timeout)
            .pool_max_idle_per_host(1024)
            .build()
            .map_err(|e| OpenAiSetupError::Client(e.to_string()))?;

        let mut reachable = Vec::new();
        let mut problems = Vec::new();
        let mut listed: Option<Vec<String>> = None;
        for base in &bases {
            let mut req = http
                .get(format!("{base}/models"))
                .timeout(cfg.connect_timeout.max(Duration::from_secs(5)));
            if let Some(k) = &cfg.api_key {
                req = req.bearer_auth(&k.0);
            }
            match req.send().await {
                Ok(resp) if matches!(resp.status().as_u16(), 401 | 403) => {
                    let status = resp.status().as_u16();
                    let body = resp.text().await.unwrap_or_default();
                    return Err(OpenAiSetupError::Auth {
                        url: base.clone(),
                        status,
                        body: truncate(&body, 200),
                    });
                }
                Ok(resp) => {
                    // Some servers do not implement /models; reaching them is what counts.
                    if resp.status().is_success() && listed.is_none() {
                        if let Ok(list) = resp.json::<ModelList>().await {
                            listed = Some(list.data.into_iter().map(|m| m.id).collect());
                        }
                    }
                    reachable.push(base.clone());
                }
                Err(e) => problems.push(format!("{base}: {}", describe_reqwest(&e))),
            }
        }
        if reachable.is_empty() {
            return Err(OpenAiSetupError::Unreachable {
                details: problems.join("; "),
            });
        }
        for p in &problems {
            tracing::warn!("endpoint unreachable at start (will be retried): {p}");
        }
        let model = match (&cfg.model, &listed) {
            (Some(m), Some(list)) => {
                if !list.iter().any(|x| x == m) {
                    tracing::warn!(model = %m, served = ?list, "model not in the server's /models list");
                }
                m.clone()
            }
            (Some(m), None) => m.clone(),
            (None, Some(list)) if !list.is_empty() => list[0].clone(),
            (None, _) => {
                return Err(OpenAiSetupError::NoModel {
                    url: reachable[0].clone(),
                })
            }
        };
        let info = TeacherInfo {
            backend: "openai".into(),
            model: model.clone(),
            file_sha256: None,
            revision: None,
            engine: None,
            adapter_sha256: None,
            license: None,
        };
        Ok(OpenAiTeacher {
            rpm: cfg.rpm.map(RateLimiter::per_minute),
            tpm: cfg.tpm.map(RateLimiter::per_minute),
            fleet: Fleet::new(bases),
            cfg,
            info,
            model,
            http,
            stats: ClientStats::default(),
        })
    }

    /// The fleet, for per-endpoint counts in the summary.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    fn body(&self, req: &GenRequest) -> Value {
        let s = &req.sampling;
        let mut body = json!({
            "model": self.model,
            "messages": req.messages,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_tokens": s.max_tokens,
            "n": 1,
            "stream": false,
        });
        if !s.stop.is_empty() {
            body["stop"] = json!(s.stop);
        }
        if let Some(seed) = s.seed {
            body["seed"] = json!(seed);
        }
        if s.top_logprobs > 0 {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(s.top_logprobs);
        }
        body
    }

    /// One HTTP attempt against endpoint `base`.
    async fn attempt(&self, base: &str, body: &Value) -> Result<GenOutput, AttemptError> {
        let mut req = self
            .http
            .post(format!("{base}/chat/completions"))
            .json(body);
        if let Some(k) = &self.cfg.api_key {
            req = req.bearer_auth(&k.0);
        }
        let resp = req.send().await.map_err(|e| {
            let kind = if e.is_timeout() { "timeout" } else { "connect" };
            AttemptError::transient(kind, describe_reqwest(&e))
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let bytes = resp.bytes().await.map_err(|e| {
            let kind = if e.is_timeout() { "timeout" } else { "connect" };
            AttemptError::transient(kind, format!("reading body: {}", describe_reqwest(&e)))
        })?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            let code = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| {
                v.pointer("/error/code")
                    .or_else(|| v.pointer("/error/type"))
                    .and_then(|c| c.as_str().map(str::to_string))
            });
            return Err(AttemptError {
                kind: "http_status",
                message: format!("HTTP {}: {}", status.as_u16(), truncate(&text, 300)),
                retry: classify(status, retry_after, code.as_deref()),
            });
        }
        let parsed: ChatResponse = match serde_json::from_slice::<Value>(&bytes) {
            Err(e) => {
                return Err(AttemptError::transient(
                    "bad_response",
                    format!(
                        "malformed JSON body: {e}: {}",
                        truncate(&String::from_utf8_lossy(&bytes), 120)
                    ),
                ))
            }
            Ok(v) => serde_json::from_value(v).map_err(|e| {
                AttemptError::transient("bad_response", format!("unexpected response schema: {e}"))
            })?,
        };
        self.convert(parsed)
    }

    fn convert(&self, mut parsed: ChatResponse) -> Result<GenOutput, AttemptError> {
        // mistral.rs may return choices out of order; we ask for one, take index 0 if present.
        parsed.choices.sort_by_key(|c| c.index);
        let usage = parsed.usage.take();
        let is_mistralrs = usage
            .as_ref()
            .is_some_and(|u| u.get("avg_tok_per_sec").is_some());
        let Some(choice) = parsed.choices.into_iter().next() else {
            return Err(AttemptError::transient(
                "bad_response",
                "response has no choices".into(),
            ));
        };
        let reasoning_field = choice
            .message
            .reasoning_content
            .or(choice.message.reasoning)
            .filter(|r| !r.trim().is_empty());
        let completion = match choice.message.content {
            Some(c) => c,
            None if reasoning_field.is_some() => String::new(),
            None => {
                return Err(AttemptError::transient(
                    "bad_response",
                    "choice has no message content".into(),
                ))
            }
        };
        let finish_reason = choice
            .finish_reason
            .as_deref()
            .map(FinishReason::parse)
            .unwrap_or(FinishReason::Other("unknown".into()));
        let scale = match self.cfg.logprob_base {
            LogprobBase::E => 1.0,
            LogprobBase::Ten => std::f64::consts::LN_10,
            LogprobBase::Auto if is_mistralrs => std::f64::consts::LN_10,
            LogprobBase::Auto => 1.0,
        };
        let logprobs = choice.logprobs.and_then(|l| l.content).map(|entries| {
            entries
                .into_iter()
                .map(|e| TokenLogprob {
                    token: e.text(),
                    logprob: (e.logprob * scale) as f32,
                    top: e
                        .top_logprobs
                        .iter()
                        .map(|t| (t.text(), (t.logprob * scale) as f32))
                        .collect(),
                    model_logprob: None,
                })
                .collect::<Vec<_>>()
        });
        let num = |k: &str| {
            usage
                .as_ref()
                .and_then(|u| u.get(k))
                .and_then(Value::as_u64)
        };
        let usage = Usage {
            prompt_tokens: num("prompt_tokens").unwrap_or(0),
            completion_tokens: num("completion_tokens")
                .or_else(|| logprobs.as_ref().map(|l| l.len() as u64))
                .unwrap_or(0),
        };
        Ok(GenOutput {
            completion,
            reasoning_field,
            finish_reason,
            usage,
            logprobs,
            attempts: 0,
            endpoint: None,
        })
    }
}

#[async_trait]
impl Teacher for OpenAiTeacher {
    fn info(&self) -> &TeacherInfo {
        &self.info
    }

    fn seed_honoured(&self) -> Option<bool> {
        None
    }

    async fn generate(&self, req: &GenRequest) -> Result<GenOutput, GenFailure> {
        let body = self.body(req);
        let prompt_chars: usize = req.messages.iter().map(|m| m.content.len()).sum();
        let token_estimate = (prompt_chars / 4 + req.sampling.max_tokens as usize) as f64;
        let started = Instant::now();
        let mut last: Option<(AttemptError, String)> = None;
        for attempt in 1..=self.cfg.max_attempts.max(1) {
            // Wait for a healthy endpoint (all may be cooling down after failures).
            let idx = loop {
                match self.fleet.pick() {
                    Ok(i) => break i,
                    Err(wait) => tokio::time::sleep(wait.max(Duration::from_millis(10))).await,
                }
            };
            if let Some(l) = &self.rpm {
                l.acquire(1.0).await;
            }
            if let Some(l) = &self.tpm {
                l.acquire(token_estimate).await;
            }
            let ep = &self.fleet.endpoints[idx];
            ep.in_flight.fetch_add(1, Ordering::Relaxed);
            let result = self.attempt(&ep.base, &body).await;
            ep.in_flight.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(mut out) => {
                    self.fleet.mark_success(idx);
                    out.attempts = attempt;
                    out.endpoint = Some(ep.base.clone());
                    return Ok(out);
                }
                Err(err) => {
                    let after = match &err.retry {
                        Retry::Transient { after } => *after,
                        Retry::Final | Retry::Fatal => {
                            let fatal = err.retry == Retry::Fatal;
                            return Err(GenFailure {
                                error: TraceError {
                                    kind: err.kind.into(),
                                    message: format!("{}: {}", ep.base, err.message),
                                },
                                attempts: attempt,
                                endpoint: Some(ep.base.clone()),
                                fatal,
                            });
                        }
                    };
                    self.fleet.mark_failure(idx, after);
                    if attempt < self.cfg.max_attempts {
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        let wait = if self.fleet.endpoints.len() > 1 {
                            // Another endpoint can take it right away; only a short jitter.
                            backoff(
                                attempt,
                                self.cfg.backoff_base / 4,
                                self.cfg.backoff_max,
                                None,
                            )
                        } else {
                            backoff(attempt, self.cfg.backoff_base, self.cfg.backoff_max, after)
                        };
                        tracing::debug!(
                            attempt,
                            wait_ms = wait.as_millis() as u64,
                            endpoint = %ep.base,
                            error = %err.message,
                            "retrying"
                        );
                        tokio::time::sleep(wait).await;
                    }
                    last = Some((err, ep.base.clone()));
                }
            }
        }
        let (err, base) = last.unwrap_or_else(|| {
            (
                AttemptError::transient("internal", "no attempt was made".into()),
                String::new(),
            )
        });
        Err(GenFailure {
            error: TraceError {
                kind: err.kind.into(),
                message: format!(
                    "gave up after {} attempts in {:.1}s; last: {}: {}",
                    self.cfg.max_attempts,
                    started.elapsed().as_secs_f64(),
                    base,
                    err.message
                ),
            },
            attempts: self.cfg.max_attempts,
            endpoint: Some(base),
            fatal: false,
        })
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.trim().to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", s[..end].trim())
}

/// A reqwest error with its cause chain, which holds the useful part ("connection refused").
fn describe_reqwest(e: &reqwest::Error) -> String {
    let mut msg = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = String::new();
    while let Some(s) = src {
        last = s.to_string();
        src = s.source();
    }
    if !last.is_empty() {
        msg.push_str(": ");
        msg.push_str(&last);
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_openai_semantics() {
        let t = |s: u16, c: Option<&str>| classify(StatusCode::from_u16(s).unwrap(), None, c);
        assert_eq!(t(429, None), Retry::Transient { after: None });
        assert_eq!(t(429, Some("insufficient_quota")), Retry::Fatal);
        assert_eq!(t(503, None), Retry::Transient { after: None });
        assert_eq!(t(408, None), Retry::Transient { after: None });
        assert_eq!(t(400, None), Retry::Final);
        assert_eq!(t(401, None), Retry::Fatal);
        assert_eq!(t(404, Some("model_not_found")), Retry::Fatal);
    }

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for a in 1..20 {
            let b = backoff(a, base, max, None);
            assert!(b <= max, "{a}: {b:?}");
        }
        assert!(backoff(1, base, max, None) <= base);
        assert!(backoff(5, base, max, None) >= Duration::from_millis(800));
        let ra = Duration::from_secs(3);
        assert!(backoff(1, base, max, Some(ra)) >= ra);
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        let future = std::time::SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(future)).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
    }

    #[test]
    fn base_urls_are_normalised() {
        assert_eq!(
            normalize_base_url("http://h:8000").unwrap(),
            "http://h:8000/v1"
        );
        assert_eq!(
            normalize_base_url("http://h:8000/v1/").unwrap(),
            "http://h:8000/v1"
        );
        assert_eq!(
            normalize_base_url("https://api.x.com/openai/v1").unwrap(),
            "https://api.x.com/openai/v1"
        );
        assert!(normalize_base_url("h:8000").is_err());
        assert!(normalize_base_url("ftp://h").is_err());
    }

    #[test]
    fn fleet_routes_around_a_cooling_endpoint() {
        let f = Fleet::new(vec!["a".into(), "b".into()]);
        f.mark_failure(0, Some(Duration::from_secs(10)));
        for _ in 0..10 {
            assert_eq!(f.pick().unwrap(), 1);
        }
        f.mark_failure(1, Some(Duration::from_secs(5)));
        let wait = f.pick().unwrap_err();
        assert!(wait > Duration::from_secs(4) && wait <= Duration::from_secs(5));
    }

    #[test]
    fn api_key_debug_is_redacted() {
        let k = ApiKey::new("sk-secret".into());
        assert!(!format!("{k:?}").contains("secret"));
    }

    #[tokio::test]
    async fn rate_limiter_spaces_requests() {
        let l = RateLimiter::per_minute(600); // 10 per second, bucket of 600
        let t = Instant::now();
        l.acquire(600.0).await; // drains the bucket
        l.acquire(2.0).await; // needs 0.2 s of refill
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(180), "{e:?}");
    }
}
