//! Decontamination: drop traces that overlap evaluation sets.
//!
//! If a training prompt (or the teacher's answer) contains a long word sequence from an
//! evaluation question, the student may memorise the test and the evaluation stops measuring
//! anything. The check is the usual one: a trace is contaminated when it shares an n-gram of
//! normalised words (13 by default, see [`crate::filter::text`] for the normalisation) with any
//! evaluation item.
//!
//! Every n-gram of every evaluation item is hashed to a fixed 64-bit value and stored with the
//! index of the first item it came from; a query hashes its own n-grams in order and reports
//! the first one found, with the evaluation item's id and the text that matched. Evaluation
//! items shorter than n words cannot share an n-gram with anything; those with at least
//! `min_item_words` words are matched as a whole instead (the trace contains the entire item),
//! shorter ones are skipped and counted.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::text::{hash_words, truncate_chars, words, IdentityBuildHasher, Word};

/// Invalid decontamination parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecontamError {
    /// The n-gram length is 0.
    #[error("n-gram length must be at least 1")]
    ZeroN,
}

/// Parameters of the overlap check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecontamParams {
    /// n-gram length in normalised words. 13 is the common choice: long enough that shared
    /// boilerplate ("what is the value of") does not match, short enough to catch a copied
    /// question with small edits around it.
    pub n: usize,
    /// Evaluation items with fewer than `n` but at least this many words are matched as a
    /// whole; shorter ones are skipped (a 3-word item would match innocent text). Set it to `n`
    /// or more to skip every short item.
    pub min_item_words: usize,
}

impl Default for DecontamParams {
    fn default() -> Self {
        DecontamParams {
            n: 13,
            min_item_words: 8,
        }
    }
}

/// Which text of a trace matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextSource {
    /// The prompt (last user message).
    Prompt,
    /// The teacher's completion.
    Completion,
}

/// Evidence that a text overlaps an evaluation item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contamination {
    /// Id of the evaluation item the n-gram came from (the first item added that has it).
    pub eval_id: String,
    /// The shared n-gram in normalised form (words joined by spaces).
    pub ngram: String,
    /// Byte range of the matched words in the checked text.
    pub span: Range<usize>,
    /// The checked text at `span`, cut to 200 characters.
    pub text: String,
    /// Which text matched (set by [`EvalIndex::check_trace`]; [`EvalIndex::find`] reports
    /// `Prompt`).
    pub source: TextSource,
}

type HashIndex = HashMap<u64, u32, IdentityBuildHasher>;

/// Index of evaluation-set n-grams. Read-only after building, so it can be shared across
/// threads.
#[derive(Debug, Clone)]
pub struct EvalIndex {
    params: DecontamParams,
    grams: HashIndex,
    /// Whole short items by word count.
    short: BTreeMap<usize, HashIndex>,
    items: Vec<String>,
    skipped: usize,
}

impl EvalIndex {
    /// An empty index.
    pub fn new(params: DecontamParams) -> Result<Self, DecontamError> {
        if params.n == 0 {
            return Err(DecontamError::ZeroN);
        }
        Ok(EvalIndex {
            params,
            grams: HashIndex::default(),
            short: BTreeMap::new(),
            items: Vec::new(),
            skipped: 0,
        })
    }

    /// Builds an index from `(id, text)` evaluation items, in order.
    pub fn build<I, S, T>(params: DecontamParams, items: I) -> Result<Self, DecontamError>
    where
        I: IntoIterator<Item = (S, T)>,
        S: Into<String>,
        T: AsRef<str>,
    {
        let mut index = EvalIndex::new(params)?;
        for (id, text) in items {
            index.add(id, text.as_ref());
        }
        Ok(index)
    }

    /// Adds one evaluation item. An n-gram already present keeps pointing at the earlier item.
    pub fn add(&mut self, id: impl Into<String>, text: &str) {
        let ws: Vec<String> = words(text).into_iter().map(|w| w.norm).collect();
        let n = self.params.n;
        let item = self.items.len() as u32;
        if ws.len() >= n {
            for gram in ws.windows(n) {
                self.grams.entry(hash_words(gram)).or_insert(item);
            }
        } else if ws.len() >= self.params.min_item_words && !ws.is_empty() {
            self.short
                .entry(ws.len())
                .or_default()
                .entry(hash_words(&ws))
                .or_insert(item);
        } else {
            self.skipped += 1;
            return;
        }
        self.items.push(id.into());
    }

