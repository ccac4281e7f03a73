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

/// `ln sum exp(row)`, accumulated in f64.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let s: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
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
/// Only tokens within `e^-40` of the most likely one are sorted: the others cannot enter a
/// nucleus before the sorted ones have covered all but a `vocab * e^-40` sliver of the mass,
/// and are walked in index order in the (never seen in practice) case that they must.
pub fn draw(logits: &[f32], temperature: f64, top_k_n: usize, top_p: f64, u: f64) -> (u32, f32) {
    let t = temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weight = |v: f32| ((v as f64 - max) / t).exp();
    const CUT: f64 = -40.0;
    let mut cand: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, &v)| (v as f64 - max) / t > CUT)
        .map(|(i, &v)| (i as u32, weight(v)))
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let full: f64 = logits.iter().map(|&v| weight(v)).sum();
    let mut keep = cand.len();
    if top_k_n > 0 {
        keep = keep.min(top_k_n);
    }
    let mut nucleus_complete = top_k_n > 0 && top_k_n <= cand.len();
    if top_p < 1.0 {
        let mut acc = 0.0;
        for (i, (_, w)) in cand.iter().enumerate().take(keep) {
            acc += w / full;
            if acc >= top_p {
                keep = i + 1;
                nucleus_complete = true;
                break;
            }
        }
    }
    if !nucleus_complete && top_k_n == 0 && top_p >= 1.0 {
        // Plain temperature sampling: the whole vocabulary, in index order.
        let target = u * full;
        let mut acc = 0.0;
        let mut last = 0;
        for (i, &v) in logits.iter().enumerate() {
            let w = weight(v);
            if w <= 0.0 {
                continue;
            }
            acc += w;
            last = i;
            if acc > target {
                return (i as u32, (w / full).ln() as f32);
            }
        }
        return (last as u32, (weight(logits[last]) / full).ln() as f32);
    }
    let kept = &cand[..keep.max(1)];
    let total: f64 = kept.iter().map(|c| c.1).sum();
    let target = u * total;
    let mut acc = 0.0;
    for &(i, w) in kept {
        acc += w;
        if acc > target {
            return (i, (w / total).ln() as f32);
        }
    }
    let (i, w) = kept[kept.len() - 1];
    (i, (w / total).ln() as f32)
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
