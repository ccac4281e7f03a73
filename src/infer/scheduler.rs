//! Continuous batching: which sequences run in the next step, and how many of their tokens.
//!
//! Every sequence is its tokens (prompt, then what was generated) and the number of them
//! already in its KV cache; a step feeds each scheduled sequence the tokens it has not cached
//! yet: one for a sequence being decoded, a chunk of its prompt for one being prefilled. When a
//! sequence finishes, its slot and cache are freed and the next queued request is admitted in
//! the same step.
//!
//! The KV cache is bounded by a token budget (positions summed over all live sequences), not by
//! `max_tokens x sequences`: a request is admitted only when its prompt fits, and when growing
//! sequences would overflow the budget the most recently admitted one is preempted: its cache
//! is dropped and it goes back to the head of the queue with its tokens and its sampler's
//! state, to be prefilled again later. Because every row's result depends on its own tokens
//! alone (see [`super::forward`]), a preempted sequence continues exactly as it would have.

use std::collections::VecDeque;

use rayon::prelude::*;

use super::forward::{forward, Chunk, KvCache, Logits};
use super::sampler::{log_sum_exp, top_k, Sampler, TokenLogprobs};
use super::{Completion, Engine, FinishReason, Request, ScoreRequest, Scored, ScoredPosition};

/// Limits of one scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most sequences decoded together.
    pub max_seqs: usize,
    /// KV cache budget: positions cached over all live sequences.
    pub max_batch_tokens: usize,
    /// Most tokens fed to the model in one step (decode rows plus prompt chunks).
    pub max_step_tokens: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_seqs: 32,
            max_batch_tokens: 32_768,
            max_step_tokens: 512,
        }
    }
}

/// What a sequence is for.
enum Kind {
    Generate {
        sampler: Box<Sampler>,
        prompt_len: usize,
        logprobs: Vec<TokenLogprobs>,
        /// Generated text so far is checked for stop strings only past this byte.
        stop_scan: usize,
    },
    Score {
        top_k: usize,
        positions: Vec<ScoredPosition>,
        hidden: Vec<Vec<f32>>,
    },
}

struct Seq {
    id: u64,
    tokens: Vec<u32>,
    cache: KvCache,
    kind: Kind,
}

impl Seq {
    fn pending(&self) -> usize {
        self.tokens.len() - self.cache.len()
    }
}

/// A finished request.
pub enum Finished {
    /// A generation request, with its id.
    Generated(u64, Completion),
    /// A scoring request, with its id.
    Scored(u64, Scored),
}

/// The continuous-batching loop's state. Push requests at any time; each [`Scheduler::step`]
/// runs the model once and returns what finished.
pub struct Scheduler<'e> {
    engine: &'e Engine,
    cfg: BatchConfig,
    queue: VecDeque<Seq>,
    live: Vec<Seq>,
    hidden_layers: Vec<usize>,
    /// Steps run and tokens fed, for throughput reports.
    pub steps: u64,
    /// Tokens fed to the model so far (prompt and generated).
    pub tokens_fed: u64,
    /// Sequences preempted so far.
    pub preemptions: u64,
    /// Peak of the cached positions over all live sequences.
    pub peak_cached: usize,
}

impl<'e> Scheduler<'e> {
    /// An empty scheduler on `engine`. Hidden states are returned for `hidden_layers` of every
    /// scoring request.
    pub fn new(engine: &'e Engine, cfg: BatchConfig, hidden_layers: Vec<usize>) -> Self {
        Self {
            engine,
            cfg: BatchConfig {
                max_seqs: cfg.max_seqs.max(1),
                max_batch_tokens: cfg.max_batch_tokens.max(2),
                max_step_tokens: cfg.max_step_tokens.max(1),
            },
            queue: VecDeque::new(),
            live: Vec::new(),
            hidden_layers,
            steps: 0,
            tokens_fed: 0,
            preemptions: 0,
            peak_cached: 0,
        }
    }

    /// Queues a generation request under `id`.
    pub fn push(&mut self, id: u64, req: Request) {
        let prompt_len = req.prompt.len();
        self.queue.push_back(Seq {
            id,
            tokens: req.prompt,
            cache: KvCache::new(self.engine.weights.dims().layers),
            kind: Kind::Generate {
                sampler: Box::new(Sampler::new(req.params)),
                prompt_len,
                logprobs: Vec::new(),
                stop_scan: 0,
            },
        });
    }

    /// Queues a teacher-forced scoring request under `id`.
    pub fn push_score(&mut self, id: u64, req: ScoreRequest) {
        self.queue.push_back(Seq {
            id,
            tokens: req.tokens,
            cache: KvCache::new(self.engine.weights.dims().layers),
            kind: Kind::Score {
                top_k: req.top_k,
                positions: Vec::new(),
                hidden: vec![Vec::new(); self.hidden_layers.len()],
            },
        });
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.live.is_empty()
    }

    /// Sequences running now.
    pub fn live(&self) -> usize {
        self.live.len()
    }

    fn cached(&self) -> usize {
        self.live.iter().map(|s| s.cache.len()).sum()
    }

