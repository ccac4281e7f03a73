//! Exact and near-duplicate detection.
//!
//! Sampling a teacher several times per problem, or mixing data sets, produces copies and
//! light paraphrases; training on them over-weights those examples. Two detectors, both keeping
//! the first occurrence and pointing later ones at it:
//!
//! - **Exact**: SHA-256 of the normalised text (see [`crate::filter::text`]: NFKC, lowercase,
//!   punctuation dropped, whitespace collapsed), so copies that differ only in case, spacing or
//!   punctuation are still caught.
//! - **Near**: MinHash signatures over word shingles (5 normalised words by default) with
//!   locality-sensitive hashing (LSH) banding to find candidates, each verified by estimated
//!   Jaccard similarity against the threshold. The permutations are universal hash functions
//!   modulo the Mersenne prime 2^61 − 1 with coefficients from a fixed seed, so signatures are
//!   identical across runs, threads and platforms.
//!
//! A duplicate always points at a *kept* document (duplicates are never indexed), and at the
//! earliest one it matches, so the outcome depends only on input order. [`dedup_batch`] computes
//! hashes and signatures in parallel and decides sequentially, so the thread count cannot change
//! the result.

use std::collections::HashMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::text::{hash_words, mix64, normalized_text, words, IdentityBuildHasher};

/// Invalid dedup parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DedupError {
    /// A parameter is out of range; the message says which and why.
    #[error("invalid near-duplicate parameters: {0}")]
    InvalidParams(String),
}

/// What dedup decided for one document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum DedupVerdict {
    /// First of its kind: kept.
    Unique,
    /// Same normalised text as a kept document.
    Exact {
        /// Id of the kept document.
        of: String,
    },
    /// Estimated Jaccard similarity with a kept document at or above the threshold.
    Near {
        /// Id of the kept document.
        of: String,
        /// Estimated Jaccard similarity of the shingle sets.
        similarity: f64,
    },
}

impl DedupVerdict {
    /// True when the document is kept.
    pub fn is_unique(&self) -> bool {
        matches!(self, DedupVerdict::Unique)
    }
}

// ---------------------------------------------------------------------------------------------
// Exact
// ---------------------------------------------------------------------------------------------

/// SHA-256 of the normalised text: equal keys mean equal texts up to case, Unicode
/// compatibility forms, punctuation and whitespace.
pub fn exact_key(text: &str) -> [u8; 32] {
    Sha256::digest(normalized_text(text).as_bytes()).into()
}

/// Exact-duplicate detector: remembers the first id seen for each normalised text.
#[derive(Debug, Clone, Default)]
pub struct ExactDedup {
    seen: HashMap<[u8; 32], String>,
}

impl ExactDedup {
    /// An empty detector.
    pub fn new() -> Self {
        Self::default()
    }

    /// The kept document with this key, if any.
    pub fn lookup(&self, key: &[u8; 32]) -> Option<&str> {
        self.seen.get(key).map(String::as_str)
    }

    /// Records `id` as the kept document for `key` unless one is already recorded.
    pub fn insert(&mut self, id: &str, key: [u8; 32]) {
        self.seen.entry(key).or_insert_with(|| id.to_string());
    }

    /// Returns the id of the kept document `text` duplicates, or records `id` as kept.
    pub fn check_and_insert(&mut self, id: &str, text: &str) -> Option<String> {
        let key = exact_key(text);
        if let Some(of) = self.lookup(&key) {
            return Some(of.to_string());
        }
        self.insert(id, key);
        None
    }

    /// Number of distinct texts kept.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when nothing has been kept yet.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// MinHash + LSH
// ---------------------------------------------------------------------------------------------

/// Mersenne prime 2^61 − 1: the modulus of the permutation hash functions.
const MERSENNE_61: u64 = (1 << 61) - 1;

/// Seed of the permutation coefficients. Changing it changes every signature.
const PERMUTATION_SEED: u64 = 0x6469_7374_696c_6c31; // "distill1"

/// Parameters of near-duplicate detection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinHashParams {
    /// Number of hash functions (signature length). More is more precise and slower.
    pub num_perm: usize,
    /// Shingle length in normalised words. Documents shorter than this form one shingle.
    pub shingle: usize,
    /// Estimated Jaccard similarity at or above which a document is a near-duplicate.
    pub threshold: f64,
    /// LSH bands; `bands * rows <= num_perm`.
    pub bands: usize,
    /// Signature rows per band.
    pub rows: usize,
}

