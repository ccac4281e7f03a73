//! Response distillation: the divergence between the teacher's next-token distribution and
//! the student's, per supervised position, with its gradient with respect to the student's
//! logits written analytically (as the cross-entropy's is in [`super::loss`]).
//!
//! The teacher is known only through its top-k log-probabilities (nats, temperature 1,
//! normalised over its whole vocabulary), so the mass outside the top-k is known too. Both
//! distributions are compared over `k + 1` buckets: the top-k tokens one by one, and a *tail
//! bucket* holding every other token. This keeps the divergence exact for what is known and
//! never invents where the missing mass went (renormalising the top-k, as most tools do,
//! claims the teacher puts zero mass outside them).
//!
//! Temperature `T` softens both distributions: the student's logits are divided by `T`, the
//! teacher's top-k log-probabilities too. The teacher's tail bucket at `T` depends on how its
//! mass is spread over the tail's tokens, which is not stored; it is taken to be spread as the
//! student spreads its own tail: the teacher's tail weight at `T` is
//! `m^(1/T) · Σ_tail e^(z/T) / (Σ_tail e^z)^(1/T)` for tail mass `m` and student logits `z`,
//! held constant in the gradient (the teacher is the target). At `T = 1` this is exactly `m`;
//! a student that equals its teacher has divergence 0 at every temperature. (Spreading the
//! tail evenly instead overstates it for `T > 1`, by Jensen's inequality: a model distilled
//! from itself at `T = 2` then showed a divergence of 0.42 nats.) The divergence is multiplied
//! by `T²` so that gradients keep their size across temperatures (Hinton et al., 2015).
//!
//! Divergences, all over the buckets `b` with teacher `p` and student `q`:
//! - forward KL, `KL(p ‖ q) = Σ p_b ln(p_b / q_b)`: mean-seeking, the classic KD loss;
//! - reverse KL, `KL(q ‖ p)`: mode-seeking (MiniLLM);
//! - generalised JSD(β) with the mixture `m = β p + (1 − β) q`:
//!   `β KL(p ‖ m) + (1 − β) KL(q ‖ m)`; as in TRL's GKD, β = 0 means forward KL and β = 1
//!   reverse KL (the limits, up to scale).
//!
//! For any of them, with `g_b = ∂D/∂q_b` and `s = z / T`, the gradient with respect to the
//! scaled logits is `∂D/∂s_l = q_l (g_{b(l)} − Σ_b q_b g_b)`.

use serde::{Deserialize, Serialize};

/// Floor for a bucket probability inside a logarithm: a teacher that puts (numerically) no
/// mass on a bucket the student does makes reverse KL infinite; this bounds it at ~28 nats.
const P_FLOOR: f64 = 1e-12;

/// Which divergence between teacher and student distributions is minimised.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    /// `KL(teacher ‖ student)`.
    Forward,
    /// `KL(student ‖ teacher)`.
    Reverse,
    /// Generalised Jensen-Shannon divergence with mixture weight `beta` on the teacher.
    Jsd,
}

impl std::str::FromStr for Divergence {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "forward" | "forward_kl" | "kl" => Ok(Self::Forward),
            "reverse" | "reverse_kl" => Ok(Self::Reverse),
            "jsd" => Ok(Self::Jsd),
            other => Err(format!(
                "unknown divergence `{other}` (expected forward, reverse or jsd)"
            )),
        }
    }
}

/// How the divergence term is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdSpec {
    /// Which divergence.
    pub divergence: Divergence,
    /// JSD mixture weight on the teacher (0 = forward KL, 1 = reverse KL).
    pub beta: f64,
    /// Softmax temperature applied to both distributions; the divergence is scaled by `T²`.
    pub temperature: f64,
}

impl Default for KdSpec {
    fn default() -> Self {
        Self {
            divergence: Divergence::Forward,
            beta: 0.5,
            temperature: 1.0,
        }
    }
}

/// The teacher's top-k at every supervised position of a batch, in the order of the batch's
/// targets: `k` entries per row, padded with [`SoftRows::PAD`] ids when a row has fewer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SoftRows {
    /// Entries per row.
    pub k: usize,
    /// `rows x k` token ids.
    pub ids: Vec<u32>,
    /// `rows x k` log-probabilities (nats, temperature 1, normalised over the teacher's
    /// whole vocabulary).
    pub logprobs: Vec<f32>,
    /// Per row, the log of the teacher's mass outside the row's entries.
    pub log_tail: Vec<f32>,
}

