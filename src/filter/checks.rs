//! Built-in checks that cannot be expressed as a regex.
//!
//! Rule files refer to these with `kind = "..."` (see [`crate::filter::rules`]); they are also
//! usable directly. Every check is a pure function of its input text and parameters, returns
//! byte ranges into that text as evidence, and runs in time linear in the input (a 100 KB
//! completion takes milliseconds), so the filter stage can afford all of them on every trace.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::text::{hash_bytes, mix64, IdentityBuildHasher};

// ---------------------------------------------------------------------------------------------
// Repetition
// ---------------------------------------------------------------------------------------------

/// What an n-gram is made of for the repetition check.
///
/// Words (whitespace-separated, compared exactly) are the default: a degenerate loop repeats
/// whole phrases, and word n-grams are long enough that ordinary prose and maths almost never
/// repeat one by accident. Characters catch loops in text without spaces (CJK, long formulas).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Whitespace-separated tokens, compared byte for byte.
    #[default]
    Words,
    /// Unicode scalar values.
    Chars,
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unit::Words => "word",
            Unit::Chars => "char",
        })
    }
}

/// Parameters of the degenerate-repetition check.
#[derive(Debug, Clone, PartialEq)]
pub struct RepetitionParams {
    /// Unit the n-grams are made of.
    pub unit: Unit,
    /// n-gram length in units. With words, 20 is long enough that a normal solution does not
    /// repeat one, and short enough that a looping sentence is caught.
    pub ngram: usize,
    /// Fires when one n-gram occurs more than this many times. Occurrences may overlap: an
    /// n-gram that recurs within fewer than `ngram` units means the text is periodic over more
    /// than `ngram` units, which is a loop in its own right.
    pub max_repeats: usize,
    /// Fires when more than this fraction of all units lies inside n-grams that occur at least
    /// twice (a long paragraph written out twice repeats each n-gram only twice, but covers the
    /// whole text). `None` disables this criterion.
    pub max_coverage: Option<f64>,
}

impl Default for RepetitionParams {
    fn default() -> Self {
        RepetitionParams {
            unit: Unit::Words,
            ngram: 20,
            max_repeats: 4,
            max_coverage: None,
        }
    }
}

/// The most repeated n-gram of a text, as evidence for the repetition check.
#[derive(Debug, Clone, PartialEq)]
pub struct RepetitionHit {
    /// Byte range of the first occurrence of the most repeated n-gram.
    pub ngram_span: Range<usize>,
    /// Byte range from the first to the end of the last occurrence: the looping region.
    pub loop_span: Range<usize>,
    /// Occurrences of that n-gram (overlapping ones included).
    pub repeats: usize,
    /// Fraction of all units covered by n-grams that occur at least twice.
    pub coverage: f64,
}

#[derive(Clone, Copy)]
struct GramEntry {
    count: u32,
    first: u32,
    last: u32,
}

