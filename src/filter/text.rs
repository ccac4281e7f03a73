//! Word normalisation and fixed hashing shared by the dedup and decontamination filters.
//!
//! Both filters compare texts that differ only in ways that do not matter for training data
//! (case, punctuation, spacing, Unicode compatibility forms), so they share one definition of a
//! "word":
//!
//! - a word is a maximal run of alphanumeric characters (combining marks stay attached), except
//!   that every CJK ideograph, kana or hangul syllable is a word on its own, because those
//!   scripts do not separate words with spaces;
//! - each word is NFKC-normalised and lowercased, and anything that is not alphanumeric after
//!   that is dropped;
//! - punctuation, symbols and whitespace only separate words and are otherwise ignored.
//!
//! Every word keeps its byte range in the original text so that findings can point at the
//! evidence. Hashes here are fixed functions (FNV-1a and the SplitMix64 finaliser) rather than
//! `std`'s randomly keyed hasher, so results are identical across runs, threads and platforms.

use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;

use unicode_normalization::UnicodeNormalization;

/// One normalised word and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    /// The normalised form (NFKC, lowercase, alphanumeric only).
    pub norm: String,
    /// Byte range of the word in the original text.
    pub span: Range<usize>,
}

/// True for scripts written without spaces between words, whose characters are therefore each
/// treated as a word (Han ideographs, hiragana, katakana, hangul syllables).
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF        // hiragana, katakana
        | 0x3400..=0x4DBF      // CJK extension A
        | 0x4E00..=0x9FFF      // CJK unified ideographs
        | 0xAC00..=0xD7AF      // hangul syllables
        | 0xF900..=0xFAFF      // CJK compatibility ideographs
        | 0x20000..=0x3FFFF    // CJK extensions B and later
    )
}

/// Combining marks in the common blocks; they belong to the word they decorate rather than
/// splitting it (a decomposed "é" is still one word).
fn is_combining_mark(c: char) -> bool {
    matches!(c as u32, 0x0300..=0x036F | 0x1AB0..=0x1AFF | 0x1DC0..=0x1DFF | 0x20D0..=0x20FF | 0xFE20..=0xFE2F)
}

fn normalize_word(raw: &str) -> String {
    if raw.is_ascii() {
        return raw.to_ascii_lowercase();
    }
    raw.nfkc()
        .flat_map(char::to_lowercase)
        .filter(|c| c.is_alphanumeric())
        .collect()
}

/// Splits `text` into normalised words with their byte ranges (see the module docs for the
/// exact definition). Words that normalise to nothing are dropped.
pub fn words(text: &str) -> Vec<Word> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let push = |range: Range<usize>, out: &mut Vec<Word>| {
        let norm = normalize_word(&text[range.clone()]);
        if !norm.is_empty() {
            out.push(Word { norm, span: range });
        }
    };
    for (i, c) in text.char_indices() {
        if is_cjk(c) {
            if let Some(s) = start.take() {
                push(s..i, &mut out);
            }
            push(i..i + c.len_utf8(), &mut out);
        } else if c.is_alphanumeric() || (start.is_some() && is_combining_mark(c)) {
            start.get_or_insert(i);
        } else if let Some(s) = start.take() {
            push(s..i, &mut out);
        }
    }
    if let Some(s) = start {
        push(s..text.len(), &mut out);
    }
    out
}

/// The normalised words of `text` joined by single spaces: the canonical form used for exact
/// duplicate detection.
pub fn normalized_text(text: &str) -> String {
    let ws = words(text);
    let mut out = String::with_capacity(text.len());
    for (i, w) in ws.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&w.norm);
    }
    out
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a over bytes, continuing from `state`.
fn fnv1a64(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// Fixed 64-bit hash of a byte string: FNV-1a followed by the SplitMix64 finaliser, which
/// spreads FNV's weak low bits over the whole word.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    mix64(fnv1a64(FNV_OFFSET, bytes))
}

/// SplitMix64 finaliser: a fixed bijective mixer of 64-bit values.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Fixed hash of a word sequence. Words are separated by a byte that cannot occur in a
/// normalised word, so `["ab", "c"]` and `["a", "bc"]` hash differently.
pub fn hash_words<S: AsRef<str>>(words: &[S]) -> u64 {
    let mut state = FNV_OFFSET;
    for w in words {
        state = fnv1a64(state, w.as_ref().as_bytes());
        state = fnv1a64(state, &[0x1f]);
    }
    mix64(state)
}

/// A `Hasher` that passes an already well-mixed `u64` key through unchanged, for hash maps keyed
/// by the fixed hashes above (re-hashing them with SipHash would only cost time).
#[derive(Debug, Default, Clone, Copy)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for non-u64 keys; fold them in with FNV-1a so the hasher stays correct.
        self.0 = fnv1a64(self.0 ^ FNV_OFFSET, bytes);
    }

    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }
}

/// `BuildHasher` for maps keyed by pre-hashed `u64`s.
pub type IdentityBuildHasher = BuildHasherDefault<IdentityHasher>;

/// Copies at most `max_chars` characters of `s`, appending `…` when something was cut, so
/// evidence attached to findings stays small on 100 KB inputs.
pub fn truncate_chars(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((cut, _)) => {
            let mut out = s[..cut].to_string();
            out.push('…');
            out
        }
        None => s.to_string(),
    }
}

/// Largest char boundary `<= i` in `s` (clamped to `s.len()`), for slicing at estimated offsets.
pub fn floor_char_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_normalise_case_punctuation_and_width() {
        let ws: Vec<String> = words("Hello, WORLD!  ｆｕｌｌ-width café 42")
            .into_iter()
            .map(|w| w.norm)
            .collect();
        assert_eq!(ws, ["hello", "world", "full", "width", "café", "42"]);
    }

    #[test]
    fn words_keep_spans_and_split_cjk() {
        let t = "ab 你好 c";
        let ws = words(t);
        let spans: Vec<&str> = ws.iter().map(|w| &t[w.span.clone()]).collect();
        assert_eq!(spans, ["ab", "你", "好", "c"]);
    }

    #[test]
    fn decomposed_accent_stays_in_word() {
        let ws = words("cafe\u{301} noir");
        assert_eq!(ws.len(), 2);
        assert_eq!(ws[0].norm, "café");
    }

    #[test]
    fn hashes_are_fixed() {
        assert_eq!(hash_bytes(b""), mix64(FNV_OFFSET));
        assert_ne!(hash_words(&["ab", "c"]), hash_words(&["a", "bc"]));
        assert_eq!(truncate_chars("héllo", 2), "hé…");
        assert_eq!(truncate_chars("hé", 2), "hé");
    }
}