impl SoftRows {
    /// Id of an unused entry.
    pub const PAD: u32 = u32::MAX;

    /// Empty rows with `k` entries each.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            ..Self::default()
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len().checked_div(self.k).unwrap_or(0)
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Appends one row (at most `k` entries; the rest is padding) with the log of the mass
    /// outside them (computed from the entries when not given).
    pub fn push(&mut self, entries: impl IntoIterator<Item = (u32, f32)>, log_tail: Option<f32>) {
        let mut n = 0;
        let mut inside = 0f64;
        for (id, lp) in entries.into_iter().take(self.k) {
            self.ids.push(id);
            self.logprobs.push(lp);
            inside += f64::from(lp).exp();
            n += 1;
        }
        self.log_tail
            .push(log_tail.unwrap_or_else(|| ((1.0 - inside).max(0.0) as f32).ln()));
        for _ in n..self.k {
            self.ids.push(Self::PAD);
            self.logprobs.push(f32::NEG_INFINITY);
        }
    }

    /// Row `i` as `(ids, logprobs)`.
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let r = i * self.k..(i + 1) * self.k;
        (&self.ids[r.clone()], &self.logprobs[r])
    }
}

/// `ln Σ exp(xs)` in f64.
fn lse(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + xs.map(|x| (x - max).exp()).sum::<f64>().ln()
}

/// The teacher's bucket probabilities at temperature `t`: the top-k entries of the row
/// (padding skipped) and then the tail bucket of mass `exp(log_tail)` at temperature 1, spread
/// over the tail's tokens as the student's `logits` spread theirs (see the module
/// documentation). Returns `(bucket token ids, probabilities)`; the last probability is the
/// tail's.
pub fn teacher_buckets(
    ids: &[u32],
    logprobs: &[f32],
    log_tail: f32,
    logits: &[f32],
    t: f64,
) -> (Vec<u32>, Vec<f64>) {
    let mut kept = Vec::with_capacity(ids.len());
    let mut logw = Vec::with_capacity(ids.len() + 1);
    for (&id, &lp) in ids.iter().zip(logprobs) {
        if id == SoftRows::PAD || !lp.is_finite() {
            continue;
        }
        kept.push(id);
        logw.push(f64::from(lp) / t);
    }
    let n_tail = logits.len().saturating_sub(kept.len());
    let tail = if n_tail == 0 || !log_tail.is_finite() {
        f64::NEG_INFINITY
    } else if t == 1.0 {
        f64::from(log_tail)
    } else {
        // ln Σ_tail e^(z/T) − ln(Σ_tail e^z) / T, each as a full sum minus the top entries.
        let tail_lse = |scale: f64| {
            let max = f64::from(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max)) * scale;
            let all: f64 = logits
                .iter()
                .map(|&v| (f64::from(v) * scale - max).exp())
                .sum();
            let top: f64 = kept
                .iter()
                .map(|&id| (f64::from(logits[id as usize]) * scale - max).exp())
                .sum();
            max + (all - top).max(all * 1e-300).ln()
        };
        f64::from(log_tail) / t + tail_lse(1.0 / t) - tail_lse(1.0) / t
    };
    logw.push(tail);
    let z = lse(logw.iter().copied());
    (kept, logw.into_iter().map(|w| (w - z).exp()).collect())
}