/// Measures the most repeated n-gram of `text` regardless of thresholds; `None` when the text
/// has fewer than `params.ngram` units (or `ngram` is 0).
///
/// One pass with a rolling hash over per-unit hashes, so the cost is linear in the text length
/// and independent of `ngram`. The winning n-gram is verified unit by unit, so a hash collision
/// can never produce false evidence.
pub fn repetition_stats(text: &str, params: &RepetitionParams) -> Option<RepetitionHit> {
    let n = params.ngram;
    let units: Vec<Range<usize>> = match params.unit {
        Unit::Words => whitespace_tokens(text),
        Unit::Chars => text
            .char_indices()
            .map(|(i, c)| i..i + c.len_utf8())
            .collect(),
    };
    if n == 0 || units.len() < n {
        return None;
    }
    let unit_hash: Vec<u64> = match params.unit {
        Unit::Words => units
            .iter()
            .map(|r| hash_bytes(text[r.clone()].as_bytes()))
            .collect(),
        Unit::Chars => units
            .iter()
            .map(|r| mix64(text[r.clone()].chars().next().map_or(0, u64::from) + 1))
            .collect(),
    };

    // Polynomial rolling hash modulo 2^64 over already-mixed unit hashes.
    const BASE: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut pow = 1u64;
    for _ in 1..n {
        pow = pow.wrapping_mul(BASE);
    }
    let count = units.len() - n + 1;
    let mut gram_hash = Vec::with_capacity(count);
    let mut h = 0u64;
    for &u in &unit_hash[..n] {
        h = h.wrapping_mul(BASE).wrapping_add(u);
    }
    gram_hash.push(mix64(h));
    for i in 1..count {
        h = h
            .wrapping_sub(unit_hash[i - 1].wrapping_mul(pow))
            .wrapping_mul(BASE)
            .wrapping_add(unit_hash[i + n - 1]);
        gram_hash.push(mix64(h));
    }

    let mut table: HashMap<u64, GramEntry, IdentityBuildHasher> =
        HashMap::with_capacity_and_hasher(count, IdentityBuildHasher::default());
    for (i, &g) in gram_hash.iter().enumerate() {
        let i = i as u32;
        let e = table.entry(g).or_insert(GramEntry {
            count: 0,
            first: i,
            last: i,
        });
        e.count += 1;
        e.last = i;
    }

    // Coverage: units inside any n-gram that occurs at least twice (difference array).
    let mut diff = vec![0i32; units.len() + 1];
    for (i, g) in gram_hash.iter().enumerate() {
        if table.get(g).is_some_and(|e| e.count >= 2) {
            diff[i] += 1;
            diff[i + n] -= 1;
        }
    }
    let mut running = 0i32;
    let mut covered = 0usize;
    for d in &diff[..units.len()] {
        running += d;
        if running > 0 {
            covered += 1;
        }
    }
    let coverage = covered as f64 / units.len() as f64;

    // Most repeated n-gram; ties go to the earliest, so the result is deterministic.
    let best = table
        .values()
        .max_by(|a, b| a.count.cmp(&b.count).then(b.first.cmp(&a.first)))?;
    let (first, last) = (best.first as usize, best.last as usize);
    let same = (0..n).all(|k| text[units[first + k].clone()] == text[units[last + k].clone()]);
    let repeats = if same { best.count as usize } else { 1 };
    let last = if same { last } else { first };
    Some(RepetitionHit {
        ngram_span: units[first].start..units[first + n - 1].end,
        loop_span: units[first].start..units[last + n - 1].end,
        repeats,
        coverage,
    })
}

/// Runs the repetition check: `Some` with evidence when `text` loops according to `params`.
pub fn find_repetition(text: &str, params: &RepetitionParams) -> Option<RepetitionHit> {
    let hit = repetition_stats(text, params)?;
    let too_many = hit.repeats > params.max_repeats;
    let too_covered = params.max_coverage.is_some_and(|m| hit.coverage > m);
    (too_many || too_covered).then_some(hit)
}

fn whitespace_tokens(text: &str) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if let Some(s) = start.take() {
                out.push(s..i);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        out.push(s..text.len());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Mixed script
// ---------------------------------------------------------------------------------------------

/// Writing systems the mixed-script check tells apart. Letter-like mathematical symbols
/// (ℝ, 𝑥, ⓐ, fullwidth Latin) count as Latin so that maths is not mistaken for garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Script {
    /// Latin letters, including accented letters, IPA and letter-like maths symbols.
    Latin,
    /// Greek (common in maths: α, β, π, θ).
    Greek,
    /// Cyrillic.
    Cyrillic,
    /// Armenian.
    Armenian,
    /// Hebrew.
    Hebrew,
    /// Arabic.
    Arabic,
    /// Devanagari.
    Devanagari,
    /// Thai.
    Thai,
    /// Georgian.
    Georgian,
    /// Hangul (Korean).
    Hangul,
    /// Hiragana and katakana.
    Kana,
    /// Han ideographs (Chinese characters, kanji).
    Han,
    /// Any other letter.
    Other,
}

impl fmt::Display for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Script::Latin => "latin",
            Script::Greek => "greek",
            Script::Cyrillic => "cyrillic",
            Script::Armenian => "armenian",
            Script::Hebrew => "hebrew",
            Script::Arabic => "arabic",
            Script::Devanagari => "devanagari",
            Script::Thai => "thai",
            Script::Georgian => "georgian",
            Script::Hangul => "hangul",
            Script::Kana => "kana",
            Script::Han => "han",
            Script::Other => "other",
        };
        f.write_str(s)
    }
}