impl Default for MinHashParams {
    /// 128 permutations, 5-word shingles, threshold 0.8, banding chosen for that threshold.
    fn default() -> Self {
        let (bands, rows) = choose_banding(0.8, 128);
        MinHashParams {
            num_perm: 128,
            shingle: 5,
            threshold: 0.8,
            bands,
            rows,
        }
    }
}

impl MinHashParams {
    /// Default parameters with another threshold and banding chosen for it.
    pub fn with_threshold(threshold: f64) -> Result<Self, DedupError> {
        if !(threshold > 0.0 && threshold <= 1.0) {
            return Err(DedupError::InvalidParams(format!(
                "threshold {threshold} is not in (0, 1]"
            )));
        }
        let (bands, rows) = choose_banding(threshold, 128);
        Ok(MinHashParams {
            threshold,
            bands,
            rows,
            ..MinHashParams::default()
        })
    }

    /// Checks that the parameters are usable.
    pub fn validate(&self) -> Result<(), DedupError> {
        let bad = |m: String| Err(DedupError::InvalidParams(m));
        if self.num_perm == 0 || self.shingle == 0 || self.bands == 0 || self.rows == 0 {
            return bad("num_perm, shingle, bands and rows must be at least 1".to_string());
        }
        if self.bands.saturating_mul(self.rows) > self.num_perm {
            return bad(format!(
                "bands * rows = {} exceeds num_perm = {}",
                self.bands * self.rows,
                self.num_perm
            ));
        }
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return bad(format!("threshold {} is not in (0, 1]", self.threshold));
        }
        Ok(())
    }
}

/// Picks LSH banding for a similarity threshold: the most rows per band (fewest spurious
/// candidates) such that a pair exactly at the threshold still becomes a candidate with
/// probability ≥ 0.99. Candidates are verified against the threshold anyway, so missed pairs
/// cost recall while extra candidates only cost a signature comparison; the choice therefore
/// favours recall. For 128 permutations: 0.8 → 21 bands × 6 rows, 0.7 → 32 × 4.
pub fn choose_banding(threshold: f64, num_perm: usize) -> (usize, usize) {
    let num_perm = num_perm.max(1);
    let t = threshold.clamp(0.0, 1.0);
    let mut best = (num_perm, 1);
    for rows in 1..=num_perm {
        let bands = num_perm / rows;
        let p_band = t.powi(rows as i32);
        let p_candidate = 1.0 - (1.0 - p_band).powi(bands as i32);
        if p_candidate >= 0.99 {
            best = (bands, rows);
        } else {
            break;
        }
    }
    best
}

/// A MinHash signature: per permutation, the minimum hash over the document's shingles.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Signature(pub Vec<u64>);

impl Signature {
    /// Estimated Jaccard similarity: the fraction of permutations whose minima agree.
    pub fn jaccard(&self, other: &Signature) -> f64 {
        let n = self.0.len().min(other.0.len());
        if n == 0 {
            return 0.0;
        }
        let same = self.0.iter().zip(&other.0).filter(|(a, b)| a == b).count();
        same as f64 / n as f64
    }
}

fn mod_mersenne(v: u128) -> u64 {
    // v < 2^122, so each fold fits and two folds plus one subtraction fully reduce.
    let s = (v as u64 & MERSENNE_61) + (v >> 61) as u64;
    let s = (s & MERSENNE_61) + (s >> 61);
    if s >= MERSENNE_61 {
        s - MERSENNE_61
    } else {
        s
    }
}

/// Computes MinHash signatures with fixed, seeded permutations.
#[derive(Debug, Clone)]
pub struct MinHasher {
    params: MinHashParams,
    coeffs: Vec<(u64, u64)>,
}