/// The divergence `D(p, q)` over buckets and its partial derivatives `g_b = ∂D/∂q_b`.
pub fn divergence(spec: &KdSpec, p: &[f64], q: &[f64]) -> (f64, Vec<f64>) {
    let ln = |x: f64| x.max(P_FLOOR).ln();
    let (mode, beta) = match spec.divergence {
        Divergence::Jsd if spec.beta <= 0.0 => (Divergence::Forward, 0.0),
        Divergence::Jsd if spec.beta >= 1.0 => (Divergence::Reverse, 1.0),
        d => (d, spec.beta),
    };
    let mut d = 0.0;
    let mut g = Vec::with_capacity(p.len());
    for (&pb, &qb) in p.iter().zip(q) {
        match mode {
            Divergence::Forward => {
                if pb > 0.0 {
                    d += pb * (ln(pb) - ln(qb));
                }
                g.push(-pb / qb.max(P_FLOOR));
            }
            Divergence::Reverse => {
                if qb > 0.0 {
                    d += qb * (ln(qb) - ln(pb));
                }
                g.push(ln(qb) - ln(pb) + 1.0);
            }
            Divergence::Jsd => {
                let m = beta * pb + (1.0 - beta) * qb;
                if pb > 0.0 {
                    d += beta * pb * (ln(pb) - ln(m));
                }
                if qb > 0.0 {
                    d += (1.0 - beta) * qb * (ln(qb) - ln(m));
                }
                g.push((1.0 - beta) * (ln(qb) - ln(m)));
            }
        }
    }
    (d, g)
}

/// The distillation loss of one position: `T² · D(teacher_T, student_T)` over the teacher's
/// top-k buckets and the tail bucket, from the student's raw `logits` (the full vocabulary).
///
/// When `grad` is given, `scale · ∂(T² D)/∂logits` is *added* to it.
pub fn kd_row(
    spec: &KdSpec,
    logits: &[f32],
    teacher: (&[u32], &[f32], f32),
    grad: Option<(&mut [f32], f32)>,
) -> f64 {
    let (ids, logprobs, log_tail) = teacher;
    let (top, p) = teacher_buckets(ids, logprobs, log_tail, logits, spec.temperature);
    kd_against(spec, logits, (&top, &p), grad)
}

/// [`kd_row`] against given teacher buckets (`top` ids, then `p` with the tail last), held
/// constant.
pub fn kd_against(
    spec: &KdSpec,
    logits: &[f32],
    teacher: (&[u32], &[f64]),
    grad: Option<(&mut [f32], f32)>,
) -> f64 {
    let (top, p) = teacher;
    let t = spec.temperature;
    // Student at temperature t, over the whole vocabulary, in f64 sums.
    let inv_t = (1.0 / t) as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) * inv_t;
    let mut z = 0.0f64;
    for &v in logits {
        z += f64::from((v * inv_t - max).exp());
    }
    let q_of = |id: u32| f64::from((logits[id as usize] * inv_t - max).exp()) / z;
    let mut q: Vec<f64> = top.iter().map(|&id| q_of(id)).collect();
    let inside: f64 = q.iter().sum();
    q.push((1.0 - inside).max(0.0));
    let (d, g) = divergence(spec, p, &q);
    if let Some((grad, scale)) = grad {
        let mean: f64 = q.iter().zip(&g).map(|(qb, gb)| qb * gb).sum();
        let k = (f64::from(scale) * t) as f32; // T² · (1/T) from s = z / T.
        let g_tail = (g[g.len() - 1] - mean) as f32;
        let iz = (1.0 / z) as f32;
        for (dst, &v) in grad.iter_mut().zip(logits) {
            *dst += k * ((v * inv_t - max).exp() * iz) * g_tail;
        }
        for (b, &id) in top.iter().enumerate() {
            let ql = q[b] as f32;
            // Undo the tail's contribution added above, then add the token's own.
            grad[id as usize] += k * ql * ((g[b] - mean) as f32 - g_tail);
        }
    }
    t * t * d
}

/// Feature-matching losses between student and teacher hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureLoss {
    /// Mean squared error per element.
    Mse,
    /// `1 − cos` per position.
    Cosine,
}

impl std::str::FromStr for FeatureLoss {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mse" => Ok(Self::Mse),
            "cosine" | "cos" => Ok(Self::Cosine),
            other => Err(format!(
                "unknown feature loss `{other}` (expected mse or cosine)"
            )),
        }
    }
}