    /// Requests that can never run: empty, or longer than the model's positions or the budget.
    fn reject(&self, s: &Seq) -> Option<Finished> {
        let max_pos = self.engine.weights.max_positions;
        let why = if s.tokens.is_empty() {
            Some("empty prompt".to_string())
        } else if s.tokens.len() >= max_pos {
            Some(format!(
                "{} tokens reach the model's {max_pos} positions",
                s.tokens.len()
            ))
        } else if s.tokens.len() + 1 > self.cfg.max_batch_tokens {
            Some(format!(
                "{} tokens exceed the KV budget of {} (raise --max-batch-tokens)",
                s.tokens.len(),
                self.cfg.max_batch_tokens
            ))
        } else {
            s.tokens
                .iter()
                .find(|&&t| t as usize >= self.engine.weights.dims().vocab)
                .map(|t| format!("token id {t} is outside the vocabulary"))
        };
        why.map(|msg| match &s.kind {
            Kind::Generate { prompt_len, .. } => Finished::Generated(
                s.id,
                Completion {
                    tokens: Vec::new(),
                    text: String::new(),
                    finish_reason: FinishReason::Error(msg),
                    prompt_tokens: *prompt_len,
                    logprobs: Vec::new(),
                },
            ),
            Kind::Score { .. } => Finished::Scored(
                s.id,
                Scored {
                    positions: Vec::new(),
                    hidden: Vec::new(),
                    error: Some(msg),
                },
            ),
        })
    }

    /// Runs one step: admits, schedules, runs the model, samples. Returns what finished.
    pub fn step(&mut self) -> Vec<Finished> {
        let mut done = Vec::new();
        // Admit while slots and budget allow.
        while self.live.len() < self.cfg.max_seqs {
            let Some(s) = self.queue.front() else { break };
            if let Some(f) = self.reject(s) {
                done.push(f);
                self.queue.pop_front();
                continue;
            }
            if self.cached() + s.tokens.len() + 1 > self.cfg.max_batch_tokens
                && !self.live.is_empty()
            {
                break;
            }
            let Some(s) = self.queue.pop_front() else {
                break;
            };
            self.live.push(s);
        }
        if self.live.is_empty() {
            return done;
        }
        // Plan the step: decode rows first, then prompt chunks, within the step budget.
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let mut room = self.cfg.max_step_tokens;
        for (i, s) in self.live.iter().enumerate() {
            if s.pending() == 1 && room > 0 {
                plan.push((i, 1));
                room -= 1;
            }
        }
        for (i, s) in self.live.iter().enumerate() {
            let p = s.pending();
            if p > 1 && room > 0 {
                let n = p.min(room);
                plan.push((i, n));
                room -= n;
            }
        }
        // Keep the cache within budget: preempt the newest sequences until the step fits.
        loop {
            let need: usize = plan.iter().map(|&(_, n)| n).sum();
            if self.cached() + need <= self.cfg.max_batch_tokens || self.live.len() <= 1 {
                break;
            }
            let Some(mut victim) = self.live.pop() else {
                break;
            };
            let vi = self.live.len();
            plan.retain(|&(i, _)| i != vi);
            victim.cache.clear();
            self.preemptions += 1;
            self.queue.push_front(victim);
        }
        plan.sort_unstable();
        let mut caches: Vec<KvCache> = self
            .live
            .iter_mut()
            .map(|s| std::mem::take(&mut s.cache))
            .collect();
        let chunks: Vec<Chunk<'_>> = plan
            .iter()
            .map(|&(i, n)| {
                let s = &self.live[i];
                let start = caches[i].len();
                let completes = start + n == s.tokens.len();
                let logits = match (&s.kind, completes) {
                    (Kind::Score { .. }, _) => Logits::All,
                    (Kind::Generate { .. }, true) => Logits::Last,
                    (Kind::Generate { .. }, false) => Logits::None,
                };
                Chunk {
                    cache: i,
                    tokens: &s.tokens[start..start + n],
                    logits,
                    hidden: matches!(s.kind, Kind::Score { .. }),
                }
            })
            .collect();
        let chunk_meta: Vec<(usize, usize, Logits)> = plan
            .iter()
            .zip(&chunks)
            .map(|(&(i, n), c)| (i, n, c.logits))
            .collect();
        let out = forward(
            &self.engine.weights,
            &chunks,
            &mut caches,
            &self.hidden_layers,
        );
        drop(chunks);
        for (s, c) in self.live.iter_mut().zip(caches) {
            s.cache = c;
        }
        self.steps += 1;
        self.tokens_fed += chunk_meta.iter().map(|m| m.1 as u64).sum::<u64>();
        self.peak_cached = self.peak_cached.max(self.cached());

        // Hand each chunk its logits (and hidden rows).
        let vocab = self.engine.weights.dims().vocab;
        let hsize = self.engine.weights.dims().hidden;
        let mut lrow = 0;
        let mut hrow = 0;
        let mut work: Vec<(usize, &[f32], usize)> = Vec::new();
        for &(i, n, logits) in &chunk_meta {
            let rows = match logits {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => n,
            };
            let hrows = if matches!(self.live[i].kind, Kind::Score { .. }) {
                n
            } else {
                0
            };
            work.push((i, &out.logits[lrow * vocab..(lrow + rows) * vocab], hrow));
            lrow += rows;
            hrow += hrows;
        }
        let engine = self.engine;
        let hidden = &out.hidden;
        let mut by_seq: Vec<Option<(&[f32], usize)>> = vec![None; self.live.len()];
        for (i, l, h) in work {
            by_seq[i] = Some((l, h));
        }
        let n_fed: Vec<usize> = {
            let mut v = vec![0; self.live.len()];
            for &(i, n, _) in &chunk_meta {
                v[i] = n;
            }
            v
        };
        let finished: Vec<Option<Finished>> = self
            .live
            .par_iter_mut()
            .zip(by_seq.into_par_iter())
            .zip(n_fed.into_par_iter())
            .map(|((s, slot), n)| {
                let (logits, hstart) = slot?;
                advance(engine, s, logits, hidden, hstart, n, vocab, hsize)
            })
            .collect();
        let mut keep = Vec::with_capacity(self.live.len());
        for (s, f) in std::mem::take(&mut self.live).into_iter().zip(finished) {
            match f {
                Some(f) => done.push(f),
                None => keep.push(s),
            }
        }
        self.live = keep;
        done
    }
}

