//! The statistics of an evaluation: pass@k, maj@k, intervals and the paired comparison.
//!
//! Kept apart from the I/O so that each formula can be checked against hand-computed values.

/// Unbiased pass@k of a problem with `c` correct samples out of `n` (Chen et al. 2021):
/// `1 - C(n - c, k) / C(n, k)`, as a product to stay exact for large `n`. `None` when `k > n`.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> Option<f64> {
    if k == 0 || k > n || c > n {
        return None;
    }
    if n - c < k {
        return Some(1.0);
    }
    let mut miss = 1.0;
    for i in (n - c + 1)..=n {
        miss *= 1.0 - k as f64 / i as f64;
    }
    Some(1.0 - miss)
}

/// Majority vote over the first `k` samples of a problem: `answers[i]` is sample `i`'s
/// normalised final answer (`None`: none extracted) and whether it was graded correct. The
/// most frequent answer wins, ties going to the answer seen first; the vote is correct when
/// the winning answer's samples are. `None` when fewer than `k` samples exist.
pub fn maj_at_k(answers: &[(Option<String>, bool)], k: usize) -> Option<bool> {
    if k == 0 || answers.len() < k {
        return None;
    }
    let mut counts: Vec<(&str, usize, bool, usize)> = Vec::new();
    for (i, (a, ok)) in answers[..k].iter().enumerate() {
        let Some(a) = a.as_deref() else { continue };
        match counts.iter_mut().find(|c| c.0 == a) {
            Some(c) => {
                c.1 += 1;
                c.2 |= *ok;
            }
            None => counts.push((a, 1, *ok, i)),
        }
    }
    let best = counts
        .iter()
        .max_by(|x, y| x.1.cmp(&y.1).then(y.3.cmp(&x.3)));
    Some(best.is_some_and(|b| b.2))
}

/// The 97.5% quantile of the standard normal.
const Z: f64 = 1.959_963_984_540_054;

/// Wilson score interval for `successes` of `n` Bernoulli trials (95%).
pub fn wilson(successes: f64, n: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let p = successes / n;
    let z2 = Z * Z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    // At p = 0 or 1 the bound equals p exactly; rounding may put it a hair on the wrong side.
    ((centre - half).clamp(0.0, p), (centre + half).clamp(p, 1.0))
}

/// Mean of per-problem scores with a 95% interval: Wilson when every score is 0 or 1 (one
/// sample per problem), else the normal interval of the mean over problems (problems are the
/// independent units; samples of one problem are not).
pub fn mean_ci95(scores: &[f64]) -> (f64, (f64, f64)) {
    let n = scores.len() as f64;
    if scores.is_empty() {
        return (0.0, (0.0, 1.0));
    }
    let mean = scores.iter().sum::<f64>() / n;
    if scores.iter().all(|&s| s == 0.0 || s == 1.0) {
        return (mean, wilson(mean * n, n));
    }
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let half = Z * (var / n).sqrt();
    (mean, ((mean - half).max(0.0), (mean + half).min(1.0)))
}

/// A paired comparison of two evaluations over the same problems.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Paired {
    /// Problems compared.
    pub n: usize,
    /// Mean of `b - a` (the change in pass@1).
    pub delta: f64,
    /// 95% interval of `delta` (normal, over problems).
    pub ci95: (f64, f64),
    /// Two-sided p-value of a paired sign-flip permutation test (exact up to 20 differing
    /// problems, else 200 000 seeded random flips).
    pub p_value: f64,
    /// Problems where `b` scored higher.
    pub wins: usize,
    /// Problems where `b` scored lower.
    pub losses: usize,
}