impl MinHasher {
    /// A hasher for `params` (validated).
    pub fn new(params: MinHashParams) -> Result<Self, DedupError> {
        params.validate()?;
        let mut state = PERMUTATION_SEED;
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            mix64(state) % MERSENNE_61
        };
        let coeffs = (0..params.num_perm)
            .map(|_| {
                let a = next().max(1);
                let b = next();
                (a, b)
            })
            .collect();
        Ok(MinHasher { params, coeffs })
    }

    /// The parameters.
    pub fn params(&self) -> &MinHashParams {
        &self.params
    }

    /// Signature of `text`, or `None` when it has no words (nothing to compare).
    pub fn signature(&self, text: &str) -> Option<Signature> {
        let ws: Vec<String> = words(text).into_iter().map(|w| w.norm).collect();
        if ws.is_empty() {
            return None;
        }
        let k = self.params.shingle.min(ws.len());
        let mut shingles: Vec<u64> = ws.windows(k).map(|s| hash_words(s) % MERSENNE_61).collect();
        shingles.sort_unstable();
        shingles.dedup();
        let sig = self
            .coeffs
            .iter()
            .map(|&(a, b)| {
                shingles
                    .iter()
                    .map(|&x| mod_mersenne(u128::from(a) * u128::from(x) + u128::from(b)))
                    .min()
                    .unwrap_or(u64::MAX)
            })
            .collect();
        Some(Signature(sig))
    }
}

/// A near-duplicate match.
#[derive(Debug, Clone, PartialEq)]
pub struct NearDup {
    /// Id of the kept document.
    pub of: String,
    /// Estimated Jaccard similarity.
    pub similarity: f64,
}

/// LSH index over the signatures of kept documents.
#[derive(Debug, Clone)]
pub struct NearDupIndex {
    hasher: MinHasher,
    bands: Vec<HashMap<u64, Vec<u32>, IdentityBuildHasher>>,
    kept: Vec<(String, Signature)>,
}

impl NearDupIndex {
    /// An empty index.
    pub fn new(params: MinHashParams) -> Result<Self, DedupError> {
        let hasher = MinHasher::new(params)?;
        let bands = vec![HashMap::default(); hasher.params.bands];
        Ok(NearDupIndex {
            hasher,
            bands,
            kept: Vec::new(),
        })
    }

    /// The hasher, to compute signatures outside the index (e.g. in parallel).
    pub fn hasher(&self) -> &MinHasher {
        &self.hasher
    }

    fn band_keys<'s>(&'s self, sig: &'s Signature) -> impl Iterator<Item = u64> + 's {
        let rows = self.hasher.params.rows;
        (0..self.hasher.params.bands).map(move |b| {
            sig.0[b * rows..(b + 1) * rows]
                .iter()
                .fold(mix64(b as u64), |h, &v| mix64(h ^ v))
        })
    }