/// Applies one step's results to a sequence; returns its result when it is finished.
#[allow(clippy::too_many_arguments)]
fn advance(
    engine: &Engine,
    s: &mut Seq,
    logits: &[f32],
    hidden: &[Vec<f32>],
    hstart: usize,
    fed: usize,
    vocab: usize,
    hsize: usize,
) -> Option<Finished> {
    let pending = s.pending();
    match &mut s.kind {
        Kind::Score {
            top_k: k,
            positions,
            hidden: hs,
        } => {
            let start = s.cache.len() - fed;
            for (r, row) in logits.chunks(vocab).enumerate() {
                let pos = start + r;
                let lse = log_sum_exp(row);
                let next = s.tokens.get(pos + 1).copied();
                positions.push(ScoredPosition {
                    next_token: next,
                    logprob: next.map(|t| row[t as usize] - lse),
                    log_sum_exp: lse,
                    top: top_k(row, *k)
                        .into_iter()
                        .map(|(i, v)| (i, v - lse))
                        .collect(),
                });
            }
            for (dst, src) in hs.iter_mut().zip(hidden) {
                dst.extend_from_slice(&src[hstart * hsize..(hstart + fed) * hsize]);
            }
            if pending == 0 {
                // The last position predicts past the sequence: keep only real targets.
                positions.pop();
                return Some(Finished::Scored(
                    s.id,
                    Scored {
                        positions: std::mem::take(positions),
                        hidden: std::mem::take(hs),
                        error: None,
                    },
                ));
            }
            None
        }
        Kind::Generate {
            sampler,
            prompt_len,
            logprobs,
            stop_scan,
        } => {
            if logits.is_empty() {
                return None;
            }
            let (tok, lp) = sampler.sample(logits);
            let generated = s.tokens.len() - *prompt_len;
            let params = sampler.params();
            let finish = if !params.ignore_eos && engine.eos.contains(&tok) {
                Some(FinishReason::Stop)
            } else {
                s.tokens.push(tok);
                if let Some(lp) = lp.clone() {
                    logprobs.push(lp);
                }
                None
            };
            if finish.is_some() {
                if let Some(lp) = lp {
                    logprobs.push(lp);
                }
            }
            let mut text_cut = None;
            let finish = finish.or_else(|| {
                if !params.stop.is_empty() {
                    let text = engine.decode(&s.tokens[*prompt_len..]);
                    let from = floor_char(&text, *stop_scan);
                    let hit = params
                        .stop
                        .iter()
                        .filter(|st| !st.is_empty())
                        .filter_map(|st| text[from..].find(st.as_str()).map(|p| p + from))
                        .min();
                    if let Some(at) = hit {
                        text_cut = Some(text[..at].to_string());
                        return Some(FinishReason::Stop);
                    }
                    let longest = params.stop.iter().map(String::len).max().unwrap_or(0);
                    *stop_scan = text.len().saturating_sub(longest + 8);
                }
                if generated + 1 >= params.max_tokens.max(1)
                    || s.tokens.len() + 1 >= engine.weights.max_positions
                {
                    return Some(FinishReason::Length);
                }
                None
            });
            let finish = finish?;
            let tokens = s.tokens[*prompt_len..].to_vec();
            let text = match text_cut {
                Some(t) => t,
                None => engine.decode(&tokens),
            };
            Some(Finished::Generated(
                s.id,
                Completion {
                    tokens,
                    text,
                    finish_reason: finish,
                    prompt_tokens: *prompt_len,
                    logprobs: std::mem::take(logprobs),
                },
            ))
        }
    }
}

/// The largest char boundary of `s` at or below `i`.
fn floor_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