/// Compares per-problem scores `a` (before) and `b` (after), paired by index.
pub fn paired(a: &[f64], b: &[f64]) -> Paired {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    let n = d.len();
    if n == 0 {
        return Paired {
            n,
            delta: 0.0,
            ci95: (0.0, 0.0),
            p_value: 1.0,
            wins: 0,
            losses: 0,
        };
    }
    let nf = n as f64;
    let mean = d.iter().sum::<f64>() / nf;
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (nf - 1.0).max(1.0);
    let half = Z * (var / nf).sqrt();
    let nonzero: Vec<f64> = d.iter().copied().filter(|x| *x != 0.0).collect();
    let observed = nonzero.iter().sum::<f64>().abs();
    let eps = 1e-12 * (1.0 + observed);
    let p_value = if nonzero.is_empty() {
        1.0
    } else if nonzero.len() <= 20 {
        let m = nonzero.len();
        let mut hits = 0u64;
        for mask in 0u64..(1 << m) {
            let s: f64 = nonzero
                .iter()
                .enumerate()
                .map(|(i, x)| if mask >> i & 1 == 1 { -x } else { *x })
                .sum();
            if s.abs() >= observed - eps {
                hits += 1;
            }
        }
        hits as f64 / (1u64 << m) as f64
    } else {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED);
        let trials = 200_000u64;
        let mut hits = 1u64;
        for _ in 0..trials {
            let s: f64 = nonzero
                .iter()
                .map(|x| if rng.random::<bool>() { -x } else { *x })
                .sum();
            if s.abs() >= observed - eps {
                hits += 1;
            }
        }
        hits as f64 / (trials + 1) as f64
    };
    Paired {
        n,
        delta: mean,
        ci95: (mean - half, mean + half),
        p_value,
        wins: d.iter().filter(|x| **x > 0.0).count(),
        losses: d.iter().filter(|x| **x < 0.0).count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn pass_at_k_matches_the_combinatorial_definition() {
        // n = 5, c = 2, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10.
        assert!(close(pass_at_k(5, 2, 2).unwrap(), 0.7));
        // k = 1 is the fraction correct.
        assert!(close(pass_at_k(8, 3, 1).unwrap(), 3.0 / 8.0));
        // n = 10, c = 1, k = 5: 1 - C(9,5)/C(10,5) = 1 - 126/252.
        assert!(close(pass_at_k(10, 1, 5).unwrap(), 0.5));
        assert_eq!(pass_at_k(4, 0, 2), Some(0.0));
        assert_eq!(pass_at_k(4, 3, 2), Some(1.0));
        assert_eq!(pass_at_k(2, 1, 3), None);
    }

    #[test]
    fn majority_vote_by_answer() {
        let s = |a: &str, ok| (Some(a.to_string()), ok);
        // "4" twice (wrong), "5" once (right): the vote is wrong.
        assert_eq!(
            maj_at_k(&[s("4", false), s("5", true), s("4", false)], 3),
            Some(false)
        );
        // Tie between "5" and "4": the first seen wins.
        assert_eq!(maj_at_k(&[s("5", true), s("4", false)], 2), Some(true));
        assert_eq!(maj_at_k(&[s("4", false), s("5", true)], 2), Some(false));
        // Unextracted answers do not vote.
        assert_eq!(
            maj_at_k(&[(None, false), (None, false), s("5", true)], 3),
            Some(true)
        );
        assert_eq!(maj_at_k(&[s("5", true)], 2), None);
    }

    #[test]
    fn wilson_interval_known_values() {
        // 8 of 10: the textbook Wilson interval is (0.4902, 0.9433).
        let (lo, hi) = wilson(8.0, 10.0);
        assert!(
            (lo - 0.4902).abs() < 1e-3 && (hi - 0.9433).abs() < 1e-3,
            "{lo} {hi}"
        );
        // None or all of them: the interval still holds the estimate, whatever the rounding.
        for n in 1..=400 {
            let n = f64::from(n);
            let (lo, _) = wilson(0.0, n);
            let (_, hi) = wilson(n, n);
            assert_eq!((lo, hi), (0.0, 1.0), "n = {n}");
        }
        let (m, (lo, hi)) = mean_ci95(&[1.0, 0.0, 1.0, 1.0]);
        assert!(close(m, 0.75) && lo < 0.75 && hi > 0.75 && hi <= 1.0);
    }

    #[test]
    fn paired_test_known_values() {
        // 6 wins, 0 losses over 10 problems: exact two-sided sign-flip p = 2 / 2^6.
        let a = vec![0.0; 10];
        let mut b = vec![0.0; 10];
        b[..6].iter_mut().for_each(|x| *x = 1.0);
        let p = paired(&a, &b);
        assert_eq!((p.wins, p.losses), (6, 0));
        assert!(close(p.delta, 0.6));
        assert!(close(p.p_value, 2.0 / 64.0), "{}", p.p_value);
        // 3 wins, 3 losses: no evidence either way.
        let mut c = b.clone();
        c[0] = 0.0;
        c[1] = 0.0;
        c[2] = 0.0;
        c[7] = 1.0;
        c[8] = 1.0;
        c[9] = 1.0;
        let q = paired(&b, &c);
        assert_eq!((q.wins, q.losses), (3, 3));
        assert!(close(q.delta, 0.0) && close(q.p_value, 1.0));
        // Many differing problems use the seeded Monte Carlo test: 30 wins, 10 losses out
        // of 40 (exact two-sided binomial p = 0.00222).
        let a2 = vec![0.5; 40];
        let b2: Vec<f64> = (0..40).map(|i| if i < 30 { 1.0 } else { 0.0 }).collect();
        let r = paired(&a2, &b2);
        assert!((r.p_value - 0.00222).abs() < 0.001, "{}", r.p_value);
        assert!(r.ci95.0 > 0.0);
    }
}