    /// The parameters.
    pub fn params(&self) -> &DecontamParams {
        &self.params
    }

    /// Evaluation items indexed.
    pub fn num_items(&self) -> usize {
        self.items.len()
    }

    /// Distinct n-grams indexed (short whole items not included).
    pub fn num_ngrams(&self) -> usize {
        self.grams.len()
    }

    /// Evaluation items too short to index (fewer than `min_item_words` words).
    pub fn skipped_items(&self) -> usize {
        self.skipped
    }

    /// The first (leftmost) word sequence of `text` shared with an evaluation item, if any.
    pub fn find(&self, text: &str) -> Option<Contamination> {
        let ws = words(text);
        let norms: Vec<&str> = ws.iter().map(|w| w.norm.as_str()).collect();
        let mut best: Option<(usize, usize, u32)> = None; // (start, len, item)
        let tables = std::iter::once((self.params.n, &self.grams))
            .chain(self.short.iter().map(|(l, t)| (*l, t)));
        for (len, table) in tables {
            if norms.len() < len {
                continue;
            }
            // Only a match starting before the best so far (or at it, if longer) can win.
            let limit = best.map_or(usize::MAX, |b| b.0);
            for (start, gram) in norms.windows(len).enumerate() {
                if start > limit {
                    break;
                }
                if let Some(&item) = table.get(&hash_words(gram)) {
                    let better = match best {
                        None => true,
                        Some((s, l, _)) => start < s || (start == s && len > l),
                    };
                    if better {
                        best = Some((start, len, item));
                    }
                    break;
                }
            }
        }
        let (start, len, item) = best?;
        Some(self.evidence(text, &ws[start..start + len], item))
    }

    fn evidence(&self, text: &str, matched: &[Word], item: u32) -> Contamination {
        let span = match (matched.first(), matched.last()) {
            (Some(a), Some(b)) => a.span.start..b.span.end,
            _ => 0..0,
        };
        Contamination {
            eval_id: self.items.get(item as usize).cloned().unwrap_or_default(),
            ngram: matched
                .iter()
                .map(|w| w.norm.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            text: truncate_chars(&text[span.clone()], 200),
            span,
            source: TextSource::Prompt,
        }
    }

    /// Checks a trace's prompt and, when given, its completion; the prompt is checked first.
    pub fn check_trace(&self, prompt: &str, completion: Option<&str>) -> Option<Contamination> {
        if let Some(c) = self.find(prompt) {
            return Some(c);
        }
        let mut c = self.find(completion?)?;
        c.source = TextSource::Completion;
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_is_thread_safe() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<EvalIndex>();
    }

    #[test]
    fn short_items_match_whole() {
        let idx = EvalIndex::build(
            DecontamParams::default(),
            [
                ("short", "Compute the sum of all positive divisors of 36."),
                ("tiny", "Compute 2+2."),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(idx.skipped_items(), 1);
        let hit = idx
            .find("Please solve: compute the sum of all positive divisors of 36. Thanks")
            .unwrap_or_else(|| panic!("expected a match"));
        assert_eq!(hit.eval_id, "short");
        assert!(idx
            .find("compute the sum of all positive divisors of 35")
            .is_none());
    }

    #[test]
    fn leftmost_match_wins() {
        let a = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu";
        let b = "one two three four five six seven eight nine ten eleven twelve thirteen";
        let idx = EvalIndex::build(DecontamParams::default(), [("a", a), ("b", b)])
            .unwrap_or_else(|e| panic!("{e}"));
        let hit = idx
            .find(&format!("x {b} y {a}"))
            .unwrap_or_else(|| panic!("match"));
        assert_eq!(hit.eval_id, "b");
        assert!(hit.text.starts_with("one"));
    }
}