/// Script of a letter, or `None` for anything that is not a letter (digits, punctuation,
/// symbols, whitespace, marks), which the mixed-script check ignores.
pub fn script_of(c: char) -> Option<Script> {
    let cp = c as u32;
    // Han includes a few non-alphabetic ideographic characters (〆, 々) that still signal CJK.
    if matches!(cp, 0x2E80..=0x2FDF | 0x3005..=0x3007 | 0x3400..=0x4DBF | 0x4E00..=0x9FFF
        | 0xF900..=0xFAFF | 0x20000..=0x3FFFF)
    {
        return Some(Script::Han);
    }
    if !c.is_alphabetic() {
        return None;
    }
    let s = match cp {
        0x41..=0x5A
        | 0x61..=0x7A
        | 0xAA
        | 0xBA
        | 0xC0..=0x2FF
        | 0x1D00..=0x1DBF
        | 0x1E00..=0x1EFF
        | 0x2070..=0x209F
        | 0x2100..=0x214F
        | 0x2460..=0x24FF
        | 0x2C60..=0x2C7F
        | 0xA720..=0xA7FF
        | 0xAB30..=0xAB6F
        | 0xFB00..=0xFB06
        | 0xFF21..=0xFF3A
        | 0xFF41..=0xFF5A
        | 0x1D400..=0x1D7FF => Script::Latin,
        0x370..=0x3FF | 0x1F00..=0x1FFF => Script::Greek,
        0x400..=0x52F | 0x1C80..=0x1C8F | 0x2DE0..=0x2DFF | 0xA640..=0xA69F => Script::Cyrillic,
        0x530..=0x58F | 0xFB13..=0xFB17 => Script::Armenian,
        0x590..=0x5FF | 0xFB1D..=0xFB4F => Script::Hebrew,
        0x600..=0x6FF | 0x750..=0x77F | 0x8A0..=0x8FF | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF => {
            Script::Arabic
        }
        0x900..=0x97F | 0xA8E0..=0xA8FF => Script::Devanagari,
        0xE00..=0xE7F => Script::Thai,
        0x10A0..=0x10FF | 0x2D00..=0x2D2F => Script::Georgian,
        0x1100..=0x11FF | 0x3130..=0x318F | 0xA960..=0xA97F | 0xAC00..=0xD7FF => Script::Hangul,
        0x3040..=0x30FF | 0x31F0..=0x31FF | 0xFF66..=0xFF9F => Script::Kana,
        _ => Script::Other,
    };
    Some(s)
}

/// Parameters of the mixed-script check.
#[derive(Debug, Clone, PartialEq)]
pub struct MixedScriptParams {
    /// Scripts expected in the text; letters of any other script count as foreign.
    pub allowed: Vec<Script>,
    /// Fires when foreign letters make up more than this fraction of all letters.
    pub max_fraction: f64,
    /// ...and there are at least this many of them (so one stray letter in a two-word answer
    /// is not a 50% mix).
    pub min_foreign: usize,
    /// Fires on a run of at least this many U+FFFD replacement characters (bytes that were not
    /// valid UTF-8 somewhere upstream). 0 disables this criterion.
    pub replacement_run: usize,
}

impl Default for MixedScriptParams {
    fn default() -> Self {
        MixedScriptParams {
            allowed: vec![Script::Latin, Script::Greek],
            max_fraction: 0.02,
            min_foreign: 1,
            replacement_run: 2,
        }
    }
}

/// Evidence for the mixed-script check.
#[derive(Debug, Clone, PartialEq)]
pub enum MixedScriptHit {
    /// Too many letters from scripts outside the allowed set.
    Foreign {
        /// The first run of foreign letters.
        span: Range<usize>,
        /// Number of foreign letters.
        foreign: usize,
        /// Number of letters of any script.
        letters: usize,
        /// Foreign scripts seen, in a fixed order.
        scripts: Vec<Script>,
    },
    /// A run of replacement characters.
    Replacement {
        /// The run.
        span: Range<usize>,
        /// Its length in characters.
        run: usize,
    },
}