/// Student layer → teacher layer pairs: the student's `n_student` decoder layers mapped evenly
/// onto the teacher's `n_teacher` (the last to the last), `count` of them spread over depth.
pub fn uniform_layer_pairs(
    n_student: usize,
    n_teacher: usize,
    count: usize,
) -> Vec<(usize, usize)> {
    let count = count.clamp(1, n_student.max(1));
    (1..=count)
        .map(|i| {
            let s = (i * n_student).div_ceil(count) - 1;
            let t = ((s + 1) * n_teacher).div_ceil(n_student) - 1;
            (s, t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(divergence: Divergence, beta: f64, temperature: f64) -> KdSpec {
        KdSpec {
            divergence,
            beta,
            temperature,
        }
    }

    /// The log of the mass outside `lps`.
    fn tail(lps: &[f32]) -> f32 {
        ((1.0 - lps.iter().map(|l| f64::from(*l).exp()).sum::<f64>()).max(0.0) as f32).ln()
    }

    fn softmax(xs: &[f64]) -> Vec<f64> {
        let z = lse(xs.iter().copied());
        xs.iter().map(|x| (x - z).exp()).collect()
    }

    /// A 5-token vocabulary, teacher top-2 = tokens {3, 0} with probabilities 0.5 and 0.3; the
    /// tail bucket {1, 2, 4} holds 0.2. Values computed by hand below.
    fn case() -> (Vec<f32>, Vec<u32>, Vec<f32>) {
        let logits = vec![1.0f32, -0.5, 0.25, 2.0, 0.0];
        (logits, vec![3, 0], vec![0.5f32.ln(), 0.3f32.ln()])
    }

    #[test]
    fn forward_kl_with_tail_bucket_by_hand() {
        let (logits, ids, lps) = case();
        let q = softmax(&logits.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
        let (q3, q0) = (q[3], q[0]);
        let qt = q[1] + q[2] + q[4];
        let want = 0.5 * (0.5 / q3).ln() + 0.3 * (0.3 / q0).ln() + 0.2 * (0.2 / qt).ln();
        let got = kd_row(
            &spec(Divergence::Forward, 0.0, 1.0),
            &logits,
            (&ids, &lps, tail(&lps)),
            None,
        );
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        let want_r = q3 * (q3 / 0.5).ln() + q0 * (q0 / 0.3).ln() + qt * (qt / 0.2).ln();
        let got_r = kd_row(
            &spec(Divergence::Reverse, 0.0, 1.0),
            &logits,
            (&ids, &lps, tail(&lps)),
            None,
        );
        assert!((got_r - want_r).abs() < 1e-6, "{got_r} vs {want_r}");
    }

    #[test]
    fn temperature_scales_by_t_squared_with_the_students_tail_shape() {
        let (logits, ids, lps) = case();
        let t = 2.0f64;
        // Teacher at T: top entries p^(1/T); the tail's 0.2 spread over tokens {1, 2, 4} as
        // the student spreads its own tail, each share ^(1/T).
        let z: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
        let tail_sum: f64 = [1, 2, 4].iter().map(|&i| z[i].exp()).sum();
        let tail_t: f64 = [1, 2, 4]
            .iter()
            .map(|&i| (0.2 * z[i].exp() / tail_sum).powf(1.0 / t))
            .sum();
        let w = [0.5f64.powf(1.0 / t), 0.3f64.powf(1.0 / t), tail_t];
        let zw: f64 = w.iter().sum();
        let p: Vec<f64> = w.iter().map(|x| x / zw).collect();
        let q = softmax(&logits.iter().map(|&v| f64::from(v) / t).collect::<Vec<_>>());
        let qb = [q[3], q[0], q[1] + q[2] + q[4]];
        let kl: f64 = p.iter().zip(&qb).map(|(p, q)| p * (p / q).ln()).sum();
        let got = kd_row(
            &spec(Divergence::Forward, 0.0, t),
            &logits,
            (&ids, &lps, tail(&lps)),
            None,
        );
        assert!((got - t * t * kl).abs() < 1e-6, "{got} vs {}", t * t * kl);
    }

    #[test]
    fn jsd_at_beta_0_half_1() {
        let (logits, ids, lps) = case();
        let q = softmax(&logits.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
        let qb = [q[3], q[0], q[1] + q[2] + q[4]];
        let p = [0.5, 0.3, 0.2];
        let kl =
            |a: &[f64], b: &[f64]| -> f64 { a.iter().zip(b).map(|(x, y)| x * (x / y).ln()).sum() };
        let m: Vec<f64> = p.iter().zip(&qb).map(|(p, q)| 0.5 * p + 0.5 * q).collect();
        let want_half = 0.5 * kl(&p, &m) + 0.5 * kl(&qb, &m);
        let run = |beta| {
            kd_row(
                &spec(Divergence::Jsd, beta, 1.0),
                &logits,
                (&ids, &lps, tail(&lps)),
                None,
            )
        };
        assert!((run(0.5) - want_half).abs() < 1e-6);
        assert!(
            (run(0.0) - kl(&p, &qb)).abs() < 1e-6,
            "beta 0 is forward KL"
        );
        assert!(
            (run(1.0) - kl(&qb, &p)).abs() < 1e-6,
            "beta 1 is reverse KL"
        );
        // JSD(0.5) is bounded by ln 2.
        assert!(want_half > 0.0 && want_half < std::f64::consts::LN_2);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (logits, ids, lps) = case();
        for s in [
            spec(Divergence::Forward, 0.0, 1.0),
            spec(Divergence::Forward, 0.0, 2.5),
            spec(Divergence::Reverse, 0.0, 0.7),
            spec(Divergence::Jsd, 0.5, 1.0),
            spec(Divergence::Jsd, 0.2, 2.0),
        ] {
            let mut grad = vec![0.25f32; logits.len()]; // added to, not overwritten
            kd_row(
                &s,
                &logits,
                (&ids, &lps, tail(&lps)),
                Some((&mut grad, 0.5)),
            );
            // The teacher is a constant target: its buckets stay those of the base logits.
            let (top, p) = teacher_buckets(&ids, &lps, tail(&lps), &logits, s.temperature);
            for i in 0..logits.len() {
                let h = 1e-3f32;
                let mut up = logits.clone();
                up[i] += h;
                let mut dn = logits.clone();
                dn[i] -= h;
                let fd = (kd_against(&s, &up, (&top, &p), None)
                    - kd_against(&s, &dn, (&top, &p), None))
                    / (2.0 * f64::from(h));
                let got = f64::from(grad[i] - 0.25);
                assert!(
                    (got - 0.5 * fd).abs() < 2e-3,
                    "{s:?} logit {i}: analytic {got} vs finite difference {}",
                    0.5 * fd
                );
            }
        }
    }

    #[test]
    fn identical_distributions_have_zero_divergence() {
        let logits = [0.3f32, -1.0, 2.0, 0.5];
        let z = logits.iter().map(|v| v.exp()).sum::<f32>().ln();
        let ids: Vec<u32> = (0..4).collect();
        let lps: Vec<f32> = logits.iter().map(|v| v - z).collect();
        // All four tokens in the top-k, or the top two with the rest as the tail bucket; at
        // temperature 1 and 2.
        for k in [4usize, 2] {
            for t in [1.0, 2.0] {
                for d in [Divergence::Forward, Divergence::Reverse, Divergence::Jsd] {
                    let mut g = vec![0f32; 4];
                    let teacher = (&ids[..k], &lps[..k], tail(&lps[..k]));
                    let v = kd_row(&spec(d, 0.5, t), &logits, teacher, Some((&mut g, 1.0)));
                    assert!(v.abs() < 1e-6, "{d:?} k {k} T {t}: {v}");
                    assert!(g.iter().all(|x| x.abs() < 1e-5), "{d:?} k {k} T {t}: {g:?}");
                }
            }
        }
    }

    #[test]
    fn padding_entries_are_ignored() {
        let (logits, ids, lps) = case();
        let s = spec(Divergence::Forward, 0.0, 1.0);
        let a = kd_row(&s, &logits, (&ids, &lps, tail(&lps)), None);
        let mut rows = SoftRows::new(4);
        rows.push(ids.iter().copied().zip(lps.iter().copied()), None);
        let (i2, l2) = rows.row(0);
        assert_eq!(i2.len(), 4);
        assert!((kd_row(&s, &logits, (i2, l2, rows.log_tail[0]), None) - a).abs() < 1e-12);
    }

    #[test]
    fn uniform_pairs_end_on_the_last_layers() {
        assert_eq!(
            uniform_layer_pairs(4, 8, 4),
            vec![(0, 1), (1, 3), (2, 5), (3, 7)]
        );
        assert_eq!(uniform_layer_pairs(20, 30, 2), vec![(9, 14), (19, 29)]);
        assert_eq!(uniform_layer_pairs(30, 30, 1), vec![(29, 29)]);
    }
}
