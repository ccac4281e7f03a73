//! Turning one row of logits into a token, and the log-probabilities that go with it.
//!
//! Two distributions are involved and both are reported, in nats:
//! - the **model's** distribution, `log_softmax(logits)` before temperature, top-k or top-p:
//!   what response distillation wants as soft labels and what a teacher-forced scoring of the
//!   same tokens returns;
//! - the **sampling** distribution the token was actually drawn from: logits divided by the
//!   temperature, cut to the top-k and to the top-p nucleus, renormalised. Greedy decoding
//!   puts all of its mass on the argmax (log-probability 0).
//!
//! Every sequence draws from its own generator seeded by its request, so a seed gives the same
//! text whatever else is decoded in the same batch.

use rand::rngs::StdRng;

use crate::kernels::ops::fast_exp;
use rand::{Rng, SeedableRng};

/// How to pick tokens, and what to report about them.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; at or below `1e-7` decoding is greedy.
    pub temperature: f64,
    /// Nucleus mass in `(0, 1]` (1: off).
    pub top_p: f64,
    /// Keep only the `top_k` most likely tokens (0: off).
    pub top_k: usize,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end generation; the completion stops before the first one.
    pub stop: Vec<String>,
    /// Seed of this sequence's generator; `None` draws one from the OS.
    pub seed: Option<u64>,
    /// Alternatives (of the model's distribution) to report per generated token; 0 reports
    /// none, and log-probabilities are then not computed at all.
    pub top_logprobs: usize,
    /// Report the chosen token's log-probabilities even with `top_logprobs == 0`.
    pub logprobs: bool,
    /// Keep going past end-of-sequence tokens (benchmarks that need fixed lengths).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            max_tokens: 256,
            stop: Vec::new(),
            seed: None,
            top_logprobs: 0,
            logprobs: false,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Whether decoding is greedy.
    pub fn greedy(&self) -> bool {
        self.temperature <= 1e-7
    }
}

/// Log-probabilities of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The token.
    pub token: u32,
    /// `ln p(token)` under the model's distribution (before temperature).
    pub logprob: f32,
    /// `ln p(token)` under the distribution it was sampled from.
    pub sampling_logprob: f32,
    /// The most likely tokens of the model's distribution with their log-probabilities,
    /// most likely first.
    pub top: Vec<(u32, f32)>,
}

/// `ln sum exp(row)`: the shift by the maximum, then the vectorised `exp` of the trainer's
/// kernels summed in 16 lanes (a libm `exp` per entry was a tenth of a scoring pass over a
/// 49k vocabulary). Relative error of the sum: a few units in 1e-7.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| fast_exp(v - max)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += fast_exp(v - max);
        }
    }
    let s = acc.iter().map(|&a| a as f64).sum::<f64>() + tail as f64;
    max + s.ln() as f32
}

/// The `k` largest entries of `row` as `(index, value)`, largest first; ties go to the lower
/// index.
pub fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(row.len());
    if k == 0 {
        return Vec::new();
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in row.iter().enumerate() {
        if best.len() == k && v <= best[k - 1].1 {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= v);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    }
    best
}