/// Runs the mixed-script check: `Some` with evidence when `text` mixes in foreign scripts beyond
/// the threshold or contains a run of replacement characters.
pub fn find_mixed_script(text: &str, params: &MixedScriptParams) -> Option<MixedScriptHit> {
    if params.replacement_run > 0 {
        let mut run_start = None;
        let mut run = 0usize;
        for (i, c) in text.char_indices() {
            if c == '\u{FFFD}' {
                run_start.get_or_insert(i);
                run += 1;
                if run >= params.replacement_run {
                    // Extend to the end of this run for the evidence.
                    let start = run_start.unwrap_or(i);
                    let tail = text[i..].chars().take_while(|&c| c == '\u{FFFD}').count();
                    let end = i + tail * '\u{FFFD}'.len_utf8();
                    return Some(MixedScriptHit::Replacement {
                        span: start..end,
                        run: run + tail - 1,
                    });
                }
            } else {
                run_start = None;
                run = 0;
            }
        }
    }

    let mut letters = 0usize;
    let mut foreign = 0usize;
    let mut scripts: Vec<Script> = Vec::new();
    let mut first_run: Option<Range<usize>> = None;
    let mut run_open = false;
    for (i, c) in text.char_indices() {
        let Some(s) = script_of(c) else { continue };
        letters += 1;
        if params.allowed.contains(&s) {
            run_open = false;
            continue;
        }
        foreign += 1;
        if !scripts.contains(&s) {
            scripts.push(s);
        }
        let end = i + c.len_utf8();
        match &mut first_run {
            None => {
                first_run = Some(i..end);
                run_open = true;
            }
            Some(r) if run_open => r.end = end,
            Some(_) => {}
        }
    }
    scripts.sort();
    let span = first_run?;
    let fraction = foreign as f64 / letters.max(1) as f64;
    (foreign >= params.min_foreign && fraction > params.max_fraction).then_some(
        MixedScriptHit::Foreign {
            span,
            foreign,
            letters,
            scripts,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// <think> structure
// ---------------------------------------------------------------------------------------------

/// Parameters of the `<think>` structure check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinkParams {
    /// Opening tag.
    pub open_tag: String,
    /// Closing tag.
    pub close_tag: String,
    /// Accept a single closing tag with no opening tag: chat templates that put the opening tag
    /// into the generation prompt produce completions that start inside the block.
    pub allow_implicit_open: bool,
}

impl Default for ThinkParams {
    fn default() -> Self {
        ThinkParams {
            open_tag: "<think>".to_string(),
            close_tag: "</think>".to_string(),
            allow_implicit_open: false,
        }
    }
}

/// What is wrong with a text's `<think>` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThinkProblem {
    /// An opening tag that is never closed (the model ran out of budget while thinking).
    Unclosed,
    /// A closing tag with no opening tag.
    CloseWithoutOpen,
    /// The closing tag comes before the opening tag.
    CloseBeforeOpen,
    /// A second opening tag inside the first block.
    Nested,
    /// More than one complete block.
    MultipleBlocks,
    /// More closing tags than blocks.
    ExtraClose,
}

impl fmt::Display for ThinkProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThinkProblem::Unclosed => "opening tag is never closed",
            ThinkProblem::CloseWithoutOpen => "closing tag without an opening tag",
            ThinkProblem::CloseBeforeOpen => "closing tag before the opening tag",
            ThinkProblem::Nested => "opening tag nested inside an open block",
            ThinkProblem::MultipleBlocks => "more than one block",
            ThinkProblem::ExtraClose => "extra closing tag",
        })
    }
}