    /// The earliest kept document whose estimated similarity with `sig` reaches the threshold.
    pub fn find(&self, sig: &Signature) -> Option<NearDup> {
        let mut candidates: Vec<u32> = Vec::new();
        for (band, key) in self.bands.iter().zip(self.band_keys(sig)) {
            if let Some(ids) = band.get(&key) {
                candidates.extend_from_slice(ids);
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        candidates.into_iter().find_map(|c| {
            let (id, kept) = &self.kept[c as usize];
            let similarity = sig.jaccard(kept);
            (similarity >= self.hasher.params.threshold).then(|| NearDup {
                of: id.clone(),
                similarity,
            })
        })
    }

    /// Adds a kept document.
    pub fn insert(&mut self, id: &str, sig: Signature) {
        let index = self.kept.len() as u32;
        let keys: Vec<u64> = self.band_keys(&sig).collect();
        for (band, key) in self.bands.iter_mut().zip(keys) {
            band.entry(key).or_default().push(index);
        }
        self.kept.push((id.to_string(), sig));
    }

    /// Returns the kept document `text` nearly duplicates, or adds it as kept. Texts without
    /// words are never near-duplicates (exact dedup handles them).
    pub fn check_and_insert(&mut self, id: &str, text: &str) -> Option<NearDup> {
        let sig = self.hasher.signature(text)?;
        if let Some(hit) = self.find(&sig) {
            return Some(hit);
        }
        self.insert(id, sig);
        None
    }

    /// Number of kept documents.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// True when nothing has been kept yet.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// Combined
// ---------------------------------------------------------------------------------------------

/// Which detectors to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DedupConfig {
    /// Run exact dedup.
    pub exact: bool,
    /// Run near-duplicate detection with these parameters.
    pub near: Option<MinHashParams>,
}

impl Default for DedupConfig {
    /// Both detectors, near-duplicates at the default 0.8 threshold.
    fn default() -> Self {
        DedupConfig {
            exact: true,
            near: Some(MinHashParams::default()),
        }
    }
}

/// Streaming deduplicator: exact check first, then near-duplicate check; only unique documents
/// are remembered.
#[derive(Debug, Clone)]
pub struct Deduplicator {
    exact: Option<ExactDedup>,
    near: Option<NearDupIndex>,
}

impl Deduplicator {
    /// A deduplicator with no documents yet.
    pub fn new(config: &DedupConfig) -> Result<Self, DedupError> {
        Ok(Deduplicator {
            exact: config.exact.then(ExactDedup::new),
            near: config.near.clone().map(NearDupIndex::new).transpose()?,
        })
    }

    /// Decides one document from precomputed parts (see [`dedup_batch`]).
    fn decide(&mut self, id: &str, key: Option<[u8; 32]>, sig: Option<Signature>) -> DedupVerdict {
        if let (Some(exact), Some(key)) = (&self.exact, &key) {
            if let Some(of) = exact.lookup(key) {
                return DedupVerdict::Exact { of: of.to_string() };
            }
        }
        if let (Some(near), Some(sig)) = (&mut self.near, sig) {
            if let Some(hit) = near.find(&sig) {
                return DedupVerdict::Near {
                    of: hit.of,
                    similarity: hit.similarity,
                };
            }
            near.insert(id, sig);
        }
        if let (Some(exact), Some(key)) = (&mut self.exact, key) {
            exact.insert(id, key);
        }
        DedupVerdict::Unique
    }

    /// Decides the next document in input order.
    pub fn check(&mut self, id: &str, text: &str) -> DedupVerdict {
        let key = self.exact.as_ref().map(|_| exact_key(text));
        let sig = self.near.as_ref().and_then(|n| n.hasher.signature(text));
        self.decide(id, key, sig)
    }
}

/// Deduplicates `(id, text)` pairs in order: hashes and signatures are computed in parallel,
/// decisions are made sequentially, so the result is the same for any thread count.
pub fn dedup_batch<I, T>(
    docs: &[(I, T)],
    config: &DedupConfig,
) -> Result<Vec<DedupVerdict>, DedupError>
where
    I: AsRef<str> + Sync,
    T: AsRef<str> + Sync,
{
    let mut dedup = Deduplicator::new(config)?;
    let prepared: Vec<(Option<[u8; 32]>, Option<Signature>)> = docs
        .par_iter()
        .map(|(_, text)| {
            let text = text.as_ref();
            let key = config.exact.then(|| exact_key(text));
            let sig = dedup.near.as_ref().and_then(|n| n.hasher.signature(text));
            (key, sig)
        })
        .collect();
    Ok(docs
        .iter()
        .zip(prepared)
        .map(|((id, _), (key, sig))| dedup.decide(id.as_ref(), key, sig))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banding_examples() {
        assert_eq!(choose_banding(0.8, 128), (21, 6));
        assert_eq!(choose_banding(0.7, 128), (32, 4));
    }

    #[test]
    fn mersenne_reduction_matches_modulo() {
        for v in [
            0u128,
            1,
            MERSENNE_61 as u128,
            (1u128 << 121) + 12345,
            u128::from(u64::MAX) * 3,
        ] {
            assert_eq!(u128::from(mod_mersenne(v)), v % u128::from(MERSENNE_61));
        }
    }

    #[test]
    fn identical_signature_similarity_is_one() {
        let h = MinHasher::new(MinHashParams::default()).unwrap_or_else(|e| panic!("{e}"));
        let a = h
            .signature("one two three four five six")
            .unwrap_or_else(|| panic!("sig"));
        let b = h
            .signature("One, two; three four five six!")
            .unwrap_or_else(|| panic!("sig"));
        assert!((a.jaccard(&b) - 1.0).abs() < f64::EPSILON);
        assert!(h.signature("  ...  ").is_none());
    }

    #[test]
    fn thread_safe() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Deduplicator>();
        assert_send_sync::<NearDupIndex>();
        assert_send_sync::<MinHasher>();
    }
}