/// Index of the largest logit (the lowest index among equals).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// A sequence's sampler: its parameters and its own generator.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `params.seed` (or from the OS when there is none).
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` and, when asked for, its log-probabilities.
    pub fn sample(&mut self, logits: &[f32]) -> (u32, Option<TokenLogprobs>) {
        let p = &self.params;
        let (token, sampling_logprob) = if p.greedy() {
            (argmax(logits), 0.0)
        } else {
            let u: f64 = self.rng.random();
            draw(logits, p.temperature, p.top_k, p.top_p, u)
        };
        let report = p.logprobs || p.top_logprobs > 0;
        let lp = report.then(|| {
            let lse = log_sum_exp(logits);
            TokenLogprobs {
                token,
                logprob: logits[token as usize] - lse,
                sampling_logprob,
                top: top_k(logits, p.top_logprobs)
                    .into_iter()
                    .map(|(i, v)| (i, v - lse))
                    .collect(),
            }
        });
        (token, lp)
    }
}

/// Draws a token with the uniform `u` in `[0, 1)` from `softmax(logits / temperature)` cut to
/// the top-k and the top-p nucleus; returns it with its log-probability under that
/// distribution.
///
/// The nucleus is found without sorting the vocabulary: the 64 most likely tokens are
/// selected (linear time) and sorted, and only when they cover less than `top_p` are the 512,
/// then 4096, ... most likely taken. Ties go to the lower token id, so a draw depends on the
/// logits and `u` alone.
pub fn draw(logits: &[f32], temperature: f64, top_k_n: usize, top_p: f64, u: f64) -> (u32, f32) {
    let n = logits.len();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv_t = (1.0 / temperature) as f32;
    let w: Vec<f32> = logits
        .iter()
        .map(|&v| fast_exp((v - max) * inv_t))
        .collect();
    let full: f64 = {
        const LANES: usize = 16;
        let mut acc = [0f32; LANES];
        let chunks = w.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += v;
            }
        }
        acc.iter().map(|&a| a as f64).sum::<f64>() + tail as f64
    };
    if top_k_n == 0 && top_p >= 1.0 {
        // Plain temperature sampling: the whole vocabulary, in index order.
        let target = u * full;
        let mut acc = 0.0;
        let mut last = 0;
        for (i, &wi) in w.iter().enumerate() {
            if wi <= 0.0 {
                continue;
            }
            acc += wi as f64;
            last = i;
            if acc > target {
                return (i as u32, (wi as f64 / full).ln() as f32);
            }
        }
        return (last as u32, (w[last] as f64 / full).ln() as f32);
    }
    let order = |a: &u32, b: &u32| w[*b as usize].total_cmp(&w[*a as usize]).then(a.cmp(b));
    let mut k = 64usize;
    let kept: Vec<u32> = loop {
        let k_eff = k.min(n);
        let mut idx: Vec<u32> = (0..n as u32).collect();
        if k_eff < n {
            idx.select_nth_unstable_by(k_eff - 1, order);
            idx.truncate(k_eff);
        }
        idx.sort_unstable_by(order);
        let limit = if top_k_n > 0 {
            top_k_n.min(k_eff)
        } else {
            k_eff
        };
        let mut acc = 0.0;
        let mut cut = None;
        if top_p < 1.0 {
            for (i, &t) in idx[..limit].iter().enumerate() {
                acc += w[t as usize] as f64 / full;
                if acc >= top_p {
                    cut = Some(i + 1);
                    break;
                }
            }
        }
        let complete = cut.is_some() || (top_k_n > 0 && top_k_n <= k_eff) || k_eff == n;
        if complete {
            idx.truncate(cut.unwrap_or(limit).max(1));
            break idx;
        }
        k *= 8;
    };
    let total: f64 = kept.iter().map(|&t| w[t as usize] as f64).sum();
    let target = u * total;
    let mut acc = 0.0;
    for &t in &kept {
        let wt = w[t as usize] as f64;
        acc += wt;
        if acc > target {
            return (t, (wt / total).ln() as f32);
        }
    }
    let t = kept[kept.len() - 1];
    (t, (w[t as usize] as f64 / total).ln() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        let row = [0.5, 2.0, -1.0, 2.0, 1.0];
        assert_eq!(top_k(&row, 3), vec![(1, 2.0), (3, 2.0), (4, 1.0)]);
        assert_eq!(top_k(&row, 0), vec![]);
        assert_eq!(top_k(&row, 9).len(), 5);
        assert_eq!(argmax(&row), 1);
    }

    #[test]
    fn log_sum_exp_matches_the_definition() {
        let row = [1.0f32, 2.0, 3.0];
        let direct = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln() as f32;
        assert!((log_sum_exp(&row) - direct).abs() < 1e-6);
    }

    #[test]
    fn top_k_and_top_p_cut_the_distribution() {
        // Probabilities at T = 1: roughly 0.64, 0.24, 0.09, 0.03.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        for u in [0.0, 0.3, 0.6, 0.99] {
            let (tok, _) = draw(&logits, 1.0, 1, 1.0, u);
            assert_eq!(tok, 0, "top-k 1 is greedy");
        }
        // top-p 0.5: the first token alone covers it.
        let (tok, lp) = draw(&logits, 1.0, 0, 0.5, 0.9);
        assert_eq!((tok, lp), (0, 0.0));
        // top-p 0.8: the first two (0.64 + 0.24), renormalised.
        let (tok, lp) = draw(&logits, 1.0, 0, 0.8, 0.99);
        assert_eq!(tok, 1);
        let p1 = (2f64.exp()) / (3f64.exp() + 2f64.exp());
        assert!((lp as f64 - p1.ln()).abs() < 1e-6);
        // Plain sampling reaches the last token for u near 1.
        let (tok, lp) = draw(&logits, 1.0, 0, 1.0, 0.999);
        assert_eq!(tok, 3);
        assert!((lp - (0.0 - log_sum_exp(&logits))).abs() < 1e-5);
    }

    #[test]
    fn seeded_samplers_repeat_and_differ() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let params = |seed| SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        let run = |seed| {
            let mut s = Sampler::new(params(seed));
            (0..32).map(|_| s.sample(&logits).0).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