/// Checks that `text` has at most one well-formed block: no tags at all, or exactly one opening
/// tag followed later by exactly one closing tag. On failure, returns the problem and the byte
/// range of the offending tag.
pub fn check_think(text: &str, params: &ThinkParams) -> Result<(), (ThinkProblem, Range<usize>)> {
    let opens: Vec<usize> = text
        .match_indices(params.open_tag.as_str())
        .map(|(i, _)| i)
        .collect();
    let closes: Vec<usize> = text
        .match_indices(params.close_tag.as_str())
        .map(|(i, _)| i)
        .collect();
    let open_at = |i: usize| i..i + params.open_tag.len();
    let close_at = |i: usize| i..i + params.close_tag.len();
    match (opens.as_slice(), closes.as_slice()) {
        ([], []) => Ok(()),
        ([], [_]) if params.allow_implicit_open => Ok(()),
        ([], [_, second, ..]) if params.allow_implicit_open => {
            Err((ThinkProblem::ExtraClose, close_at(*second)))
        }
        ([], [first, ..]) => Err((ThinkProblem::CloseWithoutOpen, close_at(*first))),
        ([open], []) => Err((ThinkProblem::Unclosed, open_at(*open))),
        ([open], [close, ..]) if close < open => {
            Err((ThinkProblem::CloseBeforeOpen, close_at(*close)))
        }
        ([_], [_]) => Ok(()),
        ([_], [_, second, ..]) => Err((ThinkProblem::ExtraClose, close_at(*second))),
        ([_, second, ..], closes) => {
            let nested = closes.first().is_none_or(|c| c > second);
            let problem = if nested {
                ThinkProblem::Nested
            } else {
                ThinkProblem::MultipleBlocks
            };
            Err((problem, open_at(*second)))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Length
// ---------------------------------------------------------------------------------------------

/// A token count and where it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenCount {
    /// Number of tokens.
    pub tokens: u64,
    /// True when estimated from the character count because the teacher reported no usage.
    pub estimated: bool,
    /// Characters of the text the estimate is based on.
    pub chars: usize,
}

/// Token count of `text`: `reported` when the teacher gave one, else `ceil(chars /
/// chars_per_token)` (about 4 characters per token for English with common BPE vocabularies).
pub fn count_tokens(text: &str, reported: Option<u64>, chars_per_token: f64) -> TokenCount {
    let chars = text.chars().count();
    match reported {
        Some(tokens) => TokenCount {
            tokens,
            estimated: false,
            chars,
        },
        None => {
            let per = if chars_per_token > 0.0 {
                chars_per_token
            } else {
                4.0
            };
            TokenCount {
                tokens: (chars as f64 / per).ceil() as u64,
                estimated: true,
                chars,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn think_cases() {
        let p = ThinkParams::default();
        assert!(check_think("no tags", &p).is_ok());
        assert!(check_think("<think>a</think>b", &p).is_ok());
        assert_eq!(
            check_think("<think>a", &p).map_err(|e| e.0),
            Err(ThinkProblem::Unclosed)
        );
        assert_eq!(
            check_think("</think>a<think>", &p).map_err(|e| e.0),
            Err(ThinkProblem::CloseBeforeOpen)
        );
        assert_eq!(
            check_think("<think>a</think><think>b</think>", &p).map_err(|e| e.0),
            Err(ThinkProblem::MultipleBlocks)
        );
        assert_eq!(
            check_think("<think>a<think>b</think></think>", &p).map_err(|e| e.0),
            Err(ThinkProblem::Nested)
        );
        assert_eq!(
            check_think("a</think>b", &p).map_err(|e| e.0),
            Err(ThinkProblem::CloseWithoutOpen)
        );
        let implicit = ThinkParams {
            allow_implicit_open: true,
            ..p
        };
        assert!(check_think("a</think>b", &implicit).is_ok());
    }

    #[test]
    fn repetition_span_points_at_loop() {
        let text = "intro words here. ".to_string() + &"again and again we go round ".repeat(10);
        let p = RepetitionParams {
            ngram: 5,
            max_repeats: 3,
            ..RepetitionParams::default()
        };
        let hit = find_repetition(&text, &p).expect("loop");
        assert!(hit.repeats >= 9, "{hit:?}");
        assert!(text[hit.ngram_span.clone()].starts_with("again"));
    }

    #[test]
    fn chars_unit_catches_loop_without_spaces() {
        let text = "答".repeat(5) + &"我不知道".repeat(30);
        let p = RepetitionParams {
            unit: Unit::Chars,
            ngram: 8,
            max_repeats: 4,
            max_coverage: None,
        };
        assert!(find_repetition(&text, &p).is_some());
    }

    #[test]
    fn scripts() {
        assert_eq!(script_of('a'), Some(Script::Latin));
        assert_eq!(script_of('ℝ'), Some(Script::Latin));
        assert_eq!(script_of('π'), Some(Script::Greek));
        assert_eq!(script_of('я'), Some(Script::Cyrillic));
        assert_eq!(script_of('的'), Some(Script::Han));
        assert_eq!(script_of('7'), None);
        assert_eq!(script_of('+'), None);
    }

    #[test]
    fn replacement_run_evidence_covers_run() {
        let t = "ok \u{FFFD}\u{FFFD}\u{FFFD} x";
        match find_mixed_script(t, &MixedScriptParams::default()) {
            Some(MixedScriptHit::Replacement { span, run }) => {
                assert_eq!(run, 3);
                assert_eq!(&t[span], "\u{FFFD}\u{FFFD}\u{FFFD}");
            }
            other => panic!("{other:?}"),
        }
    }
}
